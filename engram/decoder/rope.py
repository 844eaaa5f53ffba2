"""Moving RoPE'd keys along the sequence: exact, since rotations compose (Llama-style `rotate_half` RoPE)."""

from __future__ import annotations

import torch


def rerotate(keys: torch.Tensor, delta: int | torch.Tensor, rotary) -> torch.Tensor:
    """Move RoPE'd keys [..., S, D] forward by `delta` positions (negative: back).
    delta: one int, or a tensor [B] of one shift per row of keys [B, ..., S, D]."""
    from transformers.models.llama.modeling_llama import rotate_half

    if isinstance(delta, int):
        if delta == 0:
            return keys
        delta = torch.tensor([delta], device=keys.device)
    elif not bool(delta.any()):
        return keys
    cos, sin = rotary(keys.new_zeros(1, 1, keys.shape[-1]), delta[None].to(keys.device))  # [1, B, D]
    shape = (len(delta),) + (1,) * (keys.dim() - 2) + (keys.shape[-1],) if len(delta) > 1 else (keys.shape[-1],)
    cos, sin = cos[0].reshape(shape).to(keys.dtype), sin[0].reshape(shape).to(keys.dtype)
    return keys * cos + rotate_half(keys) * sin
