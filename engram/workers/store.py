"""A shard's store: a block store and a chunk table in one Zarr group, committed together (one writer: the shard
actor that owns it).

On disk (<data_dir>/shard-<id>/):
  data.zarr/blocks/  K/V columns and positions (one Zarr chunk per block; BlockLayout), tokens [n, T] int32,
                     length [n], hash [n, 16] uint8, latent [n, R, C] float32
  data.zarr/chunks/  block, doc, seq, offset, episode [m]   (a document's chunk -> the block holding its KV)
  data.zarr/docs/    namespace, name, request (strings), tokens [d]
  data.zarr/drops/   chunk [k]: chunk rows moved to another shard (rebalancing)
  COMMIT.json        the layout, committed rows per table, deleted documents (tables.py: the commit protocol)
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..decoder.layout import BlockLayout
from .block_store import BLOCKS_IN_RAM, BlockStore, block_schema
from .chunk_table import CHUNK_SCHEMA, ChunkTable
from .tables import StoreError, Tables

__all__ = ["ShardStore", "StoreError"]


class ShardStore:
    def __init__(self, path: str | Path, layout: BlockLayout, fsync: bool = True):
        self.path, self.layout = Path(path), layout
        record = Tables.read_record_at(self.path)
        if record is not None and (have := {"kv_dtype": "float16", **record["layout"]}) != asdict(layout):
            diff = ", ".join(
                f"{k} = {have.get(k)!r} (configured: {v!r})" for k, v in asdict(layout).items() if have.get(k) != v
            )  # stores from before kv_dtype hold float16
            raise StoreError(
                f"store {self.path} was written with {diff}: configure the same values (e.g. "
                "[encoder] kv_dtype) to open it, or use a new data_dir"
            )
        self.fsync = fsync
        self.tables = self._open_tables()
        self.blocks = BlockStore(self.tables, layout)
        self.chunks = ChunkTable(self.tables, self.tables.record.get("deleted_docs", []))
        self._bytes_at: tuple[int, int] | None = None  # (store version, bytes on disk) of the last walk

    def _open_tables(self, generation: str | None = None) -> Tables:
        kv = tuple(f"blocks/{c}" for c in self.layout.block_columns)
        return Tables(
            self.path,
            {**block_schema(self.layout), **CHUNK_SCHEMA},
            in_ram=(*BLOCKS_IN_RAM, *(n for n in CHUNK_SCHEMA)),
            one_file_per_row=(*kv, "blocks/latent"),
            uncompressed=("blocks/keys", "blocks/values"),  # zstd gains ~8% on K/V
            meta={"layout": asdict(self.layout), "deleted_docs": []},
            fsync=self.fsync,
            generation=generation,
        )

    def compact(self, batch: int = 256) -> None:
        """Write what is live (documents, their chunks, the blocks those use) into a new generation, switch to it
        with one commit, then remove the old one: deleted and moved chunks' blocks, token ids included, leave the
        disk. Crash-safe: before the switch the old generation is the store, after it the new one; an open removes
        whichever the commit record does not name. Reopen the store afterwards."""
        if any(self.tables.staged.values()):
            raise StoreError("a write has staged rows on this shard; compact when it has committed")
        ch, old = self.chunks, self.tables
        rows = ch.all_live_rows()
        docs = np.array(sorted(ch.lookup.values()), dtype=np.int64)
        blocks = np.unique(ch.column("block", rows))
        new = self._open_tables(generation=f"data-{uuid.uuid4().hex[:12]}.zarr")
        for start in range(0, len(blocks), batch):  # KV and tokens from disk, a batch at a time
            sel = blocks[start : start + batch]
            cols = {
                name.split("/")[1]: old.ram[name][sel] if name in old.ram else old.read(name, sel)
                for name in old.arrays
                if name.startswith("blocks/")
            }
            new.append("blocks", cols)
        if len(docs):
            new.append(
                "docs", {name.split("/")[1]: old.ram[name][docs] for name in old.ram if name.startswith("docs/")}
            )
        if len(rows):
            cols = {name.split("/")[1]: old.ram[name][rows] for name in old.ram if name.startswith("chunks/")}
            cols["block"] = np.searchsorted(blocks, cols["block"])  # renumbered: blocks and docs are sorted
            cols["doc"] = np.searchsorted(docs, cols["doc"])
            new.append("chunks", cols)
        new.commit({"layout": asdict(self.layout), "deleted_docs": []})  # the switch
        shutil.rmtree(self.path / old.data, ignore_errors=True)

    def commit(self) -> None:
        """Make every staged change (blocks, documents, chunks, drops, deletes) durable and visible."""
        self.tables.commit({"layout": asdict(self.layout), "deleted_docs": self.chunks.deleted_after_commit()})
        self.chunks.committed()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """`with store.transaction(): <stage changes>` commits them all on leaving, or none on any error."""
        try:
            yield
            self.commit()
        except BaseException:
            self.rollback()
            raise

    def rollback(self) -> None:
        """Undo every staged change, deletes included."""
        self.tables.rollback()
        self.blocks.rolled_back()
        self.chunks.rolled_back()

    def stored_bytes(self) -> int:
        """Bytes on disk; walked again only after a commit changed the store (metrics poll this every 15 s)."""
        version = self.tables.version()
        if self._bytes_at is None or self._bytes_at[0] != version:
            self._bytes_at = (version, sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file()))
        return self._bytes_at[1]

    def close(self) -> None:
        """Drop staged changes and release the Zarr store; later writes raise StoreError."""
        self.tables.close()
