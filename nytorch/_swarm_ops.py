"""Swarm arithmetic on flat buffers: turn an operand into one tensor per group, then one kernel per group.

Operands broadcast like tensors against the ``[P, width]`` buffers:

* a scalar (Python number or 0-dim tensor) applies to every value;
* a 1-D tensor of length ``P`` holds one weight per member (a ``[P, 1]`` column);
* a ``Particle`` or a model of the member structure applies to every member (a ``[1, width]`` row);
* another swarm of the same structure applies member by member (``[P, width]``; a swarm of
  one member broadcasts like a row).

Only arithmetic groups (floating/complex, operational) change; the rest are carried.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn

from . import _algebra as algebra
from . import _leafwise as lw
from . import _probe as probe
from . import _scalars as scalars
from . import _nocast as nocast
from ._errors import DeviceMismatchError, StructureError, class_names
from ._particle import Particle, layout_state
from ._swarm_spec import Spec, pack_stacked, rows_of, views_of
from ._walk import Layout, model_class

Tensor = torch.Tensor
#: A converted operand: a scalar, or one tensor per group (``None`` for groups it does not touch).
Operand = Union[object, list[Optional[Tensor]]]

__all__ = ["is_swarm", "operand", "combine", "combine_", "check_numbers_fit", "check_writable", "check_class",
           "full_leaves", "particle_leaves", "aligned", "AXPY", "lerp_operands", "mixed", "mean_rows", "norms"]


def is_swarm(value: object) -> bool:
    """True for ``Swarm`` instances (checked structurally to avoid an import cycle)."""
    return hasattr(value, "_flats") and hasattr(value, "_spec") and getattr(value, "__nytorch_broadcasts__", False)


def check_class(fn: str, spec: Spec, model_class: type) -> None:
    """Raise ``TypeError`` unless ``model_class`` is the members' class."""
    if model_class is not spec.model_class:
        expected, got = class_names(spec.model_class, model_class)
        raise TypeError(f"{fn}: expected a {expected} (or a Particle or Swarm of one), got a {got}")


def particle_leaves(fn: str, spec: Spec, other: Union[Particle, nn.Module]) -> list[Tensor]:
    """The arithmetic leaves of a Particle or model, checked against the member structure."""
    template = spec.template
    if isinstance(other, Particle):
        check_class(fn, spec, other.model_class)
        names, leaves = other._names, other._leaves
        if other._with_buffers != spec.with_buffers and len(names) != len(template._names):
            mine, theirs = ("takes its buffers into", "does not") if other._with_buffers else (
                "leaves its buffers out of", "takes them")
            raise StructureError(f"{fn}: the Particle {mine} arithmetic (particle(..., buffers="
                                 f"{other._with_buffers})) but the swarm {theirs} (buffers={spec.with_buffers}); "
                                 "make them alike")
    else:
        check_class(fn, spec, model_class(other))
        names, leaves = layout_state(Layout(other), spec.with_buffers)
    algebra.check_state(fn, template._names, template._leaves, names, leaves)
    return list(leaves)


def full_leaves(fn: str, spec: Spec, other: Union[Particle, nn.Module]) -> list[Tensor]:
    """Every stored leaf (parameters, then buffers) of a Particle or model, checked against the structure."""
    leaves = particle_leaves(fn, spec, other)
    if spec.with_buffers:
        return leaves
    layout = other._layout if isinstance(other, Particle) else Layout(other)
    buffers = layout.buffers
    algebra.check_state(fn, spec.layout.buffer_names, spec.layout.buffers, layout.buffer_names, buffers)
    return leaves + buffers


def _check_scalar(fn: str, spec: Spec, scalar: object, reflected: bool) -> None:
    groups = spec.groups
    kind = type(scalar)
    if (kind is float or (kind is int and scalars.in_int_range(scalar))) and all(  # type: ignore[arg-type]
            g.dtype.is_floating_point for g in groups if g.active):
        return
    stand_ins = spec.layout.params + spec.layout.buffers
    firsts = [spec.names.index(spec.leaf_name(g)) for g in range(len(groups))]
    scalars.check_scalar(fn, scalar, [spec.names[i] for i in firsts], [stand_ins[i] for i in firsts],
                    [g.active for g in groups], reflected)


def _weights(fn: str, spec: Spec, size: int, weights: Tensor) -> list[Optional[Tensor]]:
    if weights.dim() != 1:
        raise TypeError(f"{fn}: expected a number, a 0-dim tensor or a 1-D tensor of {size} per-member weights, "
                        f"got a tensor of shape {tuple(weights.shape)}")
    if weights.shape[0] != size:
        raise StructureError(f"{fn}: expected one weight per member (a 1-D tensor of length {size}), "
                             f"got length {weights.shape[0]}")
    columns: list[Optional[Tensor]] = []
    for index, group in enumerate(spec.groups):
        if not group.active:
            columns.append(None)
            continue
        columns.append(_weights_for(fn, spec, weights, index).unsqueeze(1))
    return columns


def _weights_for(fn: str, spec: Spec, weights: Tensor, group: int) -> Tensor:
    """Per-member ``weights`` checked and cast for arithmetic ``group``: its dtype and device.

    They may sit where ``group`` does or where another arithmetic group of the swarm does: a swarm
    spread over devices (model parallel) has no one device to hold them, so they are moved to each
    group's, as a 0-dim tensor on the CPU is.
    """
    dtype, device = spec.groups[group].dtype, spec.groups[group].device
    if weights.is_complex() and not dtype.is_complex:
        raise TypeError(f"{fn}: complex weights would turn parameter {spec.leaf_name(group)!r} "
                        f"({str(dtype).removeprefix('torch.')}) complex; nytorch keeps every dtype")
    if weights.device != device and not any(other.active and other.device == weights.device
                                            for other in spec.groups):
        raise DeviceMismatchError(f"{fn}: the weights are on {weights.device} but parameter "
                                  f"{spec.leaf_name(group)!r} is on {device}; move them to a device of the swarm")
    return weights.detach().to(device=device, dtype=dtype)


def aligned(fn: str, spec: Spec, other: Any) -> list[Tensor]:
    """Another swarm's flat buffers in ``spec``'s grouping (no copy when the groupings agree).

    Raises:
        TypeError: the other swarm's members are of another class.
        StructureError: names, shapes, dtypes or the buffers setting differ.
    """
    other_spec: Spec = other._spec
    if other_spec is spec or other_spec.signature == spec.signature:
        return list(other._flats)
    check_class(fn, spec, other_spec.model_class)
    algebra.check_state(fn, spec.names, spec.layout.params + spec.layout.buffers,
                        other_spec.names, other_spec.layout.params + other_spec.layout.buffers)
    if spec.with_buffers != other_spec.with_buffers:
        raise StructureError(f"{fn}: one swarm takes buffers into arithmetic and the other does not; "
                             "build both with the same buffers= setting")
    # Same leaves, grouped differently (e.g. other ParamConfigs): regroup (a copy).
    return pack_stacked(spec, views_of(other_spec, other._flats), len(other))


def _swarm_operand(fn: str, spec: Spec, size: int, other: Any, inplace: bool) -> list[Optional[Tensor]]:
    other_size = len(other)
    if other_size != size and other_size != 1 and (size != 1 or inplace):
        raise StructureError(f"{fn}: cannot broadcast a swarm of {other_size} members "
                             f"{'into' if inplace else 'with'} a swarm of {size} members")
    flats = aligned(fn, spec, other)
    return [flat if g.active else None for flat, g in zip(flats, spec.groups)]


def operand(fn: str, spec: Spec, size: int, other: object, *, reflected: bool = False,
            inplace: bool = False) -> Operand:
    """Check ``other`` against a swarm of ``size`` members and convert it for ``combine``.

    Raises:
        TypeError: unsupported operand, another model class, or a dtype-changing scalar.
        StructureError: names, shapes, dtypes, weight count or swarm size differ.
        DeviceMismatchError: operands on different devices.
    """
    if scalars.is_scalar(other):
        _check_scalar(fn, spec, other, reflected)
        return scalars.as_numbers((other,))[0]  # torch would drop a NumPy complex's imaginary part
    if isinstance(other, Tensor):
        return _weights(fn, spec, size, other)
    if is_swarm(other):
        return _swarm_operand(fn, spec, size, other, inplace)
    if isinstance(other, (Particle, nn.Module)):
        active = [g for g, group in enumerate(spec.groups) if group.active]
        return rows_of(spec, particle_leaves(fn, spec, other), active)
    raise TypeError(
        f"{fn}: expected a number, a 0-dim tensor, a 1-D tensor of {size} per-member weights, "
        f"a {spec.model_class.__name__} or a Particle of one, or a Swarm of them, got {type(other).__name__}"
    )


def _pick(value: Operand, group: int) -> Any:
    return value[group] if isinstance(value, list) else value


@torch.no_grad()
def combine(op: lw.Op, spec: Spec, flats: Sequence[Tensor], *operands: Operand) -> list[Tensor]:
    """New flat buffers: ``op`` on every arithmetic group, the others cloned (expanded if the result grew)."""
    out: list[Optional[Tensor]] = [
        op.leaf(flat, *(_pick(o, g) for o in operands)) if group.active else None
        for g, (flat, group) in enumerate(zip(flats, spec.groups))
    ]
    rows = max((t.shape[0] for t in out if t is not None), default=flats[0].shape[0] if flats else 0)
    return [
        t if t is not None else (flat.clone() if flat.shape[0] == rows else flat.expand(rows, -1).clone())
        for t, flat in zip(out, flats)
    ]


def _unaliased(flats: Sequence[Tensor], operands: Sequence[Operand]) -> list[Operand]:
    """``operands`` with every tensor that shares memory with ``flats`` copied.

    An operand can be the swarm itself, read while it is written: ``s += s[0]`` broadcasts a
    view of member 0 over every row of its buffer, which torch refuses half-way through the
    groups.  Copied first, every member reads the values from before the step, as
    ``s = s + s[0]`` would.
    """
    if not any(isinstance(operand, (Tensor, list)) for operand in operands):
        return list(operands)  # numbers cannot alias
    written = {flat.untyped_storage().data_ptr() for flat in flats}
    return [_copied(operand, written) for operand in operands]


def _copied(value: Any, written: set[int]) -> Any:
    """``value`` (a tensor, a list of them, or a number) with tensors in ``written`` storage cloned."""
    if isinstance(value, Tensor) and value.untyped_storage().data_ptr() in written:
        return value.clone()
    if isinstance(value, list):
        return [_copied(item, written) for item in value]
    return value


def check_numbers_fit(fn: str, spec: Spec, flats: Sequence[Tensor], write: Callable[..., Any],
                      *operands: Operand) -> None:
    """Raise before writing when torch would refuse a number for some arithmetic group half-way through.

    torch converts some numbers to each tensor's dtype with an overflow check (an ``alpha`` of ``1e10``
    on float16, ``t[0] = 1e39`` on float32) and refuses only when it reaches that tensor, after the
    groups before it were written.  ``write(scratch, *operands)`` is tried first on a CPU scratch shaped
    like each arithmetic group's flat buffer (its members, with at most two values each: torch 2.15 checks
    an item assignment of more than one element, not of one; tensor operands replaced by zeros), for
    numbers beyond float16's range only.

    >>> from nytorch import Swarm
    >>> s = Swarm.zeros(torch.nn.Linear(1, 1), 2)
    >>> check_numbers_fit("add_", s._spec, s._flats, lambda t, x: t.add_(1.0, alpha=x), 1e39)
    Traceback (most recent call last):
        ...
    RuntimeError: add_: torch cannot apply the number 1e+39 to parameter 'weight' (float32): value cannot be ...
    """
    big = [o for o in operands if isinstance(o, (int, float, complex)) and not isinstance(o, bool)
           and scalars.magnitude(o) > scalars.SAFE_MAGNITUDE]
    if not big:
        return
    for g, (group, flat) in enumerate(zip(spec.groups, flats)):
        if not group.active:
            continue
        scratch = torch.zeros(flat.shape[0], min(flat.shape[1], 2), dtype=group.dtype)
        args = [torch.zeros(1, 1, dtype=group.dtype) if isinstance(_pick(o, g), Tensor) else _pick(o, g)
                for o in operands]
        try:
            write(scratch, *args)
        except RuntimeError as error:
            raise RuntimeError(f"{fn}: torch cannot apply the number {big[0]!r} to parameter {spec.leaf_name(g)!r} "
                               f"({str(group.dtype).removeprefix('torch.')}): {error}; nothing was changed") from error


def check_writable(fn: str, spec: Spec, flats: Sequence[Tensor], active_only: bool) -> None:
    """Raise before writing when a group to be written (only arithmetic ones with ``active_only``) holds
    inference tensors outside ``torch.inference_mode()``: torch would refuse half-way through."""
    if torch.is_inference_mode_enabled():
        return
    for g, (flat, group) in enumerate(zip(flats, spec.groups)):
        if flat.is_inference() and (group.active or not active_only):
            name = spec.leaf_name(g)
            kind = "parameter" if spec.names.index(name) < spec.n_params else "buffer"
            raise RuntimeError(f"{fn}: {kind} {name!r} is an inference tensor and cannot be updated in place "
                               "outside torch.inference_mode(); clone the swarm outside inference mode first "
                               "(swarm.clone())")


@torch.no_grad()
def combine_(op: lw.Op, spec: Spec, flats: Sequence[Tensor], *operands: Operand, fn: Optional[str] = None) -> None:
    """In place: ``op`` on every arithmetic group (callers validated every operand first).

    Raises ``TypeError`` before writing anything when torch has no such in-place kernel for some
    group's dtype (``_probe.check_``: float8 has none of them).

    >>> from nytorch import Swarm
    >>> s = Swarm.zeros(torch.nn.Linear(1, 1), 2) + torch.tensor([1.0, 2.0])
    >>> s += s[0]  # calls this; every member adds member 0 as it was before the step
    >>> s.params["bias"].flatten()
    tensor([2., 3.])
    """
    groups = spec.groups
    dtypes = [group.dtype for group in groups]
    if not probe.KNOWN.issuperset(dtypes):
        probe.check_(fn or op.name, op, flats, dtypes, operands, lambda g: f"parameter {spec.leaf_name(g)!r}",
                     [group.active for group in groups])
    operands = tuple(_unaliased(flats, operands))
    for g, (flat, group) in enumerate(zip(flats, spec.groups)):
        if not group.active:
            continue
        args = [_pick(o, g) for o in operands]
        if op.leaf_ is not None:
            op.leaf_(flat, *args)
        else:
            flat.copy_(op.leaf(flat, *args))


def _add(a: Tensor, b: Any, alpha: Any) -> Tensor:
    return torch.add(a, b, alpha=alpha)


def _add_(a: Tensor, b: Any, alpha: Any) -> Tensor:
    return a.add_(b, alpha=alpha)


#: ``a + alpha * b`` in one kernel (``torch.add(a, b, alpha=alpha)``).
AXPY = lw.Op("add", _add, leaf_=_add_)


def lerp_operands(fn: str, spec: Spec, size: int, end: object, weight: object, inplace: bool) -> list[Operand]:
    """``end`` and ``weight`` converted for ``torch.lerp`` (tensor ends, weights in each group's dtype)."""
    if scalars.is_scalar(end):
        operand(fn, spec, size, end)
        converted_end: Operand = [torch.as_tensor(end, dtype=g.dtype, device=g.device) for g in spec.groups]
    else:
        converted_end = operand(fn, spec, size, end, inplace=inplace)
    converted = operand(fn, spec, size, weight, inplace=inplace)
    if isinstance(weight, Tensor) and weight.dim() == 0:
        converted = [weight.detach().to(dtype=g.dtype, device=g.device) for g in spec.groups]
    return [converted_end, converted]


@torch.no_grad()
def mixed(fn: str, spec: Spec, flats: Sequence[Tensor], size: int, weights: Tensor) -> list[Tensor]:
    """``weights @ flat`` per arithmetic group for a ``[Q, P]`` matrix; other groups repeat member 0."""
    if size == 0:
        raise ValueError(f"{fn}: expected a swarm with at least one member, got an empty swarm")
    out = []
    for g, (flat, group) in enumerate(zip(flats, spec.groups)):
        if not group.active:
            out.append(flat[:1].expand(weights.shape[0], -1).clone())
            continue
        cast = _weights_for(fn, spec, weights, g)
        with nocast.off([flat]):  # autocast would compute (and return) the mix in bf16/fp16
            out.append(cast @ flat)
    return out


@torch.no_grad()
def mean_rows(spec: Spec, flats: Sequence[Tensor], size: int) -> list[Tensor]:
    """The average member as ``[1, width]`` rows (non-arithmetic groups: member 0's)."""
    if size == 0:
        raise ValueError("mean: expected a swarm with at least one member, got an empty swarm")
    return [flat.mean(0, keepdim=True) if group.active else flat[:1].clone()
            for flat, group in zip(flats, spec.groups)]


@torch.no_grad()
def norms(spec: Spec, flats: Sequence[Tensor], size: int) -> Tensor:
    """Per-member L2 norm over the arithmetic groups, shape ``(P,)``, on the first arithmetic group's device
    (as ``nf.norm``: a swarm may span devices); zeros on the first group's device (or the CPU) when none is."""
    parts = [torch.linalg.vector_norm(flat, dim=1) for flat, group in zip(flats, spec.groups) if group.active]
    if not parts:
        return torch.zeros(size, device=spec.groups[0].device if spec.groups else "cpu")
    dtype = parts[0].dtype
    for value in parts[1:]:
        dtype = torch.promote_types(dtype, value.dtype)
    device = parts[0].device
    return torch.linalg.vector_norm(nocast.stack([value.to(device=device, dtype=dtype) for value in parts]), dim=0)
