"""What shards answer, typed: these cross Ray actor boundaries (pickled), so the coordinator and server read
named fields, never dict keys."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .lexical import TermStats


@dataclass
class SearchHits:
    """A shard's top-k distinct blocks of one namespace for a query, best first."""

    score: np.ndarray  # [k]
    block: np.ndarray  # [k] block rows on this shard
    doc: list[str]  # [k] document names
    seq: np.ndarray  # [k] chunk numbers in their documents
    offset: np.ndarray  # [k] first token of each chunk in its document
    episodes: int  # episodic memories of the namespace on this shard (0: the namespace holds nothing here)
    readout: np.ndarray | None = None  # [C] hierarchical episodic readout (asked for by Read only)
    lexical: np.ndarray | None = None  # [k] BM25 of each hit by this shard's statistics alone
    tf: np.ndarray | None = None  # [k, T] count of each query term in each hit's key text (None: no lexical query)
    length: np.ndarray | None = None  # [k] analysed tokens of each hit's key text
    term_stats: TermStats | None = None  # the namespace's statistics here for the query's terms

    @staticmethod
    def empty(dim: int, readout: bool) -> SearchHits:
        """The namespace holds nothing on this shard (a zero readout of width dim if one was asked for)."""
        none = np.zeros(0, np.int64)
        return SearchHits(np.zeros(0), none, [], none, none, 0, np.zeros(dim) if readout else None, np.zeros(0))


@dataclass
class ChunkAt:
    seq: int
    offset: int
    block: int


@dataclass
class DocHashes:
    """One document on a shard and the content addresses of its chunks there (what a rebalance scans)."""

    namespace: str
    name: str
    hashes: list[bytes]


@dataclass
class DocChunks:
    """This shard's chunks of one document, as a move to another shard needs them."""

    request: str
    hash: list[bytes]
    seq: list[int]
    offset: list[int]
    length: list[int]
    digest: str = ""  # the document's, as its shards keep them (DocAbout)
    written: float = 0.0

    def pick(self, rows: list[int]) -> DocChunks:
        parts = ([getattr(self, k)[i] for i in rows] for k in ("hash", "seq", "offset", "length"))
        return DocChunks(self.request, *parts, self.digest, self.written)


@dataclass
class DocInfo:
    """One document of a namespace, as a shard holds it (a document's chunks may be spread over shards)."""

    name: str
    chunks: int  # live chunks here
    tokens: int  # their tokens
    digest: str  # sha256 hex of the whole document's text ("" if written before digests were kept)
    written: float  # unix seconds


@dataclass
class Committed:
    chunks: int
    doc: int
    replayed: bool  # the same request committed this document before: nothing changed


@dataclass
class Compacted:
    shard: int
    blocks_before: int
    blocks_after: int
    bytes_before: int
    bytes_after: int


@dataclass
class ShardStats:
    shard: int
    node: str
    documents: int
    chunks: int
    blocks: int
    tokens: int
    stored_bytes: int
    episodes: int
    resident_bytes: int
    pid: int = field(default=0)  # the shard's process (tests kill it; never sent to clients)
    lexical_behind: int = 0  # committed chunk rows the lexical index has not indexed (0 once open and after a commit)
    vectors_behind: int = 0  # the same for the vector index
