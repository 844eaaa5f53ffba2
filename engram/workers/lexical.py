"""The shard's lexical index: BM25 (tantivy) over each block's key text — the chunk and the words just before it —
per namespace, beside the dense window latents. Exact identifiers (UUIDs, part numbers) and a fact whose subject
ends the previous chunk are found by their words, where sentence embeddings barely tell them apart.

A derived index: the store is the truth (each block's key text is a column of the block store, committed with
it). The index follows the store's chunk rows — it indexes a (block, namespace) pair once a committed chunk row
uses it — and records how many rows it has seen and of which store generation. On open it catches up the rows
it missed (a crash between the store's commit and its own) or, for another generation (a compaction), rebuilds.
Deleted and moved chunks are filtered out at search time by the chunk table (what is live), so a delete never
has to reach the index to be correct.

Scores are BM25 with *global* statistics: a shard returns, for its hits, each query term's count and the text's
length, and its namespace's statistics (documents, tokens, document frequency of each term); the coordinator sums
the statistics over shards and scores every hit on one scale (`bm25`). Per-shard statistics ranked a near-duplicate
above the exact match when a namespace's few documents were spread over four shards. The statistics are the
namespace's own: another namespace's text never moves a score (tantivy's own scores count the whole index).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tantivy

from ..durable import write_atomically

SEEN = "SEEN.json"
VERSION = 2  # 2: a key field (re-adding a pair replaces it), per-namespace document and token counts
ANALYZER = "engram_en"  # words (letters and digits), lowercased, English stop words out, stemmed
MAX_QUERY_TERMS = 64  # a query's distinct terms past these are ignored (each costs a count on every shard)
K1, B = 1.2, 0.75  # BM25's usual constants (tantivy's and Lucene's)


@dataclass
class TermStats:
    """A namespace's BM25 statistics on one shard for a query's terms; summed over shards, the global ones."""

    docs: int  # documents (block, namespace pairs) indexed
    tokens: int  # their analysed tokens
    df: np.ndarray  # [T] documents holding each query term

    @staticmethod
    def total(parts: list[TermStats]) -> TermStats:
        if not parts:
            return TermStats(0, 0, np.zeros(0))
        return TermStats(sum(p.docs for p in parts), sum(p.tokens for p in parts), np.sum([p.df for p in parts], 0))


def bm25(tf: np.ndarray, length: np.ndarray, stats: TermStats) -> np.ndarray:
    """[K] BM25 of K texts: tf [K, T] count of each query term in each text, length [K] analysed tokens of each.
    idf = ln(1 + (N - df + 0.5) / (df + 0.5)), as tantivy and Lucene compute it."""
    if tf.size == 0 or stats.docs == 0:
        return np.zeros(len(tf))
    avg = stats.tokens / stats.docs or 1.0  # 0 when no text had an analysable word (then every tf is 0 too)
    norm = K1 * (1 - B + B * length / avg)  # [K]
    return (idf(stats) * tf * (K1 + 1) / (tf + norm[:, None])).sum(1)


def idf(stats: TermStats) -> np.ndarray:
    """[T] each query term's inverse document frequency, ln(1 + (N - df + 0.5) / (df + 0.5))."""
    return np.log1p((stats.docs - stats.df + 0.5) / (stats.df + 0.5))


def _schema() -> tantivy.Schema:
    sb = tantivy.SchemaBuilder()
    sb.add_integer_field("block", stored=True, indexed=True, fast=True)
    sb.add_text_field("ns", stored=False, tokenizer_name="raw")
    sb.add_text_field("key", stored=False, tokenizer_name="raw")  # namespace NUL block: re-adding replaces
    sb.add_text_field("text", stored=False, tokenizer_name=ANALYZER)
    return sb.build()


def _analyzer() -> tantivy.TextAnalyzer:
    return (
        tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
        .filter(tantivy.Filter.remove_long(40))
        .filter(tantivy.Filter.lowercase())
        .filter(tantivy.Filter.stopword("english"))  # "what is the ..." matches every chunk otherwise
        .filter(tantivy.Filter.stemmer("english"))
        .build()
    )


class LexicalIndex:
    """BM25 over (block, namespace) documents; `rows`: how many of the store's chunk rows it reflects."""

    def __init__(self, path: Path, generation: str, reset: bool = False, heap_bytes: int = 32 * 2**20):
        self.path, self.generation, self.heap = path, generation, heap_bytes
        seen = json.loads((path / SEEN).read_text()) if (path / SEEN).exists() else {}
        if reset or seen.get("generation") != generation or seen.get("version") != VERSION:  # compacted, or older
            shutil.rmtree(path, ignore_errors=True)
            seen = {}
        path.mkdir(parents=True, exist_ok=True)
        self.schema = _schema()
        self.index = tantivy.Index(self.schema, path=str(path), reuse=True)
        self.analyzer = _analyzer()
        self.index.register_tokenizer(ANALYZER, self.analyzer)
        self.rows = int(seen.get("rows", 0))
        self.namespaces: dict[str, list[int]] = seen.get("namespaces", {})  # ns -> [documents, tokens]
        self.pairs: set[tuple[int, str]] = set()  # (block, namespace) pairs indexed; the caller fills it on open

    def add(self, rows_upto: int, pairs: list[tuple[int, str]], texts: list[str]) -> None:
        """Index these (block, namespace) pairs and record that the index now reflects `rows_upto` chunk rows.
        Committed (tantivy's own commit) before the record: after a crash between them the same pairs come again
        (the record says fewer rows) and replace their first copies (by key), the counts then added once."""
        writer = self.index.writer(heap_size=self.heap, num_threads=1)
        for (block, ns), text in zip(pairs, texts):
            key = f"{ns}\0{block}"
            writer.delete_documents("key", key)
            if text:
                writer.add_document(tantivy.Document(block=block, ns=ns, key=key, text=text))
                counts = self.namespaces.setdefault(ns, [0, 0])
                counts[0] += 1
                counts[1] += len(self.analyzer.analyze(text))
        writer.commit()
        writer.wait_merging_threads()
        self.pairs.update(pairs)
        self.rows = rows_upto
        record = {"version": VERSION, "generation": self.generation, "rows": rows_upto, "namespaces": self.namespaces}
        write_atomically(self.path / SEEN, json.dumps(record))
        self.index.reload()

    def terms(self, query: str) -> list[str]:
        """The query's distinct analysed terms, in order (at most MAX_QUERY_TERMS)."""
        return list(dict.fromkeys(self.analyzer.analyze(query)))[:MAX_QUERY_TERMS]

    def _in(self, namespace: str, terms: list[str]) -> tantivy.Query:
        """Documents of the namespace holding any of the terms."""
        words = [(tantivy.Occur.Should, tantivy.Query.term_query(self.schema, "text", t)) for t in terms]
        return tantivy.Query.boolean_query(
            [
                (tantivy.Occur.Must, tantivy.Query.term_query(self.schema, "ns", namespace)),
                (tantivy.Occur.Must, tantivy.Query.boolean_query(words)),
            ]
        )

    def stats(self, namespace: str, terms: list[str]) -> TermStats:
        """The namespace's statistics for these terms (deleted documents count until the next compaction)."""
        docs, tokens = self.namespaces.get(namespace, (0, 0))
        searcher = self.index.searcher()
        df = [searcher.search(self._in(namespace, [t]), 1, count=True).count for t in terms] if docs else []
        return TermStats(int(docs), int(tokens), np.array(df if docs else [0] * len(terms), dtype=np.float64))

    def counts(self, texts: list[str], terms: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> (tf [K, T] count of each term in each text, length [K] analysed tokens of each)."""
        tf = np.zeros((len(texts), len(terms)))
        length = np.zeros(len(texts))
        for i, text in enumerate(texts):
            tokens = self.analyzer.analyze(text or "")
            have = Counter(tokens)
            tf[i] = [have.get(t, 0) for t in terms]
            length[i] = len(tokens)
        return tf, length

    def search(self, namespace: str, terms: list[str], limit: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (blocks [<=limit] int64, tantivy's BM25 [<=limit] float64), best first: the candidates. Terms, not
        query syntax: any text is a query (quotes, colons and minus signs are words' edges, not operators)."""
        if not terms:
            return np.zeros(0, np.int64), np.zeros(0)
        searcher = self.index.searcher()
        hits = searcher.search(self._in(namespace, terms), limit, count=False).hits
        blocks = np.array([searcher.doc(addr)["block"][0] for _, addr in hits], dtype=np.int64)
        return blocks, np.array([score for score, _ in hits], dtype=np.float64)


def lexical_scores(blocks: np.ndarray, hit_blocks: np.ndarray, hit_scores: np.ndarray) -> np.ndarray:
    """[n] the BM25 score of each of `blocks` (0 for those the lexical search did not return)."""
    out = np.zeros(len(blocks))
    if len(hit_blocks):
        order = np.argsort(hit_blocks)
        sorted_blocks = hit_blocks[order]
        at = np.clip(np.searchsorted(sorted_blocks, blocks), 0, len(sorted_blocks) - 1)
        match = sorted_blocks[at] == blocks
        out[match] = hit_scores[order][at[match]]
    return out
