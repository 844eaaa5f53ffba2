"""A shard's documents as wholes: commit, delete, list, read back, and move to another shard (rebalancing).
A part of Shard (shard.py), apart only to keep each file one screenful of concerns."""

from __future__ import annotations

import numpy as np

from ..errors import EngramError, ErrorCode
from .block_store import EncodedBlocks
from .chunk_table import DocAbout
from .results import Committed, DocChunks, DocHashes, DocInfo


class ShardDocuments:
    """Mixed into Shard: uses its store, chunk table, block store, _add_chunks and _forget."""

    def document_request(self, namespace: str, name: str) -> str | None:
        """The request id the document was written with ("" if none); None if there is no such document."""
        doc = self.chunks.doc(namespace, name)
        return None if doc is None else self.chunks.request(doc)

    def commit_document(
        self,
        namespace: str,
        name: str,
        tokens: int,
        hashes: list[bytes],
        seqs: list[int],
        offsets: list[int],
        request_id: str = "",
        digest: str = "",
        written: float = 0.0,
    ) -> Committed:
        """Durably add a document's chunks (their blocks must be staged or stored). Atomic: all or nothing.
        Idempotent under a request id: committing the same request again changes nothing. digest, written: the
        whole document's (sha256 hex of its text, unix seconds), kept for listings and syncs."""
        doc = self.chunks.doc(namespace, name)
        if doc is not None:
            if request_id and self.chunks.request(doc) == request_id:
                return Committed(len(self.chunks.live_rows(doc)), doc, replayed=True)
            raise EngramError(ErrorCode.ALREADY_EXISTS, f"document {name!r} already exists in namespace {namespace!r}")
        about = DocAbout(request_id, digest, written)
        doc = self._add_chunks(namespace, name, None, tokens, hashes, seqs, offsets, about)
        return Committed(len(hashes), doc, replayed=False)

    def delete_document(self, namespace: str, name: str, request: str | None = None) -> int:
        """Remove a document from both memories; episodic rows go by the exact α = −1 update. -> chunks removed.
        request: only if the document was written by this request (a failed write takes back its own chunks)."""
        doc = self.chunks.doc(namespace, name)
        if doc is None or (request is not None and self.chunks.request(doc) != request):
            return 0
        rows = self.chunks.live_rows(doc)
        with self.store.transaction():
            self.chunks.delete_document(doc)
        self._forget(rows)
        return len(rows)

    # --- rebalancing (chunks move to shards added later; copy to the new owner first, then drop here) --------
    def chunk_table(self) -> list[DocHashes]:
        """Every document on this shard with the content addresses of its chunks here."""
        return [
            DocHashes(ns, name, self.blocks.hashes(self.chunks.column("block", self.chunks.live_rows(doc))))
            for (ns, name), doc in self.chunks.lookup.items()
        ]

    def doc_chunks(self, namespace: str, name: str) -> DocChunks | None:
        """This shard's chunks of one document now (None: not here)."""
        doc = self.chunks.doc(namespace, name)
        if doc is None:
            return None
        rows = self.chunks.live_rows(doc)
        blocks = self.chunks.column("block", rows)
        about = self.chunks.about(doc)
        return DocChunks(
            about.request,
            self.blocks.hashes(blocks),
            self.chunks.column("seq", rows).tolist(),
            self.chunks.column("offset", rows).tolist(),
            self.blocks.length(blocks).tolist(),
            about.digest,
            about.written,
        )

    def export_blocks(self, hashes: list[bytes]) -> EncodedBlocks:
        """Stored blocks as put_blocks takes them (another shard imports them)."""
        return self.blocks.export(hashes)

    def import_chunks(self, namespace: str, name: str, moved: DocChunks) -> int:
        """Commit chunks moved here from another shard (their blocks staged first). Idempotent: chunks of the
        document this shard already holds are skipped. -> chunks added."""
        doc = self.chunks.doc(namespace, name)
        have: set[int] = set()
        if doc is not None:
            if moved.request != self.chunks.request(doc):
                raise EngramError(
                    ErrorCode.ALREADY_EXISTS,
                    f"document {name!r} in namespace {namespace!r} here was written by another request; not merging",
                )
            have = set(self.chunks.column("seq", self.chunks.live_rows(doc)).tolist())
        new = moved.pick([i for i, q in enumerate(moved.seq) if q not in have])
        if not new.seq:
            return 0
        about = DocAbout(new.request, new.digest, new.written)
        self._add_chunks(namespace, name, doc, sum(new.length), new.hash, new.seq, new.offset, about)
        return len(new.seq)

    def drop_chunks(self, namespace: str, name: str, seqs: list[int]) -> int:
        """Durably remove this shard's chunks of a document with these numbers (they now live elsewhere).
        A document left with no chunks here leaves this shard. -> chunks removed."""
        doc = self.chunks.doc(namespace, name)
        if doc is None:
            return 0
        mine = self.chunks.live_rows(doc)
        rows = mine[np.isin(self.chunks.column("seq", mine), seqs)]
        if len(rows) == 0:
            return 0
        with self.store.transaction():
            self.chunks.drop(rows)
            if len(rows) == len(mine):
                self.chunks.delete_document(doc)
        self._forget(rows)
        return len(rows)

    # --- listing and reading back ------------------------------------------------------------------------------
    def namespace_usage(self) -> dict[str, tuple[int, int]]:
        """namespace -> (live chunks, their tokens) on this shard."""
        live = self.chunks.all_live_rows()
        names = self.store.tables.ram["docs/namespace"][self.chunks.column("doc", live)]
        tokens = self.blocks.length(self.chunks.column("block", live)).astype(np.int64)
        found, which = np.unique(names, return_inverse=True)
        chunks, sums = np.bincount(which, minlength=len(found)), np.bincount(which, tokens, minlength=len(found))
        return {str(n): (int(c), int(t)) for n, c, t in zip(found, chunks, sums)}

    def namespace_tokens(self, namespace: str) -> int:
        """Tokens of the namespace's live chunks on this shard (its share of the namespace's quota)."""
        return self.namespace_usage().get(namespace, (0, 0))[1]

    def document_list(self, namespace: str) -> list[DocInfo]:
        """The namespace's documents with chunks on this shard."""
        out = []
        for (ns, name), doc in self.chunks.lookup.items():
            if ns == namespace:
                rows = self.chunks.live_rows(doc)
                about = self.chunks.about(doc)
                length = int(self.blocks.length(self.chunks.column("block", rows)).sum()) if len(rows) else 0
                out.append(DocInfo(name, len(rows), length, about.digest, about.written))
        return out

    def document_tokens(self, namespace: str, name: str) -> list[tuple[int, list[int]]]:
        """(chunk number, token ids) of this shard's chunks of the document, in order ([]: none here)."""
        doc = self.chunks.doc(namespace, name)
        if doc is None:
            return []
        rows = self.chunks.live_rows(doc)
        seqs = self.chunks.column("seq", rows)
        order = np.argsort(seqs)
        tokens = self.tokens(self.chunks.column("block", rows)[order].tolist())
        return list(zip(seqs[order].tolist(), tokens))
