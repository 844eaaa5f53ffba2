"""Grow 1 -> 4 shards mid-ingest on a multi-node local cluster (own Ray, so a subprocess)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_grow_while_writing():
    script = Path(__file__).with_name("grow_scenario.py")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900, check=False)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert lines, (p.stdout[-3000:], p.stderr[-3000:])
    out = json.loads(lines[-1])
    print(out)
    assert out["errors"] == [] and out["missing"] == 0 and out["duplicated"] == 0 and out["misplaced"] == 0, out
    assert out["chunks"] == out["acked_chunks"] and all(out["per_shard_chunks"]) and out["moved"] > 0, out
    assert out["same_answer"] and out["mid_same"] and out["read_top_doc"] == "note-7", out
    assert out["concurrent_adds"] == ["FAILED_PRECONDITION", "OK"] and len(out["shards"]) == 4, out
    assert p.returncode == 0, p.stderr[-3000:]
