"""The coordinator restarts (a new process, new Ray) without losing data, routing or namespaces."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
SCRIPT = Path(__file__).with_name("restart_scenario.py")


def phase(name: str, data_dir) -> dict:
    p = subprocess.run([sys.executable, str(SCRIPT), name, str(data_dir)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_coordinator_restart(tmp_path):
    first = phase("write", tmp_path)
    assert first["answer"].startswith("42424")
    assert phase("ask", tmp_path) == first
    err = phase("wrong-shards", tmp_path)["error"]
    assert "2 shards" in err and "3 shards" in err
