"""The reader's matmuls in bfloat16 or int8 (decoder.matmul_dtype, --reader): does it answer as the float32 reader,
and how much faster is it? Same cases and int4 blocks as bench/relevance_bias.py (passkey, NIAH, distinct text; 4 and 16
blocks; retrieval bias λ = 0 and 10), each answered by both readers; then asks/s of B asks over passkey blocks
decoded together (answer_batch; B = 1 is one ask), the two readers alternating. --no-answers: the timing only.

    .venv/bin/python bench/reader_dtype.py --trials 24 --out bench/results/reader_dtype
    .venv/bin/python bench/reader_dtype.py --reader int8 --trials 24 --out bench/results/reader_int8_steps
    .venv/bin/python bench/reader_dtype.py --reader int8-all --trials 24 --out bench/results/reader_int8_all_passes
"""

import argparse
import copy
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from kv_codec import distinct_blocks, distinct_facts, encode, niah_blocks, passkey_blocks, stored
from relevance_bias import T, window_scores

from engram.decoder.generate import MemoryDecoder
from engram.decoder.model import Bf16Linear, DecoderConfig, Int8Linear, load, replace_linears
from engram.decoder.rope import layer_rotaries
from engram.evals import cases
from engram.evals import distinct as dt
from engram.evals.haystack import PASSKEY_QUESTION
from engram.workers.embedder import Embedder


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 10.0])
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-answers", action="store_true", help="timing only")
    ap.add_argument(
        "--reader",
        choices=["bfloat16", "int8", "int8-all"],
        default="bfloat16",
        help="the Linear layers compared (int8-all: every pass in int8, questions too; not a setting)",
    )
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model, tok = load(DecoderConfig(matmul_dtype="float32"))
    fast = copy.deepcopy(model)
    kinds = {"bfloat16": Bf16Linear, "int8": Int8Linear, "int8-all": Int8EveryPass}
    n_linear = replace_linears(fast, kinds[args.reader])
    rot = layer_rotaries(model)
    name = {"bfloat16": "bf16", "int8": "int8", "int8-all": "int8"}[args.reader]  # the keys saved results use
    readers = {"float32": MemoryDecoder(model, tok, kv_dtype="int4"), name: MemoryDecoder(fast, tok, kv_dtype="int4")}
    embedder = Embedder("minilm")
    right = {}  # (grid, blocks, λ, reader) -> count
    same = {}  # (grid, blocks, λ) -> answers identical between the readers
    totals = {}

    def ask(grid, n, question, chunks, order, max_new, correct):
        blocks = stored(encode(model, readers["float32"], chunks), "int4", rot, order)
        gap = window_scores(embedder, tok, question, [chunks[i] for i in order])
        gap = gap - gap.max()
        totals[(grid, n)] = totals.get((grid, n), 0) + 1
        for lam in args.lambdas:
            bias = list(lam * gap) if lam else None
            texts = {r: d.answer(question, blocks, T, max_new, block_bias=bias).text for r, d in readers.items()}
            for r, text in texts.items():
                right[(grid, n, lam, r)] = right.get((grid, n, lam, r), 0) + bool(correct(text))
            same[(grid, n, lam)] = same.get((grid, n, lam), 0) + (texts["float32"] == texts[name])

    rng = random.Random(0)
    grid_blocks = [] if args.no_answers else args.blocks
    for n in grid_blocks:
        for _ in range(args.trials):
            key, cs = passkey_blocks(tok, n, rng)
            ask("passkey", n, PASSKEY_QUESTION, cs, list(range(n)), 12, lambda a, k=key: cases.first_integer(a) == k)
        print("passkey", n, "done", flush=True)
    hay = cases.Haystack("niah", tok, 2048) if grid_blocks else None
    for n in grid_blocks:
        for t in range(args.trials):
            case, picked = niah_blocks(tok, hay, n, t, rng)
            ask("niah", n, case.question, picked, list(range(n)), 16, lambda a, c=case: cases.score(c, a) == 1.0)
        print("niah", n, "done", flush=True)
    docs, asked = distinct_facts(tok) if grid_blocks else ({}, [])
    for n in grid_blocks:
        for f in asked:
            chunks, order, _ = distinct_blocks(tok, docs, f, n, rng)
            ask("distinct", n, f.question, chunks, order, 16, lambda a, f=f: dt.right(f.kind, f.answer, a))
        print("distinct", n, "done", flush=True)

    print(f"\n{n_linear} Linear layers in {args.reader}\n")
    print(f"| grid | blocks | λ | float32 reader | {name} matmuls | same answer |\n|---|---|---|---|---|---|")
    table = []
    for (grid, n), total in totals.items():
        for lam in args.lambdas:
            row = {
                "grid": grid,
                "blocks": n,
                "lambda": lam,
                "float32": right[(grid, n, lam, "float32")],
                name: right[(grid, n, lam, name)],
                "same": same[(grid, n, lam)],
                "of": total,
            }
            table.append(row)
            cells = [f"{row[k]}/{total}" for k in ("float32", name, "same")]
            print(f"| {grid} | {n} | {lam:g} | " + " | ".join(cells) + " |")

    speed = timing(readers, model, tok, rot, args, name)
    if args.out:
        Path(args.out).with_suffix(".json").write_text(
            json.dumps({"args": vars(args), "threads": torch.get_num_threads(), "answers": table, "speed": speed})
        )


class Int8EveryPass(Int8Linear):
    """The first cut of decoder.matmul_dtype = "int8": question passes rounded to int8 too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.step(x)


def timing(readers, model, tok, rot, args, name: str) -> list[dict]:
    """asks/s of B asks over 1-4 int4 passkey blocks (6 new tokens), decoded together, the readers alternating."""
    rng = random.Random(1)
    asks = []
    for i in range(max(args.batches)):
        _, cs = passkey_blocks(tok, 1 + i % 4, rng)
        blocks = stored(encode(model, readers["float32"], cs), "int4", rot, list(range(len(cs))))
        asks.append((PASSKEY_QUESTION, blocks, T, 6))
    out = []
    print(f"\n| asks together | float32 asks/s | {name} asks/s | speed-up |\n|---|---|---|---|")
    for b in args.batches:
        times = {r: [] for r in readers}
        for _ in range(args.repeats):
            for r, d in readers.items():
                t0 = time.perf_counter()
                for _row, _part in d.answer_batch(asks[:b], [lambda: False] * b):
                    pass
                times[r].append(time.perf_counter() - t0)
        rate = {r: b / float(np.median(t)) for r, t in times.items()}
        out.append({"batch": b, **{f"{r}_asks_per_s": v for r, v in rate.items()}})
        gain = rate[name] / rate["float32"]
        print(f"| {b} | {rate['float32']:.2f} | {rate[name]:.2f} | {gain:.2f}x |", flush=True)
    return out


if __name__ == "__main__":
    main()
