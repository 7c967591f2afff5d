"""Exceptions raised by nytorch; every one names the offending parameter path."""
from __future__ import annotations

__all__ = ["StructureError", "DeviceMismatchError"]


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
