"""What the first operations on an unseen model structure cost, against ``copy.deepcopy`` of the model.

``python -m benchmarks.first_use [--quick]``

nytorch plans each structure once (its layout, its rebuild) and compiles straight-line code for
it only after ``nytorch._builder.COMPILE_AFTER`` uses.  A model soup, a task vector or an
architecture search meets each structure a few times, so what it pays is the first uses, not the
steady state the other suites measure.  For each model it prints, measured side by side:

- ``first 3``: the first three ``a + b`` (each result read, as a user would) on a structure never
  seen before (each sample gets one more layer, so that no sample reuses another's plan);
- ``steady``: one ``a + b`` (read) once the structure is compiled;
- both as ratios to ``copy.deepcopy`` of the model (the cost of one new module tree in torch).
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import nytorch
from nytorch import _builder


class Stack(nytorch.NytoModule):
    """``layers`` bias-free Linear(16, 16) layers (the structure changes with ``layers``)."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(16, 16, bias=False) for _ in range(layers)))


class Encoder(nytorch.NytoModule):
    """A TransformerEncoder of ``layers`` layers (about 10 modules per layer)."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32), layers,
                                             enable_nested_tensor=False)


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _read(model: nn.Module) -> None:
    next(iter(model.children()))  # a result builds its module tree when first read


def measure(make: Callable[[int], nn.Module], size: int, samples: int) -> dict[str, float]:
    """Median seconds of the first three uses, a steady use and a deepcopy, over ``samples`` new structures."""
    first, steady, deepcopy = [], [], []
    gc.disable()  # CPython's collections of the growing module graph would land in random samples
    try:
        for sample in range(samples):
            a, b = make(size + sample), make(size + sample)
            deepcopy.append(min(_seconds(lambda: copy.deepcopy(a)) for _ in range(3)))
            first.append(sum(_seconds(lambda: _read(a + b)) for _ in range(3)))
            for _ in range(_builder.COMPILE_AFTER):
                _read(a + b)
            steady.append(min(_seconds(lambda: _read(a + b)) for _ in range(5)))
            gc.collect()
    finally:
        gc.enable()
    return {"first 3": statistics.median(first), "steady": statistics.median(steady),
            "deepcopy": statistics.median(deepcopy)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models and 3 samples (CI)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    models: list[tuple[str, Callable[[int], nn.Module], int]] = [
        ("Stack, 200 layers", Stack, 200), ("TransformerEncoder, 48 layers", Encoder, 48)]
    if not args.quick:
        models.append(("Stack, 2000 layers", Stack, 2000))
    samples = 3 if args.quick else 5
    print(f"{'model':32s} {'first 3':>10s} {'steady':>10s} {'deepcopy':>10s} {'first 3 / deepcopy':>19s} "
          f"{'steady / deepcopy':>18s}")
    for name, make, size in models:
        times = measure(make, size, samples)
        print(f"{name:32s} {times['first 3'] * 1e3:8.1f}ms {times['steady'] * 1e3:8.2f}ms "
              f"{times['deepcopy'] * 1e3:8.1f}ms {times['first 3'] / times['deepcopy']:19.2f} "
              f"{times['steady'] / times['deepcopy']:18.2f}")


if __name__ == "__main__":
    main()
