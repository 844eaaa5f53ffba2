"""The block store: encoded chunks by content hash — KV on disk (one small ranged read per block), the retrieval
latents and lengths in RAM. contains / put / get / export, LMCache-style; identical chunks share one block."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from ..decoder.layout import BlockLayout
from .tables import Tables


@dataclass
class EncodedBlocks:
    """B encoded chunks, as the encoder makes them and the block store takes them (typed across Ray)."""

    kv: dict[str, np.ndarray]  # the layout's read columns (K/V codes, scales, positions), [B, ...] each
    tokens: np.ndarray  # [B, T] int32, -1 padding
    length: np.ndarray  # [B] int32: tokens of each chunk
    hash: np.ndarray  # [B, 16] uint8: content addresses
    latent: np.ndarray  # [B, R, C] float32: retrieval latents, one per window
    text: np.ndarray  # [B] str: lexical key text, the chunk's text after its key context ("" in older stores)

    def __len__(self) -> int:
        return len(self.hash)

    def select(self, rows) -> EncodedBlocks:
        rows = np.asarray(rows, dtype=np.int64)
        return EncodedBlocks(
            {k: np.asarray(v)[rows] for k, v in self.kv.items()},
            *(np.asarray(getattr(self, f.name))[rows] for f in fields(self)[1:]),
        )

    def columns(self) -> dict[str, np.ndarray]:
        """Columns of the store's `blocks` table."""
        return {**self.kv, **{f.name: getattr(self, f.name) for f in fields(self)[1:]}}


def block_schema(layout: BlockLayout) -> dict[str, tuple[tuple[int, ...], str]]:
    return {
        **{f"blocks/{name}": col for name, col in layout.stored_columns().items()},
        "blocks/tokens": ((layout.chunk_tokens,), "int32"),
        "blocks/length": ((), "int32"),
        "blocks/hash": ((16,), "uint8"),
        "blocks/latent": ((layout.latents_per_chunk, layout.latent_dim), "float32"),
        "blocks/text": ((), "str"),
    }


# The block columns a shard keeps in RAM: what dedup and a block's read need. The retrieval latents stay on disk
# beside them (the "blocks.ram" segment log, named when it held all three): a shard's vector index keeps each
# chunk's windows in float16, which is what search scores; the float32 latents are read back for the episodic
# memories' writes and forgets (exact least squares) and for exports.
BLOCKS_IN_RAM = ("blocks/length", "blocks/hash")
BLOCKS_RAM_LOG = (*BLOCKS_IN_RAM, "blocks/latent")


class BlockStore:
    def __init__(self, tables: Tables, layout: BlockLayout):
        self.tables, self.layout = tables, layout
        self._reindex()

    def _reindex(self) -> None:
        self.index = {bytes(h): i for i, h in enumerate(self.tables.ram["blocks/hash"])}  # hash -> block row

    def __len__(self) -> int:
        return len(self.tables.ram["blocks/hash"])

    def contains(self, hashes: list[bytes]) -> list[bool]:
        return [h in self.index for h in hashes]

    def rows(self, hashes: list[bytes]) -> np.ndarray:
        """Block rows of stored (or staged) hashes; KeyError for one that is neither."""
        return np.array([self.index[h] for h in hashes], dtype=np.int64)

    def put(self, blocks: EncodedBlocks) -> np.ndarray:
        """Stage the blocks not stored yet (durable with the next commit) -> the block row of every input."""
        seen: dict[bytes, int] = {}  # the same hash twice in one batch: keep the first
        fresh = [
            i for i, h in enumerate(blocks.hash) if bytes(h) not in self.index and seen.setdefault(bytes(h), i) == i
        ]
        if fresh:
            cols = blocks.select(fresh).columns()
            if self.layout.dense:  # derived from the length on read
                del cols["positions"]
            rows = self.tables.append("blocks", cols)
            for i, row in zip(fresh, rows):
                self.index[bytes(blocks.hash[i])] = int(row)
        return self.rows([bytes(h) for h in blocks.hash])

    def get(self, rows) -> dict[str, np.ndarray]:
        """-> the read columns (K/V, positions) of these blocks, [n, ...] each, read from disk."""
        cols = self.tables.read_many([f"blocks/{c}" for c in self.layout.stored_columns()], rows)
        out = {name.split("/")[1]: col for name, col in cols.items()}
        if self.layout.dense:
            out["positions"] = self.layout.dense_positions(self.length(rows))
        return out

    def tokens(self, rows) -> list[list[int]]:
        """The token ids of these blocks' chunks (read from disk)."""
        lengths = self.length(rows)
        return [row[:n].tolist() for row, n in zip(self.tables.read("blocks/tokens", rows), lengths)]

    def export(self, hashes: list[bytes]) -> EncodedBlocks:
        """Stored blocks as `put` takes them (another shard imports them)."""
        rows = self.rows(hashes)
        ram = self.tables.ram
        return EncodedBlocks(
            self.get(rows),
            self.tables.read("blocks/tokens", rows),
            ram["blocks/length"][rows],
            ram["blocks/hash"][rows],
            self.latents(rows),
            self.text(rows),
        )

    def text(self, rows) -> np.ndarray:
        """[n] the blocks' lexical key texts (read from disk)."""
        return np.asarray(self.tables.read("blocks/text", np.asarray(rows, dtype=np.int64)), dtype=object)

    def latents(self, rows) -> np.ndarray:
        """[n, R, C] float32 the blocks' window latents, read from disk (one small ranged read per distinct block)."""
        distinct, back = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
        return self.tables.read("blocks/latent", distinct)[back.reshape(-1)]

    def latents_range(self, start: int, stop: int) -> np.ndarray:
        """[stop - start, R, C] the latents of blocks start .. stop, in one sequential read."""
        return self.tables.read_range("blocks/latent", start, stop)

    def length(self, rows) -> np.ndarray:
        return self.tables.ram["blocks/length"][np.asarray(rows, dtype=np.int64)]

    def hashes(self, rows) -> list[bytes]:
        return [bytes(h) for h in self.tables.ram["blocks/hash"][rows]]

    def rolled_back(self) -> None:
        self._reindex()
