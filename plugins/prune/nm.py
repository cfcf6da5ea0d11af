"""Pruner ``nm``: N:M semi-structured sparsity (2:4 by default).

The pattern of NVIDIA's Sparse Tensor Cores (Mishra et al., "Accelerating Sparse Deep Neural
Networks", arXiv 2104.08378, 2021; Zhou et al., "Learning N:M Fine-grained Structured Sparse
Neural Networks From Scratch", ICLR 2021): in every group of ``m`` consecutive weights along
the input dimension of a layer, only ``n`` are kept, those with the largest score. For a
Linear layer the groups run along ``in_features``; for a Conv layer along the flattened
``in_channels * kh * kw`` of each filter. ``score: magnitude`` keeps the largest ``|W|``
(one-shot, as in the ASP recipe); ``score: wanda`` keeps the largest ``|W_ij| * ||X_j||_2``
(Sun et al., ICLR 2024, whose paper reports 2:4 and 4:8 results this way) for Linear layers,
and conv layers then fall back to magnitude (their inputs are not collected).

PyTorch's 2:4 sparse kernels (``to_sparse_semi_structured``) are CUDA-only, so here the
pattern is kept as a ``torch.nn.utils.prune`` mask on dense weights: ``materialized =
False`` (the file is not smaller, CPU inference not faster).

Layers that cannot take the pattern are left dense, as NVIDIA's ASP does: a layer whose
group dimension is not a multiple of ``m`` (e.g. a 1-channel 3x3 first conv, 9 weights per
filter). So are the layers listed in ``skip``. ``report()`` names each one with the reason
in ``skipped_layers``, and gives the sparsity over the pruned layers (``weight_sparsity``:
``1 - n/m`` on dense weights) and over all Linear and Conv weights (``overall_sparsity``,
lower when layers were left dense). A model where no layer can take the pattern is an error.

Example: ``[{prune: {name: nm, n: 2, m: 4, skip: [head]}}, {finetune: {epochs: 3}}]``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import prune

from kdbench import hookimpl
from kdbench.calibration import skipped
from kdbench.contracts import CompressionContext, Pruner
from kdbench_plugins.prune.magnitude import PRUNABLE, sparsity_report
from kdbench_plugins.prune.wanda import wanda_scores


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask of ``scores`` (out, ...) keeping the ``n`` largest of every ``m`` consecutive
    entries along the flattened non-output dimensions."""
    flat = scores.reshape(-1, m)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep.scatter_(1, torch.topk(flat, n, dim=1).indices, True)
    return keep.reshape(scores.shape)


class NM(Pruner):
    __doc__ = __doc__
    name = "nm"
    description = ("N:M semi-structured sparsity (default 2:4) of Linear and Conv weights along "
                   "the input dimension, by magnitude or Wanda score (masks; CUDA-only kernels)")
    materialized = False

    @dataclasses.dataclass(frozen=True)
    class Params:
        n: int = 2
        m: int = 4
        score: Literal["magnitude", "wanda"] = "magnitude"
        skip: tuple[str, ...] = ()  # module paths left dense

        def __post_init__(self):
            if not 1 <= self.n < self.m:
                raise ValueError(f"nm needs 1 <= n < m (keep n of every m weights), got n={self.n}, m={self.m}")
            if self.score not in ("magnitude", "wanda"):
                raise ValueError(f"score must be 'magnitude' or 'wanda', got {self.score!r}")

    def apply(self, model: nn.Module, context: CompressionContext) -> nn.Module:
        p = self.params
        found = {name: mod for name, mod in model.named_modules() if isinstance(mod, PRUNABLE)}
        dense = {name: "listed in skip" for name in skipped(found, p.skip, "Linear or Conv layers")}
        for name, mod in found.items():
            group_dim = mod.weight[0].numel()  # the flattened input dimension of one output
            if name not in dense and group_dim % p.m:
                dense[name] = f"{group_dim} weights per output, not a multiple of {p.m}"
        layers = {name: mod for name, mod in found.items() if name not in dense}
        if not layers:
            shown = [f"{name}: {why}" for name, why in dense.items()]
            reasons = "; ".join(shown[:4]) + (" ..." if len(shown) > 4 else "") or "none found"
            raise ValueError(f"nm {p.n}:{p.m} found no Linear or Conv layer that can take the "
                             f"pattern ({reasons}); choose an m that divides the layers' input "
                             f"sizes, or another pruner")
        linear = {name: mod for name, mod in layers.items() if isinstance(mod, nn.Linear)}
        scores = (wanda_scores(model, linear, context.calibration)
                  if p.score == "wanda" and linear else {})
        for name, mod in layers.items():
            score = scores.get(name, mod.weight.detach().abs())
            prune.custom_from_mask(mod, "weight", nm_mask(score, p.n, p.m).to(mod.weight.device))
        self._report = {"pattern": f"{p.n}:{p.m}", "score": p.score,
                        **sparsity_report(model, layers, dense),
                        "layers": sorted(layers), "skipped": sorted(p.skip),
                        "magnitude_scored": sorted(set(layers) - set(scores))}
        return model

    def report(self):
        return getattr(self, "_report", {})


@hookimpl
def kdbench_register_pruners(register):
    register(NM)
