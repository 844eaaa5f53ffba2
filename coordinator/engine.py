"""The coordinator's Ray side: starts shard, encoder and decoder actors, fans writes and reads out, merges.

Knows Ray, not gRPC (server.py maps this onto the service). All methods are async and never block the loop:
Ray ObjectRefs are awaited, tokenisation runs in a thread.
"""

from __future__ import annotations

import asyncio
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


@dataclass
class Retrieved:
    score: float
    shard: int
    block: int
    document_id: str
    seq: int
    offset: int


def store_layout(cfg: EngramConfig) -> StoreLayout:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(decoder_model.model_path(cfg.decoder))
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    t = cfg.encoder.chunk_tokens
    keep = t if cfg.encoder.keep_tokens <= 0 else min(cfg.encoder.keep_tokens, t)
    if t % cfg.encoder.span or keep % cfg.encoder.span:
        raise ValueError(f"encoder.chunk_tokens ({t}) and keep_tokens ({keep}) must be multiples of span ({cfg.encoder.span})")
    return StoreLayout(c.num_hidden_layers, c.num_key_value_heads, keep, head_dim, t, cfg.shard.episodic.dim,
                       cfg.encoder.windows)


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
                            f"{e.embedder}|W{e.window_tokens}/{e.window_stride}")
        self.m0_pinv = reference_pinv(cfg.shard.episodic)
        self.shard_ids = self._routing_table()
        self._start_actors()

    def _routing_table(self) -> list[int]:
        """Routing is a pure function of the shard ids and the content fingerprint; both are persisted in
        <data_dir>/cluster.json so a restarted coordinator routes exactly as before (namespaces and documents
        live in the shards' own stores)."""
        path = Path(self.cfg.shard.data_dir) / "cluster.json"
        want = {"shards": list(range(self.cfg.cluster.shards)), "fingerprint": self.fingerprint}
        if path.exists():
            have = json.loads(path.read_text())
            if have != want:
                raise ValueError(f"{self.cfg.shard.data_dir} holds a cluster of {len(have['shards'])} shards "
                                 f"written with {have['fingerprint']!r}; this configuration asks for "
                                 f"{len(want['shards'])} shards with {want['fingerprint']!r}. Start with the "
                                 "same shards and encoder settings, or use a new data_dir.")
            return have["shards"]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(want))
        os.replace(tmp, path)
        return want["shards"]

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
        shard_actor = ray.remote(Shard)
        self.shards = [
            shard_actor.options(num_cpus=0, max_restarts=-1, max_task_retries=0, name=f"shard-{i}",
                                get_if_exists=True, resources={c.shard_resource: 1} if c.shard_resource else None,
                                ).remote(i, self.cfg.shard, self.layout)
            for i in self.shard_ids
        ]
        # Ray hides GPUs from actors that ask for none, so device "auto" picks CUDA exactly when one is granted.
        enc_actor = ray.remote(Encoder).options(num_cpus=c.encoder_cpus, num_gpus=c.encoder_gpus,
                                                max_restarts=-1, max_task_retries=3)
        self.encoders = [enc_actor.remote(self.cfg.encoder, enc_dec) for _ in range(n_enc)]
        gpus = c.decoder_gpus if c.decoder_gpus is not None else (1 if has_gpu else 0)
        self.decoder = ray.remote(DecoderWorker).options(num_cpus=0, num_gpus=gpus, max_restarts=-1,
                                                         max_task_retries=3).remote(
            self.cfg.decoder, self.cfg.ask.position_scheme)
        self._next_encoder = itertools.cycle(self.encoders)
        ray.get([s.stats.remote() for s in self.shards] + [e.embed.remote(["warm up"]) for e in self.encoders]
                + [self.decoder.answer.remote("warm up", self.layout.chunk_tokens, 1, [])])

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
        existing = await asyncio.gather(*[self._call(s.document_request, namespace, name) for s in self.shards])
        if any(r is not None and (not request_id or r != request_id) for r in existing):
            raise EngramError("already_exists", f"document {name!r} already exists in namespace {namespace!r}; "
                              "delete it first or use another document_id")
        ids = await asyncio.to_thread(self.tokenize, text)
        if not ids:
            raise EngramError("invalid", f"document {name!r} has no tokens")
        chunks = chunking.split(ids, self.layout.chunk_tokens)
        hashes = [chunk_hash(c.tokens, self.fingerprint) for c in chunks]
        owner = [chunking.route(h, self.shard_ids) for h in hashes]
        per_shard = {s: [i for i, o in enumerate(owner) if o == s] for s in self.shard_ids}
        last: Exception | None = None
        for attempt in range(self.cfg.cluster.write_attempts):
            try:
                new_blocks = await self._write_once(namespace, name, request_id, chunks, hashes, per_shard)
                return {"chunks": len(chunks), "tokens": len(ids), "new_blocks": new_blocks}
            except Exception as exc:
                err = shard_error(exc)
                if err is not None and err.code != "stale":
                    last = EngramError(err.code, str(err))
                    break
                if err is None and not isinstance(exc, (ray.exceptions.RayActorError,
                                                        ray.exceptions.ActorUnavailableError)):
                    raise
                last = exc
                log.warning("write %s/%s attempt %d failed (%s); waiting for the shards", namespace, name,
                            attempt + 1, type(exc).__name__)
                await asyncio.gather(*[self._call(s.stats) for s in self.shards], return_exceptions=True)
        if all(r is None for r in existing):  # never touch a document an earlier request acknowledged
            await asyncio.gather(*[self._call(s.delete_document, namespace, name) for s in self.shards],
                                 return_exceptions=True)
        if isinstance(last, EngramError):
            raise last
        raise EngramError("unavailable", f"write of {name!r} failed ({type(last).__name__}) and was rolled back; "
                          "nothing of it is stored, retry with the same request_id")

    async def _write_once(self, namespace: str, name: str, request_id: str, chunks, hashes, per_shard) -> int:
        new_blocks = 0
        sem = asyncio.Semaphore(self.cfg.cluster.max_in_flight or 2 * len(self.encoders))
        done = {"chunks": 0, "logged": time.perf_counter(), "t0": time.perf_counter()}

        async def encode_and_put(shard: int, batch: list[int]) -> None:
            async with sem:
                ref = next(self._next_encoder).encode.remote([chunks[i].tokens for i in batch], [hashes[i] for i in batch])
                await self.shards[shard].put_blocks.remote(ref)  # the KV goes encoder -> shard, not through here
            done["chunks"] += len(batch)
            if time.perf_counter() - done["logged"] > 10:  # progress of long writes, every 10 s
                done["logged"] = time.perf_counter()
                rate = done["chunks"] * self.layout.chunk_tokens / (done["logged"] - done["t0"])
                log.info("write %s/%s: encoded %d/%d new chunks (%.0f tokens/s)", namespace, name, done["chunks"],
                         new_blocks, rate)

        jobs = []
        for s, idx in per_shard.items():
            unique = list(dict.fromkeys(hashes[i] for i in idx))
            missing = await self._call(self.shards[s].missing, unique)
            first: dict[bytes, int] = {}
            for i in idx:
                first.setdefault(hashes[i], i)
            todo = [first[h] for h, m in zip(unique, missing) if m]
            new_blocks += len(todo)
            step = self.cfg.encoder.batch_chunks
            jobs += [encode_and_put(s, todo[j : j + step]) for j in range(0, len(todo), step)]
        await asyncio.gather(*jobs)
        await asyncio.gather(*[
            self.shards[s].commit_document.remote(
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
        hits = sorted(hits, key=lambda h: -h.score)[:top_k]
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
        return out

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

    async def chunk_texts(self, hits: list[Retrieved]) -> list[str]:
        by_shard: dict[int, list[int]] = {}
        for h in hits:
            by_shard.setdefault(h.shard, []).append(h.block)
        tokens = dict(zip(by_shard, await asyncio.gather(
            *[self._call(self.shards[s].get_tokens, b) for s, b in by_shard.items()])))
        cursor = {s: 0 for s in by_shard}
        texts = []
        for h in hits:
            texts.append(self.tokenizer.decode(tokens[h.shard][cursor[h.shard]]))
            cursor[h.shard] += 1
        return texts

    async def ask(self, namespace: str, question: str, top_k: int, max_new_tokens: int) -> dict:
        t0, w0 = time.perf_counter(), time.time()
        hits, _, timings = await self.retrieve(namespace, question, top_k)
        reading = self.arrange(hits + await self.neighbors(namespace, hits))
        shards = sorted({h.shard for h in reading})
        refs = [self.shards[s].get_blocks.remote([h.block for h in reading if h.shard == s]) for s in shards]
        cursor = {s: 0 for s in shards}
        order = []
        for h in reading:
            order.append((shards.index(h.shard), cursor[h.shard]))
            cursor[h.shard] += 1
        t_fetch = time.perf_counter()
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
        return {"shards": shards, **total}

    def shutdown(self) -> None:
        for a in [*self.shards, *self.encoders, self.decoder]:
            ray.kill(a, no_restart=True)
