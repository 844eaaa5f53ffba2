"""Passkey accuracy through the real service (Ray + gRPC + Zarr + decoder) under retrieval/assembly settings.

    .venv/bin/python bench/ask_sweep.py [--trials 20] [--lengths 4000 32000]

Writes `trials` passkey documents per length (random key and depth) into their own namespaces once, then asks
each under every setting of ask.top_k x ask.neighbors x ask.block_order (changed in-process between asks).
"""

import argparse
import itertools
import os
import random
import tempfile

import ray

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from engram.coordinator.client import EngramClient
from engram.coordinator.config import EngramConfig
from engram.coordinator.haystack import PASSKEY_QUESTION, first_integer, passkey_context
from engram.coordinator.server import BackgroundServer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4000, 32000])
    ap.add_argument("--top-k", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--neighbors", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--orders", nargs="+", default=["score", "document"])
    ap.add_argument("--templates", nargs="+", default=["\n{question}"], help="decoder.question_template values")
    ap.add_argument("--schemes", nargs="+", default=["consecutive"], help="ask.position_scheme values")
    args = ap.parse_args()
    cfg = EngramConfig()
    cfg.shard.data_dir = tempfile.mkdtemp(prefix="engram-sweep-")
    rng = random.Random(0)
    with BackgroundServer(cfg) as srv, EngramClient(srv.address) as c:
        cases = []
        for n in args.lengths:
            for t in range(args.trials):
                key, depth = rng.randint(10000, 99999), rng.random()
                ns = f"pk-{n}-{t}"
                c.write([("doc", passkey_context(n, depth, key, srv.engine.tokenizer))], namespace=ns)
                cases.append((n, ns, key))
        print("| tokens | positions | template | top-k | +following | order | passkey |\n|---|---|---|---|---|---|---|")
        for n in args.lengths:
            for scheme, tpl, k, nb, order in itertools.product(args.schemes, args.templates, args.top_k,
                                                               args.neighbors, args.orders):
                srv.engine.cfg.ask.neighbors, srv.engine.cfg.ask.block_order = nb, order
                ray.get(srv.engine.decoder.set_options.remote(tpl, scheme))
                ok = sum(first_integer(c.ask(PASSKEY_QUESTION, namespace=ns, top_k=k, max_new_tokens=8).answer) == key
                         for m, ns, key in cases if m == n)
                print(f"| {n} | {scheme} | {tpl!r} | {k} | {nb} | {order} | {ok}/{args.trials} |", flush=True)


if __name__ == "__main__":
    main()
