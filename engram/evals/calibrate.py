"""Calibrate the K/V transform codec (decoder/codec.py) for a decoder, once per decoder and budget:

    python -m engram.evals.calibrate [--model smollm2] [--bits 2] [--gain] [--group 1] [--out FILE]

The text: docstrings of installed packages that no benchmark haystack uses (pydantic, fastapi, starlette, ...),
cut into chunks of 128 tokens, each encoded after its 32-token left context, as the service encodes them. The
codec shipped for SmolLM2 (decoder/codecs/smollm2.npz) was made by this command with the settings in
decoder/codecs/README.md.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from ..decoder import blocks as kv
from ..decoder.codec import CODECS, SHIPPED, calibrate
from ..decoder.layout import BlockLayout
from ..decoder.model import DecoderConfig, encoding_autocast, load, sink_token_id
from ..decoder.rope import layer_rotaries
from .distinct import docstrings

PACKAGES = ("pydantic", "fastapi", "starlette", "uvicorn", "tqdm", "pip", "click", "jinja2", "requests")


def chunks_of(ids: list[int], chunk_tokens: int = 128, context: int = 32) -> list[tuple[list[int], list[int]]]:
    """Token ids -> (chunk, its left context) pairs, whole chunks only."""
    t = chunk_tokens
    return [(ids[i : i + t], ids[max(0, i - context) : i]) for i in range(0, len(ids) - t + 1, t)]


def calibration_chunks(tokenizer, n: int, chunk_tokens: int = 128, context: int = 32):
    """n chunks spread evenly over the calibration text."""
    ids = tokenizer("\n\n".join(docstrings(PACKAGES)), add_special_tokens=False).input_ids
    chunks = chunks_of(ids, chunk_tokens, context)
    return [chunks[i] for i in np.linspace(0, len(chunks) - 1, min(n, len(chunks))).astype(int)]


@torch.inference_mode()
def encode_float(model, sink: int, chunks, chunk_tokens: int = 128, encoding: str = "auto") -> dict[str, torch.Tensor]:
    """Chunks -> float16 blocks: keys (rotated to 1..T), values [B, L, H, T, D], positions [B, L, H, T]."""
    layout = BlockLayout.of(model.config, chunk_tokens, 0, "float16")
    out = []
    with encoding_autocast(encoding, model):
        for i in range(0, len(chunks), 16):
            part = chunks[i : i + 16]
            out.append(kv.encode_chunks(model, sink, [c for c, _ in part], layout, contexts=[x for _, x in part]))
    return {k: torch.from_numpy(np.concatenate([b[k] for b in out])) for k in out[0]}


@torch.inference_mode()
def query_scale(model, sink: int, chunks, layers: int, kv_heads: int, head_dim: int) -> np.ndarray:
    """[L, H, D]: per layer, KV head and channel, the RMS of the queries that read those keys (every query head of
    the group, before RoPE), averaged over each rotate_half pair (RoPE turns the pair together, so a key error in
    either channel of a pair meets the same query energy at some distance). Coding keys scaled by it makes the
    codec's squared error the error of the attention logits q.k."""
    energy = torch.zeros(layers, kv_heads, head_dim, dtype=torch.float64)

    def hook(layer):
        def pre(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            q = module.q_proj(hidden).view(*hidden.shape[:2], -1, module.head_dim)  # [B, T, Hq, D]
            if getattr(module, "q_norm", None) is not None:  # Qwen3, Gemma-3: normed before RoPE
                q = module.q_norm(q)
            q = q.float().pow(2).mean((0, 1)).view(kv_heads, -1, head_dim).mean(1)  # [H, D]
            energy[layer] += q.double()

        return pre

    attention = [a.self_attn for a in model.model.layers]
    handles = [a.register_forward_pre_hook(hook(i), with_kwargs=True) for i, a in enumerate(attention)]
    rows: dict[int, list[list[int]]] = {}
    for c, x in chunks:  # equal lengths batch together: no padding among the queries counted
        rows.setdefault(1 + len(x) + len(c), []).append([sink, *x, *c])
    try:
        for same in rows.values():
            for i in range(0, len(same), 16):
                model.model(input_ids=torch.tensor(same[i : i + 16]))
    finally:
        for h in handles:
            h.remove()
    half = head_dim // 2
    paired = (energy[..., :half] + energy[..., half:]) / 2
    return torch.cat([paired, paired], -1).sqrt().float().numpy()


def tokens_of(batch: dict[str, torch.Tensor], rotaries) -> tuple[torch.Tensor, torch.Tensor]:
    """Float blocks -> keys before RoPE, values [B * T, L, H, D] (every token, padding included)."""
    return kv.tokens_before_rope(batch["keys"], batch["values"], rotaries)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2, gemma3-270m or a local Hugging Face folder")
    ap.add_argument("--bits", type=float, default=2.0, help="bits per stored K/V value (the budget)")
    ap.add_argument("--gain", action="store_true", help="store each vector's norm apart (fp16)")
    ap.add_argument("--group", type=int, default=1, help="adjacent layers sharing one basis")
    ap.add_argument("--key-weight", type=float, default=1.0)
    ap.add_argument("--chunks", type=int, default=128, help="calibration chunks of 128 tokens")
    ap.add_argument("--out", default="", help=f"the codec file (default for smollm2: {CODECS / SHIPPED['smollm2']})")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model, tok = load(DecoderConfig(model=args.model))
    t0 = time.perf_counter()
    batch = encode_float(model, sink_token_id(tok), calibration_chunks(tok, args.chunks))
    keys, values = tokens_of(batch, layer_rotaries(model))
    valid = (batch["positions"][:, 0, 0] >= 0).flatten()
    t1 = time.perf_counter()
    cal = calibrate(keys[valid], values[valid], gain=args.gain, group=args.group)
    codec = cal.codec(round(args.bits * keys[0].numel() * 2), args.key_weight)
    out = args.out or str(CODECS / SHIPPED.get(args.model, f"{os.path.basename(args.model)}.npz"))
    codec.save(out)
    print(
        f"{int(valid.sum())} tokens encoded in {t1 - t0:.0f} s, codec fitted in {time.perf_counter() - t1:.0f} s: "
        f"{codec.row_bytes} bytes per token (digest {codec.digest}) -> {out}"
    )


if __name__ == "__main__":
    main()
