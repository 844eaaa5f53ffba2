"""A shard's Zarr store: KV blocks on disk, read on demand; the per-chunk index mirrored in RAM.

Layout (one store per shard, one writer: the shard actor that owns it):
  blocks/  keys, values [n, L, H, S, D] fp16 (one Zarr chunk per block), or uint8 codes with their scales and
           zeros (kv_dtype int8/int4/int2; decoder/quant.py), positions [n, L, H, S] int16,
           tokens [n, T] int32 (-1 pad), length [n], hash [n, 16] uint8, latent [n, R, C] float32
  chunks/  block, doc, seq, offset, episode [m]          (a document's chunk -> the block holding its KV)
  docs/    namespace, name (strings), tokens [d]
  drops/   chunk [k]: chunk rows moved to another shard (rebalancing); deleted documents are listed in COMMIT.json
  COMMIT.json  how many rows of each table are committed, and which documents are deleted.

Crash safety: rows are appended past the committed count and become visible only when COMMIT.json is replaced
(write temp, fsync, rename, fsync dir). Anything after the last commit is discarded on open, so a write is
either wholly there or not at all, and what was acknowledged (committed before the ack) survives.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import zarr

ROW_CHUNK = 4096  # Zarr chunk length of the small per-row tables


@dataclass(frozen=True)
class StoreLayout:
    layers: int
    kv_heads: int
    keep_tokens: int
    head_dim: int
    chunk_tokens: int
    latent_dim: int
    latents_per_chunk: int = 1  # R retrieval windows per chunk
    kv_dtype: str = "float16"  # float16, int8, int4 or int2 (decoder/quant.py)

    def kv_columns(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """The K/V columns of one stored block: name -> (shape, dtype); decoder/quant.py writes and reads them."""
        lh = (self.layers, self.kv_heads)
        # codes packed along the head dimension, as decoder/quant.py packs them (restated: shards stay torch-free)
        per_byte = {"int4": 2, "int2": 4}.get(self.kv_dtype, 1)
        kv = (*lh, self.keep_tokens, self.head_dim // per_byte)
        if self.kv_dtype == "float16":
            return {"keys": (kv, "float16"), "values": (kv, "float16")}
        per_channel, per_token = (*lh, self.head_dim), (*lh, self.keep_tokens)
        return {"keys": (kv, "uint8"), "values": (kv, "uint8"), "key_scale": (per_channel, "float16"),
                "key_zero": (per_channel, "float16"), "value_scale": (per_token, "float16"),
                "value_zero": (per_token, "float16")}

    @property
    def block_columns(self) -> tuple[str, ...]:
        """What a block is at read time: its K/V columns and positions."""
        return (*self.kv_columns(), "positions")

    @property
    def block_bytes(self) -> int:
        """Bytes of one block's read-time columns (K/V codes, scales, positions)."""
        tables = _tables(self)
        return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize
                   for shape, dtype in (tables[f"blocks/{c}"] for c in self.block_columns))


def _tables(lay: StoreLayout) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape of one row, dtype)."""
    return {
        **{f"blocks/{name}": col for name, col in lay.kv_columns().items()},
        "blocks/positions": ((lay.layers, lay.kv_heads, lay.keep_tokens), "int16"),
        "blocks/tokens": ((lay.chunk_tokens,), "int32"),
        "blocks/length": ((), "int32"),
        "blocks/hash": ((16,), "uint8"),
        "blocks/latent": ((lay.latents_per_chunk, lay.latent_dim), "float32"),
        "chunks/block": ((), "int64"),
        "chunks/doc": ((), "int64"),
        "chunks/seq": ((), "int64"),
        "chunks/offset": ((), "int64"),
        "chunks/episode": ((), "int64"),
        "docs/namespace": ((), "str"),
        "docs/name": ((), "str"),
        "docs/tokens": ((), "int64"),
        "docs/request": ((), "str"),
        "drops/chunk": ((), "int64"),
    }


# Tables mirrored in RAM (the index); KV stays on disk.
_IN_RAM = [
    "blocks/length", "blocks/hash", "blocks/latent", "chunks/block", "chunks/doc", "chunks/seq",
    "chunks/offset", "chunks/episode", "docs/namespace", "docs/name", "docs/tokens", "docs/request", "drops/chunk",
]
TABLES = ("blocks", "chunks", "docs", "drops")


class StoreError(RuntimeError):
    pass


class ShardStore:
    """put / contains / get / close over one shard's Zarr store (LMCache-style small interface)."""

    def __init__(self, path: str | Path, layout: StoreLayout, fsync: bool = True):
        self.path, self.layout, self.fsync = Path(path), layout, fsync
        self.path.mkdir(parents=True, exist_ok=True)
        self.group = zarr.open_group(self.path / "data.zarr", mode="a")
        meta = self._read_commit()
        if meta is None:
            meta = {"layout": asdict(layout), **dict.fromkeys(TABLES, 0), "deleted_docs": []}
        elif (have := {"kv_dtype": "float16", **meta["layout"]}) != asdict(layout):  # before kv_dtype: fp16
            diff = ", ".join(f"{k} = {have.get(k)!r} (configured: {v!r})" for k, v in asdict(layout).items()
                             if have.get(k) != v)
            raise StoreError(f"store {self.path} was written with {diff}: configure the same values (e.g. "
                             "[encoder] kv_dtype) to open it, or use a new data_dir")
        self.arrays: dict[str, zarr.Array] = {}
        for name, (row, dtype) in _tables(layout).items():
            if name in self.group:
                self.arrays[name] = self.group[name]
            else:
                chunks = (1, *row) if name.startswith("blocks/") and len(row) > 1 else (ROW_CHUNK, *row)
                self.arrays[name] = self.group.create_array(
                    name, shape=(0, *row), chunks=chunks, dtype=str if dtype == "str" else dtype,
                    compressors=None if name in ("blocks/keys", "blocks/values") else "auto",  # zstd gains ~8% on K/V
                )
        self.counts = {t: meta.get(t, 0) for t in TABLES}  # committed rows (stores from before "drops" lack it)
        self.deleted_docs: set[int] = set(meta["deleted_docs"])
        for name, arr in self.arrays.items():  # drop whatever an interrupted write left past the commit
            n = self.counts[name.split("/")[0]]
            if arr.shape[0] != n:
                arr.resize((n, *arr.shape[1:]))
        self.ram = {name: self.arrays[name][:] for name in _IN_RAM}
        self.staged = {t: 0 for t in self.counts}  # rows appended since the last commit
        self._bytes_at: tuple[tuple, int] | None = None  # (store version, bytes on disk) of the last walk
        self.hash_index = {bytes(h): i for i, h in enumerate(self.ram["blocks/hash"])}

    # --- commit protocol -------------------------------------------------------------------------------------
    def _read_commit(self) -> dict | None:
        f = self.path / "COMMIT.json"
        return json.loads(f.read_text()) if f.exists() else None

    def commit(self) -> None:
        """Make every staged row durable and visible."""
        counts = {t: self.counts[t] + self.staged[t] for t in self.counts}
        meta = {"layout": asdict(self.layout), **counts, "deleted_docs": sorted(self.deleted_docs)}
        if self.fsync:
            os.sync()  # the Zarr chunk files written since the last commit
        tmp = self.path / "COMMIT.json.tmp"
        with open(tmp, "w") as f:
            json.dump(meta, f)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        os.replace(tmp, self.path / "COMMIT.json")
        if self.fsync:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.counts, self.staged = counts, {t: 0 for t in self.counts}

    def rollback(self) -> None:
        """Forget staged rows (after a failed write); the disk already ignores them."""
        for name, arr in self.arrays.items():
            table = name.split("/")[0]
            n = self.counts[table]
            if arr.shape[0] != n:
                arr.resize((n, *arr.shape[1:]))
            if name in self.ram:
                self.ram[name] = self.ram[name][:n]
        self.hash_index = {bytes(h): i for i, h in enumerate(self.ram["blocks/hash"])}
        self.staged = {t: 0 for t in self.counts}

    def _append(self, table: str, rows: dict[str, np.ndarray]) -> np.ndarray:
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

    # --- blocks ----------------------------------------------------------------------------------------------
    def contains(self, hashes: list[bytes]) -> list[bool]:
        return [h in self.hash_index for h in hashes]

    def put_blocks(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Stage new blocks (keys, values, positions, tokens, length, hash, latent); skips ones already stored."""
        fresh = [i for i, h in enumerate(batch["hash"]) if bytes(h) not in self.hash_index]
        # the same hash twice in one batch: keep the first
        seen: dict[bytes, int] = {}
        fresh = [i for i in fresh if seen.setdefault(bytes(batch["hash"][i]), i) == i]
        if fresh:
            idx = self._append("blocks", {k: np.asarray(v)[fresh] for k, v in batch.items()})
            for i, row in zip(fresh, idx):
                self.hash_index[bytes(batch["hash"][i])] = int(row)
        return np.array([self.hash_index[bytes(h)] for h in batch["hash"]], dtype=np.int64)

    def get_blocks(self, indices) -> dict[str, np.ndarray]:
        """-> the block columns (layout.block_columns) of these blocks, [n, ...] each (read from disk)."""
        sel = (np.asarray(indices, dtype=np.int64),)
        return {c: self.arrays[f"blocks/{c}"].get_orthogonal_selection(sel) for c in self.layout.block_columns}

    def get_tokens(self, indices) -> np.ndarray:
        return self.arrays["blocks/tokens"].get_orthogonal_selection((np.asarray(indices, dtype=np.int64),))

    # --- chunks and documents --------------------------------------------------------------------------------
    def add_document(self, namespace: str, name: str, tokens: int, chunks: dict[str, np.ndarray],
                     request_id: str = "") -> int:
        """Stage one document and its chunk rows (block, seq, offset, episode); returns the document's row."""
        (doc,) = self._append("docs", {"namespace": np.array([namespace], dtype=object),
                                       "name": np.array([name], dtype=object), "tokens": np.array([tokens]),
                                       "request": np.array([request_id], dtype=object)})
        self._append("chunks", {**chunks, "doc": np.full(len(chunks["block"]), doc)})
        return int(doc)

    def add_chunks(self, doc: int, chunks: dict[str, np.ndarray]) -> np.ndarray:
        """Stage more chunk rows (block, seq, offset, episode) of an existing document; returns their rows."""
        return self._append("chunks", {**chunks, "doc": np.full(len(chunks["block"]), doc)})

    def drop_chunks(self, rows) -> None:
        """Stage the removal of chunk rows (they moved to another shard)."""
        self._append("drops", {"chunk": np.asarray(rows, dtype=np.int64)})

    def delete_document(self, doc: int) -> None:
        self.deleted_docs.add(int(doc))

    def stored_bytes(self) -> int:
        """Bytes on disk; walked again only after a commit changed the store (metrics poll this every 15 s)."""
        version = (tuple(self.counts.values()), len(self.deleted_docs))
        if self._bytes_at is None or self._bytes_at[0] != version:
            self._bytes_at = (version, sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file()))
        return self._bytes_at[1]

    def close(self) -> None:
        self.staged = {t: 0 for t in self.counts}
