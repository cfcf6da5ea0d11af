"""Pruner ``magnitude``: unstructured magnitude pruning of Linear and Conv weights.

Han, Pool, Tran and Dally, "Learning both Weights and Connections for Efficient Neural
Networks", NeurIPS 2015. The smallest-magnitude weights are set to zero, globally across
layers or per layer. Masks are kept through ``torch.nn.utils.prune`` so the zeros stay zero
through later fine-tuning; the core makes them permanent before measuring.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from torch import nn
from torch.nn.utils import prune

from kdbench import hookimpl
from kdbench.calibration import skipped
from kdbench.contracts import CompressionContext, Pruner

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_weights(model: nn.Module, skip: tuple[str, ...] = ()) -> list[tuple[nn.Module, str]]:
    found = {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE)}
    left_out = skipped(found, skip, "Linear or Conv layers")
    return [(m, "weight") for name, m in found.items() if name not in left_out]


def sparsity_report(model: nn.Module, pruned: dict[str, nn.Module],
                    skipped: dict[str, str]) -> dict[str, object]:
    """The zeros a pruner left: ``weight_sparsity`` over the layers it pruned,
    ``overall_sparsity`` over every Linear/Conv weight of the model (layers left dense
    included, so a reader sees what they cost), and ``skipped_layers``, module path -> why
    the layer was left dense."""
    everything = [m for m in model.modules() if isinstance(m, PRUNABLE)]
    zeros = sum(int((m.weight == 0).sum()) for m in pruned.values())
    total = sum(m.weight.numel() for m in pruned.values())
    all_zeros = sum(int((m.weight == 0).sum()) for m in everything)
    all_total = sum(m.weight.numel() for m in everything)
    return {"weight_sparsity": zeros / total if total else 0.0,
            "overall_sparsity": all_zeros / all_total if all_total else 0.0,
            "skipped_layers": dict(sorted(skipped.items()))}


class Magnitude(Pruner):
    name = "magnitude"
    description = "unstructured L1-magnitude pruning of weights to a target sparsity, global or per layer"
    # Masks: dense kernels still multiply the zeros, so it is not faster. (The harness ships
    # matrices in CSR form where that is smaller, so the file can shrink at high sparsity.)
    materialized = False

    @dataclasses.dataclass(frozen=True)
    class Params:
        sparsity: float = 0.5
        scope: Literal["global", "layer"] = "global"
        skip: tuple[str, ...] = ()  # module paths or shell patterns left dense (an LM head, say)

        ADDED_LATER: ClassVar[tuple[str, ...]] = ("skip",)  # see Ref.spec

        def __post_init__(self):
            if not 0 <= self.sparsity < 1:
                raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")

    def apply(self, model: nn.Module, context: CompressionContext) -> nn.Module:
        found = {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE)}
        left_out = skipped(found, self.params.skip, "Linear or Conv layers")
        pruned = {name: m for name, m in found.items() if name not in left_out}
        targets = [(m, "weight") for m in pruned.values()]
        if not targets:
            raise ValueError("magnitude pruning found no Linear or Conv layer to prune")
        if self.params.scope == "global":
            prune.global_unstructured(targets, pruning_method=prune.L1Unstructured,
                                      amount=self.params.sparsity)
        else:
            for module, attr in targets:
                prune.l1_unstructured(module, attr, amount=self.params.sparsity)
        self._report = sparsity_report(model, pruned, {name: "listed in skip" for name in left_out})
        return model

    def report(self):
        return getattr(self, "_report", {})


@hookimpl
def kdbench_register_pruners(register):
    register(Magnitude)
