"""`engram bench niah` on a tiny grid, the way a user runs it: a fresh local service, the JSON and the heat map."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_bench_niah_writes_json_and_heatmap(tmp_path):
    out = tmp_path / "niah"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "engram.coordinator.cli",
            "bench",
            "niah",
            "--lengths",
            "2k",
            "--depths",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((tmp_path / "niah.json").read_text())
    assert result["machine"]["cpus"] and result["settings"]["lengths"] == [2000]
    assert len(result["cases"]) == 2
    for case in result["cases"]:
        r = case["results"]
        assert {"engram", "rag", "full", "oracle", "recall_at_k"} <= set(r), r.keys()
        assert r["engram"]["ttft_s"] > 0 and r["rag"]["ttft_s"] > 0 and r["tokens"] >= case["length"]
    row = result["summary"]["niah"]["2000"]
    assert row["recall_at_k"] == 1.0 and row["oracle"]["accuracy"] == 1.0  # the needle is found and answerable
    assert row["engram"]["accuracy"] >= 0.5, row
    st = result["storage"]  # default int4 blocks: well under half the decoder's full fp16 KV per token
    assert 0 < st["bytes_per_distinct_token"] < st["full_fp16_kv_bytes_per_token"] / 2, st
    png = (tmp_path / "niah.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "tokens/s" in p.stdout and "wrote" in p.stdout
