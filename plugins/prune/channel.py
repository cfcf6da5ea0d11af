"""Pruner ``channel``: structured pruning that physically removes channels and neurons.

Filter pruning by norm (Li, Kadav, Durdanovic, Samet and Graf, "Pruning Filters for Efficient
ConvNets", ICLR 2017) or by first-order Taylor importance (Molchanov, Mallya, Tyree, Frosio
and Kautz, "Importance Estimation for Neural Network Pruning", CVPR 2019), applied to the
coupled groups of DepGraph (Fang, Ma, Song, Mi and Wang, "DepGraph: Towards Any Structural
Pruning", CVPR 2023) through Torch-Pruning 1.6.1. Every channel that must go together (a
conv's filter, its batch-norm entry, the consumers' input slices, the channels tied by a
residual addition or a concatenation) forms one group; a channel's importance is the mean
over the group's layers of ``sum |w|`` (``l1``), ``sum w^2`` (``l2``) or ``sum |w * dL/dw|``
(``taylor``, from one cross-entropy loss on the calibration batch and its labels), and in
each group the ``ratio`` least important channels are removed. The layers are rebuilt
smaller, so parameters, file size and FLOPs really drop (``materialized = True``).

Never pruned: the outputs of the layer(s) producing the logits (the classes), the model's
input channels, and layers named in ``skip``. For transformers built from kdbench's
``SelfAttention`` (``gpt``) the attention projections are left whole: their forward derives
the head width from the residual width, so removing heads or head dimensions would break
the reshape; as the residual stream is written by ``attn.out``, it stays whole as well, and
what is pruned is the hidden width of every MLP. Deviation from Li et al.: the norm is the
group's (DepGraph) rather than the filter's alone; the ranking is local to each group.

Example: ``[{prune: {name: channel, ratio: 0.5, importance: l1}}, {finetune: {epochs: 3}}]``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from kdbench import hookimpl
from kdbench.contracts import CompressionContext, Pruner

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def logit_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """The Linear/Conv layer(s) whose output is the model's output (else the last one run)."""
    outputs: list[tuple[nn.Module, torch.Tensor]] = []
    handles = [m.register_forward_hook(lambda mod, _i, out: outputs.append((mod, out)))
               for m in model.modules() if isinstance(m, LAYERS)]
    try:
        with torch.no_grad():
            result = model(example)
    finally:
        for h in handles:
            h.remove()
    if not outputs:
        raise ValueError("channel pruning found no Linear or Conv layer in the model")
    direct = [m for m, out in outputs if out is result]
    return direct or [outputs[-1][0]]


def attention_projections(model: nn.Module) -> list[nn.Module]:
    """qkv and out projections of kdbench's SelfAttention (gpt, text-transformer): their
    forward computes the head width from the residual width, so they must stay whole."""
    from kdbench_plugins.models.gpt import SelfAttention
    return [p for m in model.modules() if isinstance(m, SelfAttention) for p in (m.qkv, m.out)]


def widths(model: nn.Module) -> dict[str, list[int]]:
    """[in, out] of every Linear / Conv layer by module path."""
    return {name: ([m.in_features, m.out_features] if isinstance(m, nn.Linear)
                   else [m.in_channels, m.out_channels])
            for name, m in model.named_modules() if isinstance(m, LAYERS)}


class Channel(Pruner):
    __doc__ = __doc__
    name = "channel"
    description = ("structured channel/neuron pruning (L1, L2 or Taylor importance) over coupled "
                   "groups via Torch-Pruning's dependency graph; layers really shrink")
    materialized = True

    @dataclasses.dataclass(frozen=True)
    class Params:
        ratio: float = 0.5  # fraction of each group's channels removed
        importance: Literal["l1", "l2", "taylor"] = "l1"
        skip: tuple[str, ...] = ()  # module paths whose outputs are left whole
        round_to: int | None = None  # keep channel counts multiples of this

        def __post_init__(self):
            if not 0 <= self.ratio < 1:
                raise ValueError(f"ratio (fraction of channels removed) must be in [0, 1), got {self.ratio}")
            if self.importance not in ("l1", "l2", "taylor"):
                raise ValueError(f"importance must be l1, l2 or taylor, got {self.importance!r}")
            if self.round_to is not None and self.round_to < 1:
                raise ValueError(f"round_to must be a positive integer or null, got {self.round_to}")

    def apply(self, model: nn.Module, context: CompressionContext) -> nn.Module:
        p = self.params
        modules = dict(model.named_modules())
        unknown = set(p.skip) - set(modules)
        if unknown:
            raise ValueError(f"channel: skip names {sorted(unknown)} that are not modules of the model; "
                             f"its Linear/Conv layers are {sorted(widths(model))}")
        # Earlier unstructured masks would be lost by the rebuilt layers: fold them in first.
        for m in model.modules():
            for hook in list(m._forward_pre_hooks.values()):
                if isinstance(hook, prune.BasePruningMethod):
                    prune.remove(m, hook._tensor_name)
        device = next(model.parameters()).device
        calibration = context.calibration.to(device)
        if len(calibration) == 0:
            raise ValueError("channel pruning needs calibration inputs to trace the model; got none")
        example = calibration[:2]
        was_training = model.training
        model.eval()
        heads = logit_layers(model, example)
        ignored = heads + attention_projections(model) + [modules[s] for s in p.skip]
        before_params = sum(t.numel() for t in model.parameters())
        before = widths(model)

        import torch_pruning as tp  # here: importing it costs every command its start-up time

        if p.importance == "taylor":
            importance = tp.importance.GroupTaylorImportance()
        else:
            importance = tp.importance.GroupMagnitudeImportance(p=1 if p.importance == "l1" else 2)
        pruner = tp.pruner.MetaPruner(model, example, importance=importance, pruning_ratio=p.ratio,
                                      ignored_layers=ignored, round_to=p.round_to)
        if p.importance == "taylor":
            self._taylor_gradients(model, calibration, context)
        pruner.step()
        model.zero_grad(set_to_none=True)
        model.train(was_training)

        after = widths(model)
        after_params = sum(t.numel() for t in model.parameters())
        if after_params == before_params and p.ratio > 0:
            raise ValueError("channel pruning found no group it may prune: every group contains a "
                             "layer that must stay whole (the logits layer, attention or skip)")
        self._report = {
            "params_before": before_params, "params_after": after_params,
            "param_ratio": after_params / before_params,
            "importance": p.importance, "ratio": p.ratio,
            "left_whole": sorted(n for n, m in modules.items() if m in set(ignored) and isinstance(m, LAYERS)),
            "pruned": {n: [before[n][1], after[n][1]] for n in after if after[n][1] != before[n][1]},
            "widths_before": before, "widths_after": after,
        }
        if attention_projections(model):
            self._report["note"] = ("transformer: MLP hidden widths pruned; attention heads, head "
                                    "width and the residual width are left whole")
        return model

    @staticmethod
    def _taylor_gradients(model: nn.Module, calibration: torch.Tensor, context: CompressionContext) -> None:
        """Gradients of the cross-entropy on the calibration batch (Molchanov et al. 2019)."""
        targets = getattr(context, "calibration_targets", None)  # absent from older contexts
        if targets is None:
            # Contexts built by hand: the calibration inputs must be the first training examples.
            n = len(calibration)
            x_train, y_train = context.data.train.tensors
            if not torch.equal(x_train[:n].to(calibration.device), calibration):
                raise ValueError("taylor importance needs the calibration labels: set "
                                 "CompressionContext.calibration_targets")
            targets = y_train[:n]
        targets = targets.to(calibration.device)
        model.zero_grad(set_to_none=True)
        for start in range(0, len(calibration), 256):
            logits = model(calibration[start:start + 256])
            y = targets[start:start + 256]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1),
                                   ignore_index=-100, reduction="sum") / max(int((targets != -100).sum()), 1)
            loss.backward()

    def report(self):
        return getattr(self, "_report", {})


@hookimpl
def kdbench_register_pruners(register):
    register(Channel)
