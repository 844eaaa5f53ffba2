"""`engram bench passkey|niah|ruler`: long-context benchmarks driven over gRPC against the real service, with the
baselines on the same decoder in the same run (BRIEF §5).

For every (length, depth, trial) case a context is written into its own namespace and asked three ways:
  engram — Ask: the decoder attends to the retrieved chunks' stored KV blocks;
  rag    — Ask(mode="rag"): the same retrieved chunks' text prefilled again as the prompt;
  full   — the whole context prefilled by this process's copy of the decoder, where it fits the window.
Per-stage truth: recall@k of the needle chunks (Read), and `oracle` — the decoder given the needle's own chunk
KV (encoded here exactly as the service encodes it) — so a miss is attributed to retrieval or to the decoder.

Contexts are written as documents of `--segment` tokens. The haystack repeats with a period that is a whole
number of segments, so its segments are identical across cases and depths and the service's content
de-duplication encodes each distinct segment once; only the needle's segments are new in each case.
Lengths take k = 1,000 and M = 1,000,000 tokens.
"""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .haystack import (
    NIAH_NEEDLE,
    NIAH_QUESTION,
    PASSKEY_FILLER,
    PASSKEY_QUESTION,
    essays,
    first_integer,
    passkey_needle,
)

TASKS = ("passkey", "niah", "ruler")
RULER_VARIANTS = ("single", "multikey", "multivalue", "multiquery")
DEFAULT_LENGTHS = ("8k", "32k", "128k", "512k", "1M")


def parse_length(s: str) -> int:
    s = s.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(s[-1:], 1)
    return int(float(s[:-1] if scale > 1 else s) * scale)


@dataclass
class Needle:
    text: str  # inserted on a sentence boundary
    marker: str  # the needle's answer string (for reading the results)
    depth: float


@dataclass
class Case:
    task: str
    length: int
    depth: float
    trial: int
    question: str
    expected: list[str]  # strings the answer must contain (share found = score), or the passkey
    needles: list[Needle]
    results: dict = field(default_factory=dict)


# --- cases -------------------------------------------------------------------------------------------------------
def ruler_question(keys: list[str], variant: str) -> str:
    if variant == "multiquery":
        ks = ", ".join(keys[:-1]) + " and " + keys[-1]
        return (f"What are the special magic numbers for {ks} mentioned in the provided text? "
                f"The special magic numbers for {ks} mentioned in the provided text are")
    if variant == "multivalue":
        return (f"What are all the special magic numbers for {keys[0]} mentioned in the provided text? "
                f"The special magic numbers for {keys[0]} mentioned in the provided text are")
    return (f"What is the special magic number for {keys[0]} mentioned in the provided text? "
            f"The special magic number for {keys[0]} mentioned in the provided text is")


def make_case(task: str, variant: str, length: int, depth: float, trial: int, rng: random.Random) -> Case:
    if task == "passkey":
        key = rng.randint(10_000, 99_999)
        return Case(task, length, depth, trial, PASSKEY_QUESTION, [str(key)], [Needle(passkey_needle(key), str(key), depth)])
    if task == "niah":
        return Case(task, length, depth, trial, NIAH_QUESTION, ["sandwich", "dolores park"],
                    [Needle(NIAH_NEEDLE + " ", "Dolores Park", depth)])
    def magic(key: str, value: str, d: float) -> Needle:
        return Needle(f"One of the special magic numbers for {key} is: {value}. ", value, d)

    def value() -> str:
        return str(rng.randint(1_000_000, 9_999_999))

    keys = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(4)]
    others = [rng.random() for _ in range(3)]
    if variant == "single":
        v = value()
        needles, expected = [magic(keys[0], v, depth)], [v]
    elif variant == "multikey":  # the target and 3 distractors with other UUID keys
        vs = [value() for _ in range(4)]
        needles = [magic(keys[0], vs[0], depth)] + [magic(k, v, d) for k, v, d in zip(keys[1:], vs[1:], others)]
        expected = [vs[0]]
    elif variant == "multivalue":  # 4 values for one key, all required
        vs = [value() for _ in range(4)]
        needles = [magic(keys[0], v, d) for v, d in zip(vs, [depth, *others])]
        expected = vs
    else:  # multiquery: 4 keys asked at once
        vs = [value() for _ in range(4)]
        needles = [magic(k, v, d) for k, v, d in zip(keys, vs, [depth, *others])]
        expected = vs
    return Case(f"ruler-{variant}", length, depth, trial, ruler_question(keys, variant), expected, needles)


def score(case: Case, answer: str) -> float:
    if case.task == "passkey":
        return float(first_integer(answer) == int(case.expected[0]))
    a = answer.lower()
    if case.task == "niah":
        return float(all(e in a for e in case.expected))
    return sum(e in a for e in case.expected) / len(case.expected)


# --- contexts ----------------------------------------------------------------------------------------------------
class Haystack:
    """Segment texts of a periodic haystack; segment j of any length is the same text in every case."""

    def __init__(self, task: str, tokenizer, segment: int):
        self.tok, self.segment = tokenizer, segment
        if task == "passkey":
            per = len(tokenizer(PASSKEY_FILLER * 50, add_special_tokens=False).input_ids) / 50
            self.period = [PASSKEY_FILLER * max(1, round(segment / per))]
        else:
            ids = tokenizer(essays(), add_special_tokens=False).input_ids
            n = len(ids) // segment
            self.period = [tokenizer.decode(ids[i * segment : (i + 1) * segment]) for i in range(n)]
        self.period_ids = [tokenizer(t, add_special_tokens=False).input_ids for t in self.period]

    def documents(self, length: int, needles: list[Needle]) -> list[tuple[str, str]]:
        """Haystack segments of `length` tokens in all (the last one cut short), needles inserted."""
        texts, total, j = [], 0, 0
        while total < length:
            ids = self.period_ids[j % len(self.period)]
            if total + len(ids) <= length:
                texts.append(self.period[j % len(self.period)])
            else:  # the same cut in every case of this length, so it too is encoded once
                ids = ids[: length - total]
                texts.append(self.tok.decode(ids))
            total += len(ids)
            j += 1
        by_segment: dict[int, list[Needle]] = {}
        for n in needles:
            by_segment.setdefault(min(int(n.depth * len(texts)), len(texts) - 1), []).append(n)
        for j, ns in by_segment.items():
            text = texts[j]
            for n in sorted(ns, key=lambda n: -n.depth):  # deepest first: earlier offsets stay valid
                frac = n.depth * len(texts) - j
                at = int(min(max(frac, 0.0), 1.0) * len(text))
                end = text.rfind(". ", 0, at)
                at = 0 if end < 0 else end + 2
                text = text[:at] + n.text + text[at:]
            texts[j] = text
        return [(f"seg-{j:06d}", t) for j, t in enumerate(texts)]


# --- local decoder (oracle and full-context baselines) -----------------------------------------------------------
class LocalDecoder:
    def __init__(self, cfg):
        import torch

        from ..decoder import kv as kvlib
        from ..decoder.model import load

        torch.set_num_threads(os.cpu_count() or 1)
        self.cfg, self.kv = cfg, kvlib
        self.model, self.tok = load(cfg.decoder)
        self.layout = kvlib.KVLayout.of(self.model, cfg.encoder.chunk_tokens, cfg.encoder.keep_tokens,
                                         cfg.encoder.kv_dtype)
        self.decoder = kvlib.MemoryDecoder(self.model, self.tok, cfg.decoder.question_template,
                                           cfg.ask.position_scheme, cfg.encoder.kv_dtype)
        self.window = int(self.model.config.max_position_embeddings)

    def needle_chunks(self, documents: list[tuple[str, str]], needles: list[Needle]) -> list[list[tuple]]:
        """Per needle, the chunks its sentence overlaps as (document, seq, token ids, context ids), cut exactly as
        the service cuts documents."""
        t, ctx = self.cfg.encoder.chunk_tokens, self.cfg.encoder.context_tokens
        out: list[list[tuple]] = [[] for _ in needles]
        for doc, text in documents:
            spans = [(k, i, i + len(n.text.strip())) for k, n in enumerate(needles)
                     if (i := text.find(n.text.strip())) >= 0]
            if not spans:
                continue
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = enc.input_ids, enc.offset_mapping
            for k, start, end in spans:
                for c in sorted({j // t for j, (a, b) in enumerate(offsets) if a < end and b > start}):
                    out[k].append((doc, c, ids[c * t : (c + 1) * t], ids[max(0, c * t - ctx) : c * t]))
        return out

    def oracle(self, question: str, chunks: list[tuple[list[int], list[int]]], max_new: int) -> str:
        """chunks: (tokens, context), encoded as the service encodes them."""
        enc = self.cfg.encoder
        blocks = self.kv.blocks_of(self.kv.encode_chunks(self.model, self.decoder.sink_id, [c for c, _ in chunks],
                                                         self.layout, enc.span, enc.scorer, [x for _, x in chunks]))
        return self.decoder.answer(question, blocks, enc.chunk_tokens, max_new).text

    def full(self, question: str, documents: list[tuple[str, str]], max_new: int):
        ids = [t for _, text in documents for t in self.tok(text, add_special_tokens=False).input_ids]
        if len(ids) + 64 + max_new > self.window:
            return None
        return self.decoder.answer_text(question, [ids], max_new)


# --- memory ------------------------------------------------------------------------------------------------------
def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory (VmHWM) of this process and of each Ray worker process of this machine, by role."""
    import psutil

    out = {"bench": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if not cmd.startswith("ray::"):
            continue
        try:
            hwm = next(int(ln.split()[1]) for ln in Path(f"/proc/{p.info['pid']}/status").read_text().splitlines()
                       if ln.startswith("VmHWM"))
        except (OSError, StopIteration):
            continue
        role = cmd.split()[0].removeprefix("ray::").split(".")[0]
        out[role] = max(out.get(role, 0.0), hwm / 1024)
    return out


def machine() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "commit": commit}


# --- the run -----------------------------------------------------------------------------------------------------
def measure_storage(client, chunk_tokens: int) -> dict:
    """Stored bytes per token of the distinct blocks (every table, on disk), against the decoder's fp16 KV. A store
    of a few blocks is dominated by fixed costs (table metadata, episodic memories): measure it on thousands."""
    import grpc

    try:  # Stats needs a "*" token where auth is on
        st = client.stats()
    except grpc.RpcError as e:
        print(f"storage not measured: Stats refused ({e.code().name})")
        return {}
    return {"stored_bytes": st.stored_bytes, "distinct_block_tokens": st.blocks * chunk_tokens,
            "bytes_per_distinct_token": st.unique_bytes_per_token,
            "full_fp16_kv_bytes_per_token": st.full_fp16_kv_bytes_per_token}


def run(args) -> dict:
    import torch
    from tqdm import tqdm

    from .cli import _config
    from .client import EngramClient
    from .server import BackgroundServer

    cfg = _config(args)
    cfg.server.metrics_port = None
    rng = random.Random(args.seed)
    lengths = [parse_length(x) for x in args.lengths]
    depths = [i / (args.depths - 1) for i in range(args.depths)] if args.depths > 1 else [0.5]
    variants = args.variants if args.task == "ruler" else [""]
    srv = None
    tmp = None
    if args.server is None:
        import tempfile

        if args.data_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="engram-bench-")
            cfg.shard.data_dir = tmp.name
        srv = BackgroundServer(cfg).start()
        address = srv.address
    else:
        address = args.server
    local = LocalDecoder(cfg)
    hay = Haystack(args.task, local.tok, args.segment)
    run_id = f"{int(time.time())}"
    cases = [make_case(args.task, v, n, d, t, rng) for v in variants for n in lengths for d in depths
             for t in range(args.trials)]
    ingest = {"tokens": 0, "bytes": 0, "seconds": 0.0, "new_blocks": 0}
    storage: dict | None = None  # measured once ({} where Stats is refused)
    t_start = time.perf_counter()
    try:
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
                    a = c.ask(case.question, namespace=ns, top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                              mode="rag" if mode == "rag" else "")
                    r[mode] = {"score": score(case, a.answer), "answer": a.answer, "ttft_s": a.timings.ttft_s,
                               "latency_s": time.perf_counter() - t0, "context_tokens": a.context_tokens}
                got = c.read(case.question, namespace=ns, top_k=args.top_k or cfg.ask.top_k)
                retrieved = {(ch.document_id, ch.seq) for ch in got.chunks}
                per_needle = local.needle_chunks(docs, case.needles)
                # a needle is recalled when a chunk its sentence overlaps is among the top k
                r["recall_at_k"] = sum(any((d, q) in retrieved for d, q, *_ in nc) for nc in per_needle) / len(per_needle)
                chunks = [(ids, ctx) for nc in per_needle for _, _, ids, ctx in nc]
                if chunks:
                    r["oracle"] = {"score": score(case, a := local.oracle(case.question, chunks, args.max_new_tokens)),
                                   "answer": a, "blocks": len(chunks)}
                if not args.no_full:
                    t0 = time.perf_counter()
                    full = local.full(case.question, docs, args.max_new_tokens)
                    if full is not None:
                        r["full"] = {"score": score(case, full.text), "answer": full.text, "ttft_s": full.prefill_s,
                                     "latency_s": time.perf_counter() - t0, "context_tokens": full.context_tokens}
                # Deleted documents' blocks stay on disk until a compaction: with --delete, measure after the
                # first case (a clean store); else after the last, the store holding every block the run wrote.
                if storage is None and (args.delete or case is cases[-1]):
                    storage = measure_storage(c, cfg.encoder.chunk_tokens)
                if args.delete:
                    for doc, _ in docs:
                        c.delete(doc, namespace=ns)
    finally:
        memory = peak_memory_mb()
        if srv is not None:
            srv.stop()
            import ray

            ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
    out = {"task": args.task, "machine": machine(), "settings": {
        "lengths": lengths, "depths": depths, "trials": args.trials, "seed": args.seed, "top_k": args.top_k or cfg.ask.top_k,
        "max_new_tokens": args.max_new_tokens, "segment_tokens": args.segment, "variants": variants,
        "server": args.server or "local", "config": asdict(cfg)},
        "ingest": {**ingest, "tokens_per_s": ingest["tokens"] / max(ingest["seconds"], 1e-9),
                   "mb_per_s": ingest["bytes"] / 1e6 / max(ingest["seconds"], 1e-9)},
        "storage": storage or {}, "peak_memory_mb": memory, "seconds": time.perf_counter() - t_start, "torch_threads": torch.get_num_threads(),
        "summary": summarise(cases), "cases": [asdict(c) for c in cases]}
    return out


def summarise(cases: list[Case]) -> dict:
    """Per task and length: mean score per method, recall@k, median TTFT and latency."""
    import statistics

    out: dict = {}
    for c in cases:
        row = out.setdefault(c.task, {}).setdefault(str(c.length), {"n": 0})
        row["n"] += 1
        for m in ("engram", "rag", "full", "oracle"):
            if m in c.results:
                row.setdefault(m, {"scores": [], "ttft": [], "latency": []})
                row[m]["scores"].append(c.results[m]["score"])
                if "ttft_s" in c.results[m]:
                    row[m]["ttft"].append(c.results[m]["ttft_s"])
                    row[m]["latency"].append(c.results[m]["latency_s"])
        row.setdefault("recall", []).append(c.results.get("recall_at_k", 0.0))
    for task in out.values():
        for row in task.values():
            row["recall_at_k"] = sum(row.pop("recall")) / row["n"]
            for m in ("engram", "rag", "full", "oracle"):
                if m in row:
                    d = row[m]
                    row[m] = {"accuracy": sum(d["scores"]) / len(d["scores"]), "n": len(d["scores"])}
                    if d["ttft"]:
                        row[m]["ttft_s_median"] = statistics.median(d["ttft"])
                        row[m]["latency_s_median"] = statistics.median(d["latency"])
    return out


def heatmap(result: dict, path: str) -> None:
    """Length × depth heat map of accuracy (gkamradt style), one panel per method that ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths, depths = result["settings"]["lengths"], result["settings"]["depths"]
    methods = [m for m in ("engram", "rag", "full", "oracle") if any(m in c["results"] for c in result["cases"])]
    tasks = sorted({c["task"] for c in result["cases"]})
    fig, axes = plt.subplots(len(tasks), len(methods), figsize=(4.2 * len(methods), 3.6 * len(tasks)), squeeze=False)
    for ti, task in enumerate(tasks):
        for mi, m in enumerate(methods):
            grid = np.full((len(depths), len(lengths)), np.nan)
            for li, n in enumerate(lengths):
                for di, d in enumerate(depths):
                    s = [c["results"][m]["score"] for c in result["cases"] if c["task"] == task and c["length"] == n
                         and abs(c["depth"] - d) < 1e-9 and m in c["results"]]
                    if s:
                        grid[di, li] = sum(s) / len(s)
            ax = axes[ti][mi]
            im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
            ax.set_xticks(range(len(lengths)), [f"{n / 1000:g}k" if n < 1e6 else f"{n / 1e6:g}M" for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d * 100:.0f}%" for d in depths])
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("needle depth")
            mean = np.nanmean(grid) if np.isfinite(grid).any() else float("nan")
            ax.set_title(f"{task}: {m} (mean {mean:.2f})", fontsize=9)
    fig.subplots_adjust(wspace=0.35, hspace=0.45)
    fig.colorbar(im, ax=axes, shrink=0.8, label="accuracy")
    fig.savefig(path, dpi=110, bbox_inches="tight")


def print_summary(result: dict) -> None:
    print(f"\n{'task':<18} {'length':>9} {'n':>3} {'engram':>7} {'rag':>6} {'full':>6} {'oracle':>7} {'recall@k':>9} "
          f"{'TTFT eng':>9} {'TTFT rag':>9} {'TTFT full':>9}")
    def acc(r: dict, m: str) -> str:
        return f"{r[m]['accuracy']:.2f}" if m in r else "-"

    def ttft(r: dict, m: str) -> str:
        return f"{r[m]['ttft_s_median']:.2f}" if m in r and "ttft_s_median" in r[m] else "-"

    for task, rows in result["summary"].items():
        for n, r in rows.items():
            print(f"{task:<18} {int(n):>9,} {r['n']:>3} {acc(r, 'engram'):>7} {acc(r, 'rag'):>6} {acc(r, 'full'):>6} "
                  f"{acc(r, 'oracle'):>7} {r['recall_at_k']:>9.2f} {ttft(r, 'engram'):>9} {ttft(r, 'rag'):>9} "
                  f"{ttft(r, 'full'):>9}")
    i = result["ingest"]
    print(f"ingest: {i['tokens']:,} tokens in {i['seconds']:.1f} s = {i['tokens_per_s']:,.0f} tokens/s, "
          f"{i['mb_per_s']:.3f} MB/s over gRPC ({i['new_blocks']:,} blocks encoded; the rest de-duplicated)")
    if (st := result["storage"]) and st["bytes_per_distinct_token"]:
        print(f"stored: {st['bytes_per_distinct_token']:,.0f} bytes per token of the distinct blocks (all tables, on disk) vs "
              f"{st['full_fp16_kv_bytes_per_token']:,.0f} for the decoder's full fp16 KV "
              f"({st['full_fp16_kv_bytes_per_token'] / max(st['bytes_per_distinct_token'], 1e-9):.1f}x smaller)")
    print("peak RSS MB: " + ", ".join(f"{k} {v:,.0f}" for k, v in result["peak_memory_mb"].items()))


def cmd_bench(args) -> int:
    result = run(args)
    out = Path(args.out or f"bench/results/{args.task}")
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=1, default=str))
    heatmap(result, f"{out}.png")
    print_summary(result)
    print(f"wrote {out}.json and {out}.png")
    return 0


def add_parser(sub, serve_args) -> None:
    sp = sub.add_parser("bench", help="passkey / NIAH / RULER over gRPC with RAG and full-context baselines")
    serve_args(sp)
    sp.add_argument("task", choices=TASKS)
    sp.add_argument("--server", help="host:port of a running server (default: start a local one)")
    sp.add_argument("--token", default=os.environ.get("ENGRAM_TOKEN"))
    sp.add_argument("--lengths", nargs="+", default=list(DEFAULT_LENGTHS), help="e.g. 8k 32k 128k 512k 1M 10M")
    sp.add_argument("--depths", type=int, default=10, help="needle depths, evenly spaced over 0-100%%")
    sp.add_argument("--trials", type=int, default=1)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--variants", nargs="+", default=list(RULER_VARIANTS), choices=RULER_VARIANTS)
    sp.add_argument("--top-k", type=int, default=0, help="0 = the server's ask.top_k")
    sp.add_argument("--max-new-tokens", type=int, default=32)
    sp.add_argument("--segment", type=int, default=2048, help="tokens per written document")
    sp.add_argument("--no-full", action="store_true", help="skip the full-context baseline")
    sp.add_argument("--delete", action="store_true", help="delete each case's documents after it")
    sp.add_argument("--out", help="path prefix for .json and .png (default bench/results/<task>)")
    sp.set_defaults(fn=cmd_bench)
