"""Model family ``mlp``: a multilayer perceptron with configurable hidden sizes."""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from typing import Literal

from torch import nn

from kdbench import hookimpl
from kdbench.contracts import ModelFamily, TaskData

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLP(ModelFamily):
    name = "mlp"
    description = "multilayer perceptron; feature points are the hidden activations"
    inputs = ("features", "signals", "images")  # flattened
    targets = ("labels",)

    @dataclasses.dataclass(frozen=True)
    class Params:
        hidden: tuple[int, ...] = (128,)
        activation: Literal["relu", "gelu", "tanh"] = "relu"
        dropout: float = 0.0

        def __post_init__(self):
            if any(h < 1 for h in self.hidden):
                raise ValueError(f"hidden sizes must be positive, got {list(self.hidden)}")
            if not 0 <= self.dropout < 1:
                raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def build(self, data: TaskData) -> nn.Module:
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        width = math.prod(data.input_shape)
        for i, h in enumerate(self.params.hidden, start=1):
            layers[f"fc{i}"] = nn.Linear(width, h)
            layers[f"act{i}"] = ACTIVATIONS[self.params.activation]()
            if self.params.dropout:
                layers[f"drop{i}"] = nn.Dropout(self.params.dropout)
            width = h
        layers["head"] = nn.Linear(width, data.num_classes)
        return nn.Sequential(layers)

    def feature_points(self, model: nn.Module) -> list[str]:
        return [name for name, _ in model.named_children() if name.startswith("act")]


@hookimpl
def kdbench_register_models(register):
    register(MLP)
