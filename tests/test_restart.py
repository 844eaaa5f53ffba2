"""The coordinator restarts (a new process, new Ray) without losing data, routing or namespaces."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
SCRIPT = Path(__file__).with_name("restart_scenario.py")


def phase(name: str, data_dir, line: int = -1) -> dict:
    p = subprocess.run(
        [sys.executable, str(SCRIPT), name, str(data_dir)], capture_output=True, text=True, timeout=600, check=False
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[line])


def test_coordinator_restart(tmp_path):
    first = phase("write", tmp_path)
    assert first["answer"].startswith("42424")
    assert phase("ask", tmp_path) == first
    err = phase("wrong-shards", tmp_path)["error"]
    assert "2 shards" in err and "3 shards" in err
    # a coordinator that died after persisting a grown routing (3 shards, rebalancing) and before moving
    # anything: the next start keeps 3 shards, finishes the rebalance, and answers the same
    path = Path(tmp_path) / "cluster.json"
    table = json.loads(path.read_text())
    path.write_text(json.dumps({**table, "shards": [0, 1, 2], "rebalancing": True}))
    resumed = phase("resume", tmp_path, -2)
    assert resumed["shards"] == 3 and resumed["misplaced"] == 0 and resumed["moved"] > 0, resumed
    assert all(resumed["per_shard_chunks"]), resumed
    after = phase("resume", tmp_path)
    assert after["answer"] == first["answer"] and after["counts"][:4] == first["counts"][:4]
    assert json.loads(path.read_text())["rebalancing"] is False
    # a start repairs what a crash left mid-write; health goes NOT_SERVING when no shard answers
    assert phase("health", tmp_path) == {"intents_left": 0, "before": "SERVING", "after": "NOT_SERVING"}


def test_codec_blocks_through_the_service(tmp_path):
    """Blocks stored by the transform codec answer through the service, and a start with other K/V settings on
    that data_dir is refused, naming both."""
    first = phase("codec-write", tmp_path)
    assert first["answer"].startswith("42424"), first
    int4_bytes_per_token = 6_300  # K/V codes and scales of an int4 block, per token (BENCHMARKS.md)
    *_, blocks, _, stored = first["counts"]
    assert stored / (blocks * 128) < int4_bytes_per_token, first  # every table on disk, per stored block token
    err = phase("refused", tmp_path)["error"]
    assert "codec:" in err and "int4" in err and "new data_dir" in err, err
