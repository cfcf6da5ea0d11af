"""Model families ``shufflenetv1`` and ``shufflenetv2``: the CIFAR ShuffleNets of the CRD benchmark.

ShuffleNet V1: Zhang, Zhou, Lin and Sun, "ShuffleNet: An Extremely Efficient Convolutional
Neural Network for Mobile Devices", CVPR 2018. ShuffleNet V2: Ma, Zhang, Zheng and Sun,
"ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design", ECCV 2018.

The CIFAR variants used as students in CRD's cross-architecture pairs (Tian et al. 2020) replace
the ImageNet stem (3x3 stride-2 conv and max pool) by a 1x1 conv to 24 channels at full
resolution, so the three stages run at 16, 8 and 4 pixels for 32-pixel inputs; the rest follows
the papers' stage tables (V1 at scale 1x, V2 at its four sizes). Like the reference, both keep
PyTorch's default initialization.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from kdbench import hookimpl
from kdbench.contracts import ModelFamily, TaskData

STEM_CHANNELS = 24

#: ShuffleNet V1 at scale 1x: groups -> output channels of the three stages (its Table 1).
V1_WIDTHS: dict[int, tuple[int, int, int]] = {1: (144, 288, 576), 2: (200, 400, 800), 3: (240, 480, 960)}
V1_BLOCKS = (4, 8, 4)

#: ShuffleNet V2: size -> output channels of the three stages and of the head conv (its Table 5).
V2_WIDTHS: dict[float, tuple[int, int, int, int]] = {
    0.5: (48, 96, 192, 1024),
    1.0: (116, 232, 464, 1024),
    1.5: (176, 352, 704, 1024),
    2.0: (244, 488, 976, 2048),  # the paper's 244; RepDistiller's table has 224 (unused by CRD)
}
V2_BLOCKS = (3, 7, 3)  # stride-1 units per stage, after the stride-2 unit


def image_shape(data: TaskData, family: str) -> tuple[int, int, int]:
    """``(C, H, W)`` of the task's inputs, or a clear error for non-image tasks."""
    shape = tuple(data.input_shape)
    if len(shape) != 3 or data.vocab_size is not None:
        raise ValueError(f"{family} needs image inputs (C, H, W), got input_shape {shape}")
    return shape  # type: ignore[return-value]


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups so the next grouped conv mixes them."""
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1,
            relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2,
                                         groups=groups, bias=False), nn.BatchNorm2d(out_channels)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- ShuffleNet V1
class V1Unit(nn.Module):
    """Grouped 1x1, channel shuffle, depthwise 3x3, grouped 1x1; added (stride 1) or
    concatenated with an average-pooled shortcut (stride 2), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        # Stride-2 units concatenate the shortcut, so their branch makes only the difference.
        branch = out_channels - in_channels if stride == 2 else out_channels
        mid = branch // 4
        # The first unit sees the 24-channel stem, too few to split into groups (as in the paper).
        self.reduce_groups = 1 if in_channels == STEM_CHANNELS else groups
        self.reduce = conv_bn(in_channels, mid, 1, groups=self.reduce_groups)
        # The CIFAR reference applies ReLU after the depthwise conv too (the paper does not).
        self.depthwise = conv_bn(mid, mid, 3, stride, groups=mid)
        self.expand = conv_bn(mid, branch, 1, groups=groups, relu=False)
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(self.reduce(x), self.reduce_groups)
        out = self.expand(self.depthwise(out))
        skip = self.shortcut(x)
        return self.relu(torch.cat([out, skip], 1) if self.stride == 2 else out + skip)


class CifarShuffleNetV1(nn.Module):
    def __init__(self, groups: int, in_channels: int, num_classes: int):
        super().__init__()
        self.stem = conv_bn(in_channels, STEM_CHANNELS, 1)
        widths = V1_WIDTHS[groups]
        ins = (STEM_CHANNELS,) + widths[:-1]
        self.layer1, self.layer2, self.layer3 = (
            nn.Sequential(*(V1Unit(i if k == 0 else w, w, 2 if k == 0 else 1, groups) for k in range(n)))
            for i, w, n in zip(ins, widths, V1_BLOCKS))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x))


class ShuffleNetV1(ModelFamily):
    """CIFAR ShuffleNet V1 (Zhang et al. 2018, "ShuffleNet: An Extremely Efficient ...").

    The default (3 groups, scale 1x) is the CRD tables' "ShuffleNetV1" student.
    """

    name = "shufflenetv1"
    description = "CIFAR ShuffleNet V1 (grouped 1x1 convs + channel shuffle), the CRD tables' student"
    inputs = ("images",)
    targets = ("labels",)

    @dataclasses.dataclass(frozen=True)
    class Params:
        groups: Literal[1, 2, 3] = 3

        def __post_init__(self):
            if self.groups not in V1_WIDTHS:
                raise ValueError(f"groups must be one of {sorted(V1_WIDTHS)}, got {self.groups}")

    def build(self, data: TaskData) -> nn.Module:
        channels, _, _ = image_shape(data, "shufflenetv1")
        return CifarShuffleNetV1(self.params.groups, channels, data.num_classes)

    def feature_points(self, model: nn.Module) -> list[str]:
        return ["stem", "layer1", "layer2", "layer3", "pool"]


# ---------------------------------------------------------------- ShuffleNet V2
class V2Unit(nn.Module):
    """Stride 1: half the channels pass through, the other half go through 1x1, depthwise
    3x3, 1x1. Stride 2: both halves are computed from the whole input (depthwise-then-1x1 on
    the left, the same branch on the right), doubling the width. Then a 2-group shuffle."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        half = out_channels // 2
        branch_in = in_channels if stride == 2 else in_channels - in_channels // 2
        self.branch = nn.Sequential(conv_bn(branch_in, half, 1),
                                    conv_bn(half, half, 3, stride, groups=half, relu=False),
                                    conv_bn(half, half, 1))
        self.left: nn.Module | None = None
        if stride == 2:
            self.left = nn.Sequential(conv_bn(in_channels, in_channels, 3, 2, groups=in_channels, relu=False),
                                      conv_bn(in_channels, out_channels - half, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.left is None:
            keep, work = x[:, :x.shape[1] // 2], x[:, x.shape[1] // 2:]
        else:
            keep, work = self.left(x), x
        return channel_shuffle(torch.cat([keep, self.branch(work)], 1), 2)


class CifarShuffleNetV2(nn.Module):
    def __init__(self, size: float, in_channels: int, num_classes: int):
        super().__init__()
        *widths, head = V2_WIDTHS[size]
        self.stem = conv_bn(in_channels, STEM_CHANNELS, 1)
        ins = (STEM_CHANNELS, *widths[:-1])
        self.layer1, self.layer2, self.layer3 = (
            nn.Sequential(V2Unit(i, w, 2), *(V2Unit(w, w, 1) for _ in range(n)))
            for i, w, n in zip(ins, widths, V2_BLOCKS))
        self.head = conv_bn(widths[-1], head, 1)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(self.head(x)))


class ShuffleNetV2(ModelFamily):
    """CIFAR ShuffleNet V2 (Ma et al. 2018, "ShuffleNet V2: Practical Guidelines ...").

    The default (size 1.0) is the CRD tables' "ShuffleNetV2" student.
    """

    name = "shufflenetv2"
    description = "CIFAR ShuffleNet V2 (channel split + shuffle, sizes 0.5-2.0), the CRD tables' student"
    inputs = ("images",)
    targets = ("labels",)

    @dataclasses.dataclass(frozen=True)
    class Params:
        size: Literal[0.5, 1.0, 1.5, 2.0] = 1.0

        def __post_init__(self):
            if self.size not in V2_WIDTHS:
                raise ValueError(f"size must be one of {sorted(V2_WIDTHS)}, got {self.size}")

    def build(self, data: TaskData) -> nn.Module:
        channels, _, _ = image_shape(data, "shufflenetv2")
        return CifarShuffleNetV2(float(self.params.size), channels, data.num_classes)

    def feature_points(self, model: nn.Module) -> list[str]:
        # The pooled vector comes after the 1x1 head conv, as in the reference.
        return ["stem", "layer1", "layer2", "layer3", "pool"]


@hookimpl
def kdbench_register_models(register):
    register(ShuffleNetV1)
    register(ShuffleNetV2)
