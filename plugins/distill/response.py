"""Response-based distillers: they match the teacher's outputs (logits)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from kdbench import hookimpl
from kdbench.contracts import Distiller, Outputs
from kdbench_plugins.distill.common import soft_kl, without_padding


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score each row of logits (Sun et al., CVPR 2024): ``(z - mean(z)) / (std(z) + eps)``.

    As in the authors' released code the standard deviation is Bessel-corrected (divides by
    C - 1); it only rescales the effective temperature by ``sqrt((C - 1) / C)``. The variance is
    clamped before the square root so a row of equal logits (std 0) has a zero gradient, not NaN.
    """
    centred = logits - logits.mean(dim=-1, keepdim=True)
    var = logits.var(dim=-1, keepdim=True).clamp_min(torch.finfo(logits.dtype).tiny)
    return centred / (var.sqrt() + eps)


def real_rows(student: Outputs, teacher: Outputs, targets: torch.Tensor):
    """Student logits, teacher logits (detached) and targets of the rows that are not padding."""
    s, t, y = without_padding(targets, student.logits, teacher.logits)
    return s, t.detach(), y


def zeros(student: Outputs, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The terms of a batch made only of padding: 0 (still attached to the graph), not NaN."""
    zero = student.logits.sum() * 0
    return {name: zero for name in names}


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


def dkd_parts(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted ``T^2 * TCKD`` and ``T^2 * NCKD`` averaged over rows (no padding rows).

    TCKD is the KL between the binary distributions (p of the target class, 1 - p) of teacher
    and student; NCKD the KL between their softmaxes over the non-target classes alone. Both
    are built from log-probabilities, so no probability is ever rounded to 0 and logged: the
    non-target mass is a logsumexp, and the non-target classes are removed exactly rather than
    pushed down by a large constant (which stops working once logits / T exceed it).
    """
    n, c = student.shape
    t2 = temperature * temperature
    is_target = F.one_hot(targets, c).bool()

    def binary(log_probs):
        log_target = log_probs.gather(1, targets[:, None])
        log_rest = torch.logsumexp(log_probs.masked_fill(is_target, float("-inf")), dim=1, keepdim=True)
        return torch.cat([log_target, log_rest], dim=1)

    log_s = F.log_softmax(student / temperature, dim=1)
    log_t = F.log_softmax(teacher / temperature, dim=1)
    tckd = F.kl_div(binary(log_s), binary(log_t), reduction="sum", log_target=True) * t2 / n
    others = ~is_target
    nt_s = F.log_softmax(student[others].view(n, c - 1) / temperature, dim=1)
    nt_t = F.log_softmax(teacher[others].view(n, c - 1) / temperature, dim=1)
    nckd = F.kl_div(nt_s, nt_t, reduction="sum", log_target=True) * t2 / n
    return tckd, nckd


class DKD(Distiller):
    """Decoupled Knowledge Distillation.

    Zhao et al., CVPR 2022: classical KD splits into target-class KD (TCKD, binary target vs
    non-target probabilities) and non-target-class KD (NCKD, the distribution among the
    non-target classes), whose weight KD ties to the teacher's confidence. DKD weights them
    freely: ``ce_weight * CE + w(epoch) * T^2 * (alpha * TCKD + beta * NCKD)`` with
    ``w(epoch) = min(epoch / warmup, 1)``, the linear warm-up of the official code (epochs
    counted from 1). Defaults: the mdistiller CIFAR-100 configuration (CE 1, alpha 1, beta 8,
    T 4, warm-up 20 epochs; some teacher/student pairs use another beta). ``standardize``
    z-scores both models' logits first (Sun et al., CVPR 2024).
    """

    name = "dkd"
    description = "decoupled KD: target-class (alpha) and non-target-class (beta) KL, warmed up linearly"
    category = "response"
    paper = ("Zhao, Cui, Song, Qiu, Liang. Decoupled Knowledge Distillation. CVPR 2022, "
             "arXiv:2203.08679")

    @dataclasses.dataclass(frozen=True)
    class Params:
        ce_weight: float = 1.0
        alpha: float = 1.0
        beta: float = 8.0
        temperature: float = 4.0
        warmup: int = 20
        standardize: bool = False

        def __post_init__(self):
            for key in ("ce_weight", "alpha", "beta"):
                if getattr(self, key) < 0:
                    raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
            if self.temperature <= 0:
                raise ValueError(f"temperature must be positive, got {self.temperature}")
            if self.warmup < 0:
                raise ValueError(f"warmup must be >= 0 epochs (0 = none), got {self.warmup}")

    def warmup_factor(self) -> float:
        epoch = getattr(self, "epoch", None)
        if epoch is None:
            raise RuntimeError("dkd warms its KD terms up by epoch: call begin_batch(indices, epoch, "
                               "epochs) before loss")
        return min(epoch / self.params.warmup, 1.0) if self.params.warmup else 1.0

    def loss(self, student: Outputs, teacher: Outputs, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        p = self.params
        s, t, y = real_rows(student, teacher, targets)
        if not len(y):
            return zeros(student, ("ce", "dkd.tckd", "dkd.nckd"))
        ce = p.ce_weight * F.cross_entropy(s, y)
        if p.standardize:
            s, t = standardize(s), standardize(t)
        tckd, nckd = dkd_parts(s, t, y, p.temperature)
        w = self.warmup_factor()
        return {"ce": ce, "dkd.tckd": w * p.alpha * tckd, "dkd.nckd": w * p.beta * nckd}


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``; ``eps`` in the
    denominator makes a constant row count as uncorrelated instead of dividing by zero."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


class DIST(Distiller):
    """DIST: distillation by correlation rather than exact match of the predictions.

    Huang et al., NeurIPS 2022: with ``Y = softmax(Z / tau)`` per sample, the inter-class
    relation ``1 - mean_i pearson(Y_s[i, :], Y_t[i, :])`` (ranks of the classes within a
    sample) and the intra-class relation ``1 - mean_j pearson(Y_s[:, j], Y_t[:, j])`` (how one
    class is spread over the batch), each scaled by ``tau^2``:
    ``ce_weight * CE + beta * inter + gamma * intra``. Defaults are those of the official
    loss (beta = gamma = tau = 1) with CE weight 1. The intra-class term depends on the whole
    batch, so it is computed over the batch's real (non-padding) rows.
    """

    name = "dist"
    description = "Pearson correlation of class probabilities within samples (beta) and within classes (gamma)"
    category = "response"
    paper = ("Huang, You, Wang, Qian, Xu. Knowledge Distillation from A Stronger Teacher. NeurIPS 2022, "
             "arXiv:2205.10536")

    @dataclasses.dataclass(frozen=True)
    class Params:
        ce_weight: float = 1.0
        beta: float = 1.0
        gamma: float = 1.0
        tau: float = 1.0

        def __post_init__(self):
            for key in ("ce_weight", "beta", "gamma"):
                if getattr(self, key) < 0:
                    raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
            if self.tau <= 0:
                raise ValueError(f"tau must be positive, got {self.tau}")

    def loss(self, student: Outputs, teacher: Outputs, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        p = self.params
        s, t, y = real_rows(student, teacher, targets)
        if not len(y):
            return zeros(student, ("ce", "dist.inter", "dist.intra"))
        y_s = F.softmax(s / p.tau, dim=1)
        y_t = F.softmax(t / p.tau, dim=1)
        t2 = p.tau * p.tau
        inter = t2 * (1 - pearson_rows(y_s, y_t).mean())
        intra = t2 * (1 - pearson_rows(y_s.T, y_t.T).mean())
        return {"ce": p.ce_weight * F.cross_entropy(s, y),
                "dist.inter": p.beta * inter, "dist.intra": p.gamma * intra}


class LogitStd(Distiller):
    """KD with logit standardization, in the paper's default configuration.

    Sun et al., CVPR 2024: each sample's logits are z-scored before the temperature softmax,
    so the student matches the teacher's logit relations, not their range:
    ``ce_weight * CE(z_s, y) + kd_weight * T^2 * KL(softmax(Z(z_t) / T) || softmax(Z(z_s) / T))``.
    Defaults: vanilla KD as the base with the authors' CIFAR-100 setting (base temperature 2,
    CE weight 0.1, KD weight 9). ``{ce_weight: 1 - alpha, kd_weight: alpha, temperature: T}``
    is ``hinton`` with standardized logits; on DKD the pre-process is ``dkd``'s
    ``standardize: true``. (``hinton`` itself takes no new parameter: every parameter is part
    of a cell's stored identity, and adding one would re-key all existing hinton results.)
    """

    name = "logit-std"
    description = "KD on per-sample z-scored logits (base temperature 2, CE 0.1, KD 9)"
    category = "response"
    paper = ("Sun, Ren, Li, Wang, Cao. Logit Standardization in Knowledge Distillation. CVPR 2024, "
             "arXiv:2403.01427")

    @dataclasses.dataclass(frozen=True)
    class Params:
        ce_weight: float = 0.1
        kd_weight: float = 9.0
        temperature: float = 2.0

        def __post_init__(self):
            for key in ("ce_weight", "kd_weight"):
                if getattr(self, key) < 0:
                    raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
            if self.temperature <= 0:
                raise ValueError(f"temperature must be positive, got {self.temperature}")

    def loss(self, student: Outputs, teacher: Outputs, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        p = self.params
        s, t, y = real_rows(student, teacher, targets)
        if not len(y):
            return zeros(student, ("ce", "kd"))
        return {"ce": p.ce_weight * F.cross_entropy(s, y),
                "kd": p.kd_weight * soft_kl(standardize(s), standardize(t), p.temperature)}


@hookimpl
def kdbench_register_distillers(register):
    for distiller in (Hinton, DKD, DIST, LogitStd):
        register(distiller)
