"""Pruners random, wanda, nm and channel: golden choices computed here by hand or in plain
torch from the papers' formulas, and every family each claims still runs after pruning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from kdbench.contracts import CompressionContext, TaskData
from kdbench.errors import ConfigError
from kdbench.measure import export, serialized_bytes


def task_data(x, y, num_classes, vocab=None):
    ds = TensorDataset(x, y)
    return TaskData(ds, ds, ds, tuple(x.shape[1:]), num_classes, vocab_size=vocab)


def ctx(data, n=16, seed=0):
    return CompressionContext(data=data, calibration=data.train.tensors[0][:n], teacher=None, seed=seed)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def flat_data(n=32, features=20, classes=5):
    return task_data(torch.randn(n, features, generator=gen(1)),
                     torch.randint(0, classes, (n,), generator=gen(2)), classes)


#: Small configurations of every family the channel pruner claims, on random data.
FAMILIES = {
    "mlp": ({"hidden": [32, 16]}, lambda: flat_data()),
    "cnn": ({"channels": [8, 16], "hidden": 16},
            lambda: task_data(torch.randn(8, 1, 28, 28, generator=gen(1)), torch.randint(0, 10, (8,), generator=gen(2)), 10)),
    "resnet": ({"arch": "resnet8"},
               lambda: task_data(torch.randn(4, 3, 32, 32, generator=gen(1)), torch.randint(0, 10, (4,), generator=gen(2)), 10)),
    "wrn": ({"depth": 10, "widen": 1},
            lambda: task_data(torch.randn(4, 3, 32, 32, generator=gen(1)), torch.randint(0, 10, (4,), generator=gen(2)), 10)),
    "vgg": ({"arch": "vgg8"},
            lambda: task_data(torch.randn(4, 3, 32, 32, generator=gen(1)), torch.randint(0, 10, (4,), generator=gen(2)), 10)),
    "gpt": ({"layers": 2, "width": 32, "heads": 4, "context": 16},
            lambda: task_data(torch.randint(0, 50, (8, 16), generator=gen(1)),
                              torch.randint(0, 50, (8, 16), generator=gen(2)), 50, vocab=50)),
}


def build(plugins, family, data=None, params=None):
    default_params, make = FAMILIES[family]
    data = data if data is not None else make()
    torch.manual_seed(0)
    return plugins.build("model", family, params or default_params).build(data), data


def linear_and_conv(model):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]


def one_step(model, data):
    """One SGD step on the training batch; returns the loss (finite if the model trains)."""
    x, y = data.train.tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    logits = model(x[:4])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:4].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


# ---------------------------------------------------------------- random
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_random_reaches_sparsity_and_zeros_survive_training(plugins, scope):
    model, data = build(plugins, "mlp")
    pruner = plugins.build("pruner", "random", {"sparsity": 0.6, "scope": scope})
    model = pruner.apply(model, ctx(data))
    layers = linear_and_conv(model)
    total = sum(m.weight.numel() for m in layers)
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    assert zeros == round(0.6 * total)
    assert pruner.report()["weight_sparsity"] == pytest.approx(0.6, abs=1e-3)
    if scope == "layer":
        for m in layers:
            assert int((m.weight == 0).sum()) == round(0.6 * m.weight.numel())
    masks = [m.weight_mask.clone() for m in layers]
    assert torch.isfinite(torch.tensor(one_step(model, data)))  # still trains, masks in place
    deployed = export(model)
    for m, mask in zip(linear_and_conv(deployed), masks):
        assert torch.all(m.weight[mask == 0] == 0)
    assert pruner.materialized is False


def test_random_is_seeded_and_ignores_magnitudes(plugins):
    def mask(seed):
        model, data = build(plugins, "cnn")
        plugins.build("pruner", "random", {"sparsity": 0.5}).apply(model, ctx(data, seed=seed))
        return model, torch.cat([m.weight_mask.flatten() for m in linear_and_conv(model)])

    model, m0 = mask(0)
    assert torch.equal(m0, mask(0)[1])
    assert not torch.equal(m0, mask(1)[1])
    # Conv weights are pruned too, and the choice is not magnitude's: some pruned weights
    # are larger than some kept ones in the same layer.
    conv = model[1][0]
    assert 0.3 < (conv.weight_mask == 0).float().mean() < 0.7
    kept, dropped = conv.weight_orig.abs()[conv.weight_mask == 1], conv.weight_orig.abs()[conv.weight_mask == 0]
    assert dropped.max() > kept.min()


def test_random_rejects_bad_sparsity(plugins):
    with pytest.raises(ConfigError, match="sparsity"):
        plugins.build("pruner", "random", {"sparsity": 1.0})


# ---------------------------------------------------------------- wanda
def tiny_linear_model():
    fc = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]))
    return nn.Sequential(fc)


#: Two calibration rows; per-feature L2 norms ||X_j|| = [10, 1, 1, 0.1].
CALIBRATION = torch.tensor([[6.0, 1.0, 0.0, 0.1], [8.0, 0.0, 1.0, 0.0]])


def test_wanda_golden_scores_decide_and_differ_from_magnitude(plugins):
    model = tiny_linear_model()
    w = model[0].weight.detach().clone()
    data = task_data(CALIBRATION, torch.zeros(2, dtype=torch.long), 2)
    pruner = plugins.build("pruner", "wanda", {"sparsity": 0.5})
    pruner.apply(model, CompressionContext(data, CALIBRATION, None, 0))
    # By hand: scores |W| * [10, 1, 1, 0.1] = [[10, 2, 3, 0.4], [40, 3, 2, 0.1]];
    # each row drops its two lowest.
    expected = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    # The same from the paper's formula in plain torch.
    scores = w.abs() * CALIBRATION.pow(2).sum(0).sqrt()
    formula = torch.ones_like(w, dtype=torch.bool)
    formula.scatter_(1, scores.argsort(dim=1)[:, :2], False)
    assert torch.equal(formula, expected)
    assert torch.equal(model[0].weight_mask.bool(), expected)
    assert torch.equal(model[0].weight, w * expected)
    # Magnitude alone would keep [3, 4] in row 0, not [1, 3].
    magnitude = plugins.build("pruner", "magnitude", {"sparsity": 0.5, "scope": "layer"})
    other = magnitude.apply(tiny_linear_model(), CompressionContext(data, CALIBRATION, None, 0))
    assert not torch.equal(other[0].weight_mask.bool(), expected)
    assert pruner.materialized is False


def test_wanda_on_gpt_prunes_every_row_and_honours_skip(plugins):
    model, data = build(plugins, "gpt")
    pruner = plugins.build("pruner", "wanda", {"sparsity": 0.5, "skip": ["head"]})
    model = pruner.apply(model, ctx(data, n=4))
    assert not hasattr(model.head, "weight_mask")
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name != "head":
            assert torch.all((m.weight == 0).sum(1) == m.in_features // 2), name
    assert model(data.train.tensors[0][:2]).shape == (2, 16, 50)
    assert one_step(model, data) > 0
    assert torch.all(export(model).blocks[0].mlp[0].weight[model.blocks[0].mlp[0].weight_mask == 0] == 0)


def test_wanda_and_magnitude_name_the_layers_they_leave_dense(plugins):
    model, data = build(plugins, "cnn", params={"channels": [8, 16], "hidden": 16})
    convs = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    wanda = plugins.build("pruner", "wanda", {"skip": ["head"]})
    wanda.apply(model, ctx(data))
    report = wanda.report()
    assert report["layers"] == ["fc"]
    assert report["skipped_layers"] == {"block1.0": "Conv2d: wanda scores Linear layers only",
                                        "block2.0": "Conv2d: wanda scores Linear layers only",
                                        "head": "listed in skip"}
    assert all(torch.equal(model.get_submodule(name).weight, w) for name, w in convs.items())
    total = sum(m.weight.numel() for m in linear_and_conv(model))
    assert report["overall_sparsity"] == pytest.approx(0.5 * model.fc.weight.numel() / total)

    model, data = build(plugins, "mlp")
    magnitude = plugins.build("pruner", "magnitude", {"sparsity": 0.5, "skip": ["head"]})
    magnitude.apply(model, ctx(data))
    report = magnitude.report()
    assert report["skipped_layers"] == {"head": "listed in skip"}
    assert report["weight_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert int((model.head.weight == 0).sum()) == 0
    assert report["overall_sparsity"] < report["weight_sparsity"]


def test_wanda_errors(plugins):
    conv_only = nn.Sequential(nn.Conv2d(1, 2, 3))
    data = task_data(torch.randn(2, 1, 5, 5), torch.zeros(2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="Linear layers; the model has none"):
        plugins.build("pruner", "wanda").apply(conv_only, ctx(data))
    with pytest.raises(ValueError, match="matches none of the"):
        plugins.build("pruner", "wanda", {"skip": ["nope"]}).apply(tiny_linear_model(), ctx(data))


# ---------------------------------------------------------------- nm
def assert_nm(weight, scores, n, m):
    """Every group of m along the flattened input has exactly n non-zeros, the n top scores."""
    w = weight.detach().reshape(-1, m)
    s = scores.reshape(-1, m)
    assert torch.all((w != 0).sum(1) == n)
    top = s.argsort(dim=1, descending=True)[:, :n]
    kept = torch.zeros_like(w, dtype=torch.bool).scatter_(1, top, True)
    assert torch.equal(w != 0, kept)


def test_nm_golden_magnitude_and_wanda(plugins):
    fc = nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[0.1, -0.4, 0.3, 0.2, 5.0, -1.0, 0.5, 2.0]]))
    x = torch.tensor([[10.0, 0.1, 1.0, 10.0, 1.0, 1.0, 1.0, 1.0]])
    data = task_data(x, torch.zeros(1, dtype=torch.long), 1)
    model = plugins.build("pruner", "nm").apply(nn.Sequential(fc), CompressionContext(data, x, None, 0))
    # By hand, 2:4 by |w|: group 1 keeps -0.4, 0.3; group 2 keeps 5.0, 2.0.
    assert torch.equal(model[0].weight != 0, torch.tensor([[0, 1, 1, 0, 1, 0, 0, 1]], dtype=torch.bool))
    fc2 = nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        fc2.weight.copy_(torch.tensor([[0.1, -0.4, 0.3, 0.2, 5.0, -1.0, 0.5, 2.0]]))
    model = plugins.build("pruner", "nm", {"score": "wanda"}).apply(nn.Sequential(fc2),
                                                                    CompressionContext(data, x, None, 0))
    # By hand, |w| * |x| = [1, 0.04, 0.3, 2, 5, 1, 0.5, 2]: group 1 keeps 0.1 and 0.2.
    assert torch.equal(model[0].weight != 0, torch.tensor([[1, 0, 0, 1, 1, 0, 0, 1]], dtype=torch.bool))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_every_group_on_conv_and_linear(plugins, n, m):
    model, data = build(plugins, "cnn", params={"channels": [8, 16], "hidden": 16})
    before = {name: mod.weight.detach().clone() for name, mod in model.named_modules()
              if isinstance(mod, (nn.Linear, nn.Conv2d))}
    pruner = plugins.build("pruner", "nm", {"n": n, "m": m})
    model = pruner.apply(model, ctx(data))
    modules = dict(model.named_modules())
    # The 1-channel 3x3 first conv has 9 weights per output: it cannot take n:m and stays dense.
    assert torch.equal(modules["block1.0"].weight, before["block1.0"])
    for name in ("block2.0", "fc", "head"):  # conv groups run over in_channels * kh * kw
        assert_nm(modules[name].weight, before[name].abs(), n, m)
    report = pruner.report()
    assert report["skipped_layers"] == {"block1.0": f"9 weights per output, not a multiple of {m}"}
    assert report["layers"] == ["block2.0", "fc", "head"]
    assert report["weight_sparsity"] == pytest.approx(1 - n / m)
    # Over every Linear/Conv weight the dense first conv lowers the sparsity reached.
    sizes = {name: w.numel() for name, w in before.items()}
    pruned = sum(v for k, v in sizes.items() if k != "block1.0")
    assert report["overall_sparsity"] == pytest.approx((1 - n / m) * pruned / sum(sizes.values()))
    assert model(data.train.tensors[0][:2]).shape == (2, 10)
    assert pruner.materialized is False


def test_nm_listed_skip_is_recorded_and_a_model_that_cannot_take_the_pattern_is_refused(plugins):
    model, data = build(plugins, "cnn", params={"channels": [8, 16], "hidden": 16})
    head = model.head.weight.detach().clone()
    pruner = plugins.build("pruner", "nm", {"skip": ["head"]})
    pruner.apply(model, ctx(data))
    assert torch.equal(model.head.weight, head)
    assert pruner.report()["skipped_layers"] == {
        "block1.0": "9 weights per output, not a multiple of 4", "head": "listed in skip"}
    odd = nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2))  # 6 and 3 inputs: no 4-group
    with pytest.raises(ValueError, match=r"no Linear or Conv layer that can take the pattern "
                                         r"\(0: 6 weights per output, not a multiple of 4"):
        plugins.build("pruner", "nm").apply(odd, ctx(flat_data(features=6)))


def test_nm_wanda_scores_on_gpt(plugins):
    model, data = build(plugins, "gpt")
    calibration = data.train.tensors[0][:4]
    from kdbench.calibration import input_stats, linear_layers
    layers = linear_layers(model)
    norms = {k: v.sq_norm.sqrt().float() for k, v in input_stats(model, layers, calibration).items()}
    before = {k: m.weight.detach().clone() for k, m in layers.items()}
    plugins.build("pruner", "nm", {"score": "wanda"}).apply(model, ctx(data, n=4))
    for name, m in layers.items():
        assert_nm(m.weight, before[name].abs() * norms[name], 2, 4)
    assert model(calibration[:2]).shape == (2, 16, 50)


def test_nm_rejects_bad_pattern(plugins):
    with pytest.raises(ConfigError, match="1 <= n < m"):
        plugins.build("pruner", "nm", {"n": 4, "m": 4})


# ---------------------------------------------------------------- channel
def tiny_mlp():
    fc = nn.Linear(4, 6)
    head = nn.Linear(6, 3)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[3.0, 0, 0, 0], [1, 1, 1, 1], [0.5, 0.5, 0.5, 0.5],
                                      [2.5, 0, 0, 0], [-0.9, 0.9, -0.9, 0.9], [0.1, 0, 0, 0]]))
        fc.bias.copy_(torch.arange(6.0))
        head.weight.fill_(1.0)  # equal consumer columns: the ranking is the filters' own
        head.bias.zero_()
    return nn.Sequential(fc, nn.ReLU(), head)


@pytest.mark.parametrize("importance,kept", [("l1", [0, 1, 4]), ("l2", [0, 1, 3])])
def test_channel_golden_keeps_largest_norm_neurons(plugins, importance, kept):
    # By hand: row L1 norms [3, 4, 2, 2.5, 3.6, 0.1], squared L2 [9, 4, 1, 6.25, 3.24, 0.01].
    model = tiny_mlp()
    reference = tiny_mlp()
    x = torch.randn(5, 4, generator=gen(0))
    data = task_data(x, torch.zeros(5, dtype=torch.long), 3)
    pruner = plugins.build("pruner", "channel", {"ratio": 0.5, "importance": importance})
    model = pruner.apply(model, ctx(data))
    assert torch.equal(model[0].weight, reference[0].weight[kept])
    assert torch.equal(model[0].bias, reference[0].bias[kept])
    assert torch.equal(model[2].weight, reference[2].weight[:, kept])
    with torch.no_grad():
        expected = F.relu(x @ reference[0].weight[kept].T + reference[0].bias[kept]) @ reference[2].weight[:, kept].T
        assert torch.allclose(model(x), expected)
    assert pruner.report()["pruned"] == {"0": [6, 3]}


def test_channel_taylor_golden(plugins):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(12, 5, generator=gen(4)), torch.randint(0, 3, (12,), generator=gen(5))
    # Plain torch: sum |w * dL/dw| over the neuron's row of layer 0 and column of layer 2.
    reference = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    reference.load_state_dict(model.state_dict())
    F.cross_entropy(reference(x), y).backward()
    w1, w2 = reference[0].weight, reference[2].weight
    score = (w1 * w1.grad).abs().sum(1) + (w2 * w2.grad).abs().sum(0)
    kept = score.argsort(descending=True)[:4].sort().values
    data = task_data(x, y, 3)
    pruned = plugins.build("pruner", "channel", {"importance": "taylor"}).apply(model, ctx(data, n=12))
    assert torch.equal(pruned[0].weight, reference[0].weight.detach()[kept])
    assert all(p.grad is None for p in pruned.parameters())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_channel_shrinks_every_family(plugins, family):
    model, data = build(plugins, family)
    x = data.train.tensors[0][:2]
    shape = model(x).shape
    params = sum(p.numel() for p in model.parameters())
    size = serialized_bytes(model)
    head_out = [m for m in linear_and_conv(model)][-1].weight.shape[0]
    pruner = plugins.build("pruner", "channel", {"ratio": 0.5, "importance": "l1"})
    model = pruner.apply(model, ctx(data, n=4))
    assert model(x).shape == shape
    after = sum(p.numel() for p in model.parameters())
    report = pruner.report()
    assert (report["params_before"], report["params_after"]) == (params, after)
    assert after < 0.8 * params
    assert serialized_bytes(model) < 0.8 * size
    assert [m for m in linear_and_conv(model)][-1].weight.shape[0] == head_out  # classes kept
    assert report["pruned"] and pruner.materialized
    before_step = [p.detach().clone() for p in model.parameters()]
    assert torch.isfinite(torch.tensor(one_step(model, data)))
    assert any(not torch.equal(a, b) for a, b in zip(before_step, model.parameters()))
    if family == "gpt":
        # The residual width stays 32 everywhere; each MLP's hidden width halves; heads intact.
        assert model.tokens.weight.shape[1] == model.positions.weight.shape[1] == 32
        for block in model.blocks:
            assert block.ln1.normalized_shape == block.ln2.normalized_shape == (32,)
            assert block.attn.qkv.weight.shape == (96, 32) and block.attn.heads == 4
            assert block.mlp[0].out_features == block.mlp[2].in_features == 64
        assert "MLP hidden" in report["note"]


def test_channel_taylor_runs_on_gpt(plugins):
    model, data = build(plugins, "gpt")
    pruner = plugins.build("pruner", "channel", {"importance": "taylor", "ratio": 0.25})
    model = pruner.apply(model, ctx(data, n=4))
    assert model.blocks[0].mlp[0].out_features == 96
    assert model(data.train.tensors[0][:2]).shape == (2, 16, 50)


def test_channel_skip_round_to_and_errors(plugins):
    model, data = build(plugins, "mlp", params={"hidden": [30, 30]})
    pruner = plugins.build("pruner", "channel", {"ratio": 0.5, "skip": ["fc1"], "round_to": 8})
    model = pruner.apply(model, ctx(data))
    assert model.fc1.out_features == 30  # skipped
    assert model.fc2.out_features % 8 == 0 and model.fc2.out_features < 30
    assert model.head.out_features == 5
    with pytest.raises(ValueError, match="not modules"):
        plugins.build("pruner", "channel", {"skip": ["nope"]}).apply(build(plugins, "mlp")[0], ctx(data))
    with pytest.raises(ConfigError, match="ratio"):
        plugins.build("pruner", "channel", {"ratio": 1.0})
    # Taylor needs the calibration labels when the inputs are not the first training examples.
    shuffled = CompressionContext(data, data.train.tensors[0][[3, 1, 2]], None, 0)
    with pytest.raises(ValueError, match="calibration_targets"):
        plugins.build("pruner", "channel", {"importance": "taylor"}).apply(build(plugins, "mlp")[0], shuffled)


def test_the_pinned_torch_pruning_is_installed():
    from importlib.metadata import version

    # channel pruning relies on Torch-Pruning's group API, which changes between minor versions.
    assert version("torch-pruning") == "1.6.1"
