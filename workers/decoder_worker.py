"""The decoder worker: answers a question over retrieved KV blocks. Ray actor (GPU when there is one)."""

from __future__ import annotations

import dataclasses
import os
import time

from ..decoder import kv as kvlib
from ..decoder import model as decoder_model


class DecoderWorker:
    def __init__(self, cfg: decoder_model.DecoderConfig, position_scheme: str = "consecutive", kv_dtype: str = "float16"):
        self.cfg = cfg
        if not cfg.threads:  # Ray caps threads of actors that reserve no CPU; the decoder may use the node's cores
            cfg = dataclasses.replace(cfg, threads=os.cpu_count() or 1)
        model, tokenizer = decoder_model.load(cfg)
        self.decoder = kvlib.MemoryDecoder(model, tokenizer, cfg.question_template, position_scheme, kv_dtype)

    def set_options(self, template: str | None = None, position_scheme: str | None = None) -> None:
        """For benchmark sweeps: change the question template or position scheme of a running worker."""
        if template is not None:
            self.decoder.template = template
        if position_scheme is not None:
            self.decoder.scheme = position_scheme

    def answer(self, question: str, chunk_tokens: int, max_new_tokens: int, order: list[tuple[int, int]],
               *block_lists) -> dict:
        """block_lists: per shard, its blocks (dicts of block columns) (Ray resolves them before this runs);
        order: (list, index) pairs giving the reading order in which the blocks are placed before the question."""
        started = time.time()
        blocks = [block_lists[i][j] for i, j in order]
        a = self.decoder.answer(question, blocks, chunk_tokens, max_new_tokens or self.cfg.max_new_tokens)
        return self._reply(a, started)

    def answer_tokens(self, question: str, max_new_tokens: int, chunks: list[list[int]]) -> dict:
        """The RAG baseline: the retrieved chunks' tokens prefilled again as the prompt, no stored KV."""
        started = time.time()
        return self._reply(self.decoder.answer_text(question, chunks, max_new_tokens or self.cfg.max_new_tokens),
                           started)

    def _reply(self, a: kvlib.Answer, started: float) -> dict:
        return {"text": a.text, "started_wall": started, "first_token_wall": started + a.prefill_s,
                "decode_s": a.decode_s, "context_tokens": a.context_tokens, "new_tokens": len(a.token_ids),
                "device": str(self.decoder.device)}
