"""One phase of the coordinator-restart test (tests/test_restart.py): each phase is a whole process with its
own Ray, like `engram serve` started, stopped and started again on one data_dir.

    python tests/restart_scenario.py write|ask|wrong-shards|resume|health|refused DATA_DIR

A phase named codec-PHASE runs PHASE with the transform codec for stored K/V ([encoder] kv_dtype = "codec").
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "token")

import ray

from engram.coordinator.background import BackgroundServer
from engram.coordinator.client import EngramClient
from engram.coordinator.config import EngramConfig
from engram.coordinator.routing import route
from engram.evals.haystack import PASSKEY_QUESTION, passkey_context


def main(phase: str, data_dir: str) -> int:
    cfg = EngramConfig()
    cfg.cluster.num_cpus = 2
    cfg.shard.data_dir = data_dir
    cfg.server.metrics_port = -1  # off, as TOML writes it
    if phase.startswith("codec-"):
        cfg.encoder.kv_dtype = "codec"
        phase = phase.removeprefix("codec-")
    if phase == "refused":  # a data_dir written with other settings
        try:
            BackgroundServer(cfg).start()
        except Exception as e:  # the test reads what a user would see
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
            return 0
        return 1
    if phase == "wrong-shards":
        cfg.cluster.shards = 3
        try:
            BackgroundServer(cfg).start()
        except ValueError as e:
            print(json.dumps({"error": str(e)}))
            return 0
        return 1
    if phase == "health":
        return health(cfg, data_dir)
    with BackgroundServer(cfg) as srv, EngramClient(srv.address, timeout=300) as c:
        assert getattr(srv.server, "metrics_port", None) is None  # no /metrics endpoint was started
        if phase == "write":
            c.write([("pk", passkey_context(3000, 0.3, 42424, srv.engine.tokenizer))], namespace="rs")
            for i in range(6):
                c.write(
                    [(f"note-{i}", f"Note {i}: shelf {i} holds {i * 13} jars of {['plum', 'fig'][i % 2]} jam. " * 9)],
                    namespace="rs",
                )
        if phase == "resume" and srv.engine.resume_rebalance:  # the last coordinator died mid-growth
            import time

            while c.stats().rebalance.running or not c.stats().rebalance.total_shards:  # this start finishes it
                time.sleep(0.2)
            engine = srv.engine
            misplaced = 0
            for sid, shard in zip(engine.shard_ids, engine.shards):
                for doc in ray.get(shard.chunk_table.remote()):
                    misplaced += sum(route(h, engine.shard_ids) != sid for h in doc.hashes)
            s = c.stats()
            print(
                json.dumps(
                    {
                        "shards": len(s.shards),
                        "misplaced": misplaced,
                        "moved": s.rebalance.moved_chunks,
                        "per_shard_chunks": [sh.chunks for sh in s.shards],
                    }
                )
            )
        s = c.stats()
        print(
            json.dumps(
                {
                    "answer": c.ask(PASSKEY_QUESTION, namespace="rs").answer,
                    "counts": [s.documents, s.chunks, s.blocks, s.tokens, s.stored_bytes],
                }
            )
        )
    return 0


def health(cfg: EngramConfig, data_dir: str) -> int:
    """A start finds a write intent a crash left and repairs it; health is NOT_SERVING once no shard answers."""
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from engram.coordinator.intents import Intent, IntentLog

    IntentLog(data_dir).begin(Intent("rs", "ghost", "never-acknowledged|0"))
    cfg.server.health_interval_s = 0.5
    out = {}
    with BackgroundServer(cfg) as srv, grpc.insecure_channel(srv.address) as ch:
        probe = health_pb2_grpc.HealthStub(ch)

        def status() -> str:
            r = probe.Check(health_pb2.HealthCheckRequest(service="engram.v1.Engram"), timeout=10)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

        deadline = time.time() + 60
        while IntentLog(data_dir).pending() and time.time() < deadline:
            time.sleep(0.1)
        out["intents_left"] = len(IntentLog(data_dir).pending())
        out["before"] = status()
        for shard in srv.engine.shards:
            ray.kill(shard, no_restart=True)
        while status() == "SERVING" and time.time() < deadline:
            time.sleep(0.2)
        out["after"] = status()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
