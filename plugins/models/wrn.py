"""Model family ``wrn``: wide residual networks WRN-D-K (Zagoruyko & Komodakis 2016).

Zagoruyko and Komodakis, "Wide Residual Networks", BMVC 2016: a 3x3 stem at 16 channels, then
three groups of pre-activation basic blocks at 16K, 32K and 64K channels, ``(D - 4) / 6`` blocks
per group, a final BN-ReLU, global pooling and a linear classifier. WRN-40-2, WRN-16-2 and
WRN-40-1 are the teacher/students of the CRD CIFAR-100 benchmark (Tian et al. 2020).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kdbench import hookimpl
from kdbench.contracts import ModelFamily, TaskData


def image_shape(data: TaskData, family: str) -> tuple[int, int, int]:
    """``(C, H, W)`` of the task's inputs, or a clear error for non-image tasks."""
    shape = tuple(data.input_shape)
    if len(shape) != 3 or data.vocab_size is not None:
        raise ValueError(f"{family} needs image inputs (C, H, W), got input_shape {shape}")
    return shape  # type: ignore[return-value]


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, plus a shortcut.

    When the width or stride changes, the 1x1 projection shortcut reads the block's
    pre-activation (as in the paper's code), otherwise the shortcut is the raw input.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.projection = None
        if stride != 1 or in_channels != out_channels:
            self.projection = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv2(self.drop(self.relu(self.bn2(self.conv1(pre)))))
        shortcut = x if self.projection is None else self.projection(pre)
        return out + shortcut


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, dropout: float, in_channels: int, num_classes: int):
        super().__init__()
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.block1 = self._group(widths[0], widths[1], n, 1, dropout)
        self.block2 = self._group(widths[1], widths[2], n, 2, dropout)
        self.block3 = self._group(widths[2], widths[3], n, 2, dropout)
        # Pre-activation blocks end on a sum, so the network normalizes once more at the end.
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _group(in_channels: int, out_channels: int, n: int, stride: int, dropout: float) -> nn.Sequential:
        return nn.Sequential(*(PreActBlock(in_channels if i == 0 else out_channels, out_channels,
                                           stride if i == 0 else 1, dropout) for i in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.pool(self.relu(self.bn(x))))


class WRN(ModelFamily):
    """Wide ResNet WRN-depth-widen (Zagoruyko & Komodakis 2016, "Wide Residual Networks").

    Parameter counts match the published ones (WRN-40-2 2.26M, WRN-16-2 0.70M and WRN-40-1
    0.57M for 100 classes).
    """

    name = "wrn"
    description = "wide ResNet WRN-depth-widen (e.g. wrn-40-2, wrn-16-2, wrn-40-1) as in the CRD tables"
    inputs = ("images",)
    targets = ("labels",)

    @dataclasses.dataclass(frozen=True)
    class Params:
        depth: int = 16
        widen: int = 2
        dropout: float = 0.0

        def __post_init__(self):
            if self.depth < 10 or (self.depth - 4) % 6:
                raise ValueError(f"depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40 ...), got {self.depth}")
            if self.widen < 1:
                raise ValueError(f"widen must be an integer >= 1, got {self.widen}")
            if not 0 <= self.dropout < 1:
                raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def label_for(cls, params) -> str:
        name = f"wrn-{params.depth}-{params.widen}"
        return f"{name}(dropout={params.dropout})" if params.dropout else name

    def build(self, data: TaskData) -> nn.Module:
        channels, _, _ = image_shape(data, "wrn")
        p = self.params
        return WideResNet(p.depth, p.widen, p.dropout, channels, data.num_classes)

    def feature_points(self, model: nn.Module) -> list[str]:
        # As the reference's feature list: the stem conv, each group's output (a residual sum,
        # before the next normalization), and the pooled pre-logit vector.
        return ["conv1", "block1", "block2", "block3", "pool"]


@hookimpl
def kdbench_register_models(register):
    register(WRN)
