"""A top-k cache of teacher log-probabilities, for token-level distillation from a frozen teacher.

A language-model teacher's logits cost one forward pass per token and per epoch of every student
cell; stored dense they cost ``4 V`` bytes per token (196 kB for V = 49,152). We keep, once per
(teacher, task, split), the k largest log-probabilities of every token (float16), their ids (int32)
and the log of the mass left to the other ``V - k`` tokens (float32): ``6 k + 4`` bytes per token.
The dense distribution is rebuilt with the top k exact and the remaining mass spread uniformly
over the tail: the sparse top-k teacher caches of LLM distillation, whose truncation bias
Anshumann et al. analyse ("Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs",
ACL 2025); the uniform tail keeps the tail's total mass, which plain truncation drops. The tail
mass is computed from the full float32 ``log_softmax`` (a logsumexp over the tail, not
``log(1 - sum)``), so it keeps its precision when the top k hold almost all the mass.

How much k keeps, SmolLM2-135M-Instruct (Q4_1, dequantized) on 512 tokens of a Shakespeare play:
mean tail mass r and mean KL(teacher || rebuilt) per token are 0.23 / 0.91 nats at k = 32,
0.17 / 0.61 at k = 64, 0.13 / 0.40 at k = 128, 0.09 / 0.25 at k = 256, 0.036 / 0.073 at k = 1024.
A small teacher's next-token distribution is broad: the tail carries real mass at k = 64.

Precision (measured by ``tests/test_logit_cache.py``): values are rounded to float16 (relative
error at most 2^-11) and each rebuilt row is renormalized (a shift of the order of that rounding),
so with k = V the rebuilt row matches the teacher's ``log_softmax`` to ``2^-11 (|log p| + 1)`` per
entry. Observed on random models with V = 50: at most ``4.4e-4 (|log p| + 1)`` (4.0e-3 absolute at
log p = -15), and ``|logsumexp| < 3e-7`` per row.

Which distillers stay exact when fed ``log_probs(...)`` in place of the teacher's logits.
Every loss in ``kdbench_plugins.distill.token`` and ``hinton`` (``common.soft_kl``) applies
``log_softmax(t / T)`` to the teacher logits ``t``; ``log_softmax`` ignores a per-row shift, so
at T = 1 they see the rebuilt distribution ``p~``: the teacher's ``p`` on the top k, a uniform
tail holding the tail mass ``r``.

- At T = 1 the top-k probabilities are exact; every loss is approximate only through the tail.
  ``forward-kl`` and ``hinton``: the gradient on the student logits is ``q - p~`` instead of
  ``q - p``; the two differ on the tail only, by at most ``2 r`` in L1. ``tvd`` moves by at most
  ``TV(p, p~) <= r``. ``reverse-kl``, ``jsd``, ``skew-kl`` and ``skew-reverse-kl`` weigh the
  teacher's tail log-probabilities by the student's mass; the uniform tail overstates the
  rarest tokens, so the penalty for student mass on them is weaker than the teacher's: approximate
  in the tail, with no bound in terms of ``r`` alone.
- At T != 1, ``softmax(log p~ / T)`` is exact only up to a common factor on the top k: the ratios
  among the top k are the teacher's, but the tempered tail mass ``(V - k)^(1 - 1/T) r^(1/T)``
  exceeds the teacher's ``sum p_i^(1/T)`` for T > 1 (Jensen; less for T < 1), so the tempered top-k
  probabilities come out smaller. The error vanishes as ``r -> 0``.
- Not valid with a cache (k < V): anything that reads the raw logit values rather than their
  softmax: ``logit-std`` and ``dkd`` with ``standardize: true`` z-score the row, and a constant
  tail changes its mean and spread. ``dkd`` (without standardize) and ``dist`` use softmaxes and
  fall under the T != 1 rule above.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import digest
from .teachers import atomic_write, load_or_create

FORMAT = 1  # bump when the stored layout changes: it is part of the cache key


@dataclasses.dataclass
class TopKLogits:
    """Per token: the k largest teacher log-probabilities, their token ids, and log(1 - their total
    probability), i.e. the log of the mass left to the other V - k tokens."""

    values: torch.Tensor  # (N, T, k) float16 log-probabilities, sorted descending
    indices: torch.Tensor  # (N, T, k) int32 token ids
    log_rest: torch.Tensor  # (N, T) float32; -inf when the top k hold all the mass
    vocab_size: int
    classifier: bool = False  # the model gave (B, V): stored with T = 1, given back as (B, V)

    def __post_init__(self):
        v, i, r = self.values, self.indices, self.log_rest
        if v.dtype != torch.float16 or i.dtype != torch.int32 or r.dtype != torch.float32:
            raise ValueError(f"expected values float16, indices int32, log_rest float32; got {v.dtype}, "
                             f"{i.dtype}, {r.dtype}")
        if v.dim() != 3 or i.shape != v.shape or r.shape != v.shape[:2]:
            raise ValueError(f"expected values and indices (N, T, k) and log_rest (N, T); got "
                             f"{tuple(v.shape)}, {tuple(i.shape)}, {tuple(r.shape)}")
        if not 1 <= v.shape[2] <= self.vocab_size:
            raise ValueError(f"k = {v.shape[2]} must be in [1, vocab_size = {self.vocab_size}]")
        if i.numel() and not (0 <= int(i.min()) and int(i.max()) < self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size})")
        if self.classifier and v.shape[1] != 1:
            raise ValueError(f"a classifier cache has T = 1, got T = {v.shape[1]}")

    @property
    def k(self) -> int:
        return self.values.shape[2]

    @classmethod
    @torch.no_grad()
    def compute(cls, model: nn.Module, inputs: torch.Tensor, k: int, batch_size: int = 16,
                device: str | torch.device = "cpu") -> TopKLogits:
        """Run ``model`` (already on ``device``) over ``inputs`` in eval mode and keep the top k."""
        if k < 1 or batch_size < 1:
            raise ValueError(f"k and batch_size must be >= 1, got k = {k}, batch_size = {batch_size}")
        was_training = model.training
        model.eval()
        parts = []
        try:
            for start in range(0, len(inputs), batch_size):
                out = model(inputs[start:start + batch_size].to(device))
                parts.append(topk_batch(getattr(out, "logits", out), k))  # HF models return .logits
        finally:
            model.train(was_training)
        if not parts:
            raise ValueError("inputs is empty: nothing to cache")
        vocab, classifier = parts[0][3], parts[0][4]
        values, indices, log_rest = (torch.cat([p[j] for p in parts]) for j in range(3))
        return cls(values, indices, log_rest, vocab, classifier)

    def log_probs(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` as dense float32 log-probabilities, (B, T, V) or (B, V) for a classifier:
        the top k as stored, the tail sharing the remaining mass uniformly, renormalized (it
        only absorbs the float16 rounding)."""
        index = torch.as_tensor(index)
        if index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"index must be a 1-D integer tensor of example ids, got {index.dtype} "
                             f"of shape {tuple(index.shape)}")
        values, ids = self.values[index].float(), self.indices[index].long()
        log_rest = self.log_rest[index]
        tail = self.vocab_size - self.k
        fill = log_rest - math.log(tail) if tail else torch.full_like(log_rest, float("-inf"))
        # The row's logsumexp from its k values and its tail mass: no second (B, T, V) tensor.
        total = torch.logaddexp(torch.logsumexp(values, dim=-1), log_rest)
        dense = (fill - total)[..., None].expand(*log_rest.shape, self.vocab_size).clone()
        dense.scatter_(-1, ids, values - total[..., None])
        return dense[:, 0] if self.classifier else dense

    def bytes_per_token(self) -> float:
        return float(self.k * (2 + 4) + 4)

    def save(self, path) -> None:
        """Write atomically: a temporary file in the same folder, then a rename. (``cached_topk``
        also writes a hash beside it; a file saved here alone has none.)"""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, self._write)

    def _write(self, file) -> None:
        torch.save({"format": FORMAT, "values": self.values, "indices": self.indices,
                    "log_rest": self.log_rest, "vocab_size": self.vocab_size,
                    "classifier": self.classifier}, file)

    @classmethod
    def load(cls, path) -> TopKLogits:
        """Read a file written by ``save`` (``path`` may also be an open binary file)."""
        fix = "delete it and the cache will be recomputed"
        file, path = path, (path.name if hasattr(path, "read") else path)  # for the messages
        try:
            saved = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated zip, bad pickle: torch raises several kinds
            raise ValueError(f"teacher-logit cache {path} is corrupt or truncated ({err}); {fix}") from err
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise ValueError(f"teacher-logit cache {path} is not a format-{FORMAT} top-k cache; {fix}")
        try:
            return cls(saved["values"], saved["indices"], saved["log_rest"], int(saved["vocab_size"]),
                       bool(saved["classifier"]))
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"teacher-logit cache {path} is invalid ({err}); {fix}") from err


def topk_batch(logits: torch.Tensor, k: int):
    """Top-k float16 log-probabilities, int32 ids and float32 tail log-mass of one batch."""
    if logits.dim() not in (2, 3):
        raise ValueError(f"the model must give logits (B, T, V) or (B, V), got shape {tuple(logits.shape)}")
    classifier = logits.dim() == 2
    if classifier:
        logits = logits[:, None]
    vocab = logits.shape[-1]
    if k > vocab:
        raise ValueError(f"k = {k} exceeds the vocabulary size {vocab}; use k <= {vocab}")
    log_p = F.log_softmax(logits.float(), dim=-1)
    values, ids = log_p.topk(k, dim=-1)  # sorted descending
    # The tail mass as a logsumexp over the tail: exact even when it is far below float eps.
    log_rest = torch.logsumexp(log_p.scatter(-1, ids, float("-inf")), dim=-1)
    return values.half().cpu(), ids.int().cpu(), log_rest.cpu(), vocab, classifier


def cache_key(teacher_key: str, task_spec: dict, split: str, k: int) -> str:
    """A stable hash of what determines the cached logits (and of the storage format)."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return digest({"teacher": teacher_key, "task": task_spec, "split": split, "k": k,
                   "format": FORMAT})


def cached_topk(path, compute: Callable[[], TopKLogits]) -> tuple[TopKLogits, bool]:
    """Load ``path`` if it holds a valid cache, else ``compute()``, save and return it.

    Returns ``(logits, from_cache)``. The file is written atomically with its sha256 beside it
    (``<name>.sha256``) and checked against it on every load; a file that is truncated, corrupt
    (a full disk, a crash before the data reached the disk) or without a hash is deleted and
    recomputed, with a warning. A per-file lock (``<name>.lock``) makes processes that need the
    same outputs at once compute them once: the others wait and load the file.
    """
    return load_or_create(Path(path), TopKLogits.load, compute, TopKLogits._write,
                          "teacher outputs", "recomputing them")


# ---------------------------------------------------------------- exact logits (classification)
#: Dense logits are cached exactly when they take at most this many bytes (a classification
#: task: 50,000 CIFAR images x 100 classes is 20 MB); larger outputs need a top-k cache.
EXACT_LIMIT_BYTES = 512 * 2 ** 20


def exact_key(teacher_key: str, task_spec: dict, split: str) -> str:
    return digest({"teacher": teacher_key, "task": task_spec, "split": split, "exact": True,
                   "format": FORMAT})


@torch.no_grad()
def compute_logits(model: nn.Module, inputs: torch.Tensor, batch_size: int = 256,
                   device: str = "cpu") -> torch.Tensor:
    """The model's raw float32 outputs on ``inputs``, in eval mode (as during distillation)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(inputs[i:i + batch_size].to(device)).float().cpu()
                          for i in range(0, len(inputs), batch_size)])
    finally:
        model.train(was_training)


def cached_logits(path, compute: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """Like ``cached_topk`` for a dense logits tensor: verified, locked, written atomically."""
    return load_or_create(Path(path), lambda f: torch.load(f, map_location="cpu", weights_only=True),
                          compute, lambda value, tmp: torch.save(value, tmp),
                          "teacher logits", "recomputing them")
