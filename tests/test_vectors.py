"""The shard's vector index (FAISS): candidates equal to an obviously-correct brute force, deleted chunks skipped,
IVF past its threshold keeping the exact top-k, and a shard's search through the index equal to scoring every chunk
(before and after a delete, and after a restart rebuilds it)."""

import numpy as np
import pytest

from engram.workers.shard import Shard, ShardConfig
from engram.workers.vectors import NamespaceVectors, VectorConfig, VectorIndex
from tests.test_shard import LAYOUT, EpisodicConfig, unit_batch, write


def unit(rng, *shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def brute_force(latents, alive, q, chunks):
    """Chunk rows by their best window's inner product with q, live ones, best first."""
    best = (latents @ q).max(1)
    order = [r for r in np.argsort(-best, kind="stable") if alive[r]]
    return np.array(order[:chunks])


@pytest.mark.parametrize("chunks", [1, 8, 40])
def test_flat_candidates_are_the_brute_force_top(chunks):
    rng = np.random.default_rng(0)
    latents = unit(rng, 500, 3, 32)  # [n, R, C]
    alive = rng.random(500) > 0.3  # a third deleted: the index must look past them
    v = NamespaceVectors(32, VectorConfig(ann_min_vectors=0))
    v.add(np.arange(200), latents[:200])
    v.add(np.arange(200, 500), latents[200:])  # two appends: the row map grows
    for q in unit(rng, 5, 32):
        got = v.search(q, chunks, alive)
        want = brute_force(latents, alive, q, chunks)
        # float16 vectors: near-ties may swap; the sets agree and the scores are within float16's error
        best = (latents @ q).max(1)
        np.testing.assert_allclose(np.sort(best[got]), np.sort(best[want]), atol=2e-3)
        assert alive[got].all() and len(set(got)) == len(got) == chunks


@pytest.mark.parametrize("factory,params", [("IVF{cells},SQfp16", "nprobe=64"), ("HNSW32_SQfp16", "efSearch=128")])
def test_ann_past_its_threshold_keeps_the_exact_top_k(factory, params):
    """Clustered vectors (as sentence embeddings are): past ann_min_vectors the index becomes the ANN index and its
    64 candidates still hold >= 0.99 of the exact top 16 chunks."""
    rng = np.random.default_rng(1)
    centres = unit(rng, 64, 48)
    n = 6000
    latents = centres[rng.integers(0, 64, (n, 3))] + 0.35 * unit(rng, n, 3, 48)
    latents /= np.linalg.norm(latents, axis=-1, keepdims=True)
    v = NamespaceVectors(48, VectorConfig(ann_min_vectors=9000, ann_factory=factory, ann_params=params))
    v.add(np.arange(2000), latents[:2000])
    assert not v.ann
    v.add(np.arange(2000, n), latents[2000:])
    v.wait()  # built in the background
    assert v.ann and v.index.ntotal == 3 * n
    alive = np.ones(n, dtype=bool)
    found = []
    for q in latents[rng.integers(0, n, 50), 0] + 0.1 * unit(rng, 50, 48):
        q /= np.linalg.norm(q)
        want = set(brute_force(latents, alive, q, 16).tolist())
        found.append(len(want & set(v.search(q, 64, alive).tolist())) / 16)
    assert np.mean(found) >= 0.99


@pytest.mark.parametrize("factory", ["", "IVF{cells},SQfp16", "HNSW32_SQfp16"])
def test_latents_come_back_by_chunk_row_as_float16(factory):
    """The index is the shard's in-RAM copy of the latents: a chunk row's windows come back as their float16
    rounding, flat or ANN; a row it does not hold gives None (the shard reads the disk)."""
    rng = np.random.default_rng(4)
    latents = unit(rng, 300, 3, 16)
    params = {"": "nprobe=64", "IVF{cells},SQfp16": "nprobe=4", "HNSW32_SQfp16": "efSearch=64"}[factory]
    cfg = VectorConfig(
        ann_min_vectors=600 if factory else 0, ann_factory=factory or "IVF{cells},SQfp16", ann_params=params
    )
    v = NamespaceVectors(16, cfg)
    rows = np.arange(0, 600, 2)  # the namespace's chunk rows: every other row of the shard
    v.add(rows[:150], latents[:150])
    v.add(rows[150:], latents[150:])
    v.wait()
    assert v.ann == bool(factory)
    pick = np.array([7, 299, 0, 150])
    want = latents[pick].astype(np.float16).astype(np.float32)
    if factory.startswith("IVF"):  # IVF codes each vector's residual to its cell's centroid in float16
        np.testing.assert_allclose(v.latents(rows[pick]), latents[pick], atol=1e-3)
    else:
        np.testing.assert_array_equal(v.latents(rows[pick]), want)
    assert v.latents(np.array([1])) is None and v.latents(np.array([600])) is None
    assert v.latents(np.array([], dtype=np.int64)).shape == (0, 3, 16)


def test_the_ivf_index_is_rebuilt_as_it_doubles():
    """Past the threshold the IVF index is rebuilt each time the vectors it holds double, so its cells stay
    sqrt(n) of what it holds (fixed cells would each fill linearly, and with them a search's time); the rebuilt
    index still finds the exact best chunk and gives every chunk's latents back."""
    import faiss

    rng = np.random.default_rng(5)
    latents = unit(rng, 1200, 3, 16)
    v = NamespaceVectors(16, VectorConfig(ann_min_vectors=600, ann_params="nprobe=64"))
    cells = []
    for part in np.split(np.arange(1200), 8):  # 450 vectors per add
        v.add(part, latents[part])
        v.wait()
        cells.append(faiss.extract_index_ivf(v.index).nlist if v.ann else 0)
    # built at 900 vectors (30 cells), rebuilt at 1,800 (42) and at 3,600 (60); each add in between only adds
    assert cells == [0, 30, 30, 42, 42, 42, 42, 60] and v.index.ntotal == 3600
    alive = np.ones(1200, dtype=bool)
    for i in (3, 700, 1199):
        assert v.search(latents[i, 1], 1, alive)[0] == i
    np.testing.assert_allclose(v.latents(np.arange(1200)), latents, atol=2e-3)


def test_the_ann_index_is_built_in_the_background_while_the_exact_index_serves(monkeypatch):
    """Crossing the threshold starts the build and returns (a commit once waited ~7 s for it at 1M vectors): until
    the build is done, searches are exact over everything added, the vectors added meanwhile included; then the ANN
    index serves them too. A failed build leaves the exact index serving."""
    import threading

    from engram.workers import vectors as vx

    rng = np.random.default_rng(6)
    latents = unit(rng, 1000, 3, 16)
    release, real = threading.Event(), vx.build_ann
    monkeypatch.setattr(vx, "build_ann", lambda *a: release.wait(30) and real(*a))
    v = NamespaceVectors(16, VectorConfig(ann_min_vectors=1500, ann_params="nprobe=64"))
    v.add(np.arange(600), latents[:600])  # 1,800 vectors: past the threshold
    assert v.building is not None and not v.ann
    v.add(np.arange(600, 1000), latents[600:])  # while it builds
    alive = np.ones(1000, dtype=bool)
    for q in unit(rng, 5, 16):
        np.testing.assert_array_equal(v.search(q, 8, alive), brute_force(latents, alive, q, 8))
    assert not v.ann
    release.set()
    v.wait()
    assert v.ann and v.building is None and v.index.ntotal == 3000 and v.built_at == 1800
    for i in (5, 650, 999):  # before the copy and after it
        assert v.search(latents[i, 2], 1, alive)[0] == i
    np.testing.assert_allclose(v.latents(np.arange(1000)), latents, atol=2e-3)

    def fails(*a):
        raise MemoryError("no room")

    monkeypatch.setattr(vx, "build_ann", fails)
    w = NamespaceVectors(16, VectorConfig(ann_min_vectors=1500))
    w.add(np.arange(1000), latents)
    w.wait()
    assert not w.ann and w.building is None and w.search(latents[7, 0], 1, alive)[0] == 7


def test_a_wrong_ann_setting_fails_at_start():
    with pytest.raises(ValueError, match="not a FAISS index"):
        VectorConfig(ann_factory="IVF{cells},Nonsense")
    with pytest.raises(ValueError, match="not a FAISS index"):
        VectorConfig(ann_params="nprobe=lots")


def test_small_namespaces_are_scored_whole():
    ix = VectorIndex(8, VectorConfig(exact_below_chunks=10))
    ix.add(4, np.array(["a"] * 4, dtype=object), np.arange(4), unit(np.random.default_rng(2), 4, 3, 8))
    assert ix.search("a", np.ones(8), 2, np.ones(4, bool)) is None and ix.search("b", np.ones(8), 2, None) is None


def shard(tmp_path, exact_below):
    episodic = EpisodicConfig(rows=4, dim=6)
    vectors = VectorConfig(exact_below_chunks=exact_below)
    return Shard(0, ShardConfig(data_dir=str(tmp_path), fsync=False, episodic=episodic, vectors=vectors), LAYOUT)


def same_hits(a, b):
    assert list(a.block) == list(b.block) and a.doc == b.doc
    np.testing.assert_allclose(a.score, b.score, rtol=1e-9)


def test_search_through_the_index_equals_scoring_every_chunk(tmp_path):
    rng = np.random.default_rng(3)
    s = shard(tmp_path, exact_below=0)  # always through the index
    for d in range(6):
        ids = list(range(400 * d, 400 * d + 400))
        write(s, f"doc{d}", unit_batch(rng, ids), ids)
    write(s, "elsewhere", unit_batch(rng, [9000, 9001]), [9000, 9001], ns="other")
    queries = [s.blocks.latents([r])[0, 0] for r in (3, 477, 2001)] + list(unit(rng, 3, 6).astype(np.float64))

    def check(s):
        whole = shard(tmp_path, exact_below=10**9)  # the same store, every chunk scored
        for q in queries:
            for k in (1, 4):
                same_hits(s.search("ns", q, k), whole.search("ns", q, k))
        whole.store.close()

    check(s)
    assert s.vectors.namespaces["ns"].chunks == 2400 and s.vectors.namespaces["other"].chunks == 2
    s.delete_document("ns", "doc1")  # rows 400..799 are dead: skipped, never returned
    check(s)
    assert "doc1" not in s.search("ns", queries[1], 4).doc
    s.store.close()
    check(shard(tmp_path, exact_below=0))  # rebuilt on open
