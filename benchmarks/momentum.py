"""The seed's 100-epoch momentum example: on NytoModules, and the same algorithm on plain tensors (its floor).

Imports torch only, so that nytorch 1.1's subprocess runs the very same loops with its own
``NytoModule`` (``bench_core._NYTORCH_11`` loads this file with ``runpy``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BETA, LR = 0.9, 0.005

#: How ``_harness.compare`` times it: one warm-up, one whole run per sample, and the garbage
#: collector on inside samples (an end-to-end program pays for its collections).
TIMING = {"warmup": 1, "target_s": 0.0, "end_to_end": True}


def data(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """120 iris-shaped samples (4 features, 3 classes), the same for every run."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(120, 4, generator=generator), torch.randint(0, 3, (120,), generator=generator)
    return x.to(device), y.to(device)


def with_modules(make: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor,
                 epochs: int = 100) -> Callable[[], Any]:
    """The seed example: ``net1 = train(net1) + 0.9 * (net1 - net0)`` on models of any library's NytoModule."""
    criterion = nn.CrossEntropyLoss()

    def train_module(net: nn.Module) -> nn.Module:
        new_net = net.clone()  # type: ignore[operator]
        optimizer = torch.optim.SGD(new_net.parameters(), lr=LR)
        optimizer.zero_grad()
        criterion(new_net(x), y).backward()
        optimizer.step()
        return new_net

    def run() -> None:
        net0 = make()
        net1 = train_module(net0)
        for _ in range(epochs):
            momentum = BETA * (net1 - net0)
            net1, net0 = train_module(net1) + momentum, net1
    return run


def with_tensors(make: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor,
                 epochs: int = 100) -> Callable[[], Any]:
    """The same algorithm on a list of plain tensors (the iris MLP's forward written out): the floor."""
    criterion = nn.CrossEntropyLoss()

    def forward(w: list[torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        return F.linear(F.relu(F.linear(inputs, w[0], w[1])), w[2], w[3])

    def train_tensors(w: list[torch.Tensor]) -> list[torch.Tensor]:
        new_w = [t.detach().clone().requires_grad_() for t in w]
        optimizer = torch.optim.SGD(new_w, lr=LR)
        optimizer.zero_grad()
        criterion(forward(new_w, x), y).backward()
        optimizer.step()
        return [t.detach() for t in new_w]

    def run() -> None:
        w0 = [p.detach() for p in make().parameters()]
        w1 = train_tensors(w0)
        for _ in range(epochs):
            momentum = [BETA * (a - b) for a, b in zip(w1, w0)]
            w1, w0 = [s + m for s, m in zip(train_tensors(w1), momentum)], w1
    return run
