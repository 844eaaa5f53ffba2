"""Row tables in one Zarr group under one commit record: the crash-safety protocol of a shard's store.

Rows are appended past the committed count of their table and become visible only when COMMIT.json is replaced
(write temp, fsync, rename, fsync the directory). Anything after the last commit is cut off on open, so a write
is either wholly there or not at all, and what was committed before an acknowledgement survives.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import zarr

from ..durable import sync_filesystem, write_atomically

ROW_CHUNK = 4096  # Zarr chunk length of the small per-row tables
COMMIT = "COMMIT.json"
DATA = "data.zarr"  # the tables' Zarr group; a compacted store names its generation in COMMIT.json


class StoreError(RuntimeError):
    pass


class Tables:
    """schema: "table/column" -> (shape of one row, dtype); columns in `in_ram` are mirrored in `ram`.
    `one_file_per_row`: columns whose rows are stored one Zarr chunk each (KV blocks, read one at a time)."""

    def __init__(
        self,
        path: Path,
        schema: dict[str, tuple[tuple[int, ...], str]],
        in_ram: tuple[str, ...],
        one_file_per_row: tuple[str, ...],
        uncompressed: tuple[str, ...],
        meta: dict,
        fsync: bool = True,
        generation: str | None = None,
    ):
        """generation: build a new, empty generation of the tables in `generation` (a compaction); its first
        commit makes it the store's data. Otherwise open the committed one."""
        self.path, self.fsync = path, fsync
        self.path.mkdir(parents=True, exist_ok=True)
        self.tables = tuple(dict.fromkeys(name.split("/")[0] for name in schema))
        committed = None if generation else self.read_record_at(path)
        record = committed or {**meta, **dict.fromkeys(self.tables, 0)}
        self.data = generation or record.get("data", DATA)
        if generation is None:  # what an interrupted compaction left: the generation it built or the one it replaced
            for old in path.glob("data*.zarr"):
                if old.name != self.data:
                    shutil.rmtree(old, ignore_errors=True)
        self.group = zarr.open_group(self.path / self.data, mode="a")
        self.arrays: dict[str, zarr.Array] = {}
        for name, (row, dtype) in schema.items():
            if name in self.group:
                self.arrays[name] = self.group[name]
            else:
                chunks = (1, *row) if name in one_file_per_row else (ROW_CHUNK, *row)
                self.arrays[name] = self.group.create_array(
                    name,
                    shape=(0, *row),
                    chunks=chunks,
                    dtype=str if dtype == "str" else dtype,
                    compressors=None if name in uncompressed else "auto",
                )
        self.record = record  # the last commit record (meta of the caller included)
        self.counts = {t: record.get(t, 0) for t in self.tables}  # committed rows (old stores lack newer tables)
        for name, arr in self.arrays.items():  # drop whatever an interrupted write left past the commit
            n = self.counts[name.split("/")[0]]
            if arr.shape[0] != n:
                arr.resize((n, *arr.shape[1:]))
        self.ram = {name: self.arrays[name][:] for name in in_ram}
        self.staged = dict.fromkeys(self.tables, 0)  # rows appended since the last commit
        self.closed = False
        self.commits = 0

    @staticmethod
    def read_record_at(path: Path) -> dict | None:
        f = path / COMMIT
        return json.loads(f.read_text()) if f.exists() else None

    def append(self, table: str, rows: dict[str, np.ndarray]) -> np.ndarray:
        """Stage rows (columns of equal length) -> their row numbers."""
        if self.closed:
            raise StoreError("the store is closed")
        start = self.counts[table] + self.staged[table]
        n = len(next(iter(rows.values())))
        for col, data in rows.items():
            name = f"{table}/{col}"
            arr = self.arrays[name]
            arr.resize((start + n, *arr.shape[1:]))
            arr[start : start + n] = data
            if name in self.ram:
                self.ram[name] = np.concatenate([self.ram[name], np.asarray(data, dtype=self.ram[name].dtype)])
        self.staged[table] += n
        return np.arange(start, start + n)

    def commit(self, meta: dict) -> None:
        """Make every staged row durable and visible, with `meta` (the caller's fields) in the record."""
        if self.closed:
            raise StoreError("the store is closed")
        counts = {t: self.counts[t] + self.staged[t] for t in self.tables}
        record = {**meta, **counts, **({"data": self.data} if self.data != DATA else {})}
        if self.fsync:
            sync_filesystem(self.path)  # the Zarr chunk files written since the last commit
        write_atomically(self.path / COMMIT, json.dumps(record), self.fsync)
        self.counts, self.staged, self.record = counts, dict.fromkeys(self.tables, 0), record
        self.commits += 1

    def rollback(self) -> None:
        """Forget staged rows (after a failed write); the disk already ignores them."""
        for name, arr in self.arrays.items():
            n = self.counts[name.split("/")[0]]
            if arr.shape[0] != n:
                arr.resize((n, *arr.shape[1:]))
            if name in self.ram:
                self.ram[name] = self.ram[name][:n]
        self.staged = dict.fromkeys(self.tables, 0)

    def read(self, name: str, rows) -> np.ndarray:
        """Rows of an on-disk column (a ranged read per Zarr chunk they fall in)."""
        return self.arrays[name].get_orthogonal_selection((np.asarray(rows, dtype=np.int64),))

    def version(self) -> int:
        """Changes with every commit: what caches of derived values key on."""
        return self.commits

    def close(self) -> None:
        if not self.closed:
            self.rollback()
            self.group.store.close()
            self.closed = True
