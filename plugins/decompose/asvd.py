"""Decomposer ``asvd``: activation-aware SVD of Linear layers.

Yuan, Shang, Song, Wu, Yan and Sun, "ASVD: Activation-aware Singular Value Decomposition for
Compressing Large Language Models", arXiv:2312.05821, 2023. Input channels that carry large
activations matter more to the layer's output, so the SVD is taken of ``W S`` with
``S = diag(mean_rows |X_j| ^ alpha)`` measured on the calibration inputs; after truncation
``S^-1`` is folded into the first factor: ``W ~= (U_r sqrt(S_r)) (sqrt(S_r) V_r^T S^-1)``.
The factors form ``Linear(in, r, bias=False) -> Linear(r, out)`` like ``svd``.

Deviations: the rank of every layer follows one rule (``rank_ratio`` or ``energy`` of the
scaled spectrum) instead of the paper's sensitivity-based per-layer search (STRS), and the
absorption of singular values into the factors (ASVD's Section 3.4) is the usual square-root
split. Inputs never active in calibration are clamped to ``1e-6`` of the largest mean so
``S^-1`` stays finite; a layer the calibration never reaches falls back to plain SVD.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kdbench import hookimpl
from kdbench.calibration import input_stats
from kdbench.contracts import CompressionContext, Decomposer

from .svd import DEFAULT_RANK_RATIO, check_rank_rule, decompose_linears, linear_names

#: Floor of the mean |X_j|, relative to the layer's largest, for never-active inputs.
CLAMP = 1e-6


def activation_scale(abs_sum: torch.Tensor, rows: int, alpha: float) -> torch.Tensor | None:
    """``S_j = mean|X_j| ^ alpha`` with never-active inputs clamped; ``None`` without data."""
    if rows == 0:
        return None
    mean = abs_sum.to(torch.float64) / rows
    top = mean.max()
    if top <= 0:
        return None
    return mean.clamp_min(CLAMP * top) ** alpha


class ASVD(Decomposer):
    name = "asvd"
    description = ("activation-aware SVD of Linear layers: SVD of W diag(mean|X|^alpha), scaling "
                   "folded back (rank by rank_ratio or energy)")
    materialized = True

    @dataclasses.dataclass(frozen=True)
    class Params:
        rank_ratio: float | None = dataclasses.field(default=None, metadata={
            "help": f"rank = round(rank_ratio * min(in, out)); {DEFAULT_RANK_RATIO} when energy is not set"})
        energy: float | None = dataclasses.field(default=None, metadata={
            "help": "instead: the smallest rank keeping this fraction of the scaled spectrum's sum s^2"})
        alpha: float = 0.5  # exponent of the activation scale (the paper's default)
        skip: tuple[str, ...] = ()  # module paths to leave dense

        def __post_init__(self):
            object.__setattr__(self, "rank_ratio", check_rank_rule("asvd", self.rank_ratio, self.energy))
            if not 0 <= self.alpha <= 2:
                raise ValueError(f"alpha must be in [0, 2] (0 = plain SVD, 0.5 the paper's), got {self.alpha}")

    def apply(self, model: nn.Module, context: CompressionContext) -> nn.Module:
        p = self.params
        names = linear_names("asvd", model, p.skip)
        stats = input_stats(model, {n: model.get_submodule(n) for n in names}, context.calibration)
        scales = {n: activation_scale(stats[n].abs_sum, stats[n].rows, p.alpha) for n in names}
        self._report = decompose_linears("asvd", model, p.skip, p.rank_ratio, p.energy,
                                         scale_for=scales.get, names=names)
        self._report["unscaled"] = sorted(n for n, s in scales.items() if s is None)
        return model

    def report(self):
        return getattr(self, "_report", {})


@hookimpl
def kdbench_register_decomposers(register):
    register(ASVD)
