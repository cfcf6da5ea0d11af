"""Quantizers ``dynamic-int8`` and ``static-int8``: post-training int8 quantization.

``dynamic-int8``: Linear weights are stored as int8 with a per-tensor scale; activations are
quantized on the fly at run time, so the matrix products run as int8 kernels (fbgemm / x86 /
qnnpack engines). ``skip`` keeps Linear layers in float (an LM head, by path or pattern).

``static-int8``: weights (per output channel) and activations int8, the activation ranges
fixed beforehand from calibration batches; Conv/BN/ReLU and Linear/ReLU are fused and run as
int8 kernels end to end (FX graph mode).

``qat``: the same int8 model, reached by fine-tuning with fake quantization first.

The affine (scale, zero-point) int8 scheme, its integer-only kernels and quantization-aware
training are Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018; per-channel weights and the calibration of
activation ranges follow Krishnamoorthi, "Quantizing deep convolutional networks for
efficient inference: A whitepaper", arXiv:1806.08342, 2018.

This module is the one place that uses the deprecated ``torch.ao.quantization`` API.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
from typing import ClassVar

import torch
from torch import nn

from kdbench import hookimpl
from kdbench.calibration import linear_layers
from kdbench.contracts import CompressionContext, FinetuneParams, Quantizer


class DynamicInt8(Quantizer):
    name = "dynamic-int8"
    description = "int8 weights and dynamically quantized activations for Linear layers (int8 kernels)"
    materialized = True
    trainable_after = False

    @dataclasses.dataclass(frozen=True)
    class Params:
        # Linear module paths or shell patterns kept in float (an LM head, as the other
        # quantizers skip it), so that compared quantizers leave the same layers alone.
        skip: tuple[str, ...] = ()

        ADDED_LATER: ClassVar[tuple[str, ...]] = ("skip",)  # see Ref.spec

    def apply(self, model: nn.Module, context: CompressionContext) -> nn.Module:
        model.eval()
        linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        kept = linear_layers(model, self.params.skip)  # checks every skip entry matches a layer
        if not kept:
            raise ValueError("dynamic-int8 quantizes Linear layers; the model has none left after skip")
        # By module path: quantize_dynamic leaves every module the mapping does not name alone.
        qconfig = {name: torch.ao.quantization.default_dynamic_qconfig for name in kept}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the eager API's deprecation notice
            quantized = torch.ao.quantization.quantize_dynamic(model, qconfig, dtype=torch.qint8)
        self._report = {"engine": torch.backends.quantized.engine,
                        "quantized_layers": sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear)
                                                for m in quantized.modules()),
                        "skipped_layers": {name: "listed in skip" for name in sorted(linears - set(kept))}}
        return quantized

    def report(self):
        return getattr(self, "_report", {})


def _is_int8_module(module: nn.Module) -> bool:
    """A module that runs int8 kernels (not the float "reference" modules nor packed params)."""
    path = type(module).__module__
    return (path.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized"))
            and ".reference" not in path and ".dynamic" not in path
            and type(module).__name__ != "LinearPackedParams")


def check_calibration(name: str, model: nn.Module, calibration: torch.Tensor) -> torch.Tensor:
    if len(calibration) == 0:
        raise ValueError(f"{name} needs calibration inputs to fix activation ranges; got none "
                         "(raise measure.calibration_size)")
    if not calibration.is_floating_point():
        raise ValueError(f"{name} quantizes activations of real-valued inputs; this "
                         f"{type(model).__name__} takes integer token ids (embeddings and, for "
                         f"transformers, explicit attention that int8 kernels do not cover): use "
                         f"dynamic-int8 or weight-only")
    return calibration


def fx_prepare(name: str, model: nn.Module, example: torch.Tensor, qat: bool):
    """Trace ``model`` with torch.fx and insert observers (``qat``: fake quantizers that
    training sees) with the active engine's default qconfig; parameter-free custom modules
    (reshapes) stay float leaves."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping, get_default_qconfig_mapping
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.quantize_fx import prepare_fx, prepare_qat_fx

    engine = torch.backends.quantized.engine
    leaves = sorted({type(m) for m in model.modules()
                     if not type(m).__module__.startswith("torch.")
                     and next(m.parameters(), None) is None and next(m.buffers(), None) is None},
                    key=lambda c: c.__qualname__)
    custom = PrepareCustomConfig().set_non_traceable_module_classes(leaves)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the API's deprecation notices
        try:
            if qat:
                return prepare_qat_fx(model, get_default_qat_qconfig_mapping(engine), example_inputs=(example,),
                                      prepare_custom_config=custom), leaves
            return prepare_fx(model, get_default_qconfig_mapping(engine), example_inputs=(example,),
                              prepare_custom_config=custom), leaves
        except Exception as err:  # torch.fx raises TraceError, TypeError, RuntimeError ...
            raise ValueError(f"{name} could not trace {type(model).__name__} with torch.fx "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); int8 "
                             f"kernels need a traceable graph without data-dependent control "
                             f"flow: use dynamic-int8 or weight-only") from None


def fx_convert(name: str, model: nn.Module, prepared: nn.Module, leaves) -> tuple[nn.Module, dict]:
    """The int8 model of a prepared (calibrated or trained) one, and what was converted."""
    from torch.ao.quantization.quantize_fx import convert_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = convert_fx(prepared.cpu().eval())
    int8 = collections.Counter(type(m).__name__ for m in quantized.modules() if _is_int8_module(m))
    if not int8:
        raise ValueError(f"{name} found nothing to quantize in {type(model).__name__} "
                         f"(no Conv or Linear layer reached an int8 kernel)")
    float_layers = [n for n, m in quantized.named_modules()
                    if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not _is_int8_module(m)]
    qschemes = {str(m.weight().qscheme()).removeprefix("torch.") for m in quantized.modules()
                if _is_int8_module(m) and callable(getattr(m, "weight", None))}
    return quantized, {"engine": torch.backends.quantized.engine, "int8_modules": dict(sorted(int8.items())),
                       "quantized_layers": sum(int8.values()), "float_layers": float_layers,
                       "weight_qscheme": sorted(qschemes), "float_leaf_modules": [c.__name__ for c in leaves]}


class StaticInt8(Quantizer):
    """Post-training static quantization (Jacob et al., "Quantization and Training of Neural
    Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018; Krishnamoorthi,
    "Quantizing deep convolutional networks for efficient inference: A whitepaper", 2018).

    The model is traced with torch.fx, Conv+BN(+ReLU) and Linear(+ReLU) are fused, observers
    record activation ranges (histogram observers) over the calibration batches, and every
    supported op is converted to an int8 kernel with per-output-channel int8 weights and
    per-tensor uint8 activations, using the default qconfig of the active quantized engine
    (``torch.backends.quantized.engine``; x86/fbgemm give per-channel weights). Parameter-free
    custom modules (reshapes such as the cnn's ``View``) run in float, with a quantize step
    after them. Models that torch.fx cannot trace (data-dependent control flow, token inputs
    with explicit attention) are refused.
    """

    name = "static-int8"
    description = ("int8 weights (per channel) and int8 activations calibrated on training inputs; "
                   "fused conv/linear int8 kernels (FX graph mode)")
    materialized = True
    trainable_after = False

    @dataclasses.dataclass(frozen=True)
    class Params:
        batch_size: int = 64  # calibration inputs per forward pass

        def __post_init__(self):
            if self.batch_size < 1:
                raise ValueError(f"static-int8: batch_size must be >= 1, got {self.batch_size}")

    def apply(self, model: nn.Module, context: CompressionContext) -> nn.Module:
        calibration = check_calibration(self.name, model, context.calibration)
        model = model.cpu().eval()  # int8 kernels run on the CPU; eval mode folds batch norm
        prepared, leaves = fx_prepare(self.name, model, calibration[:1], qat=False)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for start in range(0, len(calibration), self.params.batch_size):
                prepared(calibration[start:start + self.params.batch_size])
        quantized, self._report = fx_convert(self.name, model, prepared, leaves)
        self._report["calibration_size"] = len(calibration)
        return quantized

    def report(self):
        return getattr(self, "_report", {})


class QAT(Quantizer):
    """Quantization-aware training to int8 kernels.

    Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-
    Arithmetic-Only Inference", CVPR 2018; Krishnamoorthi, "Quantizing deep convolutional
    networks for efficient inference: A whitepaper", 2018. The model is traced as for
    ``static-int8``, with fake quantizers on the weights (per output channel) and activations
    (moving-average ranges) of the engine's default QAT qconfig; batch norm stays trainable in
    the fused conv-bn modules. It is then fine-tuned for ``epochs`` epochs, the rounding passed
    through by the straight-through estimator, with a distiller when ``distill`` names one
    (KD from the full-precision teacher), and converted to the same int8 kernels as
    ``static-int8``. Example: ``[{distill: hinton}, {quantize: {name: qat, epochs: 3,
    distill: hinton}}]``.
    """

    name = "qat"
    description = ("quantization-aware fine-tuning (fake-quantized weights and activations, optional KD), "
                   "then int8 kernels as static-int8")
    materialized = True
    trainable_after = False

    @dataclasses.dataclass(frozen=True)
    class Params(FinetuneParams):
        epochs: int = 3

        def __post_init__(self):
            super().__post_init__()
            if self.epochs < 1:
                raise ValueError(f"qat: epochs must be >= 1, got {self.epochs}")

    def apply(self, model: nn.Module, context: CompressionContext) -> nn.Module:
        if context is None or context.finetune is None:
            raise ValueError("qat fine-tunes the fake-quantized model and needs a training run "
                             "(context.finetune); use it inside an experiment, or static-int8 without training")
        calibration = check_calibration(self.name, model, context.calibration)
        model = model.cpu().train()
        prepared, leaves = fx_prepare(self.name, model, calibration[:1], qat=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            history = context.finetune(prepared, self.params.epochs, self.params.distill)
        quantized, self._report = fx_convert(self.name, model, prepared, leaves)
        self._report["finetune_epochs"] = len(history)
        return quantized

    def report(self):
        return getattr(self, "_report", {})

    @classmethod
    def finetune_schedule(cls, params: Params) -> list[tuple[int, object]]:
        """One fine-tuning call of the fake-quantized model (see ``apply``)."""
        return [(params.epochs, params.distill)]


@hookimpl
def kdbench_register_quantizers(register):
    register(DynamicInt8)
    register(StaticInt8)
    register(QAT)
