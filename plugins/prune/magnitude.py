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
        targets = prunable_weights(model, self.params.skip)
        if not targets:
            raise ValueError("magnitude pruning found no Linear or Conv layer to prune")
        if self.params.scope == "global":
            prune.global_unstructured(targets, pruning_method=prune.L1Unstructured,
                                      amount=self.params.sparsity)
        else:
            for module, attr in targets:
                prune.l1_unstructured(module, attr, amount=self.params.sparsity)
        zeros = sum(int((m.weight == 0).sum()) for m, _ in targets)
        total = sum(m.weight.numel() for m, _ in targets)
        self._report = {"weight_sparsity": zeros / total}
        return model

    def report(self):
        return getattr(self, "_report", {})


@hookimpl
def kdbench_register_pruners(register):
    register(Magnitude)
