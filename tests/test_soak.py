"""Soak (issue #14): 32 clients write, rewrite, delete and ask on a few shared document names in three namespaces
while shard processes are SIGKILLed; afterwards every document is absent for a reason or byte-for-byte one
acknowledged write. Short in `make test`; `ENGRAM_SOAK_SECONDS=600 pytest tests/test_soak.py` is the long run
(BENCHMARKS.md, "Soak")."""

import os
import random
import signal
import threading
import time
import uuid
from dataclasses import dataclass

import grpc
import pytest
import ray

from engram.coordinator.client import EngramClient
from tests.test_durability import live_pid

pytestmark = pytest.mark.integration
SECONDS = float(os.environ.get("ENGRAM_SOAK_SECONDS", "30"))
CLIENTS = 32
NAMESPACES = ("soak-a", "soak-b", "soak-c")
NAMES = ("doc-0", "doc-1", "doc-2", "doc-3")
NO_EFFECT = {"ALREADY_EXISTS", "NOT_FOUND", "INVALID_ARGUMENT"}  # refused: the operation changed nothing


@dataclass
class Op:
    namespace: str
    name: str
    kind: str  # write | delete
    start: float
    end: float
    outcome: str  # OK, a status that changed nothing (NO_EFFECT), or one whose effect is unknown
    text: str = ""


def version_text(rng: random.Random, tag: str) -> str:
    n = rng.randint(4, 30)
    return " ".join(
        f"{tag} line {i}: crate {rng.randint(0, 10**6)} holds {rng.randint(0, 999)} bolts." for i in range(n)
    )


def stored(engine, namespace: str, name: str) -> tuple[list[int] | None, bool]:
    """(token ids of the document as stored, chunk by chunk; None if absent), whether its chunks are each there once."""
    rows = []
    for shard in engine.shards:
        found = ray.get(shard.chunks_at.remote(namespace, name, list(range(4096))), timeout=120)
        tokens = ray.get(shard.tokens.remote([c.block for c in found]), timeout=120) if found else []
        rows += [(c.seq, t) for c, t in zip(found, tokens)]
    if not rows:
        return None, True
    seqs = sorted(s for s, _ in rows)
    return [t for _, toks in sorted(rows, key=lambda r: r[0]) for t in toks], seqs == list(range(len(seqs)))


def check(engine, ops: list[Op]) -> dict:
    """Each (namespace, document) against the history of operations on it."""
    out = {
        "documents": 0,
        "present": 0,
        "absent": 0,
        "mixed": 0,
        "lost": 0,
        "duplicated": 0,
        "resurrected": 0,
        "failed_write_left": 0,
    }
    for ns in NAMESPACES:
        for name in NAMES:
            mine = [o for o in ops if (o.namespace, o.name) == (ns, name)]
            acked_writes = [o for o in mine if o.kind == "write" and o.outcome == "OK"]
            deletes = [o for o in mine if o.kind == "delete" and o.outcome not in NO_EFFECT]  # done or maybe done
            tokens, once = stored(engine, ns, name)
            out["documents"] += 1
            out["duplicated"] += not once
            if tokens is None:
                out["absent"] += 1
                # a removal of an acknowledged write can only come from a delete that ended after it began
                out["lost"] += any(not any(d.end > w.start for d in deletes) for w in acked_writes[-1:])
                continue
            out["present"] += 1
            match = [o for o in mine if o.kind == "write" and engine.tokenize(o.text) == tokens]
            if not any(o.outcome == "OK" for o in match):
                out["mixed" if not match else "failed_write_left"] += 1
                continue
            w = next(o for o in match if o.outcome == "OK")
            # an acknowledged delete that began after this write ended must have removed this very text
            out["resurrected"] += any(d.kind == "delete" and d.outcome == "OK" and d.start > w.end for d in mine)
    return out


def test_soak_concurrent_clients_with_shard_kills(service):
    engine = service.engine
    ops: list[Op] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(i: int) -> None:
        rng = random.Random(i)
        with EngramClient(service.address, timeout=180) as c:
            n = 0
            while not stop.is_set():
                ns, name = rng.choice(NAMESPACES), rng.choice(NAMES)
                roll = rng.random()
                t0 = time.time()
                op = Op(ns, name, "write" if roll < 0.55 else "delete" if roll < 0.85 else "ask", t0, t0, "OK")
                try:
                    if op.kind == "write":
                        op.text = version_text(rng, f"{ns}/{name} v{i}.{n}")
                        c.write([(name, op.text)], namespace=ns, request_id=uuid.uuid4().hex, retries=5)
                    elif op.kind == "delete":
                        c.delete(name, namespace=ns)
                    else:
                        c.ask(f"Which crate holds bolts in {name}?", namespace=ns, max_new_tokens=4)
                except grpc.RpcError as e:
                    op.outcome = e.code().name
                    if op.outcome not in NO_EFFECT | {"UNAVAILABLE", "DEADLINE_EXCEEDED"}:
                        with lock:
                            errors.append(f"{op.kind}: {op.outcome}: {e.details()}"[:300])
                op.end = time.time()
                with lock:
                    ops.append(op)
                n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    rng, kills, deadline = random.Random(7), 0, time.time() + SECONDS
    while time.time() < deadline:
        time.sleep(rng.uniform(1.0, 3.0))
        os.kill(live_pid(rng.choice(engine.shards), time.time() + 120), signal.SIGKILL)
        kills += 1
    stop.set()
    for t in threads:
        t.join(timeout=900)
    assert not any(t.is_alive() for t in threads)
    for s in engine.shards:
        live_pid(s, time.time() + 120)
    result = check(engine, ops)
    kinds = {k: sum(o.kind == k for o in ops) for k in ("write", "delete", "ask")}
    acked = {k: sum(o.kind == k and o.outcome == "OK" for o in ops) for k in ("write", "delete", "ask")}
    outcomes = {f"{o.kind} {o.outcome}": 0 for o in ops}
    for o in ops:
        outcomes[f"{o.kind} {o.outcome}"] += 1
    print({"seconds": SECONDS, "kills": kills, "ops": kinds, "acked": acked, "outcomes": outcomes, **result})
    assert not errors, errors[:5]
    assert acked["write"] >= 10 and acked["delete"] >= 5 and kills >= 5, (acked, kills)
    assert result["mixed"] == result["lost"] == result["duplicated"] == 0, result
    assert result["resurrected"] == result["failed_write_left"] == 0, result
