"""Models as one flat vector: ``ravel(x) -> (vector, unravel)`` for black-box optimisers and numpy.

``ravel`` copies the floating (operational) parameters of a model, Particle,
Swarm or dict of tensors into one contiguous 1-D tensor (``[P, n]`` for a Swarm
of P members) and returns the inverse, which accepts tensors, numpy arrays or
lists.  (To keep a live model's parameters in one buffer instead, in place, use the
core's ``flatten_``.)
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .. import _nocast as nocast
from .._errors import DeviceMismatchError, StructureError
from .._particle import Particle
from .._algebra import ties
from ._state import Operand, operand, rebuild, shares

Tensor = torch.Tensor

__all__ = ["ravel"]


def _selected(op: Operand) -> list[int]:
    return [index for index in range(len(op.leaves)) if op.active(index)]


def _untied(op: Operand, picked: list[int]) -> tuple[list[int], dict[int, int]]:
    """``picked`` with each tied leaf once (a dict naming one tensor twice, e.g. a tied ``state_dict()``),
    and ``{later index: first index}`` for the others, which ``unravel`` ties again."""
    aliases = ties(op.leaves, picked)
    return [index for index in picked if index not in aliases], aliases


def _common(fn: str, op: Operand, picked: list[int]) -> tuple[torch.dtype, torch.device]:
    if not picked:
        return torch.get_default_dtype(), torch.device("cpu")
    first = op.leaves[picked[0]]
    dtype = first.dtype
    for index in picked:
        leaf = op.leaves[index]
        if leaf.device != first.device:
            raise DeviceMismatchError(
                f"{fn}: parameter {op.names[index]!r} is on {leaf.device} but {op.names[picked[0]]!r} is on "
                f"{first.device}; one vector needs one device (move the model with model.to(device))")
        dtype = torch.promote_types(dtype, leaf.dtype)
    return dtype, first.device


def ravel(x: Any, /) -> tuple[Tensor, Callable[[Any], Any]]:
    """Copy ``x``'s floating parameters into one vector; return it and its inverse ``unravel``.

    Like ``jax.flatten_util.ravel_pytree`` (or ``torch.nn.utils.parameters_to_vector``
    plus its inverse).  Parameters are taken in ``named_parameters()`` order (a dict's
    leaves in optree's order: sorted keys for a plain dict, insertion order for an
    ``OrderedDict`` such as a ``state_dict()``), tied ones once (also one tensor under two
    keys of a dict, which ``unravel`` gives back as one tensor under both); integer leaves
    and parameters a ``ParamConfig`` marks non-operational are left out and carried into
    ``unravel``'s results unchanged.  A Particle made with ``buffers=True`` contributes its
    floating buffers too.  Mixed floating dtypes are promoted in the vector and cast back
    by ``unravel``.

    Args:
        x: an ``nn.Module`` (e.g. a ``NytoModule``), a ``Particle``, a ``Swarm`` or a dict of tensors.

    Returns:
        ``(vector, unravel)``: ``vector`` is a fresh 1-D tensor (``[P, n]`` for a Swarm of
        P members); ``unravel(v)`` takes a tensor, numpy array (any strides, read-only
        too) or list (of numbers, or of 1-D arrays for a Swarm) of that shape (any P for a
        Swarm: what the vector leaves out is carried from member 0 when P differs, as
        ``Swarm.zeros`` does, so an empty Swarm with leaves to carry takes only P = 0:
        ``StructureError`` otherwise) and returns a new value of ``x``'s kind holding a copy of
        ``v`` (gradients flow to ``v`` for dict results).  ``vector.numpy()`` and
        ``unravel(array)`` are the numpy round trip for scipy, ``cma`` or nevergrad.
        numpy has no bfloat16, so for a bfloat16 model ``vector.numpy()`` raises
        ``TypeError``: use ``vector.float().numpy()`` (exact, as float32 holds every
        bfloat16 value); ``unravel`` accepts float32 or float64 arrays and casts each piece
        back to its parameter's dtype.

    Raises:
        TypeError: ``x`` is not an accepted kind.
        DeviceMismatchError: parameters live on several devices.

    >>> import torch
    >>> net = torch.nn.Linear(2, 1)
    >>> vector, unravel = ravel(net)
    >>> vector.shape
    torch.Size([3])
    >>> copy = unravel(vector.numpy() * 0)
    >>> type(copy).__name__, copy.weight.abs().sum().item()
    ('Linear', 0.0)
    >>> half_vector, half_unravel = ravel(net.bfloat16())
    >>> half_unravel(half_vector.float().numpy()).weight.dtype
    torch.bfloat16
    """
    op = operand("ravel", x, buffers=isinstance(x, Particle), argument="x")
    picked, aliases = _untied(op, _selected(op))
    dtype, device = _common("ravel", op, picked)
    chosen = [op.leaves[index] for index in picked]
    members = chosen[0].shape[0] if op.kind == "swarm" and chosen else None
    with torch.no_grad():
        if members is None:
            parts = [leaf.detach().reshape(-1).to(dtype) for leaf in chosen]
            vector = nocast.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)
        else:
            # the width spelled out: an empty swarm's -1 would be ambiguous
            parts = [leaf.detach().reshape(members, leaf.shape[1:].numel()).to(dtype) for leaf in chosen]
            vector = nocast.cat(parts, dim=1)
    shapes = [tuple(leaf.shape[1:]) if members is not None else tuple(leaf.shape) for leaf in chosen]
    sizes = [int(torch.Size(shape).numel()) for shape in shapes]
    chosen_set = set(picked)
    carried = {index: leaf for index, leaf in enumerate(op.leaves) if index not in chosen_set and index not in aliases}
    return vector, functools.partial(_unravel, op, picked, shapes, sizes, dtype, device, carried,
                                     members is not None, aliases)


def _as_tensor(vector: Any) -> tuple[Tensor, bool]:
    """``vector`` as a tensor, and whether it is a fresh copy nobody else holds.

    numpy arrays torch cannot view (negative strides, e.g. ``a[::-1]``) or must not view
    (read-only ones, which torch would warn about) are copied; a list (of numbers, or of arrays) is
    read by numpy, so Python floats keep their double precision (``torch.as_tensor`` would read
    them as the default dtype, float32) and a list of arrays is stacked at once.
    """
    if isinstance(vector, (list, tuple)) and not any(isinstance(item, Tensor) for item in vector):
        return torch.from_numpy(np.asarray(vector)), True
    if isinstance(vector, np.ndarray) and (not vector.flags.writeable or any(s < 0 for s in vector.strides)):
        return torch.from_numpy(np.array(vector)), True
    if isinstance(vector, Tensor):
        return vector, False
    return torch.as_tensor(vector, device="cpu"), False  # an array's memory, not on the default device


def _unravel(op: Operand, picked: list[int], shapes: list[tuple[int, ...]], sizes: list[int],
             dtype: torch.dtype, device: torch.device, carried: dict[int, Tensor], stacked: bool,
             aliases: dict[int, int], vector: Any, /) -> Any:
    total = sum(sizes)
    expected = f"[P, {total}]" if stacked else f"({total},)"
    try:
        flat, fresh = _as_tensor(vector)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"unravel: expected a tensor or an array of shape {expected}, "
                        f"got {type(vector).__name__} ({error})") from error
    good = flat.dim() == 2 and flat.shape[1] == total if stacked else flat.dim() == 1 and flat.shape[0] == total
    if not good:
        raise StructureError(f"unravel: expected a vector of shape {expected}, got shape {tuple(flat.shape)}")
    if stacked and flat.shape[0] and not len(op.source) and (carried or set(op.source.buffers) - set(op.names)):
        raise StructureError(f"unravel: expected a vector of shape [0, {total}] (the swarm raveled had no member "
                             f"to carry buffers and integer leaves from), got shape {tuple(flat.shape)}")
    if flat.is_complex() and not dtype.is_complex:
        raise TypeError(f"unravel: expected a real vector for {str(dtype).removeprefix('torch.')} "
                        "parameters, got a complex one")
    flat = flat.to(device=device, dtype=dtype, copy=not fresh)
    pieces = flat.split(sizes, dim=-1)
    count = flat.shape[0] if stacked else None
    leaves: list[Tensor] = [torch.empty(0)] * len(op.leaves)
    for index, piece, shape in zip(picked, pieces, shapes):
        full = (flat.shape[0], *shape) if stacked else shape
        piece = piece.reshape(full)
        if piece.is_complex() and not op.leaves[index].is_complex():  # promoted beside complex leaves:
            piece = piece.real.contiguous()  # its real part (``.to`` would warn that it drops the imaginary)
        leaves[index] = piece.to(op.leaves[index].dtype)
    with torch.no_grad():
        for index, leaf in carried.items():
            if count is not None and leaf.shape[0] != count:  # another member count: member 0's values,
                leaf = leaf[:1].expand(count, *leaf.shape[1:])  # as Swarm constructors carry them
            leaves[index] = leaf if shares(op, index) else leaf.detach().clone()
    for index, origin in aliases.items():  # tied again, as they came
        leaves[index] = leaves[origin]
    return rebuild(op, leaves)
