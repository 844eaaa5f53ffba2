"""What is acknowledged is exactly what is stored (issue #14): no mixed documents from repeated names in a stream,
request ids replayed with new text or concurrent writers of one name; a cancelled or crashed write leaves nothing;
admission control; no internals in errors."""

import asyncio
import threading

import grpc
import pytest
import ray

from engram.coordinator.auth import Auth
from engram.coordinator.client import EngramClient
from engram.coordinator.locks import DocLocks
from engram.coordinator.write import identity


# --- pure logic ---------------------------------------------------------------------------------------------------
def test_doc_locks_exclude_and_leave_no_entries():
    locks, inside, most = DocLocks(), [0], [0]

    async def user(name: str) -> None:
        async with locks.hold("ns", name):
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            await asyncio.sleep(0.001)
            inside[0] -= 1

    async def main() -> None:
        await asyncio.gather(*[user("a") for _ in range(20)])
        assert most[0] == 1  # one holder of a document at a time
        await asyncio.gather(*[user(f"doc-{i}") for i in range(100)])

    asyncio.run(main())
    assert len(locks) == 0  # no entry outlives its users


def test_identity_is_request_id_and_content():
    assert identity("r1", "text") == identity("r1", "text") != identity("r1", "other text")
    assert identity("r1", "text") != identity("r2", "text")
    assert identity("", "text") != identity("", "text")  # without a request id nothing is a replay


def test_tokens_file_values_must_be_lists(tmp_path):
    f = tmp_path / "tokens.toml"
    f.write_text('[tokens]\n"t1" = "alice"\n')  # a string, not a list: would allow namespaces "a", "l", "i", ...
    with pytest.raises(ValueError, match="must be a list of namespace names"):
        Auth(str(f))
    f.write_text('[tokens]\n"t1" = ["alice", "shared"]\n')
    assert Auth(str(f)).tokens == {"t1": {"alice", "shared"}}


# --- through the running service ----------------------------------------------------------------------------------
def stored_tokens(engine, namespace: str, doc: str) -> list[int]:
    """The document's token ids as the shards hold them, chunk by chunk in order (each chunk exactly once)."""
    rows = []
    for shard in engine.shards:
        found = ray.get(shard.chunks_at.remote(namespace, doc, list(range(4096))))
        tokens = ray.get(shard.tokens.remote([c.block for c in found])) if found else []
        rows += [(c.seq, t) for c, t in zip(found, tokens)]
    seqs = sorted(s for s, _ in rows)
    assert seqs == list(range(len(seqs))), f"chunks {seqs}: missing or duplicated"
    return [t for _, toks in sorted(rows, key=lambda r: r[0]) for t in toks]


@pytest.fixture(scope="module")
def client(service):
    c = EngramClient(service.address, timeout=600)
    yield c
    c.close()


def text(tag: str, n: int = 40) -> str:
    return " ".join(f"{tag} sentence {i} says the {tag} shelf holds {i * 7} jars." for i in range(n))


@pytest.mark.integration
def test_a_stream_naming_a_document_twice_is_refused(service, client):
    v1, v2, b = text("alpha"), text("omega"), text("beta", 5)
    with pytest.raises(grpc.RpcError) as e:
        client.write([("a", v1), ("b", b), ("a", v2)], namespace="int-stream")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "appears twice" in e.value.details() and "1 earlier documents" in e.value.details()
    assert stored_tokens(service.engine, "int-stream", "a") == service.engine.tokenize(v1)  # exactly v1


@pytest.mark.integration
def test_a_request_id_replayed_with_other_text_is_refused(service, client):
    first, other = text("first"), text("second")
    client.write([("doc", first)], namespace="int-replay", request_id="req-1")
    again = client.write([("doc", first)], namespace="int-replay", request_id="req-1")  # a true retry: a no-op
    assert again.new_blocks == 0 and again.documents == 1
    with pytest.raises(grpc.RpcError) as e:
        client.write([("doc", other)], namespace="int-replay", request_id="req-1")
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert stored_tokens(service.engine, "int-replay", "doc") == service.engine.tokenize(first)


@pytest.mark.integration
def test_concurrent_writers_of_one_name(service, client):
    """8 writers race for one name: exactly one is acknowledged, the others get ALREADY_EXISTS (not UNKNOWN), and
    the document is exactly the winner's text; deleting it leaves no lock entries behind."""
    texts = [text(f"writer{i}", 30) for i in range(8)]
    codes: dict[int, object] = {}

    def write(i: int) -> None:
        try:
            client.write([("shared", texts[i])], namespace="int-race")
            codes[i] = "OK"
        except grpc.RpcError as e:
            codes[i] = e.code()

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, c in codes.items() if c == "OK"]
    assert len(winners) == 1, codes
    assert all(c == grpc.StatusCode.ALREADY_EXISTS for i, c in codes.items() if i != winners[0]), codes
    assert stored_tokens(service.engine, "int-race", "shared") == service.engine.tokenize(texts[winners[0]])
    client.delete("shared", namespace="int-race")
    for i in range(5):  # NOT_FOUND deletes must not grow the coordinator's lock table either
        with pytest.raises(grpc.RpcError):
            client.delete(f"never-{i}", namespace="int-race")
    assert len(service.engine.cluster.doc_locks) == 0


def test_unexpected_errors_reach_clients_without_internals():
    """A bug inside a handler becomes INTERNAL with an incident id; its text (paths, addresses) stays in the log."""
    from engram.coordinator.config import EngramConfig
    from engram.coordinator.server import EngramService

    class Aborted(Exception):
        pass

    class Context:
        def invocation_metadata(self):
            return ()

        async def abort(self, code, details):
            self.code, self.details = code, details
            raise Aborted

    async def failing():
        raise RuntimeError("cannot open /var/lib/engram/shard-0/COMMIT.json on 10.0.0.7")

    ctx = Context()
    with pytest.raises(Aborted):
        asyncio.run(EngramService(None, EngramConfig())._run(ctx, failing(), "Ask"))
    assert ctx.code == grpc.StatusCode.INTERNAL and "incident" in ctx.details
    assert "/var/lib" not in ctx.details and "10.0.0.7" not in ctx.details and "RuntimeError" not in ctx.details


def on_loop(service, coro, timeout: float = 300):
    return asyncio.run_coroutine_threadsafe(coro, service.loop).result(timeout=timeout)


def absent_everywhere(engine, namespace: str, name: str) -> bool:
    return all(ray.get(s.document_request.remote(namespace, name)) is None for s in engine.shards)


def wait_idle(engine, deadline_s: float = 120) -> None:
    import time

    end = time.time() + deadline_s
    while engine.cluster.writing or len(engine.cluster.doc_locks):
        assert time.time() < end, "the write never let go of its document"
        time.sleep(0.05)


@pytest.mark.integration
def test_a_cancelled_write_leaves_nothing(service):
    """A client that gives up (deadline, cancel) mid-write: the write takes back what it committed, holding the
    document's lock until it has, and leaves no intent."""
    import time

    engine = service.engine
    cancelled = 0
    for attempt in range(3):
        name = f"cancelled-{attempt}"
        fut = asyncio.run_coroutine_threadsafe(
            engine.write_document("int-cancel", name, text(f"gone{attempt}", 200), f"req-{attempt}"), service.loop
        )
        end = time.time() + 120
        while not engine.cluster.intents.pending() and not fut.done():  # the write is under way
            assert time.time() < end
            time.sleep(0.01)
        fut.cancel()
        wait_idle(engine)
        cancelled += fut.cancelled()
        if fut.cancelled():
            assert absent_everywhere(engine, "int-cancel", name)
        assert engine.cluster.intents.pending() == []
    assert cancelled, "no cancel landed during a write: the test did not exercise the rollback"


@pytest.mark.integration
def test_restart_repairs_half_committed_writes(service, client):
    """What a coordinator crash mid-commit leaves: a document committed on one shard only, and its intent. The
    repair removes exactly that write's chunks; a document acknowledged under another identity is untouched."""
    from engram.coordinator.intents import Intent

    engine = service.engine
    half, kept = text("half", 60), text("kept", 60)
    client.write([("half", half)], namespace="int-repair", request_id="w-half")
    client.write([("kept", kept)], namespace="int-repair", request_id="w-kept")
    holders = [s for s in engine.shards if ray.get(s.document_request.remote("int-repair", "half")) is not None]
    assert len(holders) == 2, "the test needs a document spread over both shards"
    ray.get(holders[0].delete_document.remote("int-repair", "half"))  # "crashed" after one shard's commit
    pending = [
        Intent("int-repair", "half", identity("w-half", half)),
        Intent("int-repair", "kept", identity("another-request", kept)),  # not the identity that wrote "kept"
    ]
    for i in pending:
        engine.cluster.intents.begin(i)
    assert on_loop(service, engine.repair(engine.cluster.intents.pending())) == 2
    assert absent_everywhere(engine, "int-repair", "half")
    assert stored_tokens(engine, "int-repair", "kept") == engine.tokenize(kept)
    assert engine.cluster.intents.pending() == [] and not engine.cluster.writing


@pytest.mark.integration
def test_admission_control_refuses_past_the_limit(service):
    """Past server.max_concurrent_rpcs requests in progress, new ones get RESOURCE_EXHAUSTED at once (here a second
    server on the same engine, limited to 2)."""
    import copy

    from engram.coordinator.server import start_server

    cfg = copy.deepcopy(service.cfg)
    cfg.server.max_concurrent_rpcs, cfg.server.metrics_port = 2, -1
    server, port = on_loop(service, start_server(service.engine, cfg, 0))
    codes: list = []
    try:
        with EngramClient(f"127.0.0.1:{port}", timeout=300) as c:
            c.write([("pk", text("admission", 20))], namespace="int-admit")

            def ask() -> None:
                try:
                    c.ask("Which shelf holds jars?", namespace="int-admit", max_new_tokens=24)
                    codes.append("OK")
                except grpc.RpcError as e:
                    codes.append(e.code().name)

            threads = [threading.Thread(target=ask) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        service.loop.call_soon_threadsafe(server.health_task.cancel)
        on_loop(service, server.stop(grace=1))
    assert codes.count("OK") >= 2 and "RESOURCE_EXHAUSTED" in codes, codes
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes


@pytest.mark.integration
def test_another_namespaces_text_is_not_revealed_by_a_write(service, client):
    """Finding 3: after one namespace wrote (and deleted) a secret, another namespace writing guesses must learn
    nothing: the right guess costs and reports exactly what a wrong one does (new_blocks)."""
    secret = "The vault combination for the Harbor Street branch is 4417-9023-6610, changed every Monday."
    wrong = "The vault combination for the Harbor Street branch is 5528-1134-7721, changed every Monday."
    client.write([("memo", secret)], namespace="int-tenant-a")
    client.delete("memo", namespace="int-tenant-a")
    right_guess = client.write([("guess-1", secret)], namespace="int-tenant-b").new_blocks
    wrong_guess = client.write([("guess-2", wrong)], namespace="int-tenant-b").new_blocks
    assert right_guess == wrong_guess == 1
    # within one namespace identical chunks still share a block
    assert client.write([("guess-3", secret)], namespace="int-tenant-b").new_blocks == 0
