"""The measurement harness counts what a deployed model really holds and does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdbench.config import Measure
from kdbench.contracts import CompressionContext
from kdbench.measure import batch_of, count_flops, count_parameters, export, latency, measure


@pytest.fixture(scope="module")
def setup():
    from kdbench.plugins import get_plugins
    plugins = get_plugins()
    data = plugins.build("task", "digits").load()
    torch.manual_seed(0)
    model = plugins.build("model", "mlp", {"hidden": [32]}).build(data)
    return plugins, data, model


def test_flops_count_multiply_adds_as_two_for_float_and_int8(setup):
    plugins, data, model = setup
    x = data.test.tensors[0][:1]
    expected = 2 * (64 * 32 + 32 * 10)
    assert count_flops(model, x) == expected
    quantized = plugins.build("quantizer", "dynamic-int8").apply(export(model), None)
    assert count_flops(quantized, x) == expected
    assert count_flops(model, batch_of(x, 8)) == 8 * expected


def test_parameters_and_nonzeros_see_through_pruning_and_packing(setup):
    plugins, data, model = setup
    assert count_parameters(model) == (2410, 2410)
    ctx = CompressionContext(data, data.train.tensors[0][:8], None, 0)
    pruned = plugins.build("pruner", "magnitude", {"sparsity": 0.5}).apply(export(model), ctx)
    total, nonzero = count_parameters(export(pruned))
    assert total == 2410
    assert nonzero == 2410 - round(0.5 * (64 * 32 + 32 * 10))  # biases are not pruned


def test_latency_reports_median_and_iqr_per_batch_size(setup):
    _, data, model = setup
    x = data.test.tensors[0]
    out = latency(model, {1: batch_of(x, 1), 64: batch_of(x, 64)}, warmup=1, repeats=5)
    assert set(out) == {"latency_b1_ms", "latency_b1_iqr_ms", "latency_b64_ms", "latency_b64_iqr_ms",
                        "latency_load", "cpu_count"}
    assert all(v >= 0 for v in out.values())
    assert out["latency_b1_ms"] > 0


def test_measure_reports_every_figure(setup):
    plugins, data, model = setup
    task = plugins.build("task", "digits")
    teacher_logits = torch.randn(len(data.test), 10)
    figures = measure(model, data, task, teacher_logits, Measure(latency_repeats=2, latency_batch_sizes=(1, 16)))
    for key in ("test_accuracy", "teacher_agreement", "teacher_kl", "params", "nonzero_params",
                "size_bytes", "weight_bytes", "flops", "latency_b1_ms", "latency_b16_ms"):
        assert key in figures
    assert 0 <= figures["test_accuracy"] <= 1
    assert figures["weight_bytes"] == 2410 * 4
    assert figures["size_bytes"] > figures["weight_bytes"]  # the file format's own overhead


def test_modules_with_packed_buffers_are_counted_through_unpacked_weights():
    class Packed(nn.Module):
        """4 weights stored as bytes (2 per byte), one of them zero."""

        def __init__(self):
            super().__init__()
            self.register_buffer("packed", torch.tensor([0x21, 0x03], dtype=torch.uint8))
            self.bias = nn.Parameter(torch.ones(2))

        def unpacked_weights(self):
            low, high = self.packed & 0xF, self.packed >> 4
            return [torch.stack([low, high], 1).flatten().float()]

    assert count_parameters(nn.Sequential(Packed())) == (6, 5)


def test_sparse_matrices_ship_in_csr_form_only_when_smaller():
    from kdbench.measure import csr_bytes, serialized_bytes, shipped_state

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 50), nn.Linear(50, 10))
    dense = serialized_bytes(model)
    with torch.no_grad():
        model[0].weight[:, :40] = 0  # 40% zeros: CSR (8 bytes a value) is larger than dense
    assert shipped_state(model)[1] == 0 and serialized_bytes(model) == dense
    with torch.no_grad():
        model[0].weight[:, :90] = 0  # 90% zeros: 500 values
    shipped, sparse = shipped_state(model)
    assert sparse == 1 and csr_bytes(model[0].weight) == 500 * 8 + 51 * 4
    entry = shipped["0.weight"]
    assert torch.equal(entry["csr"].to_dense().reshape(entry["shape"]), model[0].weight)
    assert entry["csr"].col_indices().dtype == torch.int32
    assert serialized_bytes(model) < dense - (100 * 50 * 4 - csr_bytes(model[0].weight)) + 2048


def test_static_int8_models_keep_their_flops_and_parameters_counted():
    from torch.utils.data import TensorDataset

    from kdbench.contracts import TaskData
    from kdbench.plugins import get_plugins

    plugins = get_plugins()
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    data = TaskData(*[TensorDataset(x, y)] * 3, (1, 28, 28), 10)
    model = plugins.build("model", "cnn", {"channels": [8, 16], "hidden": 32}).build(data).eval()
    int8 = plugins.build("quantizer", "static-int8").apply(export(model), CompressionContext(data, x, None, 0))
    # Fused int8 conv+relu and linear+relu kernels do the same multiply-adds as the float layers.
    assert count_flops(int8, x[:1]) == count_flops(model, x[:1])
    # Batch norm folds into the convs: its scale and shift go, the bias-free convs gain a bias.
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    folded = sum(2 * m.num_features for m in bn) - sum(m.num_features for m in bn)
    assert count_parameters(int8)[0] == count_parameters(model)[0] - folded


def test_speedup_is_the_paired_ratio_against_a_reference_model():
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(512, 8), nn.ReLU(), nn.Linear(8, 10))
    big = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(512, 512), nn.ReLU())], nn.Linear(512, 10))
    x = torch.randn(256, 512)
    out = latency(small, {256: x}, warmup=1, repeats=5, reference=big)
    # About 380x fewer multiply-adds: the small model is clearly the faster of the pair.
    assert out["speedup_b256"] > 2
    assert set(out) == {"latency_b256_ms", "latency_b256_iqr_ms", "speedup_b256", "latency_load", "cpu_count"}
    assert "speedup_b256" not in latency(small, {256: x}, warmup=1, repeats=3)


def test_measure_records_the_machine_load_around_the_timing(setup, monkeypatch):
    """The higher of the load averages read before and after the timing, and the core count,
    go with the row's figures; an OS without a load average records neither."""
    import os

    plugins, data, model = setup
    task = plugins.build("task", "digits")
    settings = Measure(latency_repeats=2, latency_batch_sizes=(1,))
    readings = iter([(1.5, 0.0, 0.0), (3.25, 0.0, 0.0)])  # before, after
    monkeypatch.setattr(os, "getloadavg", lambda: next(readings))
    figures = measure(model, data, task, None, settings)
    assert figures["latency_load"] == 3.25
    assert figures["cpu_count"] == os.cpu_count()
    readings = iter([(4.0, 0.0, 0.0), (0.5, 0.0, 0.0)])  # the load fell during the timing
    assert measure(model, data, task, None, settings)["latency_load"] == 4.0

    monkeypatch.delattr(os, "getloadavg")
    figures = measure(model, data, task, None, settings)
    assert "latency_load" not in figures and "cpu_count" not in figures
    assert figures["latency_b1_ms"] > 0
