"""The shard as a Ray actor. Its own module, importing nothing heavy: a shard process loads its class from here,
so it never imports torch or the model (measured: +175 MB of RSS per shard when it came from cluster.py)."""

from __future__ import annotations

import os

import ray

from ..workers.shard import Shard


class ShardActor(Shard):
    """A shard labelled with its host and Ray node (shards on one host's several Ray nodes differ)."""

    def __init__(self, shard_id, cfg, layout):
        node = ray.get_runtime_context().get_node_id()[:8]
        super().__init__(shard_id, cfg, layout, node=f"{os.uname().nodename}/{node}")

    # The health probe runs on its own thread (concurrency group "health"), not behind the queue of data calls:
    # under a large write the queue holds seconds of block puts and commits, and a probe waiting in it read as a
    # dead shard (seen: NOT_SERVING every few seconds during a 128k-token ingest). It reads only the shard id.
    @ray.method(concurrency_group="health")
    def ping(self) -> int:
        return super().ping()
