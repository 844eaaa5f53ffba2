"""Drafts from memory (ask.draft_tokens, decoder/draft.py): batched asks read a draft of their answer after the
question and keep what the model itself predicts; the answer is decoding token by token's."""

import numpy as np
import pytest
import torch

from engram.decoder.model import DecoderConfig, load
from tests.test_batch_decode import int4_blocks


@pytest.fixture(scope="module")
def smol():
    return load(DecoderConfig(threads=2))


def test_drafts_from_memory_answer_as_decoding_token_by_token_in_fewer_passes(smol):
    """ask.draft_tokens (decoder/draft.py): each ask's answer drafted from its blocks' tokens and checked in its
    question's pass gives the answer decoding token by token gives (right drafts, a draft that is wrong from its
    second token on, a draft the model rejects at once, rows joining a running batch, a retrieval bias), in fewer
    passes when the drafts are right."""
    model, tok = smol
    dec, block, plain = int4_blocks(model, tok)
    ids = lambda text: tok(text, add_special_tokens=False).input_ids

    def needle(key: int, said: int | None = None) -> list:  # its K/V say `key`; its tokens say `said` (a draft)
        text = "The pass key is {}. Remember it. {} is the pass key."
        (b,) = block(text.format(key, key), 20)
        filler = ids("The grass is green. The sky is blue. " * 12)[:64]
        b["tokens"] = np.array((filler[:20] + ids(text.format(said or key, said or key)) + filler)[:64], np.int32)
        return [b]

    for b in plain:
        b["tokens"] = np.array(ids("The grass is green. The sky is blue. " * 12)[:64], dtype=np.int32)
    asks = [
        ("What is the pass key? The pass key is", plain + needle(71432), 64, 8, [-2.0, 0.0]),
        ("The pass key is", needle(20581, 20977), 64, 7, None),  # the draft's first digits right, then wrong
        ("What is the pass key? The pass key is", needle(99013, 45555), 64, 6, None),  # wrong from its first digit
        ("What colour is the grass? The grass is", plain, 64, 4, None),
    ]
    alone = [dec.answer(q, b, t, n, None, bias) for q, b, t, n, bias in asks]
    assert "71432" in alone[0].text and "20581" in alone[1].text and "99013" in alone[2].text
    passes = []
    model.register_forward_hook(lambda m, i, out: passes.append(1))

    def batched(draft_tokens: int, admit=None, max_rows: int = 0, first=(0, 1, 2, 3)) -> dict[int, list]:
        dec.draft_tokens, got = draft_tokens, {}
        passes.clear()
        for row, part in dec.answer_batch([asks[i] for i in first], [lambda: False] * len(first), admit, max_rows):
            got.setdefault(row, []).append(part)
        return got

    dec.draft_tokens = 8
    drafts = [dec.draft(dec._prompt(q), b, n) for q, b, _, n, _ in asks]
    assert tok.decode(drafts[0]).startswith(" 71432") and tok.decode(drafts[1]).startswith(" 20977")
    assert tok.decode(drafts[3]).startswith(" green")
    plain_passes = (batched(0), len(passes))[1]
    got = batched(8)
    assert len(passes) < plain_passes
    for r, a in enumerate(alone):
        *pieces, answer = got[r]
        assert answer.token_ids == a.token_ids, (r, answer.text, a.text)
        assert "".join(pieces) == a.text
    # rows 1 and 3 join a running batch (after its 1st and 2nd passes): still the same answers
    calls = [0]

    def admit(free):
        calls[0] += 1
        return [(*asks[i][:4], lambda: False, asks[i][4]) for i in {1: [1], 2: [3]}.get(calls[0], [])][:free]

    got = batched(8, admit, 4, first=(0, 2))
    for row, i in {0: 0, 1: 2, 2: 1, 3: 3}.items():
        assert got[row][-1].token_ids == alone[i].token_ids, (i, got[row][-1].text, alone[i].text)
    # a draft wrong from its first digit (its leading space kept): every later step computes the logits it
    # computes without the draft (the wrong part's entries masked out; reading them moves logits by far more)
    logits = []
    model.register_forward_hook(lambda m, i, out: logits.append(out.logits[0, -1].float()))
    runs = []
    for draft_tokens in (0, 8):
        logits.clear()
        batched(draft_tokens, first=(2,))
        runs.append(list(logits))
    assert len(runs[0]) == 6 and len(runs[1]) == 5  # the first pass gave 2 tokens: the space and the first digit
    for step, (a, b) in enumerate(zip(runs[0][-4:], runs[1][-4:])):
        torch.testing.assert_close(b, a, atol=1e-3, rtol=0, msg=f"step {step}")
    dec.draft_tokens = 0


def test_a_draft_is_the_text_after_the_questions_last_words_in_memory():
    from engram.decoder.draft import lookup_draft

    memory = [[9, 2, 3, 4, 5], [2, 3, 7, 8]]
    assert lookup_draft([1, 2, 3], memory, 3) == [7, 8]  # the last occurrence, up to k tokens
    assert lookup_draft([1, 2, 3], memory, 1) == [7]
    assert lookup_draft([6, 3, 4], [[3, 4, 1, 6, 3, 4, 2]], 2) == [2]  # the longest match wins
    assert lookup_draft([1, 2, 3], [[2, 3, 4], [5, 6]], 3) == [4, 5, 6]  # read on across chunks (one text)
    assert lookup_draft([1, 2, 3], memory, 0) == []
    assert lookup_draft([5], [[5, 6]], 2) == []  # one token is too weak a match
    assert lookup_draft([2, 3], [[1, 2, 3]], 2) == []  # nothing after it
