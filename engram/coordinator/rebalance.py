"""Growing the cluster online: start shards, route new writes over all of them at once, and move the chunks
that now belong to the new shards in the background while reads and writes go on."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from ..errors import EngramError, ErrorCode
from . import routing
from .cluster import Cluster
from .retry import retry, shard_failure

log = logging.getLogger("engram")


@dataclass
class RebalanceState:
    running: bool = False
    moved_chunks: int = 0
    scanned_shards: int = 0
    total_shards: int = 0
    error: str = ""


class Rebalancer:
    def __init__(self, cluster: Cluster):
        self.cluster, self.cfg = cluster, cluster.cfg
        self.state = RebalanceState()
        self._grow_lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    def resume(self) -> None:
        """On the serving event loop: finish a rebalance an earlier coordinator left unfinished."""
        if self.cluster.resume_rebalance and self._task is None:
            log.info("resuming an unfinished rebalance over %d shards", len(self.cluster.shard_ids))
            self._task = asyncio.ensure_future(self.rebalance())

    async def add_shards(self, count: int) -> tuple[list[int], list[int]]:
        """Start `count` more shard actors and route new writes to them at once; the chunks that now belong to
        them move in the background. -> (every shard id, the new ones)."""
        if count < 1 or count > 1024:
            raise EngramError(ErrorCode.INVALID, f"count must be between 1 and 1024 shards, got {count}")
        c = self.cluster
        async with self._grow_lock:
            if self.state.running:
                raise EngramError(ErrorCode.BUSY, "a rebalance is still running; wait until Stats shows it finished")
            new_ids = list(range(len(c.shard_ids), len(c.shard_ids) + count))
            actors = [c.shard_actor(i) for i in new_ids]
            await asyncio.gather(*[a.stats.remote() for a in actors])  # up and holding their (empty) stores
            ids = c.shard_ids + new_ids
            await asyncio.to_thread(c.persist_routing, ids, True)
            # From here new writes route over every shard; lists are replaced, not mutated, so a write that
            # began earlier keeps the routing it started with.
            c.shard_ids, c.shards = ids, c.shards + actors
            c.epoch += 1
            self.state = RebalanceState(running=True, total_shards=len(ids))
            self._task = asyncio.ensure_future(self.rebalance())
        log.info("added shards %s; rebalancing", new_ids)
        return ids, new_ids

    async def rebalance(self) -> int:
        """Move every chunk to the shard the current routing gives it: copy its block and row to the new owner,
        then drop it at the old one, one (document, shard) at a time. Idempotent: a crash midway leaves chunks
        on one shard or briefly on two (reads de-duplicate), never on none; rerunning finishes the job."""
        c = self.cluster
        epoch, ids, shards = c.epoch, c.shard_ids, c.shards
        self.state.running, self.state.scanned_shards, self.state.total_shards, self.state.error = True, 0, len(ids), ""
        try:
            while any(n for e, n in c.writes_in_flight.items() if e < epoch):
                await asyncio.sleep(0.05)  # writes routed the old way finish first: nothing is left behind
            for s in ids:
                for doc in await c.call(shards[s].chunk_table):
                    if any(routing.route(h, ids) != s for h in doc.hashes):
                        async with c.doc_lock(doc.namespace, doc.name):
                            self.state.moved_chunks += await self._move_document(
                                s, doc.namespace, doc.name, ids, shards
                            )
                self.state.scanned_shards += 1
            await asyncio.to_thread(c.persist_routing, ids, False)
            log.info("rebalance done: %d chunks moved", self.state.moved_chunks)
        except Exception as exc:
            self.state.error = f"{type(exc).__name__}: {exc}"
            log.exception("rebalance failed; it resumes on the next coordinator start or `engram shards add`")
            raise
        finally:
            self.state.running = False
        return self.state.moved_chunks

    async def _move_document(self, s: int, namespace: str, name: str, ids: list[int], shards: list) -> int:
        c = self.cluster

        async def move_once() -> int:
            doc = await c.call(shards[s].doc_chunks, namespace, name)  # fresh, under the document's lock
            if doc is None:
                return 0
            dest: dict[int, list[int]] = {}
            for i, h in enumerate(doc.hash):
                t = routing.route(h, ids)
                if t != s:
                    dest.setdefault(t, []).append(i)
            for t, rows in dest.items():
                moving = doc.pick(rows)
                unique = list(dict.fromkeys(moving.hash))
                need = [h for h, m in zip(unique, await c.call(shards[t].missing, unique)) if m]
                step = self.cfg.encoder.batch_chunks
                for j in range(0, len(need), step):  # blocks go shard -> shard, not through the coordinator
                    await shards[t].put_blocks.remote(shards[s].export_blocks.remote(need[j : j + step]))
                await shards[t].import_chunks.remote(namespace, name, moving)
            moved = [doc.seq[i] for rows in dest.values() for i in rows]
            await c.call(shards[s].drop_chunks, namespace, name, moved)
            return len(moved)

        async def wait_for_shards(attempt: int, exc: BaseException) -> None:
            await asyncio.gather(*[c.call(a.stats) for a in shards], return_exceptions=True)

        return await retry(
            move_once,
            self.cfg.cluster.write_attempts,
            shard_failure,
            wait_for_shards,
            what=f"moving {namespace}/{name} from shard {s}",
        )
