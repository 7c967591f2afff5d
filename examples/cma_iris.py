"""Train the iris MLP with CMA-ES (the ``cma`` package) through ``nytorch.merge.ravel`` / ``unravel``.

No gradients: CMA-ES only sees a numpy vector of the 99 parameters and the loss of
each candidate.  ``ravel(model)`` gives the starting vector and ``unravel(x)`` turns
any candidate back into a model of the same class.

Run: ``python examples/cma_iris.py [--iterations 100] [--seed 0]`` (needs the optional ``cma`` package:
``pip install cma``).
"""
from __future__ import annotations

import importlib
import sys
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_iris
from sklearn.model_selection import train_test_split
from torch import nn

from nytorch import NytoModule
from nytorch.merge import ravel


class MyModel(NytoModule):
    """The iris MLP of the nytorch introduction (4 -> 12 -> 3)."""

    def __init__(self, in_feat: int = 4, h_size: int = 12, out_feat: int = 3) -> None:
        super().__init__()
        self.layer1 = nn.Linear(in_feat, h_size)
        self.layer2 = nn.Linear(h_size, out_feat)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.layer2(F.relu(self.layer1(inputs)))


def load(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardised iris features and labels, split 80/20."""
    iris = load_iris()
    x_train, x_test, y_train, y_test = train_test_split(iris.data, iris.target, test_size=0.2, random_state=seed,
                                                        stratify=iris.target)
    mean, std = x_train.mean(0), x_train.std(0)
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return as_x(x_train), as_x(x_test), torch.tensor(y_train), torch.tensor(y_test)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def main(iterations: int = 100, seed: int = 0, verbose: bool = True) -> Optional[float]:
    """Run CMA-ES on the MLP's flat parameter vector; return the test accuracy (``None`` without ``cma``)."""
    try:
        cma = importlib.import_module("cma")
    except ImportError:
        print("examples/cma_iris.py needs the optional `cma` package: pip install cma")
        return None
    torch.manual_seed(seed)
    x_train, x_test, y_train, y_test = load(seed)
    model = MyModel()
    start, unravel = ravel(model)  # one float32 vector of every parameter, and its inverse

    @torch.no_grad()
    def loss(candidate: np.ndarray) -> float:
        return float(F.cross_entropy(unravel(candidate)(x_train), y_train))

    began = time.perf_counter()
    options = {"seed": seed + 1, "verbose": -9, "maxiter": iterations}
    es = cma.CMAEvolutionStrategy(start.numpy().astype(np.float64), 0.5, options)
    while not es.stop():
        candidates = es.ask()
        es.tell(candidates, [loss(candidate) for candidate in candidates])
        if verbose and es.countiter % 20 == 0:
            print(f"iteration {es.countiter:4d}  best loss {es.result.fbest:.4f}")
    best = unravel(es.result.xbest)
    result = accuracy(best, x_test, y_test)
    if verbose:
        print(f"{len(start)} parameters, {es.countevals} evaluations in {time.perf_counter() - began:.1f} s; "
              f"train accuracy {accuracy(best, x_train, y_train):.3f}, test accuracy {result:.3f}")
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=100, help="CMA-ES generations at most (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="data split and initial model (default: %(default)s)")
    args = parser.parse_args()
    if args.iterations < 1:
        parser.error(f"--iterations: expected a positive number of iterations, got {args.iterations}")
    main(iterations=args.iterations, seed=args.seed)
    sys.exit(0)
