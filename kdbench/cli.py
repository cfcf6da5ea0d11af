"""The ``kdbench`` command line: run, experiments, plugins, list, sensitivity, leaderboard, report.

Exit codes: 0 success, 1 some cells failed, 2 bad input (config, plugin or argument error).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from pathlib import Path

from . import __version__
from .contracts import KINDS
from .errors import KdbenchError, unknown
from .params import field_specs
from .paths import check_dir_writable, check_file_writable

DEFAULT_STORE = "kdbench-results.db"
DEFAULT_THREADS = 1  # torch threads per cell in this process, without --threads


def cmd_run(args) -> int:
    from .config import load_experiment
    from .plugins import get_plugins
    from .runner import build_executor, plan_run, run_experiment
    from .store import Store, check_store_file
    from .teachers import CACHE_ENV, default_cache_dir

    plugins = get_plugins()
    # Every check of the input comes before anything is written.
    experiment = load_experiment(args.experiment, plugins, args.set)
    if not experiment.cells():
        raise KdbenchError(f"experiment '{experiment.name}' has an empty grid (no task, pair, recipe "
                           "or seed); list at least one of each")
    for i, task in enumerate(experiment.tasks):
        try:
            plugins.get("task", task.name).build(task.params).check()
        except (FileNotFoundError, ValueError) as exc:
            raise KdbenchError(f"tasks[{i}] ({task.name}): {exc}") from None
    name, overrides = executor_choice(args)
    executor = build_executor(plugins, experiment, name, overrides, args.threads)
    check_device(args.device, args.precision)
    if args.threads is not None and args.threads < 1:
        raise KdbenchError(f"--threads must be at least 1, got {args.threads}")
    import torch

    # This process's cells (the local executor) get one torch thread unless told otherwise:
    # on the small models most grids hold, a second thread saves nothing while doubling the
    # CPU time, and a core taken by any other process makes two threads wait on each other
    # (measured: tests/benchmarks/README.md). Worker processes divide the cores between them.
    torch.set_num_threads(args.threads or DEFAULT_THREADS)
    if args.cell_timeout is not None and args.cell_timeout <= 0:
        raise KdbenchError(f"--cell-timeout must be a positive number of seconds, got {args.cell_timeout:g}")
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    store_path = Path(args.store)
    check_store_file(store_path)  # another kind of file: exit 2, before anything is written
    # Plugins that cache files of their own (dequantized pretrained weights) use the same place.
    os.environ[CACHE_ENV] = str(cache_dir)
    if args.dry_run:
        return dry_run(experiment, plugins, args, cache_dir)
    # Every path the run writes is checked before any work: a cache folder found read-only
    # after the first cell would leave failed rows behind.
    check_file_writable(store_path, "--store")
    check_dir_writable(cache_dir, "--cache-dir")
    plan = None
    if store_path.exists():  # a resume: start workers (a cluster) only if something is left
        with Store(store_path) as existing:
            plan = plan_run(experiment, existing, plugins, args.retry_failed)
        if not plan.pending:
            executor = build_executor(plugins, experiment, "local")
    executor.start()  # a scheduler that does not answer fails here, before the store is written
    try:
        try:
            store = Store(store_path)
        except (OSError, sqlite3.Error) as exc:
            raise KdbenchError(f"--store {args.store}: cannot create or open it ({exc}); choose a "
                               "path in a folder you can write") from None
        with store:
            summary = run_experiment(experiment, store, plugins, cache_dir, executor,
                                     progress=None if args.quiet else sys.stderr, device=args.device,
                                     retry_failed=args.retry_failed, cell_timeout=args.cell_timeout,
                                     precision=args.precision, plan=plan)
            records = store.records(experiment.name)
    finally:
        executor.close()
    # The statistics' libraries (pandas, scipy) load only now, not before bad input is refused.
    from .report import render
    from .report.summary import frame, summarize
    from .report.tables import leaderboard_blocks
    from .report.terminal import terminal_view

    # Results of an earlier version of the file stay in the store: each configuration is a
    # row of its own, labelled with what differs.
    board = summarize(frame(records, plugins))
    print(render.to_markdown(leaderboard_blocks(board)) if args.wide else terminal_view(board), end="")
    print(f"{summary.total} cells: {summary.done} run now, {summary.skipped} not for this run, "
          f"{summary.taken} taken by another run, {len(summary.failed)} failed now"
          + (f", {summary.failed_earlier} failed in an earlier run (kept, not rerun)"
             if summary.failed_earlier else "") + f". Results in {args.store}.", file=sys.stderr)
    now = {rec.cell_id for rec in summary.failed}
    earlier = [rec for rec in records if not rec.ok and rec.cell_id not in now]
    for when, recs in (("FAILED", summary.failed), ("FAILED EARLIER", earlier)):
        for rec in recs:
            print(f"  {when} {rec.role} {rec.task} | {rec.teacher} -> {rec.student} | {rec.recipe} | "
                  f"seed {rec.seed}: {rec.error}", file=sys.stderr)
    if summary.failed or summary.failed_earlier:
        print("A failed cell stays failed, since a rerun would most often fail the same way: fix the "
              "cause and run the same command with --retry-failed (finished cells are kept, only "
              "the failed ones run again).", file=sys.stderr)
    return summary.exit_code


def executor_choice(args) -> tuple[str | None, dict]:
    """``--executor`` and its settings; ``--workers`` alone means processes, ``--scheduler``
    alone means dask."""
    overrides = {}
    if args.workers is not None:
        overrides["workers"] = args.workers
    if args.scheduler is not None:
        overrides["scheduler"] = args.scheduler
    name = args.executor
    if name is None and args.scheduler is not None:
        name = "dask"
    elif name is None and args.workers is not None:
        name = "processes"
    if name == "local" and overrides:
        raise KdbenchError("--workers and --scheduler do not apply to the local executor (serial, in "
                           "this process); use --executor processes or --executor dask")
    if args.scheduler is not None and name != "dask":
        raise KdbenchError(f"--scheduler applies to the dask executor, not '{name}'; drop --executor "
                           "or use --executor dask")
    return name, overrides


def dry_run(experiment, plugins, args, cache_dir: Path) -> int:
    """The cells, which are finished, which teachers are cached, and the time left (from the
    wall time of the experiment's finished cells, per recipe where there are any)."""
    import datetime as dt
    import statistics

    from .runner import cell_labels, plan_run
    from .store import Store
    from .teachers import teacher_path

    path = Path(args.store)
    store = Store(path) if path.exists() else None
    try:
        plan = plan_run(experiment, store, plugins, args.retry_failed)
        records = store.records(experiment.name) if store else []
    finally:
        if store:
            store.close()
    status, claimed = plan.status, plan.claimed
    pending = {id(cell) for cell in plan.pending}

    def seconds(rec):
        span = dt.datetime.fromisoformat(rec.finished_at) - dt.datetime.fromisoformat(rec.started_at)
        return span.total_seconds()

    by_recipe: dict[tuple, list[float]] = {}
    for rec in records:
        if rec.ok:
            by_recipe.setdefault((rec.role, rec.recipe), []).append(seconds(rec))
    every = [t for (role, _), ts in by_recipe.items() if role == "student" for t in ts]
    left, unknown_left = 0.0, 0
    rows, teachers = [], {}
    for cell in plan.cells:
        cid = cell.cell_id(plugins)
        state = status.get(cid, "pending")
        if cid in claimed:
            state = f"running ({claimed[cid]})"
        runs = id(cell) in pending and cid not in claimed
        if runs:
            guess = by_recipe.get(("student", cell.recipe)) or every
            if guess:
                left += statistics.median(guess)
            else:
                unknown_left += 1
        job = cell.teacher_job(plugins)
        family = plugins.get("model", job.teacher.name).build(job.teacher.params)
        cached = family.pretrained or teacher_path(cache_dir, job).exists()
        teachers[job.cell_id] = (job, cached)
        labels = cell_labels(cell)
        rows.append((labels["task"], labels["teacher"], labels["student"], cell.recipe, str(cell.seed),
                     state + (" (will run)" if runs else ""), "yes" if cached else "no"))
    header = ("task", "teacher", "student", "recipe", "seed", "status", "teacher cached")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    to_train = [job for job, cached in teachers.values() if not cached]
    teacher_times = [t for (role, _), ts in by_recipe.items() if role == "teacher" for t in ts]
    if to_train:
        if teacher_times:
            left += len(to_train) * statistics.median(teacher_times)
        else:
            unknown_left += len(to_train)
    n_run = sum(r[5].endswith("(will run)") for r in rows)
    estimate = f"about {left / 60:.1f} min" if left or not unknown_left else "unknown"
    if unknown_left and left:
        estimate += f" plus {unknown_left} job(s) with no finished cell to time them by"
    print(f"\n{len(rows)} cells: {sum(r[5] == 'done' for r in rows)} done, "
          f"{sum(r[5].startswith('failed') for r in rows)} failed, {n_run} to run; "
          f"{len(to_train)} of {len(teachers)} teacher(s) to train; time left: {estimate}. "
          "Nothing was run.")
    return 0


def cmd_new_plugin(args) -> int:
    from .scaffold import new_plugin

    root = new_plugin(args.name, args.kind, Path(args.output))
    files = sorted(str(p.relative_to(root.parent)) for p in root.rglob("*") if p.is_file())
    print(f"wrote {root}:\n  " + "\n  ".join(files))
    print(f"next:\n  pip install -e {root}\n  python -m pytest {root / 'tests'}\n  kdbench plugins")
    return 0


def check_device(device: str, precision: str = "fp32") -> None:
    import torch

    try:
        torch.device(device)
    except RuntimeError:
        raise KdbenchError(f"--device {device}: not a torch device; use cpu, cuda or cuda:N") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KdbenchError(f"--device {device}: torch sees no CUDA device here (torch "
                           f"{torch.__version__}); use --device cpu or install a CUDA build of torch")
    if precision == "bf16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise KdbenchError(f"--precision bf16: the GPU {torch.cuda.get_device_name(device)} has no bf16 "
                           "support (it needs compute capability 8.0, Ampere or later); use --precision fp32")


def cmd_experiments(args) -> int:
    from . import yamlfile
    from .config import embedded_experiments

    for name, text in sorted(embedded_experiments().items()):
        raw = yamlfile.load(text)
        print(f"{name}: {raw.get('description', '').strip() or raw.get('name')}")
    return 0


def cmd_plugins(args) -> int:
    from .plugins import get_plugins

    table = get_plugins().plugin_table()
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    for row in table:
        things = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in row["registered"].items())
        print(f"{row['name']} {row['version']}  {things or '(registers nothing)'}")
    return 0


def cmd_list(args) -> int:
    from .plugins import get_plugins

    plugins = get_plugins()
    kinds = [args.kind] if args.kind else list(KINDS)
    if args.kind and args.kind not in KINDS:
        raise KdbenchError(unknown("kind", args.kind, KINDS))
    if args.json:
        print(json.dumps([e.to_json() for k in kinds for e in plugins.entries[k].values()],
                         indent=2, default=str))
        return 0
    for kind in kinds:
        print(f"{kind}s:")
        for name in plugins.names(kind):
            entry = plugins.get(kind, name)
            print(f"  {name}  ({entry.plugin} {entry.version}) - {entry.description}")
            if entry.io:
                print(f"      {entry.io}")
            for spec in field_specs(entry.cls.Params):
                default = "required" if spec["required"] else f"default {spec['default']!r}"
                print(f"      {spec['name']}: {spec['type']} ({default})")
    return 0


def load_summary(args, plugins):
    """The records and summary frame that ``leaderboard`` and ``report`` show, with the
    store, experiment, filter, reference and metric options validated."""
    import fnmatch

    from .report.summary import GROUP, frame, latest_configs, summarize
    from .store import Store

    stores = args.store or [DEFAULT_STORE]
    records = []
    for path in stores:
        if not Path(path).exists():
            raise KdbenchError(f"no results store at {path}; run 'kdbench run' first or pass --store PATH")
        with Store(path) as store:
            names = store.experiments()
            for name in args.experiment or []:
                if name not in names and len(stores) == 1:
                    raise KdbenchError(unknown("experiment", name, names) + f" (in {path})")
            records += store.records()
    if args.experiment:
        known = {r.experiment for r in records}
        for name in args.experiment:
            if name not in known:
                raise KdbenchError(unknown("experiment", name, sorted(known)))
        records = [r for r in records if r.experiment in args.experiment]
    records.sort(key=lambda r: r.finished_at)
    for flag in ("task", "teacher", "student", "recipe"):
        patterns = getattr(args, flag) or []
        if patterns:
            # The teacher's own row stays whatever the recipe filter: it is every table's anchor.
            records = [r for r in records if any(fnmatch.fnmatchcase(getattr(r, flag), p) for p in patterns)
                       or (flag in ("recipe", "student") and r.role == "teacher")]
    filtered = bool(args.experiment or any(getattr(args, f) for f in ("task", "teacher", "student", "recipe")))
    # By default each configuration of a recipe is a labelled row; --latest-only keeps the newest.
    records, notes = latest_configs(records) if args.latest_only else (records, [])
    if not any(r.ok for r in records):
        failed = sum(not r.ok for r in records)
        where = ", ".join(stores)
        if filtered:
            raise KdbenchError(f"no finished cells match the selection in {where}: check --experiment and the filters "
                               "(--task, --teacher, --student, --recipe take shell patterns)")
        if failed:
            raise KdbenchError(f"{where} holds no finished cell, only {failed} failed one(s); fix the "
                               "cause and rerun with 'kdbench run ... --retry-failed'")
        raise KdbenchError(f"{where} holds no results yet; run 'kdbench run' first")
    for column in args.by or []:
        if column not in GROUP:
            raise KdbenchError(unknown("--by column", column, GROUP))
    df = frame(records, plugins)
    recipes = sorted(set(df["recipe"]))
    if args.reference and args.reference not in recipes:
        raise KdbenchError(unknown("--reference recipe", args.reference, recipes))
    summary = summarize(df, args.reference, args.metric)
    if args.metric and f"{args.metric}_mean" not in summary:
        figures = sorted(c[:-5] for c in summary.columns if c.endswith("_mean"))
        raise KdbenchError(unknown("--metric figure", args.metric, figures))
    return records, summary, notes


def cmd_leaderboard(args) -> int:
    from .plugins import get_plugins
    from .report import render
    from .report.document import Code, Heading
    from .report.folder import environment_text, to_json
    from .report.tables import leaderboard_blocks
    from .report.terminal import terminal_view

    if args.wide and args.format not in (None, "md"):
        raise KdbenchError(f"--wide is the full Markdown table; it does not combine with --format "
                           f"{args.format}: drop one of them")
    if args.output:
        check_file_writable(Path(args.output), "--output")
    records, summary, notes = load_summary(args, get_plugins())
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    blocks = leaderboard_blocks(summary, args.by or ["task"])
    # No format: the compact view for a terminal; a file (--output) gets Markdown, as it always did.
    if args.format is None and not args.wide and not args.output:
        text = terminal_view(summary, args.by or ["task"])
    elif args.format == "csv":
        text = summary.to_csv(index=False)
    elif args.format == "json":
        text = to_json(summary, records)
    elif args.format == "latex":
        text = render.to_latex(blocks)
    elif args.format == "html":
        blocks = [Heading("kdbench leaderboard", 1), *blocks, Heading("Environment", 2),
                  Code(environment_text(records))]
        text = render.to_html(blocks, Path("."), "kdbench leaderboard")
    else:
        text = render.to_markdown(blocks + [Code(environment_text(records))])
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(text, end="" if text.endswith("\n") else "\n")
    return 0


def cmd_report(args) -> int:
    import shlex

    from .plugins import get_plugins
    from .report.folder import build_report

    plugins = get_plugins()
    files: dict[str, str] = {}
    names = []
    for item in args.experiments:
        # An experiment file names its experiment; an embedded name is the experiment's name.
        if Path(item).is_file():
            from .config import load_experiment
            experiment = load_experiment(item, plugins)
            files[experiment.name] = item
            names.append(experiment.name)
        else:
            names.append(item)
    args.experiment = names or None
    check_dir_writable(Path(args.output), "--output")  # before the statistics and the figures
    records, summary, notes = load_summary(args, plugins)
    command = "kdbench report " + " ".join(shlex.quote(a) for a in (args.argv or []))
    out = Path(args.output)
    written = build_report(records, summary, out, plugins=plugins, title=args.title or default_title(records),
                           command=command.strip(), notes=notes, files=files, by=args.by or ["task"],
                           statement=args.note or [])
    print(f"wrote {len(written)} files to {out}/ (open {out / 'index.html'} in a browser, "
          f"or read {out / 'README.md'})", file=sys.stderr)
    return 0


def cmd_published(args) -> int:
    import fnmatch

    from .report import render
    from .report.document import Table
    from .report.published import published

    data = published()
    for flag, column in (("dataset", "dataset"), ("teacher", "teacher_arch"), ("student", "student_arch"),
                         ("method", "method")):
        pattern = getattr(args, flag)
        if pattern:
            data = data[[fnmatch.fnmatchcase(v.lower(), pattern.lower()) for v in data[column]]]
    if data.empty:
        raise KdbenchError("no published result matches; 'kdbench published' lists them all")
    if args.format == "csv":
        print(data.to_csv(index=False), end="")
        return 0
    rows = [[r.dataset, r.teacher_arch, r.student_arch, r.method, f"{r.top1:.2f}", r.source]
            for r in data.itertuples()]
    sources = sorted(set(zip(data.source, data.url, strict=True)))
    print(render.to_markdown([Table(["dataset", "teacher", "student", "method", "top-1 %", "source"], rows,
                                    notes=[f"{s}: {u}" for s, u in sources])]), end="")
    return 0


def default_title(records) -> str:
    names = list(dict.fromkeys(r.experiment for r in records))
    return "kdbench report: " + ", ".join(names)


def add_selection(parser: argparse.ArgumentParser, experiment_flag: bool = True) -> None:
    """Options shared by ``leaderboard`` and ``report``: which rows, compared how."""
    parser.add_argument("--store", action="append", metavar="PATH",
                        help=f"results database (repeatable; default {DEFAULT_STORE})")
    if experiment_flag:
        parser.add_argument("--experiment", action="append", help="only this experiment (repeatable)")
    for flag in ("task", "teacher", "student", "recipe"):
        parser.add_argument(f"--{flag}", action="append", metavar="PATTERN",
                            help=f"only rows whose {flag} matches this shell pattern (repeatable)")
    parser.add_argument("--reference", help="recipe every row is compared with, paired by seed (default: "
                        "by construction: a compound recipe's parent, or its equal-budget control when it "
                        "trains more; else scratch, else dense, else the teacher's row; 'teacher' for the teacher)")
    parser.add_argument("--latest-only", action="store_true",
                        help="of a recipe run under several configurations (the experiment file changed between "
                        "runs), show only the one that finished last and note the rest on stderr (default: "
                        "each configuration is its own row, labelled with what differs)")
    parser.add_argument("--metric", help="figure compared and ranked (default: the task's test metric), "
                        "e.g. last_epoch_test_accuracy, teacher_agreement, latency_b1_ms")
    parser.add_argument("--by", action="append", metavar="COLUMN",
                        help="one table per value of this column (repeatable; default task); rows of "
                        "different protocols are always in separate tables")


def cmd_sensitivity(args) -> int:
    from .config import Cell, load_experiment
    from .plugins import get_plugins
    from .runner import CellRunner
    from .sensitivity import layer_sensitivity, plot, to_markdown
    from .teachers import default_cache_dir

    plugins = get_plugins()
    experiment = load_experiment(args.experiment, plugins, args.set)
    try:
        sparsities = [float(v) for v in args.sparsities.split(",")]
    except ValueError:
        raise KdbenchError(f"--sparsities takes comma-separated fractions, e.g. 0.5,0.9; got {args.sparsities!r}")
    for flag, index, items in (("--task", args.task, experiment.tasks), ("--pair", args.pair, experiment.pairs)):
        if not 0 <= index < len(items):
            raise KdbenchError(f"{flag} {index} is out of range: the experiment has {len(items)} "
                               f"(0 to {len(items) - 1})")
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    check_dir_writable(cache_dir, "--cache-dir")  # the teacher is trained and cached first
    if args.output:
        check_dir_writable(Path(args.output), "--output")
    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)
    seed = experiment.seeds[0] if args.seed is None else args.seed
    pair = experiment.pairs[args.pair]
    cell = Cell(experiment, experiment.tasks[args.task], pair, next(iter(experiment.recipes)), seed)
    runner = CellRunner(plugins, cache_dir)
    teacher = runner.teacher(cell.teacher_job(plugins))  # trained once, then from the cache
    task = plugins.get("task", cell.task.name).build(cell.task.params)
    try:
        table = layer_sensitivity(teacher.model, runner.data(cell.task), task, sparsities)
    except ValueError as exc:
        raise KdbenchError(str(exc))
    title = (f"Pruning sensitivity of {pair.teacher.label()} on {cell.task.label()} (seed {seed}), "
             f"validation {task.metric}, each layer pruned alone by magnitude, no fine-tuning.\n\n")
    text = title + to_markdown(table, task.metric)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sensitivity.md").write_text(text)
        table.to_csv(out / "sensitivity.csv", index=False)
        plot(table, task.metric, out / "sensitivity.png")
        print(f"wrote {out / 'sensitivity.md'}, sensitivity.csv and sensitivity.png", file=sys.stderr)
    else:
        print(text, end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdbench", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"kdbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run an experiment file (default: the embedded quickstart)")
    run.add_argument("experiment", nargs="?", help="experiment YAML or embedded name "
                     "(see 'kdbench experiments'); omit for the embedded quickstart")
    run.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                     help="override a setting of the file, e.g. --set training.epochs=1 "
                     "--set seeds=[0] (repeatable; validated like the file)")
    run.add_argument("--store", default=DEFAULT_STORE, help=f"results database (default {DEFAULT_STORE})")
    run.add_argument("--cache-dir", help="where trained teachers are cached (default: user cache dir)")
    run.add_argument("--executor", help="executor plugin (default: the file's, else 'local')")
    run.add_argument("--device", default="cpu", help="where to train: cpu (default), cuda, cuda:N; "
                     "latency is always measured on the CPU")
    run.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                     help="student training: fp32 (default) or bf16 autocast (GPUs from Ampere on; "
                     "teachers always train in fp32, so every student sees the same cached teacher)")
    run.add_argument("--threads", type=int, help="torch CPU threads per cell (default 1 in this "
                     "process; worker processes divide the cores between them); recorded with every row")
    run.add_argument("--workers", type=int, help="worker processes (processes or dask executor; "
                     "alone it selects processes; default: fill the machine)")
    run.add_argument("--scheduler", metavar="ADDRESS", help="a running Dask scheduler, e.g. "
                     "tcp://HOST:8786 (selects the dask executor)")
    run.add_argument("--cell-timeout", type=float, metavar="SECONDS",
                     help="a cell running longer is stopped and recorded as failed")
    run.add_argument("--retry-failed", action="store_true",
                     help="run only the cells (and teachers) recorded as failed")
    run.add_argument("--dry-run", action="store_true", help="list the cells, their status, the "
                     "cached teachers and the time left; run nothing")
    run.add_argument("--quiet", action="store_true", help="no progress lines")
    run.add_argument("--wide", action="store_true", help="end with the full Markdown leaderboard "
                     "(every column) instead of the compact one")
    run.set_defaults(func=cmd_run)

    experiments = sub.add_parser("experiments", help="list the embedded experiment files")
    experiments.set_defaults(func=cmd_experiments)

    plugins = sub.add_parser("plugins", help="list plugins, their versions and what they registered")
    plugins.add_argument("--json", action="store_true")
    plugins.set_defaults(func=cmd_plugins)

    new = sub.add_parser("new-plugin", help="write a plugin package that passes kdbench's checks as generated")
    new.add_argument("name", help="the plugin's name in experiment files, e.g. my-kd")
    new.add_argument("--kind", required=True, choices=["task", "model", "distiller", "pruner", "quantizer",
                                                       "decomposer", "executor"])
    new.add_argument("--output", default=".", help="folder to create the package in (default: here)")
    new.set_defaults(func=cmd_new_plugin)

    lst = sub.add_parser("list", help="registered names with their parameters and defaults")
    lst.add_argument("kind", nargs="?", help=f"one of: {', '.join(KINDS)}")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_list)

    sens = sub.add_parser("sensitivity", help="per-layer pruning sensitivity of an experiment's teacher "
                          "(validation metric vs each layer's sparsity)")
    sens.add_argument("experiment", nargs="?", help="experiment file or embedded name (default: quickstart)")
    sens.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a value of the file")
    sens.add_argument("--task", type=int, default=0, help="index of the task in the file (default 0)")
    sens.add_argument("--pair", type=int, default=0, help="index of the pair whose teacher is analysed (default 0)")
    sens.add_argument("--seed", type=int, help="teacher seed (default: the file's first)")
    sens.add_argument("--sparsities", default="0.3,0.5,0.7,0.8,0.9,0.95", help="comma-separated fractions")
    sens.add_argument("--output", help="folder for sensitivity.md, .csv and .png (default: print the table)")
    sens.add_argument("--cache-dir", help="where trained teachers are cached (default: user cache dir)")
    sens.add_argument("--threads", type=int, help="torch CPU threads")
    sens.set_defaults(func=cmd_sensitivity)

    board = sub.add_parser("leaderboard", help="per (task, pair, recipe): mean, std and 95%% CI over "
                           "seeds, paired comparison with a reference, ranks")
    add_selection(board)
    board.add_argument("--format", choices=["md", "csv", "latex", "html", "json"],
                       help="default: aligned columns for a terminal (Markdown when writing --output)")
    board.add_argument("--wide", action="store_true", help="every column: the full Markdown table")
    board.add_argument("--output", help="write to this file instead of standard output")
    board.set_defaults(func=cmd_leaderboard)

    report = sub.add_parser("report", help="a publishable folder: README.md, index.html, "
                            "leaderboard.csv/.json and figures (PNG and SVG)")
    report.add_argument("experiments", nargs="*", metavar="EXPERIMENT",
                        help="experiment names in the store, or experiment files (default: all in the store)")
    add_selection(report, experiment_flag=False)
    report.add_argument("--output", required=True, help="the report folder (created)")
    report.add_argument("--title", help="the report's title (default: names the experiments)")
    report.add_argument("--note", action="append", metavar="TEXT",
                        help="a paragraph under the title, e.g. how the machine was used during the "
                             "runs (repeatable); the measured conditions follow it")
    report.set_defaults(func=cmd_report)

    pub = sub.add_parser("published", help="published reference results shipped with kdbench "
                         "(CIFAR-100 tables of RepDistiller/CRD and mdistiller; the MNIST-1D "
                         "paper's baselines)")
    pub.add_argument("--dataset", metavar="PATTERN", help="e.g. cifar100 or mnist1d")
    pub.add_argument("--teacher", metavar="PATTERN", help="e.g. resnet56 or 'wrn*'")
    pub.add_argument("--student", metavar="PATTERN")
    pub.add_argument("--method", metavar="PATTERN", help="e.g. kd, crd, scratch, teacher")
    pub.add_argument("--format", choices=["md", "csv"], default="md")
    pub.set_defaults(func=cmd_published)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]  # a report records the command that wrote it
    try:
        return args.func(args)
    except KdbenchError as exc:
        print(f"kdbench: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # The reader stopped reading (``kdbench list | head``): not an error worth a traceback.
        # Standard output goes to /dev/null so that the flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # what a program killed by SIGPIPE reports, as ``cat`` would


if __name__ == "__main__":
    sys.exit(main())
