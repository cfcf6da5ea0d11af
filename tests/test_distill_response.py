"""dkd, dist and logit-std against values computed from the papers' formulas, their gradients,
their behaviour on extreme logits and padding, and a short real run of dkd and dist."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from kdbench.config import load_experiment
from kdbench.contracts import Outputs
from kdbench.errors import ConfigError
from kdbench.runner import run_experiment
from kdbench.store import Store
from kdbench_plugins.distill.common import soft_kl

STUDENT = [[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 1.0, 2.0], [0.3, 0.1, -0.4, 1.5]]
TEACHER = [[2.0, 1.0, 0.0, -0.5], [0.5, 0.5, 2.0, 1.0], [1.0, -1.0, 0.2, 2.5]]
TARGETS = [1, 2, 3]
# Computed with the math module alone, probabilities p = softmax(z / T) written out by hand:
# CE = mean_i -ln softmax(s_i)[y_i]
GOLDEN_CE = 0.8214818595796706
# DKD at T = 2 (Zhao et al., eqs. 1-3): b = (p_y, 1 - p_y), p^_k = p_k / (1 - p_y) for k != y,
# TCKD = T^2 mean_i KL(b_t || b_s), NCKD = T^2 mean_i KL(p^_t || p^_s).
GOLDEN_TCKD = 0.14681941128094564
GOLDEN_NCKD = 0.3372616007253096
# DIST at tau = 2 (Huang et al., eqs. 5-7): Y = softmax(Z / tau), Pearson r(a, b) =
# sum (a - mean a)(b - mean b) / (|a - mean a| |b - mean b| + 1e-8),
# inter = tau^2 (1 - mean over rows r), intra = tau^2 (1 - mean over columns r).
GOLDEN_INTER = 1.6315138995156517
GOLDEN_INTRA = 0.8883520743175031
# logit-std KD at T = 2 (Sun et al.): Z(z) = (z - mean z) / (sqrt(sum (z - mean z)^2 / (C - 1)) + 1e-7),
# kd = T^2 mean_i KL(softmax(Z(t_i) / T) || softmax(Z(s_i) / T)).
GOLDEN_LOGIT_STD = 0.2631354121143039


def build(plugins, name, **params):
    return plugins.build("distiller", name, params)


def out(values, dtype=torch.float64, requires_grad=False):
    return Outputs(torch.tensor(values, dtype=dtype, requires_grad=requires_grad), {})


def targets(values=TARGETS):
    return torch.tensor(values)


def warm(distiller, epoch=1000):
    """DKD reads the epoch for its warm-up; past the warm-up the factor is 1."""
    distiller.begin_batch(torch.arange(len(TARGETS)), epoch, epoch)
    return distiller


def values(terms):
    return {k: v.item() for k, v in terms.items()}


# ------------------------------------------------------------------ golden values
def test_dkd_matches_the_paper_formula(plugins):
    dkd = warm(build(plugins, "dkd", ce_weight=0.7, alpha=0.5, beta=3.0, temperature=2.0))
    terms = values(dkd.loss(out(STUDENT), out(TEACHER), targets()))
    assert set(terms) == {"ce", "dkd.tckd", "dkd.nckd"}
    assert terms["ce"] == pytest.approx(0.7 * GOLDEN_CE, rel=1e-12)
    assert terms["dkd.tckd"] == pytest.approx(0.5 * GOLDEN_TCKD, rel=1e-12)
    assert terms["dkd.nckd"] == pytest.approx(3.0 * GOLDEN_NCKD, rel=1e-12)


def test_dkd_decomposes_classical_kd(plugins):
    # The paper's eq. 5: KD = TCKD + (1 - p_y of the teacher) * NCKD, sample by sample.
    dkd = warm(build(plugins, "dkd", alpha=1.0, beta=1.0, temperature=3.0))
    for s, t, y in zip(STUDENT, TEACHER, TARGETS):
        terms = dkd.loss(out([s]), out([t]), targets([y]))
        p_y = torch.softmax(torch.tensor(t, dtype=torch.float64) / 3.0, 0)[y].item()
        kd = soft_kl(torch.tensor([s], dtype=torch.float64), torch.tensor([t], dtype=torch.float64), 3.0)
        assert terms["dkd.tckd"].item() + (1 - p_y) * terms["dkd.nckd"].item() == pytest.approx(kd.item(), rel=1e-12)


def test_dist_matches_the_paper_formula(plugins):
    terms = values(build(plugins, "dist", ce_weight=0.5, beta=2.0, gamma=3.0, tau=2.0).loss(
        out(STUDENT), out(TEACHER), targets()))
    assert set(terms) == {"ce", "dist.inter", "dist.intra"}
    assert terms["ce"] == pytest.approx(0.5 * GOLDEN_CE, rel=1e-12)
    assert terms["dist.inter"] == pytest.approx(2.0 * GOLDEN_INTER, rel=1e-12)
    assert terms["dist.intra"] == pytest.approx(3.0 * GOLDEN_INTRA, rel=1e-12)


def test_logit_std_matches_the_paper_formula(plugins):
    terms = values(build(plugins, "logit-std", ce_weight=0.1, kd_weight=9.0, temperature=2.0).loss(
        out(STUDENT), out(TEACHER), targets()))
    assert set(terms) == {"ce", "kd"}
    assert terms["ce"] == pytest.approx(0.1 * GOLDEN_CE, rel=1e-12)
    assert terms["kd"] == pytest.approx(9.0 * GOLDEN_LOGIT_STD, rel=1e-12)


def test_dkd_standardize_z_scores_both_models(plugins):
    # DKD on standardized logits equals DKD of the z-scored logits computed by hand.
    def z(rows):
        return [[(v - sum(r) / len(r)) / (math.sqrt(sum((x - sum(r) / len(r)) ** 2 for x in r) / (len(r) - 1)) + 1e-7)
                 for v in r] for r in rows]
    on = warm(build(plugins, "dkd", standardize=True, temperature=2.0)).loss(out(STUDENT), out(TEACHER), targets())
    by_hand = warm(build(plugins, "dkd", temperature=2.0)).loss(out(z(STUDENT)), out(z(TEACHER)), targets())
    assert on["dkd.tckd"].item() == pytest.approx(by_hand["dkd.tckd"].item(), rel=1e-9)
    assert on["dkd.nckd"].item() == pytest.approx(by_hand["dkd.nckd"].item(), rel=1e-9)
    assert on["ce"].item() == pytest.approx(GOLDEN_CE, rel=1e-12)  # cross-entropy on raw logits


# ------------------------------------------------------------------ properties
def test_logit_std_ignores_each_samples_logit_scale_and_shift(plugins):
    distiller = build(plugins, "logit-std")
    base = distiller.loss(out(STUDENT), out(TEACHER), targets())["kd"]
    scale = torch.tensor([[3.0], [0.2], [7.0]], dtype=torch.float64)
    shift = torch.tensor([[5.0], [-2.0], [0.0]], dtype=torch.float64)
    moved = torch.tensor(STUDENT, dtype=torch.float64) * scale + shift
    kd = distiller.loss(Outputs(moved, {}), out(TEACHER), targets())["kd"]
    assert kd.item() == pytest.approx(base.item(), rel=1e-6)


def test_kd_terms_vanish_when_student_equals_teacher(plugins):
    dkd = values(warm(build(plugins, "dkd")).loss(out(TEACHER), out(TEACHER), targets()))
    dist = values(build(plugins, "dist").loss(out(TEACHER), out(TEACHER), targets()))
    std = values(build(plugins, "logit-std").loss(out(TEACHER), out(TEACHER), targets()))
    for value in (dkd["dkd.tckd"], dkd["dkd.nckd"], dist["dist.inter"], dist["dist.intra"], std["kd"]):
        assert value == pytest.approx(0.0, abs=1e-6)  # DIST's 1e-8 in the Pearson denominator


def test_dkd_warm_up_scales_the_kd_terms_linearly_with_the_epoch(plugins):
    dkd = build(plugins, "dkd", warmup=20)
    full = values(warm(dkd, 20).loss(out(STUDENT), out(TEACHER), targets()))
    for epoch, factor in ((1, 1 / 20), (5, 5 / 20), (20, 1.0), (35, 1.0)):
        dkd.begin_batch(torch.arange(3), epoch, 40)
        terms = values(dkd.loss(out(STUDENT), out(TEACHER), targets()))
        assert terms["ce"] == pytest.approx(full["ce"], rel=1e-12)
        assert terms["dkd.tckd"] == pytest.approx(factor * full["dkd.tckd"], rel=1e-12)
        assert terms["dkd.nckd"] == pytest.approx(factor * full["dkd.nckd"], rel=1e-12)
    no_warmup = build(plugins, "dkd", warmup=0)
    no_warmup.begin_batch(torch.arange(3), 1, 40)
    assert no_warmup.loss(out(STUDENT), out(TEACHER), targets())["dkd.nckd"].item() == pytest.approx(full["dkd.nckd"])


def test_dkd_without_an_epoch_says_how_to_give_one(plugins):
    with pytest.raises(RuntimeError, match="begin_batch"):
        build(plugins, "dkd").loss(out(STUDENT), out(TEACHER), targets())


@pytest.mark.parametrize("name, params", [
    ("dkd", {}), ("dkd", {"standardize": True}), ("dist", {}), ("dist", {"tau": 4.0}), ("logit-std", {})])
def test_padding_rows_do_not_change_the_loss(plugins, name, params):
    distiller = warm(build(plugins, name, **params))
    clean = values(distiller.loss(out(STUDENT), out(TEACHER), targets()))
    padded_s = [[9.0, -3.0, 0.0, 1.0]] + STUDENT[:2] + [[-50.0, 50.0, 3.0, 3.0]] + STUDENT[2:]
    padded_t = [[0.0, 0.0, 8.0, 1.0]] + TEACHER[:2] + [[1.0, 2.0, 3.0, 4.0]] + TEACHER[2:]
    padded_y = [-100] + TARGETS[:2] + [-100] + TARGETS[2:]
    padded = values(distiller.loss(out(padded_s), out(padded_t), targets(padded_y)))
    assert padded == pytest.approx(clean, rel=1e-12)
    only_padding = values(distiller.loss(out(STUDENT), out(TEACHER), targets([-100] * 3)))
    assert only_padding == {k: 0.0 for k in clean}  # zero, not NaN


# ------------------------------------------------------------------ gradients and stability
@pytest.mark.parametrize("name, params", [
    ("dkd", {"temperature": 2.0}), ("dkd", {"standardize": True}), ("dist", {"tau": 2.0}), ("logit-std", {})])
def test_gradients_pass_gradcheck_and_never_reach_the_teacher(plugins, name, params):
    distiller = warm(build(plugins, name, **params))
    teacher = out(TEACHER, requires_grad=True)

    def total(student_logits):
        return sum(distiller.loss(Outputs(student_logits, {}), teacher, targets()).values())

    student = torch.tensor(STUDENT, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(total, (student,))
    total(student).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.logits.grad is None


def extreme_batch():
    """fp32 logits of magnitude ~1e4, including rows where the target's or the non-targets'
    probability underflows to exactly 0 and a row of equal logits (standard deviation 0)."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(8, 10, generator=g) * 1e4
    t = torch.randn(8, 10, generator=g) * 1e4
    y = torch.randint(0, 10, (8,), generator=g)
    s[0], t[0], y[0] = -1e4, 1e4, 3          # equal logits vs equal logits
    s[1, 3], t[1, 3] = 1e4, -1e4             # student certain of the target, teacher sure it is not
    s[2, 5], t[2, 5], y[2] = -2e4, 2e4, 5
    return s, t, y


@pytest.mark.parametrize("name, params", [
    ("dkd", {}), ("dkd", {"standardize": True}), ("dkd", {"temperature": 1.0}), ("dist", {}), ("dist", {"tau": 4.0}),
    ("logit-std", {})])
def test_extreme_logits_give_finite_loss_and_gradients(plugins, name, params):
    distiller = warm(build(plugins, name, **params))
    s, t, y = extreme_batch()
    s.requires_grad_(True)
    terms = distiller.loss(Outputs(s, {}), Outputs(t, {}), y)
    loss = sum(terms.values())
    assert all(torch.isfinite(v) for v in terms.values()), terms
    loss.backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name, raw, message", [
    ("dkd", {"beta": -1.0}, "beta must be >= 0, got -1.0"),
    ("dkd", {"temperature": 0}, "temperature must be positive, got 0"),
    ("dkd", {"warmup": -2}, "warmup must be >= 0 epochs"),
    ("dist", {"tau": -1}, "tau must be positive, got -1"),
    ("dist", {"gamma": -0.5}, "gamma must be >= 0, got -0.5"),
    ("logit-std", {"kd_weight": -9}, "kd_weight must be >= 0, got -9"),
])
def test_bad_parameters_are_rejected_with_the_value(plugins, name, raw, message):
    with pytest.raises(ConfigError, match=message):
        plugins.build("distiller", name, raw)


# ------------------------------------------------------------------ a real run
RUN = textwrap.dedent("""
    name: response-kd
    seeds: [0]
    tasks: [digits]
    pairs:
      - teacher: {name: mlp, hidden: [64]}
        student: {name: mlp, hidden: [16]}
    recipes:
      dkd: [{distill: {name: dkd, warmup: 2}}]
      dist: [{distill: dist}]
    training: {epochs: 2, batch_size: 128}
    measure: {latency_repeats: 2, latency_warmup: 1, latency_batch_sizes: [1]}
""")


def test_a_tiny_experiment_trains_with_each_method_and_records_every_term(plugins, tiny_yaml, tmp_path,
                                                                        isolated_cache):
    experiment = load_experiment(tiny_yaml(RUN), plugins)
    with Store(tmp_path / "r.db") as store:
        summary = run_experiment(experiment, store, plugins, isolated_cache, progress=None)
        records = store.records(experiment.name)
    assert summary.exit_code == 0
    students = {r.recipe: r for r in records if r.role == "student"}
    expected = {"dkd": {"loss_ce", "loss_dkd.tckd", "loss_dkd.nckd"},
                "dist": {"loss_ce", "loss_dist.inter", "loss_dist.intra"}}
    for recipe, keys in expected.items():
        history = students[recipe].stages[0]["history"]
        assert len(history) == 2
        for row in history:
            assert keys <= set(row) and all(math.isfinite(row[k]) for k in keys)
        assert students[recipe].metrics["test_accuracy"] > 0.1  # trained, not broken
