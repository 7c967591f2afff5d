"""Random member indices for the algorithms.

The rule: indices are drawn with ``generator`` on the generator's own device (so a CUDA
generator works, and a CPU one gives the same draws as ``torch.randperm``/``torch.randint``
with it), then moved to the CPU, where member selection takes them.  Without a generator
they come from the default CPU generator.  Values (noise) are drawn on the swarm's device,
so a generator that also draws noise must be on that device (``_checks.generator_arg``).
"""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor

__all__ = ["randperm", "randint"]


def _device(generator: Optional[torch.Generator]) -> torch.device:
    return torch.device("cpu") if generator is None else generator.device


def randperm(size: int, generator: Optional[torch.Generator]) -> Tensor:
    """``torch.randperm(size)`` drawn on the generator's device, on the CPU.

    >>> seed = lambda: torch.Generator().manual_seed(0)
    >>> torch.equal(randperm(5, seed()), torch.randperm(5, generator=seed()))
    True
    """
    return torch.randperm(size, generator=generator, device=_device(generator)).cpu()


def randint(high: int, count: int, generator: Optional[torch.Generator]) -> Tensor:
    """``count`` integers uniform in ``[0, high)`` drawn on the generator's device, on the CPU.

    >>> seed = lambda: torch.Generator().manual_seed(0)
    >>> torch.equal(randint(3, 4, seed()), torch.randint(3, (4,), generator=seed()))
    True
    """
    return torch.randint(high, (count,), generator=generator, device=_device(generator)).cpu()
