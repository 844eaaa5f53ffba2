"""The decoder worker: answers a question over retrieved KV blocks. Ray actor (GPU when there is one)."""

from __future__ import annotations

import collections
import dataclasses
import os
import queue
import threading
import time
from collections.abc import Iterator

from ..decoder import model as decoder_model
from ..decoder.codec import load_codec
from ..decoder.generate import Answer, MemoryDecoder, last


@dataclasses.dataclass
class Decoded:
    """An answer and how long its parts took, measured inside this process (no cross-process wall clocks)."""

    text: str
    prefill_s: float  # block assembly + question prefill, to the first token
    decode_s: float
    busy_s: float  # from the call starting here to the reply (the caller subtracts it from its round trip)
    context_tokens: int
    new_tokens: int
    device: str
    prompt_tokens: int = 0  # the question's (RAG: and the re-prefilled chunks')


@dataclasses.dataclass
class _Pending:
    """An ask handed from its call's thread to the batch thread; parts come back through `out`."""

    question: str
    max_new_tokens: int
    blocks: list | None = None  # memory mode
    chunk_tokens: int = 0
    chunks: list[list[int]] | None = None  # the RAG baseline: token ids re-prefilled (decoded alone)
    block_bias: list[float] | None = None  # memory mode: per block, added to the logits to its tokens
    out: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)  # the caller gave up
    queued_at: float = dataclasses.field(default_factory=time.perf_counter)
    admitted_at: float = 0.0  # when the batch thread took it (its wait before is part of its time to first token)

    def alone(self, decoder: MemoryDecoder, stop) -> Iterator[str | Answer]:
        """This ask decoded by itself: text pieces, then the Answer."""
        if self.chunks is not None:
            return decoder.answer_text_stream(self.question, self.chunks, self.max_new_tokens, stop)
        return decoder.answer_stream(
            self.question, self.blocks, self.chunk_tokens, self.max_new_tokens, stop, self.block_bias
        )


class DecoderWorker:
    """max_batch > 1: concurrent calls (a threaded Ray actor) hand their asks to one batch thread, which decodes
    every ask waiting when it is free together, and asks arriving meanwhile join between decode steps, up to
    max_batch at once (batch.generate_batch); 1: each call decodes its own ask."""

    def __init__(
        self,
        cfg: decoder_model.DecoderConfig,
        position_scheme: str = "consecutive",
        kv_dtype: str = "float16",
        max_batch: int = 1,
        kv_codec: str = "",
        codec_digest: str = "",
        block_key_scale: float = 1.0,
        draft_tokens: int = 0,
        join_running: bool = True,
    ):
        """draft_tokens: batched asks draft up to this many tokens of their answers from their blocks' tokens
        (decoder/draft.py; ask.draft_tokens). join_running: asks arriving while a batch decodes join it (False: they
        wait for the next batch; bench/continuous_batching.py compares the two)."""
        self.cfg, self.join_running = cfg, join_running
        if not cfg.threads:  # Ray caps threads of actors that reserve no CPU; the decoder may use the node's cores
            cfg = dataclasses.replace(cfg, threads=os.cpu_count() or 1)
        # Loaded here, in the constructor's thread, not in the batch thread that decodes: torch's OpenMP then keeps
        # two thread teams, and libgomp, counting more threads than cores, sleeps between parallel regions instead of
        # spinning. On idle cores that is slower (16 asks through the worker 1.26 s vs 0.82 s with the model loaded in
        # the batch thread), but under `engram load` on 2 shared cores the spinning workers starve the shards and
        # encoders: 5.1-5.2 vs 6.3-6.5 asks/s (BENCHMARKS.md "Batched answers under load").
        model, tokenizer = decoder_model.load(cfg)
        codec = load_codec(kv_codec, cfg.model, codec_digest) if kv_dtype == "codec" else None
        self.decoder = MemoryDecoder(
            model, tokenizer, cfg.question_template, position_scheme, kv_dtype, codec, block_key_scale, draft_tokens
        )
        self.answered = 0  # answers produced since start (a cancelled ask never counts)
        self.batches: collections.deque[int] = collections.deque(maxlen=4096)  # recent batch sizes (tests, benches)
        self.max_batch, self.pending, self.lock = max_batch, queue.Queue(), threading.Lock()
        if max_batch > 1:
            threading.Thread(target=self._batch_loop, daemon=True, name="decoder-batches").start()

    def answers(self) -> int:
        return self.answered

    def batch_sizes(self) -> list[int]:
        return list(self.batches)

    def cancelled(self) -> bool:
        """Whether the caller gave up on the call in progress (the Ray actor says so: coordinator/decoder_actor.py).
        Asked before a call starts and before each generated token."""
        return False

    def set_options(self, template: str | None = None, position_scheme: str | None = None) -> None:
        """For benchmark sweeps: change the question template or position scheme of a running worker."""
        if template is not None:
            self.decoder.template = template
        if position_scheme is not None:
            self.decoder.scheme = position_scheme

    def answer(
        self,
        question: str,
        chunk_tokens: int,
        max_new_tokens: int,
        order: list[tuple[int, int]],
        *block_lists,
        block_bias: list[float] | None = None,
    ) -> Decoded | None:
        """block_lists: per shard, its blocks (dicts of block columns) (Ray resolves them before this runs);
        order: (list, index) pairs giving the reading order in which the blocks are placed before the question;
        block_bias: per block in that order, added to the question's attention logits to its tokens."""
        parts = self.answer_stream(question, chunk_tokens, max_new_tokens, order, *block_lists, block_bias=block_bias)
        return _decoded(last(parts))

    def answer_stream(
        self,
        question: str,
        chunk_tokens: int,
        max_new_tokens: int,
        order: list[tuple[int, int]],
        *block_lists,
        block_bias: list[float] | None = None,
    ) -> Iterator[str | Decoded]:
        """`answer`, streamed (a Ray streaming generator): the answer's text in pieces as they are generated, then
        the Decoded."""
        t0 = time.perf_counter()
        if self.cancelled():  # the asker gave up while this call waited in the queue
            return
        blocks = [block_lists[i][j] for i, j in order]
        ask = _Pending(question, max_new_tokens, blocks, chunk_tokens, block_bias=block_bias)
        yield from self._reply(self._parts(ask), t0)

    def answer_tokens(self, question: str, max_new_tokens: int, chunks: list[list[int]]) -> Decoded | None:
        """The RAG baseline: the retrieved chunks' tokens prefilled again as the prompt, no stored KV."""
        return _decoded(last(self.answer_tokens_stream(question, max_new_tokens, chunks)))

    def answer_tokens_stream(
        self, question: str, max_new_tokens: int, chunks: list[list[int]]
    ) -> Iterator[str | Decoded]:
        t0 = time.perf_counter()
        if self.cancelled():
            return
        yield from self._reply(self._parts(_Pending(question, max_new_tokens, chunks=chunks)), t0)

    def _parts(self, ask: _Pending) -> Iterator[str | Answer]:
        """With batching, through the batch thread (a RAG ask too, alone: never beside a batch on the same
        cores); else decoded here."""
        return self._through_batches(ask) if self.max_batch > 1 else ask.alone(self.decoder, self.cancelled)

    def _reply(self, parts: Iterator[str | Answer], t0: float) -> Iterator[str | Decoded]:
        for part in parts:
            if not isinstance(part, Answer):
                yield part
            elif not self.cancelled():  # stopped part-way: nobody waits for it
                with self.lock:
                    self.answered += 1
                yield Decoded(
                    part.text,
                    part.prefill_s,
                    part.decode_s,
                    time.perf_counter() - t0,
                    part.context_tokens,
                    len(part.token_ids),
                    str(self.decoder.device),
                    part.prompt_tokens,
                )

    def _through_batches(self, ask: _Pending) -> Iterator[str | Answer]:
        """Hand the ask to the batch thread and pass on what it sends back; a caller that gives up (Ray's
        cancellation, seen in this call's thread) stops its row."""
        self.pending.put(ask)
        while True:
            try:
                part = ask.out.get(timeout=0.05)
            except queue.Empty:
                if self.cancelled():
                    ask.stop.set()
                    return
                continue
            if isinstance(part, BaseException):
                raise part
            yield part
            if isinstance(part, Answer):
                return

    def _batch_loop(self) -> None:
        """Take every ask waiting (up to max_batch) and decode them together, letting asks that arrive meanwhile
        join between steps (continuous batching); the RAG baseline alone, between batches."""
        while True:
            asks = [self.pending.get()]
            while len(asks) < self.max_batch:
                try:
                    asks.append(self.pending.get_nowait())
                except queue.Empty:
                    break
            asks = [a for a in asks if not a.stop.is_set()]  # given up while waiting
            for a in [a for a in asks if a.chunks is not None]:  # RAG: the plain path, never beside a batch
                self._decode_alone(a)
            memory = [a for a in asks if a.chunks is None]
            if memory:
                self._decode_joining(memory)

    def _decode_joining(self, batch: list[_Pending]) -> None:
        """A batch that asks arriving while it decodes join (up to max_batch rows at once). A RAG ask that arrives
        closes the batch to newcomers: it is decoded once the batch's rows end."""
        later: list[_Pending] = []

        def admit(free: int) -> list[tuple]:
            new = []
            while len(new) < free and not later:
                try:
                    a = self.pending.get_nowait()
                except queue.Empty:
                    break
                if a.stop.is_set():
                    continue
                if a.chunks is not None:
                    later.append(a)
                    break
                a.admitted_at = time.perf_counter()
                batch.append(a)
                new.append((a.question, a.blocks, a.chunk_tokens, a.max_new_tokens, a.stop.is_set, a.block_bias))
            if new:
                self.batches[-1] += len(new)
            return new

        work = [(a.question, a.blocks, a.chunk_tokens, a.max_new_tokens, a.block_bias) for a in batch]
        stops = [a.stop.is_set for a in batch]
        joining = admit if self.join_running else None
        self._decode(batch, self.decoder.answer_batch(work, stops, joining, self.max_batch))
        for a in later:
            self._decode_alone(a)

    def _decode_alone(self, ask: _Pending) -> None:
        self._decode([ask], ((0, part) for part in ask.alone(self.decoder, ask.stop.is_set)))

    def _decode(self, asks: list[_Pending], parts: Iterator[tuple[int, str | Answer]]) -> None:
        """Each row's parts to its caller; `asks` may grow while `parts` runs (rows that joined, admitted_at set)."""
        self.batches.append(len(asks))
        now = time.perf_counter()
        for a in asks:
            a.admitted_at = a.admitted_at or now
        try:
            for row, part in parts:
                if isinstance(part, Answer):  # its time to first token counts its wait for the batch too
                    ask = asks[row]
                    part = dataclasses.replace(part, prefill_s=part.prefill_s + ask.admitted_at - ask.queued_at)
                asks[row].out.put(part)
        except Exception as exc:  # every caller of the batch hears of it
            for a in asks:
                a.out.put(exc)


def _decoded(out) -> Decoded | None:
    return out if isinstance(out, Decoded) else None  # a cancelled call ends without one
