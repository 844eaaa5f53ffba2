"""A shard's store: a block store and a chunk table in one Zarr group, committed together (one writer: the shard
actor that owns it).

On disk (<data_dir>/shard-<id>/), format 2:
  data.zarr/segments/blocks.kv/   K/V columns, positions (sparse blocks only) and tokens [T] int32 of each
                                  block, side by side in append-only segment files of up to 1 GiB (segments.py):
                                  one ranged read per block, ~0.001 files per block
  data.zarr/segments/blocks.ram/  hash [16] uint8, length, latent [R, C] float32 of each block (hash, length in RAM)
  data.zarr/segments/chunks/      block, doc, seq, offset, episode (a document's chunk -> the block holding its KV)
  data.zarr/segments/docs/        tokens, written (unix s) of each document
  data.zarr/segments/drops/       chunk: chunk rows moved to another shard (rebalancing)
  data.zarr/segments/deletes/     doc: deleted documents
  data.zarr/blocks/text           the lexical key text of each block (Zarr, strings)
  data.zarr/docs/                 namespace, name, request, digest of each document (Zarr, strings)
  COMMIT.json        format, layout, committed rows per table, rows per segment file (tables.py: the commit protocol)
Format 1 (before segment logs: every block one Zarr chunk file per column, deleted documents listed in
COMMIT.json) is migrated on open by a compaction into a format-2 generation.
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
from .block_store import BLOCKS_IN_RAM, BLOCKS_RAM_LOG, BlockStore, block_schema
from .chunk_table import CHUNK_SCHEMA, ChunkTable
from .tables import StoreError, Tables

__all__ = ["ShardStore", "StoreError"]

FORMAT = 2


class ShardStore:
    def __init__(self, path: str | Path, layout: BlockLayout, fsync: bool = True):
        self.path, self.layout = Path(path), layout
        record = Tables.read_record_at(self.path)
        older = {"kv_dtype": "float16", "codec": "", "codec_bytes": 0}  # what stores from before these settings hold
        if record is not None and (have := {**older, **record["layout"]}) != asdict(layout):
            diff = ", ".join(
                f"{k} = {have.get(k)!r} (configured: {v!r})" for k, v in asdict(layout).items() if have.get(k) != v
            )
            raise StoreError(
                f"store {self.path} was written with {diff}: configure the same values (e.g. "
                "[encoder] kv_dtype) to open it, or use a new data_dir"
            )
        self.fsync = fsync
        legacy = record is not None and record.get("format", 1) < FORMAT
        self._open(legacy)
        if legacy:  # rewrite it in today's format (crash-safe: an interrupted migration runs again on next open)
            self.compact()
            self.tables.close()
            self._open(legacy=False)

    def _open(self, legacy: bool) -> None:
        """The committed tables and the block store and chunk table over them."""
        self.tables = self._open_tables(legacy=legacy)
        self.blocks = BlockStore(self.tables, self.layout)
        self.chunks = ChunkTable(self.tables, self.tables.record.get("deleted_docs", []))
        self._bytes_at: tuple[int, int] | None = None  # (store version, bytes on disk) of the last walk

    def _open_tables(self, generation: str | None = None, legacy: bool = False) -> Tables:
        kv = tuple(f"blocks/{c}" for c in self.layout.stored_columns())
        return Tables(
            self.path,
            {**block_schema(self.layout), **CHUNK_SCHEMA},
            in_ram=(*BLOCKS_IN_RAM, *(n for n in CHUNK_SCHEMA)),
            one_file_per_row=(*kv, "blocks/latent") if legacy else (),
            uncompressed=("blocks/keys", "blocks/values"),
            meta=self._meta(),
            fsync=self.fsync,
            generation=generation,
            logs=None if legacy else self._logs(kv),
        )

    @staticmethod
    def _logs(kv: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
        """Segment logs of format 2: every fixed-size column (a string column stays a Zarr array). Appending to a
        log writes only the new rows, where a Zarr array rewrites its last, partial chunk of 4096 rows."""
        fixed = [n for n, (_, dtype) in CHUNK_SCHEMA.items() if dtype != "str"]
        by_table = {
            t: tuple(n for n in fixed if n.startswith(f"{t}/")) for t in dict.fromkeys(n.split("/")[0] for n in fixed)
        }
        return {"blocks.kv": (*kv, "blocks/tokens"), "blocks.ram": BLOCKS_RAM_LOG, **by_table}

    def _meta(self) -> dict:
        return {"format": FORMAT, "layout": asdict(self.layout)}

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
            names = [name for name in old.schema if name.startswith("blocks/")]
            cols = old.read_many([n for n in names if n not in old.ram], sel)
            cols.update({name: old.ram[name][sel] for name in names if name in old.ram})
            new.append("blocks", {name.split("/")[1]: col for name, col in cols.items()})
        if len(docs):
            new.append(
                "docs", {name.split("/")[1]: old.ram[name][docs] for name in old.ram if name.startswith("docs/")}
            )
        if len(rows):
            cols = {name.split("/")[1]: old.ram[name][rows] for name in old.ram if name.startswith("chunks/")}
            cols["block"] = np.searchsorted(blocks, cols["block"])  # renumbered: blocks and docs are sorted
            cols["doc"] = np.searchsorted(docs, cols["doc"])
            new.append("chunks", cols)
        new.commit(self._meta())  # the switch
        shutil.rmtree(self.path / old.data, ignore_errors=True)

    def commit(self) -> None:
        """Make every staged change (blocks, documents, chunks, drops, deletes) durable and visible."""
        self.tables.commit(self._meta())
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
