"""Quantization-aware training: fake-quantized fine-tuning (with KD) that ends in int8 kernels."""

from __future__ import annotations

import pytest
import torch

from kdbench.config import load_experiment
from kdbench.contracts import CompressionContext
from kdbench.runner import run_experiment
from kdbench.store import Store

from conftest import TINY


def test_qat_trains_fake_quantized_then_converts_to_int8_kernels(plugins, tiny_yaml, tmp_path, isolated_cache):
    text = TINY.replace("kd+int8: [{distill: hinton}, {quantize: dynamic-int8}]",
                        "kd+static: [{distill: hinton}, {quantize: static-int8}]\n"
                        "  kd+qat: [{distill: hinton}, {quantize: {name: qat, epochs: 2, distill: hinton}}]")
    experiment = load_experiment(tiny_yaml(text), plugins)
    with Store(tmp_path / "r.db") as store:
        summary = run_experiment(experiment, store, plugins, isolated_cache, progress=None)
        records = {r.recipe: r for r in store.records() if r.role == "student"}
    assert summary.exit_code == 0, [r.error for r in summary.failed]
    qat, static, kd = records["kd+qat"], records["kd+static"], records["kd"]
    assert qat.config["stages"][1]["quantizer"]["distill"] == {"name": "hinton", "temperature": 4.0, "alpha": 0.9}
    stage = qat.stages[1]
    assert len(stage["history"]) == 2 and "loss_kd" in stage["history"][0]
    assert stage["report"]["finetune_epochs"] == 2 and stage["report"]["quantized_layers"] >= 2
    assert stage["report"]["float_layers"] == []
    assert qat.metrics["materialized"] is True
    # The same int8 artifact as static quantization: int8 weights, about a quarter of the bytes.
    assert qat.metrics["weight_bytes"] == pytest.approx(static.metrics["weight_bytes"], rel=0.05)
    assert qat.metrics["weight_bytes"] < 0.4 * kd.metrics["weight_bytes"]
    assert qat.metrics["test_accuracy"] > 0.5


def test_qat_needs_a_training_run_and_real_valued_inputs(plugins):
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    qat = plugins.build("quantizer", "qat")
    with pytest.raises(ValueError, match="needs a training run"):
        qat.apply(model, CompressionContext(None, torch.zeros(4, 4), None, 0))
    tokens = CompressionContext(None, torch.zeros(4, 4, dtype=torch.long), None, 0, finetune=lambda *a: [])
    with pytest.raises(ValueError, match="integer token ids"):
        qat.apply(model, tokens)
    with pytest.raises(Exception, match="did you mean 'hinton'"):
        plugins.build("quantizer", "qat", {"distill": "hintn"})
