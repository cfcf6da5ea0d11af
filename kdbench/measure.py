"""The one measurement harness: every cell, whatever plugin produced it, is measured here."""

from __future__ import annotations

import copy
import io
import math
import os
import statistics
import time
import types
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune
from torch.utils.flop_counter import FlopCounterMode

from .config import Measure
from .contracts import Task, TaskData
from .training import predict, rows


def export(model: nn.Module) -> nn.Module:
    """The deployable model: pruning masks folded into plain weights (zeros stay zeros)."""
    with torch.no_grad():  # the masked weight may carry autograd history that deepcopy refuses
        for module in model.modules():
            for hook in module._forward_pre_hooks.values():
                if isinstance(hook, prune.BasePruningMethod):
                    setattr(module, hook._tensor_name, hook.apply_mask(module))
    model = copy.deepcopy(model)
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
    return model.eval()


def _is_quantized_module(module: nn.Module) -> bool:
    # Fused int8 modules (LinearReLU, ConvReLU2d ...) live in torch.ao.nn.intrinsic.quantized.
    return type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized"))


def weight_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """Every learned tensor, including packed weights that ``parameters()`` hides: the int8
    weights of ``torch.ao`` quantized modules, and those of any module that stores its weights
    in buffers and says so by defining ``unpacked_weights()`` (their float values)."""
    yield from model.parameters()
    for module in model.modules():
        unpacked = getattr(module, "unpacked_weights", None)
        if callable(unpacked):
            yield from unpacked()
        weight = getattr(module, "weight", None)
        if _is_quantized_module(module) and isinstance(weight, types.MethodType):
            yield module.weight()
            bias = module.bias()
            if bias is not None:
                yield bias


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters)."""
    total = nonzero = 0
    for t in weight_tensors(model):
        values = t.dequantize() if t.is_quantized else t.detach()
        total += values.numel()
        nonzero += int(torch.count_nonzero(values))
    return total, nonzero


def csr_bytes(tensor: torch.Tensor) -> int:
    """Bytes of ``tensor`` (as a 2-D matrix: first dim x the rest) in CSR form with int32
    indices: the non-zero values, one column index per value, one row pointer per row + 1."""
    rows = tensor.shape[0]
    nonzero = int(torch.count_nonzero(tensor))
    return nonzero * (tensor.element_size() + 4) + (rows + 1) * 4


def shipped_state(model: nn.Module) -> tuple[dict, int]:
    """The state dict as it would be shipped, and how many tensors in it are sparse.

    A float weight matrix (or conv kernel) whose CSR form (int32 indices) saves to fewer bytes
    than its dense form, container overhead included, is stored as CSR with its shape beside
    it; everything else stays dense. Below about 50% sparsity (fp32) CSR is the larger of the
    two and nothing changes.
    """
    shipped, sparse = {}, 0
    for key, value in model.state_dict().items():
        if (isinstance(value, torch.Tensor) and value.dim() >= 2 and value.is_floating_point()
                and not value.is_quantized and csr_bytes(value) < value.numel() * value.element_size()):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                matrix = value.detach().cpu().reshape(value.shape[0], -1).to_sparse_csr()
                csr = {"shape": tuple(value.shape),
                       "csr": torch.sparse_csr_tensor(matrix.crow_indices().int(), matrix.col_indices().int(),
                                                      matrix.values(), matrix.shape)}
                if saved_bytes(csr) < saved_bytes(value.detach().cpu().clone()):
                    shipped[key] = csr
                    sparse += 1
                    continue
        shipped[key] = value
    return shipped, sparse


def saved_bytes(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


def serialized_bytes(model: nn.Module) -> int:
    """Size of the saved artifact: ``torch.save`` of the shipped state dict (``shipped_state``:
    sparse matrices in CSR form where that is smaller)."""
    return saved_bytes(shipped_state(model)[0])


def weight_bytes(model: nn.Module) -> int:
    """Bytes of tensor data in the state dict, without the file format's overhead."""
    def size(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, (tuple, list)):
            return sum(size(v) for v in value)
        return 0
    return sum(size(v) for v in model.state_dict().values())


def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass (a multiply-add is 2 FLOPs).

    ``torch.utils.flop_counter`` sees aten matrix ops; int8 kernels of quantized Linear
    layers are invisible to it, so those are added from the layer shapes.
    """
    extra = 0

    def quantized_linear(module, inputs, _output):
        nonlocal extra
        rows = inputs[0].numel() // module.in_features
        extra += 2 * rows * module.in_features * module.out_features

    def quantized_conv(module, _inputs, output):
        nonlocal extra  # as for a float conv: one multiply-add per output value and kernel tap
        extra += 2 * output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)

    handles = []
    for m in model.modules():
        if _is_quantized_module(m) and hasattr(m, "in_features"):
            handles.append(m.register_forward_hook(quantized_linear))
        elif _is_quantized_module(m) and hasattr(m, "in_channels") and hasattr(m, "kernel_size"):
            handles.append(m.register_forward_hook(quantized_conv))
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        for h in handles:
            h.remove()
    return int(counter.get_total_flops()) + extra


def latency(model: nn.Module, inputs: dict[int, torch.Tensor], warmup: int, repeats: int,
            reference: nn.Module | None = None) -> dict[str, float]:
    """Median and IQR of one forward pass per batch size, in ms; with a ``reference`` model,
    also its speedup over the reference per batch size.

    Batch sizes are interleaved in every repeat so that drift in the machine's speed
    affects all of them alike; each timing block runs long enough (~5 ms) to be above the
    clock's resolution. The reference is timed right beside the model in every repeat (in
    alternating order), and ``speedup_b{B}`` is the median of the paired ratios: on a machine
    whose load drifts, a ratio of back-to-back timings holds where absolute times do not.

    ``latency_load`` is the machine's 1-minute load average (the higher of the readings
    before and after the timing) and ``cpu_count`` its cores: a load above the core count
    means other work queued for the CPU while the model was timed. Not where an OS has no
    load average.
    """
    load_before = load_average()
    models = {"model": model.eval()}
    if reference is not None:
        models["reference"] = reference.eval()
    samples: dict[tuple[str, int], list[float]] = {(k, b): [] for k in models for b in inputs}
    inner: dict[tuple[str, int], int] = {}
    with torch.inference_mode():
        for key, m in models.items():
            for b, x in inputs.items():
                for _ in range(max(warmup, 1)):
                    m(x)
                start = time.perf_counter()
                m(x)
                once = time.perf_counter() - start
                inner[key, b] = max(1, min(200, math.ceil(0.005 / max(once, 1e-7))))
        for rep in range(repeats):
            for b, x in inputs.items():
                order = list(models.items()) if rep % 2 == 0 else list(models.items())[::-1]
                for key, m in order:
                    start = time.perf_counter()
                    for _ in range(inner[key, b]):
                        m(x)
                    samples[key, b].append((time.perf_counter() - start) / inner[key, b] * 1e3)
    load_after = load_average()
    out = {}
    if load_before is not None and load_after is not None:
        out["latency_load"] = max(load_before, load_after)
        out["cpu_count"] = os.cpu_count() or len(os.sched_getaffinity(0))
    for b in inputs:
        values = samples["model", b]
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        out[f"latency_b{b}_ms"] = statistics.median(values)
        out[f"latency_b{b}_iqr_ms"] = q[2] - q[0]
        if reference is not None:
            out[f"speedup_b{b}"] = statistics.median(
                r / v for r, v in zip(samples["reference", b], values, strict=True))
    return out


def load_average() -> float | None:
    """The 1-minute load average (runnable and running processes, machine-wide), or None
    where the OS has none (Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def batch_of(x: torch.Tensor, size: int) -> torch.Tensor:
    """``size`` inputs taken (cyclically) from ``x``."""
    reps = math.ceil(size / len(x))
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:size].contiguous()


def measure(model: nn.Module, data: TaskData, task: Task, teacher_logits: torch.Tensor | None,
            settings: Measure, reference: nn.Module | None = None) -> dict[str, float]:
    """All figures for one deployable model on the test split."""
    x, y = data.test.tensors
    logits = predict(model, x, settings.eval_batch_size)
    figures: dict[str, float] = {f"test_{task.metric}": task.score(logits, y)}
    figures.update({f"test_{k}": v for k, v in task.extra_metrics(logits, y).items()})
    if teacher_logits is not None:
        s_rows, targets = rows(logits, y)
        t_rows = rows(teacher_logits, y)[0]
        keep = (targets != -100).nonzero().squeeze(1)  # sequence padding
        # In chunks of rows: with a 49,152-token vocabulary, float32 copies of every row's
        # log-probabilities would take gigabytes.
        agree, kl = 0.0, 0.0
        for part in keep.split(4096):
            s, t = s_rows[part].float(), t_rows[part].float()
            agree += (s.argmax(-1) == t.argmax(-1)).sum().item()
            kl += F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="sum", log_target=True).item()
        figures["teacher_agreement"] = agree / max(len(keep), 1)
        figures["teacher_kl"] = kl / max(len(keep), 1)
    params, nonzero = count_parameters(model)
    shipped, sparse_tensors = shipped_state(model)
    figures.update(params=params, nonzero_params=nonzero, size_bytes=saved_bytes(shipped),
                   sparse_tensors=sparse_tensors,
                   weight_bytes=weight_bytes(model), flops=count_flops(model, x[:1]))
    figures.update(latency(model, {b: batch_of(x, b) for b in settings.latency_batch_sizes},
                           settings.latency_warmup, settings.latency_repeats, reference))
    if x.dim() == 2 and not x.is_floating_point():  # token ids: throughput in tokens per second
        for b in settings.latency_batch_sizes:
            figures[f"tokens_per_s_b{b}"] = b * x.shape[1] / (figures[f"latency_b{b}_ms"] / 1e3)
    return figures
