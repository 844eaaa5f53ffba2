"""Why decoder.matmul_dtype = "int8" rounds decoding steps only: (1) one Linear's product in float32 against its int8
step (Int8Linear.step) at 1, 16 and 320 rows; (2) how far whole-model readers move the float32 model's next-token
distribution (mean KL over every position of three ~600-token passkey prompts, the question at the end) when every
pass is rounded: all Linears in int8, q/k/v kept float32, the weights alone rounded (inputs float), per-channel
smoothing folded into the norms before q/k/v and gate/up (SmoothQuant, alpha 0.5, calibrated on another passkey
text), against the bf16 reader. BENCHMARKS.md "Reader matmuls in int8".

    .venv/bin/python bench/int8_reader.py
"""

import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from reader_dtype import Int8EveryPass

from engram.decoder.model import Bf16Linear, DecoderConfig, Int8Linear, load, replace_linears
from engram.evals.haystack import passkey_context


def linear_timing() -> None:
    def best(f, x, n=20):
        f(x)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            f(x)
            times.append(time.perf_counter() - t0)
        return min(times) * 1000

    print("| Linear (out x in) | rows | float32 | int8 step |\n|---|---|---|---|")
    for out, inp in [(576, 576), (1536, 576), (576, 1536), (49152, 576)]:
        plain = torch.nn.Linear(inp, out, bias=False)
        q = Int8Linear(plain)
        for rows in (1, 16, 320):
            x = torch.randn(rows, inp)
            with torch.inference_mode():
                a, b = best(plain, x), best(q.step, x)
            print(f"| {out} x {inp} | {rows} | {a:.3f} ms | {b:.3f} ms |", flush=True)


def smoothed(model, calibration: torch.Tensor, alpha: float):
    """SmoothQuant: per input channel j of the Linears after each RMSNorm, s_j = max|x_j|^a / max|W_j|^(1-a); the
    norm's weight divided by s, those Linears' columns multiplied by it (the float product unchanged), then int8."""
    m = copy.deepcopy(model)
    amax, hooks = {}, []
    for i, layer in enumerate(m.model.layers):
        for name, lin in (("attn", layer.self_attn.q_proj), ("mlp", layer.mlp.gate_proj)):

            def hook(mod, inp, out, key=(i, name)):
                a = inp[0].reshape(-1, inp[0].shape[-1]).abs().amax(0)
                amax[key] = torch.maximum(amax.get(key, a), a)

            hooks.append(lin.register_forward_hook(hook))
    with torch.inference_mode():
        m(calibration)
    for h in hooks:
        h.remove()
    for i, layer in enumerate(m.model.layers):
        a, p = layer.self_attn, layer.mlp
        for name, norm, lins in (
            ("attn", layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj]),
            ("mlp", layer.post_attention_layernorm, [p.gate_proj, p.up_proj]),
        ):
            w = torch.stack([lin.weight.abs().amax(0) for lin in lins]).amax(0)
            s = (amax[(i, name)].pow(alpha) / w.pow(1 - alpha)).clamp_min(1e-5)
            norm.weight.data /= s
            for lin in lins:
                lin.weight.data *= s[None]
    replace_linears(m, Int8EveryPass)
    return m


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    linear_timing()
    model, tok = load(DecoderConfig(matmul_dtype="float32"))
    prompts = [
        tok(passkey_context(600, 0.5, 12345 + i, tok) + "\nWhat is the pass key? The pass key is", return_tensors="pt")
        for i in range(3)
    ]
    ids = [p.input_ids for p in prompts]
    with torch.inference_mode():
        want = [model(x).logits.log_softmax(-1) for x in ids]

    def variant(kind, keep=()):
        m = copy.deepcopy(model)
        for mod in list(m.modules()):
            for name, child in list(mod.named_children()):
                if isinstance(child, torch.nn.Linear) and name not in keep:
                    setattr(mod, name, kind(child))
        return m

    def weights_only():
        m = copy.deepcopy(model)
        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear):
                s = mod.weight.abs().amax(1, keepdim=True) / 127
                mod.weight.data = torch.round(mod.weight.data / s) * s
        return m

    calibration = tok(passkey_context(600, 0.3, 999, tok), return_tensors="pt").input_ids
    readers = {
        "bf16 Linears": lambda: variant(Bf16Linear),
        "int8, every pass": lambda: variant(Int8EveryPass),
        "int8, q/k/v float32": lambda: variant(Int8EveryPass, ("q_proj", "k_proj", "v_proj")),
        "int8 weights, float inputs": weights_only,
        "int8, smoothed (alpha 0.5)": lambda: smoothed(model, calibration, 0.5),
    }
    print("\n| reader, every pass | mean KL from float32 | same top token |\n|---|---|---|")
    for name, make in readers.items():
        m = make()
        kl = same = 0.0
        with torch.inference_mode():
            for x, ref in zip(ids, want):
                got = m(x).logits.log_softmax(-1)
                kl += float((ref.exp() * (ref - got)).sum(-1).mean()) / len(ids)
                same += float((ref.argmax(-1) == got.argmax(-1)).float().mean()) / len(ids)
        print(f"| {name} | {kl:.5f} | {same:.3f} |", flush=True)


if __name__ == "__main__":
    main()
