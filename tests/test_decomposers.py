"""Low-rank decomposers: svd (energy rule), asvd, tucker and cp, checked against plain torch."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import tensorly as tl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from kdbench.contracts import CompressionContext, TaskData
from kdbench.errors import ConfigError
from kdbench.measure import count_parameters


def task(shape, n=16, classes=5, vocab=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (n, *shape), generator=g) if vocab else torch.randn(n, *shape, generator=g)
    y = torch.randint(0, classes, (n, *shape) if vocab else (n,), generator=g)
    ds = TensorDataset(x, y)
    return TaskData(ds, ds, ds, tuple(shape), vocab or classes, vocab_size=vocab)


def context(data, calibration=None):
    calibration = data.train.tensors[0] if calibration is None else calibration
    return CompressionContext(data=data, calibration=calibration, teacher=None, seed=0)


def orthonormal(n, k, seed):
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def known_spectrum_layer(s, n_in=16, n_out=16):
    """A Linear whose weight is ``U diag(s) V^T`` with the chosen singular values."""
    u, v = orthonormal(n_out, len(s), 1), orthonormal(n_in, len(s), 2)
    w = u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T
    layer = nn.Linear(n_in, n_out)
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer, u, v


def one_layer(layer):
    return nn.Sequential(OrderedDict(fc=layer))


# ---------------------------------------------------------------- svd
# s^2 = 16, 9, 4, 1, 0.25 (sum 30.25): cumulative fractions 16/30.25 = 0.529, 25/30.25 = 0.826,
# 29/30.25 = 0.9587, 30/30.25 = 0.9917, 1.
SPECTRUM = [4.0, 3.0, 2.0, 1.0, 0.5]


@pytest.mark.parametrize("energy, rank", [(0.5, 1), (0.8, 2), (0.9, 3), (0.958, 3), (0.96, 4), (0.99, 4), (0.992, 5), (1.0, 5)])
def test_svd_energy_picks_the_rank_computed_by_hand(plugins, energy, rank):
    layer, u, v = known_spectrum_layer(SPECTRUM)
    model = one_layer(layer)
    decomposer = plugins.build("decomposer", "svd", {"energy": energy})
    decomposer.apply(model, context(task((16,))))
    assert decomposer.report()["ranks"] == {"fc": rank}
    first, second = model.fc
    # Eckart-Young: the kept factors are the leading singular triplets.
    s = torch.tensor(SPECTRUM[:rank], dtype=torch.float64)
    expected = u[:, :rank] @ torch.diag(s) @ v[:, :rank].T
    assert torch.allclose((second.weight @ first.weight).double(), expected, atol=1e-5)
    kept = sum(x * x for x in SPECTRUM[:rank]) / sum(x * x for x in SPECTRUM)
    assert decomposer.report()["layers"]["fc"]["energy_kept"] == pytest.approx(kept, rel=1e-6)


def test_svd_at_full_rank_reproduces_the_outputs(plugins):
    from kdbench_plugins.decompose.svd import factorize

    torch.manual_seed(0)
    dense = nn.Linear(20, 12)
    x = torch.randn(7, 20)
    assert torch.allclose(factorize(dense, 12)(x), dense(x), atol=1e-5)
    # Through the plugin: energy 1 keeps the weight's whole rank (5 of 16) and the layer.
    layer, _, _ = known_spectrum_layer(SPECTRUM)
    x = torch.randn(9, 16)
    reference = layer(x)
    model = plugins.build("decomposer", "svd", {"energy": 1.0}).apply(one_layer(layer), context(task((16,))))
    assert isinstance(model.fc, nn.Sequential)
    assert torch.allclose(model(x), reference, atol=1e-5)


def test_svd_reports_ranks_and_parameters_before_and_after(plugins):
    data = task((64,))
    torch.manual_seed(0)
    model = plugins.build("model", "mlp", {"hidden": [48, 40]}).build(data)
    before = count_parameters(model)[0]
    decomposer = plugins.build("decomposer", "svd", {"rank_ratio": 0.25})
    out_shape = model(data.train.tensors[0]).shape
    decomposer.apply(model, context(data))
    report = decomposer.report()
    # fc1 64->48: r=12; fc2 48->40: r=10; head 40->5: r=1 would save 200-45 -> replaced too.
    assert report["ranks"] == {"fc1": 12, "fc2": 10, "head": 1}
    assert report["layers"]["fc1"] == pytest.approx(
        {"rank": 12, "params_before": 64 * 48 + 48, "params_after": 12 * (64 + 48) + 48,
         "energy_kept": report["layers"]["fc1"]["energy_kept"]})
    assert report["params_before"] == before
    assert report["params_after"] == count_parameters(model)[0] < before
    assert model(data.train.tensors[0]).shape == out_shape


def test_svd_default_and_rank_rule_validation(plugins):
    from kdbench_plugins.decompose.svd import SVD

    assert SVD.Params().rank_ratio == 0.25 and SVD.Params().energy is None
    assert SVD.Params(energy=0.9).rank_ratio is None
    with pytest.raises(ValueError, match="either rank_ratio or energy"):
        SVD.Params(rank_ratio=0.5, energy=0.9)
    with pytest.raises(ValueError, match="energy must be in"):
        SVD.Params(energy=1.5)
    with pytest.raises(ConfigError, match="either rank_ratio or energy"):
        plugins.build("decomposer", "svd", {"rank_ratio": 0.5, "energy": 0.9})


# ---------------------------------------------------------------- asvd
def anisotropic(n_in=32, n_out=24, rows=256):
    """A random layer and inputs whose feature scales span three decades."""
    g = torch.Generator().manual_seed(3)
    layer = nn.Linear(n_in, n_out)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n_out, n_in, generator=g))
    scales = torch.logspace(-2, 1, n_in)[torch.randperm(n_in, generator=g)]
    return layer, torch.randn(rows, n_in, generator=g) * scales


def test_asvd_beats_svd_on_the_calibration_outputs_and_matches_the_formula(plugins):
    layer, x = anisotropic()
    reference = layer(x).detach()
    errors = {}
    for name in ("svd", "asvd"):
        model = one_layer(nn.Linear(32, 24))
        model.fc.load_state_dict(layer.state_dict())
        plugins.build("decomposer", name, {"rank_ratio": 0.25}).apply(model, context(task((32,)), x))
        assert model.fc[0].out_features == 6
        errors[name] = (torch.linalg.matrix_norm(model(x) - reference) / torch.linalg.matrix_norm(reference)).item()
        if name == "asvd":
            # Paper's formula in float64: S = mean|X|^0.5, truncate svd(W S), fold S^-1 back.
            s = x.double().abs().mean(0) ** 0.5
            u, sv, vh = torch.linalg.svd(layer.weight.detach().double() * s, full_matrices=False)
            expected = (u[:, :6] * sv[:6]) @ vh[:6] / s
            assert torch.allclose((model.fc[1].weight @ model.fc[0].weight).double(), expected, atol=1e-4)
    assert errors["asvd"] < 0.5 * errors["svd"], errors


def test_asvd_at_full_rank_reproduces_the_layer(plugins):
    from kdbench_plugins.decompose.svd import factorize

    layer, x = anisotropic()
    scale = x.abs().mean(0) ** 0.5
    assert torch.allclose(factorize(layer, 24, input_scale=scale)(x), layer(x), atol=1e-4)
    # Through the plugin, energy 1 on a rank-5 weight: replaced and still exact.
    layer, _, _ = known_spectrum_layer(SPECTRUM, n_in=32, n_out=24)
    x = x[:, :32]
    model = plugins.build("decomposer", "asvd", {"energy": 1.0}).apply(one_layer(layer), context(task((32,)), x))
    assert model.fc[0].out_features == 5
    assert torch.allclose(model(x), layer(x), atol=1e-4)


def test_asvd_clamps_inputs_that_are_never_active(plugins):
    layer, _, _ = known_spectrum_layer(SPECTRUM, n_in=32, n_out=24)
    _, x = anisotropic()
    x[:, :4] = 0  # four dead inputs: mean |X| = 0
    decomposer = plugins.build("decomposer", "asvd", {"energy": 1.0})
    model = decomposer.apply(one_layer(layer), context(task((32,)), x))
    first = model.fc[0].weight
    assert torch.isfinite(first).all() and first.abs().max() < 1e3
    assert torch.allclose(model(x), layer(x), atol=1e-4)
    assert decomposer.report()["unscaled"] == []


def test_asvd_falls_back_to_plain_svd_for_a_layer_calibration_never_reaches(plugins):
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    model = TwoHeads()
    weight = model.unused.weight.detach().clone()
    decomposer = plugins.build("decomposer", "asvd", {"rank_ratio": 0.25})
    decomposer.apply(model, context(task((16,))))
    assert decomposer.report()["unscaled"] == ["unused"]
    u, s, vh = torch.linalg.svd(weight.double())
    plain = (u[:, :4] * s[:4]) @ vh[:4]
    assert torch.allclose((model.unused[1].weight @ model.unused[0].weight).double(), plain, atol=1e-5)


@pytest.mark.parametrize("family, params, data", [
    ("mlp", {"hidden": [48]}, lambda: task((64,))),
    ("gpt", {"layers": 1, "width": 32, "heads": 2, "context": 8}, lambda: task((8,), n=8, vocab=17)),
])
def test_svd_and_asvd_shrink_each_linear_family(plugins, family, params, data):
    data = data()
    for name in ("svd", "asvd"):
        torch.manual_seed(0)
        model = plugins.build("model", family, params).build(data)
        x = data.train.tensors[0]
        shape, before = model(x).shape, count_parameters(model)[0]
        decomposer = plugins.build("decomposer", name, {"rank_ratio": 0.25})
        decomposer.apply(model, context(data))
        assert decomposer.materialized and decomposer.trainable_after
        assert model(x).shape == shape
        assert count_parameters(model)[0] == decomposer.report()["params_after"] < before
        assert any(r is not None for r in decomposer.report()["ranks"].values())


def test_linear_decomposers_reject_conv_only_models_and_unknown_skips(plugins):
    conv_only = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())
    for name in ("svd", "asvd"):
        with pytest.raises(ValueError, match="Linear layers; the model has none"):
            plugins.build("decomposer", name).apply(conv_only, context(task((1, 5, 5))))
        with pytest.raises(ValueError, match="matches none of the"):
            plugins.build("decomposer", name, {"skip": ["fc9"]}).apply(one_layer(nn.Linear(4, 4)), context(task((4,))))


# ---------------------------------------------------------------- tucker / cp
def conv(cin, cout, kernel, seed=0, **kw):
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, kernel, **kw).double()


CONV_SETUPS = [  # (kernel, conv options): strides, paddings, dilation and padding modes to carry over
    (3, {"padding": 1}),
    ((3, 5), {"stride": (2, 1), "padding": (1, 2), "dilation": (1, 2)}),
    (3, {"padding": 1, "padding_mode": "reflect", "bias": False}),
    (3, {"padding": "same"}),
]


@pytest.mark.parametrize("kernel, options", CONV_SETUPS)
def test_tucker_at_full_ranks_reproduces_the_conv(kernel, options):
    from kdbench_plugins.decompose.tensor import tucker_convs, tucker_factors

    layer = conv(5, 6, kernel, **options)
    core, u_out, u_in = tucker_factors(layer.weight, 6, 5)
    chain = tucker_convs(layer, core, u_out, u_in)
    x = torch.randn(2, 5, 11, 13, dtype=torch.float64)
    # float64 throughout: the chain equals the conv up to rounding (HOOI at full rank is exact).
    assert torch.allclose(chain(x), layer(x), atol=1e-8)
    assert [m.kernel_size for m in chain] == [(1, 1), layer.kernel_size, (1, 1)]


@pytest.mark.parametrize("kernel, options", CONV_SETUPS)
def test_cp_chain_computes_the_factors_kernel_and_recovers_a_low_rank_conv(kernel, options):
    from kdbench_plugins.decompose.tensor import cp_convs, cp_factors

    layer = conv(5, 6, kernel, **options)
    kh, kw = layer.kernel_size
    g = torch.Generator().manual_seed(1)
    truth = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (6, 5, kh, kw)]
    with torch.no_grad():  # an exactly rank-3 kernel
        layer.weight.copy_(torch.einsum("or,ir,yr,xr->oiyx", *truth))
    factors = cp_factors(layer.weight, 3, iterations=500)
    rebuilt = torch.einsum("or,ir,yr,xr->oiyx", *factors)
    # Our einsum agrees with tensorly's own reconstruction of the same factors.
    reference = tl.cp_to_tensor((torch.ones(3, dtype=torch.float64).numpy(), [f.numpy() for f in factors]))
    assert torch.allclose(rebuilt, torch.from_numpy(reference), atol=1e-10)
    assert (torch.linalg.vector_norm(rebuilt - layer.weight) / torch.linalg.vector_norm(layer.weight)) < 1e-4
    chain = cp_convs(layer, *factors)
    x = torch.randn(2, 5, 11, 13, dtype=torch.float64)
    # The four-conv chain is exactly a conv with the rebuilt kernel ...
    direct = F.conv2d(F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
                      if layer.padding_mode != "zeros" else x, rebuilt, layer.bias, layer.stride,
                      0 if layer.padding_mode != "zeros" else layer.padding, layer.dilation)
    assert torch.allclose(chain(x), direct, atol=1e-10)
    # ... and so reproduces the original conv within the CP fit's error.
    assert torch.allclose(chain(x), layer(x), atol=1e-3)
    assert [m.groups for m in chain] == [1, 3, 3, 1]


def test_tucker_kernel_matches_tensorly_reconstruction_and_beats_truncated_hosvd():
    from kdbench_plugins.decompose.tensor import tucker_factors

    w = conv(8, 10, 3).weight.detach()
    core, u_out, u_in = tucker_factors(w, 5, 4)
    rebuilt = torch.einsum("abyx,oa,ib->oiyx", core, u_out, u_in)
    reference = tl.tenalg.multi_mode_dot(core.numpy(), [u_out.numpy(), u_in.numpy()], modes=[0, 1])
    assert torch.allclose(rebuilt, torch.from_numpy(reference), atol=1e-10)
    assert torch.allclose(u_out.T @ u_out, torch.eye(5, dtype=torch.float64), atol=1e-8)
    # Truncated HOSVD by hand: leading left singular vectors of each channel unfolding.
    a = torch.linalg.svd(w.reshape(10, -1))[0][:, :5]
    b = torch.linalg.svd(w.transpose(0, 1).reshape(8, -1))[0][:, :4]
    hosvd = torch.einsum("oiyx,oa,ib,pa,qb->pqyx", w, a, b, a, b)
    err = torch.linalg.vector_norm(w - rebuilt)
    assert err <= torch.linalg.vector_norm(w - hosvd) * (1 + 1e-9)
    assert err < torch.linalg.vector_norm(w)


def tiny_cnn(plugins, data):
    torch.manual_seed(0)
    return plugins.build("model", "cnn", {"channels": [4, 8], "hidden": 16}).build(data)


def tiny_resnet(plugins, data):
    torch.manual_seed(0)
    return plugins.build("model", "resnet", {"arch": "resnet8"}).build(data)


CNN, RESNET = ("cnn", (1, 12, 12)), ("resnet", (3, 8, 8))


@pytest.mark.parametrize("name, params, family, shape", [
    ("tucker", {"rank_ratio": 0.5}, *CNN), ("tucker", {"energy": 0.9}, *CNN),
    ("cp", {"rank_ratio": 0.25}, *CNN), ("cp", {"rank": 4, "iterations": 10}, *CNN),
    ("tucker", {"rank_ratio": 0.5}, *RESNET), ("tucker", {"energy": 0.9}, *RESNET),
    ("cp", {"rank_ratio": 0.25}, *RESNET), ("cp", {"rank": 4, "iterations": 10}, *RESNET),
])
def test_tensor_decomposers_shrink_cnn_and_resnet_and_keep_them_running(plugins, name, params, family, shape):
    data = task(shape, n=8)
    model = (tiny_cnn if family == "cnn" else tiny_resnet)(plugins, data).eval()
    x = data.train.tensors[0]
    out, before = model(x), count_parameters(model)[0]
    decomposer = plugins.build("decomposer", name, params)
    assert decomposer.materialized and decomposer.trainable_after
    decomposer.apply(model, context(data))
    report = decomposer.report()
    assert model(x).shape == out.shape
    assert report["params_before"] == before
    assert report["params_after"] == count_parameters(model)[0] < before
    replaced = [n for n, e in report["layers"].items() if "kept" not in e]
    assert replaced
    for layer_name in replaced:
        chain, entry = model.get_submodule(layer_name), report["layers"][layer_name]
        assert isinstance(chain, nn.Sequential) and all(isinstance(m, nn.Conv2d) for m in chain)
        assert entry["params_after"] == sum(p.numel() for p in chain.parameters()) < entry["params_before"]
        assert 0 <= entry["kernel_error"] < 1
        ranks = entry["ranks"] if name == "tucker" else [entry["rank"]] * 2
        assert (chain[0].out_channels, chain[-1].in_channels) == (ranks[1], ranks[0])
    if family == "resnet":  # the 1x1 projection shortcuts are left alone
        assert report["kept"] == {"layer2.0.shortcut.0": "1x1 conv", "layer3.0.shortcut.0": "1x1 conv"}
        assert isinstance(model.layer2[0].shortcut[0], nn.Conv2d)


def test_tensor_decomposers_keep_a_conv_that_would_not_shrink_and_honour_skip(plugins):
    data = task((1, 12, 12), n=8)
    model = tiny_cnn(plugins, data)
    decomposer = plugins.build("decomposer", "tucker", {"rank_ratio": 1.0, "skip": ["block2.0"]})
    decomposer.apply(model, context(data))
    report = decomposer.report()
    assert report["kept"] == {"block2.0": "skip"}
    # block1: 1 -> 4 channels, 3x3: 1*1 + 1*4*9 + 4*4 = 53 >= 36 (+4 bias is on both sides).
    assert report["layers"]["block1.0"]["kept"] == "not smaller"
    assert isinstance(model.block1[0], nn.Conv2d) and isinstance(model.block2[0], nn.Conv2d)


def test_tensor_decomposers_explain_models_without_eligible_convs(plugins):
    data = task((64,))
    mlp = plugins.build("model", "mlp", {"hidden": [8]}).build(data)
    only_thin = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, groups=4))
    for name in ("tucker", "cp"):
        with pytest.raises(ValueError, match="use svd"):
            plugins.build("decomposer", name).apply(mlp, context(data))
        with pytest.raises(ValueError, match="grouped conv"):
            plugins.build("decomposer", name).apply(only_thin, context(data))
        with pytest.raises(ValueError, match="not Conv2d layers"):
            plugins.build("decomposer", name, {"skip": ["nope"]}).apply(only_thin, context(data))


def test_tensor_rank_rule_validation(plugins):
    with pytest.raises(ConfigError, match="either rank_ratio or energy"):
        plugins.build("decomposer", "tucker", {"rank_ratio": 0.5, "energy": 0.9})
    with pytest.raises(ConfigError, match="either rank_ratio or rank"):
        plugins.build("decomposer", "cp", {"rank_ratio": 0.5, "rank": 4})
    with pytest.raises(ConfigError, match="rank must be a positive"):
        plugins.build("decomposer", "cp", {"rank": 0})
    assert plugins.build("decomposer", "tucker").params.rank_ratio == 0.5
    assert plugins.build("decomposer", "cp").params.rank_ratio == 0.25


def test_tensorly_backend_is_left_as_found(plugins):
    data = task((1, 12, 12), n=8)
    tl.set_backend("pytorch")
    try:
        plugins.build("decomposer", "cp", {"rank": 2, "iterations": 5}).apply(tiny_cnn(plugins, data), context(data))
        assert tl.get_backend() == "pytorch"
    finally:
        tl.set_backend("numpy")
    plugins.build("decomposer", "tucker").apply(tiny_cnn(plugins, data), context(data))
    assert tl.get_backend() == "numpy"
