"""Per-layer pruning sensitivity: the sweep, its table and plot, the command."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from kdbench.cli import main
from kdbench.contracts import TaskData
from kdbench.sensitivity import layer_sensitivity, to_markdown


def test_each_layer_is_pruned_alone_and_scored_on_validation(plugins):
    task = plugins.build("task", "digits")
    torch.manual_seed(0)
    x = torch.randn(200, 4)
    y = (x[:, 0] > 0).long()  # only input 0 matters
    model = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[5.0, 0.1, 0.1, 0.1], [-5.0, 0.1, 0.1, 0.1]]))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[-1.0, 1.0], [1.0, -1.0]]))
        model[2].bias.zero_()
    empty = TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    data = TaskData(empty, TensorDataset(x, y), empty, (4,), 2)
    table = layer_sensitivity(model, data, task, [0.5, 0.75])
    assert list(table["layer"]) == ["0"] * 3 + ["2"] * 3
    assert list(table["sparsity"]) == [0.0, 0.5, 0.75] * 2
    assert (table[table.sparsity == 0]["val_accuracy"] == 1.0).all()
    # Layer 0: the 0.1 weights go first; at 75% the two 5.0s survive, so nothing is lost.
    assert table.iloc[2]["drop"] == 0
    # Layer 2: at 75% only one of the four weights is left, so one class is never predicted.
    assert table.iloc[5]["drop"] > 0.3
    text = to_markdown(table, "accuracy")
    assert text.splitlines()[0] == "| layer | weights | 0% | 50% | 75% |"
    assert "| 0 | 8 | 100.00 |" in text
    with pytest.raises(ValueError, match=r"sparsities must be in \[0, 1\)"):
        layer_sensitivity(model, data, task, [1.0])


def test_the_sensitivity_command_writes_table_csv_and_plot(tiny_yaml, tmp_path, capsys):
    out = tmp_path / "sens"
    assert main(["sensitivity", str(tiny_yaml()), "--sparsities", "0.5,0.9", "--output", str(out)]) == 0
    assert (out / "sensitivity.png").stat().st_size > 1000
    md = (out / "sensitivity.md").read_text()
    assert "| layer | weights | 0% | 50% | 90% |" in md and "| fc1 |" in md
    assert main(["sensitivity", str(tiny_yaml()), "--pair", "3"]) == 2
    assert "--pair 3 is out of range: the experiment has 1" in capsys.readouterr().err
    assert main(["sensitivity", str(tiny_yaml()), "--sparsities", "half"]) == 2


@pytest.mark.parametrize("flag", ["--cache-dir", "--output"])
def test_the_sensitivity_command_tries_the_folders_it_writes_before_training(tiny_yaml, tmp_path, capsys,
                                                                             isolated_cache, flag):
    path = tiny_yaml()
    assert main(["sensitivity", str(path), flag, str(path / "sub")]) == 2
    assert f"{flag} {path / 'sub'}: {path} is a file, not a folder" in capsys.readouterr().err
    assert not isolated_cache.exists()  # no teacher was trained
