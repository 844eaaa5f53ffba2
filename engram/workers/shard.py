"""A memory shard: owns one store (its only writer), keeps the episodic memories of its chunks in RAM.

Plain class, no Ray: the coordinator runs it as a Ray actor (max_restarts: a restarted shard rebuilds everything
from its store in __init__) and passes in the node label. Calls are idempotent where they can be retried: blocks
are content-addressed, and a document is committed at most once.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..decoder.layout import BlockLayout
from ..errors import EngramError, ErrorCode
from .block_store import EncodedBlocks
from .chunk_table import ChunkRows, DocAbout
from .derived import DerivedIndexes
from .episodic import EpisodicConfig, Memory, hierarchical_readout, new_memory, reference_pinv
from .lexical import LexicalIndex, bm25, lexical_scores
from .results import ChunkAt, Compacted, SearchHits, ShardStats
from .shard_documents import ShardDocuments
from .store import ShardStore, StoreError
from .vectors import VectorConfig, VectorIndex

_libc = ctypes.CDLL(None) if os.name == "posix" else None
_malloc_trim = getattr(_libc, "malloc_trim", None)  # glibc


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc malloc_trim). A write passes blocks of megabytes through the
    shard; glibc keeps the freed heap as its high-water mark, so the resident set grew with every write as if the
    shard kept them. What a shard really keeps is Shard.ram_parts (BENCHMARKS.md "Storage")."""
    if _malloc_trim is not None:
        _malloc_trim(0)


@dataclass
class ShardConfig:
    data_dir: str = "engram-data"  # each shard keeps <data_dir>/shard-<id>/ on its node's disk
    fsync: bool = True  # flush to disk before acknowledging (survives a machine crash, not just a process crash)
    episodic: EpisodicConfig = field(default_factory=EpisodicConfig)
    vectors: VectorConfig = field(default_factory=VectorConfig)


class Shard(ShardDocuments):
    def __init__(self, shard_id: int, cfg: ShardConfig, layout: BlockLayout, node: str = ""):
        self.shard_id, self.cfg, self.layout = shard_id, cfg, layout
        self.node = node or os.uname().nodename
        self.store = ShardStore(Path(cfg.data_dir).expanduser() / f"shard-{shard_id}", layout, cfg.fsync)
        self.blocks, self.chunks = self.store.blocks, self.store.chunks
        self.m0_pinv = reference_pinv(cfg.episodic)
        self._rebuild()
        self._open_indexes()

    # --- derived indexes (lexical on disk, vectors in RAM), level with the store's committed chunk rows -------
    def _open_indexes(self) -> None:
        self.indexes = DerivedIndexes(self.store, self.layout.latent_dim, self.cfg.vectors)

    @property
    def lexical(self) -> LexicalIndex:
        return self.indexes.lexical

    @property
    def vectors(self) -> VectorIndex:
        return self.indexes.vectors

    # --- episodic memories -------------------------------------------------------------------------------------
    def _rebuild(self) -> None:
        """Write every live chunk into the episodic memories it was assigned (from the committed store)."""
        self.memories: dict[int, Memory] = {}
        self.episode_namespace: dict[int, str] = {}
        rows = self.chunks.all_live_rows()
        episodes = self.chunks.column("episode", rows)
        for ep in np.unique(episodes):
            sel = rows[episodes == ep]
            mem = self.memories[int(ep)] = new_memory(self.cfg.episodic, self.m0_pinv)
            mem.write(self._items(self.chunks.column("block", sel)))
            self._settle(mem)  # warm before serving
            self.episode_namespace[int(ep)] = self.chunks.namespace(int(self.chunks.column("doc", sel[:1])[0]))
        self.next_episode = self.chunks.next_episode()

    def _settle(self, mem: Memory) -> None:
        """After a write: a full episode is closed (it keeps only what reads need), an open one prepared."""
        if mem.count >= self._chunks_per_episode() * self.layout.latents_per_chunk:
            mem.close()
        else:
            mem.prepare()  # on the write path, not in the first ask

    def _chunks_per_episode(self) -> int:
        return max(1, self.cfg.episodic.rows // self.layout.latents_per_chunk)  # K // R

    def _items(self, blocks: np.ndarray) -> np.ndarray:
        """The episodic items of chunks: their R window latents each -> [len(blocks) * R, C]."""
        return self.blocks.latents(blocks).reshape(-1, self.layout.latent_dim)

    def _assign_episodes(self, namespace: str, n: int) -> np.ndarray:
        """Fill the namespace's open episode up to K items (K // R chunks), then open new ones."""
        r = self.layout.latents_per_chunk
        k = self._chunks_per_episode()
        out = np.empty(n, dtype=np.int64)
        open_eps = [
            ep for ep, ns in self.episode_namespace.items() if ns == namespace and self.memories[ep].count // r < k
        ]
        i = 0
        if open_eps:
            ep = max(open_eps)
            take = min(n, k - self.memories[ep].count // r)
            out[:take], i = ep, take
        while i < n:
            take = min(n - i, k)
            out[i : i + take] = self.next_episode
            self.next_episode += 1
            i += take
        return out

    def _remember(self, namespace: str, blocks: np.ndarray, episodes: np.ndarray) -> None:
        for ep in np.unique(episodes):
            mem = self.memories.setdefault(int(ep), new_memory(self.cfg.episodic, self.m0_pinv))
            self.episode_namespace[int(ep)] = namespace
            mem.write(self._items(blocks[episodes == ep]))
            self._settle(mem)

    def _forget(self, rows: np.ndarray) -> None:
        """Take chunk rows' items out of the episodic memories (exact, α = −1); the rows are already dead."""
        episodes = self.chunks.column("episode", rows)
        for ep in np.unique(episodes):
            mem = self.memories[int(ep)]
            if mem.closed:  # its normal equations are gone: write what the store still holds of it anew
                live = self.chunks.all_live_rows()
                mem = self.memories[int(ep)] = new_memory(self.cfg.episodic, self.m0_pinv)
                mem.write(self._items(self.chunks.column("block", live[self.chunks.column("episode", live) == ep])))
            else:
                mem.forget(self._items(self.chunks.column("block", rows[episodes == ep])))
            if mem.count == 0:
                del self.memories[int(ep)], self.episode_namespace[int(ep)]
            else:
                mem.prepare()

    # --- writes ----------------------------------------------------------------------------------------------------
    def missing(self, hashes: list[bytes]) -> list[bool]:
        return [not c for c in self.blocks.contains(hashes)]

    def put_blocks(self, blocks: EncodedBlocks) -> int:
        """Stage encoded blocks; they become durable with the next committed document."""
        return len(self.blocks.put(blocks))

    def _add_chunks(
        self,
        namespace: str,
        name: str,
        doc: int | None,
        tokens: int,
        hashes: list[bytes],
        seqs: list[int],
        offsets: list[int],
        about: DocAbout,
    ) -> int:
        """Commit chunk rows to a new document (doc None) or an existing one, then write them to the episodic
        memories. All or nothing."""
        missing = [h.hex() for h, ok in zip(hashes, self.blocks.contains(hashes)) if not ok]
        if missing:  # staged blocks die with the process that staged them: the writer re-sends them
            raise EngramError(ErrorCode.STALE, f"{len(missing)} blocks are not stored (lost in a restart?)")
        blocks = self.blocks.rows(hashes)
        episodes = self._assign_episodes(namespace, len(hashes))
        rows = ChunkRows(blocks, np.asarray(seqs, dtype=np.int64), np.asarray(offsets, dtype=np.int64), episodes)
        with self.store.transaction():
            if doc is None:
                doc = self.chunks.add_document(namespace, name, tokens, about, rows)
            else:
                self.chunks.add_chunks(doc, rows)
        self._remember(namespace, blocks, episodes)
        self.indexes.follow()
        release_freed_memory()
        return doc

    def compact(self) -> Compacted:
        """Rewrite the store without what deletes and moves left behind (blocks, token ids), then reload from it."""
        before = (len(self.blocks), self.store.stored_bytes())
        try:
            self.store.compact()
        except StoreError as e:
            raise EngramError(ErrorCode.BUSY, str(e)) from None
        self.store = ShardStore(self.store.path, self.layout, self.cfg.fsync)
        self.blocks, self.chunks = self.store.blocks, self.store.chunks
        self._rebuild()
        self._open_indexes()  # a new generation: rebuilt from it
        return Compacted(self.shard_id, before[0], len(self.blocks), before[1], self.store.stored_bytes())

    # --- reads -----------------------------------------------------------------------------------------------------
    def search(
        self, namespace: str, query: np.ndarray, top_k: int, readout: bool = False, text: str = ""
    ) -> SearchHits:
        """Score the namespace's chunks through their episodic memories; top-k distinct blocks.

        score_i = max_r <s(e_i), ẑ_ir>: the scorer of chunk i's episode memory (least squares: its readout z_r,
        which gives the best window's cosine with the query while the episode is within capacity; Hopfield: the
        readout weighted by its match with the query) against the chunk's stored window latents.
        Which chunks are scored: all of the namespace's on this shard, or past `vectors.exact_below_chunks` of them
        the vector index's candidates (by inner product with the query) and the lexical ones.
        readout: also the hierarchical readout of the shard's memories (Read returns it; Ask does not).
        text: the query's text, for the lexical index: hits then come from both rankings (the dense top k and the
        lexical top 2k), each with both scores; the coordinator fuses them over all shards."""
        q = np.asarray(query, dtype=np.float64)
        eps = sorted(ep for ep, ns in self.episode_namespace.items() if ns == namespace)
        if not eps:
            return SearchHits.empty(len(q), readout)
        eps_arr = np.asarray(eps, dtype=np.int64)
        live = self.chunks.all_live_rows()
        rows = live[np.isin(self.chunks.column("episode", live), eps_arr)]
        terms = self.lexical.terms(text) if text else []
        found = self.lexical.search(namespace, terms, max(4 * top_k, 64))  # ([blocks], [BM25]) candidates
        # a large namespace: score only the vector index's candidates and the lexical ones, not every chunk
        candidates = self.vectors.search(namespace, q, max(4 * top_k, 64), self.chunks.alive)
        if candidates is not None:
            rows = np.union1d(candidates, rows[np.isin(self.chunks.column("block", rows), found[0])])
        blocks = self.chunks.column("block", rows)
        # only the memories of the chunks scored are read (with the index: a few, however many the namespace has)
        row_eps = self.chunks.column("episode", rows)
        scored = np.unique(row_eps)
        scorers = np.zeros((len(scored), len(q)))  # [E', C]
        for i, ep in enumerate(scored.tolist()):
            scorers[i] = self.memories[ep].scorer(q, self.memories[ep].read(q))
        lookup = np.searchsorted(scored, row_eps)
        scores = np.einsum("nrc,nc->nr", self._window_vectors(namespace, rows, blocks), scorers[lookup]).max(1)
        lexical = lexical_scores(blocks, *found)
        # a chunk outside the dense top k with no lexical match cannot make the fused top k: k dense hits here
        # score at least as much, so k dense candidates suffice; lexical ones go deeper (2k), for their dense part
        keep = np.concatenate([self._best(scores, blocks, top_k), self._best(lexical, blocks, 2 * top_k, True)])
        keep = np.array(list(dict.fromkeys(keep.tolist())), dtype=np.int64)
        keep = keep[np.argsort(-scores[keep], kind="stable")]
        sel = rows[keep]
        tf = length = stats = None
        if terms:  # every hit's term counts (dense ones too) and the namespace's statistics: the coordinator scores
            tf, length = self.lexical.counts(self.blocks.text(blocks[keep]).tolist(), terms)
            stats = self.lexical.stats(namespace, terms)
            lexical[keep] = bm25(tf, length, stats)  # by this shard's statistics alone
        return SearchHits(
            scores[keep],
            blocks[keep],
            [self.chunks.name(d) for d in self.chunks.column("doc", sel)],
            self.chunks.column("seq", sel),
            self.chunks.column("offset", sel),
            len(eps),
            self._readout(eps, q) if readout else None,
            lexical[keep],
            tf,
            length,
            stats,
        )

    def _window_vectors(self, namespace: str, rows: np.ndarray, blocks: np.ndarray) -> np.ndarray:
        """[n, R, C] float64 the chunk rows' window latents as the vector index holds them (float16 values: the
        shard's one copy in RAM); from disk (float32) only if the index has not taken those rows in yet."""
        held = self.vectors.latents(namespace, rows)
        return (held if held is not None else self.blocks.latents(blocks)).astype(np.float64)

    def _readout(self, eps: list[int], q: np.ndarray) -> np.ndarray:
        """[C] the hierarchical readout of these episodes' memories (every memory of the namespace: Read only)."""
        readouts = np.stack([self.memories[ep].read(q) for ep in eps])  # [E, C]
        return hierarchical_readout(readouts, q, self.m0_pinv, self.cfg.episodic)

    @staticmethod
    def _best(scores: np.ndarray, blocks: np.ndarray, k: int, matched_only: bool = False) -> np.ndarray:
        """Positions of the k best scores, one per distinct block (identical chunks: the first); matched_only:
        only scores above 0 (lexical: the chunks the query's words matched)."""
        order = np.argsort(-scores, kind="stable")
        if matched_only:
            order = order[scores[order] > 0]
        _, first = np.unique(blocks[order], return_index=True)
        return order[np.sort(first)][:k]

    def chunks_at(self, namespace: str, name: str, seqs: list[int]) -> list[ChunkAt]:
        """The document's chunks with these numbers that live on this shard."""
        doc = self.chunks.doc(namespace, name)
        if doc is None:
            return []
        rows = self.chunks.live_rows(doc)
        rows = rows[np.isin(self.chunks.column("seq", rows), seqs)]
        return [
            ChunkAt(int(q), int(o), int(b))
            for q, o, b in zip(
                self.chunks.column("seq", rows), self.chunks.column("offset", rows), self.chunks.column("block", rows)
            )
        ]

    def fetch(self, blocks: list[int]) -> tuple[list[list[int]], list[dict[str, np.ndarray]]]:
        """-> (the blocks' token ids, the blocks: one dict of read columns each, and their token ids as "tokens",
        which the decoder drafts answers from). The coordinator calls this with num_returns=2: it reads the tokens
        and hands the blocks to the decoder worker without touching them."""
        tokens, read = self.tokens(blocks), self.get_blocks(blocks)
        for block, ids in zip(read, tokens):
            block["tokens"] = np.asarray(ids, dtype=np.int32)
        return tokens, read

    def get_blocks(self, blocks: list[int]) -> list[dict[str, np.ndarray]]:
        cols = self.blocks.get(blocks)
        return [{name: col[i] for name, col in cols.items()} for i in range(len(blocks))]

    def tokens(self, blocks: list[int]) -> list[list[int]]:
        return self.blocks.tokens(blocks)

    def ping(self) -> int:
        return self.shard_id

    def documents(self) -> list[tuple[str, str]]:
        return self.chunks.documents()

    def namespaces(self) -> list[str]:
        return sorted({ns for ns, _ in self.chunks.lookup})

    def ram_parts(self) -> dict[str, int]:
        """Bytes of RAM by part (BENCHMARKS.md "Storage"): episodic memories, the blocks' RAM columns (hash,
        length), the chunk table, the vector index (the latents' one in-RAM copy). Python objects not counted."""
        return {
            "episodic": sum(m.nbytes for m in self.memories.values()),
            "block_columns": self.store.tables.ram_bytes("blocks/"),
            "chunk_table": self.store.tables.ram_bytes() - self.store.tables.ram_bytes("blocks/"),
            "vectors": self.vectors.nbytes(),
        }

    def stats(self) -> ShardStats:
        import psutil

        live = self.chunks.all_live_rows()
        blocks = self.chunks.column("block", live)
        lexical_behind, vectors_behind = self.indexes.behind()
        return ShardStats(
            shard=self.shard_id,
            node=self.node,
            documents=len(self.chunks.lookup),
            chunks=len(live),
            blocks=len(np.unique(blocks)),
            tokens=int(self.blocks.length(blocks).sum()),
            stored_bytes=self.store.stored_bytes(),
            episodes=len(self.memories),
            resident_bytes=psutil.Process().memory_info().rss,
            pid=os.getpid(),
            lexical_behind=lexical_behind,
            vectors_behind=vectors_behind,
        )
