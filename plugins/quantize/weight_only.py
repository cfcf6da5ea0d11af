"""Quantizer ``weight-only``: round-to-nearest (RTN) weight-only quantization of Linear layers.

The baseline of weight-only LLM quantization that GPTQ is measured against (Frantar,
Ashkboos, Hoefler and Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023; also Dettmers et al., "LLM.int8()", NeurIPS 2022 for
the per-channel / group-wise setting). Each weight is rounded independently to the nearest
point of a ``bits``-bit grid, one grid per output channel or per ``group_size`` input
columns, with the GPTQ reference's grid (see ``packed.py``). Each Linear becomes a
``PackedLinear`` that stores the packed codes: the file shrinks; forward dequantizes, so it
is not faster. Activations stay in float.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from kdbench import hookimpl
from kdbench.calibration import linear_layers
from kdbench.contracts import CompressionContext, Quantizer

from .packed import PackedLinear, check_quant_params, num_groups, rtn, set_module


def packed_rtn(layer: nn.Linear, bits: int, group_size: int, symmetric: bool) -> PackedLinear:
    codes, scales, zeros = rtn(layer.weight, bits, group_size, symmetric)
    return PackedLinear.from_codes(codes, scales, zeros, layer.bias, bits, group_size, symmetric)


def storage_report(layers: dict[str, nn.Linear], bits: int, group_size: int, symmetric: bool) -> dict:
    """Layers, weights, and the packed weight bits per weight including scales and zeros."""
    weights = sum(m.weight.numel() for m in layers.values())
    groups = sum(m.out_features * num_groups(m.in_features, group_size) for m in layers.values())
    extra = groups * (16 + (0 if symmetric else bits))
    return {"quantized_layers": len(layers), "quantized_weights": weights,
            "bits_per_weight": (weights * bits + extra) / max(weights, 1)}


class WeightOnly(Quantizer):
    name = "weight-only"
    description = ("round-to-nearest 8/4/3-bit weights of Linear layers, per channel or per group, "
                   "stored packed (smaller file; dequantized at run time, not faster)")
    materialized = True
    trainable_after = False

    @dataclasses.dataclass(frozen=True)
    class Params:
        bits: int = 4
        group_size: int = 0  # input columns per scale; 0 = one scale per output channel
        symmetric: bool = False
        skip: tuple[str, ...] = ()  # Linear module paths to keep in float

        def __post_init__(self):
            check_quant_params("weight-only", self.bits, self.group_size)

    def apply(self, model: nn.Module, context: CompressionContext) -> nn.Module:
        p = self.params
        layers = linear_layers(model, p.skip)
        if not layers:
            raise ValueError("weight-only quantizes Linear layers; the model has none left after skip")
        for name, layer in layers.items():
            set_module(model, name, packed_rtn(layer, p.bits, p.group_size, p.symmetric))
        self._report = storage_report(layers, p.bits, p.group_size, p.symmetric)
        return model.eval()

    def report(self):
        return getattr(self, "_report", {})


@hookimpl
def kdbench_register_quantizers(register):
    register(WeightOnly)
