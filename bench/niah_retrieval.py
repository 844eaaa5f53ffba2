"""NIAH at ~133k tokens: rank of the needle chunk under whole-chunk vs window latents, and decoder accuracy
by number of blocks, block order and neighbour expansion, on the real retrieved chunks.

    .venv/bin/python bench/niah_retrieval.py [--tokens 133000] [--depths 0.2 0.5 0.8]
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from engram.decoder import blocks as kv
from engram.decoder.generate import MemoryDecoder
from engram.decoder.layout import BlockLayout
from engram.decoder.model import DecoderConfig, load
from engram.evals.haystack import NIAH_QUESTION, niah_context
from engram.workers.embedder import load_embedder

T = 128


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=133_000)
    ap.add_argument("--depths", type=float, nargs="+", default=[0.2, 0.5, 0.8])
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model, tok = load(DecoderConfig())
    emb = load_embedder("minilm")
    layout = BlockLayout.of(model.config, T, 0)
    dec = MemoryDecoder(model, tok)
    q = emb.encode([NIAH_QUESTION], normalize_embeddings=True)[0]
    results: dict[tuple, list[bool]] = {}
    for depth in args.depths:
        ids = tok(niah_context(args.tokens, depth, tok), add_special_tokens=False).input_ids
        chunks = [ids[i : i + T] for i in range(0, len(ids), T)]
        needle = next(i for i, c in enumerate(chunks) if "Dolores" in tok.decode(c))
        whole = emb.encode(tok.batch_decode(chunks), batch_size=64, normalize_embeddings=True) @ q
        wins = (
            emb.encode(
                [tok.decode(c[s : s + 64]) for c in chunks for s in (0, 32, 64)],
                batch_size=64,
                normalize_embeddings=True,
            ).reshape(len(chunks), 3, -1)
            @ q
        )
        best = wins.max(1)
        print(
            f"depth {depth}: {len(ids)} tokens, needle chunk {needle}; rank by whole-chunk latent "
            f"{int((whole > whole[needle]).sum()) + 1}, by 64-token windows {int((best > best[needle]).sum()) + 1}"
        )
        top = list(np.argsort(-best)[:8])
        sel_all = sorted(set(top) | {i + 1 for i in top if i + 1 < len(chunks)})
        blk = dict(
            zip(sel_all, kv.blocks_of(kv.encode_chunks(model, dec.sink_id, [chunks[i] for i in sel_all], layout)))
        )
        for n in (1, 2, 4, 8):
            hits = top[:n]
            for nb in (0, 1):
                chosen = sorted(set(hits) | ({i + 1 for i in hits if i + 1 < len(chunks)} if nb else set()))
                for order in ("document", "score"):
                    if order == "document":
                        seq = chosen
                    else:  # runs of consecutive chunks, best run last
                        runs, cur = [], []
                        for i in chosen:
                            if cur and cur[-1] + 1 != i:
                                runs.append(cur)
                                cur = []
                            cur.append(i)
                        runs.append(cur)
                        runs.sort(key=lambda r: max(best[i] for i in r))
                        seq = [i for r in runs for i in r]
                    a = dec.answer(NIAH_QUESTION, [blk[i] for i in seq], T, 20).text.lower()
                    results.setdefault((n, nb, order), []).append("sandwich" in a and "dolores" in a)
    print("\n| top-k | +following chunk | order | NIAH correct |\n|---|---|---|---|")
    for (n, nb, order), oks in results.items():
        print(f"| {n} | {'yes' if nb else 'no'} | {order} | {sum(oks)}/{len(oks)} |")


if __name__ == "__main__":
    main()
