"""Drafts from memory (ask.draft_tokens): do batched asks answer as without drafts, in how many fewer passes, and
how much faster? The cases and int4 blocks of bench/reader_dtype.py (passkey, NIAH, distinct text; 4 and 16 blocks
in reading order; retrieval bias λ = 10, the default), each grid's asks answered 16 at a time by answer_batch with
draft_tokens 0 and then --draft; every block carries its chunk's tokens, as the shards hand them to the decoder.

    .venv/bin/python bench/drafts.py --trials 24 --out bench/results/drafts
"""

import argparse
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
from engram.decoder.model import DecoderConfig, load
from engram.decoder.rope import layer_rotaries
from engram.evals import cases
from engram.evals import distinct as dt
from engram.evals.haystack import PASSKEY_QUESTION
from engram.workers.embedder import Embedder


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--draft", type=int, default=8)
    ap.add_argument("--lam", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model, tok = load(DecoderConfig(matmul_dtype="float32"))
    rot = layer_rotaries(model)
    dec = MemoryDecoder(model, tok, kv_dtype="int4")
    embedder = Embedder("minilm")
    passes = [0]
    model.register_forward_hook(lambda m, i, out: passes.__setitem__(0, passes[0] + 1))
    grids: dict[tuple[str, int], list] = {}  # (grid, blocks) -> [(ask, correct)]

    def case(grid, n, question, chunks, order, max_new, correct):
        blocks = stored(encode(model, dec, chunks), "int4", rot, order)
        for b, i in zip(blocks, order):
            b["tokens"] = np.asarray(chunks[i][0], dtype=np.int32)
        gap = window_scores(embedder, tok, question, [chunks[i] for i in order])
        bias = list(args.lam * (gap - gap.max())) if args.lam else None
        grids.setdefault((grid, n), []).append(((question, blocks, T, max_new, bias), correct))

    rng = random.Random(0)
    for n in args.blocks:
        for _ in range(args.trials):
            key, cs = passkey_blocks(tok, n, rng)
            case("passkey", n, PASSKEY_QUESTION, cs, list(range(n)), 12, lambda a, k=key: cases.first_integer(a) == k)
    hay = cases.Haystack("niah", tok, 2048)
    for n in args.blocks:
        for t in range(args.trials):
            c, picked = niah_blocks(tok, hay, n, t, rng)
            case("niah", n, c.question, picked, list(range(n)), 16, lambda a, c=c: cases.score(c, a) == 1.0)
    docs, asked = distinct_facts(tok)
    for n in args.blocks:
        for f in asked:
            chunks, order, _ = distinct_blocks(tok, docs, f, n, rng)
            case("distinct", n, f.question, chunks, order, 16, lambda a, f=f: dt.right(f.kind, f.answer, a))
    print("cases ready", flush=True)

    def run(asks, draft: int):
        """-> (answers, forward passes, seconds): the asks `args.batch` at a time."""
        dec.draft_tokens = draft
        passes[0], answers, t0 = 0, [], time.perf_counter()
        for s in range(0, len(asks), args.batch):
            part = asks[s : s + args.batch]
            got = {}
            for row, piece in dec.answer_batch(part, [lambda: False] * len(part)):
                got[row] = piece
            answers += [got[r] for r in range(len(part))]
        return answers, passes[0], time.perf_counter() - t0

    table = []
    head = "| grid | blocks | right, no drafts | right, drafts | same answer | passes | tokens | time |"
    print(f"\n{head}\n|---|---|---|---|---|---|---|---|")
    for (grid, n), items in grids.items():
        asks = [a for a, _ in items]
        with torch.inference_mode():
            plain, plain_passes, plain_s = run(asks, 0)
            drafted, draft_passes, draft_s = run(asks, args.draft)
        row = {
            "grid": grid,
            "blocks": n,
            "of": len(asks),
            "right_plain": sum(bool(c(a.text)) for a, (_, c) in zip(plain, items)),
            "right_drafts": sum(bool(c(a.text)) for a, (_, c) in zip(drafted, items)),
            "same": sum(a.token_ids == b.token_ids for a, b in zip(plain, drafted)),
            "tokens": sum(len(a.token_ids) for a in plain),
            "passes_plain": plain_passes,
            "passes_drafts": draft_passes,
            "seconds_plain": plain_s,
            "seconds_drafts": draft_s,
        }
        table.append(row)
        of = row["of"]
        print(
            f"| {grid} | {n} | {row['right_plain']}/{of} | {row['right_drafts']}/{of} | {row['same']}/{of} | "
            f"{plain_passes} -> {draft_passes} | {row['tokens']} | {plain_s:.1f} -> {draft_s:.1f} s "
            f"({plain_s / draft_s:.2f}x) |",
            flush=True,
        )
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps({"args": vars(args), "grids": table}))


if __name__ == "__main__":
    main()
