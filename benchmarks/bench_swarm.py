"""Swarms vs their floors: the vectorised forward and one accelerated-PSO update, side by side in one run.

Workloads (issue 3):

1. Forward of P=64 MLPs 4-32-32-3 on a batch of 64: ``swarm(x)`` vs the compute floor
   written by hand (``torch.baddbmm`` over stacked weights), a Python loop of 64 modules,
   and plain ``vmap(functional_call)``.  Targets: within 1.5x of the floor, >= 3x faster
   than the loop.
2. One accelerated-PSO update ``(1-b)·S + b·S[best] + a·noise`` over P=64 members:
   ``nytorch.algorithms.apso`` vs the same three operations by hand on one flat ``[P, n]``
   tensor (the floor) and vs nytorch 1.1 NytoModules (in a subprocess with
   ``PYTHONPATH=/tmp/nyto11``).  Targets: within 1.3x of the floor, >= 50x faster than 1.1.

Run: ``python -m benchmarks.bench_swarm [--quick] [--threads N]`` from the repository root.
"""
from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import nytorch.algorithms as alg
from nytorch._swarm import Swarm

from . import _harness as harness
from . import targets

Row = dict[str, Any]
P, BATCH = 64, 64
ALPHA, BETA, BEST = 0.1, 0.5, 7
FLOOR_FORWARD = "floor: baddbmm by hand"
FLOOR_APSO = "floor: flat [P, n] by hand"


def mlp() -> nn.Sequential:
    """The 4-32-32-3 MLP of the issue."""
    return nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


class ClassMLP(nn.Module):
    """The same MLP written as a custom class (torch.fx sees one chain: the fused path still applies)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 32), nn.Linear(32, 32), nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def forward_rows(repeats: int) -> list[Row]:
    torch.manual_seed(0)
    modules = [mlp() for _ in range(P)]
    x = torch.randn(BATCH, 4)
    swarm = Swarm.stack(modules)
    generic = Swarm.stack([ClassMLP() for _ in range(P)])
    params, buffers = torch.func.stack_module_state(modules)  # type: ignore[arg-type]
    weights = [params[f"{i}.weight"] for i in (0, 2, 4)]
    biases = [params[f"{i}.bias"].unsqueeze(1) for i in (0, 2, 4)]
    base = mlp()

    def floor() -> torch.Tensor:
        h = x.expand(P, BATCH, 4)
        h = torch.baddbmm(biases[0], h, weights[0].mT).relu_()
        h = torch.baddbmm(biases[1], h, weights[1].mT).relu_()
        return torch.baddbmm(biases[2], h, weights[2].mT)

    def loop() -> torch.Tensor:
        return torch.stack([module(x) for module in modules])

    plain = torch.func.vmap(lambda p, b, x: torch.func.functional_call(base, (p, b), (x,)), in_dims=(0, 0, None))
    reference = floor()
    for out in (swarm(x), swarm(x, chunk_size=P), loop(), plain(params, buffers, x)):
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    impls: dict[str, Callable[[], Any]] = {
        FLOOR_FORWARD: floor,
        "Swarm: swarm(x)": lambda: swarm(x),
        "Swarm: custom-class MLP": lambda: generic(x),
        "Swarm: general vmap path": lambda: swarm(x, chunk_size=P),
        "Python loop of 64 modules": loop,
        "vmap(functional_call)": lambda: plain(params, buffers, x),
    }
    with torch.no_grad():
        medians = harness.compare(impls, repeats=repeats)
    return harness.rows("swarm forward", "P=64 4-32-32-3", medians, FLOOR_FORWARD)


def apso_rows(repeats: int) -> list[Row]:
    torch.manual_seed(0)
    swarm = Swarm.stack([mlp() for _ in range(P)])
    flat = torch.cat([leaf.reshape(P, -1) for leaf in swarm.params.values()], dim=1).contiguous()

    def floor() -> torch.Tensor:
        return (1 - BETA) * flat + BETA * flat[BEST] + ALPHA * torch.randn_like(flat)

    impls: dict[str, Callable[[], Any]] = {
        FLOOR_APSO: floor,
        "nytorch algorithms.apso": lambda: alg.apso(swarm, BEST, alpha=ALPHA, beta=BETA),
        "Swarm operators spelled out": lambda: (1 - BETA) * swarm + BETA * swarm[BEST] + ALPHA * Swarm.randn(swarm),
    }
    with torch.no_grad():
        medians = harness.compare(impls, repeats=repeats)
    return harness.rows("APSO update", f"P=64 n={flat.shape[1]}", medians, FLOOR_APSO)


_NYTORCH_11 = textwrap.dedent('''
    import json, statistics, sys, time, torch
    from torch import nn
    from nytorch import NytoModule
    P, ALPHA, BETA, BEST = 64, 0.1, 0.5, 7
    class MLP(NytoModule):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
        def forward(self, x):
            return self.layers(x)
    torch.manual_seed(0)
    first = MLP()
    members = [first] + [first.clone_from(MLP()) for _ in range(P - 1)]  # one species, as 1.1 requires
    flat = torch.stack([torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in members])
    def floor():
        return (1 - BETA) * flat + BETA * flat[BEST] + ALPHA * torch.randn_like(flat)
    def products():  # the faster 1.1 spelling: ParamProducts, one module per member at the end
        best = members[BEST].product()
        return [((1 - BETA) * m.product() + BETA * best + ALPHA * m.product().randn()).module() for m in members]
    def modules():
        best = members[BEST]
        return [(1 - BETA) * m + BETA * best + ALPHA * m.randn() for m in members]
    def median(fn, repeats):
        for _ in range(2): fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter(); fn(); samples.append((time.perf_counter() - start) * 1e6)
        return statistics.median(samples)
    repeats = int(sys.argv[1])
    times = {"floor": [], "products": [], "modules": []}
    for _ in range(repeats):  # alternate, as in the main process
        for name, fn in (("floor", floor), ("products", products), ("modules", modules)):
            times[name].append(median(fn, 1))
    print(json.dumps({name: statistics.median(values) for name, values in times.items()}))
''')


def nytorch_11(repeats: int) -> list[Row]:
    """The APSO update with nytorch 1.1 NytoModules (a separate library also named ``nytorch``)."""
    medians = harness.run_nytorch_11(_NYTORCH_11, str(repeats))
    if medians is None:
        return []
    return [
        {"workload": "APSO update", "size": "P=64 n=1315", "implementation": f"nytorch 1.1 {name} (subprocess)",
         "median_us": round(medians[name], 2), "ratio_to_floor": round(medians[name] / medians["floor"], 3)}
        for name in ("products", "modules")
    ]


def run(quick: bool) -> list[Row]:
    """Every swarm row: ``workload, size, implementation, median_us, ratio_to_floor``."""
    repeats = 7 if quick else 25
    return forward_rows(repeats) + apso_rows(repeats) + nytorch_11(5 if quick else 11)


def verdicts(table: list[Row]) -> list[str]:
    """The swarm issue's targets (``benchmarks/targets.py``), checked against one run's ratios."""
    rows = [dict(row, suite=row.get("suite", "bench_swarm")) for row in table]
    return [verdict.line() for verdict in targets.verdicts(rows) if verdict.target.suite == "bench_swarm"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    table = run(args.quick)
    print("machine:", ", ".join(f"{key} {value}" for key, value in harness.machine().items()))
    harness.print_table(table)
    for line in verdicts(table):
        print(line)


if __name__ == "__main__":
    main()
