"""How far does a batch's make-up move a row's logits, and how close are the decoder's greedy choices? tests/
test_batching.py's case: six 1,500-token passkey contexts written through a real service (2 shards), each ask's
blocks retrieved by it; then, in this process, the reader (float32, or bf16 matmuls: decoder.matmul_dtype) decodes
each ask alone and beside a long ask (another question, other blocks), row 0 fed the same tokens both times. Per
question and key: the greedy tokens, each step's lead of the best logit over the second, and the largest change of
any logit between alone and batched.

    .venv/bin/python bench/batch_rounding.py --out bench/results/batch_rounding.json
"""

import argparse
import asyncio
import dataclasses
import json
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "token")

import ray
import torch

from engram.coordinator.ask import arrange, block_biases, by_shard
from engram.coordinator.background import BackgroundServer
from engram.coordinator.client import EngramClient
from engram.coordinator.config import EngramConfig
from engram.decoder.batch import Row, _Batch
from engram.decoder.generate import MemoryDecoder
from engram.decoder.model import load, load_tokenizer
from engram.evals.haystack import PASSKEY_QUESTION, passkey_context

KEYS = [31547, 80262, 46619, 12873, 59304, 77451]
QUESTIONS = [PASSKEY_QUESTION, "What is the pass key? Answer with the number. The pass key is"]
LONG = "Tell the whole story of the grass and the sky."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default="bench/results/batch_rounding.json")
    args = ap.parse_args()
    cfg = EngramConfig()
    cfg.cluster.num_cpus, cfg.cluster.shards = 2, 2
    cfg.shard.data_dir = tempfile.mkdtemp(prefix="engram-rounding-")
    cfg.server.metrics_port = cfg.server.http_port = 0
    srv = BackgroundServer(cfg).start()
    try:
        c = EngramClient(srv.address, timeout=600)
        tok = load_tokenizer(cfg.decoder)
        for k in KEYS:
            c.write([(f"key-{k}", passkey_context(1500, 0.4, k, tok))], namespace=f"batch-{k}")
        asks = {(q, k): retrieved(srv, cfg, f"batch-{k}", q) for q in QUESTIONS for k in KEYS}
        long_ask = retrieved(srv, cfg, f"batch-{KEYS[0]}", LONG)
        chunk = srv.engine.cluster.layout.chunk_tokens
    finally:
        srv.stop()
        ray.shutdown()
    rows = []
    for matmul in ("float32", "bfloat16"):
        model, tok = load(dataclasses.replace(cfg.decoder, matmul_dtype=matmul))
        dec = MemoryDecoder(model, tok, cfg.decoder.question_template, cfg.ask.position_scheme, cfg.encoder.kv_dtype)
        for (q, k), (blocks, bias) in asks.items():
            alone, fed = steps(model, [row(dec, q, blocks, bias, chunk)], None, args.steps)
            together, _ = steps(model, [row(dec, q, blocks, bias, chunk), row(dec, LONG, *long_ask, chunk)], fed, 0)
            top = [a.topk(2).values for a in alone]
            rows.append(
                {
                    "matmul": matmul,
                    "question": q,
                    "key": k,
                    "answer": tok.decode(fed),
                    "lead": [round(float(t[0] - t[1]), 4) for t in top],
                    "batch_change": [round(float((a - b).abs().max()), 5) for a, b in zip(alone, together)],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


def retrieved(srv, cfg, namespace: str, question: str):
    """The blocks (reading order) and per-block biases an ask of `question` gets through the service."""
    reader = srv.engine.reader

    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, srv.loop).result()

    hits, _, _ = run(reader.retrieve(namespace, question, cfg.ask.top_k, adjacent_too=True))
    reading = arrange(hits + run(reader.neighbors(namespace, hits)), cfg.ask.block_order)
    rows, where = by_shard(reading)
    shards = list(rows)
    got = [ray.get(srv.engine.cluster.shards[s].fetch.options(num_returns=2).remote(rows[s])[1]) for s in shards]
    return [got[shards.index(s)][i] for s, i in where], block_biases(reading, cfg.ask.retrieval_bias)


def row(dec, question, blocks, bias, chunk_tokens) -> Row:
    placed, start = dec.place(blocks, chunk_tokens)
    return Row(placed, dec._prompt(question), start, 400, lambda: False, dec.memory_bias(blocks, bias))


def steps(model, rows, fed, n):
    """Row 0's last logits [V] at each pass, row 0 fed `fed` (None: its greedy tokens, `n` of them) -> (logits, fed)."""
    logits = []
    hook = model.register_forward_hook(lambda m, i, out: logits.append(out.logits[0, -1].float().clone()))
    batch, tokens = _Batch(), []
    with torch.inference_mode():
        batch.forward(model, rows, list(range(len(rows))))
        for step in range(len(fed) if fed is not None else n):
            if fed is not None:
                batch.token[0] = fed[step]
            tokens.append(int(batch.token[0]))
            batch.forward(model, [], [])
    hook.remove()
    return logits[: len(tokens)], tokens


if __name__ == "__main__":
    main()
