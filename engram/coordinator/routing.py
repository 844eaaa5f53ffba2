"""Tokens -> fixed-length chunks (restarting at each document) -> content addresses -> shards (rendezvous hashing).

A chunk's address covers everything that shapes its stored block: the settings (the fingerprint), the context it
is encoded after and its tokens. Routing by address keeps identical chunks on one shard, where they share a block.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np

from ..decoder.layout import BlockLayout


@dataclass
class Chunk:
    seq: int  # chunk number in the document
    offset: int  # first token's offset in the document
    tokens: np.ndarray  # [<= chunk_tokens] int32, a view into the document's ids
    context: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # [<= context_tokens] before it
    after: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # [<= after_tokens] after it (keys only)


def split(ids: np.ndarray, chunk_tokens: int, context_tokens: int = 0, after_tokens: int = 0) -> list[Chunk]:
    """ids: [N] int32 (a list is taken too). Chunks are views of it, not copies."""
    ids = np.asarray(ids, dtype=np.int32)
    return [
        Chunk(
            i,
            off,
            ids[off : off + chunk_tokens],
            ids[max(0, off - context_tokens) : off],
            ids[off + chunk_tokens : off + chunk_tokens + after_tokens],
        )
        for i, off in enumerate(range(0, len(ids), chunk_tokens))
    ]


_CUT = re.compile(r"(?<=\S)\s(?=\S)")  # one whitespace character between two non-whitespace ones


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _neutral_cut(tokenizer, text: str, lo: int, hi: int, window: int = 48) -> int | None:
    """A place in text[lo:hi] where cutting changes no token: the two sides of a window around it tokenise to
    exactly what the whole window does (BPE merges never cross a pre-token boundary; checked, not assumed)."""
    for m in _CUT.finditer(text, lo, hi):
        p = m.start()
        left, right = text[max(0, p - window) : p], text[p : p + window]
        if _ids(tokenizer, left) + _ids(tokenizer, right) == _ids(tokenizer, left + right):
            return p
    return None


def tokenize(tokenizer, text: str, piece_chars: int = 1 << 20) -> np.ndarray:
    """The ids of the whole text, [N] int32, tokenised a piece (~piece_chars) at a time at places that change no
    token. A fast tokenizer given a 32 MiB text at once peaks at ~4.7 GB (measured: bench/doc_memory.py); a
    piece at a time it holds one piece's worth."""
    out, start = [], 0
    while len(text) - start > 2 * piece_chars:
        cut = _neutral_cut(tokenizer, text, start + piece_chars, start + 2 * piece_chars)
        if cut is None:  # no neutral place: the rest goes whole
            break
        out.append(np.asarray(_ids(tokenizer, text[start:cut]), dtype=np.int32))
        start = cut
    out.append(np.asarray(_ids(tokenizer, text[start:]), dtype=np.int32))
    return np.concatenate(out)


def fingerprint(
    model: str,
    layout: BlockLayout,
    span: int,
    scorer: str,
    embedder: str,
    window_tokens: int,
    window_stride: int,
    key_context_tokens: int = 0,
    key_after_tokens: int = 0,
    lexical_context_tokens: int = 0,
) -> str:
    """The settings every stored block depends on; part of each chunk's address and kept in cluster.json."""
    return (
        f"{model}|T{layout.chunk_tokens}|S{layout.keep_tokens}|{span}|{scorer}|{embedder}"
        f"|W{window_tokens}/{window_stride}"
        + (f"|{layout.kv_dtype}" if layout.kv_dtype != "float16" else "")  # fp16 stores predate kv_dtype
        + (f":{layout.codec}" if layout.codec else "")  # blocks of one codec are not another's
        + (f"|K{key_context_tokens}" if key_context_tokens else "")  # and these, key contexts
        + (f"|A{key_after_tokens}" if key_after_tokens else "")
        + (f"|X{lexical_context_tokens}" if lexical_context_tokens else "")
    )


def chunk_hash(tokens, fingerprint: str, context=(), scope: str = "", after=()) -> bytes:
    """Content address of a chunk: its tokens and everything that shapes its stored block (its context too), and
    the namespace it may be shared within (scope; "" = the whole cluster, as stores written before scopes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(fingerprint.encode())
    if scope:
        h.update(b"ns%d:" % len(scope.encode()) + scope.encode())
    if len(context):
        h.update(b"ctx%d:" % len(context) + np.asarray(context, dtype=np.int32).tobytes())
    if len(after):  # the tokens after it shape its retrieval keys (encoder.key_after_tokens)
        h.update(b"aft%d:" % len(after) + np.asarray(after, dtype=np.int32).tobytes())
    h.update(np.asarray(tokens, dtype=np.int32).tobytes())
    return h.digest()


def route(content_hash: bytes, shard_ids: list[int]) -> int:
    """Rendezvous (highest-random-weight) hashing: stable, and adding a shard moves only ~1/n of the chunks."""
    return max(shard_ids, key=lambda s: hashlib.blake2b(content_hash + s.to_bytes(4, "little"), digest_size=8).digest())
