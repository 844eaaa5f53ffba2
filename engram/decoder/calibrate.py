"""Calibrate the K/V transform codec (codec.py) for a decoder, once per decoder and budget:

    python -m engram.decoder.calibrate [--model smollm2] [--bits 2] [--gain] [--group 1] [--out FILE]

The text: docstrings of installed packages that no benchmark haystack uses (pydantic, fastapi, starlette, ...),
cut into chunks of 128 tokens, each encoded after its 32-token left context, as the service encodes them. The
codec shipped for SmolLM2 (codecs/smollm2.npz) was made by this command with the settings in codecs/README.md.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from . import blocks as kv
from .codec import CODECS, SHIPPED, calibrate
from .layout import BlockLayout
from .model import DecoderConfig, encoding_autocast, load, sink_token_id
from .rope import layer_rotaries, rerotate_layers

PACKAGES = ("pydantic", "fastapi", "starlette", "uvicorn", "tqdm", "pip", "click", "jinja2", "requests")


def chunks_of(ids: list[int], chunk_tokens: int = 128, context: int = 32) -> list[tuple[list[int], list[int]]]:
    """Token ids -> (chunk, its left context) pairs, whole chunks only."""
    t = chunk_tokens
    return [(ids[i : i + t], ids[max(0, i - context) : i]) for i in range(0, len(ids) - t + 1, t)]


def calibration_chunks(tokenizer, n: int, chunk_tokens: int = 128, context: int = 32):
    """n chunks spread evenly over the calibration text."""
    from ..evals.distinct import docstrings

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


def tokens_of(batch: dict[str, torch.Tensor], rotaries) -> tuple[torch.Tensor, torch.Tensor]:
    """Float blocks -> keys before RoPE, values [B * T, L, H, D] (every token, padding included)."""
    k, v = batch["keys"].float(), batch["values"].float()
    t = k.shape[3]
    pre = rerotate_layers(k.permute(3, 0, 1, 2, 4), -torch.arange(1, t + 1), rotaries, 2).transpose(0, 1)
    return pre.flatten(0, 1), v.permute(0, 3, 1, 2, 4).flatten(0, 1)


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
