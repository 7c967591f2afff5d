"""Ratios to the floor as a picture: one panel per workload, one group of bars per model size.

Run: ``python -m benchmarks.plot results.json out.png`` on a ``python -m benchmarks --json``
dump, or let ``python -m benchmarks --results`` draw ``benchmarks/RESULTS.png``.  Needs
matplotlib (in the ``dev`` extra).
"""
from __future__ import annotations

import argparse
import os
import textwrap
from collections.abc import Sequence
from typing import Any, Optional

from ._harness import describe
from .targets import tick

#: The ``bench_core`` workloads drawn, in panel order.
WORKLOADS = ("a + b", "0.9 * (a - b) + a", "lerp_ (EMA, in place)", "randn", "clone", "structural check of two models")

#: Panels per row of the figure.
COLUMNS = 3

#: Bar colour by the implementation's first word(s): nytorch's three styles warm, the others cool or grey.
FAMILIES = (("Particle", "tab:red"), ("NytoModule", "tab:orange"), ("functional", "tab:purple"),
            ("kernel only", "tab:gray"), ("foreach", "tab:blue"), ("per-tensor", "tab:cyan"),
            ("tensordict", "tab:green"), ("nytorch 1.1", "tab:brown"))

def family(name: str) -> tuple[str, str]:
    """``(family, colour)`` of an implementation's row name.

    >>> family("Particle p + q")
    ('Particle', 'tab:red')
    """
    for prefix, colour in FAMILIES:
        if name.startswith(prefix):
            return prefix, colour
    return "other", "tab:olive"


def _order(name: str) -> tuple[int, str]:
    known = [prefix for prefix, _ in FAMILIES]
    first = family(name)[0]
    return (known.index(first) if first in known else len(known), name)


def _panel_rows(table: Sequence[dict[str, Any]], workload: str) -> dict[str, dict[str, float]]:
    """``size -> implementation -> ratio`` for one workload, floors left out (they are the line at 1)."""
    found: dict[str, dict[str, float]] = {}
    for row in table:
        if row.get("suite", "bench_core") != "bench_core" or row["workload"] != workload:
            continue
        if row["implementation"].startswith("floor"):
            continue
        found.setdefault(row["size"], {})[row["implementation"]] = row["ratio_to_floor"]
    return found


def plot(table: Sequence[dict[str, Any]], path: str, title: str = "") -> list[str]:
    """Draw every workload of ``WORKLOADS`` present in ``table`` to ``path``; returns the workloads drawn.

    Each panel has one group of horizontal bars per size, one bar per implementation, on a log
    scale of the ratio to that size's floor (the dashed line at 1): shorter is faster.

    Raises:
        ValueError: ``table`` holds none of the workloads.

    >>> import os, tempfile
    >>> rows = [{"workload": "a + b", "size": "tiny", "implementation": name, "ratio_to_floor": ratio}
    ...         for name, ratio in [("floor: flat + flat", 1.0), ("Particle p + q", 5.2)]]
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     plot(rows, os.path.join(folder, "ratios.png"))
    ['a + b']
    """
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = [(workload, rows) for workload in WORKLOADS if (rows := _panel_rows(table, workload))]
    if not panels:
        raise ValueError(f"plot: expected rows of at least one of {list(WORKLOADS)} in table, found none")
    columns = min(COLUMNS, len(panels))
    lines = -(-len(panels) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(5.6 * columns, 7.5 * lines), squeeze=False)
    for axis in axes.flat[len(panels):]:
        axis.set_visible(False)
    for axis, (workload, rows) in zip(axes.flat, panels):
        sizes = list(rows)
        step = 1.0 / (max(len(by_name) for by_name in rows.values()) + 1)
        for k, size in enumerate(sizes):
            for j, name in enumerate(sorted(rows[size], key=_order)):
                colour = family(name)[1]
                y = k + j * step
                axis.barh(y, rows[size][name], height=step * 0.9, color=colour,
                          hatch="//" if "then read" in name else None, edgecolor="white", linewidth=0,
                          label=name if name not in axis.get_legend_handles_labels()[1] else None)
                target = tick(workload, size, name)
                if target is not None:
                    axis.plot([target, target], [y - step * 0.6, y + step * 0.6], color="black", linewidth=2.5,
                              label="target" if "target" not in axis.get_legend_handles_labels()[1] else None)
        axis.set_xscale("log")
        axis.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.axvline(1.0, color="black", linestyle="--", linewidth=1)
        axis.set_yticks([k + 0.5 - step for k in range(len(sizes))], sizes)
        axis.invert_yaxis()
        axis.set_title(workload)
        axis.set_xlabel("time / floor of the same run (log; 1 = floor)")
        axis.grid(axis="x", which="both", alpha=0.3)
        axis.legend(fontsize=7, loc="lower right")
    if title:
        figure.suptitle(textwrap.fill(title, 150))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return [workload for workload, _ in panels]


def path_error(path: str, option: str = "out") -> Optional[str]:
    """Why the image ``path`` cannot be written, checked before any work, or ``None`` (also without matplotlib).

    matplotlib itself would add ``.png`` to a name without an extension (and to a folder's name),
    so the file written would not be the one asked for: both are refused.

    >>> path_error("ratios.png") is None
    True
    >>> print(path_error("ratios"))  # doctest: +ELLIPSIS
    out: expected a file name ending in an image format (..., png, ...), got 'ratios'
    """
    if os.path.isdir(path):
        return f"{option}: expected an image file name, got the folder {path!r}"
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        return f"{option}: expected a file in a folder that exists, got {path!r}"
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        return None
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if os.path.splitext(path)[1].lower().lstrip(".") not in formats:
        return f"{option}: expected a file name ending in an image format ({', '.join(formats)}), got {path!r}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__)
    parser.add_argument("json", help="a file written by python -m benchmarks --json")
    parser.add_argument("out", help="the image to write (.png, .svg, .pdf)")
    args = parser.parse_args()
    problem = path_error(args.out)
    if problem:
        parser.error(problem)
    from .results import read_dump

    try:
        dump = read_dump(args.json)
        plot(dump["rows"], args.out, title=describe(dump["machine"]))
    except (ValueError, OSError) as error:  # no core rows, an image format or folder matplotlib cannot write
        parser.error(str(error))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
