"""Model family ``resnet``: the CIFAR ResNets of He et al. 2016, as used in CIFAR-100 KD tables.

He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2:
a 3x3 stem and three stages of basic blocks at 16, 32 and 64 channels, depth ``6n + 2``. The
distillation literature (CRD / RepDistiller, mdistiller) adds depth 8 and 14, and the wider
``x4`` variants (32-channel stem, stages at 64, 128, 256) used as ResNet-32x4 -> ResNet-8x4.
Downsampling shortcuts are 1x1 convolutions with batch norm (option B of the paper), as there.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from kdbench import hookimpl
from kdbench.contracts import ModelFamily, TaskData

#: arch -> (basic blocks per stage, (stem width, stage widths ...)).
ARCHS: dict[str, tuple[int, tuple[int, int, int, int]]] = {
    "resnet8": (1, (16, 16, 32, 64)),
    "resnet14": (2, (16, 16, 32, 64)),
    "resnet20": (3, (16, 16, 32, 64)),
    "resnet32": (5, (16, 16, 32, 64)),
    "resnet44": (7, (16, 16, 32, 64)),
    "resnet56": (9, (16, 16, 32, 64)),
    "resnet110": (18, (16, 16, 32, 64)),
    "resnet8x4": (1, (32, 64, 128, 256)),
    "resnet32x4": (5, (32, 64, 128, 256)),
}


def image_shape(data: TaskData, family: str) -> tuple[int, int, int]:
    """``(C, H, W)`` of the task's inputs, or a clear error for non-image tasks."""
    shape = tuple(data.input_shape)
    if len(shape) != 3 or data.vocab_size is not None:
        raise ValueError(f"{family} needs image inputs (C, H, W), got input_shape {shape}")
    return shape  # type: ignore[return-value]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or projection shortcut, ReLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Not in place: the block input may be a captured feature that must stay intact.
        return self.relu(out + self.shortcut(x))


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` basic blocks; only the first changes resolution or width."""
    units = [BasicBlock(in_channels, out_channels, stride)]
    units += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*units)


class CifarResNet(nn.Module):
    """Stem, three stages (the second and third halve the resolution), global pool, linear."""

    def __init__(self, blocks: int, widths: tuple[int, int, int, int], in_channels: int, num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.layer1 = _stage(widths[0], widths[1], blocks, stride=1)
        self.layer2 = _stage(widths[1], widths[2], blocks, stride=2)
        self.layer3 = _stage(widths[2], widths[3], blocks, stride=2)
        # Adaptive pooling equals the reference's 8x8 average pool on 32x32 inputs and also
        # accepts other resolutions.
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x))


class ResNet(ModelFamily):
    """CIFAR ResNet (He et al. 2016, "Deep Residual Learning for Image Recognition").

    Depths 8 to 110 at widths 16/32/64, plus the 4x wider ResNet-8x4 and ResNet-32x4 of the
    CRD benchmark (Tian et al. 2020). Parameter counts match the published ones (ResNet-56
    0.86M, ResNet-32x4 7.43M for 100 classes).
    """

    name = "resnet"
    description = "CIFAR ResNet (resnet8..110, resnet8x4, resnet32x4) as in the CRD/RepDistiller tables"
    inputs = ("images",)
    targets = ("labels",)

    @dataclasses.dataclass(frozen=True)
    class Params:
        arch: Literal["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56",
                      "resnet110", "resnet8x4", "resnet32x4"] = "resnet20"

        def __post_init__(self):
            if self.arch not in ARCHS:
                raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {self.arch!r}")

    @classmethod
    def label_for(cls, params) -> str:
        return params.arch

    def build(self, data: TaskData) -> nn.Module:
        channels, _, _ = image_shape(data, "resnet")
        blocks, widths = ARCHS[self.params.arch]
        return CifarResNet(blocks, widths, channels, data.num_classes)

    def feature_points(self, model: nn.Module) -> list[str]:
        # After the stem, after each stage (post-ReLU), and the pooled pre-logit vector.
        return ["stem", "layer1", "layer2", "layer3", "pool"]


@hookimpl
def kdbench_register_models(register):
    register(ResNet)
