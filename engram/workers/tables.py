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
from .segments import SegmentLog

ROW_CHUNK = 4096  # Zarr chunk length of the small per-row tables
GROWTH = 1.25  # a full RAM column grows by this factor: amortised O(1) appends, at most 25% spare (RAM-bound shards)
COMMIT = "COMMIT.json"
DATA = "data.zarr"  # the tables' Zarr group; a compacted store names its generation in COMMIT.json


def grow(buf: np.ndarray, end: int) -> np.ndarray:
    """buf if it holds `end` rows, else a buffer GROWTH times larger (at least `end`, spare rows zero) with buf's
    rows copied: appends through it are amortised O(1)."""
    if end <= len(buf):
        return buf
    grown = np.zeros((max(end, int(GROWTH * len(buf)), 64), *buf.shape[1:]), dtype=buf.dtype)
    grown[: len(buf)] = buf
    return grown


class StoreError(RuntimeError):
    pass


class Tables:
    """schema: "table/column" -> (shape of one row, dtype); columns in `in_ram` are mirrored in `ram` (grown
    geometrically: appends are amortised O(1), not a copy of the column each).
    `logs`: log name -> columns stored side by side in append-only segment files (segments.py: KV blocks, many per
    file) instead of Zarr; every other column is a Zarr array of ROW_CHUNK-row chunks.
    `one_file_per_row`: Zarr columns whose rows are stored one Zarr chunk each (stores before segment logs)."""

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
        logs: dict[str, tuple[str, ...]] | None = None,
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
        self.schema = schema
        logs = logs or {}
        per_file = record.get("segments", {})  # rows per segment file, fixed when a log was created
        self.logs: dict[str, SegmentLog] = {}
        self.log_of: dict[str, SegmentLog] = {}  # column -> its log
        for log, names in logs.items():
            seg = SegmentLog(self.path / self.data / "segments" / log, {n: schema[n] for n in names}, per_file.get(log))
            self.logs[log] = seg
            self.log_of.update(dict.fromkeys(names, seg))
        self.arrays: dict[str, zarr.Array] = {}
        for name, (row, dtype) in schema.items():
            if name in self.log_of:
                continue
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
        self._cut_to_committed()  # drop whatever an interrupted write left past the commit
        self.ram: dict[str, np.ndarray] = {}  # views of _buffers, [rows, ...] each
        self._buffers: dict[str, np.ndarray] = {}
        from_logs: dict[str, np.ndarray] = {}
        for seg in self.logs.values():
            if any(name in in_ram for name in seg.columns):
                from_logs.update(seg.read_all(self.counts[seg.table], [n for n in seg.columns if n in in_ram]))
        for name in in_ram:
            self._buffers[name] = from_logs[name] if name in from_logs else self.arrays[name][:]
            self.ram[name] = self._buffers[name]
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
        for seg, names in self._by_log([f"{table}/{c}" for c in rows]).items():
            seg.write(start, {name: rows[name.split("/")[1]] for name in names})
        for col, data in rows.items():
            name = f"{table}/{col}"
            if name not in self.log_of:
                arr = self.arrays[name]
                arr.resize((start + n, *arr.shape[1:]))
                arr[start : start + n] = data
            if name in self.ram:
                self._extend_ram(name, start, data)
        self.staged[table] += n
        return np.arange(start, start + n)

    def _extend_ram(self, name: str, start: int, data) -> None:
        """Write rows at `start` of a RAM column, growing its buffer by GROWTH when full (amortised O(1) per row)."""
        end = start + len(data)
        buf = self._buffers[name] = grow(self._buffers[name], end)
        buf[start:end] = np.asarray(data, dtype=buf.dtype)
        self.ram[name] = buf[:end]

    def commit(self, meta: dict) -> None:
        """Make every staged row durable and visible, with `meta` (the caller's fields) in the record."""
        if self.closed:
            raise StoreError("the store is closed")
        counts = {t: self.counts[t] + self.staged[t] for t in self.tables}
        segments = {"segments": {log: seg.per_file for log, seg in self.logs.items()}} if self.logs else {}
        record = {**meta, **counts, **segments, **({"data": self.data} if self.data != DATA else {})}
        if self.fsync:
            sync_filesystem(self.path)  # the Zarr chunk files written since the last commit
        write_atomically(self.path / COMMIT, json.dumps(record), self.fsync)
        self.counts, self.staged, self.record = counts, dict.fromkeys(self.tables, 0), record
        self.commits += 1

    def rollback(self) -> None:
        """Forget staged rows (after a failed write); the disk already ignores them."""
        self._cut_to_committed()
        for name in self.ram:
            self.ram[name] = self._buffers[name][: self.counts[name.split("/")[0]]]
        self.staged = dict.fromkeys(self.tables, 0)

    def _cut_to_committed(self) -> None:
        for name, arr in self.arrays.items():
            n = self.counts[name.split("/")[0]]
            if arr.shape[0] != n:
                arr.resize((n, *arr.shape[1:]))
        for seg in self.logs.values():
            seg.truncate(self.counts[seg.table])

    def read(self, name: str, rows) -> np.ndarray:
        """Rows of an on-disk column (a ranged read per Zarr chunk or segment row they fall in)."""
        return self.read_many([name], rows)[name]

    def read_many(self, names: list[str], rows) -> dict[str, np.ndarray]:
        """Rows of on-disk columns; columns of one segment log come in one ranged read per row."""
        rows = np.asarray(rows, dtype=np.int64)
        out: dict[str, np.ndarray] = {}
        for seg, in_log in self._by_log(names).items():
            out.update(seg.read(in_log, rows))
        for name in names:
            if name not in out:
                out[name] = self.arrays[name].get_orthogonal_selection((rows,))
        return out

    def read_range(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start .. stop of an on-disk column, read in one pass (sequential, not a read per row)."""
        if name in self.log_of:
            return self.log_of[name].read_range([name], start, stop)[name]
        return self.arrays[name][start:stop]

    def _by_log(self, names: list[str]) -> dict[SegmentLog, list[str]]:
        """The columns among `names` that live in segment logs, grouped by log."""
        out: dict[SegmentLog, list[str]] = {}
        for name in names:
            if name in self.log_of:
                out.setdefault(self.log_of[name], []).append(name)
        return out

    def ram_bytes(self, prefix: str = "") -> int:
        """RAM of the mirrored columns whose names start with `prefix` (their buffers, spare capacity included)."""
        return sum(b.nbytes for name, b in self._buffers.items() if name.startswith(prefix))

    def files(self) -> int:
        """Files of the current generation (Zarr chunks and metadata, segment files)."""
        return sum(1 for f in (self.path / self.data).rglob("*") if f.is_file())

    def version(self) -> int:
        """Changes with every commit: what caches of derived values key on."""
        return self.commits

    def close(self) -> None:
        if not self.closed:
            self.rollback()
            self.group.store.close()
            for seg in self.logs.values():
                seg.close()
            self.closed = True
