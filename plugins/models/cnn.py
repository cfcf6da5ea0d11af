"""Model family ``cnn``: small convolutional nets for images (2-D) and sequences (1-D).

Each block is ``conv (same padding) -> [batch norm] -> ReLU -> max-pool 2``; the pooled map is
flattened (or globally averaged) and goes through an optional hidden layer to the classifier.
``kernel_sizes`` (one per block), ``stride``, ``padding`` and ``pool: false`` describe
strided nets without pooling.

Inputs: ``(C, H, W)`` images use 2-D convolutions; ``(C, L)`` sequences and flat ``(L,)``
vectors use 1-D convolutions, except that a flat input whose length is a perfect square
(scikit-learn digits' ``(64,)``) is viewed as a ``1 x side x side`` image (``dims`` overrides
that choice).

The CNN of Greydanus and Kobak, "Scaling Down Deep Learning with MNIST-1D" (ICML 2024,
arXiv:2011.14439; ``ConvBase`` of github.com/greydanus/mnist1d) is, exactly,
``channels: [25, 25, 25], kernel_sizes: [5, 3, 3], stride: 2, padding: 1, pool: false,
batch_norm: false, hidden: 0``: three 1-D convolutions with bias and ReLU, lengths
40 -> 19 -> 10 -> 5, the 25 x 5 map flattened into a linear classifier (5,210 parameters);
the paper reports 94 % test accuracy for it (``kdbench/experiments/mnist1d-paper.yaml``).

Feature points: the output of every conv block (``block1`` ... ``blockN``) and the pre-logit
feature (``act`` after the hidden layer, else ``flatten``).
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from typing import ClassVar, Literal

from torch import nn

from kdbench import hookimpl
from kdbench.contracts import ModelFamily, TaskData


class View(nn.Module):
    """Reshape each example (a flat vector to ``1 x L`` or ``1 x side x side``)."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x):
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


def conv_shape(input_shape: tuple[int, ...], dims: str) -> tuple[int, ...]:
    """The ``(C, H, W)`` or ``(C, L)`` shape the convolutions see."""
    shape = tuple(input_shape)
    if len(shape) == 1:
        side = math.isqrt(shape[0])
        square = side * side == shape[0]
        if dims == "2d" and not square:
            raise ValueError(f"cnn dims=2d needs a square flat input, got length {shape[0]}")
        return (1, side, side) if (square and dims != "1d") else (1, shape[0])
    if len(shape) == 2 and dims != "2d":
        return shape
    if len(shape) == 3 and dims != "1d":
        return shape
    raise ValueError(f"cnn cannot use input shape {shape} with dims={dims}; it takes (L,), (C, L) "
                     "or (C, H, W)")


class CNN(ModelFamily):
    name = "cnn"
    description = ("small conv net (1-D for sequences, 2-D for images); feature points are the "
                   "conv blocks and the pre-logit feature")
    inputs = ("features", "signals", "images")  # flat vectors are viewed as 1-D signals or square images
    targets = ("labels",)

    @dataclasses.dataclass(frozen=True)
    class Params:
        channels: tuple[int, ...] = (32, 64)  # one conv block per entry
        kernel_size: int = 3
        hidden: int = 128  # width of the hidden layer before the classifier; 0 = none
        batch_norm: bool = True
        global_pool: bool = False  # average the last map over space instead of flattening it
        dropout: float = 0.0  # before the classifier
        dims: Literal["auto", "1d", "2d"] = "auto"
        kernel_sizes: tuple[int, ...] = ()  # one per block; empty: kernel_size for every block
        stride: int = 1  # of every convolution
        padding: int = -1  # of every convolution; -1: same padding (kernel // 2)
        pool: bool = True  # max-pool 2 after each block

        ADDED_LATER: ClassVar[tuple[str, ...]] = ("kernel_sizes", "stride", "padding", "pool")  # see Ref.spec

        def kernels(self) -> tuple[int, ...]:
            return self.kernel_sizes or (self.kernel_size,) * len(self.channels)

        def __post_init__(self):
            if not self.channels or any(c < 1 for c in self.channels):
                raise ValueError(f"channels must be a non-empty list of positive sizes, got {list(self.channels)}")
            if self.kernel_sizes and len(self.kernel_sizes) != len(self.channels):
                raise ValueError(f"kernel_sizes must give one size per block ({len(self.channels)}), "
                                 f"got {list(self.kernel_sizes)}")
            if any(k < 1 for k in self.kernels()):
                raise ValueError(f"kernel sizes must be positive, got {list(self.kernels())}")
            if self.padding == -1 and any(k % 2 == 0 for k in self.kernels()):
                given = "kernel_sizes" if self.kernel_sizes else "kernel_size"
                raise ValueError(f"{given} {list(self.kernel_sizes) or self.kernel_size}: same padding "
                                 "(padding: -1, the default) needs odd kernel sizes; use an odd "
                                 f"{given} (3, 5, ...) or set padding explicitly")
            if self.stride < 1 or self.padding < -1:
                raise ValueError(f"stride must be >= 1 and padding >= 0 (or -1: same), got "
                                 f"stride={self.stride}, padding={self.padding}")
            if self.hidden < 0:
                raise ValueError(f"hidden must be >= 0, got {self.hidden}")
            if not 0 <= self.dropout < 1:
                raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def build(self, data: TaskData) -> nn.Module:
        if data.vocab_size is not None:
            raise ValueError("cnn takes real-valued inputs, not token ids; use a family with embeddings")
        p = self.params
        shape = conv_shape(data.input_shape, p.dims)
        conv, norm, pool = ((nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d) if len(shape) == 3
                            else (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d))
        layers: OrderedDict[str, nn.Module] = OrderedDict(view=View(shape))
        width, spatial = shape[0], list(shape[1:])
        for i, (out, kernel) in enumerate(zip(p.channels, p.kernels()), start=1):
            pad = kernel // 2 if p.padding == -1 else p.padding
            spatial = [(s + 2 * pad - kernel) // p.stride + 1 for s in spatial]
            if min(spatial) < 1:
                raise ValueError(f"cnn block {i} leaves no positions of input {shape} (kernel {kernel}, "
                                 f"stride {p.stride}, padding {pad}); use fewer blocks or a smaller stride")
            # The bias is redundant in front of batch norm, which has its own shift.
            block = [conv(width, out, kernel, stride=p.stride, padding=pad, bias=not p.batch_norm)]
            if p.batch_norm:
                block.append(norm(out))
            block.append(nn.ReLU())
            if p.pool and min(spatial) >= 2:  # deep stacks on small inputs stop pooling at 1 pixel
                block.append(pool(2))
                spatial = [s // 2 for s in spatial]
            layers[f"block{i}"] = nn.Sequential(*block)
            width = out
        if p.global_pool:
            layers["pool"] = nn.AdaptiveAvgPool2d(1) if len(shape) == 3 else nn.AdaptiveAvgPool1d(1)
        else:
            width *= math.prod(spatial)
        layers["flatten"] = nn.Flatten()
        if p.hidden:
            layers["fc"] = nn.Linear(width, p.hidden)
            layers["act"] = nn.ReLU()
            width = p.hidden
        if p.dropout:
            layers["drop"] = nn.Dropout(p.dropout)
        layers["head"] = nn.Linear(width, data.num_classes)
        return nn.Sequential(layers)

    def feature_points(self, model: nn.Module) -> list[str]:
        names = [name for name, _ in model.named_children()]
        return [n for n in names if n.startswith("block")] + ["act" if "act" in names else "flatten"]


@hookimpl
def kdbench_register_models(register):
    register(CNN)
