"""Passkey recall from independently encoded KV blocks vs tokens kept per layer/head and scorer.

    .venv/bin/python bench/kv_sparsity.py [--trials 10]

One needle chunk among N filler chunks (T = 128), each encoded from [sink] alone, placed side by side with
re-rotated keys behind one shared sink; greedy answer; exact match on the key.
"""

import argparse
import os
import random
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from engram.coordinator.haystack import PASSKEY_FILLER, PASSKEY_QUESTION, passkey_needle
from engram.decoder import kv
from engram.decoder.model import DecoderConfig, load

T = 128


def chunks_for(tok, key, needle_at, n_chunks, rng):
    ids = tok(PASSKEY_FILLER * 60, add_special_tokens=False).input_ids
    needle = tok(" " + passkey_needle(key), add_special_tokens=False).input_ids
    out = []
    for c in range(n_chunks):
        base = ids[c * 37 : c * 37 + T]
        if c == needle_at:
            p = rng.randint(0, T - len(needle) - 1)
            base = (base[:p] + needle + base[p:])[:T]
        out.append(base)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model, tok = load(DecoderConfig())
    dec = kv.MemoryDecoder(model, tok)
    print("| scorer | kept / 128 | blocks | passkey | mean TTFT |\n|---|---|---|---|---|")
    for scorer, keep in [("-", 128), ("key_norm", 64), ("key_norm", 32), ("attention", 96), ("attention", 64), ("attention", 32)]:
        layout = kv.KVLayout.of(model, T, keep)
        for n_blocks in (4, 8):
            rng = random.Random(0)
            ok, ttft = 0, 0.0
            for _ in range(args.trials):
                key = rng.randint(10000, 99999)
                chunks = chunks_for(tok, key, rng.randrange(n_blocks), n_blocks, rng)
                k, v, p = kv.encode_chunks(model, dec.sink_id, chunks, layout, scorer=scorer if scorer != "-" else "key_norm")
                a = dec.answer(PASSKEY_QUESTION, [(k[i], v[i], p[i]) for i in range(n_blocks)], T, 8)
                got = re.findall(r"\d+", a.text)
                ok += bool(got) and got[0] == str(key)
                ttft += a.prefill_s
            print(f"| {scorer} | {keep} | {n_blocks} | {ok}/{args.trials} | {ttft / args.trials:.3f} s |", flush=True)


if __name__ == "__main__":
    main()
