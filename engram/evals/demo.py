"""`engram demo`: start Ray and the server locally, write a long passkey context over gRPC, ask, report."""

from __future__ import annotations

import random
import tempfile
import time


def run_demo(args) -> int:
    from tqdm import tqdm

    from ..coordinator.background import BackgroundServer
    from ..coordinator.client import EngramClient, format_stats
    from ..coordinator.config import from_args
    from ..decoder.model import load_tokenizer
    from .haystack import PASSKEY_QUESTION, first_integer, passkey_context

    cfg = from_args(args)
    tmp = None
    if args.data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="engram-demo-")
        cfg.shard.data_dir = tmp.name
    key = random.Random(args.seed).randint(10_000, 99_999)
    t0 = time.perf_counter()
    print(f"engram demo: starting Ray with {cfg.cluster.shards} shards (data in {cfg.shard.data_dir})", flush=True)
    with BackgroundServer(cfg) as srv, EngramClient(srv.address) as client:
        http = f", OpenAI-compatible HTTP on {srv.http_url}" if srv.http_url else ""
        print(f"  ready in {time.perf_counter() - t0:.1f} s; gRPC on {srv.address}{http}", flush=True)
        text = passkey_context(args.tokens, args.depth, key, load_tokenizer(cfg.decoder))
        t1 = time.perf_counter()
        with tqdm(total=len(text.encode()), unit="B", unit_scale=True, desc="write over gRPC") as bar:
            w = client.write([("passkey", text)], namespace="demo", progress=bar.update)
        ingest = time.perf_counter() - t1
        print(
            f"  wrote {w.tokens:,} tokens ({len(text.encode()) / 1e6:.1f} MB) as {w.chunks:,} chunks "
            f"({w.new_blocks} distinct blocks encoded) in {ingest:.1f} s: {w.tokens / ingest:,.0f} tokens/s, "
            f"{len(text.encode()) / 1e6 / ingest:.2f} MB/s",
            flush=True,
        )
        t2 = time.perf_counter()
        a = client.ask(PASSKEY_QUESTION, namespace="demo")
        latency = time.perf_counter() - t2
        got = first_integer(a.answer)
        print(f"  asked: {PASSKEY_QUESTION!r}")
        print(f"  answer: {a.answer!r} -> {got} (expected {key}: {'RIGHT' if got == key else 'WRONG'})")
        t = a.timings
        print(
            f"  ask latency {latency:.2f} s: time to first token {t.ttft_s:.2f} s (embed {t.embed_s:.3f}, "
            f"retrieve {t.retrieve_s:.3f}, KV fetch {t.fetch_s:.3f}), decode {t.decode_s:.2f} s, "
            f"{a.context_tokens} KV entries attended"
        )
        print(format_stats(client.stats()))
    print(f"demo finished in {time.perf_counter() - t0:.1f} s")
    if tmp is not None:
        tmp.cleanup()
    return 0 if got == key else 1
