"""Real Ray + real gRPC on 127.0.0.1 + real Zarr + the real pretrained decoder."""

import os
import signal
import time

import grpc
import pytest
import ray

from engram.coordinator.client import EngramClient
from engram.evals.haystack import NIAH_QUESTION, PASSKEY_QUESTION, first_integer, niah_context, passkey_context
from engram.proto import engram_pb2 as pb

pytestmark = pytest.mark.integration
KEY = 48213
COUNTED = ("documents", "chunks", "blocks", "tokens", "stored_bytes")


@pytest.fixture(scope="module")
def client(service, tokenizer):
    c = EngramClient(service.address, timeout=600)
    c.write(
        [("passkey", passkey_context(8000, 0.6, KEY, tokenizer)), ("essays", niah_context(6000, 0.3, tokenizer))],
        namespace="it",
    )
    yield c
    c.close()


def test_passkey_answer(client):
    r = client.ask(PASSKEY_QUESTION, namespace="it")
    assert first_integer(r.answer) == KEY
    assert any(ch.document_id == "passkey" and str(KEY) in ch.text for ch in r.chunks)
    assert r.timings.ttft_s > 0 and r.timings.total_s >= r.timings.ttft_s
    assert r.context_tokens > 128


def test_rag_baseline_mode(client):
    """Ask(mode="rag"): the same retrieved chunks, their text prefilled again: same chunks, context = tokens."""
    kv, rag = client.ask(PASSKEY_QUESTION, namespace="it"), client.ask(PASSKEY_QUESTION, namespace="it", mode="rag")
    assert [ch.chunk_id for ch in rag.chunks] == [ch.chunk_id for ch in kv.chunks]
    assert first_integer(rag.answer) == KEY
    assert rag.context_tokens > 128 and rag.timings.ttft_s > 0  # sink + the chunks' tokens, prefilled


def test_needle_in_essays(client):
    r = client.ask(NIAH_QUESTION, namespace="it", top_k=4)
    assert "sandwich" in r.answer.lower() or "dolores" in r.answer.lower(), r.answer
    best = max(r.chunks, key=lambda ch: ch.score)
    assert best.document_id == "essays" and "Dolores Park" in best.text
    assert r.chunks[-1] == best  # the best-scored block is placed last, nearest the question


def test_read_returns_ranked_chunks_and_readout(client):
    r = client.read("Dolores Park sandwich", namespace="it", top_k=3)
    assert 1 <= len(r.chunks) <= 3 and "Dolores Park" in r.chunks[0].text
    scores = [c.score for c in r.chunks]
    # best first; hits under ask.min_score_ratio (0.3) x the best are dropped (with the hybrid, a lexical match
    # lifts the best score, so fewer than top_k may remain)
    assert scores == sorted(scores, reverse=True) and all(s >= 0.3 * scores[0] for s in scores)
    assert len(r.readout) == 384 and sum(x * x for x in r.readout) > 0.1


def test_stats(client, tokenizer):
    s = client.stats()
    assert s.documents >= 2 and len(s.shards) == 2  # the session service is shared by other test files
    assert s.tokens == sum(sh.tokens for sh in s.shards) > 14000
    assert s.full_fp16_kv_bytes_per_token == 30 * 2 * 3 * 64 * 2
    # default int4 K/V: 6,480 B per token of a block's K/V + scales + positions, plus tokens, latents, index
    assert s.unique_bytes_per_token < s.full_fp16_kv_bytes_per_token / 3
    assert 0 < s.bytes_per_token and all(sh.resident_bytes > 0 for sh in s.shards)


def test_delete_forgets_a_document(client):
    client.write([("secret", "The secret color of the lighthouse is vermilion. " * 3)], namespace="it2")
    assert any(c.document_id == "secret" for c in client.read("secret color lighthouse", namespace="it2").chunks)
    assert client.delete("secret", namespace="it2").chunks >= 1
    with pytest.raises(grpc.RpcError) as e:  # the namespace is empty again
        client.read("secret color lighthouse", namespace="it2")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        client.delete("secret", namespace="it2")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "call,code",
    [
        (lambda c: c.write([("empty", "")], namespace="bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda c: c.write([("x", "text")], namespace=""), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda c: c.write([("passkey", "again")], namespace="it"), grpc.StatusCode.ALREADY_EXISTS),
        (lambda c: c.write([], namespace="it"), grpc.StatusCode.INVALID_ARGUMENT),
        (
            lambda c: c.write([("latin1", "caf\xe9 au lait".encode("latin-1"))], namespace="it"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda c: c.stub.Write(iter([pb.WriteRequest(namespace="it", document_id="huge", text=b"a" * (17 << 20))])),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),  # one message over server.max_message_bytes (16 MiB)
        (lambda c: c.ask("anything?", namespace="nobody"), grpc.StatusCode.NOT_FOUND),
        (lambda c: c.ask("   ", namespace="it"), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda c: c.ask("q?", namespace="it", top_k=10_000), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda c: c.ask("q?", namespace="it", max_new_tokens=100_000), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda c: c.ask("q" * 5000, namespace="it"), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda c: c.ask("q?", namespace="it", mode="telepathy"), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda c: c.add_shards(0), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_bad_input_is_rejected_and_changes_nothing(client, call, code):
    before = client.stats()
    with pytest.raises(grpc.RpcError) as e:
        call(client)
    assert e.value.code() == code and e.value.details()
    after = client.stats()
    assert [getattr(after, k) for k in COUNTED[:1] + COUNTED[2:]] == [
        getattr(before, k) for k in COUNTED[:1] + COUNTED[2:]
    ]


def test_kill_9_shard_after_ack(service, client):
    """SIGKILL a shard's process after an acknowledged write: Ray restarts it, it reloads its store,
    and the same ask gives the same answer and stats the same counts. The needle opens the document, so one block
    holds it: at depth 0.5 the needle's chunk and the next are read together, and that answer turned on the second
    block's int4 codes, which are not bit-stable (the same text written into two namespaces got codes differing in
    ~6% of entries, the bf16 encoding pass batched differently) — not what this test is about."""
    client.write([("late", passkey_context(3000, 0.0, 11111, service.engine.tokenizer))], namespace="it3")
    before = client.stats()
    answer = client.ask(PASSKEY_QUESTION, namespace="it").answer
    answer3 = client.ask(PASSKEY_QUESTION, namespace="it3").answer
    shard = service.engine.shards[0]
    pid = ray.get(shard.stats.remote()).pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for the restart
        try:
            if ray.get(shard.stats.remote(), timeout=10).pid != pid:
                break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            time.sleep(0.5)
    after = client.stats()
    assert [getattr(after, k) for k in ("documents", "chunks", "tokens", "stored_bytes")] == [
        getattr(before, k) for k in ("documents", "chunks", "tokens", "stored_bytes")
    ]
    assert [(s.chunks, s.blocks, s.tokens) for s in after.shards] == [
        (s.chunks, s.blocks, s.tokens) for s in before.shards
    ]
    assert client.ask(PASSKEY_QUESTION, namespace="it").answer == answer
    assert client.ask(PASSKEY_QUESTION, namespace="it3").answer == answer3
    assert first_integer(answer3) == 11111


def test_metrics_health_and_reflection(service, client):
    """Operations: Prometheus /metrics (request counters, per-shard gauges), gRPC health and reflection."""
    import urllib.request

    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    client.stats()
    port = service.server.metrics_port
    assert port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'engram_requests_total{code="OK",method="Stats"}' in text
    assert 'engram_request_seconds_bucket{le="0.005",method="Stats"}' in text
    assert 'engram_shard_chunks{shard="0"}' in text and 'engram_shard_chunks{shard="1"}' in text
    assert "engram_written_total" in text and "engram_ask_stage_seconds_count" in text
    with grpc.insecure_channel(service.address) as ch:
        ok = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="engram.v1.Engram"), timeout=10)
        assert ok.status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
        assert {"engram.v1.Engram", "grpc.health.v1.Health"} <= services
        method = ProtoReflectionDescriptorDatabase(ch).FindFileContainingSymbol("engram.v1.Engram")
        assert "AddShards" in str(method)
