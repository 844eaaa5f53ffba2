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
    stages = s["ask_stages_p50_s"]  # the server's own timings of each ask: parts of the whole, none missing
    assert len(rep.stages["total_s"]) == s["ask"]["count"]
    assert 0 < stages["ttft_s"] <= stages["total_s"] <= s["ask"]["p99_s"]
    assert min(stages["embed_s"], stages["retrieve_s"], stages["fetch_s"]) > 0
    tails = s["ask_stages_p99_s"]
    assert all(tails[k] >= stages[k] for k in stages) and tails["total_s"] <= s["ask"]["p99_s"] + 1.0
