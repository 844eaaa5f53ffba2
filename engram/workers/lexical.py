"""The shard's lexical index: BM25 (tantivy) over each block's key text — the chunk and the words just before it —
per namespace, beside the dense window latents. Exact identifiers (UUIDs, part numbers) and a fact whose subject
ends the previous chunk are found by their words, where sentence embeddings barely tell them apart.

A derived index: the store is the truth (each block's key text is a column of the block store, committed with
it). The index follows the store's chunk rows — it indexes a (block, namespace) pair once a committed chunk row
uses it — and records how many rows it has seen and of which store generation. On open it catches up the rows
it missed (a crash between the store's commit and its own) or, for another generation (a compaction), rebuilds.
Deleted and moved chunks are filtered out at search time by the chunk table (what is live), so a delete never
has to reach the index to be correct.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import tantivy

from ..durable import write_atomically

SEEN = "SEEN.json"
ANALYZER = "engram_en"  # words (letters and digits), lowercased, English stop words out, stemmed


def _schema() -> tantivy.Schema:
    sb = tantivy.SchemaBuilder()
    sb.add_integer_field("block", stored=True, indexed=True, fast=True)
    sb.add_text_field("ns", stored=False, tokenizer_name="raw")
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
        if reset or seen.get("generation") != generation:  # another store generation (a compaction), or none yet
            shutil.rmtree(path, ignore_errors=True)
            seen = {}
        path.mkdir(parents=True, exist_ok=True)
        self.schema = _schema()
        self.index = tantivy.Index(self.schema, path=str(path), reuse=True)
        self.index.register_tokenizer(ANALYZER, _analyzer())
        self.rows = int(seen.get("rows", 0))
        self.pairs: set[tuple[int, str]] = set()  # (block, namespace) pairs indexed; the caller fills it on open

    def add(self, rows_upto: int, pairs: list[tuple[int, str]], texts: list[str]) -> None:
        """Index these (block, namespace) pairs and record that the index now reflects `rows_upto` chunk rows.
        Committed (tantivy's own commit) before the record: a crash between them indexes a pair twice at worst,
        and a pair twice only counts once (the search maps hits to blocks)."""
        writer = self.index.writer(heap_size=self.heap, num_threads=1)
        for (block, ns), text in zip(pairs, texts):
            if text:
                writer.add_document(tantivy.Document(block=block, ns=ns, text=text))
        writer.commit()
        writer.wait_merging_threads()
        self.pairs.update(pairs)
        self.rows = rows_upto
        write_atomically(self.path / SEEN, json.dumps({"generation": self.generation, "rows": rows_upto}))
        self.index.reload()

    def search(self, namespace: str, query: str, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (blocks [<=limit] int64, BM25 scores [<=limit] float64), best first."""
        parsed, _errors = self.index.parse_query_lenient(query, ["text"])  # any text is a query; errors ignored
        q = tantivy.Query.boolean_query(
            [
                (tantivy.Occur.Must, tantivy.Query.term_query(self.schema, "ns", namespace)),
                (tantivy.Occur.Must, parsed),
            ]
        )
        searcher = self.index.searcher()
        hits = searcher.search(q, limit).hits
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
