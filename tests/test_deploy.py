"""deploy/: manifests parse and carry what the design needs; the local multi-node recipe really serves."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def load_all(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def test_ray_cluster_launcher():
    cfg = load_all("ray-cluster.yaml")[0]
    for key in (
        "cluster_name",
        "provider",
        "available_node_types",
        "head_node_type",
        "setup_commands",
        "worker_start_ray_commands",
        "head_start_ray_commands",
    ):
        assert key in cfg, key
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert any(t["resources"].get("engram_shard", 0) > 0 for t in types.values())
    assert sum(t["resources"].get("GPU", 0) * t.get("max_workers", 0) for t in types.values()) >= 1
    assert any("torch==2.13.0" in c for c in cfg["setup_commands"])


def test_kuberay_manifests():
    docs = {d["kind"]: d for d in load_all("kuberay/raycluster.yaml") + load_all("kuberay/rayjob-serve.yaml")}
    rc = docs["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1" and rc["spec"]["rayVersion"] == ray.__version__
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    assert "engram_shard" in groups["shards"]["rayStartParams"]["resources"]
    gpu = groups["decoder"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for g in [rc["spec"]["headGroupSpec"], *groups.values()]
        for v in g["template"]["spec"].get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    assert claims == {docs["PersistentVolumeClaim"]["metadata"]["name"]}
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]  # shards move between pods
    assert "engram.toml" in docs["ConfigMap"]["data"]
    job = docs["RayJob"]
    assert job["spec"]["entrypoint"].startswith("engram serve")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]


@pytest.mark.integration
def test_local_multinode_recipe_serves(tmp_path):
    """deploy/local-cluster.sh up: a head and two shard nodes; `engram write` and `engram ask` against it."""
    env = {**os.environ, "RAY_PORT": "6397", "ENGRAM_BIN": str(Path(sys.executable).parent)}
    script, engram = str(DEPLOY / "local-cluster.sh"), str(Path(sys.executable).parent / "engram")
    up = subprocess.run([script, "up", str(tmp_path), "50597"], env=env, capture_output=True, text=True, timeout=400)
    try:
        assert up.returncode == 0, up.stdout + up.stderr + (tmp_path / "serve.log").read_text()[-3000:]
        doc = tmp_path / "memo.txt"
        doc.write_text("The harbour master keeps the spare anchor in shed number 17. " * 4)
        w = subprocess.run(
            [engram, "write", str(doc), "--server", "127.0.0.1:50597"], capture_output=True, text=True, timeout=300
        )
        assert w.returncode == 0, w.stderr
        a = subprocess.run(
            [engram, "ask", "Where is the spare anchor kept? It is kept in shed number", "--server", "127.0.0.1:50597"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert a.returncode == 0 and "17" in a.stdout, a.stdout + a.stderr
        s = subprocess.run(
            [engram, "stats", "--server", "127.0.0.1:50597"], capture_output=True, text=True, timeout=120
        )
        assert s.returncode == 0 and "total: 1 documents" in s.stdout, s.stdout + s.stderr
    finally:
        subprocess.run([script, "down", str(tmp_path)], env=env, capture_output=True, timeout=120)
