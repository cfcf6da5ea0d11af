"""The ``kdbench`` command line: run, plugins, list, leaderboard.

Exit codes: 0 success, 1 some cells failed, 2 bad input (config, plugin or argument error).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .contracts import KINDS
from .errors import KdbenchError, unknown
from .params import field_specs

DEFAULT_STORE = "kdbench-results.db"


def cmd_run(args) -> int:
    from .config import load_experiment
    from .leaderboard import frame, latest_configs, summarize, to_markdown
    from .plugins import get_plugins
    from .runner import run_experiment
    from .store import Store
    from .teachers import default_cache_dir

    plugins = get_plugins()
    experiment = load_experiment(args.experiment, plugins, args.set)  # every error before any work
    if args.executor is not None:
        plugins.get("executor", args.executor, "--executor")
    check_device(args.device)
    if args.threads is not None:
        import torch
        if args.threads < 1:
            raise KdbenchError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    with Store(args.store) as store:
        summary = run_experiment(experiment, store, plugins, cache_dir, args.executor,
                                 progress=None if args.quiet else sys.stderr, device=args.device)
        records, _ = latest_configs(store.records(experiment.name))
    print(to_markdown(summarize(frame(records)), records))
    print(f"{summary.total} cells: {summary.done} run now, {summary.skipped} already done, "
          f"{len(summary.failed)} failed. Results in {args.store}.", file=sys.stderr)
    for rec in summary.failed:
        print(f"  FAILED {rec.role} {rec.task} | {rec.teacher} -> {rec.student} | {rec.recipe} | "
              f"seed {rec.seed}: {rec.error}", file=sys.stderr)
    if summary.failed:
        print("Fix the cause and run the same command again: finished cells are kept, "
              "failed ones are retried.", file=sys.stderr)
    return summary.exit_code


def check_device(device: str) -> None:
    import torch

    try:
        torch.device(device)
    except RuntimeError:
        raise KdbenchError(f"--device {device}: not a torch device; use cpu, cuda or cuda:N") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KdbenchError(f"--device {device}: torch sees no CUDA device here (torch "
                           f"{torch.__version__}); use --device cpu or install a CUDA build of torch")


def cmd_experiments(args) -> int:
    import yaml

    from .config import embedded_experiments

    for name, text in sorted(embedded_experiments().items()):
        raw = yaml.safe_load(text)
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
            for spec in field_specs(entry.cls.Params):
                default = "required" if spec["required"] else f"default {spec['default']!r}"
                print(f"      {spec['name']}: {spec['type']} ({default})")
    return 0


def cmd_leaderboard(args) -> int:
    from .leaderboard import frame, latest_configs, summarize, to_csv, to_markdown
    from .store import Store

    if not Path(args.store).exists():
        raise KdbenchError(f"no results store at {args.store}; run 'kdbench run' first or pass "
                           "--store PATH")
    with Store(args.store) as store:
        if args.experiment and args.experiment not in store.experiments():
            raise KdbenchError(unknown("experiment", args.experiment, store.experiments()))
        records, notes = latest_configs(store.records(args.experiment))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    summary = summarize(frame(records))
    text = to_csv(summary) if args.format == "csv" else to_markdown(summary, records)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(text, end="")
    return 0


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
    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)
    seed = experiment.seeds[0] if args.seed is None else args.seed
    pair = experiment.pairs[args.pair]
    cell = Cell(experiment, experiment.tasks[args.task], pair, next(iter(experiment.recipes)), seed)
    runner = CellRunner(plugins, Path(args.cache_dir) if args.cache_dir else default_cache_dir())
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
    run.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); "
                     "recorded with every row")
    run.add_argument("--quiet", action="store_true", help="no progress lines")
    run.set_defaults(func=cmd_run)

    experiments = sub.add_parser("experiments", help="list the embedded experiment files")
    experiments.set_defaults(func=cmd_experiments)

    plugins = sub.add_parser("plugins", help="list plugins, their versions and what they registered")
    plugins.add_argument("--json", action="store_true")
    plugins.set_defaults(func=cmd_plugins)

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

    board = sub.add_parser("leaderboard", help="mean ± std over seeds per (task, pair, recipe)")
    board.add_argument("--store", default=DEFAULT_STORE)
    board.add_argument("--experiment", help="only this experiment")
    board.add_argument("--format", choices=["md", "csv"], default="md")
    board.add_argument("--output", help="write to this file instead of standard output")
    board.set_defaults(func=cmd_leaderboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KdbenchError as exc:
        print(f"kdbench: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
