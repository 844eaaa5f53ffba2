"""Stored K/V codecs against accuracy (issue #16): int4 (today's default) vs the calibrated transform codec
(engram/decoder/codec.py) at several bit budgets, on three grids, the decoder in-process, no service.

    .venv/bin/python bench/kv_codec.py [--bits 3 2 1.5 1.25 1] [--trials 10] [--out bench/results/kv_codec]

Calibration: docstrings of packages the evaluation text never uses (pydantic, fastapi, starlette, ...), chunks of
128 tokens encoded after their 32-token left context, as the service encodes. Every grid encodes its chunks once in
float16 and then passes the same blocks through each codec (encode + decode), so cells differ by the codec only.
  passkey   one needle chunk among 3 or 7 filler chunks (bench/kv_sparsity.py's setup)
  niah      the essay needle's chunk(s) and 3 other essay chunks, 8k-token essays, random depth
  distinct  each asked fact of the distinct-text benchmark (engram/evals/distinct.py): its chunks, then the same
            beside 3 chunks of other documents
Reported: bytes per token of the K/V columns, relative error of keys (after RoPE) and values on held-out distinct
text, answers right per grid, and the codec's decode time per 4 blocks.
"""

import argparse
import itertools
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from kv_sparsity import chunks_for  # bench/: the same passkey chunks as the dtype sweep

from engram.decoder import blocks as kv
from engram.decoder import codec as kvc
from engram.decoder import quant
from engram.decoder.generate import MemoryDecoder
from engram.decoder.layout import BlockLayout
from engram.decoder.model import DecoderConfig, load
from engram.decoder.rope import layer_rotaries, rerotate_layers
from engram.evals import calibrate as calib
from engram.evals import cases
from engram.evals import distinct as dt
from engram.evals.haystack import PASSKEY_QUESTION

T, CTX = 128, 32


def kv_bytes(layout: BlockLayout) -> int:
    """A dense block's stored K/V columns (codes and scales; positions are derived)."""
    return sum(int(np.prod(shape)) * np.dtype(dt).itemsize for shape, dt in layout.kv_columns().values())


def chunked(ids: list[int]) -> list[tuple[list[int], list[int]]]:
    return calib.chunks_of(ids, T, CTX)


def passkey_blocks(tok, n: int, rng) -> tuple[int, list]:
    """A random pass key -> (key, n chunks: its needle's at a random place among filler ones, no context)."""
    key = rng.randint(10000, 99999)
    return key, [(c, []) for c in chunks_for(tok, key, rng.randrange(n), n, rng)]


def niah_blocks(tok, hay, n: int, trial: int, rng) -> tuple:
    """An 8k-token NIAH case -> (case, n of its chunks in document order: the needle's (up to 2) and random others)."""
    case = cases.make_case("niah", "", 8000, rng.random(), trial, rng)
    docs = hay.documents(8000, case.needles)
    cs = chunked([i for _, d in docs for i in tok(d, add_special_tokens=False).input_ids])
    text_of = [tok.decode(c) for c, _ in cs]
    hit = [i for i, s in enumerate(text_of) if "Dolores" in s or "sandwich" in s][:2] or [0]
    others = rng.sample([i for i in range(len(cs)) if i not in hit], n - len(hit))
    return case, [cs[i] for i in sorted(hit + others)]  # document order, as the reader's runs place them


def distinct_facts(tok):
    """The distinct-text benchmark's documents (name -> text) and its asked facts, planted as the service gets them."""
    docs = dt.corpus(30 * 1500, tok, 1500)
    facts = dt.make_facts(random.Random(0))
    dt.plant(docs, facts, tok, T, random.Random(0))
    return docs, [f for f in facts if f.question]


def distinct_blocks(tok, docs, fact, n: int, rng) -> tuple[list, list[int], int]:
    """One asked fact -> (chunks: its own chunk(s) first, then chunks of other documents up to n; the reading order,
    the fact's run at a random place; how many of the chunks are its own)."""
    texts = dict(docs)
    ids = tok(texts[fact.document], add_special_tokens=False).input_ids
    fact_chunks, _ = dt.chunk_of_answer(texts[fact.document], fact, tok, T)
    own = [(ids[q * T : (q + 1) * T], ids[max(0, q * T - 32) : q * T]) for q in fact_chunks]
    others = []
    k = 5
    while len(own) + len(others) < n:  # chunks of other documents, as many as it takes
        name = docs[(docs.index((fact.document, texts[fact.document])) + k) % len(docs)][0]
        others += chunked(tok(texts[name], add_special_tokens=False).input_ids)
        k += 1
    extra = rng.sample(others, n - len(own))
    order = list(range(len(own), n))
    order[rng.randrange(len(order) + 1) : 0] = list(range(len(own)))  # the fact's run at a random place
    return own + extra, order, len(own)


def tally(rows: dict[str, dict], grid: str, n: int, right: dict[str, float], total: int) -> None:
    """Each way's count right in cell `grid`_`n` of rows (way -> cell -> "right/total"), printed as it lands."""
    for w in right:
        rows[w][f"{grid}_{n}"] = f"{right[w]:g}/{total}"
    print(grid, n, {w: f"{right[w]:g}/{total}" for w in right}, flush=True)


def encode(model, dec, chunks) -> dict[str, torch.Tensor]:
    """-> float16 blocks as the service's encoders compute them (bf16 autocast where the CPU has it)."""
    return calib.encode_float(model, dec.sink_id, chunks, T, "auto")


def turn(keys: torch.Tensor, rotaries) -> torch.Tensor:
    """keys before RoPE [B, L, H, T, D] -> rotated to 1..T."""
    k = keys.permute(3, 0, 1, 2, 4).float()  # [T, B, L, H, D]: one shift per row
    return rerotate_layers(k, torch.arange(1, T + 1), rotaries, 2).permute(1, 2, 3, 0, 4)


def roundtrip(batch, variant, rotaries) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks' keys, values [B, L, H, T, D] float32 as a reader gets them back from `variant`."""
    k, v = batch["keys"].float(), batch["values"].float()
    if variant == "float16":
        return k, v
    if isinstance(variant, str):
        return quant.unpack_kv(quant.pack_kv(k, v, variant), variant)
    b, layers, h, t, d = k.shape
    kp, vp = variant.decode(kv.codec_rows(k, v, variant, rotaries).flatten(0, 1).numpy())
    kp = kp.reshape(b, t, layers, h, d).permute(0, 2, 3, 1, 4)
    vp = vp.reshape(b, t, layers, h, d).permute(0, 2, 3, 1, 4)
    pad = (batch["positions"] < 0)[..., None]
    return turn(kp, rotaries).masked_fill(pad, 0), vp.masked_fill(pad, 0)


def stored(batch, variant, rotaries, order) -> list[dict]:
    """The blocks as a store holds them for `variant` (float16 / integer codes and scales / codec rows)."""
    k, v = batch["keys"].float(), batch["values"].float()
    if variant == "float16":
        cols = {"keys": k.half(), "values": v.half()}
    elif isinstance(variant, str):
        cols = quant.pack_kv(k, v, variant)
    else:
        cols = {"codes": kv.codec_rows(k, v, variant, rotaries)}
    return [{**{n: c[i].numpy() for n, c in cols.items()}, "positions": batch["positions"][i].numpy()} for i in order]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=float, nargs="+", default=[3, 2, 1.5, 1.25, 1], help="bits per K/V value")
    ap.add_argument("--key-weights", type=float, nargs="+", default=[1.0], help="keys' errors weigh this much more")
    ap.add_argument("--groups", type=int, nargs="+", default=[1], help="adjacent layers sharing one basis")
    ap.add_argument(
        "--modes",
        nargs="+",
        default=["plain", "gain"],
        help="plain: coefficients as they are; gain: each vector's norm stored apart (fp16)",
    )
    ap.add_argument("--calib-chunks", type=int, default=160)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--restore", nargs="+", default=["none"], help="none, keys, both (Calibration.codec)")
    ap.add_argument("--niah-blocks", type=int, nargs="+", default=[4])
    ap.add_argument("--passkey-blocks", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--grids", nargs="+", default=["passkey", "niah", "distinct"])
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model, tok = load(DecoderConfig())
    dec = MemoryDecoder(model, tok, kv_dtype="float16")
    rot = layer_rotaries(model)
    full = BlockLayout.of(model.config, T, 0).full_fp16_bytes_per_token
    values_per_token = full // 2

    t0 = time.perf_counter()
    cal_batch = encode(model, dec, calib.calibration_chunks(tok, args.calib_chunks, T, CTX))
    pre, vals = calib.tokens_of(cal_batch, rot)
    t1 = time.perf_counter()
    chunks = calib.calibration_chunks(tok, args.calib_chunks, T, CTX)
    c = model.config
    qs = calib.query_scale(model, dec.sink_id, chunks, c.num_hidden_layers, c.num_key_value_heads, 64)
    cals = {
        (mode, g): kvc.calibrate(pre, vals, gain=mode == "gain", group=g, key_scale=qs if mode == "qs" else None)
        for mode in args.modes
        for g in args.groups
    }
    fitted = time.perf_counter() - t1
    print(f"calibration: {args.calib_chunks} chunks encoded in {t1 - t0:.0f} s, {len(cals)} fitted in {fitted:.0f} s")

    variants = {"float16": "float16", "int4": "int4"}
    for (mode, g), cal in cals.items():
        for w, r, b in itertools.product(args.key_weights, args.restore, args.bits):
            name = f"codec{'+' + mode if mode != 'plain' else ''}{f'/{g}L' * (g > 1)}{f'/kw{w:g}' * (w != 1)}"
            name += {"none": "", "keys": "/rk", "both": "/rkv"}[r] + f" {b:g} bits"
            variants[name] = cal.codec(round(b * values_per_token), w, r)
    int_bytes = {n: kv_bytes(BlockLayout.of(model.config, T, 0, n)) / T for n in ("float16", "int4", "int2")}
    rows = {
        n: {"bytes_per_token": (v.row_bytes if isinstance(v, kvc.Codec) else int_bytes[n])} for n, v in variants.items()
    }

    # held-out error: distinct text the grids use
    held = chunked(tok(dt.corpus(20_000, tok)[0][1], add_special_tokens=False).input_ids)[:32]
    hb = encode(model, dec, held)
    for name, v in variants.items():
        k2, v2 = roundtrip(hb, v, rot)
        rows[name]["key_error"] = float((k2 - hb["keys"].float()).norm() / hb["keys"].float().norm())
        rows[name]["value_error"] = float((v2 - hb["values"].float()).norm() / hb["values"].float().norm())
        if isinstance(v, kvc.Codec):
            codes = v.encode(
                torch.zeros(4 * T, *hb["keys"].shape[1:3], hb["keys"].shape[-1]),
                torch.zeros(4 * T, *hb["keys"].shape[1:3], hb["keys"].shape[-1]),
            )
            s = time.perf_counter()
            for _ in range(5):
                v.decode(codes)
            rows[name]["decode_4_blocks_s"] = (time.perf_counter() - s) / 5
        print(name, rows[name], flush=True)

    readers = {
        n: MemoryDecoder(model, tok, kv_dtype="codec", codec=v)
        if isinstance(v, kvc.Codec)
        else MemoryDecoder(model, tok, kv_dtype=v)
        for n, v in variants.items()
    }
    ttft = {n: [] for n in variants}

    def ask(question, batch, order, max_new=12):
        out = {}
        for n, v in variants.items():
            a = readers[n].answer(question, stored(batch, v, rot, order), T, max_new)
            ttft[n].append(a.prefill_s)
            out[n] = a.text
        return out

    rng = random.Random(0)
    if "passkey" in args.grids:
        for n_blocks in args.passkey_blocks:
            right = dict.fromkeys(variants, 0)
            for _ in range(args.trials):
                key, cs = passkey_blocks(tok, n_blocks, rng)
                for n, a in ask(PASSKEY_QUESTION, encode(model, dec, cs), range(n_blocks)).items():
                    right[n] += cases.first_integer(a) == key
            for n in variants:
                rows[n][f"passkey_{n_blocks}"] = f"{right[n]}/{args.trials}"
            print(f"passkey {n_blocks} blocks", right, flush=True)
    if "niah" in args.grids:
        hay = cases.Haystack("niah", tok, 2048)
        for n_blocks in args.niah_blocks:
            right = dict.fromkeys(variants, 0)
            for t in range(args.trials):
                case, picked = niah_blocks(tok, hay, n_blocks, t, rng)
                batch = encode(model, dec, picked)
                for n, a in ask(case.question, batch, range(n_blocks), 16).items():
                    right[n] += cases.score(case, a) == 1.0
            for n in variants:
                rows[n][f"niah_{n_blocks}"] = f"{right[n]}/{args.trials}"
            print(f"niah {n_blocks} blocks", right, flush=True)
    if "distinct" in args.grids:
        docs = dt.corpus(30 * 1500, tok, 1500)
        facts = dt.make_facts(random.Random(0))
        dt.plant(docs, facts, tok, T, random.Random(0))
        texts = dict(docs)
        alone, beside = dict.fromkeys(variants, 0), dict.fromkeys(variants, 0)
        asked = [f for f in facts if f.question]
        for f in asked:
            ids = tok(texts[f.document], add_special_tokens=False).input_ids
            fact_chunks, _ = dt.chunk_of_answer(texts[f.document], f, tok, T)
            own = [(ids[q * T : (q + 1) * T], ids[max(0, q * T - CTX) : q * T]) for q in fact_chunks]
            other_doc = texts[docs[(docs.index((f.document, texts[f.document])) + 5) % len(docs)][0]]
            other = chunked(tok(other_doc, add_special_tokens=False).input_ids)
            extra = rng.sample(other, max(0, 4 - len(own)))
            batch = encode(model, dec, own + extra)
            for n, a in ask(f.question, batch, range(len(own)), 16).items():
                alone[n] += dt.right(f.kind, f.answer, a)
            order = list(range(len(own), len(own) + len(extra)))
            order[rng.randrange(len(order) + 1) : 0] = list(range(len(own)))
            for n, a in ask(f.question, batch, order, 16).items():
                beside[n] += dt.right(f.kind, f.answer, a)
        for n in variants:
            rows[n]["distinct_alone"] = f"{alone[n]:g}/{len(asked)}"
            rows[n]["distinct_4"] = f"{beside[n]:g}/{len(asked)}"
        print("distinct", alone, beside, flush=True)

    cols = [
        "bytes_per_token",
        "key_error",
        "value_error",
        "passkey_4",
        "passkey_8",
        "niah_4",
        "niah_8",
        "distinct_alone",
        "distinct_4",
        "decode_4_blocks_s",
        "ttft_s_median",
    ]
    for n in variants:
        rows[n]["ttft_s_median"] = float(np.median(ttft[n])) if ttft[n] else None
    print("| K/V | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for n, r in rows.items():
        cells = [f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        print(f"| {n} | " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
        for n, v in variants.items():
            if isinstance(v, kvc.Codec):
                v.save(f"{args.out}-{n.split()[0].replace('/', '')}-{n.split()[1]}bits.npz")


if __name__ == "__main__":
    main()
