"""The read path: embed the query, search every shard, merge a global top-k, then answer (Ask) or return the
chunks and the episodic readout (Read).

Actor calls per shard: Ask = search + fetch (tokens and blocks in one call with two returns: the tokens come
here, the blocks go shard -> decoder through the object store); Ask(mode="rag") and Read = search + tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
import ray

from ..errors import EngramError, ErrorCode
from ..workers.episodic import hierarchical_readout, reference_pinv
from ..workers.lexical import TermStats, bm25, idf
from ..workers.results import SearchHits
from .cluster import Cluster
from .retry import actor_down, retry


@dataclass
class Retrieved:
    score: float  # fused: dense + ask.lexical_weight x lexical (normalised)
    shard: int
    block: int
    document_id: str
    seq: int
    offset: int
    dense: float = 0.0  # the chunk's best window cosine with the question (through the episodic memory)
    lexical: float = 0.0  # its BM25 score / the best of the query's BM25 scores over all shards


def global_bm25(results: list[SearchHits], stats: TermStats | None = None) -> list[np.ndarray]:
    """Each shard's hits scored by BM25 with the namespace's statistics summed over all shards (`stats`): one
    scale, the same scores however the documents are spread (zeros where no lexical query ran)."""
    stats = stats or global_stats(results)
    return [np.zeros(len(r.doc)) if r.tf is None else bm25(r.tf, r.length, stats) for r in results]


def global_stats(results: list[SearchHits]) -> TermStats:
    """The namespace's term statistics for the query, summed over the shards that answered."""
    return TermStats.total([r.term_stats for r in results if r.term_stats is not None])


def candidates(shard_ids: list[int], results: list[SearchHits], cfg, skip=frozenset()) -> list[Retrieved]:
    """Every shard's hits (less documents in `skip`), best first: BM25 on global statistics, fused with the dense
    scores (cfg: the ask settings)."""
    stats = global_stats(results)
    hits = [
        Retrieved(float(sc), s, int(b), d, int(q), int(o), float(sc), float(lx))
        for s, r, bm in zip(shard_ids, results, global_bm25(results, stats))
        for sc, b, d, q, o, lx in zip(r.score, r.block, r.doc, r.seq, r.offset, bm)
        if d not in skip
    ]
    query_idf = float(idf(stats).sum())
    return _unique(
        sorted(fuse(hits, cfg.lexical_weight, cfg.lexical_scale, query_idf, cfg.lexical_power), key=lambda h: -h.score)
    )


def merge(shard_ids: list[int], results: list[SearchHits], top_k: int, cfg, skip=frozenset()) -> list[Retrieved]:
    """Every shard's hits (less documents in `skip`) -> the global top-k (`candidates`, then the score cutoff)."""
    return top_hits(candidates(shard_ids, results, cfg, skip), top_k, cfg.min_score_ratio)


def _remote(method, stream: bool):
    """A Ray actor method's .remote, as a streaming generator call when `stream`."""
    return method.options(num_returns="streaming").remote if stream else method.remote


def fuse(hits: list[Retrieved], weight: float, scale="max", query_idf=0.0, power=1.0) -> list[Retrieved]:
    """Every shard's hits on one scale: dense cosine + `weight` x share**`power`, the share (ask.lexical_scale)
    "max": BM25 (global statistics) / the query's best BM25 — the best counts 1 however little of the query it
    holds; or "coverage": min(1, BM25 / `query_idf`, the query terms' summed idf, what an average-length text
    holding each of them once scores) — the share of the question a text holds: both chunks of a UUID key cut
    from its value count nearly 1 (its rare parts are most of the idf), a paraphrase's stray common words little,
    and cubed (the default) next to nothing. `h.lexical` is BM25 / the best either way (for ask.adjacent_lexical)."""
    best = max((h.lexical for h in hits), default=0.0)
    for h in hits:
        raw = h.lexical
        h.lexical = raw / best if best > 0 else 0.0
        share = h.lexical if scale == "max" else (min(1.0, raw / query_idf) if query_idf > 0 else 0.0)
        h.score = h.dense + weight * share**power
    return hits


@dataclass
class AskResult:
    answer: str
    hits: list[Retrieved]  # in reading order
    texts: list[str]  # each hit's chunk text
    timings: dict[str, float]  # embed_s, retrieve_s, fetch_s, ttft_s, decode_s, total_s
    context_tokens: int
    new_tokens: int = 0  # tokens generated (max_new_tokens of them: the answer was cut there)
    prompt_tokens: int = 0  # the question's tokens (with mode "rag": and the re-prefilled chunks')


@dataclass
class ReadResult:
    hits: list[Retrieved]  # best first
    texts: list[str]
    readout: np.ndarray  # [C] hierarchical episodic readout
    timings: dict[str, float]


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


def adjacent(ranked: list[Retrieved], hits: list[Retrieved], min_lexical: float) -> list[Retrieved]:
    """ask.adjacent_lexical: the candidates beside a hit (same document, the chunk before or after it), not hits
    themselves, whose own BM25 is at least `min_lexical` x the query's best — the question's words run on into
    them. A fact cut by a chunk boundary leaves one half in each chunk: the question finds the half it resembles (a
    UUID key, a subject) and the answer opens or ends the chunk beside it, whose key text still holds some of the
    question's rarest words (a UUID key's value ranked 12th, BM25 0.77 of the best, beside its key's chunk ranked
    4th; BENCHMARKS.md "A fact cut by a chunk boundary"). Read beside its hit, the passage is whole again.
    0 = none."""
    if min_lexical <= 0:
        return []
    near = {(h.document_id, h.seq + d) for h in hits for d in (-1, 1)}
    have = {(h.document_id, h.seq) for h in hits}
    return [h for h in ranked if (h.document_id, h.seq) in near - have and h.lexical >= min_lexical]


def arrange(hits: list[Retrieved], block_order: str) -> list[Retrieved]:
    """Reading order of the blocks before the question (ask.block_order)."""
    by_doc = sorted(hits, key=lambda h: (h.document_id, h.seq))
    if block_order == "document":
        return by_doc
    runs: list[list[Retrieved]] = []
    for h in by_doc:  # consecutive chunks of a document stay together, in order
        if runs and runs[-1][-1].document_id == h.document_id and runs[-1][-1].seq + 1 == h.seq:
            runs[-1].append(h)
        else:
            runs.append([h])
    runs.sort(key=lambda run: max(h.score for h in run))  # best run last, nearest the question
    return [h for run in runs for h in run]


def block_biases(reading: list[Retrieved], lam: float) -> list[float] | None:
    """ask.retrieval_bias: per block (reading order), λ x (its run's score - the best hit's score), added to the
    question's attention logits to its tokens: 0 for the best run, more negative the further retrieval ranks it
    below. A run (consecutive chunks of a document, read side by side: `arrange`) is one passage and is biased as
    one, by its best hit: a needle chunk followed by a weaker-scored chunk of the same text was lost when the
    passage's end, right before the question, was read faintly (bench/short_passkeys.py: 1 of 6 right per block,
    4 of 6 per run as with λ = 0; BENCHMARKS.md "A run of consecutive chunks"). None when λ is 0 (the plain
    reader)."""
    if lam <= 0 or not reading:
        return None
    run_score, start = [h.score for h in reading], 0
    for j in range(1, len(reading) + 1):
        ends = j == len(reading) or not (
            reading[j].document_id == reading[j - 1].document_id and reading[j].seq == reading[j - 1].seq + 1
        )
        if ends:
            run_score[start:j] = [max(run_score[start:j])] * (j - start)
            start = j
    best = max(run_score)
    return [lam * (s - best) for s in run_score]


def by_shard(hits: list[Retrieved]) -> tuple[dict[int, list[int]], list[tuple[int, int]]]:
    """-> (shard -> its block rows, in hit order), and each hit's (shard, index in that shard's list)."""
    rows: dict[int, list[int]] = {}
    where = []
    for h in hits:
        rows.setdefault(h.shard, []).append(h.block)
        where.append((h.shard, len(rows[h.shard]) - 1))
    return rows, where


async def decoded(answer: ray.ObjectRef):
    """Await a decoder call; if the ask is cancelled meanwhile (client deadline or disconnect), the call is
    cancelled too: the decoder skips it if it has not started and stops generating if it has
    (DecoderWorker.cancelled), instead of spending itself on nobody."""
    try:
        return await answer
    except asyncio.CancelledError:
        ray.cancel(answer)
        raise


class Reader:
    def __init__(self, cluster: Cluster, tokenizer):
        self.cluster, self.cfg, self.tokenizer = cluster, cluster.cfg, tokenizer
        self.m0_pinv = reference_pinv(self.cfg.shard.episodic)
        self.queued = 0  # asks in progress: retrieving, waiting for the decoder or being answered

    async def namespaces(self) -> set[str]:
        return set().union(*await self.cluster.all_shards("namespaces"))

    async def retrieve(self, namespace: str, query: str, top_k: int, readout: bool = False, adjacent_too=False):
        """-> (the global top-k hits — with `adjacent_too`, and the chunks beside them that the question's words
        reach (`adjacent`): what an Ask reads —, the hierarchical readout or None, timings)."""
        t0 = time.perf_counter()
        z = (await self.cluster.embedder.embed.remote([query]))[0]
        t1 = time.perf_counter()
        text = query if self.cfg.ask.lexical_weight > 0 else ""
        results = await self.cluster.all_shards("search", namespace, z, top_k, readout, text)
        if not any(r.episodes for r in results):
            raise EngramError(ErrorCode.NOT_FOUND, f"namespace {namespace!r} holds no documents; write some first")
        writing = {name for ns, name in self.cluster.writing if ns == namespace}  # not whole yet: not served
        ranked = candidates(self.cluster.shard_ids, results, self.cfg.ask, writing)
        hits = top_hits(ranked, top_k, self.cfg.ask.min_score_ratio)
        if adjacent_too:
            hits += adjacent(ranked, hits, self.cfg.ask.adjacent_lexical)
        merged = None
        if readout:
            readouts = np.stack([r.readout for r in results if r.episodes])
            merged = hierarchical_readout(readouts, z, self.m0_pinv, self.cfg.shard.episodic)
        return hits, merged, {"embed_s": t1 - t0, "retrieve_s": time.perf_counter() - t1}

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
        c = self.cluster
        docs = list(want)
        found = await asyncio.gather(
            *[c.call(s.chunks_at, namespace, d, list(want[d])) for d in docs for s in c.shards]
        )
        out = []
        for i, rows in enumerate(found):
            doc, shard = docs[i // len(c.shards)], c.shard_ids[i % len(c.shards)]
            out += [Retrieved(want[doc][r.seq], shard, r.block, doc, r.seq, r.offset) for r in rows]
        return _unique(out)

    async def tokens(self, hits: list[Retrieved]) -> list[list[int]]:
        rows, where = by_shard(hits)
        got = dict(
            zip(
                rows,
                await asyncio.gather(*[self.cluster.call(self.cluster.shards[s].tokens, b) for s, b in rows.items()]),
            )
        )
        return [got[s][i] for s, i in where]

    async def ask(
        self, namespace: str, question: str, top_k: int, max_new_tokens: int, mode: str = "memory"
    ) -> AskResult:
        """mode "memory": the decoder attends to the retrieved chunks' stored KV blocks. "rag": the baseline —
        the same retrieved chunks' text prefilled again as the prompt."""
        async with self._admitted():
            return await self._ask(namespace, question, top_k, max_new_tokens, mode, time.perf_counter())

    async def ask_stream(
        self, namespace: str, question: str, top_k: int, max_new_tokens: int, mode: str = "memory"
    ) -> AsyncIterator[list[Retrieved] | str | AskResult]:
        """`ask`, streamed: the hits in reading order once retrieval is done, then the answer's text in pieces
        as the decoder generates them, then the AskResult (its answer = the pieces joined). Stopping the
        iteration (the client went away) stops the decoder too. A shard lost mid-ask is not retried (text may
        have been sent): UNAVAILABLE."""
        async with self._admitted():
            t0 = time.perf_counter()
            hits, _, timings = await self.retrieve(namespace, question, top_k, adjacent_too=True)
            reading = arrange(hits + await self.neighbors(namespace, hits), self.cfg.ask.block_order)
            yield reading
            t_fetch = time.perf_counter()
            try:
                if mode == "rag":
                    call, tokens, t_call = await self._start_rag(question, reading, max_new_tokens, True)
                else:
                    call, tokens, t_call = await self._start_from_blocks(question, reading, max_new_tokens, True)
                out, done = None, False
                try:
                    async for ref in call:
                        part = await ref
                        if isinstance(part, str):
                            yield part
                        else:
                            out = part
                    done = True
                finally:
                    if not done:  # cancelled, failed or abandoned by the consumer: the decoder stops too
                        ray.cancel(call)
            except Exception as exc:
                if actor_down(exc):
                    raise EngramError(ErrorCode.UNAVAILABLE, "a memory shard went down during the ask; retry") from None
                raise
            if out is None:
                raise EngramError(ErrorCode.UNAVAILABLE, "the decoder stopped before answering; retry")
            yield self._result(out, reading, tokens, timings, t0, t_fetch, t_call)

    @contextlib.asynccontextmanager
    async def _admitted(self):
        """Admission control: at most ask.max_queued_asks asks in progress, past it RESOURCE_EXHAUSTED at once."""
        limit = self.cfg.ask.max_queued_asks
        if limit and self.queued >= limit:
            raise EngramError(
                ErrorCode.EXHAUSTED,
                f"{self.queued} asks are already waiting for the decoder (ask.max_queued_asks); retry shortly",
            )
        self.queued += 1
        try:
            yield
        finally:
            self.queued -= 1

    async def _ask(
        self, namespace: str, question: str, top_k: int, max_new_tokens: int, mode: str, t0: float
    ) -> AskResult:
        hits, _, timings = await self.retrieve(namespace, question, top_k, adjacent_too=True)
        reading = arrange(hits + await self.neighbors(namespace, hits), self.cfg.ask.block_order)
        t_fetch = time.perf_counter()
        if mode == "rag":
            call, tokens, t_call = await self._start_rag(question, reading, max_new_tokens)
            out = await decoded(call)
        else:

            async def attempt():
                call, tokens, t_call = await self._start_from_blocks(question, reading, max_new_tokens)
                return await decoded(call), tokens, t_call

            try:  # a shard or the decoder restarting mid-ask: fetch and decode again (reads are idempotent)
                out, tokens, t_call = await retry(attempt, 5, actor_down)
            except Exception as exc:
                if actor_down(exc):
                    raise EngramError(ErrorCode.UNAVAILABLE, "a memory shard went down during the ask; retry") from None
                raise
        return self._result(out, reading, tokens, timings, t0, t_fetch, t_call)

    def _result(self, out, reading, tokens, timings, t0: float, t_fetch: float, t_call: float) -> AskResult:
        # Durations only (never wall clocks of two processes): the decoder reports how long it worked; the rest
        # of the round trip was spent before it could start (blocks in transit, queueing behind other asks).
        waited = max(0.0, time.perf_counter() - t_call - out.busy_s)
        timings.update(
            fetch_s=(t_call - t_fetch) + waited,
            ttft_s=(t_call - t0) + waited + out.prefill_s,
            decode_s=out.decode_s,
            total_s=time.perf_counter() - t0,
        )
        texts = [self.tokenizer.decode(t) for t in tokens]
        return AskResult(out.text, reading, texts, timings, out.context_tokens, out.new_tokens, out.prompt_tokens)

    async def _start_rag(self, question: str, reading: list[Retrieved], max_new_tokens: int, stream: bool = False):
        """-> (the decoder's call over the chunks' text re-prefilled, each hit's token ids, when it was called)."""
        tokens = await self.tokens(reading)
        method = self.cluster.decoder.answer_tokens_stream if stream else self.cluster.decoder.answer_tokens
        t_call = time.perf_counter()
        return _remote(method, stream)(question, max_new_tokens, tokens), tokens, t_call

    async def _start_from_blocks(
        self, question: str, reading: list[Retrieved], max_new_tokens: int, stream: bool = False
    ):
        """-> (the decoder's call over the blocks — an ObjectRef, or with `stream` a generator of refs —, each
        hit's token ids, when the decoder was called). One call per shard: its tokens come here, its blocks go
        straight to the decoder worker."""
        c = self.cluster
        rows, where = by_shard(reading)
        shards = list(rows)
        refs = [c.shards[s].fetch.options(num_returns=2).remote(rows[s]) for s in shards]
        order = [(shards.index(s), i) for s, i in where]
        t_call = time.perf_counter()
        method = c.decoder.answer_stream if stream else c.decoder.answer
        bias = block_biases(reading, self.cfg.ask.retrieval_bias)
        call = _remote(method, stream)(
            question, c.layout.chunk_tokens, max_new_tokens, order, *[blocks for _, blocks in refs], block_bias=bias
        )
        try:
            shard_tokens = await asyncio.gather(*[tok for tok, _ in refs])
        except asyncio.CancelledError:
            ray.cancel(call)
            raise
        except Exception:
            if stream:
                ray.cancel(call)
            else:
                await asyncio.gather(call, return_exceptions=True)  # it fails too (same inputs): collect it
            raise
        return call, [shard_tokens[shards.index(s)][i] for s, i in where], t_call

    async def read(self, namespace: str, query: str, top_k: int) -> ReadResult:
        t0 = time.perf_counter()
        hits, readout, timings = await self.retrieve(namespace, query, top_k, readout=True)
        texts = [self.tokenizer.decode(t) for t in await self.tokens(hits)]
        timings["total_s"] = time.perf_counter() - t0
        return ReadResult(hits, texts, readout, timings)
