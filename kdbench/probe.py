"""Embedding quality: linear probes and agreement between two models' representations.

For embedding models (sentence encoders and the students distilled from them) the task
metric of a classifier head says little about the embedding itself. These pure functions
measure it:

- ``embeddings``: a model's outputs at a feature point, one row per input;
- ``probe_accuracy``: the test accuracy of a linear classifier fitted on frozen training
  embeddings (a linear probe: Alain and Bengio, "Understanding intermediate layers using
  linear classifier probes", 2016; the standard evaluation of sentence embeddings in SentEval,
  Conneau and Kiela, LREC 2018);
- ``cosine_agreement``: the mean cosine similarity of matching rows, where the student's
  embedding lives in the teacher's space (same width);
- ``linear_cka``: linear centered kernel alignment (Kornblith, Norouzi, Lee and Hinton,
  "Similarity of Neural Network Representations Revisited", ICML 2019), which compares
  representations of any widths, invariant to rotations and isotropic scaling.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from .training import capture_features


@torch.no_grad()
def embeddings(model: nn.Module, point: str, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The outputs of module ``point`` for ``inputs`` in eval mode, ``(N, D)`` float on the CPU.

    A ``(B, T, D)`` output (a token sequence) is averaged over T; any other shape than 2-D or
    3-D is an error. The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    parts = []
    try:
        for start in range(0, len(inputs), batch_size):
            with capture_features(model, [point]) as feats:
                model(inputs[start:start + batch_size])
            out = feats[point]
            if not isinstance(out, torch.Tensor) or out.dim() not in (2, 3):
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"feature point '{point}' gives {shape}; an embedding must be (B, D), "
                                 "or (B, T, D) to be averaged over T")
            parts.append((out.mean(dim=1) if out.dim() == 3 else out).detach().float().cpu())
    finally:
        model.train(was_training)
    if not parts:
        raise ValueError("embeddings of an empty input: give at least one example")
    return torch.cat(parts)


def _rows(x, name: str) -> np.ndarray:
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (examples, features) array, got shape {a.shape}")
    return a


def _labels(y, n: int, name: str) -> np.ndarray:
    a = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if a.shape != (n,):
        raise ValueError(f"{name} must hold one label per example ({n}), got shape {a.shape}")
    return a


def probe_accuracy(train_x, train_y, test_x, test_y, seed: int = 0) -> float:
    """Accuracy on the test rows of a linear probe fitted on the training rows.

    Features are standardized with the training rows' mean and standard deviation, then a
    multinomial logistic regression (scikit-learn's ``LogisticRegression``, L2 penalty C = 1,
    lbfgs, ``random_state=seed``) is fitted. ``max_iter`` is generous (5,000) so that the
    optimizer converges on standardized embeddings; a non-converged fit still warns.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    xtr, xte = _rows(train_x, "train_x"), _rows(test_x, "test_x")
    ytr, yte = _labels(train_y, len(xtr), "train_y"), _labels(test_y, len(xte), "test_y")
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"train_x has {xtr.shape[1]} features and test_x {xte.shape[1]}; they must "
                         "come from the same feature point")
    if len(np.unique(ytr)) < 2:
        raise ValueError("probe_accuracy needs at least two classes among the training labels")
    scaler = StandardScaler().fit(xtr)
    probe = LogisticRegression(max_iter=5000, random_state=seed)
    probe.fit(scaler.transform(xtr), ytr)
    return float((probe.predict(scaler.transform(xte)) == yte).mean())


def cosine_agreement(student, teacher) -> float | None:
    """Mean cosine similarity between row i of ``student`` and row i of ``teacher``; None when
    their widths differ (the two embeddings live in different spaces: use ``linear_cka``).
    A zero row has cosine 0 with anything."""
    s, t = _rows(student, "student"), _rows(teacher, "teacher")
    if len(s) != len(t):
        raise ValueError(f"student and teacher embeddings hold {len(s)} and {len(t)} rows; they must "
                         "embed the same inputs")
    if s.shape[1] != t.shape[1]:
        return None
    norms = np.linalg.norm(s, axis=1) * np.linalg.norm(t, axis=1)
    dots = (s * t).sum(axis=1)
    cos = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return float(cos.mean())


def linear_cka(x, y) -> float:
    """Linear CKA of two representations of the same n examples, ``(n, d1)`` and ``(n, d2)``.

    ``||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)`` with column-centred X_c, Y_c
    (Kornblith et al. 2019, eq. for the linear kernel): 1 for representations equal up to a
    rotation and an isotropic scaling (and a shift), near 0 for independent ones. NaN when
    either representation is constant (the index is undefined).
    """
    a, b = _rows(x, "x"), _rows(y, "y")
    if len(a) != len(b):
        raise ValueError(f"x and y hold {len(a)} and {len(b)} rows; they must represent the same examples")
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    # Rescaling leaves CKA unchanged and keeps the fourth powers below from overflowing.
    a = a / max(np.abs(a).max(), np.finfo(float).tiny)
    b = b / max(np.abs(b).max(), np.finfo(float).tiny)
    denominator = np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)
    if denominator == 0:
        warnings.warn("linear_cka: a constant representation has no CKA; returning nan", stacklevel=2)
        return float("nan")
    return float(np.linalg.norm(b.T @ a) ** 2 / denominator)
