"""Reading many blocks with a retrieval prior (issue #16): the question's attention logits to block j's tokens get
an additive bias λ·(s_j − max s), s_j the block's dense retrieval score (the best cosine between the question and
the chunk's 64-token windows, MiniLM, as a shard scores it). Blocks that retrieval ranks far below the best are
read more faintly instead of competing for attention on equal terms; λ = 0 is today's reader. Same cases and blocks
as bench/composition.py (passkey, NIAH, distinct), same decoder in-process.

    .venv/bin/python bench/relevance_bias.py --blocks 4 16 --lambdas 0 10 20 40 --trials 24 \
        --out bench/results/relevance_bias

`--order random` (the default, the stress case) puts the answer's chunk(s) at a random place among the others and
biases each block by its own score; `--order score` reads the blocks as the service does (`ask.arrange`: runs
ascending by their best score, the best run last, nearest the question; `ask.block_biases`: a run biased by its best
hit), the answer's chunks being one run and every other chunk a run of its own. `--storage int4 codec:2.5 ...`
reads the same blocks from each storage (codec:B[:W] = the transform codec at B bits per value, the keys' errors
weighed W x the values', calibrated here as `python -m engram.evals.calibrate --group 2 --chunks 128` does): bytes
per token against accuracy as an Ask reads.
"""

import argparse
import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from block_scales import BlockScaled, block_scaled
from kv_codec import distinct_blocks, distinct_facts, encode, niah_blocks, passkey_blocks, stored, tally

from engram.coordinator.ask import Retrieved, arrange, block_biases
from engram.decoder import codec as kvc
from engram.decoder.generate import MemoryDecoder
from engram.decoder.model import DecoderConfig, load, sink_token_id, with_cache
from engram.decoder.rope import layer_rotaries
from engram.evals import calibrate as calib
from engram.evals import cases
from engram.evals import distinct as dt
from engram.evals.haystack import PASSKEY_QUESTION
from engram.workers.embedder import Embedder

T = 128


def window_scores(embedder, tok, question: str, chunks) -> np.ndarray:
    """chunks: (tokens, context) -> each chunk's best cosine over its windows (64 tokens, stride 32, the first
    starting 32 tokens into its context), as the shard's dense key scores it."""
    texts, owner = [], []
    for i, (ids, ctx) in enumerate(chunks):
        for r, s in enumerate(range(0, max(1, len(ids) - 64 + 1), 32)):
            texts.append(tok.decode((list(ctx[-32:]) if r == 0 else []) + list(ids[s : s + 64])))
            owner.append(i)
    z = embedder.embed(texts)
    q = embedder.embed([question])[0]
    cos = z @ q
    out = np.full(len(chunks), -1.0)
    for i, c in zip(owner, cos):
        out[i] = max(out[i], c)
    return out


def storage(model, tok, rot, name: str):
    """--storage name -> what `stored` takes: a dtype, or a codec at name's bits per value (calibrated once here;
    codec+gain: each token's vector norm per (keys|values, layer pair) stored apart, in fp16, within the budget;
    codec+block:BITS:M: each block's mean and spread on the top M components stored apart, bench/block_scales.py)."""
    if name.startswith("codec+block:"):
        keys, cal = calibration(model, tok, rot, False)
        bits, m = name.split(":")[1:]
        return block_scaled(cal, float(bits), int(m), keys[0].numel() * 2, T)
    if not name.startswith(("codec:", "codec+gain:")):
        return name
    keys, cal = calibration(model, tok, rot, name.startswith("codec+gain:"))
    bits, *key_weight = (float(x) for x in name.split(":")[1:])  # codec:BITS[:KEY_WEIGHT]
    return cal.codec(round(bits * keys[0].numel() * 2), *key_weight)


def calibration(model, tok, rot, gain: bool, _fitted={}):  # noqa: B006 - fitted once per run and kind
    """The codec's calibration (its basis, levels and errors), as `python -m engram.evals.calibrate --group 2
    --chunks 128 [--gain]` fits it."""
    if gain not in _fitted:
        batch = calib.encode_float(model, sink_token_id(tok), calib.calibration_chunks(tok, 128))
        keys, values = calib.tokens_of(batch, rot)
        valid = (batch["positions"][:, 0, 0] >= 0).flatten()
        _fitted[gain] = keys, kvc.calibrate(keys[valid], values[valid], gain=gain, group=2)
    return _fitted[gain]


def reader(model, tok, variant) -> MemoryDecoder:
    if isinstance(variant, BlockScaled):
        return MemoryDecoder(model, tok, kv_dtype="float16")
    if isinstance(variant, kvc.Codec):
        return MemoryDecoder(model, tok, kv_dtype="codec", codec=variant)
    return MemoryDecoder(model, tok, kv_dtype=variant)


def way(storage_name: str, lam: float, storages: int) -> str:
    return f"{storage_name} λ={lam:g}" if storages > 1 else f"λ={lam:g}"


def service_order(scores: np.ndarray, needles: list[int]) -> tuple[list[int], list[float]]:
    """scores: each chunk's (by index) -> (reading order, each block's bias gap at λ = 1) as an Ask computes them,
    the answer's chunks (`needles`, consecutive) one run of one document and every other chunk a document of its own."""
    hits = [
        Retrieved(float(s), 0, i, "answer" if i in needles else f"other {i}", i, 0, float(s))
        for i, s in enumerate(scores)
    ]
    reading = arrange(hits, "score")
    return [h.block for h in reading], block_biases(reading, 1.0)


@torch.inference_mode()
def answer_biased(dec: MemoryDecoder, question: str, blocks, bias: list[float], max_new: int) -> str:
    """Greedy answer over blocks (reading order) with a per-block additive bias on every query's logits to that
    block's tokens (the sink and the question's own tokens unbiased)."""
    prompt = dec._prompt(question)
    cache, start = dec.build_cache(blocks, T, room=len(prompt) + max_new)
    valid = [int((b["positions"][0, 0] >= 0).sum()) for b in blocks]
    memory = torch.cat([torch.zeros(1)] + [torch.full((n,), float(b)) for n, b in zip(valid, bias)])  # [S]
    s, q = len(memory), len(prompt)
    causal = torch.full((q, q), float("-inf")).triu(1)
    mask = torch.cat([memory.expand(q, s), causal], 1)[None, None]  # [1, 1, q, S + q]
    ids = torch.tensor([prompt])
    pos = torch.arange(start, start + q)[None]
    kw = with_cache(dec.model, cache)
    out = dec.model(input_ids=ids, **kw, position_ids=pos, attention_mask=mask, logits_to_keep=1)
    token, made = int(out.logits[0, -1].argmax()), []
    row = torch.cat([memory, torch.zeros(q)])
    for step in range(max_new):
        if token == dec.tokenizer.eos_token_id:
            break
        made.append(token)
        if step == max_new - 1:
            break
        row = torch.cat([row, torch.zeros(1)])
        out = dec.model(
            input_ids=torch.tensor([[token]]),
            **with_cache(dec.model, cache),
            position_ids=torch.tensor([[start + q + step]]),
            attention_mask=row[None, None, None],
        )
        token = int(out.logits[0, -1].argmax())
    return dec.tokenizer.decode(made, skip_special_tokens=True).strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 10.0, 20.0, 40.0])
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--grids", nargs="+", default=["passkey", "niah", "distinct"])
    ap.add_argument("--storage", nargs="+", default=["int4"], help="int4, float16, codec[+gain]:BITS[:KEY_WEIGHT]")
    ap.add_argument("--order", choices=["random", "score"], default="random")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model, tok = load(DecoderConfig())
    rot = layer_rotaries(model)
    storages = {s: storage(model, tok, rot, s) for s in args.storage}
    for s, v in storages.items():
        if isinstance(v, BlockScaled):
            scales = v.scale_bytes_per_block() / T
            print(
                f"{s}: {v.bytes_per_token(T):.0f} K/V bytes per token (codes {v.codec.row_bytes}, scales {scales:.0f})"
            )
    readers = {s: reader(model, tok, v) for s, v in storages.items()}
    dec = readers[args.storage[0]]
    embedder = Embedder("minilm")
    ways = [way(s, lam, len(storages)) for s in storages for lam in args.lambdas]
    rows: dict[str, dict] = {w: {} for w in ways}
    ranks: dict[str, list[int]] = {}
    same = [0, 0]  # λ = 0 through the biased path answers as the plain reader (a check of the path itself)

    def ask(grid, question, chunks, order, needles, max_new):
        """Every λ's answer over these chunks in this reading order (--order score: the service's instead);
        needles: indices of the answer's chunks."""
        n = len(order)
        by_chunk = window_scores(embedder, tok, question, chunks)  # each chunk's score, by index
        if args.order == "score":
            order, gap = service_order(by_chunk, needles)
        scores = by_chunk[order]  # in reading order
        ranked = list(np.argsort(-scores))
        ranks.setdefault(grid, []).append(min(ranked.index(order.index(i)) for i in needles))
        if args.order == "random":
            gap = list(scores - scores.max())
        batch, out = encode(model, dec, chunks), {}
        for s, v in storages.items():
            blocks = v.stored(batch, rot, order) if isinstance(v, BlockScaled) else stored(batch, v, rot, order)
            for lam in args.lambdas:
                out[way(s, lam, len(storages))] = answer_biased(
                    readers[s], question, blocks, [lam * g for g in gap], max_new
                )
            same[0] += readers[s].answer(question, blocks, T, max_new).text == answer_biased(
                readers[s], question, blocks, [0.0] * n, max_new
            )
        same[1] += len(storages)
        return out

    rng = random.Random(0)
    if "passkey" in args.grids:
        for n in args.blocks:
            right = dict.fromkeys(ways, 0)
            for _ in range(args.trials):
                key, cs = passkey_blocks(tok, n, rng)
                needle = next(i for i, c in enumerate(cs) if str(key) in tok.decode(c[0]))
                for w, a in ask("passkey", PASSKEY_QUESTION, cs, list(range(n)), [needle], 12).items():
                    right[w] += cases.first_integer(a) == key
            tally(rows, "passkey", n, right, args.trials)
    if "niah" in args.grids:
        hay = cases.Haystack("niah", tok, 2048)
        for n in args.blocks:
            right = dict.fromkeys(ways, 0)
            for t in range(args.trials):
                case, picked = niah_blocks(tok, hay, n, t, rng)
                text = [tok.decode(c[0]) for c in picked]
                hits = [i for i, t in enumerate(text) if "Dolores" in t or "sandwich" in t] or [0]  # as niah_blocks
                for w, a in ask("niah", case.question, picked, list(range(n)), hits, 16).items():
                    right[w] += cases.score(case, a) == 1.0
            tally(rows, "niah", n, right, args.trials)
    if "distinct" in args.grids:
        docs, asked = distinct_facts(tok)
        for n in args.blocks:
            right = dict.fromkeys(ways, 0)
            for f in asked:
                chunks, order, own = distinct_blocks(tok, docs, f, n, rng)
                for w, a in ask("distinct", f.question, chunks, order, list(range(own)), 16).items():
                    right[w] += dt.right(f.kind, f.answer, a)
            tally(rows, "distinct", n, right, len(asked))

    print(f"λ=0 through the biased path equals the plain reader: {same[0]}/{same[1]}")
    print({g: np.bincount(r).tolist() for g, r in ranks.items()}, "(the needle's best rank by dense score, counts)")
    cols = [f"{g}_{n}" for g in args.grids for n in args.blocks]
    print("| reader | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for w, r in rows.items():
        print(f"| {w} | " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    if args.out:
        Path(args.out).with_suffix(".json").write_text(
            json.dumps({"args": vars(args), "rows": rows, "needle_ranks": ranks, "plain_equal": same}, indent=1)
        )


if __name__ == "__main__":
    main()
