"""The shard's vector index (FAISS): candidate chunks for a query by inner product with their window latents, so a
search scores a few hundred chunks through the episodic memories instead of every chunk of the namespace.

Why candidates by the plain query: within an episode's capacity the least-squares readout is the query projected on
the span of the episode's items, so <readout, item> = <query, item> for every stored item — the index ranks the
windows as the memory does; the shard then scores the candidates exactly through their memories (and a Hopfield
memory, which reweights, still sees the best matches by cosine).

One index per namespace, in RAM, derived from the store's latents: built on open, it follows the committed chunk
rows (like the lexical index), a compaction rebuilds it. Deleted and moved chunks are filtered at search time by
the chunk table (what is live). Exact ("Flat", inner product over float16 vectors: half the bytes of the float32
latents) unless a namespace holds `ann_min_vectors` windows on the shard; then an ANN index of FAISS's factory
(IVF, HNSW), built from the vectors it holds — in a background thread, reading the index it replaces, which goes
on serving unchanged (exact below the threshold): built inline, the commit that crossed it held the shard's queue
for the whole build (~7 s at 1M vectors, ~27 s at 3M on 2 cores: BENCHMARKS.md "Vectors drawn like real ones").
Vectors added meanwhile go to a small flat index searched beside it, and join the new one when it is swapped in.

It is also the shard's only in-RAM copy of the latents: the scores that rank (each chunk's windows against its
episode's readout) are taken on the float16 vectors it gives back (`latents`), so a shard does not hold the
float32 latents as well (BENCHMARKS.md "RAM per million tokens": the ranking they give is compared there).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import faiss
import numpy as np

log = logging.getLogger(__name__)
RECONSTRUCT_BATCH = 65536  # vectors decoded at a time when building: bounds the float32 in RAM


@dataclass
class VectorConfig:
    # Exact search (float16 flat) below this many window vectors per namespace and shard; the ANN index above
    # (0 = always exact). On vectors drawn like real MiniLM windows (bench/vector_scaling.py --like), IVF with
    # sqrt(n) cells and 512 probed holds the exact top 4 for 0.999 of queries at 1M vectors (50 vs 78 ms exact) and
    # 0.994 at 3M (87 vs 230 ms): its time grows as sqrt(n), the exact scan's as n. Below 1M exact search is fast
    # enough and IVF's gain small (BENCHMARKS.md "Retrieval at scale").
    ann_min_vectors: int = 1_000_000
    ann_factory: str = "IVF{cells},SQfp16"  # FAISS index_factory string; {cells}: sqrt(vectors held), for IVF
    ann_params: str = "nprobe=512"  # FAISS search parameters (ParameterSpace syntax: "nprobe=64", "efSearch=128")
    exact_below_chunks: int = 4096  # a namespace with fewer chunks on the shard is scored whole (no index needed)

    def __post_init__(self):
        if self.ann_min_vectors < 0 or self.exact_below_chunks < 0:
            raise ValueError("shard.vectors: ann_min_vectors and exact_below_chunks must be 0 or more")
        try:  # a wrong factory string or parameter fails at start, not at the first large commit
            probe = faiss.index_factory(8, self.ann_factory.format(cells=4), faiss.METRIC_INNER_PRODUCT)
            faiss.ParameterSpace().set_index_parameters(probe, self.ann_params)
        except Exception as e:
            raise ValueError(
                f"shard.vectors: ann_factory {self.ann_factory!r} with ann_params {self.ann_params!r} is not a FAISS "
                f"index this build makes ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
            ) from None


def ivf_cells(n: int) -> int:
    """k-means cells for n vectors: sqrt(n), the low end of FAISS's guidance (training and assigning cost grow
    with the cells: 4 sqrt(n) took minutes per million vectors on 2 cores)."""
    return max(1, int(np.sqrt(n)))


class NamespaceVectors:
    """One namespace's window vectors on a shard: FAISS index + which chunk row each vector is a window of."""

    def __init__(self, dim: int, cfg: VectorConfig):
        self.dim, self.cfg = dim, cfg
        self.index = _flat(dim)
        self.tail: faiss.Index | None = None  # while an ANN index builds from `index` (frozen): the vectors added since
        self.rows = np.zeros(1024, dtype=np.int64)  # [capacity] chunk row of each vector (doubling: O(1) appends)
        self.count = 0  # vectors
        self.chunks = 0  # chunk rows (live or not)
        self.windows = 1  # R vectors per chunk row: vectors chunk*R .. chunk*R + R - 1 are its windows
        self.ann = False
        self.built_at = 0  # vectors the ANN index was (or is being) built from: rebuilt once it holds twice as many
        self.building: _Build | None = None  # an ANN index being built in the background

    def add(self, rows: np.ndarray, latents: np.ndarray) -> None:
        """rows [n] chunk rows (ascending, past every row held), latents [n, R, C] their window latents."""
        self._adopt()
        n, windows, _ = latents.shape
        self.windows = windows
        if self.count + n * windows > len(self.rows):
            grown = np.zeros(max(2 * len(self.rows), self.count + n * windows), dtype=np.int64)
            grown[: self.count] = self.rows[: self.count]
            self.rows = grown
        self.rows[self.count : self.count + n * windows] = np.repeat(rows, windows)
        self.count += n * windows
        self.chunks += n
        vectors = np.ascontiguousarray(latents.reshape(-1, self.dim), dtype=np.float32)
        (self.index if self.tail is None else self.tail).add(vectors)
        due = self.cfg.ann_min_vectors and self.count >= max(self.cfg.ann_min_vectors, 2 * self.built_at)
        if due and self.building is None:
            # first past the threshold, then at each doubling: IVF's cells stay sqrt(n) of what it holds, so a
            # search's time keeps growing as sqrt(n) (cells fixed at the first build would each fill up linearly)
            self._start_build()

    def _start_build(self) -> None:
        """The ANN index of every vector held, built in a background thread (FAISS releases the GIL: the shard goes
        on serving) from the serving index, which stays unchanged (and searched) until the build is adopted; what
        is added meanwhile goes to a second, flat index, searched beside it. Once per namespace and shard past the
        threshold, again each time the vectors held double (amortised: each vector is re-added at most about once
        more), and when a restart rebuilds the index."""
        self.built_at = self.count
        self.tail = _flat(self.dim)
        self.building = _Build(self.index)
        self.building.thread = threading.Thread(
            target=self.building.run, args=(self.dim, self.cfg), daemon=True, name="engram-ann-build"
        )
        self.building.thread.start()

    def _adopt(self) -> None:
        """A finished build becomes the serving index, with the vectors added since it began."""
        b = self.building
        if b is None or b.thread.is_alive():
            return
        self.building = None
        tail, self.tail = self.tail, None
        if b.index is None:  # the old index keeps serving (the next doubling tries again), the tail joins it
            log.warning("building the ANN index of %d vectors failed: %s", b.source.ntotal, b.error)
            target = self.index
        else:
            target = b.index
        for at in range(0, tail.ntotal, RECONSTRUCT_BATCH):
            target.add(tail.reconstruct_n(at, min(RECONSTRUCT_BATCH, tail.ntotal - at)))
        if b.index is not None:
            self.index, self.ann = b.index, True

    def wait(self) -> None:
        """Until a build in progress is done and serving (tests, benchmarks; a shard never waits)."""
        if self.building is not None:
            self.building.thread.join()
            self._adopt()

    def latents(self, rows: np.ndarray) -> np.ndarray | None:
        """[n, R, C] float32 the window vectors of these chunk rows, as the index holds them (float16 values);
        None if a row is not in it."""
        self._adopt()
        held = self.rows[: self.count : self.windows]  # [chunks] ascending: one entry per chunk row
        at = np.searchsorted(held, rows)
        if len(rows) and (at.max() >= len(held) or not np.array_equal(held[at], rows)):
            return None
        ids = (at[:, None] * self.windows + np.arange(self.windows)).reshape(-1)
        return self._reconstruct(ids).reshape(len(rows), self.windows, self.dim)

    def _reconstruct(self, ids: np.ndarray) -> np.ndarray:
        base = self.index.ntotal
        if self.tail is None or not len(ids) or ids.max() < base:
            return self.index.reconstruct_batch(ids)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        old = ids < base
        if old.any():
            out[old] = self.index.reconstruct_batch(ids[old])
        out[~old] = self.tail.reconstruct_batch(ids[~old] - base)
        return out

    def _top(self, q: np.ndarray, k: int) -> np.ndarray:
        """Ids of the k vectors best matching q, best first (-1 past the end), over the index and the tail."""
        scores, ids = self.index.search(q, min(k, self.index.ntotal))
        if self.tail is None or not self.tail.ntotal:
            return ids[0]
        scores_t, ids_t = self.tail.search(q, min(k, self.tail.ntotal))
        both = np.concatenate([ids[0], np.where(ids_t[0] >= 0, ids_t[0] + self.index.ntotal, -1)])
        order = np.argsort(-np.concatenate([scores[0], scores_t[0]]), kind="stable")[:k]
        return both[order]

    def search(self, query: np.ndarray, chunks: int, alive: np.ndarray) -> np.ndarray:
        """-> up to `chunks` distinct live chunk rows whose windows best match the query, best first. Asks FAISS for
        more vectors until enough live chunks are found (deleted ones are skipped) or the index is exhausted."""
        self._adopt()
        q = np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32)
        want = chunks * 4
        while True:
            k = min(want, self.count)
            ids = self._top(q, k)
            ids = ids[ids >= 0]
            rows = self.rows[ids]
            rows = rows[alive[rows]]
            rows = rows[np.sort(np.unique(rows, return_index=True)[1])]  # distinct, in rank order
            if len(rows) >= chunks or k >= self.count:
                return rows[:chunks]
            want *= 4


def _flat(dim: int) -> faiss.Index:
    return faiss.index_factory(dim, "SQfp16", faiss.METRIC_INNER_PRODUCT)


def float16_vectors(index: faiss.Index) -> np.ndarray:
    """[n, C] float16: the vectors an index holds. The flat index's codes are those: a view, no copy (copying 1M
    vectors' took 1-3 s); another index's are decoded a batch at a time."""
    if isinstance(index, faiss.IndexScalarQuantizer) and index.sq.qtype == faiss.ScalarQuantizer.QT_fp16:
        codes = faiss.rev_swig_ptr(index.codes.data(), index.ntotal * index.d * 2)
        return np.frombuffer(codes, dtype=np.float16).reshape(index.ntotal, index.d)
    held = np.empty((index.ntotal, index.d), dtype=np.float16)
    for at in range(0, index.ntotal, RECONSTRUCT_BATCH):
        held[at : at + RECONSTRUCT_BATCH] = index.reconstruct_n(at, min(RECONSTRUCT_BATCH, index.ntotal - at))
    return held


@dataclass
class _Build:
    """An ANN index being built from `source` (the index serving meanwhile, unchanged until this is adopted)."""

    source: faiss.Index
    thread: threading.Thread | None = None
    index: faiss.Index | None = None
    error: BaseException | None = None

    def run(self, dim: int, cfg: VectorConfig) -> None:
        try:
            self.index = build_ann(float16_vectors(self.source), dim, cfg)
        except BaseException as e:  # MemoryError and the like: reported where the build is adopted
            self.error = e


def build_ann(vectors: np.ndarray, dim: int, cfg: VectorConfig) -> faiss.Index:
    """The ANN index of vectors [n, C] (float16): trained (if it needs it) on a sample, then all of them added, a
    batch at a time in float32."""
    cells = ivf_cells(len(vectors))
    ann = faiss.index_factory(dim, cfg.ann_factory.format(cells=cells), faiss.METRIC_INNER_PRODUCT)
    if not ann.is_trained:
        sample = np.sort(np.random.default_rng(0).permutation(len(vectors))[: 64 * cells])
        ann.train(vectors[sample].astype(np.float32))
    for at in range(0, len(vectors), RECONSTRUCT_BATCH):
        ann.add(vectors[at : at + RECONSTRUCT_BATCH].astype(np.float32))
    faiss.ParameterSpace().set_index_parameters(ann, cfg.ann_params)
    ivf = faiss.try_extract_index_ivf(ann)
    if ivf is not None:  # an IVF index gives vectors back by id only with a direct map
        ivf.make_direct_map()
    return ann


class VectorIndex:
    """The shard's namespaces' vector indexes; `rows`: how many of the store's chunk rows it reflects."""

    def __init__(self, dim: int, cfg: VectorConfig):
        self.dim, self.cfg = dim, cfg
        self.namespaces: dict[str, NamespaceVectors] = {}
        self.rows = 0

    def add(self, rows_upto: int, namespaces: np.ndarray, rows: np.ndarray, latents: np.ndarray) -> None:
        """Index chunk rows (each of the namespace given) up to `rows_upto`; latents [n, R, C]."""
        for ns in np.unique(namespaces):
            sel = namespaces == ns
            if str(ns) not in self.namespaces:
                self.namespaces[str(ns)] = NamespaceVectors(self.dim, self.cfg)
            self.namespaces[str(ns)].add(rows[sel], latents[sel])
        self.rows = rows_upto

    def search(self, namespace: str, query: np.ndarray, chunks: int, alive: np.ndarray) -> np.ndarray | None:
        """Candidate chunk rows, or None where the namespace is small enough to score whole."""
        vectors = self.namespaces.get(namespace)
        if vectors is None or vectors.chunks < self.cfg.exact_below_chunks:
            return None
        return vectors.search(query, chunks, alive)

    def latents(self, namespace: str, rows: np.ndarray) -> np.ndarray | None:
        """[n, R, C] the namespace's chunk rows' window vectors (float16 values), or None where the index lacks one."""
        vectors = self.namespaces.get(namespace)
        return None if vectors is None else vectors.latents(np.asarray(rows, dtype=np.int64))

    def wait(self) -> None:
        """Until every namespace's ANN build in progress is serving (tests, benchmarks)."""
        for v in self.namespaces.values():
            v.wait()

    def vectors(self) -> int:
        return sum(v.count for v in self.namespaces.values())

    def nbytes(self) -> int:
        """RAM of the indexes: FAISS codes (SQfp16: 2 bytes per dimension; an ANN index about as much) and rows,
        and while an ANN index builds, the one it builds (about as large as the serving one) and the tail."""
        building = sum(v.building.source.ntotal * v.dim * 2 for v in self.namespaces.values() if v.building)
        tails = sum(v.tail.ntotal * v.dim * 2 for v in self.namespaces.values() if v.tail is not None)
        return building + tails + sum(v.index.ntotal * v.dim * 2 + v.rows.nbytes for v in self.namespaces.values())
