"""When does a client see the first token? Streamed (gRPC AskStream; the OpenAI-compatible HTTP API through the
official `openai` client, stream=True) against the time to first token the server reports, and against waiting for
the whole answer (unary Ask, HTTP without stream) — one running service, the NIAH essays with the needle, each ask
asked once per way, the ways interleaved so drift hits them alike.

    python bench/stream_ttft.py --tokens 16000 --asks 10 --out bench/results/stream_ttft
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

QUESTIONS = [
    "What is the best thing to do in San Francisco? The best thing to do in San Francisco is",
    "What should a startup founder do first?",
    "Why do programmers like Lisp?",
    "What makes a good essay?",
    "How do you get startup ideas?",
    "What did the author say about wealth?",
    "Why is it hard to do good work?",
    "What is the best thing to do in San Francisco?",
    "What is a hacker?",
    "How should you spend your time in college?",
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16000)
    p.add_argument("--asks", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", default="bench/results/stream_ttft")
    args = p.parse_args()

    import openai

    from engram.coordinator.background import BackgroundServer
    from engram.coordinator.client import EngramClient
    from engram.coordinator.config import EngramConfig
    from engram.decoder.model import load_tokenizer
    from engram.evals.haystack import niah_context

    cfg = EngramConfig()
    cfg.cluster.num_cpus = 2
    cfg.shard.data_dir = tempfile.mkdtemp(prefix="engram-ttft-")
    cfg.server.metrics_port = -1
    text = niah_context(args.tokens, 0.5, load_tokenizer(cfg.decoder))
    rows = []
    with BackgroundServer(cfg) as srv, EngramClient(srv.address, timeout=600) as c:
        c.write([("essays", text)], namespace="bench")
        oai = openai.OpenAI(base_url=srv.http_url, api_key="-", max_retries=0, timeout=600)
        n = args.max_new_tokens
        for i in range(args.asks):
            q = QUESTIONS[i % len(QUESTIONS)]
            row = {"question": q}
            t0 = time.perf_counter()
            r = c.ask(q, namespace="bench", max_new_tokens=n)
            row["grpc_unary"] = {"total_s": time.perf_counter() - t0, "reported_ttft_s": r.timings.ttft_s}
            t0, first = time.perf_counter(), None
            for event in c.ask_stream(q, namespace="bench", max_new_tokens=n):
                if event.text and first is None:
                    first = time.perf_counter() - t0
                if event.HasField("reply"):
                    reported = event.reply.timings.ttft_s
            row["grpc_stream"] = {
                "first_token_s": first,
                "reported_ttft_s": reported,
                "total_s": time.perf_counter() - t0,
            }
            msgs = [{"role": "user", "content": q}]
            t0, first = time.perf_counter(), None
            for chunk in oai.chat.completions.create(model="bench", messages=msgs, max_tokens=n, stream=True):
                if chunk.choices and chunk.choices[0].delta.content and first is None:
                    first = time.perf_counter() - t0
                if chunk.choices and chunk.choices[0].finish_reason:
                    reported = chunk.model_extra["engram"]["timings"]["ttft_s"]
            row["http_stream"] = {
                "first_token_s": first,
                "reported_ttft_s": reported,
                "total_s": time.perf_counter() - t0,
            }
            t0 = time.perf_counter()
            whole = oai.chat.completions.create(model="bench", messages=msgs, max_tokens=n)
            row["http_unary"] = {
                "total_s": time.perf_counter() - t0,
                "reported_ttft_s": whole.model_extra["engram"]["timings"]["ttft_s"],
            }
            rows.append(row)
            print(json.dumps(row))

    def med(way: str, key: str) -> float:
        return statistics.median(r[way][key] for r in rows if r[way].get(key) is not None)

    summary = {
        way: {k: med(way, k) for k in ("first_token_s", "reported_ttft_s", "total_s") if k in rows[0][way]}
        for way in ("grpc_unary", "grpc_stream", "http_stream", "http_unary")
    }
    out = {
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
        "settings": vars(args),
        "summary": summary,
        "rows": rows,
    }
    with open(args.out + ".json", "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
