"""Compaction through the service (issue #14): after delete + Compact the deleted text's token ids are nowhere in
the store files and stored bytes are back within 10% of the pre-write figure; everything else reads the same."""

from pathlib import Path

import pytest

from engram.coordinator.client import EngramClient
from tests.test_store import files_hold

pytestmark = pytest.mark.integration


def on_disk(service, run: list[int]) -> bool:
    """Whether any file of any shard (every generation) holds these token ids as stored."""
    return files_hold(Path(service.engine.cluster.cfg.shard.data_dir), run)


def test_compaction_reclaims_deleted_text(service):
    engine = service.engine
    with EngramClient(service.address, timeout=600) as c:
        keeper = " ".join(f"Keeper note {i}: the lighthouse lamp {i} burns {i * 3} hours." for i in range(40))
        c.write([("keeper", keeper)], namespace="int-compact")
        read_before = [(ch.chunk_id, ch.text) for ch in c.read("lighthouse lamp 7", namespace="int-compact").chunks]
        c.compact()  # the baseline: nothing deleted left on disk
        before = c.stats().stored_bytes
        secret = " ".join(f"Zanzibar ledger {i}: account {i * 7919} owes {i * 31} quartz." for i in range(150))
        c.write([("secret", secret)], namespace="int-compact")
        run = engine.tokenize(secret)[130:138]  # 8 tokens inside the second chunk
        assert c.stats().stored_bytes > before and on_disk(service, run)
        c.delete("secret", namespace="int-compact")
        assert on_disk(service, run)  # a delete alone leaves the blocks on disk
        done = c.compact()
        assert sum(sh.blocks_before - sh.blocks_after for sh in done.shards) >= len(engine.tokenize(secret)) // 128
        assert not on_disk(service, run)
        assert c.stats().stored_bytes <= 1.1 * before
        read_after = [(ch.chunk_id, ch.text) for ch in c.read("lighthouse lamp 7", namespace="int-compact").chunks]
        assert read_after == read_before
