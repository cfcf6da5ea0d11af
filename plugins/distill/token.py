"""Token-level distillers for language models: a divergence between the teacher's and the
student's next-token distributions at every position, averaged over the real tokens.

Each position is a row of the logits ``(N, V)``; rows whose target is -100 (padding) are left
out. Both distributions are ``softmax(z / temperature)``; as in the language-model papers the
divergence is not rescaled by ``T^2``. Everything is computed from log-probabilities (mixtures
by logsumexp), so extreme logits never produce ``log(0)``. An optional cross-entropy on the
targets (the usual language-modelling loss) is added with ``ce_weight``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from kdbench import hookimpl
from kdbench.contracts import DistillContext, Distiller, Outputs


def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``KL(a || b)`` per row, from log-probabilities."""
    return (log_a.exp() * (log_a - log_b)).sum(dim=-1)


def log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight: float) -> torch.Tensor:
    """``log(weight * a + (1 - weight) * b)``; exact at the endpoints, logsumexp inside."""
    if weight == 0:
        return log_b
    if weight == 1:
        return log_a
    return torch.logsumexp(torch.stack([log_a + math.log(weight), log_b + math.log1p(-weight)]), dim=0)


def check_common(temperature: float, ce_weight: float, kd_weight: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if ce_weight < 0:
        raise ValueError(f"ce_weight must be >= 0, got {ce_weight}")
    if kd_weight < 0:
        raise ValueError(f"kd_weight must be >= 0, got {kd_weight}")


@dataclasses.dataclass(frozen=True)
class TokenParams:
    temperature: float = 1.0
    ce_weight: float = 0.0
    kd_weight: float = 1.0

    def __post_init__(self):
        check_common(self.temperature, self.ce_weight, self.kd_weight)


class TokenDistiller(Distiller):
    """Shared loop: mask padding, temperature log-softmax, per-position divergence, mean."""

    category = "response"
    Params = TokenParams

    def divergence(self, log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        """Per-position divergence from student ``log_q`` and teacher ``log_p``, shape (N,)."""
        raise NotImplementedError

    def setup(self, context: DistillContext) -> list:
        student, teacher = context.probe()
        vs, vt = student.logits.shape[-1], teacher.logits.shape[-1]
        if vs != vt:
            raise ValueError(f"{self.name} compares next-token distributions over one vocabulary, but the "
                             f"teacher outputs {vt} classes and the student {vs}; use a teacher and a "
                             f"student with the same tokenizer and vocabulary size")
        return []

    def loss(self, student: Outputs, teacher: Outputs, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        p = self.params
        keep = targets != -100
        s, t, y = student.logits[keep], teacher.logits[keep].detach(), targets[keep]
        # Sum / count rather than mean: a batch made only of padding gives 0, not NaN.
        count = max(int(keep.sum()), 1)
        log_q = F.log_softmax(s / p.temperature, dim=-1)
        log_p = F.log_softmax(t / p.temperature, dim=-1)
        terms = {self.name: p.kd_weight * self.divergence(log_q, log_p).sum() / count}
        if p.ce_weight:
            terms["ce"] = p.ce_weight * F.cross_entropy(s, y, reduction="sum") / count
        return terms


class ForwardKL(TokenDistiller):
    """Word-level KD: ``KL(p_teacher || q_student)`` at every position (mode-covering).

    Kim and Rush, EMNLP 2016 (word-level knowledge distillation), after Hinton et al. 2015.
    """

    name = "forward-kl"
    description = "per-token KL(teacher || student) over the vocabulary"
    paper = "Kim, Rush. Sequence-Level Knowledge Distillation. EMNLP 2016, arXiv:1606.07947"

    def divergence(self, log_q, log_p):
        return kl(log_p, log_q)


class ReverseKL(TokenDistiller):
    """``KL(q_student || p_teacher)`` at every position (mode-seeking).

    Gu et al., ICLR 2024 (MiniLLM) argue for the reverse KL when distilling language models;
    MiniLLM optimizes it over sampled sequences with a policy gradient. This is its token-level
    form on the training tokens, the reverse-KL baseline of GKD and DistiLLM.
    """

    name = "reverse-kl"
    description = "per-token KL(student || teacher) over the vocabulary"
    paper = ("Gu, Dong, Wei, Huang. MiniLLM: Knowledge Distillation of Large Language Models. ICLR 2024, "
             "arXiv:2306.08543")

    def divergence(self, log_q, log_p):
        return kl(log_q, log_p)


class JSD(TokenDistiller):
    """Generalized Jensen-Shannon divergence with ``M = beta * p + (1 - beta) * q``:
    ``beta * KL(p || M) + (1 - beta) * KL(q || M)`` (p teacher, q student).

    Agarwal et al., ICLR 2024 (GKD), eq. for JSD(beta). Small beta behaves like a scaled
    forward KL, beta near 1 like a reverse KL; beta = 0.5 is the symmetric JSD. The endpoints
    are excluded (the divergence vanishes there): use ``forward-kl`` / ``reverse-kl``. Applied
    here to the training tokens; GKD's on-policy sampling is not part of the loss.
    """

    name = "jsd"
    description = "per-token generalized Jensen-Shannon divergence JSD(beta) between teacher and student"
    paper = ("Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist, Bachem. On-Policy Distillation of Language "
             "Models: Learning from Self-Generated Mistakes. ICLR 2024, arXiv:2306.13649")

    @dataclasses.dataclass(frozen=True)
    class Params:
        beta: float = 0.5
        temperature: float = 1.0
        ce_weight: float = 0.0
        kd_weight: float = 1.0

        def __post_init__(self):
            if not 0 < self.beta < 1:
                raise ValueError(f"beta must be in (0, 1) (use forward-kl or reverse-kl for the limits), "
                                 f"got {self.beta}")
            check_common(self.temperature, self.ce_weight, self.kd_weight)

    def divergence(self, log_q, log_p):
        b = self.params.beta
        log_m = log_mix(log_p, log_q, b)
        return b * kl(log_p, log_m) + (1 - b) * kl(log_q, log_m)


@dataclasses.dataclass(frozen=True)
class SkewParams:
    alpha: float = 0.1
    temperature: float = 1.0
    ce_weight: float = 0.0
    kd_weight: float = 1.0

    def __post_init__(self):
        # alpha = 1 makes the mixture equal the first argument: the divergence is identically 0.
        if not 0 <= self.alpha < 1:
            raise ValueError(f"alpha (the skew) must be in [0, 1), got {self.alpha}")
        check_common(self.temperature, self.ce_weight, self.kd_weight)


class SkewKL(TokenDistiller):
    """Skew KL: ``KL(p || alpha * p + (1 - alpha) * q)`` (p teacher, q student).

    Ko et al., ICML 2024 (DistiLLM), alpha-SKL; the skew keeps the divergence and its gradient
    bounded where the student puts almost no mass. Paper default alpha = 0.1 (the code's
    ``lam``); alpha = 0 is the forward KL.
    """

    name = "skew-kl"
    description = "per-token skew KL(teacher || alpha*teacher + (1-alpha)*student), DistiLLM"
    paper = ("Ko, Kim, Chen, Yun. DistiLLM: Towards Streamlined Distillation for Large Language Models. "
             "ICML 2024, arXiv:2402.03898")
    Params = SkewParams

    def divergence(self, log_q, log_p):
        return kl(log_p, log_mix(log_p, log_q, self.params.alpha))


class SkewReverseKL(TokenDistiller):
    """Skew reverse KL: ``KL(q || alpha * q + (1 - alpha) * p)`` (p teacher, q student).

    Ko et al., ICML 2024 (DistiLLM), alpha-SRKL; paper default alpha = 0.1; alpha = 0 is the
    reverse KL.
    """

    name = "skew-reverse-kl"
    description = "per-token skew KL(student || alpha*student + (1-alpha)*teacher), DistiLLM"
    paper = ("Ko, Kim, Chen, Yun. DistiLLM: Towards Streamlined Distillation for Large Language Models. "
             "ICML 2024, arXiv:2402.03898")
    Params = SkewParams

    def divergence(self, log_q, log_p):
        return kl(log_q, log_mix(log_q, log_p, self.params.alpha))


class TVD(TokenDistiller):
    """Total variation distance ``0.5 * sum_v |p(v) - q(v)|`` at every position, in [0, 1].

    Wen et al., ACL 2023 (f-divergence minimization for sequence-level KD), token-level form
    of its TVD objective; symmetric and bounded, so no token can dominate the loss.
    """

    name = "tvd"
    description = "per-token total variation distance between teacher and student"
    paper = ("Wen, Li, Du, Mou. f-Divergence Minimization for Sequence-Level Knowledge Distillation. "
             "ACL 2023, arXiv:2307.15190")

    def divergence(self, log_q, log_p):
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)


@hookimpl
def kdbench_register_distillers(register):
    for distiller in (ForwardKL, ReverseKL, JSD, SkewKL, SkewReverseKL, TVD):
        register(distiller)
