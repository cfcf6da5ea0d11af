"""Cached teachers and teacher outputs survive crashes and concurrency: a truncated or corrupt
file is caught by its sha256 and recomputed, two processes that need the same file compute it
once, and a diverging loss says where and in which term."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdbench.teachers
from kdbench.config import Training, load_experiment
from kdbench.contracts import Distiller
from kdbench.logit_cache import TopKLogits, cached_topk
from kdbench.plugins import get_plugins
from kdbench.teachers import hash_path, lock_path, obtain_teacher, teacher_path
from kdbench.training import Teacher, fit

from conftest import TINY

ONE_EPOCH = TINY.replace("epochs: 3", "epochs: 1")


def teacher_inputs(plugins, yaml_path):
    """What obtain_teacher needs for the tiny experiment's teacher."""
    job = load_experiment(yaml_path, plugins).cells()[0].teacher_job(plugins)
    task = plugins.get("task", job.task.name).build(job.task.params)
    family = plugins.get("model", job.teacher.name).build(job.teacher.params)
    return job, task, family, task.load()


def assert_valid(path: Path):
    """The file and its hash agree, and nothing is left beside them but the lock."""
    assert hash_path(path).read_text() == f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n"
    extra = {p.name for p in path.parent.iterdir()} - {path.name, hash_path(path).name, lock_path(path).name}
    assert not extra, extra


# Each corrupts a valid cache file (and its hash) and gives the words the warning must contain.
def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    return "sha256 does not match"


def flip_middle(path):
    blob = bytearray(path.read_bytes())
    mid = len(blob) // 2
    blob[mid:mid + 8] = bytes(b ^ 0xFF for b in blob[mid:mid + 8])
    path.write_bytes(bytes(blob))  # same length: only the hash can tell
    return "sha256 does not match"


def truncated_without_hash(path):
    hash_path(path).unlink()  # no hash to check: the load itself must fail
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    return "does not load"


def unloadable(path):
    blob = b"not a torch file" * 100
    path.write_bytes(blob)
    hash_path(path).write_text(f"{hashlib.sha256(blob).hexdigest()}  {path.name}\n")
    return "does not load"


def leftover_tmp(path):
    (path.parent / f"{path.name}.abc123.tmp").write_bytes(b"half")  # a writer killed mid-write
    return truncate(path)


CORRUPTIONS = [truncate, flip_middle, truncated_without_hash, unloadable, leftover_tmp]


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_a_bad_cached_teacher_is_detected_warned_deleted_and_retrained(
        corrupt, plugins, tiny_yaml, isolated_cache, monkeypatch):
    job, task, family, data = teacher_inputs(plugins, tiny_yaml(ONE_EPOCH))
    first = obtain_teacher(job, task, family, data, isolated_cache)
    path = teacher_path(isolated_cache, job)
    assert not first.from_cache
    assert_valid(path)
    words = corrupt(path)

    calls = []
    real_fit = kdbench.teachers.fit
    monkeypatch.setattr(kdbench.teachers, "fit", lambda *a, **k: calls.append(1) or real_fit(*a, **k))
    with pytest.warns(UserWarning, match=f"{path.name}.*{words}.*retraining") as warned:
        again = obtain_teacher(job, task, family, data, isolated_cache)
    [warning] = [w for w in warned if "unusable" in str(w.message)]
    assert str(path) in str(warning.message)
    assert not again.from_cache and calls == [1]
    assert_valid(path)
    # Same seed, same weights: the retrained teacher is the one that was lost.
    for name, value in first.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], value), name
    third = obtain_teacher(job, task, family, data, isolated_cache)
    assert third.from_cache and calls == [1]


def test_a_cached_teacher_without_a_hash_is_adopted_not_retrained(plugins, tiny_yaml, isolated_cache, monkeypatch):
    """Files cached before hashes existed (or whose writer died between rename and hash) are
    whole, since they were renamed into place: they load, get their hash, and are kept."""
    job, task, family, data = teacher_inputs(plugins, tiny_yaml(ONE_EPOCH))
    obtain_teacher(job, task, family, data, isolated_cache)
    path = teacher_path(isolated_cache, job)
    hash_path(path).unlink()
    monkeypatch.setattr(kdbench.teachers, "fit", lambda *a, **k: pytest.fail("must not retrain"))
    assert obtain_teacher(job, task, family, data, isolated_cache).from_cache
    assert_valid(path)


V = 20


def tiny_lm_outputs(k: int = 5) -> TopKLogits:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(V, 8), nn.Linear(8, V))
    return TopKLogits.compute(model, torch.randint(0, V, (64, 16)), k=k)


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_bad_cached_teacher_outputs_are_detected_warned_deleted_and_recomputed(corrupt, tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return tiny_lm_outputs()

    path = tmp_path / "outputs" / "key.pt"
    first, from_cache = cached_topk(path, compute)
    assert not from_cache
    assert_valid(path)
    words = corrupt(path)
    with pytest.warns(UserWarning, match=f"{path.name}.*{words}.*recomputing") as warned:
        again, from_cache = cached_topk(path, compute)
    assert len([w for w in warned if "unusable" in str(w.message)]) == 1
    assert not from_cache and len(calls) == 2
    assert_valid(path)
    assert torch.equal(again.values, first.values) and torch.equal(again.indices, first.indices)
    _, from_cache = cached_topk(path, compute)
    assert from_cache and len(calls) == 2


def race(yaml_path: str, cache: str, markers: str, barrier) -> None:
    """One of two processes that ask for the same teacher and teacher outputs at the same moment.
    Every training or computation leaves a marker file; each is slow enough for the other process
    to arrive while it runs."""
    torch.set_num_threads(1)
    plugins = get_plugins()
    job, task, family, data = teacher_inputs(plugins, yaml_path)
    real_fit = kdbench.teachers.fit

    def counted_fit(*args, **kwargs):
        Path(markers, f"fit-{os.getpid()}").touch()
        time.sleep(1.0)
        return real_fit(*args, **kwargs)

    def counted_compute():
        Path(markers, f"topk-{os.getpid()}").touch()
        time.sleep(1.0)
        return tiny_lm_outputs()

    kdbench.teachers.fit = counted_fit
    barrier.wait(timeout=60)
    teacher = obtain_teacher(job, task, family, data, Path(cache))
    barrier.wait(timeout=60)
    _, from_cache = cached_topk(Path(cache) / "teacher-outputs" / "key.pt", counted_compute)
    Path(markers, f"from-cache-{os.getpid()}-{teacher.from_cache}-{from_cache}").touch()


def test_two_processes_needing_one_teacher_train_it_once(tiny_yaml, tmp_path, isolated_cache):
    markers = tmp_path / "markers"
    markers.mkdir()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=race, args=(str(tiny_yaml(ONE_EPOCH)), str(isolated_cache), str(markers),
                                            barrier)) for _ in range(2)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    names = sorted(p.name for p in markers.iterdir())
    assert sum(n.startswith("fit-") for n in names) == 1, names
    assert sum(n.startswith("topk-") for n in names) == 1, names
    flags = sorted(n.split("-", 3)[3] for n in names if n.startswith("from-cache-"))
    # One process trained the teacher and the other loaded it; likewise the outputs (not
    # necessarily the same process for both).
    teacher_flags = sorted(f.split("-")[0] for f in flags)
    output_flags = sorted(f.split("-")[1] for f in flags)
    assert teacher_flags == output_flags == ["False", "True"]
    [teacher_file] = (isolated_cache / "teachers").glob("*.pt")
    assert_valid(teacher_file)
    assert_valid(isolated_cache / "teacher-outputs" / "key.pt")


# ---------------------------------------------------------------- non-finite losses
class NanAfter(nn.Module):
    """A linear model whose output turns to nan from its ``after``-th training forward pass on."""

    def __init__(self, after: int):
        super().__init__()
        self.linear, self.after, self.calls = nn.Linear(64, 10), after, 0

    def forward(self, x):
        out = self.linear(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.after:
                out = out * float("nan")
        return out


class NanKD(Distiller):
    """Cross-entropy plus a 'kd' term that is nan in epoch 2."""

    def loss(self, student, teacher, targets):
        ce = F.cross_entropy(student.logits, targets)
        kd = (student.logits - teacher.logits).pow(2).mean()
        return {"ce": ce, "kd": kd * float("nan") if self.epoch == 2 else kd}


@pytest.fixture
def digits(plugins):
    task = plugins.build("task", "digits")
    return task, task.load()


def test_a_nan_model_output_names_epoch_step_and_term(digits):
    task, data = digits
    torch.manual_seed(0)
    with pytest.raises(FloatingPointError, match=r"^non-finite loss at epoch 1, step 3 \(global step 3\): "
                                                 r"term 'ce' is nan \(ce=nan\); lower the learning rate"):
        fit(NanAfter(after=3), data, task, Training(epochs=2, batch_size=64), seed=0)


def test_a_nan_distillation_term_names_epoch_step_and_term(digits):
    task, data = digits
    steps = len(data.train) // 64 + (len(data.train) % 64 > 1)  # batches per epoch (a lone one is dropped)
    torch.manual_seed(0)
    teacher = Teacher(nn.Linear(64, 10), [])
    with pytest.raises(FloatingPointError) as raised:
        fit(nn.Linear(64, 10), data, task, Training(epochs=3, batch_size=64), seed=0,
            distiller=NanKD(), teacher=teacher)
    message = str(raised.value)
    assert message.startswith(f"non-finite loss at epoch 2, step 1 (global step {steps + 1}): term 'kd' is nan (ce=")
    assert message.endswith(", kd=nan); lower the learning rate or check the distiller's inputs")


def test_a_huge_learning_rate_stops_at_its_first_non_finite_step(digits):
    task, data = digits
    torch.manual_seed(0)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at epoch \d+, step \d+ \(global step \d+\): "
                                                 r"term 'ce' is (nan|inf)"):
        fit(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), data, task,
            Training(epochs=3, batch_size=64, optimizer="sgd", lr=1e30), seed=0)


def test_a_corrupt_shared_stage_result_is_ignored_and_the_stages_train_again(plugins, tiny_yaml, tmp_path,
                                                                            isolated_cache):
    """A cached stage result that fails its sha256 is never loaded: the cell trains its stages
    itself, with the same result, and writes a good file."""
    from kdbench.runner import run_experiment
    from kdbench.stage_cache import FOLDER
    from kdbench.store import Store

    text = TINY.replace("  kd+int8: [{distill: hinton}, {quantize: dynamic-int8}]\n", "")
    experiment = load_experiment(tiny_yaml(text), plugins)
    with Store(tmp_path / "a.db") as store:
        run_experiment(experiment, store, plugins, isolated_cache, progress=None)
        first = {r.recipe: r.metrics["test_accuracy"] for r in store.records() if r.role == "student"}
    for path in (isolated_cache / FOLDER).glob("*.pt"):
        path.write_bytes(path.read_bytes()[:-10])  # truncated
    with pytest.warns(UserWarning, match="stage result .* is unusable"), Store(tmp_path / "b.db") as store:
        experiment = load_experiment(tiny_yaml(text.replace("name: tiny", "name: again")), plugins)
        run_experiment(experiment, store, plugins, isolated_cache, progress=None)
        again = {r.recipe: r.metrics["test_accuracy"] for r in store.records() if r.role == "student"}
        assert not any(e.get("from_cache") for r in store.records() if r.role == "student" for e in r.stages)
    assert again == first
