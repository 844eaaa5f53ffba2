"""Larimar episodic memory (BRIEF §1): a K×C matrix written in one shot by least squares, exactly forgettable.

Addresses come from a fixed random reference memory M0 ~ N(0, 1) (recomputable: W = Z·M0†), so the memory is
the ridge least-squares solution of  min_M λ‖M‖² + Σ ‖Z_i − W_i M‖²  over everything written and not forgotten.
Kept as normal equations: C = λI + Σ WᵀW (K×K), M = C⁻¹ Σ WᵀZ; a write (α = +1) or forget (α = −1) is the
recursive update  C ← C + αWᵀW,  M ← M + α C⁻¹Wᵀ(Z − W M)  (exact in both directions). float64 throughout so
forgetting leaves no drift.

Read: w = z·M†, z_r = w·M — the query projected onto what the memory holds. While an episode holds N ≤ K
items, that is the span of their latents, so <z_r, ẑ_i> = cos(z, z_i) exactly: chunk scoring through the memory
loses nothing within capacity and degrades gracefully beyond it (Larimar: ~80% recall at N = 2K).

A second read mode, `read_mode = "hopfield"`, keeps the episode's latents Ξ [N, C] themselves and reads them as a
modern Hopfield network / softmax attention (BRIEF §3): z_r = softmax(β z·Ξᵀ)·Ξ. No capacity limit and exact
forgetting (the rows go), at the price of storing every item; `bench/episodic_recall.py` compares the two.
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
    read_mode: str = "least_squares"  # "least_squares" (Larimar) or "hopfield" (softmax attention over the items)
    beta: float = (
        128.0  # Hopfield inverse temperature over cosines: 8 fails on correlated latents (bench/episodic_recall.py)
    )

    def __post_init__(self):
        if self.read_mode not in READ_MODES:
            raise ValueError(f"episodic read_mode {self.read_mode!r} is not one of {', '.join(READ_MODES)}")
        if self.beta <= 0:
            raise ValueError(f"episodic beta must be > 0, got {self.beta}")


READ_MODES = ("least_squares", "hopfield")


def extended(projection: np.ndarray, z: np.ndarray, tol: float = 1e-6) -> np.ndarray:
    """The projection P [C, C] onto the memory's row space after the items z [N, C] are written. With at most K items
    the row space is the span of the items (M = Wᵀ(WWᵀ + λI)⁻¹Z, W of full row rank), so P grows by the directions
    of z outside it: P + QQᵀ, Q an orthonormal basis of z's residuals (z − zP); a residual under `tol` of its item's
    norm (a repeated or nearly repeated item) adds none, as pinv's rcond cuts it from M. Equal to pinv(M)·M to
    ~1e-13 (tests/test_episodic.py) at ~100x less work than that SVD (~30 ms for each small write on a shard's
    thread, which reads queue behind; BENCHMARKS.md "Drafts from memory")."""
    out = projection.copy()
    for item in z:
        residual = item - item @ out
        residual = residual - residual @ out  # a second pass: one loses orthogonality to rounding, two do not
        norm = np.linalg.norm(residual)
        if norm > tol * max(np.linalg.norm(item), 1e-300):
            q = residual / norm
            out += np.outer(q, q)
    return out


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
        # closed: B [C, r'] float32, orthonormal: U of M's row space (U·Uᵀ = M†M) or, when that is the smaller one,
        # V of its complement (M†M = I − V·Vᵀ); cov and memory dropped
        self.basis: np.ndarray | None = None
        self.complement = False

    @property
    def closed(self) -> bool:
        return self.basis is not None

    def close(self) -> None:
        """A full episode takes no more writes: keep only what reads need, an orthonormal basis in float32 of the
        memory's row space, U [C, r] (read(z) = z·U·Uᵀ = z·M†M, the same cut as pinv's rcond), or of its orthogonal
        complement, V [C, C − r] (read(z) = z − z·V·Vᵀ), whichever is smaller, and drop the normal equations
        [K, K], M [K, C] and the projection [C, C]. A full episode holds r ≈ K − 1 = 255 of C = 384 directions, so
        V is half U's size: ~12x less RAM than the open episode's float64 state (float64 buys nothing for a read:
        scores are cosines, float32 holds them to ~1e-7). A forget in a closed episode rebuilds it from the items
        the store still holds (Shard._forget): the same least-squares memory."""
        _, sv, vt = np.linalg.svd(self.memory, full_matrices=True)  # vt [C, C]: the row space first, then the rest
        keep = np.zeros(len(vt), dtype=bool)
        if sv.size and sv.max() > 0:
            keep[: len(sv)] = sv > 1e-8 * sv.max()
        self.complement = 2 * int(keep.sum()) > len(vt)
        self.basis = np.ascontiguousarray(vt[~keep if self.complement else keep].T, dtype=np.float32)
        self.cov = self.memory = self._projection = None

    @property
    def nbytes(self) -> int:
        parts = (self.cov, self.memory, self._projection, self.basis)
        return sum(a.nbytes for a in parts if a is not None)

    def update(self, z: np.ndarray, alpha: float) -> None:
        """α = +1 writes the rows of z [N, C]; α = −1 forgets rows written earlier, exactly."""
        if self.closed:
            raise RuntimeError("this episode is closed: rebuild it from its items instead of updating it")
        z = np.asarray(z, dtype=np.float64)
        if z.size == 0:
            return
        w = z @ self.m0_pinv  # [N, K]
        self.cov += alpha * (w.T @ w)
        self.memory += alpha * np.linalg.solve(self.cov, w.T @ (z - w @ self.memory))
        self.count += int(alpha) * len(z)
        if alpha > 0 and self._projection is not None and self.count <= len(self.cov):
            self._projection = extended(self._projection, z)
        else:  # a forget (or past K items): recomputed from M when next read
            self._projection = None

    def write(self, z: np.ndarray) -> None:
        self.update(z, +1.0)

    def forget(self, z: np.ndarray) -> None:
        self.update(z, -1.0)

    @property
    def projection(self) -> np.ndarray:
        """M†M [C, C]: read(z) = z · M†M. Kept across writes (extended by each write's new directions: see
        `extended`), recomputed from M after a forget."""
        if self._projection is None:
            m = self.memory
            # rcond cuts the directions the ridge term leaves almost empty.
            self._projection = np.linalg.pinv(m, rcond=1e-8) @ m
        return self._projection

    def read(self, z: np.ndarray) -> np.ndarray:
        """z [..., C] -> readout z_r = (z·M†)·M [..., C]."""
        z = np.asarray(z, dtype=np.float64)
        if self.closed:
            inside = (z @ self.basis) @ self.basis.T
            return z - inside if self.complement else inside
        return z @ self.projection

    def prepare(self) -> None:
        """Do the read's expensive part now (on the write path), not in the first ask."""
        if not self.closed:
            self.projection  # noqa: B018

    @staticmethod
    def scorer(z: np.ndarray, readout: np.ndarray) -> np.ndarray:
        """A vector s [C] whose dot product with a stored item scores it for the query z [C], given the query's
        readout: the readout itself (<z_r, ẑ_i> = cos(z, ẑ_i) within capacity)."""
        return readout


class HopfieldMemory:
    """One episode's items Ξ [N, C], read by softmax attention: z_r = softmax(β z·Ξᵀ)·Ξ (modern Hopfield)."""

    def __init__(self, dim: int, beta: float):
        self.items = np.zeros((0, dim))  # Ξ [N, C]
        self.beta = beta

    @property
    def count(self) -> int:
        return len(self.items)

    def update(self, z: np.ndarray, alpha: float) -> None:
        z = np.asarray(z, dtype=np.float64).reshape(-1, self.items.shape[1])
        if alpha > 0:
            self.items = np.concatenate([self.items, z])
            return
        keep = np.ones(len(self.items), dtype=bool)  # forget: drop one stored copy per row given, exactly
        for row in z:
            hits = np.flatnonzero(keep & (self.items == row).all(1))
            if len(hits) == 0:
                raise ValueError("forgetting an item this memory does not hold")
            keep[hits[0]] = False
        self.items = self.items[keep]

    def write(self, z: np.ndarray) -> None:
        self.update(z, +1.0)

    def forget(self, z: np.ndarray) -> None:
        self.update(z, -1.0)

    def read(self, z: np.ndarray) -> np.ndarray:
        """z [..., C] -> readout [..., C]."""
        z = np.asarray(z, dtype=np.float64)
        if self.count == 0:
            return np.zeros_like(z)
        logits = self.beta * (z @ self.items.T)  # [..., N]
        p = np.exp(logits - logits.max(-1, keepdims=True))
        return (p / p.sum(-1, keepdims=True)) @ self.items

    def prepare(self) -> None:
        pass

    closed = False

    def close(self) -> None:
        """Nothing to drop: the items are what it reads and what a forget removes."""

    @property
    def nbytes(self) -> int:
        return self.items.nbytes

    @staticmethod
    def scorer(z: np.ndarray, readout: np.ndarray) -> np.ndarray:
        """The readout is a retrieved pattern (≈ one stored item when β is large), so <z_r, ẑ_i> alone says how
        close item i is to what was retrieved, not how well the query matched: every episode's winner would score
        ≈ 1. Weighting by the match, s = z_r · cos(z, z_r), makes the winner score its cosine with the query, so
        scores compare across episodes and shards."""
        norm = np.linalg.norm(readout)
        return readout * (float(np.dot(z, readout)) / norm) if norm > 0 else readout


Memory = EpisodicMemory | HopfieldMemory


def new_memory(cfg: EpisodicConfig, m0_pinv: np.ndarray) -> Memory:
    if cfg.read_mode == "hopfield":
        return HopfieldMemory(cfg.dim, cfg.beta)
    return EpisodicMemory(m0_pinv, cfg.ridge)


def write_one_shot(z: np.ndarray, m0_pinv: np.ndarray, ridge: float) -> EpisodicMemory:
    """Larimar's one-shot write: W0 = Z·M0†, M = (λI + W0ᵀW0)⁻¹ W0ᵀZ (→ W0†Z as λ → 0)."""
    mem = EpisodicMemory(m0_pinv, ridge)
    mem.write(z)
    return mem


def hierarchical_readout(
    readouts: np.ndarray, query: np.ndarray, m0_pinv: np.ndarray, cfg: EpisodicConfig
) -> np.ndarray:
    """Read many memories' readouts [E, C] as a memory again until one readout [C] remains: least squares K at a
    time, level by level; Hopfield in one softmax (it has no capacity limit)."""
    level = np.asarray(readouts, dtype=np.float64)
    if len(level) == 0:
        return np.zeros(m0_pinv.shape[0])
    if cfg.read_mode == "hopfield":
        mem = HopfieldMemory(level.shape[1], cfg.beta)
        mem.write(level)
        return mem.read(query)
    k = m0_pinv.shape[1]
    while len(level) > 1:
        level = np.stack(
            [write_one_shot(level[i : i + k], m0_pinv, cfg.ridge).read(query) for i in range(0, len(level), k)]
        )
    return level[0]
