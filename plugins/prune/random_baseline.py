"""Pruner ``random``: unstructured random pruning of Linear and Conv weights, the baseline.

The control every pruning study needs (e.g. Blalock, Gonzalez Ortiz, Frankle and Guttag,
"What is the State of Neural Network Pruning?", MLSys 2020, and the random-pruning baselines
of Liu et al., "The Unreasonable Effectiveness of Random Pruning", ICLR 2022): weights are
removed uniformly at random, ignoring their values, to the same ``sparsity`` and ``scope``
as ``magnitude``. With ``scope: global`` the count is taken over all layers together (so
each layer ends up near, not exactly at, the target); with ``scope: layer`` every layer
loses exactly ``round(sparsity * numel)`` weights. The draw comes from a generator seeded
with the cell's seed: the same seed gives the same mask. Masks are kept through
``torch.nn.utils.prune`` so the zeros stay zero through fine-tuning.

Example: ``[{prune: {name: random, sparsity: 0.5}}, {finetune: {epochs: 3}}]``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import prune

from kdbench import hookimpl
from kdbench.contracts import CompressionContext, Pruner
from kdbench_plugins.prune.magnitude import prunable_weights


def random_masks(weights: list[torch.Tensor], sparsity: float, scope: str,
                 generator: torch.Generator) -> list[torch.Tensor]:
    """One keep-mask per weight: the ``round(sparsity * n)`` entries with the lowest uniform
    random score are dropped, over all weights together (global) or per weight (layer)."""
    def drop_lowest(scores: torch.Tensor) -> torch.Tensor:
        k = round(sparsity * scores.numel())
        keep = torch.ones(scores.numel(), dtype=torch.bool)
        if k:
            keep[torch.topk(scores, k, largest=False).indices] = False
        return keep

    scores = [torch.rand(w.numel(), generator=generator) for w in weights]
    if scope == "global":
        flat = drop_lowest(torch.cat(scores))
        return [m.view_as(w.detach().cpu()) for m, w in
                zip(torch.split(flat, [w.numel() for w in weights]), weights)]
    return [drop_lowest(s).view_as(w.detach().cpu()) for s, w in zip(scores, weights)]


class RandomPruner(Pruner):
    __doc__ = __doc__
    name = "random"
    description = "unstructured random pruning of Linear and Conv weights to a target sparsity (the baseline)"
    # Masks: dense kernels still multiply the zeros, so it is not faster.
    materialized = False

    @dataclasses.dataclass(frozen=True)
    class Params:
        sparsity: float = 0.5
        scope: Literal["global", "layer"] = "global"

        def __post_init__(self):
            if not 0 <= self.sparsity < 1:
                raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
            if self.scope not in ("global", "layer"):
                raise ValueError(f"scope must be 'global' or 'layer', got {self.scope!r}")

    def apply(self, model: nn.Module, context: CompressionContext) -> nn.Module:
        targets = prunable_weights(model)
        if not targets:
            raise ValueError("random pruning found no Linear or Conv layer to prune")
        generator = torch.Generator().manual_seed(context.seed)
        masks = random_masks([m.weight for m, _ in targets], self.params.sparsity,
                             self.params.scope, generator)
        for (module, attr), mask in zip(targets, masks):
            prune.custom_from_mask(module, attr, mask.to(module.weight.device))
        zeros = sum(int((m.weight == 0).sum()) for m, _ in targets)
        total = sum(m.weight.numel() for m, _ in targets)
        self._report = {"weight_sparsity": zeros / total, "scope": self.params.scope,
                        "seed": context.seed}
        return model

    def report(self):
        return getattr(self, "_report", {})


@hookimpl
def kdbench_register_pruners(register):
    register(RandomPruner)
