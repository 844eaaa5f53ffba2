"""The read side of explicit memory: retrieved blocks placed in front of the question, greedy decoding
(gpt-fast style: plain `prefill`, `decode_one_token`, `generate`). blocks.py is the write side."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from . import quant
from .batch import Placement, Row, biased_mask, generate_batch
from .draft import lookup_draft
from .kv_cache import cache_of
from .layout import check_kv_dtype, check_position_scheme
from .model import encoding_dtype, returned_cache, sink_token_id, with_cache
from .rope import layer_rotaries, rerotate_layers, rotate_tokens


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    prefill_s: float  # assembling the memory cache + prefilling the question = time to first token
    decode_s: float
    context_tokens: int  # entries in the KV cache before the question
    prompt_tokens: int = 0  # the question's tokens (with the RAG baseline: the re-prefilled chunks' too)


@dataclass
class Generated:
    ids: list[int]
    first_token_s: float  # perf_counter() when the first token was known


def prefill(model, cache, ids: torch.Tensor, start: int) -> torch.Tensor:
    """ids [1, Q] at positions start.. -> logits of the last position [1, V]."""
    pos = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
    # logits_to_keep: the vocabulary projection for the last position only (~20% of a 135M model's per-token work)
    out = model(input_ids=ids, **with_cache(model, cache), position_ids=pos, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]


def decode_one_token(model, cache, token: torch.Tensor, pos: int) -> torch.Tensor:
    """One step: token [1] at position pos -> the next token [1] (greedy)."""
    pos_ids = torch.tensor([[pos]], device=token.device)
    logits = model(input_ids=token.view(1, 1), **with_cache(model, cache), position_ids=pos_ids, use_cache=True).logits
    return logits[:, -1].argmax(-1)


def generate_stream(
    model,
    cache,
    prompt: list[int],
    start: int,
    max_new_tokens: int,
    eos_id: int | None,
    stop=None,
    memory_bias: torch.Tensor | None = None,
) -> Iterator[int]:
    """Greedy decoding, each token id yielded as soon as it is known (the first right after the prefill);
    `stop()` (optional) is asked before each step: True ends generation there (the caller gave up).
    memory_bias [S] (optional): added to every query's attention logits to the cache's S entries (retrieval_bias)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    if memory_bias is None:
        token = prefill(model, cache, ids, start).argmax(-1)  # [1]
    else:
        token = _biased(model, cache, ids, start, memory_bias)
    pos = start + len(prompt)
    for n in range(1, max_new_tokens + 1):
        tid = int(token)
        if tid == eos_id:
            return
        yield tid
        if n == max_new_tokens or (stop is not None and stop()):
            return
        if memory_bias is None:
            token = decode_one_token(model, cache, token, pos)
        else:
            token = _biased(model, cache, token.view(1, 1), pos, memory_bias)
        pos += 1


def _biased(model, cache, ids: torch.Tensor, start: int, memory_bias: torch.Tensor) -> torch.Tensor:
    """prefill / decode_one_token with memory_bias [S] on the logits to the first S cache entries: ids [1, Q]
    -> the next token [1]. The mask is 4D [1, 1, Q, n + Q] (n entries cached): bias, then 0 (earlier question or
    answer tokens), then causal among the Q new ones."""
    n, q = cache.get_seq_length(), ids.shape[1]
    bias = torch.zeros(1, n + q, device=ids.device)
    bias[0, : len(memory_bias)] = memory_bias
    mask = biased_mask(torch.ones(1, n + q, dtype=torch.long, device=ids.device), bias, q)
    pos = torch.arange(start, start + q, device=ids.device)[None]
    out = model(input_ids=ids, **with_cache(model, cache), position_ids=pos, attention_mask=mask, logits_to_keep=1)
    return out.logits[:, -1].argmax(-1)


def generate(
    model, cache, prompt: list[int], start: int, max_new_tokens: int, eos_id: int | None, stop=None
) -> Generated:
    """generate_stream, collected: the ids and when the first was known."""
    ids, first = [], None
    for tid in generate_stream(model, cache, prompt, start, max_new_tokens, eos_id, stop):
        first = first or time.perf_counter()
        ids.append(tid)
    return Generated(ids, first or time.perf_counter())


class TextStream:
    """Token ids -> the answer's text in pieces as they become final. Their concatenation is the whole answer,
    decoded and stripped, exactly: leading whitespace is dropped, trailing whitespace and an unfinished UTF-8
    character (a byte-level token may end inside one) are held back until later text makes them final."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], ""

    def push(self, tid: int) -> str:
        self.ids.append(tid)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        return self._advance(text.rstrip().rstrip("\ufffd").rstrip())

    def finish(self) -> tuple[str, str]:
        """-> (the last piece, the whole answer)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).strip()
        return self._advance(text), self.sent

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent):  # decoding changed text already sent (never seen): wait for the end
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece


class MemoryDecoder:
    """Greedy decoding over retrieved blocks placed in front of the question."""

    def __init__(
        self,
        model,
        tokenizer,
        question_template: str = "\n{question}",
        position_scheme: str = "consecutive",
        kv_dtype: str = "float16",
        codec=None,
        block_key_scale: float = 1.0,
        draft_tokens: int = 0,
    ):
        """block_key_scale: the retrieved blocks' keys are multiplied by it, i.e. the question's attention logits
        to block tokens (not to the sink, not to itself) are; > 1 sharpens the attention over many blocks
        (an inverse attention temperature for memory, APE-style; bench/composition.py measures it).
        draft_tokens: answer_batch drafts up to this many tokens of each answer from its blocks' tokens (draft.py)
        and checks them in the question's pass; 0 = none."""
        check_kv_dtype(kv_dtype)
        if not block_key_scale > 0:
            raise ValueError(f"block_key_scale must be > 0, not {block_key_scale}")
        self.block_key_scale = block_key_scale
        if draft_tokens < 0:
            raise ValueError(f"draft_tokens must be 0 or more, not {draft_tokens}")
        self.draft_tokens = draft_tokens
        if (kv_dtype == "codec") != (codec is not None):
            raise ValueError("kv_dtype 'codec' needs the codec (codec.py) its blocks were written with")
        self.codec = codec
        self.model, self.tokenizer = model, tokenizer
        self.template, self.scheme, self.kv_dtype = question_template, check_position_scheme(position_scheme), kv_dtype
        self.device = next(model.parameters()).device
        self.sink_id = sink_token_id(tokenizer)
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([[self.sink_id]], device=self.device), use_cache=True)
        layers = returned_cache(out).layers
        self.sink_kv = (torch.stack([x.keys for x in layers]), torch.stack([x.values for x in layers]))  # [L,1,H,1,D]

    def build_cache(self, blocks: list[dict[str, np.ndarray]], chunk_tokens: int, room: int = 0):
        """blocks (blocks.blocks_of), in reading order -> (cache, next position). The cache holds the sink and the
        blocks' entries in one buffer per K and V for all layers, written once, with `room` free entries after
        them for the question and the answer (kv_cache.py: no copy of the cache per generated token)."""
        placed, next_pos = self.place(blocks, chunk_tokens)
        end, like = placed.length, placed.like
        keys = like.new_empty(*like.shape[:3], end + room, like.shape[4])  # [L, 1, H, end + room, D]
        values = like.new_empty(keys.shape)
        placed.write(keys[:, :, :, :end], values[:, :, :, :end])
        return cache_of(keys, values, end), next_pos

    def place(self, blocks: list[dict[str, np.ndarray]], chunk_tokens: int) -> tuple[Placement, int]:
        """The cache of the blocks (in reading order) not yet assembled -> (its Placement, next position): the
        batch writes it straight into its own buffers."""
        valid = _valid_tokens(blocks)
        span = len(blocks) if self.scheme == "consecutive" else min(len(blocks), 1)
        write = functools.partial(self._write_blocks, blocks, valid, chunk_tokens)
        return Placement(1 + sum(valid), write, self.sink_kv[0]), 1 + span * chunk_tokens

    def _write_blocks(self, blocks, valid: list[int], chunk_tokens: int, keys, values) -> None:
        """The sink and the blocks' entries, dequantised and moved to their places, into keys, values
        [L, 1, H, S, D]."""
        rotaries = layer_rotaries(self.model)
        sink_k, sink_v = self.sink_kv  # [L, 1, H, 1, D]
        keys[:, :, :, :1], values[:, :, :, :1] = sink_k, sink_v
        coded = self._decode_codes(blocks, valid) if self.codec is not None else None
        at = 1
        for j, (block, n_valid) in enumerate(zip(blocks, valid)):
            delta = j * chunk_tokens if self.scheme == "consecutive" else 0
            if coded is not None:  # keys before RoPE: placed token by token at delta + 1..n
                kt, vt = next(coded)
                kt = rotate_tokens(kt, delta + torch.arange(1, n_valid + 1, device=self.device), rotaries)
            else:
                kt, vt = quant.unpack_kv(
                    {
                        name: torch.from_numpy(np.array(col)).to(self.device)  # Ray: read-only
                        for name, col in block.items()
                        if name not in ("positions", "tokens")
                    },
                    self.kv_dtype,
                )
                kt, vt = kt[:, :, :n_valid], vt[:, :, :n_valid]  # [L, H, S', D]
                kt = rerotate_layers(kt, delta, rotaries, 0)
            if self.block_key_scale != 1.0:
                kt = kt * self.block_key_scale
            keys[:, 0, :, at : at + n_valid], values[:, 0, :, at : at + n_valid] = kt, vt  # cast to the cache's dtype
            at += n_valid

    def _decode_codes(self, blocks, valid: list[int]):
        """The valid tokens of every block decoded at once (codec.py) -> per block keys before RoPE, values
        [L, H, S', D] on the device."""
        codes = np.concatenate([np.asarray(b["codes"][:n]) for b, n in zip(blocks, valid)])
        keys, values = self.codec.decode(codes, encoding_dtype("auto", self.device))  # [sum S', L, H, D]
        at = 0
        for n in valid:
            part = slice(at, at + n)
            at += n
            yield (keys[part].permute(1, 2, 0, 3).to(self.device), values[part].permute(1, 2, 0, 3).to(self.device))

    def _prompt(self, question: str) -> list[int]:
        return self.tokenizer(self.template.format(question=question), add_special_tokens=False).input_ids

    def draft(self, prompt: list[int], blocks, max_new_tokens: int) -> list[int]:
        """A draft of the answer from the blocks' own tokens (draft.py; blocks read without them get none), short
        of max_new_tokens by one: the pass that checks it gives one token more than it keeps."""
        if not self.draft_tokens or not all("tokens" in b for b in blocks):
            return []
        memory = [np.asarray(b["tokens"]).tolist() for b in blocks]
        return lookup_draft(prompt, memory, min(self.draft_tokens, max_new_tokens - 1))

    def memory_bias(self, blocks, block_bias: list[float] | None) -> torch.Tensor | None:
        """Per-block logit biases -> one per cache entry [S] (the sink 0, then each block's valid tokens); None
        when there is none (or all are 0: the plain path, bit for bit)."""
        if block_bias is None or not any(block_bias):
            return None
        parts = [torch.zeros(1)] + [torch.full((n,), float(b)) for n, b in zip(_valid_tokens(blocks), block_bias)]
        return torch.cat(parts).to(self.device)

    def answer(
        self, question: str, blocks, chunk_tokens: int, max_new_tokens: int = 32, stop=None, block_bias=None
    ) -> Answer:
        return last(self.answer_stream(question, blocks, chunk_tokens, max_new_tokens, stop, block_bias))

    def answer_text(self, question: str, chunks: list[list[int]], max_new_tokens: int = 32, stop=None) -> Answer:
        return last(self.answer_text_stream(question, chunks, max_new_tokens, stop))

    @torch.inference_mode()
    def answer_stream(
        self, question: str, blocks, chunk_tokens: int, max_new_tokens: int = 32, stop=None, block_bias=None
    ) -> Iterator[str | Answer]:
        """The answer over the blocks (in reading order): its text in pieces as generated, then the Answer.
        block_bias: per block, added to the question's attention logits to its tokens (ask.retrieval_bias)."""
        t0 = time.perf_counter()
        prompt = self._prompt(question)
        cache, next_pos = self.build_cache(blocks, chunk_tokens, room=len(prompt) + max_new_tokens)
        context_tokens = cache.get_seq_length()
        eos, bias = self.tokenizer.eos_token_id, self.memory_bias(blocks, block_bias)
        ids = generate_stream(self.model, cache, prompt, next_pos, max_new_tokens, eos, stop, bias)
        yield from self._stream(ids, t0, context_tokens, len(prompt))

    @torch.inference_mode()
    def answer_text_stream(
        self, question: str, chunks: list[list[int]], max_new_tokens: int = 32, stop=None
    ) -> Iterator[str | Answer]:
        """Baselines on the same decoder: the chunks' tokens re-prefilled as the prompt ([sink] + chunks +
        question) — RAG with retrieved chunks, or full context with the whole document."""
        from transformers import DynamicCache

        t0 = time.perf_counter()
        context = [self.sink_id] + [t for c in chunks for t in c]
        prompt = context + self._prompt(question)
        ids = generate_stream(self.model, DynamicCache(), prompt, 0, max_new_tokens, self.tokenizer.eos_token_id, stop)
        yield from self._stream(ids, t0, len(context), len(prompt) - len(context))

    @torch.inference_mode()
    def answer_batch(
        self, asks: list[tuple[str, list, int, int]], stops: list, admit=None, max_rows: int = 0
    ) -> Iterator[tuple[int, str | Answer]]:
        """answer_stream for several asks (question, blocks, chunk_tokens, max_new_tokens[, block_bias]) decoded
        together (batch.generate_batch): (row, text piece) as generated, (row, Answer) when the row ends.
        admit(free), if given, is asked after each step for up to `free` more asks (question, blocks, chunk_tokens,
        max_new_tokens, stop[, block_bias]), which join the batch as rows len(asks), len(asks) + 1, ...; at most
        max_rows decode at once (0: no limit)."""
        started: list[float] = []  # when each row's cache assembly began: its time to first token counts from there
        contexts: list[int] = []  # cache entries before the question
        prompt_tokens: list[int] = []
        texts: list[TextStream] = []
        first: list[float | None] = []

        def rows(work: list[tuple], row_stops: list) -> list[Row]:
            out = []
            for (question, blocks, chunk_tokens, max_new, *bias), stop in zip(work, row_stops):
                started.append(time.perf_counter())
                placed, start = self.place(blocks, chunk_tokens)
                prompt = self._prompt(question)
                contexts.append(placed.length)
                prompt_tokens.append(len(prompt))
                texts.append(TextStream(self.tokenizer))
                first.append(None)
                memory_bias = self.memory_bias(blocks, bias[0] if bias else None)
                out.append(Row(placed, prompt, start, max_new, stop, memory_bias, self.draft(prompt, blocks, max_new)))
            return out

        def more(free: int) -> list[Row]:
            new = admit(free)  # (question, blocks, chunk_tokens, max_new_tokens, stop[, block_bias])
            return rows([(*a[:4], *a[5:6]) for a in new], [a[4] for a in new])

        eos = self.tokenizer.eos_token_id
        for r, tid in generate_batch(self.model, rows(asks, stops), eos, more if admit else None, max_rows):
            first[r] = first[r] or time.perf_counter()
            if tid is not None:
                if piece := texts[r].push(tid):
                    yield r, piece
                continue
            piece, whole = texts[r].finish()
            if piece:
                yield r, piece
            done = time.perf_counter()
            yield r, Answer(whole, texts[r].ids, first[r] - started[r], done - first[r], contexts[r], prompt_tokens[r])

    def _stream(self, ids: Iterator[int], t0: float, context_tokens: int, prompt_tokens: int):
        text, first = TextStream(self.tokenizer), None
        for tid in ids:
            first = first or time.perf_counter()
            if piece := text.push(tid):
                yield piece
        first = first or time.perf_counter()  # no token (end of sequence at once): the prefill ended here
        piece, whole = text.finish()
        if piece:
            yield piece
        done = time.perf_counter()
        yield Answer(whole, text.ids, first - t0, done - first, context_tokens, prompt_tokens)


def _valid_tokens(blocks) -> list[int]:
    """Each block's stored tokens (a short chunk's block is padded; positions -1 there, the same in every layer)."""
    return [int((b["positions"][0, 0] >= 0).sum()) for b in blocks]


def last(parts: Iterator):
    """The last item of a stream (the Answer after the text pieces); None if it yields nothing."""
    out = None
    for out in parts:  # noqa: B007
        pass
    return out
