"""Zarr round-trips and the commit protocol of a shard's store (block store + chunk table)."""

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from engram.decoder.layout import BlockLayout
from engram.workers.block_store import BLOCKS_IN_RAM, BlockStore, EncodedBlocks, block_schema
from engram.workers.chunk_table import CHUNK_SCHEMA, ChunkRows, ChunkTable, DocAbout
from engram.workers.store import ShardStore, StoreError
from engram.workers.tables import Tables

LAYOUT = BlockLayout(layers=2, kv_heads=3, keep_tokens=4, head_dim=8, chunk_tokens=4, latent_dim=6, latents_per_chunk=2)


def batch(rng, hashes):
    n = len(hashes)
    kv = (n, LAYOUT.layers, LAYOUT.kv_heads, LAYOUT.keep_tokens, LAYOUT.head_dim)
    return EncodedBlocks(
        kv={
            "keys": rng.standard_normal(kv).astype(np.float16),
            "values": rng.standard_normal(kv).astype(np.float16),
            "positions": LAYOUT.dense_positions(np.full(n, LAYOUT.chunk_tokens)),  # dense: derived on read
        },
        tokens=rng.integers(0, 100, (n, LAYOUT.chunk_tokens)).astype(np.int32),
        length=np.full(n, LAYOUT.chunk_tokens, np.int32),
        hash=np.frombuffer(b"".join(hashes), np.uint8).reshape(n, 16),
        latent=rng.standard_normal((n, 2, LAYOUT.latent_dim)).astype(np.float32),
        text=np.array([f"chunk {h.hex()[:8]} text" for h in hashes], dtype=object),
    )


def rows(blocks, n):
    return ChunkRows(np.asarray(blocks), np.arange(n), np.arange(n) * 4, np.zeros(n, np.int64))


def h(i):
    return i.to_bytes(16, "little")


def files_hold(root: Path, tokens) -> bool:
    """Whether any file under root holds these token ids (int32, as stored) byte for byte: every file read raw,
    so no copy in any table, segment or generation goes unseen."""
    needle = np.asarray(tokens, dtype=np.int32).tobytes()
    return any(needle in f.read_bytes() for f in Path(root).rglob("*") if f.is_file())


def test_round_trip_and_reopen(tmp_path):
    rng = np.random.default_rng(0)
    s = ShardStore(tmp_path, LAYOUT)
    b = batch(rng, [h(1), h(2), h(3)])
    idx = s.blocks.put(b)
    s.chunks.add_document("ns", "doc", 12, DocAbout(), rows(idx, 3))
    s.commit()
    s2 = ShardStore(tmp_path, LAYOUT)
    got = s2.blocks.get([2, 0])
    assert set(got) == {"keys", "values", "positions"}
    for name, col in got.items():
        np.testing.assert_array_equal(col, b.kv[name][[2, 0]])
    np.testing.assert_array_equal(s2.blocks.latents([0, 1, 2]), b.latent)
    assert s2.blocks.tokens([1]) == [b.tokens[1].tolist()]
    assert s2.chunks.documents() == [("ns", "doc")] and s2.blocks.contains([h(2), h(9)]) == [True, False]
    doc = s2.chunks.doc("ns", "doc")
    assert s2.chunks.live_rows(doc).tolist() == [0, 1, 2]
    exported = s2.blocks.export([h(3), h(1)])
    np.testing.assert_array_equal(exported.kv["keys"], b.kv["keys"][[2, 0]])
    np.testing.assert_array_equal(exported.hash, b.hash[[2, 0]])


def test_uncommitted_writes_vanish_on_reopen(tmp_path):
    """A crash between staging and commit leaves the store exactly as it was committed."""
    rng = np.random.default_rng(1)
    s = ShardStore(tmp_path, LAYOUT)
    s.blocks.put(batch(rng, [h(1)]))
    s.commit()
    s.blocks.put(batch(rng, [h(2), h(3)]))  # staged, never committed: the process "dies" here
    s.chunks.add_document("ns", "late", 8, DocAbout(), rows([1, 2], 2))
    s2 = ShardStore(tmp_path, LAYOUT)
    assert s2.tables.counts == {"blocks": 1, "chunks": 0, "docs": 0, "drops": 0, "deletes": 0}
    assert s2.blocks.contains([h(1), h(2)]) == [True, False]
    kv = s2.tables.logs["blocks.kv"]  # the uncommitted tail of the segment file is cut off
    assert (tmp_path / "data.zarr/segments/blocks.kv/seg-000000.bin").stat().st_size == kv.row_bytes
    assert s2.chunks.documents() == []


def test_duplicate_blocks_are_stored_once(tmp_path):
    rng = np.random.default_rng(2)
    s = ShardStore(tmp_path, LAYOUT)
    first = s.blocks.put(batch(rng, [h(5), h(5), h(6)]))
    again = s.blocks.put(batch(rng, [h(6)]))
    assert list(first) == [0, 0, 1] and list(again) == [1]
    s.commit()
    assert s.tables.counts["blocks"] == 2


def test_dense_positions_are_derived_not_stored(tmp_path):
    """A dense block's positions (1..length, then -1) are rebuilt from its length; a sparse layout stores them."""
    got = LAYOUT.dense_positions(np.array([4, 2]))
    assert got.shape == (2, LAYOUT.layers, LAYOUT.kv_heads, 4)
    assert got[1, 1, 2].tolist() == [1, 2, -1, -1] and got[0, 0, 0].tolist() == [1, 2, 3, 4]
    assert "positions" not in LAYOUT.stored_columns()
    assert "positions" in BlockLayout(**{**LAYOUT.__dict__, "keep_tokens": 2}).stored_columns()


def test_rollback_and_layout_mismatch(tmp_path):
    rng = np.random.default_rng(3)
    s = ShardStore(tmp_path, LAYOUT)
    s.blocks.put(batch(rng, [h(1)]))
    s.rollback()
    assert s.blocks.contains([h(1)]) == [False]
    s.commit()
    other = BlockLayout(**{**LAYOUT.__dict__, "keep_tokens": 2})
    with pytest.raises(StoreError, match=r"keep_tokens = 4 \(configured: 2\)"):
        ShardStore(tmp_path, other)
    with pytest.raises(StoreError, match=r"kv_dtype = 'float16' \(configured: 'int4'\)"):
        ShardStore(tmp_path, BlockLayout(**{**LAYOUT.__dict__, "kv_dtype": "int4"}))


def test_rollback_undoes_a_staged_delete_and_drop(tmp_path):
    """A failed commit of a delete (or a move's drop) leaves the document exactly as it was: in RAM and on disk."""
    rng = np.random.default_rng(4)
    s = ShardStore(tmp_path, LAYOUT)
    s.chunks.add_document("ns", "a", 8, DocAbout("req"), rows(s.blocks.put(batch(rng, [h(1), h(2)])), 2))
    s.commit()
    doc = s.chunks.doc("ns", "a")
    s.chunks.drop(s.chunks.live_rows(doc)[:1])
    s.chunks.delete_document(doc)
    s.rollback()
    assert s.chunks.doc("ns", "a") == doc and s.chunks.live_rows(doc).tolist() == [0, 1]
    s.commit()  # a later commit must not carry the rolled-back delete
    again = ShardStore(tmp_path, LAYOUT)
    assert again.chunks.documents() == [("ns", "a")] and again.chunks.live_rows(doc).tolist() == [0, 1]
    assert again.chunks.request(doc) == "req"


def test_per_document_rows_and_close(tmp_path):
    rng = np.random.default_rng(5)
    s = ShardStore(tmp_path, LAYOUT)
    for i, name in enumerate(["a", "b", "c"]):
        s.chunks.add_document("ns", name, 4, DocAbout(), rows(s.blocks.put(batch(rng, [h(10 * i), h(10 * i + 1)])), 2))
        s.commit()
    b = s.chunks.doc("ns", "b")
    s.chunks.add_chunks(b, rows(s.blocks.put(batch(rng, [h(99)])), 1))
    s.commit()
    assert s.chunks.live_rows(b).tolist() == [2, 3, 6]
    s.chunks.drop(np.array([3]))
    s.commit()
    reopened = ShardStore(tmp_path, LAYOUT)
    assert reopened.chunks.live_rows(b).tolist() == [2, 6]
    reopened.close()
    with pytest.raises(StoreError, match="closed"):
        reopened.blocks.put(batch(rng, [h(7)]))


def format_1_tables(path) -> Tables:
    """Empty tables as the version before segment logs laid them out: every fixed-size column a Zarr array (a block
    one Zarr chunk file per column), deleted documents listed in COMMIT.json (commit with "deleted_docs")."""
    kv = tuple(f"blocks/{c}" for c in LAYOUT.stored_columns())
    return Tables(
        path,
        {**block_schema(LAYOUT), **CHUNK_SCHEMA},
        in_ram=(*BLOCKS_IN_RAM, *CHUNK_SCHEMA),
        one_file_per_row=(*kv, "blocks/latent"),
        uncompressed=(),
        meta={"layout": asdict(LAYOUT), "deleted_docs": []},
    )


def test_document_digest_and_time_kept_and_older_stores_open(tmp_path):
    """A document's sha256 and write time survive a reopen; a store written before those columns existed opens
    with them empty ("" and 0) instead of failing."""
    import zarr

    rng = np.random.default_rng(3)
    s = ShardStore(tmp_path / "new", LAYOUT)
    s.chunks.add_document("ns", "a", 8, DocAbout("req", "ab" * 32, 1.8e9), rows(s.blocks.put(batch(rng, [h(1)])), 1))
    s.commit()
    s.close()
    about = ShardStore(tmp_path / "new", LAYOUT).chunks.about(0)
    assert (about.request, about.digest, about.written) == ("req", "ab" * 32, 1.8e9)
    old = format_1_tables(tmp_path / "old")
    ChunkTable(old, []).add_document(
        "ns", "a", 8, DocAbout("req"), rows(BlockStore(old, LAYOUT).put(batch(rng, [h(1)])), 1)
    )
    old.commit({"layout": asdict(LAYOUT), "deleted_docs": []})
    old.close()
    group = zarr.open_group(tmp_path / "old/data.zarr", mode="a")
    for col in ("docs/digest", "docs/written"):  # as an older version wrote it
        del group[col]
    migrated = ShardStore(tmp_path / "old", LAYOUT)
    about = migrated.chunks.about(0)
    assert (about.request, about.digest, about.written) == ("req", "", 0.0)
    assert migrated.chunks.documents() == [("ns", "a")]
