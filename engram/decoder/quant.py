"""Stored K/V quantisation: asymmetric integer codes, keys per channel and values per token (KIVI, Liu et al. 2024).

Keys have a few large-magnitude channels, so each channel gets its own range over a block's kept tokens; values
have no channel outliers, so each token gets one range over its head dimension. int4 (int2) codes are packed two
(four) per byte along the head dimension. Zstd gains ~8% on fp16 K/V (BRIEF §6): quantising is what shrinks a block.

Per block (L layers, H KV heads, S kept tokens, D head dim):
  float16: keys, values [L, H, S, D] fp16
  int8:    keys, values [L, H, S, D] uint8;   key_scale, key_zero [L, H, D] fp16;
           value_scale, value_zero [L, H, S] fp16
  int4:    keys, values [L, H, S, D/2] uint8; (same scales and zeros)
  int2:    keys, values [L, H, S, D/4] uint8; (same scales and zeros)
"""

from __future__ import annotations

import torch

from .layout import check_kv_dtype, codes_per_byte

SCALE_COLUMNS = ("key_scale", "key_zero", "value_scale", "value_zero")


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., D] -> codes uint8 (8 // bits per byte along D), scale and zero fp16 (x's shape without `dim`).

    x ≈ codes * scale + zero; the range is taken over `dim`."""
    x = x.float()
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    # Round the range to fp16 first, so the codes are computed against the scale that is stored.
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=2**-14).half().float()  # smallest normal fp16
    zero = lo.half().float()
    codes = ((x - zero) / scale).round().clamp(0, 2**bits - 1).to(torch.uint8)
    per_byte = codes_per_byte(bits)
    if per_byte > 1:  # element i of each group of per_byte sits at bits [i*bits, (i+1)*bits)
        groups = codes.view(*codes.shape[:-1], -1, per_byte)
        codes = sum(groups[..., i] << (i * bits) for i in range(per_byte)).to(torch.uint8)
    return codes, scale.squeeze(dim).half(), zero.squeeze(dim).half()


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of `quantize` -> float32 [..., D]."""
    per_byte = codes_per_byte(bits)
    if per_byte > 1:
        mask = 2**bits - 1
        codes = torch.stack([(codes >> (i * bits)) & mask for i in range(per_byte)], dim=-1).flatten(-2)
    return codes.float() * scale.float().unsqueeze(dim) + zero.float().unsqueeze(dim)


def pack_kv(keys: torch.Tensor, values: torch.Tensor, kv_dtype: str) -> dict[str, torch.Tensor]:
    """keys, values [..., S, D] -> the stored columns (see the module docstring)."""
    bits = check_kv_dtype(kv_dtype)
    if bits == 16:
        return {"keys": keys.half(), "values": values.half()}
    kq, ks, kz = quantize(keys, bits, dim=-2)  # per channel: range over the S tokens
    vq, vs, vz = quantize(values, bits, dim=-1)  # per token: range over the head dimension
    return {"keys": kq, "values": vq, "key_scale": ks, "key_zero": kz, "value_scale": vs, "value_zero": vz}


def unpack_kv(block: dict, kv_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored columns (tensors) -> keys, values [..., S, D] float32."""
    bits = check_kv_dtype(kv_dtype)
    if bits == 16:
        return block["keys"].float(), block["values"].float()
    keys = dequantize(block["keys"], block["key_scale"], block["key_zero"], bits, dim=-2)
    values = dequantize(block["values"], block["value_scale"], block["value_zero"], bits, dim=-1)
    return keys, values
