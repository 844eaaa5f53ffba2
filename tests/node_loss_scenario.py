"""Node loss on a multi-node local Ray cluster (ray.cluster_utils.Cluster), run by tests/test_node_loss.py.

Design under test: each shard's Zarr store lives on storage every node can reach (here the machine's disk;
in production a shared filesystem such as NFS/EFS/CephFS, see README). Shards need the `engram_shard`
resource, which only the two CPU worker nodes offer. When a node dies, Ray restarts its shard actors on the
surviving node (max_restarts=-1) and they reopen their stores: no acknowledged chunk is lost.
Prints `LOST <n> MOVED <shard ids>` and exits 0 when nothing was lost.
"""

import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "token")

import ray
from multinode import shard_cluster  # tests/ is this script's directory

from engram.coordinator.background import BackgroundServer
from engram.coordinator.client import EngramClient
from engram.evals.haystack import PASSKEY_QUESTION, passkey_context


def main() -> int:
    cluster, nodes, cfg = shard_cluster(2, "engram-nodeloss-")
    with BackgroundServer(cfg) as srv, EngramClient(srv.address, timeout=300) as c:
        engine = srv.engine
        c.write([("pk", passkey_context(3000, 0.5, 61616, engine.tokenizer))], namespace="nl")
        acked = {}
        for i in range(12):
            doc = f"note-{i}"
            acked[doc] = c.write(
                [(doc, f"Note {i}: locker {i} holds crate {i * 31 % 97}. " * 12)], namespace="nl", request_id=doc
            ).chunks
        answer = c.ask(PASSKEY_QUESTION, namespace="nl").answer
        before = {i: ray.get(s.stats.remote()) for i, s in enumerate(engine.shards)}
        node_ids = {n.node_id: n for n in nodes}
        victim_id = ray.get(engine.shards[0].stats.remote()).node.split("/")[1]
        victim = next(n for nid, n in node_ids.items() if nid.startswith(victim_id))
        on_victim = [i for i, st in before.items() if st.node.endswith(victim_id)]
        cluster.remove_node(victim)
        deadline = time.time() + 180
        for i in on_victim:  # wait until Ray has restarted them on the surviving node
            while True:
                try:
                    st = ray.get(engine.shards[i].stats.remote(), timeout=30)
                    if not st.node.endswith(victim_id):
                        break
                except (
                    ray.exceptions.RayActorError,
                    ray.exceptions.GetTimeoutError,
                    ray.exceptions.ActorUnavailableError,
                ):
                    pass
                if time.time() > deadline:
                    print("shard did not come back", i)
                    return 1
                time.sleep(0.5)
        lost = 0
        for doc, n in acked.items():
            rows = [r for s in engine.shards for r in ray.get(s.chunks_at.remote("nl", doc, list(range(n + 2))))]
            lost += n - len({r.seq for r in rows})
        after = {i: ray.get(s.stats.remote()) for i, s in enumerate(engine.shards)}
        same = all((before[i].chunks, before[i].blocks) == (after[i].chunks, after[i].blocks) for i in before)
        same_answer = c.ask(PASSKEY_QUESTION, namespace="nl").answer == answer
        print(f"LOST {lost} MOVED {on_victim} SAME_COUNTS {same} SAME_ANSWER {same_answer}", flush=True)
    ray.shutdown()
    cluster.shutdown()
    return 0 if lost == 0 and same and same_answer and on_victim else 1


if __name__ == "__main__":
    sys.exit(main())
