"""Relation-based distillers: the student reproduces how the teacher relates examples.

Response methods match each example's logits and feature methods each example's hidden
state; these match *relations*: distances and angles between the examples of a batch (RKD),
their similarity matrix (SP), the conditional probability of one example given another
(PKT), a kernel matrix between them (CC), or, for CRD, which training example a
representation belongs to among thousands drawn from memory banks.

Every method trains ``ce_weight * CE + kd_weight * Hinton-KD + beta * method_loss``, as the
CRD/RepDistiller code base does (``common.Mixed``). The defaults are that code base's
CIFAR-100 settings (``scripts/run_cifar_distill.sh`` with ``train_student.py``'s defaults):
cross-entropy weight 1 (its ``-r`` default), KD weight 0 (``-a 0``), and ``beta`` (``-b``)
3000 for SP, 0.02 for CC, 1 for RKD (itself weighting distance 25 and angle 50), 30000 for
PKT and 0.8 for CRD; KD temperature 4; CRD's feature size 128, 16384 negatives,
temperature 0.07 and memory momentum 0.5.

Taps: ``student_point`` / ``teacher_point`` name a feature point by module path or by index
into the family's ``feature_points`` (``-1`` = the deepest, the pooled pre-logit vector of
the image families). RKD, PKT, CC and CRD read the deepest point, as RepDistiller reads
``feat[-1]``; SP reads the last stage before pooling (RepDistiller's ``feat[-2]``): by
default the deepest point whose output still has spatial or sequence axes, or the deepest
point when none has (an MLP's last hidden activation).

A batch of one example has no relations: RKD, SP, PKT and CC raise a ``ValueError`` for
``batch_size: 1`` (the trainer drops a trailing batch of one, which batch norm cannot train
on either); CRD contrasts each example with its memory banks and accepts any batch.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdbench import hookimpl
from kdbench.contracts import DistillContext, Distiller, Outputs
from kdbench_plugins.distill.common import Mixed, mixed_terms, pick_point


# ---------------------------------------------------------------- shared pieces
def _check_common(params) -> None:
    Mixed.__post_init__(params)
    if params.beta < 0:
        raise ValueError(f"beta must be >= 0, got {params.beta}")
    for role in ("student_point", "teacher_point"):
        value = getattr(params, role)
        if value is not None and not isinstance(value, (str, int)):
            raise ValueError(f"{role} must be a module path or an index, got {value!r}")


def _global_rescale(x: torch.Tensor) -> torch.Tensor:
    """``x`` divided by its largest magnitude, held constant for autograd.

    Used only for losses that are invariant to a global scale of the features (SP, RKD, PKT):
    the loss and its gradient are unchanged, but huge activations can no longer overflow the
    Gram matrices and squared distances.
    """
    scale = x.detach().abs().amax().clamp_min(torch.finfo(x.dtype).tiny)
    return x / scale


def _off_diagonal(b: int, device) -> torch.Tensor:
    return ~torch.eye(b, dtype=torch.bool, device=device)


class RelationDistiller(Distiller):
    """Common plumbing: choose the taps in ``setup``, fetch and flatten both features."""

    category = "relation"
    needs_features = True
    #: Smallest batch the loss is defined for (relations need at least two examples).
    min_batch = 2

    def setup(self, context: DistillContext) -> list[nn.Module]:
        self.student_point = pick_point(self._spec("student"), context.student_points, "student")
        self.teacher_point = pick_point(self._spec("teacher"), context.teacher_points, "teacher")
        return []

    def _spec(self, role: str) -> str | int:
        spec = getattr(self.params, f"{role}_point")
        return -1 if spec is None else spec

    def features(self, student: Outputs, teacher: Outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The tapped features of both models as ``(B, -1)`` rows; the teacher's are detached
        (they are targets, even if a caller forgot ``no_grad``)."""
        if not hasattr(self, "student_point"):
            raise RuntimeError(f"{self.name}: call setup(context) before loss(); it chooses the tap points")
        out = []
        for role, outputs, point in (("student", student, self.student_point),
                                     ("teacher", teacher, self.teacher_point)):
            if point not in outputs.features:
                raise ValueError(f"{self.name}: the {role}'s feature point '{point}' was not captured; "
                                 f"captured points are {sorted(outputs.features)}")
            out.append(outputs.features[point].reshape(outputs.features[point].shape[0], -1))
        s, t = out[0], out[1].detach()
        if s.shape[0] != t.shape[0]:
            raise ValueError(f"{self.name}: student and teacher features hold {s.shape[0]} and "
                             f"{t.shape[0]} examples; they must come from the same batch")
        if s.shape[0] < self.min_batch:
            raise ValueError(f"{self.name} compares the examples of a batch with each other and needs at "
                             f"least {self.min_batch}, got a batch of {s.shape[0]}; use a batch_size >= "
                             f"{self.min_batch} that does not leave a last batch of {s.shape[0]}")
        return s, t


# ---------------------------------------------------------------- SP
def sp_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``||G_t - G_s||_F^2 / b^2`` with ``G = row-L2-normalize(F F^T)`` of flattened features."""
    b = s.shape[0]
    s, t = _global_rescale(s), _global_rescale(t)
    g_s = F.normalize(s @ s.T, p=2, dim=1)
    g_t = F.normalize(t @ t.T, p=2, dim=1)
    return (g_t - g_s).pow(2).sum() / (b * b)


class SP(RelationDistiller):
    """Similarity-preserving knowledge distillation.

    Tung and Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019: for a batch of
    b examples, the activation maps are flattened to ``Q`` (b x chw), ``G = Q Q^T`` is
    normalized row by row (L2), and the loss is ``||G_T - G_S||_F^2 / b^2``. Only the b x b
    similarity pattern is matched, so student and teacher widths and resolutions may differ
    and no adapter is trained. Default tap: the last stage before pooling, as in the CRD
    benchmark's SP runs (weight 3000).
    """

    name = "sp"
    description = "match the batch's row-normalized similarity (Gram) matrices, ||G_t - G_s||_F^2 / b^2"
    paper = ("Tung, Mori. Similarity-Preserving Knowledge Distillation. ICCV 2019 "
             "(arXiv:1907.09682)")

    @dataclasses.dataclass(frozen=True)
    class Params(Mixed):
        beta: float = 3000.0
        #: ``None``: the deepest point with spatial/sequence axes, else the deepest point.
        student_point: str | int | None = None
        teacher_point: str | int | None = None

        def __post_init__(self):
            _check_common(self)

    def setup(self, context: DistillContext) -> list[nn.Module]:
        chosen, probed = {}, None
        for i, (role, points) in enumerate((("student", context.student_points),
                                            ("teacher", context.teacher_points))):
            spec = getattr(self.params, f"{role}_point")
            if spec is not None:
                chosen[role] = pick_point(spec, points, role)
                continue
            if not points:
                raise ValueError(f"the {role} model names no feature points; sp needs one")
            probed = probed or context.probe()
            # The pooled (B, C) vector follows the last stage: skip it when a stage exists.
            spatial = [p for p in points if probed[i].features[p].dim() > 2]
            chosen[role] = spatial[-1] if spatial else points[-1]
        self.student_point, self.teacher_point = chosen["student"], chosen["teacher"]
        return []

    def loss(self, student: Outputs, teacher: Outputs, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        s, t = self.features(student, teacher)
        terms = mixed_terms(self.params, student, teacher, targets)
        terms["sp"] = self.params.beta * sp_loss(s, t)
        return terms


# ---------------------------------------------------------------- RKD
def rkd_losses(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RKD's distance-wise and angle-wise losses (unweighted).

    Distance: pairwise Euclidean distances divided by their mean over distinct pairs, smooth
    L1 (Huber, delta 1) summed over ordered pairs and divided by b^2. Angle: for every vertex
    j, the cosine between ``e_i - e_j`` and ``e_k - e_j``, smooth L1 summed over triplets and
    divided by b^3. Degenerate pairs and triplets (a repeated example) have the same value on
    both sides and contribute zero, so these are the paper's sums over distinct tuples at the
    scale of the reference code (a mean over all b^2 / b^3 entries), for which the weights 25
    and 50 were chosen.
    """
    b = s.shape[0]
    off = _off_diagonal(b, s.device)

    def geometry(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        diff = e.unsqueeze(1) - e.unsqueeze(0)  # diff[j, i] = e_j - e_i
        # The clamp keeps sqrt differentiable at zero distance (the diagonal, duplicates).
        dist = diff.pow(2).sum(-1).clamp_min(torch.finfo(e.dtype).tiny).sqrt() * off
        dist = dist / dist[off].mean()
        unit = F.normalize(diff, p=2, dim=-1)  # zero for i == j, so degenerate cosines are 0
        angle = torch.bmm(unit, unit.transpose(1, 2))  # angle[j, i, k] = cos(e_i, e_j, e_k)
        return dist, angle

    d_s, a_s = geometry(_global_rescale(s))
    d_t, a_t = geometry(_global_rescale(t))
    distance = F.smooth_l1_loss(d_s, d_t, reduction="sum", beta=1.0) / (b * b)
    angle = F.smooth_l1_loss(a_s, a_t, reduction="sum", beta=1.0) / (b ** 3)
    return distance, angle


class RKD(RelationDistiller):
    """Relational knowledge distillation.

    Park, Kim, Lu and Cho, "Relational Knowledge Distillation", CVPR 2019: the student's
    embeddings must keep the teacher's *structure*: distance-wise, the Euclidean distance of
    every pair normalized by the mean pairwise distance of the batch (so the scales of the two
    embedding spaces need not agree); angle-wise, the cosine of the angle at every vertex of
    every triplet. Both are compared with the Huber (smooth L1) loss and weighted 25 and 50,
    RepDistiller's weights, on the penultimate (pooled) embedding.
    """

    name = "rkd"
    description = "match normalized pairwise distances (x25) and triplet angles (x50) of the embeddings"
    paper = "Park, Kim, Lu, Cho. Relational Knowledge Distillation. CVPR 2019 (arXiv:1904.05068)"

    @dataclasses.dataclass(frozen=True)
    class Params(Mixed):
        beta: float = 1.0
        distance_weight: float = 25.0
        angle_weight: float = 50.0
        student_point: str | int = -1
        teacher_point: str | int = -1

        def __post_init__(self):
            _check_common(self)
            if self.distance_weight < 0 or self.angle_weight < 0:
                raise ValueError(f"distance_weight and angle_weight must be >= 0, got "
                                 f"{self.distance_weight} and {self.angle_weight}")

    def loss(self, student: Outputs, teacher: Outputs, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        s, t = self.features(student, teacher)
        p = self.params
        distance, angle = rkd_losses(s, t)
        terms = mixed_terms(p, student, teacher, targets)
        if p.distance_weight:
            terms["rkd.distance"] = p.beta * p.distance_weight * distance
        if p.angle_weight:
            terms["rkd.angle"] = p.beta * p.angle_weight * angle
        return terms


# ---------------------------------------------------------------- PKT
def pkt_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``sum_i sum_{j != i} p_{j|i} log(p_{j|i} / q_{j|i}) / b^2`` with cosine-kernel conditionals.

    ``K(a, b) = (cos(a, b) + 1) / 2`` and ``p_{j|i} = K(t_i, t_j) / sum_{k != i} K(t_i, t_k)``
    (teacher), ``q`` the same for the student, as in the paper. Dividing the summed KL by b^2
    keeps the authors' code's scale (a mean over the b x b matrix), for which the weight 30000
    was tuned.
    """
    b = s.shape[0]
    off = _off_diagonal(b, s.device)
    tiny = torch.finfo(s.dtype).tiny

    def conditionals(e: torch.Tensor) -> torch.Tensor:
        e = F.normalize(_global_rescale(e), p=2, dim=1)
        kernel = ((e @ e.T + 1) / 2) * off  # an example is not its own neighbour
        return kernel / kernel.sum(1, keepdim=True).clamp_min(tiny)

    p, q = conditionals(t), conditionals(s)
    # xlogy makes 0 log 0 = 0; the clamp only matters where the student gives zero mass.
    kl = torch.xlogy(p, p) - p * q.clamp_min(tiny).log()
    return (kl * off).sum() / (b * b)


class PKT(RelationDistiller):
    """Probabilistic knowledge transfer.

    Passalis and Tefas, "Learning Deep Representations with Probabilistic Knowledge
    Transfer", ECCV 2018: the teacher's and student's feature spaces each define, through a
    cosine-similarity kernel, the conditional probability that an example picks another one
    as its neighbour; the student minimizes the KL divergence from the teacher's distribution.
    Only the geometry of the batch is matched, so dimensions may differ. Default tap: the
    penultimate (pooled) feature, weight 30000, as in the CRD benchmark.
    """

    name = "pkt"
    description = "KL between teacher and student cosine-kernel neighbour distributions within the batch"
    paper = ("Passalis, Tefas. Learning Deep Representations with Probabilistic Knowledge Transfer. "
             "ECCV 2018 (arXiv:1803.10837)")

    @dataclasses.dataclass(frozen=True)
    class Params(Mixed):
        beta: float = 30000.0
        student_point: str | int = -1
        teacher_point: str | int = -1

        def __post_init__(self):
            _check_common(self)

    def loss(self, student: Outputs, teacher: Outputs, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        s, t = self.features(student, teacher)
        terms = mixed_terms(self.params, student, teacher, targets)
        terms["pkt"] = self.params.beta * pkt_loss(s, t)
        return terms


# ---------------------------------------------------------------- CC
def taylor_rbf(e: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """The Gaussian RBF kernel matrix of unit rows by its order-P Taylor expansion.

    For unit vectors ``||x - y||^2 = 2 - 2 x.y``, so ``exp(-gamma ||x - y||^2) =
    exp(-2 gamma) exp(2 gamma x.y) ~ exp(-2 gamma) sum_{p=0}^{P} (2 gamma)^p / p! (x.y)^p``.
    """
    c = e @ e.T
    k = torch.ones_like(c)
    for p in range(1, order + 1):
        k = k + (2 * gamma) ** p / math.factorial(p) * c.pow(p)
    return math.exp(-2 * gamma) * k


class CC(RelationDistiller):
    """Correlation congruence.

    Peng, Jin, Liu, Li, Wu, Liu, Zhou and Zhang, "Correlation Congruence for Knowledge
    Distillation", ICCV 2019: the correlation between every pair of instances is a Gaussian
    RBF kernel approximated by its P-order Taylor expansion (``taylor_rbf``), and the loss is
    ``||K_t - K_s||_F^2 / b^2`` (the paper's eq. 7). As in RepDistiller, the penultimate
    features of both models first go through trainable linear embeddings to ``feat_dim``
    (128); they are then L2-normalized because the expansion relies on unit vectors.
    ``gamma`` 0.4 and ``order`` 2 are the paper's ImageNet setting.

    The weight 0.02 is RepDistiller's, whose CC loss is not this kernel form (it multiplies the
    absolute student-teacher differences of neighbouring examples), so its scale is not
    calibrated for this loss; tune ``beta`` when comparing. The teacher's embedding is trained
    too, as in RepDistiller; the cross-entropy term keeps the student from the trivial
    solution where both embeddings collapse.
    """

    name = "cc"
    description = "match Taylor-expanded Gaussian-kernel correlation matrices of linear embeddings"
    paper = ("Peng, Jin, Liu, Li, Wu, Liu, Zhou, Zhang. Correlation Congruence for Knowledge "
             "Distillation. ICCV 2019 (arXiv:1904.01802)")

    @dataclasses.dataclass(frozen=True)
    class Params(Mixed):
        beta: float = 0.02
        feat_dim: int = 128
        gamma: float = 0.4
        order: int = 2
        student_point: str | int = -1
        teacher_point: str | int = -1

        def __post_init__(self):
            _check_common(self)
            if self.feat_dim < 1:
                raise ValueError(f"feat_dim must be >= 1, got {self.feat_dim}")
            if self.gamma <= 0:
                raise ValueError(f"gamma must be > 0, got {self.gamma}")
            if self.order < 1:
                raise ValueError(f"order (the Taylor expansion's P) must be >= 1, got {self.order}")

    def setup(self, context: DistillContext) -> list[nn.Module]:
        super().setup(context)
        s_out, t_out = context.probe()
        s_dim = s_out.features[self.student_point][0].numel()
        t_dim = t_out.features[self.teacher_point][0].numel()
        dtype = s_out.features[self.student_point].dtype  # float64 models get float64 embeddings
        self.embed_s = nn.Linear(s_dim, self.params.feat_dim, dtype=dtype)
        self.embed_t = nn.Linear(t_dim, self.params.feat_dim, dtype=dtype)
        return [self.embed_s, self.embed_t]

    def loss(self, student: Outputs, teacher: Outputs, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        s, t = self.features(student, teacher)
        p = self.params
        e_s = F.normalize(self.embed_s(s), p=2, dim=1)
        e_t = F.normalize(self.embed_t(t), p=2, dim=1)
        b = s.shape[0]
        diff = taylor_rbf(e_t, p.gamma, p.order) - taylor_rbf(e_s, p.gamma, p.order)
        terms = mixed_terms(p, student, teacher, targets)
        terms["cc"] = p.beta * diff.pow(2).sum() / (b * b)
        return terms


# ---------------------------------------------------------------- CRD
class ContrastHead(nn.Module):
    """CRD's trainable embeddings and its two memory banks.

    ``embed_s`` / ``embed_t``: linear maps to ``feat_dim`` followed by L2 normalization.
    ``memory_s`` / ``memory_t`` (buffers, ``n x feat_dim``): one unit vector per training
    example, a running average of that example's student / teacher embedding. Buffers move
    with the module between devices but are not optimized, so they are not counted among
    the extra trained parameters (``extra_train_params``); ``memory_floats`` says their size.
    ``z`` holds the two NCE normalization constants, -1 until the first batch sets them.
    """

    def __init__(self, s_dim: int, t_dim: int, feat_dim: int, n: int, generator: torch.Generator):
        super().__init__()
        self.embed_s = nn.Linear(s_dim, feat_dim)
        self.embed_t = nn.Linear(t_dim, feat_dim)
        # Random unit vectors (the reference draws from a cube scaled to unit expected squared norm).
        self.register_buffer("memory_s", F.normalize(torch.randn(n, feat_dim, generator=generator), dim=1))
        self.register_buffer("memory_t", F.normalize(torch.randn(n, feat_dim, generator=generator), dim=1))
        self.register_buffer("z", torch.full((2,), -1.0, dtype=torch.float64))

    @property
    def memory_floats(self) -> int:
        return self.memory_s.numel() + self.memory_t.numel()

    def embed(self, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.embed_s(s), p=2, dim=1), F.normalize(self.embed_t(t), p=2, dim=1)


def bank_scores(memory: torch.Tensor, v: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """``memory[contrast[b, j]] . v[b]`` for every anchor b and column j, shape ``(B, 1 + K)``.

    The reference gathers a ``(B, 1 + K, feat_dim)`` block of bank rows and multiplies it by
    the anchors. On a CPU that gather (about 0.5 GB a batch at K = 16384) costs far more than
    scoring each anchor against the whole bank with one matmul and picking the sampled columns,
    which gives the same numbers; so the matmul is used whenever the bank is not much larger
    than the sample (``n <= 8 (1 + K)``, always true at K = 16384 on CIFAR's 50,000 examples).
    """
    if memory.shape[0] <= 8 * contrast.shape[1]:
        # A copy, since the bank is updated in place before the backward pass needs it.
        return torch.gather(v @ memory.clone().T, 1, contrast)
    return torch.bmm(memory[contrast], v.unsqueeze(2)).squeeze(2)


def nce_loss(log_p: torch.Tensor, noise: float) -> torch.Tensor:
    """NCE loss of scores ``log P(i | v)``, column 0 the positive, columns 1.. the K negatives.

    With ``c = K * P_n``: ``h = P / (P + c)`` is the probability that a pair came from the
    data rather than the noise; the loss is ``-(sum log h(pos) + sum log(1 - h(neg))) / B``.
    Written with log-sum-exp so that no score can overflow.
    """
    k = log_p.shape[1] - 1
    log_c = math.log(k * noise)
    log_denominator = torch.logaddexp(log_p, torch.full_like(log_p, log_c))
    log_h_pos = log_p[:, 0] - log_denominator[:, 0]
    log_one_minus_h_neg = log_c - log_denominator[:, 1:]
    return -(log_h_pos.sum() + log_one_minus_h_neg.sum()) / log_p.shape[0]


class CRD(RelationDistiller):
    """Contrastive representation distillation.

    Tian, Krishnan and Isola, "Contrastive Representation Distillation", ICLR 2020. The
    penultimate features of student and teacher are mapped by trainable linear embeddings
    to ``feat_dim`` (128) and L2-normalized. A memory bank per side keeps one unit vector per
    training example. For each example of the batch (its index in the training split comes
    from ``begin_batch``), the positive is the other side's bank entry of the same example and
    ``nce_k`` negatives are other examples' entries. Scores ``P = exp(v . m / T) / Z`` (``T`` =
    ``nce_t``) feed the NCE loss with noise ``P_n = 1 / n``; ``Z`` approximates the softmax's
    partition function and is estimated once, on the first batch, as ``n`` times the mean of
    ``exp(v . m / T)``, as in the reference. Both directions are summed: student anchors
    against the teacher bank, and teacher anchors against the student bank. After the loss,
    the banks take ``nce_m * m + (1 - nce_m) * v`` at the batch's indices, renormalized.

    Negatives (``negatives``): ``uniform`` draws them uniformly over the other training
    examples (the positive excluded), the paper's description; ``other-class`` draws only
    examples of other classes, as RepDistiller's CIFAR-100 loader does by default (its
    ``exact`` mode). Both draw with replacement, the i.i.d. noise samples NCE assumes (that
    loader draws without replacement when there are enough candidates). ``nce_k`` is capped
    at n - 1 (with a warning) on training splits smaller than that. The draws come from a
    generator seeded from torch's global generator at ``setup`` (seeded per cell by the runner);
    ``begin_batch(..., negatives=...)`` supplies them instead (tests, custom samplers).

    Extra trained parameters: the two embeddings only. The banks are buffers of
    ``2 x n x feat_dim`` floats (``ContrastHead.memory_floats``), state rather than trained
    parameters, and are left out of ``extra_train_params``.
    """

    name = "crd"
    description = "contrastive (NCE) distillation with linear embeddings and per-example memory banks"
    paper = "Tian, Krishnan, Isola. Contrastive Representation Distillation. ICLR 2020 (arXiv:1910.10699)"
    min_batch = 1  # every example is contrasted with the banks, not with its batch

    @dataclasses.dataclass(frozen=True)
    class Params(Mixed):
        beta: float = 0.8
        feat_dim: int = 128
        nce_k: int = 16384
        nce_t: float = 0.07
        nce_m: float = 0.5
        negatives: Literal["uniform", "other-class"] = "uniform"
        student_point: str | int = -1
        teacher_point: str | int = -1

        def __post_init__(self):
            _check_common(self)
            if self.feat_dim < 1:
                raise ValueError(f"feat_dim must be >= 1, got {self.feat_dim}")
            if self.nce_k < 1:
                raise ValueError(f"nce_k (negatives per anchor) must be >= 1, got {self.nce_k}")
            if self.nce_t <= 0:
                raise ValueError(f"nce_t (the temperature) must be > 0, got {self.nce_t}")
            if not 0 <= self.nce_m < 1:
                raise ValueError(f"nce_m (the memory momentum) must be in [0, 1), got {self.nce_m}")
            if self.negatives not in ("uniform", "other-class"):
                raise ValueError(f"negatives must be 'uniform' or 'other-class', got {self.negatives!r}")

    def setup(self, context: DistillContext) -> list[nn.Module]:
        super().setup(context)
        p = self.params
        n = len(context.data.train)
        if n < 2:
            raise ValueError(f"crd contrasts each training example with others; the training split has {n}")
        self.k = min(p.nce_k, n - 1)
        if self.k < p.nce_k:
            warnings.warn(f"crd: nce_k={p.nce_k} exceeds the {n - 1} other examples of the training split; "
                          f"using {self.k} negatives per anchor", stacklevel=2)
        # Per example: the block of candidates to skip, as (start, length) in `self.order`.
        if p.negatives == "other-class":
            labels = context.data.train.tensors[1]
            if labels.dim() != 1:
                raise ValueError(f"crd negatives='other-class' needs one class label per example, got "
                                 f"targets of shape {tuple(labels.shape)}; use negatives='uniform'")
            self.order = torch.argsort(labels, stable=True)
            _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
            if len(counts) < 2:
                raise ValueError("crd negatives='other-class' needs at least two classes in the training split")
            starts = torch.cumsum(counts, 0) - counts
            self.skip_start, self.skip_len = starts[inverse], counts[inverse]
        else:
            self.order = torch.arange(n)
            self.skip_start, self.skip_len = torch.arange(n), torch.ones(n, dtype=torch.long)
        self.generator = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, (1,)).item()))
        s_out, t_out = context.probe()
        s_dim = s_out.features[self.student_point][0].numel()
        t_dim = t_out.features[self.teacher_point][0].numel()
        self.head = ContrastHead(s_dim, t_dim, p.feat_dim, n, self.generator).to(
            s_out.features[self.student_point].dtype)
        return [self.head]

    def begin_batch(self, indices: torch.Tensor, epoch: int, epochs: int,
                    negatives: torch.Tensor | None = None) -> None:
        super().begin_batch(indices, epoch, epochs)
        self.negatives = negatives

    def sample_negatives(self, indices: torch.Tensor) -> torch.Tensor:
        """``(B, k)`` training indices, uniform over the candidates of each anchor."""
        start, length = self.skip_start[indices], self.skip_len[indices]
        candidates = len(self.order) - length
        u = torch.rand(len(indices), self.k, generator=self.generator, dtype=torch.float64)
        r = (u * candidates.unsqueeze(1)).long().minimum(candidates.unsqueeze(1) - 1)
        # Positions past the skipped block shift over it: uniform over the rest.
        r = r + (r >= start.unsqueeze(1)) * length.unsqueeze(1)
        return self.order[r]

    def loss(self, student: Outputs, teacher: Outputs, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        s, t = self.features(student, teacher)
        if getattr(self, "indices", None) is None:
            raise RuntimeError("crd: begin_batch(indices, ...) must give the batch's training indices before loss()")
        head, p = self.head, self.params
        device = head.memory_s.device
        idx = self.indices.reshape(-1).to(device)
        if len(idx) != s.shape[0]:
            raise ValueError(f"crd: begin_batch gave {len(idx)} indices for a batch of {s.shape[0]} examples")
        neg = self.negatives if self.negatives is not None else self.sample_negatives(self.indices.reshape(-1).cpu())
        neg = neg.to(device)
        if neg.dim() != 2 or neg.shape[0] != len(idx):
            raise ValueError(f"crd: negatives must be (batch, k), got {tuple(neg.shape)} for a batch of {len(idx)}")
        n = head.memory_s.shape[0]
        v_s, v_t = head.embed(s, t)
        contrast = torch.cat([idx.unsqueeze(1), neg], 1)  # column 0: the positive
        # Bank entries are targets, not paths for gradients (they are running averages).
        scores_s = bank_scores(head.memory_t, v_s, contrast) / p.nce_t
        scores_t = bank_scores(head.memory_s, v_t, contrast) / p.nce_t
        with torch.no_grad():
            for i, scores in enumerate((scores_s, scores_t)):
                if head.z[i] < 0:  # the reference fixes Z from the first batch
                    head.z[i] = scores.double().exp().mean() * n
        log_z = head.z.log().to(scores_s.dtype)
        crd = nce_loss(scores_s - log_z[0], 1 / n) + nce_loss(scores_t - log_z[1], 1 / n)
        with torch.no_grad():
            for memory, v in ((head.memory_s, v_s), (head.memory_t, v_t)):
                mixed = p.nce_m * memory[idx] + (1 - p.nce_m) * v.detach().to(memory.dtype)
                memory.index_copy_(0, idx, F.normalize(mixed, p=2, dim=1))
        self.negatives = None  # an injected set is used for one batch only
        terms = mixed_terms(p, student, teacher, targets)
        terms["crd"] = p.beta * crd
        return terms


@hookimpl
def kdbench_register_distillers(register):
    for cls in (RKD, SP, PKT, CC, CRD):
        register(cls)
