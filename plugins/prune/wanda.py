"""Pruner ``wanda``: pruning by weights and activations (Wanda).

Sun, Liu, Bair and Kolter, "A Simple and Effective Pruning Approach for Large Language
Models", ICLR 2024. Each weight of a Linear layer is scored ``|W_ij| * ||X_j||_2``, where
``||X_j||_2`` is the L2 norm of input feature ``j`` over every calibration row (every token of
every sequence), and in each output row (the paper's comparison group) the
``int(sparsity * in_features)`` lowest-scoring weights are set to zero. No weight is updated.

Deviations: the statistics of all layers come from one pass of the calibration inputs
through the dense model (the paper's description); the reference code instead prunes
transformer blocks one after another, feeding each block the outputs of the already pruned
ones. ``skip`` defaults to nothing, so the classifier / LM head is pruned too; the paper
leaves the LM head dense (``skip: [head]`` for kdbench's gpt). Conv layers are left dense
(their inputs are not collected); ``report()`` names them and the skipped layers in
``skipped_layers``, and gives ``overall_sparsity`` over all Linear and Conv weights next to
``weight_sparsity`` over the pruned ones. Masks are kept through ``torch.nn.utils.prune`` so
zeros survive fine-tuning; dense kernels still run over the zeros, so it is not faster
(``materialized = False``).

Example: ``[{prune: {name: wanda, sparsity: 0.5, skip: [head]}}, {finetune: {epochs: 3}}]``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn.utils import prune

from kdbench import hookimpl
from kdbench.calibration import input_stats, linear_layers
from kdbench.contracts import CompressionContext, Pruner
from kdbench_plugins.prune.magnitude import PRUNABLE, sparsity_report


def wanda_scores(model: nn.Module, layers: dict[str, nn.Linear],
                 calibration: torch.Tensor) -> dict[str, torch.Tensor]:
    """``|W| * ||X_j||_2`` per weight of each layer (float64, on the CPU)."""
    device = next(iter(layers.values())).weight.device
    stats = input_stats(model, layers, calibration.to(device))
    return {name: layers[name].weight.detach().cpu().double().abs() * stats[name].sq_norm.sqrt()
            for name in layers}


def row_masks(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask dropping the ``int(sparsity * columns)`` lowest scores of every row."""
    k = int(sparsity * scores.shape[1])
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        keep.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, False)
    return keep


class Wanda(Pruner):
    __doc__ = __doc__
    name = "wanda"
    description = ("Wanda: prune Linear weights by |W| x input-activation norm, per output row, "
                   "from calibration inputs (Sun et al., ICLR 2024)")
    materialized = False

    @dataclasses.dataclass(frozen=True)
    class Params:
        sparsity: float = 0.5
        skip: tuple[str, ...] = ()  # module paths left dense (the paper: the LM head)

        def __post_init__(self):
            if not 0 <= self.sparsity < 1:
                raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")

    def apply(self, model: nn.Module, context: CompressionContext) -> nn.Module:
        if not any(isinstance(m, nn.Linear) for m in model.modules()):
            raise ValueError("wanda prunes Linear layers; the model has none (use magnitude or nm "
                             "with score: magnitude for conv layers)")
        layers = linear_layers(model, tuple(self.params.skip))
        if not layers:
            raise ValueError(f"wanda: skip {list(self.params.skip)} leaves no Linear layer to prune")
        scores = wanda_scores(model, layers, context.calibration)
        for name, layer in layers.items():
            mask = row_masks(scores[name], self.params.sparsity)
            prune.custom_from_mask(layer, "weight", mask.to(layer.weight.device))
        # Conv layers stay dense: their inputs are not collected, so they have no Wanda score.
        dense = {name: "listed in skip" if isinstance(m, nn.Linear) else
                 f"{type(m).__name__}: wanda scores Linear layers only"
                 for name, m in model.named_modules() if isinstance(m, PRUNABLE) and name not in layers}
        self._report = {**sparsity_report(model, layers, dense), "layers": sorted(layers),
                        "skipped": sorted(self.params.skip), "calibration_rows": len(context.calibration)}
        return model

    def report(self):
        return getattr(self, "_report", {})


@hookimpl
def kdbench_register_pruners(register):
    register(Wanda)
