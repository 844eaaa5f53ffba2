import os
from collections import Counter

import numpy as np
import pytest

from engram.coordinator.config import EngramConfig
from engram.coordinator.routing import route, split


def test_split_restarts_per_document_and_covers_every_token():
    ids = list(range(300))
    chunks = split(ids, 128)
    assert [c.offset for c in chunks] == [0, 128, 256]
    assert [len(c.tokens) for c in chunks] == [128, 128, 44]
    assert [t for c in chunks for t in c.tokens] == ids
    assert all(len(c.context) == 0 for c in chunks)
    assert all(c.tokens.dtype == np.int32 and c.tokens.base is not None for c in chunks)  # views, not copies


def test_context_is_the_tokens_just_before_and_part_of_the_address():
    from engram.coordinator.routing import chunk_hash

    chunks = split(list(range(300)), 128, context_tokens=32)
    assert [c.context.tolist() for c in chunks] == [[], list(range(96, 128)), list(range(224, 256))]
    tail = chunks[1]
    assert chunk_hash(tail.tokens, "f") != chunk_hash(tail.tokens, "f", tail.context)
    assert chunk_hash(tail.tokens, "f", []) == chunk_hash(tail.tokens, "f")  # stores written without contexts
    # scoped to a namespace: the same chunk has another address in another namespace ("" = cluster-wide, as before)
    assert chunk_hash(tail.tokens, "f", tail.context, "alice") != chunk_hash(tail.tokens, "f", tail.context, "bob")
    assert chunk_hash(tail.tokens, "f", tail.context, "") == chunk_hash(tail.tokens, "f", tail.context)


def test_after_is_the_tokens_just_after_and_part_of_the_address_only_when_used():
    from engram.coordinator.routing import chunk_hash, fingerprint
    from tests.test_shard import LAYOUT

    chunks = split(list(range(300)), 128, context_tokens=32, after_tokens=32)
    assert [c.after.tolist() for c in chunks] == [list(range(128, 160)), list(range(256, 288)), []]
    assert [c.tokens.tolist() for c in chunks] == [c.tokens.tolist() for c in split(list(range(300)), 128, 32)]
    head = chunks[0]
    assert chunk_hash(head.tokens, "f", head.context, "", head.after) != chunk_hash(head.tokens, "f", head.context)
    assert chunk_hash(head.tokens, "f", head.context, "", []) == chunk_hash(head.tokens, "f", head.context)
    # off (0): the fingerprint, so every address of a store written before the setting existed, is unchanged
    assert fingerprint("m", LAYOUT, 4, "key_norm", "minilm", 64, 32, 32, 0) == fingerprint(
        "m", LAYOUT, 4, "key_norm", "minilm", 64, 32, 32
    )
    assert "|A32" in fingerprint("m", LAYOUT, 4, "key_norm", "minilm", 64, 32, 32, 32)


def test_route_is_stable_balanced_and_moves_little_when_growing():
    hashes = [os.urandom(16) for _ in range(4000)]
    two = [route(h, [0, 1]) for h in hashes]
    assert two == [route(h, [0, 1]) for h in hashes]
    counts = Counter(two)
    assert min(counts.values()) > 1700
    three = [route(h, [0, 1, 2]) for h in hashes]
    moved = sum(a != b for a, b in zip(two, three))
    assert all(b == 2 for a, b in zip(two, three) if a != b)  # only moves onto the new shard
    assert 0.25 < moved / len(hashes) < 0.42


def test_config_overrides_and_unknown_keys(tmp_path):
    f = tmp_path / "engram.toml"
    f.write_text("[cluster]\nshards = 3\n[shard.episodic]\nrows = 64\n")
    cfg = EngramConfig.load(f, server={"port": 1234, "host": None})
    assert (cfg.cluster.shards, cfg.shard.episodic.rows, cfg.server.port, cfg.server.host) == (3, 64, 1234, "127.0.0.1")
    f.write_text("[cluster]\nshard = 3\n")
    with pytest.raises(ValueError, match=r"cluster.*shard"):
        EngramConfig.load(f)


@pytest.mark.parametrize(
    "ask, error",
    [
        ({"top_k": 0}, "ask.top_k must be between 1"),
        ({"top_k": 65}, "ask.top_k must be between 1 and ask.max_top_k"),
        ({"min_score_ratio": 1.5}, "ask.min_score_ratio must be between 0 and 1"),
        ({"block_order": "random"}, "ask.block_order must be"),
        ({"position_scheme": "alibi"}, "ask.position_scheme must be"),
        ({"block_key_scale": 0.0}, "ask.block_key_scale must be between 0.5 and 4"),
        ({"block_key_scale": 10}, "ask.block_key_scale must be between 0.5 and 4"),
        ({"retrieval_bias": -1}, "ask.retrieval_bias must be between 0 and 1000"),
        ({"lexical_scale": "rank"}, "ask.lexical_scale must be 'max' or 'coverage'"),
    ],
)
def test_ask_settings_are_checked_on_load(ask, error):
    with pytest.raises(ValueError, match=error):
        EngramConfig.load(None, ask=ask)


@pytest.mark.parametrize(
    "encoder, error",
    [
        ({"kv_dtype": "int3"}, "kv_dtype must be one of"),
        ({"context_tokens": -1}, "context_tokens must be 0 or more"),
        ({"keep_tokens": 12}, "multiples of span"),
        ({"scorer": "magic"}, "encoder.scorer must be"),
        ({"key_after_tokens": -1}, "key_after_tokens must be 0 or more"),
    ],
)
def test_encoder_settings_are_checked_on_load(encoder, error):
    with pytest.raises(ValueError, match=error):
        EngramConfig.load(None, encoder=encoder)


@pytest.mark.model
def test_context_must_fit_the_decoders_window():
    """What needs the model's own config is checked when the layout is derived, before any actor starts."""
    from engram.coordinator.config import block_layout

    with pytest.raises(ValueError, match="context_tokens must be between 0 and 8063"):
        block_layout(EngramConfig.load(None, encoder={"context_tokens": 8064}))
    layout = block_layout(EngramConfig.load(None, encoder={"context_tokens": 8063}))
    assert (layout.kv_dtype, layout.layers, layout.kv_heads, layout.head_dim) == ("int4", 30, 3, 64)
    assert layout.full_fp16_bytes_per_token == 30 * 2 * 3 * 64 * 2


def test_block_biases_are_lambda_times_the_gap_to_the_best_hit():
    from engram.coordinator.ask import Retrieved, block_biases

    reading = [Retrieved(s, 0, i, d, 2 * i, 0) for i, (s, d) in enumerate([(0.3, "a"), (0.5, "a"), (0.45, "b")])]
    assert block_biases(reading, 10.0) == pytest.approx([-2.0, 0.0, -0.5])  # three separate passages
    # a run of consecutive chunks (a needle chunk and the weaker one after it) is one passage: biased by its best
    run = [Retrieved(s, 0, i, "a", seq, 0) for i, (s, seq) in enumerate([(0.3, 2), (0.8, 7), (0.6, 8), (0.5, 9)])]
    assert block_biases(run, 10.0) == pytest.approx([-5.0, 0.0, 0.0, 0.0])
    other_doc = [Retrieved(0.8, 0, 0, "a", 7, 0), Retrieved(0.6, 0, 1, "b", 8, 0)]  # same seqs, another document
    assert block_biases(other_doc, 10.0) == pytest.approx([0.0, -2.0])
    assert block_biases(reading, 0.0) is None and block_biases([], 10.0) is None


def test_chunks_beside_a_hit_that_the_questions_words_reach_are_read_too():
    from engram.coordinator.ask import Retrieved, adjacent

    rows = [("a", 7, 1.0), ("b", 3, 0.9), ("a", 9, 0.9), ("b", 4, 0.2), ("a", 8, 0.6), ("c", 1, 0.9), ("b", 2, 0.5)]
    ranked = [Retrieved(1.0 - 0.1 * i, 0, i, d, q, 0, lexical=lx) for i, (d, q, lx) in enumerate(rows)]
    top = ranked[:2]  # a#7, b#3
    # beside a#7: a#8 (BM25 0.6 of the best) and a#6 (not a candidate); beside b#3: b#4 (0.2, too few of the
    # question's words) and b#2 (0.5); a#9 is beside no hit; c#1 beside nothing
    assert [(h.document_id, h.seq) for h in adjacent(ranked, top, 0.4)] == [("a", 8), ("b", 2)]
    assert [(h.document_id, h.seq) for h in adjacent(ranked, top, 0.55)] == [("a", 8)]
    assert adjacent(ranked, top, 0.0) == []  # off
    assert [(h.document_id, h.seq) for h in adjacent(ranked, ranked[:5], 0.1)] == [("b", 2)]  # hits not twice
    assert adjacent([Retrieved(0.5, 0, 9, "a", 8, 0)], top, 0.4) == []  # no lexical match: not added


def test_fuse_weighs_bm25_by_the_best_hit_or_by_the_share_of_the_querys_idf():
    """A fact cut by a chunk boundary: the key's chunk and the value's chunk both hold the question's rare words
    (BM25 9 and 10 of the query's summed idf 10) but little of its sense (dense 0.55, 0.30); two chunks like the
    question in sense hold a common word or two of it (BM25 1.5 and 1.0). By the best BM25 at weight 0.25 the
    value's chunk, which holds the answer, ranks last of the four; by the share of the query's idf at weight 1 it
    ranks second, right after the key's, and a weak lexical match stays weak whatever the best is."""
    from engram.coordinator.ask import Retrieved, fuse

    def hits():
        rows = [("key", 0.55, 9.0), ("value", 0.30, 10.0), ("sense", 0.70, 1.5), ("other", 0.65, 1.0)]
        return [Retrieved(d, 0, i, name, i, 0, dense=d, lexical=b) for i, (name, d, b) in enumerate(rows)]

    by_max = {h.document_id: h for h in fuse(hits(), 0.25)}
    assert by_max["value"].lexical == 1.0 and by_max["key"].lexical == pytest.approx(0.9)
    assert by_max["value"].score == pytest.approx(0.30 + 0.25)
    assert by_max["sense"].score == pytest.approx(0.70 + 0.25 * 0.15)
    by_share = {h.document_id: h for h in fuse(hits(), 1.0, "coverage", 10.0)}
    assert by_share["value"].score == pytest.approx(0.30 + 1.0)
    assert by_share["key"].score == pytest.approx(0.55 + 0.9)
    assert by_share["sense"].score == pytest.approx(0.70 + 0.15)
    assert by_share["value"].lexical == 1.0  # what adjacent_lexical compares stays / the best BM25
    order = [h.document_id for h in sorted(by_share.values(), key=lambda h: -h.score)]
    assert order == ["key", "value", "sense", "other"]
    # cubed at weight 3 (the defaults): a look-alike holding 0.66 of the question's idf against the fact's 0.75 —
    # the cubes set them 0.13 apart where the shares are 0.09 — and a weak match (0.15) counts 0.003
    rows = [("fact", 0.36, 7.5), ("look-alike", 0.60, 6.6), ("sense", 0.70, 1.5)]
    cubed = fuse(
        [Retrieved(d, 0, i, n, i, 0, dense=d, lexical=b) for i, (n, d, b) in enumerate(rows)],
        3.0,
        "coverage",
        10.0,
        3.0,
    )
    assert [h.score for h in cubed] == pytest.approx([0.36 + 3 * 0.75**3, 0.60 + 3 * 0.66**3, 0.70 + 3 * 0.15**3])
    assert max(cubed, key=lambda h: h.score).document_id == "fact"
    cfg = EngramConfig().ask
    assert (cfg.lexical_scale, cfg.lexical_weight, cfg.lexical_power) == ("coverage", 3.0, 3.0)
    over = fuse([Retrieved(0, 0, 0, "a", 0, 0, dense=0.1, lexical=30.0)], 1.0, "coverage", 10.0)
    assert over[0].score == pytest.approx(1.1)  # repeated terms: capped at the whole query's idf
    no_words = fuse([Retrieved(0, 0, 0, "a", 0, 0, dense=0.4, lexical=0.0)], 1.0, "coverage", 0.0)
    assert no_words[0].score == pytest.approx(0.4)  # no lexical query: dense alone, no division by zero


def test_top_hits_merges_shards_and_drops_far_weaker_hits():
    from engram.coordinator.ask import Retrieved, top_hits

    hits = [
        Retrieved(s, shard, b, doc, seq, 0)
        for s, shard, b, doc, seq in [
            (0.10, 0, 1, "a", 0),
            (0.59, 1, 7, "a", 9),
            (0.12, 0, 2, "a", 1),
            (0.40, 1, 8, "b", 0),
            (0.59, 0, 7, "a", 9),
        ]
    ]  # the last: the same chunk seen on a second shard mid-rebalance
    assert [(h.document_id, h.seq) for h in top_hits(hits, 4, 0.0)] == [("a", 9), ("b", 0), ("a", 1), ("a", 0)]
    assert [(h.document_id, h.seq) for h in top_hits(hits, 4, 0.3)] == [("a", 9), ("b", 0)]
    assert [(h.document_id, h.seq) for h in top_hits(hits, 1, 0.3)] == [("a", 9)]
    negative = [Retrieved(-0.2, 0, 1, "a", 0, 0), Retrieved(-0.5, 0, 2, "a", 1, 0)]
    assert len(top_hits(negative, 4, 0.5)) == 2  # no positive best score: the ratio cannot rank them


@pytest.mark.model
def test_tokenizing_in_pieces_gives_the_ids_of_the_whole(tokenizer):
    """Documents are tokenised a piece at a time (bounded memory); the cuts must change no token, whatever the text:
    real prose, runs of spaces and newlines, digits, accents, emoji, code."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from engram.coordinator.routing import tokenize
    from engram.evals.haystack import essays

    def whole(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    prose = essays()[:40_000]
    assert tokenize(tokenizer, prose, piece_chars=700).tolist() == whole(prose)
    assert tokenize(tokenizer, prose).tolist() == whole(prose)  # under 2 pieces: one call
    assert tokenize(tokenizer, "").tolist() == []

    alphabet = st.sampled_from([*"ab Zé  \n\n\t.,;:-_€😀0123456789'\"()=", "def f(x):", " the ", "\u00a0"])

    @settings(max_examples=150, deadline=None, derandomize=True)
    @given(st.lists(alphabet, min_size=1, max_size=400).map("".join))
    def check(text: str) -> None:
        assert tokenize(tokenizer, text, piece_chars=16).tolist() == whole(text)

    check()


def test_retrieval_keys_put_the_context_first_and_the_after_tokens_last():
    """Encoder.retrieval_keys (pure: a decode that spells token ids, an embedder that records its texts): the first
    window starts with the key context, the last ends with the tokens after the chunk, the lexical text has both."""
    from engram.workers.encoder import Encoder, EncoderConfig

    seen: list[str] = []

    class Spell:
        @staticmethod
        def decode(ids):
            return " ".join(map(str, ids))

    class Record:
        @staticmethod
        def embed(texts):
            seen.extend(texts)
            return np.zeros((len(texts), 2))

    enc = object.__new__(Encoder)
    enc.cfg = EncoderConfig(key_context_tokens=2, key_after_tokens=3, window_tokens=4, window_stride=2, chunk_tokens=8)
    enc.tokenizer, enc.embedder = Spell(), Record()
    latent, text = enc.retrieval_keys([list(range(10, 18))], [[7, 8, 9]], [[18, 19, 20]])
    assert latent.shape == (1, 3, 2)
    assert seen == ["8 9 10 11 12 13", "12 13 14 15", "14 15 16 17 18 19 20"]
    assert list(text) == [" ".join(map(str, range(8, 21)))]


def test_the_lexical_key_reads_its_own_context_and_the_kv_pass_only_its_own():
    """encoder.lexical_context_tokens: the lexical text starts that many tokens before the chunk, the dense windows
    still at key_context_tokens, and the K/V pass reads only context_tokens of the (longer) context the chunk is
    cut with; the setting is part of the fingerprint (its chunks get other addresses)."""
    from engram.coordinator import routing
    from engram.workers.encoder import Encoder, EncoderConfig

    seen: list[str] = []

    class Spell:
        @staticmethod
        def decode(ids):
            return " ".join(map(str, ids))

    class Record:
        @staticmethod
        def embed(texts):
            seen.extend(texts)
            return np.zeros((len(texts), 2))

    cfg = EncoderConfig(context_tokens=2, key_context_tokens=2, lexical_context_tokens=5, chunk_tokens=8)
    assert cfg.cut_context_tokens == 5 and EncoderConfig().cut_context_tokens == EncoderConfig().context_tokens
    ids = np.arange(100, 124)
    chunks = routing.split(ids, 8, cfg.cut_context_tokens)
    assert chunks[1].context.tolist() == list(range(103, 108))
    enc = object.__new__(Encoder)
    enc.cfg = EncoderConfig(**{**vars(cfg), "window_tokens": 4, "window_stride": 2})
    enc.tokenizer, enc.embedder = Spell(), Record()
    _, text = enc.retrieval_keys([chunks[1].tokens.tolist()], [chunks[1].context.tolist()], [[]])
    assert seen[0].split()[:2] == ["106", "107"] and text[0].split()[:5] == [str(t) for t in range(103, 108)]

    import torch

    passed = []
    enc.model = torch.nn.Linear(1, 1)  # what encoding_autocast reads its dtype from; the pass itself is stubbed
    enc._encode_batches = lambda c, contexts, step: passed.extend(contexts) or []
    with pytest.raises(IndexError):  # the stub returns no blocks: only what the pass was handed matters
        enc.encode([chunks[1].tokens.tolist()], [b"\0" * 16], [chunks[1].context.tolist()])
    assert passed == [[106, 107]]
    with pytest.raises(ValueError, match="lexical_context_tokens"):
        EncoderConfig(lexical_context_tokens=-1)
    assert "|X5" not in routing.fingerprint("m", _layout(), 8, "s", "e", 4, 2)
    assert routing.fingerprint("m", _layout(), 8, "s", "e", 4, 2, lexical_context_tokens=5).endswith("|X5")


def _layout():
    from engram.decoder.layout import BlockLayout

    return BlockLayout(
        layers=1, kv_heads=1, keep_tokens=8, head_dim=1, chunk_tokens=8, latent_dim=2, latents_per_chunk=1
    )


@pytest.mark.model
def test_the_embedder_embeds_each_distinct_text_once():
    """A chunk shorter than its windows repeats its last window's text: the real MiniLM embeds each distinct text
    once and hands every copy the same latent (a 45-token write embedded three times before)."""
    from engram.workers.embedder import Embedder

    emb = Embedder("minilm", threads=1)
    seen: list[list[str]] = []
    encode = emb.model.encode
    emb.model.encode = lambda texts, **kw: seen.append(list(texts)) or encode(texts, **kw)
    texts = ["the shelf code is 4242", "another note", "the shelf code is 4242", "the shelf code is 4242"]
    got = emb.embed(texts)
    assert seen == [["the shelf code is 4242", "another note"]]
    assert got.shape == (4, 384) and got.dtype == np.float32
    np.testing.assert_array_equal(got[0], got[2])
    np.testing.assert_array_equal(got[0], got[3])
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(got[1], encode(["another note"], normalize_embeddings=True)[0], atol=1e-5)
