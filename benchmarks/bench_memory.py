"""Peak extra memory of one operation as a multiple of the model's parameter bytes.

Ours vs a per-tensor loop vs nytorch 1.1 (subprocess) vs tensordict (if installed), on the
many-small, deep-narrow, wide and ResNet-18-shaped models of ``models.py``.
Run: ``python -m benchmarks.bench_memory [--quick]``.
"""
from __future__ import annotations

import argparse
import json
import textwrap
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import nytorch
import nytorch.functional as nf
from nytorch import _pool

from . import _harness as harness
from .memory import allocated_bytes, parameter_bytes
from .models import sizes

Row = dict[str, Any]

#: The model sizes measured (``models.sizes``); ``--quick`` keeps the first.
SIZES = ("many-small", "deep-narrow", "wide", "resnet18")

#: What bench_memory leaves out, and why (printed under the table and in RESULTS.md).
NOT_MEASURED = {
    ("memory of a + b", "sizes"): "measured at many-small, deep-narrow, wide and resnet18 (many-small only with "
                                  "--quick); at the tiny and iris sizes each style's a + b allocates its 8 or 396 "
                                  "bytes of output, 1.00x the parameter bytes (tests/test_benchmarks.py checks it)",
}


def _row(workload: str, size: str, implementation: str, used: int, floor: int) -> Row:
    return {"workload": workload, "size": size, "implementation": implementation, "median_us": 0.0,
            "ratio_to_floor": round(used / floor, 3), "bytes": used, "shown": f"{used / 2**20:.2f} MiB"}


def _ours(size: str, factory: Callable[[], nn.Module]) -> list[Row]:
    a, b = factory().to(harness.DEVICE), factory().to(harness.DEVICE)
    floor = parameter_bytes(a)
    pa, pb = nytorch.particle(a), nytorch.particle(b)
    ta, tb = nf.params(a), nf.params(b)
    rows = [_row("memory of a + b", size, "parameter bytes (floor)", floor, floor)]
    for name, fn in {
        "NytoModule a + b": lambda: a + b,
        "Particle p + q": lambda: pa + pb,
        "functional nf.add": lambda: nf.add(ta, tb),
        "per-tensor loop": lambda: [x + y for x, y in zip(ta.values(), tb.values())],
        "NytoModule 0.9*(a-b)+a": lambda: 0.9 * (a - b) + a,
        "Particle ema.lerp_ (in place)": lambda: pa.lerp_(pb, 0.01),
    }.items():
        fn()
        # dead results' buffers are reused (``nytorch._pool``): measure what the operation needs when
        # none are kept, and report below what the pool holds between operations
        _pool.clear()
        rows.append(_row("memory of a + b", size, name, allocated_bytes(fn, harness.DEVICE), floor))
    _pool.clear()
    for _ in range(3):  # a loop of the operations above: what the pool keeps between them
        a + b, pa + pb, 0.9 * (a - b) + a  # noqa: B018 - results dropped on purpose
    rows.append(_row("memory of a + b", size, "held by nytorch's pool between operations", _pool.held_bytes(), floor))
    TensorDict = harness.tensordict()
    if TensorDict is not None:
        da, db = TensorDict(ta, []), TensorDict(tb, [])
        used = allocated_bytes(lambda: da + db, harness.DEVICE)
        rows.append(_row("memory of a + b", size, "tensordict td + td", used, floor))
    return rows


_NYTORCH_11 = textwrap.dedent('''
    import json, sys
    # nytorch here is 1.1: the suite's own models (they subclass its NytoModule) and its own measure
    zoo = suite_file("models.py")["sizes"](json.loads(sys.argv[2]))
    allocated_bytes = suite_file("memory.py")["allocated_bytes"]
    rows = []
    for size in json.loads(sys.argv[1]):
        a = zoo[size]().to(device); b = a.clone_from(zoo[size]().to(device))
        a + b
        rows.append(dict(size=size, used=allocated_bytes(lambda: a + b, device),
                         floor=sum(p.numel() * p.element_size() for p in a.parameters())))
    print(json.dumps(rows))
''')


def _nytorch_11(names: list[str], quick: bool) -> list[Row]:
    found = harness.run_nytorch_11(_NYTORCH_11, json.dumps(names), json.dumps(quick))
    if found is None:
        return []
    return [_row("memory of a + b", row["size"], "nytorch 1.1 NytoModule", row["used"], row["floor"])
            for row in found]


def run(quick: bool) -> list[Row]:
    zoo = sizes(quick)
    names = [name for name in (SIZES[:1] if quick else SIZES) if name in zoo]  # ``--sizes`` may leave some out
    rows: list[Row] = []
    for size in names:
        rows += _ours(size, zoo[size])
    return rows + _nytorch_11(names, quick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    quick = parser.parse_args().quick
    harness.use_allocator("warm")  # as ``python -m benchmarks`` does by default
    harness.print_table(run(quick))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
