"""What one large document costs the coordinator in RAM before encoding starts: the document's parts as they
arrive over gRPC, its text, its token ids and its chunks — the old way ("joined": parts joined, then decoded, the
whole text tokenised at once, ids as a Python list) against the server's way ("pieces": each part decoded as it
arrives, the text tokenised a 1 MiB piece at a time at token-neutral cuts, ids as int32, chunks as views).

Each variant runs in a fresh process and reports its peak RSS above the baseline (tokenizer loaded, document
bytes already in memory as 1 MiB parts, as gRPC hands them over).

    python bench/doc_memory.py --mib 64
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import os
import resource
import subprocess
import sys

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(variant: str, mib: int) -> dict:
    from engram.coordinator import routing
    from engram.decoder.model import DecoderConfig, load_tokenizer
    from engram.evals.haystack import essays

    tokenizer = load_tokenizer(DecoderConfig())
    base = essays().encode()
    data = (base * (mib * 2**20 // len(base) + 1))[: mib * 2**20]
    parts = [data[i : i + 2**20] for i in range(0, len(data), 2**20)]  # what the Write stream delivers
    del data
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if variant == "joined":  # before: join the parts, decode, a list of Python ints
        text = b"".join(parts).decode("utf-8")
        parts.clear()
        ids = tokenizer(text, add_special_tokens=False).input_ids
        chunks = [ids[o : o + 128] for o in range(0, len(ids), 128)]  # list slices: copies
        held = sys.getsizeof(ids) + sum(sys.getsizeof(t) for t in ids[:1000]) * len(ids) // 1000
    else:  # after: decode part by part, tokenise piece by piece, int32 ids, chunks are views
        decoder = codecs.getincrementaldecoder("utf-8")()
        pieces = []
        while parts:
            pieces.append(decoder.decode(parts.pop(0)))
        text = "".join(pieces)
        pieces.clear()
        ids = routing.tokenize(tokenizer, text)
        chunks = routing.split(ids, 128, 0)
        held = ids.nbytes
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "variant": variant,
        "mib": mib,
        "tokens": len(ids),
        "ids": hashlib.blake2b(np.asarray(ids, dtype=np.int32).tobytes(), digest_size=8).hexdigest(),
        "chunks": len(chunks),
        "peak_above_baseline_mb": (peak - before) / 1024,
        "ids_held_mb": held / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--variant", choices=["joined", "pieces"])
    ap.add_argument("--out", default="bench/results/doc_memory.json")
    a = ap.parse_args()
    if a.variant:
        print(json.dumps(run(a.variant, a.mib)))
        return
    rows = []
    for variant in ("joined", "pieces"):
        out = subprocess.run(
            [sys.executable, __file__, "--variant", variant, "--mib", str(a.mib)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1])
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
