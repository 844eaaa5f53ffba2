"""Zarr round-trips and the commit protocol of a shard's store."""

import numpy as np
import pytest
from engram.workers.store import ShardStore, StoreError, StoreLayout

LAYOUT = StoreLayout(layers=2, kv_heads=3, keep_tokens=4, head_dim=8, chunk_tokens=4, latent_dim=6,
                     latents_per_chunk=2)


def batch(rng, hashes):
    n = len(hashes)
    kv = (n, LAYOUT.layers, LAYOUT.kv_heads, LAYOUT.keep_tokens, LAYOUT.head_dim)
    return {"keys": rng.standard_normal(kv).astype(np.float16), "values": rng.standard_normal(kv).astype(np.float16),
            "positions": rng.integers(-1, 5, kv[:4]).astype(np.int16),
            "tokens": rng.integers(0, 100, (n, LAYOUT.chunk_tokens)).astype(np.int32),
            "length": np.full(n, LAYOUT.chunk_tokens, np.int32),
            "hash": np.frombuffer(b"".join(hashes), np.uint8).reshape(n, 16),
            "latent": rng.standard_normal((n, 2, LAYOUT.latent_dim)).astype(np.float32)}


def h(i):
    return i.to_bytes(16, "little")


def test_round_trip_and_reopen(tmp_path):
    rng = np.random.default_rng(0)
    s = ShardStore(tmp_path, LAYOUT)
    b = batch(rng, [h(1), h(2), h(3)])
    idx = s.put_blocks(b)
    s.add_document("ns", "doc", 12, {"block": idx, "seq": np.arange(3), "offset": np.arange(3) * 4,
                                    "episode": np.zeros(3, np.int64)})
    s.commit()
    s2 = ShardStore(tmp_path, LAYOUT)
    got = s2.get_blocks([2, 0])
    assert set(got) == {"keys", "values", "positions"}
    for name, col in got.items():
        np.testing.assert_array_equal(col, b[name][[2, 0]])
    np.testing.assert_array_equal(s2.ram["blocks/latent"], b["latent"])
    assert list(s2.ram["docs/name"]) == ["doc"] and s2.contains([h(2), h(9)]) == [True, False]


def test_uncommitted_writes_vanish_on_reopen(tmp_path):
    """A crash between staging and commit leaves the store exactly as it was committed."""
    rng = np.random.default_rng(1)
    s = ShardStore(tmp_path, LAYOUT)
    s.put_blocks(batch(rng, [h(1)]))
    s.commit()
    s.put_blocks(batch(rng, [h(2), h(3)]))  # staged, never committed: the process "dies" here
    s.add_document("ns", "late", 8, {"block": np.array([1, 2]), "seq": np.arange(2), "offset": np.arange(2),
                                     "episode": np.zeros(2, np.int64)})
    s2 = ShardStore(tmp_path, LAYOUT)
    assert s2.counts == {"blocks": 1, "chunks": 0, "docs": 0, "drops": 0}
    assert s2.contains([h(1), h(2)]) == [True, False]
    assert s2.arrays["blocks/keys"].shape[0] == 1


def test_duplicate_blocks_are_stored_once(tmp_path):
    rng = np.random.default_rng(2)
    s = ShardStore(tmp_path, LAYOUT)
    first = s.put_blocks(batch(rng, [h(5), h(5), h(6)]))
    again = s.put_blocks(batch(rng, [h(6)]))
    assert list(first) == [0, 0, 1] and list(again) == [1]
    s.commit()
    assert s.counts["blocks"] == 2


def test_rollback_and_layout_mismatch(tmp_path):
    rng = np.random.default_rng(3)
    s = ShardStore(tmp_path, LAYOUT)
    s.put_blocks(batch(rng, [h(1)]))
    s.rollback()
    assert s.contains([h(1)]) == [False]
    s.commit()
    other = StoreLayout(**{**LAYOUT.__dict__, "keep_tokens": 2})
    with pytest.raises(StoreError, match=r"keep_tokens = 4 \(configured: 2\)"):
        ShardStore(tmp_path, other)
    with pytest.raises(StoreError, match=r"kv_dtype = 'float16' \(configured: 'int4'\)"):
        ShardStore(tmp_path, StoreLayout(**{**LAYOUT.__dict__, "kv_dtype": "int4"}))
