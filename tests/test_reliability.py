"""Never lose a result: kills at any moment, runs sharing a store, failing and hanging cells,
bad input, determinism."""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from kdbench import hookimpl
from kdbench.cli import main
from kdbench.config import load_experiment
from kdbench.contracts import Distiller
from kdbench.runner import run_experiment
from kdbench.store import Store

from conftest import TINY

GRID = TINY.replace("seeds: [0]", "seeds: [0, 1, 2]")  # 9 student cells, 3 teachers
TIMINGS = ("seconds", "latency", "_ms", "per_s", "speedup", "tokens_s")


def kdbench(*args, **popen):
    return subprocess.Popen([sys.executable, "-m", "kdbench.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def rows(db):
    with sqlite3.connect(db) as con:
        try:
            return con.execute("SELECT cell_id, role, status FROM cells").fetchall()
        except sqlite3.OperationalError:  # not created yet
            return []


def run(plugins, path, db, cache, **kwargs):
    experiment = load_experiment(path, plugins)
    with Store(db) as store:
        summary = run_experiment(experiment, store, plugins, cache, progress=None, **kwargs)
        return summary, store.records(experiment.name)


def untimed(metrics):
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMINGS)}


# ---------------------------------------------------------------- kills
def test_killed_again_and_again_the_store_stays_whole_and_the_grid_completes(tiny_yaml, tmp_path):
    """SIGKILL at random moments (mid-cell, mid-write); every rerun keeps what was finished and
    does only the rest, until the grid is complete with each cell stored once."""
    path, db = tiny_yaml(GRID), tmp_path / "r.db"
    rng = random.Random(0)
    finished_before: dict[str, str] = {}
    for _ in range(6):
        proc = kdbench("run", path, "--store", db, "--quiet")
        time.sleep(rng.uniform(1.5, 4.0))  # interpreter start-up takes about a second
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        with sqlite3.connect(db) as con:
            assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        now = {cid: status for cid, _, status in rows(db)}
        # Nothing finished is ever lost or changed by a later, killed run.
        assert all(now.get(cid) == status for cid, status in finished_before.items())
        finished_before = now
    proc = kdbench("run", path, "--store", db, "--quiet")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    done = rows(db)
    assert sum(role == "student" for _, role, _ in done) == 9
    assert all(status == "done" for _, _, status in done)
    students = {cid for cid, role, _ in done if role == "student"}
    ran_now = int(err.split(" cells: ")[1].split(" run now")[0])
    assert ran_now == 9 - len(students & set(finished_before))  # only the unfinished ones


def test_two_runs_on_one_store_share_the_grid_without_running_a_cell_twice(tiny_yaml, tmp_path):
    path, db = tiny_yaml(GRID), tmp_path / "r.db"
    procs = [kdbench("run", path, "--store", db) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert "database is locked" not in err
    ran = [line for _, err in outputs for line in err.splitlines() if line.startswith("[") and ": ok" in line]
    cells = [line for line in ran if " cell " in line]
    assert len(cells) == 9 and len(set(c.split("] ", 1)[1] for c in cells)) == 9  # each cell by one run
    teachers = [line for line in ran if " teacher " in line]
    assert len(teachers) == 3
    stored = rows(db)
    assert len(stored) == 12 and all(status == "done" for *_, status in stored)
    with Store(db) as store:
        runs = {r.environment["run"] for r in store.records()}
        assert not store.claimed_elsewhere()  # both runs gave their claims back
    assert len(runs) == 2, "both runs should have done part of the grid"


def test_the_claim_of_a_dead_run_is_taken_over(tmp_path):
    db = tmp_path / "r.db"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    with Store(db) as store:
        assert store.claim("a")
        store._db.execute("UPDATE claims SET owner = 'elsewhere', pid = ? WHERE cell_id = 'a'", (int(dead),))
        assert store.claimed_elsewhere() == {}  # its process is gone
        assert store.claim("a")
    with Store(db) as mine, Store(db) as other:
        assert mine.claim("b") and not other.claim("b")  # alive: kept
        assert other.claimed_elsewhere() == {"b": mine.owner}


# ---------------------------------------------------------------- failing and hanging cells
class Flaky(Distiller):
    name = "flaky"
    description = "raises while the FLAKY environment variable is set; sleeps with hang > 0"

    @dataclasses.dataclass(frozen=True)
    class Params:
        hang: float = 0.0
        kd: float = 0.0  # the value of its 'kd' term (.nan to diverge)

    def loss(self, student, teacher, targets):
        if os.environ.get("FLAKY"):
            raise RuntimeError("flaky plugin failed")
        end = time.monotonic() + self.params.hang
        while time.monotonic() < end:
            time.sleep(0.01)
        zero = student.logits.logsumexp(-1).mean() * 0
        return {"ce": zero, "kd": zero + self.params.kd}


class FlakyPlugin:
    @hookimpl
    def kdbench_register_distillers(self, register):
        register(Flaky)


def test_failed_cells_are_kept_and_retry_failed_reruns_only_them(plugins, tiny_yaml, tmp_path, monkeypatch, isolated_cache):
    text = TINY.replace("training:", "  flaky: [{distill: flaky}]\ntraining:")
    path, db = tiny_yaml(text), tmp_path / "r.db"
    with plugins.temporary(FlakyPlugin(), "flaky"):
        monkeypatch.setenv("FLAKY", "1")
        summary, records = run(plugins, path, db, isolated_cache)
        assert [r.recipe for r in summary.failed] == ["flaky"]
        assert summary.failed[0].error == "RuntimeError: flaky plugin failed"
        done = {r.cell_id: r.finished_at for r in records if r.ok}
        # A plain rerun leaves the failed cell alone (it would fail the same way) and says so.
        summary = run(plugins, path, db, isolated_cache)[0]
        assert summary.done == 0 and not summary.failed and summary.failed_earlier == 1
        monkeypatch.delenv("FLAKY")
        summary, records = run(plugins, path, db, isolated_cache, retry_failed=True)
    assert summary.done == 1 and not summary.failed
    assert all(r.ok for r in records)
    assert {r.cell_id: r.finished_at for r in records if r.cell_id in done} == done  # untouched


def test_a_cell_past_the_timeout_is_stopped_and_recorded_and_the_others_go_on(plugins, tiny_yaml, tmp_path, isolated_cache):
    text = TINY.replace("training:", "  hangs: [{distill: {name: flaky, hang: 60}}]\ntraining:")
    start = time.monotonic()
    with plugins.temporary(FlakyPlugin(), "flaky"):
        summary, records = run(plugins, tiny_yaml(text), tmp_path / "r.db", isolated_cache, cell_timeout=8)
    assert time.monotonic() - start < 60
    [failed] = summary.failed
    assert failed.recipe == "hangs"
    assert failed.error == "CellTimeout: the student cell ran past --cell-timeout 8 s"
    assert sum(r.ok for r in records) == 4


def test_a_non_finite_loss_fails_the_cell_naming_the_step_and_term(plugins, tiny_yaml, tmp_path, isolated_cache):
    text = TINY.replace("training:", "  diverges: [{distill: {name: flaky, kd: .nan}}]\ntraining:")
    with plugins.temporary(FlakyPlugin(), "flaky"):
        summary, records = run(plugins, tiny_yaml(text), tmp_path / "r.db", isolated_cache)
    [failed] = summary.failed
    assert failed.recipe == "diverges"
    assert failed.error.startswith("FloatingPointError: non-finite loss at epoch 1, step")
    assert "'kd'" in failed.error
    assert sum(r.ok for r in records) == 4


# ---------------------------------------------------------------- bad input: exit 2, nothing written
BAD_INPUT = [
    ("yaml", "name: tiny\nseeds: [0\ntasks: [digits]\n", [], "line 3"),
    ("unknown plugin", TINY.replace("kd+int8: [{distill: hinton}", "kd+int8: [{distill: hintom}"), [],
     "did you mean 'hinton'"),
    ("parameter type", TINY.replace("temperature: 4", "temperature: warm"), [], "temperature"),
    ("parameter range", TINY.replace("temperature: 4", "temperature: -4"), [], "temperature must be positive"),
    ("empty grid", TINY.replace("seeds: [0]", "seeds: []"), [], "seeds"),
    ("missing dataset", TINY.replace("tasks: [digits]", "tasks: [{name: cifar100, root: /nonexistent/data}]")
     .replace("mlp, hidden: [64]", "resnet, arch: resnet8").replace("mlp, hidden: [16]", "resnet, arch: resnet8"), [],
     "/nonexistent/data/cifar-100-python"),
    ("store in a file", TINY, ["--store", "{tmp}/tiny.yaml/r.db"], "tiny.yaml is a file, not a folder"),
    ("store not creatable", TINY, ["--store", "/proc/kdbench/r.db"], "--store /proc/kdbench/r.db"),
    ("cache in a file", TINY, ["--cache-dir", "{tmp}/tiny.yaml/cache"], "--cache-dir {tmp}/tiny.yaml/cache: "
     "{tmp}/tiny.yaml is a file, not a folder"),
    ("cache not creatable", TINY, ["--cache-dir", "/proc/kdbench-cache"], "--cache-dir /proc/kdbench-cache: cannot "
     "create the folder"),
    ("workers", TINY, ["--executor", "local", "--workers", "2"], "do not apply to the local executor"),
    ("timeout", TINY, ["--cell-timeout", "0"], "--cell-timeout must be a positive"),
    ("scheduler", TINY, ["--scheduler", "tcp://127.0.0.1:9", "--set", "executor={name: dask, connect_timeout: 2}"],
     "no Dask scheduler answered at tcp://127.0.0.1:9 within 2 s"),
]


@pytest.mark.parametrize("text,extra,message", [b[1:] for b in BAD_INPUT], ids=[b[0] for b in BAD_INPUT])
def test_bad_input_exits_2_with_a_message_and_writes_nothing(tiny_yaml, tmp_path, capsys, isolated_cache,
                                                              text, extra, message):
    if "--scheduler" in extra:
        pytest.importorskip("dask.distributed")
    store = tmp_path / "r.db"
    args = ["run", str(tiny_yaml(text)), "--store", str(store), *(e.replace("{tmp}", str(tmp_path)) for e in extra)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdbench: error: ") and message.replace("{tmp}", str(tmp_path)) in err, err
    assert not store.exists() and not isolated_cache.exists()


# ---------------------------------------------------------------- determinism, dry run
def test_the_same_cell_twice_gives_the_same_metrics_and_records_its_seeds(plugins, tiny_yaml, tmp_path, isolated_cache):
    path = tiny_yaml()
    first = run(plugins, path, tmp_path / "a.db", isolated_cache)[1]
    second = run(plugins, path, tmp_path / "b.db", tmp_path / "other-cache")[1]  # teacher retrained too
    by_id = {r.cell_id: r for r in second}
    assert len(first) == len(second) == 4
    for rec in first:
        assert untimed(rec.metrics) == untimed(by_id[rec.cell_id].metrics), rec.recipe
        assert rec.environment["seeds"] == {"python": 0, "numpy": 0, "torch": 0}


def test_dry_run_lists_cells_status_teachers_and_time_left_and_runs_nothing(tiny_yaml, tmp_path, capsys, isolated_cache):
    path, store = tiny_yaml(GRID), tmp_path / "r.db"
    assert main(["run", str(path), "--store", str(store), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "9 cells: 0 done, 0 failed, 9 to run; 3 of 3 teacher(s) to train; time left: unknown" in out
    assert not store.exists()
    assert main(["run", str(tiny_yaml(TINY, "one.yaml")), "--store", str(store), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", str(path), "--store", str(store), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "9 cells: 3 done, 0 failed, 6 to run; 2 of 3 teacher(s) to train; time left: about" in out
    lines = [line for line in out.splitlines() if line.startswith("digits")]
    assert len(lines) == 9 and sum(" done " in line for line in lines) == 3


def test_progress_bars_on_a_terminal_lines_elsewhere(plugins, tiny_yaml, tmp_path, isolated_cache):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    path = tiny_yaml()
    for stream, db in ((Terminal(), "tty.db"), (io.StringIO(), "log.db")):
        experiment = load_experiment(path, plugins)
        with Store(tmp_path / db) as store:
            run_experiment(experiment, store, plugins, isolated_cache, progress=stream)
        out = stream.getvalue()
        assert "cell digits | mlp(hidden=[64]) -> mlp(hidden=[16]) | kd | seed 0: ok" in out
        if isinstance(stream, Terminal):
            assert "4/4" in out and "failed=0" in out  # the grid's bar
            assert "kd seed 0" in out and "epoch" in out  # a cell's epochs
        else:
            assert "\r" not in out  # a log: no bars


def test_a_teacher_in_training_shows_its_epoch_bar_on_a_terminal(plugins, tiny_yaml, tmp_path, isolated_cache):
    """The grid's bar would sit at 0 while a teacher trains: a bar follows the teacher's epochs;
    a teacher loaded from the cache trains nothing and shows none."""
    import io
    import re

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    path = tiny_yaml(TINY.replace("  kd: [{distill: {name: hinton, temperature: 4, alpha: 0.9}}]\n", "")
                     .replace("  kd+int8: [{distill: hinton}, {quantize: dynamic-int8}]\n", ""))
    outputs = []
    for db in ("trains.db", "cached.db"):
        # The teacher stays cached; the student's stage does not, so that it trains again.
        shutil.rmtree(isolated_cache / "stage-results", ignore_errors=True)
        stream = Terminal()
        with Store(tmp_path / db) as store:
            run_experiment(load_experiment(path, plugins), store, plugins, isolated_cache, progress=stream)
        outputs.append(stream.getvalue())
    bar = re.compile(r"teacher mlp\(hidden=\[64\]\) seed 0: +\d+%\|[^|]*\| [0-3]/3 \[[^\]]*epoch")
    assert bar.search(outputs[0]), outputs[0]
    assert "teacher mlp(hidden=[64]) seed 0:" not in outputs[1]
    assert "scratch seed 0" in outputs[1]  # the student's bar still shows


def test_every_executor_gives_the_same_results(tiny_yaml, tmp_path, capsys):
    """The same file on local, processes and dask: the same cells with the same figures (one
    torch thread everywhere, so that reductions run in the same order)."""
    pytest.importorskip("dask.distributed")
    path = tiny_yaml(TINY.replace("seeds: [0]", "seeds: [0, 1]"))
    results = {}
    for name, extra in (("local", []), ("processes", ["--workers", "2"]), ("dask", ["--workers", "2"])):
        db = tmp_path / f"{name}.db"
        args = ["run", str(path), "--store", str(db), "--cache-dir", str(tmp_path / name),
                "--executor", name, "--threads", "1", "--quiet", *extra]
        assert main(args) == 0, capsys.readouterr().err
        with Store(db) as store:
            results[name] = {r.cell_id: untimed(r.metrics) for r in store.records()}
    assert len(results["local"]) == 8
    assert results["processes"] == results["local"]
    assert results["dask"] == results["local"]


def test_bf16_training_runs_is_recorded_and_is_its_own_protocol(tiny_yaml, tmp_path, capsys):
    from kdbench.report.protocol import fingerprint, protocol

    path = tiny_yaml()
    for precision in ("fp32", "bf16"):
        assert main(["run", str(path), "--store", str(tmp_path / f"{precision}.db"), "--quiet",
                     "--precision", precision]) == 0
    capsys.readouterr()
    rows = {}
    for precision in ("fp32", "bf16"):
        with Store(tmp_path / f"{precision}.db") as store:
            rows[precision] = {r.recipe: r for r in store.records() if r.role == "student"}
    kd16, kd32 = rows["bf16"]["kd"], rows["fp32"]["kd"]
    assert kd16.environment["precision"] == "bf16" and kd32.environment["precision"] == "fp32"
    assert kd16.metrics["test_accuracy"] > 0.3  # trains
    assert kd16.metrics["test_accuracy"] != kd32.metrics["test_accuracy"] or \
        kd16.stages[0]["history"][0]["loss"] != kd32.stages[0]["history"][0]["loss"]  # really bf16
    assert fingerprint(protocol(kd16)) != fingerprint(protocol(kd32))
    assert "training_precision" not in protocol(kd32)
