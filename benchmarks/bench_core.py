"""Particle arithmetic vs the memory floor (one ``flat + flat``), per-tensor loops, foreach and nytorch 1.1.

Run: ``python -m benchmarks.bench_core [--quick]``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import textwrap
from collections.abc import Callable
from typing import Any

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
    torch.manual_seed(0)
    return factory(), factory()


def bench_size(size: str, factory: Callable[[], nn.Module], repeats: int) -> list[Row]:
    a, b = _pair(factory)
    fa, fb = _flat(a), _flat(b)
    pa, pb = nytorch.particle(a), nytorch.particle(b)  # packs a and b (one buffer each), as NytoModule ops do
    ta, tb = nf.params(a), nf.params(b)  # views into those buffers
    la, lb = list(ta.values()), list(tb.values())
    out: list[Row] = []

    reused = torch.empty_like(fa)
    impls: dict[str, Callable[[], Any]] = {
        "floor: flat + flat": lambda: fa + fb,
        # the same pass into a buffer that is already there: the kernel without the allocation, whose
        # cost swings with glibc's heap (fresh pages above its mmap threshold fault in every time)
        "kernel only: torch.add(out=reused)": lambda: torch.add(fa, fb, out=reused),
        "functional nf.add": lambda: nf.add(ta, tb),
        "Particle p + q": lambda: pa + pb,
        "NytoModule a + b": lambda: a + b,
        # a result builds its module tree on first touch: the same, with the tree built
        "NytoModule a + b, then read": lambda: (a + b).training,
        "per-tensor loop": lambda: [x + y for x, y in zip(la, lb)],
        "foreach by hand": lambda: torch._foreach_add(la, lb),
    }
    if importlib.util.find_spec("tensordict") is not None:  # optional: PYTHONPATH to a tensordict install
        from tensordict import TensorDict
        da, db = TensorDict(ta, []), TensorDict(tb, [])
        impls["tensordict td + td"] = lambda: da + db
    medians = harness.compare(impls, repeats=repeats)
    out += harness.rows("a + b", size, medians, "floor: flat + flat")

    medians = harness.compare({
        "floor: flat + flat": lambda: fa + fb,
        "floor: 3 flat passes": lambda: 0.9 * (fa - fb) + fa,
        "Particle": lambda: 0.9 * (pa - pb) + pa,
        "NytoModule": lambda: 0.9 * (a - b) + a,
        "NytoModule, then read": lambda: (0.9 * (a - b) + a).training,
        "functional": lambda: nf.add(nf.mul(0.9, nf.sub(ta, tb)), ta),
    }, repeats=repeats)
    out += harness.rows("0.9 * (a - b) + a", size, medians, "floor: flat + flat")

    ema, ema_flat, ema_list = pa.clone(), fa.clone(), [x.clone() for x in la]
    medians = harness.compare({
        "floor: flat.lerp_": lambda: ema_flat.lerp_(fb, 0.001),
        "Particle ema.lerp_": lambda: ema.lerp_(pb, 0.001),
        "foreach_lerp_ by hand": lambda: torch._foreach_lerp_(ema_list, lb, 0.001),
    }, repeats=repeats)
    out += harness.rows("lerp_ (EMA, in place)", size, medians, "floor: flat.lerp_")

    medians = harness.compare({
        "floor: flat + flat": lambda: fa + fb,
        "floor: torch.randn(n)": lambda: torch.randn(fa.numel()),
        "Particle randn": lambda: pa.randn(),
        "NytoModule randn": lambda: a.randn(),
        "floor: flat.clone()": lambda: fa.clone(),
        "Particle clone": lambda: pa.clone(),
        "NytoModule clone": lambda: a.clone(),
    }, repeats=repeats)
    out += harness.rows("randn / clone", size, medians, "floor: flat + flat")
    return out + bench_structure(size, a, b, pa, pb, ta, tb, repeats)


def bench_structure(size: str, a: nn.Module, b: nn.Module, pa: nytorch.Particle, pb: nytorch.Particle,
                    ta: dict[str, torch.Tensor], tb: dict[str, torch.Tensor], repeats: int) -> list[Row]:
    """Whether two models line up for arithmetic: the check every binary operation starts with.

    The floor compares two lists of ``(name, shape, dtype, device)`` gathered beforehand (the
    comparison alone); the per-tensor loop gathers them from ``named_parameters()`` each time, as
    hand-written code does.  nytorch 1.1 has no such check (operands must share a "species", an
    identity test) and tensordict none either, so neither has a row.
    """
    def signature(model: nn.Module) -> list[tuple[Any, ...]]:
        return [(name, p.shape, p.dtype, p.device) for name, p in model.named_parameters()]

    signature_a, signature_b = signature(a), signature(b)
    medians = harness.compare({
        "floor: compare two prebuilt signatures": lambda: signature_a == signature_b,
        "per-tensor loop over named_parameters()": lambda: signature(a) == signature(b),
        "NytoModule same_structure(a, b)": lambda: nytorch.same_structure(a, b),
        "Particle same_structure(p, q)": lambda: nytorch.same_structure(pa, pb),
        "functional same_structure(params, params)": lambda: nytorch.same_structure(ta, tb),
    }, repeats=repeats)
    return harness.rows("structural check of two models", size, medians, "floor: compare two prebuilt signatures")


def bench_momentum(repeats: int, epochs: int = 100) -> list[Row]:
    """The seed's momentum example end to end: NytoModule arithmetic vs the same algorithm on plain tensors."""
    import torch.nn.functional as F

    from .models import IrisMLP

    torch.manual_seed(0)
    x, y = torch.randn(120, 4), torch.randint(0, 3, (120,))
    criterion = nn.CrossEntropyLoss()
    beta, lr = 0.9, 0.005

    def train_module(net: nn.Module) -> nn.Module:
        new_net = net.clone()  # type: ignore[operator]
        optimizer = torch.optim.SGD(new_net.parameters(), lr=lr)
        optimizer.zero_grad()
        criterion(new_net(x), y).backward()
        optimizer.step()
        return new_net

    def ours() -> None:
        net0 = IrisMLP()
        net1 = train_module(net0)
        for _ in range(epochs):
            momentum = beta * (net1 - net0)
            net1, net0 = train_module(net1) + momentum, net1

    def forward(w: list[torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        return F.linear(F.relu(F.linear(inputs, w[0], w[1])), w[2], w[3])

    def train_tensors(w: list[torch.Tensor]) -> list[torch.Tensor]:
        new_w = [t.detach().clone().requires_grad_() for t in w]
        optimizer = torch.optim.SGD(new_w, lr=lr)
        optimizer.zero_grad()
        criterion(forward(new_w, x), y).backward()
        optimizer.step()
        return [t.detach() for t in new_w]

    def plain() -> None:
        w0 = [p.detach() for p in IrisMLP().parameters()]
        w1 = train_tensors(w0)
        for _ in range(epochs):
            momentum = [beta * (a - b) for a, b in zip(w1, w0)]
            w1, w0 = [s + m for s, m in zip(train_tensors(w1), momentum)], w1

    medians = harness.compare({"plain tensors (floor)": plain, "NytoModule (seed example)": ours},
                              repeats=max(3, repeats // 3), warmup=1, target_s=0.0)
    return harness.rows(f"momentum example, {epochs} epochs", "iris MLP", medians, "plain tensors (floor)")


_NYTORCH_11 = textwrap.dedent('''
    import json, sys, time, statistics, torch
    from torch import nn
    from nytorch import NytoModule
    class Stack(NytoModule):
        def __init__(self, layers, width):
            super().__init__()
            self.layers = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))
    class Iris(NytoModule):
        def __init__(self):
            super().__init__()
            self.layer1 = nn.Linear(4, 12); self.layer2 = nn.Linear(12, 3)
    sizes = {"iris MLP": Iris, "many-small": lambda: Stack(100, 64), "deep-narrow": lambda: Stack(100, 170)}
    def median(fn, repeats):
        for _ in range(3): fn()
        number = 1
        while True:
            start = time.perf_counter()
            for _ in range(number): fn()
            if time.perf_counter() - start > 0.002 or number > 4096: break
            number *= 4
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(number): fn()
            samples.append((time.perf_counter() - start) / number * 1e6)
        return statistics.median(samples)
    rows = []
    for size in json.loads(sys.argv[1]):
        a = sizes[size](); b = a.clone_from(sizes[size]())
        fa = torch.cat([p.detach().reshape(-1) for p in a.parameters()]); fb = fa.clone()
        floor = median(lambda: fa + fb, int(sys.argv[2]))
        rows.append(dict(size=size, workload="a + b", median_us=median(lambda: a + b, int(sys.argv[2])), floor=floor))
        rows.append(dict(size=size, workload="0.9 * (a - b) + a",
                         median_us=median(lambda: 0.9 * (a - b) + a, int(sys.argv[2])), floor=floor))
    print(json.dumps(rows))
''')


def nytorch_11(size_names: list[str], repeats: int) -> list[Row]:
    """nytorch 1.1 in a subprocess (it is also called ``nytorch``); ratios use its own in-process floor."""
    found = harness.run_nytorch_11(_NYTORCH_11, json.dumps(size_names), str(repeats))
    if found is None:
        return []
    return [
        {"workload": row["workload"], "size": row["size"], "implementation": "nytorch 1.1 NytoModule",
         "median_us": round(row["median_us"], 2), "ratio_to_floor": round(row["median_us"] / row["floor"], 3)}
        for row in found
    ]


def run(quick: bool) -> list[Row]:
    """All core rows (``quick`` shrinks sizes and repeats for CI)."""
    repeats = 7 if quick else 21
    table: list[Row] = []
    zoo = sizes(quick)
    for size, factory in zoo.items():
        table += bench_size(size, factory, repeats)
    table += bench_momentum(repeats)
    table += nytorch_11([name for name in ("iris MLP", "many-small", "deep-narrow") if name in zoo], repeats)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    harness.print_table(run(args.quick))


if __name__ == "__main__":
    main()
