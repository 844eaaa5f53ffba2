"""`engram bench distinct`: real, never-repeating text with planted facts of several kinds, written once per length
into one namespace over gRPC and asked fact by fact (issue #13).

Per asked fact: the Engram answer, RAG's answer on the same retrieval, the rank of the chunk that holds the answer
in a deep Read (recall@k = rank < k), and the oracle — the decoder given the fact's own chunks, encoded as the
service encodes them. Each miss is put down to one stage: retrieval (the answer's chunk was not in the top k),
composition (it was, and the oracle answers, but Engram did not) or the decoder (even the oracle fails).
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from .cases import parse_length
from .distinct import KINDS, Fact, chunk_of_answer, corpus, make_facts, plant, right
from .local_decoder import LocalDecoder
from .report import bench_service, machine

DEEP = 64  # how deep the Read looks for the answer's chunk (a rank past it counts as DEEP)


def attribute(r: dict, top_k: int) -> str:
    if r["engram"]["score"]:
        return "right"
    if not r.get("answer_read", r["answer_rank"] < top_k):  # the answer's chunk not among the blocks read
        return "retrieval"
    return "composition" if r["oracle"]["score"] else "decoder"


def ask_fact(c, local: LocalDecoder, ns: str, f: Fact, text: str, top_k: int, max_new: int) -> dict:
    t = local.cfg.encoder.chunk_tokens
    ctx = local.cfg.encoder.context_tokens
    fact_chunks, answer_chunks = chunk_of_answer(text, f, local.tok, t)
    r: dict = {"fact_chunks": fact_chunks, "answer_chunks": answer_chunks}
    for mode in ("engram", "rag"):
        t0 = time.perf_counter()
        a = c.ask(f.question, namespace=ns, top_k=top_k, max_new_tokens=max_new, mode="rag" if mode == "rag" else "")
        r[mode] = {
            "score": right(f.kind, f.answer, a.answer),
            "answer": a.answer,
            "ttft_s": a.timings.ttft_s,
            "latency_s": time.perf_counter() - t0,
        }
        if mode == "engram":  # what the decoder read: the top k and the chunks beside them (ask.adjacent_lexical)
            read = [(ch.document_id, ch.seq) for ch in a.chunks]
            r["blocks_read"] = len(read)
            r["answer_read"] = any((f.document, q) in read for q in answer_chunks)
    got = c.read(f.question, namespace=ns, top_k=DEEP)
    ranks = [i for i, ch in enumerate(got.chunks) if ch.document_id == f.document]
    r["answer_rank"] = min([i for i in ranks if got.chunks[i].seq in answer_chunks], default=DEEP)
    r["fact_rank"] = min([i for i in ranks if got.chunks[i].seq in fact_chunks], default=DEEP)
    r["read_s"] = got.timings.retrieve_s
    ids = local.tok(text, add_special_tokens=False).input_ids
    oracle = [(ids[q * t : (q + 1) * t], ids[max(0, q * t - ctx) : q * t]) for q in fact_chunks]
    answer = local.oracle(f.question, oracle, max_new)
    r["oracle"] = {"score": right(f.kind, f.answer, answer), "answer": answer}
    r["stage"] = attribute(r, top_k)
    return r


def summarise(facts: list[Fact], top_k: int) -> dict:
    out: dict = {}
    for kind in (*KINDS, "all"):
        rows = [f.results for f in facts if f.question and (kind == "all" or f.kind == kind)]
        if not rows:
            continue
        out[kind] = {
            "n": len(rows),
            "recall_at_k": sum(r["answer_rank"] < top_k for r in rows) / len(rows),
            "fact_recall_at_k": sum(r["fact_rank"] < top_k for r in rows) / len(rows),
            # among the blocks the decoder read (results from before adjacent chunks: the top k)
            "answer_read": sum(r.get("answer_read", r["answer_rank"] < top_k) for r in rows) / len(rows),
            "blocks_read_mean": statistics.mean(r.get("blocks_read", top_k) for r in rows),
            "engram": sum(r["engram"]["score"] for r in rows) / len(rows),
            "rag": sum(r["rag"]["score"] for r in rows) / len(rows),
            "oracle": sum(r["oracle"]["score"] for r in rows) / len(rows),
            "misses": {s: sum(r["stage"] == s for r in rows) for s in ("retrieval", "composition", "decoder")},
            "ttft_s_median": {m: statistics.median(r[m]["ttft_s"] for r in rows) for m in ("engram", "rag")},
            "retrieve_s_median": statistics.median(r["read_s"] for r in rows),
        }
    return out


def run(args) -> dict:
    from tqdm import tqdm

    from ..coordinator.client import EngramClient
    from ..coordinator.config import from_args

    cfg = from_args(args)
    cfg.server.metrics_port = None
    top_k = args.top_k or cfg.ask.top_k
    local = LocalDecoder(cfg)
    results = []
    t_start = time.perf_counter()
    with bench_service(cfg, args.server, args.data_dir) as (address, memory):
        with EngramClient(address, token=args.token, timeout=7200) as c:
            for length in (parse_length(x) for x in args.lengths):
                rng = random.Random(args.seed)
                docs = corpus(length, local.tok, args.segment)
                facts = make_facts(rng, args.keys, args.distractors, args.per_kind)
                plant(docs, facts, local.tok, cfg.encoder.chunk_tokens, rng)
                ns = f"distinct-{int(time.time())}-{length}"
                t0 = time.perf_counter()
                with tqdm(total=sum(len(t.encode()) for _, t in docs), unit="B", unit_scale=True, desc="write") as bar:
                    w = c.write(docs, namespace=ns, progress=bar.update)
                write_s = time.perf_counter() - t0
                texts = dict(docs)
                for f in tqdm([f for f in facts if f.question], desc=f"ask {length:,} tokens", unit="fact"):
                    f.results = ask_fact(c, local, ns, f, texts[f.document], top_k, args.max_new_tokens)
                results.append(
                    {
                        "length": length,
                        "tokens": w.tokens,
                        "documents": len(docs),
                        "write_s": write_s,
                        "tokens_per_s": w.tokens / write_s,
                        "summary": summarise(facts, top_k),
                        "facts": [asdict(f) for f in facts],
                    }
                )
                if args.delete:
                    for doc, _ in docs:
                        c.delete(doc, namespace=ns)
    return {
        "task": "distinct",
        "machine": machine(),
        "settings": {"top_k": top_k, "seed": args.seed, "doc_tokens": args.segment, "config": asdict(cfg)},
        "peak_memory_mb": memory,
        "seconds": time.perf_counter() - t_start,
        "lengths": results,
    }


def rescore(result: dict) -> dict:
    """Score a result's stored answers again (after a change of what counts as right) and summarise anew."""
    for row in result["lengths"]:
        facts = [Fact(**f) for f in row["facts"]]
        for f in facts:
            if f.question:
                for m in ("engram", "rag", "oracle"):
                    f.results[m]["score"] = right(f.kind, f.answer, f.results[m]["answer"])
                f.results["stage"] = attribute(f.results, result["settings"]["top_k"])
        row["summary"] = summarise(facts, result["settings"]["top_k"])
        row["facts"] = [asdict(f) for f in facts]
    return result


def print_summary(result: dict) -> None:
    k = result["settings"]["top_k"]
    print(
        f"\ndistinct text, top-{k}: recall@k of the answer's chunk | read (blocks) | Engram | RAG | oracle | "
        "misses r/c/d"
    )
    for row in result["lengths"]:
        print(f"{row['length']:,} tokens ({row['tokens_per_s']:.0f} tokens/s ingest)")
        for kind, s in row["summary"].items():
            m = s["misses"]
            print(
                f"  {kind:<12} n={s['n']:<3} recall {s['recall_at_k']:.2f} | read {s['answer_read']:.2f} "
                f"({s['blocks_read_mean']:.1f}) | engram {s['engram']:.2f} | "
                f"rag {s['rag']:.2f} | oracle {s['oracle']:.2f} | {m['retrieval']}/{m['composition']}/{m['decoder']}"
            )


def cmd_distinct(args) -> int:
    result = run(args)
    out = Path(args.out or "bench/results/distinct")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    print_summary(result)
    print(f"wrote {out.with_suffix('.json')}")
    return 0
