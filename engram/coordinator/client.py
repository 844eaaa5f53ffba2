"""A thin synchronous client for the Engram service."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator

import grpc

from ..proto import engram_pb2 as pb
from ..proto import engram_pb2_grpc as pb_grpc

PART_BYTES = 1 << 20  # documents travel in 1 MiB parts, well under the message limit


def split_bytes(data: bytes, part: int = PART_BYTES) -> Iterator[bytes]:
    """1 MiB parts; a part may end inside a UTF-8 character: the server carries it over to the next part."""
    for i in range(0, len(data), part):
        yield data[i : i + part]


class EngramClient:
    def __init__(
        self,
        address: str = "127.0.0.1:50551",
        timeout: float | None = None,
        token: str | None = None,
        root_certificates: bytes | None = None,
    ):
        options = [("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20)]
        if root_certificates is not None:
            self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates), options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.EngramStub(self.channel)
        self.timeout = timeout
        self.metadata = [("authorization", f"Bearer {token}")] if token else None

    def write(
        self,
        documents: Iterable[tuple[str, str | bytes]],
        namespace: str = "default",
        progress: Callable[[int], None] | None = None,
        request_id: str | None = None,
        retries: int = 3,
    ) -> pb.WriteReply:
        """documents: (document_id, text) pairs. Retries UNAVAILABLE under one request id, so a retry never
        stores a document twice. progress(n) is called with the bytes of each part sent."""
        docs = [(d, t.encode("utf-8") if isinstance(t, str) else t) for d, t in documents]
        request_id = request_id or uuid.uuid4().hex

        def requests():
            for doc_id, data in docs:
                for part in split_bytes(data) if data else [b""]:
                    yield pb.WriteRequest(namespace=namespace, document_id=doc_id, text=part, request_id=request_id)
                    if progress:
                        progress(len(part))

        for attempt in range(retries + 1):
            try:
                return self.stub.Write(requests(), timeout=self.timeout, metadata=self.metadata)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == retries:
                    raise
                time.sleep(min(2.0**attempt, 10.0))
        raise AssertionError("unreachable")

    def ask(
        self, question: str, namespace: str = "default", top_k: int = 0, max_new_tokens: int = 0, mode: str = ""
    ) -> pb.AskReply:
        return self.stub.Ask(
            pb.AskRequest(
                namespace=namespace, question=question, top_k=top_k, max_new_tokens=max_new_tokens, mode=mode
            ),
            timeout=self.timeout,
            metadata=self.metadata,
        )

    def ask_stream(
        self, question: str, namespace: str = "default", top_k: int = 0, max_new_tokens: int = 0, mode: str = ""
    ) -> Iterator[pb.AskEvent]:
        """Ask, streamed: an event with the chunks to be read, then `text` events as the decoder generates them,
        then one with the whole `reply`. Leaving the loop early cancels the call (and the decoder's work)."""
        call = self.stub.AskStream(
            pb.AskRequest(
                namespace=namespace, question=question, top_k=top_k, max_new_tokens=max_new_tokens, mode=mode
            ),
            timeout=self.timeout,
            metadata=self.metadata,
        )
        try:
            yield from call
        finally:
            call.cancel()  # a no-op once the stream has ended

    def read(self, query: str, namespace: str = "default", top_k: int = 0) -> pb.ReadReply:
        return self.stub.Read(
            pb.ReadRequest(namespace=namespace, query=query, top_k=top_k), timeout=self.timeout, metadata=self.metadata
        )

    def delete(self, document_id: str, namespace: str = "default") -> pb.DeleteReply:
        return self.stub.Delete(
            pb.DeleteRequest(namespace=namespace, document_id=document_id), timeout=self.timeout, metadata=self.metadata
        )

    def namespaces(self) -> list[pb.NamespaceInfo]:
        """The namespaces holding documents that this client's token may read."""
        return list(self._call("ListNamespaces", pb.ListNamespacesRequest()).namespaces)

    def documents(self, namespace: str = "default") -> list[pb.DocumentInfo]:
        return list(self._call("ListDocuments", pb.ListDocumentsRequest(namespace=namespace)).documents)

    def get_document(self, document_id: str, namespace: str = "default") -> str:
        """A document's text, as stored."""
        parts = self.stub.GetDocument(
            pb.GetDocumentRequest(namespace=namespace, document_id=document_id),
            timeout=self.timeout,
            metadata=self.metadata,
        )
        return b"".join(p.text for p in parts).decode("utf-8")

    def delete_namespace(self, namespace: str) -> pb.DeleteNamespaceReply:
        return self._call("DeleteNamespace", pb.DeleteNamespaceRequest(namespace=namespace))

    def _call(self, method: str, request):
        return getattr(self.stub, method)(request, timeout=self.timeout, metadata=self.metadata)

    def stats(self) -> pb.StatsReply:
        return self.stub.Stats(pb.StatsRequest(), timeout=self.timeout, metadata=self.metadata)

    def add_shards(self, count: int) -> pb.AddShardsReply:
        return self.stub.AddShards(pb.AddShardsRequest(count=count), timeout=self.timeout, metadata=self.metadata)

    def compact(self) -> pb.CompactReply:
        return self.stub.Compact(pb.CompactRequest(), timeout=self.timeout, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def format_stats(s: pb.StatsReply, namespaces: list[pb.NamespaceInfo] = ()) -> str:
    """A Stats reply (and the namespaces' usage, when given) as the tables `engram stats` prints."""
    lines = [
        f"{'shard':>5} {'node':<16} {'docs':>6} {'chunks':>8} {'blocks':>7} {'tokens':>10} {'stored MB':>10} "
        f"{'RSS MB':>8} {'episodes':>8}"
    ]
    for sh in s.shards:
        lines.append(
            f"{sh.shard:>5} {sh.node[:16]:<16} {sh.documents:>6} {sh.chunks:>8} {sh.blocks:>7} "
            f"{sh.tokens:>10} {sh.stored_bytes / 1e6:>10.1f} {sh.resident_bytes / 1e6:>8.0f} {sh.episodes:>8}"
        )
    lines.append(
        f"total: {s.documents} documents, {s.chunks} chunks, {s.tokens} tokens, {s.stored_bytes / 1e6:.1f} MB stored"
    )
    lines.append(
        f"bytes per token: {s.bytes_per_token:,.1f} stored (identical chunks share a block), "
        f"{s.unique_bytes_per_token:,.1f} per distinct-block token, vs {s.full_fp16_kv_bytes_per_token:,.0f} "
        f"for the decoder's full fp16 KV"
    )
    if namespaces:
        lines.append(f"{'namespace':<24} {'docs':>8} {'chunks':>10} {'tokens':>12}")
        lines += [f"{n.name[:24]:<24} {n.documents:>8} {n.chunks:>10} {n.tokens:>12}" for n in namespaces]
    r = s.rebalance
    if r.running or r.error or r.moved_chunks:
        state = "running" if r.running else ("failed: " + r.error if r.error else "done")
        lines.append(
            f"rebalance {state}: {r.moved_chunks} chunks moved, {r.scanned_shards}/{r.total_shards} shards scanned"
        )
    return "\n".join(lines)
