"""Scaling: ingest rate and ask latency against shard count and tokens stored; memory held per shard.

Each configuration starts its own local Ray + gRPC server (in this process), writes passkey documents of
`--doc-tokens` tokens over gRPC until the target total is stored, asks the passkey question (the needle is in
the last document) and records per-shard resident memory from Stats.

The passkey filler repeats, so its chunks de-duplicate to a handful of KV blocks: the figures measure the
coordinator, routing, commit and index path (chunk rows, episodic memories, search over every chunk), not the
decoder's prefill of new text or disk bytes (that is the `engram write` essays figure in BENCHMARKS.md).

    python bench/scaling.py --shards 1 2 4 8 --tokens 1000000                # ingest vs shards
    python bench/scaling.py --shards 2 --tokens 1000000 4000000 10000000     # latency vs stored tokens
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "token")


def run(shards: int, totals: list[int], doc_tokens: int, asks: int, num_cpus: int | None) -> list[dict]:
    import ray
    from tqdm import tqdm

    from engram.coordinator.background import BackgroundServer
    from engram.coordinator.client import EngramClient
    from engram.coordinator.config import EngramConfig
    from engram.evals.haystack import PASSKEY_QUESTION, first_integer, passkey_context

    cfg = EngramConfig()
    cfg.cluster.shards, cfg.cluster.num_cpus, cfg.server.metrics_port = shards, num_cpus, None
    cfg.cluster.dedup_scope = "cluster"  # one tenant: identical filler shared across namespaces, as measured before
    rows = []
    with tempfile.TemporaryDirectory(prefix="engram-scale-") as tmp:
        cfg.shard.data_dir = tmp
        with BackgroundServer(cfg) as srv, EngramClient(srv.address, timeout=3600) as c:
            rng, stored, n_doc, ingest_s, ingest_tokens, ingest_bytes = random.Random(shards), 0, 0, 0.0, 0, 0
            for total in totals:
                with tqdm(
                    total=total,
                    initial=stored,
                    unit="tok",
                    unit_scale=True,
                    desc=f"{shards} shards -> {total / 1e6:g}M tokens",
                ) as bar:
                    while stored < total:
                        key = rng.randint(10_000, 99_999)
                        text = passkey_context(min(doc_tokens, total - stored), rng.random(), key, srv.engine.tokenizer)
                        t0 = time.perf_counter()
                        w = c.write([(f"doc-{n_doc}", text)], namespace="scale")
                        ingest_s += time.perf_counter() - t0
                        ingest_tokens, ingest_bytes = ingest_tokens + w.tokens, ingest_bytes + len(text.encode())
                        stored, n_doc = stored + w.tokens, n_doc + 1
                        bar.update(w.tokens)
                latencies, ttft, right = [], [], 0
                for _ in range(asks):
                    t0 = time.perf_counter()
                    a = c.ask(PASSKEY_QUESTION, namespace="scale")
                    latencies.append(time.perf_counter() - t0)
                    ttft.append(a.timings.ttft_s)
                    right += first_integer(a.answer) is not None  # the key of *some* document: all hold one
                s = c.stats()
                rows.append(
                    {
                        "shards": shards,
                        "tokens_stored": s.tokens,
                        "documents": s.documents,
                        "chunks": s.chunks,
                        "blocks": s.blocks,
                        "ingest_tokens_per_s": ingest_tokens / ingest_s,
                        "ingest_mb_per_s": ingest_bytes / 1e6 / ingest_s,
                        "ask_latency_s_median": statistics.median(latencies),
                        "ttft_s_median": statistics.median(ttft),
                        "retrieve_s_last": a.timings.retrieve_s,
                        "answers_with_a_key": f"{right}/{asks}",
                        "shard_rss_mb": [round(sh.resident_bytes / 1e6) for sh in s.shards],
                        "shard_chunks": [sh.chunks for sh in s.shards],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    ray.shutdown()
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--tokens", type=int, nargs="+", default=[1_000_000], help="stored-token checkpoints")
    p.add_argument("--doc-tokens", type=int, default=250_000)
    p.add_argument("--asks", type=int, default=3)
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--out", default="bench/results/scaling.json")
    args = p.parse_args(argv)
    rows = [r for n in args.shards for r in run(n, sorted(args.tokens), args.doc_tokens, args.asks, args.num_cpus)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    Path(args.out).write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=1))
    print(
        f"\n{'shards':>6} {'tokens':>11} {'chunks':>8} {'ingest tok/s':>13} {'MB/s':>6} {'ask s':>6} "
        f"{'TTFT s':>7} {'retrieve s':>10}  shard RSS MB"
    )
    for r in rows:
        print(
            f"{r['shards']:>6} {r['tokens_stored']:>11,} {r['chunks']:>8,} {r['ingest_tokens_per_s']:>13,.0f} "
            f"{r['ingest_mb_per_s']:>6.2f} {r['ask_latency_s_median']:>6.2f} {r['ttft_s_median']:>7.2f} "
            f"{r['retrieve_s_last']:>10.3f}  {r['shard_rss_mb']}"
        )
    return rows


if __name__ == "__main__":
    main()
