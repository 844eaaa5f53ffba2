"""The issue's long checks: 1M-token passkey and >=128k-token essays with a needle. `pytest -m slow`."""

import pytest

from engram.coordinator.client import EngramClient
from engram.evals.haystack import NIAH_QUESTION, PASSKEY_QUESTION, first_integer, niah_context, passkey_context

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_passkey_1m_tokens(service, tokenizer):
    with EngramClient(service.address, timeout=1800) as c:
        w = c.write([("passkey-1m", passkey_context(1_000_000, 0.71, 52817, tokenizer))], namespace="long-pk")
        assert w.tokens >= 1_000_000
        assert first_integer(c.ask(PASSKEY_QUESTION, namespace="long-pk").answer) == 52817


def test_essays_128k_with_needle(service, tokenizer):
    text = niah_context(133_000, 0.5, tokenizer)
    with EngramClient(service.address, timeout=1800) as c:
        w = c.write([("essays-128k", text)], namespace="long-niah")
        assert w.tokens >= 131_072
        r = c.ask(NIAH_QUESTION, namespace="long-niah", top_k=4)
        best = max(r.chunks, key=lambda ch: ch.score)
        print(
            f"answer: {r.answer!r}; ttft {r.timings.ttft_s:.2f}s; best chunk {best.chunk_id} {best.score:.3f}; "
            f"write {w.tokens} tokens in {w.seconds:.0f}s"
        )
        # the answer's block reached the decoder (with the hybrid, the chunk ending "The best thing to do in San
        # Francisco is" can outscore the one holding the answer, when the needle straddles a chunk boundary)
        assert any("Dolores Park" in ch.text for ch in r.chunks), [ch.chunk_id for ch in r.chunks]
        assert "sandwich" in r.answer.lower() and "dolores park" in r.answer.lower(), r.answer
