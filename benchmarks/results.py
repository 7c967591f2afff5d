"""``benchmarks/RESULTS.md``: one section per kind of device (the CPU first), each from one run.

A run rewrites its own device's section and keeps the others, so a GPU run made once on a
lent machine stays beside the CPU table until the next GPU run.  Rendered from a live run
(``python -m benchmarks --results``) or from saved ones:
``python -m benchmarks.results cpu.json cuda.json`` (files of ``python -m benchmarks --json``;
several files of one kind of device, e.g. suites run in separate calls, make one section).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from ._harness import describe, shown
from .targets import verdicts

Row = dict[str, Any]

#: Suites that measure on the CPU whatever ``--device`` says (gloo collectives, CPU-side merging).
CPU_ONLY = ("bench_merge", "bench_distributed")

#: The results file beside this one, wherever the command is run from.
RESULTS_MD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")

_SECTION = re.compile(r"<!-- run: (?P<key>[\w-]+) -->\n.*?<!-- end run: (?P=key) -->\n", re.S)

_HEADER = ["# Benchmark results", "",
           "Regenerate with `python -m benchmarks --results` (ratios are to the floor measured in the same run). "
           "Each device has its own section, from its own run; a run rewrites its device's section only.", ""]


def device_kind(machine: dict[str, Any]) -> str:
    """``"cpu"``, ``"cuda"``...: the kind of device a run's models were on (its ``machine()["device"]``).

    >>> device_kind({"device": "cuda:0: NVIDIA H200"}), device_kind({"device": "cpu"})
    ('cuda', 'cpu')
    """
    return str(machine.get("device", "cpu")).split(":")[0]


def image_name(kind: str) -> str:
    """The picture of a device kind's core ratios, beside ``RESULTS.md``.

    >>> image_name("cpu"), image_name("cuda")
    ('RESULTS.png', 'RESULTS-cuda.png')
    """
    return "RESULTS.png" if kind == "cpu" else f"RESULTS-{kind}.png"


def not_measured(table: Sequence[Row]) -> list[str]:
    """One line per implementation a workload of ``table`` has no row for, saying why (suites' ``NOT_MEASURED``)."""
    lines = []
    workloads = {(row.get("suite", ""), row["workload"]) for row in table}
    for suite in dict.fromkeys(row.get("suite", "") for row in table):
        reasons = getattr(importlib.import_module(f"benchmarks.{suite}"), "NOT_MEASURED", {}) if suite else {}
        # ``(workload, "sizes")`` says which sizes a workload is measured at, and why only those
        lines += [f"{workload}: {reason}" if implementation == "sizes" else f"{workload}: no {implementation} row: {reason}"
                  for (workload, implementation), reason in reasons.items() if (suite, workload) in workloads]
    # the suites that compare with tensordict and nytorch 1.1 when they can: a run without them says so
    if {row.get("suite") for row in table} & {"bench_core", "bench_memory", "bench_swarm"}:
        implementations = [row["implementation"] for row in table]
        if not any(name.startswith("tensordict") for name in implementations):
            lines.append("every workload: no tensordict row: tensordict could not be imported in this run "
                         "(`pip install --no-deps --target DIR tensordict pyvers`, then PYTHONPATH=DIR; "
                         "see DEVELOPERS.md)")
        if not any("1.1" in name for name in implementations):
            lines.append("every workload: no nytorch 1.1 row: it could not be installed or run in this run "
                         "(see the messages on stderr and DEVELOPERS.md)")
    return lines


def drawn(table: Sequence[Row], path: str, title: str) -> bool:
    """Draw the core ratios to ``path``; ``False`` (with a note) when matplotlib or core rows are missing."""
    try:
        from .plot import plot
        plot(table, path, title=title)
    except (ImportError, ValueError) as error:  # no matplotlib, or no core rows (``--only bench_swarm``)
        print(f"no plot: {error}", file=sys.stderr)
        return False
    return True


def section(table: Sequence[Row], machine: dict[str, Any], *, image: str = "", failures: Sequence[str] = (),
            notes: Sequence[str] = ()) -> str:
    """The Markdown of one run: machine, picture, targets, rows that cannot exist, every row.

    >>> print(section([{"workload": "a + b", "size": "tiny", "implementation": "floor: flat + flat",
    ...                 "median_us": 2.0, "ratio_to_floor": 1.0}], {"device": "cpu"}).splitlines()[0])
    <!-- run: cpu -->
    """
    kind = device_kind(machine)
    title = "On the CPU" if kind == "cpu" else f"On {kind.upper()}: {machine['device'].split(': ', 1)[-1]}"
    lines = [f"<!-- run: {kind} -->", f"## {title}", "", "Machine: " + describe(machine), ""]
    lines += [line for note in notes for line in (note, "")]
    if kind != "cpu":
        suites = dict.fromkeys(row.get("suite", "") for row in table)
        on_cpu = [suite for suite in CPU_ONLY if suite in suites]
        lines += [f"Models and tensors on {machine['device'].split(': ')[0]}"
                  + (f", except in {' and '.join(on_cpu)} (CPU)." if on_cpu else ".")
                  + " Suites in this run: " + ", ".join(suites) + ".", ""]
    if image:
        lines += [f"![Ratios to the floor of bench_core on {kind}, per workload and size; black ticks are "
                  f"issue 4's targets]({image})", ""]
    if failures:
        lines += ["### Suites that failed in this run", ""] + [f"- {failure}" for failure in failures] + [""]
    judged = verdicts(table)
    if judged:
        lines += ["### Targets in this run (benchmarks/targets.py)", ""]
        if kind != "cpu":
            lines += ["Issue 4 sets its targets for the 2-core CPU; they are shown here for comparison.", ""]
        lines += ["```"] + [verdict.line() for verdict in judged] + ["```", ""]
    missing = not_measured(table)
    if missing:
        lines += ["### No row, and why", ""] + [f"- {line}" for line in missing] + [""]
    lines += ["### Every row", "", "| suite | workload | size | implementation | median | x floor |",
              "|---|---|---|---|---|---|"]
    for row in table:
        lines.append(f"| {row.get('suite', '')} | {row['workload']} | {row.get('size', '')} | "
                     f"{row['implementation']} | {shown(row, micro='µs')} | {row['ratio_to_floor']:.2f} |")
    return "\n".join(lines + ["", f"<!-- end run: {kind} -->", ""])


def write(table: Sequence[Row], machine: dict[str, Any], path: str = RESULTS_MD,
          failures: Sequence[str] = (), notes: Sequence[str] = ()) -> str:
    """Put one run's section into ``path`` (and its picture beside it), keeping other devices' sections.

    Returns:
        the device kind whose section was written.

    >>> import os, tempfile
    >>> row = {"workload": "a + b", "size": "tiny", "implementation": "floor: flat + flat",
    ...        "median_us": 2.0, "ratio_to_floor": 1.0}
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = os.path.join(folder, "RESULTS.md")
    ...     kinds = [write([row], {"device": device}, path) for device in ("cuda:0: H200", "cpu", "cpu")]
    ...     text = open(path).read()
    >>> kinds, text.count("<!-- run: cpu -->"), text.index("run: cpu") < text.index("run: cuda")
    (['cuda', 'cpu', 'cpu'], 1, True)
    """
    kind = device_kind(machine)
    image = image_name(kind)
    picture = image if drawn(table, os.path.join(os.path.dirname(path), image), describe(machine)) else ""
    sections: dict[str, str] = {}
    if os.path.exists(path):
        with open(path) as handle:
            sections = {found["key"]: found.group(0) for found in _SECTION.finditer(handle.read())}
    sections[kind] = section(table, machine, image=picture, failures=failures, notes=notes)
    ordered = sorted(sections, key=lambda key: (key != "cpu", key))
    with open(path, "w") as handle:
        handle.write("\n".join(_HEADER) + "\n" + "\n".join(sections[key] for key in ordered))
    return kind


def partial_note(only: Sequence[str], sizes: Sequence[str]) -> list[str]:
    """What a section written by a run of some suites or sizes says of itself (nothing for a full run).

    >>> partial_note(["bench_swarm"], [])
    ['A partial run (`--only bench_swarm`): this section holds only what it measured; the full table is `python -m benchmarks --threads 1 --results`.']
    """
    options = ([f"--only {' '.join(only)}"] if only else []) + ([f"--sizes {shlex.join(sizes)}"] if sizes else [])
    if not options:
        return []
    return [f"A partial run (`{' '.join(options)}`): this section holds only what it measured; the full table is "
            "`python -m benchmarks --threads 1 --results`."]


def read_dump(path: str) -> dict[str, Any]:
    """A file written by ``python -m benchmarks --json``: its ``machine``, ``rows``, ``failures`` and ``options``.

    Raises:
        ValueError: the file cannot be read, is not JSON, or lacks ``machine`` or ``rows``.
    """
    try:
        with open(path) as handle:
            dump = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"read_dump: cannot read {path!r} as a dump of python -m benchmarks --json ({error})") from None
    if not isinstance(dump, dict) or not isinstance(dump.get("machine"), dict) or not isinstance(dump.get("rows"), list):
        raise ValueError(f"read_dump: expected a dump of python -m benchmarks --json (keys 'machine' and 'rows') "
                         f"in {path!r}, got {type(dump).__name__}"
                         + (f" with keys {sorted(dump)}" if isinstance(dump, dict) else ""))
    return dump


def merged(dumps: Sequence[dict[str, Any]]) -> tuple[list[Row], dict[str, Any], list[str]]:
    """Several runs on one kind of device as one: their rows in order, the last run's machine with
    every run's date, and the failures of suites that no run measured.

    >>> rows, machine, failures = merged([
    ...     {"machine": {"date": "d1", "device": "cuda"}, "rows": [], "failures": ["bench_core: boom"]},
    ...     {"machine": {"date": "d2", "device": "cuda"}, "rows": [{"suite": "bench_core"}]}])
    >>> machine["date"], failures
    ('d1; d2', [])
    """
    rows = [row for dump in dumps for row in dump["rows"]]
    measured = {row.get("suite", "") for row in rows}
    failures = [failure for dump in dumps for failure in dump.get("failures", ())
                if failure.split(":", 1)[0] not in measured]
    machine = dict(dumps[-1]["machine"], date="; ".join(str(dump["machine"].get("date", "?")) for dump in dumps))
    return rows, machine, failures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.results", description=__doc__)
    parser.add_argument("runs", nargs="+", help="files written by python -m benchmarks --json; several runs on "
                                                "one kind of device (e.g. suites run in separate calls) are merged")
    parser.add_argument("--out", default=RESULTS_MD, help="the file to update (default: benchmarks/RESULTS.md)")
    parser.add_argument("--note", action="append", default=[],
                        help="a line to add under the machine of the sections written (repeatable)")
    args = parser.parse_args()
    if os.path.isdir(args.out) or not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        parser.error(f"--out: expected a file in a folder that exists, got {args.out!r}")
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for run in args.runs:
        try:
            dump = read_dump(run)
        except ValueError as error:
            parser.error(str(error))
        options = dump.get("options", {})
        if options.get("quick"):  # as ``python -m benchmarks --quick --results`` is refused
            parser.error(f"{run}: a --quick run (small sizes, few repeats); RESULTS.md holds full runs: "
                         "render a run made without --quick")
        by_kind.setdefault(device_kind(dump["machine"]), []).append(dump)
    for kind, dumps in by_kind.items():
        rows, machine, failures = merged(dumps)
        partial = [note for dump in dumps
                   for note in partial_note(dump.get("options", {}).get("only", []), dump.get("options", {}).get("sizes", []))]
        write(rows, machine, args.out, failures, notes=list(dict.fromkeys(partial)) + args.note)
        print(f"{args.out}: section {kind} from {len(dumps)} run(s)")


if __name__ == "__main__":
    main()
