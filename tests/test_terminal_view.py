"""The leaderboard as a terminal shows it (``kdbench run`` and ``kdbench leaderboard`` without
``--format``), ``--wide`` for every column, and the warning on speed figures timed under load."""

from __future__ import annotations

import os
import re

import pytest

from kdbench.cli import main
from kdbench.report import render
from kdbench.report.summary import frame, summarize
from kdbench.report.tables import BUSY_NOTE, leaderboard_blocks
from kdbench.report.terminal import terminal_view
from test_report_summary import grid, record

WIDTH = 100


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The embedded smoke grid (every recipe kind), one epoch, three seeds: what `kdbench run` prints."""
    root = tmp_path_factory.mktemp("quick")
    db = str(root / "quick.db")
    args = ["run", "smoke", "--set", "training.epochs=1", "--set", "seeds=[0,1,2]", "--set", "measure.latency_repeats=3",
            "--store", db, "--cache-dir", str(root / "cache"), "--quiet"]
    return args, db


def test_run_ends_with_a_table_that_fits_a_terminal(quickstart, capsys):
    args, db = quickstart
    assert main(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert all(len(line) <= WIDTH for line in lines), max(lines, key=len)
    assert not any(line.startswith("|") for line in lines)  # no Markdown table
    header = next(line for line in lines if line.startswith("recipe "))
    for column in ("n", "accuracy % ↑", "Δ vs", "ref/file", "× teacher b1", "note"):
        assert column in header
    assert lines[lines.index(header) + 1] == "─" * len(lines[lines.index(header) + 1])  # the rule
    assert "task digits (protocol " in out and "Protocol " in out
    # Two students: each one's recipes under its label and the reference they are compared to:
    # compound recipes with their parent (kd), or with the parent trained as long (kd+ft3).
    for heading in ("mlp(hidden=[32]) (Δ vs scratch)", "mlp(hidden=[32]) (Δ vs kd)", "mlp(hidden=[32]) (Δ vs kd+ft3)",
                    "mlp(hidden=[512,512]) (Δ vs teacher)", "mlp(hidden=[512,512]) (Δ vs teacher+ft3:hinton)"):
        assert heading in lines, heading
    after = lines[lines.index("mlp(hidden=[32]) (Δ vs kd+ft3)") + 1:]
    assert [line.split()[0] for line in after[:2]] == ["kd+prune", "kd+svd"]
    rows = {line.split()[0]: line for line in lines if line.startswith(("teacher ", "  ")) and ": " not in line}
    assert rows["kd+ft3"].endswith("§") or " § " in rows["kd+ft3"]  # derived by controls: auto
    assert "Recipes (resolved stages):" in lines
    assert "  kd+ft3: distill:hinton(temperature=4) > finetune(3)" in lines
    for recipe in ("teacher", "scratch", "kd", "kd+prune", "kd+int8", "kd+svd", "teacher+prune", "kd+ft3",
                   "teacher+ft3:hinton"):
        assert recipe in rows, recipe
        assert re.search(r" 3  \d+\.\d\d ± \d+\.\d\d \[\d+\.\d\d, \d+\.\d\d\]", rows[recipe])  # n, mean ± std [CI]
    assert "(reference)" in rows["scratch"]
    assert re.search(r"[+−]\d+\.\d\d( ✓)? +\d+\.\d\d× +\d+\.\d\d×", rows["kd+int8"])  # Δ, ref/file, × teacher
    assert "†" in rows["kd+prune"] and "‡" in rows["teacher+prune"]
    assert "† simulated compression" in out and "‡ sparse weights" in out
    # Columns line up: every figure of a row starts where its header does.
    at = header.index("× teacher b1") + len("× teacher b1")
    assert all(rows[r][at - 1] == "×" for r in ("scratch", "kd", "kd+svd"))

    # The same view from the store, and every column with --wide.
    assert main(["leaderboard", "--store", db]) == 0
    assert capsys.readouterr().out == out
    assert main(["run", *args[1:], "--wide"]) == 0  # nothing left to run: prints the table
    wide = capsys.readouterr().out
    assert "| student | recipe | n | accuracy % ↑ | 95% CI |" in wide and "| p | rank |" in wide
    assert main(["leaderboard", "--store", db, "--wide"]) == 0
    board = capsys.readouterr().out
    assert board.startswith(wide.rstrip("\n")) and "kdbench: " in board  # plus the environment
    assert main(["leaderboard", "--store", db, "--format", "md"]) == 0
    assert capsys.readouterr().out == board


def test_wide_is_markdown_and_a_file_keeps_getting_markdown(quickstart, capsys, tmp_path):
    args, db = quickstart
    if main(["leaderboard", "--store", db]) != 0:  # this test alone: run the grid first
        assert main(args) == 0
    capsys.readouterr()
    assert main(["leaderboard", "--store", db, "--wide", "--format", "csv"]) == 2
    assert "--wide is the full Markdown table" in capsys.readouterr().err
    assert main(["leaderboard", "--store", db, "--output", str(tmp_path / "board.md")]) == 0
    assert "| student | recipe |" in (tmp_path / "board.md").read_text()


def test_few_seeds_several_teachers_and_lower_is_better_stay_readable():
    one = grid({"teacher": [0.97], "scratch": [0.90], "kd": [0.92]})
    two = grid({"teacher": [0.95, 0.96], "scratch": [0.88, 0.89], "kd": [0.90, 0.93]},
               teacher="mlp(hidden=[128])")
    text = terminal_view(summarize(frame(one + two)))
    lines = text.splitlines()
    assert all(len(line) <= WIDTH for line in lines)
    # One seed: the mean alone; two: mean ± std but no interval (t with 1 degree of freedom).
    scratch = [line for line in lines if line.startswith("  scratch ")]
    assert re.fullmatch(r"  scratch +1  90\.00 +\(reference\) +1\.00×", scratch[1])
    assert re.fullmatch(r"  scratch +2  88\.50 ± 0\.71 +\(reference\) +1\.00×", scratch[0])
    kd = [line for line in lines if line.startswith("  kd ")]
    assert "+2.00 (n=1)" in kd[1] and "+3.00 (n=2)" in kd[0]  # reported, never marked
    # A heading per teacher and per pair: no model label in a column of its own.
    assert "mlp(hidden=[64])" in lines and "mlp(hidden=[64]) → mlp(hidden=[16])" in lines
    assert "mlp(hidden=[128]) → mlp(hidden=[16])" in lines

    lower = [record(r, s, {"test_perplexity": v, "size_bytes": 10.0}, role="teacher" if r == "teacher" else "student")
             for r, vs in {"teacher": [3.1, 3.2, 3.0], "scratch": [5.0, 5.2, 5.1]}.items() for s, v in enumerate(vs)]
    text = terminal_view(summarize(frame(lower)))
    assert "perplexity ↓" in text and "5.100 ± 0.100 [4.852, 5.348]" in text


def _loaded(load_of_kd_seed_1: float | None, cores: int = 2) -> list:
    """A grid whose rows were timed at a load of 0.5, except kd's seed 1."""
    recs = grid({"teacher": [0.97, 0.98, 0.99], "scratch": [0.90, 0.91, 0.92], "kd": [0.92, 0.93, 0.95]})
    for r in recs:
        r.metrics.update(latency_load=0.5, cpu_count=cores, speedup_b1=3.0)
        if r.recipe == "kd" and r.seed == 1:
            r.metrics["latency_load"] = load_of_kd_seed_1
    return recs


def test_a_row_timed_on_a_busy_machine_is_flagged_in_every_view(plugins, tmp_path):
    from kdbench.report.folder import build_report

    records = _loaded(3.1)
    s = summarize(frame(records))
    assert s.fingerprint.nunique() == 1  # the load is no part of the protocol: one table
    text = terminal_view(s)
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith(("teacher ", "scratch ", "kd "))}
    assert rows["kd"].rstrip().endswith("⚠")
    assert "⚠" not in rows["scratch"] and "⚠" not in rows["teacher"]
    assert "load during timing: max 3.1 on 2 cores" in " ".join(text.split())
    assert BUSY_NOTE in " ".join(text.split())
    assert all(len(line) <= WIDTH for line in text.splitlines())

    wide = render.to_markdown(leaderboard_blocks(s))
    assert "| kd ⚠ |" in wide and "| scratch |" in wide
    assert BUSY_NOTE in wide and "load during timing: max 3.1 on 2 cores." in wide
    build_report(records, s, tmp_path / "report", plugins=plugins, title="t", command="kdbench report")
    readme = (tmp_path / "report" / "README.md").read_text()
    assert "| kd ⚠ |" in readme and BUSY_NOTE in readme

    calm = summarize(frame(_loaded(1.9)))  # below the core count: no warning
    assert "⚠" not in terminal_view(calm) and "⚠" not in render.to_markdown(leaderboard_blocks(calm))
    assert "load during timing: max 1.9 on 2 cores" in " ".join(terminal_view(calm).split())


def test_rows_stored_before_the_load_was_recorded_show_no_load():
    old = grid({"teacher": [0.97, 0.98, 0.99], "scratch": [0.90, 0.91, 0.92], "kd": [0.92, 0.93, 0.95]})
    for s in (summarize(frame(old)), summarize(frame(old + [
            record("kd+int8", seed, {"test_accuracy": 0.9, "latency_load": 5.0, "cpu_count": 4})
            for seed in range(3)]))):
        text, wide = terminal_view(s), render.to_markdown(leaderboard_blocks(s))
        assert "kd " in text and "| kd |" in wide
        rows = {line.split()[0]: line for line in text.splitlines() if line.startswith(("scratch ", "kd "))}
        assert "⚠" not in rows["kd"] and "⚠" not in rows["scratch"]
    assert "load during timing" not in terminal_view(summarize(frame(old)))
    assert "load during timing: max 5.0 on 4 cores" in " ".join(text.split())  # the newer row's
    assert "kd+int8 ⚠" in wide


def test_bars_are_drawn_on_a_terminal_that_reports_no_size():
    """``script`` and some CI runners open a pseudo-terminal of 0 x 0: tqdm would hide every
    bar there, so the bars take 100 x 40; a terminal with a size is followed as it resizes."""
    import fcntl
    import pty
    import struct
    import termios

    from kdbench.runner import bar_layout

    leader, follower = pty.openpty()
    try:
        with open(follower, "w", closefd=False) as stream:
            assert bar_layout(stream) == {"ncols": 100, "nrows": 40}
            fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 120, 0, 0))
            assert bar_layout(stream) == {"dynamic_ncols": True}
    finally:
        os.close(leader)
        os.close(follower)
