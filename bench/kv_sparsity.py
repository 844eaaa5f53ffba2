"""Passkey recall from independently encoded KV blocks vs tokens kept per layer/head and stored K/V dtype.

    .venv/bin/python bench/kv_sparsity.py [--trials 10] [--keep 4 8 16 32 64 128] [--dtypes float16 int8 int4]

One needle chunk among N filler chunks (T = 128), each encoded from [sink] alone, placed side by side with
re-rotated keys behind one shared sink; greedy answer; exact match on the key.
"""

import argparse
import os
import random
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from engram.decoder import blocks as kv
from engram.decoder.generate import MemoryDecoder
from engram.decoder.layout import BlockLayout
from engram.decoder.model import DecoderConfig, load
from engram.evals.haystack import PASSKEY_FILLER, PASSKEY_QUESTION, passkey_needle

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


def stored_bytes_per_token(model, keep: int, kv_dtype: str) -> float:
    """K/V columns (codes + scales) and positions of one block, per chunk token (tokens/latents not included)."""
    return BlockLayout.of(model.config, T, keep, kv_dtype).block_bytes / T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--keep", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128], help="tokens kept of 128")
    ap.add_argument("--dtypes", nargs="+", default=["float16", "int8", "int4"])
    ap.add_argument("--blocks", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--scorer", default="key_norm", choices=["key_norm", "attention"])
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model, tok = load(DecoderConfig())
    full = BlockLayout.of(model.config, T, 0).full_fp16_bytes_per_token
    print(f"| kept / 128 | K/V dtype | bytes/token (vs {full:,} fp16) | blocks | passkey | mean TTFT |")
    print("|---|---|---|---|---|---|")
    for keep in args.keep:
        for kv_dtype in args.dtypes:
            layout = BlockLayout.of(model.config, T, keep, kv_dtype)
            dec = MemoryDecoder(model, tok, kv_dtype=kv_dtype)
            per_token = stored_bytes_per_token(model, layout.keep_tokens, kv_dtype)
            for n_blocks in args.blocks:
                rng = random.Random(0)  # the same needles and depths in every cell
                ok, ttft = 0, 0.0
                for _ in range(args.trials):
                    key = rng.randint(10000, 99999)
                    chunks = chunks_for(tok, key, rng.randrange(n_blocks), n_blocks, rng)
                    batch = kv.encode_chunks(model, dec.sink_id, chunks, layout, span=min(8, keep), scorer=args.scorer)
                    a = dec.answer(PASSKEY_QUESTION, kv.blocks_of(batch), T, 8)
                    got = re.findall(r"\d+", a.text)
                    ok += bool(got) and got[0] == str(key)
                    ttft += a.prefill_s
                print(
                    f"| {keep} | {kv_dtype} | {per_token:,.0f} ({full / per_token:.1f}x smaller) | {n_blocks} | "
                    f"{ok}/{args.trials} | {ttft / args.trials:.3f} s |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
