"""`engram load`: N loopback clients mixing writes and asks for T seconds; errors and p50/p99 latencies."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..coordinator.client import EngramClient
from .haystack import PASSKEY_QUESTION, passkey_context


@dataclass
class LoadReport:
    seconds: float
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)  # each ask's server-side timings, by stage

    def summary(self) -> dict:
        out = {"seconds": round(self.seconds, 1), "errors": len(self.errors)}
        for op, lat in self.latencies.items():
            a = np.array(lat)
            out[op] = {
                "count": len(a),
                "p50_s": float(np.percentile(a, 50)) if len(a) else None,
                "p99_s": float(np.percentile(a, 99)) if len(a) else None,
            }
        if self.stages:  # where an ask's time went, as the server measured it (medians): queueing shows here
            out["ask_stages_p50_s"] = {k: round(float(np.median(v)), 3) for k, v in self.stages.items()}
            # the slowest asks' stages, each at its own 99th percentile: which stage the tail comes from
            out["ask_stages_p99_s"] = {k: round(float(np.percentile(v, 99)), 3) for k, v in self.stages.items()}
        return out


def run_load(
    address: str,
    clients: int,
    seconds: float,
    write_share: float = 0.3,
    namespace: str = "load",
    token: str | None = None,
    seed: int = 0,
) -> LoadReport:
    """Each client loops until the deadline: a small unique document write (share `write_share`) or an ask."""
    with EngramClient(address, timeout=600, token=token) as setup:
        tok_len = 2000
        from ..decoder.model import DecoderConfig, load_tokenizer

        setup.write(
            [("base", passkey_context(tok_len, 0.5, 77123, load_tokenizer(DecoderConfig())))],
            namespace=namespace,
            request_id=f"load-base-{seed}",
        )
    report = LoadReport(seconds=seconds)
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with EngramClient(address, timeout=600, token=token) as c:
            n = 0
            while time.perf_counter() < deadline:
                op = "write" if rng.random() < write_share else "ask"
                t0 = time.perf_counter()
                try:
                    if op == "write":
                        doc = f"c{i}-{n}-{seed}"
                        c.write(
                            [(doc, f"Client {i} note {n}: the shelf code is {rng.randint(1000, 9999)}. " * 3)],
                            namespace=namespace,
                            request_id=doc,
                        )
                    else:
                        t = c.ask(PASSKEY_QUESTION, namespace=namespace, max_new_tokens=6).timings
                        with lock:
                            for stage in ("embed_s", "retrieve_s", "fetch_s", "ttft_s", "decode_s", "total_s"):
                                report.stages.setdefault(stage, []).append(getattr(t, stage))
                except Exception as e:
                    with lock:
                        report.errors.append(f"{op}: {e!r}"[:300])
                    continue
                with lock:
                    report.latencies.setdefault(op, []).append(time.perf_counter() - t0)
                n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report.seconds = time.perf_counter() - t0
    return report


def cmd_load(args) -> int:
    import json
    import tempfile

    if args.server:
        rep = run_load(args.server, args.clients, args.seconds, args.write_share, token=args.token)
    else:  # start a local service for the run
        from ..coordinator.background import BackgroundServer
        from ..coordinator.config import from_args

        cfg = from_args(args)
        cfg.shard.data_dir = tempfile.mkdtemp(prefix="engram-load-")
        with BackgroundServer(cfg) as srv:
            rep = run_load(srv.address, args.clients, args.seconds, args.write_share)
    print(json.dumps(rep.summary(), indent=2))
    for e in rep.errors[:5]:
        print("error:", e)
    return 1 if rep.errors else 0
