"""A transform codec for stored K/V (issue #16; KVTC and KVQuant, BRIEF §8): a calibrated basis, bits where the
variance is, no per-block scales.

Per layer, a token's keys *before RoPE* (all KV heads: F = H * D values) are one vector and its values another.
Calibrated once per model on shipped text (`calibrate`; the command: evals/calibrate.py): each (keys|values,
layer) gets a mean and an orthonormal PCA basis (components by falling variance; `group` adjacent layers may share
one, xKV), each component its own number of bits b in 0..6 and its own 2^b Lloyd-Max
levels (the levels that minimise the squared error on the calibration coefficients). The bits are handed out one at
a time to whichever component's measured error falls most per bit, errors weighed relative to the total variance of
their (keys|values, layer), until the budget (bits per token) is spent: low-variance components get 0 bits (their
mean). Keys are coded before RoPE: their channel statistics are the same at every position (KVQuant), so one basis
fits every position; the reader applies RoPE at the block's place when it assembles the cache, as it re-rotated
keys before.

A token's codes, every layer, keys and values, are one row of `row_bytes` bytes: per bit width, its components' codes
packed like int4/int2 codes (8 / w codes of w bits per byte, w in 1, 2, 4; 3 bits = 2 + 1, 5 = 4 + 1, 6 = 4 + 2), so
unpacking is a few shifts per byte. A block's `codes` column is [T, row_bytes] uint8, fixed size: a block stays one
fixed-size segment row.

Shapes: keys_pre, values [N, L, H, D] float32 (N tokens) <-> codes [N, row_bytes] uint8.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MAX_BITS = 6
CODECS = Path(__file__).parent / "codecs"  # codecs calibrated for the shipped decoders (evals/calibrate.py)
SHIPPED = {"smollm2": "smollm2.npz"}


def codec_file(setting: str, model: str) -> Path:
    """[encoder] kv_codec ("" = the codec shipped for the decoder) -> the codec file."""
    if setting:
        path = Path(setting).expanduser()
        if not path.is_file():
            raise ValueError(f"encoder.kv_codec: there is no codec file at {setting!r}")
        return path
    if model in SHIPPED:
        return CODECS / SHIPPED[model]
    raise ValueError(
        f"no K/V codec is shipped for the decoder {model!r}: make one with `python -m engram.evals.calibrate "
        f"--model {model} --out FILE` and set [encoder] kv_codec = FILE (or use kv_dtype int4)"
    )


@functools.cache
def _load(path: str) -> Codec:
    return Codec.load(path)


def load_codec(setting: str, model: str, digest: str = "") -> Codec:
    """The codec [encoder] kv_codec names (read once per process); `digest`: the one the store was written with
    (BlockLayout.codec): a codec file changed since is refused, never read with."""
    path = codec_file(setting, model)
    codec = _load(str(path))
    if digest and codec.digest != digest:
        raise ValueError(
            f"the K/V codec at {path} (digest {codec.digest}) is not the one this data was written with ({digest}): "
            "restore that file, or use a new data_dir"
        )
    return codec


@dataclass(eq=False)  # compared by digest; hashed by identity (its readers are cached per codec)
class Codec:
    mean: np.ndarray  # [2, L, F] float32; 0 = keys before RoPE, 1 = values
    basis: np.ndarray  # [2, L, F, F] float32; columns = components, by falling variance
    bits: np.ndarray  # [2, L, F] uint8
    levels: np.ndarray  # [2, L, F, 2**MAX_BITS] float32; the first 2**bits of a component, ascending
    heads: int
    head_dim: int
    gain: bool = False  # each token's (keys|values, layer) vector's norm stored apart (fp16), its direction coded
    # [L, H, D] keys are coded as keys * key_scale (and divided back): an error along a channel the queries barely
    # read costs little, so the scale is the queries' RMS per channel (evals/calibrate.py query_scale)
    key_scale: np.ndarray | None = None

    @property
    def bits_per_token(self) -> int:
        return int(self.bits.sum())

    @property
    def row_bytes(self) -> int:
        gains = 2 * self.bits.shape[0] * self.bits.shape[1] if self.gain else 0  # fp16 per (keys|values, layer)
        return gains + sum(_packed_bytes(len(comps), b) for b, comps in self._groups)

    @property
    def digest(self) -> str:
        """Names this exact codec (stores record it: blocks coded with one are read with the same)."""
        h = hashlib.sha256()
        for a in (
            self.mean,
            self.basis,
            self.bits,
            self.levels,
            *(() if self.key_scale is None else (self.key_scale,)),
        ):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    def check_fits(self, layers: int, heads: int, head_dim: int) -> None:
        if (self.heads, self.head_dim) != (heads, head_dim) or self.mean[0].size != layers * heads * head_dim:
            raise ValueError(
                f"the K/V codec was calibrated for another decoder ({self.mean[0].size // (self.heads * self.head_dim)}"
                f" layers x {self.heads} KV heads x {self.head_dim}, not {layers} x {heads} x {head_dim}): calibrate "
                "one for this decoder (python -m engram.evals.calibrate)"
            )

    def save(self, path) -> None:
        """Basis and levels as float16 (a codec from `Calibration.codec` holds float16-exact values), compressed."""
        np.savez_compressed(
            path,
            mean=self.mean,
            basis=self.basis.astype(np.float16),
            bits=self.bits,
            levels=self.levels.astype(np.float16),
            shape=np.array([self.heads, self.head_dim, int(self.gain)]),
            **({} if self.key_scale is None else {"key_scale": self.key_scale}),
        )

    @classmethod
    def load(cls, path) -> Codec:
        z = np.load(path)
        heads, head_dim, gain = (int(x) for x in z["shape"])
        basis, levels = z["basis"].astype(np.float32), z["levels"].astype(np.float32)
        key_scale = z["key_scale"] if "key_scale" in z.files else None
        return cls(z["mean"], basis, z["bits"], levels, heads, head_dim, bool(gain), key_scale)

    # --- the row: per bit width b, the codes of its components packed in aligned parts (PARTS) ------------------
    @functools.cached_property
    def _groups(self) -> list[tuple[int, np.ndarray]]:
        """(b, flat indices of the components coded with b bits), b ascending."""
        flat = self.bits.reshape(-1)
        return [(int(b), np.nonzero(flat == b)[0]) for b in np.unique(flat) if b > 0]

    @functools.cache  # noqa: B019 - one per codec and dtype, for the codec's life (codecs are few and long-lived)
    def _reader(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The basis cut to the components any (kind, layer) codes: [2L, r, F], mean [2L, 1, F], r."""
        used = np.nonzero(self.bits.reshape(-1, self.bits.shape[-1]).any(0))[0]
        r = int(used.max()) + 1 if len(used) else 0
        basis = torch.from_numpy(np.ascontiguousarray(self.basis[..., :r].swapaxes(-1, -2)))  # [2, L, r, F]
        return basis.flatten(0, 1).to(dtype), torch.from_numpy(self.mean).flatten(0, 1)[:, None].to(dtype), r

    @functools.cached_property
    def _levels_flat(self) -> torch.Tensor:
        return torch.from_numpy(self.levels).reshape(-1)

    def encode(self, keys_pre: torch.Tensor, values: torch.Tensor) -> np.ndarray:
        """keys_pre, values [N, L, H, D] -> codes [N, row_bytes] uint8."""
        n = keys_pre.shape[0]
        x = torch.stack([keys_pre.reshape(n, *self.mean.shape[1:]), values.reshape(n, *self.mean.shape[1:])], 1)
        if self.key_scale is not None:
            x[:, 0] *= torch.from_numpy(self.key_scale).reshape(self.mean.shape[1:])
        xc = x.float() - torch.from_numpy(self.mean)
        gains = []
        if self.gain:
            g = xc.norm(dim=-1, keepdim=True).clamp(min=1e-6).half()  # [N, 2, L, 1]
            xc = xc / g.float()
            gains = [g.reshape(n, -1).numpy().view(np.uint8)]
        coef = torch.einsum("nklf,klfg->nklg", xc, torch.from_numpy(self.basis))
        coef = coef.reshape(n, -1)
        levels = self.levels.reshape(-1, self.levels.shape[-1])
        parts = gains
        for b, comps in self._groups:
            lv = torch.from_numpy(levels[comps, : 2**b])
            edges = ((lv[:, 1:] + lv[:, :-1]) / 2).contiguous()  # [m, 2^b - 1] decision thresholds
            codes = torch.searchsorted(edges, coef[:, comps].T.contiguous()).T  # [N, m]
            parts.append(_pack(codes, b).numpy())
        return np.concatenate(parts, 1) if parts else np.zeros((n, 0), np.uint8)

    def decode(self, codes: np.ndarray, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """codes [N, row_bytes] uint8 -> keys_pre, values [N, L, H, D] in `dtype`: the basis product runs in it
        (bfloat16 where the hardware has it: ~5x faster on a CPU with AVX512-BF16, its rounding far under the
        codec's)."""
        n = codes.shape[0]
        basis, mean, r = self._reader(dtype)
        two_l, f = mean.shape[0], mean.shape[-1]
        levels = self._levels_flat
        coef = torch.zeros((n, two_l * f))
        data = torch.from_numpy(np.ascontiguousarray(codes))
        at = 2 * two_l if self.gain else 0
        for b, comps in self._groups:
            size = _packed_bytes(len(comps), b)
            idx = _unpack(data[:, at : at + size], len(comps), b)  # [N, m]
            at += size
            tc = torch.from_numpy(comps)
            coef.index_copy_(1, tc, levels[tc * 2**MAX_BITS + idx])
        coef = coef.view(n, two_l, f)
        c = coef[:, :, :r].transpose(0, 1).to(dtype)  # [2L, N, r]
        if self.gain:  # [2L, N, 1]
            c = c * torch.from_numpy(codes[:, : 2 * two_l].copy().view(np.float16)).to(dtype).T[..., None]
        x = torch.baddbmm(mean, c, basis)  # [2L, N, F]
        keys, values = x[: two_l // 2].transpose(0, 1), x[two_l // 2 :].transpose(0, 1)  # [N, L/g, g * H * D]
        if self.key_scale is not None:
            keys = keys / torch.from_numpy(self.key_scale).reshape(keys.shape[1:]).to(dtype)
        return keys.reshape(n, -1, self.heads, self.head_dim), values.reshape(n, -1, self.heads, self.head_dim)


PARTS = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2)}  # a width's aligned parts, low bits first


def _packed_bytes(m: int, b: int) -> int:
    return sum(-(-m * w // 8) for w in PARTS[b])


def _pack(codes: torch.Tensor, b: int) -> torch.Tensor:
    """codes [N, m] (values < 2^b) -> [N, _packed_bytes(m, b)] uint8; code i of a byte at bits [i*w, (i+1)*w)."""
    n, m = codes.shape
    out, shift = [], 0
    for w in PARTS[b]:
        per = 8 // w
        part = torch.nn.functional.pad((codes >> shift) & (2**w - 1), (0, -m % per)).view(n, -1, per)
        out.append((part << (torch.arange(per) * w)).sum(-1).to(torch.uint8))
        shift += w
    return torch.cat(out, 1)


def _unpack(data: torch.Tensor, m: int, b: int) -> torch.Tensor:
    """Inverse of _pack: [N, bytes] uint8 -> codes [N, m] int64."""
    n = data.shape[0]
    codes, at, shift = None, 0, 0
    for w in PARTS[b]:
        per = 8 // w
        size = -(-m * w // 8)
        part = (data[:, at : at + size, None] >> (torch.arange(per, dtype=torch.uint8) * w)) & (2**w - 1)
        part = part.reshape(n, -1)[:, :m].long() << shift
        codes = part if codes is None else codes | part
        at, shift = at + size, shift + w
    return codes


# --- calibration -------------------------------------------------------------------------------------------------
def lloyd_max(coef: torch.Tensor, k: int, iters: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """coef [M, N] (one component per row) -> levels [M, k] ascending, squared error per row [M] (mean over N)."""
    s = coef.sort(dim=1).values.double()
    m, n = s.shape
    csum = torch.cat([torch.zeros(m, 1, dtype=s.dtype), s.cumsum(1)], 1)  # [M, N+1]
    levels = s[:, ((torch.arange(k) + 0.5) * n / k).long()].contiguous()  # [M, k] start at the quantiles
    for _ in range(iters):
        edges = (levels[:, 1:] + levels[:, :-1]) / 2
        cut = torch.cat(
            [
                torch.zeros(m, 1, dtype=torch.long),
                torch.searchsorted(s, edges),
                torch.full((m, 1), n, dtype=torch.long),
            ],
            1,
        )  # [M, k+1]
        count = (cut[:, 1:] - cut[:, :-1]).double()
        total = csum.gather(1, cut[:, 1:]) - csum.gather(1, cut[:, :-1])
        levels = torch.where(count > 0, total / count.clamp(min=1), levels)
        levels = levels.sort(dim=1).values
    edges = (levels[:, 1:] + levels[:, :-1]) / 2
    q = levels.gather(1, torch.searchsorted(edges, s))
    return levels.float(), ((s - q) ** 2).mean(1).float()


@dataclass
class Calibration:
    """What `fit` needs for any budget: per (keys|values, layer) mean and basis; per component its Lloyd-Max levels
    and squared error at every bit width."""

    mean: torch.Tensor  # [2, L, F]
    basis: torch.Tensor  # [2, L, F, F]
    var: torch.Tensor  # [2, L, F] variance of each component
    err: torch.Tensor  # [C = 2*L*F, MAX_BITS+1]
    levels: dict  # bits -> [C, 2^bits]
    heads: int
    head_dim: int
    gain: bool = False
    key_scale: np.ndarray | None = None

    def codec(self, bits_per_token: int, key_weight: float = 1.0, restore: str = "none") -> Codec:
        """Spend bits_per_token bits; key_weight scales the keys' errors against the values' (1 = relative errors
        of both weigh alike). restore ("none", "keys", "both"): Lloyd-Max levels are conditional means, so coded
        components come back with less variance than they have (var - error); scale their levels back up to the
        component's variance, for keys (attention logits keep their spread) or keys and values."""
        two, layers, f = self.var.shape
        weight = (torch.tensor([key_weight, 1.0])[:, None] / self.var.sum(-1)).reshape(-1)  # [2*L]
        budget = bits_per_token - (16 * two * layers if self.gain else 0)  # the norms' fp16 come first
        bits = allocate(self.err * weight.repeat_interleave(f)[:, None], budget)
        levels = torch.zeros(len(bits), 2**MAX_BITS)
        for b, lv in self.levels.items():
            sel = torch.from_numpy(bits == b)
            levels[sel, : 2**b] = lv[sel]
        if restore != "none":
            kinds = {"keys": 1, "both": 2}[restore]
            coded = torch.from_numpy(bits).long()
            kept = self.err[:, 0] - self.err.gather(1, coded[:, None])[:, 0]  # the variance the levels keep
            scale = torch.where(coded > 0, (self.err[:, 0] / kept.clamp(min=1e-12)).sqrt(), torch.ones(()))
            scale[kinds * layers * f :] = 1.0
            levels = levels * scale[:, None]
        return Codec(  # basis and levels rounded to float16 (what a codec file keeps: half the bytes)
            self.mean.float().numpy(),
            self.basis.half().float().numpy(),
            bits.reshape(two, layers, f).astype(np.uint8),
            levels.reshape(two, layers, f, -1).half().float().numpy(),
            self.heads,
            self.head_dim,
            self.gain,
            self.key_scale,
        )


def calibrate(
    keys_pre: torch.Tensor,
    values: torch.Tensor,
    gain: bool = False,
    group: int = 1,
    key_scale: np.ndarray | None = None,
) -> Calibration:
    """keys_pre, values [N, L, H, D] (calibration tokens) -> a Calibration (then `.codec(bits_per_token)`)."""
    n, layers, heads, head_dim = keys_pre.shape
    if key_scale is not None:
        keys_pre = keys_pre * torch.from_numpy(key_scale).float()
    if layers % group:
        raise ValueError(f"a group of {group} layers does not divide the decoder's {layers} layers")
    layers, f = layers // group, group * heads * head_dim  # g adjacent layers share one basis (xKV)
    x = torch.stack([keys_pre.reshape(n, layers, f), values.reshape(n, layers, f)], 0).double()  # [2, N, L, F]
    mean = x.mean(1)  # [2, L, F]
    xc = x - mean[:, None]
    if gain:
        xc = xc / xc.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    cov = torch.einsum("knlf,knlg->klfg", xc, xc) / n
    var, vec = torch.linalg.eigh(cov)  # ascending
    var, basis = var.flip(-1).clamp(min=0), vec.flip(-1)  # [2, L, F], [2, L, F, F]
    coef = torch.einsum("knlf,klfg->klgn", xc, basis).float().reshape(2 * layers * f, n)  # [C, N]
    err = torch.zeros(2 * layers * f, MAX_BITS + 1)
    err[:, 0] = coef.pow(2).mean(1)
    by_bits = {}
    for b in range(1, MAX_BITS + 1):
        parts = [lloyd_max(coef[lo : lo + 1024], 2**b) for lo in range(0, coef.shape[0], 1024)]
        by_bits[b] = torch.cat([lv for lv, _ in parts])
        err[:, b] = torch.cat([e for _, e in parts])
    return Calibration(mean.float(), basis.float(), var.float(), err, by_bits, heads, head_dim, gain, key_scale)


def allocate(err: torch.Tensor, budget: int) -> np.ndarray:
    """err [C, MAX_BITS+1] (weighted error of each component at 0..MAX_BITS bits) -> bits [C]: greedy, one bit at a
    time to the component whose error falls most (optimal when each component's error is convex in its bits)."""
    e = err.double().numpy()
    bits = np.zeros(len(e), np.int64)
    heap = [(-(e[c, 0] - e[c, 1]), c) for c in range(len(e))]
    heapq.heapify(heap)
    for _ in range(budget):
        if not heap:
            break
        _, c = heapq.heappop(heap)
        bits[c] += 1
        if bits[c] < MAX_BITS:
            heapq.heappush(heap, (-(e[c, bits[c]] - e[c, bits[c] + 1]), c))
    return bits
