"""The whole benchmark suite: ``python -m benchmarks [--quick] [--json PATH] [--plot PATH] [--results]``.

Every row is a median of interleaved samples taken in this one run, with its ratio
to the floor measured alongside (never absolute seconds across runs).
``--results`` rewrites ``benchmarks/RESULTS.md`` with the table and the machine, and
draws the core ratios to ``benchmarks/RESULTS.png`` (``benchmarks/plot.py``).
``--allocator`` says how memory is served while measuring (``_harness.use_allocator``).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

from . import _harness as harness
from .targets import verdicts

# Each suite module exposes ``run(quick: bool) -> list[dict]``.  bench_memory comes last: it measures
# with torch.profiler, whose own allocations split glibc's free blocks, and fresh buffers page-fault
# in for the rest of the process (see benchmarks/profile.py), which would slow every later timing.
SUITES = ["bench_core", "bench_swarm", "bench_merge", "bench_distributed", "bench_memory"]

#: Suites that measure on the CPU whatever ``--device`` says (gloo collectives, CPU-side merging).
CPU_ONLY = ("bench_merge", "bench_distributed")


def collect(quick: bool, only: list[str]) -> list[dict[str, Any]]:
    table: list[dict[str, Any]] = []
    for name in SUITES:
        if only and name not in only:
            continue
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError as error:
            print(f"skipping {name}: {error}", file=sys.stderr)
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows = module.run(quick)
        for row in rows:
            row.setdefault("suite", name)
        table += rows
    return table


def not_measured(table: list[dict[str, Any]]) -> list[str]:
    """One line per implementation a workload of ``table`` has no row for, saying why (suites' ``NOT_MEASURED``)."""
    lines = []
    workloads = {(row.get("suite", ""), row["workload"]) for row in table}
    for suite in dict.fromkeys(row.get("suite", "") for row in table):
        reasons = getattr(importlib.import_module(f"benchmarks.{suite}"), "NOT_MEASURED", {}) if suite else {}
        lines += [f"{workload}: no {implementation} row: {reason}"
                  for (workload, implementation), reason in reasons.items() if (suite, workload) in workloads]
    return lines


def _plotted(table: list[dict[str, Any]], path: str, title: str) -> bool:
    """Draw the core ratios to ``path``; ``False`` (with a note) when matplotlib is missing."""
    try:
        from .plot import plot
        plot(table, path, title=title)
    except ImportError as error:
        print(f"no plot: {error}", file=sys.stderr)
        return False
    except ValueError as error:  # no core rows (e.g. ``--only bench_swarm``)
        print(f"no plot: {error}", file=sys.stderr)
        return False
    return True


def write_results(table: list[dict[str, Any]], path: str = "benchmarks/RESULTS.md") -> None:
    machine = harness.machine()
    described = ", ".join(f"{key} {value}" for key, value in machine.items())
    image = os.path.join(os.path.dirname(path), "RESULTS.png")
    drawn = _plotted(table, image, described)
    lines = ["# Benchmark results", "",
             "Regenerate with `python -m benchmarks --results` (ratios are to the floor measured in the same run).", "",
             "Machine: " + described, ""]
    if drawn:
        lines += ["![Ratios to the floor of bench_core, per workload and size; black ticks are issue 4's targets]"
                  "(RESULTS.png)", ""]
    judged = verdicts(table)
    if judged:
        lines += ["## Targets in this run (benchmarks/targets.py)", "", "```"] + [verdict.line() for verdict in judged] + ["```", ""]
    if harness.DEVICE.type != "cpu":
        lines += [f"Models and tensors on {harness.DEVICE}, except in {' and '.join(CPU_ONLY)} (CPU).", ""]
    missing = not_measured(table)
    if missing:
        lines += ["## No row, and why", ""] + [f"- {line}" for line in missing] + [""]
    lines += ["## Every row", "", "| suite | workload | size | implementation | median | x floor |",
             "|---|---|---|---|---|---|"]
    for row in table:
        median = row["median_us"]
        shown = row.get("shown") or (f"{median / 1000:.2f} ms" if median >= 1000 else f"{median:.1f} µs")
        lines.append(f"| {row.get('suite', '')} | {row['workload']} | {row.get('size', '')} | "
                     f"{row['implementation']} | {shown} | {row['ratio_to_floor']:.2f} |")
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (CI)")
    parser.add_argument("--json", metavar="PATH", help="also write rows and the machine as JSON")
    parser.add_argument("--plot", metavar="PATH", help="also draw the core ratios to an image (needs matplotlib)")
    parser.add_argument("--results", action="store_true", help="rewrite benchmarks/RESULTS.md and RESULTS.png")
    parser.add_argument("--only", nargs="*", default=[], help=f"suites to run, among {SUITES}")
    harness.add_measuring_options(parser, device_note=" for bench_core, bench_memory and bench_swarm; "
                                                     f"{', '.join(CPU_ONLY)} run on the CPU")
    args = parser.parse_args()
    harness.apply_measuring_options(parser, args)
    table = collect(args.quick, args.only)
    harness.print_table(table)
    for line in not_measured(table):
        print(line)
    for verdict in verdicts(table):
        print(verdict.line())
    if args.json:
        harness.dump_json(table, args.json)
    if args.plot:
        _plotted(table, args.plot, ", ".join(f"{key} {value}" for key, value in harness.machine().items()))
    if args.results:
        write_results(table)


if __name__ == "__main__":
    main()
