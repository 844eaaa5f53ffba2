"""A local multi-node Ray cluster for the scenario scripts (grow, node loss): a 2-CPU head that runs the
coordinator, encoders and decoder, and CPU-less worker nodes offering the `engram_shard` resource shards need."""

import tempfile

import ray
from ray.cluster_utils import Cluster

from engram.coordinator.config import EngramConfig


def shard_cluster(shard_nodes: int, data_prefix: str):
    """-> (cluster, its shard nodes, an EngramConfig that joins it with shards on those nodes only)."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    nodes = [cluster.add_node(num_cpus=0, resources={"engram_shard": 2}) for _ in range(shard_nodes)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    cfg = EngramConfig()
    cfg.cluster.address = cluster.address
    cfg.cluster.shard_resource = "engram_shard"
    cfg.cluster.encoders = 2
    cfg.server.metrics_port = -1
    cfg.shard.data_dir = tempfile.mkdtemp(prefix=data_prefix)
    return cluster, nodes, cfg
