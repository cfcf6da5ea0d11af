"""Pruner ``gradual``: automated gradual pruning interleaved with fine-tuning.

Zhu and Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model
compression", ICLR Workshop 2018 (arXiv:1710.01878). Sparsity rises from ``initial_sparsity``
to ``sparsity`` over ``steps`` pruning steps along the cubic schedule

    s_k = s_f + (s_i - s_f) * (1 - k / n) ** 3,   k = 1 .. n,

pruning fast while redundant weights abound and slowly near the target. Each step removes the
smallest-magnitude weights still alive (globally or per layer) and then fine-tunes for
``epochs_per_step`` epochs, with a distiller when ``distill`` names one (pruning with KD
fine-tuning), so the network recovers before the next cut. Masks persist through training.

Example recipe: ``[{distill: hinton}, {prune: {name: gradual, sparsity: 0.9, steps: 5,
epochs_per_step: 2, distill: hinton}}]``. Simulated like ``magnitude``: masks, so dense kernels still run over the zeros.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from torch import nn
from torch.nn.utils import prune

from kdbench import hookimpl
from kdbench.contracts import CompressionContext, FinetuneParams, Pruner
from kdbench_plugins.prune.magnitude import prunable_weights


def cubic_schedule(initial: float, final: float, steps: int) -> list[float]:
    """The cumulative sparsity after each of the ``steps`` pruning steps."""
    return [final + (initial - final) * (1 - k / steps) ** 3 for k in range(1, steps + 1)]


class Gradual(Pruner):
    name = "gradual"
    description = "automated gradual (cubic-schedule) magnitude pruning interleaved with fine-tuning, optionally distilled"
    materialized = False  # masks: dense kernels run over the zeros

    @dataclasses.dataclass(frozen=True)
    class Params(FinetuneParams):
        sparsity: float = 0.8
        initial_sparsity: float = 0.0
        steps: int = 4
        epochs_per_step: int = 1
        scope: Literal["global", "layer"] = "global"

        def __post_init__(self):
            super().__post_init__()
            if not 0 <= self.initial_sparsity <= self.sparsity < 1:
                raise ValueError(f"need 0 <= initial_sparsity <= sparsity < 1, got initial_sparsity="
                                 f"{self.initial_sparsity}, sparsity={self.sparsity}")
            if self.steps < 1 or self.epochs_per_step < 0:
                raise ValueError(f"steps must be >= 1 and epochs_per_step >= 0, got {self.steps}, "
                                 f"{self.epochs_per_step}")

    def apply(self, model: nn.Module, context: CompressionContext) -> nn.Module:
        p = self.params
        if p.epochs_per_step and (context is None or context.finetune is None):
            raise ValueError("gradual pruning fine-tunes between steps and needs a training run "
                             "(context.finetune); use it inside an experiment, or epochs_per_step: 0")
        targets = prunable_weights(model)
        if not targets:
            raise ValueError("gradual pruning found no Linear or Conv layer to prune")
        done, reached = 0.0, []
        for target in cubic_schedule(p.initial_sparsity, p.sparsity, p.steps):
            # torch's iterative pruning takes the fraction of the weights still alive.
            amount = (target - done) / (1 - done) if done < 1 else 0.0
            if p.scope == "global":
                prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
            else:
                for module, attr in targets:
                    prune.l1_unstructured(module, attr, amount=amount)
            done = target
            zeros = sum(int((m.weight == 0).sum()) for m, _ in targets)
            reached.append(zeros / sum(m.weight.numel() for m, _ in targets))
            if p.epochs_per_step:
                context.finetune(model, p.epochs_per_step, p.distill)
        self._report = {"schedule": reached, "weight_sparsity": reached[-1],
                        "finetune_epochs": p.steps * p.epochs_per_step}
        return model

    def report(self):
        return getattr(self, "_report", {})

    @classmethod
    def finetune_schedule(cls, params: Params) -> list[tuple[int, object]]:
        """One fine-tuning call after each pruning step (see ``apply``)."""
        return [(params.epochs_per_step, params.distill)] * params.steps if params.epochs_per_step else []


@hookimpl
def kdbench_register_pruners(register):
    register(Gradual)
