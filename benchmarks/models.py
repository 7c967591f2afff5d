"""The model zoo the benchmarks run on, built here (no downloads)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import nytorch


class SeedLinear(nytorch.NytoModule):
    """The seed's 2-parameter model."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([2.0]))
        self.bias = nn.Parameter(torch.tensor([1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x + self.bias


class Stack(nytorch.NytoModule):
    """``layers`` Linear(width, width) layers: 2 tensors each."""

    def __init__(self, layers: int, width: int, bias: bool = True) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(width, width, bias=bias) for _ in range(layers)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class IrisMLP(nytorch.NytoModule):
    """The seed example's 4-12-3 MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Linear(4, 12)
        self.layer2 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(torch.relu(self.layer1(x)))


class BasicBlock(nn.Module):
    def __init__(self, channels_in: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.down = (nn.Sequential(nn.Conv2d(channels_in, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))
                     if stride != 1 or channels_in != channels else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.down(x))


class ResNet18(nytorch.NytoModule):
    """ResNet-18-shaped (11.7M parameters, 62 parameter tensors, BatchNorm buffers)."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        blocks, channels_in = [], 64
        for channels, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            blocks += [BasicBlock(channels_in, channels, stride), BasicBlock(channels, channels, 1)]
            channels_in = channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


#: The sizes ``sizes`` keeps, as ``python -m benchmarks --sizes`` sets them; empty keeps every one.
ONLY: list[str] = []


def sizes(quick: bool) -> dict[str, Callable[[], nn.Module]]:
    """name -> model factory; ``quick`` shrinks the wide model for CI, ``ONLY`` picks sizes by name.

    >>> list(sizes(quick=True))
    ['tiny (seed)', 'iris MLP', 'many-small', 'deep-narrow', 'wide']
    """
    zoo: dict[str, Callable[[], nn.Module]] = {
        "tiny (seed)": SeedLinear,
        "iris MLP": IrisMLP,
        "many-small": lambda: Stack(100, 64),  # 200 tensors, ~420k values
        "deep-narrow": lambda: Stack(100, 170),  # 200 tensors, ~2.9M values
        "wide": lambda: Stack(10, 2236 if not quick else 700),  # 20 tensors, ~50M values
        "resnet18": ResNet18,
    }
    if quick:
        zoo.pop("resnet18")
    return {name: factory for name, factory in zoo.items() if name in ONLY} if ONLY else zoo
