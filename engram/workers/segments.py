"""Append-only segment files: fixed-size rows of several columns, many rows per file.

A store's blocks are large (hundreds of KB each) and written once; one Zarr chunk file per block and column made ~8
files per block. Here a log's rows go into a few large files instead: row i lives in file i // rows_per_file at
byte (i % rows_per_file) * row_bytes, its columns side by side, so reading one block is one small ranged read
(`pread`) and writing N rows is one sequential write — no read-modify-write of a neighbour, no per-row file.

Crash safety is the caller's (tables.py): rows are written past the committed count and only a commit record makes
them visible; on open the files are cut back to the committed count (`truncate`), so a torn or uncommitted tail is
never read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

FILE_BYTES = 1 << 30  # target size of one segment file


def rows_per_file(row_bytes: int) -> int:
    return max(1, FILE_BYTES // row_bytes)


class SegmentLog:
    """columns: "table/column" -> (shape of one row, dtype), all of one table; rows of all of them are stored side
    by side. per_file: rows per segment file (None: FILE_BYTES' worth; a store keeps the value it started with)."""

    def __init__(self, path: Path, columns: dict[str, tuple[tuple[int, ...], str]], per_file: int | None = None):
        self.path = path
        self.table = next(iter(columns)).split("/")[0]
        self.path.mkdir(parents=True, exist_ok=True)
        self.columns: dict[str, tuple[tuple[int, ...], np.dtype, int, int]] = {}  # name -> shape, dtype, at, bytes
        at = 0
        for name, (shape, dtype) in columns.items():
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            self.columns[name] = (tuple(shape), np.dtype(dtype), at, nbytes)
            at += nbytes
        self.row_bytes = at
        self.per_file = per_file or rows_per_file(at)
        self._fds: dict[int, int] = {}

    def _file(self, k: int) -> Path:
        return self.path / f"seg-{k:06d}.bin"

    def _fd(self, k: int) -> int:
        if k not in self._fds:
            self._fds[k] = os.open(self._file(k), os.O_RDWR | os.O_CREAT, 0o644)
        return self._fds[k]

    def write(self, start: int, data: dict[str, np.ndarray]) -> None:
        """Write rows start .. start + n (n rows of each column given; a column not given is zeros)."""
        n = len(next(iter(data.values())))
        rows = np.zeros((n, self.row_bytes), dtype=np.uint8)
        for name, (shape, dtype, at, nbytes) in self.columns.items():
            if name not in data:
                continue
            col = np.ascontiguousarray(np.asarray(data[name], dtype=dtype).reshape(n, *shape))
            rows[:, at : at + nbytes] = col.reshape(n, -1).view(np.uint8)
        i = 0
        while i < n:  # one pwrite per segment file the rows fall in
            k, first = divmod(start + i, self.per_file)
            take = min(n - i, self.per_file - first)
            os.pwrite(self._fd(k), memoryview(rows[i : i + take]), first * self.row_bytes)  # no copy
            i += take

    def read(self, names: list[str], rows) -> dict[str, np.ndarray]:
        """These columns of these rows: one ranged read per row covering the columns asked."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        spans = [self.columns[name] for name in names]
        lo = min(at for _, _, at, _ in spans)
        hi = max(at + nbytes for _, _, at, nbytes in spans)
        raw = np.empty((len(rows), hi - lo), dtype=np.uint8)
        for j, row in enumerate(rows.tolist()):
            k, first = divmod(row, self.per_file)
            got = os.pread(self._fd(k), hi - lo, first * self.row_bytes + lo)
            if len(got) != hi - lo:
                raise OSError(f"segment {self._file(k).name}: row {row} is cut short")
            raw[j] = np.frombuffer(got, dtype=np.uint8)
        return {name: self._column(raw, name, lo) for name in names}

    def read_all(self, n: int, names: list[str] | None = None, batch: int = 4096) -> dict[str, np.ndarray]:
        """These columns (default: all) of rows 0 .. n, read `batch` rows at a time (a shard's open: the columns it
        keeps in RAM; the others are not held whole, even for a moment)."""
        names = list(self.columns) if names is None else names
        out = {name: np.empty((n, *self.columns[name][0]), dtype=self.columns[name][1]) for name in names}
        for start in range(0, n, batch):
            for name, col in self.read_range(names, start, min(n, start + batch)).items():
                out[name][start : start + len(col)] = col
        return out

    def read_range(self, names: list[str], start: int, stop: int) -> dict[str, np.ndarray]:
        """These columns of the contiguous rows start .. stop: one sequential read per segment file they span."""
        parts = []
        row = start
        while row < stop:
            k, first = divmod(row, self.per_file)
            take = min(stop - row, self.per_file - first)
            with open(self._file(k), "rb") as f:
                f.seek(first * self.row_bytes)
                got = np.fromfile(f, dtype=np.uint8, count=take * self.row_bytes)
            if len(got) != take * self.row_bytes:
                raise OSError(f"segment {self._file(k).name}: rows {row}..{row + take} are cut short")
            parts.append(got.reshape(take, self.row_bytes))
            row += take
        raw = np.concatenate(parts) if parts else np.empty((0, self.row_bytes), np.uint8)
        return {name: self._column(raw, name, 0) for name in names}

    def _column(self, raw: np.ndarray, name: str, lo: int) -> np.ndarray:
        shape, dtype, at, nbytes = self.columns[name]
        part = np.ascontiguousarray(raw[:, at - lo : at - lo + nbytes])
        return part.view(dtype).reshape(len(raw), *shape)

    def truncate(self, n: int) -> None:
        """Cut the log back to n rows: what lies past them (an uncommitted or torn write) is removed."""
        last = -(-n // self.per_file)  # files that hold rows 0 .. n
        for f in self.path.glob("seg-*.bin"):
            k = int(f.stem.split("-")[1])
            if k >= last:
                if k in self._fds:
                    os.close(self._fds.pop(k))
                f.unlink()
        if n:
            k = last - 1
            size = (n - k * self.per_file) * self.row_bytes
            if self._file(k).exists() and self._file(k).stat().st_size > size:
                os.truncate(self._file(k), size)

    def files(self) -> int:
        return len(list(self.path.glob("seg-*.bin")))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
