"""Swarms vs their floors: the vectorised forward and one accelerated-PSO update, side by side in one run.

Workloads (issue 3):

1. Forward of P=64 MLPs 4-32-32-3 on a batch of 64: ``swarm(x)`` vs the compute floor
   written by hand (``torch.baddbmm`` over stacked weights), a Python loop of 64 modules,
   plain ``vmap(functional_call)`` and tensordict's ``from_modules`` + ``vmap(to_module)`` (when
   installed).  Targets: within 1.5x of the floor, >= 3x faster
   than the loop.  Also at a second size (not in ``--quick``): P=8 models of the suite's
   many-small size (100 ``Linear(64, 64)``, 200 tensors).
2. One accelerated-PSO update ``(1-b)·S + b·S[best] + a·noise`` over P=64 members:
   ``nytorch.algorithms.apso`` vs the same three operations by hand on one flat ``[P, n]``
   tensor (the floor), a per-tensor loop and foreach by hand over the stacked parameters,
   a batched TensorDict (when installed), and nytorch 1.1 NytoModules (in a subprocess with
   ``PYTHONPATH=/tmp/nyto11``).  Targets: within 1.3x of the floor, >= 50x faster than 1.1.
   Also at P=8 of the many-small size.

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
from .models import Stack

Row = dict[str, Any]

#: Implementation families a swarm workload has no row for, and why (printed under the table).
NOT_MEASURED = {
    ("swarm forward", "sizes"): "measured at P = 64 4-32-32-3 MLPs (the issue's swarm) and P = 8 many-small "
                                "models only: P copies of deep-narrow, wide or ResNet-18 models are a "
                                "memory benchmark, which bench_memory covers for one model",
    ("APSO update", "sizes"): "measured at P = 64 4-32-32-3 MLPs and P = 8 many-small models only, "
                              "as the swarm forward",
    ("swarm forward", "foreach"): "a forward pass is matrix products, and torch has no foreach matmul",
    ("swarm forward", "nytorch 1.1"): "1.1 has no vectorised forward: its members run one by one, "
                                      "as the Python loop of modules does",
    ("swarm forward", "per-tensor"): "a forward has no per-tensor form: the loop over members is the "
                                     "\"Python loop of P modules\" row",
    **{("swarm forward", family): "ours is the Swarm (its rows start \"Swarm\"): functional, Particle and "
                                  "NytoModule hold one model each, and a forward of P of them is the "
                                  "\"Python loop of P modules\" row"
       for family in ("functional", "Particle", "NytoModule")},
    **{("APSO update", family): "ours is the Swarm (nytorch algorithms.apso, and its operators spelled out): "
                                "functional, Particle and NytoModule hold one model each, and P of them "
                                "updated one by one is how nytorch 1.1's rows do it"
       for family in ("functional", "Particle", "NytoModule")},
}
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


def _chain_floor(params: dict[str, torch.Tensor], layers: list[str], relu: bool,
                 x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The forward of P stacked Linear chains written by hand: one ``baddbmm`` per layer."""
    weights = [params[f"{name}.weight"].mT for name in layers]
    biases = [params[f"{name}.bias"].unsqueeze(1) for name in layers]
    members = weights[0].shape[0]

    def floor() -> torch.Tensor:
        h = x.expand(members, *x.shape)
        for i, (weight, bias) in enumerate(zip(weights, biases)):
            h = torch.baddbmm(bias, h, weight)
            if relu and i < len(weights) - 1:
                h = h.relu_()
        return h
    return floor


def forward_rows(repeats: int, many_small: bool = False) -> list[Row]:
    """Forward of a swarm: P=64 MLPs 4-32-32-3, or (``many_small``) P=8 models of 100 Linear(64, 64)."""
    torch.manual_seed(0)
    device = harness.DEVICE
    if many_small:
        members, size = 8, "P=8 many-small (200 x 64x64)"
        modules: list[nn.Module] = [Stack(100, 64).to(device) for _ in range(members)]
        x = torch.randn(BATCH, 64, device=device)
        layers, relu = [f"layers.{i}" for i in range(100)], False
    else:
        members, size = P, "P=64 4-32-32-3"
        modules = [mlp().to(device) for _ in range(members)]
        x = torch.randn(BATCH, 4, device=device)
        layers, relu = ["0", "2", "4"], True
    swarm = Swarm.stack(modules)
    params, buffers = torch.func.stack_module_state(modules)  # type: ignore[arg-type]
    floor = _chain_floor(params, layers, relu, x)
    base = modules[0]

    def loop() -> torch.Tensor:
        return torch.stack([module(x) for module in modules])

    plain = torch.func.vmap(lambda p, b, x: torch.func.functional_call(base, (p, b), (x,)), in_dims=(0, 0, None))
    reference = floor()
    for out in (swarm(x), swarm(x, chunk_size=members), loop(), plain(params, buffers, x)):
        torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
    impls: dict[str, Callable[[], Any]] = {
        FLOOR_FORWARD: floor,
        "Swarm: swarm(x)": lambda: swarm(x),
        "Swarm: general vmap path": lambda: swarm(x, chunk_size=members),
        f"Python loop of {members} modules": loop,
        "vmap(functional_call)": lambda: plain(params, buffers, x),
    }
    if not many_small:  # the model there is a custom class already (``Stack``)
        generic = Swarm.stack([ClassMLP().to(device) for _ in range(members)])
        impls["Swarm: custom-class MLP"] = lambda: generic(x)
    TensorDict = harness.tensordict()
    if TensorDict is not None:
        stacked = TensorDict.from_modules(*modules)  # tensordict's ensembling recipe: vmap over to_module

        def call(members_params: Any, inputs: torch.Tensor) -> torch.Tensor:
            with members_params.to_module(base):
                return base(inputs)

        ensemble = torch.vmap(call, (0, None))
        torch.testing.assert_close(ensemble(stacked, x), reference, rtol=1e-4, atol=1e-5)
        impls["tensordict from_modules + vmap(to_module)"] = lambda: ensemble(stacked, x)
    with torch.no_grad():
        medians = harness.compare(impls, repeats=repeats)
    return harness.rows("swarm forward", size, medians, FLOOR_FORWARD)


def apso_rows(repeats: int, many_small: bool = False) -> list[Row]:
    """One accelerated-PSO update of P=64 MLPs 4-32-32-3, or (``many_small``) P=8 models of 100 Linear(64, 64)."""
    torch.manual_seed(0)
    members = 8 if many_small else P
    swarm = Swarm.stack([(Stack(100, 64) if many_small else mlp()).to(harness.DEVICE) for _ in range(members)])
    flat = torch.cat([leaf.reshape(members, -1) for leaf in swarm.params.values()], dim=1).contiguous()

    def floor() -> torch.Tensor:
        return (1 - BETA) * flat + BETA * flat[BEST] + ALPHA * torch.randn_like(flat)

    stacked = dict(swarm.params)  # one [P, ...] tensor per parameter
    leaves = list(stacked.values())

    def per_tensor() -> dict[str, torch.Tensor]:
        return {name: (1 - BETA) * leaf + BETA * leaf[BEST] + ALPHA * torch.randn_like(leaf)
                for name, leaf in stacked.items()}

    def foreach() -> list[torch.Tensor]:
        out = torch._foreach_add(torch._foreach_mul(leaves, 1 - BETA), [leaf[BEST] for leaf in leaves], alpha=BETA)
        torch._foreach_add_(out, [torch.randn_like(leaf) for leaf in leaves], alpha=ALPHA)  # no foreach randn
        return out

    impls: dict[str, Callable[[], Any]] = {
        FLOOR_APSO: floor,
        "nytorch algorithms.apso": lambda: alg.apso(swarm, BEST, alpha=ALPHA, beta=BETA),
        "Swarm operators spelled out": lambda: (1 - BETA) * swarm + BETA * swarm[BEST] + ALPHA * Swarm.randn(swarm),
        "per-tensor loop over stacked parameters": per_tensor,
        "foreach by hand over stacked parameters": foreach,
    }
    TensorDict = harness.tensordict()
    if TensorDict is not None:
        td = TensorDict(stacked, batch_size=[members])
        impls["tensordict (1-b)*td + b*td[best] + a*noise"] = (
            lambda: (1 - BETA) * td + BETA * td[BEST] + ALPHA * td.apply(torch.randn_like))
    with torch.no_grad():
        medians = harness.compare(impls, repeats=repeats)
    return harness.rows("APSO update", f"P={members} n={flat.shape[1]}", medians, FLOOR_APSO)


_NYTORCH_11 = textwrap.dedent('''
    import json, sys, torch
    from torch import nn
    from nytorch import NytoModule
    ALPHA, BETA, BEST = 0.1, 0.5, 7
    Stack = suite_file("models.py")["Stack"]  # subclasses 1.1's NytoModule here
    class MLP(NytoModule):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
        def forward(self, x):
            return self.layers(x)
    out = []
    for many_small in json.loads(sys.argv[2]):
        torch.manual_seed(0)
        members, make = (8, lambda: Stack(100, 64)) if many_small else (64, MLP)
        first = make().to(device)
        swarm = [first] + [first.clone_from(make().to(device)) for _ in range(members - 1)]  # one species
        flat = torch.stack([torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in swarm])
        def floor():
            return (1 - BETA) * flat + BETA * flat[BEST] + ALPHA * torch.randn_like(flat)
        def products():  # the faster 1.1 spelling: ParamProducts, one module per member at the end
            best = swarm[BEST].product()
            return [((1 - BETA) * m.product() + BETA * best + ALPHA * m.product().randn()).module() for m in swarm]
        def modules():
            best = swarm[BEST]
            return [(1 - BETA) * m + BETA * best + ALPHA * m.randn() for m in swarm]
        medians = compare({"floor": floor, "products": products, "modules": modules}, repeats=int(sys.argv[1]))
        out.append(dict(medians, size=f"P={members} n={flat.shape[1]}"))
    print(json.dumps(out))
''')


def nytorch_11(repeats: int, many_small: bool = True) -> list[Row]:
    """The APSO update with nytorch 1.1 NytoModules (a separate library also named ``nytorch``).

    Its runs time the floor alongside with the same ``_harness.compare``, and build the
    many-small members from the suite's ``models.py`` (run under 1.1, whose ``NytoModule`` they subclass).
    """
    import json

    found = harness.run_nytorch_11(_NYTORCH_11, str(repeats), json.dumps([False] + [True] * many_small))
    if found is None:
        return []
    return [
        {"workload": "APSO update", "size": medians["size"], "implementation": f"nytorch 1.1 {name} (subprocess)",
         "median_us": round(medians[name], 2), "ratio_to_floor": round(medians[name] / medians["floor"], 3)}
        for medians in found for name in ("products", "modules")
    ]


def run(quick: bool) -> list[Row]:
    """Every swarm row: ``workload, size, implementation, median_us, ratio_to_floor``."""
    repeats = 7 if quick else 25
    rows = forward_rows(repeats) + apso_rows(repeats)
    if not quick:
        rows += forward_rows(repeats, many_small=True) + apso_rows(repeats, many_small=True)
    return rows + nytorch_11(5 if quick else 11, many_small=not quick)


def verdicts(table: list[Row]) -> list[str]:
    """The swarm issue's targets (``benchmarks/targets.py``), checked against one run's ratios."""
    rows = [dict(row, suite=row.get("suite", "bench_swarm")) for row in table]
    return [verdict.line() for verdict in targets.verdicts(rows) if verdict.target.suite == "bench_swarm"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--threads", type=harness.positive_int, default=None,
                        help="torch.set_num_threads (default: leave as is)")
    args = parser.parse_args()
    harness.use_allocator("warm")  # as ``python -m benchmarks`` does by default
    if args.threads:
        torch.set_num_threads(args.threads)
    table = run(args.quick)
    print("machine:", harness.describe())
    harness.print_table(table)
    for line in verdicts(table):
        print(line)


if __name__ == "__main__":
    main()
