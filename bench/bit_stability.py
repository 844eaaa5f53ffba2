"""Are stored blocks bit-stable: does a chunk's int4 block depend on which other chunks were encoded beside it?
The encoder encodes `encoder.batch_chunks` chunks per forward pass, padded to the longest; this compares one chunk
encoded alone, in a batch of 8 full chunks, beside a short chunk, and in two different batches of 8 full chunks,
for the bf16 encoding pass (the default where native), the same with `encoder.fixed_shape` (every pass
batch_chunks rows x the full width), and float32 (BENCHMARKS.md "A run of consecutive chunks"); and what a write
costs with the fixed shape: one 45-token chunk and a full batch of 8 chunks, median of 5.

    .venv/bin/python bench/bit_stability.py
"""

from __future__ import annotations

import time

import numpy as np
import torch


def encode(enc, chunks, ctx, rows: list[int]) -> dict[str, np.ndarray]:
    """These chunks' blocks, encoded together in one call (one forward pass for up to batch_chunks of them)."""
    return enc.encode([chunks[i] for i in rows], [bytes(16)] * len(rows), [ctx[i] for i in rows]).kv


def differ(a, i, b, j) -> dict[str, float]:
    """The share of int4 codes that differ between block i of a and block j of b, per table."""
    return {k: round(float((a[k][i] != b[k][j]).mean()), 4) for k in a if a[k].dtype == np.uint8}


def main() -> None:
    from engram.coordinator.config import EngramConfig, block_layout
    from engram.decoder.model import DecoderConfig
    from engram.evals.haystack import niah_context
    from engram.workers.encoder import Encoder

    torch.set_num_threads(1)  # as an encoder actor has
    cfg = EngramConfig()
    layout = block_layout(cfg)
    for dtype, fixed in (("bfloat16", False), ("bfloat16", True), ("float32", False)):
        cfg.encoder.dtype, cfg.encoder.fixed_shape = dtype, fixed
        enc = Encoder(cfg.encoder, DecoderConfig(), layout)
        ids = enc.tokenizer(niah_context(3000, 0.5, enc.tokenizer), add_special_tokens=False).input_ids
        chunks = [ids[i * 128 : (i + 1) * 128] for i in range(20)]
        ctx = [ids[max(0, i * 128 - 32) : i * 128] for i in range(20)]

        alone, eight = encode(enc, chunks, ctx, [3]), encode(enc, chunks, ctx, list(range(8)))
        short = enc.encode([chunks[3], chunks[5][:40]], [bytes(16)] * 2, [ctx[3], ctx[5]]).kv
        other_eight = encode(enc, chunks, ctx, [3, *range(10, 17)])
        print(f"{dtype}{', fixed shape' if fixed else ''}: share of int4 codes that differ from the chunk alone")
        print("  in a batch of 8 full chunks:", differ(alone, 0, eight, 3))
        print("  beside a 40-token chunk:    ", differ(alone, 0, short, 0))
        print("  two different batches of 8 full chunks, against each other:", differ(eight, 3, other_eight, 0))
        for name, rows in (("one 45-token chunk", None), ("8 full chunks", list(range(8)))):
            times = []
            for _ in range(5):
                t = time.perf_counter()
                if rows is None:
                    enc.encode([chunks[4][:45]], [bytes(16)], [ctx[4]])
                else:
                    encode(enc, chunks, ctx, rows)
                times.append(time.perf_counter() - t)
            print(f"  write of {name}: {np.median(times):.3f} s")


if __name__ == "__main__":
    main()
