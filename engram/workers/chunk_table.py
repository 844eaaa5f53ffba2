"""The chunk table: documents, their chunks (each pointing at a block) and drops (chunks moved to another shard).

Changes are staged and take effect — on disk and in the in-RAM indexes — only at the store's commit; a rollback
undoes all of them, deletes included. A per-document row index serves "this document's live chunks" without a
scan of the table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tables import Tables, grow

CHUNK_SCHEMA: dict[str, tuple[tuple[int, ...], str]] = {
    "chunks/block": ((), "int64"),
    "chunks/doc": ((), "int64"),
    "chunks/seq": ((), "int64"),
    "chunks/offset": ((), "int64"),
    "chunks/episode": ((), "int64"),
    "docs/namespace": ((), "str"),
    "docs/name": ((), "str"),
    "docs/tokens": ((), "int64"),
    "docs/request": ((), "str"),
    "docs/digest": ((), "str"),  # the whole document's text, sha256 hex (older stores: "")
    "docs/written": ((), "float64"),  # when it was written, unix seconds (older stores: 0)
    "drops/chunk": ((), "int64"),
    "deletes/doc": ((), "int64"),  # deleted documents (format 1 listed them in the commit record)
}


@dataclass
class DocAbout:
    """What a shard keeps of a document beside its chunks (and a move carries to the next shard)."""

    request: str = ""  # the write request's id (a retry of it is recognised)
    digest: str = ""  # sha256 hex of the whole document's text
    written: float = 0.0  # unix seconds


@dataclass
class ChunkRows:
    """Column values of chunk rows (one entry per chunk)."""

    block: np.ndarray
    seq: np.ndarray
    offset: np.ndarray
    episode: np.ndarray


class ChunkTable:
    def __init__(self, tables: Tables, deleted_docs: list[int]):
        """deleted_docs: those a format-1 commit record lists (format 2 keeps them in the deletes table)."""
        self.tables = tables
        self.deleted: set[int] = set(deleted_docs) | set(tables.ram["deletes/doc"].tolist())  # committed
        self._pending: list[tuple] = []  # staged changes, applied to the indexes at commit
        ram = tables.ram
        n_chunks = len(ram["chunks/doc"])
        self.lookup = {
            (str(ns), str(name)): d
            for d, (ns, name) in enumerate(zip(ram["docs/namespace"], ram["docs/name"]))
            if d not in self.deleted
        }
        self._alive = np.ones(n_chunks, dtype=bool)  # buffer; `alive` is its first n_chunks
        self.alive = self._alive[:n_chunks]
        self.alive[np.isin(ram["chunks/doc"], list(self.deleted))] = False
        self.alive[ram["drops/chunk"]] = False  # moved to another shard
        self._rows: dict[int, np.ndarray] = {}  # doc -> its chunk rows (live or not)
        if n_chunks:
            order = np.argsort(ram["chunks/doc"], kind="stable")
            docs, starts = np.unique(ram["chunks/doc"][order], return_index=True)
            for d, rows in zip(docs.tolist(), np.split(order, starts[1:])):
                self._rows[d] = rows

    # --- reads ----------------------------------------------------------------------------------------------
    def doc(self, namespace: str, name: str) -> int | None:
        return self.lookup.get((namespace, name))

    def request(self, doc: int) -> str:
        return str(self.tables.ram["docs/request"][doc])

    def about(self, doc: int) -> DocAbout:
        ram = self.tables.ram
        return DocAbout(self.request(doc), str(ram["docs/digest"][doc]), float(ram["docs/written"][doc]))

    def namespace(self, doc: int) -> str:
        return str(self.tables.ram["docs/namespace"][doc])

    def name(self, doc: int) -> str:
        return str(self.tables.ram["docs/name"][doc])

    def live_rows(self, doc: int) -> np.ndarray:
        rows = self._rows.get(doc, np.zeros(0, np.int64))
        return rows[self.alive[rows]]

    def column(self, col: str, rows) -> np.ndarray:
        """chunks/<col> of these rows (block, doc, seq, offset, episode)."""
        return self.tables.ram[f"chunks/{col}"][rows]

    def all_live_rows(self) -> np.ndarray:
        return np.flatnonzero(self.alive)

    def documents(self) -> list[tuple[str, str]]:
        return list(self.lookup)

    def next_episode(self) -> int:
        episodes = self.tables.ram["chunks/episode"]
        return int(episodes.max()) + 1 if len(episodes) else 0

    # --- staged changes ---------------------------------------------------------------------------------------
    def add_document(self, namespace: str, name: str, tokens: int, about: DocAbout, rows: ChunkRows) -> int:
        """Stage a document and its chunk rows -> its doc number."""
        (doc,) = self.tables.append(
            "docs",
            {
                "namespace": np.array([namespace], dtype=object),
                "name": np.array([name], dtype=object),
                "tokens": np.array([tokens]),
                "request": np.array([about.request], dtype=object),
                "digest": np.array([about.digest], dtype=object),
                "written": np.array([about.written], dtype=np.float64),
            },
        )
        self._pending.append(("doc", (namespace, name), int(doc)))
        self.add_chunks(int(doc), rows)
        return int(doc)

    def add_chunks(self, doc: int, rows: ChunkRows) -> None:
        """Stage more chunk rows of a document."""
        new = self.tables.append(
            "chunks",
            {
                "block": rows.block,
                "seq": rows.seq,
                "offset": rows.offset,
                "episode": rows.episode,
                "doc": np.full(len(rows.block), doc),
            },
        )
        self._pending.append(("rows", doc, new))

    def drop(self, rows: np.ndarray) -> None:
        """Stage the removal of chunk rows (they moved to another shard)."""
        self.tables.append("drops", {"chunk": np.asarray(rows, dtype=np.int64)})
        self._pending.append(("drop", rows))

    def delete_document(self, doc: int) -> None:
        self.tables.append("deletes", {"doc": np.array([doc], dtype=np.int64)})
        self._pending.append(("delete", doc))

    def committed(self) -> None:
        """Apply the staged changes to the indexes (the store committed them)."""
        n = len(self.tables.ram["chunks/doc"])
        self._alive = grow(self._alive, n)  # new rows start dead; amortised O(1), as the tables' RAM columns
        self.alive = self._alive[:n]
        for change in self._pending:
            kind = change[0]
            if kind == "doc":
                self.lookup[change[1]] = change[2]
            elif kind == "rows":
                doc, new = change[1], change[2]
                self.alive[new] = True
                self._rows[doc] = np.concatenate([self._rows.get(doc, np.zeros(0, np.int64)), new])
            elif kind == "drop":
                self.alive[change[1]] = False
            else:  # delete
                doc = change[1]
                self.deleted.add(doc)
                self.alive[self._rows.get(doc, np.zeros(0, np.int64))] = False
                self.lookup.pop((self.namespace(doc), self.name(doc)), None)
        self._pending = []

    def rolled_back(self) -> None:
        self._pending = []
