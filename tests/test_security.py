"""Per-namespace bearer tokens and TLS, on a second gRPC server over the session's engine."""

import asyncio
import copy

import grpc
import pytest

from engram.coordinator.client import EngramClient
from engram.coordinator.server import start_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def secure(service, tls_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    (d / "tokens.toml").write_text('[tokens]\n"alice-token" = ["alice"]\n"admin-token" = ["*"]\n')
    cfg = copy.deepcopy(service.cfg)
    cfg.auth.tokens_file = str(d / "tokens.toml")
    cfg.server.tls_cert_file, cfg.server.tls_key_file = map(str, tls_files)
    server, port = asyncio.run_coroutine_threadsafe(start_server(service.engine, cfg, 0, -1), service.loop).result(60)
    yield f"127.0.0.1:{port}", tls_files[0].read_bytes()
    asyncio.run_coroutine_threadsafe(server.stop(grace=1), service.loop).result(30)


def code_of(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def test_tokens_guard_namespaces(secure):
    address, ca = secure
    anon = EngramClient(address, root_certificates=ca, timeout=120)
    alice = EngramClient(address, root_certificates=ca, token="alice-token", timeout=120)
    wrong = EngramClient(address, root_certificates=ca, token="nobody", timeout=120)
    admin = EngramClient(address, root_certificates=ca, token="admin-token", timeout=120)
    for c in (anon, wrong):
        assert code_of(lambda c=c: c.ask("q?", namespace="alice")) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda c=c: c.write([("d", "text")], namespace="alice")) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda c=c: c.stats()) == grpc.StatusCode.UNAUTHENTICATED
    assert (
        alice.write([("memo", "Alice keeps the spare key under the blue flowerpot.")], namespace="alice").documents == 1
    )
    assert any("flowerpot" in ch.text for ch in alice.read("where is the spare key", namespace="alice").chunks)
    assert code_of(lambda: alice.read("q", namespace="it")) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: alice.write([("x", "y")], namespace="bob")) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: alice.delete("memo", namespace="bob")) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: alice.stats()) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: alice.add_shards(1)) == grpc.StatusCode.PERMISSION_DENIED  # growing needs "*"
    assert code_of(lambda: anon.add_shards(1)) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: admin.add_shards(0)) == grpc.StatusCode.INVALID_ARGUMENT  # and changes nothing
    assert len(admin.stats().shards) == 2
    assert admin.stats().documents >= 1
    assert alice.delete("memo", namespace="alice").chunks == 1


def test_tls_only(secure):
    address, _ = secure
    plain = EngramClient(address, timeout=10)
    assert code_of(lambda: plain.stats()) == grpc.StatusCode.UNAVAILABLE


def test_no_secrets_or_text_in_logs(secure, caplog):
    address, ca = secure
    with caplog.at_level("DEBUG"):
        c = EngramClient(address, root_certificates=ca, token="alice-token", timeout=120)
        c.write([("memo2", "The vault code is 99-41-07.")], namespace="alice")
        c.delete("memo2", namespace="alice")
    assert "alice-token" not in caplog.text and "99-41-07" not in caplog.text
