"""A memory shard: owns one Zarr store (its only writer), keeps the chunk index and episodic memories in RAM.

Plain class: the coordinator runs it as a Ray actor (max_restarts: a restarted shard rebuilds everything from
its store in __init__). Calls are idempotent where they can be retried: blocks are content-addressed, and a
document is committed at most once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .episodic import EpisodicConfig, Memory, hierarchical_readout, new_memory, reference_pinv
from .store import ShardStore, StoreLayout


@dataclass
class ShardConfig:
    data_dir: str = "engram-data"  # each shard keeps <data_dir>/shard-<id>/ on its node's disk
    fsync: bool = True  # flush to disk before acknowledging (survives a machine crash, not just a process crash)
    episodic: EpisodicConfig = field(default_factory=EpisodicConfig)


def _ray_node_id() -> str:
    """The Ray node this shard runs on ("" outside Ray): tells shards on one host's several nodes apart."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001
        return ""


class ShardError(Exception):
    """A request the shard refuses; `code` names the kind (already_exists, or stale: blocks the writer staged
    were lost in a restart and must be sent again)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Shard:
    def __init__(self, shard_id: int, cfg: ShardConfig, layout: StoreLayout):
        self.shard_id, self.cfg, self.layout = shard_id, cfg, layout
        self.store = ShardStore(Path(cfg.data_dir).expanduser() / f"shard-{shard_id}", layout, cfg.fsync)
        self.m0_pinv = reference_pinv(cfg.episodic)
        self._rebuild()

    # --- index ---------------------------------------------------------------------------------------------------
    def _rebuild(self) -> None:
        """Derive the in-RAM index and the episodic memories from the committed store."""
        ram = self.store.ram
        deleted = np.zeros(len(ram["docs/name"]), dtype=bool)
        deleted[list(self.store.deleted_docs)] = True
        self.doc_lookup = {(ns, name): i for i, (ns, name) in enumerate(zip(ram["docs/namespace"], ram["docs/name"]))
                           if not deleted[i]}
        self.chunk_alive = ~deleted[ram["chunks/doc"]] if len(ram["chunks/doc"]) else np.zeros(0, dtype=bool)
        self.chunk_alive[ram["drops/chunk"]] = False  # moved to another shard
        self.memories: dict[int, Memory] = {}
        self.episode_namespace: dict[int, str] = {}
        episodes = ram["chunks/episode"][self.chunk_alive]
        docs = ram["chunks/doc"][self.chunk_alive]
        blocks = ram["chunks/block"][self.chunk_alive]
        for ep in np.unique(episodes):
            sel = episodes == ep
            mem = self.memories[int(ep)] = new_memory(self.cfg.episodic, self.m0_pinv)
            mem.write(self._items(blocks[sel]))
            mem.prepare()  # warm before serving
            self.episode_namespace[int(ep)] = str(ram["docs/namespace"][docs[sel][0]])
        self.next_episode = int(ram["chunks/episode"].max()) + 1 if len(ram["chunks/episode"]) else 0

    def _items(self, blocks: np.ndarray) -> np.ndarray:
        """The episodic items of chunks: their R window latents each -> [len(blocks) * R, C]."""
        return self.store.ram["blocks/latent"][blocks].reshape(-1, self.layout.latent_dim)

    def _assign_episodes(self, namespace: str, n: int) -> np.ndarray:
        """Fill the namespace's open episode up to K items (K // R chunks), then open new ones."""
        r = self.layout.latents_per_chunk
        k = max(1, self.cfg.episodic.rows // r)  # chunks per episode
        out = np.empty(n, dtype=np.int64)
        open_eps = [ep for ep, ns in self.episode_namespace.items()
                    if ns == namespace and self.memories[ep].count // r < k]
        i = 0
        if open_eps:
            ep = max(open_eps)
            take = min(n, k - self.memories[ep].count // r)
            out[:take], i = ep, take
        while i < n:
            take = min(n - i, k)
            out[i : i + take] = self.next_episode
            self.next_episode += 1
            i += take
        return out

    # --- writes ----------------------------------------------------------------------------------------------------
    def missing(self, hashes: list[bytes]) -> list[bool]:
        return [not c for c in self.store.contains(hashes)]

    def put_blocks(self, batch: dict[str, np.ndarray]) -> int:
        """Stage encoded blocks; they become durable with the next committed document."""
        return len(self.store.put_blocks(batch))

    def document_request(self, namespace: str, name: str) -> str | None:
        """The request id the document was written with ("" if none); None if there is no such document."""
        doc = self.doc_lookup.get((namespace, name))
        return None if doc is None else str(self.store.ram["docs/request"][doc])

    def commit_document(self, namespace: str, name: str, tokens: int, hashes: list[bytes],
                        seqs: list[int], offsets: list[int], request_id: str = "") -> dict:
        """Durably add a document's chunks (their blocks must be staged or stored). Atomic: all or nothing.
        Idempotent under a request id: committing the same request again changes nothing."""
        doc = self.doc_lookup.get((namespace, name))
        if doc is not None:
            if request_id and self.store.ram["docs/request"][doc] == request_id:
                return {"chunks": int(((self.store.ram["chunks/doc"] == doc) & self.chunk_alive).sum()), "doc": doc,
                        "replayed": True}
            raise ShardError("already_exists", f"document {name!r} already exists in namespace {namespace!r}")
        doc = self._add_chunks(namespace, name, None, tokens, hashes, seqs, offsets, request_id)
        return {"chunks": len(hashes), "doc": doc, "replayed": False}

    def _add_chunks(self, namespace: str, name: str, doc: int | None, tokens: int, hashes: list[bytes],
                    seqs: list[int], offsets: list[int], request_id: str) -> int:
        """Commit chunk rows to a new document (doc None) or an existing one, then write them to the episodic
        memories. All or nothing."""
        try:
            missing = [h.hex() for h, ok in zip(hashes, self.store.contains(hashes)) if not ok]
            if missing:  # staged blocks die with the process that staged them: the writer re-sends them
                raise ShardError("stale", f"{len(missing)} blocks are not stored (lost in a restart?), e.g. {missing[0]}")
            blocks = np.array([self.store.hash_index[h] for h in hashes], dtype=np.int64)
            episodes = self._assign_episodes(namespace, len(hashes))
            rows = {"block": blocks, "seq": np.asarray(seqs, dtype=np.int64),
                    "offset": np.asarray(offsets, dtype=np.int64), "episode": episodes}
            if doc is None:
                doc = self.store.add_document(namespace, name, tokens, rows, request_id)
            else:
                self.store.add_chunks(doc, rows)
            self.store.commit()
        except BaseException:
            self.store.rollback()
            raise
        self.doc_lookup[(namespace, name)] = doc
        self.chunk_alive = np.concatenate([self.chunk_alive, np.ones(len(hashes), dtype=bool)])
        for ep in np.unique(episodes):
            mem = self.memories.setdefault(int(ep), new_memory(self.cfg.episodic, self.m0_pinv))
            self.episode_namespace[int(ep)] = namespace
            mem.write(self._items(blocks[episodes == ep]))
            mem.prepare()  # on the write path, not in the first ask
        return doc

    def _forget_rows(self, rows: np.ndarray) -> None:
        """Take chunk rows out of the index and their items out of the episodic memories (exact, α = −1)."""
        ram = self.store.ram
        self.chunk_alive[rows] = False
        for ep in np.unique(ram["chunks/episode"][rows]):
            sel = rows[ram["chunks/episode"][rows] == ep]
            self.memories[int(ep)].forget(self._items(ram["chunks/block"][sel]))
            if self.memories[int(ep)].count == 0:
                del self.memories[int(ep)], self.episode_namespace[int(ep)]
            else:
                self.memories[int(ep)].prepare()

    # --- rebalancing (chunks move to shards added later; copy to the new owner first, then drop here) --------
    def chunk_table(self) -> list[tuple[str, str, list[bytes]]]:
        """(namespace, document, content hashes of its chunks here) for every document on this shard."""
        ram = self.store.ram
        out = []
        for (ns, name), doc in self.doc_lookup.items():
            rows = np.flatnonzero((ram["chunks/doc"] == doc) & self.chunk_alive)
            out.append((ns, name, [bytes(h) for h in ram["blocks/hash"][ram["chunks/block"][rows]]]))
        return out

    def doc_chunks(self, namespace: str, name: str) -> dict | None:
        """This shard's chunks of one document now: request id, hashes, seqs, offsets, lengths (None: not here)."""
        doc = self.doc_lookup.get((namespace, name))
        if doc is None:
            return None
        ram = self.store.ram
        rows = np.flatnonzero((ram["chunks/doc"] == doc) & self.chunk_alive)
        blocks = ram["chunks/block"][rows]
        return {"request": str(ram["docs/request"][doc]), "hash": [bytes(h) for h in ram["blocks/hash"][blocks]],
                "seq": ram["chunks/seq"][rows].tolist(), "offset": ram["chunks/offset"][rows].tolist(),
                "length": ram["blocks/length"][blocks].tolist()}

    def export_blocks(self, hashes: list[bytes]) -> dict[str, np.ndarray]:
        """Stored blocks as put_blocks takes them (another shard imports them)."""
        idx = np.array([self.store.hash_index[h] for h in hashes], dtype=np.int64)
        ram = self.store.ram
        return {**self.store.get_blocks(idx), "tokens": self.store.get_tokens(idx),
                "length": ram["blocks/length"][idx], "hash": ram["blocks/hash"][idx], "latent": ram["blocks/latent"][idx]}

    def import_chunks(self, namespace: str, name: str, request_id: str, hashes: list[bytes], seqs: list[int],
                      offsets: list[int], lengths: list[int]) -> int:
        """Commit chunks moved here from another shard (their blocks staged first). Idempotent: chunks of the
        document this shard already holds are skipped. -> chunks added."""
        doc = self.doc_lookup.get((namespace, name))
        have: set[int] = set()
        if doc is not None:
            ram = self.store.ram
            if request_id != str(ram["docs/request"][doc]):
                raise ShardError("already_exists", f"document {name!r} in namespace {namespace!r} here was written "
                                 "by another request; not merging")
            have = set(ram["chunks/seq"][(ram["chunks/doc"] == doc) & self.chunk_alive].tolist())
        keep = [i for i, q in enumerate(seqs) if q not in have]
        if not keep:
            return 0
        self._add_chunks(namespace, name, doc, sum(lengths[i] for i in keep), [hashes[i] for i in keep],
                         [seqs[i] for i in keep], [offsets[i] for i in keep], request_id)
        return len(keep)

    def drop_chunks(self, namespace: str, name: str, seqs: list[int]) -> int:
        """Durably remove this shard's chunks of a document with these numbers (they now live elsewhere).
        A document left with no chunks here leaves this shard. -> chunks removed."""
        doc = self.doc_lookup.get((namespace, name))
        if doc is None:
            return 0
        ram = self.store.ram
        mine = (ram["chunks/doc"] == doc) & self.chunk_alive
        rows = np.flatnonzero(mine & np.isin(ram["chunks/seq"], seqs))
        if len(rows) == 0:
            return 0
        emptied = len(rows) == int(mine.sum())
        try:
            self.store.drop_chunks(rows)
            if emptied:
                self.store.delete_document(doc)
            self.store.commit()
        except BaseException:
            self.store.rollback()
            if emptied:
                self.store.deleted_docs.discard(doc)
            raise
        if emptied:
            del self.doc_lookup[(namespace, name)]
        self._forget_rows(rows)
        return len(rows)

    def delete_document(self, namespace: str, name: str) -> int:
        """Remove a document from both memories; episodic rows go by the exact α = −1 update. -> chunks removed."""
        doc = self.doc_lookup.get((namespace, name))
        if doc is None:
            return 0
        self.store.delete_document(doc)
        self.store.commit()
        del self.doc_lookup[(namespace, name)]
        ram = self.store.ram
        rows = np.flatnonzero((ram["chunks/doc"] == doc) & self.chunk_alive)
        self._forget_rows(rows)
        return len(rows)

    # --- reads -----------------------------------------------------------------------------------------------------
    def search(self, namespace: str, query: np.ndarray, top_k: int) -> dict:
        """Score the namespace's chunks through their episodic memories; top-k distinct blocks.

        score_i = max_r <s(e_i), ẑ_ir>: the scorer of chunk i's episode memory (least squares: its readout z_r,
        which gives the best window's cosine with the query while the episode is within capacity; Hopfield: the
        readout weighted by its match with the query) against the chunk's stored window latents."""
        ram = self.store.ram
        q = np.asarray(query, dtype=np.float64)
        eps = [ep for ep, ns in self.episode_namespace.items() if ns == namespace]
        empty = {"score": np.zeros(0), "block": np.zeros(0, np.int64), "doc": [], "seq": np.zeros(0, np.int64),
                 "offset": np.zeros(0, np.int64), "readout": np.zeros(len(q)), "episodes": 0}
        if not eps:
            return empty
        readouts = np.stack([self.memories[ep].read(q) for ep in eps])  # [E, C]
        scorers = np.stack([self.memories[ep].scorer(q, r) for ep, r in zip(eps, readouts)])  # [E, C]
        eps_sorted = np.sort(np.asarray(eps, dtype=np.int64))
        by_episode = np.argsort(np.asarray(eps, dtype=np.int64))
        readouts, scorers = readouts[by_episode], scorers[by_episode]  # rows follow eps_sorted
        rows = np.flatnonzero(self.chunk_alive & np.isin(ram["chunks/episode"], eps_sorted))
        blocks = ram["chunks/block"][rows]
        lookup = np.searchsorted(eps_sorted, ram["chunks/episode"][rows])
        scores = np.einsum("nrc,nc->nr", ram["blocks/latent"][blocks].astype(np.float64), scorers[lookup]).max(1)
        order = np.argsort(-scores, kind="stable")
        _, first = np.unique(blocks[order], return_index=True)  # identical chunks: keep the best-scored one
        keep = order[np.sort(first)][:top_k]
        keep = keep[np.argsort(-scores[keep], kind="stable")]
        sel = rows[keep]
        return {
            "score": scores[keep], "block": blocks[keep],
            "doc": [str(ram["docs/name"][d]) for d in ram["chunks/doc"][sel]],
            "seq": ram["chunks/seq"][sel], "offset": ram["chunks/offset"][sel],
            "readout": hierarchical_readout(readouts, q, self.m0_pinv, self.cfg.episodic),
            "episodes": len(eps),
        }

    def chunks_at(self, namespace: str, name: str, seqs: list[int]) -> list[tuple[int, int, int]]:
        """(seq, offset, block) of the document's chunks with these numbers that live on this shard."""
        doc = self.doc_lookup.get((namespace, name))
        if doc is None:
            return []
        ram = self.store.ram
        rows = np.flatnonzero((ram["chunks/doc"] == doc) & np.isin(ram["chunks/seq"], seqs) & self.chunk_alive)
        return [(int(ram["chunks/seq"][r]), int(ram["chunks/offset"][r]), int(ram["chunks/block"][r])) for r in rows]

    def get_blocks(self, blocks: list[int]) -> list[dict[str, np.ndarray]]:
        """-> one dict of block columns (StoreLayout.block_columns) per block."""
        cols = self.store.get_blocks(blocks)
        return [{name: col[i] for name, col in cols.items()} for i in range(len(blocks))]

    def get_tokens(self, blocks: list[int]) -> list[list[int]]:
        lengths = self.store.ram["blocks/length"][np.asarray(blocks, dtype=np.int64)]
        return [row[:n].tolist() for row, n in zip(self.store.get_tokens(blocks), lengths)]

    def documents(self) -> list[tuple[str, str]]:
        return list(self.doc_lookup)

    def namespaces(self) -> list[str]:
        return sorted({ns for ns, _ in self.doc_lookup})

    def stats(self) -> dict:
        import psutil

        ram = self.store.ram
        alive_docs = list(self.doc_lookup.values())
        alive_blocks = np.unique(ram["chunks/block"][self.chunk_alive])
        return {
            "shard": self.shard_id,
            "node": f"{os.uname().nodename}/{_ray_node_id()[:8]}",
            "documents": len(alive_docs),
            "chunks": int(self.chunk_alive.sum()),
            "blocks": len(alive_blocks),
            "tokens": int(ram["blocks/length"][ram["chunks/block"][self.chunk_alive]].sum()),
            "stored_bytes": self.store.stored_bytes(),
            "episodes": len(self.memories),
            "resident_bytes": psutil.Process().memory_info().rss,
            "pid": os.getpid(),
        }
