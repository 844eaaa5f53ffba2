"""The decoder alone (no Ray, no service): B asks answered one after another vs decoded together
(MemoryDecoder.answer_batch), on int4 passkey blocks as the service stores them (1-4 blocks per ask, as top-4 with
the score cutoff reads). Asks per second and how the time splits (cache assembly, prefill, decode steps).

    python bench/batch_decode.py --batches 1 4 8 16 32 --new-tokens 6 32 --out bench/results/batch_decode
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    p.add_argument("--new-tokens", type=int, nargs="+", default=[6, 32])
    p.add_argument("--matmul-dtype", default="auto", help="decoder.matmul_dtype: auto, float32 or bfloat16")
    p.add_argument("--out", default="bench/results/batch_decode")
    args = p.parse_args()

    from engram.decoder import blocks as kv
    from engram.decoder.generate import MemoryDecoder
    from engram.decoder.layout import BlockLayout
    from engram.decoder.model import DecoderConfig, load
    from engram.evals.haystack import PASSKEY_FILLER, PASSKEY_QUESTION, passkey_needle

    model, tok = load(DecoderConfig(matmul_dtype=args.matmul_dtype))
    layout = BlockLayout.of(model.config, 128, 0, "int4")
    dec = MemoryDecoder(model, tok, kv_dtype="int4")
    ids = lambda text: tok(text, add_special_tokens=False).input_ids
    filler = ids(PASSKEY_FILLER * 30)[:128]
    keys = [10000 + 7919 * i for i in range(max(args.batches))]
    chunks = [(filler[:40] + ids(passkey_needle(k)) + filler)[:128] for k in keys]
    needles = kv.blocks_of(kv.encode_chunks(model, dec.sink_id, chunks, layout))
    plain = kv.blocks_of(kv.encode_chunks(model, dec.sink_id, [filler], layout))[0]
    asks = [(PASSKEY_QUESTION, [plain] * (i % 4) + [needles[i]], 128, 0) for i in range(len(keys))]
    rows = []
    for new in args.new_tokens:
        for b in args.batches:
            work = [(q, blocks, t, new) for q, blocks, t, _ in asks[:b]]
            t0 = time.perf_counter()
            alone = [dec.answer(q, blocks, t, n) for q, blocks, t, n in work]
            t_alone = time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.inference_mode():
                for _, blocks, t, _ in work:
                    dec.build_cache(blocks, t)
            t_caches = time.perf_counter() - t0
            t0 = time.perf_counter()
            together = {}
            for r, part in dec.answer_batch(work, [lambda: False] * b):
                if not isinstance(part, str):
                    together[r] = part
            t_batch = time.perf_counter() - t0
            same = sum(together[i].text == a.text for i, a in enumerate(alone))
            right = sum(str(k) in together[i].text for i, k in enumerate(keys[:b]))
            row = {
                "batch": b,
                "new_tokens": new,
                "alone_asks_per_s": b / t_alone,
                "batched_asks_per_s": b / t_batch,
                "speedup": t_alone / t_batch,
                "cache_assembly_s": t_caches,
                "batch_s": t_batch,
                "same_answers": same,
                "right": right,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
