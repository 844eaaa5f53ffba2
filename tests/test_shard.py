"""The shard's logic on a real Zarr store, without Ray: commit, search, exact forgetting, restart."""

import numpy as np
import pytest
from engram.workers.episodic import EpisodicConfig, write_one_shot
from engram.workers.shard import Shard, ShardConfig, ShardError
from engram.workers.store import StoreLayout

from tests.test_store import batch, h

LAYOUT = StoreLayout(layers=2, kv_heads=3, keep_tokens=4, head_dim=8, chunk_tokens=4, latent_dim=6, latents_per_chunk=2)


def make(tmp_path, read_mode="least_squares"):
    episodic = EpisodicConfig(rows=4, dim=6, read_mode=read_mode, beta=64.0)
    return Shard(0, ShardConfig(data_dir=str(tmp_path), fsync=False, episodic=episodic), LAYOUT)


def unit_batch(rng, ids):
    b = batch(rng, [h(i) for i in ids])
    b["latent"] /= np.linalg.norm(b["latent"], axis=-1, keepdims=True)
    return b


def write(shard, name, b, ids, ns="ns"):
    shard.put_blocks(b)
    return shard.commit_document(ns, name, 4 * len(ids), [h(i) for i in ids], list(range(len(ids))),
                                 [4 * j for j in range(len(ids))])


@pytest.mark.parametrize("read_mode", ["least_squares", "hopfield"])
def test_search_finds_the_matching_window(tmp_path, read_mode):
    rng = np.random.default_rng(0)
    s = make(tmp_path, read_mode)
    b = unit_batch(rng, range(5))
    write(s, "a", b, list(range(5)))
    # 5 chunks x 2 windows, K = 4 items: 2 chunks per episode -> 3 episodes
    assert len(s.memories) == 3
    r = s.search("ns", b["latent"][3, 1], top_k=2)
    assert r["block"][0] == 3 and r["score"][0] == pytest.approx(1.0, abs=1e-6 if read_mode == "least_squares" else 0.05)
    assert r["doc"] == ["a", "a"] and r["seq"][0] == 3 and len(r["readout"]) == 6
    assert s.search("other", b["latent"][0, 0], 2)["episodes"] == 0


def test_delete_forgets_exactly_and_survives_restart(tmp_path):
    rng = np.random.default_rng(1)
    s = make(tmp_path)
    ba, bb = unit_batch(rng, [1]), unit_batch(rng, [2])
    write(s, "a", ba, [1])
    write(s, "b", bb, [2])  # same open episode as "a" (2 chunks per episode)
    assert len(s.memories) == 1
    assert s.delete_document("ns", "a") == 1
    (ep,) = s.memories
    alone = write_one_shot(bb["latent"].reshape(-1, 6), s.m0_pinv, s.cfg.episodic.ridge)
    np.testing.assert_allclose(s.memories[ep].memory, alone.memory, atol=1e-8)
    assert list(s.search("ns", ba["latent"][0, 0], 5)["doc"]) == ["b"]
    with pytest.raises(ShardError, match="already exists"):
        write(s, "b", bb, [2])
    restarted = make(tmp_path)
    assert restarted.documents() == [("ns", "b")]
    np.testing.assert_allclose(restarted.memories[ep].memory, s.memories[ep].memory, atol=1e-8)
    assert restarted.stats()["chunks"] == 1 and restarted.stats()["blocks"] == 1


def test_commit_refuses_unknown_blocks_and_changes_nothing(tmp_path):
    s = make(tmp_path)
    with pytest.raises(ShardError, match="not stored"):
        s.commit_document("ns", "x", 4, [h(99)], [0], [0])
    assert s.documents() == [] and s.store.counts == {"blocks": 0, "chunks": 0, "docs": 0}


def test_hopfield_shard_forgets_and_rebuilds(tmp_path):
    rng = np.random.default_rng(2)
    s = make(tmp_path, "hopfield")
    ba, bb = unit_batch(rng, [1]), unit_batch(rng, [2])
    write(s, "a", ba, [1])
    write(s, "b", bb, [2])
    (ep,) = s.memories
    assert s.memories[ep].count == 4
    assert s.delete_document("ns", "a") == 1
    np.testing.assert_array_equal(s.memories[ep].items, bb["latent"].reshape(-1, 6))
    assert list(s.search("ns", ba["latent"][0, 0], 5)["doc"]) == ["b"]
    restarted = make(tmp_path, "hopfield")
    np.testing.assert_array_equal(restarted.memories[ep].items, s.memories[ep].items)
