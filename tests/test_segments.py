"""The store's on-disk format 2 (issue #15): blocks in append-only segment files, RAM columns grown by doubling, a
commit record that does not grow with history, and format-1 stores migrated on open."""

import json
from dataclasses import asdict

import numpy as np

from engram.workers.block_store import BlockStore
from engram.workers.chunk_table import ChunkTable, DocAbout
from engram.workers.segments import SegmentLog
from engram.workers.store import ShardStore
from engram.workers.tables import Tables
from tests.test_store import LAYOUT, batch, files_hold, format_1_tables, h, rows

COLUMNS = {"a/x": ((2, 3), "float16"), "a/y": ((), "int64"), "a/z": ((4,), "uint8")}


def some_rows(rng, n):
    return {
        "a/x": rng.standard_normal((n, 2, 3)).astype(np.float16),
        "a/y": rng.integers(-9, 9, n),
        "a/z": rng.integers(0, 255, (n, 4)).astype(np.uint8),
    }


def test_segment_log_rows_across_files_and_truncate(tmp_path):
    """Rows spread over files of 3 rows each read back exactly, one at a time or all; a truncate cuts the tail
    (whole files and a partial one) and later writes continue from there."""
    rng = np.random.default_rng(0)
    log = SegmentLog(tmp_path, COLUMNS, per_file=3)
    first, second = some_rows(rng, 4), some_rows(rng, 6)
    log.write(0, first)
    log.write(4, second)
    want = {k: np.concatenate([first[k], second[k]]) for k in COLUMNS}
    assert log.files() == 4  # rows 0-2, 3-5, 6-8, 9
    got = log.read(["a/y", "a/x"], [9, 0, 4, 3])
    np.testing.assert_array_equal(got["a/x"], want["a/x"][[9, 0, 4, 3]])
    np.testing.assert_array_equal(got["a/y"], want["a/y"][[9, 0, 4, 3]])
    for k, v in log.read_all(10).items():
        np.testing.assert_array_equal(v, want[k])
    some = log.read_all(10, ["a/z", "a/x"], batch=4)  # only the columns asked, 4 rows at a time: files cut mid-batch
    assert sorted(some) == ["a/x", "a/z"]
    for k, v in some.items():
        np.testing.assert_array_equal(v, want[k])
    np.testing.assert_array_equal(log.read_range(["a/y"], 2, 8)["a/y"], want["a/y"][2:8])
    log.truncate(4)
    assert log.files() == 2 and (tmp_path / "seg-000001.bin").stat().st_size == log.row_bytes
    log.write(4, some_rows(rng, 1))
    np.testing.assert_array_equal(log.read_all(5)["a/z"][:4], want["a/z"][:4])
    log.close()


def test_files_per_block_do_not_grow_with_blocks(tmp_path):
    """Thirty commits of 10 blocks leave the same number of files as three: blocks share segment files."""
    rng = np.random.default_rng(1)
    s = ShardStore(tmp_path, LAYOUT)
    counts = []
    for i in range(30):
        hashes = [h(1000 * i + j) for j in range(10)]
        s.chunks.add_document("ns", f"d{i}", 40, DocAbout(), rows(s.blocks.put(batch(rng, hashes)), 10))
        s.commit()
        if i in (2, 29):
            counts.append(s.tables.files())
    assert counts[0] == counts[1], counts
    assert counts[1] / 300 <= 0.1  # the tiny test layout: ~20 files of tables and metadata, 2 segment files


def test_ram_columns_grow_geometrically(tmp_path):
    """1,000 one-row appends reallocate a RAM column O(log n) times, not 1,000 (the old concatenate)."""
    t = Tables(tmp_path, {"rows/x": ((2,), "float32")}, ("rows/x",), (), (), {})
    buffers = set()
    for i in range(1000):
        t.append("rows", {"x": np.full((1, 2), i, np.float32)})
        buffers.add(id(t._buffers["rows/x"]))
        if i % 100 == 99:
            t.commit({})
    assert len(buffers) <= 20  # 64 * 1.25^14 > 1,000
    np.testing.assert_array_equal(t.ram["rows/x"][:, 0], np.arange(1000))
    t.append("rows", {"x": np.zeros((5, 2), np.float32)})
    t.rollback()
    reopened = Tables(tmp_path, t.schema, ("rows/x",), (), (), {})
    assert len(t.ram["rows/x"]) == 1000 and len(reopened.ram["rows/x"]) == 1000


def test_commit_record_does_not_grow_with_deletes(tmp_path):
    rng = np.random.default_rng(2)
    s = ShardStore(tmp_path, LAYOUT)
    for i in range(40):
        s.chunks.add_document("ns", f"d{i}", 4, DocAbout(), rows(s.blocks.put(batch(rng, [h(i)])), 1))
    s.commit()
    size = (tmp_path / "COMMIT.json").stat().st_size
    for i in range(35):
        s.chunks.delete_document(s.chunks.doc("ns", f"d{i}"))
        s.commit()
    assert (tmp_path / "COMMIT.json").stat().st_size <= size + 8  # counts gain a digit or two, nothing per delete
    again = ShardStore(tmp_path, LAYOUT)
    assert sorted(n for _, n in again.chunks.documents()) == sorted(f"d{i}" for i in range(35, 40))


def test_a_format_1_store_is_migrated_on_open(tmp_path):
    """A store as the previous version wrote it (one Zarr chunk file per block and column, deleted documents in
    COMMIT.json) opens as format 2: same documents and blocks, the deleted one's tokens gone, far fewer files."""
    rng = np.random.default_rng(3)
    old = format_1_tables(tmp_path)
    blocks, chunks = BlockStore(old, LAYOUT), ChunkTable(old, [])
    kept, gone = batch(rng, [h(i) for i in range(12)]), batch(rng, [h(100 + i) for i in range(12)])
    chunks.add_document("ns", "kept", 48, DocAbout("r1"), rows(blocks.put(kept), 12))
    chunks.add_document("ns", "gone", 48, DocAbout("r2"), rows(blocks.put(gone), 12))
    old.commit({"layout": asdict(LAYOUT), "deleted_docs": [1]})
    old.close()
    files_before = sum(1 for f in tmp_path.rglob("*") if f.is_file())

    s = ShardStore(tmp_path, LAYOUT)
    record = json.loads((tmp_path / "COMMIT.json").read_text())
    assert record["format"] == 2 and "deleted_docs" not in record
    assert s.chunks.documents() == [("ns", "kept")] and s.chunks.request(0) == "r1"
    got = s.blocks.get(s.blocks.rows([h(5), h(0)]))
    np.testing.assert_array_equal(got["keys"], kept.kv["keys"][[5, 0]])
    np.testing.assert_array_equal(s.blocks.latents(s.blocks.rows([h(3)])), kept.latent[[3]])
    assert s.blocks.tokens(s.blocks.rows([h(7)])) == [kept.tokens[7].tolist()]
    assert s.blocks.contains([h(100), h(11)]) == [False, True] and len(s.blocks) == 12
    assert not files_hold(tmp_path, gone.tokens[0]) and files_hold(tmp_path, kept.tokens[0])  # format 2: raw
    files_after = sum(1 for f in tmp_path.rglob("*") if f.is_file())
    assert files_after < files_before / 2, (files_before, files_after)
    assert ShardStore(tmp_path, LAYOUT).chunks.documents() == [("ns", "kept")]  # and opens as format 2 again
