"""Left context vs none, needle chunk alone (the oracle stage): does encoding a chunk after the 32 tokens before it
help or hurt, by where the needle sits? No service: the decoder and encoder in-process, as the service encodes.

    .venv/bin/python bench/context_sweep.py [--trials 20] [--contexts 0 32] [--kv-dtype int4] [--encoder-dtype bfloat16]

Passkey contexts of random length (8k-9k tokens, so the last chunk's length varies) with the needle at depth 1.0
(the document's last, short chunk) and at a random depth; each needle's chunks encoded with every context length.
"""

import argparse
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engram.coordinator.config import EngramConfig
from engram.evals import cases as bench
from engram.evals.haystack import PASSKEY_QUESTION
from engram.evals.local_decoder import LocalDecoder


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--contexts", type=int, nargs="+", default=[0, 32])
    ap.add_argument("--kv-dtype", default="int4")
    ap.add_argument("--encoder-dtype", default="float32", help="the encoding pass: float32, bfloat16 or auto")
    args = ap.parse_args()
    rng = random.Random(0)
    local = LocalDecoder(EngramConfig.load(None, encoder={"kv_dtype": args.kv_dtype, "dtype": args.encoder_dtype}))
    hay = bench.Haystack("passkey", local.tok, 2048)
    right = {(where, ctx): 0 for where in ("last chunk", "random depth") for ctx in args.contexts}
    for t in range(args.trials):
        length = rng.randint(8000, 9000)
        for where, depth in (("last chunk", 1.0), ("random depth", rng.random())):
            case = bench.make_case("passkey", "", length, depth, t, rng)
            docs = hay.documents(length, case.needles)
            for ctx in args.contexts:
                local.cfg.encoder.context_tokens = ctx  # needle_chunks and oracle cut and encode with it
                chunks = [(ids, c) for nc in local.needle_chunks(docs, case.needles) for _, _, ids, c in nc]
                a = local.oracle(PASSKEY_QUESTION, chunks, 12)
                right[where, ctx] += bench.score(case, a) == 1.0
    print(f"| needle | {' | '.join(f'context {c}' for c in args.contexts)} |\n|---|" + "---|" * len(args.contexts))
    for where in ("last chunk", "random depth"):
        print(f"| {where} | " + " | ".join(f"{right[where, c]}/{args.trials}" for c in args.contexts) + " |")


if __name__ == "__main__":
    main()
