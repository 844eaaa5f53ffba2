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

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

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
        schema = {**block_schema(layout), **CHUNK_SCHEMA}
        kv = tuple(f"blocks/{c}" for c in layout.block_columns)
        self.tables = Tables(
            self.path,
            schema,
            in_ram=(*BLOCKS_IN_RAM, *(n for n in CHUNK_SCHEMA)),
            one_file_per_row=(*kv, "blocks/latent"),
            uncompressed=("blocks/keys", "blocks/values"),  # zstd gains ~8% on K/V
            meta={"layout": asdict(layout), "deleted_docs": []},
            fsync=fsync,
        )
        self.blocks = BlockStore(self.tables, layout)
        self.chunks = ChunkTable(self.tables, self.tables.record.get("deleted_docs", []))
        self._bytes_at: tuple[int, int] | None = None  # (store version, bytes on disk) of the last walk

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
