"""The shard's logic on a real Zarr store, without Ray: commit, search, exact forgetting, restart."""

import numpy as np
import pytest

from engram.decoder.layout import BlockLayout
from engram.errors import EngramError, ErrorCode
from engram.workers.episodic import EpisodicConfig, write_one_shot
from engram.workers.results import DocChunks
from engram.workers.shard import Shard, ShardConfig
from tests.test_store import batch, files_hold, h

LAYOUT = BlockLayout(layers=2, kv_heads=3, keep_tokens=4, head_dim=8, chunk_tokens=4, latent_dim=6, latents_per_chunk=2)


def make(tmp_path, read_mode="least_squares"):
    episodic = EpisodicConfig(rows=4, dim=6, read_mode=read_mode, beta=64.0)
    return Shard(0, ShardConfig(data_dir=str(tmp_path), fsync=False, episodic=episodic), LAYOUT)


def unit_batch(rng, ids):
    b = batch(rng, [h(i) for i in ids])
    b.latent /= np.linalg.norm(b.latent, axis=-1, keepdims=True)
    return b


def write(shard, name, b, ids, ns="ns"):
    shard.put_blocks(b)
    return shard.commit_document(
        ns, name, 4 * len(ids), [h(i) for i in ids], list(range(len(ids))), [4 * j for j in range(len(ids))]
    )


@pytest.mark.parametrize("read_mode", ["least_squares", "hopfield"])
def test_search_finds_the_matching_window(tmp_path, read_mode):
    rng = np.random.default_rng(0)
    s = make(tmp_path, read_mode)
    b = unit_batch(rng, range(5))
    write(s, "a", b, list(range(5)))
    # 5 chunks x 2 windows, K = 4 items: 2 chunks per episode -> 3 episodes
    assert len(s.memories) == 3
    r = s.search("ns", b.latent[3, 1], top_k=2, readout=True)
    # the windows are scored as the vector index holds them, in float16: a unit vector's cosine with itself
    # within float16 rounding (|error| <= 2^-11 per element) of 1
    assert r.block[0] == 3 and r.score[0] == pytest.approx(1.0, abs=1e-3 if read_mode == "least_squares" else 0.05)
    assert r.doc == ["a", "a"] and r.seq[0] == 3 and len(r.readout) == 6
    assert s.search("ns", b.latent[3, 1], top_k=2).readout is None  # Ask does not pay for the readout
    assert s.search("other", b.latent[0, 0], 2).episodes == 0


def test_delete_forgets_exactly_and_survives_restart(tmp_path):
    rng = np.random.default_rng(1)
    s = make(tmp_path)
    ba, bb = unit_batch(rng, [1]), unit_batch(rng, [2])
    write(s, "a", ba, [1])
    write(s, "b", bb, [2])  # same open episode as "a" (2 chunks per episode): now full, so closed
    assert len(s.memories) == 1 and next(iter(s.memories.values())).closed
    assert s.delete_document("ns", "a") == 1  # a forget in a closed episode: rebuilt from the store
    (ep,) = s.memories
    alone = write_one_shot(bb.latent.reshape(-1, 6), s.m0_pinv, s.cfg.episodic.ridge)
    np.testing.assert_allclose(s.memories[ep].memory, alone.memory, atol=1e-8)
    assert list(s.search("ns", ba.latent[0, 0], 5).doc) == ["b"]
    with pytest.raises(EngramError, match="already exists") as e:
        write(s, "b", bb, [2])
    assert e.value.code == ErrorCode.ALREADY_EXISTS
    restarted = make(tmp_path)
    assert restarted.documents() == [("ns", "b")]
    np.testing.assert_allclose(restarted.memories[ep].memory, s.memories[ep].memory, atol=1e-8)
    assert restarted.stats().chunks == 1 and restarted.stats().blocks == 1


def test_commit_refuses_unknown_blocks_and_changes_nothing(tmp_path):
    s = make(tmp_path)
    with pytest.raises(EngramError, match="not stored") as e:
        s.commit_document("ns", "x", 4, [h(99)], [0], [0])
    assert e.value.code == ErrorCode.STALE
    assert s.documents() == [] and not any(s.store.tables.counts.values())


def test_hopfield_shard_forgets_and_rebuilds(tmp_path):
    rng = np.random.default_rng(2)
    s = make(tmp_path, "hopfield")
    ba, bb = unit_batch(rng, [1]), unit_batch(rng, [2])
    write(s, "a", ba, [1])
    write(s, "b", bb, [2])
    (ep,) = s.memories
    assert s.memories[ep].count == 4
    assert s.delete_document("ns", "a") == 1
    np.testing.assert_array_equal(s.memories[ep].items, bb.latent.reshape(-1, 6))
    assert list(s.search("ns", ba.latent[0, 0], 5).doc) == ["b"]
    restarted = make(tmp_path, "hopfield")
    np.testing.assert_array_equal(restarted.memories[ep].items, s.memories[ep].items)


def test_chunks_move_between_shards_exactly_once(tmp_path):
    """Rebalancing's shard side: copy blocks and chunk rows to the new owner, then drop them here; idempotent,
    durable, and both episodic memories stay exact."""
    rng = np.random.default_rng(3)
    src, dst = make(tmp_path), Shard(1, make(tmp_path).cfg, LAYOUT)
    b = unit_batch(rng, range(5))
    write(src, "a", b, list(range(5)))
    moving = [1, 3, 4]
    (table,) = src.chunk_table()  # what a rebalance scans
    assert (table.namespace, table.name, table.hashes) == ("ns", "a", [h(i) for i in range(5)])
    dst.put_blocks(src.export_blocks([h(i) for i in moving]))
    moved = src.doc_chunks("ns", "a").pick(moving)  # rows 1, 3, 4 hold chunks 1, 3, 4
    assert moved.seq == moving
    assert dst.import_chunks("ns", "a", moved) == 3
    assert dst.import_chunks("ns", "a", moved) == 0  # a retried move adds nothing
    assert src.drop_chunks("ns", "a", moving) == 3 and src.drop_chunks("ns", "a", moving) == 0
    for shard, seqs in ((src, [0, 2]), (dst, moving)):
        assert sorted(c.seq for c in shard.chunks_at("ns", "a", list(range(5)))) == seqs
        for q in seqs:  # each chunk is found on its shard, scored through that shard's memory
            r = shard.search("ns", b.latent[q, 0], top_k=1)
            assert r.seq[0] == q and r.score[0] == pytest.approx(1.0, abs=1e-3)  # float16 vectors
        assert sum(m.count for m in shard.memories.values()) == 2 * len(seqs)  # R = 2 windows per chunk
    assert src.stats().tokens == 8 and dst.stats().tokens == 12
    # durable: both reopen with the same rows
    src2, dst2 = make(tmp_path), Shard(1, src.cfg, LAYOUT)
    assert sorted(c.seq for c in src2.chunks_at("ns", "a", list(range(5)))) == [0, 2]
    assert sorted(c.seq for c in dst2.chunks_at("ns", "a", list(range(5)))) == moving
    # moving the rest empties the document here
    dst2.put_blocks(src2.export_blocks([h(0), h(2)]))
    assert dst2.import_chunks("ns", "a", src2.doc_chunks("ns", "a")) == 2
    assert src2.drop_chunks("ns", "a", [0, 2]) == 2
    assert src2.documents() == [] and make(tmp_path).documents() == [] and src2.memories == {}
    assert dst2.stats().chunks == 5 and dst2.document_request("ns", "a") == ""
    with pytest.raises(EngramError, match="another request"):
        dst2.import_chunks("ns", "a", DocChunks("other-request", [h(0)], [0], [0], [4]))


def test_compaction_removes_deleted_blocks_and_keeps_the_rest(tmp_path):
    """After delete + compaction the deleted chunks' token ids are nowhere in the store, bytes are back near the
    pre-write figure, and what stays answers exactly as before, also after a restart."""
    rng = np.random.default_rng(6)
    s = make(tmp_path)
    keep = unit_batch(rng, range(6))
    write(s, "keep", keep, list(range(6)))
    searched = s.search("ns", keep.latent[2, 0], top_k=3)
    s.compact()  # the baseline: a compacted store holding "keep"
    baseline = s.stats().stored_bytes
    secret = unit_batch(rng, range(100, 140))
    secret.tokens[:] = 777_000 + np.arange(40 * 4).reshape(40, 4)  # distinctive token ids
    write(s, "secret", secret, list(range(100, 140)))
    assert s.stats().stored_bytes > 1.5 * baseline
    s.delete_document("ns", "secret")
    assert all(files_hold(s.store.path, row) for row in secret.tokens)  # a delete alone leaves them on disk
    done = s.compact()
    assert (done.blocks_before, done.blocks_after) == (46, 6)
    assert not any(files_hold(s.store.path, row) for row in secret.tokens)
    assert [p.name for p in s.store.path.glob("data*.zarr")] == [s.store.tables.data]
    assert s.stats().stored_bytes <= 1.1 * baseline
    again = s.search("ns", keep.latent[2, 0], top_k=3)
    np.testing.assert_allclose(again.score, searched.score, atol=1e-9)
    assert list(again.seq) == list(searched.seq) and again.doc == ["keep"] * 3
    for shard in (s, make(tmp_path)):  # reopened from the compacted generation
        assert shard.documents() == [("ns", "keep")] and shard.stats().chunks == 6
        assert sorted(c.seq for c in shard.chunks_at("ns", "keep", list(range(6)))) == list(range(6))
        np.testing.assert_array_equal(
            shard.fetch([c.block for c in shard.chunks_at("ns", "keep", [3])])[1][0]["keys"], keep.kv["keys"][3]
        )
    write(s, "after", unit_batch(rng, [200]), [200])  # the compacted store takes writes as before
    assert make(tmp_path).documents() == [("ns", "keep"), ("ns", "after")]


def test_an_interrupted_compaction_leaves_the_store_as_committed(tmp_path):
    """A crash while the new generation is half written: the next open serves the old one and removes the rest."""
    rng = np.random.default_rng(7)
    s = make(tmp_path)
    write(s, "a", unit_batch(rng, range(3)), list(range(3)))
    half = s.store._open_tables(generation="data-interrupted.zarr")  # building, never committed
    half.append(
        "docs",
        {
            "namespace": np.array(["ns"], dtype=object),
            "name": np.array(["x"], dtype=object),
            "tokens": np.array([1]),
            "request": np.array([""], dtype=object),
        },
    )
    reopened = make(tmp_path)
    assert reopened.documents() == [("ns", "a")]
    assert [p.name for p in reopened.store.path.glob("data*.zarr")] == ["data.zarr"]


def test_namespace_usage_counts_live_chunks_and_tokens(tmp_path):
    """Per namespace: live chunks and their tokens (a quota's measure); a delete takes its document's share away."""
    rng = np.random.default_rng(9)
    s = make(tmp_path)
    write(s, "a", unit_batch(rng, range(3)), list(range(3)))
    write(s, "b", unit_batch(rng, range(10, 12)), [10, 11], ns="other")
    write(s, "c", unit_batch(rng, range(20, 24)), list(range(20, 24)))
    assert s.namespace_usage() == {"ns": (7, 28), "other": (2, 8)}
    assert (s.namespace_tokens("ns"), s.namespace_tokens("none")) == (28, 0)
    s.delete_document("ns", "c")
    assert s.namespace_usage() == {"ns": (3, 12), "other": (2, 8)} and make(tmp_path).namespace_tokens("ns") == 12
