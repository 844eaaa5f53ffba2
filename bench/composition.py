"""Reading many blocks at once (issue #16): accuracy and time to first token against blocks read, for int4 blocks
read as today and with the blocks' attention logits scaled (`MemoryDecoder(block_key_scale=s)`, an inverse
attention temperature over memory, APE-style), beside RAG re-prefilling the same chunks' tokens. The decoder
in-process, no service; each grid encodes its chunks once (as the service's encoders do) and every reader gets the
same blocks in the same order, so cells differ by the reader only.

    .venv/bin/python bench/composition.py [--blocks 4 8 16] [--scales 1 1.15 1.3] [--trials 24] [--out ...]

  passkey   one needle chunk among N - 1 filler chunks (bench/kv_sparsity.py's setup), needle block at a random place
  niah      the essay needle's chunk(s) among other chunks of the 8k-token essay, random depth
  distinct  each asked fact of the distinct-text benchmark: its chunks among chunks of another document
"""

import argparse
import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from kv_codec import distinct_blocks, distinct_facts, encode, niah_blocks, passkey_blocks, stored, tally

from engram.decoder.generate import MemoryDecoder
from engram.decoder.model import DecoderConfig, load
from engram.decoder.rope import layer_rotaries
from engram.evals import cases
from engram.evals import distinct as dt
from engram.evals.haystack import PASSKEY_QUESTION

T = 128


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.15, 1.3])
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--grids", nargs="+", default=["passkey", "niah", "distinct"])
    ap.add_argument("--no-rag", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model, tok = load(DecoderConfig())
    rot = layer_rotaries(model)
    readers = {f"int4 x{s:g}": MemoryDecoder(model, tok, kv_dtype="int4", block_key_scale=s) for s in args.scales}
    plain = next(iter(readers.values()))
    ways = [*readers, *([] if args.no_rag else ["rag"])]
    rows: dict[str, dict] = {w: {} for w in ways}
    ttft: dict[tuple[str, int], list[float]] = {}

    def ask(question, chunks, order, n, max_new):
        """Every way's answer to the question over these chunks (tokens, context) in this reading order."""
        batch = encode(model, plain, chunks)
        blocks = stored(batch, "int4", rot, order)
        out = {}
        for w in ways:
            if w == "rag":
                a = plain.answer_text(question, [chunks[i][0] for i in order], max_new)
            else:
                a = readers[w].answer(question, blocks, T, max_new)
            ttft.setdefault((w, n), []).append(a.prefill_s)
            out[w] = a.text
        return out

    rng = random.Random(0)
    if "passkey" in args.grids:
        for n in args.blocks:
            right = dict.fromkeys(ways, 0)
            for _ in range(args.trials):
                key, cs = passkey_blocks(tok, n, rng)
                for w, a in ask(PASSKEY_QUESTION, cs, range(n), n, 12).items():
                    right[w] += cases.first_integer(a) == key
            tally(rows, "passkey", n, right, args.trials)
    if "niah" in args.grids:
        hay = cases.Haystack("niah", tok, 2048)
        for n in args.blocks:
            right = dict.fromkeys(ways, 0)
            for t in range(args.trials):
                case, picked = niah_blocks(tok, hay, n, t, rng)
                for w, a in ask(case.question, picked, range(n), n, 16).items():
                    right[w] += cases.score(case, a) == 1.0
            tally(rows, "niah", n, right, args.trials)
    if "distinct" in args.grids:
        docs, asked = distinct_facts(tok)
        for n in args.blocks:
            right = dict.fromkeys(ways, 0)
            for f in asked:
                chunks, order, _ = distinct_blocks(tok, docs, f, n, rng)
                for w, a in ask(f.question, chunks, order, n, 16).items():
                    right[w] += dt.right(f.kind, f.answer, a)
            tally(rows, "distinct", n, right, len(asked))

    for (w, n), times in ttft.items():
        rows[w][f"ttft_{n}"] = round(float(np.median(times)), 3)
    cols = [f"{g}_{n}" for g in args.grids for n in args.blocks] + [f"ttft_{n}" for n in args.blocks]
    print("| reader | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for w, r in rows.items():
        print(f"| {w} | " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
