"""Gradual pruning: the cubic schedule, magnitude order, fine-tuning between steps, in a run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdbench.contracts import CompressionContext
from kdbench.measure import export
from kdbench.runner import run_experiment
from kdbench.config import load_experiment
from kdbench.store import Store

from conftest import TINY


def test_cubic_schedule_is_zhu_and_gupta():
    from kdbench_plugins.prune.gradual import cubic_schedule

    # s_k = s_f + (s_i - s_f)(1 - k/n)^3 with s_i = 0, s_f = 0.8, n = 4
    assert cubic_schedule(0.0, 0.8, 4) == pytest.approx([0.8 - 0.8 * 0.75 ** 3, 0.8 - 0.8 * 0.5 ** 3,
                                                         0.8 - 0.8 * 0.25 ** 3, 0.8])


def test_each_step_cuts_the_smallest_live_weights_then_finetunes(plugins):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    calls = []

    def finetune(m, epochs, distill=None):
        # A stand-in for training: record the sparsity reached, then move the surviving weights.
        weights = [mod.weight for mod in m.modules() if isinstance(mod, nn.Linear)]
        calls.append((epochs, distill, sum(int((w == 0).sum()) for w in weights) / 300))
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, nn.Linear):
                    mod.weight_orig.mul_(torch.rand_like(mod.weight_orig) + 0.5)
        return []

    pruner = plugins.build("pruner", "gradual", {"sparsity": 0.8, "steps": 4, "epochs_per_step": 2,
                                                 "distill": "hinton", "distill_params": {"temperature": 2}})
    context = CompressionContext(None, torch.zeros(0), None, 0, finetune=finetune)
    model = pruner.apply(model, context)
    want = [0.8 - 0.8 * (1 - k / 4) ** 3 for k in range(1, 5)]
    assert [c[2] for c in calls] == pytest.approx(want, abs=1 / 300)
    # The distiller arrives resolved, its defaults filled in, as the cell id records it.
    assert all(c[0] == 2 and c[1].spec() == {"name": "hinton", "temperature": 2.0, "alpha": 0.9}
               for c in calls)
    assert pruner.report()["schedule"] == pytest.approx(want, abs=1 / 300)
    # The masks survive export: the deployed weights hold the final sparsity.
    deployed = export(model)
    weights = torch.cat([m.weight.flatten() for m in deployed.modules() if isinstance(m, nn.Linear)])
    assert (weights == 0).float().mean().item() == pytest.approx(0.8, abs=1 / 300)


def test_gradual_needs_a_training_run_and_checks_its_distiller(plugins):
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="needs a training run"):
        plugins.build("pruner", "gradual").apply(model, CompressionContext(None, torch.zeros(0), None, 0))
    with pytest.raises(Exception, match="did you mean 'hinton'"):
        plugins.build("pruner", "gradual", {"distill": "hintn"})


def test_gradual_with_kd_finetuning_in_a_run(plugins, tiny_yaml, tmp_path, isolated_cache):
    text = TINY.replace("kd+int8: [{distill: hinton}, {quantize: dynamic-int8}]",
                        "agp: [{distill: hinton}, {prune: {name: gradual, sparsity: 0.75, steps: 3, "
                        "epochs_per_step: 1, distill: hinton}}]")
    experiment = load_experiment(tiny_yaml(text), plugins)
    with Store(tmp_path / "r.db") as store:
        summary = run_experiment(experiment, store, plugins, isolated_cache, progress=None)
        records = store.records()
    assert summary.exit_code == 0, [r.error for r in summary.failed]
    agp = next(r for r in records if r.recipe == "agp")
    # The stored config holds the nested distiller as a stage's: every parameter, its plugin.
    assert agp.config["stages"][1]["pruner"]["distill"] == {"name": "hinton", "temperature": 4.0, "alpha": 0.9}
    assert plugins.get("distiller", "hinton").plugin in agp.config["plugins"]
    prune_stage = agp.stages[1]
    assert len(prune_stage["history"]) == 3 and "loss_kd" in prune_stage["history"][0]
    assert prune_stage["calibration"] == {"split": "train", "size": 256, "seed": 0}
    assert agp.metrics["nonzero_params"] < 0.3 * agp.metrics["params"]
    assert agp.metrics["materialized"] is False
