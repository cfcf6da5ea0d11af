"""Running grids: results stored per cell, resume, teacher caching, failures isolated."""

from __future__ import annotations

import dataclasses
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import torch

import kdbench.teachers
from kdbench import hookimpl
from kdbench.cli import main
from kdbench.config import load_experiment
from kdbench.contracts import Distiller, ModelFamily
from kdbench.plugins import get_plugins
from kdbench.runner import run_experiment
from kdbench.store import Store

from conftest import TINY


def run(plugins, path, store_path, cache):
    experiment = load_experiment(path, plugins)
    with Store(store_path) as store:
        summary = run_experiment(experiment, store, plugins, cache, progress=None)
        return summary, store.records(experiment.name)


def test_a_grid_runs_and_every_cell_is_stored_with_its_figures(plugins, tiny_yaml, tmp_path, isolated_cache):
    summary, records = run(plugins, tiny_yaml(), tmp_path / "r.db", isolated_cache)
    assert summary.exit_code == 0 and summary.done == 3
    students = {r.recipe: r for r in records if r.role == "student"}
    teachers = [r for r in records if r.role == "teacher"]
    assert set(students) == {"scratch", "kd", "kd+int8"} and len(teachers) == 1
    kd, int8 = students["kd"], students["kd+int8"]
    assert kd.metrics["test_accuracy"] > 0.5
    assert int8.metrics["weight_bytes"] * 3 < kd.metrics["weight_bytes"]
    assert [s["op"] for s in int8.stages] == ["distill", "quantize"]
    # Its distill stage is kd's, trained once (with the exact teacher logits) and loaded.
    assert int8.stages[0]["from_cache"] and int8.stages[0]["history"] == kd.stages[0]["history"]
    [outputs] = int8.stages[0]["teacher_outputs"]
    assert outputs["exact"]
    assert set(kd.stages[0]["history"][0]) >= {"epoch", "val_accuracy", "loss_ce", "loss_kd", "loss"}
    assert kd.config["stages"][0]["distiller"] == {"name": "hinton", "temperature": 4.0, "alpha": 0.9}
    assert kd.environment["torch"] == torch.__version__
    assert kd.environment["plugins"]["distill-response"] == "0.1.0"
    chosen = next(r for r in kd.stages[0]["history"] if r.get("chosen"))
    assert kd.metrics["chosen_epoch"] == chosen["epoch"]
    assert kd.metrics["chosen_epoch_test_accuracy"] == kd.metrics["test_accuracy"]  # nothing after training
    assert kd.metrics["last_epoch_test_accuracy"] == kd.stages[0]["history"][-1]["test_accuracy"]


def test_a_second_run_trains_nothing(plugins, tiny_yaml, tmp_path, isolated_cache, monkeypatch):
    path, db = tiny_yaml(), tmp_path / "r.db"
    run(plugins, path, db, isolated_cache)

    def no_training(*args, **kwargs):
        raise AssertionError("nothing should be trained on a rerun")

    monkeypatch.setattr(kdbench.runner, "fit", no_training)
    monkeypatch.setattr(kdbench.teachers, "fit", no_training)
    summary, records = run(plugins, path, db, isolated_cache)
    assert (summary.skipped, summary.done, summary.failed) == (3, 0, [])
    assert len(records) == 4


def test_a_teacher_is_trained_once_per_seed_and_reused_by_later_experiments(
        plugins, tiny_yaml, tmp_path, isolated_cache, monkeypatch):
    calls = []
    real_fit = kdbench.teachers.fit
    monkeypatch.setattr(kdbench.teachers, "fit", lambda *a, **k: calls.append(1) or real_fit(*a, **k))
    run(plugins, tiny_yaml(TINY.replace("seeds: [0]", "seeds: [0, 1]")), tmp_path / "a.db", isolated_cache)
    assert len(calls) == 2  # 3 recipes x 2 seeds, one teacher per seed
    other = TINY.replace("name: tiny", "name: other").replace("hidden: [16]", "hidden: [8]")
    run(plugins, tiny_yaml(other, "other.yaml"), tmp_path / "b.db", isolated_cache)
    assert len(calls) == 2  # same task, teacher, training and seed: from the cache
    assert len(list((isolated_cache / "teachers").glob("*.pt"))) == 2


class Exploding(Distiller):
    name = "exploding"
    description = "raises on purpose"

    @dataclasses.dataclass(frozen=True)
    class Params:
        message: str = "boom"

    def loss(self, student, teacher, targets):
        raise RuntimeError(self.params.message)


class ExplodingPlugin:
    @hookimpl
    def kdbench_register_distillers(self, register):
        register(Exploding)


class Recorder:
    def __init__(self):
        self.started, self.finished = [], []

    @hookimpl
    def kdbench_cell_started(self, cell):
        self.started.append(cell)

    @hookimpl
    def kdbench_cell_finished(self, cell, record):
        self.finished.append(record.status)


def test_a_plugin_that_raises_in_one_cell_does_not_stop_the_grid(plugins, tiny_yaml, tmp_path, isolated_cache):
    text = TINY.replace("training:", "  broken: [{distill: {name: exploding, message: kaboom}}]\ntraining:")
    recorder = Recorder()
    with plugins.temporary(ExplodingPlugin(), "exploding"), plugins.temporary(recorder, "recorder"):
        summary, records = run(plugins, tiny_yaml(text), tmp_path / "r.db", isolated_cache)
    assert summary.exit_code == 1
    failed = [r for r in records if r.status == "failed"]
    assert [r.recipe for r in failed] == ["broken"]
    assert failed[0].error == "RuntimeError: kaboom" and "Traceback" in failed[0].traceback
    assert sum(r.ok for r in records) == 4  # teacher + three healthy recipes
    assert len(recorder.started) == 5 and sorted(recorder.finished) == ["done"] * 4 + ["failed"]


def test_cli_exit_codes_and_leaderboard_formats(tiny_yaml, tmp_path, capsys):
    db = str(tmp_path / "r.db")
    assert main(["run", str(tiny_yaml()), "--store", db, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "task digits: mlp(hidden=[64]) → mlp(hidden=[16])" in out
    # kd+int8 is compared with kd, the recipe it begins with: under its own heading.
    assert re.search(r"^teacher +1 ", out, re.M) and re.search(r"^Δ vs kd\n  kd\+int8 +1 ", out, re.M)
    assert main(["leaderboard", "--store", db, "--format", "csv"]) == 0
    import io

    import pandas as pd
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(table["recipe"]) == ["teacher", "scratch", "kd", "kd+int8"]
    assert {"test_accuracy_mean", "test_accuracy_std", "size_bytes_mean", "n"} <= set(table.columns)
    output = tmp_path / "board.md"
    assert main(["leaderboard", "--store", db, "--output", str(output)]) == 0
    assert ("| recipe | n | accuracy % ↑ | 95% CI | reference | Δ vs reference [95% CI] | p | rank |"
            in output.read_text())
    assert main(["leaderboard", "--store", str(tmp_path / "missing.db")]) == 2
    assert main(["leaderboard", "--store", db, "--experiment", "tiyn"]) == 2
    assert "did you mean 'tiny'" in capsys.readouterr().err
    assert main(["run", str(tiny_yaml()), "--store", db, "--executor", "nope"]) == 2


def test_a_changed_experiment_keeps_its_configurations_apart(tiny_yaml, tmp_path, capsys):
    db = str(tmp_path / "r.db")
    two_seeds = TINY.replace("seeds: [0]", "seeds: [0, 1]").replace(
        "  kd+int8: [{distill: hinton}, {quantize: dynamic-int8}]\n", "")
    assert main(["run", str(tiny_yaml(two_seeds)), "--store", db, "--quiet"]) == 0
    assert re.search(r"^scratch +2 ", capsys.readouterr().out, re.M)  # seeds of one configuration: one row
    # The same recipe names with a longer student budget: the earlier results stay in the
    # store, but a row never averages two configurations.
    longer = two_seeds.replace("student: {name: mlp, hidden: [16]}",
                               "student: {name: mlp, hidden: [16]}\n    student_training: {epochs: 4}")
    assert main(["run", str(tiny_yaml(longer)), "--store", db, "--quiet"]) == 0
    assert re.search(r"^scratch +2 ", capsys.readouterr().out, re.M)
    with Store(db) as store:
        assert len([r for r in store.records("tiny") if r.recipe == "scratch"]) == 4
    assert main(["leaderboard", "--store", db, "--format", "csv"]) == 0
    captured = capsys.readouterr()
    import io

    import pandas as pd
    table = pd.read_csv(io.StringIO(captured.out))
    # Both budgets are reported, each under its own protocol (with its teacher), none averaged.
    assert list(table["n"]) == [2] * 6 and table["fingerprint"].nunique() == 2
    assert sorted(table["recipe"]) == ["kd", "kd", "scratch", "scratch", "teacher", "teacher"]
    assert main(["leaderboard", "--store", db, "--format", "csv", "--latest-only"]) == 0
    captured = capsys.readouterr()
    assert list(pd.read_csv(io.StringIO(captured.out))["n"]) == [2, 2, 2]
    assert "scratch: left out 2 result(s) of an earlier configuration" in captured.err


class BrokenFamily(ModelFamily):
    name = "broken"
    description = "cannot be built"

    def build(self, data):
        raise ValueError("no such architecture")


class BrokenPlugin:
    @hookimpl
    def kdbench_register_models(self, register):
        register(BrokenFamily)


def test_cells_of_a_failed_teacher_fail_fast_naming_the_cause(plugins, tiny_yaml, tmp_path, isolated_cache):
    text = TINY.replace("teacher: {name: mlp, hidden: [64]}", "teacher: broken")
    with plugins.temporary(BrokenPlugin(), "broken"):
        summary, records = run(plugins, tiny_yaml(text), tmp_path / "r.db", isolated_cache)
    assert summary.exit_code == 1 and summary.done == 0
    assert len(summary.failed) == 4
    teacher = next(r for r in records if r.role == "teacher")
    assert teacher.error == "ValueError: no such architecture"
    students = [r for r in records if r.role == "student"]
    assert {r.error for r in students} == {"its teacher failed: ValueError: no such architecture"}


def test_a_run_killed_mid_grid_keeps_finished_cells_and_resumes(tiny_yaml, tmp_path, isolated_cache):
    text = TINY.replace("seeds: [0]", "seeds: [0, 1, 2]").replace("epochs: 3", "epochs: 6")
    path, db = tiny_yaml(text), tmp_path / "r.db"
    proc = subprocess.Popen([sys.executable, "-m", "kdbench.cli", "run", str(path), "--store", str(db),
                             "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if db.exists():
                with sqlite3.connect(db) as con:
                    try:
                        n = con.execute("SELECT COUNT(*) FROM cells WHERE role='student'").fetchone()[0]
                    except sqlite3.OperationalError:
                        n = 0
                if n >= 2:
                    break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    with Store(db) as store:
        survivors = [r for r in store.records() if r.role == "student"]
    assert 2 <= len(survivors) < 9, "the run should have been killed mid-grid"
    assert all(r.ok and r.metrics["test_accuracy"] > 0 for r in survivors)
    summary, records = run(get_plugins(), path, db, isolated_cache)
    assert summary.skipped == len(survivors)
    assert summary.done == 9 - len(survivors) and not summary.failed
    assert sum(r.role == "student" for r in records) == 9


def test_cells_get_one_torch_thread_unless_told_otherwise(tiny_yaml, tmp_path):
    """Measured on this project's grids: a second thread saves nothing on small models and
    doubles the CPU; --threads gives more to a large one."""
    before = torch.get_num_threads()
    try:
        path = tiny_yaml(TINY.replace("  kd+int8: [{distill: hinton}, {quantize: dynamic-int8}]\n", ""))
        assert main(["run", str(path), "--store", str(tmp_path / "a.db"), "--quiet"]) == 0
        assert main(["run", str(path), "--store", str(tmp_path / "b.db"), "--quiet", "--threads", "2"]) == 0
    finally:
        torch.set_num_threads(before)
    for db, threads in (("a.db", 1), ("b.db", 2)):
        with Store(tmp_path / db) as store:
            assert {r.environment["threads"] for r in store.records()} == {threads}


def test_a_task_is_loaded_once_per_process_for_every_phase_and_runner(plugins, tiny_yaml, tmp_path,
                                                                     isolated_cache, monkeypatch):
    """A worker runs the teacher phase and the student phase with two runners: the second
    reuses the data the first loaded."""
    import kdbench.runner

    monkeypatch.setattr(kdbench.runner, "LOADED_DATA", {})
    task = plugins.get("task", "digits").cls
    loads = []
    original = task.load
    monkeypatch.setattr(task, "load", lambda self: loads.append(1) or original(self))
    run(plugins, tiny_yaml(), tmp_path / "r.db", isolated_cache)
    run(plugins, tiny_yaml(TINY.replace("seeds: [0]", "seeds: [1]")), tmp_path / "r.db", isolated_cache)
    assert len(loads) == 1


SHARED = TINY.replace("""  kd+int8: [{distill: hinton}, {quantize: dynamic-int8}]
""", """  kd+int8: [{distill: {name: hinton, temperature: 4, alpha: 0.9}}, {quantize: dynamic-int8}]
  kd+ft: [{distill: {name: hinton, temperature: 4, alpha: 0.9}}, {finetune: {epochs: 2}}]
  kd+ft+prune: [{distill: {name: hinton, temperature: 4, alpha: 0.9}}, {finetune: {epochs: 2}}, {prune: {name: magnitude, sparsity: 0.5}}]
""")


def test_recipes_that_begin_alike_train_their_shared_stages_once_with_the_same_results(
        plugins, tiny_yaml, tmp_path):
    """kd, kd+int8, kd+ft and kd+ft+prune share their first stage (and the last two their
    first two): those run once per seed; each cell's figures are those it gets alone."""
    from kdbench.stage_cache import FOLDER

    together = tmp_path / "together"
    _, records = run(plugins, tiny_yaml(SHARED), tmp_path / "a.db", together)
    shared = {r.recipe: r for r in records if r.role == "student"}
    assert len(list((together / FOLDER).glob("*.pt"))) == 3  # scratch, kd's distill, kd+ft's two stages
    assert [e.get("from_cache", False) for e in shared["kd+int8"].stages] == [True, False]
    assert [e.get("from_cache", False) for e in shared["kd+ft+prune"].stages] == [True, True, False]
    assert shared["kd+int8"].stages[0]["history"] == shared["kd"].stages[0]["history"]
    timed = ("seconds", "latency", "_ms", "per_s", "speedup", "load", "cpu_count")
    for recipe in ("kd+int8", "kd+ft+prune"):
        alone = SHARED.split("recipes:")[0] + "recipes:\n  " + next(
            line.strip() for line in SHARED.splitlines() if line.strip().startswith(f"{recipe}:")) + \
            "\ntraining:" + SHARED.split("training:")[1]
        shutil.rmtree(together / FOLDER)  # the teacher stays cached; the shared stages do not
        _, records = run(plugins, tiny_yaml(alone, f"{recipe}.yaml"), tmp_path / f"{recipe}.db", together)
        [cell] = [r for r in records if r.role == "student"]
        assert not any(e.get("from_cache") for e in cell.stages)
        ours = {k: v for k, v in shared[recipe].metrics.items() if not any(t in k for t in timed)}
        theirs = {k: v for k, v in cell.metrics.items() if not any(t in k for t in timed)}
        assert ours == theirs

def recipes_only(text: str, recipes: str) -> str:
    """The tiny experiment with other recipes."""
    start, end = text.index("recipes:"), text.index("training:")
    return text[:start] + "recipes:\n" + recipes + text[end:]


def test_every_trained_stage_and_row_records_whether_it_was_still_improving(
        plugins, tiny_yaml, tmp_path, isolated_cache):
    from kdbench.convergence import stage_convergence

    text = recipes_only(TINY, "  scratch: [train]\n  kd+prune: [{distill: hinton}, "
                              "{prune: {name: magnitude, sparsity: 0.5}}, {finetune: {epochs: 5}}]\n")
    _, records = run(plugins, tiny_yaml(text.replace("epochs: 3", "epochs: 6")), tmp_path / "r.db", isolated_cache)
    by = {r.recipe: r for r in records}
    assert set(by) == {"teacher", "scratch", "kd+prune"}
    for record in records:
        trained = [s for s in record.stages if s["op"] in ("train", "distill", "finetune")]
        assert trained
        for stage in trained:
            expected = stage_convergence(stage["history"], "accuracy", True, 0.005)
            assert stage["converged"] is expected.converged is not None
            assert stage["improvement_last_20pct"] == expected.improvement
            assert stage["convergence_window"] == (2 if stage["op"] != "finetune" else 1)
        assert record.metrics["converged"] == (1.0 if all(s["converged"] for s in trained) else 0.0)
    assert "converged" not in by["kd+prune"].stages[1]  # the prune stage trains nothing of its own
    # Fewer than 5 epochs: no verdict, and no figure in the row.
    _, short = run(plugins, tiny_yaml(text, "short.yaml"), tmp_path / "s.db", isolated_cache)
    scratch = next(r for r in short if r.recipe == "scratch")
    assert scratch.stages[0]["converged"] is None and "converged" not in scratch.metrics


def test_require_converged_fails_a_cell_still_improving_and_says_what_to_do(
        plugins, tiny_yaml, tmp_path, isolated_cache):
    # A slow learning rate for 5 epochs: digits' accuracy is still climbing at the end.
    text = recipes_only(TINY, "  scratch: [train]\n").replace(
        "training: {epochs: 3, batch_size: 64}",
        "training: {epochs: 5, batch_size: 64, lr: 0.0003, require_converged: true}")
    lenient = text.replace("student: {name: mlp, hidden: [16]}",
                           "student: {name: mlp, hidden: [16]}\n    teacher_training: {require_converged: false}")
    summary, records = run(plugins, tiny_yaml(lenient), tmp_path / "r.db", isolated_cache)
    teacher, scratch = (next(r for r in records if r.role == role) for role in ("teacher", "student"))
    assert teacher.ok and teacher.metrics["converged"] == 0.0  # marked, not failed
    assert not scratch.ok and summary.exit_code == 1
    assert scratch.error.startswith("NotConverged: stage 'train' was still improving after 5 epochs")
    assert re.search(r"beat the best before by \d+\.\d\d %", scratch.error)
    assert "give it more epochs" in scratch.error

    # The teacher's own training is judged too; its students then fail naming it.
    _, records = run(plugins, tiny_yaml(text, "strict.yaml"), tmp_path / "s.db", isolated_cache)
    teacher, scratch = (next(r for r in records if r.role == role) for role in ("teacher", "student"))
    assert not teacher.ok and "teacher mlp(hidden=[64]) train' was still improving" in teacher.error
    assert "its teacher failed: NotConverged" in scratch.error


def test_a_head_that_training_never_updates_is_recorded(plugins, tiny_yaml, tmp_path, isolated_cache):
    embed_only = "{name: hidden-cosine, ce_weight: 0, kd_weight: 0}"  # no label and no logit term
    text = recipes_only(TINY, f"  scratch: [train]\n  embed: [{{distill: {embed_only}}}]\n"
                              f"  copy: [{{init: teacher}}, {{finetune: {{epochs: 5, distill: {embed_only}}}}}]\n")
    _, records = run(plugins, tiny_yaml(text.replace("epochs: 3", "epochs: 5")), tmp_path / "r.db", isolated_cache)
    by = {r.recipe: r for r in records}
    embed, scratch = by["embed"], by["scratch"]
    assert embed.metrics["head_trained"] == 0.0 and embed.metrics["never_updated_params"] == 2.0
    assert embed.stages[0]["never_updated"] == ["head.weight", "head.bias"] and embed.stages[0]["head"] == "head"
    # Its validation accuracy is chance: no convergence verdict is read off it.
    assert embed.stages[0]["converged"] is None and "converged" not in embed.metrics
    assert scratch.metrics["head_trained"] == 1.0 and scratch.stages[0]["never_updated"] == []
    # A copy of the teacher has the teacher's trained head, whatever its own stages train.
    assert by["copy"].metrics["head_trained"] == 1.0 and by["copy"].stages[-1]["never_updated"] == [
        "head.weight", "head.bias"]


def test_a_derived_control_trains_exactly_what_its_compound_adds(plugins, tiny_yaml, tmp_path, isolated_cache):
    """gradual pruning fine-tunes twice for 2 epochs with Hinton KD: its control, derived by
    ``controls: auto``, is the KD student fine-tuned the same way, and the table compares them."""
    from kdbench.report.summary import frame, summarize

    text = TINY.replace("  kd+int8: [{distill: hinton}, {quantize: dynamic-int8}]\n",
                        "  kd+gradual: [{distill: hinton}, {prune: {name: gradual, sparsity: 0.5, steps: 2, "
                        "epochs_per_step: 2, distill: hinton}}]\ncontrols: auto\n")
    summary, records = run(plugins, tiny_yaml(text), tmp_path / "r.db", isolated_cache)
    assert summary.exit_code == 0 and summary.done == 4
    students = {r.recipe: r for r in records if r.role == "student"}
    gradual, control = students["kd+gradual"], students["kd+2xft2:hinton"]
    # The parent's stage is trained alike; what comes after trains exactly as many epochs.
    assert len(gradual.stages[0]["history"]) == len(control.stages[0]["history"]) == 3
    assert len(gradual.stages[1]["history"]) == 4
    assert [len(s["history"]) for s in control.stages[1:]] == [2, 2]
    assert [s["name"] for s in control.stages[1:]] == ["hinton", "hinton"]
    board = summarize(frame(records, plugins)).set_index("label")
    assert board.loc["kd+gradual", "reference_label"] == "kd+2xft2:hinton"
    assert board.loc["kd+2xft2:hinton", "reference_label"] == "kd" and board.loc["kd+2xft2:hinton", "derived"]
