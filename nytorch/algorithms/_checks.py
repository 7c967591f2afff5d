"""Argument checks shared by the algorithms (messages name the function and the argument)."""
from __future__ import annotations

import numbers
import operator
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from .. import _swarm_ops as swarm_ops
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


def _real(value: object) -> Optional[float]:
    """``value`` as a float when it is a real number: a Python or NumPy int/float (any real
    ``numbers.Real``) or a 0-dim real tensor; ``None`` otherwise, booleans included."""
    if type(value) is float or type(value) is int:  # the common case, first
        return float(value)  # type: ignore[arg-type]
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.is_complex() or value.dtype == torch.bool:
            return None
        return float(value.item())
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _index(value: object) -> Optional[int]:
    """``value`` as an int when it is an integer: a Python or NumPy int (e.g. from ``np.argmin``), a
    0-dim integer array or a one-element integer tensor; ``None`` otherwise, booleans and floats included."""
    if type(value) is int:  # the common case, first
        return value  # type: ignore[return-value]
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            return None
        return int(value.item())
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, np.ndarray) and value.dtype == np.bool_):
        return None
    try:  # ints of any kind: NumPy ints and 0-dim integer arrays too
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def number_arg(fn: str, value: object, name: str, *, minimum: float = float("-inf"), strict: bool = False) -> float:
    """A real number ``>= minimum`` (``> minimum`` when ``strict``; Python or NumPy number, or 0-dim real
    tensor; not a bool) as a float.

    >>> number_arg("apso", np.float32(0.5), "beta")
    0.5
    >>> number_arg("apso", True, "beta")
    Traceback (most recent call last):
        ...
    TypeError: apso: expected a real number as beta, got bool
    """
    number = _real(value)
    if number is None:
        raise TypeError(f"{fn}: expected a real number as {name}, got {_kind(value)}")
    if number != number:
        raise ValueError(f"{fn}: expected a number as {name}, got nan")
    if not (number > minimum if strict else number >= minimum):
        shown = value if type(value) in (int, float) else number
        raise ValueError(f"{fn}: expected {name} {'>' if strict else '>='} {minimum:g}, got {shown!r}")
    return number


def _kind(value: object) -> str:
    """How messages name a refused value: its type, or a tensor's dtype and shape."""
    if isinstance(value, Tensor):
        return f"a tensor of dtype {str(value.dtype).removeprefix('torch.')} and shape {tuple(value.shape)}"
    return type(value).__name__


def count_arg(fn: str, value: object, name: str, low: int, high: int) -> int:
    """An int in ``[low, high]`` (Python or NumPy int, or 0-dim integer tensor; not a bool)."""
    number = _index(value)
    if number is None:
        raise TypeError(f"{fn}: expected an int as {name}, got {_kind(value)}")
    if not low <= number <= high:
        raise ValueError(f"{fn}: expected {name} in [{low}, {high}], got {number}")
    return number


def callable_arg(fn: str, value: object, name: str = "loss_fn") -> None:
    """Raise ``TypeError`` unless ``value`` can be called."""
    if not callable(value):
        raise TypeError(f"{fn}: expected a callable as {name}, got {type(value).__name__}")


def target_arg(fn: str, swarm: Swarm, best: Any, name: str = "best") -> Union[Swarm, Particle, nn.Module]:
    """A member index as a one-member view of ``swarm``, or a Particle/model as is (``name``: the argument)."""
    if isinstance(best, (Particle, nn.Module)):
        return best
    index = _index(best)
    if index is None:
        raise TypeError(f"{fn}: expected a member index, a Particle or a model as {name}, got {_kind(best)}")
    size = len(swarm)
    if not -size <= index < size:
        raise IndexError(f"{fn}: {name}={index} is out of range for a swarm of {size} members")
    index %= size
    return swarm[index:index + 1]


def checked_target(fn: str, swarm: Swarm, target: Union[Swarm, Particle, nn.Module], name: str = "best") -> None:
    """Raise (naming ``fn``) unless ``target`` (from ``target_arg``) has the members' structure.

    A member view of ``swarm`` needs no check; a Particle or model of another class or shape is refused
    here, before any work, even where a zero coefficient will not read it.
    """
    if not isinstance(target, Swarm):
        swarm_ops.operand(f"{fn}: {name}", swarm._spec, len(swarm), target)
