"""The cluster: the actors (shards, encoder pool, query embedder, decoder worker), where they run, and the
routing table persisted in <data_dir>/cluster.json. Knows Ray, not gRPC."""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import os
from pathlib import Path

import ray

from ..decoder import model as decoder_model
from ..durable import write_atomically
from ..errors import EngramError, ErrorCode
from ..workers.embedder import Embedder
from ..workers.encoder import Encoder
from .config import EngramConfig, block_layout, content_fingerprint
from .decoder_actor import DecoderActor
from .intents import IntentLog
from .locks import DocLocks
from .retry import actor_down, retry
from .shard_actor import ShardActor

log = logging.getLogger("engram")


class Cluster:
    def __init__(self, cfg: EngramConfig):
        self.cfg = cfg
        # Actors do not share the driver's working directory: hand them an absolute path.
        cfg.shard.data_dir = str(Path(cfg.shard.data_dir).expanduser().resolve())
        self.layout = block_layout(cfg)  # converts the embedded GGUF once, before any worker starts
        self.fingerprint = content_fingerprint(cfg, self.layout)
        self.resume_rebalance = False
        self.shard_ids = self._routing_table()
        # Growing the cluster: writes register under the routing epoch they started in, so a rebalance can wait
        # for every write routed the old way to finish before it moves chunks; a document's move and its
        # deletion exclude each other.
        self.epoch = 0
        self.writes_in_flight: collections.Counter[int] = collections.Counter()
        self.doc_locks = DocLocks()
        self.writing: set[tuple[str, str]] = set()  # (namespace, document) of new documents being written
        self.intents = IntentLog(cfg.shard.data_dir, cfg.shard.fsync)
        self._start_actors()

    # --- routing table -----------------------------------------------------------------------------------------
    def _routing_table(self) -> list[int]:
        """Routing is a pure function of the shard ids and the content fingerprint; both are persisted in
        <data_dir>/cluster.json so a restarted coordinator routes exactly as before (namespaces and documents
        live in the shards' own stores). A cluster grown with `engram shards add` keeps its size on restart."""
        path = Path(self.cfg.shard.data_dir) / "cluster.json"
        want = {"shards": list(range(self.cfg.cluster.shards)), "fingerprint": self.fingerprint}
        if not path.exists():
            self.persist_routing(want["shards"], rebalancing=False)
            return want["shards"]
        have = json.loads(path.read_text())
        if have["fingerprint"] != want["fingerprint"] or len(want["shards"]) > len(have["shards"]):
            raise ValueError(
                f"{self.cfg.shard.data_dir} holds a cluster of {len(have['shards'])} shards "
                f"written with {have['fingerprint']!r}; this configuration asks for "
                f"{len(want['shards'])} shards with {want['fingerprint']!r}. Start with the "
                "same encoder settings and at most as many shards (grow a running cluster with "
                "`engram shards add N`), or use a new data_dir."
            )
        if len(have["shards"]) > len(want["shards"]):
            log.info(
                "cluster.json: %d shards (grown online); configuration said %d",
                len(have["shards"]),
                len(want["shards"]),
            )
        self.resume_rebalance = bool(have.get("rebalancing"))
        return have["shards"]

    def persist_routing(self, shard_ids: list[int], rebalancing: bool) -> None:
        path = Path(self.cfg.shard.data_dir) / "cluster.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        table = {"shards": shard_ids, "fingerprint": self.fingerprint, "rebalancing": rebalancing}
        write_atomically(path, json.dumps(table))

    def doc_lock(self, namespace: str, name: str):
        """`async with cluster.doc_lock(ns, name)`: one write, delete or move of a document at a time."""
        return self.doc_locks.hold(namespace, name)

    # --- actors ------------------------------------------------------------------------------------------------
    def _start_actors(self) -> None:
        c = self.cfg.cluster
        if not ray.is_initialized():
            if os.environ.get("RAY_AUTH_MODE") == "disabled":  # the default is token (coordinator/__init__.py)
                log.warning("RAY_AUTH_MODE=disabled: anyone who reaches this Ray cluster can call its actors")
            ray.init(
                # "local": always a new instance, never a stale or unrelated one this machine last started
                address=c.address or "local",
                num_cpus=c.num_cpus if c.address is None else None,
                namespace=c.namespace,
                include_dashboard=False,
                log_to_driver=True,  # actors' warnings and errors reach the server's log
                logging_level=logging.WARNING,  # not Ray's own start-up notes: `engram serve` says what serves
            )
        resources = ray.cluster_resources()
        has_gpu = resources.get("GPU", 0) >= 1
        n_enc = c.encoders or max(1, int(resources.get("CPU", 1) // c.encoder_cpus))
        enc_dec = decoder_model.DecoderConfig(**{**vars(self.cfg.decoder), "threads": max(1, int(c.encoder_cpus))})
        self.shards = [self.shard_actor(i) for i in self.shard_ids]
        # Ray hides GPUs from actors that ask for none, so device "auto" picks CUDA exactly when one is granted.
        self.encoders = [
            ray.remote(Encoder)
            .options(num_cpus=c.encoder_cpus, num_gpus=c.encoder_gpus, max_restarts=-1, max_task_retries=3)
            .remote(self.cfg.encoder, enc_dec, self.layout)
            for _ in range(n_enc)
        ]
        # Queries are embedded apart from the encoder pool: an Ask never waits behind an ingest batch.
        self.embedder = (
            ray.remote(Embedder)
            .options(num_cpus=0, max_restarts=-1, max_task_retries=3)
            .remote(self.cfg.encoder.embedder, 1)
        )
        gpus = c.decoder_gpus if c.decoder_gpus is not None else (1 if has_gpu else 0)
        batch = self.cfg.ask.max_batch
        self.decoder = (
            ray.remote(DecoderActor)
            # batching: each waiting ask holds a call (a thread) while the batch thread decodes; a second batch
            # forms while one decodes
            .options(
                num_cpus=0,
                num_gpus=gpus,
                max_restarts=-1,
                max_task_retries=3,
                max_concurrency=2 * batch + 2 if batch > 1 else 1,
            )
            .remote(
                self.cfg.decoder,
                self.cfg.ask.position_scheme,
                self.cfg.encoder.kv_dtype,
                batch,
                self.cfg.encoder.kv_codec,
                self.layout.codec,
                self.cfg.ask.block_key_scale,
                self.cfg.ask.draft_tokens,
            )
        )
        self._next_encoder = itertools.cycle(self.encoders)
        ray.get(
            [s.stats.remote() for s in self.shards]
            + [self.embedder.embed.remote(["warm up"])]
            + [e.embed.remote(["warm up"]) for e in self.encoders]
            + [self.decoder.answer.remote("warm up", self.layout.chunk_tokens, 1, [])]
        )

    def shard_actor(self, i: int):
        c = self.cfg.cluster
        return (
            ray.remote(concurrency_groups={"health": 1})(ShardActor)  # ShardActor.ping answers while data calls queue
            .options(
                num_cpus=0,
                max_restarts=-1,
                max_task_retries=0,
                name=f"shard-{i}",
                get_if_exists=True,
                resources={c.shard_resource: 1} if c.shard_resource else None,
            )
            .remote(i, self.cfg.shard, self.layout)
        )

    def next_encoder(self):
        return next(self._next_encoder)

    async def call(self, method, *args, attempts: int = 20):
        """Call a shard method that is safe to retry, riding out a shard restart (kill -9, node restart)."""
        try:
            return await retry(lambda: method.remote(*args), attempts, actor_down)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            raise EngramError(
                ErrorCode.UNAVAILABLE, "a memory shard is down and did not come back; retry later"
            ) from None

    async def all_shards(self, name: str, *args, shards: list | None = None) -> list:
        """Call one retry-safe method on every shard (or on `shards`), in parallel."""
        return await asyncio.gather(*[self.call(getattr(s, name), *args) for s in shards or self.shards])

    async def ping(self, timeout: float) -> int:
        """How many shards answer within `timeout` seconds (no retries: this is the health probe)."""

        async def one(shard) -> None:
            await shard.ping.remote()

        answers = await asyncio.gather(
            *[asyncio.wait_for(one(s), timeout) for s in self.shards], return_exceptions=True
        )
        return sum(not isinstance(a, BaseException) for a in answers)

    def shutdown(self) -> None:
        for a in [*self.shards, *self.encoders, self.embedder, self.decoder]:
            ray.kill(a, no_restart=True)
