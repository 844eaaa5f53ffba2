"""Removing a node of a multi-node local cluster loses no acknowledged chunk (own Ray, so a subprocess)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_remove_node_loses_nothing():
    script = Path(__file__).with_name("node_loss_scenario.py")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("LOST")), None)
    assert p.returncode == 0 and line is not None, (p.stdout[-3000:], p.stderr[-3000:])
    print(line)
    assert line.startswith("LOST 0 ") and "SAME_COUNTS True SAME_ANSWER True" in line, line
