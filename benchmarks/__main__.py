"""The whole benchmark suite: ``python -m benchmarks [--quick] [--json PATH] [--plot PATH] [--results]``.

Every row is a median of interleaved samples taken in this one run, with its ratio
to the floor measured alongside (never absolute seconds across runs).
``--results`` rewrites this device's section of ``benchmarks/RESULTS.md`` with the table and the
machine, and draws the core ratios beside it (``benchmarks/results.py``, ``benchmarks/plot.py``).
``--allocator`` says how memory is served while measuring (``_harness.use_allocator``).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from typing import Any, NamedTuple, Optional

from . import _harness as harness
from . import models
from .plot import path_error
from .results import CPU_ONLY, drawn, not_measured, partial_note, write
from .targets import verdicts

# Each suite module exposes ``run(quick: bool) -> list[dict]``, and may expose ``parts(quick)``
# yielding the same rows a list at a time (saved as they come).  bench_memory comes last: it measures
# with torch.profiler, whose own allocations split glibc's free blocks, and fresh buffers page-fault
# in for the rest of the process (see benchmarks/profile.py), which would slow every later timing.
SUITES = ["bench_core", "bench_swarm", "bench_merge", "bench_distributed", "bench_memory"]


class Run(NamedTuple):
    """A run's rows, and one line per suite that raised under ``--keep-going``."""

    table: list[dict[str, Any]]
    failures: list[str]


def collect(quick: bool, only: list[str], *, keep_going: bool = False, json_path: str = "",
            options: Optional[dict[str, Any]] = None) -> Run:
    """Run the suites (``only`` those, when given) in order; each suite's rows get its name.

    ``keep_going`` reports a suite that raises (traceback on stderr, a line in ``failures``) and runs
    the next; ``json_path`` is rewritten after every suite (every part, for a suite with ``parts``), so
    a run cut short keeps what it measured, with the run's ``options`` (``_harness.dump_json``).
    """
    table: list[dict[str, Any]] = []
    failures: list[str] = []
    for name in SUITES:
        if only and name not in only:
            continue
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError as error:
            print(f"skipping {name}: {error}", file=sys.stderr)
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            # a suite with ``parts`` hands its rows over a part at a time: each is saved as it comes
            for rows in module.parts(quick) if hasattr(module, "parts") else [module.run(quick)]:
                for row in rows:
                    row.setdefault("suite", name)
                table += rows
                if json_path:
                    harness.dump_json(table, json_path, failures, options)
                print(f"{name}: {len(table)} rows so far, {time.perf_counter() - started:.0f} s", file=sys.stderr,
                      flush=True)
        except Exception as error:
            if not keep_going:
                raise
            traceback.print_exc()
            failures.append(f"{name}: {type(error).__name__}: {error}")
            if json_path:
                harness.dump_json(table, json_path, failures, options)
        print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return Run(table, failures)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (CI)")
    parser.add_argument("--json", metavar="PATH", help="also write rows, the machine and the run's options as JSON")
    parser.add_argument("--plot", metavar="PATH", help="also draw the core ratios to an image (needs matplotlib)")
    parser.add_argument("--results", action="store_true",
                        help="rewrite this device's section of benchmarks/RESULTS.md, and its picture")
    parser.add_argument("--only", nargs="+", default=[], choices=SUITES, metavar="SUITE",
                        help=f"suites to run, among {SUITES}")
    every_size = list(models.sizes(quick=False))
    parser.add_argument("--sizes", nargs="+", default=[], choices=every_size, metavar="SIZE",
                        help=f"model sizes of bench_core and bench_memory to run (default: every one), among {every_size}")
    parser.add_argument("--keep-going", action="store_true",
                        help="report a suite that raises and run the next (e.g. once on a lent GPU machine)")
    harness.add_measuring_options(parser, device_note=" for bench_core, bench_memory and bench_swarm; "
                                                     f"{', '.join(CPU_ONLY)} run on the CPU")
    args = parser.parse_args()
    if args.results and args.quick:
        parser.error("--results writes the full table of benchmarks/RESULTS.md: run it without --quick")
    left_out = [size for size in args.sizes if size not in models.sizes(quick=True)]
    if args.quick and left_out:
        parser.error(f"--sizes: --quick leaves out {left_out}: run them without --quick")
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        # checked before measuring: a run is minutes long, and --json is written after its first part
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            parser.error(f"{option}: expected a file in a folder that exists, got {path!r}")
        if path and os.path.isdir(path):
            parser.error(f"{option}: expected a file name, got the folder {path!r}")
    problem = args.plot and path_error(args.plot, "--plot")  # an extension matplotlib can write, or no plot
    if problem:
        parser.error(problem)
    harness.apply_measuring_options(parser, args)
    models.ONLY[:] = args.sizes
    print("harness overheads (µs): " + ", ".join(f"{key} {value:g}" for key, value in harness.overheads().items()),
          file=sys.stderr, flush=True)
    options = {"quick": args.quick, "only": args.only, "sizes": args.sizes}
    table, failures = collect(args.quick, args.only, keep_going=args.keep_going, json_path=args.json or "",
                              options=options)
    harness.print_table(table)
    ran = {row.get("suite") for row in table} | {failure.split(":")[0] for failure in failures}
    # a suite that measures none of the sizes asked for (``--sizes``) says so instead of vanishing
    empty = [f"{name}: no rows at the sizes asked for ({', '.join(args.sizes)})"
             for name in (args.only or SUITES) if name not in ran and args.sizes]
    for line in not_measured(table) + empty:
        print(line)
    for verdict in verdicts(table):
        print(verdict.line())
    for failure in failures:
        print("FAILED", failure)
    if args.json:
        harness.dump_json(table, args.json, failures, options)
    if args.plot:
        drawn(table, args.plot, harness.describe())
    if args.results:
        write(table, harness.machine(), failures=failures, notes=partial_note(args.only, args.sizes) + empty)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
