"""The decoder worker: answers a question over retrieved KV blocks. Ray actor (GPU when there is one)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator

from ..decoder import model as decoder_model
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


class DecoderWorker:
    def __init__(
        self, cfg: decoder_model.DecoderConfig, position_scheme: str = "consecutive", kv_dtype: str = "float16"
    ):
        self.cfg = cfg
        if not cfg.threads:  # Ray caps threads of actors that reserve no CPU; the decoder may use the node's cores
            cfg = dataclasses.replace(cfg, threads=os.cpu_count() or 1)
        model, tokenizer = decoder_model.load(cfg)
        self.decoder = MemoryDecoder(model, tokenizer, cfg.question_template, position_scheme, kv_dtype)
        self.answered = 0  # answers produced since start (a cancelled ask never counts)

    def answers(self) -> int:
        return self.answered

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
        self, question: str, chunk_tokens: int, max_new_tokens: int, order: list[tuple[int, int]], *block_lists
    ) -> Decoded | None:
        """block_lists: per shard, its blocks (dicts of block columns) (Ray resolves them before this runs);
        order: (list, index) pairs giving the reading order in which the blocks are placed before the question."""
        return _decoded(last(self.answer_stream(question, chunk_tokens, max_new_tokens, order, *block_lists)))

    def answer_stream(
        self, question: str, chunk_tokens: int, max_new_tokens: int, order: list[tuple[int, int]], *block_lists
    ) -> Iterator[str | Decoded]:
        """`answer`, streamed (a Ray streaming generator): the answer's text in pieces as they are generated, then
        the Decoded."""
        t0 = time.perf_counter()
        if self.cancelled():  # the asker gave up while this call waited in the queue
            return
        blocks = [block_lists[i][j] for i, j in order]
        yield from self._reply(
            self.decoder.answer_stream(question, blocks, chunk_tokens, max_new_tokens, self.cancelled), t0
        )

    def answer_tokens(self, question: str, max_new_tokens: int, chunks: list[list[int]]) -> Decoded | None:
        """The RAG baseline: the retrieved chunks' tokens prefilled again as the prompt, no stored KV."""
        return _decoded(last(self.answer_tokens_stream(question, max_new_tokens, chunks)))

    def answer_tokens_stream(self, question: str, max_new_tokens: int, chunks: list[list[int]]):
        t0 = time.perf_counter()
        if self.cancelled():
            return
        yield from self._reply(self.decoder.answer_text_stream(question, chunks, max_new_tokens, self.cancelled), t0)

    def _reply(self, parts: Iterator[str | Answer], t0: float) -> Iterator[str | Decoded]:
        for part in parts:
            if not isinstance(part, Answer):
                yield part
            elif not self.cancelled():  # stopped part-way: nobody waits for it
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


def _decoded(out) -> Decoded | None:
    return out if isinstance(out, Decoded) else None  # a cancelled call ends without one
