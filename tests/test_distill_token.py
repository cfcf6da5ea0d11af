"""Token-level divergences against values computed by hand, their properties, padding,
gradients, extreme logits, the vocabulary check and a short real run through ``fit``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from kdbench.config import Training
from kdbench.contracts import DistillContext, Outputs, Task, TaskData
from kdbench.errors import ConfigError
from kdbench.training import Teacher, fit

# Six positions (rows) over a 4-token vocabulary; the last one is padding.
STUDENT = [[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 1.0, 2.0], [0.3, 0.1, -0.4, 1.5],
           [2.0, 0.0, 0.0, -2.0], [-0.5, 0.5, 1.5, 0.0], [9.0, -9.0, 4.0, 0.0]]
TEACHER = [[2.0, 1.0, 0.0, -0.5], [0.5, 0.5, 2.0, 1.0], [1.0, -1.0, 0.2, 2.5],
           [1.0, 1.0, -1.0, 0.0], [0.0, 0.0, 3.0, -1.0], [-7.0, 3.0, 0.0, 8.0]]
TARGETS = [1, 2, 3, 0, 2, -100]
# Computed with the math module alone: p = softmax(teacher / T), q = softmax(student / T) written
# out by hand, T = 2, each divergence averaged over the five real positions.
GOLDEN = {
    ("forward-kl", ()): 0.111689337912749,                    # sum p ln(p / q)
    ("reverse-kl", ()): 0.11347405815417541,                  # sum q ln(q / p)
    ("jsd", (("beta", 0.3),)): 0.023215803262559558,          # m = .3p + .7q; .3 KL(p||m) + .7 KL(q||m)
    ("skew-kl", (("alpha", 0.25),)): 0.06194830209304253,     # KL(p || .25p + .75q)
    ("skew-reverse-kl", (("alpha", 0.25),)): 0.0619525654498575,  # KL(q || .25q + .75p)
    ("tvd", ()): 0.20726433102273734,                         # 0.5 sum |p - q|
}
GOLDEN_CE = 0.6528615981531058  # mean over real positions of -ln softmax(student)[y], raw logits
NAMES = ["forward-kl", "reverse-kl", "jsd", "skew-kl", "skew-reverse-kl", "tvd"]


def build(plugins, name, **params):
    return plugins.build("distiller", name, params)


def out(values, dtype=torch.float64, requires_grad=False):
    return Outputs(torch.tensor(values, dtype=dtype, requires_grad=requires_grad), {})


def loss(distiller, student=STUDENT, teacher=TEACHER, targets=TARGETS):
    s = student if isinstance(student, Outputs) else out(student)
    t = teacher if isinstance(teacher, Outputs) else out(teacher)
    return distiller.loss(s, t, torch.tensor(targets))


@pytest.mark.parametrize("name, params", list(GOLDEN))
def test_divergences_match_hand_computed_values(plugins, name, params):
    terms = loss(build(plugins, name, temperature=2.0, **dict(params)))
    assert set(terms) == {name}
    assert terms[name].item() == pytest.approx(GOLDEN[name, params], rel=1e-12)


def test_weights_scale_the_named_terms_and_add_cross_entropy(plugins):
    terms = loss(build(plugins, "tvd", temperature=2.0, kd_weight=3.0, ce_weight=0.5))
    assert set(terms) == {"tvd", "ce"}
    assert terms["tvd"].item() == pytest.approx(3.0 * GOLDEN["tvd", ()], rel=1e-12)
    assert terms["ce"].item() == pytest.approx(0.5 * GOLDEN_CE, rel=1e-12)


# ------------------------------------------------------------------ properties
@pytest.mark.parametrize("name", NAMES)
def test_every_divergence_is_zero_when_student_equals_teacher(plugins, name):
    assert loss(build(plugins, name), STUDENT, STUDENT)[name].item() == pytest.approx(0.0, abs=1e-12)


def test_jsd_is_symmetric_at_one_half_and_bounded_by_ln_2(plugins):
    jsd = build(plugins, "jsd", beta=0.5)
    forward, swapped = loss(jsd, STUDENT, TEACHER)["jsd"].item(), loss(jsd, TEACHER, STUDENT)["jsd"].item()
    assert forward == pytest.approx(swapped, rel=1e-12)
    far = [[50.0, -50.0, 0.0, 0.0]] * 6
    assert 0 < loss(jsd, far, [[-50.0, 50.0, 0.0, 0.0]] * 6)["jsd"].item() <= math.log(2) + 1e-12
    lopsided = build(plugins, "jsd", beta=0.1)
    assert loss(lopsided, STUDENT, TEACHER)["jsd"].item() != pytest.approx(
        loss(lopsided, TEACHER, STUDENT)["jsd"].item(), rel=1e-3)


def test_skews_of_zero_are_the_plain_kls(plugins):
    for skew, plain in (("skew-kl", "forward-kl"), ("skew-reverse-kl", "reverse-kl")):
        assert loss(build(plugins, skew, alpha=0.0, temperature=1.5))[skew].item() == pytest.approx(
            loss(build(plugins, plain, temperature=1.5))[plain].item(), rel=1e-12)
    # Skewing toward the first distribution can only shrink the divergence.
    assert loss(build(plugins, "skew-kl", alpha=0.5))["skew-kl"] < loss(build(plugins, "forward-kl"))["forward-kl"]


def test_tvd_stays_in_the_unit_interval_and_reaches_one_on_disjoint_supports(plugins):
    tvd = build(plugins, "tvd")
    g = torch.Generator().manual_seed(1)
    for scale in (0.1, 1.0, 10.0, 1e3):
        s, t = torch.randn(16, 7, generator=g) * scale, torch.randn(16, 7, generator=g) * scale
        value = tvd.loss(Outputs(s, {}), Outputs(t, {}), torch.zeros(16, dtype=torch.long))["tvd"].item()
        assert 0.0 <= value <= 1.0
    disjoint = loss(tvd, [[1e4, -1e4, -1e4, -1e4]] * 6, [[-1e4, 1e4, -1e4, -1e4]] * 6)["tvd"].item()
    assert disjoint == pytest.approx(1.0)


# ------------------------------------------------------------------ padding
@pytest.mark.parametrize("name", NAMES)
def test_padding_positions_do_not_change_the_loss(plugins, name):
    distiller = build(plugins, name, ce_weight=1.0)
    clean = {k: v.item() for k, v in loss(distiller).items()}
    # Other logits at the padded position, and more padded positions in between.
    student = STUDENT[:2] + [[-30.0, 0.0, 30.0, 1.0]] + STUDENT[2:5] + [[0.0, 0.0, 0.0, 0.0]]
    teacher = TEACHER[:2] + [[5.0, 5.0, -5.0, 0.0]] + TEACHER[2:5] + [[40.0, -40.0, 0.0, 1.0]]
    padded = loss(distiller, student, teacher, TARGETS[:2] + [-100] + TARGETS[2:5] + [-100])
    assert {k: v.item() for k, v in padded.items()} == pytest.approx(clean, rel=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_a_batch_of_padding_only_gives_zero_not_nan(plugins, name):
    terms = loss(build(plugins, name, ce_weight=1.0), targets=[-100] * 6)
    assert all(v.item() == 0.0 for v in terms.values())


# ------------------------------------------------------------------ gradients and stability
@pytest.mark.parametrize("name, params", [
    ("forward-kl", {}), ("reverse-kl", {"temperature": 2.0}), ("jsd", {"beta": 0.3}), ("jsd", {"beta": 0.9}),
    ("skew-kl", {}), ("skew-reverse-kl", {"alpha": 0.4}), ("tvd", {"ce_weight": 0.5})])
def test_gradients_pass_gradcheck_and_never_reach_the_teacher(plugins, name, params):
    distiller = build(plugins, name, **params)
    teacher = out(TEACHER, requires_grad=True)
    targets = torch.tensor(TARGETS)

    def total(student_logits):
        return sum(distiller.loss(Outputs(student_logits, {}), teacher, targets).values())

    student = torch.tensor(STUDENT, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(total, (student,))
    total(student).backward()
    assert student.grad[:5].abs().sum() > 0
    assert student.grad[5].abs().sum() == 0  # the padded position gets nothing
    assert teacher.logits.grad is None


@pytest.mark.parametrize("name", NAMES)
def test_extreme_logits_give_finite_loss_and_gradients(plugins, name):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(12, 50, generator=g) * 1e4).requires_grad_(True)
    t = torch.randn(12, 50, generator=g) * 1e4
    y = torch.randint(0, 50, (12,), generator=g)
    y[3] = -100
    with torch.no_grad():
        s[0], t[0] = 0.0, 0.0
        s[0, 1], t[0, 2] = 1e4, 1e4  # one-hot student and teacher on different tokens
    terms = build(plugins, name, ce_weight=1.0, temperature=1.0).loss(Outputs(s, {}), Outputs(t, {}), y)
    assert all(torch.isfinite(v) for v in terms.values()), terms
    sum(terms.values()).backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name, raw, message", [
    ("forward-kl", {"temperature": 0}, "temperature must be positive, got 0"),
    ("reverse-kl", {"ce_weight": -1}, "ce_weight must be >= 0, got -1"),
    ("jsd", {"beta": 1.0}, r"beta must be in \(0, 1\).*got 1.0"),
    ("jsd", {"beta": 0}, r"beta must be in \(0, 1\).*got 0"),
    ("skew-kl", {"alpha": 1.0}, r"alpha \(the skew\) must be in \[0, 1\), got 1.0"),
    ("skew-reverse-kl", {"alpha": -0.1}, r"must be in \[0, 1\), got -0.1"),
    ("tvd", {"kd_weight": -2}, "kd_weight must be >= 0, got -2"),
])
def test_bad_parameters_are_rejected_with_the_value(plugins, name, raw, message):
    with pytest.raises(ConfigError, match=message):
        plugins.build("distiller", name, raw)


# ------------------------------------------------------------------ setup and a real run
VOCAB, LENGTH = 11, 6


class TinyLM(nn.Module):
    """Embedding then a linear read-out: logits (batch, length, vocabulary)."""

    def __init__(self, vocab_out: int = VOCAB, width: int = 8):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.head = nn.Linear(width, vocab_out)

    def forward(self, x):
        return self.head(self.embed(x))


class NextToken(Task):
    name = "next-token-test"


def sequences(n: int, seed: int) -> TensorDataset:
    """Token i + 1 follows token i; the last two positions of every other sequence are padding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    y = (x + 1) % VOCAB
    y[::2, -2:] = -100
    return TensorDataset(x, y)


def lm_data() -> TaskData:
    return TaskData(train=sequences(96, 0), val=sequences(32, 1), test=sequences(32, 2),
                    input_shape=(LENGTH,), num_classes=VOCAB, vocab_size=VOCAB)


def context(student: nn.Module, teacher: nn.Module) -> DistillContext:
    return DistillContext(student=student, teacher=teacher, data=lm_data(), student_points=[], teacher_points=[])


@pytest.mark.parametrize("name", NAMES)
def test_setup_rejects_a_vocabulary_mismatch_naming_both_sizes(plugins, name):
    distiller = build(plugins, name)
    with pytest.raises(ValueError, match=r"teacher outputs 13 classes and the student 11"):
        distiller.setup(context(TinyLM(), TinyLM(vocab_out=13)))
    assert distiller.setup(context(TinyLM(), TinyLM())) == []


def test_a_short_real_run_trains_a_language_model_student(plugins):
    data, task = lm_data(), NextToken()
    torch.manual_seed(0)
    teacher_model = TinyLM(width=16)
    fit(teacher_model, data, task, Training(epochs=15, batch_size=32, lr=0.05), seed=0)
    student = TinyLM()
    distiller = build(plugins, "jsd", beta=0.5, ce_weight=0.5)
    assert distiller.setup(context(student, teacher_model)) == []
    history = fit(student, data, task, Training(epochs=3, batch_size=32, lr=0.05), seed=0,
                  distiller=distiller, teacher=Teacher(teacher_model, []))
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert all({"loss_jsd", "loss_ce"} <= set(row) for row in history)
    assert history[-1]["loss_jsd"] < history[0]["loss_jsd"]  # the student moves toward the teacher
