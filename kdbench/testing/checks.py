"""Conformance checks: run a plugin class for real on tiny data and hold it to its contract.

Every ``check_<kind>(cls, params=None)`` builds the class through the registry's own path (a
throwaway ``Plugins`` registers it exactly as an entry point would, then ``Plugins.build``
validates ``params`` against its ``Params``), exercises it on seeded tiny data in a few
seconds, and raises ``AssertionError`` naming the plugin, the property it violates and what
to change. On success it returns a small dict of what it measured, for tests and logs.

The properties are the ones the runner relies on without checking at run time: a
distiller's gradients reach the student and its declared adapters but never the teacher, a
pruner's sparsity is the one its parameters claim, a compressor's ``materialized`` flag
matches the artifact, a task's splits are disjoint and reproducible, an executor returns
every job's result exactly once. A violation there would not crash a run; it would store
wrong numbers, which is why it is checked here.

Each check runs in its own random-number context (``torch.random.fork_rng``), so calling
it leaves the caller's seeds untouched.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import hashlib
import math
import time
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from kdbench import compat, hookimpl
from kdbench.config import Training, parse_ref
from kdbench.contracts import KINDS, CompressionContext, DistillContext, Outputs, Task, TaskData
from kdbench.errors import ConfigError, PluginError
from kdbench.measure import count_parameters, export, serialized_bytes
from kdbench.params import as_dict, parse_params
from kdbench.plugins import REGISTER_HOOKS, Plugins, get_plugins
from kdbench.training import Tapped, Teacher, capture_features, fit, rows

CATEGORIES = ("response", "feature", "relation")
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: Teacher / student model specs (registry family, parameters) and the tiny data they train
#: on. ``cnn`` views the 64 features of the vector data as 8x8 images: conv feature maps
#: without a second data set.
PAIRS: dict[str, tuple[tuple[str, dict], tuple[str, dict], str]] = {
    "mlp": (("mlp", {"hidden": [48, 32]}), ("mlp", {"hidden": [24, 16]}), "vector"),
    "cnn": (("cnn", {"channels": [8, 16], "hidden": 32}),
            ("cnn", {"channels": [4, 8], "hidden": 16}), "vector"),
    "gpt": (("gpt", {"layers": 2, "width": 32, "heads": 2, "context": 16}),
            ("gpt", {"layers": 1, "width": 16, "heads": 2, "context": 16}), "tokens"),
}
DATA_KINDS = ("vector", "image", "tokens", "text", "signal")
#: The tiny data that stands for each (input, target) a family may declare (kdbench.compat).
DECLARED_DATA: dict[tuple[str, str], str] = {
    ("features", "labels"): "vector", ("signals", "labels"): "signal",
    ("images", "labels"): "image", ("tokens", "labels"): "text", ("tokens", "positions"): "tokens",
}
#: Dimensions of one example for each declared input kind (tokens: integer ids (T,)).
INPUT_DIMS: dict[str, tuple[int, ...]] = {"features": (1,), "signals": (1, 2), "images": (3,),
                                          "tokens": (1,)}


# ---------------------------------------------------------------- messages and building
def _label(kind: str, cls: Any) -> str:
    name = getattr(cls, "name", "") or "<no name>"
    where = f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', repr(cls))}"
    return f"{kind} '{name}' ({where})"


def _fail(label: str, prop: str, detail: str, fix: str, cause: BaseException | None = None) -> NoReturn:
    raise AssertionError(f"{label}: {prop}: {detail}. Fix: {fix}") from cause


class _Refused(Exception):
    """The plugin declined the tiny setup with ``ValueError``, as its contract allows."""


def _call(label: str, what: str, fn: Callable, *args, refusable: bool = False) -> Any:
    """``fn(*args)``; a ``ValueError`` is a refusal where the contract allows one, any other
    exception a failure of the plugin named in the message."""
    try:
        return fn(*args)
    except AssertionError:
        raise
    except ValueError as exc:
        if refusable:
            raise _Refused(str(exc)) from exc
        _fail(label, what, f"raised ValueError: {exc}", "fix the exception it raised (the cause below)", exc)
    except Exception as exc:  # noqa: BLE001 - any crash is a conformance failure
        hint = ("raise ValueError saying why when a setup cannot be served; anything else is a bug"
                if refusable else "fix the exception it raised (the cause below)")
        _fail(label, what, f"raised {type(exc).__name__}: {exc}", hint, exc)


def _build(kind: str, cls: Any, params: dict | None) -> Any:
    """An instance built as the registry builds it: registered by a plugin object through
    the hook (so name, description and Params are validated as for an entry point), then
    ``Plugins.build`` with ``params`` parsed against ``Params``."""
    label = _label(kind, cls)
    base = KINDS[kind]
    if not (isinstance(cls, type) and issubclass(cls, base)):
        _fail(label, "contract", f"{cls!r} is not a subclass of kdbench.contracts.{base.__name__}",
              f"derive the class from kdbench.contracts.{base.__name__}")
    plugins = Plugins()
    carrier = types.ModuleType(f"kdbench_conformance_{kind}")

    def register_it(register):
        register(cls)

    setattr(carrier, REGISTER_HOOKS[kind], hookimpl(register_it))
    try:
        plugins.register(carrier, f"conformance-{kind}")
    except PluginError as exc:
        _fail(label, "registration", str(exc), "give the class a non-empty name and description "
              "and a dataclass Params, as CONTRIBUTING.md describes")
    try:
        return plugins.build(kind, cls.name, params, where="params")
    except ConfigError as exc:
        _fail(label, "parameters", f"{dict(params or {})} rejected: {exc}",
              "pass parameters its Params accepts; the defaults alone must be valid")


def _params_dict(instance: Any) -> dict[str, Any]:
    try:
        return as_dict(instance.params)
    except TypeError:
        return {}


# ---------------------------------------------------------------- tiny data
def tiny_task_data(seed: int = 0, train: int = 256, val: int = 64, test: int = 64,
                   features: int = 64, classes: int = 10) -> TaskData:
    """Seeded Gaussian blobs: ``features`` real inputs, ``classes`` classes, disjoint splits.

    Class centres are drawn once per seed and every example adds noise, so a small MLP
    learns the task in a few epochs without reaching certainty (its outputs stay soft).
    """
    g = torch.Generator().manual_seed(seed)
    n = train + val + test
    centres = torch.randn(classes, features, generator=g)
    y = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]
    x = centres[y] + 1.5 * torch.randn(n, features, generator=g)
    a, b = train, train + val
    return TaskData(TensorDataset(x[:a], y[:a]), TensorDataset(x[a:b], y[a:b]),
                    TensorDataset(x[b:], y[b:]), input_shape=(features,), num_classes=classes)


def tiny_token_data(seed: int = 0, train: int = 128, val: int = 32, test: int = 32,
                    context: int = 16, vocab: int = 12) -> TaskData:
    """Next-token prediction on sequences from a seeded Markov chain; the last positions of
    every fourth sequence are padding (target -100), as in real language-model batches."""
    g = torch.Generator().manual_seed(seed)
    n = train + val + test
    transitions = torch.softmax(3 * torch.randn(vocab, vocab, generator=g), dim=1)
    seq = torch.empty(n, context + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(vocab, (n,), generator=g)
    for t in range(context):
        seq[:, t + 1] = torch.multinomial(transitions[seq[:, t]], 1, generator=g).squeeze(1)
    x, y = seq[:, :-1].clone(), seq[:, 1:].clone()
    y[::4, -3:] = -100
    a, b = train, train + val
    return TaskData(TensorDataset(x[:a], y[:a]), TensorDataset(x[a:b], y[a:b]),
                    TensorDataset(x[b:], y[b:]), input_shape=(context,), num_classes=vocab,
                    vocab_size=vocab)


def tiny_text_data(seed: int = 0, train: int = 64, val: int = 16, test: int = 16,
                   length: int = 16, vocab: int = 40, classes: int = 4) -> TaskData:
    """Token-sequence classification: id 0 pads the tail, each class favours its own ids."""
    g = torch.Generator().manual_seed(seed)
    n = train + val + test
    y = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]
    span = (vocab - 2) // classes
    ids = 2 + y[:, None] * span + torch.randint(span, (n, length), generator=g)
    noise = torch.rand(n, length, generator=g) < 0.3
    ids = torch.where(noise, torch.randint(2, vocab, (n, length), generator=g), ids)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
    ids[torch.arange(length)[None, :] >= lengths[:, None]] = 0
    a, b = train, train + val
    return TaskData(TensorDataset(ids[:a], y[:a]), TensorDataset(ids[a:b], y[a:b]),
                    TensorDataset(ids[b:], y[b:]), input_shape=(length,), num_classes=classes,
                    vocab_size=vocab)


def tiny_image_data(seed: int = 0, train: int = 16, val: int = 8, test: int = 8,
                    shape: tuple[int, int, int] = (3, 32, 32), classes: int = 10) -> TaskData:
    """CIFAR-shaped random images (the CIFAR families need 32x32 inputs), for forward checks."""
    g = torch.Generator().manual_seed(seed)
    n = train + val + test
    x = torch.randn(n, *shape, generator=g)
    y = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]
    a, b = train, train + val
    return TaskData(TensorDataset(x[:a], y[:a]), TensorDataset(x[a:b], y[a:b]),
                    TensorDataset(x[b:], y[b:]), input_shape=shape, num_classes=classes)


def tiny_signal_data(seed: int = 0, train: int = 128, val: int = 32, test: int = 32,
                     length: int = 40, classes: int = 10) -> TaskData:
    """1-D float signals ``(length,)`` like MNIST-1D's 40 samples: Gaussian blobs smoothed
    along the signal (the length is no perfect square, so ``cnn`` runs 1-D convolutions)."""
    data = tiny_task_data(seed, train, val, test, features=length, classes=classes)
    kernel = torch.full((1, 1, 5), 0.2)

    def smooth(ds: TensorDataset) -> TensorDataset:
        x, y = ds.tensors
        return TensorDataset(F.conv1d(x[:, None], kernel, padding=2)[:, 0], y)

    return dataclasses.replace(data, train=smooth(data.train), val=smooth(data.val),
                               test=smooth(data.test))


_DATA: dict[str, Callable[..., TaskData]] = {
    "vector": tiny_task_data, "image": tiny_image_data, "tokens": tiny_token_data,
    "text": tiny_text_data, "signal": tiny_signal_data,
}


def _data(kind: str, seed: int) -> TaskData:
    if kind not in _DATA:
        raise ValueError(f"unknown data kind {kind!r}; choose one of {', '.join(_DATA)}")
    return _DATA[kind](seed)


# ---------------------------------------------------------------- tiny models
_TRAINED: dict[tuple, dict[str, torch.Tensor]] = {}


def _family(spec: tuple[str, dict]):
    name, params = spec
    try:
        return get_plugins().build("model", name, params)
    except ConfigError as exc:
        raise RuntimeError(f"the conformance checks build their tiny models with the registry's "
                           f"'{name}' model family, which is not available here ({exc}); load "
                           "kdbench's built-in plugins (check KDBENCH_PLUGINS)") from None


def _train(model: nn.Module, data: TaskData, epochs: int, seed: int, lr: float = 3e-3) -> None:
    """A few epochs of Adam on cross-entropy: enough for outputs that are not uniform."""
    g = torch.Generator().manual_seed(seed)
    x, y = data.train.tensors
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(32):
            if len(idx) < 2:
                continue
            loss = F.cross_entropy(*rows(model(x[idx]), y[idx]), ignore_index=-100)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.zero_grad(set_to_none=True)
    model.eval()


def _model(spec: tuple[str, dict], data_kind: str, seed: int, trained: bool):
    """(family, model) built by the registry for the tiny data; trained models are cached
    (as state dicts: every caller gets its own copy, whatever a plugin does to it)."""
    family = _family(spec)
    data = _data(data_kind, seed)
    torch.manual_seed(seed)
    model = family.build(data)
    if trained:
        key = (spec[0], repr(sorted(spec[1].items())), data_kind, seed)
        if key not in _TRAINED:
            _train(model, data, epochs=8, seed=seed)
            _TRAINED[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(_TRAINED[key])
    return family, model.eval()


def tiny_pair(seed: int = 0, pair: str = "mlp") -> tuple[nn.Module, nn.Module]:
    """(teacher, student) for ``tiny_task_data(seed)`` (``pair='gpt'``: for
    ``tiny_token_data``): the teacher trained for a few epochs, the student untrained."""
    teacher_spec, student_spec, kind = PAIRS[pair]
    with torch.random.fork_rng(devices=[]):
        _, teacher = _model(teacher_spec, kind, seed, trained=True)
        _, student = _model(student_spec, kind, seed + 1, trained=False)
    return teacher, student


# ---------------------------------------------------------------- tasks
def _row_digests(x: torch.Tensor) -> list[bytes]:
    flat = x.detach().reshape(len(x), -1).contiguous().cpu().numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


def check_task(cls: type[Task], params: dict | None = None) -> dict[str, Any]:
    """A task's attributes, splits, seeding and metric.

    ``check()`` runs first and its ``FileNotFoundError`` (missing dataset) propagates as it
    is: a test skips such a task rather than failing it. Then ``load()`` is called on two
    separately built instances and the results must be equal tensor for tensor (the splits
    are part of every result's identity), the three splits must share no example (rows are
    hashed: a test example seen in training inflates the metric), shapes, target ranges,
    ``input_shape`` / ``num_classes`` / ``vocab_size`` and the declared ``inputs`` /
    ``targets`` (``kdbench.compat``) must agree with the tensors, and
    ``score`` must rank perfect logits above uninformative ones in the direction
    ``higher_is_better`` says.
    """
    label = _label("task", cls)
    task = _build("task", cls, params)
    for attr in ("metric", "version", "category"):
        value = getattr(cls, attr, None)
        if not isinstance(value, str) or not value.strip():
            _fail(label, f"class attribute '{attr}'", f"is {value!r}",
                  f"set {attr} to a non-empty string (version: bump it whenever data or splits change)")
    if not isinstance(cls.higher_is_better, bool):
        _fail(label, "class attribute 'higher_is_better'", f"is {cls.higher_is_better!r}",
              "set it to True or False")
    if not isinstance(cls.default_training, dict):
        _fail(label, "class attribute 'default_training'", f"is {cls.default_training!r}",
              "make it a dict of keys of the experiment file's training block")
    try:
        parse_params(Training, cls.default_training, "default_training")
    except ConfigError as exc:
        _fail(label, "class attribute 'default_training'", str(exc),
              "use only keys and values the experiment file's training block accepts")

    task.check()  # FileNotFoundError: the dataset is not there; the caller decides (skip)
    with torch.random.fork_rng(devices=[]):
        start = time.perf_counter()
        data = task.load()
        seconds = time.perf_counter() - start
        again = _build("task", cls, params).load()
    if not isinstance(data, TaskData):
        _fail(label, "load()", f"returned {type(data).__name__}", "return a kdbench.contracts.TaskData")

    splits = {"train": data.train, "val": data.val, "test": data.test}
    tokens = data.vocab_size is not None
    shape = tuple(data.input_shape)
    if not isinstance(data.num_classes, int) or data.num_classes < 2:
        _fail(label, "num_classes", f"is {data.num_classes!r}", "set it to the number of classes "
              "(the vocabulary size for language modelling), at least 2")
    for split, ds in splits.items():
        if not isinstance(ds, TensorDataset) or len(ds.tensors) != 2:
            _fail(label, f"split '{split}'", f"is {type(ds).__name__} with "
                  f"{len(getattr(ds, 'tensors', ()))} tensors", "use TensorDataset(inputs, targets)")
        x, y = ds.tensors
        if len(x) == 0:
            _fail(label, f"split '{split}'", "is empty", "give every split examples")
        if len(y) != len(x):
            _fail(label, f"split '{split}'", f"has {len(x)} inputs but {len(y)} targets",
                  "give one target (or one target sequence) per input")
        if tuple(x.shape[1:]) != shape:
            _fail(label, "input_shape", f"says {shape} but the {split} inputs are {tuple(x.shape[1:])}",
                  "set input_shape to the shape of one example")
        if tokens:
            if x.is_floating_point() or int(x.min()) < 0 or int(x.max()) >= data.vocab_size:
                _fail(label, "vocab_size", f"is {data.vocab_size} but the {split} inputs hold "
                      f"{x.dtype} values in [{x.min().item()}, {x.max().item()}]",
                      "token inputs are integer ids in [0, vocab_size)")
        elif not x.is_floating_point() or not bool(torch.isfinite(x).all()):
            _fail(label, f"split '{split}' inputs", f"are {x.dtype}"
                  f"{'' if not x.is_floating_point() else ' with non-finite values'}",
                  "real-valued inputs are finite floats; token ids need vocab_size set")
        if y.is_floating_point() or y.dim() not in (1, 2):
            _fail(label, f"split '{split}' targets", f"are {y.dtype} of shape {tuple(y.shape)}",
                  "targets are integer class indices, (N,) or (N, positions)")
        real = y[y != -100]
        if len(real) and (int(real.min()) < 0 or int(real.max()) >= data.num_classes):
            _fail(label, "num_classes", f"is {data.num_classes} but the {split} targets range over "
                  f"[{int(real.min())}, {int(real.max())}]", "targets are in [0, num_classes) or -100")
    _check_task_declaration(label, cls, data)
    for split in splits:
        for i, (a, b) in enumerate(zip(getattr(data, split).tensors, getattr(again, split).tensors)):
            if a.shape != b.shape or not torch.equal(a, b):
                _fail(label, "seeded splits", f"two load() calls gave different {split} "
                      f"{'inputs' if i == 0 else 'targets'}",
                      "draw every random choice from a generator seeded by the task's parameters")

    digests = {split: set(_row_digests(ds.tensors[0])) for split, ds in splits.items()}
    shared = {f"{a}/{b}": len(digests[a] & digests[b])
              for a, b in (("train", "val"), ("train", "test"), ("val", "test"))}
    if any(shared.values()):
        _fail(label, "disjoint splits", f"identical examples appear in two splits ({shared})",
              "deduplicate the examples before splitting (or split by a group such as a "
              "document), so that no evaluated example was trained on")

    if data.train_transform is not None:
        x = data.train.tensors[0][:4]
        out1 = data.train_transform(x.clone(), torch.Generator().manual_seed(0))
        out2 = data.train_transform(x.clone(), torch.Generator().manual_seed(0))
        if out1.shape != x.shape or not torch.equal(out1, out2):
            _fail(label, "train_transform", "changes the batch's shape or is not reproducible "
                  "from its generator", "draw all randomness from the generator argument")

    y_test = data.test.tensors[1][:256]
    safe = y_test.clamp_min(0)
    perfect = 10 * F.one_hot(safe, data.num_classes).float()
    flat = torch.zeros_like(perfect)
    best, worst = task.score(perfect, y_test), task.score(flat, y_test)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (best, worst)):
        _fail(label, "score()", f"returned {best!r} and {worst!r}", "return a finite float")
    better = best > worst if cls.higher_is_better else best < worst
    if not better:
        _fail(label, "score() direction", f"perfect logits score {best:.4g} and uniform ones "
              f"{worst:.4g}, but higher_is_better is {cls.higher_is_better}",
              "make higher_is_better say which way the metric improves")
    return {"sizes": {s: len(ds) for s, ds in splits.items()}, "input_shape": shape,
            "inputs": getattr(cls, "inputs", None), "targets": getattr(cls, "targets", None),
            "num_classes": data.num_classes, "vocab_size": data.vocab_size,
            "load_seconds": seconds, "score_perfect": best, "score_uniform": worst}


def _check_task_declaration(label: str, cls: type[Task], data: TaskData) -> None:
    """``inputs`` / ``targets``, when declared, are known names and true of the loaded data:
    experiments are accepted or refused on the strength of them."""
    problems = compat.declaration_problems("task", cls)
    if problems:
        _fail(label, "class attributes 'inputs' / 'targets'", "; ".join(problems),
              "use the names of kdbench.compat.INPUTS and TARGETS, or leave them None")
    x, y = data.train.tensors
    given, wanted = getattr(cls, "inputs", None), getattr(cls, "targets", None)
    if given is not None:
        tokens = given == "tokens"
        integer = not x.is_floating_point()
        if (x.dim() - 1 not in INPUT_DIMS[given] or integer != tokens
                or tokens != (data.vocab_size is not None)):
            _fail(label, "class attribute 'inputs'", f"says {given!r} ({compat.INPUTS[given]}) but "
                  f"the train inputs are {x.dtype} of shape {tuple(x.shape[1:])} per example, "
                  f"vocab_size {data.vocab_size}",
                  "declare what load() gives: 'features' float (D,), 'signals' float (L,) or "
                  "(C, L), 'images' float (C, H, W), 'tokens' integer ids (T,) with vocab_size")
    if wanted is not None and y.dim() != (1 if wanted == "labels" else 2):
        _fail(label, "class attribute 'targets'", f"says {wanted!r} ({compat.TARGETS[wanted]}) but "
              f"the train targets have shape {tuple(y.shape)}",
              "declare 'labels' for targets (N,), 'positions' for targets (N, T)")


# ---------------------------------------------------------------- models
def _expected_shape(data: TaskData, batch: int) -> tuple[int, ...]:
    y = data.train.tensors[1]
    return (batch, data.num_classes) if y.dim() == 1 else (batch, y.shape[1], data.num_classes)


def _try_model(label: str, family, data: TaskData, batch: int) -> dict[str, Any]:
    """Every property of one built model; AssertionError on the first violation."""
    model = _call(label, "build()", family.build, data, refusable=True)
    if not isinstance(model, nn.Module):
        _fail(label, "build()", f"returned {type(model).__name__}", "return a torch.nn.Module")
    x, y = data.train.tensors[0][:batch], data.train.tensors[1][:batch]
    points = _call(label, "feature_points()", family.feature_points, model)
    attention = _call(label, "attention_points()", family.attention_points, model)
    for what, names in (("feature_points", points), ("attention_points", attention)):
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            _fail(label, f"{what}()", f"returned {names!r}", "return a list of module paths (str)")
        if len(set(names)) != len(names):
            _fail(label, f"{what}()", f"lists a module twice: {names}", "name each module once")
        for name in names:
            try:
                model.get_submodule(name)
            except AttributeError:
                _fail(label, f"{what}()", f"names '{name}', which is not a module of the built model",
                      "return paths from model.named_modules()")
    order: list[str] = []
    model.eval()
    with torch.no_grad(), capture_features(model, points + attention) as feats:
        hooks = [model.get_submodule(p).register_forward_hook(
            lambda _m, _i, _o, p=p: order.append(p) if p not in order else None) for p in points]
        try:
            logits = _call(label, "forward", model, x)
        finally:
            for h in hooks:
                h.remove()
    expected = _expected_shape(data, len(x))
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected:
        _fail(label, "forward output", f"is {tuple(getattr(logits, 'shape', ()))} for a batch of "
              f"{len(x)}; expected {expected}", "return logits (batch, num_classes), or "
              "(batch, positions, vocab) for token targets")
    if not bool(torch.isfinite(logits).all()):
        _fail(label, "forward output", "has non-finite logits", "check the model's initialization")
    for name in points + attention:
        if name not in feats:
            _fail(label, "feature points", f"'{name}' never runs in the forward pass",
                  "name only modules the forward pass calls")
        value = feats[name]
        if not isinstance(value, torch.Tensor) or value.shape[0] != len(x):
            _fail(label, "feature points", f"'{name}' gives {type(value).__name__} "
                  f"{tuple(getattr(value, 'shape', ()))} for a batch of {len(x)}",
                  "tap modules whose output is one tensor with the batch first")
    for name in attention:
        if feats[name].dim() != 4:
            _fail(label, "attention_points", f"'{name}' gives {tuple(feats[name].shape)}",
                  "tap modules whose output is (batch, heads, T, T)")
    if order != points:
        _fail(label, "feature_points order", f"the forward pass reaches them as {order}, listed as "
              f"{points}", "list feature points shallow to deep, in the order the forward pass runs them")
    trained = None
    if not getattr(family, "pretrained", False):
        model.train()
        model.zero_grad(set_to_none=True)
        out = _call(label, "forward in training mode", model, x)
        loss = F.cross_entropy(*rows(out, y), ignore_index=-100)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        if not grads or all(g is None or not bool(g.any()) for g in grads):
            _fail(label, "training", "a cross-entropy step gives no gradient to any parameter",
                  "build the model from trainable modules (requires_grad=True)")
        if not all(g is None or bool(torch.isfinite(g).all()) for g in grads):
            _fail(label, "training", "a cross-entropy step gives non-finite gradients",
                  "check the model's numerics")
        trained = float(loss.detach())
    return {"output_shape": tuple(logits.shape), "feature_points": points,
            "attention_points": attention, "params": sum(p.numel() for p in model.parameters()),
            "train_loss": trained}


def check_model(cls, params: dict | None = None, *, data: str | TaskData | None = None,
                batch: int = 4, seed: int = 0) -> dict[str, Any]:
    """A model family builds a module whose forward gives finite logits of the task's shape,
    whose feature and attention points exist and fire shallow to deep, and (unless
    ``pretrained``) which trains; a ``pretrained`` family states its ``provenance``.

    ``data``: a ``TaskData``, or one of ``vector`` (64 features), ``image`` (3x32x32),
    ``tokens`` (next-token prediction), ``text`` (token-sequence classification) and
    ``signal`` (40-sample 1-D signals). By default, a family that declares its ``inputs``
    (and ``targets``) must serve the tiny data of every declared kind, since experiments are
    accepted on the strength of the declaration; one that declares nothing is checked on the
    first kind it serves (its ``build`` raises ``ValueError`` for the others, as the
    contract asks).
    """
    label = _label("model", cls)
    family = _build("model", cls, params)
    if getattr(cls, "pretrained", False) and not cls.provenance_for(family.params):
        _fail(label, "class attribute 'provenance'", "is empty, but the family is pretrained",
              "name the checkpoint the weights come from and their own quantization, e.g. "
              "'SmolLM2-135M-Instruct (HuggingFaceTB), the Q4_1 GGUF release ..., dequantized to fp32'")
    declared = _declared_data(label, cls)
    if data is None and declared:
        return _check_declared(label, family, declared, batch, seed)
    with torch.random.fork_rng(devices=[]):
        if isinstance(data, TaskData):
            torch.manual_seed(seed)
            try:
                return {"data": "given", **_try_model(label, family, data, batch)}
            except _Refused as exc:
                _fail(label, "build()", f"refused the given data: {exc}", "pass data it serves", exc)
        kinds = [data] if data is not None else list(DATA_KINDS)
        refused = {}
        for kind in kinds:
            torch.manual_seed(seed)
            task_data = _data(kind, seed)
            try:
                return {"data": kind, **_try_model(label, family, task_data, batch)}
            except _Refused as exc:
                if data is not None:
                    _fail(label, "build()", f"refused the tiny {kind} data: {exc}",
                          "pass data= a kind the family serves", exc)
                refused[kind] = str(exc)
            except AssertionError as exc:
                if data is not None:
                    raise
                refused[kind] = str(exc)
    _fail(label, "build()", f"served none of the tiny data kinds: {refused}",
          "pass data= one the family serves, or fix the first failure listed")


def _declared_data(label: str, cls) -> dict[str, list[str]]:
    """Declared (input, target) combinations -> the tiny data kinds that stand for them; empty
    when the family declares no inputs. Combinations without tiny data are left out."""
    problems = compat.declaration_problems("model", cls)
    if problems:
        _fail(label, "class attributes 'inputs' / 'targets'", "; ".join(problems),
              "use the names of kdbench.compat.INPUTS and TARGETS, or leave them empty")
    targets = compat.family_kinds(getattr(cls, "targets", ())) or tuple(compat.TARGETS)
    out = {}
    for given in compat.family_kinds(getattr(cls, "inputs", ())):
        kinds = [DECLARED_DATA[given, t] for t in targets if (given, t) in DECLARED_DATA]
        if kinds:
            out[given] = kinds
    return out


def _check_declared(label: str, family, declared: dict[str, list[str]], batch: int,
                    seed: int) -> dict[str, Any]:
    """Every declared input served on (one of) its tiny data kinds."""
    results: dict[str, dict[str, Any]] = {}
    with torch.random.fork_rng(devices=[]):
        for given, kinds in declared.items():
            why = {}
            for kind in kinds:
                torch.manual_seed(seed)
                try:
                    results[given] = {"data": kind, **_try_model(label, family, _data(kind, seed), batch)}
                    break
                except (_Refused, AssertionError) as exc:
                    why[kind] = str(exc)
            else:
                _fail(label, "class attribute 'inputs'", f"declares {given!r} "
                      f"({compat.INPUTS[given]}), but on the tiny {' / '.join(kinds)} data: {why}",
                      "make build() serve every declared input (and target), or declare only "
                      "what it serves")
    first = next(iter(results.values()))
    return {**first, "declared": {given: r["data"] for given, r in results.items()}}


# ---------------------------------------------------------------- distillers
def _held_parameters(obj: Any) -> dict[int, tuple[str, nn.Parameter]]:
    """Parameters an object holds in its attributes (modules, parameters, and lists, tuples
    or dicts of them), by id, with the attribute path."""
    found: dict[int, tuple[str, nn.Parameter]] = {}

    def visit(value, path, depth):
        if isinstance(value, nn.Parameter):
            found.setdefault(id(value), (path, value))
        elif isinstance(value, nn.Module):
            for name, p in value.named_parameters():
                found.setdefault(id(p), (f"{path}.{name}", p))
        elif isinstance(value, (list, tuple)) and depth < 3:
            for i, v in enumerate(value):
                visit(v, f"{path}[{i}]", depth + 1)
        elif isinstance(value, dict) and depth < 3:
            for k, v in value.items():
                visit(v, f"{path}[{k!r}]", depth + 1)

    for name, value in vars(obj).items():
        visit(value, name, 0)
    return found


def _batch_terms(distiller, student: Tapped, teacher: Teacher, data: TaskData,
                 indices: torch.Tensor, epoch: int, epochs: int):
    """One batch as ``training.fit`` runs it: student forward with gradients, teacher under
    ``no_grad``, ``begin_batch`` then ``loss`` on rows."""
    x, y = data.train.tensors[0][indices], data.train.tensors[1][indices]
    s_points, t_points = [], []
    if distiller.needs_features:
        s_points, t_points = list(student.feature_points), list(teacher.feature_points)
    if distiller.needs_attention:
        s_points += student.attention_points
        t_points += teacher.attention_points
    with capture_features(student.model, s_points) as s_feats:
        s_logits = student.model(x)
    distiller.begin_batch(indices, epoch, epochs)
    with torch.no_grad(), capture_features(teacher.model, t_points) as t_feats:
        t_logits = teacher.model(x)
    s_rows, targets = rows(s_logits, y)
    return distiller.loss(Outputs(s_rows, s_feats), Outputs(rows(t_logits, y)[0], dict(t_feats)), targets)


def _check_terms(label: str, terms: Any, batch: str) -> torch.Tensor:
    if not isinstance(terms, dict) or not terms:
        _fail(label, "loss()", f"returned {terms!r} on the {batch} batch",
              "return a non-empty dict of named scalar tensors")
    for key, value in terms.items():
        if not isinstance(key, str) or not key:
            _fail(label, "loss() term names", f"{key!r} is not a non-empty string", "name every term")
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            _fail(label, f"loss term '{key}'", f"is {type(value).__name__} "
                  f"{tuple(getattr(value, 'shape', ()))}, not a scalar tensor",
                  "reduce each term to a 0-dim tensor (.mean() or .sum())")
        if not bool(torch.isfinite(value)):
            _fail(label, f"loss term '{key}'", f"is {float(value.detach())} on the {batch} batch",
                  "keep the loss finite (clamp before log, add eps to norms, use log_softmax)")
    total = sum(terms.values())
    if not total.requires_grad:
        _fail(label, "loss()", "no term depends on the student's outputs (nothing to train)",
              "compute the terms from the student's logits or features")
    return total


def _nonzero(grad: torch.Tensor | None) -> bool:
    return grad is not None and bool(grad.ne(0).any())


def _run_distiller(label: str, distiller, pair: str, seed: int, batch_size: int) -> dict[str, Any]:
    teacher_spec, student_spec, kind = PAIRS[pair]
    data = _data(kind, seed)
    t_family, t_model = _model(teacher_spec, kind, seed, trained=True)
    s_family, s_model = _model(student_spec, kind, seed + 1, trained=False)
    teacher = Teacher(t_model, t_family.feature_points(t_model), t_family.attention_points(t_model))
    student = Tapped(s_model, s_family.feature_points(s_model), s_family.attention_points(s_model))
    teacher_state = {k: v.detach().clone() for k, v in t_model.state_dict().items()}
    epochs = 2
    context = DistillContext(s_model, t_model, data, student.feature_points, teacher.feature_points,
                             student.attention_points, teacher.attention_points, epochs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. CRD capping its negatives on a tiny split
        extra = _call(label, "setup()", distiller.setup, context, refusable=True)
    if not isinstance(extra, (list, tuple)) or not all(isinstance(m, nn.Module) for m in extra):
        _fail(label, "setup()", f"returned {extra!r}", "return a list of nn.Module (empty if none)")
    declared = {id(p): p for m in extra for p in m.parameters()}
    teacher_ids = {id(p) for p in t_model.parameters()}
    student_ids = {id(p) for p in s_model.parameters()}
    if declared.keys() & teacher_ids:
        _fail(label, "setup()", "returned modules that hold the teacher's parameters as extra "
              "trainable modules", "never train the teacher: build new adapter modules instead "
              "(copy a teacher layer with copy.deepcopy if you need its weights)")
    if declared.keys() & student_ids:
        _fail(label, "setup()", "returned modules that hold the student's parameters",
              "return only the new adapters: the student is trained anyway")
    if t_model.training:
        _fail(label, "setup()", "left the teacher in training mode", "leave the teacher in eval mode")

    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.train), generator=g)
    s_model.train()
    for m in extra:
        m.train()
    terms = _call(label, "loss()", _batch_terms, distiller, student, teacher, data, order[:batch_size], 1,
                  epochs)
    total = _check_terms(label, terms, "first")
    total.backward()

    if not any(_nonzero(p.grad) for p in s_model.parameters()):
        _fail(label, "student gradients", "the summed loss gives no gradient to any student parameter",
              "compute the loss from the student's outputs without detaching them")
    leaked = [n for n, p in t_model.named_parameters() if p.requires_grad or _nonzero(p.grad)]
    if leaked:
        _fail(label, "teacher isolation", f"gradients reach the teacher's parameters {leaked[:5]}",
              "keep the teacher frozen: never call requires_grad_(True) on its parameters, "
              "detach teacher features, and train copies rather than teacher modules")
    dead = []
    for i, m in enumerate(extra):
        for n, p in m.named_parameters():
            if p.requires_grad and not _nonzero(p.grad):
                dead.append(f"setup()[{i}].{n}")
    if dead:
        _fail(label, "adapter gradients", f"the loss gives no gradient to adapter parameters {dead[:5]}",
              "use every module setup returns in the loss, or do not return it")
    held = _held_parameters(distiller)
    undeclared = [path for pid, (path, p) in held.items()
                  if pid not in declared and pid not in teacher_ids and pid not in student_ids]
    if undeclared:
        _fail(label, "undeclared adapters", f"the distiller holds parameters that setup() did not "
              f"return: {undeclared[:5]}; they would never be trained nor counted as training cost",
              "return every module with parameters from setup()")

    s_model.zero_grad(set_to_none=True)
    for m in extra:
        m.zero_grad(set_to_none=True)
    terms2 = _call(label, "loss()", _batch_terms, distiller, student, teacher, data,
                   order[batch_size:2 * batch_size], 2, epochs)
    _check_terms(label, terms2, "second").backward()
    changed = [k for k, v in t_model.state_dict().items() if not torch.equal(v, teacher_state[k])]
    if changed:
        _fail(label, "teacher isolation", f"the teacher's state changed: {changed[:5]}",
              "never modify the teacher (it is cached and shared by every student)")
    return {"pair": pair, "terms": {k: float(v.detach()) for k, v in terms.items()},
            "extra_params": sum(p.numel() for p in declared.values())}


def check_distiller(cls, params: dict | None = None, *, pair: str | None = None, seed: int = 0,
                    batch_size: int = 16) -> dict[str, Any]:
    """A distiller's ``setup`` and two batches of ``loss`` on a tiny teacher/student pair, as
    ``training.fit`` runs them.

    The terms must be named finite scalars; their sum must give gradients to the student and
    to every parameter of the modules ``setup`` returned, and none to the (frozen) teacher,
    whose state must not change; any module with parameters the distiller keeps but did not
    return from ``setup`` is an error (it would be neither trained nor counted). ``paper``
    must cite the method and ``category`` be response, feature or relation.

    ``pair``: ``mlp`` (vectors), ``cnn`` (conv feature maps) or ``gpt`` (token sequences with
    padding, attention maps); by default ``gpt`` for ``needs_attention`` and otherwise the
    first pair whose ``setup`` does not refuse it with ``ValueError``.
    """
    label = _label("distiller", cls)
    if not isinstance(cls, type) or cls.category not in CATEGORIES:
        _fail(label, "category", f"is {getattr(cls, 'category', None)!r}", f"set it to one of {CATEGORIES}")
    if not isinstance(cls.paper, str) or not cls.paper.strip():
        _fail(label, "paper", "is empty", "cite the method's paper (authors, title, venue, year)")
    if pair is not None and pair not in PAIRS:
        raise ValueError(f"pair must be one of {', '.join(PAIRS)}, got {pair!r}")
    candidates = [pair] if pair else (["gpt"] if cls.needs_attention else list(PAIRS))
    refused = {}
    for candidate in candidates:
        distiller = _build("distiller", cls, params)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                return _run_distiller(label, distiller, candidate, seed, batch_size)
            except _Refused as exc:
                refused[candidate] = str(exc)
    _fail(label, "setup()", f"refused every tiny teacher/student pair: {refused}",
          "serve at least one of the mlp, cnn or gpt pairs, or pass pair= with parameters it accepts")


# ---------------------------------------------------------------- compressors
class _TinyTask(Task):
    name = "conformance-tiny"
    description = "the tiny data of kdbench.testing"


def _finetune(data: TaskData, teacher_spec: tuple[str, dict], teacher: nn.Module, seed: int,
              log: list) -> Callable[..., list[dict]]:
    """``CompressionContext.finetune`` as the runner provides it: ``fit`` with a short
    budget, with a distiller named as in an experiment file when given."""
    def finetune(model: nn.Module, epochs: int, distill: Any = None) -> list[dict]:
        training = Training(epochs=epochs, batch_size=64, lr=1e-3, checkpoint="last")
        kwargs: dict[str, Any] = {}
        if distill is not None:
            plugins = get_plugins()
            ref = parse_ref(plugins, "distiller", distill, "finetune.distill")
            distiller = plugins.get("distiller", ref.name).build(ref.params)
            family = _family(teacher_spec)
            t = Teacher(copy.deepcopy(teacher), family.feature_points(teacher),
                        family.attention_points(teacher))
            s = Tapped(model, family.feature_points(model), family.attention_points(model))
            extra = distiller.setup(DistillContext(model, t.model, data, s.feature_points, t.feature_points,
                                                   s.attention_points, t.attention_points, epochs))
            kwargs = {"distiller": distiller, "teacher": t, "student": s, "extra_modules": extra}
        history = fit(model, data, _TinyTask(), training, seed, **kwargs)
        log.append({"epochs": epochs, "distill": distill})
        return history
    return finetune


def _matches(name: str, skip: Any) -> bool:
    patterns = skip if isinstance(skip, (list, tuple)) else ()
    return any(fnmatch.fnmatchcase(name, str(p)) for p in patterns)


def _prunable_weights(model: nn.Module, skip: Any) -> dict[str, torch.Tensor]:
    return {name: m.weight.detach() for name, m in model.named_modules()
            if isinstance(m, PRUNABLE) and isinstance(getattr(m, "weight", None), torch.Tensor)
            and not _matches(name, skip)}


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _rank_one(weight: torch.Tensor) -> torch.Tensor:
    """The rank-one tensor ``s * a (x) b (x) ...`` from the leading singular vector of each
    mode's unfolding: a matrix of rank one, a kernel of CP rank one."""
    factors = []
    for mode in range(weight.dim()):
        unfolded = weight.movedim(mode, 0).reshape(weight.shape[mode], -1)
        factors.append(torch.linalg.svd(unfolded, full_matrices=False)[0][:, 0])
    outer = factors[0]
    for f in factors[1:]:
        outer = torch.einsum("...,k->...k", outer, f)
    return (weight * outer).sum() * outer


def _make_low_rank(model: nn.Module) -> None:
    """Every Linear and Conv weight replaced by a rank-one tensor, every bias (and batch-norm
    shift) zeroed: any rank rule keeps rank one, so a correct decomposition reproduces this
    model exactly, and without biases the outputs depend on the weights alone."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PRUNABLE):
                m.weight.copy_(_rank_one(m.weight))
            if isinstance(m, (*PRUNABLE, nn.modules.batchnorm._BatchNorm)) and m.bias is not None:
                m.bias.zero_()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.zero_()


def _compress(label: str, compressor, model_name: str, seed: int, low_rank: bool = False):
    """(original, returned, deployable, data, finetune log, report) for one tiny trained
    model (made rank one with ``low_rank``); the compressor works on a copy."""
    teacher_spec, _, data_kind = PAIRS[model_name]
    data = _data(data_kind, seed)
    _, original = _model(teacher_spec, data_kind, seed, trained=True)
    _, teacher = _model(teacher_spec, data_kind, seed, trained=True)
    if low_rank:
        _make_low_rank(original)
    g = torch.Generator().manual_seed(seed)
    calibration = torch.randperm(len(data.train), generator=g)[:64]
    log: list = []
    context = CompressionContext(data=data, calibration=data.train.tensors[0][calibration], teacher=teacher,
                                 seed=seed, calibration_targets=data.train.tensors[1][calibration],
                                 finetune=_finetune(data, teacher_spec, teacher, seed, log))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        returned = _call(label, "apply()", compressor.apply, copy.deepcopy(original), context,
                         refusable=True)
    if not isinstance(returned, nn.Module):
        _fail(label, "apply()", f"returned {type(returned).__name__}", "return the compressed nn.Module")
    deployable = export(returned)
    x = data.test.tensors[0]
    out, ref = _outputs(deployable, x), _outputs(original, x)
    if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
        _fail(label, "compressed model", f"outputs {tuple(getattr(out, 'shape', ()))}, the original "
              f"{tuple(ref.shape)}", "keep the model's interface: same inputs, same logits shape")
    if not bool(torch.isfinite(out).all()):
        _fail(label, "compressed model", "gives non-finite outputs", "check the compressed weights")
    report = compressor.report()
    if not isinstance(report, dict):
        _fail(label, "report()", f"returned {type(report).__name__}", "return a dict")
    return original, returned, deployable, data, log, report


def _check_materialized(label: str, cls, original: nn.Module, deployable: nn.Module,
                        sparse_files: bool) -> dict[str, Any]:
    """``materialized`` against the artifact: True must ship fewer bytes or fewer parameters;
    False must not remove parameters, nor shrink the file unless it is a pruner's (masked
    zeros legitimately ship as CSR matrices while dense kernels still compute them)."""
    before_bytes, after_bytes = serialized_bytes(export(original)), serialized_bytes(deployable)
    before_params, after_params = count_parameters(original)[0], count_parameters(deployable)[0]
    smaller = after_bytes < before_bytes or after_params < before_params
    sizes = (f"{after_bytes} bytes and {after_params} parameters against the original's "
             f"{before_bytes} bytes and {before_params} parameters")
    if cls.materialized and not smaller:
        _fail(label, "materialized", f"is True but the shipped artifact is not smaller: {sizes}",
              "ship the compressed form (packed weights, thinner layers), or set materialized = False")
    if not cls.materialized:
        if after_params < before_params or (not sparse_files and after_bytes < 0.9 * before_bytes):
            _fail(label, "materialized", f"is False but the shipped artifact is smaller: {sizes}",
                  "set materialized = True: the leaderboard marks it as simulated otherwise")
    return {"bytes_before": before_bytes, "bytes_after": after_bytes,
            "params_before": before_params, "params_after": after_params}


def _check_trainable(label: str, cls, returned: nn.Module, data: TaskData) -> None:
    """``trainable_after = True`` promises later training stages work on the result."""
    if not cls.trainable_after:
        return
    x, y = data.train.tensors[0][:16], data.train.tensors[1][:16]
    returned.train()
    params = [p for p in returned.parameters() if p.requires_grad]
    try:
        loss = F.cross_entropy(*rows(returned(x), y), ignore_index=-100)
        loss.backward()
    except Exception as exc:  # noqa: BLE001 - whatever breaks training breaks the promise
        _fail(label, "trainable_after", f"is True but a training step fails: {type(exc).__name__}: {exc}",
              "set trainable_after = False", exc)
    if not any(_nonzero(p.grad) for p in params):
        _fail(label, "trainable_after", "is True but a training step reaches no parameter",
              "set trainable_after = False, or keep trainable parameters")


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


def _agreement(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.argmax(-1) == ref.argmax(-1)).float().mean())


def _claimed_sparsity(params: dict[str, Any], report: dict) -> tuple[float | None, str]:
    for key in ("sparsity", "ratio"):
        if isinstance(params.get(key), (int, float)) and not isinstance(params.get(key), bool):
            return float(params[key]), f"its parameter {key}={params[key]}"
    if isinstance(params.get("n"), int) and isinstance(params.get("m"), int) and params["m"]:
        return 1 - params["n"] / params["m"], f"its pattern n:m = {params['n']}:{params['m']}"
    for key in ("weight_sparsity", "sparsity"):
        if isinstance(report.get(key), (int, float)):
            return float(report[key]), f"report()['{key}'] = {report[key]}"
    return None, ""


def _check_left_dense(label: str, report: dict, original: nn.Module, deployable: nn.Module,
                      structural: bool) -> list[str]:
    """The layers ``report()['skipped_layers']`` says were left dense (module path -> reason):
    real layers whose weights are untouched (masks leave their tensors in place; a structural
    pruner may still shrink their inputs). The check measures sparsity without them."""
    left = report.get("skipped_layers", {})
    if not isinstance(left, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                             for k, v in left.items()):
        _fail(label, "report()", f"skipped_layers is {left!r}", "map each module path left dense "
              "to the reason, e.g. {'block1.0': '9 weights per output, not a multiple of 4'}")
    before = _prunable_weights(original, ())
    after = _prunable_weights(deployable, ())
    for name in left:
        if name not in before:
            _fail(label, "report()", f"skipped_layers names '{name}', not a Linear/Conv layer of the "
                  f"model (those are {sorted(before)})", "name the module paths left dense")
        if not structural and not torch.equal(after.get(name, torch.empty(0)), before[name]):
            _fail(label, "report()", f"skipped_layers names '{name}', but its weights changed",
                  "list only the layers left dense, or leave them dense")
    return list(left)


def check_pruner(cls, params: dict | None = None, *, tolerance: float = 0.05, seed: int = 0,
                 models: tuple[str, ...] | None = None) -> dict[str, Any]:
    """A pruner's sparsity is the one it claims, and the pruned model still runs.

    Applied to a tiny trained MLP (and a CNN when ``materialized``: structured pruning), then
    folded by ``kdbench.measure.export``. The measured sparsity is the fraction of the dense
    model's Linear/Conv weights that are zero or gone afterwards, leaving out the layers in a
    ``skip`` parameter and those ``report()['skipped_layers']`` names as left dense (these
    must be real layers with untouched weights); it must be within ``tolerance`` of the claim
    (``sparsity``, ``ratio`` or ``n``/``m`` in the parameters, else
    ``report()['weight_sparsity']``) -- at least the claim when whole structures were
    removed, which removes more weights than channels -- and ``report()['weight_sparsity']``
    and ``['overall_sparsity']`` (over every Linear/Conv weight), when given, must be the
    truth. ``materialized`` must match the artifact (parameters removed, or not).
    """
    label = _label("pruner", cls)
    results = {}
    for model_name in models or (("mlp", "cnn") if cls.materialized else ("mlp",)):
        pruner = _build("pruner", cls, params)
        p = _params_dict(pruner)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                original, returned, deployable, data, log, report = _compress(
                    label, pruner, model_name, seed)
            except _Refused as exc:
                _fail(label, "apply()", f"refused a tiny trained {model_name}: {exc}",
                      "prune plain Linear/Conv models, or pass parameters that serve them", exc)
        structural = count_parameters(deployable)[0] < count_parameters(original)[0]
        left_dense = _check_left_dense(label, report, original, deployable, structural)
        skip = [*(p.get("skip") or ()), *left_dense]
        dense = _prunable_weights(original, skip)
        after = _prunable_weights(deployable, skip)
        total = sum(w.numel() for w in dense.values())
        kept = sum(int(torch.count_nonzero(w)) for w in after.values())
        measured = 1 - kept / total
        claim, source = _claimed_sparsity(p, report)
        where = f"on a tiny {model_name}"
        if claim is None:
            if measured <= 0:
                _fail(label, "sparsity", f"nothing was pruned {where}", "remove or zero some weights")
        elif structural and measured < claim - tolerance:
            _fail(label, "sparsity", f"{source} claims {claim:.3f} but only {measured:.3f} of the "
                  f"weights are gone {where}", "remove as much as the parameters say")
        elif not structural and abs(measured - claim) > tolerance:
            _fail(label, "sparsity", f"{source} claims {claim:.3f} but {measured:.3f} of the weights "
                  f"are zero {where} (tolerance {tolerance})",
                  "prune exactly the fraction the parameters name (count the zeros you leave)")
        reported = report.get("weight_sparsity")
        if isinstance(reported, (int, float)) and not structural and abs(reported - measured) > tolerance:
            _fail(label, "report()", f"says weight_sparsity {reported:.3f} but {measured:.3f} is measured "
                  f"{where}", "report the sparsity the model really has")
        overall = report.get("overall_sparsity")
        if isinstance(overall, (int, float)) and not structural:
            every = _prunable_weights(deployable, ())
            truth = 1 - sum(int(torch.count_nonzero(w)) for w in every.values()) / sum(
                w.numel() for w in every.values())
            if abs(overall - truth) > tolerance:
                _fail(label, "report()", f"says overall_sparsity {overall:.3f} but {truth:.3f} of all "
                      f"Linear/Conv weights are zero {where}", "count every Linear/Conv weight, "
                      "the layers left dense included")
        sizes = _check_materialized(label, cls, original, deployable, sparse_files=True)
        _check_trainable(label, cls, returned, data)
        results[model_name] = {"sparsity": measured, "claimed": claim, "structural": structural,
                               "finetune_calls": len(log), **sizes}
    return results


def _check_fidelity(kind: str, cls, params: dict | None, tolerance: float, model: str | None,
                    seed: int, low_rank: bool = False) -> dict[str, Any]:
    label = _label(kind, cls)
    refused = {}
    for model_name in [model] if model else ["mlp", "cnn"]:
        compressor = _build(kind, cls, params)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                original, returned, deployable, data, log, report = _compress(
                    label, compressor, model_name, seed, low_rank)
            except _Refused as exc:
                refused[model_name] = str(exc)
                continue
        x = data.test.tensors[0]
        out, ref = _outputs(deployable, x), _outputs(original, x)
        error, agreement = _relative_error(out, ref), _agreement(out, ref)
        if error > tolerance:
            what = f"rank-one {model_name}" if low_rank else f"trained {model_name}"
            _fail(label, "fidelity", f"on a tiny {what} the relative logit error is "
                  f"{error:.3f} (argmax agreement {agreement:.2f}), above the tolerance {tolerance}",
                  "keep the compressed model close to the original (check the reconstruction), or "
                  "pass a tolerance that states this method's expected error")
        sizes = _check_materialized(label, cls, original, deployable, sparse_files=False)
        _check_trainable(label, cls, returned, data)
        return {"model": model_name, "relative_error": error, "agreement": agreement,
                "finetune_calls": len(log), "report": report, **sizes}
    _fail(label, "apply()", f"refused every tiny trained model: {refused}",
          "compress plain Linear/Conv models, or pass model= and parameters that serve one")


def check_quantizer(cls, params: dict | None = None, *, tolerance: float = 0.2,
                    model: str | None = None, seed: int = 0) -> dict[str, Any]:
    """A quantizer keeps the outputs of a tiny trained model close to the original's
    (relative logit error ``||y_q - y|| / ||y||`` at most ``tolerance``), its
    ``materialized`` flag matches the shipped artifact (``serialized_bytes`` or the
    parameter count must shrink when True; when False neither may: no parameter removed,
    the file not 10% smaller), and ``trainable_after`` holds. ``model``: ``mlp`` or ``cnn``;
    by default the MLP, else the CNN if the MLP is refused with ``ValueError``."""
    return _check_fidelity("quantizer", cls, params, tolerance, model, seed)


def check_decomposer(cls, params: dict | None = None, *, tolerance: float = 0.05,
                     model: str | None = None, seed: int = 0) -> dict[str, Any]:
    """As ``check_quantizer`` for low-rank decomposition, on a tiny model whose Linear and
    Conv weights are made exactly rank one (CP rank one for kernels) with zero biases: every
    rank rule keeps rank one, so a correct factorization reproduces the outputs up to float
    error, while a wrong factor order, scale or reshape shows at once. (On a full-rank model
    a truncated rank changes the function by design, which says nothing about the code.)"""
    return _check_fidelity("decomposer", cls, params, tolerance, model, seed, low_rank=True)


# ---------------------------------------------------------------- executors
def conformance_job(job: int) -> tuple[str, int, int]:
    """The job the executor check runs: module-level, so it pickles by reference."""
    return ("done", job, job * job)


def check_executor(cls, params: dict | None = None, *, jobs: int = 5,
                   max_in_flight: int | None = None) -> dict[str, Any]:
    """An executor's lifecycle: ``start()``, ``map`` twice (the runner maps teachers, then
    student cells) over a lazy iterator of jobs with a picklable module-level function,
    each job's result exactly once and nothing reported lost, then ``close()`` twice (it
    must be idempotent: the runner also closes after errors). With ``max_in_flight`` (by
    default the ``workers`` parameter when positive) it also checks that jobs are taken
    from the iterator only when a worker is free."""
    label = _label("executor", cls)
    executor = _build("executor", cls, params)
    if max_in_flight is None:
        workers = _params_dict(executor).get("workers")
        max_in_flight = workers if isinstance(workers, int) and workers > 0 else None
    lost_calls: list = []

    def lost(job, reason):
        lost_calls.append((job, reason))
        return ("lost", job, reason)

    phases = [list(range(0, min(2, jobs))), list(range(100, 100 + jobs))]
    start = time.perf_counter()
    peak = 0
    try:
        _call(label, "start()", executor.start)
        for phase in phases:
            taken = [0]

            def lazy(items=phase, taken=taken) -> Iterator[int]:
                for item in items:
                    taken[0] += 1
                    yield item

            results = _call(label, "map()", executor.map, conformance_job, lazy(), lost)
            if not isinstance(results, Iterator):
                _fail(label, "map()", f"returned {type(results).__name__}",
                      "yield (job, result) pairs as jobs finish (make map a generator)")
            seen: list[int] = []
            try:
                for item in results:
                    if not isinstance(item, tuple) or len(item) != 2:
                        _fail(label, "map()", f"yielded {item!r}", "yield (job, fn(job)) pairs")
                    job, result = item
                    peak = max(peak, taken[0] - len(seen))
                    # + 1: a job that finished frees its worker before its result is yielded.
                    if max_in_flight is not None and taken[0] - len(seen) > max_in_flight + 1:
                        _fail(label, "lazy jobs", f"{taken[0]} jobs were taken from the iterator when "
                              f"{len(seen)} had finished, more than its {max_in_flight} workers run",
                              "take a job from the iterator only when a worker is free to start it")
                    if job in seen:
                        _fail(label, "map() results", f"job {job!r} came back twice",
                              "yield each job taken from the iterator exactly once")
                    seen.append(job)
                    if lost_calls:
                        _fail(label, "lost jobs", f"job {lost_calls[0][0]} was reported lost: "
                              f"{lost_calls[0][1]}", "report a job lost only when its worker died")
                    if result != conformance_job(job):
                        _fail(label, "map() results", f"job {job!r} came back with {result!r}, "
                              f"expected {conformance_job(job)!r}", "yield fn(job) for each job")
            except AssertionError:
                raise
            except Exception as exc:  # noqa: BLE001 - fn never raises, so this is the executor's
                _fail(label, "map()", f"raised {type(exc).__name__}: {exc}",
                      "fn never raises: report a dead worker through lost(job, reason) and go on", exc)
            if sorted(seen) != sorted(phase):
                missing, unknown = sorted(set(phase) - set(seen)), sorted(set(seen) - set(phase))
                _fail(label, "map() results", f"every job must come back exactly once; jobs "
                      f"{missing} never did" + (f", and unknown jobs {unknown} did" if unknown else ""),
                      "yield each job taken from the iterator exactly once")
    except BaseException:
        with contextlib.suppress(Exception):
            executor.close()
        raise
    _call(label, "close()", executor.close)
    try:
        executor.close()
    except Exception as exc:  # noqa: BLE001 - any error here breaks the runner's cleanup
        _fail(label, "close()", f"a second close() raised {type(exc).__name__}: {exc}",
              "make close() idempotent (the runner closes after errors too)", exc)
    return {"jobs": sum(len(p) for p in phases), "seconds": time.perf_counter() - start,
            "peak_in_flight": peak}
