"""The one training loop: plain training, distillation and fine-tuning all run through ``fit``."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import operator
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .config import Training
from .contracts import Distiller, Outputs, Task, TaskData


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
def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = 512,
            device: str | torch.device = "cpu") -> torch.Tensor:
    """Outputs for ``inputs`` in eval mode, batched, returned on the CPU.

    Batches are capped so that one batch's output stays under ~256 MB: a language model's
    logits over a 49,152-token vocabulary take 25 MB per 128-token window.
    """
    model.eval()
    if len(inputs) == 0:
        return model(inputs.to(device)).cpu()
    first = model(inputs[:1].to(device)).cpu()
    per_example = max(first.numel() * first.element_size(), 1)
    batch_size = max(1, min(batch_size, (256 << 20) // per_example))
    out = [first] + [model(inputs[i:i + batch_size].to(device)).cpu()
                     for i in range(1, len(inputs), batch_size)]
    return torch.cat(out)


def rows(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) logits and (N,) targets: for sequence tasks every position is a row."""
    if logits.dim() == 2 and targets.dim() == 1:
        return logits, targets  # already rows (a call per step saved)
    return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)


def make_optimizer(params, training: Training) -> torch.optim.Optimizer:
    if training.optimizer == "sgd":
        return torch.optim.SGD(params, lr=training.lr, momentum=training.momentum,
                               nesterov=training.nesterov, weight_decay=training.weight_decay)
    cls = torch.optim.AdamW if training.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=training.lr, weight_decay=training.weight_decay)


def lr_factor(training: Training, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base lr at a given optimizer step (warm-up, then the schedule)."""
    epoch = step / steps_per_epoch
    if training.warmup_epochs and epoch < training.warmup_epochs:
        return (step + 1) / (training.warmup_epochs * steps_per_epoch)
    if training.schedule == "cosine":
        span = max(training.epochs - training.warmup_epochs, 1e-8)
        return 0.5 * (1 + math.cos(math.pi * min((epoch - training.warmup_epochs) / span, 1.0)))
    if training.schedule == "multistep":
        return training.gamma ** sum(epoch >= m for m in training.milestones)
    return 1.0


def non_finite_message(terms: dict[str, torch.Tensor], loss: torch.Tensor, epoch: int, step: int,
                       global_step: int, distilling: bool) -> str:
    """Where training diverged and which loss term(s) did it: enough to act on without a rerun."""
    values = {k: float(v.detach().float().sum()) for k, v in terms.items()}
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if len(bad) == 1:
        (name, value), = bad.items()
        what = f"term '{name}' is {value}"
    elif bad:
        what = "terms " + ", ".join(f"'{k}' ({v})" for k, v in bad.items()) + " are non-finite"
    else:
        what = f"every term is finite but their sum is {float(loss)}"
    listed = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
    fix = "check the distiller's inputs" if distilling else "check the model's outputs and the data"
    return (f"non-finite loss at epoch {epoch}, step {step} (global step {global_step}): {what} "
            f"({listed}); lower the learning rate or {fix}")


class Tapped:
    """A model and the points (module paths) where distillers may read it."""

    def __init__(self, model: nn.Module, feature_points: list[str], attention_points: list[str] = ()):
        self.model = model
        self.feature_points = list(feature_points)
        self.attention_points = list(attention_points)


class Teacher(Tapped):
    """A frozen teacher: eval mode, no gradients."""

    def __init__(self, model: nn.Module, feature_points: list[str], attention_points: list[str] = ()):
        super().__init__(model.eval(), feature_points, attention_points)
        for p in self.model.parameters():
            p.requires_grad_(False)


PRECISIONS = ("fp32", "bf16")


def mixed_precision(device: str | torch.device, precision: str):
    """bf16 autocast for the forward passes and losses of training (weights, gradients and
    optimizer state stay fp32; autocast keeps softmax, log-softmax and the losses in fp32).
    No loss scaling: bf16 has fp32's exponent range."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def warm_up() -> None:
    """Pay the one-off costs of training in this process now: torch's optimizers import
    ``torch._dynamo`` at their first use (about 2 s), which would otherwise be counted in the
    training time of whichever cell came first."""
    import torch._dynamo  # noqa: F401


def epoch_batches(n: int, batch_size: int) -> int:
    """Optimizer steps per epoch (see ``shuffled_batches``)."""
    return n // batch_size + (n % batch_size > 1)


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """One epoch's batches of training indices: a permutation drawn from ``generator``, cut in
    ``batch_size`` pieces. Indices rather than examples, so that distillers with memory banks
    (CRD) know which examples they see. A trailing batch of one breaks batch norm in training
    mode and relation losses (no pairs): that single example sits the epoch out rather than
    fail the cell.

    Batches and random draws are exactly those of the shuffling ``DataLoader`` that earlier
    versions used (one int64 for its worker seed, the permutation, and the one its sampler
    draws after the last index), so every stored result stays reproducible; without the
    loader's cost (it collated each batch from ``batch_size`` zero-dimensional tensors)."""
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    order = torch.randperm(n, generator=generator)
    torch.randperm(n, generator=generator)
    cut = n - 1 if n % batch_size == 1 else n
    return iter(order[:cut].split(batch_size))


def fit(model: nn.Module, data: TaskData, task: Task, training: Training, seed: int, *,
        distiller: Distiller | None = None, teacher: Teacher | None = None,
        student: Tapped | None = None, extra_modules: list[nn.Module] | None = None,
        device: str = "cpu", teacher_outputs: Callable[[torch.Tensor], torch.Tensor] | None = None,
        on_epoch: Callable[[dict], None] | None = None, precision: str = "fp32") -> list[dict]:
    """Train ``model`` in place; return the per-epoch history.

    Without a distiller the loss is cross-entropy (with the configured label smoothing);
    with one it is the sum of the distiller's named terms. Logits and targets reach the
    loss as rows (N, C) and (N,). With ``checkpoint: best`` the weights of the epoch with the
    best validation metric are restored at the end: validation chooses, the test metric is
    recorded per epoch for reporting only. ``student`` names the model's tap points for
    distillers that read features. ``teacher_outputs`` maps the indices of a batch of training
    examples to the teacher's (cached) outputs, replacing the teacher's forward pass; only for
    distillers that read no features and data without random augmentation.
    """
    student = student or Tapped(model, [])
    extra = nn.ModuleList(extra_modules or [])
    model.to(device)
    extra.to(device)
    if teacher is not None:
        teacher.model.to(device)
    params = [p for p in list(model.parameters()) + list(extra.parameters()) if p.requires_grad]
    optimizer = make_optimizer(params, training)
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y = data.train.tensors
    batches = epoch_batches(len(train_x), training.batch_size)
    steps = max(batches, 1)
    # A constant schedule never changes the lr: no scheduler to step (it costs a call per step).
    constant = training.schedule == "constant" and not training.warmup_epochs
    scheduler = None if constant else torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(training, s, steps))
    autocast = mixed_precision(device, precision)
    on_cpu = torch.device(device).type == "cpu"
    s_points, t_points = [], []
    if distiller is not None and distiller.needs_features:
        s_points, t_points = list(student.feature_points), list(teacher.feature_points)
    if distiller is not None and distiller.needs_attention:
        s_points += student.attention_points
        t_points += teacher.attention_points
    better = (lambda a, b: a > b) if task.higher_is_better else (lambda a, b: a < b)

    history: list[dict] = []
    best_score, best_state, best_epoch = None, None, None
    global_step = 0  # optimizer steps so far, over every epoch (1-based, like ``step`` and ``epoch``)
    try:
        for epoch in range(1, training.epochs + 1):
            start = time.perf_counter()
            model.train()
            extra.train()
            sums: dict[str, float] = defaultdict(float)
            seen = 0
            for step, indices in enumerate(shuffled_batches(len(train_x), training.batch_size, generator), start=1):
                global_step += 1
                x, y = train_x[indices], train_y[indices]
                if data.train_transform is not None:
                    x = data.train_transform(x, generator)
                if not on_cpu:
                    x, y = x.to(device), y.to(device)
                with autocast:
                    if s_points:
                        with capture_features(model, s_points) as s_feats:
                            s_logits = model(x)
                    else:
                        s_feats, s_logits = {}, model(x)
                    if distiller is not None:
                        distiller.begin_batch(indices, epoch, training.epochs)
                        if teacher_outputs is not None:
                            t_logits, t_feats = teacher_outputs(indices), {}
                            if not on_cpu:
                                t_logits = t_logits.to(device)
                        else:
                            with torch.no_grad(), capture_features(teacher.model, t_points) as t_feats:
                                t_logits = teacher.model(x)
                        s_rows, targets = rows(s_logits, y)
                        terms = distiller.loss(Outputs(s_rows, s_feats),
                                               Outputs(rows(t_logits, y)[0], dict(t_feats)), targets)
                    else:
                        terms = {"ce": F.cross_entropy(*rows(s_logits, y), ignore_index=-100,
                                                       label_smoothing=training.label_smoothing)}
                loss = functools.reduce(operator.add, terms.values())  # no leading 0 + ...
                value = loss.item()  # logged anyway; a float test costs no extra tensor op
                if not math.isfinite(value):
                    raise FloatingPointError(non_finite_message(terms, loss, epoch, step, global_step,
                                                                distiller is not None))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if training.grad_clip:
                    nn.utils.clip_grad_norm_(params, training.grad_clip)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                n = len(x)
                if len(terms) > 1:
                    for key, term in terms.items():
                        sums[key] += term.item() * n
                else:
                    sums[next(iter(terms))] += value * n
                sums["loss"] += value * n
                seen += n
            row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                   **{f"loss_{k}" if k != "loss" else k: v / max(seen, 1) for k, v in sums.items()}}
            score = None
            for split in ("val", "test"):
                x_eval, y_eval = getattr(data, split).tensors
                value = task.score(predict(model, x_eval, device=device), y_eval)
                row[f"{split}_{task.metric}"] = value
                score = value if split == "val" else score
            row["seconds"] = time.perf_counter() - start
            history.append(row)
            if on_epoch is not None:  # a progress bar
                on_epoch(row)
            if training.checkpoint == "best" and (best_score is None or better(score, best_score)):
                best_score, best_epoch = score, epoch
                best_state = copy.deepcopy(model.state_dict())
    finally:
        model.to("cpu")
        extra.to("cpu")
        if teacher is not None:
            teacher.model.to("cpu").eval()
    if best_state is not None:
        model.load_state_dict(best_state)
        history[best_epoch - 1]["chosen"] = True
    elif history:
        history[-1]["chosen"] = True
    return history


def output_module(model: nn.Module, example: torch.Tensor) -> str | None:
    """The module that produces the logits: the last module with parameters of its own that a
    forward pass over ``example`` calls (a head after a parameter-free pooling or dropout is
    still found; None for a model without parameters)."""
    order: list[str] = []
    handles = [module.register_forward_hook(lambda _m, _i, _o, name=name: order.append(name))
               for name, module in model.named_modules() if next(module.parameters(recurse=False), None) is not None]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return order[-1] if order else None


class UpdateTracker:
    """Which parameters a cell's training ever changed, bit for bit, and whether the module
    that produces the logits (its head) was among them.

    A recipe whose losses never reach the head (an embedding-only distiller with its label and
    logit terms off) leaves it exactly at its initial values; its task metric then means
    nothing, and reports must not rank it on it. Each ``watch`` compares the parameters before
    and after one training call by name; a name a compressor introduced (``weight_orig``)
    counts from the call that first sees it.
    """

    def __init__(self) -> None:
        self.updated: set[str] = set()
        self.names: list[str] = []  # the parameters after the last training call
        self.head: str | None = None
        self.head_params: list[str] = []

    @contextlib.contextmanager
    def watch(self, model: nn.Module, example: torch.Tensor) -> Iterator[None]:
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        yield
        self.names = []
        for name, p in model.named_parameters():
            self.names.append(name)
            if name not in before or not torch.equal(before[name], p.detach()):
                self.updated.add(name)
        self.head = output_module(model, example)
        module = model.get_submodule(self.head) if self.head is not None else None
        self.head_params = ([f"{self.head}.{n}" if self.head else n for n, _ in module.named_parameters(recurse=False)]
                            if module is not None else [])

    def state(self) -> dict:
        """What it has seen so far, as plain data (saved with a cached training prefix)."""
        return {"updated": sorted(self.updated), "names": list(self.names), "head": self.head,
                "head_params": list(self.head_params)}

    def restore(self, state: dict) -> None:
        self.updated, self.names = set(state["updated"]), list(state["names"])
        self.head, self.head_params = state["head"], list(state["head_params"])

    @property
    def trained(self) -> bool:
        """Whether any training call was watched."""
        return bool(self.names)

    def never_updated(self) -> list[str]:
        """Parameters of the last trained model that no training call changed."""
        return [name for name in self.names if name not in self.updated]

    def head_trained(self) -> bool:
        """Whether training changed any parameter of the head (True without a head)."""
        return not self.head_params or any(name in self.updated for name in self.head_params)
