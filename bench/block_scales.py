"""The transform codec with per-block scales on its top components, simulated (issue #16). The shipped codec's
levels are fixed per model, so a block whose content sits off the calibration's spread is coded coarsely wherever
that content repeats; int4's ranges adapt to each block. Here each block's coefficients on the first M components
of every (keys|values, layer pair) basis are shifted and scaled to the calibration's spread before the fixed
levels quantise them, and back after. The block's mean and spread per component are stored in fp16: 4 bytes per
component per block, 2 x 15 x M x 4 / 128 bytes per token for SmolLM2 (M = 16: 15 bytes). Only the coding error
is simulated: blocks come back as float16 K/V for the float16 reader, and the bytes are counted, not packed.
bench/relevance_bias.py reads it as `--storage codec+block:BITS:M` (BITS: the whole K/V row, scales included)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engram.decoder import codec as kvc
from engram.decoder.blocks import tokens_before_rope
from engram.decoder.rope import rerotate_layers


@dataclass
class BlockScaled:
    codec: kvc.Codec
    var: torch.Tensor  # [2, L', F]: each component's variance over the calibration tokens
    m: int  # components per (keys|values, layer pair) scaled per block

    def scale_bytes_per_block(self) -> int:
        two, layers, _ = self.var.shape
        return two * layers * self.m * 4  # mean and spread, fp16 each

    def bytes_per_token(self, t: int) -> float:
        return self.codec.row_bytes + self.scale_bytes_per_block() / t

    def roundtrip(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """x [B * T, 2, L', F] (keys before RoPE and values, blocks of t tokens one after another) -> as coded and
        decoded."""
        c = self.codec
        mean, basis = torch.from_numpy(c.mean), torch.from_numpy(c.basis)
        coef = torch.einsum("nklf,klfg->nklg", x - mean, basis)  # [N, 2, L', F]
        n, two, layers, _ = coef.shape
        if self.m == 0:
            return torch.einsum("nklg,klfg->nklf", quantised(coef.reshape(n, -1), c).reshape(coef.shape), basis) + mean
        top = coef[..., : self.m].reshape(n // t, t, two, layers, self.m)
        mu = top.mean(1, keepdim=True).half().float()
        sd = top.std(1, keepdim=True).clamp(min=1e-4).half().float()
        spread = self.var[..., : self.m].sqrt()  # [2, L', M]
        coef = coef.clone()
        coef[..., : self.m] = ((top - mu) / sd * spread).reshape(n, two, layers, self.m)
        q = quantised(coef.reshape(n, -1), c).reshape(coef.shape)
        top = q[..., : self.m].reshape(n // t, t, two, layers, self.m)
        q[..., : self.m] = (top / spread * sd + mu).reshape(n, two, layers, self.m)
        return torch.einsum("nklg,klfg->nklf", q, basis) + mean

    def stored(self, batch, rotaries, order) -> list[dict]:
        """The blocks of `batch` as the float16 reader reads them, after this coding (kv_codec.stored's shape)."""
        k, v = batch["keys"].float(), batch["values"].float()  # [B, L, H, T, D], keys rotated to 1..T
        b, layers, h, t, d = k.shape
        pre, vals = tokens_before_rope(k, v, rotaries)  # [B * T, L, H, D]
        shape = self.codec.mean.shape[1:]
        x = torch.stack([pre.reshape(b * t, *shape), vals.reshape(b * t, *shape)], 1)
        y = self.roundtrip(x, t)
        keys_pre = y[:, 0].reshape(b, t, layers, h, d).permute(1, 0, 2, 3, 4)  # [T, B, L, H, D]
        keys = rerotate_layers(keys_pre, torch.arange(1, t + 1), rotaries, 2).permute(1, 2, 3, 0, 4)
        values = y[:, 1].reshape(b, t, layers, h, d).permute(0, 2, 3, 1, 4)
        cols = {"keys": keys.half(), "values": values.half()}
        return [
            {**{name: col[i].numpy() for name, col in cols.items()}, "positions": batch["positions"][i].numpy()}
            for i in order
        ]


def quantised(coef: torch.Tensor, c: kvc.Codec) -> torch.Tensor:
    """coef [N, C] -> each component at its nearest of the codec's levels (0 where it has no bits)."""
    out = torch.zeros_like(coef)
    levels = c.levels.reshape(-1, c.levels.shape[-1])
    for b, comps in c._groups:
        lv = torch.from_numpy(np.ascontiguousarray(levels[comps, : 2**b]))  # [m, 2^b]
        edges = ((lv[:, 1:] + lv[:, :-1]) / 2).contiguous()
        idx = torch.searchsorted(edges, coef[:, comps].T.contiguous())  # [m, N]
        out[:, torch.from_numpy(comps)] = lv.gather(1, idx).T
    return out


def block_scaled(cal: kvc.Calibration, bits_per_value: float, m: int, values_per_token: int, t: int) -> BlockScaled:
    """A BlockScaled whose whole row (codes and scales) is bits_per_value bits per K/V value."""
    two, layers, _ = cal.var.shape
    scale_bits = two * layers * m * 4 * 8 / t
    return BlockScaled(cal.codec(round(bits_per_value * values_per_token - scale_bits)), cal.var, m)


def selfcheck() -> None:
    """`python bench/block_scales.py`: with M = 0 the simulation is the codec's own encode and decode, and on a
    block off the calibration's spread, scaling all components cuts the error."""
    torch.manual_seed(0)
    n, layers, dim = 512, 4, 8
    k = torch.randn(n, layers, 1, dim) * torch.linspace(0.5, 3, dim)
    v = torch.randn(n, layers, 1, dim)
    cal = kvc.calibrate(k, v, group=2)
    c = cal.codec(2 * layers * dim * 2)  # 2 bits per value
    kd, vd = c.decode(c.encode(k, v))
    f = 2 * dim  # a basis per 2 layers
    x = torch.stack([k.reshape(n, 2, f), v.reshape(n, 2, f)], 1)
    y = BlockScaled(c, cal.var, 0).roundtrip(x, 128)
    assert torch.equal(y[:, 0].reshape(k.shape), kd) and torch.equal(y[:, 1].reshape(v.shape), vd)
    off = torch.stack([(k[:128] * 0.2 + 1.5).reshape(128, 2, f), (v[:128] * 0.2 - 1).reshape(128, 2, f)], 1)
    err = [float((BlockScaled(c, cal.var, m).roundtrip(off, 128) - off).norm() / off.norm()) for m in (0, f)]
    assert err[1] < err[0] / 3, err
    print(f"M = 0 equals the codec; a block off the spread: error {err[0]:.3f} plain, {err[1]:.3f} all scaled")


if __name__ == "__main__":
    selfcheck()
