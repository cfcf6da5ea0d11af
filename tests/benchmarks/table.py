"""The table of ``tests/benchmarks/README.md``, from a pytest-benchmark JSON file:

    python -m pytest -m slow tests/benchmarks --benchmark-json=bench.json
    python tests/benchmarks/table.py bench.json [more.json ...]
"""

from __future__ import annotations

import json
import sys


def rows(paths: list[str]) -> list[str]:
    runs = [json.load(open(path)) for path in paths]
    machine = runs[0].get("machine_info", {})
    lines = [f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, "
             f"{machine.get('cpu', {}).get('count', '?')} logical CPUs, Python {machine.get('python_version', '?')}; "
             f"{', '.join(sorted({r.get('datetime', '')[:10] for r in runs}))}.", "",
             "| ratio | candidate / baseline | target | median | range | repeats | load (1-min avg, max) | met |",
             "|---|---|---|---:|---|---:|---:|---|"]
    latest = {}  # a ratio measured again in a later file replaces the earlier one
    for bench in (b for run in runs for b in run["benchmarks"]):
        info = bench.get("extra_info") or {}
        if "ratio" in info:
            latest[info["ratio"]] = info
    for info in latest.values():
        lines.append(f"| {info['ratio']} | {info['candidate']} / {info['baseline']} | {info['target']} | "
                     f"{info['median']:.2f} | {info['min']:.2f} - {info['max']:.2f} | {info['repeats']} | "
                     f"{info['load_max']} | {'yes' if info['met'] else 'no'} |")
    return lines


if __name__ == "__main__":
    print("\n".join(rows(sys.argv[1:])))
