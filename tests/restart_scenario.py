"""One phase of the coordinator-restart test (tests/test_restart.py): each phase is a whole process with its
own Ray, like `engram serve` started, stopped and started again on one data_dir.

    python tests/restart_scenario.py write|ask|wrong-shards DATA_DIR
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from engram.coordinator.client import EngramClient
from engram.coordinator.config import EngramConfig
from engram.coordinator.haystack import PASSKEY_QUESTION, passkey_context
from engram.coordinator.server import BackgroundServer


def main(phase: str, data_dir: str) -> int:
    cfg = EngramConfig()
    cfg.cluster.num_cpus = 2
    cfg.shard.data_dir = data_dir
    if phase == "wrong-shards":
        cfg.cluster.shards = 3
        try:
            BackgroundServer(cfg).start()
        except ValueError as e:
            print(json.dumps({"error": str(e)}))
            return 0
        return 1
    with BackgroundServer(cfg) as srv, EngramClient(srv.address, timeout=300) as c:
        if phase == "write":
            c.write([("pk", passkey_context(3000, 0.3, 42424, srv.engine.tokenizer))], namespace="rs")
        s = c.stats()
        print(json.dumps({"answer": c.ask(PASSKEY_QUESTION, namespace="rs").answer,
                          "counts": [s.documents, s.chunks, s.blocks, s.tokens, s.stored_bytes]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
