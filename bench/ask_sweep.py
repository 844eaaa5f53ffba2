"""Accuracy through the real service (Ray + gRPC + Zarr + decoder) under retrieval/assembly settings.

    .venv/bin/python bench/ask_sweep.py [--task passkey|niah] [--trials 20] [--lengths 4000 32000]

Writes `trials` cases per length into their own namespaces once (passkey: random key and depth; niah: the
`engram bench niah` haystack with the needle at evenly spaced depths), then asks each under every setting of
ask.top_k x ask.neighbors x ask.block_order x position scheme x template (changed in-process between asks).
`--rag` also scores the RAG baseline (same retrieved chunks re-prefilled as text) at each top-k.
"""

import argparse
import itertools
import os
import random
import tempfile

import ray

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "token")

from engram.coordinator.background import BackgroundServer
from engram.coordinator.client import EngramClient
from engram.coordinator.config import EngramConfig
from engram.evals import cases as bench
from engram.evals.haystack import PASSKEY_QUESTION, first_integer, passkey_context


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=["passkey", "niah"], default="passkey")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4000, 32000])
    ap.add_argument("--top-k", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--neighbors", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--orders", nargs="+", default=["score", "document"])
    ap.add_argument("--templates", nargs="+", default=["\n{question}"], help="decoder.question_template values")
    ap.add_argument("--schemes", nargs="+", default=["consecutive"], help="ask.position_scheme values")
    ap.add_argument("--min-score-ratios", type=float, nargs="+", default=[0.0], help="ask.min_score_ratio values")
    ap.add_argument("--rag", action="store_true", help="also score the RAG baseline at each top-k")
    ap.add_argument("--config", help="engram.toml for the service (e.g. [encoder] kv_dtype)")
    args = ap.parse_args()
    cfg = EngramConfig.load(args.config)
    cfg.cluster.dedup_scope = "cluster"  # one tenant: haystack segments are shared across the case namespaces
    cfg.server.metrics_port = None
    cfg.shard.data_dir = tempfile.mkdtemp(prefix="engram-sweep-")
    rng = random.Random(0)
    with BackgroundServer(cfg) as srv, EngramClient(srv.address, timeout=3600) as c:
        cases = []  # (length, namespace, question, correct(answer) -> bool, max_new_tokens)
        hay = bench.Haystack("niah", srv.engine.tokenizer, 2048) if args.task == "niah" else None
        for n in args.lengths:
            for t in range(args.trials):
                ns = f"{args.task}-{n}-{t}"
                if hay is None:
                    key, depth = rng.randint(10000, 99999), rng.random()
                    c.write([("doc", passkey_context(n, depth, key, srv.engine.tokenizer))], namespace=ns)
                    cases.append((n, ns, PASSKEY_QUESTION, lambda a, key=key: first_integer(a) == key, 8))
                else:
                    case = bench.make_case("niah", "", n, t / max(1, args.trials - 1), t, rng)
                    c.write(hay.documents(n, case.needles), namespace=ns)
                    cases.append((n, ns, case.question, lambda a, case=case: bench.score(case, a) == 1.0, 20))
        print(
            f"| tokens | positions | template | top-k | +following | order | min score ratio | {args.task} |"
            + (" RAG |" if args.rag else "")
            + "\n|---|---|---|---|---|---|---|---|"
            + ("---|" if args.rag else "")
        )
        for n in args.lengths:
            mine = [x for x in cases if x[0] == n]
            for scheme, tpl, k, nb, order, ratio in itertools.product(
                args.schemes, args.templates, args.top_k, args.neighbors, args.orders, args.min_score_ratios
            ):
                srv.engine.cfg.ask.neighbors, srv.engine.cfg.ask.block_order = nb, order
                srv.engine.cfg.ask.min_score_ratio = ratio
                ray.get(srv.engine.decoder.set_options.remote(tpl, scheme))
                ok = sum(right(c.ask(q, namespace=ns, top_k=k, max_new_tokens=m).answer) for _, ns, q, right, m in mine)
                rag = ""
                if args.rag:
                    r = sum(
                        right(c.ask(q, namespace=ns, top_k=k, max_new_tokens=m, mode="rag").answer)
                        for _, ns, q, right, m in mine
                    )
                    rag = f" {r}/{len(mine)} |"
                print(
                    f"| {n} | {scheme} | {tpl!r} | {k} | {nb} | {order} | {ratio} | {ok}/{len(mine)} |{rag}", flush=True
                )


if __name__ == "__main__":
    main()
