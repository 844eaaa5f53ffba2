"""Asks of mixed lengths arriving while others decode: latency with and without joining the running batch.

The decoder worker in-process (no Ray, no service; its own 2 torch threads), ask.max_batch 16, int4 passkey blocks
(1-4 per ask). Asks arrive at random (Poisson, the same seeded schedule for both ways): most are short (a pass key,
6 new tokens), some long (a story, 64 new tokens). Without joining, an ask that arrives while a batch decodes
waits for all of it, long answers included; with joining it enters between steps.

    python bench/continuous_batching.py --seconds 40 --rate 2 --long-share 0.2 --out bench/results/continuous_batching
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=40.0, help="arrivals stop after this long")
    p.add_argument("--rate", type=float, default=2.0, help="asks per second, on average")
    p.add_argument("--long-share", type=float, default=0.2)
    p.add_argument("--long-tokens", type=int, default=64)
    p.add_argument("--short-tokens", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/continuous_batching")
    args = p.parse_args()

    rng = random.Random(args.seed)
    schedule, t = [], 0.0
    while True:
        t += rng.expovariate(args.rate)
        if t > args.seconds:
            break
        schedule.append((t, rng.random() < args.long_share, rng.randrange(4)))
    rows = [run(join, schedule, args) for join in (True, False)]
    with open(args.out + ".json", "w") as f:
        json.dump({"settings": vars(args), "rows": rows}, f, indent=1)


def run(join: bool, schedule: list[tuple[float, bool, int]], args) -> dict:
    """The schedule's asks against a fresh worker (joining or not) -> latencies by kind."""
    from engram.decoder import blocks as kv
    from engram.decoder.layout import BlockLayout
    from engram.decoder.model import DecoderConfig
    from engram.evals.haystack import PASSKEY_FILLER, PASSKEY_QUESTION, passkey_needle
    from engram.workers.decoder_worker import DecoderWorker

    worker = DecoderWorker(DecoderConfig(threads=2), "consecutive", "int4", max_batch=16, join_running=join)
    model, tok, sink = worker.decoder.model, worker.decoder.tokenizer, worker.decoder.sink_id
    layout = BlockLayout.of(model.config, 128, 0, "int4")
    filler = tok(PASSKEY_FILLER * 30, add_special_tokens=False).input_ids[:128]
    chunk = (filler[:40] + tok(passkey_needle(48213), add_special_tokens=False).input_ids + filler)[:128]
    needle = kv.blocks_of(kv.encode_chunks(model, sink, [chunk], layout))
    plain = kv.blocks_of(kv.encode_chunks(model, sink, [filler], layout))[0]
    worker.answer(PASSKEY_QUESTION, 128, 2, [(0, 0)], [plain])  # warm up
    latencies: dict[str, list[float]] = {"short": [], "long": []}
    right, lock, threads = [0], threading.Lock(), []

    def ask(is_long: bool, extra: int) -> None:
        blocks = [plain] * extra + needle
        question = "Tell the whole story of the grass and the sky." if is_long else PASSKEY_QUESTION
        n = args.long_tokens if is_long else args.short_tokens
        t0 = time.perf_counter()
        out = worker.answer(question, 128, n, [(0, j) for j in range(len(blocks))], blocks)
        with lock:
            latencies["long" if is_long else "short"].append(time.perf_counter() - t0)
            right[0] += (not is_long) and "48213" in out.text

    start = time.perf_counter()
    for at, is_long, extra in schedule:
        time.sleep(max(0.0, start + at - time.perf_counter()))
        threads.append(threading.Thread(target=ask, args=(is_long, extra)))
        threads[-1].start()
    for th in threads:
        th.join()
    row = {"join_running": join, "asks": len(schedule), "wall_s": round(time.perf_counter() - start, 1)}
    row["short_right"] = right[0]
    for kind, lat in latencies.items():
        a = np.array(lat)
        row[kind] = {"n": len(a), **{f"p{q}_s": round(float(np.percentile(a, q)), 3) for q in (50, 99)}}
    row["batches"] = len(worker.batch_sizes())
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
