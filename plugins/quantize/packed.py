"""Packed low-bit Linear layers and the round-to-nearest quantizer shared by ``weight-only`` and
``gptq``.

Weights are quantized to ``bits`` (3, 4 or 8) unsigned integer codes ``q`` in ``[0, 2^bits - 1]``
with one scale and zero-point per output channel and input group, and dequantize as
``w = scale * (q - zero)``. The quantization grid is the one of the GPTQ reference code
(``quant.py`` of Frantar et al., ICLR 2023): the range always includes 0; asymmetric uses
``scale = (max - min) / maxq`` and ``zero = round(-min / scale)``; symmetric uses
``scale = 2 max|w| / maxq`` and the fixed ``zero = (maxq + 1) / 2``.

Storage (what ``torch.save(state_dict)`` writes):

- ``qweight``: the codes of the ``(out, in)`` weight, row-major, packed densely into a uint8
  buffer: 8 bits one per byte, 4 bits two per byte, 3 bits eight codes in three bytes;
- ``scales``: float16, ``(out, groups)`` (as in the GPTQ reference and common int4 formats); a
  scale is rounded to float16 *before* the weights are quantized with it, so the stored
  scale is exactly the one used;
- ``qzeros``: asymmetric only, the integer zero-points packed with the same bits;
- ``bias``: an ordinary float Parameter.

``forward`` dequantizes the whole weight and calls ``F.linear``: the artifact is smaller, the
layer is not faster (there is no low-bit kernel here).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BITS = (3, 4, 8)
#: Smallest float16 normal: scales are kept at or above it so they survive the cast.
MIN_SCALE = torch.finfo(torch.float16).tiny


def check_quant_params(method: str, bits: int, group_size: int) -> None:
    """Shared ``Params`` checks of the weight quantizers."""
    if bits not in BITS:
        raise ValueError(f"{method}: bits must be one of {list(BITS)}, got {bits}")
    if group_size < 0:
        raise ValueError(f"{method}: group_size must be >= 0 (0 = one scale per output channel), "
                         f"got {group_size}")


# ---------------------------------------------------------------- the grid
def find_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale, zero)`` of ``w`` (rows x cols), as the GPTQ reference's ``find_params``;
    the scale rounded to float16 (and back), the zero an integer in ``[0, maxq]``."""
    maxq = 2 ** bits - 1
    w = w.to(torch.float64)
    zero_ = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zero_)
    xmax = torch.maximum(w.max(dim=1).values, zero_)
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, -torch.ones_like(xmin), xmin)
    xmax = torch.where(both_zero, torch.ones_like(xmax), xmax)
    scale = ((xmax - xmin) / maxq).clamp_min(MIN_SCALE).to(torch.float16).to(torch.float64)
    if symmetric:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``clamp(round(w / scale) + zero, 0, maxq)`` (float tensor of integers);
    ``scale`` and ``zero`` broadcast against ``w``."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == 0 else math.ceil(in_features / group_size)


def rtn(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: codes ``(out, in)``, scales and zeros ``(out, groups)`` (float64)."""
    w = weight.detach().to(torch.float64)
    size = w.shape[1] if group_size == 0 else group_size
    codes, scales, zeros = [], [], []
    for start in range(0, w.shape[1], size):
        block = w[:, start:start + size]
        scale, zero = find_params(block, bits, symmetric)
        codes.append(quantize(block, scale[:, None], zero[:, None], bits))
        scales.append(scale)
        zeros.append(zero)
    return torch.cat(codes, 1), torch.stack(scales, 1), torch.stack(zeros, 1)


# ---------------------------------------------------------------- bit packing
def _chunk(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest whole-byte chunk: 8 codes in 3 bytes for 3 bits."""
    span = math.lcm(bits, 8)
    return span // bits, span // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in ``[0, 2^bits)`` -> a flat uint8 tensor of ``ceil(n * bits / 8)`` bytes
    (little-endian within each chunk; the last chunk is zero-padded)."""
    flat = codes.detach().reshape(-1).to(torch.int64)
    if flat.numel() and (flat.min() < 0 or flat.max() >= 2 ** bits):
        raise ValueError(f"codes must lie in [0, {2 ** bits - 1}] to be packed in {bits} bits")
    per, nbytes = _chunk(bits)
    n = flat.numel()
    flat = F.pad(flat, (0, (-n) % per)).view(-1, per)
    shifts = torch.arange(per, device=flat.device) * bits
    word = (flat << shifts).sum(dim=1)  # at most 24 bits
    out = torch.stack([(word >> (8 * j)) & 0xFF for j in range(nbytes)], dim=1).reshape(-1)
    return out[:math.ceil(n * bits / 8)].to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first ``n`` codes of a buffer written by :func:`pack` (uint8 for 8 and 4 bits,
    int32 otherwise)."""
    if bits == 8:
        return packed[:n]
    if bits == 4:  # the common case, without the generic word arithmetic
        return torch.stack((packed & 0x0F, packed >> 4), dim=1).reshape(-1)[:n]
    per, nbytes = _chunk(bits)
    raw = packed.to(torch.int32)
    raw = F.pad(raw, (0, (-raw.numel()) % nbytes)).view(-1, nbytes)
    word = (raw << (torch.arange(nbytes, device=raw.device, dtype=torch.int32) * 8)).sum(dim=1,
                                                                                       dtype=torch.int32)
    shifts = torch.arange(per, device=raw.device, dtype=torch.int32) * bits
    codes = (word[:, None] >> shifts) & (2 ** bits - 1)
    return codes.reshape(-1)[:n]


# ---------------------------------------------------------------- the layer
class PackedLinear(nn.Module):
    """A Linear layer whose weight is stored as packed ``bits``-bit codes with float16 scales
    (and packed zero-points when asymmetric) per output channel and input group."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 0,
                 symmetric: bool = False, bias: bool = True):
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"PackedLinear: bits must be one of {list(BITS)}, got {bits}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        groups = num_groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(math.ceil(in_features * out_features * bits / 8),
                                                    dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16))
        if not symmetric:
            self.register_buffer("qzeros", torch.zeros(math.ceil(out_features * groups * bits / 8),
                                                       dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bias: torch.Tensor | None, bits: int, group_size: int, symmetric: bool) -> PackedLinear:
        """Pack integer ``codes`` (out, in) with their ``scales`` / ``zeros`` (out, groups)."""
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, bits, group_size, symmetric, bias is not None)
        if scales.shape != layer.scales.shape:
            raise ValueError(f"scales of shape {tuple(scales.shape)} do not match "
                             f"{tuple(layer.scales.shape)} for group_size {group_size}")
        device = codes.device
        layer.to(device)
        with torch.no_grad():
            layer.qweight.copy_(pack(codes, bits))
            layer.scales.copy_(scales.to(torch.float16))
            if not symmetric:
                layer.qzeros.copy_(pack(zeros, bits))
            elif not torch.all(zeros == (2 ** bits) // 2):
                raise ValueError("symmetric PackedLinear uses the fixed zero-point 2^(bits-1)")
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.bits, self.in_features * self.out_features).view(
            self.out_features, self.in_features)

    def zeros(self) -> torch.Tensor:
        """Zero-points (out, groups) as floats."""
        if self.symmetric:
            return torch.full(self.scales.shape, float(2 ** (self.bits - 1)), device=self.scales.device)
        return unpack(self.qzeros, self.bits, self.scales.numel()).view(self.scales.shape).float()

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight ``scale * (q - zero)``, (out, in)."""
        size = self.in_features if self.group_size == 0 else self.group_size
        codes, scale, zero = self.codes().float(), self.scales.float(), self.zeros()
        if self.in_features % size == 0:  # whole groups: broadcast instead of repeating
            groups = scale.shape[1]
            return dequantize(codes.view(self.out_features, groups, size), scale[..., None],
                              zero[..., None]).view(self.out_features, self.in_features)
        scale = scale.repeat_interleave(size, dim=1)[:, :self.in_features]
        zero = zero.repeat_interleave(size, dim=1)[:, :self.in_features]
        return dequantize(codes, scale, zero)

    def unpacked_weights(self) -> list[torch.Tensor]:
        """For the harness's parameter count: the weight (the bias is a Parameter)."""
        return [self.dequantized_weight()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, bias={self.bias is not None}")


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at ``path`` (dotted) by ``new``."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)
