"""The training loop's options do what the experiment file says."""

from __future__ import annotations

import pytest
import torch

from kdbench.cli import main
from kdbench.config import Training
from kdbench.errors import ConfigError
from kdbench.params import parse_params
from kdbench.training import fit, lr_factor, make_optimizer


def test_multistep_schedule_decays_at_the_milestones():
    t = Training(epochs=240, schedule="multistep", milestones=(150, 180, 210), gamma=0.1)
    steps = 10
    factors = {e: lr_factor(t, e * steps, steps) for e in (0, 149, 150, 179, 180, 210, 239)}
    assert factors == pytest.approx({0: 1, 149: 1, 150: 0.1, 179: 0.1, 180: 0.01, 210: 0.001, 239: 0.001})


def test_warmup_then_cosine():
    t = Training(epochs=10, schedule="cosine", warmup_epochs=2)
    steps = 5
    assert lr_factor(t, 0, steps) == pytest.approx(1 / 10)
    assert lr_factor(t, 9, steps) == pytest.approx(1.0)
    assert lr_factor(t, 10, steps) == pytest.approx(1.0)  # warm-up done: cosine starts at 1
    assert lr_factor(t, 30, steps) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(t, 50, steps) == pytest.approx(0.0, abs=1e-9)


def test_sgd_options_reach_the_optimizer():
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = make_optimizer(params, Training(optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True,
                                          weight_decay=5e-4))
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.05, 0.9, True, 5e-4)


@pytest.mark.parametrize("raw, message", [
    ({"schedule": "multistep"}, "needs milestones"),
    ({"schedule": "multistep", "milestones": [20, 10]}, "must be increasing"),
    ({"optimizer": "adam", "nesterov": True}, "sgd optimizer only"),
    ({"label_smoothing": 1.0}, "label_smoothing"),
])
def test_inconsistent_training_blocks_are_rejected(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_params(Training, raw, "training")


def test_history_records_validation_and_test_per_epoch_and_the_chosen_one(plugins):
    data = plugins.build("task", "digits").load()
    task = plugins.build("task", "digits")
    torch.manual_seed(0)
    model = plugins.build("model", "mlp", {"hidden": [16]}).build(data)
    history = fit(model, data, task, Training(epochs=4, label_smoothing=0.1), seed=0)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert all({"val_accuracy", "test_accuracy", "loss_ce", "lr"} <= set(r) for r in history)
    chosen = [r for r in history if r.get("chosen")]
    assert len(chosen) == 1
    assert chosen[0]["val_accuracy"] == max(r["val_accuracy"] for r in history)
    # the restored weights are the chosen epoch's
    restored = task.score(model(data.val.tensors[0]), data.val.tensors[1])
    assert restored == pytest.approx(chosen[0]["val_accuracy"])


def test_cuda_without_a_gpu_is_a_clear_error(tiny_yaml, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["run", str(tiny_yaml()), "--store", str(tmp_path / "r.db"), "--device", "cuda"]) == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "r.db").exists()


def test_embedded_experiments_run_by_name_and_are_listed(plugins, capsys):
    from kdbench.config import load_experiment
    assert load_experiment("quickstart", plugins).name == "quickstart"
    with pytest.raises(ConfigError, match="did you mean 'quickstart'"):
        load_experiment("quikstart", plugins)
    assert main(["experiments"]) == 0
    out = capsys.readouterr().out
    assert "quickstart: MNIST-1D" in out and "smoke: Every recipe kind" in out


def test_a_feature_distiller_sees_taps_indices_and_epochs(plugins):
    from kdbench.contracts import DistillContext, Distiller
    from kdbench.training import Tapped, Teacher

    data = plugins.build("task", "digits").load()
    task = plugins.build("task", "digits")
    family = plugins.build("model", "mlp", {"hidden": [16, 8]})
    torch.manual_seed(0)
    teacher_model, student_model = family.build(data), family.build(data)
    seen = []

    class Probe(Distiller):
        name = "probe"
        description = "records what the trainer hands it"
        needs_features = True

        def setup(self, context):
            s, t = context.probe()
            self.shapes = {k: tuple(v.shape) for k, v in s.features.items()}
            self.adapter = torch.nn.Linear(8, 8)
            return [self.adapter]

        def loss(self, student, teacher, targets):
            seen.append((self.indices.clone(), self.epoch, self.epochs, set(student.features),
                         set(teacher.features), student.features["act2"].requires_grad,
                         teacher.features["act2"].requires_grad))
            return {"ce": torch.nn.functional.cross_entropy(student.logits, targets),
                    "feat": (self.adapter(student.features["act2"]) - teacher.features["act2"]).pow(2).mean()}

    distiller = Probe()
    points = family.feature_points(student_model)
    adapters = distiller.setup(DistillContext(student_model, teacher_model, data, points, points))
    assert distiller.shapes == {"act1": (2, 16), "act2": (2, 8)}
    before = distiller.adapter.weight.detach().clone()
    fit(student_model, data, task, Training(epochs=2, batch_size=256), seed=0, distiller=distiller,
        teacher=Teacher(teacher_model, points), student=Tapped(student_model, points), extra_modules=adapters)
    first_epoch = torch.cat([s[0] for s in seen if s[1] == 1])
    assert sorted(first_epoch.tolist()) == list(range(len(data.train)))  # every sample once per epoch
    assert {s[1] for s in seen} == {1, 2} and {s[2] for s in seen} == {2}
    assert all(s[3] == s[4] == {"act1", "act2"} and s[5] and not s[6] for s in seen)
    assert not torch.equal(before, distiller.adapter.weight)  # adapters are trained


def test_tap_points_are_chosen_by_name_or_index_with_clear_errors():
    from kdbench_plugins.distill.common import pick_point

    points = ["act1", "act2", "pool"]
    assert pick_point(-1, points, "student") == "pool" and pick_point("act1", points, "teacher") == "act1"
    with pytest.raises(ValueError, match=r"index 3 is out of range: the student model has 3 points"):
        pick_point(3, points, "student")
    with pytest.raises(ValueError, match=r"'act9' is not a feature point of the teacher model; its points are"):
        pick_point("act9", points, "teacher")


def test_a_trailing_batch_of_one_is_dropped_not_fatal(plugins):
    from kdbench.contracts import TaskData
    from torch.utils.data import TensorDataset

    full = plugins.build("task", "digits").load()
    x, y = full.train.tensors
    data = TaskData(TensorDataset(x[:65], y[:65]), full.val, full.test, full.input_shape, full.num_classes)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 10))
    history = fit(model, data, plugins.build("task", "digits"), Training(epochs=1, batch_size=64), seed=0)
    assert len(history) == 1  # 65 = 64 + 1: the single leftover example would crash batch norm


@pytest.mark.parametrize("n, batch", [(1437, 64), (129, 64), (128, 64), (65, 64), (7, 3)])
def test_batches_and_random_draws_are_those_of_the_data_loader_earlier_versions_used(n, batch):
    """Stored results stay reproducible: the same shuffled batches, the same trailing batch of
    one left out, and the generator left in the same state after every epoch."""
    from torch.utils.data import DataLoader

    from kdbench.training import epoch_batches, shuffled_batches

    ours, theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    loader = DataLoader(torch.arange(n), batch_size=batch, shuffle=True, generator=theirs,
                        drop_last=n % batch == 1)
    for _ in range(3):
        expected = list(loader)
        got = list(shuffled_batches(n, batch, ours))
        assert len(got) == len(expected) == epoch_batches(n, batch)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        assert torch.equal(ours.get_state(), theirs.get_state())


def test_the_head_is_the_last_module_with_parameters_a_forward_pass_calls():
    from kdbench.training import output_module

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3),
                                torch.nn.Dropout(0.5), torch.nn.Flatten())
    model.train()
    assert output_module(model, torch.randn(2, 4)) == "2"  # not the parameter-free modules after it
    assert model.training  # the probe leaves the mode as it was

    class Tied(torch.nn.Module):  # declared in another order than it runs
        def __init__(self):
            super().__init__()
            self.classifier = torch.nn.Linear(8, 3)
            self.body = torch.nn.Linear(4, 8)

        def forward(self, x):
            return self.classifier(self.body(x))

    assert output_module(Tied(), torch.randn(2, 4)) == "classifier"


def test_the_tracker_finds_parameters_training_never_changed():
    from kdbench.training import UpdateTracker

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x = torch.randn(16, 4)
    tracker = UpdateTracker()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    with tracker.watch(model, x[:2]):  # a loss on the features only: the head gets no gradient
        model[0](x).pow(2).mean().backward()
        optimizer.step()
    assert tracker.head == "2" and tracker.never_updated() == ["2.weight", "2.bias"]
    assert not tracker.head_trained()
    with tracker.watch(model, x[:2]):  # a later stage that trains the head
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()
    assert tracker.head_trained() and tracker.never_updated() == []
