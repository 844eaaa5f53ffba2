"""The shard's lexical index (BM25, tantivy) on a real store, without Ray: exact identifiers found by their words,
per namespace, deletes filtered, caught up or rebuilt after a crash, rebuilt by compaction (deleted words leave
the disk), key texts carried by moved blocks."""

import shutil

import numpy as np

from engram.workers.lexical import lexical_scores
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
