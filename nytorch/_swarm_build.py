"""Building a swarm's flat storage: from models or Particles, from stacked tensors, or by filling.

Each function returns ``(spec, flats, size)`` for the ``Swarm`` constructor; ``Swarm``'s
class methods are thin shells over them.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

import torch
from torch import nn

from . import _leafwise as lw
from . import _swarm_ops as ops
from ._errors import DeviceMismatchError, StructureError
from ._particle import Particle
from ._swarm_spec import Group, Spec, make_spec, pack_members, pack_stacked, rows_of, views_of
from ._walk import Layout

Tensor = torch.Tensor
Built = tuple[Spec, list[Tensor], int]

__all__ = ["spec_and_rows", "stacked", "from_stacked", "filled", "joined", "generator_for"]


def spec_and_rows(fn: str, like: object, buffers: Optional[bool]) -> tuple[Spec, list[Tensor]]:
    """The member structure of ``like`` and its values as flat rows (``[1, w]``, or ``[P, w]`` for a swarm)."""
    if ops.is_swarm(like):
        swarm: Any = like
        if buffers is None or buffers == swarm._spec.with_buffers:
            return swarm._spec, list(swarm._flats)
        spec = make_spec(swarm._spec.layout, buffers)
        return spec, pack_stacked(spec, views_of(swarm._spec, swarm._flats), len(swarm))
    if isinstance(like, Particle):
        spec = make_spec(like._layout, like._with_buffers if buffers is None else buffers)
    elif isinstance(like, nn.Module):
        spec = make_spec(Layout(like), bool(buffers))
    else:
        raise TypeError(f"{fn}: expected an nn.Module, a Particle or a Swarm as like, got {type(like).__name__}")
    return spec, [row for row in rows_of(spec, ops.full_leaves(fn, spec, like)) if row is not None]


def stacked(items: Iterable[Any], buffers: Optional[bool]) -> Built:
    """``Swarm.stack``: one copy of the values of modules/Particles of one structure."""
    if isinstance(items, (nn.Module, Particle)) or ops.is_swarm(items) or not isinstance(items, Iterable):
        raise TypeError(f"stack: expected a list of modules or Particles, got {type(items).__name__}")
    items = list(items)
    if not items:
        raise ValueError("stack: expected at least one module or Particle, got an empty sequence")
    members = []
    spec: Optional[Spec] = None
    for i, item in enumerate(items):
        if not isinstance(item, (nn.Module, Particle)):
            raise TypeError(f"stack: expected modules or Particles, but item {i} is a {type(item).__name__}"
                            + (" (use Swarm.cat to join swarms)" if ops.is_swarm(item) else ""))
        if spec is None:
            spec = spec_and_rows("stack", item, buffers)[0]
        members.append(ops.full_leaves(f"stack: item {i}", spec, item))
    if not (spec is not None):  # items is non-empty
        raise RuntimeError("nytorch internal error: expected spec is not None")
    return spec, pack_members(spec, members), len(members)


def _checked(fn: str, spec: Spec, params: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], int]:
    if not isinstance(params, Mapping):
        raise TypeError(f"{fn}: expected a mapping from names to stacked tensors, got {type(params).__name__}")
    size: Optional[int] = None
    first = ""
    given: dict[str, Tensor] = {}
    # in named_parameters() order, the first difference of any kind is the one named
    for index, (name, slot, stand_in) in enumerate(zip(spec.names, spec.slots, spec.layout.params + spec.layout.buffers)):
        if name not in params:
            if index < spec.n_state:
                raise StructureError(f"{fn}: parameter {name!r} is missing from params")
            continue
        value = params[name]
        if not isinstance(value, Tensor):
            raise TypeError(f"{fn}: expected a tensor for {name!r}, got {type(value).__name__}")
        if value.dim() == 0 or value.shape[1:] != slot.shape or value.dtype != stand_in.dtype:
            raise StructureError(
                f"{fn}: expected {name!r} of shape (P, {', '.join(map(str, slot.shape))}) "
                f"{str(stand_in.dtype).removeprefix('torch.')} (a leading member dimension), got {lw.describe(value)}")
        if value.device != stand_in.device:
            raise DeviceMismatchError(f"{fn}: {name!r} is on {value.device} but the model is on {stand_in.device}; "
                                      "move it first")
        if size is None:
            size, first = int(value.shape[0]), name
        elif value.shape[0] != size:
            raise StructureError(f"{fn}: expected every tensor to have the same leading (member) size, "
                                 f"but {name!r} has {value.shape[0]} and {first!r} has {size}")
        given[name] = value
    for key in params:
        if key not in given:
            raise StructureError(f"{fn}: {spec.model_class.__name__} has no parameter or buffer named {key!r}")
    return given, size if size is not None else 0


def from_stacked(like: object, params: Mapping[str, Tensor]) -> Built:
    """``Swarm.from_params``: copy stacked ``[P, *shape]`` tensors; missing buffers come from ``like``."""
    fn = "from_params"
    spec, rows = spec_and_rows(fn, like, None)
    given, size = _checked(fn, spec, params)
    leaves = []
    for name, slot in zip(spec.names, spec.slots):
        if name in given:
            leaves.append(given[name])
            continue
        source = rows[slot.group][:, slot.start:slot.stop]
        source = source if source.shape[0] == size else source[:1].expand(size, -1)
        leaves.append(source.reshape(size, *slot.shape))
    return spec, pack_stacked(spec, leaves, size), size


def _size(fn: str, like: object, size: Optional[int]) -> int:
    if size is None:
        if ops.is_swarm(like):
            return len(like)  # type: ignore[arg-type]
        raise TypeError(f"{fn}: expected size (the number of members) unless like is a Swarm")
    if isinstance(size, bool) or not hasattr(size, "__index__"):  # NumPy and 0-dim integer tensors are ints
        raise TypeError(f"{fn}: expected a non-negative int as size, got {type(size).__name__}")
    number = operator.index(size)
    if number < 0:
        raise ValueError(f"{fn}: expected a non-negative int as size, got {number}")
    return number


def generator_for(fn: str, generator: object, spec: Optional[Spec] = None) -> Optional[torch.Generator]:
    """``generator`` (``None`` or a ``torch.Generator``); with ``spec``, one that can draw its members' values.

    The rule for every random draw on a swarm: values are drawn on each arithmetic group's device,
    so the generator must be on that device type (as ``torch.randn(device=..., generator=...)``
    requires; checked for every device, meta included, so a mismatch is one clear error).  Member
    indices are drawn on the generator's device and then moved (see ``algorithms``).

    >>> generator_for("randn", torch.Generator(), make_spec(Layout(nn.Linear(2, 1, device="meta")), False))
    Traceback (most recent call last):
        ...
    ValueError: randn: expected a generator on meta (where the swarm's 'weight' lives), got one on cpu; ...
    """
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: expected a torch.Generator or None as generator, got {type(generator).__name__}")
    if spec is None:
        return generator
    for index, group in enumerate(spec.groups):
        if group.active and group.device.type != generator.device.type:
            raise ValueError(f"{fn}: expected a generator on {group.device.type} (where the swarm's "
                             f"{spec.leaf_name(index)!r} lives), got one on {generator.device}; "
                             "create it there (torch.Generator(device=...)) or pass none")
    return generator


def filled(fn: str, like: object, size: Optional[int], buffers: Optional[bool],
           make: Callable[[int, Group, Tensor], Tensor], generator: Optional[torch.Generator] = None) -> Built:
    """Arithmetic groups from ``make(size, group, like_rows)``; the other leaves copied from ``like``.

    ``generator`` (the one ``make`` draws with) is checked against the groups' devices first.
    """
    count = _size(fn, like, size)
    spec, rows = spec_and_rows(fn, like, buffers)
    generator_for(fn, generator, spec)
    if ops.is_swarm(like) and len(like) not in (count, 1):  # type: ignore[arg-type]
        rows = [row[:1] for row in rows]  # another size: carry member 0's values
    flats = [
        make(count, group, row) if group.active
        else (row.expand(count, -1).clone() if row.shape[0] != count else row.clone())
        for group, row in zip(spec.groups, rows)
    ]
    return spec, flats, count


def joined(swarms: Iterable[Any]) -> Built:
    """``Swarm.cat``: members of several swarms of one structure, in order."""
    items = list(swarms)
    if not items or not all(ops.is_swarm(item) for item in items):
        raise TypeError("cat: expected a non-empty list of Swarms")
    spec = items[0]._spec
    parts = [ops.aligned(f"cat: swarm {i}", spec, item) for i, item in enumerate(items)]
    flats = [torch.cat([part[g] for part in parts]) for g in range(len(spec.groups))]
    return spec, flats, sum(len(item) for item in items)
