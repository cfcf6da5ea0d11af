"""Decomposer ``svd``: truncated-SVD factorization of Linear layers.

Each ``Linear(in, out)`` whose weight ``W ~= U_r S_r V_r^T`` becomes
``Linear(in, r, bias=False) -> Linear(r, out)``, with ``sqrt(S_r)`` split between the two
factors (Denton et al., "Exploiting Linear Structure Within Convolutional Networks for
Efficient Evaluation", NeurIPS 2014). A layer is only replaced when the factors hold fewer
parameters than the original, so the artifact never grows.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kdbench import hookimpl
from kdbench.contracts import CompressionContext, Decomposer


def factorize(layer: nn.Linear, rank: int) -> nn.Sequential:
    weight = layer.weight.detach()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = s[:rank].sqrt()
    first = nn.Linear(layer.in_features, rank, bias=False)
    second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        first.weight.copy_(root[:, None] * vh[:rank])
        second.weight.copy_(u[:, :rank] * root[None, :])
        if layer.bias is not None:
            second.bias.copy_(layer.bias.detach())
    return nn.Sequential(first, second)


class SVD(Decomposer):
    name = "svd"
    description = "replace each Linear by two thinner Linears from a truncated SVD (rank by rank_ratio)"
    materialized = True

    @dataclasses.dataclass(frozen=True)
    class Params:
        rank_ratio: float = 0.25  # rank = round(rank_ratio * min(in, out))
        skip: tuple[str, ...] = ()  # module paths to leave dense

        def __post_init__(self):
            if not 0 < self.rank_ratio <= 1:
                raise ValueError(f"rank_ratio must be in (0, 1], got {self.rank_ratio}")

    def apply(self, model: nn.Module, context: CompressionContext) -> nn.Module:
        names = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        unknown = set(self.params.skip) - names
        if unknown:
            raise ValueError(f"svd skip names {sorted(unknown)} are not Linear layers; "
                             f"Linear layers are {sorted(names)}")
        ranks = {}
        for name in sorted(names):
            if name in self.params.skip:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = getattr(parent, child)
            n_in, n_out = layer.in_features, layer.out_features
            rank = max(1, round(self.params.rank_ratio * min(n_in, n_out)))
            if rank * (n_in + n_out) >= n_in * n_out:
                ranks[name] = None  # factoring would not save parameters
                continue
            setattr(parent, child, factorize(layer, rank))
            ranks[name] = rank
        self._report = {"ranks": ranks}
        return model

    def report(self):
        return getattr(self, "_report", {})


@hookimpl
def kdbench_register_decomposers(register):
    register(SVD)
