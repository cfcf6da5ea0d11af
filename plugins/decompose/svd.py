"""Decomposer ``svd``: truncated-SVD factorization of Linear layers.

Each ``Linear(in, out)`` whose weight ``W ~= U_r S_r V_r^T`` becomes
``Linear(in, r, bias=False) -> Linear(r, out)``, with ``sqrt(S_r)`` split between the two
factors (Denton et al., "Exploiting Linear Structure Within Convolutional Networks for
Efficient Evaluation", NeurIPS 2014). The rank is a fraction of ``min(in, out)``
(``rank_ratio``) or the smallest rank whose singular values keep a fraction of the spectral
energy ``sum s^2`` (``energy``). A layer is only replaced when the factors hold fewer
parameters than the original, so the artifact never grows.

The helpers here (rank rules, the factorization with an optional input scaling, the
replacement loop) are shared with ``asvd``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from kdbench import hookimpl
from kdbench.calibration import skipped
from kdbench.contracts import CompressionContext, Decomposer

DEFAULT_RANK_RATIO = 0.25


def check_rank_rule(method: str, rank_ratio: float | None, energy: float | None,
                    default_ratio: float = DEFAULT_RANK_RATIO) -> float | None:
    """Validate that at most one of ``rank_ratio`` / ``energy`` is set; the ratio to use
    (``default_ratio`` when neither is given, ``None`` when ``energy`` decides)."""
    if rank_ratio is not None and energy is not None:
        raise ValueError(f"{method} takes either rank_ratio or energy, not both "
                         f"(got rank_ratio={rank_ratio}, energy={energy}); drop one")
    if energy is not None:
        if not 0 < energy <= 1:
            raise ValueError(f"energy must be in (0, 1] (the fraction of sum s^2 to keep), got {energy}")
        return None
    ratio = default_ratio if rank_ratio is None else rank_ratio
    if not 0 < ratio <= 1:
        raise ValueError(f"rank_ratio must be in (0, 1], got {ratio}")
    return ratio


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """The smallest ``r`` with ``sum_{i<r} s_i^2 >= energy * sum_i s_i^2`` (``s`` sorted
    descending). A relative slack of 1e-9 keeps an exact boundary on the smaller rank."""
    sq = s.detach().to(torch.float64) ** 2
    total = sq.sum()
    if total <= 0:
        return 1
    kept = torch.cumsum(sq, 0) / total
    return min(int((kept < energy - 1e-9).sum()) + 1, len(s))


def choose_rank(s: torch.Tensor, rank_ratio: float | None, energy: float | None) -> int:
    """Rank from the spectrum ``s``: ``round(rank_ratio * len(s))`` or the energy rule."""
    if energy is not None:
        return energy_rank(s, energy)
    return max(1, round(rank_ratio * len(s)))


def factor_weights(weight: torch.Tensor, rank: int, input_scale: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(first, second, s)`` with ``second @ first`` the rank-``rank`` approximation of
    ``weight`` (out x in) and ``s`` the singular values used.

    With ``input_scale`` (a positive vector over inputs, ASVD) the SVD is of ``W diag(scale)``
    and ``diag(scale)^-1`` is folded into ``first``. Computed in float64, cast back.
    """
    w = weight.detach().to(torch.float64)
    if input_scale is not None:
        input_scale = input_scale.to(w)  # calibration statistics live on the CPU
        w = w * input_scale[None, :]
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    first = root[:, None] * vh[:rank]
    if input_scale is not None:
        first = first / input_scale[None, :]
    second = u[:, :rank] * root[None, :]
    return first.to(weight.dtype), second.to(weight.dtype), s


def factorize(layer: nn.Linear, rank: int, input_scale: torch.Tensor | None = None) -> nn.Sequential:
    """``Linear(in, rank, bias=False) -> Linear(rank, out)`` approximating ``layer``."""
    first_w, second_w, _ = factor_weights(layer.weight, rank, input_scale)
    return _pair(layer, first_w, second_w)


def _pair(layer: nn.Linear, first_w: torch.Tensor, second_w: torch.Tensor) -> nn.Sequential:
    kw = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    rank = first_w.shape[0]
    first = nn.Linear(layer.in_features, rank, bias=False, **kw)
    second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None, **kw)
    with torch.no_grad():
        first.weight.copy_(first_w)
        second.weight.copy_(second_w)
        if layer.bias is not None:
            second.bias.copy_(layer.bias.detach())
    return nn.Sequential(first, second)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def decompose_linears(method: str, model: nn.Module, skip: tuple[str, ...],
                      rank_ratio: float | None, energy: float | None,
                      scale_for: Callable[[str], torch.Tensor | None] = lambda name: None,
                      names: list[str] | None = None) -> dict:
    """Replace each Linear of ``model`` (minus ``skip``) by its rank-r factors when they are
    smaller; ``scale_for(name)`` gives an input scaling (ASVD) or ``None``. Returns the report:
    ``ranks`` (``None`` = left dense) and parameters per layer and in total."""
    if names is None:
        names = linear_names(method, model, skip)
    before = count(model)
    ranks: dict[str, int | None] = {}
    layers: dict[str, dict] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, child)
        n_in, n_out = layer.in_features, layer.out_features
        first_w, second_w, s = factor_weights(layer.weight, min(n_in, n_out), scale_for(name))
        rank = choose_rank(s, rank_ratio, energy)
        dense = count(layer)
        entry = {"rank": None, "params_before": dense, "params_after": dense,
                 "energy_kept": float((s[:rank] ** 2).sum() / (s ** 2).sum().clamp_min(1e-300))}
        if rank * (n_in + n_out) < n_in * n_out:  # otherwise factoring would not save parameters
            new = _pair(layer, first_w[:rank], second_w[:, :rank])
            setattr(parent, child, new)
            entry.update(rank=rank, params_after=count(new))
        ranks[name] = entry["rank"]
        layers[name] = entry
    return {"ranks": ranks, "layers": layers, "params_before": before, "params_after": count(model)}


def linear_names(method: str, model: nn.Module, skip: tuple[str, ...]) -> list[str]:
    # nn.MultiheadAttention reads its out_proj's weight directly: that Linear cannot be swapped.
    fixed = {f"{name}.out_proj" if name else "out_proj" for name, m in model.named_modules()
             if isinstance(m, nn.MultiheadAttention)}
    names = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)} - fixed
    if not names:
        raise ValueError(f"{method} factorizes Linear layers; the model has none "
                         "(use tucker or cp for Conv2d layers)")
    return sorted(names - skipped(names, skip, f"Linear layers {method} can factorize"))


class SVD(Decomposer):
    name = "svd"
    description = ("replace each Linear by two thinner Linears from a truncated SVD "
                   "(rank by rank_ratio or retained spectral energy)")
    materialized = True

    @dataclasses.dataclass(frozen=True)
    class Params:
        rank_ratio: float | None = dataclasses.field(default=None, metadata={
            "help": f"rank = round(rank_ratio * min(in, out)); {DEFAULT_RANK_RATIO} when energy is not set"})
        energy: float | None = dataclasses.field(default=None, metadata={
            "help": "instead: the smallest rank keeping this fraction of sum s^2"})
        skip: tuple[str, ...] = ()  # module paths to leave dense

        def __post_init__(self):
            # Neither given: the historical default ratio, stored so equal configs compare equal.
            object.__setattr__(self, "rank_ratio", check_rank_rule("svd", self.rank_ratio, self.energy))

    def apply(self, model: nn.Module, context: CompressionContext) -> nn.Module:
        p = self.params
        self._report = decompose_linears("svd", model, p.skip, p.rank_ratio, p.energy)
        return model

    def report(self):
        return getattr(self, "_report", {})


@hookimpl
def kdbench_register_decomposers(register):
    register(SVD)
