"""Episodic memory recall against load: least squares (Larimar) vs Hopfield (softmax attention) read modes.

One memory of K rows (the shard's default K = 256, C = 384) holds N items, N/K from 0.25 to 4. Each item is
queried with a noisy copy at a set cosine with the item (0.8, 0.5, 0.3: a real question's latent sits at
0.3-0.6 from its chunk's). Two scores per mode:
  identification — the item the shard would rank first (argmax_i <scorer(q), ξ_i>) is the queried one;
  reconstruction — cos(readout, queried item), the readout as a recalled pattern.
Items are random unit vectors and, on a second panel, all-MiniLM-L6-v2 latents of Paul Graham essay sentences
(correlated, like the shard's real items).

    python bench/episodic_recall.py --out bench/results/episodic_recall
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from engram.workers.episodic import EpisodicConfig, HopfieldMemory, reference_pinv, write_one_shot

LOADS = (0.25, 0.5, 1.0, 2.0, 4.0)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def essay_latents(n: int) -> np.ndarray:
    from engram.evals.haystack import essays
    from engram.workers.embedder import load_embedder
    from engram.workers.encoder import EncoderConfig

    sentences = [s.strip() for s in essays().replace("\n", " ").split(". ") if len(s.strip()) > 40]
    return np.asarray(
        load_embedder(EncoderConfig().embedder).encode(sentences[:n], batch_size=64, normalize_embeddings=True),
        dtype=np.float64,
    )


def measure(items: np.ndarray, cfg: EpisodicConfig, betas: list[float], cos: float, rng: np.random.Generator) -> dict:
    pinv = reference_pinv(cfg)
    out = {}
    for load in LOADS:
        n = int(load * cfg.rows)
        z = items[rng.choice(len(items), n, replace=False)]
        noise = rng.standard_normal(z.shape)
        noise = unit(noise - np.sum(noise * z, 1, keepdims=True) * z)  # orthogonal to the item
        q = cos * z + np.sqrt(1 - cos**2) * noise  # unit, cos(q, item) = cos
        mems = {"least_squares": write_one_shot(z, pinv, cfg.ridge)}
        for beta in betas:
            mems[f"hopfield β={beta:g}"] = HopfieldMemory(cfg.dim, beta)
            mems[f"hopfield β={beta:g}"].write(z)
        row = {}
        for name, mem in mems.items():
            readouts = mem.read(q)
            scorers = np.stack([mem.scorer(x, r) for x, r in zip(q, readouts)])  # [N, C]
            ident = float(np.mean(np.argmax(scorers @ z.T, axis=1) == np.arange(n)))
            recon = float(np.mean(np.sum(unit(readouts) * z, axis=1)))
            row[name] = {"identification": ident, "reconstruction": recon}
        out[str(load)] = row
    return out


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(4 * len(results), 7), squeeze=False)
    for col, (items, table) in enumerate(results.items()):
        loads = [float(x) for x in table]
        for r, metric in enumerate(("identification", "reconstruction")):
            ax = axes[r][col]
            for name in next(iter(table.values())):
                ax.plot(loads, [table[str(x)][name][metric] for x in loads], marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("stored items per memory row (N/K), K = 256")
            ax.set_ylabel(metric + (" (top-1)" if metric == "identification" else " cos(readout, item)"))
            ax.set_title(items, fontsize=9)
            ax.set_ylim(0, 1.02)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--betas", type=float, nargs="+", default=[8.0, 32.0, 128.0])
    p.add_argument("--cos", type=float, nargs="+", default=[0.8, 0.5, 0.3], help="query-item cosines")
    p.add_argument("--random-only", action="store_true", help="skip the MiniLM essay latents")
    p.add_argument("--out", default="bench/results/episodic_recall")
    args = p.parse_args(argv)
    cfg = EpisodicConfig()
    rng = np.random.default_rng(0)
    n_max = int(max(LOADS) * cfg.rows)
    sets = {"random": unit(rng.standard_normal((n_max, cfg.dim)))}
    if not args.random_only:
        sets["MiniLM essay-sentence"] = essay_latents(n_max)
    results = {
        f"{name} items, query cos {c:g}": measure(items, cfg, args.betas, c, rng)
        for name, items in sets.items()
        for c in args.cos
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"rows": cfg.rows, "dim": cfg.dim, "results": results}, indent=1))
    plot(results, args.out + ".png")
    for items, table in results.items():
        print(f"\n{items} (K={cfg.rows}, C={cfg.dim}); identification / reconstruction")
        names = list(next(iter(table.values())))
        print("N/K   " + "".join(f"{n:>22s}" for n in names))
        for load, row in table.items():
            print(
                f"{float(load):<6g}"
                + "".join(f"{row[n]['identification']:>13.3f} / {row[n]['reconstruction']:.3f}" for n in names)
            )
    return results


if __name__ == "__main__":
    main()
