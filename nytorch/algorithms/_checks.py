"""Argument checks shared by the algorithms (messages name the function and the argument)."""
from __future__ import annotations

import operator
from typing import Any, Optional, Union

import torch
from torch import nn

from .._particle import Particle
from .._swarm import Swarm
from .._swarm_build import generator_for

Tensor = torch.Tensor


def swarm_arg(fn: str, swarm: object, name: str = "swarm") -> Swarm:
    """``swarm`` itself, or ``TypeError`` when it is not a ``Swarm``."""
    if not isinstance(swarm, Swarm):
        raise TypeError(f"{fn}: expected a Swarm as {name}, got {type(swarm).__name__}")
    return swarm


def losses_arg(fn: str, losses: object, size: int, name: str = "losses", *, floating: bool = False) -> Tensor:
    """``losses`` as a detached real ``(P,)`` tensor (any real dtype, bool included), or a specific error.

    With ``floating``, integer and bool losses come back in the default float dtype (for arithmetic
    such as a mean); floating losses keep theirs.
    """
    if not isinstance(losses, Tensor):
        raise TypeError(f"{fn}: expected a tensor of {size} losses as {name}, got {type(losses).__name__}")
    if losses.shape != (size,):
        raise ValueError(f"{fn}: expected {name} of shape ({size},) (one per member), got {tuple(losses.shape)}")
    if losses.is_complex():
        raise TypeError(f"{fn}: expected real {name}, got {losses.dtype}")
    if floating and not losses.is_floating_point():
        losses = losses.to(torch.get_default_dtype())
    return losses.detach()


def generator_arg(fn: str, generator: object, swarm: Optional[Swarm] = None) -> Optional[torch.Generator]:
    """``None`` or a ``torch.Generator``; with ``swarm`` (whose values it will draw), one on its device type."""
    return generator_for(fn, generator, None if swarm is None else swarm._spec)


def number_arg(fn: str, value: object, name: str, *, minimum: float = float("-inf")) -> float:
    """A real number ``>= minimum`` (Python number or 0-dim tensor) as a float."""
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: expected a real number as {name}, got {type(value).__name__}")
    if not value >= minimum:
        raise ValueError(f"{fn}: expected {name} >= {minimum:g}, got {value!r}")
    return float(value)


def count_arg(fn: str, value: object, name: str, low: int, high: int) -> int:
    """An int in ``[low, high]``."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{fn}: expected an int as {name}, got {type(value).__name__}")
    number = operator.index(value)  # type: ignore[arg-type]
    if not low <= number <= high:
        raise ValueError(f"{fn}: expected {name} in [{low}, {high}], got {number}")
    return number


def target_arg(fn: str, swarm: Swarm, best: Any, name: str = "best") -> Union[Swarm, Particle, nn.Module]:
    """A member index as a one-member view of ``swarm``, or a Particle/model as is (``name``: the argument)."""
    if isinstance(best, (Particle, nn.Module)):
        return best
    if isinstance(best, Tensor) and best.dim() == 0 and not best.is_floating_point():
        best = int(best)
    if isinstance(best, bool) or not isinstance(best, int):
        raise TypeError(f"{fn}: expected a member index, a Particle or a model as {name}, got {type(best).__name__}")
    size = len(swarm)
    if not -size <= best < size:
        raise IndexError(f"{fn}: {name}={best} is out of range for a swarm of {size} members")
    best %= size
    return swarm[best:best + 1]
