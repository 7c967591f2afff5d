"""Particle algebra on aligned leaf lists, honouring ``ParamConfig`` (shared by Particle and NytoModule).

A "state" here is ``(names, leaves)``: parameter names in ``named_parameters()``
order and the tensors aligned with them.  Operands are other states or scalars.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Optional, TypeVar

import torch

from . import _leafwise as lw
from . import _scalars as scalars
from ._config import ParamConfig
from ._errors import StructureError, describe

Tensor = torch.Tensor
F = TypeVar("F", bound=Callable[..., Any])


def without_grad(fn: F) -> F:
    """``torch.no_grad()`` as a decorator, minus its per-call context-object overhead."""
    set_grad = torch._C._set_grad_enabled

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        previous = torch.is_grad_enabled()
        set_grad(False)
        try:
            return fn(*args, **kwargs)
        finally:
            set_grad(previous)
    return wrapper  # type: ignore[return-value]


def check_names(fn: str, names: Sequence[str], other_names: Sequence[str],
                other: str = "the second operand", reference: str = "the first operand", *,
                kind: str = "parameter") -> None:
    """Raise ``StructureError`` naming the first parameter present in one operand only, or out of place.

    ``other`` names the side of ``other_names`` in messages, ``reference`` the side of ``names``,
    ``kind`` what the names are (``"buffer"``).

    >>> check_names("add", ["a", "b"], ["b", "a"])
    Traceback (most recent call last):
    ...
    nytorch._errors.StructureError: add: the second operand lists the same parameters in another order: parameter 'a' is at position 0 in the first operand but 1 in the second operand; models must register their parameters in the same order
    """
    if list(names) == list(other_names):
        return
    other_set, own_set = set(other_names), set(names)
    for name in names:
        if name not in other_set:
            raise StructureError(f"{fn}: {kind} {name!r} is missing from {other}")
    for name in other_names:
        if name not in own_set:
            raise StructureError(f"{fn}: {other} has an extra {kind} {name!r}")
    position, name = next((k, a) for k, (a, b) in enumerate(zip(names, other_names)) if a != b)
    raise StructureError(f"{fn}: {other} lists the same {kind}s in another order: {kind} {name!r} is "
                         f"at position {position} in {reference} but {list(other_names).index(name)} in {other}; "
                         f"models must register their {kind}s in the same order")


def check_state(fn: str, names: Sequence[str], leaves: Sequence[Tensor],
                other_names: Sequence[str], other_leaves: Sequence[Tensor],
                signatures: Optional[tuple[object, object]] = None) -> None:
    """Names, then shapes, dtypes and devices, must all agree.

    ``signatures`` (cached ``lw.signature`` of both sides) turns the common case into
    one tuple comparison; the leaf-by-leaf check only runs to name a difference.
    """
    if names is not other_names and list(names) != list(other_names):
        # report the first difference in named_parameters() order: a shape/dtype one may come first
        for i, (name, other_name) in enumerate(zip(names, other_names)):
            if name != other_name:
                break
            lw.check_pairs(fn, names[i:i + 1], leaves[i:i + 1], other_leaves[i:i + 1])
        check_names(fn, names, other_names)
    if signatures is not None and (signatures[0] is signatures[1] or signatures[0] == signatures[1]):
        return
    lw.check_pairs(fn, names, leaves, other_leaves)


def active_mask(leaves: Sequence[Tensor], configs: Optional[Sequence[ParamConfig]]) -> list[bool]:
    if configs is None:
        return [leaf.is_floating_point() or leaf.is_complex() for leaf in leaves]
    return [config.operational and lw.is_arithmetic(leaf) for leaf, config in zip(leaves, configs)]


def _carry(leaves: Sequence[Tensor], out: list[Tensor], active: Sequence[bool],
           configs: Optional[Sequence[ParamConfig]]) -> list[Tensor]:
    for i, on in enumerate(active):
        if not on:
            keep = configs is not None and not configs[i].clone and not configs[i].operational
            out[i] = leaves[i] if keep else leaves[i].detach().clone()
    return out


def _identity(leaf: Tensor) -> Tensor:
    return leaf


@without_grad
def combine(op: lw.Op, names: Sequence[str], leaves: Sequence[Tensor], *operands: object,
            configs: Optional[Sequence[ParamConfig]] = None, reflected: bool = False) -> list[Tensor]:
    """New leaves: ``op(leaf, *operands)`` on operational leaves, the rest carried per config.

    Each operand is a leaf list (already checked with ``check_state``) or a scalar.
    """
    active = active_mask(leaves, configs)
    for operand in operands:
        if not isinstance(operand, (list, tuple)):
            scalars.check_scalar(op.name, operand, names, leaves, active, reflected)
    out = lw.apply(op, leaves, *operands, active=active, carry=_identity)
    return out if all(active) else _carry(leaves, out, active, configs)


@without_grad
def combine_(op: lw.Op, names: Sequence[str], leaves: Sequence[Tensor], *operands: object,
             configs: Optional[Sequence[ParamConfig]] = None) -> None:
    """In place: ``op`` on every operational leaf; validated before anything is written."""
    active = active_mask(leaves, configs)
    for operand in operands:
        if not isinstance(operand, (list, tuple)):
            scalars.check_scalar(op.name, operand, names, leaves, active)
            scalars.check_converted(op.name, operand, lambda: [
                (name, leaf.dtype) for name, leaf, on in zip(names, leaves, active) if on])
    check_writable(op.name, names, leaves, active)
    lw.apply_(op, leaves, *operands, active=written_once(leaves, active))


def written_once(leaves: Sequence[torch.Tensor], active: list[bool]) -> list[bool]:
    """``active`` less the leaves over the very memory of an earlier active leaf (written once, not twice).

    Distinct tensors can be one tensor under two names: a buffer registered as a parameter's
    ``Parameter`` or its ``.data`` (or a view of all of it, ``.view(-1)``, ``.t()``), two Parameters
    over one storage.  Packed models have none (packing refuses them); the address check is skipped
    under ``torch.func`` transforms, which have no addresses.

    >>> w = torch.ones(2, 2)
    >>> written_once([w, w.detach(), w[:1], w.t()], [True, True, True, True])
    [True, False, True, False]
    """
    if lw.transforms_active() or len(set(map(torch.Tensor.data_ptr, leaves))) == len(leaves):
        return active
    seen: set[Footprint] = set()
    once = list(active)
    for i, leaf in enumerate(leaves):
        key = footprint(leaf) if once[i] else None
        if key is None:
            continue
        if key in seen:
            once[i] = False
        seen.add(key)
    return once


#: The memory a tensor covers (see ``footprint``).
Footprint = tuple[object, ...]


def footprint(leaf: torch.Tensor) -> Optional[Footprint]:
    """The memory ``leaf`` covers, equal for two tensors over exactly the same elements; ``None`` for
    an empty or meta tensor (every meta tensor sits at address 0).

    A dense, non-overlapping tensor covers one span whatever its shape and strides (``w``,
    ``w.view(-1)``, ``w.t()``); any other is told by its shape and strides too.

    >>> w = torch.ones(2, 3)
    >>> footprint(w) == footprint(w.t()) == footprint(w.view(-1)), footprint(w) == footprint(w[0])
    (True, False)
    """
    if not leaf.numel() or leaf.device.type == "meta":
        return None
    if _dense(leaf):
        return leaf.data_ptr(), leaf.numel(), leaf.dtype
    return leaf.data_ptr(), tuple(leaf.shape), tuple(leaf.stride()), leaf.dtype


def _dense(leaf: torch.Tensor) -> bool:
    """Whether ``leaf``'s elements fill one span of memory without gaps or overlaps, in any order."""
    expected = 1
    for size, stride in sorted(((size, stride) for size, stride in zip(leaf.shape, leaf.stride()) if size != 1),
                               key=lambda pair: pair[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def check_writable(fn: str, names: Sequence[str], leaves: Sequence[Tensor],
                   active: Optional[Sequence[bool]] = None) -> None:
    """Raise before writing anything when some leaf cannot be written in place.

    Expanded views (several elements sharing memory) and inference tensors outside
    inference mode would make torch fail half-way through an in-place update.
    """
    inference = torch.is_inference_mode_enabled()
    for i, (name, leaf) in enumerate(zip(names, leaves)):
        if active is not None and not active[i]:
            continue
        if leaf.is_inference() and not inference:
            raise RuntimeError(f"{fn}: parameter {name!r} is an inference tensor and cannot be updated in place "
                               "outside torch.inference_mode(); clone the model outside inference mode first")
        if torch._debug_has_internal_overlap(leaf) == 1:
            raise RuntimeError(f"{fn}: parameter {name!r} ({describe(leaf)}) has elements sharing memory "
                               "(an expanded view) and cannot be updated in place; use .contiguous() parameters")


@without_grad
def map_unary(fn: Callable[[Tensor], Tensor], leaves: Sequence[Tensor],
              configs: Optional[Sequence[ParamConfig]] = None) -> list[Tensor]:
    """``fn(leaf)`` on operational leaves (e.g. ``torch.randn_like``); the rest carried per config."""
    active = active_mask(leaves, configs)
    out = [fn(leaf) if on else leaf for leaf, on in zip(leaves, active)]
    return _carry(leaves, out, active, configs)


@without_grad
def clone_all(leaves: Sequence[Tensor], configs: Optional[Sequence[ParamConfig]] = None) -> list[Tensor]:
    """Clones of every leaf, except non-operational ``clone=False`` ones which are kept as is."""
    if configs is None:
        return [leaf.detach().clone() for leaf in leaves]
    return [leaf if (not config.operational and not config.clone) else leaf.detach().clone()
            for leaf, config in zip(leaves, configs)]


@without_grad
def custom(fn: Callable[..., Tensor], leaves: Sequence[Tensor], others: Sequence[Sequence[Tensor]],
           configs: Optional[Sequence[ParamConfig]]) -> list[Tensor]:
    """nytorch 1.1's ``unary_operator`` / ``binary_operator``: ``fn(*leaves_at_i, config)`` for every leaf."""
    default = ParamConfig()
    return [
        fn(leaf, *(other[i] for other in others), default if configs is None else configs[i])
        for i, leaf in enumerate(leaves)
    ]


def fresh_parameters(leaves: Sequence[Tensor], configs: Optional[Sequence[ParamConfig]]) -> list[Tensor]:
    """Leaves ready for ``rebuild``: Parameter objects are reused only where a config says ``clone=False``."""
    plain = torch.Tensor  # ``type() is`` first: Parameter's isinstance goes through a Python metaclass hook
    return [
        leaf if type(leaf) is plain else leaf.detach() if isinstance(leaf, torch.nn.Parameter) and (
            configs is None or configs[i].operational or configs[i].clone) else leaf
        for i, leaf in enumerate(leaves)
    ]
