"""Quantizer ``gptq``: GPTQ weight quantization of Linear layers.

Frantar, Ashkboos, Hoefler and Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023. For each Linear layer with calibration inputs
``X`` the layer-wise Hessian is ``H = 2 X^T X / n``; after dampening (``percdamp`` times the
mean diagonal added to the diagonal) and zeroing dead inputs (``H_jj = 0``: ``H_jj := 1``,
``W[:, j] := 0``), the columns of ``W`` are quantized one at a time (in order, or by decreasing
``H_jj`` with ``act_order``) in blocks of ``block_size``, and each column's rounding error
``(w - q) / [H^-1]_jj`` is spread over the not yet quantized columns through the upper
Cholesky factor of ``H^-1`` (the "lazy batch" updates of Algorithm 1). With ``group_size``
> 0 the scale and zero-point of a group are computed from the (already updated) weights when
the group's first column is reached, as in the reference code; with ``act_order`` and
groups the reference's ``static_groups`` variant is used instead (group grids from the
original weights, computed up front), so that groups stay contiguous input columns in the
packed storage. The grid is the reference's (see ``packed.py``); the result is stored as a
``PackedLinear``.

Layers are processed sequentially in the order the forward pass reaches them, and each
layer's Hessian is collected with every earlier layer already quantized (the paper's
sequential setting). Layers fed the very same input (q/k/v; gate and up) share one
calibration pass, as in the reference's "true sequential" groups, and each pass stops once
its group has been reached: exactly the per-layer result at a fraction of the cost (on
SmolLM2's 210 Linear layers, 120 partial passes instead of 210 full ones).
``sequential: false`` collects all Hessians in one pass of the fp32 model instead.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kdbench import hookimpl
from kdbench.calibration import forward_groups, input_stats, linear_layers
from kdbench.contracts import CompressionContext, Quantizer

from .packed import PackedLinear, check_quant_params, find_params, quantize, set_module
from .weight_only import storage_report


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int = 0,
                  symmetric: bool = False, percdamp: float = 0.01, block_size: int = 128,
                  act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """GPTQ of one weight ``(out, in)`` given ``H = 2 X^T X / n`` ``(in, in)``.

    Returns integer codes ``(out, in)``, scales and zeros ``(out, groups)`` (contiguous groups
    of ``group_size`` input columns; one group when 0), and a dict with the proxy loss
    ``sum (w - q)^2 / [H^-1]_jj^2 / 2`` and the dead-input count. Computed in float64.
    """
    W = weight.detach().to(torch.float64).clone()
    H = hessian.detach().to(torch.float64, copy=True).to(W.device)
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    size = cols if group_size == 0 else group_size
    n_groups = -(-cols // size)
    scales = torch.zeros(rows, n_groups, dtype=torch.float64, device=W.device)
    zeros = torch.zeros_like(scales)
    static = group_size == 0 or act_order
    if static:  # per-channel, or the reference's static groups: grids of the original weights
        for g in range(n_groups):
            scales[:, g], zeros[:, g] = find_params(W[:, g * size:(g + 1) * size], bits, symmetric)

    perm = torch.arange(cols, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    group_of = perm // size  # group of each (permuted) column in the original order

    damp = percdamp * torch.mean(torch.diag(H))
    H[range(cols), range(cols)] += damp
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError as err:
        raise ValueError(f"gptq: the dampened Hessian is not positive definite ({err}); raise percdamp "
                         f"(now {percdamp})") from None

    Q = torch.zeros_like(W)
    losses = torch.zeros_like(W)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % size == 0:
                # A new group starts: its grid comes from the weights as updated so far; like
                # the reference, read from W, which has the earlier blocks' updates but not
                # this block's (identical when groups start at block boundaries).
                g = col // size
                scales[:, g], zeros[:, g] = find_params(W[:, col:col + size], bits, symmetric)
            g = int(group_of[col])
            w, d = W1[:, i], Hinv1[i, i]
            q = quantize(w, scales[:, g], zeros[:, g], bits)
            Q1[:, i] = q
            deq = scales[:, g] * (q - zeros[:, g])
            losses[:, col] = (w - deq) ** 2 / d ** 2 / 2
            err = (w - deq) / d
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        # Lazy batch update of the columns after the block.
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if act_order:
        Q = Q[:, torch.argsort(perm)]
    return Q, scales, zeros, {"loss": float(losses.sum()), "dead_inputs": int(dead.sum())}


class GPTQ(Quantizer):
    name = "gptq"
    description = ("GPTQ (Frantar et al. 2023): Hessian-aware 8/4/3-bit weight quantization of Linear "
                   "layers with error compensation, layer by layer; stored packed (not faster)")
    materialized = True
    trainable_after = False

    @dataclasses.dataclass(frozen=True)
    class Params:
        bits: int = 4
        group_size: int = 0  # input columns per scale; 0 = one scale per output channel
        symmetric: bool = False
        percdamp: float = 0.01  # dampening, a fraction of the mean Hessian diagonal
        block_size: int = 128  # columns per lazy-batch block
        act_order: bool = False  # quantize columns by decreasing Hessian diagonal
        sequential: bool = True  # Hessians from inputs through the already quantized layers
        skip: tuple[str, ...] = ()  # Linear module paths to keep in float

        def __post_init__(self):
            check_quant_params("gptq", self.bits, self.group_size)
            if self.percdamp < 0:
                raise ValueError(f"gptq: percdamp must be >= 0 (0.01 in the paper), got {self.percdamp}")
            if self.block_size < 1:
                raise ValueError(f"gptq: block_size must be >= 1, got {self.block_size}")

    def apply(self, model: nn.Module, context: CompressionContext) -> nn.Module:
        p = self.params
        layers = linear_layers(model, p.skip)
        if not layers:
            raise ValueError("gptq quantizes Linear layers; the model has none left after skip")
        model = model.cpu()  # input_stats accumulates on the CPU, where the calibration inputs are
        calibration = context.calibration.cpu()
        if len(calibration) == 0:
            raise ValueError("gptq needs calibration inputs; got none (raise measure.calibration_size)")
        groups, runs_once = forward_groups(model, layers, calibration[:1])
        stats = None if p.sequential else input_stats(model, layers, calibration)
        losses, dead = {}, 0
        for group in groups:
            if p.sequential:
                stats = input_stats(model, {name: layers[name] for name in group}, calibration,
                                    stop_early=runs_once)
            for name in group:
                layer = layers[name]
                codes, scales, zeros, info = gptq_quantize(layer.weight, stats[name].hessian, p.bits,
                                                           p.group_size, p.symmetric, p.percdamp,
                                                           p.block_size, p.act_order)
                set_module(model, name, PackedLinear.from_codes(codes, scales, zeros, layer.bias, p.bits,
                                                                p.group_size, p.symmetric))
                losses[name] = info["loss"]
                dead += info["dead_inputs"]
        self._report = {**storage_report(layers, p.bits, p.group_size, p.symmetric),
                        "calibration_rows": len(calibration), "dead_inputs": dead,
                        "calibration_passes": len(groups) if p.sequential else 1,
                        "proxy_loss": sum(losses.values())}
        return model.eval()

    def report(self):
        return getattr(self, "_report", {})


@hookimpl
def kdbench_register_quantizers(register):
    register(GPTQ)
