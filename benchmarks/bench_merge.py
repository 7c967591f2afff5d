"""EMA updates and uniform soups vs their baselines and the memory floor, side by side in one run.

Workloads (issue 7):

1. One EMA update ``target ← decay·target + (1 − decay)·online`` on a many-small model
   (200 tensors of 64x64) and a wide one (20 tensors, ~50M values; ~3.2M with ``--quick``):

   * ``nytorch EMA.update()``: the ``EMA`` helper as made by default: it packs the model's
     parameters into one buffer (Parameter objects kept), so an update is one ``lerp_``;
   * ``nytorch EMA.update(pack=False)``: the same helper on a model left as it was (one fused
     ``_foreach_lerp_`` over its tensors);
   * ``nytorch ema_(Particle, Particle)``: the functional form, re-validated every call;
   * ``timm-style _foreach_lerp_``: timm ``ModelEmaV3`` without buffers, i.e.
     ``torch._foreach_lerp_(tuple(ema.parameters()), tuple(model.parameters()), 1 - decay)``;
   * ``AveragedModel + get_ema_multi_avg_fn``: ``torch.optim.swa_utils`` (``update_parameters``);
   * the floor: one ``lerp_`` over a flat buffer of the same element count, and the floor for
     tensors stored one by one: ``torch._foreach_lerp_`` on prebuilt lists, without any checks.

   Target: the EMA at least as fast as the fastest alternative and <= 1.5x the floor.
2. A uniform soup of 8 models: ``nytorch.merge.average`` of models (returns a fresh model),
   of Particles and of ``dict[str, Tensor]`` (what the loop returns) vs a per-tensor loop
   (``torch.stack(...).mean(0)`` per parameter) and the floor (one ``mean(0)`` over a
   pre-stacked ``[8, n]`` buffer).
3. A weighted soup of a Swarm of P small MLPs with BatchNorm (``merge.average(swarm, weights=w)``,
   BatchNorm statistics averaged too) vs ``(w / w.sum()) @ swarm`` (the parameters only), the
   average of its members as a list of Particles with their own buffers (the loop
   ``merge.average(swarm)`` ran before it read the flat buffers) and the floor (one
   matrix-vector product per flat buffer).

Implementations alternate inside one timing loop (``benchmarks._harness.compare``); the
table gives medians and ratios to the floor of the same run.

Run: ``python -m benchmarks.bench_merge [--quick] [--threads N]`` from the repository root
(one torch thread by default, see ``run``).
"""
from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import nytorch
import nytorch.functional as nf
from nytorch import merge

from . import _harness as harness

Row = dict[str, Any]
DECAY = 0.999
FLOOR_EMA = "floor: flat lerp_"
FLOOR_SOUP = "floor: [8, n].mean(0)"
FLOOR_PER_TENSOR = "floor per-tensor: foreach by hand"
FLOOR_SWARM_SOUP = "floor: w @ [P, n] per flat buffer"
EMA_ROWS = ("nytorch EMA.update()", "nytorch EMA.update(pack=False)")


def stack(layers: int, width: int) -> nn.Module:
    """``layers`` bias-free ``Linear(width, width)``: ``layers`` tensors of ``width x width``."""
    return nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(layers)))


def models(quick: bool) -> dict[str, tuple[str, Callable[[], nn.Module]]]:
    """workload size -> (description, factory)."""
    wide = 400 if quick else 1581
    return {
        "many-small": ("200 x 64x64", lambda: stack(200, 64)),
        "wide": (f"20 x {wide}x{wide}", lambda: stack(20, wide)),
    }


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@torch.no_grad()
def ema_rows(size: str, factory: Callable[[], nn.Module], repeats: int) -> list[Row]:
    torch.manual_seed(0)
    packed = factory()
    online = copy.deepcopy(packed)  # as users hold it: one tensor per parameter (the alternatives use it)
    ema = merge.EMA(packed, decay=DECAY)  # packs ``packed``
    ema_unpacked = merge.EMA(online, decay=DECAY, pack=False)
    target_p = nytorch.particle(copy.deepcopy(online), pack=False)
    online_p = nytorch.particle(online, pack=False)
    timm_copy = copy.deepcopy(online).requires_grad_(False)
    averaged = AveragedModel(online, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    averaged.update_parameters(online)  # its first update copies; later ones average
    floor_target, floor_online = _flat(online), _flat(online)

    target_list = [p.detach().clone() for p in online.parameters()]
    online_list: list[torch.Tensor] = list(online.parameters())

    def timm_style() -> None:
        torch._foreach_lerp_(tuple(timm_copy.parameters()), tuple(online.parameters()), 1.0 - DECAY)

    impls: dict[str, Callable[[], Any]] = {
        FLOOR_EMA: lambda: floor_target.lerp_(floor_online, 1.0 - DECAY),
        FLOOR_PER_TENSOR: lambda: torch._foreach_lerp_(target_list, online_list, 1.0 - DECAY),
        EMA_ROWS[0]: ema.update,
        EMA_ROWS[1]: ema_unpacked.update,
        "nytorch ema_(Particle, Particle)": lambda: merge.ema_(target_p, online_p, decay=DECAY),
        "timm-style _foreach_lerp_": timm_style,
        "AveragedModel + get_ema_multi_avg_fn": lambda: averaged.update_parameters(online),
    }
    medians = harness.compare(impls, repeats=repeats)
    return harness.rows("EMA update", size, medians, FLOOR_EMA)


@torch.no_grad()
def soup_rows(size: str, factory: Callable[[], nn.Module], repeats: int) -> list[Row]:
    torch.manual_seed(0)
    ingredients = [factory() for _ in range(8)]
    particles = [nytorch.particle(model) for model in ingredients]
    dicts = [nf.params(model) for model in ingredients]
    names = list(dicts[0])
    stacked = torch.stack([_flat(model) for model in ingredients])

    impls: dict[str, Callable[[], Any]] = {
        FLOOR_SOUP: lambda: stacked.mean(0),
        "nytorch average(models)": lambda: merge.average(ingredients),
        "nytorch average(Particles)": lambda: merge.average(particles),
        "nytorch average(dicts)": lambda: merge.average(dicts),
        "per-tensor loop": lambda: {name: torch.stack([d[name] for d in dicts]).mean(0) for name in names},
    }
    medians = harness.compare(impls, repeats=repeats)
    return harness.rows("uniform soup of 8", size, medians, FLOOR_SOUP)


def bn_mlp() -> nn.Module:
    """The swarm soup's member: a small MLP with BatchNorm (484 parameters, 64 floating buffer values)."""
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))


@torch.no_grad()
def swarm_soup_rows(size: int, repeats: int, factory: Callable[[], nn.Module] = bn_mlp) -> list[Row]:
    """A weighted soup of a Swarm of ``size`` members of ``factory()``."""
    torch.manual_seed(0)
    swarm = nytorch.Swarm.normal(factory(), size, std=0.1)
    weights = torch.rand(size)
    models = [member.module() for member in swarm]  # each with its own BatchNorm statistics
    normalised = weights / weights.sum()
    flats = [flat for flat in swarm._flats if flat.is_floating_point()]
    impls: dict[str, Callable[[], Any]] = {
        FLOOR_SWARM_SOUP: lambda: [normalised @ flat for flat in flats],
        "nytorch average(swarm, weights=w)": lambda: merge.average(swarm, weights=weights),
        "(w / w.sum()) @ swarm (parameters only)": lambda: (weights / weights.sum()) @ swarm,
        "average(list of the P member models)": lambda: merge.average(models, weights=weights),
    }
    medians = harness.compare(impls, repeats=repeats)
    return harness.rows("weighted soup of a swarm", f"P={size} (MLP + BatchNorm)", medians, FLOOR_SWARM_SOUP)


def summary(table: list[Row]) -> list[str]:
    """One line per EMA workload: the EMA's ratio to the fastest alternative and to the floor."""
    lines = []
    for size in dict.fromkeys(row["size"] for row in table if row["workload"] == "EMA update"):
        rows = {row["implementation"]: row for row in table if row["workload"] == "EMA update" and row["size"] == size}
        alternatives = [name for name in rows if not name.startswith(("floor", "nytorch"))]
        fastest = min(alternatives, key=lambda name: rows[name]["median_us"])
        per_tensor = rows.get(FLOOR_PER_TENSOR)
        for name in EMA_ROWS:
            mine = rows[name]
            line = (f"{size}: {name} = {mine['median_us'] / rows[fastest]['median_us']:.2f}x the fastest "
                    f"alternative ({fastest}), {mine['ratio_to_floor']:.2f}x the floor")
            if per_tensor is not None:
                line += f", {mine['median_us'] / per_tensor['median_us']:.2f}x the per-tensor foreach floor"
            lines.append(line)
    return lines


def run(quick: bool, threads: Optional[int] = None) -> list[Row]:
    """All rows: ``workload``, ``size``, ``implementation``, ``median_us``, ``ratio_to_floor``.

    Measured with ``threads`` torch threads (restored afterwards); ``None`` (the default, as
    ``python -m benchmarks`` calls it) keeps the setting in force, which its ``--threads`` made.
    On small shared machines OpenMP's spinning worker threads make multi-threaded medians
    swing by 10x: this module's own command measures with one thread unless told otherwise.
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        repeats = 7 if quick else 21
        table: list[Row] = []
        zoo = models(quick)
        for name, (shape, factory) in zoo.items():
            table += ema_rows(f"{name} ({shape})", factory, repeats)
        mid = 256 if quick else 700
        soups = {"many-small": zoo["many-small"], "mid": (f"20 x {mid}x{mid}", lambda: stack(20, mid))}
        for name, (shape, factory) in soups.items():
            table += soup_rows(f"{name} ({shape})", factory, repeats)
        for size in (64,) if quick else (64, 512):
            table += swarm_soup_rows(size, repeats)
        for row in table:
            row["threads"] = torch.get_num_threads()
        return table
    finally:
        torch.set_num_threads(previous)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller wide model and fewer repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while measuring (0: torch's default)")
    args = parser.parse_args()
    if args.threads < 0:
        parser.error(f"argument --threads: expected a whole number of at least 0, got {args.threads}")
    harness.use_allocator("warm")  # as ``python -m benchmarks`` does by default
    machine = harness.machine()
    machine["threads"] = args.threads or machine["threads"]
    print("machine: " + harness.describe(machine))
    table = run(args.quick, args.threads or None)
    harness.print_table(table)
    print()
    for line in summary(table):
        print(line)


if __name__ == "__main__":
    main()
