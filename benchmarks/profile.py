"""Where an operation's time goes: the kernel, the allocation, and nytorch's own Python.

``python -m benchmarks.profile [--size NAME ...] [--workload NAME ...] [--implementation PREFIX ...]``

For each chosen implementation of the core workloads (``bench_core.workloads``) it prints:

1. The split of its median time, measured side by side with the rows that isolate each part
   (unprofiled, as the suite measures):

   - **kernel**: the same pass into a buffer that already exists (``kernel only`` for ``a + b``;
     the floor itself for in-place workloads, which allocate nothing);
   - **allocation**: the floor minus the kernel (a fresh buffer; with ``--allocator system``
     this is where page faults show), where the workload has a "kernel only" row (``a + b``);
     0 for in-place workloads; elsewhere "n/a", counted in the kernel;
   - **the rest**: this implementation minus the floor: Python, checks, dispatch, and any extra
     passes or per-tensor kernels it makes.

2. A profile of that rest: ``cProfile``'s self time per call of the functions and C calls it
   spends the most in, in microseconds and per cent of the profiled total.  ``cProfile`` adds
   ~0.1 µs per Python call it sees, so read the shares, not the sums; C functions called from C
   (``map(Tensor.data_ptr, leaves)``) are counted in their Python caller.  On an accelerator (``--device``)
   it shows host-side time only: kernels run asynchronously, and only the split above waits for them.

``torch.profiler`` is not used: its own allocations split glibc's free blocks, after which fresh
buffers page-fault in (measured: 0 faults per ``a + b`` on many-small before, 13 while profiling,
65 after), which would charge the profiler's effect to the kernels.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from . import _harness as harness
from .bench_core import KERNEL_ONLY, Workload, workloads
from .models import sizes

#: The row that isolates the kernel, per workload that has one.
KERNEL_ROWS = {"a + b": KERNEL_ONLY}

#: Workloads that write in place: they allocate nothing, so their floor is their kernel.
IN_PLACE = frozenset({"lerp_ (EMA, in place)"})


def split(workload: Workload, medians: dict[str, float], name: str) -> dict[str, Optional[float]]:
    """``kernel``, ``allocation`` and ``rest`` of implementation ``name``, in microseconds.

    ``allocation`` is ``None`` where the suite does not time the floor's kernel apart from its
    allocation (no "kernel only" row, not in place): ``kernel`` is then the whole floor.

    >>> medians = {"floor": 10.0, "kernel only: torch.add(out=reused)": 8.0, "ours": 15.0}
    >>> split(Workload("a + b", "floor", {}), medians, "ours")
    {'kernel': 8.0, 'allocation': 2.0, 'rest': 5.0}
    >>> split(Workload("clone", "floor", {}), medians, "ours")
    {'kernel': 10.0, 'allocation': None, 'rest': 5.0}
    """
    floor = medians[workload.floor]
    row = KERNEL_ROWS.get(workload.name)
    if row is not None:
        kernel = min(medians[row], floor)
        return {"kernel": kernel, "allocation": floor - kernel, "rest": medians[name] - floor}
    allocation = 0.0 if workload.name in IN_PLACE else None
    return {"kernel": floor, "allocation": allocation, "rest": medians[name] - floor}


def _label(key: tuple[str, int, str]) -> str:
    """``file:line(function)`` relative to the repository, or the C function's own description."""
    path, line, function = key
    if path == "~":
        return function
    for root in (os.getcwd(), os.path.dirname(torch.__file__)):
        if path.startswith(root):
            path = os.path.relpath(path, os.path.dirname(root) if root != os.getcwd() else root)
            break
    return f"{path}:{line}({function})"


def hot_spots(fn: Callable[[], Any], calls: int, top: int) -> list[tuple[str, float, float]]:
    """``(function, µs per call, share of the profiled total)`` of the ``top`` functions by self time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in stats.values()) or 1.0
    ranked = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return [(_label(key), entry[2] / calls * 1e6, entry[2] / total) for key, entry in ranked]


def report(size: str, factory: Callable[[], torch.nn.Module], names: Sequence[str], prefixes: Sequence[str],
           calls: int, repeats: int, top: int) -> None:
    """Print the split and the hot spots of every chosen implementation at one size."""
    for workload in workloads(factory):
        if names and workload.name not in names:
            continue
        medians = harness.compare(workload.impls, repeats=repeats)
        for name, fn in workload.impls.items():
            if name.startswith("floor") or name in KERNEL_ROWS.values():
                continue
            if prefixes and not any(name.startswith(prefix) for prefix in prefixes):
                continue
            parts = split(workload, medians, name)
            ratio = medians[name] / medians[workload.floor]
            print(f"\n{workload.name} | {size} | {name}: {medians[name]:.1f} µs = {ratio:.2f} x floor")
            print("  " + ", ".join(f"{part} {value:.1f} µs ({100 * value / medians[name]:.0f}%)" if value is not None
                                   else f"{part} n/a (inside the floor's kernel)" for part, value in parts.items()))
            for function, per_call, share in hot_spots(fn, calls, top):
                print(f"  {per_call:9.2f} µs {100 * share:5.1f}%  {function}")


def main() -> None:
    zoo = sizes(quick=False)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", nargs="+", default=["many-small"], choices=list(zoo), help="default: many-small")
    parser.add_argument("--workload", nargs="*", default=["a + b"], help='core workloads by name (default: "a + b")')
    parser.add_argument("--implementation", nargs="*", default=["Particle", "NytoModule", "functional"],
                        help="implementations by prefix (default: Particle NytoModule functional)")
    parser.add_argument("--calls", type=harness.positive_int, default=200, help="profiled calls per implementation")
    parser.add_argument("--repeats", type=harness.positive_int, default=11, help="timed samples per implementation")
    parser.add_argument("--top", type=harness.positive_int, default=10, help="functions listed per implementation")
    harness.add_measuring_options(parser, threads=1)
    args = parser.parse_args()
    known = workloads(zoo["tiny (seed)"])  # the same workloads and implementations at every size
    names = [workload.name for workload in known]
    unknown = [name for name in args.workload if name not in names]
    if unknown:
        parser.error(f"--workload: unknown {unknown}; expected some of {names}")
    implementations = {name for workload in known for name in workload.impls}
    unmatched = [prefix for prefix in args.implementation if not any(name.startswith(prefix) for name in implementations)]
    if unmatched:
        parser.error(f"--implementation: no implementation starts with {unmatched}; they are {sorted(implementations)}")
    harness.apply_measuring_options(parser, args)
    for size in args.size:
        report(size, zoo[size], args.workload, args.implementation, args.calls, args.repeats, args.top)


if __name__ == "__main__":
    main()
