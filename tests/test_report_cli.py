"""``kdbench leaderboard`` in every format and ``kdbench report`` end to end, on a real run."""

from __future__ import annotations

import dataclasses
import io
import json

import pandas as pd
import pytest

from kdbench.cli import main
from kdbench.errors import KdbenchError
from test_report_render import DomReader, chromium

# A recipe name with characters HTML, Markdown and LaTeX treat as markup: every output must
# show it as text.
EXPERIMENT = """
name: tiny-report
seeds: [0, 1, 2]
tasks: [digits]
pairs:
  - teacher: {name: mlp, hidden: [64]}
    student: {name: mlp, hidden: [16]}
recipes:
  scratch: [train]
  kd<i>&co_50%: [{distill: {name: hinton, temperature: 4, alpha: 0.9}}]
  kd+int8: [{distill: hinton}, {quantize: dynamic-int8}]
training: {epochs: 2, batch_size: 64}
measure: {latency_repeats: 2, latency_warmup: 1, latency_batch_sizes: [1, 32]}
"""
ODD = "kd<i>&co_50%"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One real run shared by the tests: 3 seeds, a teacher and 3 recipes."""
    root = tmp_path_factory.mktemp("report")
    path = root / "tiny-report.yaml"
    path.write_text(EXPERIMENT)
    db = str(root / "r.db")
    assert main(["run", str(path), "--store", db, "--cache-dir", str(root / "cache"), "--quiet"]) == 0
    return path, db, root


def board(capsys, db, *args) -> str:
    capsys.readouterr()
    assert main(["leaderboard", "--store", db, *args]) == 0
    return capsys.readouterr().out


def test_csv_and_json_hold_every_statistic(run, capsys):
    _, db, _ = run
    table = pd.read_csv(io.StringIO(board(capsys, db, "--format", "csv")))
    assert list(table["recipe"]) == ["teacher", "scratch", ODD, "kd+int8"]
    assert {"test_accuracy_mean", "test_accuracy_std", "test_accuracy_ci95", "delta_mean", "p_value",
            "significant", "rank", "fingerprint", "retained_pct", "bytes_ratio_teacher"} <= set(table.columns)
    assert (table["n"] == 3).all()
    data = json.loads(board(capsys, db, "--format", "json"))
    rows = {r["recipe"]: r for r in data["rows"]}
    assert rows[ODD]["reference"] == "scratch" and rows["teacher"]["reference"] is None
    assert rows[ODD]["protocol"]["budget"]["epochs"] == 2
    assert rows[ODD]["protocol"]["latency"]["batch_sizes"] == [1, 32]
    assert len(data["cells"]) == 12 and all("config" in c for c in data["cells"])
    assert rows["scratch"]["test_accuracy_mean"] == pytest.approx(
        table.set_index("recipe").loc["scratch", "test_accuracy_mean"])


def test_markdown_latex_and_html_show_the_same_number(run, capsys):
    _, db, _ = run
    table = pd.read_csv(io.StringIO(board(capsys, db, "--format", "csv"))).set_index("recipe")
    number = f"{100 * table.loc['scratch', 'test_accuracy_mean']:.2f} ± {100 * table.loc['scratch', 'test_accuracy_std']:.2f}"
    md = board(capsys, db, "--format", "md")
    assert number in md and "kd\\<i\\>&co_50%" in md
    assert number in board(capsys, db) and ODD in board(capsys, db)  # the terminal's view: plain text
    latex = board(capsys, db, "--format", "latex")
    assert "\\toprule" in latex and "\\bottomrule" in latex
    assert "kd\\textless{}i\\textgreater{}\\&co\\_50\\%" in latex
    assert number.replace(" ± ", " $\\pm$ ") in latex
    html = board(capsys, db, "--format", "html")
    assert "<script" not in html and "kd&lt;i&gt;&amp;co_50%" in html and number in html


def test_filters_reference_metric_and_grouping(run, capsys):
    _, db, _ = run
    kd_only = pd.read_csv(io.StringIO(board(capsys, db, "--format", "csv", "--recipe", "kd*")))
    # The teacher's row stays with any recipe filter; without scratch the teacher is the reference
    # of the KD row, and the KD row that of its compound (kd+int8 = the KD recipe + int8).
    assert list(kd_only["recipe"]) == ["teacher", ODD, "kd+int8"]
    assert kd_only.set_index("recipe")["reference"].dropna().to_dict() == {ODD: "teacher", "kd+int8": ODD}
    chosen = pd.read_csv(io.StringIO(board(capsys, db, "--format", "csv", "--reference", "kd+int8",
                                           "--metric", "teacher_agreement")))
    odd = chosen.set_index("recipe").loc[ODD]
    assert odd["reference"] == "kd+int8" and odd["compared"] == "teacher_agreement"
    md = board(capsys, db, "--by", "recipe")
    assert md.count("(protocol ") == 4  # one table per recipe


@pytest.mark.parametrize("args, message", [
    (["--reference", "scrach"], "did you mean 'scratch'"),
    (["--metric", "test_acuracy"], "did you mean 'test_accuracy'"),
    (["--by", "tsk"], "did you mean 'task'"),
    (["--task", "nothing*"], "no finished cells match"),
    (["--experiment", "tiny-reprot"], "did you mean 'tiny-report'"),
])
def test_bad_options_name_the_fix_and_exit_2(run, capsys, args, message):
    _, db, _ = run
    assert main(["leaderboard", "--store", db, *args]) == 2
    assert message in capsys.readouterr().err


def test_report_folder_has_everything_and_opens_in_a_browser(run, capsys):
    path, db, root = run
    out = root / "published"
    assert main(["report", str(path), "--store", db, "--output", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"README.md", "index.html", "leaderboard.csv", "leaderboard.json", "figures"} <= names
    pngs = sorted((out / "figures").glob("*.png"))
    assert pngs and all(p.with_suffix(".svg").exists() for p in pngs)
    readme = (out / "README.md").read_text()
    # The file given regenerates every stored row; the command that wrote the folder is there.
    assert "this file regenerates 9 of the 9 stored student rows" in readme
    assert f"kdbench report {path} --store {db} --output {out}" in readme
    assert "name: tiny-report" in readme and "torch:" in readme
    # Under the leaderboard, each row's resolved stages and what it is compared with.
    recipes = readme[readme.index("**Recipes of the table above: resolved stages and references**"):]
    assert "| kd+int8 | distill:hinton(temperature=4) \\> quantize:dynamic-int8 | kd\\<i\\>&co_50% | parent |" in recipes
    for png in pngs:
        assert f"figures/{png.name}" in readme
    html = (out / "index.html").read_text()
    assert "http://" not in html and "https://" not in html
    # The experiment's name is set in code in its heading, never shown with its backticks.
    assert "\n### Experiment `tiny-report`\n" in readme
    assert '<h3 id="experiment-tiny-report">Experiment <code>tiny-report</code></h3>' in html

    # What a reader of index.html sees, in a real browser: the leaderboard's numbers, the odd
    # name as text, every figure embedded.
    dom = DomReader()
    dom.feed(chromium(out / "index.html", "--dump-dom"))
    table = pd.read_csv(out / "leaderboard.csv").set_index("recipe")
    by_recipe: dict = {}
    for r in dom.rows:  # the leaderboard's row, before that of the recipes table under it
        if r:
            by_recipe.setdefault(r[0].split(" ")[0], r)
    expected = f"{100 * table.loc['kd+int8', 'test_accuracy_mean']:.2f} ± {100 * table.loc['kd+int8', 'test_accuracy_std']:.2f}"
    assert expected in by_recipe["kd+int8"]
    assert ODD in by_recipe and dom.scripts == 0
    assert len(dom.images) == len(pngs) and all(i["src"].startswith("data:image/png;base64,") for i in dom.images)


def test_a_report_states_how_the_machine_was_used(run, capsys, tmp_path):
    """Under the title: the publisher's statement, then what the rows recorded of the runs:
    the CPU, threads per cell, cells at once (from their overlapping start and finish times)
    and the load while timing, so a reader can judge the latency columns."""
    from kdbench.report.folder import conditions
    from test_report_summary import record

    path, db, root = run
    out = tmp_path / "noted"
    assert main(["report", "--store", db, "--output", str(out), "--note", "The machine ran nothing else."]) == 0
    readme = (out / "README.md").read_text()
    assert readme.index("The machine ran nothing else.") < readme.index("Conditions, as the rows recorded them")
    assert "at most 1 cell(s) at once" in readme and "load average while timing" in readme

    def cell(recipe, start, finish, load):
        r = record(recipe, 0, {"test_accuracy": 0.9, "latency_load": load, "cpu_count": 2})
        r.environment.update(run="r1")
        return dataclasses.replace(r, started_at=f"2026-01-01T00:00:{start:02d}", finished_at=f"2026-01-01T00:00:{finish:02d}")

    # Two cells overlap, the third runs alone: at most 2 at once.
    line, = conditions([cell("a", 0, 10, 1.5), cell("b", 5, 20, 2.5), cell("c", 30, 40, 0.9)])
    assert line == ("run `r1` (exp): 3 cells, Test CPU (2 cores), 1 torch thread(s) per cell, at most 2 cell(s) at "
                    "once, 1 min from first start to last finish, load average while timing 0.9-2.5")


def test_report_without_the_experiment_file_says_so(run, capsys, tmp_path):
    _, db, _ = run
    assert main(["report", "--store", db, "--output", str(tmp_path / "r")]) == 0
    readme = (tmp_path / "r" / "README.md").read_text()
    assert "the file is not available here" in readme


def test_published_results_are_listed_and_filtered(capsys):
    assert main(["published", "--teacher", "resnet56", "--method", "kd", "--format", "csv"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert set(table["student_arch"]) == {"resnet20"} and set(table["method"]) == {"kd"}
    assert 70.66 in set(table["top1"])  # RepDistiller README, resnet56 -> resnet20, KD
    assert main(["published", "--method", "no-such-method"]) == 2


def test_a_cifar100_crd_run_is_shown_against_the_published_table(tmp_path, capsys):
    """The paper experiment on files in the official format (random pixels, one epoch): the
    report finds the RepDistiller and mdistiller numbers of its cells and prints both."""
    from kdbench_plugins.tasks.cifar import CIFAR100_FILES
    from test_tasks_images import write_cifar

    write_cifar(tmp_path / "data", CIFAR100_FILES, 300, 100, byte_keys=False)
    db, out = str(tmp_path / "r.db"), tmp_path / "report"
    small = ["--set", f"tasks=[{{name: cifar100, root: {tmp_path / 'data'}, val_size: 100}}]",
             "--set", "pairs=[{teacher: {name: resnet, arch: resnet56}, student: {name: resnet, arch: resnet20}}]",
             "--set", "recipes={scratch: [train], kd: [{distill: {name: hinton, temperature: 4, alpha: 0.9}}]}",
             "--set", "seeds=[0]", "--set", "training.epochs=1", "--set", "training.batch_size=50",
             "--set", "measure={latency_batch_sizes: [1], latency_repeats: 1, latency_warmup: 1}"]
    assert main(["run", "cifar100-crd", *small, "--store", db, "--cache-dir", str(tmp_path / "cache"),
                 "--quiet", "--threads", "1"]) == 0
    assert main(["report", "--store", db, "--output", str(out)]) == 0
    readme = (out / "README.md").read_text()
    section = readme[readme.index("## Published and reproduced"):]
    table = pd.read_csv(out / "leaderboard.csv").set_index("recipe")
    kd = 100 * table.loc["kd", "test_accuracy_mean"]
    # RepDistiller's resnet56 -> resnet20 KD is 70.66; the difference is reproduced - published.
    assert "70.66" in section and f"{kd - 70.66:+.2f}".replace("-", "−") in section
    assert "69.06" in section and "72.34" in section  # scratch and the teacher


# --- the --output folder: missing, empty, or an earlier report ------------------------------

def report(capsys, db, out, *args) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["report", "--store", db, "--output", str(out), *args])
    return code, capsys.readouterr().err


def tree(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_earlier_report_is_replaced_whole(run, capsys, tmp_path):
    _, db, _ = run
    out = tmp_path / "empty"
    out.mkdir()
    assert report(capsys, db, out)[0] == 0  # an empty folder is taken as it is
    methods = [p.name for p in (out / "figures").glob("*-methods.png")]
    assert methods  # a per-recipe figure: there are several recipes
    marker = json.loads((out / ".kdbench-report").read_text())
    assert set(marker["files"]) == set(tree(out)) - {".kdbench-report"}
    assert marker["written_by"].startswith("kdbench ")

    # Again with one recipe: no per-recipe figure, and the old one must not linger or be counted.
    code, err = report(capsys, db, out, "--recipe", "scratch")
    assert code == 0
    files = tree(out)
    assert not [name for name in files if name.endswith(("-methods.png", "-methods.svg"))]
    assert f"wrote {len(files)} files to {out}/" in err
    assert set(json.loads(files[".kdbench-report"])["files"]) == set(files) - {".kdbench-report"}
    assert not any(p.name.startswith(".kdbench-staging") for p in out.iterdir())

    # A report written before the marker existed is recognised by its files and replaced too.
    (out / ".kdbench-report").unlink()
    assert report(capsys, db, out)[0] == 0
    assert sorted((out / "figures").glob("*-methods.png"))


def test_a_folder_that_is_no_report_is_refused_and_left_untouched(run, capsys, tmp_path):
    _, db, _ = run
    out = tmp_path / "thesis"
    (out / "figures").mkdir(parents=True)
    (out / "chapter1.tex").write_text("my work")
    (out / "figures" / "plot.png").write_bytes(b"mine")
    before = tree(out)
    code, err = report(capsys, db, out)
    assert code == 2
    assert f"report folder {out} is not empty and holds no kdbench report" in err
    assert "chapter1.tex" in err and "choose a new or empty folder with --output" in err
    assert tree(out) == before and sorted(p.name for p in out.iterdir()) == ["chapter1.tex", "figures"]

    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    code, err = report(capsys, db, afile)
    assert code == 2 and "is a file, not a folder" in err and afile.read_text() == "x"


def test_a_report_with_the_users_files_added_is_refused_and_nothing_deleted(run, capsys, tmp_path):
    _, db, _ = run
    out = tmp_path / "published"
    assert report(capsys, db, out)[0] == 0
    (out / "my-notes.md").write_text("keep me")
    (out / "figures" / "my-own-plot.png").write_bytes(b"mine too")
    before = tree(out)
    code, err = report(capsys, db, out, "--recipe", "scratch")
    assert code == 2
    assert "holds an earlier kdbench report and also" in err
    assert "figures/my-own-plot.png" in err and "my-notes.md" in err and "nothing was deleted" in err
    assert tree(out) == before


def test_a_report_that_fails_halfway_leaves_the_earlier_one_as_it_was(tmp_path):
    from kdbench.report import output

    out = tmp_path / "r"
    with output.replacing(out) as folder:
        for name in output.MAIN_FILES:
            (folder / name).write_text("old " + name)
        output.write_marker(folder, output.MAIN_FILES)
    before = tree(out)
    with pytest.raises(RuntimeError, match="figure failed"), output.replacing(out) as folder:
        (folder / "README.md").write_text("new, half written")
        raise RuntimeError("figure failed")
    assert tree(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)
    # Nor is a folder left behind where there was none.
    with pytest.raises(RuntimeError), output.replacing(tmp_path / "new") as folder:
        raise RuntimeError("x")
    assert not (tmp_path / "new").exists()
    # A marker naming a path outside the folder makes it no report: nothing outside is touched.
    (tmp_path / "victim.txt").write_text("keep")
    (out / ".kdbench-report").write_text(json.dumps({"files": ["../victim.txt", "README.md"]}))
    with pytest.raises(KdbenchError, match="holds no kdbench report"):
        output.earlier_report(out)
    assert (tmp_path / "victim.txt").read_text() == "keep"


# --- layers a compressor skipped -------------------------------------------------------------

def test_the_report_lists_the_layers_a_compressor_skipped(tmp_path):
    import dataclasses

    from kdbench.plugins import get_plugins
    from kdbench.report.folder import build_report
    from kdbench.report.summary import frame, summarize
    from test_report_summary import grid

    records = grid({"teacher": [0.97, 0.98, 0.99], "scratch": [0.90, 0.91, 0.92], "nm24": [0.89, 0.90, 0.91],
                    "dense-ft": [0.90, 0.91, 0.92]})
    skipped = {"net.0": "in_features 13 is not a multiple of M=4", "head|<out>": "output layer kept dense"}
    stages = [{"op": "train", "name": None, "seconds": 1.0},
              {"op": "prune", "name": "nm", "seconds": 0.1, "materialized": False,
               "report": {"sparsity": 0.5, "skipped_layers": skipped}}]
    records = [dataclasses.replace(r, stages=stages) if r.recipe == "nm24" else r for r in records]
    # A compressor that skipped nothing, as most do, adds no row.
    records = [dataclasses.replace(r, stages=[{"op": "prune", "name": "magnitude", "report": {"sparsity": 0.5}}])
               if r.recipe == "dense-ft" else r for r in records]
    out = tmp_path / "r"
    build_report(records, summarize(frame(records)), out, plugins=get_plugins(), title="t", command="kdbench report")
    readme = (out / "README.md").read_text()
    section = readme[readme.index("## Layers left uncompressed"):readme.index("## Figures")]
    rows = [line for line in section.splitlines() if line.startswith("| digits")]
    assert rows == [
        r"| digits | mlp(hidden=[64]) → mlp(hidden=[16]) | nm24 | prune nm | net.0 | in_features 13 is not a multiple of M=4 | 0, 1, 2 |",
        r"| digits | mlp(hidden=[64]) → mlp(hidden=[16]) | nm24 | prune nm | head\|\<out\> | output layer kept dense | 0, 1, 2 |",
    ]
    html = (out / "index.html").read_text()
    assert '<h2 id="layers-left-uncompressed">Layers left uncompressed</h2>' in html
    assert "<td>head|&lt;out&gt;</td><td>output layer kept dense</td>" in html

    # Without a skipped layer there is no such section.
    plain = [r for r in records if r.recipe != "nm24"]
    build_report(plain, summarize(frame(plain)), tmp_path / "plain", plugins=get_plugins(), title="t",
                 command="kdbench report")
    assert "uncompressed" not in (tmp_path / "plain" / "README.md").read_text()
    assert "uncompressed" not in (tmp_path / "plain" / "index.html").read_text()
