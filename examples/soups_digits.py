"""Model soups and merging on scikit-learn's digits, measured.

One small MLP is pre-trained on a slice of the training set, then fine-tuned five
times, each copy on a different subset dominated by two digit classes.  The five
fine-tuned models are merged in memory with ``nytorch.merge``: uniform soup,
greedy soup (ingredients kept only if validation accuracy improves), task
arithmetic and TIES (their scale chosen on the validation set).  The table
compares validation and test accuracy.

Run: ``python examples/soups_digits.py [--seed 0]`` (a few seconds on a laptop CPU).
"""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from nytorch import merge

Tensor = torch.Tensor
SCALES = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2)


def make_net() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def split(seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """Digits scaled to [0, 1], split 60/20/20 into train, validation and test (stratified)."""
    digits = load_digits()
    x, y = digits.data / 16.0, digits.target
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.4, random_state=seed, stratify=y)
    x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, test_size=0.5, random_state=seed, stratify=y_rest)
    as_pair = lambda a, b: (torch.tensor(a, dtype=torch.float32), torch.tensor(b))  # noqa: E731
    return {"train": as_pair(x_train, y_train), "val": as_pair(x_val, y_val), "test": as_pair(x_test, y_test)}


def fit(model: nn.Module, x: Tensor, y: Tensor, *, steps: int, lr: float, seed: int) -> nn.Module:
    """Mini-batch Adam on cross-entropy, in place."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        batch = torch.randint(len(x), (64,), generator=gen)
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[Tensor, Tensor]) -> float:
    x, y = data
    return float((model(x).argmax(1) == y).float().mean())


def subsets(y: Tensor, count: int, seed: int) -> list[Tensor]:
    """Index sets: mostly two classes each (90%), plus a few examples of the others."""
    gen = np.random.default_rng(seed)
    labels = y.numpy()
    result = []
    for k in range(count):
        favoured = np.flatnonzero(np.isin(labels, [2 * k, 2 * k + 1]))
        others = gen.choice(np.flatnonzero(~np.isin(labels, [2 * k, 2 * k + 1])), size=len(favoured) // 9,
                            replace=False)
        result.append(torch.tensor(np.concatenate([favoured, others])))
    return result


def best_scale(build: Callable[[float], nn.Module], val: tuple[Tensor, Tensor]) -> tuple[nn.Module, float]:
    """The merge whose scale scores best on validation data."""
    scored = [(accuracy(model, val), scale, model) for scale in SCALES for model in [build(scale)]]
    score, scale, model = max(scored, key=lambda item: (item[0], -item[1]))
    return model, scale


def main(seed: int = 0, verbose: bool = True) -> list[dict[str, object]]:
    """Run the experiment; return the table rows ``{"method", "val", "test"}`` (accuracies in [0, 1])."""
    began = time.perf_counter()
    torch.manual_seed(seed)
    data = split(seed)
    x_train, y_train = data["train"]
    base = make_net()
    warm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))[:150]
    fit(base, x_train[warm], y_train[warm], steps=150, lr=3e-3, seed=seed)

    finetuned = []
    for k, index in enumerate(subsets(y_train, 5, seed)):
        model = make_net()
        model.load_state_dict(base.state_dict())  # every copy starts from the pre-trained net
        finetuned.append(fit(model, x_train[index], y_train[index], steps=200, lr=1e-3, seed=seed + 1 + k))

    rows: list[dict[str, object]] = [{"method": "pre-trained base", "model": base}]
    rows += [{"method": f"fine-tuned on digits {2 * k},{2 * k + 1}", "model": m} for k, m in enumerate(finetuned)]
    rows.append({"method": "uniform soup", "model": merge.average(finetuned)})
    greedy = merge.greedy_soup(finetuned, lambda model: accuracy(model, data["val"]))
    rows.append({"method": f"greedy soup ({len(greedy.ingredients)} of 5)", "model": greedy.model})
    arithmetic, scale = best_scale(lambda s: merge.task_arithmetic(base, finetuned, scale=s), data["val"])
    rows.append({"method": f"task arithmetic (scale {scale})", "model": arithmetic})
    ties, scale = best_scale(lambda s: merge.ties(base, finetuned, density=0.2, scale=s), data["val"])
    rows.append({"method": f"TIES (density 0.2, scale {scale})", "model": ties})

    table = [{"method": row["method"], "val": accuracy(row["model"], data["val"]),  # type: ignore[arg-type]
              "test": accuracy(row["model"], data["test"])} for row in rows]  # type: ignore[arg-type]
    if verbose:
        width = max(len(str(row["method"])) for row in table)
        print(f"{'method':<{width}}  val acc  test acc")
        for row in table:
            print(f"{row['method']:<{width}}  {row['val']:7.3f}  {row['test']:8.3f}")
        print(f"({time.perf_counter() - began:.1f} s)")
    return table


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="data split, subsets and training (default: %(default)s)")
    main(seed=parser.parse_args().seed)
