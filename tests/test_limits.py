"""Bounded cost per request and no side doors (issue #14, findings 6 and 7): a bounded decode queue, a cancelled ask
never decoded, a document held once, commits that sync one filesystem, /metrics on loopback, no unauthenticated
service beyond loopback, Ray's own token authentication, no timing tells of another namespace's text, deployment
manifests secure by default."""

import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import ray

from engram.coordinator.auth import check_exposure, is_loopback
from engram.coordinator.client import EngramClient
from engram.coordinator.config import EngramConfig
from engram.evals.haystack import passkey_context
from engram.proto import engram_pb2 as pb
from tests.test_integrity import stored_tokens

ROOT = Path(__file__).resolve().parents[1]


# --- pure logic ---------------------------------------------------------------------------------------------------
def test_serving_beyond_loopback_needs_tokens():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("engram.example.com")
    check_exposure("127.0.0.1", None, tls=False, allow_unauthenticated=False)  # loopback: fine without tokens
    with pytest.raises(ValueError, match=r"auth\.tokens_file is not set"):
        check_exposure("0.0.0.0", None, tls=False, allow_unauthenticated=False)
    check_exposure("0.0.0.0", "/etc/engram/tokens.toml", tls=True, allow_unauthenticated=False)
    check_exposure("0.0.0.0", None, tls=False, allow_unauthenticated=True)  # the operator says the network is trusted


def test_metrics_default_to_loopback():
    assert EngramConfig().server.metrics_host == "127.0.0.1"


def test_a_commit_syncs_its_own_filesystem_not_the_machine(tmp_path, monkeypatch):
    """os.sync() waits on every disk of the machine at every commit; a commit must sync only the store's own
    filesystem (syncfs), and still make its rows durable."""
    import numpy as np

    from engram.workers import tables

    def machine_wide() -> None:
        raise AssertionError("os.sync() called at a commit")

    monkeypatch.setattr(os, "sync", machine_wide)

    def open_tables() -> tables.Tables:
        return tables.Tables(tmp_path / "store", {"rows/x": ((4,), "float32")}, (), (), (), {})

    t = open_tables()
    t.append("rows", {"x": np.ones((3, 4), np.float32)})
    t.commit({})
    assert open_tables().counts["rows"] == 3


def test_health_survives_one_late_probe_and_fails_after_three():
    """Shards busy with a large commit can miss one probe: health must not flap to NOT_SERVING for it (load
    balancers would drop the service), but three silent probes in a row mean no shard answers."""
    from types import SimpleNamespace

    from engram.coordinator.health import watch_health

    answers = iter([2, 0, 2, 0, 0, 2, 0, 0, 0, 0])
    seen: list[str] = []

    async def ping(timeout: float) -> int:
        try:
            return next(answers)
        except StopIteration:
            raise asyncio.CancelledError from None

    class Servicer:
        async def set(self, service: str, status) -> None:
            seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(status))

    from grpc_health.v1 import health_pb2

    engine = SimpleNamespace(cluster=SimpleNamespace(ping=ping), shards=[0, 1])
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(watch_health(engine, Servicer(), 0.0))
    assert seen == ["NOT_SERVING"]  # only after the third silent probe in a row (the 8th probe)


def test_manifests_are_secure_by_default():
    """KubeRay: Ray token auth on, engram behind bearer tokens and TLS, the Ray dashboard and /metrics not open to
    every pod; the cluster launcher and local recipe run Ray with token auth."""
    import yaml

    kuberay = ROOT / "deploy/kuberay"
    docs = [d for f in ("raycluster.yaml", "rayjob-serve.yaml") for d in yaml.safe_load_all((kuberay / f).read_text())]
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    assert cluster["spec"]["authOptions"]["mode"] == "token"
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"].get("dashboard-host", "127.0.0.1") == "127.0.0.1"
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["engram.toml"]
    import tomllib

    toml = tomllib.loads(config)
    assert toml["auth"]["tokens_file"] and toml["server"]["tls_cert_file"] and toml["server"]["tls_key_file"]
    assert not toml["server"].get("allow_unauthenticated", False)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert policies, "no NetworkPolicy: GCS, dashboard and /metrics would be open to every pod"
    assert "RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}" in (ROOT / "deploy/local-cluster.sh").read_text()
    launcher = (ROOT / "deploy/ray-cluster.yaml").read_text()
    assert launcher.count("RAY_AUTH_MODE=token ray start") == 2 and "~/.ray/auth_token" in launcher


# --- through the running service ----------------------------------------------------------------------------------
def on_loop(service, coro):
    return asyncio.run_coroutine_threadsafe(coro, service.loop)


@pytest.fixture(scope="module")
def client(service):
    c = EngramClient(service.address, timeout=600)
    yield c
    c.close()


@pytest.fixture(scope="module")
def passkey_ns(service, client, tokenizer):
    """A passkey context: the decoder answers it by repeating the key, so max_new_tokens decides how long an
    answer keeps the decoder busy (no early end of text)."""
    client.write([("pk", passkey_context(1500, 0.5, 51873, tokenizer))], namespace="lim-pk")
    return "lim-pk"


QUESTION = "What is the pass key? The pass key is"


def wait_for(cond, what: str, deadline_s: float = 120) -> None:
    end = time.time() + deadline_s
    while not cond():
        assert time.time() < end, what
        time.sleep(0.01)


@pytest.mark.integration
def test_asks_past_the_decode_queue_are_refused(service, client, passkey_ns):
    """ask.max_queued_asks: past it, an Ask gets RESOURCE_EXHAUSTED at once instead of waiting without bound."""
    reader = service.engine.reader
    saved = service.engine.cfg.ask.max_queued_asks
    service.engine.cfg.ask.max_queued_asks = 1
    try:
        busy = on_loop(service, service.engine.ask(passkey_ns, QUESTION, 4, 160))
        wait_for(lambda: reader.queued == 1, "the first ask never started")
        t0 = time.perf_counter()
        with pytest.raises(grpc.RpcError) as e:
            client.ask(QUESTION, namespace=passkey_ns, max_new_tokens=8)
        refused_in = time.perf_counter() - t0
        assert not busy.done(), "the first ask ended before the second came: the test did not fill the queue"
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "ask.max_queued_asks" in e.value.details()
        assert refused_in < 2.0  # refused at once, not after the first ask
        busy.result(timeout=300)
    finally:
        service.engine.cfg.ask.max_queued_asks = saved
    assert reader.queued == 0
    assert client.ask(QUESTION, namespace=passkey_ns, max_new_tokens=4).answer  # served again


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["memory", "rag"])
def test_a_cancelled_ask_is_never_decoded(service, passkey_ns, mode):
    """An ask whose client gave up while it waited behind another is dropped from the decoder's queue: the decoder
    answers only the ask that is still wanted."""
    engine, decoder = service.engine, service.engine.cluster.decoder
    before = ray.get(decoder.answers.remote())
    first = on_loop(service, engine.ask(passkey_ns, QUESTION, 4, 160, mode))
    wait_for(lambda: engine.reader.queued == 1, "the first ask never started")
    time.sleep(0.5)  # retrieval done: the first ask is in the decoder
    second = on_loop(service, engine.ask(passkey_ns, QUESTION, 4, 160, mode))
    wait_for(lambda: engine.reader.queued == 2, "the second ask never started")
    time.sleep(0.5)  # the second is queued behind the first at the decoder
    assert not first.done(), "the first ask ended too soon: the second never waited behind it"
    assert second.cancel()
    answer = first.result(timeout=300)
    assert answer.answer
    after = ray.get(decoder.answers.remote())  # runs after anything still queued at the decoder
    assert after - before == 1, f"{after - before} answers decoded for 1 ask still wanted"
    wait_for(lambda: engine.reader.queued == 0, "a cancelled ask still counts as queued")


@pytest.mark.integration
def test_a_document_split_inside_a_character_is_stored_whole(service, client):
    """Parts are decoded as they arrive: a UTF-8 character split across two parts is carried over; invalid UTF-8 is
    INVALID_ARGUMENT and stores nothing."""
    text = "Le café « Zoë » ouvre à 7 h ; le thé coûte 3 €. " * 20
    data = text.encode()
    cut = data.index("é".encode()) + 1  # inside the two bytes of "é"
    parts = [data[:cut], data[cut : cut + 301], data[cut + 301 :]]
    reqs = [pb.WriteRequest(namespace="lim-utf8", document_id="cafe", text=p, request_id="r1") for p in parts]
    assert client.stub.Write(iter(reqs)).documents == 1
    assert stored_tokens(service.engine, "lim-utf8", "cafe") == service.engine.tokenize(text)
    bad = [pb.WriteRequest(namespace="lim-utf8", document_id="bad", text=data[:cut] + b"\xff" + data[cut:])]
    with pytest.raises(grpc.RpcError) as e:
        client.stub.Write(iter(bad))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not valid UTF-8" in e.value.details()
    assert all(("lim-utf8", "bad") not in ray.get(s.documents.remote()) for s in service.engine.shards)


@pytest.mark.integration
def test_metrics_listen_on_loopback(service):
    server = service.server.engram_metrics._server
    assert server is not None and server.server_address[0] == "127.0.0.1"


@pytest.mark.integration
def test_ray_refuses_callers_without_its_token(service):
    """Ray's token authentication is on: a process without the cluster's token (or with auth off) cannot join it,
    so it cannot call the shard actors behind the service's back."""
    address = ray.get_runtime_context().gcs_address
    code = "import ray, sys; ray.init(address=sys.argv[1]); print('JOINED')"
    wrong_token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token-0123456789abcdef"}
    for env in (wrong_token, {"RAY_AUTH_MODE": "disabled"}):
        r = subprocess.run(
            [sys.executable, "-c", code, address],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode != 0 and "JOINED" not in r.stdout, (env, r.stdout[-500:])
    assert os.environ["RAY_AUTH_MODE"] == "token"


@pytest.mark.integration
def test_write_time_does_not_tell_whether_another_namespace_holds_the_text(client):
    """The timing side of finding 3: writing text another namespace holds takes as long as writing text nobody
    holds (each namespace encodes its own blocks). With cluster-wide sharing the right guess skips encoding and
    returns several times faster."""
    secret = " ".join(f"Ledger line {i}: account 7731-{i:04d} moved {i * 13} credits to escrow." for i in range(60))
    client.write([("ledger", secret)], namespace="lim-owner")
    right, wrong = [], []
    for i in range(3):  # alternate, each guess in a fresh namespace (within one namespace blocks are shared)
        for times, guess in ((right, secret), (wrong, secret.replace("escrow", f"reserve {i}"))):  # new each time
            t0 = time.perf_counter()
            client.write([("guess", guess)], namespace=f"lim-guess-{len(right) + len(wrong)}")
            times.append(time.perf_counter() - t0)
    ratio = statistics.median(right) / statistics.median(wrong)
    print(f"write s: right guesses {right}, wrong guesses {wrong}")
    assert 0.6 < ratio < 1.67, (right, wrong)


def test_a_busy_http_port_is_a_clear_start_error():
    """`engram serve` with server.http_port already taken says which setting to change (not a bare OSError)."""
    import asyncio
    import socket

    from engram.coordinator.auth import Auth
    from engram.coordinator.config import EngramConfig
    from engram.coordinator.metrics import Metrics
    from engram.coordinator.openai_api import start_http

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=r"server\.http_port"):
            asyncio.run(start_http(None, EngramConfig(), Auth(None), Metrics(), port))


@pytest.mark.integration
def test_a_write_past_the_namespace_quota_is_refused_and_stores_nothing(service, client, tokenizer):
    """cluster.namespace_max_tokens: a document that would take its namespace past the quota is RESOURCE_EXHAUSTED
    with a message naming the setting and the figures; nothing of it is stored; other namespaces are not held to
    this one's usage; after a delete the same document fits."""
    first = "The lighthouse keeper logs the fog horn's hours in a green ledger. " * 20
    second = "The ferry to the outer island leaves at dawn and returns at dusk. " * 20
    n1, n2 = len(tokenizer(first, add_special_tokens=False).input_ids), len(tokenizer(second).input_ids)
    saved = service.engine.cfg.cluster.namespace_max_tokens
    service.engine.cfg.cluster.namespace_max_tokens = n1 + n2 // 2
    try:
        client.write([("first", first)], namespace="lim-quota")
        with pytest.raises(grpc.RpcError) as e:
            client.write([("second", second)], namespace="lim-quota")
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "cluster.namespace_max_tokens" in e.value.details() and f"holds {n1} tokens" in e.value.details()
        assert [d.document_id for d in client.documents("lim-quota")] == ["first"]
        client.write([("second", second)], namespace="lim-quota-other")  # its own, empty namespace
        client.delete("first", namespace="lim-quota")
        client.write([("second", second)], namespace="lim-quota")
        assert [d.document_id for d in client.documents("lim-quota")] == ["second"]
    finally:
        service.engine.cfg.cluster.namespace_max_tokens = saved
