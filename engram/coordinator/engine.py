"""The coordinator's Ray side, one object the server talks to: the cluster (actors, routing table), the write
path, the read path and rebalancing, each in its own module. Knows Ray, not gRPC (server.py maps this onto the
service). All methods are async and never block the loop: Ray ObjectRefs are awaited, tokenisation runs in a
thread."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, replace

from ..decoder import model as decoder_model
from ..errors import EngramError, ErrorCode
from ..workers.results import Compacted, ShardStats
from .ask import AskResult, Reader, ReadResult
from .cluster import Cluster
from .config import EngramConfig
from .rebalance import Rebalancer, RebalanceState
from .write import Writer, Written

log = logging.getLogger("engram")


@dataclass
class Document:
    name: str
    chunks: int
    tokens: int
    digest: str  # sha256 hex of its text ("" if written before digests were kept)
    written: float  # unix seconds


@dataclass
class NamespaceSize:
    documents: int
    chunks: int = 0
    tokens: int = 0


@dataclass
class ClusterStats:
    shards: list[ShardStats]
    documents: int  # (namespace, document) pairs, each counted once however many shards hold its chunks
    chunks: int
    blocks: int
    tokens: int
    stored_bytes: int
    bytes_per_token: float  # stored bytes per written token (identical chunks share a block)
    unique_bytes_per_token: float  # stored bytes per token of the distinct blocks
    full_fp16_kv_bytes_per_token: float  # the decoder's own fp16 KV cache per token, for comparison
    rebalance: RebalanceState


class Engine:
    def __init__(self, cfg: EngramConfig):
        self.cfg = cfg
        self.tokenizer = decoder_model.load_tokenizer(cfg.decoder)
        self.tokenizer.model_max_length = 1 << 62  # we chunk ourselves; silence the length warning
        self.cluster = Cluster(cfg)
        self.writer = Writer(self.cluster, self.tokenizer)
        self.reader = Reader(self.cluster, self.tokenizer)
        self.rebalancer = Rebalancer(self.cluster)

    # what tests, benchmarks and scenario scripts read of the running cluster
    @property
    def layout(self):
        return self.cluster.layout

    @property
    def fingerprint(self) -> str:
        return self.cluster.fingerprint

    @property
    def shards(self) -> list:
        return self.cluster.shards

    @property
    def shard_ids(self) -> list[int]:
        return self.cluster.shard_ids

    @property
    def decoder(self):
        return self.cluster.decoder

    @property
    def resume_rebalance(self) -> bool:
        return self.cluster.resume_rebalance

    def tokenize(self, text: str) -> list[int]:
        return self.writer.tokenize(text).tolist()

    # --- the service ---------------------------------------------------------------------------------------------
    async def write_document(self, namespace: str, name: str, text: str, request_id: str = "") -> Written:
        return await self.writer.write_document(namespace, name, text, request_id)

    async def ask(
        self, namespace: str, question: str, top_k: int, max_new_tokens: int, mode: str = "memory"
    ) -> AskResult:
        return await self.reader.ask(namespace, question, top_k, max_new_tokens, mode)

    def ask_stream(self, namespace: str, question: str, top_k: int, max_new_tokens: int, mode: str = "memory"):
        """Reader.ask_stream: the hits, then the answer's text in pieces, then the AskResult."""
        return self.reader.ask_stream(namespace, question, top_k, max_new_tokens, mode)

    async def namespaces(self) -> set[str]:
        """Every namespace holding a document on some shard."""
        return await self.reader.namespaces()

    async def namespace_sizes(self) -> dict[str, NamespaceSize]:
        """namespace -> its documents (each counted once, however many shards hold its chunks), chunks, tokens."""
        docs, usage = await asyncio.gather(self._documents(), self.cluster.all_shards("namespace_usage"))
        sizes = {ns: NamespaceSize(n) for ns, n in Counter(ns for ns, _ in docs).items()}
        for shard in usage:
            for ns, (chunks, tokens) in shard.items():
                if ns in sizes:  # not a document being written (not listed yet)
                    sizes[ns].chunks += chunks
                    sizes[ns].tokens += tokens
        return sizes

    async def documents(self, namespace: str) -> list[Document]:
        """The namespace's documents, by name, as all shards hold them (a document being written is left out)."""
        merged: dict[str, Document] = {}
        for infos in await self.cluster.all_shards("document_list", namespace):
            for i in infos:
                d = merged.setdefault(i.name, Document(i.name, 0, 0, i.digest, i.written))
                d.chunks, d.tokens = d.chunks + i.chunks, d.tokens + i.tokens
                d.written = max(d.written, i.written)
        writing = {name for ns, name in self.cluster.writing if ns == namespace}
        return [merged[n] for n in sorted(merged) if n not in writing]

    async def _documents(self) -> set[tuple[str, str]]:
        """Every (namespace, document) on some shard, each once however many shards hold its chunks."""
        return set().union(*await self.cluster.all_shards("documents"))

    async def document_text(self, namespace: str, name: str) -> str:
        """A document's text, decoded from its chunks' stored token ids in order."""
        parts = sorted(p for shard in await self.cluster.all_shards("document_tokens", namespace, name) for p in shard)
        if not parts or (namespace, name) in self.cluster.writing:
            raise EngramError(ErrorCode.NOT_FOUND, f"no document {name!r} in namespace {namespace!r}")
        if [seq for seq, _ in parts] != list(range(len(parts))):  # a move between shards, half-seen: ask again
            raise EngramError(ErrorCode.UNAVAILABLE, f"document {name!r} is moving between shards; retry")
        ids = [t for _, tokens in parts for t in tokens]
        return await asyncio.to_thread(self.tokenizer.decode, ids)

    async def delete_namespace(self, namespace: str) -> tuple[int, int]:
        """Delete every document of the namespace -> (documents, chunks) removed. A write still under way in it
        lands after this (delete again once it is acknowledged)."""
        docs = [name for ns, name in await self._documents() if ns == namespace]
        if not docs:
            raise EngramError(ErrorCode.NOT_FOUND, f"namespace {namespace!r} holds no documents")
        chunks = 0
        for name in docs:
            try:
                chunks += await self.delete(namespace, name)
            except EngramError as e:  # deleted meanwhile by another request
                if e.code != ErrorCode.NOT_FOUND:
                    raise
        return len(docs), chunks

    async def read(self, namespace: str, query: str, top_k: int) -> ReadResult:
        return await self.reader.read(namespace, query, top_k)

    async def delete(self, namespace: str, name: str) -> int:
        async with self.cluster.doc_lock(namespace, name):  # not while a rebalance moves this document
            removed = await self.cluster.all_shards("delete_document", namespace, name)
        if not sum(removed):  # a document lives on a shard only through its chunks
            raise EngramError(ErrorCode.NOT_FOUND, f"no document {name!r} in namespace {namespace!r}")
        return int(sum(removed))

    async def stats(self) -> ClusterStats:
        shards, docs = await asyncio.gather(self.cluster.all_shards("stats"), self.cluster.all_shards("documents"))
        total = {k: sum(getattr(s, k) for s in shards) for k in ("chunks", "blocks", "tokens", "stored_bytes")}
        unique_tokens = total["blocks"] * self.layout.chunk_tokens
        return ClusterStats(
            shards=shards,
            documents=len(set().union(*docs)),
            **total,
            bytes_per_token=total["stored_bytes"] / total["tokens"] if total["tokens"] else 0.0,
            unique_bytes_per_token=total["stored_bytes"] / unique_tokens if unique_tokens else 0.0,
            full_fp16_kv_bytes_per_token=float(self.layout.full_fp16_bytes_per_token),
            rebalance=replace(self.rebalancer.state),  # a snapshot: the running one changes
        )

    async def compact(self) -> list[Compacted]:
        """Every shard rewrites its store without deleted and moved chunks' blocks (not during a rebalance)."""
        if self.rebalancer.state.running:
            raise EngramError(ErrorCode.BUSY, "a rebalance is running; compact when Stats shows it finished")
        return await self.cluster.all_shards("compact")

    async def add_shards(self, count: int) -> tuple[list[int], list[int]]:
        return await self.rebalancer.add_shards(count)

    async def rebalance(self) -> int:
        return await self.rebalancer.rebalance()

    def start_background(self) -> None:
        """On the serving loop: repair writes a crashed coordinator left half-committed, finish a rebalance."""
        pending = self.cluster.intents.pending()
        self.cluster.writing |= {(i.namespace, i.name) for i in pending}  # not served until repaired
        self._repair = asyncio.ensure_future(self.repair(pending))
        self.rebalancer.resume()

    async def repair(self, intents) -> int:
        """Take back the chunks of each unfinished write (its identity's only), under the document's lock."""
        for intent in intents:
            async with self.cluster.doc_lock(intent.namespace, intent.name):
                try:
                    await self.writer.rollback(intent)
                finally:
                    self.cluster.writing.discard((intent.namespace, intent.name))
            log.info("repaired an unfinished write of %s/%s", intent.namespace, intent.name)
        return len(intents)

    def shutdown(self) -> None:
        self.cluster.shutdown()
