"""The one training loop: plain training, distillation and fine-tuning all run through ``fit``."""

from __future__ import annotations

import contextlib
import copy
import time
from collections import defaultdict
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .config import Training
from .contracts import Distiller, Outputs, Task


@contextlib.contextmanager
def capture_features(model: nn.Module, points: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of the named modules during forward passes (forward hooks)."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for point in points:
        module = model.get_submodule(point)
        handles.append(module.register_forward_hook(
            lambda _m, _inp, out, point=point: store.__setitem__(point, out)))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits for ``inputs`` in eval mode, batched."""
    model.eval()
    return torch.cat([model(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])


def make_optimizer(params, training: Training) -> torch.optim.Optimizer:
    if training.optimizer == "sgd":
        return torch.optim.SGD(params, lr=training.lr, momentum=training.momentum,
                               weight_decay=training.weight_decay)
    cls = torch.optim.AdamW if training.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=training.lr, weight_decay=training.weight_decay)


class Teacher:
    """A frozen teacher and the feature points a distiller may read."""

    def __init__(self, model: nn.Module, feature_points: list[str]):
        self.model = model.eval()
        self.feature_points = feature_points
        for p in self.model.parameters():
            p.requires_grad_(False)


def fit(model: nn.Module, train: TensorDataset, val: TensorDataset, task: Task,
        training: Training, seed: int, *, distiller: Distiller | None = None,
        teacher: Teacher | None = None, student_points: list[str] | None = None,
        extra_modules: list[nn.Module] | None = None) -> list[dict]:
    """Train ``model`` in place; return the per-epoch history.

    With a distiller the loss is the sum of its named terms; without one it is cross-entropy.
    With ``checkpoint: best`` the weights of the epoch with the best validation metric are
    restored at the end (the validation split chooses, the test split only reports).
    """
    extra = nn.ModuleList(extra_modules or [])
    params = [p for p in list(model.parameters()) + list(extra.parameters()) if p.requires_grad]
    optimizer = make_optimizer(params, training)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(training.epochs, 1))
                 if training.schedule == "cosine" else None)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=training.batch_size, shuffle=True, generator=generator)
    want_features = bool(distiller and distiller.needs_features)
    s_points = student_points if want_features else []
    t_points = teacher.feature_points if (want_features and teacher) else []
    val_x, val_y = val.tensors

    history: list[dict] = []
    best_score, best_state, best_epoch = None, None, None
    for epoch in range(1, training.epochs + 1):
        start = time.perf_counter()
        model.train()
        extra.train()
        sums: dict[str, float] = defaultdict(float)
        seen = 0
        for x, y in loader:
            with capture_features(model, s_points) as s_feats:
                s_logits = model(x)
            if distiller is not None:
                with torch.no_grad(), capture_features(teacher.model, t_points) as t_feats:
                    t_logits = teacher.model(x)
                terms = distiller.loss(Outputs(s_logits, s_feats), Outputs(t_logits, dict(t_feats)), y)
            else:
                terms = {"ce": F.cross_entropy(s_logits, y)}
            loss = sum(terms.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at epoch {epoch}: "
                                         + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for key, value in terms.items():
                sums[key] += value.item() * len(x)
            sums["loss"] += loss.item() * len(x)
            seen += len(x)
        if scheduler is not None:
            scheduler.step()
        score = task.score(predict(model, val_x), val_y)
        row = {"epoch": epoch, f"val_{task.metric}": score,
               **{f"loss_{k}" if k != "loss" else k: v / seen for k, v in sums.items()},
               "seconds": time.perf_counter() - start}
        history.append(row)
        improved = best_score is None or (score > best_score if task.higher_is_better else score < best_score)
        if training.checkpoint == "best" and improved:
            best_score, best_epoch = score, epoch
            best_state = copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
        history[best_epoch - 1]["chosen"] = True
    return history
