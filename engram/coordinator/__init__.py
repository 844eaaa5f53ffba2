"""The coordinator: the service's API, write and read paths, cluster membership and rebalancing."""

import os

# Ray's token authentication, whatever this Ray version's default: without the cluster's token nobody can call the
# shard actors directly. Set before anything imports Ray, which reads it once (RAY_AUTH_MODE=disabled only to join
# an old cluster that has no token).
os.environ.setdefault("RAY_AUTH_MODE", "token")
