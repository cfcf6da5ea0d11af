"""Quantizer ``dynamic-int8``: post-training dynamic int8 quantization of Linear layers.

Weights are stored as int8 with a per-tensor scale; activations are quantized on the fly at
run time, so the matrix products run as int8 kernels (fbgemm / x86 / qnnpack engines).
This module is the one place that uses the deprecated ``torch.ao.quantization`` eager API.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from kdbench import hookimpl
from kdbench.contracts import CompressionContext, Quantizer


class DynamicInt8(Quantizer):
    name = "dynamic-int8"
    description = "int8 weights and dynamically quantized activations for Linear layers (int8 kernels)"
    materialized = True
    trainable_after = False

    def apply(self, model: nn.Module, context: CompressionContext) -> nn.Module:
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the eager API's deprecation notice
            quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        self._report = {"engine": torch.backends.quantized.engine,
                        "quantized_layers": sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear)
                                                for m in quantized.modules())}
        return quantized

    def report(self):
        return getattr(self, "_report", {})


@hookimpl
def kdbench_register_quantizers(register):
    register(DynamicInt8)
