"""The value-residual ICL model (bench/icl_value_residual.py): the layer math against a slow reference, the task
generator's invariants, and a short CPU training run that must learn in context above chance."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

spec = importlib.util.spec_from_file_location("icl", Path(__file__).parents[1] / "bench" / "icl_value_residual.py")
icl = sys.modules["icl"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
spec.loader.exec_module(icl)


def reference_forward(model, x):
    """Plain loops: attn_l = softmax(q_l k_lᵀ / √d + causal mask) · (v_l + v_{l−1})."""
    v_prev = None
    for layer in model.layers:
        q, k, v = layer.q(x), layer.k(x), layer.v(x)
        t, d = x.shape[1], x.shape[2]
        out = torch.zeros_like(x)
        values = v if v_prev is None else v + v_prev
        for i in range(t):
            w = torch.softmax(torch.stack([(q[:, i] * k[:, j]).sum(-1) / math.sqrt(d) for j in range(i + 1)], -1), -1)
            out[:, i] = sum(w[:, j, None] * values[:, j] for j in range(i + 1))
        x = x + out
        v_prev = v if model.value_residual else None
    return model.readout(x[:, -1])


@pytest.mark.parametrize("value_residual", [False, True])
def test_forward_matches_reference(value_residual):
    torch.manual_seed(0)
    task = icl.TaskConfig()
    model = icl.ICLTransformer(task.dim + 2 * task.pairs + 1, task.labels, 64, value_residual)
    gen = torch.Generator().manual_seed(1)
    means, labels = icl.gaussian(gen, 64, dim=task.dim), icl.gaussian(gen, task.labels, dim=task.dim)
    x, _ = icl.sample_sequences(gen, icl.TaskConfig(classes=64), means, labels, 5, novel=False)
    torch.testing.assert_close(model(x), reference_forward(model, x), rtol=1e-4, atol=1e-5)


def test_sequences_are_bursty_and_answerable_in_context():
    task = icl.TaskConfig()
    gen = torch.Generator().manual_seed(2)
    means, label_vecs = icl.gaussian(gen, task.classes, dim=task.dim), icl.gaussian(gen, task.labels, dim=task.dim)
    for novel in (False, True):
        x, y = icl.sample_sequences(gen, task, means, label_vecs, 64, novel=novel)
        assert x.shape == (64, 2 * task.pairs + 1, task.dim + 2 * task.pairs + 1)
        ctx_labels = (x[:, 1:-1:2, : task.dim] @ label_vecs.T).argmax(-1)  # [B, N] label ids in the context
        items = x[:, 0:-1:2, : task.dim]
        nearest = (items @ x[:, -1, : task.dim, None]).squeeze(-1).argmax(-1)  # the query's class-mate
        assert (ctx_labels.gather(1, nearest[:, None]).squeeze(1) == y).float().mean() > 0.95
        assert len(set(ctx_labels[0].tolist())) == task.pairs // task.burstiness  # B copies of N/B classes


@pytest.mark.model  # a training run: not in the unit tier
@pytest.mark.parametrize("value_residual", [False, True])
def test_short_training_learns_in_context_above_chance(value_residual):
    """Reduced run (Adam, K = 8192 so weights cannot memorise): novel-class accuracy well above 1/L."""
    cfg = icl.TrainConfig(
        steps=600,
        eval_every=200,
        eval_sequences=512,
        seed=0,
        value_residual=value_residual,
        optimizer="adam",
        lr=1e-3,
        hidden=128,
    )
    r = icl.train(icl.TaskConfig(classes=8192), cfg)
    chance = 1 / icl.TaskConfig.labels
    assert r["curve"][-1][1] > 4 * chance, r["curve"]
