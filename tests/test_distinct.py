"""The distinct-text benchmark's haystack and facts, and a small run of it through the service: real text that never
repeats, facts of every kind (UUID keys among distractors, exact identifiers, a fact cut by a chunk boundary, a
paraphrased question), each answer's chunk in the top 4 (issue #13; the long runs are in BENCHMARKS.md)."""

import random

import pytest

from engram.coordinator.client import EngramClient
from engram.evals.distinct import chunk_of_answer, corpus, docstrings, make_facts, plant


@pytest.fixture(scope="module")
def haystack(tokenizer):
    rng = random.Random(3)
    docs = corpus(11_000, tokenizer, doc_tokens=1000)
    facts = make_facts(rng, keys=2, distractors=3, per_kind=1)
    plant(docs, facts, tokenizer, 128, rng)
    return docs, facts


def test_the_haystack_never_repeats(tokenizer):
    seen = set()
    for i, doc in enumerate(docstrings()):
        assert doc not in seen
        seen.add(doc)
        if i == 2000:
            break
    docs = corpus(20_000, tokenizer, doc_tokens=2048)
    paragraphs = [p for _, text in docs for p in text.split("\n\n") if len(p) > 80]
    assert len(paragraphs) == len(set(paragraphs))


def test_facts_are_planted_and_boundary_facts_are_cut_before_their_answer(haystack, tokenizer):
    docs, facts = haystack
    texts = dict(docs)
    assert {f.kind for f in facts} == {"uuid-key", "uuid-distractor", "identifier", "boundary", "paraphrase"}
    assert len({f.document for f in facts}) == len(facts)  # one fact per document
    for f in facts:
        assert texts[f.document].count(f.text) == 1
        fact_chunks, answer_chunks = chunk_of_answer(texts[f.document], f, tokenizer, 128)
        if f.kind == "boundary":
            assert len(fact_chunks) == 2 and answer_chunks == fact_chunks[1:]


@pytest.mark.integration
def test_every_kind_of_fact_is_retrieved(service, haystack, tokenizer):
    """The answer's chunk is in the top 4 for every asked fact: UUID keys told apart from distractors, an exact
    identifier, the second half of a boundary-cut fact, and a paraphrased question."""
    docs, facts = haystack
    texts = dict(docs)
    assert service.engine.cfg.ask.lexical_weight > 0  # the hybrid is the default
    missed = []
    with EngramClient(service.address, timeout=600) as c:
        c.write(docs, namespace="distinct-small")
        for f in (f for f in facts if f.question):
            _, answer_chunks = chunk_of_answer(texts[f.document], f, tokenizer, 128)
            got = c.read(f.question, namespace="distinct-small", top_k=4)
            if not any(ch.document_id == f.document and ch.seq in answer_chunks for ch in got.chunks):
                missed.append((f.kind, f.answer))
    assert missed == []


def cut_before_value(tokenizer, filler: str, key: str, value: str, chunk_tokens: int = 128) -> str:
    """filler's words, then "One of the special magic uuids for <key> is:" ending exactly at the first chunk
    boundary, then the value and more filler: the key in chunk 0, its value opening chunk 1."""
    head = f" One of the special magic uuids for {key} is:"
    words = filler.split()

    def length(w):
        return len(tokenizer(" ".join(w) + head, add_special_tokens=False).input_ids)

    while length(words) > chunk_tokens:
        words.pop()
    while length(words) < chunk_tokens:  # a word can be several tokens: make up the rest one token at a time
        words.append("so")
    lead = " ".join(words) + head
    assert len(tokenizer(lead, add_special_tokens=False).input_ids) == chunk_tokens, "no exact cut from these words"
    return f"{lead} {value}. {filler}"


@pytest.mark.integration
def test_the_chunk_beside_a_hit_that_the_question_reaches_is_read(service, tokenizer):
    """ask.adjacent_lexical: a UUID key ends one chunk and its value opens the next; the value's chunk holds only
    part of the key and ranks below look-alike sentences, so Read's top 4 misses it — the Ask reads it anyway,
    beside the key's chunk."""
    import uuid

    rng = random.Random(5)
    ids = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(12)]
    fillers = iter(d for d in docstrings() if len(d) > 1200)
    docs = [("fact", cut_before_value(tokenizer, next(fillers)[:1200], ids[0], ids[1]))]
    docs += [  # distractors of the same form: the dense side ranks them all alike
        (f"other-{i}", f"{next(fillers)[:600]} One of the special magic uuids for {k} is: {v}. {next(fillers)[:600]}")
        for i, (k, v) in enumerate(zip(ids[2::2], ids[3::2]))
    ]
    question = f"What is the special magic uuid for {ids[0]} mentioned in the provided text? The special magic uuid is"
    with EngramClient(service.address, timeout=600) as c:
        c.write(docs, namespace="adjacent")
        top = [(ch.document_id, ch.seq) for ch in c.read(question, namespace="adjacent", top_k=4).chunks]
        read = [(ch.document_id, ch.seq) for ch in c.ask(question, namespace="adjacent", max_new_tokens=1).chunks]
    assert ("fact", 0) in top and ("fact", 1) not in top, top  # the key's chunk found, the value's not in the top 4
    assert ("fact", 0) in read and ("fact", 1) in read, read  # both read: the sentence whole
    assert len(read) <= 4 + 2, read
