"""The loopback load script, short: several clients mixing writes and asks; no errors."""

import pytest

from engram.evals.loadgen import run_load

pytestmark = pytest.mark.integration


def test_short_load(service):
    rep = run_load(service.address, clients=6, seconds=8, namespace="load-test")
    s = rep.summary()
    assert rep.errors == [], rep.errors[:3]
    assert s["ask"]["count"] > 0 and s["write"]["count"] > 0
    assert s["ask"]["p99_s"] >= s["ask"]["p50_s"] > 0
