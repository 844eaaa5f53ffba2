"""Larimar memory math against a plain numpy reference (BRIEF §1)."""

import numpy as np
import pytest

from engram.workers.episodic import (
    EpisodicConfig,
    EpisodicMemory,
    HopfieldMemory,
    hierarchical_readout,
    new_memory,
    reference_pinv,
    write_one_shot,
)

CFG = EpisodicConfig(rows=32, dim=48, ridge=1e-9, seed=3)


def unit(rng, n, d):
    z = rng.standard_normal((n, d))
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def reference_write(z, m0):
    """Larimar's equations verbatim: W0 = Z M0†, M = W0† Z."""
    w0 = z @ np.linalg.pinv(m0)
    return np.linalg.pinv(w0) @ z


def reference_read(z, m):
    return (z @ np.linalg.pinv(m)) @ m


@pytest.mark.parametrize("n", [1, 5, 20, 32])
def test_one_shot_write_and_read_match_reference(n):
    rng = np.random.default_rng(n)
    z = unit(rng, n, CFG.dim)
    m0 = np.random.default_rng(CFG.seed).standard_normal((CFG.rows, CFG.dim))
    mem = write_one_shot(z, reference_pinv(CFG), CFG.ridge)
    q = unit(rng, 4, CFG.dim)
    np.testing.assert_allclose(mem.read(q), reference_read(q, reference_write(z, m0)), atol=1e-6)
    # within capacity every stored item reads back exactly
    np.testing.assert_allclose(mem.read(z), z, atol=1e-6)


def test_forget_is_exact():
    rng = np.random.default_rng(0)
    a, b, c = unit(rng, 10, CFG.dim), unit(rng, 8, CFG.dim), unit(rng, 6, CFG.dim)
    mem = EpisodicMemory(reference_pinv(CFG), 1e-3)
    mem.write(a), mem.write(b), mem.write(c)
    mem.forget(b)
    only = EpisodicMemory(reference_pinv(CFG), 1e-3)
    only.write(np.concatenate([a, c]))
    np.testing.assert_allclose(mem.memory, only.memory, atol=1e-10)
    np.testing.assert_allclose(mem.cov, only.cov, atol=1e-10)
    assert mem.count == 16
    # the forgotten items are no longer recalled, the kept ones still are
    assert np.linalg.norm(mem.read(b) - b, axis=1).min() > 0.1
    np.testing.assert_allclose(mem.read(a), a, atol=1e-3)


def test_scores_equal_cosine_within_capacity():
    """<z_r, z_i> = cos(q, z_i) while N <= K: scoring through the memory loses nothing."""
    rng = np.random.default_rng(1)
    z = unit(rng, 20, CFG.dim)
    q = unit(rng, 1, CFG.dim)[0]
    mem = write_one_shot(z, reference_pinv(CFG), CFG.ridge)
    np.testing.assert_allclose(z @ mem.read(q), z @ q, atol=1e-6)


def test_recall_degrades_past_capacity():
    """Reconstruction of stored items is exact up to K items and falls off beyond (Larimar's capacity)."""
    rng = np.random.default_rng(2)
    pinv = reference_pinv(CFG)
    err = {}
    for n in (CFG.rows // 2, CFG.rows, 2 * CFG.rows, 4 * CFG.rows):
        z = unit(rng, n, CFG.dim)
        err[n] = np.linalg.norm(write_one_shot(z, pinv, CFG.ridge).read(z) - z, axis=1).mean()
    assert err[CFG.rows // 2] < 1e-6 and err[CFG.rows] < 1e-6
    assert 0.1 < err[2 * CFG.rows] < err[4 * CFG.rows]


def test_hierarchical_readout():
    rng = np.random.default_rng(4)
    pinv = reference_pinv(CFG)
    readouts = unit(rng, 3 * CFG.rows + 5, CFG.dim)  # more than one memory's worth: two levels
    q = readouts[7]
    out = hierarchical_readout(readouts, q, pinv, CFG)
    assert out.shape == (CFG.dim,)
    assert np.dot(out, q) / np.linalg.norm(out) > 0.9  # a stored readout is recalled through the levels
    assert hierarchical_readout(np.zeros((0, CFG.dim)), q, pinv, CFG).shape == (CFG.dim,)


# --- Hopfield read mode ---------------------------------------------------------------------------------------------
def reference_hopfield(q, items, beta):
    """softmax(β q·Ξᵀ)·Ξ, one query at a time with Python's math."""
    out = []
    for row in np.atleast_2d(q):
        logits = [beta * float(np.dot(row, x)) for x in items]
        m = max(logits)
        w = [np.exp(v - m) for v in logits]
        out.append(sum(wi * x for wi, x in zip(w, items)) / sum(w))
    return np.array(out)


@pytest.mark.parametrize("n", [1, 7, 64, 200])
@pytest.mark.parametrize("beta", [1.0, 8.0, 64.0])
def test_hopfield_read_matches_reference(n, beta):
    rng = np.random.default_rng(n)
    z, q = unit(rng, n, CFG.dim), unit(rng, 3, CFG.dim)
    mem = HopfieldMemory(CFG.dim, beta)
    mem.write(z)
    np.testing.assert_allclose(mem.read(q), reference_hopfield(q, z, beta), atol=1e-10)


def test_hopfield_recalls_past_least_squares_capacity():
    """At N = 4K a sharp softmax still reconstructs the stored item from a noisy query; least squares cannot."""
    rng = np.random.default_rng(5)
    z = unit(rng, 4 * CFG.rows, CFG.dim)
    noisy = z + 0.3 * unit(rng, len(z), CFG.dim)
    hop = HopfieldMemory(CFG.dim, 64.0)
    hop.write(z)
    ls = write_one_shot(z, reference_pinv(CFG), CFG.ridge)
    cos = lambda out: np.mean(np.sum(out * z, 1) / np.linalg.norm(out, axis=1))
    assert cos(hop.read(noisy)) > 0.95
    assert cos(ls.read(noisy)) < 0.9


def test_hopfield_forget_is_exact():
    rng = np.random.default_rng(6)
    a, b = unit(rng, 5, CFG.dim), unit(rng, 3, CFG.dim)
    mem = HopfieldMemory(CFG.dim, 16.0)
    mem.write(a), mem.write(b), mem.write(a[:1])  # a duplicate: forgetting drops one copy
    mem.forget(b)
    mem.forget(a[:1])
    np.testing.assert_array_equal(mem.items, np.concatenate([a[1:], a[:1]]))
    assert mem.count == 5
    with pytest.raises(ValueError, match="does not hold"):
        mem.forget(b[:1])
    assert mem.count == 5


def test_read_mode_is_selected_by_config_and_checked():
    pinv = reference_pinv(CFG)
    assert isinstance(new_memory(CFG, pinv), EpisodicMemory)
    assert isinstance(new_memory(EpisodicConfig(rows=32, dim=48, read_mode="hopfield"), pinv), HopfieldMemory)
    with pytest.raises(ValueError, match="read_mode 'softmax' is not one of least_squares, hopfield"):
        EpisodicConfig(read_mode="softmax")
    with pytest.raises(ValueError, match="beta must be > 0"):
        EpisodicConfig(read_mode="hopfield", beta=0)


def test_hopfield_hierarchical_readout():
    rng = np.random.default_rng(7)
    readouts = unit(rng, 3 * CFG.rows + 5, CFG.dim)
    cfg = EpisodicConfig(rows=32, dim=48, read_mode="hopfield", beta=64.0)
    out = hierarchical_readout(readouts, readouts[7], reference_pinv(CFG), cfg)
    np.testing.assert_allclose(out, reference_hopfield(readouts[7], readouts, 64.0)[0], atol=1e-10)
    assert np.dot(out, readouts[7]) / np.linalg.norm(out) > 0.9


@pytest.mark.parametrize("n", [5, 20, 32, 60])
def test_a_closed_memory_reads_as_before_in_a_fraction_of_the_ram(n):
    """close() keeps an orthonormal float32 basis of the memory's row space, or of its complement when that is
    smaller (n > C/2), instead of the normal equations and the C×C projection: reads equal the open memory's
    (float32 rounding), the RAM is the smaller basis', and updates are refused (the shard rebuilds a closed episode
    from its items instead)."""
    rng = np.random.default_rng(n)
    z, q = unit(rng, n, CFG.dim), unit(rng, 7, CFG.dim)
    mem = write_one_shot(z, reference_pinv(CFG), CFG.ridge)
    mem.prepare()
    open_read, open_bytes = mem.read(q), mem.nbytes
    mem.close()
    np.testing.assert_allclose(mem.read(q), open_read, atol=1e-5)
    assert mem.closed and mem.count == n and mem.nbytes < open_bytes / 3
    rank = min(n, CFG.rows, CFG.dim)
    assert mem.complement == (2 * rank > CFG.dim) and mem.nbytes == 4 * CFG.dim * min(rank, CFG.dim - rank)
    with pytest.raises(RuntimeError, match="closed"):
        mem.forget(z[:1])


def test_an_open_memory_keeps_its_projection_across_writes_as_pinv_computes_it(monkeypatch):
    """Small writes one after another (as `engram load` makes them: three windows, two of them the same text): the
    open memory extends its projection by each write's new directions instead of a new pinv of M (~30 ms on a
    shard's thread per write); reads equal pinv(M)·M's to 1e-12 up to K items, and after a forget (recomputed)."""
    from engram.workers import episodic

    rng = np.random.default_rng(7)
    mem = EpisodicMemory(reference_pinv(CFG), CFG.ridge)
    q = unit(rng, 5, CFG.dim)
    kept = []
    svds = []
    monkeypatch.setattr(episodic.np.linalg, "pinv", lambda *a, **k: svds.append(1) or pinv(*a, **k))
    for i in range(CFG.rows // 3):
        z = unit(rng, 3, CFG.dim)
        z[2] = z[1]  # a repeated window adds no direction
        if i == 4:
            z[0] = kept[0][0]  # an item written before: none either
        mem.write(z)
        mem.prepare()
        kept.append(z)
        np.testing.assert_allclose(mem.projection, pinv_projection(mem.memory), atol=1e-12)
    assert len(svds) == 1  # the first write's only
    mem.forget(kept[3])
    np.testing.assert_allclose(mem.read(q), q @ pinv_projection(mem.memory), atol=1e-12)
    np.testing.assert_allclose(mem.read(kept[0]), kept[0], atol=1e-6)  # a kept item still reads back


pinv = np.linalg.pinv


def pinv_projection(m):
    """M†M with pinv's cut at 1e-8 of the largest singular value (the directions the ridge leaves almost empty)."""
    return pinv(m, rcond=1e-8) @ m


def test_extending_a_projection_is_pinvs_projection_of_the_items_span():
    from engram.workers.episodic import extended

    rng = np.random.default_rng(8)
    z = unit(rng, 10, CFG.dim)
    p = extended(np.zeros((CFG.dim, CFG.dim)), z)
    np.testing.assert_allclose(p, np.linalg.pinv(z) @ z, atol=1e-12)
    np.testing.assert_allclose(extended(p, z[:3]), p, atol=1e-15)  # nothing new: unchanged
    np.testing.assert_allclose(p @ p, p, atol=1e-12)  # still a projection
