"""Grow 1 -> 4 shards while writing, on a multi-node local Ray cluster (run by tests/test_grow.py).

Three CPU worker nodes offer the `engram_shard` resource; the cluster starts with one shard. A writer thread
streams documents over gRPC while `AddShards(3)` runs and the rebalance moves chunks; asks go on meanwhile.
Afterwards every acknowledged chunk must be stored exactly once, on the shard routing names for it, and the
answer must be unchanged. Prints one JSON line and exits 0 when all of that holds.
"""

import json
import os
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "token")

import grpc
import ray
from multinode import shard_cluster  # tests/ is this script's directory

from engram.coordinator import routing
from engram.coordinator.background import BackgroundServer
from engram.coordinator.client import EngramClient
from engram.evals.haystack import PASSKEY_QUESTION, first_integer, passkey_context

NS = "grow"


def note(i: int) -> str:
    return (
        f"Logbook entry {i}. The crate in locker {i} holds {i * 37 % 101} brass keys, painted "
        f"{['red', 'green', 'blue', 'amber'][i % 4]}. " * 10
    )


def main() -> int:
    cluster, _, cfg = shard_cluster(3, "engram-grow-")
    cfg.cluster.shards = 1
    out = {}
    with BackgroundServer(cfg) as srv, EngramClient(srv.address, timeout=300) as c:
        engine = srv.engine
        passkey = passkey_context(3000, 0.4, 73737, engine.tokenizer)
        acked = {"pk": c.write([("pk", passkey)], namespace=NS, request_id="pk").chunks}
        answer = c.ask(PASSKEY_QUESTION, namespace=NS).answer
        errors: list[str] = []

        def writer():
            for i in range(14):
                try:
                    acked[f"note-{i}"] = c.write([(f"note-{i}", note(i))], namespace=NS, request_id=f"note-{i}").chunks
                except Exception as e:
                    errors.append(f"note-{i}: {e}")

        t = threading.Thread(target=writer)
        t.start()
        while len(acked) < 4:  # grow mid-ingest
            time.sleep(0.1)
        # two AddShards at once: exactly one grows the cluster, the other is refused (never 1 -> 7 shards)
        adds: list = []

        def add() -> None:
            try:
                adds.append(c.add_shards(3))
            except grpc.RpcError as e:
                adds.append(e.code().name)

        racers = [threading.Thread(target=add) for _ in range(2)]
        for r in racers:
            r.start()
        for r in racers:
            r.join()
        grown = next(a for a in adds if not isinstance(a, str))
        out["concurrent_adds"] = sorted("OK" if not isinstance(a, str) else a for a in adds)
        mid_answers = []
        while c.stats().rebalance.running:  # reads go on during the move
            mid_answers.append(c.ask(PASSKEY_QUESTION, namespace=NS).answer)
        t.join()
        s = c.stats()
        # every acknowledged chunk: exactly once, on the shard the grown routing names
        texts = {"pk": passkey, **{f"note-{i}": note(i) for i in range(14)}}
        missing = duplicated = misplaced = 0
        for doc, n in acked.items():
            ids = engine.tokenize(texts[doc])
            chunks = routing.split(ids, engine.layout.chunk_tokens, engine.cfg.encoder.context_tokens)
            want = {
                ch.seq: routing.route(h, engine.shard_ids) for ch, h in zip(chunks, engine.writer.addresses(NS, chunks))
            }
            assert len(want) == n
            where: dict[int, list[int]] = {}
            for sid, shard in zip(engine.shard_ids, engine.shards):
                for seq in (r.seq for r in ray.get(shard.chunks_at.remote(NS, doc, list(want)))):
                    where.setdefault(seq, []).append(sid)
            missing += sum(seq not in where for seq in want)
            duplicated += sum(len(v) > 1 for v in where.values())
            misplaced += sum(v != [want[seq]] for seq, v in where.items() if len(v) == 1)
        final = c.ask(PASSKEY_QUESTION, namespace=NS)
        hit = c.read("Which locker holds amber brass keys? Logbook entry 7", namespace=NS, top_k=4)
        out |= {
            "shards": list(grown.shards),
            "added": list(grown.added),
            "acked": len(acked),
            "errors": errors,
            "missing": missing,
            "duplicated": duplicated,
            "misplaced": misplaced,
            "chunks": s.chunks,
            "acked_chunks": sum(acked.values()),
            "per_shard_chunks": [sh.chunks for sh in s.shards],
            "moved": s.rebalance.moved_chunks,
            "rebalance_error": s.rebalance.error,
            "mid_asks": len(mid_answers),
            # the key, not the whole text: the notes written meanwhile may join the retrieved chunks
            "mid_same": all(first_integer(a) == 73737 for a in mid_answers),
            "same_answer": first_integer(final.answer) == first_integer(answer) == 73737,
            "answer": answer,
            "final_answer": final.answer,
            "final_chunks": [ch.chunk_id for ch in final.chunks],
            "read_top_doc": hit.chunks[0].document_id if hit.chunks else "",
        }
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps(out), flush=True)
    ok = (
        not errors
        and missing == 0
        and duplicated == 0
        and misplaced == 0
        and out["same_answer"]
        and out["mid_same"]
        and out["chunks"] == out["acked_chunks"]
        and all(out["per_shard_chunks"])
        and len(out["shards"]) == 4
        and out["moved"] > 0
        and not out["rebalance_error"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
