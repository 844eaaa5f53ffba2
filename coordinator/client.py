"""A thin synchronous client for the Engram service."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import grpc

from ..proto import engram_pb2 as pb
from ..proto import engram_pb2_grpc as pb_grpc

PART_BYTES = 1 << 20  # documents travel in ~1 MiB parts, well under the message limit


def split_text(text: str, part_chars: int = PART_BYTES // 4) -> Iterator[str]:
    """Parts of at most ~1 MiB of UTF-8 (≤ 4 bytes a character), never splitting a character."""
    for i in range(0, len(text), part_chars):
        yield text[i : i + part_chars]


class EngramClient:
    def __init__(self, address: str = "127.0.0.1:50551", timeout: float | None = None):
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 16 << 20),
                                                               ("grpc.max_send_message_length", 16 << 20)])
        self.stub = pb_grpc.EngramStub(self.channel)
        self.timeout = timeout

    def write(self, documents: Iterable[tuple[str, str]], namespace: str = "default",
              progress: Callable[[int], None] | None = None) -> pb.WriteReply:
        """documents: (document_id, text) pairs. progress(n) is called with the characters of each part sent."""

        def requests():
            for doc_id, text in documents:
                for part in split_text(text) if text else [""]:
                    yield pb.WriteRequest(namespace=namespace, document_id=doc_id, text=part)
                    if progress:
                        progress(len(part))

        return self.stub.Write(requests(), timeout=self.timeout)

    def ask(self, question: str, namespace: str = "default", top_k: int = 0, max_new_tokens: int = 0) -> pb.AskReply:
        return self.stub.Ask(pb.AskRequest(namespace=namespace, question=question, top_k=top_k,
                                           max_new_tokens=max_new_tokens), timeout=self.timeout)

    def read(self, query: str, namespace: str = "default", top_k: int = 0) -> pb.ReadReply:
        return self.stub.Read(pb.ReadRequest(namespace=namespace, query=query, top_k=top_k), timeout=self.timeout)

    def delete(self, document_id: str, namespace: str = "default") -> pb.DeleteReply:
        return self.stub.Delete(pb.DeleteRequest(namespace=namespace, document_id=document_id), timeout=self.timeout)

    def stats(self) -> pb.StatsReply:
        return self.stub.Stats(pb.StatsRequest(), timeout=self.timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
