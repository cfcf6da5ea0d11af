"""Stores a user points at: a file that is not a store, an empty store, failed cells, a
finished grid that needs no workers, and output read by a pipe that closes early."""

from __future__ import annotations

import dataclasses
import sqlite3
import subprocess
import sys

import pytest

from kdbench import hookimpl
from kdbench.cli import main
from kdbench.contracts import Executor
from kdbench.store import Store

from conftest import TINY

ONE_SEED = TINY.replace("  kd+int8: [{distill: hinton}, {quantize: dynamic-int8}]\n", "") \
               .replace("training: {epochs: 3", "training: {epochs: 1")


def not_sqlite(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("my notes, not a database\n")
    return path


def foreign_sqlite(tmp_path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE customers (id INTEGER)")
    return path


@pytest.mark.parametrize("make, what", [(not_sqlite, "not an SQLite database"),
                                        (foreign_sqlite, "an SQLite database with other tables: customers")])
@pytest.mark.parametrize("command", [["leaderboard"], ["report", "--output", "{tmp}/out"], ["run", "{yaml}"],
                                     ["run", "{yaml}", "--dry-run"]])
def test_a_file_that_is_not_a_store_is_exit_2_and_left_as_it_was(tiny_yaml, tmp_path, capsys, make, what, command):
    path = make(tmp_path)
    before = path.read_bytes()
    args = [a.replace("{tmp}", str(tmp_path)).replace("{yaml}", str(tiny_yaml())) for a in command]
    assert main([*args, "--store", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path} is not a kdbench results store ({what})" in err and "Traceback" not in err
    assert path.read_bytes() == before
    assert not (tmp_path / "out").exists()


def test_an_empty_store_says_so_without_blaming_filters(tmp_path, capsys):
    path = tmp_path / "r.db"
    Store(path).close()
    assert main(["leaderboard", "--store", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path} holds no results yet; run 'kdbench run' first" in err and "filter" not in err
    assert main(["leaderboard", "--store", str(path), "--recipe", "kd*"]) == 2
    assert "check --experiment and the filters" in capsys.readouterr().err


class Broken:
    @hookimpl
    def kdbench_register_distillers(self, register):
        from kdbench.contracts import Distiller

        class Fails(Distiller):
            name, description = "fails", "raises in its loss"

            def loss(self, student, teacher, targets):
                raise RuntimeError("this loss always fails")

        register(Fails)


def test_failed_cells_keep_a_rerun_at_exit_1_and_say_how_to_retry(plugins, tiny_yaml, tmp_path, capsys):
    path = tiny_yaml(ONE_SEED.replace("training:", "  bad: [{distill: fails}]\ntraining:"))
    store = tmp_path / "r.db"
    with plugins.temporary(Broken(), "broken"):
        assert main(["run", str(path), "--store", str(store), "--quiet"]) == 1
        capsys.readouterr()
        assert main(["run", str(path), "--store", str(store), "--quiet"]) == 1  # kept, not rerun
        err = capsys.readouterr().err
    assert "0 run now" in err and "1 failed in an earlier run (kept, not rerun)" in err
    assert "FAILED EARLIER student" in err and "this loss always fails" in err and "--retry-failed" in err
    assert main(["leaderboard", "--store", str(store)]) == 0  # the finished cells are still shown


class Unstartable(Executor):
    name, description = "unstartable", "refuses to start, as a cluster that does not answer would"
    started = 0

    @dataclasses.dataclass(frozen=True)
    class Params:
        workers: int = 1

    def start(self):
        type(self).started += 1
        raise RuntimeError("no cluster here")


class UnstartablePlugin:
    @hookimpl
    def kdbench_register_executors(self, register):
        register(Unstartable)


def test_resuming_a_finished_grid_starts_no_workers(plugins, tiny_yaml, tmp_path, capsys):
    path, store = tiny_yaml(ONE_SEED), tmp_path / "r.db"
    assert main(["run", str(path), "--store", str(store), "--quiet"]) == 0
    with plugins.temporary(UnstartablePlugin(), "unstartable"):
        assert main(["run", str(path), "--store", str(store), "--quiet", "--executor", "unstartable"]) == 0
    assert Unstartable.started == 0
    assert "0 run now" in capsys.readouterr().err


def test_a_pipe_closed_early_is_not_a_traceback():
    shell = f"{sys.executable} -m kdbench.cli list | head -1"
    out = subprocess.run(["bash", "-c", f"set -o pipefail; {shell}"], capture_output=True, text=True)
    assert out.stdout == "tasks:\n"
    assert "Traceback" not in out.stderr and "BrokenPipeError" not in out.stderr, out.stderr


@pytest.mark.parametrize("command", [["report", "--output", "{tmp}/tiny.yaml/report"],
                                     ["leaderboard", "--output", "{tmp}/tiny.yaml/board.md"]])
def test_an_output_that_cannot_be_written_is_exit_2_before_any_work(tiny_yaml, tmp_path, capsys, command):
    tiny_yaml()  # a file where the output's folder would be
    path, store = tiny_yaml(ONE_SEED, "one.yaml"), tmp_path / "r.db"
    assert main(["run", str(path), "--store", str(store), "--quiet"]) == 0
    capsys.readouterr()
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    assert main([*args, "--store", str(store)]) == 2
    assert f"--output {args[2]}: {tmp_path}/tiny.yaml is a file, not a folder" in capsys.readouterr().err
