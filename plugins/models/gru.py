"""Model family ``gru``: a gated recurrent unit read over a 1-D signal, every step classified.

The GRU of Greydanus and Kobak, "Scaling Down Deep Learning with MNIST-1D" (ICML 2024,
arXiv:2011.14439; ``GRUBase`` of github.com/greydanus/mnist1d), which the paper reports at
91 % test accuracy: each of the signal's samples is one time step of one input feature
(a ``(C, L)`` signal gives ``L`` steps of ``C`` features); one GRU layer, bidirectional by
default, with ``hidden`` units per direction and a zero initial state; its outputs at all
``L`` steps (both directions concatenated) are flattened into one linear classifier. The
defaults are the paper's: 6 units, bidirectional, so on MNIST-1D's 40-sample signals the GRU
has 2 x 3 x (6 x (1 + 6) + 2 x 6) = 324 parameters and the classifier 40 x 12 x 10 + 10 = 4,810
(5,134 in all).

Feature points: ``rnn`` (the output sequence, ``(B, L, directions x hidden)``) and ``flatten``
(the same, flattened: the pre-logit feature).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from kdbench import hookimpl
from kdbench.contracts import ModelFamily, TaskData


class Recurrent(nn.Module):
    """A GRU over the signal's positions: ``(B, L)`` or ``(B, C, L)`` in, ``(B, L, D x H)`` out."""

    def __init__(self, features: int, hidden: int, bidirectional: bool):
        super().__init__()
        self.features = features
        self.gru = nn.GRU(features, hidden, batch_first=True, bidirectional=bidirectional)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = x.reshape(x.shape[0], self.features, -1).transpose(1, 2)  # (B, L, C)
        out, _ = self.gru(steps)  # the initial state is zero
        return out


class GRUClassifier(nn.Module):
    def __init__(self, features: int, steps: int, hidden: int, bidirectional: bool, classes: int):
        super().__init__()
        self.rnn = Recurrent(features, hidden, bidirectional)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(steps * hidden * (2 if bidirectional else 1), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.rnn(x)))


class GRU(ModelFamily):
    name = "gru"
    description = ("GRU over a 1-D signal, all step outputs flattened into a linear classifier "
                   "(MNIST-1D paper); feature points are the output sequence and its flattening")
    inputs = ("signals",)
    targets = ("labels",)

    @dataclasses.dataclass(frozen=True)
    class Params:
        hidden: int = 6  # units per direction
        bidirectional: bool = True

        def __post_init__(self):
            if self.hidden < 1:
                raise ValueError(f"hidden must be a positive number of units, got {self.hidden}")

    def build(self, data: TaskData) -> nn.Module:
        if data.vocab_size is not None:
            raise ValueError("gru takes real-valued signals, not token ids; use a family with embeddings")
        shape = tuple(data.input_shape)
        if len(shape) == 1:
            features, steps = 1, shape[0]
        elif len(shape) == 2:
            features, steps = shape
        else:
            raise ValueError(f"gru takes signals of shape (L,) or (C, L), got {shape}")
        if math.prod(shape) < 1:
            raise ValueError(f"gru needs a non-empty signal, got shape {shape}")
        return GRUClassifier(features, steps, self.params.hidden, self.params.bidirectional,
                             data.num_classes)

    def feature_points(self, model: nn.Module) -> list[str]:
        return ["rnn", "flatten"]


@hookimpl
def kdbench_register_models(register):
    register(GRU)
