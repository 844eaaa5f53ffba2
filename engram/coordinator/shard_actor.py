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
