"""Retrieval at scale (issue #13): the shard's vector index against exact search, from 100k window vectors up.

Part "index": NamespaceVectors (FAISS) alone on synthetic clustered unit vectors (384-d, as MiniLM's; 3 windows per
chunk, as the default encoder): build time, bytes, query latency (one query, 64 candidate chunks, as a shard asks)
and recall of the exact top-16 chunks among the 64 (the shard re-scores its candidates exactly) and of the exact
top 4 (`ask.top_k`'s default: what an Ask then reads), for the exact fp16
index, IVF at several nprobe and HNSW at several efSearch; the float64 numpy scan the shards did before (#13) as
the baseline, up to the size it fits.
Part "shard": a real Shard (real Zarr store, episodic memories) with a tiny K/V layout but the real latent width and
windows, filled to N chunks; Shard.search latency through the index vs scoring every chunk (the code before), and
whether both return the same top 4.

    python bench/vector_scaling.py index --sizes 100k 300k 1M 3M 5M --out bench/results/vector_scaling_index
    python bench/vector_scaling.py shard --chunks 4k 16k 39k 195k 390k --out bench/results/vector_scaling_shard

Synthetic vectors: clusters of ~100 (intra-cluster cosine ~0.5), queries a stored window plus noise (cosine ~0.6
with it) — closer to sentence embeddings than uniform random vectors, which no ANN index handles well. With
`--like latents.npy` (real MiniLM windows, `bench/distinct_retrieval.py --save-latents`) they are drawn like those
instead (fit_like: clusters, centres and offsets with the real covariances), as many as asked; `--vectors` the same
file at its own size checks that the index finds the same recall on both:

    python bench/vector_scaling.py index --like latents.npy --sizes 300k 1M 3M --out bench/results/vector_scaling_like
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

DIM, WINDOWS = 384, 3


def parse_n(s: str) -> int:
    s = s.lower()
    return int(float(s[:-1]) * {"k": 1e3, "m": 1e6}[s[-1]]) if s[-1] in "km" else int(s)


def clustered(n: int, rng: np.random.Generator, block: int = 500_000) -> np.ndarray:
    """[n, DIM] float32 unit vectors in clusters of ~100."""
    centres = rng.standard_normal((max(1, n // 100), DIM)).astype(np.float32)
    out = np.empty((n, DIM), dtype=np.float32)
    for s in range(0, n, block):
        e = min(n, s + block)
        x = centres[rng.integers(0, len(centres), e - s)] + rng.standard_normal((e - s, DIM)).astype(np.float32)
        out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def fit_like(real: np.ndarray, per_cluster: int = 30) -> tuple:
    """What `like` draws from, fitted to real window vectors: k-means clusters of ~per_cluster windows, a Gaussian of
    their centres and one of the windows' offsets from their centre (Ledoit-Wolf covariances: the spectrum of real
    sentence embeddings, which falls fast, where `clustered`'s noise is the same in all 384 directions)."""
    import faiss
    from sklearn.covariance import LedoitWolf

    x = real / np.linalg.norm(real, axis=1, keepdims=True)
    km = faiss.Kmeans(DIM, max(1, len(x) // per_cluster), niter=20, seed=0)
    km.train(x)
    assign = km.index.search(x, 1)[1][:, 0]
    centres = LedoitWolf().fit(km.centroids)
    offsets = LedoitWolf(assume_centered=True).fit(x - km.centroids[assign])
    chol = lambda c: np.linalg.cholesky(c.covariance_).astype(np.float32)
    return centres.location_.astype(np.float32), chol(centres), chol(offsets), per_cluster


def like(n: int, rng: np.random.Generator, fit: tuple, block: int = 500_000) -> np.ndarray:
    """[n, DIM] float32 unit vectors drawn like the real ones `fit` was fitted to (fit_like), as many as asked."""
    mean, centre_chol, offset_chol, per_cluster = fit
    centres = mean + rng.standard_normal((max(1, n // per_cluster), DIM)).astype(np.float32) @ centre_chol.T
    out = np.empty((n, DIM), dtype=np.float32)
    for s in range(0, n, block):
        e = min(n, s + block)
        x = centres[rng.integers(0, len(centres), e - s)]
        x += rng.standard_normal((e - s, DIM)).astype(np.float32) @ offset_chol.T
        out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def queries(vectors: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    q = vectors[rng.integers(0, len(vectors), count)] + 0.07 * rng.standard_normal((count, DIM)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def exact_top(vectors: np.ndarray, q: np.ndarray, chunks: int, block: int = 1_000_000) -> np.ndarray:
    """The exact best `chunks` chunk rows (a chunk = WINDOWS consecutive vectors, scored by its best)."""
    best = np.concatenate([(vectors[s : s + block] @ q) for s in range(0, len(vectors), block)])
    per_chunk = best.reshape(-1, WINDOWS).max(1)
    top = np.argpartition(-per_chunk, chunks)[:chunks]
    return top[np.argsort(-per_chunk[top])]


def bench_index(a) -> list[dict]:
    import faiss

    from engram.workers.vectors import NamespaceVectors, VectorConfig

    rng = np.random.default_rng(0)
    rows = []
    real = np.load(a.vectors).astype(np.float32) if a.vectors else None
    fit = fit_like(np.load(a.like).astype(np.float32)) if a.like else None
    for n in map(parse_n, a.sizes):
        if real is not None:  # real window vectors (bench/distinct_retrieval.py --save-latents): as many as there are
            n = min(n, len(real))
        n -= n % WINDOWS
        if real is not None:
            vectors = real[:n] / np.linalg.norm(real[:n], axis=1, keepdims=True)
        else:
            vectors = like(n, rng, fit) if fit is not None else clustered(n, rng)
        qs = queries(vectors, a.queries, rng)
        truth = [exact_top(vectors, q, 16).tolist() for q in qs]  # best first
        chunks = n // WINDOWS
        alive = np.ones(chunks, dtype=bool)
        latents = vectors[: chunks * WINDOWS].reshape(chunks, WINDOWS, DIM)
        if n <= a.numpy_max:  # the scan before #13: float64 copy of every latent, einsum, max over windows
            times = []
            for q in qs:
                t = time.perf_counter()
                np.einsum("nrc,c->nr", latents.astype(np.float64), q.astype(np.float64)).max(1).argsort()[-64:]
                times.append(time.perf_counter() - t)
            rows.append(row(n, "numpy float64 scan (before)", 0.0, latents.nbytes, times, 1.0, 1.0))
        # exact: the ANN index off (the default turns it on past 1M vectors, which made this row IVF nprobe 512 there)
        builds = [("exact fp16 (flat)", VectorConfig(ann_min_vectors=0), [None])] if a.exact else []
        if n >= a.ivf_min:  # one build each, searched at each setting
            ivf = VectorConfig(ann_min_vectors=1, ann_factory="IVF{cells},SQfp16")
            builds.append(("IVF sqrt(n) cells, fp16", ivf, [f"nprobe={p}" for p in a.nprobe]))
        if a.hnsw_min <= n <= a.hnsw_max:
            hnsw = VectorConfig(ann_min_vectors=1, ann_factory="HNSW32_SQfp16", ann_params="efSearch=16")
            builds.append(("HNSW32 fp16", hnsw, [f"efSearch={e}" for e in a.ef]))
        for name, cfg, settings in builds:
            t = time.perf_counter()
            v = NamespaceVectors(DIM, cfg)
            v.add(np.arange(chunks), latents)
            v.wait()  # the ANN index is built in the background
            build = time.perf_counter() - t
            for setting in settings:
                if setting is not None:
                    faiss.ParameterSpace().set_index_parameters(v.index, setting)
                times, recall, recall4 = [], [], []
                for q, want in zip(qs, truth):
                    t = time.perf_counter()
                    got = set(v.search(q, 64, alive).tolist())
                    times.append(time.perf_counter() - t)
                    recall.append(len(got.intersection(want)) / 16)  # the shard re-scores all 64 exactly
                    recall4.append(len(got.intersection(want[:4])) / 4)
                label = name if setting is None else f"{name}, {setting}"
                rows.append(row(n, label, build, index_bytes(v.index), times, np.mean(recall), np.mean(recall4)))
            del v
        del vectors, latents
    return rows


def index_bytes(index) -> int:
    """The index's size: its codes, or (HNSW: no standalone codec) its serialised form, graph included."""
    import faiss

    try:
        return index.ntotal * index.sa_code_size()
    except RuntimeError:
        return len(faiss.serialize_index(index))


def row(n, method, build_s, nbytes, times, recall, recall4) -> dict:
    r = {
        "vectors": n,
        "method": method,
        "build_s": round(build_s, 2),
        "bytes": int(nbytes),
        "p50_ms": round(1000 * float(np.median(times)), 2),
        "p99_ms": round(1000 * float(np.percentile(times, 99)), 2),
        "recall_at_16": round(float(recall), 4),
        "recall_at_4": round(float(recall4), 4),
    }
    print(json.dumps(r), flush=True)
    return r


def bench_shard(a) -> list[dict]:
    from engram.decoder.layout import BlockLayout
    from engram.workers.episodic import EpisodicConfig
    from engram.workers.shard import Shard, ShardConfig
    from engram.workers.vectors import VectorConfig

    layout = BlockLayout(
        layers=1, kv_heads=1, keep_tokens=4, head_dim=4, chunk_tokens=4, latent_dim=DIM, latents_per_chunk=WINDOWS
    )
    rng = np.random.default_rng(1)
    out = []
    with tempfile.TemporaryDirectory() as tmp:

        def open_shard(exact_below: int) -> Shard:
            cfg = ShardConfig(data_dir=tmp, fsync=False, episodic=EpisodicConfig(), vectors=VectorConfig())
            cfg.vectors.exact_below_chunks = exact_below
            return Shard(0, cfg, layout)

        shard = open_shard(VectorConfig().exact_below_chunks)
        have, doc = 0, 0
        for target in map(parse_n, a.chunks):
            t0 = time.perf_counter()
            while have < target:
                n = min(a.doc_chunks, target - have)
                lat = clustered(n * WINDOWS, rng).reshape(n, WINDOWS, DIM)
                hashes = [int(have + i).to_bytes(16, "little") for i in range(n)]
                shard.put_blocks(synthetic_blocks(layout, hashes, lat))
                shard.commit_document("ns", f"d{doc}", 4 * n, hashes, list(range(n)), [4 * i for i in range(n)])
                have, doc = have + n, doc + 1
            fill = time.perf_counter() - t0
            latents = shard.blocks.latents(np.arange(have)).reshape(-1, DIM)
            qs = queries(latents, a.queries, rng).astype(np.float64)
            whole = open_shard(10**12)  # the same store scored whole: the search before the index
            t_idx, t_whole, same = [], [], 0
            for q in qs:
                t = time.perf_counter()
                hi = shard.search("ns", q, 4)
                t_idx.append(time.perf_counter() - t)
                t = time.perf_counter()
                hw = whole.search("ns", q, 4)
                t_whole.append(time.perf_counter() - t)
                same += list(hi.block) == list(hw.block)
            r = {
                "chunks": have,
                "tokens_equivalent": have * 128,
                "vectors": have * WINDOWS,
                "ivf": shard.vectors.namespaces["ns"].ann,
                "fill_s": round(fill, 1),
                "search_index_p50_ms": round(1000 * float(np.median(t_idx)), 1),
                "search_index_p99_ms": round(1000 * float(np.percentile(t_idx, 99)), 1),
                "search_whole_p50_ms": round(1000 * float(np.median(t_whole)), 1),
                "same_top4": f"{same}/{len(qs)}",
            }
            print(json.dumps(r), flush=True)
            out.append(r)
            whole.store.close()
            del whole
    return out


def synthetic_blocks(layout, hashes: list[bytes], latents: np.ndarray, lengths=None, texts=None):
    """EncodedBlocks with zero K/V of the tiny layout and what retrieval reads: the given latents [n, R, C], the
    chunks' lengths (default: full) and lexical texts (default: none)."""
    from engram.workers.block_store import EncodedBlocks

    n = len(hashes)
    kv = (n, layout.layers, layout.kv_heads, layout.keep_tokens, layout.head_dim)
    return EncodedBlocks(
        kv={
            "keys": np.zeros(kv, np.float16),
            "values": np.zeros(kv, np.float16),
            "positions": np.zeros(kv[:4], np.int16),
        },
        tokens=np.zeros((n, layout.chunk_tokens), np.int32),
        length=np.full(n, layout.chunk_tokens, np.int32) if lengths is None else np.array(lengths, np.int32),
        hash=np.frombuffer(b"".join(hashes), np.uint8).reshape(n, 16),
        latent=latents.astype(np.float32),
        text=np.array([""] * n if texts is None else texts, dtype=object),
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=["index", "shard"])
    p.add_argument("--sizes", nargs="+", default=["100k", "300k", "1M", "3M", "5M"])
    p.add_argument("--chunks", nargs="+", default=["4k", "16k", "39k", "195k", "390k"])
    p.add_argument("--doc-chunks", type=int, default=8192)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--ivf-min", type=parse_n, default=300_000, help="IVF rows only from this many vectors")
    p.add_argument("--ef", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--hnsw-min", type=parse_n, default=300_000, help="HNSW rows only from this many vectors")
    p.add_argument("--hnsw-max", type=parse_n, default=1_000_000, help="... and up to this many (slow to build)")
    p.add_argument("--numpy-max", type=parse_n, default=1_000_000, help="the float64 scan only up to this size")
    p.add_argument("--vectors", default="", help="real vectors (.npy) instead of synthetic ones")
    p.add_argument("--like", default="", help="synthetic vectors drawn like these real ones (.npy; fit_like)")
    p.add_argument("--no-exact", dest="exact", action="store_false", help="leave out the exact index's row")
    p.add_argument("--out", default="")
    a = p.parse_args()
    rows = bench_index(a) if a.part == "index" else bench_shard(a)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out + ".json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
