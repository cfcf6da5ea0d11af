"""Paper-scale experiment files: they load, validate, expand to the published grid, and run
end to end (one short epoch) on small CIFAR files written in the official format."""

from __future__ import annotations

import warnings

import pytest
import torch

from kdbench.config import embedded_experiments, load_experiment
from kdbench.runner import run_experiment
from kdbench.store import Store
from kdbench_plugins.tasks.cifar import CIFAR100_FILES
from test_tasks_images import write_cifar

CRD_PAIRS = [("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"),
             ("wrn-40-2", "wrn-16-2"), ("wrn-40-2", "wrn-40-1"), ("vgg13", "vgg8")]


@pytest.mark.parametrize("name", sorted(embedded_experiments()))
def test_every_embedded_experiment_validates(plugins, name):
    experiment = load_experiment(name, plugins)
    assert experiment.name == name and experiment.cells()


def test_cifar100_crd_is_the_published_protocol(plugins):
    exp = load_experiment("cifar100-crd", plugins)
    assert [(p.teacher.label(), p.student.label()) for p in exp.pairs] == CRD_PAIRS
    assert exp.training == {"epochs": 240, "batch_size": 64, "optimizer": "sgd", "lr": 0.05,
                            "momentum": 0.9, "weight_decay": 0.0005, "schedule": "multistep",
                            "milestones": [150, 180, 210], "gamma": 0.1}
    kd = exp.recipes["kd"][0].ref.params
    assert (kd.temperature, kd.alpha) == (4.0, 0.9)
    assert list(exp.recipes) == ["scratch", "kd", "dkd", "dist", "fitnet", "at", "sp", "cc", "vid", "rkd",
                                 "pkt", "nst", "crd", "crd+kd"]
    assert len(exp.cells()) == 6 * 14 * 3
    assert len({c.teacher_job(plugins).teacher_key for c in exp.cells()}) == 5 * 3  # wrn-40-2 shared


def test_cifar100_crd_runs_one_short_epoch_on_official_format_files(plugins, tmp_path, isolated_cache,
                                                                    monkeypatch):
    write_cifar(tmp_path, CIFAR100_FILES, 300, 100, byte_keys=True)
    monkeypatch.setenv("KDBENCH_DATA_DIR", str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exp = load_experiment("cifar100-crd", plugins, [
            "training.epochs=1", "seeds=[0]", "tasks=[{name: cifar100, val_size: 100}]",
            "pairs=[{teacher: {name: resnet, arch: resnet8}, student: {name: resnet, arch: resnet8}}]",
            "measure.latency_repeats=1", "measure.latency_batch_sizes=[1]"])
        with Store(tmp_path / "r.db") as store:
            summary = run_experiment(exp, store, plugins, isolated_cache, progress=None)
            records = store.records()
    finally:
        torch.set_num_threads(threads)
    assert summary.exit_code == 0, [r.error for r in summary.failed]
    kd = next(r for r in records if r.recipe == "kd")
    assert kd.stages[0]["history"][0]["lr"] == pytest.approx(0.05)
    assert 0 <= kd.metrics["test_accuracy"] <= 1 and kd.metrics["params"] > 70_000


@pytest.mark.parametrize("pair", range(len(CRD_PAIRS)), ids=[f"{t}-{s}" for t, s in CRD_PAIRS])
def test_every_cifar100_crd_method_serves_every_published_pair(plugins, pair):
    """Each method's default taps fit the real architectures: setup sizes its adapters from a
    probe, and one loss on a CIFAR-shaped batch is finite and has gradients for the student's
    outputs and for every adapter."""
    from torch.utils.data import TensorDataset

    from kdbench.contracts import DistillContext, Outputs, TaskData
    from kdbench.training import capture_features

    exp = load_experiment("cifar100-crd", plugins)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.tensor([0, 1, 2, 1])
    data = TaskData(*[TensorDataset(x, y)] * 3, (3, 32, 32), 100)
    p = exp.pairs[pair]
    families = [plugins.get("model", ref.name).build(ref.params) for ref in (p.student, p.teacher)]
    torch.manual_seed(0)
    student, teacher = (f.build(data) for f in families)
    teacher.eval()
    s_points, t_points = (f.feature_points(m) for f, m in zip(families, (student, teacher)))
    # One forward pass per model, shared by every method; each method's loss is differentiated
    # back to the student's outputs and its own adapters only.
    with capture_features(student, s_points) as s_feats:
        s_logits = student(x)
    with torch.no_grad(), capture_features(teacher, t_points) as t_feats:
        t_logits = teacher(x)
    s_feats, t_feats = dict(s_feats), dict(t_feats)
    for name, stages in exp.recipes.items():
        if stages[0].ref is None:
            continue
        distiller = plugins.get("distiller", stages[0].ref.name).build(stages[0].ref.params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # crd: nce_k capped to the 3 other examples
            extra = distiller.setup(DistillContext(student, teacher, data, s_points, t_points, epochs=240))
        distiller.begin_batch(torch.arange(4), 1, 240)
        terms = distiller.loss(Outputs(s_logits, s_feats), Outputs(t_logits, t_feats), y)
        loss = sum(terms.values())
        assert torch.isfinite(loss), name
        adapters = [q for m in extra for q in m.parameters() if q.requires_grad]
        grads = torch.autograd.grad(loss, [s_logits, *s_feats.values(), *adapters],
                                    retain_graph=True, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads[:1 + len(s_feats)]), name
        assert all(g is not None for g in grads[1 + len(s_feats):]), name
