"""The read side of explicit memory: retrieved blocks placed in front of the question, greedy decoding
(gpt-fast style: plain `prefill`, `decode_one_token`, `generate`). blocks.py is the write side."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from . import quant
from .layout import check_kv_dtype, check_position_scheme
from .model import sink_token_id
from .rope import rerotate


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    prefill_s: float  # assembling the memory cache + prefilling the question = time to first token
    decode_s: float
    context_tokens: int  # entries in the KV cache before the question


@dataclass
class Generated:
    ids: list[int]
    first_token_s: float  # perf_counter() when the first token was known


def prefill(model, cache, ids: torch.Tensor, start: int) -> torch.Tensor:
    """ids [1, Q] at positions start.. -> logits of the last position [1, V]."""
    pos = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
    return model(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True).logits[:, -1]


def decode_one_token(model, cache, token: torch.Tensor, pos: int) -> torch.Tensor:
    """One step: token [1] at position pos -> the next token [1] (greedy)."""
    pos_ids = torch.tensor([[pos]], device=token.device)
    logits = model(input_ids=token.view(1, 1), past_key_values=cache, position_ids=pos_ids, use_cache=True).logits
    return logits[:, -1].argmax(-1)


def generate(
    model, cache, prompt: list[int], start: int, max_new_tokens: int, eos_id: int | None, stop=None
) -> Generated:
    """Greedy decoding; `stop()` (optional) is asked before each step: True ends generation there (the caller gave
    up on the answer)."""
    device = next(model.parameters()).device
    token = prefill(model, cache, torch.tensor([prompt], device=device), start).argmax(-1)  # [1]
    first = time.perf_counter()
    ids: list[int] = []
    pos = start + len(prompt)
    for _ in range(max_new_tokens):
        tid = int(token)
        if tid == eos_id:
            break
        ids.append(tid)
        if len(ids) == max_new_tokens or (stop is not None and stop()):
            break
        token = decode_one_token(model, cache, token, pos)
        pos += 1
    return Generated(ids, first)


class MemoryDecoder:
    """Greedy decoding over retrieved blocks placed in front of the question."""

    def __init__(
        self,
        model,
        tokenizer,
        question_template: str = "\n{question}",
        position_scheme: str = "consecutive",
        kv_dtype: str = "float16",
    ):
        check_kv_dtype(kv_dtype)
        self.model, self.tokenizer = model, tokenizer
        self.template, self.scheme, self.kv_dtype = question_template, check_position_scheme(position_scheme), kv_dtype
        self.device = next(model.parameters()).device
        self.sink_id = sink_token_id(tokenizer)
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([[self.sink_id]], device=self.device), use_cache=True)
        self.sink_kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]  # [1, H, 1, D] each

    def build_cache(self, blocks: list[dict[str, np.ndarray]], chunk_tokens: int):
        """blocks (blocks.blocks_of), in reading order -> (cache, next position)."""
        from transformers import DynamicCache

        rotary = self.model.model.rotary_emb
        dtype = self.sink_kv[0][0].dtype
        cache = DynamicCache()
        per_layer: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[kv] for kv in self.sink_kv]
        for j, block in enumerate(blocks):
            n_valid = int((block["positions"][0, 0] >= 0).sum())  # same count in every layer and head (select_spans)
            delta = j * chunk_tokens if self.scheme == "consecutive" else 0
            kt, vt = quant.unpack_kv(
                {
                    name: torch.from_numpy(np.array(col)).to(self.device)  # Ray: read-only
                    for name, col in block.items()
                    if name != "positions"
                },
                self.kv_dtype,
            )
            kt, vt = kt[:, :, :n_valid].to(dtype), vt[:, :, :n_valid].to(dtype)  # [L, H, S', D]
            kt = rerotate(kt, delta, rotary)
            for layer in range(kt.shape[0]):
                per_layer[layer].append((kt[layer][None], vt[layer][None]))
        for layer, parts in enumerate(per_layer):
            cache.update(torch.cat([p[0] for p in parts], 2), torch.cat([p[1] for p in parts], 2), layer)
        span = len(blocks) if self.scheme == "consecutive" else min(len(blocks), 1)
        return cache, 1 + span * chunk_tokens

    def _prompt(self, question: str) -> list[int]:
        return self.tokenizer(self.template.format(question=question), add_special_tokens=False).input_ids

    @torch.inference_mode()
    def answer(self, question: str, blocks, chunk_tokens: int, max_new_tokens: int = 32, stop=None) -> Answer:
        t0 = time.perf_counter()
        cache, next_pos = self.build_cache(blocks, chunk_tokens)
        context_tokens = cache.get_seq_length()
        tokens = generate(
            self.model, cache, self._prompt(question), next_pos, max_new_tokens, self.tokenizer.eos_token_id, stop
        )
        return self._answer(tokens, t0, context_tokens)

    @torch.inference_mode()
    def answer_text(self, question: str, chunks: list[list[int]], max_new_tokens: int = 32, stop=None) -> Answer:
        """Baselines on the same decoder: the chunks' tokens re-prefilled as the prompt ([sink] + chunks +
        question) — RAG with retrieved chunks, or full context with the whole document."""
        from transformers import DynamicCache

        t0 = time.perf_counter()
        context = [self.sink_id] + [t for c in chunks for t in c]
        prompt = context + self._prompt(question)
        tokens = generate(self.model, DynamicCache(), prompt, 0, max_new_tokens, self.tokenizer.eos_token_id, stop)
        return self._answer(tokens, t0, len(context))

    def _answer(self, tokens: Generated, t0: float, context_tokens: int) -> Answer:
        text = self.tokenizer.decode(tokens.ids, skip_special_tokens=True).strip()
        first = tokens.first_token_s
        return Answer(text, tokens.ids, first - t0, time.perf_counter() - first, context_tokens)
