"""Explicit memory blocks: encode chunks to sparse KV, and answer a question over retrieved blocks.

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
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import quant


@dataclass(frozen=True)
class KVLayout:
    """The fixed shape of a stored block; computes sizes the way vLLM's cache specs do."""

    layers: int
    kv_heads: int
    head_dim: int
    chunk_tokens: int  # T
    keep_tokens: int  # S <= T; S == T means dense
    kv_dtype: str = "float16"  # stored K/V: float16, int8, int4 or int2 (quant.py)

    @classmethod
    def of(cls, model, chunk_tokens: int, keep_tokens: int, kv_dtype: str = "float16") -> KVLayout:
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        keep = chunk_tokens if keep_tokens <= 0 else min(keep_tokens, chunk_tokens)
        quant.check_dtype(kv_dtype)
        return cls(c.num_hidden_layers, c.num_key_value_heads, head_dim, chunk_tokens, keep, kv_dtype)

    @property
    def block_shape(self) -> tuple[int, int, int, int]:
        return (self.layers, self.kv_heads, self.keep_tokens, self.head_dim)

    @property
    def full_fp16_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * 2


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
def encode_chunks(model, sink_id: int, chunks: list[list[int]], layout: KVLayout, span: int = 8,
                  scorer: str = "attention", contexts: list[list[int]] | None = None) -> dict[str, np.ndarray]:
    """Encode chunks independently (batched) -> a block batch: keys, values (and their quantisation scales, see
    quant.py) [B, L, H, S, ...], positions [B, L, H, S] int16. `blocks_of` splits it into blocks.

    contexts: tokens each chunk is encoded after ([sink] + context + chunk) and that are not stored: the chunk's
    K/V then carry what precedes it (a sentence cut by the chunk boundary stays whole). Keys are re-rotated back
    to positions 1..T, so a block looks the same to the reader with or without a context."""
    device = next(model.parameters()).device
    t = layout.chunk_tokens
    contexts = contexts or [[] for _ in chunks]
    ctx = torch.tensor([len(c) for c in contexts], device=device)  # [B]
    ids = torch.zeros((len(chunks), 1 + int(ctx.max()) + t), dtype=torch.long, device=device)
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
        out = model.model(input_ids=ids, use_cache=True)
    finally:
        for hd in handles:
            hd.remove()
    cache = out.past_key_values
    keys, values, positions = [], [], []
    for layer in range(layout.layers):
        k, v = chunk_view(cache.layers[layer].keys), chunk_view(cache.layers[layer].values)  # [B, H, 1+T, D]
        if sparse:
            scores = attention_received(chunk_view(captured[layer]), k, lengths) if captured else -k.float().norm(dim=-1)
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
    keys_t = rerotate(torch.stack(keys, 1), -ctx, model.model.rotary_emb)  # from 1+ctx.. back to 1..T
    keys_t = keys_t.masked_fill(pad, 0)
    values_t = torch.stack(values, 1).masked_fill(pad, 0)
    batch = quant.pack_kv(keys_t, values_t, layout.kv_dtype)
    batch["positions"] = pos_t.to(torch.int16)
    return {name: t.cpu().numpy() for name, t in batch.items()}


def blocks_of(batch: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """A block batch (columns [B, ...]) -> B blocks (columns [...])."""
    n = len(batch["positions"])
    return [{name: col[i] for name, col in batch.items()} for i in range(n)]


def rerotate(keys: torch.Tensor, delta: int | torch.Tensor, rotary) -> torch.Tensor:
    """Move RoPE'd keys [..., S, D] forward by `delta` positions (negative: back): exact, rotations compose.
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


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    prefill_s: float  # assembling the memory cache + prefilling the question = time to first token
    decode_s: float
    context_tokens: int  # entries in the KV cache before the question


class MemoryDecoder:
    """Greedy decoding over retrieved blocks placed in front of the question (gpt-fast style, plain functions)."""

    def __init__(self, model, tokenizer, question_template: str = "\n{question}", position_scheme: str = "consecutive",
                 kv_dtype: str = "float16"):
        quant.check_dtype(kv_dtype)
        if position_scheme not in ("consecutive", "parallel"):
            raise ValueError(f"position_scheme must be 'consecutive' or 'parallel', not {position_scheme!r}")
        self.model, self.tokenizer = model, tokenizer
        self.template, self.scheme, self.kv_dtype = question_template, position_scheme, kv_dtype
        self.device = next(model.parameters()).device
        self.sink_id = sink_token_id(tokenizer)
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([[self.sink_id]], device=self.device), use_cache=True)
        self.sink_kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]  # [1, H, 1, D] each

    def build_cache(self, blocks: list[dict[str, np.ndarray]], chunk_tokens: int):
        """blocks (see blocks_of), in reading order -> (cache, next position)."""
        from transformers import DynamicCache

        rotary = self.model.model.rotary_emb
        dtype = self.sink_kv[0][0].dtype
        cache = DynamicCache()
        per_layer: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[kv] for kv in self.sink_kv]
        for j, block in enumerate(blocks):
            n_valid = int((block["positions"][0, 0] >= 0).sum())  # same count in every layer and head (select_spans)
            delta = j * chunk_tokens if self.scheme == "consecutive" else 0
            kt, vt = quant.unpack_kv({name: torch.from_numpy(np.array(col)).to(self.device)  # Ray: read-only
                                      for name, col in block.items() if name != "positions"}, self.kv_dtype)
            kt, vt = kt[:, :, :n_valid].to(dtype), vt[:, :, :n_valid].to(dtype)  # [L, H, S', D]
            kt = rerotate(kt, delta, rotary)
            for layer in range(kt.shape[0]):
                per_layer[layer].append((kt[layer][None], vt[layer][None]))
        for layer, parts in enumerate(per_layer):
            cache.update(torch.cat([p[0] for p in parts], 2), torch.cat([p[1] for p in parts], 2), layer)
        span = len(blocks) if self.scheme == "consecutive" else min(len(blocks), 1)
        return cache, 1 + span * chunk_tokens

    @torch.inference_mode()
    def answer(self, question: str, blocks, chunk_tokens: int, max_new_tokens: int = 32) -> Answer:
        t0 = time.perf_counter()
        cache, next_pos = self.build_cache(blocks, chunk_tokens)
        context_tokens = cache.get_seq_length()
        prompt = self.tokenizer(self.template.format(question=question), add_special_tokens=False).input_ids
        tokens = generate(self.model, cache, prompt, next_pos, max_new_tokens, self.tokenizer.eos_token_id)
        prefill_s = tokens.first_token_s - t0
        text = self.tokenizer.decode(tokens.ids, skip_special_tokens=True)
        return Answer(text.strip(), tokens.ids, prefill_s, time.perf_counter() - tokens.first_token_s, context_tokens)


    @torch.inference_mode()
    def answer_text(self, question: str, chunks: list[list[int]], max_new_tokens: int = 32) -> Answer:
        """Baselines on the same decoder: the chunks' tokens re-prefilled as the prompt ([sink] + chunks +
        question) — RAG with retrieved chunks, or full context with the whole document."""
        from transformers import DynamicCache

        t0 = time.perf_counter()
        context = [self.sink_id] + [t for c in chunks for t in c]
        prompt = context + self.tokenizer(self.template.format(question=question), add_special_tokens=False).input_ids
        tokens = generate(self.model, DynamicCache(), prompt, 0, max_new_tokens, self.tokenizer.eos_token_id)
        text = self.tokenizer.decode(tokens.ids, skip_special_tokens=True)
        return Answer(text.strip(), tokens.ids, tokens.first_token_s - t0, time.perf_counter() - tokens.first_token_s,
                      len(context))


@dataclass
class Generated:
    ids: list[int]
    first_token_s: float  # perf_counter() when the first token was known


def prefill(model, cache, ids: torch.Tensor, start: int) -> torch.Tensor:
    """ids [1, Q] at positions start.. -> logits of the last position [1, V]."""
    pos = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
    return model(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True).logits[:, -1]


def decode_one_token(model, cache, token: torch.Tensor, pos: int) -> torch.Tensor:
    return prefill(model, cache, token.view(1, 1), pos)


def generate(model, cache, prompt: list[int], start: int, max_new_tokens: int, eos_id: int | None) -> Generated:
    device = next(model.parameters()).device
    logits = prefill(model, cache, torch.tensor([prompt], device=device), start)
    token = logits.argmax(-1)
    first = time.perf_counter()
    ids: list[int] = []
    pos = start + len(prompt)
    for _ in range(max_new_tokens):
        tid = int(token)
        if tid == eos_id:
            break
        ids.append(tid)
        if len(ids) == max_new_tokens:
            break
        token = decode_one_token(model, cache, token, pos).argmax(-1)
        pos += 1
    return Generated(ids, first)


def sink_token_id(tokenizer) -> int:
    """The shared start token every block was encoded after (BOS when the tokenizer has one)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("tokenizer has neither a BOS nor an EOS token to use as the shared sink")
