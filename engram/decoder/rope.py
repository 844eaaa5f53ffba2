"""Moving RoPE'd keys along the sequence: exact, since rotations compose (`rotate_half` RoPE, as in Llama, Qwen,
Mistral, Gemma-3 and Phi-3). Each layer is moved with its own rotary embedding: Gemma-3's sliding-window and global
layers use different bases; a partial rotary (Phi-3 variants) moves only the rotated channels."""

from __future__ import annotations

import functools
import inspect

import torch

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text", "gemma3", "phi3")
# RoPE whose angle depends on the sequence length, not the position alone: a block's keys cannot be moved exactly
UNMOVABLE_ROPE = ("dynamic", "longrope")


def check_supported(config) -> None:
    """Refuse, with what to do instead, a decoder whose stored keys Engram cannot place exactly."""
    kind = getattr(config, "model_type", "?")
    if kind not in SUPPORTED:
        raise ValueError(
            f"decoder architecture {kind!r} is not supported: Engram re-places stored keys with rotate_half RoPE, "
            f"checked for {', '.join(SUPPORTED)} (README: Decoders)"
        )
    params = getattr(config, "rope_parameters", None) or {}
    kinds = [p.get("rope_type") for p in params.values() if isinstance(p, dict)] or [params.get("rope_type")]
    bad = [k for k in kinds if k in UNMOVABLE_ROPE]
    if bad:
        raise ValueError(
            f"the decoder's RoPE scaling {bad[0]!r} depends on the sequence length, so stored keys cannot be moved "
            "exactly; use a checkpoint with default, linear, llama3 or yarn RoPE"
        )


def layer_rotaries(model) -> list:
    """Per decoder layer, the rotary embedding (x, position_ids) -> (cos, sin) its keys were rotated with."""
    rotary = model.model.rotary_emb
    types = getattr(model.config, "layer_types", None)
    if types and "layer_type" in inspect.signature(rotary.forward).parameters:
        by_type = {t: functools.partial(_typed, rotary, t) for t in set(types)}  # one object per type: grouped
        return [by_type[t] for t in types]
    return [rotary] * model.config.num_hidden_layers


def _typed(rotary, layer_type, x, position_ids):
    return rotary(x, position_ids, layer_type)


def rerotate_layers(keys: torch.Tensor, delta, rotaries: list, dim: int) -> torch.Tensor:
    """rerotate() for keys holding every layer along `dim` (e.g. [L, H, S, D] dim 0, [B, L, H, S, D] dim 1):
    each layer moved by its own rotary (layers sharing one are moved together)."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rotaries):
        groups.setdefault(id(r), []).append(i)
    if len(groups) == 1:
        return rerotate(keys, delta, rotaries[0])
    out = torch.empty_like(keys)
    for layers in groups.values():
        idx = torch.tensor(layers, device=keys.device)
        out.index_copy_(dim, idx, rerotate(keys.index_select(dim, idx), delta, rotaries[layers[0]]))
    return out


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
    cos, sin = rotary(keys.new_zeros(1, 1, keys.shape[-1]).float(), delta[None].to(keys.device))  # [1, B, R]
    norm = torch.sqrt(cos * cos + sin * sin)  # a pure rotation: without the attention scaling of YaRN and the like
    cos, sin = cos / norm, sin / norm
    rot = cos.shape[-1]  # R < D: a partial rotary turns the first R channels only
    shape = (len(delta),) + (1,) * (keys.dim() - 2) + (rot,) if len(delta) > 1 else (rot,)
    cos, sin = cos[0].reshape(shape).to(keys.dtype), sin[0].reshape(shape).to(keys.dtype)
    turned, kept = keys[..., :rot], keys[..., rot:]
    moved = turned * cos + rotate_half(turned) * sin
    return torch.cat([moved, kept], -1) if kept.shape[-1] else moved


def rotate_tokens(keys: torch.Tensor, positions: torch.Tensor, rotaries: list) -> torch.Tensor:
    """Rotate keys [L, H, S, D] token by token: token s by positions[s] (negative: back). Keys stored before RoPE
    (the transform codec) are placed with positions = where they sit; keys at 1..S are un-rotated with -(1..S)."""
    by_token = keys.permute(2, 0, 1, 3)  # [S, L, H, D]: one shift per row
    return rerotate_layers(by_token, positions, rotaries, 1).permute(1, 2, 0, 3)
