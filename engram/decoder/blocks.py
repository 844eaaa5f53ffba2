"""The write side of explicit memory: chunks -> KV blocks (generate.py is the read side).

A block is one chunk's keys/values, computed by the decoder on `[sink] + context + chunk` from position 0, with
the sink and the context removed (BRIEF §6: independently encoded blocks side by side need ONE shared start
token, not one each) and keys rotated as if the chunk sat at 1..T. Shapes, per block: keys/values [L, H, S, D]
(layers, KV heads, kept tokens, head dim; stored as fp16 or integer codes, quant.py), positions [L, H, S] (the
token's position in the chunk, 1..T; -1 = padding, always sorted last).

Sparsification (Memory^3 §2, adapted by measurement, BRIEF §6): tokens are scored by attention received inside
the chunk, score_j = log Σ_i exp(q_i·k_j/√d) over all queries of the group, no causal mask; scattered tokens
lose the passkey, so scores are pooled over aligned spans of `span` tokens and whole spans are kept.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import quant
from .layout import BlockLayout
from .model import returned_cache, with_cache
from .rope import layer_rotaries, rerotate_layers


def _query_capture(model):
    """Forward pre-hooks that record each layer's post-RoPE queries [B, Hq, T, D]."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    captured: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        b, t, _ = hidden.shape
        q = module.q_proj(hidden).view(b, t, -1, module.head_dim).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        captured.append(q)

    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers]
    return captured, handles


def attention_received(q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """score_j = log Σ_{i, heads in group} exp(q_i·k_j/√d), no causal mask, padding queries excluded.

    q [B, Hq, T, D], k [B, H, T, D], lengths [B] (valid tokens incl. sink) -> [B, H, T]."""
    b, hq, t, d = q.shape
    h = k.shape[1]
    logits = torch.einsum("bhgid,bhjd->bhgij", q.view(b, h, hq // h, t, d).float(), k.float()) / math.sqrt(d)
    valid_q = torch.arange(t, device=q.device)[None, :] < lengths[:, None]  # [B, T]
    logits = logits.masked_fill(~valid_q[:, None, None, :, None], float("-inf"))
    return torch.logsumexp(logits.flatten(2, 3), dim=2)


def select_spans(scores: torch.Tensor, lengths: torch.Tensor, keep: int, span: int) -> torch.Tensor:
    """Positions to keep per head: the top keep/span aligned spans of chunk positions 1..T by pooled score.

    scores [B, H, 1+T] (index 0 = sink), lengths [B] valid tokens incl. sink -> positions [B, H, keep]
    (ascending, values 1..T; positions past a short chunk's end become -1 and sort last)."""
    b, h, t1 = scores.shape
    t = t1 - 1
    pos = torch.arange(1, t1, device=scores.device)
    valid = pos[None, :] < lengths[:, None]  # [B, T]
    s = scores[:, :, 1:].masked_fill(~valid[:, None, :], float("-inf"))
    pooled = torch.logsumexp(s.view(b, h, t // span, span), dim=-1)  # [B, H, T/span]
    top = pooled.topk(keep // span, dim=-1).indices.sort(dim=-1).values  # [B, H, n_spans]
    kept = (top[..., None] * span + 1 + torch.arange(span, device=scores.device)).flatten(2)  # [B, H, keep]
    kept = torch.where(kept < lengths[:, None, None], kept, torch.full_like(kept, t + 1))
    kept = kept.sort(dim=-1).values
    return torch.where(kept > t, torch.full_like(kept, -1), kept)


@torch.inference_mode()
def encode_chunks(
    model,
    sink_id: int,
    chunks: list[list[int]],
    layout: BlockLayout,
    span: int = 8,
    scorer: str = "attention",
    contexts: list[list[int]] | None = None,
    codec=None,
    rows: int = 0,
    width: int = 0,
) -> dict[str, np.ndarray]:
    """Encode chunks independently (batched) -> a block batch: keys, values (and their quantisation scales, see
    quant.py) [B, L, H, S, ...], positions [B, L, H, S] int16. `blocks_of` splits it into blocks.

    contexts: tokens each chunk is encoded after ([sink] + context + chunk) and that are not stored: the chunk's
    K/V then carry what precedes it (a sentence cut by the chunk boundary stays whole). Keys are re-rotated back
    to positions 1..T, so a block looks the same to the reader with or without a context.

    rows, width (encoder.fixed_shape): the pass is at least `rows` rows (copies of the first chunk, dropped after)
    of at least `width` tokens. A bf16 pass's rounding depends on the batch's shape (the kernels it picks), so a
    chunk's codes depend on what it was encoded beside (4-5% of int4 codes; bench/bit_stability.py); one shape for
    every pass makes a chunk's block the same bit for bit however it was batched."""
    device = next(model.parameters()).device
    t = layout.chunk_tokens
    contexts = contexts or [[] for _ in chunks]
    real = len(chunks)
    if rows > real:
        chunks, contexts = chunks + [chunks[0]] * (rows - real), contexts + [contexts[0]] * (rows - real)
    ctx = torch.tensor([len(c) for c in contexts], device=device)  # [B]
    # Rows right-padded to the longest [sink] + context + chunk of this batch, not to a full chunk: a short chunk
    # (a small document, a document's last) costs its own tokens only. Causal attention keeps the real tokens from
    # seeing the padding, and `view` below clamps the slots past a row's end (masked out as pads).
    width = max(width, 1 + max(len(x) + len(c) for c, x in zip(chunks, contexts)))
    ids = torch.zeros((len(chunks), width), dtype=torch.long, device=device)
    ids[:, 0] = sink_id
    for i, (c, x) in enumerate(zip(chunks, contexts)):
        ids[i, 1 : 1 + len(x) + len(c)] = torch.tensor(x + c, dtype=torch.long)
    lengths = torch.tensor([1 + len(c) for c in chunks], device=device)  # valid tokens of [sink] + chunk
    # [sink] + chunk inside each row: index [B, 1+T] into the encoded sequence
    view = torch.cat([torch.zeros_like(ctx)[:, None], 1 + ctx[:, None] + torch.arange(t, device=device)], 1)
    view = view.clamp(max=ids.shape[1] - 1)

    def chunk_view(x: torch.Tensor) -> torch.Tensor:  # [B, heads, 1+C+T, D] -> [B, heads, 1+T, D]
        return torch.gather(x, 2, view[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))

    sparse = layout.keep_tokens < t
    captured, handles = _query_capture(model) if sparse and scorer == "attention" else ([], [])
    try:
        # Right padding needs no mask: causal attention keeps real tokens from seeing it. The base model only:
        # the 49k-vocabulary LM head would cost ~12% of the pass for logits nobody reads.
        # A plain DynamicCache keeps every position of every layer: a model's own cache would trim sliding-window
        # layers (Gemma-3) to their window, and the block needs all its tokens (the masks still apply the window).
        from transformers import DynamicCache

        out = model.model(input_ids=ids, **with_cache(model.model, DynamicCache()), use_cache=True)
    finally:
        for hd in handles:
            hd.remove()
    cache = returned_cache(out)
    keys, values, positions = [], [], []
    for layer in range(layout.layers):
        k, v = chunk_view(cache.layers[layer].keys), chunk_view(cache.layers[layer].values)  # [B, H, 1+T, D]
        if sparse:
            scores = (
                attention_received(chunk_view(captured[layer]), k, lengths) if captured else -k.float().norm(dim=-1)
            )
            pos = select_spans(scores, lengths, layout.keep_tokens, span)
        else:
            pos = torch.arange(1, t + 1, device=device).expand(len(chunks), layout.kv_heads, t)
            pos = torch.where(pos < lengths[:, None, None], pos, torch.full_like(pos, -1))
        gather = pos.clamp(min=0)[..., None].expand(-1, -1, -1, layout.head_dim)
        keys.append(torch.gather(k, 2, gather))
        values.append(torch.gather(v, 2, gather))
        positions.append(pos)
    pos_t = torch.stack(positions, 1)
    pad = (pos_t < 0)[..., None]
    keys_t = rerotate_layers(torch.stack(keys, 1), -ctx, layer_rotaries(model), 1)  # from 1+ctx.. back to 1..T
    keys_t = keys_t.masked_fill(pad, 0)
    values_t = torch.stack(values, 1).masked_fill(pad, 0)
    if layout.kv_dtype == "codec":
        batch = {"codes": codec_rows(keys_t, values_t, codec, layer_rotaries(model))}
    else:
        batch = quant.pack_kv(keys_t, values_t, layout.kv_dtype)
    batch["positions"] = pos_t.to(torch.int16)
    return {name: t[:real].cpu().numpy() for name, t in batch.items()}


def tokens_before_rope(keys: torch.Tensor, values: torch.Tensor, rotaries: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks' keys (rotated to 1..T), values [B, L, H, T, D] -> per token, keys turned back to before RoPE and
    values [B * T, L, H, D] float32 on the CPU (what the transform codec codes, codec.py)."""
    b, layers, h, t, d = keys.shape
    back = -torch.arange(1, t + 1, device=keys.device)
    pre = rerotate_layers(keys.permute(3, 0, 1, 2, 4).float(), back, rotaries, 2)  # [T, B, L, H, D]
    pre = pre.transpose(0, 1).reshape(b * t, layers, h, d).cpu()
    return pre, values.permute(0, 3, 1, 2, 4).reshape(b * t, layers, h, d).float().cpu()


def codec_rows(keys: torch.Tensor, values: torch.Tensor, codec, rotaries: list) -> torch.Tensor:
    """keys (rotated to 1..T), values [B, L, H, T, D] -> codes [B, T, row_bytes] uint8 (codec.py)."""
    b, t = keys.shape[0], keys.shape[3]
    return torch.from_numpy(codec.encode(*tokens_before_rope(keys, values, rotaries))).view(b, t, -1)


def blocks_of(batch: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """A block batch (columns [B, ...]) -> B blocks (columns [...])."""
    n = len(batch["positions"])
    return [{name: col[i] for name, col in batch.items()} for i in range(n)]
