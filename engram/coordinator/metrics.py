"""Prometheus metrics of one coordinator, served over HTTP at server.metrics_port (`/metrics`).

Request counters and latencies are recorded as requests pass; per-shard gauges (documents, chunks, blocks,
bytes, resident memory) are refreshed from the shards every `refresh_s` by a task on the serving loop, so a
scrape never waits on the cluster. Labels are bounded: RPC method, status code, shard id — never a namespace
or document name (clients choose those).
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("engram")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SHARD_GAUGES = ("documents", "chunks", "blocks", "tokens", "stored_bytes", "resident_bytes", "episodes")


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "engram_requests", "RPCs served, by method and status code", ["method", "code"], registry=r
        )
        self.latency = Histogram(
            "engram_request_seconds", "RPC latency", ["method"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.written = Counter("engram_written", "What writes stored", ["kind"], registry=r)  # documents, chunks...
        self.ask_stage = Histogram(
            "engram_ask_stage_seconds",
            "Ask latency by stage (embed, retrieve, fetch, ttft, decode, total)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.shards = Gauge("engram_shards", "Shard actors in the cluster", registry=r)
        self.shard = {
            k: Gauge(f"engram_shard_{k}", f"Per-shard {k.replace('_', ' ')}", ["shard"], registry=r)
            for k in SHARD_GAUGES
        }
        self.rebalance_moved = Gauge(
            "engram_rebalance_moved_chunks", "Chunks moved by the latest rebalance", registry=r
        )
        self.rebalance_running = Gauge("engram_rebalance_running", "1 while a rebalance runs", registry=r)
        self._server = None

    def serve(self, host: str, port: int) -> int | None:
        """Start the /metrics HTTP endpoint; returns its port (None if it could not bind: metrics are optional)."""
        try:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            log.warning("metrics: cannot listen on %s:%d (%s); serving without /metrics", host, port, e)
            return None
        return self._server.server_port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def observe_stats(self, stats) -> None:
        """stats: the engine's ClusterStats."""
        self.shards.set(len(stats.shards))
        for sh in stats.shards:
            for k in SHARD_GAUGES:
                self.shard[k].labels(shard=str(sh.shard)).set(getattr(sh, k))
        self.rebalance_moved.set(stats.rebalance.moved_chunks)
        self.rebalance_running.set(int(stats.rebalance.running))

    async def refresh_forever(self, engine, refresh_s: float) -> None:
        while True:
            try:
                self.observe_stats(await engine.stats())
            except Exception as e:
                log.warning("metrics refresh failed: %s", e)
            await asyncio.sleep(refresh_s)
