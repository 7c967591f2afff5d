"""``torch.cat`` and ``torch.stack`` of a model's own tensors, untouched by ``torch.autocast``.

Autocast runs ``cat`` and ``stack`` in the widest floating type among their inputs, and refuses
a float16 input under bfloat16 autocast (or a bfloat16 one under float16 autocast) with
"Unexpected floating ScalarType in at::autocast::prioritize".  Joining a model's tensors
(packing it, stacking a Swarm, a norm over its leaves) is no forward computation: it must keep
their dtypes and work inside any autocast region, so these run with autocast off.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import ContextManager

import torch

Tensor = torch.Tensor

__all__ = ["off", "cat", "stack"]

#: Whether ``torch.autocast`` knows a device type (torch < 2.3 has no ``torch.amp.is_autocast_available``).
_available = getattr(torch.amp, "is_autocast_available", lambda device: device in ("cpu", "cuda"))


def off(tensors: Sequence[Tensor]) -> ContextManager[object]:
    """A context with autocast off for ``tensors``' device type (nothing to enter when autocast is off).

    >>> with torch.autocast("cpu", dtype=torch.bfloat16), off([torch.ones(1)]):
    ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    torch.float32
    """
    if not tensors or not torch._C._is_any_autocast_enabled():
        return contextlib.nullcontext()  # the usual case: one C call, no context object
    device = tensors[0].device.type
    return torch.autocast(device, enabled=False) if _available(device) else contextlib.nullcontext()


def cat(tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    """``torch.cat(tensors, dim)`` with autocast off (dtypes kept).

    >>> half = torch.ones(2, dtype=torch.float16)
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     cat([half, half]).dtype
    torch.float16
    """
    with off(tensors):
        return torch.cat(list(tensors), dim)


def stack(tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    """``torch.stack(tensors, dim)`` with autocast off (dtypes kept).

    >>> half = torch.ones(2, dtype=torch.float16)
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     stack([half, half]).shape
    torch.Size([2, 2])
    """
    with off(tensors):
        return torch.stack(list(tensors), dim)
