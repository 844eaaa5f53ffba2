"""Storage at scale (issue #15): write a real, distinct corpus through gRPC and measure what it costs to hold.

The corpus is the installed packages' docstrings (engram/evals/distinct.py: no text repeats, so every chunk is its
own block). Reported: ingest tokens/s, bytes and files on disk per token and per block, write amplification
(bytes the shard processes wrote to disk / bytes stored), shard RAM per million tokens owned (resident set growth
over the empty shard), the time to reopen each shard's store and memories (what a restarted shard does before it
serves), and ask latency / time to first token.

    python bench/storage.py --tokens 100000 --out bench/results/storage_100k.json
    python bench/storage.py --tokens 1000000 --out bench/results/storage_1m.json      # the issue's 1M run
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


def shard_io(pids: list[int]) -> list[dict]:
    """Bytes each shard process has written: to the disk (write_bytes) and through write calls (wchar)."""
    import psutil

    out = []
    for pid in pids:
        io = psutil.Process(pid).io_counters()
        out.append({"write_bytes": io.write_bytes, "wchar": getattr(io, "write_chars", 0)})
    return out


def shard_uss(pids: list[int]) -> list[int]:
    """Memory private to each shard process (USS): without the shared pages (Ray's object store, libraries) that
    its resident set also counts."""
    import psutil

    return [psutil.Process(pid).memory_full_info().uss for pid in pids]


def engine_stats(srv):
    """The engine's own stats (shard pids included), from the server's event loop."""
    import asyncio

    return asyncio.run_coroutine_threadsafe(srv.engine.stats(), srv.loop).result(timeout=600)


def files_and_bytes(root: Path) -> tuple[int, int]:
    files = [f for f in root.rglob("*") if f.is_file()]
    return len(files), sum(f.stat().st_size for f in files)


def run(args) -> dict:
    import ray
    from tqdm import tqdm

    from engram.coordinator.background import BackgroundServer
    from engram.coordinator.client import EngramClient
    from engram.coordinator.config import EngramConfig
    from engram.evals.distinct import corpus
    from engram.workers.shard import Shard

    cfg = EngramConfig()
    cfg.cluster.shards, cfg.server.metrics_port, cfg.server.http_port = args.shards, None, -1
    tmp = tempfile.mkdtemp(prefix="engram-storage-", dir=args.data_parent)
    cfg.shard.data_dir = tmp
    rng = random.Random(0)
    with BackgroundServer(cfg) as srv, EngramClient(srv.address, timeout=3600) as c:
        docs = corpus(args.tokens, srv.engine.tokenizer, args.doc_tokens)
        empty = engine_stats(srv)
        pids = [sh.pid for sh in empty.shards]
        io_before = shard_io(pids)
        t0, written, early = time.perf_counter(), 0, None
        with tqdm(total=sum(len(t) for _, t in docs), unit="B", unit_scale=True, desc="write") as bar:
            for i in range(0, len(docs), args.batch):
                w = c.write(docs[i : i + args.batch], namespace="storage", progress=bar.update)
                written += w.tokens
                if early is None and written >= args.tokens // 5:  # RAM per token: the slope from here to the end
                    early, early_uss = engine_stats(srv), shard_uss(pids)
        ingest_s = time.perf_counter() - t0
        io_after = shard_io(pids)
        s, end_uss = engine_stats(srv), shard_uss(pids)
        parts = ray.get([shard.ram_parts.remote() for shard in srv.engine.cluster.shards])
        files, on_disk = files_and_bytes(Path(tmp))
        latencies, ttft = [], []
        for _ in range(args.asks):
            _, text = rng.choice(docs)
            first = text.strip().split(".")[0][:200]
            t1 = time.perf_counter()
            a = c.ask(f"{first}. What does this describe?", namespace="storage", max_new_tokens=16)
            latencies.append(time.perf_counter() - t1)
            ttft.append(a.timings.ttft_s)
        layout = srv.engine.layout
    ray.shutdown()
    restart = []
    for sh in s.shards:  # reopen each shard's store and memories in this process, as a restarted actor does
        t1 = time.perf_counter()
        shard = Shard(sh.shard, cfg.shard, layout)
        restart.append(time.perf_counter() - t1)
        shard.store.close()
    wrote = sum(a["write_bytes"] - b["write_bytes"] for a, b in zip(io_after, io_before))
    wchar = sum(a["wchar"] - b["wchar"] for a, b in zip(io_after, io_before))
    slope = [  # resident bytes per token owned, from 1/5 of the corpus to all of it (one-time allocations out)
        (sh.resident_bytes - e.resident_bytes) / (sh.tokens - e.tokens) if sh.tokens > e.tokens else None
        for sh, e in zip(s.shards, early.shards)
    ]
    row = {
        "tokens": s.tokens,
        "documents": s.documents,
        "chunks": s.chunks,
        "blocks": s.blocks,
        "ingest_s": round(ingest_s, 1),
        "ingest_tokens_per_s": round(written / ingest_s, 1),
        "stored_bytes": s.stored_bytes,
        "bytes_per_token": round(s.stored_bytes / s.tokens, 1),
        "files": files,
        "files_per_block": round(files / max(1, s.blocks), 4),
        "disk_bytes_written": wrote,
        "write_amplification": round(wrote / on_disk, 3) if wrote else None,
        "write_call_bytes": wchar,
        "write_call_amplification": round(wchar / on_disk, 3) if wchar else None,
        "shard_rss_mb": [round(sh.resident_bytes / 1e6) for sh in s.shards],
        "shard_tokens": [sh.tokens for sh in s.shards],
        "shard_rss_mb_per_m_tokens": [round(b, 1) if b is not None else None for b in slope],
        "shard_uss_mb": [round(u / 1e6) for u in end_uss],
        "shard_uss_mb_per_m_tokens": [
            round((u - e) / (sh.tokens - es.tokens), 1) if sh.tokens > es.tokens else None
            for u, e, sh, es in zip(end_uss, early_uss, s.shards, early.shards)
        ],
        "ram_parts_mb_per_m_tokens": [
            {k: round(v / sh.tokens, 1) for k, v in part.items()} for part, sh in zip(parts, s.shards)
        ],
        "episodes": [sh.episodes for sh in s.shards],
        "restart_s": [round(r, 2) for r in restart],
        "ask_latency_s_median": round(statistics.median(latencies), 3),
        "ttft_s_median": round(statistics.median(ttft), 3),
    }
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        row["data_dir"] = tmp
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--doc-tokens", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8, help="documents per Write call")
    p.add_argument("--asks", type=int, default=5)
    p.add_argument("--data-parent", default=None, help="where the store's temporary data_dir goes")
    p.add_argument("--keep", action="store_true", help="keep the data_dir (its path is in the result)")
    p.add_argument("--out", default="bench/results/storage.json")
    args = p.parse_args(argv)
    row = run(args)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "args": vars(args), "result": row}, indent=1))
    print(json.dumps(row, indent=1))
    return row


if __name__ == "__main__":
    main()
