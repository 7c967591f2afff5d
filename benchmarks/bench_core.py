"""Particle arithmetic vs the memory floor (one ``flat + flat``), per-tensor loops, foreach and nytorch 1.1.

Run: ``python -m benchmarks.bench_core [--quick]``.
"""
from __future__ import annotations

import argparse
import json
import textwrap
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

import nytorch
import nytorch.functional as nf

from . import _harness as harness
from .models import sizes

Row = dict[str, Any]


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _pair(factory: Callable[[], nn.Module]) -> tuple[nn.Module, nn.Module]:
    """Two models of one size on the suite's device (``harness.use_device``)."""
    torch.manual_seed(0)
    return factory().to(harness.DEVICE), factory().to(harness.DEVICE)


#: Implementation families (``plot.family``) a workload has no row for, and why: printed under the
#: table and in RESULTS.md.  (The functional API has no in-place operations: its EMA row computes
#: a new tree, ``nf.lerp(ema, params, 0.001)``, and says so.)
NOT_MEASURED = {
    ("randn", "foreach"): "torch has no foreach random kernel",
    **{("momentum example, 100 epochs", family): "the seed example is NytoModule code; its floor is the same "
                                                 "algorithm on plain tensors, and nytorch 1.1 runs it too"
       for family in ("functional", "Particle", "per-tensor", "foreach", "tensordict")},
    ("structural check of two models", "foreach"): "there is nothing to compute",
    ("structural check of two models", "tensordict"): "tensordict has no such check (a mismatch raises inside td + td)",
    ("structural check of two models", "nytorch 1.1"): "1.1 has no such check: operands must share a "
                                                       "\"species\", an identity test",
}


#: The ``a + b`` row that times the floor's kernel without its allocation (``profile.py`` reads it).
KERNEL_ONLY = "kernel only: torch.add(out=reused)"


class Workload(NamedTuple):
    """One core workload at one size: its name, the name of its floor, and every implementation."""

    name: str
    floor: str
    impls: dict[str, Callable[[], Any]]


def workloads(factory: Callable[[], nn.Module]) -> list[Workload]:
    """Every core workload on two models made by ``factory``, each implementation a ready call.

    Shared by the timings (``bench_size``) and the profile (``benchmarks/profile.py``).
    """
    a, b = _pair(factory)
    fa, fb = _flat(a), _flat(b)
    pa, pb = nytorch.particle(a), nytorch.particle(b)  # packs a and b (one buffer each), as NytoModule ops do
    ta, tb = nf.params(a), nf.params(b)  # views into those buffers
    la, lb = list(ta.values()), list(tb.values())
    TensorDict = harness.tensordict()  # optional: its rows appear when it is installed
    da, db = (None, None) if TensorDict is None else (TensorDict(ta, []), TensorDict(tb, []))
    out: list[Workload] = []

    def add(workload: str, floor: str, impls: dict[str, Callable[[], Any]],
                tensordict: tuple[str, Callable[[], Any]]) -> None:
        """Add a workload (with tensordict's ``(spelling, call)`` when it is installed)."""
        if da is not None:
            impls["tensordict " + tensordict[0]] = tensordict[1]
        out.append(Workload(workload, floor, impls))

    reused = torch.empty_like(fa)
    add("a + b", "floor: flat + flat", {
        "floor: flat + flat": lambda: fa + fb,
        # the same pass into a buffer that is already there: the kernel without the allocation, whose
        # cost swings with glibc's heap (fresh pages above its mmap threshold fault in every time)
        KERNEL_ONLY: lambda: torch.add(fa, fb, out=reused),
        "functional nf.add": lambda: nf.add(ta, tb),
        "Particle p + q": lambda: pa + pb,
        "NytoModule a + b": lambda: a + b,
        # a result builds its module tree on first touch: the same, with the tree built
        "NytoModule a + b, then read": lambda: (a + b).training,
        "per-tensor loop": lambda: [x + y for x, y in zip(la, lb)],
        "foreach by hand": lambda: torch._foreach_add(la, lb),
    }, ("td + td", lambda: da + db))

    add("0.9 * (a - b) + a", "floor: flat + flat", {
        "floor: flat + flat": lambda: fa + fb,
        "floor: 3 flat passes": lambda: 0.9 * (fa - fb) + fa,
        "Particle": lambda: 0.9 * (pa - pb) + pa,
        "NytoModule": lambda: 0.9 * (a - b) + a,
        "NytoModule, then read": lambda: (0.9 * (a - b) + a).training,
        "functional": lambda: nf.add(nf.mul(0.9, nf.sub(ta, tb)), ta),
        "per-tensor loop": lambda: [0.9 * (x - y) + x for x, y in zip(la, lb)],
        "foreach by hand": lambda: torch._foreach_add(torch._foreach_mul(torch._foreach_sub(la, lb), 0.9), la),
    }, ("0.9 * (td - td) + td", lambda: 0.9 * (da - db) + da))

    # every EMA below starts from a's values and moves towards b's
    ema_flat, ema_particle, ema_module = fa.clone(), pa.clone(), a.clone()
    ema_list = [x.clone() for x in la]
    ema_tree = nf.clone(ta)
    ema_td = None if da is None else da.clone()

    def loop_lerp_() -> None:
        for average, x in zip(ema_list, lb):
            average.lerp_(x, 0.001)

    add("lerp_ (EMA, in place)", "floor: flat.lerp_", {
        "floor: flat.lerp_": lambda: ema_flat.lerp_(fb, 0.001),
        "Particle ema.lerp_": lambda: ema_particle.lerp_(pb, 0.001),
        "NytoModule ema.lerp_": lambda: ema_module.lerp_(b, 0.001),
        "functional nf.lerp (a new tree)": lambda: nf.lerp(ema_tree, tb, 0.001),
        "per-tensor loop of lerp_": loop_lerp_,
        "foreach_lerp_ by hand": lambda: torch._foreach_lerp_(ema_list, lb, 0.001),
    }, ("td.lerp_", lambda: ema_td.lerp_(db, 0.001)))  # type: ignore[union-attr]

    add("randn", "floor: torch.randn(n)", {
        "floor: torch.randn(n)": lambda: torch.randn(fa.numel(), device=fa.device),
        "functional nf.randn_like": lambda: nf.randn_like(ta),
        "Particle randn": lambda: pa.randn(),
        "NytoModule randn": lambda: a.randn(),
        "per-tensor loop": lambda: [torch.randn_like(x) for x in la],
    }, ("td.apply(torch.randn_like)", lambda: da.apply(torch.randn_like)))

    add("clone", "floor: flat.clone()", {
        "floor: flat.clone()": lambda: fa.clone(),
        "functional nf.clone": lambda: nf.clone(ta),
        "Particle clone": lambda: pa.clone(),
        "NytoModule clone": lambda: a.clone(),
        "per-tensor loop": lambda: [x.clone() for x in la],
        **_foreach_clone(la),
    }, ("td.clone()", lambda: da.clone()))
    return out + [structure_workload(a, b, pa, pb, ta, tb)]


def bench_size(size: str, factory: Callable[[], nn.Module], repeats: int) -> list[Row]:
    """Every core workload on two models of one size, each implementation timed beside its floor."""
    out: list[Row] = []
    for workload in workloads(factory):
        out += harness.rows(workload.name, size, harness.compare(workload.impls, repeats=repeats), workload.floor)
    return out


def _foreach_clone(leaves: list[torch.Tensor]) -> dict[str, Callable[[], Any]]:
    """The "foreach by hand" clone row: ``torch._foreach_clone``, or where a torch lacks it (2.11 does)
    the nearest fused kernel that makes new tensors, ``_foreach_mul`` by 1, named as such."""
    clone = getattr(torch, "_foreach_clone", None)
    if clone is not None:
        return {"foreach by hand": lambda: clone(leaves)}
    return {"foreach by hand (_foreach_mul by 1: this torch has no _foreach_clone)":
            lambda: torch._foreach_mul(leaves, 1.0)}


def structure_workload(a: nn.Module, b: nn.Module, pa: nytorch.Particle, pb: nytorch.Particle,
                       ta: dict[str, torch.Tensor], tb: dict[str, torch.Tensor]) -> Workload:
    """Whether two models line up for arithmetic: the check every binary operation starts with.

    The floor compares two lists of ``(name, shape, dtype, device)`` gathered beforehand (the
    comparison alone); the per-tensor loop gathers them from ``named_parameters()`` each time, as
    hand-written code does.  nytorch 1.1 has no such check (operands must share a "species", an
    identity test) and tensordict none either, so neither has a row.
    """
    def signature(model: nn.Module) -> list[tuple[Any, ...]]:
        return [(name, p.shape, p.dtype, p.device) for name, p in model.named_parameters()]

    signature_a, signature_b = signature(a), signature(b)
    floor = "floor: compare two prebuilt signatures"
    return Workload("structural check of two models", floor, {
        floor: lambda: signature_a == signature_b,
        "per-tensor loop over named_parameters()": lambda: signature(a) == signature(b),
        "NytoModule same_structure(a, b)": lambda: nytorch.same_structure(a, b),
        "Particle same_structure(p, q)": lambda: nytorch.same_structure(pa, pb),
        "functional same_structure(params, params)": lambda: nytorch.same_structure(ta, tb),
    })


def bench_momentum(repeats: int, epochs: int = 100) -> list[Row]:
    """The seed's momentum example end to end: NytoModule arithmetic vs the same algorithm on plain tensors."""
    from . import momentum
    from .models import IrisMLP

    torch.manual_seed(0)
    x, y = momentum.data(harness.DEVICE)

    def make() -> nn.Module:
        return IrisMLP().to(harness.DEVICE)

    medians = harness.compare({"plain tensors (floor)": momentum.with_tensors(make, x, y, epochs),
                               "NytoModule (seed example)": momentum.with_modules(make, x, y, epochs)},
                              repeats=max(3, repeats // 3), **momentum.TIMING)
    return harness.rows(f"momentum example, {epochs} epochs", "iris MLP", medians, "plain tensors (floor)")


_NYTORCH_11 = textwrap.dedent('''
    import json, sys, torch
    # nytorch here is 1.1: the suite's own models (they subclass its NytoModule), timed by ``compare``
    zoo = suite_file("models.py")["sizes"](json.loads(sys.argv[2]))
    rows = []
    for size in json.loads(sys.argv[1]):
        torch.manual_seed(0)
        a = zoo[size]().to(device); b = a.clone_from(zoo[size]().to(device))  # one "species", as 1.1 requires
        fa = torch.cat([p.detach().reshape(-1) for p in a.parameters()]); fb = fa.clone()
        ema, ema_flat = a.clone(), fa.clone()
        repeats = int(sys.argv[3])
        if fa.numel() > 10 ** 7:
            repeats = max(5, repeats // 3)  # a second per call: fewer samples
        def ema_update(): ema.product_(ema.product() * 0.999 + b.product() * 0.001)
        spelt = {"a + b": (lambda: fa + fb, lambda: a + b),
                 "0.9 * (a - b) + a": (lambda: fa + fb, lambda: 0.9 * (a - b) + a),
                 "lerp_ (EMA, in place)": (lambda: ema_flat.lerp_(fb, 0.001), ema_update),
                 "randn": (lambda: torch.randn(fa.numel(), device=device), lambda: a.randn()),
                 "clone": (lambda: fa.clone(), lambda: a.clone())}
        for workload, (floor, spelling) in spelt.items():  # each beside its floor, as in the main process
            medians = compare({"floor": floor, "nytorch 1.1": spelling}, repeats=repeats)
            rows.append(dict(size=size, workload=workload, median_us=medians["nytorch 1.1"], floor=medians["floor"]))
        if size == "iris MLP":  # the seed's momentum example, with the suite's own loops (momentum.py)
            momentum = suite_file("momentum.py")
            x, y = momentum["data"](device)
            make = lambda: zoo[size]().to(device)
            medians = compare({"floor": momentum["with_tensors"](make, x, y), "nytorch 1.1": momentum["with_modules"](make, x, y)},
                              repeats=max(3, repeats // 3), **momentum["TIMING"])
            rows.append(dict(size=size, workload="momentum example, 100 epochs", median_us=medians["nytorch 1.1"],
                             floor=medians["floor"]))
    print(json.dumps(rows))
''')

#: How each workload is spelt in nytorch 1.1 (its rows' names).
_SPELT_11 = {"lerp_ (EMA, in place)": "nytorch 1.1 ema.product_(ema.product() * 0.999 + b.product() * 0.001)"}


def nytorch_11(size_names: list[str], quick: bool, repeats: int) -> list[Row]:
    """nytorch 1.1 in a subprocess (it is also called ``nytorch``); ratios use its own in-process floor.

    It builds the same models (``models.py`` run under 1.1, whose ``NytoModule`` they then subclass)
    and times them with the same interleaving ``_harness.compare``.
    """
    found = harness.run_nytorch_11(_NYTORCH_11, json.dumps(size_names), json.dumps(quick), str(repeats))
    if found is None:
        return []
    return [
        {"workload": row["workload"], "size": row["size"],
         "implementation": _SPELT_11.get(row["workload"], "nytorch 1.1 NytoModule"),
         "median_us": round(row["median_us"], 2), "ratio_to_floor": round(row["median_us"] / row["floor"], 3)}
        for row in found
    ]


def parts(quick: bool) -> Iterator[list[Row]]:
    """The core rows a part at a time (each size, the momentum example, nytorch 1.1), so that a
    run cut short keeps the parts it finished (``python -m benchmarks --json``)."""
    repeats = 7 if quick else 21
    zoo = sizes(quick)
    for size, factory in zoo.items():
        yield bench_size(size, factory, repeats)
    if "iris MLP" in zoo:  # the momentum example trains the iris MLP: it runs with that size
        yield bench_momentum(repeats)
    yield nytorch_11(list(zoo), quick, repeats)


def run(quick: bool) -> list[Row]:
    """All core rows (``quick`` shrinks sizes and repeats for CI)."""
    return [row for part in parts(quick) for row in part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    harness.use_allocator("warm")  # as ``python -m benchmarks`` does by default
    harness.print_table(run(args.quick))


if __name__ == "__main__":
    main()
