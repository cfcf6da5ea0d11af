"""Calibration statistics that activation-aware compressors share."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdbench.calibration import input_stats, linear_layers


def test_input_stats_are_the_gram_and_abs_sums_of_every_input_row():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).train()
    x = torch.randn(10, 5, 3)  # sequences: every position is a row
    stats = input_stats(model, linear_layers(model), x, batch_size=4)
    assert model.training  # mode restored
    rows = x.reshape(-1, 3).double()
    assert stats["0"].rows == 50
    assert torch.allclose(stats["0"].gram, rows.T @ rows)
    assert torch.allclose(stats["0"].abs_sum, rows.abs().sum(0))
    hidden = torch.relu(model[0](x)).reshape(-1, 4).double()
    assert torch.allclose(stats["2"].sq_norm, (hidden ** 2).sum(0), rtol=1e-6)
    assert torch.allclose(stats["2"].hessian, 2 * hidden.T @ hidden / 50, rtol=1e-6)
    assert not model[0]._forward_pre_hooks  # hooks removed


def test_unknown_skips_and_empty_calibration_are_clear_errors():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"skip 'fc' matches none of the Linear layers: 0, 2"):
        linear_layers(model, skip=("fc",))
    assert list(linear_layers(model, skip=("2",))) == ["0"]
    with pytest.raises(ValueError, match="calibration_size"):
        input_stats(model, linear_layers(model), torch.zeros(0, 3))


def test_skip_takes_shell_patterns():
    from kdbench.calibration import linear_layers

    model = nn.ModuleDict({"attn": nn.ModuleDict({"q": nn.Linear(2, 2), "k": nn.Linear(2, 2)}),
                           "mlp": nn.Linear(2, 2), "head": nn.Linear(2, 2)})
    assert sorted(linear_layers(model, ("attn.*", "head"))) == ["mlp"]
