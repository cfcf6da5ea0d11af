"""Response-based distillers: they match the teacher's outputs (logits)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from kdbench import hookimpl
from kdbench.contracts import Distiller, Outputs
from kdbench_plugins.distill.common import soft_kl


class Hinton(Distiller):
    """Soft-target knowledge distillation.

    Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network", 2015:
    ``(1 - alpha) * CE(z_s, y) + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``.
    The ``T^2`` factor keeps the soft-target gradients on the scale of the hard-target ones
    when the temperature changes; the KL is averaged over the batch.
    """

    name = "hinton"
    description = "soft targets at temperature T (scaled by T^2) mixed with cross-entropy by alpha"
    category = "response"
    paper = "Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. arXiv:1503.02531, 2015"

    @dataclasses.dataclass(frozen=True)
    class Params:
        temperature: float = 4.0
        alpha: float = 0.9

        def __post_init__(self):
            if self.temperature <= 0:
                raise ValueError(f"temperature must be positive, got {self.temperature}")
            if not 0 <= self.alpha <= 1:
                raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")

    def loss(self, student: Outputs, teacher: Outputs, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        a = self.params.alpha
        return {"ce": (1 - a) * F.cross_entropy(student.logits, targets, ignore_index=-100),
                "kd": a * soft_kl(student.logits, teacher.logits, self.params.temperature, targets)}


@hookimpl
def kdbench_register_distillers(register):
    register(Hinton)
