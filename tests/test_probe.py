"""Embedding probes: feature-point embeddings, linear-probe accuracy, cosine agreement, linear CKA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kdbench.probe import cosine_agreement, embeddings, linear_cka, probe_accuracy


def blobs(n_per_class: int, classes: int, dim: int, spread: float, seed: int):
    """Gaussian blobs around random centres ``spread`` apart (in units of the noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * spread
    y = np.repeat(np.arange(classes), n_per_class)
    x = centres[y] + rng.normal(size=(len(y), dim))
    order = rng.permutation(len(y))
    return x[order], y[order]


# ---------------------------------------------------------------- embeddings
class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 3)
        self.seq = nn.Linear(4, 6)  # applied per position of a (B, T, 4) input
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        if x.dim() == 3:  # a token sequence: the logits come from the last position
            return self.seq(x)[:, -1, :2]
        return self.head(self.drop(self.embed(x)))


def test_embeddings_are_the_point_outputs_in_eval_mode_batched():
    torch.manual_seed(0)
    model = Tower().train()
    x = torch.randn(10, 4)
    got = embeddings(model, "embed", x, batch_size=3)  # batches of 3, 3, 3, 1
    expected = x @ model.embed.weight.T + model.embed.bias
    torch.testing.assert_close(got, expected.detach())
    assert model.training  # the caller's mode is restored


def test_embeddings_average_a_sequence_over_its_positions():
    torch.manual_seed(0)
    model = Tower()
    x = torch.randn(5, 7, 4)
    got = embeddings(model, "seq", x, batch_size=2)
    expected = (x @ model.seq.weight.T + model.seq.bias).mean(dim=1)
    torch.testing.assert_close(got, expected.detach())
    assert got.shape == (5, 6)


def test_embeddings_reject_a_point_that_is_not_an_embedding():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match=r"feature point '0' gives \(2, 2, 3, 3\)"):
        embeddings(model, "0", torch.randn(2, 1, 5, 5))


# ---------------------------------------------------------------- probe accuracy
def test_probe_separates_separable_classes_perfectly():
    x, y = blobs(60, 3, 8, spread=20.0, seed=0)
    assert probe_accuracy(x[:120], y[:120], x[120:], y[120:]) == 1.0


def test_probe_on_shuffled_labels_is_near_chance():
    x, y = blobs(100, 4, 16, spread=20.0, seed=1)
    y = np.random.default_rng(2).permutation(y)  # labels no longer depend on the features
    acc = probe_accuracy(torch.tensor(x[:300]), torch.tensor(y[:300]), torch.tensor(x[300:]),
                         torch.tensor(y[300:]))
    # 100 test rows, chance 0.25: a binomial 99.9% band is about [0.12, 0.40].
    assert 0.1 < acc < 0.42


def test_probe_is_invariant_to_feature_scales_thanks_to_standardization():
    x, y = blobs(50, 2, 5, spread=1.5, seed=3)
    scaled = x * np.array([1e-4, 1.0, 1e3, 5.0, 1e-2])
    assert probe_accuracy(x[:60], y[:60], x[60:], y[60:]) == pytest.approx(
        probe_accuracy(scaled[:60], y[:60], scaled[60:], y[60:]), abs=0.03)


def test_probe_rejects_mismatched_inputs():
    x, y = blobs(10, 2, 4, spread=5.0, seed=0)
    with pytest.raises(ValueError, match="one label per example"):
        probe_accuracy(x, y[:-1], x, y)
    with pytest.raises(ValueError, match="same feature point"):
        probe_accuracy(x, y, x[:, :3], y)
    with pytest.raises(ValueError, match="at least two classes"):
        probe_accuracy(x, np.zeros(len(x)), x, y)


# ---------------------------------------------------------------- cosine agreement
def test_cosine_agreement_known_values():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(20, 6))
    assert cosine_agreement(s, s) == pytest.approx(1.0)
    assert cosine_agreement(s, 3.0 * s) == pytest.approx(1.0)  # length does not matter
    assert cosine_agreement(s, -s) == pytest.approx(-1.0)
    rows = np.array([[1.0, 0.0], [1.0, 1.0]])
    other = np.array([[0.0, 2.0], [1.0, 0.0]])
    assert cosine_agreement(rows, other) == pytest.approx((0.0 + 1 / np.sqrt(2)) / 2)
    assert cosine_agreement(torch.tensor(s), torch.tensor(s)) == pytest.approx(1.0)


def test_cosine_agreement_is_none_across_widths_and_rejects_other_rows():
    assert cosine_agreement(np.ones((4, 3)), np.ones((4, 5))) is None
    with pytest.raises(ValueError, match="4 and 5 rows"):
        cosine_agreement(np.ones((4, 3)), np.ones((5, 3)))


# ---------------------------------------------------------------- linear CKA
def cka_by_hsic(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.'s definition through centred Gram matrices: HSIC(K, L) / sqrt(HSIC(K,
    K) HSIC(L, L)) with K = X X^T, L = Y Y^T and H = I - 11^T / n (an independent formula)."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float((k * l_).sum() / np.sqrt((k * k).sum() * (l_ * l_).sum()))


def test_cka_matches_the_gram_matrix_definition():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 7))
    y = x @ rng.normal(size=(7, 3)) + 0.5 * rng.normal(size=(40, 3))
    assert linear_cka(x, y) == pytest.approx(cka_by_hsic(x, y), rel=1e-9)


def test_cka_is_one_for_identical_and_invariant_to_rotation_scaling_and_shift():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 8))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))  # a random orthogonal matrix
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 7.5 * x @ q + 3.0) == pytest.approx(1.0)
    y = np.tanh(x[:, :4])
    assert linear_cka(x @ q * 0.01, y) == pytest.approx(linear_cka(x, y), rel=1e-9)


def test_cka_is_low_for_independent_noise_and_lower_as_noise_grows():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 10))
    independent = rng.normal(size=(200, 10))
    assert linear_cka(x, independent) < 0.15
    noisy = [linear_cka(x, x + s * rng.normal(size=x.shape)) for s in (0.1, 1.0, 3.0)]
    assert noisy[0] > noisy[1] > noisy[2] > linear_cka(x, independent)


def test_cka_of_a_constant_representation_is_nan_and_rows_must_match():
    with pytest.warns(UserWarning, match="constant"):
        assert np.isnan(linear_cka(np.ones((5, 3)), np.arange(10.0).reshape(5, 2)))
    with pytest.raises(ValueError, match="5 and 6 rows"):
        linear_cka(np.ones((5, 3)), np.ones((6, 3)))
