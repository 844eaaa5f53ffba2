"""The gRPC health status, kept from the shards' answers (load balancers and Kubernetes probes read it)."""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health_pb2

from .engine import Engine

log = logging.getLogger("engram")


async def watch_health(engine: Engine, servicer, interval_s: float, misses_to_fail: int = 3) -> None:
    """SERVING while at least one shard answers, NOT_SERVING when none has for `misses_to_fail` probes in a row
    (load balancers and Kubernetes probes stop sending requests that could only fail). One silent probe is not
    enough: shards busy committing a large write answer late (seen: both missed one probe at 128k-token ingest)."""
    status = health_pb2.HealthCheckResponse
    serving, misses = True, 0
    while True:
        await asyncio.sleep(interval_s)
        try:
            up = await engine.cluster.ping(timeout=max(interval_s, 1.0))
        except Exception:
            up = 0
        misses = 0 if up else misses + 1
        if (misses < misses_to_fail) != serving:
            serving = misses < misses_to_fail
            log.warning(
                "health: %d of %d shards answer; %s", up, len(engine.shards), "SERVING" if serving else "NOT_SERVING"
            )
            await servicer.set("engram.v1.Engram", status.SERVING if serving else status.NOT_SERVING)
