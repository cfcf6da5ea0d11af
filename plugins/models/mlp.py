"""Model family ``mlp``: a multilayer perceptron with configurable hidden sizes.

``hidden: []`` is multinomial logistic regression (one linear layer on the flattened input).
``residual: true`` adds each hidden layer after the first to its input where the widths agree
(``h = h + relu(W h + b)``), as in the MLP of Greydanus and Kobak, "Scaling Down Deep Learning
with MNIST-1D" (ICML 2024, arXiv:2011.14439; ``MLPBase`` of github.com/greydanus/mnist1d):
``hidden: [100, 100], residual: true`` is that model (15,210 parameters on MNIST-1D).
Feature points: the hidden activations (``act<i>``, or ``res<i>`` for a residual layer).
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from typing import ClassVar, Literal

from torch import nn

from kdbench import hookimpl
from kdbench.contracts import ModelFamily, TaskData

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class Residual(nn.Module):
    """``x + act(fc(x))``: a hidden layer whose output keeps its input."""

    def __init__(self, width: int, activation: str):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = ACTIVATIONS[activation]()

    def forward(self, x):
        return x + self.act(self.fc(x))


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
        residual: bool = False  # hidden layers after the first, of unchanged width, add their input

        ADDED_LATER: ClassVar[tuple[str, ...]] = ("residual",)  # see Ref.spec

        def __post_init__(self):
            if any(h < 1 for h in self.hidden):
                raise ValueError(f"hidden sizes must be positive, got {list(self.hidden)}")
            if not 0 <= self.dropout < 1:
                raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def build(self, data: TaskData) -> nn.Module:
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        width = math.prod(data.input_shape)
        for i, h in enumerate(self.params.hidden, start=1):
            if self.params.residual and i > 1 and h == width:
                layers[f"res{i}"] = Residual(h, self.params.activation)
            else:
                layers[f"fc{i}"] = nn.Linear(width, h)
                layers[f"act{i}"] = ACTIVATIONS[self.params.activation]()
            if self.params.dropout:
                layers[f"drop{i}"] = nn.Dropout(self.params.dropout)
            width = h
        layers["head"] = nn.Linear(width, data.num_classes)
        return nn.Sequential(layers)

    def feature_points(self, model: nn.Module) -> list[str]:
        return [name for name, _ in model.named_children() if name.startswith(("act", "res"))]


@hookimpl
def kdbench_register_models(register):
    register(MLP)
