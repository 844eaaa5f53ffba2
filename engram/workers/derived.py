"""A shard's derived indexes — lexical (BM25, on disk) and vectors (FAISS, in RAM) — kept level with its store.

The store is the truth. Both indexes follow its committed chunk rows: each records how many it reflects and catches
up after every commit and on open (a crash between the store's commit and an index's leaves it behind, never
ahead); a new store generation (compaction) rebuilds them. Deleted and moved chunks are filtered at search time
by the chunk table, so deletes never have to reach them.
"""

from __future__ import annotations

import numpy as np

from .lexical import LexicalIndex
from .store import ShardStore
from .vectors import VectorConfig, VectorIndex

FOLLOW_BATCH = 8192  # chunk rows indexed per step: bounds what an open reads into RAM at once


class DerivedIndexes:
    def __init__(self, store: ShardStore, latent_dim: int, vectors: VectorConfig):
        self.store = store
        path, generation = store.path / "lexical", store.tables.data
        self.lexical = LexicalIndex(path, generation)
        if self.lexical.rows > self.committed_rows():  # cannot happen short of a lost store commit: rebuild
            self.lexical = LexicalIndex(path, generation, reset=True)
        self.lexical.pairs = set(self._pairs(np.arange(self.lexical.rows)))
        self.vectors = VectorIndex(latent_dim, vectors)
        self.follow()

    def committed_rows(self) -> int:
        return int(self.store.tables.counts["chunks"])

    def behind(self) -> tuple[int, int]:
        """Committed chunk rows (lexical, vectors) have not indexed: (0, 0) once open and after each commit."""
        upto = self.committed_rows()
        return upto - self.lexical.rows, upto - self.vectors.rows

    def follow(self) -> None:
        """Index the committed chunk rows each index has not seen."""
        upto = self.committed_rows()
        if self.lexical.rows < upto:  # their new (block, namespace) pairs: identical chunks are indexed once
            pairs = self._pairs(np.arange(self.lexical.rows, upto))
            new = list(dict.fromkeys(p for p in pairs if p not in self.lexical.pairs))
            texts = self.store.blocks.text([b for b, _ in new]).tolist() if new else []
            self.lexical.add(upto, new, texts)
        for start in range(self.vectors.rows, upto, FOLLOW_BATCH):  # on open: the whole store, a batch at a time
            rows = np.arange(start, min(upto, start + FOLLOW_BATCH))
            blocks = self.store.chunks.column("block", rows)
            self.vectors.add(int(rows[-1]) + 1, self._namespaces(rows), rows, self._latents(blocks))

    def _latents(self, blocks: np.ndarray) -> np.ndarray:
        """[n, R, C] the blocks' latents from disk: one sequential read where they are consecutive (a shard's
        open, distinct text), a ranged read per distinct block otherwise."""
        if len(blocks) and np.array_equal(blocks, np.arange(blocks[0], blocks[0] + len(blocks))):
            return self.store.blocks.latents_range(int(blocks[0]), int(blocks[-1]) + 1)
        return self.store.blocks.latents(blocks)

    def _namespaces(self, rows: np.ndarray) -> np.ndarray:
        return self.store.tables.ram["docs/namespace"][self.store.chunks.column("doc", rows)]

    def _pairs(self, rows: np.ndarray) -> list[tuple[int, str]]:
        """(block, namespace) of chunk rows."""
        blocks = self.store.chunks.column("block", rows).tolist()
        return list(zip(blocks, (str(n) for n in self._namespaces(rows))))
