"""Value residual stream vs in-context learning (BRIEF §3, Burns, Fukai & Earls, arXiv 2412.15113).

The Reddy (2024) in-context classification task on a 2-layer attention-only transformer with an MLP readout,
trained with and without the value residual stream

    attn_l = softmax(q_l k_lᵀ + mask) · (v_l + v_{l−1})        (layer 1 has no v_0: plain attention)

and scored on in-context accuracy on *novel* classes (means never seen in training, labels assigned at random
per sequence), which only an in-context learner can solve. Reports steps to 95% per seed, mean ± sd, the ratio,
and plots the curves.

    python bench/icl_value_residual.py --seeds 0 1 2 --steps 30000 --out bench/results/icl
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TaskConfig:
    classes: int = 512  # K
    labels: int = 32  # L; training class k carries label k mod L
    pairs: int = 8  # N exemplar (item, label) pairs before the query
    burstiness: int = 2  # B: each class in a context appears B times (N/B classes per context)
    noise: float = 0.1  # ε: within-class variation
    dim: int = 63  # D of items and labels


@dataclass
class TrainConfig:
    steps: int = 30_000
    batch: int = 128
    lr: float = 0.01  # plain SGD, as in Reddy and Burns
    optimizer: str = "sgd"  # or "adam"
    stop_after: int = 0  # > 0: end a run this many steps after it reaches the target (saves CPU)
    eval_every: int = 250
    eval_sequences: int = 2048
    target: float = 0.95
    hidden: int = 512  # MLP readout width
    value_residual: bool = False
    seed: int = 0
    threads: int = 1


# --- the task ----------------------------------------------------------------------------------------------------
def gaussian(gen: torch.Generator, *shape: int, dim: int) -> torch.Tensor:
    return torch.randn(*shape, dim, generator=gen) / math.sqrt(dim)


def distinct_classes(gen: torch.Generator, batch: int, per: int, classes: int) -> torch.Tensor:
    """[batch, per] class ids, distinct within each row (redraw the rare rows with a repeat)."""
    cls = torch.randint(classes, (batch, per), generator=gen)
    while True:
        s = cls.sort(dim=1).values
        bad = (s[:, 1:] == s[:, :-1]).any(1)
        if not bad.any():
            return cls
        cls[bad] = torch.randint(classes, (int(bad.sum()), per), generator=gen)


def sample_sequences(
    gen: torch.Generator, task: TaskConfig, means: torch.Tensor, label_vecs: torch.Tensor, batch: int, novel: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bursty sequences x1 l1 … xN lN xq -> (inputs [B, 2N+1, D+2N+1], target label [B]).

    Training (novel=False): classes drawn from the K training means, label = class mod L, so both in-weights and
    in-context solutions exist. Novel: fresh class means and a random distinct label per class in each sequence,
    so only reading the context can answer."""
    n, b, d = task.pairs, task.burstiness, task.dim
    per = n // b  # distinct classes in a context
    if novel:
        class_means = gaussian(gen, batch, per, dim=d)  # [B, per, D]
        class_labels = torch.argsort(torch.rand(batch, task.labels, generator=gen), dim=1)[:, :per]  # [B, per]
    else:
        cls = distinct_classes(gen, batch, per, task.classes)  # [B, per]
        class_means, class_labels = means[cls], cls % task.labels
    slots = torch.argsort(torch.rand(batch, n, generator=gen), dim=1) % per  # each class B times, shuffled [B, N]
    query = torch.randint(per, (batch,), generator=gen)  # [B]
    which = torch.cat([slots, query[:, None]], dim=1)  # class slot of every item [B, N+1]
    items = class_means.gather(1, which[..., None].expand(-1, -1, d))  # [B, N+1, D]
    items = (items + task.noise * gaussian(gen, batch, n + 1, dim=d)) / math.sqrt(1 + task.noise**2)
    labels = class_labels.gather(1, which)  # [B, N+1]
    seq = torch.empty(batch, 2 * n + 1, d)
    seq[:, 0:-1:2], seq[:, 1::2], seq[:, -1] = items[:, :n], label_vecs[labels[:, :n]], items[:, n]
    positions = torch.eye(2 * n + 1).expand(batch, -1, -1)  # one-hot positions
    return torch.cat([seq, positions], dim=-1), labels[:, n]


# --- the model ---------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(width, width, bias=False) for _ in range(3))

    def forward(self, x: torch.Tensor, v_prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # x [B, T, W]; returns (x + attention output, this layer's values for the next layer)
        v = self.v(x)  # [B, T, W]
        values = v if v_prev is None else v + v_prev  # the value residual stream
        out = F.scaled_dot_product_attention(self.q(x), self.k(x), values, is_causal=True)
        return x + out, v


class ICLTransformer(nn.Module):
    """Two attention-only layers (one head each, residual) and a 3-layer MLP over the query token (Reddy 2024)."""

    def __init__(self, width: int, labels: int, hidden: int, value_residual: bool):
        super().__init__()
        self.layers = nn.ModuleList([Attention(width), Attention(width)])
        self.value_residual = value_residual
        self.readout = nn.Sequential(
            nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, labels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, W] -> logits [B, L]
        v_prev = None
        for layer in self.layers:
            x, v = layer(x, v_prev)
            v_prev = v if self.value_residual else None
        return self.readout(x[:, -1])


# --- training ----------------------------------------------------------------------------------------------------
def train(task: TaskConfig, cfg: TrainConfig, progress: bool = False) -> dict:
    """-> {"curve": [[step, in-context accuracy on novel classes], ...], "steps_to_target": int | None, ...}"""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    means, label_vecs = gaussian(gen, task.classes, dim=task.dim), gaussian(gen, task.labels, dim=task.dim)
    eval_gen = torch.Generator().manual_seed(10_000 + cfg.seed)
    eval_x, eval_y = sample_sequences(eval_gen, task, means, label_vecs, cfg.eval_sequences, novel=True)
    model = ICLTransformer(task.dim + 2 * task.pairs + 1, task.labels, cfg.hidden, cfg.value_residual)
    opt = (torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD)(model.parameters(), lr=cfg.lr)
    curve, reached, start = [], None, time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc=f"seed {cfg.seed} {'value-residual' if cfg.value_residual else 'baseline'}")
    for step in range(1, cfg.steps + 1):
        x, y = sample_sequences(gen, task, means, label_vecs, cfg.batch, novel=False)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.eval_every == 0:
            with torch.no_grad():
                acc = (model(eval_x).argmax(-1) == eval_y).float().mean().item()
            curve.append([step, acc])
            if bar:
                bar.update(cfg.eval_every)
                bar.set_postfix(loss=f"{loss.item():.3f}", icl=f"{acc:.3f}")
            if reached is None and acc >= cfg.target:
                reached = step
            if reached is not None and cfg.stop_after and step >= reached + cfg.stop_after:
                break
    if bar:
        bar.close()
    return {
        "seed": cfg.seed,
        "value_residual": cfg.value_residual,
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "curve": curve,
        "steps_to_target": reached,
        "final_accuracy": curve[-1][1] if curve else None,
        "seconds": time.perf_counter() - start,
    }


def summarise(runs: list[dict], target: float) -> dict:
    out = {}
    for vr in (False, True):
        steps = [r["steps_to_target"] for r in runs if r["value_residual"] == vr]
        hit = [s for s in steps if s is not None]
        mean = sum(hit) / len(hit) if hit else None
        sd = (sum((s - mean) ** 2 for s in hit) / (len(hit) - 1)) ** 0.5 if len(hit) > 1 else 0.0
        out["value_residual" if vr else "baseline"] = {
            "steps": steps,
            "mean": mean,
            "sd": sd,
            "reached": f"{len(hit)}/{len(steps)}",
        }
    b, v = out["baseline"]["mean"], out["value_residual"]["mean"]
    out["ratio"] = v / b if b and v else None  # < 1: the value residual reaches the target sooner
    out["target"] = target
    return out


def plot(runs: list[dict], task: TaskConfig, target: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in runs:
        steps, acc = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot(
            steps,
            acc,
            color="tab:orange" if r["value_residual"] else "tab:blue",
            alpha=0.8,
            label=("value residual" if r["value_residual"] else "baseline") + f" (seed {r['seed']})",
        )
    ax.axhline(target, color="grey", ls="--", lw=0.8)
    ax.set_xlabel(f"training step (batch 128, {runs[0].get('optimizer', 'sgd')} lr {runs[0].get('lr', 0.01)})")
    ax.set_ylabel("in-context accuracy, novel classes")
    ax.set_title(f"2-layer transformer, Reddy task (K={task.classes}, L=32, N=8, B=2, ε=0.1)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--eval-every", type=int, default=TrainConfig.eval_every)
    p.add_argument("--classes", type=int, default=TaskConfig.classes)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--stop-after", type=int, default=0, help="end a run this many steps after reaching 95%%")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/icl", help="writes <out>.json and <out>.png")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    task = TaskConfig(classes=args.classes)

    def config(seed: int, vr: bool) -> TrainConfig:
        return TrainConfig(
            steps=args.steps,
            eval_every=args.eval_every,
            seed=seed,
            value_residual=vr,
            optimizer=args.optimizer,
            lr=args.lr,
            stop_after=args.stop_after,
            threads=args.threads,
        )

    runs = [train(task, config(seed, vr), progress=not args.no_progress) for seed in args.seeds for vr in (False, True)]
    summary = summarise(runs, TrainConfig.target)
    result = {
        "task": asdict(task),
        "train": {k: v for k, v in asdict(config(0, False)).items() if k not in ("seed", "value_residual")},
        "summary": summary,
        "runs": runs,
    }
    from pathlib import Path

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    plot(runs, task, TrainConfig.target, args.out + ".png")
    for name in ("baseline", "value_residual"):
        s = summary[name]
        print(
            f"{name:15s} steps to {TrainConfig.target:.0%}: {s['steps']}  mean {s['mean']} ± {s['sd']:.0f}"
            f"  reached {s['reached']}"
        )
    print(f"ratio value_residual / baseline: {summary['ratio']}")
    return result


if __name__ == "__main__":
    main()
