"""What a benchmark run records and prints: the machine, peak memory, stored bytes, per-length summaries and
the length x depth heat map."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .cases import Case


@contextmanager
def bench_service(cfg, server: str | None, data_dir: str | None) -> Iterator[tuple[str, dict[str, float]]]:
    """-> (the address to drive, peak memory per process, filled on leaving). `server` None: a local service (Ray +
    gRPC in this process; a temporary data dir unless `data_dir`), stopped on leaving."""
    import tempfile

    srv = tmp = None
    memory: dict[str, float] = {}
    try:
        if server is None:
            if data_dir is None:
                tmp = tempfile.TemporaryDirectory(prefix="engram-bench-")
                cfg.shard.data_dir = tmp.name
            from ..coordinator.background import BackgroundServer

            srv = BackgroundServer(cfg).start()
        yield (srv.address if srv is not None else server), memory
    finally:
        memory.update(peak_memory_mb())  # while the actors are alive
        if srv is not None:
            import ray

            srv.stop()
            ray.shutdown()
        if tmp is not None:
            tmp.cleanup()


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory (VmHWM) of this process and of each Ray worker process of this machine, by role."""
    import psutil

    out = {"bench": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if not cmd.startswith("ray::"):
            continue
        try:
            hwm = next(
                int(ln.split()[1])
                for ln in Path(f"/proc/{p.info['pid']}/status").read_text().splitlines()
                if ln.startswith("VmHWM")
            )
        except (OSError, StopIteration):
            continue
        role = cmd.split()[0].removeprefix("ray::").split(".")[0]
        out[role] = max(out.get(role, 0.0), hwm / 1024)
    return out


def machine() -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "commit": commit,
    }


def measure_storage(client, chunk_tokens: int) -> dict:
    """Stored bytes per token of the distinct blocks (every table, on disk), against the decoder's fp16 KV. A store
    of a few blocks is dominated by fixed costs (table metadata, episodic memories): measure it on thousands."""
    import grpc

    try:  # Stats needs a "*" token where auth is on
        st = client.stats()
    except grpc.RpcError as e:
        print(f"storage not measured: Stats refused ({e.code().name})")
        return {}
    return {
        "stored_bytes": st.stored_bytes,
        "distinct_block_tokens": st.blocks * chunk_tokens,
        "bytes_per_distinct_token": st.unique_bytes_per_token,
        "full_fp16_kv_bytes_per_token": st.full_fp16_kv_bytes_per_token,
    }


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
                    s = [
                        c["results"][m]["score"]
                        for c in result["cases"]
                        if c["task"] == task and c["length"] == n and abs(c["depth"] - d) < 1e-9 and m in c["results"]
                    ]
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
    print(
        f"\n{'task':<18} {'length':>9} {'n':>3} {'engram':>7} {'rag':>6} {'full':>6} {'oracle':>7} {'recall@k':>9} "
        f"{'TTFT eng':>9} {'TTFT rag':>9} {'TTFT full':>9}"
    )

    def acc(r: dict, m: str) -> str:
        return f"{r[m]['accuracy']:.2f}" if m in r else "-"

    def ttft(r: dict, m: str) -> str:
        return f"{r[m]['ttft_s_median']:.2f}" if m in r and "ttft_s_median" in r[m] else "-"

    for task, rows in result["summary"].items():
        for n, r in rows.items():
            print(
                f"{task:<18} {int(n):>9,} {r['n']:>3} {acc(r, 'engram'):>7} {acc(r, 'rag'):>6} {acc(r, 'full'):>6} "
                f"{acc(r, 'oracle'):>7} {r['recall_at_k']:>9.2f} {ttft(r, 'engram'):>9} {ttft(r, 'rag'):>9} "
                f"{ttft(r, 'full'):>9}"
            )
    i = result["ingest"]
    print(
        f"ingest: {i['tokens']:,} tokens in {i['seconds']:.1f} s = {i['tokens_per_s']:,.0f} tokens/s, "
        f"{i['mb_per_s']:.3f} MB/s over gRPC ({i['new_blocks']:,} blocks encoded; the rest de-duplicated)"
    )
    if (st := result["storage"]) and st["bytes_per_distinct_token"]:
        print(
            f"stored: {st['bytes_per_distinct_token']:,.0f} bytes per token of the distinct blocks "
            "(all tables, on disk) vs "
            f"{st['full_fp16_kv_bytes_per_token']:,.0f} for the decoder's full fp16 KV "
            f"({st['full_fp16_kv_bytes_per_token'] / max(st['bytes_per_distinct_token'], 1e-9):.1f}x smaller)"
        )
    print("peak RSS MB: " + ", ".join(f"{k} {v:,.0f}" for k, v in result["peak_memory_mb"].items()))
