"""The hinton loss against values computed by hand, and its gradients."""

from __future__ import annotations

import pytest
import torch

from kdbench.contracts import Outputs

STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 1.0]]
TEACHER = [[2.0, 1.0, 0.0], [0.5, 0.5, 2.0]]
TARGETS = [1, 2]
# Computed with the math module alone from the paper's formula, T = 2, alpha = 0.25:
# ce = (1 - alpha) * mean_i -ln softmax(s_i)[y_i]
# kd = alpha * T^2 * mean_i sum_k p_ik (ln p_ik - ln q_ik), p = softmax(t / T), q = softmax(s / T)
GOLDEN_CE = 0.326990530707122
GOLDEN_KD = 0.05988707091680384


def hinton(plugins, **params):
    return plugins.build("distiller", "hinton", params)


def outputs(values, requires_grad=False):
    return Outputs(torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad), {})


def test_hinton_matches_hand_computed_values(plugins):
    terms = hinton(plugins, temperature=2, alpha=0.25).loss(
        outputs(STUDENT), outputs(TEACHER), torch.tensor(TARGETS))
    assert set(terms) == {"ce", "kd"}
    assert terms["ce"].item() == pytest.approx(GOLDEN_CE, rel=1e-12)
    assert terms["kd"].item() == pytest.approx(GOLDEN_KD, rel=1e-12)


def test_soft_term_vanishes_when_student_equals_teacher(plugins):
    terms = hinton(plugins).loss(outputs(TEACHER), outputs(TEACHER), torch.tensor(TARGETS))
    assert terms["kd"].item() == pytest.approx(0.0, abs=1e-12)


def test_alpha_zero_is_plain_cross_entropy(plugins):
    terms = hinton(plugins, alpha=0.0).loss(outputs(STUDENT), outputs(TEACHER), torch.tensor(TARGETS))
    expected = torch.nn.functional.cross_entropy(torch.tensor(STUDENT, dtype=torch.float64),
                                                 torch.tensor(TARGETS))
    assert terms["ce"].item() == pytest.approx(expected.item())
    assert terms["kd"].item() == 0.0


def test_gradients_pass_gradcheck_and_match_the_analytic_form(plugins):
    distiller = hinton(plugins, temperature=3, alpha=0.7)
    teacher = outputs(TEACHER)
    targets = torch.tensor(TARGETS)

    def total(student_logits):
        return sum(distiller.loss(Outputs(student_logits, {}), teacher, targets).values())

    student = torch.tensor(STUDENT, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(total, (student,))
    # d(T^2 KL)/ds = T (q - p) / batch: the soft term's gradient scale is independent of T^2.
    soft = hinton(plugins, temperature=3, alpha=1.0)
    s = torch.tensor(STUDENT, dtype=torch.float64, requires_grad=True)
    soft.loss(Outputs(s, {}), outputs(TEACHER), targets)["kd"].backward()
    p = torch.softmax(torch.tensor(TEACHER, dtype=torch.float64) / 3, -1)
    q = torch.softmax(torch.tensor(STUDENT, dtype=torch.float64) / 3, -1)
    assert torch.allclose(s.grad, 3 * (q - p) / 2)
