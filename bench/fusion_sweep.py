"""How to fuse dense and lexical scores: recall@k of the answer's chunk on the distinct-text haystack, for several
fusions of the same candidates (issue #13).

Writes the `engram bench distinct` haystack once into a local service (default settings: key contexts on), then for
every asked fact takes each shard's candidates with both raw scores (dense cosine through the episodic memory,
BM25) and ranks them every way below, with the service's score cutoff (ask.min_score_ratio) applied after fusion:

    python bench/fusion_sweep.py --length 128k --out bench/results/fusion_sweep.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def variants(weights=(0.25, 0.5, 1.0)) -> dict:
    out = {"dense": lambda d, b, bmax: d, "bm25": lambda d, b, bmax: b}
    for w in weights:
        out[f"max-norm w={w}"] = lambda d, b, bmax, w=w: d + w * (b / bmax if bmax > 0 else 0.0)
    for k in (5.0, 10.0, 20.0):
        for w in (0.5, 1.0):
            out[f"saturate k={k:g} w={w}"] = lambda d, b, bmax, k=k, w=w: d + w * b / (b + k)
    return out


def rank(cands: list[tuple], score, top_k: int, ratio: float) -> list[tuple]:
    bmax = max((c[1] for c in cands), default=0.0)
    scored = sorted(((score(c[0], c[1], bmax), c) for c in cands), key=lambda x: -x[0])[:top_k]
    if scored and scored[0][0] > 0:
        scored = [x for x in scored if x[0] >= ratio * scored[0][0]]
    return [c for _, c in scored]


def rrf(cands: list[tuple], top_k: int, k: float = 60.0) -> list[tuple]:
    dense = {c: i for i, c in enumerate(sorted(cands, key=lambda c: -c[0]))}
    lex = {c: i for i, c in enumerate(sorted((c for c in cands if c[1] > 0), key=lambda c: -c[1]))}
    fused = {c: 1 / (k + dense[c]) + (1 / (k + lex[c]) if c in lex else 0.0) for c in cands}
    return sorted(cands, key=lambda c: -fused[c])[:top_k]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", default="128k")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="max-norm BM25 weights")
    ap.add_argument("--out", default="bench/results/fusion_sweep.json")
    a = ap.parse_args()

    from engram.coordinator.ask import global_bm25
    from engram.coordinator.background import BackgroundServer
    from engram.coordinator.client import EngramClient
    from engram.coordinator.config import EngramConfig
    from engram.evals.cases import parse_length
    from engram.evals.distinct import chunk_of_answer, corpus, make_facts, plant

    cfg = EngramConfig()
    cfg.cluster.shards = 2
    cfg.server.metrics_port = None
    tmp = tempfile.TemporaryDirectory(prefix="engram-fusion-")
    cfg.shard.data_dir = tmp.name
    srv = BackgroundServer(cfg).start()
    engine, tok = srv.engine, srv.engine.tokenizer
    length = parse_length(a.length)
    rng = random.Random(a.seed)
    docs = corpus(length, tok, max(1000, min(4096, length // 30)))  # one fact per document
    facts = make_facts(rng)
    plant(docs, facts, tok, cfg.encoder.chunk_tokens, rng)
    texts = dict(docs)
    t0 = time.perf_counter()
    with EngramClient(srv.address, timeout=7200) as c:
        c.write(docs, namespace="fusion")
    write_s = time.perf_counter() - t0
    ratio = cfg.ask.min_score_ratio
    table: dict = {}
    per_fact = []
    for f in (f for f in facts if f.question):
        _, answer_chunks = chunk_of_answer(texts[f.document], f, tok, cfg.encoder.chunk_tokens)
        z = engine.cluster.embedder.embed.remote([f.question])

        async def search(z=z, q=f.question):
            vec = (await z)[0]
            return await engine.cluster.all_shards("search", "fusion", vec, 64, False, q)

        results = asyncio.run_coroutine_threadsafe(search(), srv.loop).result(300)
        cands = list(
            {
                (float(d), float(b), doc, int(q))
                for r, bm in zip(results, global_bm25(results))
                for d, b, doc, q in zip(r.score, bm, r.doc, r.seq)
            }
        )

        def hit(top, f=f, answer_chunks=answer_chunks) -> bool:
            return any(doc == f.document and q in answer_chunks for _, _, doc, q in top)

        row = {name: hit(rank(cands, fn, a.top_k, ratio)) for name, fn in variants(a.weights).items()}
        row["rrf k=60"] = hit(rrf(cands, a.top_k))
        per_fact.append({"kind": f.kind, "answer": f.answer, **row})
        for name, ok in row.items():
            table.setdefault(name, {}).setdefault(f.kind, []).append(ok)
    srv.stop()
    summary = {name: {k: sum(v) / len(v) for k, v in kinds.items()} for name, kinds in table.items()}
    for name, kinds in table.items():
        summary[name]["all"] = sum(sum(v) for v in kinds.values()) / sum(len(v) for v in kinds.values())
    kinds = ["uuid-key", "identifier", "boundary", "paraphrase", "all"]
    print(f"recall@{a.top_k} of the answer's chunk, {length:,} distinct tokens (ingest {write_s:.0f} s)")
    print("| fusion | " + " | ".join(kinds) + " |")
    for name, s in summary.items():
        print(f"| {name} | " + " | ".join(f"{s.get(k, 0):.2f}" for k in kinds) + " |")
    with open(a.out, "w") as fh:
        json.dump({"length": length, "top_k": a.top_k, "write_s": write_s, "summary": summary, "facts": per_fact}, fh)
    tmp.cleanup()


if __name__ == "__main__":
    main()
