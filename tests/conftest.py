import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "token")

import pytest


@pytest.fixture(scope="session")
def service(tmp_path_factory):
    """One real Ray (2 CPUs), 2 shard actors, 2 encoders, the decoder worker and a gRPC server on 127.0.0.1."""
    import ray

    from engram.coordinator.background import BackgroundServer
    from engram.coordinator.config import EngramConfig

    cfg = EngramConfig()
    cfg.cluster.num_cpus = 2
    cfg.cluster.shards = 2
    cfg.shard.data_dir = str(tmp_path_factory.mktemp("engram-data"))
    cfg.server.metrics_port = 0  # any free port: tests/test_integration.py scrapes it
    cfg.server.http_port = 0  # any free port (BackgroundServer's default too)
    # A `ray start` killed without `ray stop` leaves its address here; a local service must start its own Ray
    # regardless (it once tried to join the dead one and failed: "When connecting to an existing cluster...").
    from pathlib import Path

    stale = Path("/tmp/ray/ray_current_cluster")
    planted = not stale.exists()
    if planted:
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.write_text("192.0.2.1:6379\n")  # TEST-NET: nothing answers there
    try:
        srv = BackgroundServer(cfg).start()
    finally:
        if planted:
            stale.unlink(missing_ok=True)
    yield srv
    srv.stop()
    ray.shutdown()


@pytest.fixture(scope="session")
def tokenizer():
    from engram.decoder.model import DecoderConfig, load_tokenizer

    return load_tokenizer(DecoderConfig())


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 / localhost: (cert.pem, key.pem) paths."""
    import subprocess

    d = tmp_path_factory.mktemp("tls")
    args = f"openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost -keyout {d / 'key.pem'}"
    args += f" -out {d / 'cert.pem'}"

    subprocess.run(
        [*args.split(), "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True,
        capture_output=True,
    )
    return d / "cert.pem", d / "key.pem"
