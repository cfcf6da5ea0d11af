"""The MNIST-1D paper's baselines (Greydanus & Kobak, ICML 2024): its models, its protocol, and
the report that puts kdbench's numbers next to the published ones."""

from __future__ import annotations

import importlib.util
import math

import pandas as pd
import pytest
import torch
from torch import nn

from kdbench.cli import main
from kdbench.config import base_training, load_experiment
from kdbench.report.published import architecture, compare, published, to_table
from kdbench.report.summary import frame, summarize
from kdbench.store import Store
from kdbench.testing import check_model
from kdbench.testing.checks import tiny_signal_data

needs_mnist1d = pytest.mark.skipif(importlib.util.find_spec("mnist1d") is None,
                                   reason="needs the optional package mnist1d")

CONVBASE = {"channels": [25, 25, 25], "kernel_sizes": [5, 3, 3], "stride": 2, "padding": 1,
            "pool": False, "batch_norm": False, "hidden": 0}
PAPER_MODELS = {"LinearBase": ("mlp", {"hidden": []}),
                "MLPBase": ("mlp", {"hidden": [100, 100], "residual": True}),
                "ConvBase": ("cnn", CONVBASE),
                "GRUBase": ("gru", {})}


@pytest.fixture(autouse=True)
def one_thread():
    """Recurrent layers on a busy machine slow down badly with more threads than cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def signals(batch: int = 8, length: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, length, generator=generator), torch.randint(0, 10, (batch,), generator=generator)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(plugins, name: str, params: dict) -> nn.Module:
    torch.manual_seed(0)
    return plugins.build("model", name, params).build(tiny_signal_data())  # (40,) signals, 10 classes


# ---------------------------------------------------------------- the models
def gru_parameters(inputs: int, hidden: int, directions: int, steps: int, classes: int) -> int:
    # Per direction, three gates (reset, update, new), each with input and recurrent weights
    # and PyTorch's two bias vectors; the classifier reads every step of every direction.
    recurrent = directions * 3 * (hidden * inputs + hidden * hidden + 2 * hidden)
    return recurrent + (steps * directions * hidden * classes + classes)


def test_the_gru_has_the_papers_architecture_and_parameter_count(plugins):
    model = build(plugins, "gru", {})
    assert count(model) == gru_parameters(1, 6, 2, 40, 10) == 5134  # GRUBase prints 5134
    gru = model.rnn.gru
    assert (gru.input_size, gru.hidden_size, gru.num_layers, gru.bidirectional) == (1, 6, 1, True)
    assert model.head.in_features == 40 * 2 * 6
    one_way = build(plugins, "gru", {"hidden": 8, "bidirectional": False})
    assert count(one_way) == gru_parameters(1, 8, 1, 40, 10)


def test_the_gru_trains_on_mnist1d_shaped_signals(plugins):
    model = build(plugins, "gru", {})
    x, y = signals()
    logits = model(x)
    assert logits.shape == (8, 10) and torch.isfinite(logits).all()
    loss = nn.functional.cross_entropy(logits, y)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.rnn.gru.weight_hh_l0_reverse.grad.abs().sum() > 0  # both directions learn
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(10):
        optimizer.zero_grad()
        step = nn.functional.cross_entropy(model(x), y)
        step.backward()
        optimizer.step()
    assert step.item() < loss.item()


def test_the_gru_reads_each_sample_as_a_time_step(plugins):
    # The output at step t of the forward direction depends on samples 0..t only.
    model = build(plugins, "gru", {"bidirectional": False})
    x, _ = signals(2)
    changed = x.clone()
    changed[:, 30:] += 1.0
    a, b = model.rnn(x), model.rnn(changed)
    assert a.shape == (2, 40, 6)
    assert torch.allclose(a[:, :30], b[:, :30]) and not torch.allclose(a[:, 30:], b[:, 30:])


def test_the_gru_passes_the_model_conformance_check():
    from kdbench_plugins.models.gru import GRU

    result = check_model(GRU)
    assert set(result["declared"]) == {"signals"}


def test_the_papers_cnn_mlp_and_logistic_regression_are_parameters_of_existing_families(plugins):
    cnn = build(plugins, "cnn", CONVBASE)
    assert count(cnn) == 5210  # ConvBase: 150 + 1,900 + 1,900 + 1,260
    convs = [m for m in cnn.modules() if isinstance(m, nn.Conv1d)]
    assert [(c.kernel_size[0], c.stride[0], c.padding[0], c.bias is not None) for c in convs] == \
        [(5, 2, 1, True), (3, 2, 1, True), (3, 2, 1, True)]
    assert not any(isinstance(m, (nn.MaxPool1d, nn.BatchNorm1d)) for m in cnn.modules())
    assert cnn.head.in_features == 25 * 5  # lengths 40 -> 19 -> 10 -> 5
    mlp = build(plugins, "mlp", {"hidden": [100, 100], "residual": True})
    assert count(mlp) == 15210  # MLPBase
    x, _ = signals(3)
    h = torch.relu(mlp.fc1(x))
    assert torch.allclose(mlp(x), mlp.head(h + torch.relu(mlp.res2.fc(h))))
    linear = build(plugins, "mlp", {"hidden": []})
    assert count(linear) == 410 and [type(m) for m in linear.children()] == [nn.Flatten, nn.Linear]


def test_new_options_leave_existing_cells_alone(plugins):
    from kdbench.config import parse_ref

    for kind, spec in (("model", {"name": "cnn"}), ("model", {"name": "mlp", "hidden": [100, 100]}),
                       ("task", {"name": "mnist1d"})):
        ref = parse_ref(plugins, kind, spec, "x")
        assert not {"kernel_sizes", "stride", "padding", "pool", "residual", "val_source"} & set(ref.spec())


# ---------------------------------------------------------------- the protocol
def test_the_experiment_is_the_papers_protocol(plugins):
    experiment = load_experiment("mnist1d-paper", plugins)
    assert experiment.seeds == (0, 1, 2)
    (task,) = experiment.tasks
    assert task.name == "mnist1d" and task.params.val_source == "generated"
    assert (task.params.num_samples, task.params.data_seed) == (5000, 42)  # get_dataset_args
    training = base_training(task, plugins, experiment.training)
    steps_per_epoch = 4000 // training.batch_size
    assert training.epochs * steps_per_epoch == 6000  # total_steps of the reference notebook
    assert (training.optimizer, training.lr, training.weight_decay, training.batch_size) == ("adam", 0.01, 0.0, 100)
    assert training.schedule == "constant" and training.checkpoint == "last"
    assert all(not pair.teacher_training and not pair.student_training for pair in experiment.pairs)
    assert set(experiment.recipes) == {"scratch"}
    labels = {c.labels()[role] for c in experiment.cells() for role in ("teacher", "student")}
    assert {architecture(label) for label in labels} == set(PAPER_MODELS)
    known = set(published("mnist1d").student_arch)
    assert set(PAPER_MODELS) <= known


@needs_mnist1d
def test_generated_validation_keeps_all_4000_training_signals(plugins):
    paper = plugins.build("task", "mnist1d", {"val_source": "generated"}).load()
    held_out = plugins.build("task", "mnist1d", {}).load()
    assert (len(paper.train), len(paper.val), len(paper.test)) == (4000, 500, 1000)
    assert (len(held_out.train), len(held_out.val)) == (3500, 500)
    assert torch.equal(paper.test.tensors[0], held_out.test.tensors[0])
    train = {tuple(row.tolist()) for row in paper.train.tensors[0]}
    assert not train & {tuple(row.tolist()) for row in paper.val.tensors[0]}
    per_class = torch.bincount(paper.val.tensors[1])
    assert len(per_class) == 10 and ((per_class - 50).abs() <= 5).all()  # stratified: 50 a class, give or take the source set's imbalance


# ---------------------------------------------------------------- published numbers
def test_published_numbers_are_the_readme_and_the_notebooks():
    table = published("mnist1d").set_index(["student_arch", "source"])
    readme = {"LinearBase": 32.0, "MLPBase": 68.0, "ConvBase": 94.0, "GRUBase": 91.0, "human": 96.0}
    notebook = {"LinearBase": 31.5, "MLPBase": 65.1, "ConvBase": 92.3, "GRUBase": 89.1}
    for model, top1 in readme.items():
        assert table.loc[(model, "mnist1d README"), "top1"] == top1
    for model, top1 in notebook.items():
        assert table.loc[(model, "mnist1d reference notebook"), "top1"] == top1
    assert (table.teacher_arch == "-").all() and table.url.str.startswith("https://").all()


def paper_summary(task: str = "mnist1d(val_source=generated)") -> pd.DataFrame:
    teacher = ("cnn(channels=[25,25,25],hidden=0,batch_norm=False,kernel_sizes=[5,3,3],stride=2,"
               "padding=1,pool=False)")
    base = {"experiment": "mnist1d-paper", "task": task, "teacher": teacher, "n": 3,
            "is_teacher": False, "recipe": "scratch", "metric": "accuracy", "test_accuracy_ci95": 0.01}
    rows = [{**base, "student": "-", "recipe": "teacher", "is_teacher": True, "test_accuracy_mean": 0.93},
            {**base, "student": "mlp(hidden=[100,100],residual=True)", "test_accuracy_mean": 0.66},
            {**base, "student": "mlp(hidden=[])", "test_accuracy_mean": 0.32},
            {**base, "student": "gru", "test_accuracy_mean": 0.90},
            {**base, "student": "mlp(hidden=[100,100])", "test_accuracy_mean": 0.60}]  # no residual: not MLPBase
    return pd.DataFrame(rows)


def test_the_comparison_maps_each_model_to_its_row():
    out = compare(paper_summary())
    readme = out[out.source == "mnist1d README"].set_index("published")
    assert len(out) == 8  # four models, two sources each; the plain mlp maps to nothing
    assert readme.loc[94.0, "recipe"] == "teacher" and readme.loc[94.0, "reproduced"] == pytest.approx(93.0)
    assert readme.loc[68.0, "student"] == "mlp(hidden=[100,100],residual=True)"
    assert readme.loc[32.0, "student"] == "mlp(hidden=[])" and readme.loc[32.0, "within_ci"] is True
    assert readme.loc[91.0, "student"] == "gru" and readme.loc[91.0, "difference"] == pytest.approx(-1.0)
    assert not (out.student == "mlp(hidden=[100,100])").any()
    notes = " ".join(to_table(out).notes)
    assert "mnist1d-paper" in notes and "5,000 images" not in notes  # no CIFAR note


def test_other_mnist1d_data_maps_to_no_published_number():
    assert compare(paper_summary("mnist1d(num_samples=500,val_source=generated)")).empty
    assert compare(paper_summary("mnist1d(data_seed=7)")).empty
    assert len(compare(paper_summary("mnist1d(val_size=400)"))) == 8  # same data, other split


@needs_mnist1d
def test_a_smoke_run_reaches_the_comparison(tmp_path, capsys):
    store = tmp_path / "r.db"
    task = "tasks=[{name: mnist1d, num_samples: 500, val_source: generated, val_size: 50}]"
    assert main(["run", "mnist1d-paper", "--set", "training.epochs=1", "--set", "seeds=[0]",
                 "--set", task, "--set", "measure.latency_repeats=1", "--set", "measure.latency_warmup=0",
                 "--set", "measure.latency_batch_sizes=[1]", "--threads", "1", "--quiet",
                 "--store", str(store), "--cache-dir", str(tmp_path / "cache")]) == 0
    records = Store(store).records("mnist1d-paper")
    assert len([r for r in records if r.error is None]) == 4  # the CNN teacher and three students
    summary = summarize(frame(records))
    label = summary.task.iloc[0]
    assert compare(summary).empty  # 500 signals are not the paper's data
    out = compare(summary, {label: "mnist1d"})
    assert set(zip(out.source, out.published)) == {
        ("mnist1d README", 94.0), ("mnist1d README", 68.0), ("mnist1d README", 32.0), ("mnist1d README", 91.0),
        ("mnist1d reference notebook", 92.3), ("mnist1d reference notebook", 65.1),
        ("mnist1d reference notebook", 31.5), ("mnist1d reference notebook", 89.1)}
    assert out.reproduced.between(0, 100).all() and not out.reproduced.isna().any()
    assert math.isnan(out.reproduced_ci95.iloc[0]) or out.n.eq(1).all()


def test_published_lists_one_dataset(capsys):
    assert main(["published", "--dataset", "mnist1d", "--format", "csv"]) == 0
    text = capsys.readouterr().out
    assert "GRUBase" in text and "cifar100" not in text
