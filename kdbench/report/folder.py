"""``kdbench report``: one folder a researcher can publish as it is.

README.md (tables, figures, the experiment files, the environment and the commands that
regenerate it), leaderboard.csv and leaderboard.json (every statistic of every row), the
figures as PNG and SVG, and index.html with the figures embedded (opens offline).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..config import digest, embedded_experiments, load_experiment
from ..errors import KdbenchError
from ..store import Record
from . import figures, output, published, render
from .document import Block, Code, Figure, Heading, Paragraph, Table
from .references import config_id, teacher_trainings
from .summary import aggregate_ranks
from .tables import is_fraction, is_own_reference, leaderboard_blocks, ranks_table, row_label, row_references


@dataclasses.dataclass
class Source:
    """An experiment file behind the report, and how many stored rows it regenerates."""

    name: str
    text: str | None
    location: str
    matched: int = 0
    stored: int = 0


def experiment_sources(names: Sequence[str], records: Sequence[Record], plugins,
                       files: dict[str, str]) -> list[Source]:
    """For each experiment in the report, its file (given on the command line, else the
    embedded one of that name) and a check that the file's cells are the stored cells."""
    embedded = embedded_experiments()
    out = []
    for name in names:
        stored = {r.cell_id for r in records if r.experiment == name and r.role == "student" and r.ok}
        path = files.get(name)
        if path is None and name not in embedded:
            out.append(Source(name, None, "not available", 0, len(stored)))
            continue
        text = Path(path).read_text() if path else embedded[name]
        location = path or f"kdbench/experiments/{name}.yaml (embedded)"
        try:
            experiment = load_experiment(path or name, plugins)
            ids = {c.cell_id(plugins) for c in experiment.cells()}
        except KdbenchError:
            ids = set()
        out.append(Source(name, text, location, len(stored & ids), len(stored)))
    return out


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "x"


def _group_histories(records: Sequence[Record], experiment: str, task: str, teacher: str,
                     student: str, labels: dict[tuple, str] | None = None) -> dict[str, list[list[dict]]]:
    """The last training stage's history of each seed, per row label (``labels``: a recipe's
    configurations by (recipe, config id), where one recipe has several)."""
    out: dict[str, list[list[dict]]] = {}
    teachers = teacher_trainings([r for r in records if r.ok]) if labels else {}
    for r in records:
        if (r.ok and r.role == "student" and (r.experiment, r.task, r.teacher, r.student)
                == (experiment, task, teacher, student)):
            trained = [s["history"] for s in r.stages if s.get("history")]
            if trained:
                label = (labels or {}).get((r.recipe, config_id(r, teachers)), r.recipe)
                out.setdefault(label, []).append(trained[-1])
    return out


def figure_blocks(summary: pd.DataFrame, records: Sequence[Record], out: Path) -> list[Block]:
    """Per (task, protocol): Pareto fronts (bytes, latency) and the per-recipe dot plot; per
    (task, pair): training curves."""
    blocks: list[Block] = []
    for (task, fp), rows in summary.groupby(["task", "fingerprint"], sort=False):
        name = f"{task} (protocol {fp})" if summary[summary.task == task].fingerprint.nunique() > 1 else task
        metric = rows.iloc[0]["metric"]
        blocks.append(Heading(f"Figures: {name}", 3))
        for cost, label in (("size_bytes", "file size (bytes)"), ("latency_b1_ms", "latency at batch 1 (ms, median over the rows of one architecture)")):
            if f"{cost}_mean" not in rows or rows[f"{cost}_mean"].isna().all():
                continue
            stem = Path("figures") / f"{slug(task)}-{fp}-pareto-{slug(cost)}"
            front = figures.pareto_figure(rows, cost, label, out / stem, f"{task}: {metric} vs {label}")
            blocks.append(Figure(stem, f"{task}: test {metric} against {label}; the Pareto front "
                                       f"(highlighted): {', '.join(front)}"))
        for (teacher, student), pair in rows[~rows.is_teacher].groupby(["teacher", "student"], sort=False):
            pair_rows = pd.concat([rows[rows.is_teacher & (rows.teacher == teacher)], pair])
            # Short and unique: a readable prefix and a hash of the pair.
            tag = f"{slug(task)[:24]}-{fp}-{slug(student)[:20]}-{digest([teacher, student])[:6]}"
            title = f"{task}: {teacher} → {student}"
            if len(pair) > 1:
                stem = Path("figures") / f"{tag}-methods"
                references = row_references(pair)
                # One reference is named in the legend; with several, each row's is in the tables.
                reference = references[0] if len(references) == 1 else None
                figures.method_bars(pair_rows, out / stem, title, reference=reference)
                blocks.append(Figure(stem, f"{title}: test {metric} per recipe, mean with 95% CI (from 3 seeds); "
                                           "colour: paired comparison with "
                                           + ("the reference" if reference else "each row's reference (see the recipes table)")))
            labels = ({(r["recipe"], r["config_id"]): row_label(r) for r in pair.to_dict("records")}
                      if "config_id" in pair else None)
            histories = _group_histories(records, pair.iloc[0]["experiment"], task, teacher, student, labels)
            if histories:
                stem = Path("figures") / f"{tag}-curves"
                figures.training_curves(histories, metric, bool(rows.iloc[0]["higher_is_better"]),
                                        out / stem, f"{title}: training curves")
                blocks.append(Figure(stem, f"{title}: validation {metric} per epoch (mean over seeds, "
                                           "band min-max) and each loss term of the last training stage"))
    return blocks


def environment_text(records: Sequence[Record]) -> str:
    envs = [r.environment for r in records if r.ok]
    keys = ["kdbench", "torch", "python", "platform", "cpu", "threads", "quantized_engine", "device"]
    lines = []
    for key in keys:
        values = list(dict.fromkeys(str(e.get(key)) for e in envs if e.get(key) is not None))
        if values:
            lines.append(f"{key}: {', '.join(values)}")
    revisions = list(dict.fromkeys(e.get("git_revision") or "n/a" for e in envs))
    lines.append(f"git revision: {', '.join(revisions)}")
    return "\n".join(lines)


def conditions(records: Sequence[Record]) -> list[str]:
    """What the machine was doing while each run measured, from what the rows recorded: the
    CPU and its cores, torch threads per cell, how many cells ran at once (their recorded
    start and finish times overlapping) and the 1-minute load average read around each
    latency measurement. A load near the number of cells running at once means the run had
    the machine to itself; well above it, something else ran too."""
    import datetime as dt

    runs: dict[str, list[Record]] = {}
    for r in records:
        if r.ok:
            runs.setdefault(str(r.environment.get("run") or "?"), []).append(r)
    lines = []
    for run, rows in runs.items():
        env = rows[0].environment
        spans = sorted((dt.datetime.fromisoformat(r.started_at), dt.datetime.fromisoformat(r.finished_at))
                       for r in rows if r.started_at and r.finished_at)
        at_once = 0
        for start, _ in spans:  # cells running at the moment each one started
            at_once = max(at_once, sum(s <= start < f for s, f in spans))
        loads = [float(r.metrics["latency_load"]) for r in rows if r.metrics.get("latency_load") is not None]
        cores = rows[0].metrics.get("cpu_count")
        wall = (max(f for _, f in spans) - spans[0][0]).total_seconds() / 60 if spans else None
        parts = [f"{len(rows)} cells", f"{env.get('cpu', 'CPU')}" + (f" ({int(cores)} cores)" if cores else ""),
                 f"{env.get('threads')} torch thread(s) per cell", f"at most {at_once} cell(s) at once"]
        if wall is not None:
            parts.append(f"{wall:.0f} min from first start to last finish")
        if loads:
            parts.append(f"load average while timing {min(loads):.1f}-{max(loads):.1f}")
        names = ", ".join(dict.fromkeys(r.experiment for r in rows))
        lines.append(f"run `{run}` ({names}): " + ", ".join(parts))
    return lines


def run_commands(records: Sequence[Record]) -> list[str]:
    """The ``kdbench run`` command lines that produced the rows, as recorded with them (a
    cache directory is a machine's own path and is left out)."""
    seen = []
    for r in records:
        argv = list(r.environment.get("argv") or [])
        if not argv or argv[0] != "run":
            continue
        clean, skip = [], False
        for arg in argv:
            if skip:
                skip = False
                continue
            if arg == "--cache-dir":
                skip = True
                continue
            if arg.startswith("--cache-dir="):
                continue
            clean.append(arg)
        line = "kdbench " + " ".join(clean)
        if line not in seen:
            seen.append(line)
    return seen


def build_report(records: Sequence[Record], summary: pd.DataFrame, out: Path, *, plugins, title: str,
                 command: str, notes: Sequence[str] = (), files: dict[str, str] | None = None,
                 by: Sequence[str] = ("task",), statement: Sequence[str] = ()) -> list[Path]:
    """Write the report folder ``out``; return the files written.

    ``out`` must be missing, empty or an earlier report, which is replaced whole (see
    :mod:`kdbench.report.output`); anything else raises KdbenchError before anything is written.
    """
    with output.replacing(Path(out)) as folder:
        written = _write_report(records, summary, folder, plugins=plugins, title=title, command=command,
                                notes=notes, files=files, by=by, statement=statement)
        output.write_marker(folder, written)
    return [Path(out) / name for name in [*written, output.MARKER]]


def _write_report(records: Sequence[Record], summary: pd.DataFrame, out: Path, *, plugins, title: str,
                  command: str, notes: Sequence[str], files: dict[str, str] | None,
                  by: Sequence[str], statement: Sequence[str] = ()) -> list[str]:
    """Write the report into the empty folder ``out``; return its files, relative to ``out``."""
    experiments = list(dict.fromkeys(r.experiment for r in records))
    sources = experiment_sources(experiments, records, plugins, files or {})
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    seeds = sorted({r.seed for r in ok})
    blocks: list[Block] = [Heading(title, 1), Paragraph(
        f"{len(ok)} finished cells ({sum(r.role == 'teacher' for r in ok)} teacher rows) of "
        f"{', '.join(f'`{e}`' for e in experiments)}, seeds {', '.join(map(str, seeds))}"
        + (f"; {len(failed)} failed cells are not in the tables (see below)" if failed else "") + ". "
        "Every number below was measured by a run of kdbench; `leaderboard.csv` and "
        "`leaderboard.json` hold every statistic of every row.")]
    blocks += [Paragraph(text) for text in statement]
    measured = conditions(records)
    if measured:
        blocks.append(Paragraph("Conditions, as the rows recorded them: " + "; ".join(measured) + "."))
    blocks += findings(summary)
    blocks.append(Heading("Leaderboards", 2))
    blocks += leaderboard_blocks(summary, by)
    aggregate = aggregate_ranks(summary)
    if len(aggregate) and aggregate["of"].iloc[0] > 1 and aggregate["mean_rank"].notna().any():
        blocks += [Heading("Aggregate rank", 2), ranks_table(aggregate)]
    comparison = published.compare(summary)
    if len(comparison):
        blocks += [Heading("Published and reproduced", 2), published.to_table(comparison)]
    blocks += skipped_layers(records)
    blocks.append(Heading("Figures", 2))
    blocks += figure_blocks(summary, records, out)
    if failed:
        blocks += [Heading("Failed cells", 2), Table(
            ["experiment", "task", "teacher", "student", "recipe", "seed", "error"],
            [[r.experiment, r.task, r.teacher, r.student, r.recipe, str(r.seed), (r.error or "")[:200]]
             for r in failed])]
    blocks += [Heading("Reproduce", 2), Paragraph(
        "The commands that produced the rows (as recorded with them), then the command that "
        "wrote this folder. Finished cells are kept in the store: rerunning only fills in what "
        "is missing.")]
    blocks.append(Code("\n".join(run_commands(records) + [command]), "bash"))
    for src in sources:
        check = (f"this file regenerates {src.matched} of the {src.stored} stored student rows"
                 if src.text is not None else "the file is not available here; every row's resolved "
                 "configuration is in leaderboard.json")
        blocks += [Heading(f"Experiment `{src.name}`", 3), Paragraph(f"{src.location}: {check}.")]
        if src.text is not None:
            blocks.append(Code(src.text, "yaml"))
    blocks += [Heading("Environment", 2), Code(environment_text(records))]
    if notes:
        blocks += [Heading("Notes", 2), Paragraph(" ".join(notes))]

    (out / "README.md").write_text(render.to_markdown(blocks))
    (out / "index.html").write_text(render.to_html(blocks, out, title))
    summary.to_csv(out / "leaderboard.csv", index=False)
    (out / "leaderboard.json").write_text(to_json(summary, records))
    # The files of this report, named from its own blocks: never whatever lies in the folder.
    figures_written = sorted(f"{b.stem.as_posix()}.{ext}" for b in blocks if isinstance(b, Figure)
                             for ext in ("png", "svg"))
    return [*output.MAIN_FILES, *figures_written]


def skipped_layers(records: Sequence[Record]) -> list[Block]:
    """The layers a compressor left as they were, per recipe, with its reason: a compressor
    whose ``report()`` has ``skipped_layers`` ({module path: reason}) did not apply to them, and
    the row's size and speed include them uncompressed. Nothing when no compressor skipped any."""
    found: dict[tuple, list[int]] = {}
    for r in records:
        if not (r.ok and r.role == "student"):
            continue
        for stage in r.stages:
            report = stage.get("report")
            skipped = report.get("skipped_layers") if isinstance(report, dict) else None
            if isinstance(skipped, list):  # names without reasons
                skipped = dict.fromkeys(skipped, "")
            if not isinstance(skipped, dict):
                continue
            compressor = " ".join(str(p) for p in (stage.get("op"), stage.get("name")) if p)
            for layer, reason in skipped.items():
                key = (r.experiment, r.task, r.teacher, r.student, r.recipe, compressor, str(layer), str(reason or "-"))
                found.setdefault(key, []).append(r.seed)
    if not found:
        return []
    several = len({key[0] for key in found}) > 1
    rows = [([experiment] if several else []) + [task, f"{teacher} → {student}", recipe, compressor, layer, reason,
                                                  ", ".join(map(str, sorted(set(seeds))))]
            for (experiment, task, teacher, student, recipe, compressor, layer, reason), seeds in found.items()]
    columns = (["experiment"] if several else []) + ["task", "pair", "recipe", "compressor", "layer", "reason", "seeds"]
    return [Heading("Layers left uncompressed", 2), Paragraph(
        "These compressors skipped layers that cannot take what they impose (e.g. an N:M pattern "
        "on a layer whose width is no multiple of M) and left them as they were; the rows' sizes, "
        "sparsities and speeds include those layers uncompressed."),
        Table(columns, rows, caption="Layers a compressor skipped, per recipe")]


#: After every recipe a finding names whose training was still improving (PROTOCOL rule 1).
STILL_IMPROVING_SAYS = "still improving at the end of its training"


def findings(summary: pd.DataFrame) -> list[Block]:
    """A few sentences per protocol table, computed from the numbers: what beat its reference
    significantly (each row against its own: a compound recipe against its parent or its
    equal-budget control), what lost, what could not be compared. A recipe whose training was
    still improving is never named without saying so (its reference included); rows whose task
    metric does not apply are left out of the statements on it, and said to be."""
    lines, marked = [], False
    for (task, teacher, student, fp), rows in summary[~summary.is_teacher].groupby(
            ["task", "teacher", "student", "fingerprint"], sort=False):
        metric = rows.iloc[0]["compared"]
        scale, digits = (100, 2) if is_fraction(metric) else (1, 3)
        unit = " points" if scale == 100 else ""
        higher = bool(rows.iloc[0]["higher_is_better"])
        if not row_references(rows):
            continue
        improving = _still_improving_recipes(summary, rows)
        marked |= bool(improving)

        def name(label: str | None, recipe: str | None = None) -> str:
            return f"`{label}`" + (f" ({STILL_IMPROVING_SAYS})" if (recipe or label) in improving else "")

        inapplicable = rows[~rows.get("metric_applies", pd.Series(True, index=rows.index)).astype(bool)]
        if metric.endswith(f"test_{rows.iloc[0]['metric']}"):
            rows = rows.drop(inapplicable.index)
        else:
            inapplicable = inapplicable[:0]  # compared on another figure: nothing to leave out
        if rows.empty:
            continue
        records = rows.to_dict("records")
        uncontrolled = [r for r in records if r.get("uncontrolled") is True]

        def listed(members: list[dict]) -> str:
            return ", ".join(f"{name(row_label(r), r['recipe'])} vs {name(_reference(r))} "
                             f"({r['delta_mean'] * scale:+.{digits}f}{unit})" for r in members)

        better = [r for r in records if r.get("significant") is True and (r["delta_mean"] > 0) == higher]
        worse = [r for r in records if r.get("significant") is True and (r["delta_mean"] > 0) != higher]
        untested = [r for r in records if r.get("significant") is None and isinstance(_reference(r), str)
                    and not is_own_reference(r) and r.get("uncontrolled") is not True]
        best = rows.sort_values("rank").iloc[0]
        text = (f"**{task}, {teacher} → {student}** (protocol `{fp}`): best {metric.removeprefix('test_')} "
                f"from {name(row_label(best.to_dict()), best.recipe)}; ")
        text += ("significantly better than its reference: " + listed(better) if better
                 else "no recipe is significantly better than its reference")
        if worse:
            text += "; significantly worse: " + listed(worse)
        if untested:
            text += f"; {len(untested)} row(s) have too few seeds to test"
        if uncontrolled:
            text += ("; not compared, for training more than their parent with no equal-budget control: "
                     + ", ".join(name(row_label(r), r["recipe"]) for r in uncontrolled))
        if len(inapplicable):
            text += (f"; not ranked or tested on {metric.removeprefix('test_')}, which does not apply to "
                     "them (see the table's notes): " + ", ".join(name(r) for r in inapplicable.recipe))
        lines.append(Paragraph(text + "."))
    if not lines:
        return []
    return [Heading("Findings", 2), Paragraph(
        "Computed from the tables: paired t-tests by seed against each row's reference (see the "
        "recipes tables), Holm-corrected over the rows compared with the same reference, at 0.05; "
        "with 3 seeds only large or very consistent differences pass."
        + (f" A recipe marked {STILL_IMPROVING_SAYS} (↗ in the tables) had not converged in at "
           "least one seed: its difference may shrink or grow with more epochs." if marked else ""))] + lines


def _reference(row: dict) -> str | None:
    reference = row.get("reference_label", row.get("reference"))
    return reference if isinstance(reference, str) else None


def _still_improving_recipes(summary: pd.DataFrame, rows: pd.DataFrame) -> set[str]:
    """Recipes of ``rows`` (one pair and protocol) that were still improving, with the
    teacher's row (``teacher``) where that is the reference."""
    if "still_improving" not in summary:
        return set()
    first = rows.iloc[0]
    same = summary[(summary.task == first.task) & (summary.teacher == first.teacher)
                   & (summary.fingerprint == first.fingerprint) & (summary.experiment.isin(rows.experiment))
                   & (summary.is_teacher | (summary.student == first.student))]
    return set(same.loc[same.still_improving.astype(bool), "recipe"])


def to_json(summary: pd.DataFrame, records: Sequence[Record]) -> str:
    """Every row's statistics, its protocol, and the resolved configuration of each cell."""
    def clean(value):
        if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
            return None
        if hasattr(value, "item"):
            return clean(value.item())
        return value

    rows = []
    for row in summary.to_dict("records"):
        entry = {k: clean(v) for k, v in row.items() if k != "protocol"}
        entry["protocol"] = json.loads(row["protocol"]) if isinstance(row.get("protocol"), str) else None
        rows.append(entry)
    cells = [{"cell_id": r.cell_id, "experiment": r.experiment, "role": r.role, "recipe": r.recipe,
              "seed": r.seed, "status": r.status, "config": r.config} for r in records]
    return json.dumps({"rows": rows, "cells": cells}, indent=1, default=str)
