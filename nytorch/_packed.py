"""Arithmetic on packed models: one kernel per buffer, results born packed.

A model is packed on first use (``_packing.pack_``): its floating parameters become
views into one buffer per (device, dtype).  The ``Flat`` over those buffers is
remembered per model while its layout holds (same Parameter objects at the same
addresses, which ``layout_of`` checks anyway), so an operator costs one layout
check per operand and one kernel per buffer, written into a dead result's buffers
when ``_pool`` has some (``_kernels``).  The result is a ``Pending`` one (``_pending``): its
module tree is built on first touch, with Parameters that are views into the output buffers,
and it is remembered as packed in turn.  Anything this path does not cover (another class, a Particle with
buffers, a model that cannot be packed, configs changed since) returns ``None``
and the caller takes the per-leaf path, which also raises the informative errors.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch import nn

from . import _leafwise as lw
from . import _probe as probe
from . import _scalars as scalars
from ._config import ParamConfig, configs_for
from ._errors import describe
from ._flat import Flat, FlatPlan, find_flat, plan_for, written
from ._packing import PACKED, pack_
from ._kernels import check_converted, check_kernel_, compute, kernel_, readable, writable
from ._pending import pending_result, snapshot_of
from ._walk import _CACHE, PENDING, Layout, layout_of, model_class

Tensor = torch.Tensor

__all__ = ["packed", "known", "binary", "binary_", "unary", "carried", "active_for", "flat_operands"]

_LOOKED = "looked"  # ``Layout.packing``: looked without packing (``pack=False``), not packed


def known(model: nn.Module) -> Any:
    """What is known about ``model``'s packing: its ``Flat``, ``False`` (cannot be packed) or ``None``.

    >>> known(torch.nn.Linear(1, 1)) is None
    True
    """
    stored = _CACHE.get(model)
    found = None if stored is None else stored.packing[0]
    return None if found is _LOOKED else found


def active_for(signature: Sequence[tuple], configs: Optional[Sequence[ParamConfig]]) -> tuple[bool, ...]:
    """Which leaves take part in arithmetic: floating or complex, and operational.

    >>> active_for([(torch.Size([1]), torch.float32, None), (torch.Size([1]), torch.int64, None)], None)
    (True, False)
    """
    return tuple((dtype.is_floating_point or dtype.is_complex) and (configs is None or configs[i].operational)
                 for i, (_, dtype, _) in enumerate(signature))


def _find(layout: Layout) -> Optional[Flat]:
    found = find_flat(plan_for(layout.signature, active_for(layout.signature, configs_for(layout))), layout.params)
    if found is not None:
        found.placement = None  # ``layout_of`` compares where the parameters are on every call
    return found


def packed(model: nn.Module, pack: bool = True, layout: Optional[Layout] = None) -> Optional[tuple[Layout, Flat]]:
    """``model``'s layout and the flat buffers its parameters view, packing it first if ``pack``.

    Returns ``None`` when the model is not packed (``pack=False``) or cannot be (see ``_packing.pack_``).
    ``layout``, when given, is ``layout_of(model)`` taken just before by the caller.
    Operators pack a model only once its operands are known to be valid (``_first_use``), so
    that an operation that raises leaves its operands exactly as they were, storage included.

    >>> net = torch.nn.Linear(2, 1)
    >>> packed(net, pack=False) is None
    True
    >>> layout, flat = packed(net)
    >>> flat.buffers[0].numel(), net.bias.data_ptr() - net.weight.data_ptr()
    (3, 8)
    """
    if layout is None:
        layout = layout_of(model)
    cell = layout.packing  # shared with the layout ``layout_of`` keeps for ``model``: gone when the tree changes
    seen = cell[0]
    if seen is not None and seen is not _LOOKED:
        return None if seen is False else (layout, seen)
    if not pack:
        if seen is None:  # packed already (e.g. ``flatten_``), or not yet
            found = _find(layout)
            cell[0] = _LOOKED if found is None else found
            return None if found is None else (layout, found)
        return None
    if not pack_(model):
        layout_of(model).packing[0] = False
        return None
    layout = layout_of(model)  # the storage moved: a new layout
    found = _find(layout)
    layout.packing[0] = False if found is None else found
    return None if found is None else (layout, found)


def carried(flat: Flat, configs: Optional[Sequence[ParamConfig]]) -> dict[int, Tensor]:
    """The inactive leaves of a result: cloned, or shared where a config says ``clone=False``."""
    if not flat.rest:
        return {}
    return {i: leaf if configs is not None and not configs[i].operational and not configs[i].clone
            else leaf.detach().clone() for i, leaf in flat.rest.items()}


def _current(model: nn.Module, pack: bool = False, layout: Optional[Layout] = None
             ) -> Optional[tuple[Layout, Flat, Optional[list[ParamConfig]]]]:
    """``packed(model, pack, layout)`` plus its configs, or ``None`` when they no longer match the packing.

    ``None`` too under ``torch.func`` transforms, whose tensors have no address to find buffers by.
    """
    if lw.transforms_active():  # under vmap / grad a scalar may be batched: per leaf, where torch batches it
        return None
    pending = model.__dict__.get(PENDING)
    flat = None if pending is None else pending.flat
    if flat is not None:
        layout = pending.layout  # type: ignore[union-attr]
    else:  # not a pending result, or one another thread has just built (``Pending.realize``)
        found = packed(model, pack, layout if layout is None or layout.modules else None)
        if found is None:
            return None
        layout, flat = found
    configs = configs_for(layout)
    if configs is not None and active_for(layout.signature, configs) != flat.plan.active:
        return None
    return layout, flat, configs


_PARTICLE: list[Any] = []


def _particle_class() -> Any:
    if not _PARTICLE:
        from ._particle import Particle  # local: _particle builds on this module
        _PARTICLE.append(Particle)
    return _PARTICLE[0]


def _real_number(other: object, flat: Flat) -> bool:
    """True for a Python number that can never change ``flat``'s (floating) dtypes: nothing to check."""
    kind = type(other)
    return (kind is float or (kind is int and scalars.in_int_range(other))) and flat.plan.floating  # type: ignore[arg-type]


def flat_operands(fn: str, cls: type, names: Sequence[str], signature: tuple, flat: Flat,
                  others: Sequence[object], reflected: bool, inplace: Optional[lw.Op] = None) -> Optional[list[object]]:
    """``others`` as ``Flat``s (or scalars) aligned with ``flat``, or ``None`` for the per-leaf path.

    Scalars are checked against the buffers' dtypes first (that raises), and with ``inplace`` (the op
    about to write ``flat``) the kernels torch has for them (``_probe``); only then are models of class
    ``cls`` and the same structure packed (on first use), so that a call that raises or answers ``None``
    leaves every operand's storage as it was.  Particles must be flat already.  Anything else, or a
    structure that differs, answers ``None``: the per-leaf path then raises the informative error.
    """
    Particle = _particle_class()
    for other in others:  # every scalar (``lerp``'s weight comes after its end) before any model is packed
        if _real_number(other, flat):
            continue  # a real number never changes a floating dtype
        if scalars.is_scalar(other):
            if isinstance(other, Tensor) and _promotes_zero_dim(flat.plan, other):
                return None  # per tensor, a 0-dim leaf computes with it in the promoted dtype; a buffer would not
            firsts = [names[index[0]] for index in flat.plan.groups]
            # each group's first leaf as a view: an error names its shape, not the buffer's
            leaves = [buffer[:likes[0].numel()].view(likes[0].shape) for buffer, likes in zip(flat.raw, flat.plan.likes)]
            scalars.check_scalar(fn, other, firsts, leaves, [True] * len(firsts), reflected)
        elif not isinstance(other, (nn.Module, Particle)):
            return None
    if inplace is not None:
        check_kernel_(inplace, names, flat, others)
    operands: list[object] = []
    for other in others:
        if _real_number(other, flat) or scalars.is_scalar(other):
            operands.append(other)
            continue
        other_names: Sequence[str]
        other_flat: Optional[Flat]
        if isinstance(other, nn.Module):
            if model_class(other) is not cls:
                return None
            structure = _structure(other)  # a pending result's tree is not built for this
            if not _same_structure(structure, names, signature):
                return None  # checked before packing: a refused operand keeps its storage
            found = _current(other, pack=True, layout=structure)
            if found is None:
                return None
            other_names, other_signature, other_flat = found[0].names, found[0].signature, found[1]
        elif isinstance(other, Particle) and other.model_class is cls:
            other_names, other_signature, other_flat = other._names, other._signature, other._flat_form()
        else:
            return None
        if other_flat is None or (other_flat.plan is not flat.plan and (
                other_flat.plan.active != flat.plan.active or other_flat.plan.groups != flat.plan.groups)):
            return None
        if other_names is not names and other_names != names:
            return None
        if other_signature is not signature and other_signature != signature:
            return None
        operands.append(other_flat)
    return operands


_ZERO_DIM: dict[FlatPlan, frozenset[torch.dtype]] = {}


def _promotes_zero_dim(plan: FlatPlan, scalar: Tensor) -> bool:
    """True when ``plan`` packs a 0-dim leaf whose dtype the 0-dim tensor ``scalar`` would promote.

    ``torch.mul(leaf, scalar)`` for two 0-dim tensors computes in their promoted dtype (nytorch
    then casts back), where the buffer holding the leaf, 1-D, would compute in its own: the two
    round differently, so such operations run per leaf.

    >>> plan = plan_for([(torch.Size([]), torch.float16, torch.device("cpu"))], [True])
    >>> _promotes_zero_dim(plan, torch.tensor(0.7)), _promotes_zero_dim(plan, torch.tensor(0.7).half())
    (True, False)
    """
    found = _ZERO_DIM.get(plan)
    if found is None:
        if len(_ZERO_DIM) >= 256:  # plans are interned and bounded alike (``_flat.plan_for``)
            _ZERO_DIM.clear()
        found = _ZERO_DIM[plan] = frozenset(
            dtype for dtype, likes in zip(plan.dtypes, plan.likes) if any(like.dim() == 0 for like in likes))
    return any(torch.promote_types(dtype, scalar.dtype) != dtype for dtype in found)


def _structure(model: nn.Module) -> Layout:
    """``layout_of(model)``, or a pending result's layout (without building its tree)."""
    pending = model.__dict__.get(PENDING)
    return layout_of(model) if pending is None else pending.layout  # type: ignore[no-any-return]


def _same_structure(layout: Layout, names: Sequence[str], signature: tuple) -> bool:
    return ((layout.names is names or layout.names == names)
            and (layout.signature is signature or layout.signature == signature))


def _first_use(model: nn.Module, fn: str, others: Sequence[object], reflected: bool,
               inplace: Optional[lw.Op] = None) -> Optional[tuple[Layout, Flat, Optional[list[ParamConfig]]]]:
    """``_current(model)``, packing ``model`` first when every operand is one the packed path takes.

    Operands are checked against the model's layout before anything moves: a scalar of a dtype
    the model cannot hold raises here, as on the per-tensor path, and so does an ``inplace`` op torch
    has no kernel for on some dtype of the model (``_probe``); any other operand the packed
    path would refuse answers ``None``, and the per-tensor path raises its error.  (Model operands
    are packed later, by ``flat_operands``: they have the model's dtypes, checked here first.)
    """
    found = _current(model)
    if found is not None:
        return found  # (``flat_operands`` checks ``inplace``'s kernels before packing a model operand)
    Particle = _particle_class()
    layout, cls = layout_of(model), model_class(model)
    for other in others:
        if scalars.is_scalar(other):
            # the leaves that take part: a non-operational one keeps its dtype whatever the scalar
            active = active_for(layout.signature, configs_for(layout))
            scalars.check_scalar(fn, other, layout.names, layout.params, active, reflected)
        elif isinstance(other, nn.Module):
            if model_class(other) is not cls or not _same_structure(_structure(other), layout.names, layout.signature):
                return None
        elif not (isinstance(other, Particle) and other.model_class is cls
                  and (other._names is layout.names or other._names == layout.names)
                  and (other._signature is layout.signature or other._signature == layout.signature)):
            return None
    if inplace is not None:
        signature, params = layout.signature, layout.params
        probe.check_(fn, inplace, params, [dtype for _, dtype, _ in signature], others,
                     lambda i: f"parameter {layout.names[i]!r} ({describe(params[i])})",
                     active_for(signature, configs_for(layout)))
    return _current(model, pack=True)


def _prepared(model: nn.Module, fn: str, others: Sequence[object], reflected: bool, inplace: Optional[lw.Op] = None
              ) -> Optional[tuple[Layout, Flat, Optional[list[ParamConfig]], list[object]]]:
    """The packed layout, buffers and configs of ``model`` with its operands as buffers, or ``None``.

    ``inplace``: the op about to write ``model``, checked (``_probe``) before anything is packed.
    """
    found = _first_use(model, fn, others, reflected, inplace)
    if found is None:
        return None
    layout, flat, configs = found
    packs = PACKED[0]
    operands = flat_operands(fn, model_class(model), layout.names, layout.signature, flat, others, reflected, inplace)
    if operands is None:
        return None
    if PACKED[0] != packs and model.__dict__.get(PENDING) is None:
        again = _current(model)
        if again is None or again[1] is not flat:
            return None  # packing an operand moved a Parameter ``model`` shares with it: per leaf then
    return layout, flat, configs, operands


def binary(model: nn.Module, op: lw.Op, others: Sequence[object], reflected: bool = False) -> Optional[nn.Module]:
    """``op(model, *others)`` as one kernel per buffer, or ``None`` when the packed path does not apply.

    >>> net = torch.nn.Linear(2, 1)
    >>> torch.equal(binary(net, lw.ADD, [net]).weight, 2 * net.weight)
    True
    """
    prepared = _common(model, others[0]) if len(others) == 1 else None
    if prepared is None:
        prepared = _prepared(model, op.name, others, reflected)
        if prepared is None:
            return None
    layout, flat, configs, operands = prepared
    rest = carried(flat, configs) if flat.rest else {}
    snapshot = snapshot_of(model, layout)
    return pending_result(snapshot, configs, compute(op, flat, operands, rest))


def _common(model: nn.Module, other: object
            ) -> Optional[tuple[Layout, Flat, Optional[list[ParamConfig]], list[object]]]:
    """``_prepared`` for the common case, in fewer steps: packed operands, a Python number or a model.

    ``model`` packed (or pending) and ``other`` a Python number (on floating buffers) or a model of
    the same class, packed or pending, with the same structure and plan; anything else answers
    ``None`` and goes the general way.
    """
    found = _current(model)  # packed already (or pending): packing waits for the general path's checks
    if found is None:
        return None
    layout, flat, configs = found
    kind = type(other)
    if kind is float or (kind is int and scalars.in_int_range(other)):  # type: ignore[arg-type]
        return (layout, flat, configs, [other]) if flat.plan.floating else None
    if kind is not type(model):
        return None
    theirs = _current(other)  # type: ignore[arg-type]
    if theirs is None or theirs[1].plan is not flat.plan:
        return None
    if theirs[0].names is not layout.names or theirs[0].signature is not layout.signature:
        return None
    return layout, flat, configs, [theirs[1]]


def binary_(model: nn.Module, op: lw.Op, others: Sequence[object]) -> bool:
    """``op`` in place on ``model``'s buffers; ``False`` (nothing written) when the packed path does not apply.

    >>> net = torch.nn.Linear(2, 1)
    >>> expected = net.weight * 3
    >>> binary_(net, lw.MUL, [3.0]), torch.equal(net.weight, expected)
    (True, True)
    """
    prepared = _prepared(model, op.name, others, False, op)  # (kernels checked there, before any packing)
    if prepared is None:
        return False
    layout, flat, _, operands = prepared
    check_converted(op.name, layout.names, flat, operands)
    kernel_(op, writable(op.name, layout.names, flat), readable(operands))
    written(layout.params, flat.plan)  # (a result not built yet has no Parameters to tell)
    return True


def unary(model: nn.Module, make: Callable[[Flat], list[Tensor]]) -> Optional[nn.Module]:
    """A new model from ``make(flat) -> buffers`` (clone, random fills), or ``None`` off the packed path.

    >>> net = torch.nn.Linear(2, 1)
    >>> torch.equal(unary(net, lambda flat: [b.clone() for b in flat.buffers]).weight, net.weight)
    True
    """
    found = _first_use(model, "clone", (), False)
    if found is None:
        return None
    layout, flat, configs = found
    snapshot = snapshot_of(model, layout)
    with torch.no_grad():
        buffers = make(flat)
    return pending_result(snapshot, configs, Flat(flat.plan, buffers, carried(flat, configs), owned=True))


