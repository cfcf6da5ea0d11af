"""Per-layer pruning sensitivity: which layers tolerate sparsity, before choosing a recipe.

As in Han et al. (NeurIPS 2015) and Intel's Distiller: each prunable layer is pruned alone,
by weight magnitude, at a sweep of sparsities, and the model is scored on the validation
split without fine-tuning. Layers whose metric holds up can take more sparsity; the curve of
each layer is the report. The test split is never used here, since the analysis informs
choices (per-layer sparsities) that the test must later judge.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pandas as pd
from torch import nn
from torch.nn.utils import prune

from .contracts import Task, TaskData
from .training import predict

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def layer_sensitivity(model: nn.Module, data: TaskData, task: Task,
                      sparsities: Sequence[float]) -> pd.DataFrame:
    """One row per (layer, sparsity): the layer's weight count, the validation metric and its
    change from the dense model (sign such that a positive ``drop`` is always worse)."""
    if not sparsities or any(not 0 <= s < 1 for s in sparsities):
        raise ValueError(f"sparsities must be in [0, 1), got {list(sparsities)}")
    sparsities = sorted({0.0, *map(float, sparsities)})  # 0%: the dense model, for reference
    layers = [name for name, m in model.named_modules() if isinstance(m, PRUNABLE)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv layer to prune")
    x, y = data.val.tensors
    dense = task.score(predict(model, x), y)
    sign = 1 if task.higher_is_better else -1
    rows = []
    for name in layers:
        for sparsity in sparsities:
            pruned = copy.deepcopy(model)
            layer = pruned.get_submodule(name)
            prune.l1_unstructured(layer, "weight", amount=float(sparsity))
            score = task.score(predict(pruned, x), y)
            rows.append({"layer": name, "weights": layer.weight.numel(), "sparsity": float(sparsity),
                         f"val_{task.metric}": score, "drop": sign * (dense - score)})
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame, metric: str) -> str:
    """Layers as rows, sparsities as columns, the validation metric in the cells."""
    wide = table.pivot(index="layer", columns="sparsity", values=f"val_{metric}")
    wide = wide.loc[list(dict.fromkeys(table["layer"]))]  # model order, not alphabetical
    weights = table.groupby("layer")["weights"].first()
    percent = metric.endswith("accuracy")
    fmt = (lambda v: f"{100 * v:.2f}") if percent else (lambda v: f"{v:.4f}")
    header = ["layer", "weights"] + [f"{int(round(100 * s))}%" for s in wide.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for layer, values in wide.iterrows():
        lines.append("| " + " | ".join([layer, f"{weights[layer]:,}"] + [fmt(v) for v in values]) + " |")
    return "\n".join(lines) + "\n"


def plot(table: pd.DataFrame, metric: str, path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for layer, rows in table.groupby("layer", sort=False):
        ax.plot(100 * rows["sparsity"], rows[f"val_{metric}"], marker="o", label=layer)
    ax.set_xlabel("sparsity of the layer (%)")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("Per-layer pruning sensitivity (magnitude, no fine-tuning)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
