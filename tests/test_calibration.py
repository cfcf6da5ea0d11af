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


class GatedBlock(nn.Module):
    """The wiring of a Llama layer in miniature: q/k/v read one input, gate and up another."""

    def __init__(self, d=6):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.gate, self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        h = torch.tanh(x)
        a = self.o(torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2), -1) @ self.v(h))
        h = torch.tanh(x + a)
        return self.down(torch.sigmoid(self.gate(h)) * self.up(h))


def test_forward_groups_join_layers_that_read_the_same_input():
    from kdbench.calibration import forward_groups

    model = nn.Sequential(GatedBlock(), GatedBlock())
    groups, once = forward_groups(model, linear_layers(model), torch.randn(1, 4, 6))
    assert groups == [["0.q", "0.k", "0.v"], ["0.o"], ["0.gate", "0.up"], ["0.down"],
                      ["1.q", "1.k", "1.v"], ["1.o"], ["1.gate", "1.up"], ["1.down"]]
    assert once
    shared = nn.Sequential(model[0], model[0])  # one module called twice: no early stop
    assert forward_groups(shared, linear_layers(shared), torch.randn(1, 4, 6))[1] is False


def test_early_stop_gives_the_same_statistics_as_a_full_pass():
    torch.manual_seed(0)
    model = nn.Sequential(GatedBlock(), GatedBlock())
    x = torch.randn(8, 4, 6)
    wanted = {"0.gate": model[0].gate, "0.up": model[0].up}
    full = input_stats(model, wanted, x, batch_size=3)
    calls = []
    model[1].register_forward_pre_hook(lambda *_: calls.append(1))
    early = input_stats(model, wanted, x, batch_size=3, stop_early=True)
    assert not calls  # the second block never ran
    for name in wanted:
        assert early[name].rows == full[name].rows == 32
        assert torch.equal(early[name].gram, full[name].gram)
