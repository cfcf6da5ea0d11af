"""Each compressor really changes what it claims: non-zeros, bytes, int8 modules, shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdbench.config import Training
from kdbench.contracts import CompressionContext
from kdbench.measure import count_parameters, export, serialized_bytes, weight_bytes
from kdbench.training import fit, predict


@pytest.fixture(scope="module")
def digits(plugins=None):
    from kdbench.plugins import get_plugins
    return get_plugins().build("task", "digits").load()


def build(plugins, data, hidden):
    torch.manual_seed(0)
    return plugins.build("model", "mlp", {"hidden": hidden}).build(data)


def context(data):
    return CompressionContext(data=data, calibration=data.train.tensors[0][:64], teacher=None, seed=0)


def weight_sparsity(model):
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_reaches_its_sparsity_and_zeros_survive_finetuning(plugins, digits, scope):
    model = build(plugins, digits, [64, 32])
    pruner = plugins.build("pruner", "magnitude", {"sparsity": 0.75, "scope": scope})
    model = pruner.apply(model, context(digits))
    assert weight_sparsity(model) == pytest.approx(0.75, abs=0.01)
    assert pruner.report()["weight_sparsity"] == pytest.approx(0.75, abs=0.01)
    if scope == "layer":
        for m in model.modules():
            if isinstance(m, nn.Linear):
                assert (m.weight == 0).float().mean().item() == pytest.approx(0.75, abs=0.01)
    task = plugins.build("task", "digits")
    fit(model, digits, task, Training(epochs=2), seed=0)
    deployed = export(model)
    assert weight_sparsity(deployed) == pytest.approx(0.75, abs=0.01)
    assert not any(name.endswith("_orig") for name, _ in deployed.named_parameters())
    # Simulated for speed: dense kernels run over the zeros. At 75% the shipped file stores the
    # weight matrices as CSR (8 bytes a non-zero against 4 a dense weight), so it is smaller.
    assert pruner.materialized is False
    dense = serialized_bytes(build(plugins, digits, [64, 32]))
    assert serialized_bytes(deployed) < 0.7 * dense


def test_magnitude_keeps_smallest_weights_out(plugins, digits):
    model = build(plugins, digits, [32])
    before = torch.cat([m.weight.detach().abs().flatten() for m in model.modules() if isinstance(m, nn.Linear)])
    model = plugins.build("pruner", "magnitude", {"sparsity": 0.5}).apply(model, context(digits))
    after = torch.cat([m.weight.detach().abs().flatten() for m in model.modules() if isinstance(m, nn.Linear)])
    kept = before[after != 0]
    dropped = before[after == 0]
    assert kept.min() >= dropped.max()


def test_dynamic_int8_swaps_in_int8_modules_and_shrinks_the_file(plugins, digits):
    model = build(plugins, digits, [512, 512]).eval()
    x = digits.test.tensors[0]
    reference = predict(model, x)
    quantizer = plugins.build("quantizer", "dynamic-int8")
    quantized = quantizer.apply(model, context(digits))
    linear_types = {type(m) for m in quantized.modules() if type(m).__name__ == "Linear"}
    assert linear_types == {torch.ao.nn.quantized.dynamic.Linear}
    assert quantized.fc1.weight().dtype == torch.qint8
    assert serialized_bytes(quantized) * 3 < serialized_bytes(model)
    assert weight_bytes(quantized) * 3.5 < weight_bytes(model)
    assert count_parameters(quantized)[0] == count_parameters(model)[0]
    outputs = predict(quantized, x)
    assert (outputs.argmax(-1) == reference.argmax(-1)).float().mean() > 0.97
    assert quantizer.materialized and not quantizer.trainable_after


def test_svd_replaces_linears_by_two_thinner_ones(plugins, digits):
    model = build(plugins, digits, [64])
    decomposer = plugins.build("decomposer", "svd", {"rank_ratio": 0.25, "skip": ["head"]})
    before = count_parameters(model)[0]
    model = decomposer.apply(model, context(digits))
    assert isinstance(model.fc1, nn.Sequential)
    first, second = model.fc1
    assert (first.in_features, first.out_features, first.bias) == (64, 16, None)
    assert (second.in_features, second.out_features) == (16, 64)
    assert isinstance(model.head, nn.Linear)  # skipped
    assert decomposer.report()["ranks"] == {"fc1": 16}
    assert count_parameters(model)[0] == before - 64 * 64 + 16 * (64 + 64)


def test_svd_at_full_rank_reproduces_the_layer():
    from kdbench_plugins.decompose.svd import factorize

    torch.manual_seed(0)
    layer = nn.Linear(20, 12)
    x = torch.randn(5, 20)
    assert torch.allclose(factorize(layer, 12)(x), layer(x), atol=1e-5)
    # Truncation error equals the discarded singular values (Eckart-Young).
    s = torch.linalg.svdvals(layer.weight.detach())
    approx = factorize(layer, 4)
    w = approx[1].weight @ approx[0].weight
    assert torch.linalg.matrix_norm(layer.weight - w).item() == pytest.approx(s[4:].norm().item(), rel=1e-4)


def test_svd_never_grows_a_layer(plugins, digits):
    model = build(plugins, digits, [8])
    decomposer = plugins.build("decomposer", "svd", {"rank_ratio": 1.0})
    decomposer.apply(model, context(digits))
    assert set(decomposer.report()["ranks"].values()) == {None}
    assert isinstance(model.fc1, nn.Linear)


def test_svd_rejects_unknown_skip_names(plugins, digits):
    decomposer = plugins.build("decomposer", "svd", {"skip": ["fc9"]})
    with pytest.raises(ValueError, match="matches none of the"):
        decomposer.apply(build(plugins, digits, [8]), context(digits))
