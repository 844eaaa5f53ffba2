"""Retrieval on distinct text at 1M tokens and beyond, without the K/V encoding (issue #13).

Encoding 1M tokens' K/V takes ~45 minutes on 2 cores, and retrieval never reads it. This run builds the same
haystack as `engram bench distinct` (docstrings of the installed packages, never repeating, facts of every kind
planted), cuts and routes it exactly as the service does (routing.split / chunk_hash / route over 2 shards), makes
each chunk's retrieval keys with the service's own Encoder code (`Encoder.retrieval_keys`: windows and lexical
key text), and stores them in real shards (real Zarr stores, episodic memories, lexical and vector indexes) whose K/V
layout is tiny. Each asked fact is then retrieved as an Ask retrieves it — every shard's search, then the
coordinator's merge (global BM25, fusion, score cutoff) — and the rank of the chunk holding its answer is recorded.

    python bench/distinct_retrieval.py --lengths 128k 1M --out bench/results/distinct_retrieval
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm
from vector_scaling import synthetic_blocks  # bench/: zero K/V, what retrieval reads

DEEP = 64


def tiny_layout(real):
    """The real layout's chunks and retrieval latents, a one-value K/V: for runs that store what retrieval reads."""
    from engram.decoder.layout import BlockLayout

    return BlockLayout(
        layers=1,
        kv_heads=1,
        keep_tokens=real.chunk_tokens,
        head_dim=1,
        chunk_tokens=real.chunk_tokens,
        latent_dim=real.latent_dim,
        latents_per_chunk=real.latents_per_chunk,
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", nargs="+", default=["128k", "1M"])
    p.add_argument("--segment", type=int, default=4096, help="tokens per document")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--keys", type=int, default=4)
    p.add_argument("--distractors", type=int, default=6)
    p.add_argument("--per-kind", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=None)
    p.add_argument("--batch", type=int, default=256, help="chunks per embedding batch")
    p.add_argument("--out", default="")
    p.add_argument("--only-docs", nargs="*", default=[], help="write only these documents (e.g. doc-00147)")
    p.add_argument("--save-latents", default="", help="write every window latent here (.npy, float16)")
    p.add_argument(
        "--compare-float32",
        type=int,
        default=0,
        metavar="N",
        help="also rank every fact's question and N more (a random chunk's opening words each) with the windows "
        "scored on their float32 latents read from disk instead of the vector index's float16 copy; report how "
        "often the merged top k and top 64 differ",
    )
    a = p.parse_args()

    import torch

    from engram.coordinator import routing
    from engram.coordinator.ask import adjacent, candidates, global_bm25, global_stats, merge, top_hits
    from engram.coordinator.config import EngramConfig, block_layout, content_fingerprint
    from engram.decoder.model import DecoderConfig
    from engram.evals.cases import parse_length
    from engram.evals.distinct import KINDS, chunk_of_answer, corpus, make_facts, plant
    from engram.evals.report import machine
    from engram.workers.encoder import Encoder
    from engram.workers.lexical import idf
    from engram.workers.shard import Shard

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = EngramConfig.load(a.config)
    real = block_layout(cfg)
    e = cfg.encoder
    fp = content_fingerprint(cfg, real)
    encoder = Encoder(e, DecoderConfig(**{**vars(cfg.decoder), "threads": os.cpu_count() or 1}), real)
    tok = encoder.tokenizer
    tiny = tiny_layout(real)
    results = []
    for length in (parse_length(x) for x in a.lengths):
        rng = random.Random(a.seed)
        docs = corpus(length, tok, a.segment)
        facts = make_facts(rng, a.keys, a.distractors, a.per_kind)
        plant(docs, facts, tok, e.chunk_tokens, rng)
        if a.only_docs:  # the haystack as at this length, but only these documents written (to look at a case)
            docs = [d for d in docs if d[0] in a.only_docs]
            facts = [f for f in facts if f.document in a.only_docs]
        with tempfile.TemporaryDirectory() as tmp:
            cfg.shard.data_dir, cfg.shard.fsync = tmp, False
            shards = [Shard(i, cfg.shard, tiny) for i in range(a.shards)]
            t0 = time.perf_counter()
            chunks_in, embed_s, tokens = 0, 0.0, 0
            for name, text in tqdm(docs, desc=f"write {length:,} tokens (keys only)", unit="doc"):
                ids = routing.tokenize(tok, text)
                tokens += len(ids)
                chunks = routing.split(ids, e.chunk_tokens, e.cut_context_tokens, e.key_after_tokens)
                hashes = [routing.chunk_hash(c.tokens, fp, c.context, "", c.after) for c in chunks]
                owner = [routing.route(h, list(range(a.shards))) for h in hashes]
                t = time.perf_counter()
                keyed = [
                    encoder.retrieval_keys(
                        [list(c.tokens) for c in chunks[i : i + a.batch]],
                        [list(c.context) for c in chunks[i : i + a.batch]],
                        [list(c.after) for c in chunks[i : i + a.batch]],
                    )
                    for i in range(0, len(chunks), a.batch)
                ]
                latent = np.concatenate([k[0] for k in keyed])
                texts = np.concatenate([k[1] for k in keyed]).tolist()
                embed_s += time.perf_counter() - t
                for s, shard in enumerate(shards):
                    mine = [i for i, o in enumerate(owner) if o == s]
                    if not mine:
                        continue
                    shard.put_blocks(
                        synthetic_blocks(
                            tiny,
                            [hashes[i] for i in mine],
                            latent[mine],
                            [len(chunks[i].tokens) for i in mine],
                            [texts[i] for i in mine],
                        )
                    )
                    shard.commit_document(
                        "ns",
                        name,
                        len(ids),
                        [hashes[i] for i in mine],
                        [chunks[i].seq for i in mine],
                        [chunks[i].offset for i in mine],
                    )
                chunks_in += len(chunks)
            write_s = time.perf_counter() - t0
            texts = dict(docs)
            rows = []
            for f in (f for f in facts if f.question):
                _, answer_chunks = chunk_of_answer(texts[f.document], f, tok, e.chunk_tokens)
                z = encoder.embed([f.question])[0]
                ranks = {}
                t = time.perf_counter()
                for k in (a.top_k, DEEP):
                    shard_hits = [s.search("ns", z, k, text=f.question) for s in shards]
                    every = candidates(list(range(a.shards)), shard_hits, cfg.ask)  # fused, best first
                    found = top_hits(every, k, cfg.ask.min_score_ratio)  # what merge returns
                    hit = [i for i, h in enumerate(found) if h.document_id == f.document and h.seq in answer_chunks]
                    ranks[k] = hit[0] if hit else DEEP
                    if k == a.top_k:  # what an Ask reads: the top k and the chunks beside them the question reaches
                        search_s = time.perf_counter() - t
                        read = found + adjacent(every, found, cfg.ask.adjacent_lexical)
                        answer_read = any(h.document_id == f.document and h.seq in answer_chunks for h in read)
                    else:  # every shard's candidates at depth 64: for re-ranking rules tried offline
                        deep = [[h.document_id, h.seq, round(h.dense, 5), round(h.lexical, 5)] for h in every]
                        # the raw scale of the lexical column: its best BM25, and the query's summed idf (BM25 of
                        # an average-length text holding each query term once)
                        lexical_best = max((float(b.max()) for b in global_bm25(shard_hits) if len(b)), default=0.0)
                        lexical_idf = float(idf(global_stats(shard_hits)).sum())
                rows.append(
                    {
                        "kind": f.kind,
                        "answer": f.answer,
                        "in_top_k": ranks[a.top_k] < a.top_k,
                        "answer_read": answer_read,
                        "blocks_read": len(read),
                        "rank_deep": ranks[DEEP],
                        "search_s": search_s,
                        "document": f.document,
                        "answer_chunks": sorted(answer_chunks),
                        "deep": deep,
                        "lexical_best": lexical_best,
                        "lexical_idf": lexical_idf,
                    }
                )
            if a.compare_float32:
                summary_cmp = compare_float32(shards, facts, encoder, tok, docs, a, cfg, merge)
            stats = [s.stats() for s in shards]
            if a.save_latents:  # real MiniLM window vectors, for bench/vector_scaling.py --vectors
                held = [s.blocks.latents(np.arange(len(s.blocks))).reshape(-1, real.latent_dim) for s in shards]
                np.save(a.save_latents, np.concatenate(held).astype(np.float16))
            for s in shards:
                s.store.close()
        by_kind = {
            k: [r["in_top_k"] for r in rows if r["kind"] == k] for k in KINDS if any(r["kind"] == k for r in rows)
        }
        summary = {
            "length": length,
            "tokens": tokens,
            "chunks": chunks_in,
            "documents": len(docs),
            "write_s": round(write_s, 1),
            "embed_s": round(embed_s, 1),
            "recall_at_k": f"{sum(r['in_top_k'] for r in rows)}/{len(rows)}",
            "answer_read": f"{sum(r['answer_read'] for r in rows)}/{len(rows)}",
            "blocks_read_mean": round(float(np.mean([r["blocks_read"] for r in rows])), 2),
            "by_kind": {k: f"{sum(v)}/{len(v)}" for k, v in by_kind.items()},
            "search_p50_s": round(float(np.median([r["search_s"] for r in rows])), 4),
            "vectors_ivf": [bool(s.vectors.namespaces["ns"].ann) for s in shards],
            "chunks_per_shard": [st.chunks for st in stats],
            "facts": rows,
        }
        if a.compare_float32:
            summary["float16_vs_float32"] = summary_cmp
        print(json.dumps({k: v for k, v in summary.items() if k != "facts"}), flush=True)
        for r in rows:
            if not r["in_top_k"]:
                print("  missed:", r["kind"], r["answer"], "rank", r["rank_deep"], "read", r["answer_read"], flush=True)
        results.append(summary)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        out = {"task": "distinct-retrieval", "machine": machine(), "args": vars(a), "lengths": results}
        Path(a.out + ".json").write_text(json.dumps(out, indent=1))


def compare_float32(shards, facts, encoder, tok, docs, a, cfg, merge) -> dict:
    """The merged top k and top 64 of each query, windows scored on the index's float16 vectors (the shard's
    default) and on the float32 latents from disk: how many lists differ, and the largest score difference."""
    from engram.workers.shard import Shard

    rng = random.Random(a.seed + 1)
    questions = [f.question for f in facts if f.question]
    for _ in range(a.compare_float32):  # a random chunk's opening ~24 tokens, as a question
        ids = tok(rng.choice(docs)[1], add_special_tokens=False).input_ids
        start = rng.randrange(0, max(1, len(ids) - 24))
        questions.append(tok.decode(ids[start : start + 24]))
    z = encoder.embed(questions)

    def ranked(q, text, k):
        found = merge(list(range(a.shards)), [s.search("ns", q, k, text=text) for s in shards], k, cfg.ask)
        return [(h.document_id, h.seq) for h in found], [h.score for h in found]

    from_index = [(ranked(q, t, a.top_k), ranked(q, t, DEEP)) for q, t in zip(z, questions)]
    default = Shard._window_vectors
    Shard._window_vectors = lambda self, ns, rows, blocks: self.blocks.latents(blocks).astype(np.float64)
    try:
        from_disk = [(ranked(q, t, a.top_k), ranked(q, t, DEEP)) for q, t in zip(z, questions)]
    finally:
        Shard._window_vectors = default
    return {
        "queries": len(questions),
        "top_k_lists_differ": sum(x[0][0] != y[0][0] for x, y in zip(from_index, from_disk)),
        "top_k_sets_differ": sum(set(x[0][0]) != set(y[0][0]) for x, y in zip(from_index, from_disk)),
        "top_64_lists_differ": sum(x[1][0] != y[1][0] for x, y in zip(from_index, from_disk)),
        "max_score_difference_top_k": max(
            (abs(u - v) for x, y in zip(from_index, from_disk) if x[0][0] == y[0][0] for u, v in zip(x[0][1], y[0][1])),
            default=0.0,
        ),
    }


if __name__ == "__main__":
    main()
