"""Feature-based distillers: the student learns from the teacher's hidden representations.

Each method reads the feature points its model families name (``ModelFamily.feature_points``;
``attention_points`` for ``attention-kl``), sizes its adapters in ``setup`` from one real
batch (``DistillContext.probe``) and returns them, so they are trained with the student and
counted as training cost, and are never part of the deployed student.

As in the CRD/RepDistiller code base (Tian, Krishnan and Isola, "Contrastive Representation
Distillation", ICLR 2020), the objective is ``ce_weight * CE + kd_weight * Hinton-KD + beta *
method_loss`` (``common.Mixed``). The default ``beta`` of fitnet, at, nst and vid is the one of
RepDistiller's published commands (``-r 1 -a 0 -b BETA``: FitNet 100, AT 1000, NST 50, VID 1,
with CE 1 and KD 0); the transformer methods take their weights from their own papers.

Tap points are named by module path or by index into a model's feature points (``-1`` is the
deepest). Defaults:

- ``fitnet``: the middle feature point of each model (index ``(n - 1) // 2``), which is
  RepDistiller's ``hint_layer = 2`` on the CIFAR families (stem, three or four stages, pooled
  vector).
- ``at``, ``nst``, ``vid``: each model's convolutional stage outputs, without the first one
  (the stem) when there are three or more -- RepDistiller's ``feat[1:-1]`` on the CIFAR
  families -- paired from the deepest down, as many pairs as the shorter list has. Maps of
  different spatial sizes are average-pooled to the smaller size, as RepDistiller does.
- ``hidden-mse``: every student point mapped to the teacher point at the same relative depth
  (TinyBERT's uniform mapping); ``hidden-cosine``: the last to the last (DistilBERT);
  ``attention-kl``: the last attention map to the last (MiniLM).

FitNet's two-stage training (hints first, then knowledge distillation) is a recipe::

    recipes:
      fitnet-2stage: [{distill: {name: fitnet, mode: hint}}, {distill: hinton}]
    training: {checkpoint: last}

The second stage may be ``{finetune: {epochs: N, distill: hinton}}`` to give it its own
budget. Use ``checkpoint: last``: with ``best`` the hint stage would keep the epoch with the
best validation accuracy, which means little while the classifier is not trained.
RepDistiller itself runs FitNet in one stage (``mode: joint``, the default).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdbench import hookimpl
from kdbench.contracts import DistillContext, Distiller, Outputs
from kdbench_plugins.distill.common import Mixed, mixed_terms, pick_point

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
POOLS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)


# ---------------------------------------------------------------- taps and shapes
def feature_kind(model: nn.Module, point: str, value: torch.Tensor) -> str:
    """``map`` (B, C, *spatial) from a conv net, ``vector`` (B, D) or ``sequence`` (B, T, D).

    A 3-D output is a 1-D conv map when the tapped module holds a convolution, and a token
    sequence otherwise: the shape alone cannot tell (B, C, L) from (B, T, D).
    """
    if value.dim() == 2:
        return "vector"
    if value.dim() >= 4:
        return "map"
    if value.dim() == 3:
        module = model.get_submodule(point)
        return "map" if any(isinstance(m, CONVS) for m in module.modules()) else "sequence"
    raise ValueError(f"feature point '{point}' gives a tensor of shape {tuple(value.shape)}; "
                     "expected (B, D), (B, T, D) or (B, C, *spatial)")


@dataclasses.dataclass
class Probed:
    """Both models' tap points, with kinds and shapes from one real batch."""

    context: DistillContext
    student: Outputs
    teacher: Outputs

    @classmethod
    def of(cls, context: DistillContext, method: str) -> Probed:
        for role, points in (("student", context.student_points), ("teacher", context.teacher_points)):
            if not points:
                model = context.student if role == "student" else context.teacher
                raise ValueError(f"{method} needs feature points, but the {role} model "
                                 f"({type(model).__name__}) names none")
        return cls(context, *context.probe())

    def kind(self, role: str, point: str) -> str:
        model = self.context.student if role == "student" else self.context.teacher
        return feature_kind(model, point, self.outputs(role).features[point])

    def shape(self, role: str, point: str) -> tuple[int, ...]:
        return tuple(self.outputs(role).features[point].shape)

    def outputs(self, role: str) -> Outputs:
        return self.student if role == "student" else self.teacher

    def points(self, role: str) -> list[str]:
        return self.context.student_points if role == "student" else self.context.teacher_points

    def stages(self, role: str) -> list[str]:
        """Conv stage outputs; the first is the stem when there are three or more."""
        maps = [p for p in self.points(role) if self.kind(role, p) == "map"]
        return maps[1:] if len(maps) >= 3 else maps


def deepest_pairs(student: list[str], teacher: list[str]) -> list[tuple[str, str]]:
    """Pair two lists of points from the deepest down (the shallow surplus is left out)."""
    n = min(len(student), len(teacher))
    return list(zip(student[len(student) - n:], teacher[len(teacher) - n:]))


def explicit_pairs(params, probed: Probed) -> list[tuple[str, str]]:
    return [(pick_point(s, probed.points("student"), "student"),
             pick_point(t, probed.points("teacher"), "teacher"))
            for s, t in zip(params.student_points, params.teacher_points)]


def stage_pairs(params, probed: Probed, method: str) -> list[tuple[str, str]]:
    """The explicit pairs of the params, else the conv stages paired from the deepest."""
    if params.student_points:
        return explicit_pairs(params, probed)
    stages = {role: probed.stages(role) for role in ("student", "teacher")}
    for role, found in stages.items():
        if not found:
            shapes = {p: probed.shape(role, p) for p in probed.points(role)}
            raise ValueError(f"{method} needs convolutional feature maps (B, C, H, W) or (B, C, L) "
                             f"in both models; the {role}'s feature points give {shapes}")
    return deepest_pairs(stages["student"], stages["teacher"])


def check_maps(probed: Probed, pairs: list[tuple[str, str]], method: str) -> None:
    for s, t in pairs:
        s_shape, t_shape = probed.shape("student", s), probed.shape("teacher", t)
        if probed.kind("student", s) != "map" or probed.kind("teacher", t) != "map":
            raise ValueError(f"{method} compares convolutional feature maps; student '{s}' "
                             f"{s_shape} and teacher '{t}' {t_shape} are not both maps "
                             "(B, C, H, W) or (B, C, L)")
        if len(s_shape) != len(t_shape):
            raise ValueError(f"{method}: student '{s}' {s_shape} and teacher '{t}' {t_shape} have "
                             "different numbers of spatial dimensions; no pooling can pair them")


def common_size(fs: torch.Tensor, ft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two maps to the smaller's spatial size (as RepDistiller)."""
    if fs.shape[2:] == ft.shape[2:]:
        return fs, ft
    size = tuple(min(a, b) for a, b in zip(fs.shape[2:], ft.shape[2:]))
    pool = POOLS[len(size) - 1]
    return (fs if tuple(fs.shape[2:]) == size else pool(fs, size),
            ft if tuple(ft.shape[2:]) == size else pool(ft, size))


def rescaled(x: torch.Tensor, dims: tuple[int, ...] | int) -> torch.Tensor:
    """``x`` divided by its largest magnitude over ``dims`` (detached). For losses that
    normalize anyway this changes nothing, but keeps powers and norms of very large
    activations from overflowing."""
    scale = x.detach().abs().amax(dim=dims, keepdim=True)
    return x / scale.clamp_min(torch.finfo(x.dtype).tiny)


def kept_positions(targets: torch.Tensor, feature: torch.Tensor) -> torch.Tensor | None:
    """For (B, T, D) features of a sequence task (one target per position), the positions
    whose target is not padding (-100); ``None`` when every position counts."""
    if feature.dim() == 3 and targets.numel() == feature.shape[0] * feature.shape[1]:
        return targets.reshape(feature.shape[:2]) != -100
    return None


def masked_mean(values: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Mean over all elements, or over the kept (B, T) positions of (B, T, ...) values."""
    if keep is None:
        return values.mean()
    if not keep.any():
        return values.sum() * 0.0
    return values[keep].mean()


def teacher_feature(outputs: Outputs, point: str, method: str) -> torch.Tensor:
    # Detached: whatever the caller did, no gradient reaches the teacher.
    return feature(outputs, point, "teacher", method).detach()


def feature(outputs: Outputs, point: str, role: str, method: str) -> torch.Tensor:
    try:
        return outputs.features[point]
    except KeyError:
        raise ValueError(f"{method}: the {role}'s feature '{point}' was not captured (have "
                         f"{sorted(outputs.features)}); the trainer captures the feature points "
                         "when needs_features is set") from None


def linear(d_in: int, d_out: int, kind: str, nd: int = 2, bias: bool = True) -> nn.Module:
    """A 1x1 convolution over the channels of a map, a linear layer over the last dim else."""
    if kind == "map":
        return CONVS[nd - 1](d_in, d_out, 1, bias=bias)
    return nn.Linear(d_in, d_out, bias=bias)


def channels(shape: tuple[int, ...], kind: str) -> int:
    return shape[1] if kind == "map" else shape[-1]


# ---------------------------------------------------------------- params
@dataclasses.dataclass(frozen=True)
class FeatureParams(Mixed):
    """The CE / KD weights of ``Mixed`` and the method's own weight ``beta``."""

    beta: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")


@dataclasses.dataclass(frozen=True)
class PairedParams(FeatureParams):
    """Explicit tap pairs: ``student_points[i]`` learns from ``teacher_points[i]``; each a
    module path or an index into the model's feature points. Empty = the default pairing."""

    student_points: tuple[str | int, ...] = ()
    teacher_points: tuple[str | int, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        if len(self.student_points) != len(self.teacher_points):
            raise ValueError(f"student_points {list(self.student_points)} and teacher_points "
                             f"{list(self.teacher_points)} must pair one to one (same length)")


class FeatureDistiller(Distiller):
    """Shared shape of these methods: CE and KD terms, plus ``beta *`` the method's loss."""

    category = "feature"
    needs_features = True
    pairs: list[tuple[str, str]] | None = None

    def loss(self, student: Outputs, teacher: Outputs, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = mixed_terms(self.params, student, teacher, targets)
        terms[self.name] = self.params.beta * self.feature_loss(student, teacher, targets)
        return terms

    def tapped(self, student: Outputs, teacher: Outputs):
        """(student feature, teacher feature, pair index) for each chosen pair."""
        if self.pairs is None:
            raise RuntimeError(f"{self.name}: call setup(context) before loss: it chooses the "
                               "tap points and builds the adapters")
        for i, (s, t) in enumerate(self.pairs):
            yield feature(student, s, "student", self.name), teacher_feature(teacher, t, self.name), i

    def feature_loss(self, student: Outputs, teacher: Outputs, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------- FitNet
def fitnet_regressor(s_shape: tuple[int, ...], t_shape: tuple[int, ...], kind: str, relu: bool,
                     where: str) -> nn.Module:
    """A student-to-teacher regressor for one pair of taps (see ``FitNet``)."""
    cs, ct = channels(s_shape, kind), channels(t_shape, kind)
    if kind == "map":
        nd = len(s_shape) - 2
        ss, ts = s_shape[2:], t_shape[2:]
        if ss == ts:
            layer = CONVS[nd - 1](cs, ct, 1)
        elif all(s == 2 * t for s, t in zip(ss, ts)):
            layer = CONVS[nd - 1](cs, ct, 3, stride=2, padding=1)
        elif all(2 * s == t for s, t in zip(ss, ts)):
            layer = CONV_TRANSPOSES[nd - 1](cs, ct, 4, stride=2, padding=1)
        elif all(s >= t for s, t in zip(ss, ts)):
            # The paper's regressor: a valid convolution whose kernel shrinks s to t.
            layer = CONVS[nd - 1](cs, ct, tuple(s - t + 1 for s, t in zip(ss, ts)))
        else:
            raise ValueError(f"fitnet: {where}: the student's map ({'x'.join(map(str, ss))}) is "
                             f"smaller than the teacher's ({'x'.join(map(str, ts))}) and not half "
                             "its size; no convolutional regressor maps it up. Choose a shallower "
                             "student point or a deeper teacher point (student_point / teacher_point)")
    else:
        if kind == "sequence" and s_shape[1] != t_shape[1]:
            raise ValueError(f"fitnet: {where}: sequences of different lengths "
                             f"({s_shape[1]} and {t_shape[1]} positions) cannot be matched")
        layer = nn.Linear(cs, ct)
    return nn.Sequential(layer, nn.ReLU()) if relu else nn.Sequential(layer)


class FitNet(FeatureDistiller):
    """FitNets: hints from a teacher's hidden layer.

    Romero, Ballas, Kahou, Chassang, Gatta and Bengio, "FitNets: Hints for Thin Deep Nets",
    ICLR 2015. A regressor ``r`` maps the student's *guided* layer to the shape of the
    teacher's *hint* layer and ``||r(v_s) - u_t||^2`` is minimized; here averaged over the
    elements (RepDistiller's ``MSELoss``, which its beta = 100 is tuned for).

    The regressor is the paper's convolutional one for maps: a 1x1 convolution when the sizes
    agree, a valid convolution of kernel ``s - t + 1`` when the student's map is larger (with
    RepDistiller's stride-2 convolution and transposed convolution for exactly double or half
    the size), and a linear layer for vectors and token sequences. The paper asks the
    regressor to share the hint layer's non-linearity: it ends in a ReLU when the teacher's
    hint is non-negative on the probe batch (a post-ReLU map).

    ``mode: hint`` trains the hint term alone: the paper's first stage, followed by a KD stage
    in a recipe (see the module's docstring). ``mode: joint`` adds it to CE and KD, as
    RepDistiller does.
    """

    name = "fitnet"
    description = "FitNets hints: regress a student layer onto a teacher layer (MSE); mode hint = stage 1"
    paper = ("Romero, Ballas, Kahou, Chassang, Gatta, Bengio. FitNets: Hints for Thin Deep Nets. "
             "ICLR 2015")

    @dataclasses.dataclass(frozen=True)
    class Params(FeatureParams):
        beta: float = 100.0
        mode: Literal["joint", "hint"] = "joint"  # hint: the fitnet term alone (CE, KD weights unused)
        student_point: str | int | None = None  # the guided layer; None = the middle point
        teacher_point: str | int | None = None  # the hint layer; None = the middle point

    def setup(self, context: DistillContext) -> list[nn.Module]:
        probed = Probed.of(context, "fitnet")
        p = self.params
        s = pick_point(p.student_point if p.student_point is not None
                       else (len(context.student_points) - 1) // 2, context.student_points, "student")
        t = pick_point(p.teacher_point if p.teacher_point is not None
                       else (len(context.teacher_points) - 1) // 2, context.teacher_points, "teacher")
        s_kind, t_kind = probed.kind("student", s), probed.kind("teacher", t)
        s_shape, t_shape = probed.shape("student", s), probed.shape("teacher", t)
        where = f"student '{s}' {s_shape} -> teacher '{t}' {t_shape}"
        if s_kind != t_kind or len(s_shape) != len(t_shape):
            raise ValueError(f"fitnet: {where}: a {s_kind} cannot be regressed onto a {t_kind}; "
                             "choose points of the same kind (student_point / teacher_point)")
        relu = bool((probed.teacher.features[t] >= 0).all())
        self.kind = s_kind
        self.regressor = fitnet_regressor(s_shape, t_shape, s_kind, relu, where)
        self.pairs = [(s, t)]
        return [self.regressor]

    def loss(self, student: Outputs, teacher: Outputs, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.params.mode == "hint":
            return {self.name: self.params.beta * self.feature_loss(student, teacher, targets)}
        return super().loss(student, teacher, targets)

    def feature_loss(self, student, teacher, targets):
        fs, ft, _ = next(self.tapped(student, teacher))
        keep = kept_positions(targets, ft) if self.kind == "sequence" else None
        return masked_mean((self.regressor(fs) - ft).pow(2), keep)


# ---------------------------------------------------------------- attention transfer
def spatial_attention(f: torch.Tensor, p: float) -> torch.Tensor:
    """``mean_c |A_c|^p`` flattened and L2-normalized per example: (B, positions)."""
    flat = rescaled(f.flatten(2), (1, 2))
    return F.normalize(flat.abs().pow(p).mean(dim=1), dim=1)


class AT(FeatureDistiller):
    """Activation-based attention transfer.

    Zagoruyko and Komodakis, "Paying More Attention to Attention: Improving the Performance of
    Convolutional Neural Networks via Attention Transfer", ICLR 2017. The attention map of a
    stage is ``Q = sum_c |A_c|^p`` (p = 2) over the channels, flattened and L2-normalized; the
    loss sums, over the paired stages, the squared difference of the student's and teacher's
    maps averaged over examples and positions (the authors' code, which beta = 1000 is tuned
    for; the mean over channels used here equals the sum up to the normalization). No adapter
    is needed: channel counts may differ; spatial sizes that differ are average-pooled to the
    smaller one, as RepDistiller does.
    """

    name = "at"
    description = "attention transfer: match L2-normalized spatial maps sum_c |A|^p of paired stages"
    paper = ("Zagoruyko, Komodakis. Paying More Attention to Attention: Improving the Performance "
             "of Convolutional Neural Networks via Attention Transfer. ICLR 2017")

    @dataclasses.dataclass(frozen=True)
    class Params(PairedParams):
        beta: float = 1000.0
        p: float = 2.0

        def __post_init__(self):
            super().__post_init__()
            if self.p <= 0:
                raise ValueError(f"p must be positive, got {self.p}")

    def setup(self, context: DistillContext) -> list[nn.Module]:
        probed = Probed.of(context, "at")
        self.pairs = stage_pairs(self.params, probed, "at")
        check_maps(probed, self.pairs, "at")
        return []

    def feature_loss(self, student, teacher, targets):
        total = 0.0
        for fs, ft, _ in self.tapped(student, teacher):
            fs, ft = common_size(fs, ft)
            total = total + (spatial_attention(fs, self.params.p)
                             - spatial_attention(ft, self.params.p)).pow(2).mean()
        return total


# ---------------------------------------------------------------- neuron selectivity transfer
def channel_vectors(f: torch.Tensor) -> torch.Tensor:
    """Each channel's activations over the positions, L2-normalized: (B, C, positions)."""
    return F.normalize(rescaled(f.flatten(2), 2), dim=2)


class NST(FeatureDistiller):
    """Neuron selectivity transfer.

    Huang and Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer",
    arXiv:1707.01219, 2017. Each channel's map, flattened and L2-normalized, is one sample of
    the layer's distribution of neuron selectivity patterns; the loss is the squared maximum
    mean discrepancy between the student's and the teacher's samples,
    ``mean k(t, t') + mean k(s, s') - 2 mean k(s, t)``, with the polynomial kernel
    ``k(x, y) = (x.y + c)^d`` (the paper's best: d = 2, c = 0), averaged over the examples
    and summed over the paired stages. Channel counts may differ; spatial sizes that differ
    are average-pooled to the smaller one, as RepDistiller does.
    """

    name = "nst"
    description = "neuron selectivity transfer: MMD (polynomial kernel) between channel activation patterns"
    paper = ("Huang, Wang. Like What You Like: Knowledge Distill via Neuron Selectivity Transfer. "
             "arXiv:1707.01219, 2017")

    @dataclasses.dataclass(frozen=True)
    class Params(PairedParams):
        beta: float = 50.0
        degree: int = 2  # d of the polynomial kernel; 1 with coef 0 is the linear kernel
        coef: float = 0.0  # c of the polynomial kernel

        def __post_init__(self):
            super().__post_init__()
            if self.degree < 1 or self.coef < 0:
                raise ValueError(f"degree must be >= 1 and coef >= 0, got degree={self.degree}, "
                                 f"coef={self.coef}")

    def setup(self, context: DistillContext) -> list[nn.Module]:
        probed = Probed.of(context, "nst")
        self.pairs = stage_pairs(self.params, probed, "nst")
        check_maps(probed, self.pairs, "nst")
        return []

    def kernel(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Mean of k over all pairs of a's and b's channels, per example."""
        return (a @ b.transpose(1, 2) + self.params.coef).pow(self.params.degree).mean(dim=(1, 2))

    def feature_loss(self, student, teacher, targets):
        total = 0.0
        for fs, ft, _ in self.tapped(student, teacher):
            fs, ft = common_size(fs, ft)
            s, t = channel_vectors(fs), channel_vectors(ft)
            total = total + (self.kernel(t, t) + self.kernel(s, s) - 2 * self.kernel(s, t)).mean()
        return total


# ---------------------------------------------------------------- variational information distillation
class GaussianHead(nn.Module):
    """Predicts the teacher feature's mean from the student's (three 1x1 layers with ReLUs, as
    in the authors' code) with a learned variance per teacher channel,
    ``softplus(alpha_c) + eps``."""

    def __init__(self, cs: int, ct: int, kind: str, nd: int, init_variance: float, eps: float):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.mean = nn.Sequential(linear(cs, ct, kind, nd, bias=False), nn.ReLU(),
                                  linear(ct, ct, kind, nd, bias=False), nn.ReLU(),
                                  linear(ct, ct, kind, nd, bias=False))
        # Inverse softplus, so that the variance starts at init_variance.
        self.alpha = nn.Parameter(torch.full((ct,), math.log(math.expm1(init_variance - eps))))

    def variance(self, like: torch.Tensor) -> torch.Tensor:
        var = F.softplus(self.alpha) + self.eps
        if self.kind == "map":
            return var.reshape(1, -1, *[1] * (like.dim() - 2))
        return var

    def forward(self, fs: torch.Tensor) -> torch.Tensor:
        return self.mean(fs)


class VID(FeatureDistiller):
    """Variational information distillation.

    Ahn, Hu, Damianou, Lawrence and Dai, "Variational Information Distillation for Knowledge
    Transfer", CVPR 2019. Maximizing a variational lower bound of the mutual information
    between teacher and student features amounts to minimizing the negative log-likelihood of
    the teacher's feature under a Gaussian whose mean a small network predicts from the
    student's feature and whose variance is learned per channel (``softplus(alpha_c) + eps``):
    ``0.5 * ((t - mu(s))^2 / sigma_c^2 + log sigma_c^2)`` (constant dropped), averaged over the
    elements and summed over the paired stages. Works on conv maps (spatial sizes that differ
    are average-pooled to the smaller one, as RepDistiller does) and, with explicit points, on
    vectors and sequences; without conv maps in both models the default pairs every feature
    point from the deepest down.
    """

    name = "vid"
    description = "variational information distillation: Gaussian NLL of teacher features given the student's"
    paper = ("Ahn, Hu, Damianou, Lawrence, Dai. Variational Information Distillation for Knowledge "
             "Transfer. CVPR 2019")

    @dataclasses.dataclass(frozen=True)
    class Params(PairedParams):
        beta: float = 1.0
        init_variance: float = 5.0  # the authors' starting variance
        eps: float = 1e-5  # the variance's floor

        def __post_init__(self):
            super().__post_init__()
            if self.eps <= 0 or self.init_variance <= self.eps:
                raise ValueError(f"need 0 < eps < init_variance, got eps={self.eps}, "
                                 f"init_variance={self.init_variance}")

    def setup(self, context: DistillContext) -> list[nn.Module]:
        probed = Probed.of(context, "vid")
        p = self.params
        if p.student_points:
            pairs = explicit_pairs(p, probed)
        elif probed.stages("student") and probed.stages("teacher"):
            pairs = stage_pairs(p, probed, "vid")
        else:
            pairs = deepest_pairs(probed.points("student"), probed.points("teacher"))
        heads, self.kinds = [], []
        for s, t in pairs:
            s_kind, t_kind = probed.kind("student", s), probed.kind("teacher", t)
            s_shape, t_shape = probed.shape("student", s), probed.shape("teacher", t)
            if s_kind != t_kind or len(s_shape) != len(t_shape):
                raise ValueError(f"vid: student '{s}' {s_shape} is a {s_kind} and teacher '{t}' "
                                 f"{t_shape} a {t_kind}; pair points of the same kind")
            if s_kind == "sequence" and s_shape[1] != t_shape[1]:
                raise ValueError(f"vid: student '{s}' and teacher '{t}' have different sequence "
                                 f"lengths ({s_shape[1]} and {t_shape[1]})")
            heads.append(GaussianHead(channels(s_shape, s_kind), channels(t_shape, t_kind), s_kind,
                                      len(s_shape) - 2, p.init_variance, p.eps))
            self.kinds.append(s_kind)
        self.heads = nn.ModuleList(heads)
        self.pairs = pairs
        return [self.heads]

    def feature_loss(self, student, teacher, targets):
        total = 0.0
        for fs, ft, i in self.tapped(student, teacher):
            head = self.heads[i]
            keep = None
            if self.kinds[i] == "map":
                fs, ft = common_size(fs, ft)
            elif self.kinds[i] == "sequence":
                keep = kept_positions(targets, ft)
            var = head.variance(ft)
            nll = 0.5 * ((head(fs) - ft).pow(2) / var + var.log())
            total = total + masked_mean(nll, keep)
        return total


# ---------------------------------------------------------------- transformer hidden states
def uniform_mapping(n_student: int, n_teacher: int) -> list[int]:
    """TinyBERT's uniform strategy: student layer m (1-based) learns from teacher layer
    ``ceil(m * N / M)``; 0-based here, so the last maps to the last."""
    return [-(-(m + 1) * n_teacher // n_student) - 1 for m in range(n_student)]


class HiddenStates(FeatureDistiller):
    """Shared by hidden-mse and hidden-cosine: mapped layers, learned linear projections."""

    #: Project even when the widths agree (TinyBERT's W_h) or only when they differ.
    always_project = True

    def default_pairs(self, probed: Probed) -> list[tuple[str, str]]:
        raise NotImplementedError

    def setup(self, context: DistillContext) -> list[nn.Module]:
        probed = Probed.of(context, self.name)
        pairs = (explicit_pairs(self.params, probed) if self.params.student_points
                 else self.default_pairs(probed))
        projections = []
        for s, t in pairs:
            s_kind, t_kind = probed.kind("student", s), probed.kind("teacher", t)
            s_shape, t_shape = probed.shape("student", s), probed.shape("teacher", t)
            if "map" in (s_kind, t_kind):
                raise ValueError(f"{self.name} matches hidden states (B, T, D) or (B, D); student "
                                 f"'{s}' {s_shape} / teacher '{t}' {t_shape} include a conv map "
                                 "(use fitnet, at, nst or vid for conv nets)")
            if s_kind != t_kind or s_shape[:-1] != t_shape[:-1]:
                raise ValueError(f"{self.name}: student '{s}' {s_shape} and teacher '{t}' {t_shape} "
                                 "must agree in all but the hidden width (same sequence length)")
            same = s_shape[-1] == t_shape[-1]
            projections.append(nn.Identity() if same and not self.always_project
                               else nn.Linear(s_shape[-1], t_shape[-1]))
        self.projections = nn.ModuleList(projections)
        self.pairs = pairs
        return [self.projections]

    def feature_loss(self, student, teacher, targets):
        total = 0.0
        for fs, ft, i in self.tapped(student, teacher):
            total = total + masked_mean(self.distance(self.projections[i](fs), ft),
                                        kept_positions(targets, ft))
        return total

    def distance(self, hs: torch.Tensor, ht: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class HiddenMSE(HiddenStates):
    """Hidden-state distillation of TinyBERT.

    Jiao, Yin, Shang, Jiang, Chen, Li, Wang and Liu, "TinyBERT: Distilling BERT for Natural
    Language Understanding", Findings of EMNLP 2020: ``MSE(H_s W_h, H_t)`` with a learned
    projection ``W_h`` from the student's width to the teacher's, summed over the mapped
    layers; by default every student block learns from the teacher block at the same relative
    depth (the paper's uniform mapping ``g(m) = m * N / M``). Positions whose target is -100
    (padding of sequence tasks) are left out.

    TinyBERT runs the intermediate-layer loss and then prediction-layer distillation (soft
    cross-entropy at T = 1, no hard labels); the defaults run both at once (kd_weight 1,
    temperature 1, ce_weight 0). Its two stages are the recipe
    ``[{distill: {name: hidden-mse, kd_weight: 0}}, {distill: {name: hinton, alpha: 1, temperature: 1}}]``.
    """

    name = "hidden-mse"
    description = "TinyBERT hidden-state MSE through learned projections over uniformly mapped layers"
    paper = ("Jiao, Yin, Shang, Jiang, Chen, Li, Wang, Liu. TinyBERT: Distilling BERT for Natural "
             "Language Understanding. Findings of EMNLP 2020")

    @dataclasses.dataclass(frozen=True)
    class Params(PairedParams):
        ce_weight: float = 0.0
        kd_weight: float = 1.0
        temperature: float = 1.0
        beta: float = 1.0

    def default_pairs(self, probed: Probed) -> list[tuple[str, str]]:
        s_points, t_points = probed.points("student"), probed.points("teacher")
        return [(s, t_points[j]) for s, j in zip(s_points, uniform_mapping(len(s_points), len(t_points)))]

    def distance(self, hs, ht):
        return (hs - ht).pow(2)


class HiddenCosine(HiddenStates):
    """Cosine hidden-state loss of DistilBERT.

    Sanh, Debut, Chaumond and Wolf, "DistilBERT, a distilled version of BERT: smaller, faster,
    cheaper and lighter", arXiv:1910.01108, 2019: ``1 - cos(h_s, h_t)`` per position (the
    cosine embedding loss with target 1), aligning the directions of the last hidden states,
    averaged over the positions (padding left out when the task marks it). DistilBERT's student
    has the teacher's width; when the widths differ a learned linear projection maps the
    student's states to the teacher's. The defaults are DistilBERT's weights: 5 for the soft
    targets at temperature 2, 2 for the hard-label (masked LM) loss, 1 for the cosine term.
    """

    name = "hidden-cosine"
    description = "DistilBERT cosine loss between (projected) student and teacher hidden states"
    paper = ("Sanh, Debut, Chaumond, Wolf. DistilBERT, a distilled version of BERT: smaller, "
             "faster, cheaper and lighter. arXiv:1910.01108, 2019")
    always_project = False

    @dataclasses.dataclass(frozen=True)
    class Params(PairedParams):
        ce_weight: float = 2.0
        kd_weight: float = 5.0
        temperature: float = 2.0
        beta: float = 1.0

    def default_pairs(self, probed: Probed) -> list[tuple[str, str]]:
        return [(probed.points("student")[-1], probed.points("teacher")[-1])]

    def distance(self, hs, ht):
        # Rescaling each vector first leaves the cosine unchanged and its norm finite.
        return 1 - (F.normalize(rescaled(hs, -1), dim=-1) * F.normalize(rescaled(ht, -1), dim=-1)).sum(-1)


# ---------------------------------------------------------------- attention distributions
class AttentionKL(FeatureDistiller):
    """Self-attention distribution transfer of MiniLM.

    Wang, Wei, Dong, Bao, Yang and Zhou, "MiniLM: Deep Self-Attention Distillation for
    Task-Agnostic Compression of Pre-Trained Transformers", NeurIPS 2020: for each head and
    query position, ``KL(A_t || A_s)`` between the teacher's and the student's attention
    distributions over the keys, averaged over heads, queries and examples; by default only
    the last layers (the paper's choice), or the listed pairs summed. Per-head transfer needs
    the same number of heads and the same sequence length in both models; ``heads: mean``
    serves models with different head counts by comparing each model's head-averaged
    attention (a mixture of distributions, so still one per query), an extension that gives up
    MiniLM's head-to-head correspondence. MiniLM's value-relation term is not part of this
    method. Queries whose target is -100 are left out.

    MiniLM distills with the attention terms alone, task-agnostically, and fine-tunes on
    labels afterwards; the defaults keep the task's cross-entropy (weight 1) beside the
    attention term (beta 1) so that one stage trains a usable student (``ce_weight: 0`` gives
    the paper's pure attention distillation).
    """

    name = "attention-kl"
    description = "MiniLM: KL between teacher and student self-attention distributions, per head"
    paper = ("Wang, Wei, Dong, Bao, Yang, Zhou. MiniLM: Deep Self-Attention Distillation for "
             "Task-Agnostic Compression of Pre-Trained Transformers. NeurIPS 2020")
    needs_attention = True

    @dataclasses.dataclass(frozen=True)
    class Params(FeatureParams):
        beta: float = 1.0
        # Attention points by path or index into the model's attention points (-1 = last).
        student_layers: tuple[str | int, ...] = (-1,)
        teacher_layers: tuple[str | int, ...] = (-1,)
        heads: Literal["per-head", "mean"] = "per-head"

        def __post_init__(self):
            super().__post_init__()
            if self.heads not in ("per-head", "mean"):
                raise ValueError(f"heads must be 'per-head' or 'mean', got {self.heads!r}")
            if not self.student_layers or len(self.student_layers) != len(self.teacher_layers):
                raise ValueError(f"student_layers {list(self.student_layers)} and teacher_layers "
                                 f"{list(self.teacher_layers)} must be non-empty and pair one to one")

    @staticmethod
    def pick(spec: str | int, points: list[str], role: str) -> str:
        if isinstance(spec, int):
            if not -len(points) <= spec < len(points):
                raise ValueError(f"attention-kl: {role} attention index {spec} is out of range: "
                                 f"the {role} has {len(points)} attention points {points}")
            return points[spec]
        if spec not in points:
            raise ValueError(f"attention-kl: '{spec}' is not an attention point of the {role}; "
                             f"its attention points are {points}")
        return spec

    def setup(self, context: DistillContext) -> list[nn.Module]:
        for role, model, points in (("student", context.student, context.student_attention),
                                    ("teacher", context.teacher, context.teacher_attention)):
            if not points:
                raise ValueError(f"attention-kl needs attention maps, but the {role} model "
                                 f"({type(model).__name__}) names no attention points; use a "
                                 "transformer family (e.g. gpt or text-transformer) for both")
        s_out, t_out = context.probe()
        pairs = []
        for s_spec, t_spec in zip(self.params.student_layers, self.params.teacher_layers):
            s = self.pick(s_spec, context.student_attention, "student")
            t = self.pick(t_spec, context.teacher_attention, "teacher")
            s_shape, t_shape = tuple(s_out.features[s].shape), tuple(t_out.features[t].shape)
            if len(s_shape) != 4 or len(t_shape) != 4:
                raise ValueError(f"attention-kl: attention maps must be (B, heads, T, T); got "
                                 f"student '{s}' {s_shape}, teacher '{t}' {t_shape}")
            if s_shape[1] != t_shape[1] and self.params.heads == "per-head":
                raise ValueError(f"attention-kl transfers attention per head, so the head counts "
                                 f"must match: the student has {s_shape[1]} heads at '{s}', the "
                                 f"teacher {t_shape[1]} at '{t}'; build the student with "
                                 f"heads={t_shape[1]}, or compare head-averaged maps with heads: mean")
            if s_shape[2:] != t_shape[2:]:
                raise ValueError(f"attention-kl: sequence lengths differ: student '{s}' {s_shape}, "
                                 f"teacher '{t}' {t_shape}")
            pairs.append((s, t))
        self.pairs = pairs
        return []

    def feature_loss(self, student, teacher, targets):
        total = 0.0
        for a_s, a_t, _ in self.tapped(student, teacher):
            if self.params.heads == "mean":
                a_s, a_t = a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
            # Masked keys have probability 0 in both: xlogy gives 0 there, and the clamp keeps
            # log(0) out of the student's term (whose weight a_t is then 0 too).
            tiny = torch.finfo(a_s.dtype).tiny
            kl = (torch.xlogy(a_t, a_t) - a_t * a_s.clamp_min(tiny).log()).sum(-1)  # (B, H, T)
            total = total + masked_mean(kl.transpose(1, 2), kept_positions(targets, a_t[:, 0]))
        return total


@hookimpl
def kdbench_register_distillers(register):
    for cls in (FitNet, AT, NST, VID, HiddenMSE, HiddenCosine, AttentionKL):
        register(cls)
