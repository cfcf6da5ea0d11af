"""Model family ``mobilenetv2``: the CIFAR MobileNetV2 of the CRD benchmark (Sandler et al. 2018).

Sandler, Howard, Zhu, Zhmoginov and Chen, "MobileNetV2: Inverted Residuals and Linear
Bottlenecks", CVPR 2018. The KD variant (from "Knowledge Distillation via Route Constrained
Optimization", Jin et al. 2019, used by CRD as "MobileNetV2" at width 0.5) keeps the paper's
seven stages of inverted residuals and its stride-2 stem (32-pixel inputs end at 2x2), but
differs in details that matter for comparable numbers: ReLU instead of ReLU6, a 1x1 expansion
conv even in the expansion-1 stage, and channel widths truncated rather than rounded to
multiples of 8.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kdbench import hookimpl
from kdbench.contracts import ModelFamily, TaskData

#: (expansion, or None for the configurable one; channels; blocks; first stride) per stage.
STAGES: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)


def image_shape(data: TaskData, family: str) -> tuple[int, int, int]:
    """``(C, H, W)`` of the task's inputs, or a clear error for non-image tasks."""
    shape = tuple(data.input_shape)
    if len(shape) != 3 or data.vocab_size is not None:
        raise ValueError(f"{family} needs image inputs (C, H, W), got input_shape {shape}")
    return shape  # type: ignore[return-value]


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int = 1,
                 groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2,
                                   groups=groups, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, linear 1x1 projection; identity skip when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.conv = nn.Sequential(
            conv_bn_relu(in_channels, hidden, 1),
            conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            # No activation after the projection: the "linear bottleneck" of the paper.
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


class CifarMobileNetV2(nn.Module):
    def __init__(self, width: float, expansion: int, in_channels: int, num_classes: int):
        super().__init__()
        channels = int(32 * width)
        self.conv1 = conv_bn_relu(in_channels, channels, 3, stride=2)
        stages = []
        for t, c, n, s in STAGES:
            out = int(c * width)
            units = []
            for i in range(n):
                units.append(InvertedResidual(channels, out, s if i == 0 else 1,
                                              expansion if t is None else t))
                channels = out
            stages.append(nn.Sequential(*units))
        self.blocks = nn.Sequential(*stages)
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = conv_bn_relu(channels, last, 1)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(last, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.blocks(self.conv1(x)))
        return self.classifier(self.pool(x))


class MobileNetV2(ModelFamily):
    """CIFAR MobileNetV2 (Sandler et al. 2018, "MobileNetV2: Inverted Residuals ...").

    The default (width 0.5, expansion 6) is the CRD benchmark's "MobileNetV2" student.
    """

    name = "mobilenetv2"
    description = "CIFAR MobileNetV2 (width 0.5 is the CRD tables' student) with inverted residuals"
    inputs = ("images",)
    targets = ("labels",)

    @dataclasses.dataclass(frozen=True)
    class Params:
        width: float = 0.5
        expansion: int = 6

        def __post_init__(self):
            # Below 1/16 the first stage would have no channels at all.
            if not 1 / 16 <= self.width <= 4:
                raise ValueError(f"width must be in [0.0625, 4], got {self.width}")
            if not 1 <= self.expansion <= 12:
                raise ValueError(f"expansion must be an integer in [1, 12], got {self.expansion}")

    def build(self, data: TaskData) -> nn.Module:
        channels, _, _ = image_shape(data, "mobilenetv2")
        return CifarMobileNetV2(self.params.width, self.params.expansion, channels, data.num_classes)

    def feature_points(self, model: nn.Module) -> list[str]:
        # The reference's feature list: the stem, the last stage at each resolution (16, 8, 4
        # and 2 pixels for CIFAR's 32), and the pooled pre-logit vector.
        return ["conv1", "blocks.1", "blocks.2", "blocks.4", "blocks.6", "pool"]


@hookimpl
def kdbench_register_models(register):
    register(MobileNetV2)
