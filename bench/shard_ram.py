"""What a shard keeps in RAM per million distinct tokens it owns (issue #15), measured on the shard alone.

One real Shard (real segment store on disk, episodic memories, tantivy lexical index, FAISS vector index) in a
child process of its own, fed the distinct-text haystack of `engram bench distinct` (the installed packages'
docstrings, no text repeats, so every chunk is its own block) cut as the service cuts it, through the calls the
coordinator makes (put_blocks, commit_document). What is not RAM is left out to keep it fast: the K/V layout is
tiny (a block's K/V never stays in RAM: it is written to disk and dropped) and the window latents are random unit
vectors of the real width and count (the RAM they take does not depend on their values; `bench/storage.py` is the
end-to-end run with real encoding through gRPC). The child's private memory (USS) is read at 1/5 of the corpus and
at the end: the slope between the two, per million tokens owned, leaves one-time allocations (libraries, the
tokenizer) out. Then the shard is closed and reopened: restart time and USS after a restart.

    python bench/shard_ram.py --tokens 1000000 --out bench/results/shard_ram
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

from distinct_retrieval import tiny_layout  # bench/: the same retrieval-only layout and blocks
from vector_scaling import synthetic_blocks


def uss() -> int:
    import psutil

    return psutil.Process().memory_full_info().uss


def child(tokens: int, segment: int, config: str | None, queue) -> None:
    import numpy as np

    from engram.coordinator import routing
    from engram.coordinator.config import EngramConfig, block_layout
    from engram.decoder.model import load_tokenizer
    from engram.evals.distinct import corpus
    from engram.workers.shard import Shard

    cfg = EngramConfig.load(config)
    real, e = block_layout(cfg), cfg.encoder
    tok = load_tokenizer(cfg.decoder)
    tiny = tiny_layout(real)
    docs = corpus(tokens, tok, segment)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg.shard.data_dir, cfg.shard.fsync = tmp, False
        shard = Shard(0, cfg.shard, tiny)
        points, owned = [], 0
        t0 = time.perf_counter()
        for d, (name, text) in enumerate(docs):
            ids = routing.tokenize(tok, text)
            chunks = routing.split(ids, e.chunk_tokens, e.context_tokens, e.key_after_tokens)
            n = len(chunks)
            latent = rng.standard_normal((n, real.latents_per_chunk, real.latent_dim)).astype(np.float32)
            latent /= np.linalg.norm(latent, axis=-1, keepdims=True)
            hashes = [routing.chunk_hash(c.tokens, "shard-ram", c.context) for c in chunks]
            texts = [tok.decode(list(c.context) + list(c.tokens)) for c in chunks]
            shard.put_blocks(synthetic_blocks(tiny, hashes, latent, [len(c.tokens) for c in chunks], texts))
            shard.commit_document("ns", name, len(ids), hashes, [c.seq for c in chunks], [c.offset for c in chunks])
            owned += len(ids)
            if (not points and owned >= tokens // 5) or d == len(docs) - 1:
                points.append({"tokens": owned, "uss": uss(), "parts": shard.ram_parts(), "chunks": len(shard.blocks)})
        write_s = time.perf_counter() - t0
        shard.store.close()
        del shard
        t = time.perf_counter()
        shard = Shard(0, cfg.shard, tiny)
        restart_s = time.perf_counter() - t
        queue.put({"points": points, "write_s": write_s, "restart_s": restart_s, "uss_after_restart": uss()})
        shard.store.close()


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--segment", type=int, default=4096, help="tokens per document")
    p.add_argument("--config", default=None)
    p.add_argument("--out", default="")
    a = p.parse_args()
    ctx = mp.get_context("spawn")  # a fresh process: nothing of this one's heap in its USS
    queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(a.tokens, a.segment, a.config, queue))
    proc.start()
    got = queue.get()
    proc.join()
    early, end = got["points"]
    per_m = 1e6 / (end["tokens"] - early["tokens"])
    out = {
        "machine": {"cpus": os.cpu_count()},
        "settings": vars(a),
        "tokens": end["tokens"],
        "chunks": end["chunks"],
        "uss_mb": round(end["uss"] / 1e6, 1),
        "uss_mb_per_m_tokens": round((end["uss"] - early["uss"]) / 1e6 * per_m, 1),
        "parts_mb_per_m_tokens": {
            k: round((end["parts"][k] - early["parts"][k]) / 1e6 * per_m, 1) for k in end["parts"]
        },
        "parts_mb_at_end": {k: round(v / 1e6, 1) for k, v in end["parts"].items()},
        "write_s": round(got["write_s"], 1),
        "restart_s": round(got["restart_s"], 2),
        "uss_mb_after_restart": round(got["uss_after_restart"] / 1e6, 1),
    }
    out["accounted_mb_per_m_tokens"] = round(sum(out["parts_mb_per_m_tokens"].values()), 1)
    print(json.dumps(out, indent=1))
    if a.out:
        Path(a.out + ".json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
