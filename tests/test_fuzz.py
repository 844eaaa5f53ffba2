"""Property-based fuzzing: >= 1,000 generated requests across every RPC; the server stays healthy and the data
written before is unchanged."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engram.coordinator.client import EngramClient
from engram.evals.haystack import passkey_context
from engram.proto import engram_pb2 as pb

pytestmark = pytest.mark.integration
EXAMPLES = 1000
PROTECTED = "fuzz-base"
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

names = st.one_of(st.just(""), st.text(max_size=300), st.sampled_from(["fz", "fz-2", "a\nb", "x\x00y"])).filter(
    lambda n: n not in (PROTECTED, "pk")
)
# writes and deletes land beside the protected document too, and request ids repeat with other text
neighbours = st.one_of(names, st.just(PROTECTED))
request_ids = st.one_of(st.text(max_size=140), st.sampled_from(["replayed-1", "replayed-2"]))
small_or_huge = lambda lo, hi: st.one_of(st.integers(0, lo), st.integers(hi, 2**32 - 1))
writes = st.builds(
    lambda ns, doc, parts, rid: (
        "write",
        [pb.WriteRequest(namespace=ns, document_id=doc, text=p, request_id=rid) for p in parts],
    ),
    neighbours,
    names,
    st.lists(st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode)), max_size=3),
    request_ids,
)
asks = st.builds(
    lambda ns, q, k, m: ("ask", pb.AskRequest(namespace=ns, question=q, top_k=k, max_new_tokens=m)),
    st.one_of(names, st.just(PROTECTED)),
    st.text(max_size=5000),
    small_or_huge(8, 65),
    small_or_huge(2, 513),
)
reads = st.builds(
    lambda ns, q, k: ("read", pb.ReadRequest(namespace=ns, query=q, top_k=k)),
    st.one_of(names, st.just(PROTECTED)),
    st.text(max_size=5000),
    small_or_huge(8, 65),
)
deletes = st.builds(lambda ns, doc: ("delete", pb.DeleteRequest(namespace=ns, document_id=doc)), neighbours, names)
stats = st.just(("stats", pb.StatsRequest()))


@pytest.fixture(scope="module")
def fuzz_client(service):
    c = EngramClient(service.address, timeout=120)
    c.write([("pk", passkey_context(1500, 0.5, 24680, service.engine.tokenizer))], namespace=PROTECTED)
    yield c
    c.close()


def snapshot(service):
    """The protected document as the shards hold it, chunk by chunk."""
    from tests.test_integrity import stored_tokens

    return stored_tokens(service.engine, PROTECTED, "pk")


def test_fuzz_every_rpc(service, fuzz_client):
    c = fuzz_client
    before = snapshot(service)
    seen: dict[str, int] = {}

    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(st.one_of(writes, asks, reads, deletes, stats))
    def one(op):
        kind, req = op
        call = {
            "write": lambda: c.stub.Write(iter(req), timeout=60),
            "ask": lambda: c.stub.Ask(req, timeout=60),
            "read": lambda: c.stub.Read(req, timeout=60),
            "delete": lambda: c.stub.Delete(req, timeout=60),
            "stats": lambda: c.stub.Stats(req, timeout=60),
        }[kind]
        try:
            call()
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
            assert e.details(), f"{kind}: {code} without a message"
        assert code in ALLOWED, f"{kind} {req!r}: {code}"
        seen[kind] = seen.get(kind, 0) + 1

    one()
    assert sum(seen.values()) >= EXAMPLES and set(seen) == {"write", "ask", "read", "delete", "stats"}, seen
    health = health_pb2_grpc.HealthStub(c.channel).Check(health_pb2.HealthCheckRequest(service="engram.v1.Engram"))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert snapshot(service) == before and len(before) > 1000
