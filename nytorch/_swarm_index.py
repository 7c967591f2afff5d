"""Selecting and overwriting swarm members: index normalisation, member Particles, assignment."""
from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch
from torch import nn

from . import _scalars as scalars
from . import _swarm_ops as ops
from ._errors import StructureError
from ._particle import Particle
from ._swarm_spec import Spec, rows_of
from ._rebuild import rebuild
from ._walk import Layout

Tensor = torch.Tensor
Index = Union[int, slice, Tensor]

__all__ = ["normalise", "count", "member", "assign"]


def normalise(key: object, size: int) -> Index:
    """A member index as an int in range, a slice, or a 1-D long tensor of in-range indices.

    NumPy arrays index like tensors (``swarm[np.argsort(losses)]``).

    Raises:
        IndexError: out of range, a mask of the wrong length, a non-integer tensor, or a uint8 one (a mask
            to torch, indices to NumPy: ambiguous).
        TypeError: not an int, slice, list, tensor or array.
        ValueError: a slice whose step is not positive (slices are views).

    >>> normalise(-1, 4), normalise([0, -1], 4), normalise(torch.tensor([True, False, True]), 3)
    (3, tensor([0, 3]), tensor([0, 2]))
    >>> normalise([False, True, True], 3)  # a list of bools is a mask
    tensor([1, 2])
    """
    if isinstance(key, slice):
        if key.step is not None and (not hasattr(key.step, "__index__") or operator.index(key.step) < 1):
            raise ValueError(f"Swarm: expected a slice with a positive step (a slice is a view), got step {key.step}; "
                             "select with a list or tensor of indices instead (a copy), "
                             "e.g. swarm[torch.arange(len(swarm) - 1, -1, -1)]")
        return key
    if isinstance(key, (list, range)):
        key = _list_index(list(key))
    elif type(key).__module__ == "numpy" and getattr(key, "ndim", 0) > 0:  # an array: as a tensor
        try:
            key = torch.as_tensor(key, device="cpu")  # as torch indexes: not on the default device
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"Swarm: expected an integer or boolean array as index, got one of dtype "
                            f"{key.dtype}") from error  # type: ignore[attr-defined]
    if isinstance(key, Tensor):
        if key.dtype == torch.bool:
            if key.dim() != 1 or key.shape[0] != size:
                raise IndexError(f"Swarm: a boolean mask must have shape ({size},), got {tuple(key.shape)}")
            return key.nonzero().squeeze(1)
        if key.dtype == torch.uint8:  # torch reads it as a (deprecated) mask, NumPy as indices: say which
            raise IndexError(f"Swarm: expected integer or boolean member indices, got a uint8 tensor of shape "
                             f"{tuple(key.shape)} (torch reads one as a mask, NumPy as indices); "
                             "pass .bool() for a mask or .long() for indices")
        if key.is_floating_point() or key.is_complex() or key.dim() > 1:
            raise IndexError(f"Swarm: expected integer or boolean member indices of at most one dimension, "
                             f"got a {str(key.dtype).removeprefix('torch.')} tensor of shape {tuple(key.shape)}")
        if key.dim() == 1:
            if key.numel() and (int(key.min()) < -size or int(key.max()) >= size):
                bad = int(key.min()) if int(key.min()) < -size else int(key.max())
                raise IndexError(f"Swarm: index {bad} is out of range for a swarm of {size} members")
            return key.long() % max(size, 1)
        key = int(key)
    if isinstance(key, bool) or not hasattr(key, "__index__"):
        raise TypeError(f"Swarm: expected an int, a slice, a list, or an integer/boolean tensor as index, "
                        f"got {type(key).__name__}")
    index = operator.index(key)  # type: ignore[arg-type]
    if not -size <= index < size:
        raise IndexError(f"Swarm: index {index} is out of range for a swarm of {size} members")
    return index % size


def _list_index(items: list) -> Tensor:
    """A list of indices as a tensor: a list of bools is a mask (as in torch and NumPy), ints are indices."""
    if not items:
        return torch.zeros(0, dtype=torch.long, device="cpu")
    bools = sum(isinstance(item, bool) or (isinstance(item, Tensor) and item.dtype == torch.bool) for item in items)
    if bools and bools != len(items):
        raise TypeError("Swarm: a list index mixes booleans with integers; give a boolean mask or integer "
                        f"indices, got {items!r}")
    try:
        # bools make a mask; floats a float tensor, refused below.  On the CPU whatever the default device
        # (``torch.set_default_device``), as torch reads a list index: it then works for a swarm anywhere
        return torch.tensor(items, device="cpu")
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"Swarm: expected a list of integer indices or booleans, got {items!r}") from error


def count(index: Index, size: int) -> int:
    """How many members ``index`` selects."""
    if isinstance(index, int):
        return 1
    if isinstance(index, slice):
        return len(range(size)[index])
    return index.numel()


def member(spec: Spec, views: Sequence[Tensor], index: int) -> Particle:
    """Member ``index`` as a Particle viewing the swarm's storage (its buffers are the member's own)."""
    leaves = [view[index] for view in views]
    names = spec.names[:spec.n_state]
    if spec.with_buffers or not spec.layout.buffers:
        return Particle(spec.layout, names, leaves[:spec.n_state], spec.configs, spec.with_buffers)
    module = rebuild(spec.layout, leaves[:spec.n_params], leaves[spec.n_params:])
    return Particle(Layout(module), names, leaves[:spec.n_params], spec.configs, False)


def assign(spec: Spec, flats: Sequence[Tensor], size: int, index: Index, value: Any) -> None:
    """``swarm[index] = value``, validated completely before anything is written."""
    fn = "Swarm.__setitem__"
    selected = count(index, size)
    rows: list[Any]
    if scalars.is_scalar(value):
        ops.operand(fn, spec, size, value)
        if isinstance(value, np.generic):  # torch's item assignment takes Python numbers, not NumPy scalars
            value = value.item()
        rows = [value if g.active else None for g in spec.groups]
    elif ops.is_swarm(value):
        if len(value) not in (selected, 1):
            raise StructureError(f"{fn}: expected a swarm of {selected} members (or 1) to assign, got {len(value)}")
        rows = ops.aligned(fn, spec, value)
    elif isinstance(value, (Particle, nn.Module)):
        rows = list(rows_of(spec, ops.full_leaves(fn, spec, value)))
    else:
        raise TypeError(f"{fn}: expected a {spec.model_class.__name__}, a Particle or a Swarm of one, "
                        f"or a number, got {type(value).__name__}")
    ops.check_writable(fn, spec, flats, scalars.is_scalar(value))
    if scalars.is_scalar(value):  # a number too large for a later group's dtype: torch refuses only there
        on_cpu = index.cpu() if isinstance(index, Tensor) else index  # the trial's scratch is on the CPU
        ops.check_numbers_fit(fn, spec, flats, lambda scratch, number: scratch.__setitem__(on_cpu, number), value)
    with torch.no_grad():
        for flat, row in zip(flats, rows):
            if row is None:
                continue
            if isinstance(row, Tensor):
                row = row.to(device=flat.device, dtype=flat.dtype)  # a 0-dim scalar may be of another dtype
                if row.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr():
                    row = row.clone()  # overlapping views of this swarm: copy first
                if row.dim():  # a 0-dim tensor is a number: it broadcasts as it is
                    row = row.reshape(-1) if isinstance(index, int) else row.expand(selected, -1)
            flat[index] = row
