"""The write path: tokenise, chunk, encode the chunks no shard holds yet, commit on every shard."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..errors import EngramError, ErrorCode, error_of
from . import routing
from .cluster import Cluster
from .intents import Intent
from .retry import retry, shard_failure

log = logging.getLogger("engram")


@dataclass
class Written:
    chunks: int
    tokens: int
    new_blocks: int  # blocks encoded for this document (the rest were stored already)


def identity(request_id: str, text: str) -> str:
    """What shards store as a document's request: the client's request id and a digest of the text, so a replay
    is recognised only when both match. Without a request id a fresh one: nothing is a replay of it."""
    return f"{request_id or 'once-' + uuid.uuid4().hex}|{hashlib.blake2b(text.encode(), digest_size=16).hexdigest()}"


class Writer:
    def __init__(self, cluster: Cluster, tokenizer):
        self.cluster, self.cfg, self.tokenizer = cluster, cluster.cfg, tokenizer
        self.reserved: Counter[str] = Counter()  # tokens of admitted new documents being written, per namespace

    def tokenize(self, text: str) -> np.ndarray:
        """[N] int32, tokenised piece by piece: a 256 MiB document's ~64M ids take 256 MB so, where a list of
        Python ints takes ~2.5 GB and the tokenizer given the whole text tens of GB."""
        return routing.tokenize(self.tokenizer, text)

    async def write_document(self, namespace: str, name: str, text: str, request_id: str = "") -> Written:
        """Durable on return. Idempotent under (`request_id`, the text): a retry of an acknowledged (or half-done)
        write stores nothing twice, while the same request id with other text is ALREADY_EXISTS. Writes of one
        document name run one at a time, so two writers never mix their chunks. Rides out shard restarts
        (`cluster.write_attempts`); if it still fails, a document this call created is rolled back everywhere, so a
        failed write leaves nothing behind."""
        c = self.cluster
        epoch = c.epoch
        c.writes_in_flight[epoch] += 1
        try:  # the routing this write starts with is the one it finishes with (a rebalance waits for it)
            async with c.doc_lock(namespace, name):
                try:
                    return await self._write(namespace, name, text, identity(request_id, text), c.shard_ids, c.shards)
                finally:
                    c.writing.discard((namespace, name))
        finally:
            c.writes_in_flight[epoch] -= 1

    async def _write(
        self, namespace: str, name: str, text: str, request_id: str, shard_ids: list[int], shards: list
    ) -> Written:
        existing = await self.cluster.all_shards("document_request", namespace, name, shards=shards)
        if any(r is not None and r != request_id for r in existing):
            raise EngramError(
                ErrorCode.ALREADY_EXISTS,
                f"document {name!r} already exists in namespace "
                f"{namespace!r}; delete it first or use another document_id",
            )
        ids = await asyncio.to_thread(self.tokenize, text)
        digest = await asyncio.to_thread(lambda: hashlib.sha256(text.encode()).hexdigest())  # listings, syncs
        written = time.time()
        if not len(ids):
            raise EngramError(ErrorCode.INVALID, f"document {name!r} has no tokens")
        fresh = all(r is None for r in existing)  # never touch a document an earlier request acknowledged
        admitted = await self._admit(namespace, name, len(ids), shards) if fresh else 0
        try:
            return await self._write_tokens(
                namespace, name, request_id, ids, (digest, written), fresh, shard_ids, shards
            )
        finally:
            self.reserved[namespace] -= admitted

    async def _admit(self, namespace: str, name: str, tokens: int, shards: list) -> int:
        """A new document's tokens against its namespace's quota (cluster.namespace_max_tokens) -> the tokens
        reserved (release them when the write ends). Reserved before the shards are asked, so concurrent writes
        count each other: together they never pass the quota."""
        quota = self.cfg.cluster.namespace_max_tokens
        if not quota:
            return 0
        self.reserved[namespace] += tokens
        try:
            used = sum(await self.cluster.all_shards("namespace_tokens", namespace, shards=shards))
        except BaseException:
            self.reserved[namespace] -= tokens
            raise
        if used + self.reserved[namespace] > quota:
            self.reserved[namespace] -= tokens
            raise EngramError(
                ErrorCode.EXHAUSTED,
                f"namespace {namespace!r} holds {used} tokens of its quota of {quota} "
                f"(cluster.namespace_max_tokens); document {name!r} needs {tokens} more"
                + (f" and {self.reserved[namespace]} are being written" if self.reserved[namespace] else "")
                + ": delete documents or raise the quota",
            )
        return tokens

    async def _write_tokens(
        self,
        namespace: str,
        name: str,
        request_id: str,
        ids: np.ndarray,
        about: tuple[str, float],
        fresh: bool,
        shard_ids: list[int],
        shards: list,
    ) -> Written:
        digest, written = about
        e = self.cfg.encoder
        chunks = routing.split(ids, self.cluster.layout.chunk_tokens, e.cut_context_tokens, e.key_after_tokens)
        hashes = self.addresses(namespace, chunks)
        owner = [routing.route(h, shard_ids) for h in hashes]
        per_shard = {s: [i for i, o in enumerate(owner) if o == s] for s in shard_ids}

        async def wait_for_shards(attempt: int, exc: BaseException) -> None:
            await asyncio.gather(*[self.cluster.call(s.stats) for s in shards], return_exceptions=True)

        intent = Intent(namespace, name, request_id)
        if fresh:
            self.cluster.writing.add((namespace, name))  # reads skip the document until it is whole
        try:
            if fresh:
                await self._finish(asyncio.to_thread(self.cluster.intents.begin, intent))
            new_blocks = await retry(
                lambda: self._write_once(
                    namespace, name, request_id, chunks, hashes, per_shard, shards, (digest, written)
                ),
                self.cfg.cluster.write_attempts,
                shard_failure,
                wait_for_shards,
                what=f"write {namespace}/{name}",
            )
        except BaseException as exc:  # failed, or cancelled (client deadline): take back what this write committed
            if fresh:
                try:
                    await self._finish(self.rollback(intent, shards))
                except Exception:
                    log.exception(
                        "rollback of %s/%s did not finish; its intent is repaired on restart", namespace, name
                    )
            if not isinstance(exc, Exception):
                raise
            err = error_of(exc)
            if err is not None and err.code != ErrorCode.STALE:
                raise EngramError(err.code, str(err)) from None
            if not shard_failure(exc):
                raise
            raise EngramError(
                ErrorCode.UNAVAILABLE,
                f"write of {name!r} failed ({type(exc).__name__}) and was "
                "rolled back; nothing of it is stored, retry with the same request_id",
            ) from None
        if fresh:
            await self._finish(asyncio.to_thread(self.cluster.intents.end, intent))  # before the acknowledgement
        return Written(len(chunks), len(ids), new_blocks)

    def addresses(self, namespace: str, chunks: list[routing.Chunk]) -> list[bytes]:
        """The chunks' content addresses, scoped to the namespace unless cluster.dedup_scope = "cluster"."""
        scope = namespace if self.cfg.cluster.dedup_scope == "namespace" else ""
        return [routing.chunk_hash(ch.tokens, self.cluster.fingerprint, ch.context, scope, ch.after) for ch in chunks]

    async def rollback(self, intent: Intent, shards: list | None = None) -> None:
        """Remove this write's chunks from every shard (only this identity's), then its intent. Retried until the
        shards answer: an intent stays on disk, to be repaired on the next start, if they never do."""
        await self.cluster.all_shards("delete_document", intent.namespace, intent.name, intent.identity, shards=shards)
        await asyncio.to_thread(self.cluster.intents.end, intent)

    @staticmethod
    async def _finish(work) -> None:
        """Run `work` to the end even if this request is cancelled meanwhile, then let the cancellation through.
        The document lock stays held all along, so no retry of the write interleaves with its rollback."""
        task = asyncio.ensure_future(work)
        cancelled = False
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                cancelled = True
            except Exception:
                break
        if cancelled:
            if not task.cancelled():
                task.exception()  # seen: the cancellation is what the caller gets
            raise asyncio.CancelledError
        task.result()  # its own failure, if any

    async def _write_once(
        self, namespace: str, name: str, request_id: str, chunks, hashes, per_shard, shards: list, about: tuple
    ) -> int:
        """about: (sha256 hex of the text, unix seconds written), kept with the document on its shards."""
        new_blocks = 0
        sem = asyncio.Semaphore(self.cfg.cluster.max_in_flight or 2 * len(self.cluster.encoders))
        done = {"chunks": 0, "logged": time.perf_counter(), "t0": time.perf_counter()}

        async def encode_and_put(shard: int, batch: list[int]) -> None:
            async with sem:
                ref = self.cluster.next_encoder().encode.remote(
                    [chunks[i].tokens.tolist() for i in batch],
                    [hashes[i] for i in batch],
                    [chunks[i].context.tolist() for i in batch],
                    [chunks[i].after.tolist() for i in batch],
                )
                await shards[shard].put_blocks.remote(ref)  # the KV goes encoder -> shard, not through here
            done["chunks"] += len(batch)
            if time.perf_counter() - done["logged"] > 10:  # progress of long writes, every 10 s
                done["logged"] = time.perf_counter()
                rate = done["chunks"] * self.cluster.layout.chunk_tokens / (done["logged"] - done["t0"])
                log.info(
                    "write %s/%s: encoded %d/%d new chunks (%.0f tokens/s)",
                    namespace,
                    name,
                    done["chunks"],
                    new_blocks,
                    rate,
                )

        unique = {s: list(dict.fromkeys(hashes[i] for i in idx)) for s, idx in per_shard.items()}
        missing = await asyncio.gather(*[self.cluster.call(shards[s].missing, unique[s]) for s in unique])
        batches = []  # (shard, chunk indices): the chunks no shard holds yet, first occurrence of each
        for (s, idx), absent in zip(per_shard.items(), missing):
            first: dict[bytes, int] = {}
            for i in idx:
                first.setdefault(hashes[i], i)
            todo = [first[h] for h, m in zip(unique[s], absent) if m]
            new_blocks += len(todo)
            step = self.cfg.encoder.batch_chunks
            batches += [(s, todo[j : j + step]) for j in range(0, len(todo), step)]
        # the coroutines are made and awaited together: a cancellation never leaves one unawaited
        await asyncio.gather(*[encode_and_put(s, batch) for s, batch in batches])
        await asyncio.gather(
            *[
                shards[s].commit_document.remote(
                    namespace,
                    name,
                    sum(len(chunks[i].tokens) for i in idx),
                    [hashes[i] for i in idx],
                    [chunks[i].seq for i in idx],
                    [chunks[i].offset for i in idx],
                    request_id,
                    *about,
                )
                for s, idx in per_shard.items()
                if idx
            ]
        )
        return new_blocks
