"""The KV sparsifier against slow, obviously-correct loops (vLLM kernel-test style)."""

import math

import pytest
import torch

from engram.decoder.blocks import attention_received, select_spans


def slow_attention_received(q, k, lengths):
    b, hq, t, d = q.shape
    h = k.shape[1]
    g = hq // h
    out = torch.empty(b, h, t)
    for bi in range(b):
        for hi in range(h):
            for j in range(t):
                terms = [
                    float(q[bi, hi * g + gi, i] @ k[bi, hi, j]) / math.sqrt(d)
                    for gi in range(g)
                    for i in range(int(lengths[bi]))
                ]
                out[bi, hi, j] = torch.logsumexp(torch.tensor(terms), 0)
    return out


def slow_select_spans(scores, lengths, keep, span):
    b, h, t1 = scores.shape
    t = t1 - 1
    out = torch.full((b, h, keep), -1, dtype=torch.long)
    for bi in range(b):
        for hi in range(h):
            pooled = []
            for s in range(t // span):
                ps = [p for p in range(1 + s * span, 1 + (s + 1) * span) if p < lengths[bi]]
                val = torch.logsumexp(scores[bi, hi, ps], 0).item() if ps else float("-inf")
                pooled.append((val, s))
            best = sorted(pooled, key=lambda x: (-x[0], x[1]))[: keep // span]
            kept = sorted(p for _, s in best for p in range(1 + s * span, 1 + (s + 1) * span) if p < lengths[bi])
            out[bi, hi, : len(kept)] = torch.tensor(kept, dtype=torch.long)
    return out


@pytest.mark.parametrize("b,hq,h,t,d", [(1, 3, 1, 9, 8), (2, 9, 3, 17, 16), (3, 4, 2, 33, 8)])
def test_attention_received_matches_reference(b, hq, h, t, d):
    g = torch.Generator().manual_seed(b * 100 + t)
    q, k = torch.randn(b, hq, t, d, generator=g), torch.randn(b, h, t, d, generator=g)
    lengths = torch.randint(2, t + 1, (b,), generator=g)
    torch.testing.assert_close(
        attention_received(q, k, lengths), slow_attention_received(q, k, lengths), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("t,keep,span", [(16, 8, 4), (32, 16, 8), (64, 24, 8), (32, 32, 8), (16, 4, 1)])
def test_select_spans_matches_reference(t, keep, span):
    g = torch.Generator().manual_seed(t + keep)
    b, h = 3, 2
    scores = torch.randn(b, h, t + 1, generator=g)
    lengths = torch.tensor([t + 1, t // 2 + 1, 3])  # full, half and a tiny chunk (incl. the sink)
    got = select_spans(scores, lengths, keep, span)
    torch.testing.assert_close(got, slow_select_spans(scores, lengths, keep, span))
    # every layer/head of one chunk keeps the same number of valid positions (blocks are sliced uniformly)
    valid = (got >= 0).sum(-1)
    assert bool((valid == valid[:, :1]).all())
