"""Input statistics of Linear layers over calibration batches.

Activation-aware compressors (Wanda, ASVD, GPTQ) weigh each weight by what flows into it.
They all need the same pass: run the calibration inputs through the model once and, for
each chosen Linear layer, accumulate over every input row (every token of a sequence) the
Gram matrix ``X^T X`` and the sum of ``|X|`` per input feature. Sums are kept in float64 so
that thousands of rows do not lose precision.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import dataclasses

import torch
from torch import nn


@dataclasses.dataclass
class InputStats:
    """What went into one Linear layer: ``gram = X^T X`` (in x in), ``abs_sum = sum |X|`` per
    input feature, and ``rows``, the number of input rows (examples x positions)."""

    gram: torch.Tensor
    abs_sum: torch.Tensor
    rows: int = 0

    @property
    def sq_norm(self) -> torch.Tensor:
        """``||X_j||_2^2`` per input feature j (the Gram matrix's diagonal)."""
        return self.gram.diagonal()

    @property
    def hessian(self) -> torch.Tensor:
        """GPTQ's layer-wise Hessian of the squared reconstruction error, ``2 X^T X / rows``."""
        return 2 * self.gram / max(self.rows, 1)


def skipped(names: Iterable[str], skip: Iterable[str], what: str = "Linear layers") -> set[str]:
    """The names that ``skip`` selects. Entries are module paths or shell patterns
    (``*.self_attn.*`` leaves every attention projection of a transformer alone); one that
    selects nothing is an error naming the layers there are."""
    names = list(names)
    out: set[str] = set()
    for pattern in skip:
        hits = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
        if not hits:
            shown = ", ".join(sorted(names)[:12]) + (" ..." if len(names) > 12 else "")
            raise ValueError(f"skip {pattern!r} matches none of the {what}: {shown}")
        out |= hits
    return out


def linear_layers(model: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` by module path, minus ``skip`` (paths or shell patterns)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    left_out = skipped(layers, skip)
    return {name: m for name, m in layers.items() if name not in left_out}


class _AllReached(Exception):
    """Raised from a hook to end a calibration pass once every layer of interest has run."""


@torch.no_grad()
def forward_groups(model: nn.Module, layers: dict[str, nn.Linear],
                   example: torch.Tensor) -> tuple[list[list[str]], bool]:
    """The layers in the order one forward pass of ``example`` first reaches them (unreached
    ones last, alone), grouped: consecutive layers fed the very same input tensor (the q/k/v
    projections of an attention block, gate and up of a gated MLP) form one group, since
    changing one of them cannot change what the others see. Also returns whether every
    reached layer ran exactly once, which makes it safe to end a pass early."""
    seen: list[tuple[str, torch.Tensor]] = []
    calls: dict[str, int] = {}

    def hook(name):
        def record(_module, inputs):
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1:
                seen.append((name, inputs[0]))
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        model(example.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    groups: list[list[str]] = []
    previous = None
    for name, x in seen:
        if groups and x is previous:
            groups[-1].append(name)
        else:
            groups.append([name])
        previous = x
    groups += [[name] for name in layers if name not in calls]
    return groups, all(n == 1 for n in calls.values())


@torch.no_grad()
def input_stats(model: nn.Module, layers: dict[str, nn.Linear], calibration: torch.Tensor,
                batch_size: int = 256, stop_early: bool = False) -> dict[str, InputStats]:
    """One pass of ``calibration`` through ``model`` (eval mode, restored after); the input
    statistics of each layer in ``layers``. With ``stop_early`` each batch's forward ends as
    soon as every layer has seen its input: only for layers that run once per forward (see
    ``forward_groups``); sequential GPTQ then pays for the model up to the layer, not all of it."""
    if len(calibration) == 0:
        raise ValueError("activation-aware compression needs calibration inputs; got none "
                         "(raise measure.calibration_size)")
    # On the layer's device: the inputs the hooks see are there.
    stats = {name: InputStats(torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=m.weight.device),
                              torch.zeros(m.in_features, dtype=torch.float64, device=m.weight.device))
             for name, m in layers.items()}

    def hook(name):
        def record(_module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            s = stats[name]
            s.gram += x.T @ x
            s.abs_sum += x.abs().sum(0)
            s.rows += x.shape[0]
            reached.add(name)
            if stop_early and len(reached) == len(layers):
                raise _AllReached
        return record

    reached: set[str] = set()

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for start in range(0, len(calibration), batch_size):
            reached.clear()
            try:
                model(calibration[start:start + batch_size].to(device))
            except _AllReached:
                pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats
