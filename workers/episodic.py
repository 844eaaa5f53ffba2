"""Larimar episodic memory (BRIEF §1): a K×C matrix written in one shot by least squares, exactly forgettable.

Addresses come from a fixed random reference memory M0 ~ N(0, 1) (recomputable: W = Z·M0†), so the memory is
the ridge least-squares solution of  min_M λ‖M‖² + Σ ‖Z_i − W_i M‖²  over everything written and not forgotten.
Kept as normal equations: C = λI + Σ WᵀW (K×K), M = C⁻¹ Σ WᵀZ; a write (α = +1) or forget (α = −1) is the
recursive update  C ← C + αWᵀW,  M ← M + α C⁻¹Wᵀ(Z − W M)  (exact in both directions). float64 throughout so
forgetting leaves no drift.

Read: w = z·M†, z_r = w·M — the query projected onto what the memory holds. While an episode holds N ≤ K
items, that is the span of their latents, so <z_r, ẑ_i> = cos(z, z_i) exactly: chunk scoring through the memory
loses nothing within capacity and degrades gracefully beyond it (Larimar: ~80% recall at N = 2K).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class EpisodicConfig:
    rows: int = 256  # K; kept below the latent width C so a memory is a real projection (Larimar: 512 < 768)
    dim: int = 384  # C, the encoder's latent width (all-MiniLM-L6-v2)
    ridge: float = 1e-6  # λ, keeps C invertible while an episode holds fewer than K items
    seed: int = 0  # seeds M0: every shard and restart derives the same addresses


def reference_pinv(cfg: EpisodicConfig) -> np.ndarray:
    """M0† [C, K] for the fixed N(0,1) reference memory M0 [K, C]."""
    m0 = np.random.default_rng(cfg.seed).standard_normal((cfg.rows, cfg.dim))
    return np.linalg.pinv(m0)


class EpisodicMemory:
    """One episode's memory: at most K items are written to it (the caller opens a new episode after that)."""

    def __init__(self, m0_pinv: np.ndarray, ridge: float):
        self.m0_pinv = m0_pinv  # [C, K]
        k = m0_pinv.shape[1]
        self.cov = ridge * np.eye(k)  # C = λI + Σ WᵀW    [K, K]
        self.memory = np.zeros((k, m0_pinv.shape[0]))  # M   [K, C]
        self.count = 0
        self._projection: np.ndarray | None = None

    def update(self, z: np.ndarray, alpha: float) -> None:
        """α = +1 writes the rows of z [N, C]; α = −1 forgets rows written earlier, exactly."""
        z = np.asarray(z, dtype=np.float64)
        if z.size == 0:
            return
        w = z @ self.m0_pinv  # [N, K]
        self.cov += alpha * (w.T @ w)
        self.memory += alpha * np.linalg.solve(self.cov, w.T @ (z - w @ self.memory))
        self.count += int(alpha) * len(z)
        self._projection = None

    def write(self, z: np.ndarray) -> None:
        self.update(z, +1.0)

    def forget(self, z: np.ndarray) -> None:
        self.update(z, -1.0)

    @property
    def projection(self) -> np.ndarray:
        """M†M [C, C]: read(z) = z · M†M. Cached between writes."""
        if self._projection is None:
            m = self.memory
            # rcond cuts the directions the ridge term leaves almost empty.
            self._projection = np.linalg.pinv(m, rcond=1e-8) @ m
        return self._projection

    def read(self, z: np.ndarray) -> np.ndarray:
        """z [..., C] -> readout z_r = (z·M†)·M [..., C]."""
        return np.asarray(z, dtype=np.float64) @ self.projection


def write_one_shot(z: np.ndarray, m0_pinv: np.ndarray, ridge: float) -> EpisodicMemory:
    """Larimar's one-shot write: W0 = Z·M0†, M = (λI + W0ᵀW0)⁻¹ W0ᵀZ (→ W0†Z as λ → 0)."""
    mem = EpisodicMemory(m0_pinv, ridge)
    mem.write(z)
    return mem


def hierarchical_readout(readouts: np.ndarray, query: np.ndarray, m0_pinv: np.ndarray, ridge: float) -> np.ndarray:
    """Read many memories' readouts [E, C] as memories again, K at a time, until one readout [C] remains."""
    k = m0_pinv.shape[1]
    level = np.asarray(readouts, dtype=np.float64)
    if len(level) == 0:
        return np.zeros(m0_pinv.shape[0])
    while len(level) > 1:
        level = np.stack([write_one_shot(level[i : i + k], m0_pinv, ridge).read(query) for i in range(0, len(level), k)])
    return level[0]
