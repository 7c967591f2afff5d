"""Exceptions raised by nytorch; every one names the offending parameter path."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: this module imports nothing heavy
    from torch import Tensor

__all__ = ["StructureError", "DeviceMismatchError"]

_AGAIN = ("another class of the same name: a re-run notebook cell, importlib.reload or a class statement inside a "
          "function defines a new class each time; make both models from one class")


def class_names(first: type, second: type) -> tuple[str, str]:
    """Names of two distinct classes for a message: their ``__name__``s, told apart where those coincide.

    >>> A, B = type("Net", (), {}), type("Net", (), {})
    >>> class_names(A, int)
    ('Net', 'int')
    >>> class_names(A, B)[0]
    'Net (nytorch._errors.Net)'
    >>> class_names(A, B)[1].startswith("Net (nytorch._errors.Net, another class of the same name")
    True
    """
    if first.__name__ != second.__name__:
        return first.__name__, second.__name__
    full = [f"{cls.__module__}.{cls.__qualname__}" for cls in (first, second)]
    again = f", {_AGAIN}" if full[0] == full[1] else ""
    return f"{first.__name__} ({full[0]})", f"{second.__name__} ({full[1]}{again})"


class StructureError(ValueError):
    """Two models or pytrees do not share names, shapes or dtypes.

    The message names the first differing parameter path (in
    ``named_parameters()`` order) with its shapes and dtypes.

    >>> import torch, nytorch.functional as nf
    >>> try:
    ...     nf.add({"w": torch.ones(2)}, {"w": torch.ones(3)})
    ... except StructureError as error:
    ...     print(error)
    add: parameter 'w' differs: shape (2,) float32 vs shape (3,) float32
    """


class DeviceMismatchError(StructureError):
    """Operands live on different devices (e.g. one on ``cpu``, one on ``cuda:0``).

    >>> issubclass(DeviceMismatchError, ValueError)
    True
    """


def describe(leaf: Tensor) -> str:
    """``shape (2, 3) float32`` (plus the device when it is not the CPU): how messages show a tensor.

    >>> import torch
    >>> describe(torch.zeros(2, 3))
    'shape (2, 3) float32'
    """
    text = f"shape {tuple(leaf.shape)} {str(leaf.dtype).removeprefix('torch.')}"
    return text if leaf.device.type == "cpu" else f"{text} on {leaf.device}"
