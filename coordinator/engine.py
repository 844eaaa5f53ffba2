"""The coordinator's Ray side: starts shard, encoder and decoder actors, fans writes and reads out, merges.

Knows Ray, not gRPC (server.py maps this onto the service). All methods are async and never block the loop:
Ray ObjectRefs are awaited, tokenisation runs in a thread.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from ..decoder import model as decoder_model
from ..decoder import quant
from ..workers.decoder_worker import DecoderWorker
from ..workers.encoder import Encoder, chunk_hash
from ..workers.episodic import hierarchical_readout, reference_pinv
from ..workers.shard import Shard, ShardError
from ..workers.store import StoreLayout
from . import chunking
from .config import EngramConfig

log = logging.getLogger("engram")


class EngramError(Exception):
    """A request error with a kind the server maps to a gRPC status."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code  # invalid | not_found | already_exists | unavailable


def shard_error(exc: BaseException) -> ShardError | None:
    """The ShardError a shard raised, whether Ray hands it back as such or wrapped in a RayTaskError."""
    for e in (exc, getattr(exc, "cause", None)):
        if isinstance(e, ShardError) and hasattr(e, "code"):
            return e
    return None


def shard_failure(exc: BaseException) -> bool:
    """A failure that retrying after the shards come back can fix: a shard died, or lost blocks staged before
    it died ("stale"). Anything else (a refused request, a bug) is not retried."""
    err = shard_error(exc)
    if err is not None:
        return err.code == "stale"
    return isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError))


@dataclass
class Retrieved:
    score: float
    shard: int
    block: int
    document_id: str
    seq: int
    offset: int


def _unique(hits: list[Retrieved]) -> list[Retrieved]:
    """Drop repeats of a (document, chunk): while a rebalance moves a chunk it is briefly on two shards."""
    seen: set[tuple[str, int]] = set()
    return [h for h in hits if (h.document_id, h.seq) not in seen and not seen.add((h.document_id, h.seq))]


def top_hits(hits: list[Retrieved], top_k: int, min_score_ratio: float) -> list[Retrieved]:
    """The global top-k of all shards' hits, best first, less those scoring under min_score_ratio x the best."""
    hits = _unique(sorted(hits, key=lambda h: -h.score))[:top_k]
    if hits and hits[0].score > 0:  # a ratio of a non-positive best score would keep everything or nothing
        hits = [h for h in hits if h.score >= min_score_ratio * hits[0].score]
    return hits


def store_layout(cfg: EngramConfig) -> StoreLayout:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(decoder_model.model_path(cfg.decoder))
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    t = cfg.encoder.chunk_tokens
    keep = t if cfg.encoder.keep_tokens <= 0 else min(cfg.encoder.keep_tokens, t)
    if t % cfg.encoder.span or keep % cfg.encoder.span:
        raise ValueError(f"encoder.chunk_tokens ({t}) and keep_tokens ({keep}) must be multiples of span ({cfg.encoder.span})")
    quant.check_dtype(cfg.encoder.kv_dtype)
    room = getattr(c, "max_position_embeddings", 1 << 30) - 1 - t  # [sink] + context + chunk must fit the window
    if not 0 <= cfg.encoder.context_tokens <= room:
        raise ValueError(f"encoder.context_tokens must be between 0 and {room}, not {cfg.encoder.context_tokens}")
    return StoreLayout(c.num_hidden_layers, c.num_key_value_heads, keep, head_dim, t, cfg.shard.episodic.dim,
                       cfg.encoder.windows, cfg.encoder.kv_dtype)


class Engine:
    def __init__(self, cfg: EngramConfig):
        self.cfg = cfg
        # Actors do not share the driver's working directory: hand them an absolute path.
        cfg.shard.data_dir = str(Path(cfg.shard.data_dir).expanduser().resolve())
        self.layout = store_layout(cfg)  # converts the embedded GGUF once, before any worker starts
        self.tokenizer = decoder_model.load_tokenizer(cfg.decoder)
        self.tokenizer.model_max_length = 1 << 62  # we chunk ourselves; silence the length warning
        e = cfg.encoder
        self.fingerprint = (f"{cfg.decoder.model}|T{e.chunk_tokens}|S{self.layout.keep_tokens}|{e.span}|{e.scorer}|"
                            f"{e.embedder}|W{e.window_tokens}/{e.window_stride}"
                            + (f"|{e.kv_dtype}" if e.kv_dtype != "float16" else ""))  # fp16 stores predate kv_dtype
        self.m0_pinv = reference_pinv(cfg.shard.episodic)
        self.resume_rebalance = False
        self.shard_ids = self._routing_table()
        # Growing the cluster: writes register under the routing epoch they started in, so a rebalance can wait
        # for every write routed the old way to finish before it moves chunks; a document's move and its
        # deletion exclude each other.
        self._epoch = 0
        self._writes_in_flight: collections.Counter[int] = collections.Counter()
        self._doc_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._grow_lock: asyncio.Lock | None = None
        self.rebalance_state = {"running": False, "moved_chunks": 0, "scanned_shards": 0, "total_shards": 0,
                                "error": ""}
        self._rebalance_task: asyncio.Task | None = None
        self._start_actors()

    def _routing_table(self) -> list[int]:
        """Routing is a pure function of the shard ids and the content fingerprint; both are persisted in
        <data_dir>/cluster.json so a restarted coordinator routes exactly as before (namespaces and documents
        live in the shards' own stores). A cluster grown with `engram shards add` keeps its size on restart."""
        path = Path(self.cfg.shard.data_dir) / "cluster.json"
        want = {"shards": list(range(self.cfg.cluster.shards)), "fingerprint": self.fingerprint}
        if not path.exists():
            self._persist_routing(want["shards"], rebalancing=False)
            return want["shards"]
        have = json.loads(path.read_text())
        if have["fingerprint"] != want["fingerprint"] or len(want["shards"]) > len(have["shards"]):
            raise ValueError(f"{self.cfg.shard.data_dir} holds a cluster of {len(have['shards'])} shards "
                             f"written with {have['fingerprint']!r}; this configuration asks for "
                             f"{len(want['shards'])} shards with {want['fingerprint']!r}. Start with the "
                             "same encoder settings and at most as many shards (grow a running cluster with "
                             "`engram shards add N`), or use a new data_dir.")
        if len(have["shards"]) > len(want["shards"]):
            log.info("cluster.json: %d shards (grown online); configuration said %d", len(have["shards"]),
                     len(want["shards"]))
        self.resume_rebalance = bool(have.get("rebalancing"))
        return have["shards"]

    def _persist_routing(self, shard_ids: list[int], rebalancing: bool) -> None:
        path = Path(self.cfg.shard.data_dir) / "cluster.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({"shards": shard_ids, "fingerprint": self.fingerprint, "rebalancing": rebalancing}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    # --- actors ----------------------------------------------------------------------------------------------------
    def _start_actors(self) -> None:
        c = self.cfg.cluster
        if not ray.is_initialized():
            ray.init(address=c.address, num_cpus=c.num_cpus if c.address is None else None,
                     namespace=c.namespace, include_dashboard=False, log_to_driver=True)
        resources = ray.cluster_resources()
        has_gpu = resources.get("GPU", 0) >= 1
        n_enc = c.encoders or max(1, int(resources.get("CPU", 1) // c.encoder_cpus))
        threads = max(1, int(c.encoder_cpus))
        enc_dec = decoder_model.DecoderConfig(**{**vars(self.cfg.decoder), "threads": threads})
        self.shards = [self._shard_actor(i) for i in self.shard_ids]
        # Ray hides GPUs from actors that ask for none, so device "auto" picks CUDA exactly when one is granted.
        enc_actor = ray.remote(Encoder).options(num_cpus=c.encoder_cpus, num_gpus=c.encoder_gpus,
                                                max_restarts=-1, max_task_retries=3)
        self.encoders = [enc_actor.remote(self.cfg.encoder, enc_dec) for _ in range(n_enc)]
        gpus = c.decoder_gpus if c.decoder_gpus is not None else (1 if has_gpu else 0)
        self.decoder = ray.remote(DecoderWorker).options(num_cpus=0, num_gpus=gpus, max_restarts=-1,
                                                         max_task_retries=3).remote(
            self.cfg.decoder, self.cfg.ask.position_scheme, self.cfg.encoder.kv_dtype)
        self._next_encoder = itertools.cycle(self.encoders)
        ray.get([s.stats.remote() for s in self.shards] + [e.embed.remote(["warm up"]) for e in self.encoders]
                + [self.decoder.answer.remote("warm up", self.layout.chunk_tokens, 1, [])])

    def _shard_actor(self, i: int):
        c = self.cfg.cluster
        return ray.remote(Shard).options(
            num_cpus=0, max_restarts=-1, max_task_retries=0, name=f"shard-{i}", get_if_exists=True,
            resources={c.shard_resource: 1} if c.shard_resource else None).remote(i, self.cfg.shard, self.layout)

    async def _call(self, method, *args, attempts: int = 20):
        """Call a shard method that is safe to retry, riding out a shard restart (kill -9, node restart)."""
        for attempt in range(attempts):
            try:
                return await method.remote(*args)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                if attempt == attempts - 1:
                    raise EngramError("unavailable", "a memory shard is down and did not come back; retry later")
                await asyncio.sleep(min(0.25 * 2**attempt, 2.0))

    # --- write -----------------------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    async def write_document(self, namespace: str, name: str, text: str, request_id: str = "") -> dict:
        """Tokenise, chunk, encode the chunks no shard holds yet, and commit on every shard. Durable on return.

        Idempotent under `request_id`: a retry of an acknowledged (or half-done) write stores nothing twice.
        Rides out shard restarts (`cluster.write_attempts`); if it still fails, a document this call created
        is rolled back everywhere, so a failed write leaves nothing behind."""
        epoch = self._epoch
        self._writes_in_flight[epoch] += 1
        try:
            return await self._write_document(namespace, name, text, request_id, self.shard_ids, self.shards)
        finally:
            self._writes_in_flight[epoch] -= 1

    async def _write_document(self, namespace: str, name: str, text: str, request_id: str, shard_ids: list[int],
                              shards: list) -> dict:
        existing = await asyncio.gather(*[self._call(s.document_request, namespace, name) for s in shards])
        if any(r is not None and (not request_id or r != request_id) for r in existing):
            raise EngramError("already_exists", f"document {name!r} already exists in namespace {namespace!r}; "
                              "delete it first or use another document_id")
        ids = await asyncio.to_thread(self.tokenize, text)
        if not ids:
            raise EngramError("invalid", f"document {name!r} has no tokens")
        chunks = chunking.split(ids, self.layout.chunk_tokens, self.cfg.encoder.context_tokens)
        hashes = [chunk_hash(c.tokens, self.fingerprint, c.context) for c in chunks]
        owner = [chunking.route(h, shard_ids) for h in hashes]
        per_shard = {s: [i for i, o in enumerate(owner) if o == s] for s in shard_ids}
        last: Exception | None = None
        for attempt in range(self.cfg.cluster.write_attempts):
            try:
                new_blocks = await self._write_once(namespace, name, request_id, chunks, hashes, per_shard, shards)
                return {"chunks": len(chunks), "tokens": len(ids), "new_blocks": new_blocks}
            except Exception as exc:
                err = shard_error(exc)
                if err is not None and err.code != "stale":
                    last = EngramError(err.code, str(err))
                    break
                if not shard_failure(exc):
                    raise
                last = exc
                log.warning("write %s/%s attempt %d failed (%s); waiting for the shards", namespace, name,
                            attempt + 1, type(exc).__name__)
                await asyncio.gather(*[self._call(s.stats) for s in shards], return_exceptions=True)
        if all(r is None for r in existing):  # never touch a document an earlier request acknowledged
            await asyncio.gather(*[self._call(s.delete_document, namespace, name) for s in shards],
                                 return_exceptions=True)
        if isinstance(last, EngramError):
            raise last
        raise EngramError("unavailable", f"write of {name!r} failed ({type(last).__name__}) and was rolled back; "
                          "nothing of it is stored, retry with the same request_id")

    async def _write_once(self, namespace: str, name: str, request_id: str, chunks, hashes, per_shard,
                          shards: list) -> int:
        new_blocks = 0
        sem = asyncio.Semaphore(self.cfg.cluster.max_in_flight or 2 * len(self.encoders))
        done = {"chunks": 0, "logged": time.perf_counter(), "t0": time.perf_counter()}

        async def encode_and_put(shard: int, batch: list[int]) -> None:
            async with sem:
                ref = next(self._next_encoder).encode.remote([chunks[i].tokens for i in batch], [hashes[i] for i in batch],
                                                             [chunks[i].context for i in batch])
                await shards[shard].put_blocks.remote(ref)  # the KV goes encoder -> shard, not through here
            done["chunks"] += len(batch)
            if time.perf_counter() - done["logged"] > 10:  # progress of long writes, every 10 s
                done["logged"] = time.perf_counter()
                rate = done["chunks"] * self.layout.chunk_tokens / (done["logged"] - done["t0"])
                log.info("write %s/%s: encoded %d/%d new chunks (%.0f tokens/s)", namespace, name, done["chunks"],
                         new_blocks, rate)

        jobs = []
        for s, idx in per_shard.items():
            unique = list(dict.fromkeys(hashes[i] for i in idx))
            missing = await self._call(shards[s].missing, unique)
            first: dict[bytes, int] = {}
            for i in idx:
                first.setdefault(hashes[i], i)
            todo = [first[h] for h, m in zip(unique, missing) if m]
            new_blocks += len(todo)
            step = self.cfg.encoder.batch_chunks
            jobs += [encode_and_put(s, todo[j : j + step]) for j in range(0, len(todo), step)]
        await asyncio.gather(*jobs)
        await asyncio.gather(*[
            shards[s].commit_document.remote(
                namespace, name, sum(len(chunks[i].tokens) for i in idx), [hashes[i] for i in idx],
                [chunks[i].seq for i in idx], [chunks[i].offset for i in idx], request_id)
            for s, idx in per_shard.items() if idx
        ])
        return new_blocks

    # --- read ------------------------------------------------------------------------------------------------------
    async def namespaces(self) -> set[str]:
        return set().union(*await asyncio.gather(*[self._call(s.namespaces) for s in self.shards]))

    async def retrieve(self, namespace: str, query: str, top_k: int) -> tuple[list[Retrieved], np.ndarray, dict]:
        t0 = time.perf_counter()
        z = (await next(self._next_encoder).embed.remote([query]))[0]
        t1 = time.perf_counter()
        results = await asyncio.gather(*[self._call(s.search, namespace, z, top_k) for s in self.shards])
        if not any(r["episodes"] for r in results):
            raise EngramError("not_found", f"namespace {namespace!r} holds no documents; write some first")
        hits = [Retrieved(float(sc), s, int(b), d, int(q), int(o))
                for s, r in zip(self.shard_ids, results)
                for sc, b, d, q, o in zip(r["score"], r["block"], r["doc"], r["seq"], r["offset"])]
        hits = top_hits(hits, top_k, self.cfg.ask.min_score_ratio)
        readouts = np.stack([r["readout"] for r in results if r["episodes"]])
        readout = hierarchical_readout(readouts, z, self.m0_pinv, self.cfg.shard.episodic)
        return hits, readout, {"embed_s": t1 - t0, "retrieve_s": time.perf_counter() - t1}

    async def neighbors(self, namespace: str, hits: list[Retrieved]) -> list[Retrieved]:
        """The `ask.neighbors` chunks following each hit (from whichever shard holds them), not already hits."""
        n = self.cfg.ask.neighbors
        have = {(h.document_id, h.seq) for h in hits}
        want: dict[str, dict[int, float]] = {}
        for h in hits:
            for seq in range(h.seq + 1, h.seq + 1 + n):
                if (h.document_id, seq) not in have:
                    want.setdefault(h.document_id, {})[seq] = max(want.get(h.document_id, {}).get(seq, -1e9), h.score)
        if not want:
            return []
        docs = list(want)
        found = await asyncio.gather(*[self._call(s.chunks_at, namespace, d, list(want[d]))
                                       for d in docs for s in self.shards])
        out = []
        for i, rows in enumerate(found):
            doc, shard = docs[i // len(self.shards)], self.shard_ids[i % len(self.shards)]
            out += [Retrieved(want[doc][seq], shard, block, doc, seq, offset) for seq, offset, block in rows]
        return _unique(out)

    def arrange(self, hits: list[Retrieved]) -> list[Retrieved]:
        """Reading order of the blocks before the question (ask.block_order)."""
        by_doc = sorted(hits, key=lambda h: (h.document_id, h.seq))
        if self.cfg.ask.block_order == "document":
            return by_doc
        runs: list[list[Retrieved]] = []
        for h in by_doc:  # consecutive chunks of a document stay together, in order
            if runs and runs[-1][-1].document_id == h.document_id and runs[-1][-1].seq + 1 == h.seq:
                runs[-1].append(h)
            else:
                runs.append([h])
        runs.sort(key=lambda run: max(h.score for h in run))  # best run last, nearest the question
        return [h for run in runs for h in run]

    async def chunk_tokens(self, hits: list[Retrieved]) -> list[list[int]]:
        by_shard: dict[int, list[int]] = {}
        for h in hits:
            by_shard.setdefault(h.shard, []).append(h.block)
        tokens = dict(zip(by_shard, await asyncio.gather(
            *[self._call(self.shards[s].get_tokens, b) for s, b in by_shard.items()])))
        cursor = {s: 0 for s in by_shard}
        out = []
        for h in hits:
            out.append(tokens[h.shard][cursor[h.shard]])
            cursor[h.shard] += 1
        return out

    async def chunk_texts(self, hits: list[Retrieved]) -> list[str]:
        return [self.tokenizer.decode(t) for t in await self.chunk_tokens(hits)]

    async def ask(self, namespace: str, question: str, top_k: int, max_new_tokens: int, mode: str = "memory") -> dict:
        """mode "memory": the decoder attends to the retrieved chunks' stored KV blocks. "rag": the baseline —
        the same retrieved chunks' text prefilled again as the prompt."""
        t0, w0 = time.perf_counter(), time.time()
        hits, _, timings = await self.retrieve(namespace, question, top_k)
        reading = self.arrange(hits + await self.neighbors(namespace, hits))
        t_fetch = time.perf_counter()
        if mode == "rag":
            tokens = await self.chunk_tokens(reading)
            out = await self.decoder.answer_tokens.remote(question, max_new_tokens, tokens)
            texts = [self.tokenizer.decode(t) for t in tokens]
        else:
            shards = sorted({h.shard for h in reading})
            refs = [self.shards[s].get_blocks.remote([h.block for h in reading if h.shard == s]) for s in shards]
            cursor = {s: 0 for s in shards}
            order = []
            for h in reading:
                order.append((shards.index(h.shard), cursor[h.shard]))
                cursor[h.shard] += 1
            out, texts = await asyncio.gather(
                self.decoder.answer.remote(question, self.layout.chunk_tokens, max_new_tokens, order, *refs),
                self.chunk_texts(reading))
        timings.update(fetch_s=out["started_wall"] - w0 - (t_fetch - t0), ttft_s=out["first_token_wall"] - w0,
                       decode_s=out["decode_s"], total_s=time.perf_counter() - t0)
        return {"answer": out["text"], "hits": reading, "texts": texts, "timings": timings,
                "context_tokens": out["context_tokens"]}

    async def read(self, namespace: str, query: str, top_k: int) -> dict:
        t0 = time.perf_counter()
        hits, readout, timings = await self.retrieve(namespace, query, top_k)
        texts = await self.chunk_texts(hits)
        timings["total_s"] = time.perf_counter() - t0
        return {"hits": hits, "texts": texts, "readout": readout, "timings": timings}

    async def delete(self, namespace: str, name: str) -> int:
        async with self._doc_lock(namespace, name):  # not while a rebalance moves this document
            removed = await asyncio.gather(*[self._call(s.delete_document, namespace, name) for s in self.shards])
        if not sum(removed):  # a document lives on a shard only through its chunks
            raise EngramError("not_found", f"no document {name!r} in namespace {namespace!r}")
        return int(sum(removed))

    async def stats(self) -> dict:
        shards = await asyncio.gather(*[self._call(s.stats) for s in self.shards])
        total = {k: sum(s[k] for s in shards) for k in ("chunks", "blocks", "tokens", "stored_bytes")}
        # a document's chunks spread over shards: count each (namespace, document) once
        total["documents"] = len(set().union(*await asyncio.gather(*[self._call(s.documents) for s in self.shards])))
        total["bytes_per_token"] = total["stored_bytes"] / total["tokens"] if total["tokens"] else 0.0
        unique_tokens = total["blocks"] * self.layout.chunk_tokens
        total["unique_bytes_per_token"] = total["stored_bytes"] / unique_tokens if unique_tokens else 0.0
        lay = self.layout
        total["full_fp16_kv_bytes_per_token"] = float(lay.layers * 2 * lay.kv_heads * lay.head_dim * 2)
        return {"shards": shards, **total, "rebalance": dict(self.rebalance_state)}

    # --- growth ----------------------------------------------------------------------------------------------------
    def _doc_lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self._doc_locks.setdefault((namespace, name), asyncio.Lock())

    def start_background(self) -> None:
        """On the serving event loop: finish a rebalance an earlier coordinator left unfinished."""
        if self.resume_rebalance and self._rebalance_task is None:
            log.info("resuming an unfinished rebalance over %d shards", len(self.shard_ids))
            self._rebalance_task = asyncio.ensure_future(self.rebalance())

    async def add_shards(self, count: int) -> dict:
        """Start `count` more shard actors and route new writes to them at once; the chunks that now belong to
        them move in the background (`rebalance`), while reads and writes go on. -> the new shard ids."""
        if count < 1 or count > 1024:
            raise EngramError("invalid", f"count must be between 1 and 1024 shards, got {count}")
        if self.rebalance_state["running"]:
            raise EngramError("busy", "a rebalance is still running; wait until Stats shows it finished")
        self._grow_lock = self._grow_lock or asyncio.Lock()
        async with self._grow_lock:
            new_ids = list(range(len(self.shard_ids), len(self.shard_ids) + count))
            actors = [self._shard_actor(i) for i in new_ids]
            await asyncio.gather(*[a.stats.remote() for a in actors])  # up and holding their (empty) stores
            ids = self.shard_ids + new_ids
            await asyncio.to_thread(self._persist_routing, ids, True)
            # From here new writes route over every shard; lists are replaced, not mutated, so a write that
            # began earlier keeps the routing it started with.
            self.shard_ids, self.shards = ids, self.shards + actors
            self._epoch += 1
            self.rebalance_state.update(running=True, moved_chunks=0, scanned_shards=0, total_shards=len(ids),
                                        error="")
            self._rebalance_task = asyncio.ensure_future(self.rebalance())
        log.info("added shards %s; rebalancing", new_ids)
        return {"shards": ids, "added": new_ids}

    async def rebalance(self) -> int:
        """Move every chunk to the shard the current routing gives it: copy its block and row to the new owner,
        then drop it at the old one, one (document, shard) at a time. Idempotent: a crash midway leaves chunks
        on one shard or briefly on two (reads de-duplicate), never on none; rerunning finishes the job."""
        epoch, ids, shards = self._epoch, self.shard_ids, self.shards
        self.rebalance_state.update(running=True, scanned_shards=0, total_shards=len(ids), error="")
        try:
            while any(n for e, n in self._writes_in_flight.items() if e < epoch):
                await asyncio.sleep(0.05)  # writes routed the old way finish first: nothing is left behind
            for s in ids:
                for namespace, name, hashes in await self._call(shards[s].chunk_table):
                    if any(chunking.route(h, ids) != s for h in hashes):
                        async with self._doc_lock(namespace, name):
                            self.rebalance_state["moved_chunks"] += await self._move_document(
                                s, namespace, name, ids, shards)
                self.rebalance_state["scanned_shards"] += 1
            await asyncio.to_thread(self._persist_routing, ids, False)
            log.info("rebalance done: %d chunks moved", self.rebalance_state["moved_chunks"])
        except Exception as exc:
            self.rebalance_state["error"] = f"{type(exc).__name__}: {exc}"
            log.exception("rebalance failed; it resumes on the next coordinator start or `engram shards add`")
            raise
        finally:
            self.rebalance_state["running"] = False
        return self.rebalance_state["moved_chunks"]

    async def _move_document(self, s: int, namespace: str, name: str, ids: list[int], shards: list) -> int:
        for attempt in range(self.cfg.cluster.write_attempts):
            try:
                doc = await self._call(shards[s].doc_chunks, namespace, name)  # fresh, under the document's lock
                if doc is None:
                    return 0
                dest: dict[int, list[int]] = {}
                for i, h in enumerate(doc["hash"]):
                    t = chunking.route(h, ids)
                    if t != s:
                        dest.setdefault(t, []).append(i)
                for t, rows in dest.items():
                    unique = list(dict.fromkeys(doc["hash"][i] for i in rows))
                    need = [h for h, m in zip(unique, await self._call(shards[t].missing, unique)) if m]
                    step = self.cfg.encoder.batch_chunks
                    for j in range(0, len(need), step):  # blocks go shard -> shard, not through the coordinator
                        await shards[t].put_blocks.remote(shards[s].export_blocks.remote(need[j : j + step]))
                    await shards[t].import_chunks.remote(namespace, name, doc["request"],
                                                         *[[doc[k][i] for i in rows]
                                                           for k in ("hash", "seq", "offset", "length")])
                moved = [doc["seq"][i] for rows in dest.values() for i in rows]
                await self._call(shards[s].drop_chunks, namespace, name, moved)
                return len(moved)
            except Exception as exc:
                if not shard_failure(exc) or attempt == self.cfg.cluster.write_attempts - 1:
                    raise
                log.warning("moving %s/%s from shard %d: attempt %d failed (%s)", namespace, name, s, attempt + 1,
                            type(exc).__name__)
                await asyncio.gather(*[self._call(a.stats) for a in shards], return_exceptions=True)
        return 0

    def shutdown(self) -> None:
        for a in [*self.shards, *self.encoders, self.decoder]:
            ray.kill(a, no_restart=True)
