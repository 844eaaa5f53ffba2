"""What the commit that crosses `shard.vectors.ann_min_vectors` waits for, now that the ANN index is built in the
background (issue #13): NamespaceVectors filled to just under the threshold, then one more chunk's windows added.
Reports that add's time (what the commit waits), the build's time until the new index serves, and the exact
searches answered while it built (their p50 and p99: the build shares the cores). Vectors: bench/vector_scaling.py's
clustered unit vectors (a build's time hardly depends on how they are spread).

    .venv/bin/python bench/ann_build.py --vectors 1000000 --out bench/results/ann_build_1m.json
"""

import argparse
import json
import time

import numpy as np
from vector_scaling import DIM, WINDOWS, clustered

from engram.workers.vectors import NamespaceVectors, VectorConfig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vectors", type=int, default=1_000_000)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    chunks = -(-a.vectors // WINDOWS)  # the last chunk's windows cross the threshold
    vectors = clustered(chunks * WINDOWS, rng)
    latents = vectors.reshape(chunks, WINDOWS, DIM)
    v = NamespaceVectors(DIM, VectorConfig(ann_min_vectors=a.vectors))
    below = chunks - 1
    for at in range(0, below, 65536):
        v.add(np.arange(at, min(below, at + 65536)), latents[at : min(below, at + 65536)])
    assert not v.ann and v.building is None
    t0 = time.perf_counter()
    v.add(np.arange(below, chunks), latents[below:])
    add_s = time.perf_counter() - t0
    alive, searches = np.ones(chunks, dtype=bool), []
    while v.building is not None and v.building.thread.is_alive():
        q = vectors[rng.integers(0, len(vectors))]
        t = time.perf_counter()
        v.search(q, 64, alive)
        searches.append(time.perf_counter() - t)
    v.wait()
    out = {
        "vectors": int(v.count),
        "crossing_add_s": round(add_s, 3),
        "build_s": round(time.perf_counter() - t0, 2),
        "searches_during_build": len(searches),
        "search_p50_ms": round(1000 * float(np.median(searches)), 1) if searches else None,
        "search_p99_ms": round(1000 * float(np.percentile(searches, 99)), 1) if searches else None,
        "ann_serving": bool(v.ann),
    }
    print(json.dumps(out))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
