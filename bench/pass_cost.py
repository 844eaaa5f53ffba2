"""What one decoder pass costs by how its weights are held: float32, Linear weights in bf16 (decoder.matmul_dtype =
"bfloat16") and the whole model in bf16; B rows of q new tokens over S cached entries (random K/V in the reader's
buffer cache). Minimum of repeats; --profile prints torch's operator table of one setting.

    python bench/pass_cost.py --rows 1 16 32 --tokens 1 11
    python bench/pass_cost.py --profile bf16-matmuls --rows 16 --tokens 1
"""

import argparse
import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers.cache_utils import Cache

from engram.decoder.kv_cache import BufferLayer
from engram.decoder.model import DecoderConfig, bf16_linears, load, with_cache


def one_pass(model, b: int, q: int, s: int) -> float:
    cfg = model.config
    heads, dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    dtype = model.model.norm.weight.dtype  # the cache holds what attention computes in
    layers = [
        BufferLayer(torch.randn(b, heads, s + q, dim, dtype=dtype), torch.randn(b, heads, s + q, dim, dtype=dtype), s)
        for _ in range(cfg.num_hidden_layers)
    ]
    ids = torch.randint(100, 1000, (b, q))
    pos = torch.arange(s, s + q)[None].expand(b, -1)
    mask = torch.ones(b, s + q, dtype=torch.long)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=ids, **with_cache(model, Cache(layers=layers)), position_ids=pos, attention_mask=mask,
              logits_to_keep=1)  # fmt: skip
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 11])
    ap.add_argument("--cached", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", choices=["float32", "bf16-matmuls", "bf16-model"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model, _ = load(DecoderConfig(matmul_dtype="float32"))
    matmuls = copy.deepcopy(model)
    bf16_linears(matmuls)
    models = {"float32": model, "bf16-matmuls": matmuls, "bf16-model": copy.deepcopy(model).to(torch.bfloat16)}
    if args.profile:
        from torch.profiler import profile

        m, b, q = models[args.profile], args.rows[0], args.tokens[0]
        one_pass(m, b, q, args.cached)
        with profile() as p:
            for _ in range(3):
                one_pass(m, b, q, args.cached)
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        return
    print("| rows x new tokens | " + " | ".join(models) + " |\n|---|" + "---|" * len(models))
    for b in args.rows:
        for q in args.tokens:
            ms = [min(one_pass(m, b, q, args.cached) for _ in range(args.repeats)) * 1000 for m in models.values()]
            print(f"| {b} x {q} | " + " | ".join(f"{x:.1f} ms" for x in ms) + " |", flush=True)


if __name__ == "__main__":
    main()
