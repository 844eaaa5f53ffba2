"""The shard's lexical index (BM25, tantivy) on a real store, without Ray: exact identifiers found by their words,
per namespace, deletes filtered, caught up or rebuilt after a crash, rebuilt by compaction (deleted words leave
the disk), key texts carried by moved blocks."""

import shutil

import numpy as np

from engram.workers.lexical import LexicalIndex, TermStats, bm25, lexical_scores
from tests.test_shard import make, unit_batch, write

TEXTS = [
    "The annual report lists the harbour expansion and its costs.",
    "The firmware checksum of the amber router is 0x3F9A2C71.",
    "Part number LE-3334-79 is the replacement gasket for the teal pump.",
    "Lighthouse keepers kept logs of every ship that passed.",
    "The firmware checksum of the cobalt router is 0x77AB0C12.",
]


def written(tmp_path, ns="ns"):
    rng = np.random.default_rng(0)
    s = make(tmp_path)
    b = unit_batch(rng, range(5))
    b.text = np.array(TEXTS, dtype=object)
    write(s, "doc", b, list(range(5)), ns=ns)
    return s, b


def lexical_top(s, text, ns="ns"):
    r = s.search(ns, np.ones(6) / np.sqrt(6), top_k=2, text=text)
    return [int(b) for b, lx in sorted(zip(r.block, r.lexical), key=lambda x: -x[1]) if lx > 0]


def test_scores_map_to_blocks():
    got = lexical_scores(np.array([5, 1, 9, 5]), np.array([9, 5]), np.array([2.0, 1.5]))
    np.testing.assert_array_equal(got, [1.5, 0.0, 2.0, 1.5])
    np.testing.assert_array_equal(lexical_scores(np.array([1, 2]), np.zeros(0, np.int64), np.zeros(0)), [0, 0])


CORPUS = [
    "The harbour master logs every ship, and the harbour fees rise each spring.",
    "Ship 7 carried grain; ship 9 carried timber to the northern harbour.",
    "Router firmware 0x3F9A2C71 fixed the harbour beacon.",
    "The beacon at the harbour blinks twice a minute in fog and once in clear weather.",
    "Timber prices fell when the northern mills reopened after the long winter.",
    "The keeper of the beacon wrote down the weather every morning.",
    "Grain ships wait outside the harbour for the tide.",
    "Fog horns sound at the harbour mouth.",
]


def index_of(tmp_path, texts, ns="ns", first_block=0):
    ix = LexicalIndex(tmp_path, generation="g")
    ix.add(len(texts), [(first_block + i, ns) for i in range(len(texts))], texts)
    return ix


def test_bm25_matches_tantivys_own_scores(tmp_path):
    """The coordinator's BM25 (global statistics) against tantivy's, on one index holding one namespace, where the
    two must agree (tantivy stores lengths in a lossy byte above ~40 tokens: these texts are shorter)."""
    import tantivy

    ix = index_of(tmp_path, CORPUS)
    searcher = ix.index.searcher()
    for query in ["harbour beacon fog", "timber ship", "0x3F9A2C71 firmware", "weather keeper morning harbour"]:
        terms = ix.terms(query)
        words = [(tantivy.Occur.Should, tantivy.Query.term_query(ix.schema, "text", t)) for t in terms]
        hits = searcher.search(tantivy.Query.boolean_query(words), 20).hits
        theirs = {searcher.doc(a)["block"][0]: sc for sc, a in hits}
        tf, length = ix.counts(CORPUS, terms)
        ours = bm25(tf, length, ix.stats("ns", terms))
        for block, score in theirs.items():
            np.testing.assert_allclose(ours[block], score, rtol=1e-4, err_msg=query)
        assert all(ours[b] == 0 for b in range(len(CORPUS)) if b not in theirs)


def test_global_scores_do_not_depend_on_how_documents_are_spread(tmp_path):
    """One namespace's documents on 1 shard or spread over 4: summed statistics give the same scores. Each shard's
    own statistics do not (the bug: a near-duplicate on a sparser shard outranked the exact match)."""
    whole = index_of(tmp_path / "whole", CORPUS)
    parts = [index_of(tmp_path / f"p{i}", CORPUS[i::4], first_block=i) for i in range(4)]
    for query in ["harbour beacon fog", "northern timber mills", "0x3F9A2C71"]:
        terms = whole.terms(query)
        one = bm25(*whole.counts(CORPUS, terms), whole.stats("ns", terms))
        total = TermStats.total([p.stats("ns", terms) for p in parts])
        spread = np.zeros(len(CORPUS))
        own = np.zeros(len(CORPUS))
        for i, p in enumerate(parts):
            counts = p.counts(CORPUS[i::4], terms)
            spread[i::4] = bm25(*counts, total)
            own[i::4] = bm25(*counts, p.stats("ns", terms))
        np.testing.assert_allclose(spread, one, rtol=1e-12, err_msg=query)
        assert not np.allclose(own, one), query


def test_another_namespace_never_moves_a_score(tmp_path):
    """Statistics are the namespace's own: adding another tenant's text (which shares the words) changes nothing."""
    ix = index_of(tmp_path, CORPUS)
    terms = ix.terms("harbour beacon")
    before = bm25(*ix.counts(CORPUS, terms), ix.stats("ns", terms))
    ix.add(len(CORPUS) + 3, [(100, "other"), (101, "other"), (102, "other")], ["harbour harbour beacon"] * 3)
    after = bm25(*ix.counts(CORPUS, terms), ix.stats("ns", terms))
    np.testing.assert_array_equal(before, after)
    assert ix.stats("other", terms).docs == 3


def test_a_replayed_add_counts_once(tmp_path):
    """A crash between tantivy's commit and the record: the pairs come again and replace their first copies."""
    ix = index_of(tmp_path, CORPUS[:4])
    first = ix.stats("ns", ix.terms("harbour"))
    again = LexicalIndex(tmp_path, generation="g")
    again.namespaces, again.rows = {}, 0  # as if the record had not been written
    again.add(4, [(i, "ns") for i in range(4)], CORPUS[:4])
    replayed = again.stats("ns", ix.terms("harbour"))
    assert (replayed.docs, replayed.tokens, replayed.df.tolist()) == (first.docs, first.tokens, first.df.tolist())


def test_an_exact_identifier_is_found_by_its_words(tmp_path):
    s, _ = written(tmp_path)
    assert lexical_top(s, "What is the firmware checksum 0x3F9A2C71?")[0] == 1
    assert lexical_top(s, "Which part is LE-3334-79?")[0] == 2
    assert lexical_top(s, "the cobalt router")[0] == 4
    assert lexical_top(s, 'unbalanced "quote (and: colons') == []  # any text is a query, none matched
    assert lexical_top(s, "0x3F9A2C71", ns="another") == []  # another namespace sees nothing of it


def test_deleted_chunks_are_not_returned(tmp_path):
    s, _ = written(tmp_path)
    s.delete_document("ns", "doc")
    assert s.search("ns", np.ones(6), 4, text="0x3F9A2C71").episodes == 0


def test_a_lost_index_is_rebuilt_and_a_behind_one_caught_up(tmp_path):
    s, _ = written(tmp_path)
    path = s.store.path / "lexical"
    s.store.close()
    shutil.rmtree(path)  # lost entirely
    s = make(tmp_path)
    assert lexical_top(s, "LE-3334-79")[0] == 2
    # a crash after the store's commit but before the index's: the index recorded fewer rows than the store holds
    rng = np.random.default_rng(5)
    more = unit_batch(rng, [10])
    more.text = np.array(["Quillby harbour records name the keeper Ansel Marrow."], dtype=object)
    write(s, "later", more, [10])
    s.store.close()
    (path / "SEEN.json").write_text((path / "SEEN.json").read_text().replace('"rows": 6', '"rows": 5'))
    s = make(tmp_path)
    assert s.lexical.rows == 6
    r = s.search("ns", np.ones(6) / np.sqrt(6), top_k=2, text="keeper Ansel Marrow")
    assert list(r.doc)[int(np.argmax(r.lexical))] == "later" and list(r.doc).count("later") == 1


def test_compaction_rebuilds_the_index_without_deleted_words(tmp_path):
    s, _ = written(tmp_path)
    rng = np.random.default_rng(7)
    secret = unit_batch(rng, [20])
    secret.text = np.array(["The vault word is zanzibarquokka."], dtype=object)
    write(s, "secret", secret, [20])
    assert lexical_top(s, "zanzibarquokka")
    s.delete_document("ns", "secret")
    s.compact()
    assert lexical_top(s, "zanzibarquokka") == [] and lexical_top(s, "0x3F9A2C71")
    on_disk = b"".join(f.read_bytes() for f in s.store.path.rglob("*") if f.is_file())
    assert b"zanzibarquokka" not in on_disk


def test_moved_blocks_keep_their_key_text(tmp_path):
    s, b = written(tmp_path / "a")
    exported = s.export_blocks([bytes(x) for x in b.hash[1:3]])
    assert list(exported.text) == TEXTS[1:3]


def test_bm25_of_texts_without_words_is_zero_not_nan():
    """A namespace whose texts analyse to no token (punctuation, stop words only: seen in fuzzing) has average
    length 0: the scores are 0, not NaN (a NaN would poison the fused ranking)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = bm25(np.zeros((2, 1)), np.zeros(2), TermStats(2, 0, np.zeros(1)))
    assert scores.tolist() == [0.0, 0.0]
