"""Decomposers ``tucker`` and ``cp``: low-rank tensor decompositions of Conv2d kernels.

A kernel ``W`` of shape ``(out, in, kh, kw)`` is decomposed with tensorly (numpy backend, set
only for the call) and the conv is replaced by a chain of smaller convs computing exactly the
decomposed kernel. Only ``groups=1`` convs with a kernel larger than 1x1 are decomposed (a
1x1 conv is a plain channel matrix with no spatial mode to separate; a grouped/depthwise conv
is already thin). A layer is kept when the chain would hold as many parameters as the conv or more.
Padding modes other than zeros are carried over: padding commutes with the 1x1 convs and is
separable per axis, so the chain stays exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from kdbench import hookimpl
from kdbench.contracts import CompressionContext, Decomposer

from .svd import check_rank_rule, count, energy_rank

Plan = Callable[[str, nn.Conv2d], tuple[nn.Module | None, dict]]


def conv_params(conv: nn.Conv2d) -> int:
    return count(conv)


def decompose_convs(method: str, model: nn.Module, skip: tuple[str, ...], plan: Plan) -> dict:
    """Apply ``plan`` to every eligible Conv2d; ``plan`` returns the replacement (``None`` to
    keep the conv) and the layer's report entry. Returns the whole report."""
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    unknown = set(skip) - set(convs)
    if unknown:
        raise ValueError(f"{method} skip names {sorted(unknown)} are not Conv2d layers; "
                         f"Conv2d layers are {sorted(convs)}")
    kept: dict[str, str] = {}
    eligible = []
    for name, conv in sorted(convs.items()):
        if name in skip:
            kept[name] = "skip"
        elif conv.groups != 1:
            kept[name] = "grouped conv"
        elif tuple(conv.kernel_size) == (1, 1):
            kept[name] = "1x1 conv"
        else:
            eligible.append(name)
    if not eligible:
        found = f"its Conv2d layers are all left out: {kept}" if convs else "it has no Conv2d"
        raise ValueError(f"{method} decomposes Conv2d layers with a kernel larger than 1x1 and "
                         f"groups=1; the model has none ({found}); for Linear layers use svd or asvd")
    before = count(model)
    layers: dict[str, dict] = {}
    for name in eligible:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        conv = getattr(parent, child)
        new, entry = plan(name, conv)
        entry["params_before"] = conv_params(conv)
        if new is not None and count(new) < entry["params_before"]:
            setattr(parent, child, new)
            entry["params_after"] = count(new)
        else:
            entry.update(params_after=entry["params_before"], kept="not smaller")
        layers[name] = entry
    return {"layers": layers, "kept": kept, "params_before": before, "params_after": count(model)}


def _numpy(weight: torch.Tensor) -> np.ndarray:
    return weight.detach().to("cpu", torch.float64).numpy()


def _conv(conv: nn.Conv2d, cin: int, cout: int, kernel, weight: torch.Tensor, *, stride=1,
          padding=0, dilation=1, groups=1, bias: torch.Tensor | None = None) -> nn.Conv2d:
    """A conv with the given weight, on ``conv``'s device and dtype."""
    new = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation,
                    groups=groups, bias=bias is not None, padding_mode=conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias.detach())
    return new


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    w = weight.detach().to("cpu", torch.float64)
    return float(torch.linalg.vector_norm(w - approx.to("cpu", torch.float64)) / torch.linalg.vector_norm(w).clamp_min(1e-300))


# ---------------------------------------------------------------- Tucker-2
def tucker_ranks(weight: torch.Tensor, rank_ratio: float | None, energy: float | None) -> tuple[int, int]:
    """``(r_out, r_in)``: a fraction of each channel mode, or the energy rule on the singular
    values of the kernel unfolded along that mode."""
    out, cin = weight.shape[:2]
    if energy is None:
        return max(1, round(rank_ratio * out)), max(1, round(rank_ratio * cin))
    w = weight.detach().to("cpu", torch.float64)
    s_out = torch.linalg.svdvals(w.reshape(out, -1))
    s_in = torch.linalg.svdvals(w.transpose(0, 1).reshape(cin, -1))
    return energy_rank(s_out, energy), energy_rank(s_in, energy)


def tucker_factors(weight: torch.Tensor, r_out: int, r_in: int, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 (HOOI, ``partial_tucker`` on modes 0 and 1): ``core (r_out, r_in, kh, kw)``,
    ``u_out (out, r_out)``, ``u_in (in, r_in)`` in float64, ``W ~= core x0 u_out x1 u_in``."""
    import tensorly as tl  # here: importing it costs every command its start-up time
    from tensorly.decomposition import partial_tucker

    with tl.backend_context("numpy"):
        (core, (u_out, u_in)), _ = partial_tucker(_numpy(weight), rank=[r_out, r_in], modes=[0, 1],
                                                  init="svd", random_state=seed)
    return torch.from_numpy(core), torch.from_numpy(u_out), torch.from_numpy(u_in)


def tucker_convs(conv: nn.Conv2d, core: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor) -> nn.Sequential:
    """1x1 (in -> r_in), kxk core (r_in -> r_out, the conv's stride/padding/dilation), 1x1
    (r_out -> out, with the conv's bias)."""
    r_out, r_in = core.shape[:2]
    dtype = conv.weight.dtype
    return nn.Sequential(
        _conv(conv, conv.in_channels, r_in, 1, u_in.T[:, :, None, None].to(dtype)),
        _conv(conv, r_in, r_out, conv.kernel_size, core.to(dtype), stride=conv.stride,
              padding=conv.padding, dilation=conv.dilation),
        _conv(conv, r_out, conv.out_channels, 1, u_out[:, :, None, None].to(dtype), bias=conv.bias))


class Tucker(Decomposer):
    """Kim, Park, Yoo, Choi, Yang and Shin, "Compression of Deep Convolutional Neural Networks
    for Fast and Low Power Mobile Applications", ICLR 2016.

    Tucker-2 decomposition of each kernel along its output and input channel modes (HOOI via
    tensorly's ``partial_tucker``), deployed as 1x1 -> kxk core -> 1x1 convs. Deviation: the
    paper picks the ranks by VBMF; here they are ``rank_ratio`` of each channel count, or the
    smallest ranks keeping ``energy`` of each mode unfolding's ``sum s^2``.
    """

    name = "tucker"
    description = ("Tucker-2 on Conv2d channel modes -> 1x1, kxk core, 1x1 convs (Kim et al. 2016); "
                   "ranks by rank_ratio or energy")
    materialized = True

    @dataclasses.dataclass(frozen=True)
    class Params:
        rank_ratio: float | None = dataclasses.field(default=None, metadata={
            "help": "r_out = round(rank_ratio * out), r_in = round(rank_ratio * in); 0.5 when energy is not set"})
        energy: float | None = dataclasses.field(default=None, metadata={
            "help": "instead: per mode, the smallest rank keeping this fraction of the unfolding's sum s^2"})
        skip: tuple[str, ...] = ()  # Conv2d module paths to leave whole

        def __post_init__(self):
            object.__setattr__(self, "rank_ratio",
                               check_rank_rule("tucker", self.rank_ratio, self.energy, default_ratio=0.5))

    def apply(self, model: nn.Module, context: CompressionContext) -> nn.Module:
        p = self.params

        def plan(name, conv):
            r_out, r_in = tucker_ranks(conv.weight, p.rank_ratio, p.energy)
            kh, kw = conv.kernel_size
            entry = {"ranks": [r_out, r_in]}
            size = conv.in_channels * r_in + r_in * r_out * kh * kw + r_out * conv.out_channels
            if size + (conv.bias is not None) * conv.out_channels >= conv_params(conv):
                return None, entry  # skip the decomposition itself when it cannot pay off
            core, u_out, u_in = tucker_factors(conv.weight, r_out, r_in, context.seed)
            approx = torch.einsum("abhw,oa,ib->oihw", core, u_out, u_in)
            entry["kernel_error"] = relative_error(conv.weight, approx)
            return tucker_convs(conv, core, u_out, u_in), entry

        self._report = decompose_convs("tucker", model, p.skip, plan)
        return model

    def report(self):
        return getattr(self, "_report", {})


# ---------------------------------------------------------------- CP
def cp_factors(weight: torch.Tensor, rank: int, seed: int = 0, iterations: int = 100
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` CP (ALS, tensorly's ``parafac``) of the kernel: ``(a_out (out, R),
    b_in (in, R), k_h (kh, R), k_w (kw, R))`` in float64 with
    ``W[o,i,y,x] ~= sum_r a_out[o,r] b_in[i,r] k_h[y,r] k_w[x,r]``. Each component's weight is
    spread evenly over its four unit-norm factors, so no factor dwarfs another in fine-tuning."""
    import tensorly as tl
    from tensorly.decomposition import parafac

    tensor = _numpy(weight)
    with tl.backend_context("numpy"):
        weights, factors = parafac(tensor, rank, n_iter_max=iterations, init=_svd_init(tensor, rank, seed),
                                   tol=1e-6, random_state=seed)
    norms = [np.linalg.norm(f, axis=0) for f in factors]
    weights = weights * np.prod(norms, axis=0)  # each component's magnitude, factors made unit-norm
    share = weights ** 0.25
    a_out, b_in, k_h, k_w = (torch.from_numpy(f / np.where(n > 0, n, 1)[None, :] * share[None, :])
                             for f, n in zip(factors, norms))
    return a_out, b_in, k_h, k_w


def _svd_init(tensor: np.ndarray, rank: int, seed: int):
    """tensorly's ``init="svd"`` (leading left singular vectors of each unfolding, random
    columns beyond a mode's size), but with thin SVDs: tensorly's full SVD of a
    ``kh x (out*in*kw)`` unfolding costs seconds on a 64-channel kernel. A ``CPTensor``."""
    import tensorly as tl

    rng = np.random.default_rng(seed)
    factors = []
    for mode, size in enumerate(tensor.shape):
        u = np.linalg.svd(np.moveaxis(tensor, mode, 0).reshape(size, -1), full_matrices=False)[0]
        u = u[:, :rank]
        if u.shape[1] < rank:
            u = np.concatenate([u, rng.standard_normal((size, rank - u.shape[1]))], axis=1)
        factors.append(u)
    return tl.cp_tensor.CPTensor((np.ones(rank), factors))


def _split(value, axis: int):
    """The per-axis part of a conv's padding (``'same'``/``'valid'`` strings apply to both)."""
    if isinstance(value, str):
        return value
    return (value[0], 0) if axis == 0 else (0, value[1])


def cp_convs(conv: nn.Conv2d, a_out: torch.Tensor, b_in: torch.Tensor, k_h: torch.Tensor,
             k_w: torch.Tensor) -> nn.Sequential:
    """1x1 (in -> R), depthwise kh x 1, depthwise 1 x kw (stride, padding, dilation split per
    axis), 1x1 (R -> out, with the conv's bias): Lebedev et al.'s four-layer chain."""
    rank = a_out.shape[1]
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    dtype = conv.weight.dtype
    return nn.Sequential(
        _conv(conv, conv.in_channels, rank, 1, b_in.T[:, :, None, None].to(dtype)),
        _conv(conv, rank, rank, (kh, 1), k_h.T[:, None, :, None].to(dtype), stride=(sh, 1),
              padding=_split(conv.padding, 0), dilation=(dh, 1), groups=rank),
        _conv(conv, rank, rank, (1, kw), k_w.T[:, None, None, :].to(dtype), stride=(1, sw),
              padding=_split(conv.padding, 1), dilation=(1, dw), groups=rank),
        _conv(conv, rank, conv.out_channels, 1, a_out[:, :, None, None].to(dtype), bias=conv.bias))


class CP(Decomposer):
    """Lebedev, Ganin, Rakhuba, Oseledets and Lempitsky, "Speeding-up Convolutional Neural
    Networks Using Fine-tuned CP-Decomposition", ICLR 2015.

    Rank-R CP decomposition of each 4-way kernel, computed by alternating least squares
    (tensorly's ``parafac``; the paper used non-linear least squares), deployed as 1x1 (in -> R),
    depthwise kh x 1, depthwise 1 x kw, 1x1 (R -> out) convs, to be fine-tuned after. The rank
    is an explicit ``rank`` or ``rank_ratio * min(in, out)``. A conv with few input channels
    (a network's first, ``in`` = 1 or 3) then gets a rank of 1 or 2, which no fine-tuning
    recovers from: name it in ``skip``.
    """

    name = "cp"
    description = ("CP decomposition of Conv2d kernels -> 1x1, depthwise kx1, depthwise 1xk, 1x1 convs "
                   "(Lebedev et al. 2015); rank by rank_ratio of min(in, out) or explicit rank")
    materialized = True

    @dataclasses.dataclass(frozen=True)
    class Params:
        rank_ratio: float | None = dataclasses.field(default=None, metadata={
            "help": "R = round(rank_ratio * min(in, out)); 0.25 when rank is not set"})
        rank: int | None = None  # instead: the same R for every layer
        iterations: int = 100  # ALS iterations at most (stops earlier when the error settles)
        skip: tuple[str, ...] = ()  # Conv2d module paths to leave whole

        def __post_init__(self):
            if self.rank is not None and self.rank_ratio is not None:
                raise ValueError(f"cp takes either rank_ratio or rank, not both (got rank_ratio="
                                 f"{self.rank_ratio}, rank={self.rank}); drop one")
            if self.rank is not None and self.rank < 1:
                raise ValueError(f"rank must be a positive integer, got {self.rank}")
            if self.rank is None:
                object.__setattr__(self, "rank_ratio", check_rank_rule("cp", self.rank_ratio, None, 0.25))
            if self.iterations < 1:
                raise ValueError(f"iterations must be >= 1, got {self.iterations}")

    def apply(self, model: nn.Module, context: CompressionContext) -> nn.Module:
        p = self.params

        def plan(name, conv):
            kh, kw = conv.kernel_size
            rank = p.rank or max(1, round(p.rank_ratio * min(conv.in_channels, conv.out_channels)))
            entry = {"rank": rank}
            size = rank * (conv.in_channels + kh + kw + conv.out_channels)
            if size + (conv.bias is not None) * conv.out_channels >= conv_params(conv):
                return None, entry
            a_out, b_in, k_h, k_w = cp_factors(conv.weight, rank, context.seed, p.iterations)
            approx = torch.einsum("or,ir,yr,xr->oiyx", a_out, b_in, k_h, k_w)
            entry["kernel_error"] = relative_error(conv.weight, approx)
            return cp_convs(conv, a_out, b_in, k_h, k_w), entry

        self._report = decompose_convs("cp", model, p.skip, plan)
        return model

    def report(self):
        return getattr(self, "_report", {})


@hookimpl
def kdbench_register_decomposers(register):
    register(Tucker)
    register(CP)
