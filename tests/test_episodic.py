"""Larimar memory math against a plain numpy reference (BRIEF §1)."""

import numpy as np
import pytest

from engram.workers.episodic import (EpisodicConfig, EpisodicMemory, hierarchical_readout, reference_pinv,
                                     write_one_shot)

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
    out = hierarchical_readout(readouts, q, pinv, CFG.ridge)
    assert out.shape == (CFG.dim,)
    assert np.dot(out, q) / np.linalg.norm(out) > 0.9  # a stored readout is recalled through the levels
    assert hierarchical_readout(np.zeros((0, CFG.dim)), q, pinv, CFG.ridge).shape == (CFG.dim,)
