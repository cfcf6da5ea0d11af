"""Loss terms shared by the distillers.

Most feature and relation methods are trained, as in the CRD/RepDistiller code base, with
``ce_weight * CE + kd_weight * Hinton-KD + beta * method_loss``; ``Mixed`` holds those three
weights and ``mixed_terms`` computes the first two.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from kdbench.contracts import Outputs


def without_padding(targets: torch.Tensor, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``rows`` without the rows whose target is -100 (sequence padding), then ``targets``.
    A batch with no padding (every classification batch) is passed through as it is: boolean
    indexing copies every row, and on a small model it costs a tenth of a training step."""
    keep = targets != -100
    if bool(keep.all()):
        return (*rows, targets)
    return (*(r[keep] for r in rows), targets[keep])


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            targets: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * KL(softmax(t / T) || softmax(s / T))`` averaged over rows; rows whose target is
    -100 (sequence padding) are left out."""
    if targets is not None:
        student_logits, teacher_logits, _ = without_padding(targets, student_logits, teacher_logits)
    t = temperature
    return t * t * F.kl_div(F.log_softmax(student_logits / t, dim=-1),
                            F.log_softmax(teacher_logits / t, dim=-1),
                            reduction="batchmean", log_target=True)


@dataclasses.dataclass(frozen=True)
class Mixed:
    """Weights of the cross-entropy and Hinton-KD terms that accompany a method's own loss."""

    ce_weight: float = 1.0
    kd_weight: float = 0.0
    temperature: float = 4.0

    def __post_init__(self):
        if self.ce_weight < 0 or self.kd_weight < 0 or self.temperature <= 0:
            raise ValueError("ce_weight and kd_weight must be >= 0 and temperature > 0")


def mixed_terms(params: Mixed, student: Outputs, teacher: Outputs, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``ce`` and ``kd`` terms, only those with a non-zero weight."""
    terms = {}
    if params.ce_weight:
        terms["ce"] = params.ce_weight * F.cross_entropy(student.logits, targets, ignore_index=-100)
    if params.kd_weight:
        terms["kd"] = params.kd_weight * soft_kl(student.logits, teacher.logits, params.temperature, targets)
    return terms


def pick_point(spec: str | int, points: list[str], role: str) -> str:
    """A tap point chosen by module path or by index into the model's feature points
    (``-1`` = the deepest); a clear error lists the points the model has."""
    if isinstance(spec, int):
        if not points:
            raise ValueError(f"the {role} model names no feature points; this method needs one")
        if not -len(points) <= spec < len(points):
            raise ValueError(f"{role} feature point index {spec} is out of range: the {role} model has "
                             f"{len(points)} points {points}")
        return points[spec]
    if spec not in points:
        raise ValueError(f"'{spec}' is not a feature point of the {role} model; its points are {points}")
    return spec
