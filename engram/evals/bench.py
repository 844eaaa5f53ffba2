"""`engram bench passkey|niah|ruler`: long-context benchmarks driven over gRPC against the real service, with the
baselines on the same decoder in the same run (BRIEF §5).

For every (length, depth, trial) case a context is written into its own namespace and asked three ways:
  engram — Ask: the decoder attends to the retrieved chunks' stored KV blocks;
  rag    — Ask(mode="rag"): the same retrieved chunks' text prefilled again as the prompt;
  full   — the whole context prefilled by this process's copy of the decoder, where it fits the window.
Per-stage truth: recall@k of the needle chunks (Read), and `oracle` — the decoder given the needle's own chunk
KV (encoded here exactly as the service encodes it) — so a miss is attributed to retrieval or to the decoder.
Cases and haystacks: cases.py; the oracle and full-context decoder: local_decoder.py; summaries: report.py.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path

from .cases import Haystack, make_case, parse_length, score
from .local_decoder import LocalDecoder
from .report import bench_service, heatmap, machine, measure_storage, print_summary, summarise


def run(args) -> dict:
    import torch
    from tqdm import tqdm

    from ..coordinator.client import EngramClient
    from ..coordinator.config import from_args

    cfg = from_args(args)
    cfg.server.metrics_port = None
    rng = random.Random(args.seed)
    lengths = [parse_length(x) for x in args.lengths]
    depths = [i / (args.depths - 1) for i in range(args.depths)] if args.depths > 1 else [0.5]
    variants = args.variants if args.task == "ruler" else [""]
    # one tenant, many case namespaces: by default identical haystack segments are shared across them
    cfg.cluster.dedup_scope = args.dedup_scope
    local = LocalDecoder(cfg)
    hay = Haystack(args.task, local.tok, args.segment)
    run_id = f"{int(time.time())}"
    cases = [
        make_case(args.task, v, n, d, t, rng)
        for v in variants
        for n in lengths
        for d in depths
        for t in range(args.trials)
    ]
    ingest = {"tokens": 0, "bytes": 0, "seconds": 0.0, "new_blocks": 0}
    storage: dict | None = None  # measured once ({} where Stats is refused)
    t_start = time.perf_counter()
    with bench_service(cfg, args.server, args.data_dir) as (address, memory):
        with EngramClient(address, token=args.token, timeout=7200) as c:
            for case in tqdm(cases, desc=f"engram bench {args.task}", unit="case"):
                ns = f"bench-{run_id}-{case.task}-{case.length}-{round(case.depth * 100)}-{case.trial}"
                docs = hay.documents(case.length, case.needles)
                t0 = time.perf_counter()
                w = c.write(docs, namespace=ns)
                dt = time.perf_counter() - t0
                ingest["tokens"] += w.tokens
                ingest["bytes"] += sum(len(t.encode()) for _, t in docs)
                ingest["seconds"] += dt
                ingest["new_blocks"] += w.new_blocks
                r = case.results
                r["tokens"], r["write_s"], r["new_blocks"] = w.tokens, dt, w.new_blocks
                for mode in ("engram", "rag"):
                    t0 = time.perf_counter()
                    a = c.ask(
                        case.question,
                        namespace=ns,
                        top_k=args.top_k,
                        max_new_tokens=args.max_new_tokens,
                        mode="rag" if mode == "rag" else "",
                    )
                    r[mode] = {
                        "score": score(case, a.answer),
                        "answer": a.answer,
                        "ttft_s": a.timings.ttft_s,
                        "latency_s": time.perf_counter() - t0,
                        "context_tokens": a.context_tokens,
                    }
                got = c.read(case.question, namespace=ns, top_k=args.top_k or cfg.ask.top_k)
                retrieved = {(ch.document_id, ch.seq) for ch in got.chunks}
                per_needle = local.needle_chunks(docs, case.needles)
                # a needle is recalled when a chunk its sentence overlaps is among the top k
                r["recall_at_k"] = sum(any((d, q) in retrieved for d, q, *_ in nc) for nc in per_needle) / len(
                    per_needle
                )
                chunks = [(ids, ctx) for nc in per_needle for _, _, ids, ctx in nc]
                if chunks:
                    r["oracle"] = {
                        "score": score(case, a := local.oracle(case.question, chunks, args.max_new_tokens)),
                        "answer": a,
                        "blocks": len(chunks),
                    }
                if not args.no_full:
                    t0 = time.perf_counter()
                    full = local.full(case.question, docs, args.max_new_tokens)
                    if full is not None:
                        r["full"] = {
                            "score": score(case, full.text),
                            "answer": full.text,
                            "ttft_s": full.prefill_s,
                            "latency_s": time.perf_counter() - t0,
                            "context_tokens": full.context_tokens,
                        }
                # Deleted documents' blocks stay on disk until a compaction: with --delete, measure after the
                # first case (a clean store); else after the last, the store holding every block the run wrote.
                if storage is None and (args.delete or case is cases[-1]):
                    storage = measure_storage(c, cfg.encoder.chunk_tokens)
                if args.delete:
                    for doc, _ in docs:
                        c.delete(doc, namespace=ns)
    out = {
        "task": args.task,
        "machine": machine(),
        "settings": {
            "lengths": lengths,
            "depths": depths,
            "trials": args.trials,
            "seed": args.seed,
            "top_k": args.top_k or cfg.ask.top_k,
            "max_new_tokens": args.max_new_tokens,
            "segment_tokens": args.segment,
            "variants": variants,
            "server": args.server or "local",
            "config": asdict(cfg),
        },
        "ingest": {
            **ingest,
            "tokens_per_s": ingest["tokens"] / max(ingest["seconds"], 1e-9),
            "mb_per_s": ingest["bytes"] / 1e6 / max(ingest["seconds"], 1e-9),
        },
        "storage": storage or {},
        "peak_memory_mb": memory,
        "seconds": time.perf_counter() - t_start,
        "torch_threads": torch.get_num_threads(),
        "summary": summarise(cases),
        "cases": [asdict(c) for c in cases],
    }
    return out


def cmd_bench(args) -> int:
    result = run(args)
    out = Path(args.out or f"bench/results/{args.task}")
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=1, default=str))
    heatmap(result, f"{out}.png")
    print_summary(result)
    print(f"wrote {out}.json and {out}.png")
    return 0
