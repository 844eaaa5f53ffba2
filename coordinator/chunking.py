"""Tokens -> fixed-length chunks (restarting at each document) -> content hashes -> shards (rendezvous hashing)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass
class Chunk:
    seq: int  # chunk number in the document
    offset: int  # first token's offset in the document
    tokens: list[int]
    context: list[int] = field(default_factory=list)  # the tokens before it that its KV is encoded after


def split(ids: list[int], chunk_tokens: int, context_tokens: int = 0) -> list[Chunk]:
    return [Chunk(i, off, ids[off : off + chunk_tokens], ids[max(0, off - context_tokens) : off])
            for i, off in enumerate(range(0, len(ids), chunk_tokens))]


def route(content_hash: bytes, shard_ids: list[int]) -> int:
    """Rendezvous (highest-random-weight) hashing: stable, and adding a shard moves only ~1/n of the chunks.
    Routing by content keeps identical chunks on one shard, where they share one stored block."""
    return max(shard_ids, key=lambda s: hashlib.blake2b(content_hash + s.to_bytes(4, "little"), digest_size=8).digest())
