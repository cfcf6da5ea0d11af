"""Model family ``vgg``: CIFAR VGG with batch norm (Simonyan & Zisserman 2015).

Simonyan and Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015, configurations A (VGG-11), B (VGG-13), D (VGG-16) and E (VGG-19), plus the shallow
VGG-8 of the CRD benchmark (Tian et al. 2020). The CIFAR version used in KD papers has five
blocks of 3x3 conv-BN-ReLU separated by max pools, no fully connected hidden layers: global
average pooling feeds a single linear classifier.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from kdbench import hookimpl
from kdbench.contracts import ModelFamily, TaskData

#: arch -> convolution widths of the five blocks.
ARCHS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def image_shape(data: TaskData, family: str) -> tuple[int, int, int]:
    """``(C, H, W)`` of the task's inputs, or a clear error for non-image tasks."""
    shape = tuple(data.input_shape)
    if len(shape) != 3 or data.vocab_size is not None:
        raise ValueError(f"{family} needs image inputs (C, H, W), got input_shape {shape}")
    return shape  # type: ignore[return-value]


def _block(in_channels: int, widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        # The conv keeps its bias as in the reference, so parameter counts agree.
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        in_channels = width
    return nn.Sequential(*layers)


class CifarVGG(nn.Module):
    def __init__(self, cfg: tuple[tuple[int, ...], ...], in_channels: int, num_classes: int,
                 pool_before_last: bool):
        super().__init__()
        ins = (in_channels,) + tuple(widths[-1] for widths in cfg[:-1])
        self.block0 = _block(ins[0], cfg[0])
        self.pool0 = nn.MaxPool2d(2)
        self.block1 = _block(ins[1], cfg[1])
        self.pool1 = nn.MaxPool2d(2)
        self.block2 = _block(ins[2], cfg[2])
        self.pool2 = nn.MaxPool2d(2)
        self.block3 = _block(ins[3], cfg[3])
        # The reference pools here only for 64-pixel inputs; 32-pixel images reach the last
        # block at 4x4 instead of 2x2.
        self.pool3: nn.Module = nn.MaxPool2d(2) if pool_before_last else nn.Identity()
        self.block4 = _block(ins[4], cfg[4])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(cfg[4][-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.pool3(self.block3(x))
        return self.classifier(self.pool(self.block4(x)))


class VGG(ModelFamily):
    """CIFAR VGG-BN (Simonyan & Zisserman 2015, "Very Deep Convolutional Networks ...").

    Parameter counts match the published ones (VGG-13 9.46M, VGG-8 3.96M for 100 classes).
    """

    name = "vgg"
    description = "CIFAR VGG with batch norm (vgg8, vgg11, vgg13, vgg16, vgg19) as in the CRD tables"
    inputs = ("images",)
    targets = ("labels",)

    @dataclasses.dataclass(frozen=True)
    class Params:
        arch: Literal["vgg8", "vgg11", "vgg13", "vgg16", "vgg19"] = "vgg8"

        def __post_init__(self):
            if self.arch not in ARCHS:
                raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {self.arch!r}")

    @classmethod
    def label_for(cls, params) -> str:
        return params.arch

    def build(self, data: TaskData) -> nn.Module:
        channels, height, width = image_shape(data, "vgg")
        if min(height, width) < 8:
            raise ValueError(f"vgg pools three times and needs inputs of at least 8x8, got {height}x{width}")
        return CifarVGG(ARCHS[self.params.arch], channels, data.num_classes,
                        pool_before_last=min(height, width) >= 64)

    def feature_points(self, model: nn.Module) -> list[str]:
        # Each block's output after its final ReLU, then the pooled pre-logit vector.
        return ["block0", "block1", "block2", "block3", "block4", "pool"]


@hookimpl
def kdbench_register_models(register):
    register(VGG)
