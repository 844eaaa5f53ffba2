"""The benchmark's own copy of the decoder: the oracle (the needle's own chunks encoded exactly as the service
encodes them) and the full-context baseline, so a miss is attributed to retrieval, composition or the decoder."""

from __future__ import annotations

import os

from .cases import Needle


class LocalDecoder:
    def __init__(self, cfg):
        import torch

        from ..coordinator.config import block_layout
        from ..decoder.codec import load_codec
        from ..decoder.generate import MemoryDecoder
        from ..decoder.model import load

        torch.set_num_threads(os.cpu_count() or 1)
        self.cfg = cfg
        self.model, self.tok = load(cfg.decoder)
        self.layout = block_layout(cfg)
        e = cfg.encoder
        self.codec = load_codec(e.kv_codec, cfg.decoder.model, self.layout.codec) if e.kv_dtype == "codec" else None
        self.decoder = MemoryDecoder(
            self.model,
            self.tok,
            cfg.decoder.question_template,
            cfg.ask.position_scheme,
            e.kv_dtype,
            self.codec,
            cfg.ask.block_key_scale,
        )
        self.window = int(self.model.config.max_position_embeddings)

    def needle_chunks(self, documents: list[tuple[str, str]], needles: list[Needle]) -> list[list[tuple]]:
        """Per needle, the chunks its sentence overlaps as (document, seq, token ids, context ids), cut exactly as
        the service cuts documents."""
        t, ctx = self.cfg.encoder.chunk_tokens, self.cfg.encoder.context_tokens
        out: list[list[tuple]] = [[] for _ in needles]
        for doc, text in documents:
            spans = [
                (k, i, i + len(n.text.strip())) for k, n in enumerate(needles) if (i := text.find(n.text.strip())) >= 0
            ]
            if not spans:
                continue
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = enc.input_ids, enc.offset_mapping
            for k, start, end in spans:
                for c in sorted({j // t for j, (a, b) in enumerate(offsets) if a < end and b > start}):
                    out[k].append((doc, c, ids[c * t : (c + 1) * t], ids[max(0, c * t - ctx) : c * t]))
        return out

    def oracle(self, question: str, chunks: list[tuple[list[int], list[int]]], max_new: int) -> str:
        """chunks: (tokens, context), encoded as the service encodes them."""
        from ..decoder.blocks import blocks_of, encode_chunks
        from ..decoder.model import encoding_autocast

        enc = self.cfg.encoder
        with encoding_autocast(enc.dtype, self.model):  # as the encoder actors run it
            batch = encode_chunks(
                self.model,
                self.decoder.sink_id,
                [c for c, _ in chunks],
                self.layout,
                enc.span,
                enc.scorer,
                [x for _, x in chunks],
                self.codec,
            )
        return self.decoder.answer(question, blocks_of(batch), enc.chunk_tokens, max_new).text

    def full(self, question: str, documents: list[tuple[str, str]], max_new: int):
        ids = [t for _, text in documents for t in self.tok(text, add_special_tokens=False).input_ids]
        if len(ids) + 64 + max_new > self.window:
            return None
        return self.decoder.answer_text(question, [ids], max_new)
