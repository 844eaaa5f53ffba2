"""No acknowledged write is lost: SIGKILL shard processes 20 times during a streaming ingest."""

import os
import random
import signal
import threading
import time

import pytest
import ray

from engram.coordinator.client import EngramClient
from engram.evals.haystack import PASSKEY_QUESTION, passkey_context

pytestmark = pytest.mark.integration
KILLS = 20


def live_pid(shard, deadline: float) -> int:
    while True:
        try:
            return ray.get(shard.stats.remote(), timeout=30).pid
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def doc_text(i: int) -> str:
    return (f"Ledger entry {i}: the courier for parcel {i} is agent {i * 7919 % 10007}. " * 9).strip()


def test_sigkill_shards_20_times_during_streaming_ingest(service, caplog):
    caplog.set_level("WARNING", logger="engram")
    engine = service.engine
    with EngramClient(service.address, timeout=300) as c:
        c.write([("pk", passkey_context(2000, 0.4, 30917, engine.tokenizer))], namespace="dur-base")
        answer_before = c.ask(PASSKEY_QUESTION, namespace="dur-base").answer
        acked: dict[str, int] = {}
        failed: list[tuple[str, str]] = []
        stop = threading.Event()

        def writer():
            i = 0
            while not stop.is_set() or i < 30:
                doc = f"entry-{i}"
                try:
                    r = c.write([(doc, doc_text(i))], namespace="dur", request_id=f"req-{i}", retries=20)
                    acked[doc] = r.chunks
                except Exception as e:
                    failed.append((doc, repr(e)))
                i += 1

        t = threading.Thread(target=writer)
        t.start()
        rng = random.Random(0)
        landed = lambda: any("attempt" in r.getMessage() for r in caplog.records)
        k, deadline = 0, time.time() + 120
        # KILLS kills at random gaps, and more until one has landed during a write (a loaded machine can
        # schedule the writer so that a few random gaps all fall between its writes)
        while k < KILLS or (not landed() and time.time() < deadline):
            shard = engine.shards[k % len(engine.shards)]
            os.kill(live_pid(shard, time.time() + 120), signal.SIGKILL)
            time.sleep(rng.uniform(0.2, 1.5))
            k += 1
        stop.set()
        t.join(timeout=600)
        assert not t.is_alive()

        assert not failed, failed[:3]
        retried = [r for r in caplog.records if "attempt" in r.getMessage()]
        assert retried, "no kill landed during a write: the test did not exercise recovery"
        assert len(acked) >= 30
        # every acknowledged chunk is there exactly once (0 missing, 0 duplicated)
        for s in engine.shards:
            live_pid(s, time.time() + 120)
        for doc, n in acked.items():
            rows = [row for s in engine.shards for row in ray.get(s.chunks_at.remote("dur", doc, list(range(n + 2))))]
            seqs = sorted(r.seq for r in rows)
            assert seqs == list(range(n)), (doc, seqs, n)
        stats = c.stats()
        assert c.ask(PASSKEY_QUESTION, namespace="dur-base").answer == answer_before
        # the lexical and vector indexes agree with the store after the kills: nothing committed is left unindexed,
        # and every acknowledged document is found by its own words (its courier's agent number)
        behind = [ray.get(s.stats.remote()) for s in engine.shards]
        assert [(b.lexical_behind, b.vectors_behind) for b in behind] == [(0, 0)] * len(engine.shards)
        assert engine.cfg.ask.lexical_weight > 0  # the hybrid (the default) reads the lexical index
        for doc in acked:
            i = int(doc.split("-")[1])
            got = c.read(f"parcel {i} courier agent {i * 7919 % 10007}", namespace="dur", top_k=4)
            assert doc in [ch.document_id for ch in got.chunks], doc
        # a retried request id stores nothing twice
        again = c.write([("entry-0", doc_text(0))], namespace="dur", request_id="req-0")
        assert again.new_blocks == 0 and c.stats().chunks == stats.chunks
