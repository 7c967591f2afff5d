"""Side-by-side timing: implementations alternate inside one loop, medians and ratios from one run."""
from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch


#: The allocator regime this process measures under (``use_allocator``); subprocesses follow it.
ALLOCATOR = "system"
# CPython 3.12 starts with objects in the permanent generation (375 in 3.12.1): frozen by nobody a run
# should leave frozen, so a count up to this one is taken as "nothing frozen" by ``frozen``.
_FROZEN_AT_IMPORT = gc.get_freeze_count()

#: The regimes ``use_allocator`` knows.
ALLOCATORS = ("warm", "system")


def use_allocator(regime: str) -> bool:
    """Measure under ``regime``: ``"warm"`` makes glibc's malloc keep freed memory, ``"system"`` leaves it be.

    With glibc's defaults, whether a fresh buffer page-faults in depends on the heap's history:
    blocks above the mmap threshold (which glibc moves as blocks are freed, up to 32 MiB) get fresh
    pages every time, and the top of the heap goes back to the system once it passes the trim
    threshold.  A fault costs about as much as the arithmetic on its page, so the floor
    (``flat + flat``, a fresh buffer) of one size read 0.9 to 3.3 ms between runs of the same
    code.  ``"warm"`` turns off mmap and trimming, as torch's caching allocator does on GPUs: after
    warm-up no implementation's time includes page faults, and ratios compare passes over memory.
    Call it first thing: it changes how later allocations are served, not earlier ones.

    Returns:
        ``True`` when the regime is in force; ``False`` where ``"warm"`` cannot be had (no glibc),
        and then nothing was changed.

    Raises:
        ValueError: ``regime`` is not one of ``ALLOCATORS``, or ``"system"`` is asked for after ``"warm"``.

    >>> use_allocator("system")
    True
    """
    global ALLOCATOR
    if regime not in ALLOCATORS:
        raise ValueError(f"use_allocator: expected one of {list(ALLOCATORS)} as regime, got {regime!r}")
    if regime == "system" and ALLOCATOR == "warm":  # mallopt cannot give glibc back its moving thresholds
        raise ValueError("use_allocator: the 'warm' regime is in force and lasts as long as this process; "
                         "measure 'system' in a new one")
    if regime == "warm":
        import ctypes
        import ctypes.util

        try:
            mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
        except (OSError, AttributeError):  # not glibc (macOS, musl...)
            return False
        m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
        if not (mallopt(m_mmap_max, 0) and mallopt(m_trim_threshold, 2 ** 31 - 1)):
            return False
    ALLOCATOR = regime
    return True


#: The device the suites put their models and tensors on (``use_device``).
DEVICE = torch.device("cpu")


def use_device(name: str) -> torch.device:
    """Put the suites' models and tensors on device ``name``: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Timings then wait for the device's queued kernels before reading the clock (``synchronize``),
    and memory is the CUDA caching allocator's peak (``memory.allocated_bytes``); other
    accelerators have neither here, so they are refused rather than measured wrongly.

    Raises:
        ValueError: ``name`` is not a CPU or CUDA device, or none is available here.

    >>> use_device("cpu")
    device(type='cpu')
    """
    global DEVICE
    try:
        device = torch.device(name)
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"use_device: the suites time and measure memory on cpu and cuda only, got {name!r}")
        torch.empty(0, device=device)  # raises where this torch build or machine has no such device
    except (RuntimeError, AssertionError) as error:
        raise ValueError(f"use_device: device {name!r} is not available here ({error})") from None
    DEVICE = device
    return device


def synchronize() -> None:
    """Wait until ``DEVICE`` has run every kernel queued so far (nothing to wait for on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def positive_int(text: str) -> int:
    """An ``argparse`` type: a whole number of at least 1 (threads, calls, repeats).

    Raises:
        argparse.ArgumentTypeError: ``text`` is not such a number (argparse prints it as a usage error).

    >>> positive_int("4")
    4
    """
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def add_measuring_options(parser: Any, threads: Optional[int] = None, device_note: str = "") -> None:
    """``--allocator``, ``--device`` and ``--threads`` on a command line that measures (see ``apply_measuring_options``)."""
    parser.add_argument("--allocator", choices=ALLOCATORS, default="warm",
                        help="warm (default): glibc keeps freed memory, so no time includes page faults; "
                             "system: glibc's defaults, where fresh pages fault in depending on the heap's history")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N" + device_note)
    parser.add_argument("--threads", type=positive_int, default=threads,
                        help="torch threads (default: " + (str(threads) if threads else "torch's own")
                             + "; 1 gives steadier ratios on a shared machine)")


def apply_measuring_options(parser: Any, args: Any) -> None:
    """Put the options of ``add_measuring_options`` in force, before anything is measured.

    A device that cannot be used is a usage error; a ``warm`` allocator that cannot be had (no
    glibc) is said on stderr, and the measurement goes on with the system's.
    """
    import sys

    try:
        use_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    if not use_allocator(args.allocator):
        print(f"--allocator {args.allocator} is not available here (no glibc): measuring with the system's",
              file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)


def _calibrate(fn: Callable[[], Any], target_s: float) -> int:
    """How many calls make one sample last about ``target_s`` (amortises timer overhead on tiny ops)."""
    number = 1
    while True:
        synchronize()
        start = time.perf_counter()
        for _ in range(number):
            fn()
        synchronize()
        if time.perf_counter() - start >= target_s or number >= 1 << 16:
            return number
        number *= 4


def compare(impls: dict[str, Callable[[], Any]], *, repeats: int = 15, warmup: Optional[int] = None,
            target_s: float = 0.002, end_to_end: bool = False) -> dict[str, float]:
    """Median microseconds per call of each implementation, measured interleaved in one run.

    Each implementation first runs ``warmup`` times: by default 3, or as many as nytorch waits for
    before it compiles a structure's code (``nytorch._builder.COMPILE_AFTER``, where this process
    imported it), so that samples see the steady state a long run reaches.

    The garbage collector is off while a sample runs and collects between samples, untimed;
    ``end_to_end`` keeps it on, so that a whole program's samples include what collecting its
    reference cycles costs (nytorch 1.1 makes one per model), as it would outside a benchmark.
    Either way the objects that exist before sampling are frozen, so collections scan only what
    the implementations made.
    """
    if warmup is None:
        builder = sys.modules.get("nytorch._builder")  # absent where nytorch 1.1 is the nytorch imported
        warmup = max(3, getattr(builder, "COMPILE_AFTER", 0) + 1)
    for fn in impls.values():
        for _ in range(warmup):
            fn()
    numbers = {name: _calibrate(fn, target_s) for name, fn in impls.items()}
    samples: dict[str, list[float]] = {name: [] for name in impls}
    gc_was_enabled = gc.isenabled()
    if end_to_end:
        gc.enable()
    else:
        gc.disable()
    try:
        with frozen():  # what exists now is never scanned again while sampling
            order = list(impls.items())
            for repeat in range(repeats):
                # alternate the order, so that no implementation always runs right after the same one
                for name, fn in order if repeat % 2 == 0 else order[::-1]:
                    number = numbers[name]
                    synchronize()
                    start = time.perf_counter()
                    for _ in range(number):
                        fn()
                    synchronize()  # kernels queued on an accelerator count until they have run
                    samples[name].append((time.perf_counter() - start) / number * 1e6)
                    # untimed: free what reference cycles hold (nytorch 1.1's dead models), else memory
                    # grows from sample to sample and fresh pages fault into whichever implementation
                    # runs next; cheap, as everything older than this loop is frozen
                    gc.collect()
    finally:
        (gc.enable if gc_was_enabled else gc.disable)()
    return {name: statistics.median(values) for name, values in samples.items()}


@contextlib.contextmanager
def frozen(collect: bool = True) -> Iterator[None]:
    """Move every object alive now (after a collection, with ``collect``) out of the collector's sight.

    Also when a caller (or a library) froze objects earlier: otherwise each collection would scan
    all made since then.  A caller's frozen objects stay frozen; what this froze is unfrozen on
    leaving only when nothing was frozen before (since this module was imported: the interpreter's
    own frozen objects, which CPython 3.12 starts with, are unfrozen with it).

    >>> with frozen():
    ...     gc.get_freeze_count() > 0
    True
    """
    freezing = gc.get_freeze_count() <= _FROZEN_AT_IMPORT
    if collect:
        gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        if freezing:
            gc.unfreeze()


def overheads() -> dict[str, float]:
    """What the harness itself costs here, in µs: a timer read, ``synchronize`` and the collection
    between samples (after a freeze, as in ``compare``); printed at the start of a run, so that a
    machine where the suite runs slowly says whether the harness is why.

    >>> sorted(overheads())
    ['collection after a freeze', 'full collection', 'synchronize', 'timer']
    """
    def median_us(fn: Callable[[], Any], number: int) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(number):
                fn()
            times.append((time.perf_counter() - start) / number * 1e6)
        return round(statistics.median(times), 3)

    found = {"timer": median_us(time.perf_counter, 1000), "synchronize": median_us(synchronize, 100),
             "full collection": median_us(gc.collect, 1)}
    with frozen(collect=False):
        found["collection after a freeze"] = median_us(gc.collect, 20)
    return found


def rows(workload: str, size: str, medians: dict[str, float], floor: str) -> list[dict[str, Any]]:
    """Table rows with ratios to the floor implementation."""
    base = medians[floor]
    return [
        {"workload": workload, "size": size, "implementation": name, "median_us": round(value, 2),
         "ratio_to_floor": round(value / base, 3)}
        for name, value in medians.items()
    ]


def cpu_name() -> str:
    """The CPU's model and architecture (``"AMD EPYC (x86_64)"``), where the system says the model.

    ``platform.processor()`` is empty on Linux, where the model is in ``/proc/cpuinfo``.
    """
    model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        pass
    model = model or platform.processor()
    return f"{model} ({platform.machine()})" if model and model != platform.machine() else platform.machine()


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": f"{DEVICE}: {torch.cuda.get_device_name(DEVICE)}" if DEVICE.type == "cuda" else str(DEVICE),
        "allocator": {"warm": "glibc keeping freed memory (--allocator warm)",
                      "system": "system defaults (--allocator system)"}[ALLOCATOR],
    }


def describe(found: Optional[dict[str, Any]] = None) -> str:
    """One line naming what a run was measured on (``machine()`` unless ``found`` is given).

    >>> describe({"cores": 2, "device": "cpu"})
    'cores 2, device cpu'
    """
    return ", ".join(f"{key} {value}" for key, value in (machine() if found is None else found).items())


def shown(row: dict[str, Any], micro: str = "us") -> str:
    """A row's median as printed: its own ``shown`` text (memory rows), else µs or ms.

    >>> shown({"median_us": 1520.0}), shown({"median_us": 12.34}, micro="µs")
    ('1.52 ms', '12.3 µs')
    """
    median = row["median_us"]
    return row.get("shown") or (f"{median / 1000:.2f} ms" if median >= 1000 else f"{median:.1f} {micro}")


def print_table(table: list[dict[str, Any]]) -> None:
    """Aligned text table: workload, size, implementation, median, ratio."""
    widths = [max([len(heading)] + [len(str(row.get(key, ""))) for row in table])
              for key, heading in (("workload", "workload"), ("size", "size"), ("implementation", "implementation"))]
    header = f"{'workload':<{widths[0]}} {'size':<{widths[1]}} {'implementation':<{widths[2]}} {'median':>12} {'x floor':>8}"
    print(header)
    print("-" * len(header))
    for row in table:
        print(f"{row['workload']:<{widths[0]}} {row.get('size', ''):<{widths[1]}} {row['implementation']:<{widths[2]}} "
              f"{shown(row):>12} {row['ratio_to_floor']:>8.2f}")


def dump_json(table: list[dict[str, Any]], path: str, failures: Optional[list[str]] = None,
              options: Optional[dict[str, Any]] = None) -> None:
    """Write the rows, the machine, the suites that failed (``python -m benchmarks --keep-going``) and the
    run's options (``quick``, ``only``, ``sizes``: ``python -m benchmarks.results`` reads them) to ``path``."""
    with open(path, "w") as handle:
        json.dump({"machine": machine(), "rows": table, "failures": failures or [], "options": options or {}},
                  handle, indent=1)


def tensordict() -> Any:
    """tensordict's ``TensorDict`` class, or ``None`` where it is not installed.

    It is optional, never a dependency: its rows appear when it can be imported (e.g. with
    ``PYTHONPATH`` pointing at a ``pip install --target`` of it, see DEVELOPERS.md).
    """
    import importlib.util

    if importlib.util.find_spec("tensordict") is None:
        return None
    from tensordict import TensorDict
    return TensorDict


def run_nytorch_11(script: str, *args: str) -> Any:
    """Run ``script`` under nytorch 1.1 (a separate library also named ``nytorch``) and parse its JSON output.

    1.1 is installed with ``pip install --no-deps --target $NYTORCH11_PATH nytorch==1.1.0`` when missing
    and imported from a subprocess with ``PYTHONPATH`` pointing there.  Returns ``None`` when unavailable.
    The script starts under this process's allocator regime and device, and finds three names
    defined: ``device``, ``compare`` (this module's) and ``suite_file(name)``, which runs one of the
    suite's files (``"models.py"``...) there, where ``nytorch`` is 1.1.
    """
    import subprocess
    import sys

    target = os.environ.get("NYTORCH11_PATH", "/tmp/nyto11")
    if not os.path.isdir(os.path.join(target, "nytorch")):
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target,
                               "nytorch==1.1.0"], capture_output=True)
        if done.returncode != 0:
            print("nytorch 1.1 unavailable; skipping its rows", file=sys.stderr)
            return None
    env = dict(os.environ, PYTHONPATH=target, OMP_NUM_THREADS=str(torch.get_num_threads()))
    here = os.path.dirname(os.path.abspath(__file__))
    # set before the script allocates: the same allocator regime and device as this process
    preamble = (f"import os, runpy\n"
                f"harness = runpy.run_path({os.path.join(here, '_harness.py')!r})\n"
                f"harness['use_allocator']({ALLOCATOR!r})\n"
                f"device, compare = harness['use_device']({str(DEVICE)!r}), harness['compare']\n"
                f"def suite_file(name): return runpy.run_path(os.path.join({here!r}, name))\n")
    result = subprocess.run([sys.executable, "-c", preamble + script, *args], capture_output=True, text=True,
                            env=env, cwd="/")
    if result.returncode != 0:
        print("nytorch 1.1 run failed:", result.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(result.stdout)
