"""Particle algebra on aligned leaf lists, honouring ``ParamConfig`` (shared by Particle and NytoModule).

A "state" here is ``(names, leaves)``: parameter names in ``named_parameters()``
order and the tensors aligned with them.  Operands are other states or scalars.
"""
from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional, TypeVar, Union

import torch
from torch._subclasses.fake_tensor import FakeTensor

from . import _leafwise as lw
from . import _probe as probe
from . import _scalars as scalars
from ._config import ParamConfig
from ._errors import StructureError, describe
from ._walk import addresses, storage_key

Tensor = torch.Tensor
F = TypeVar("F", bound=Callable[..., Any])
_DTYPE = operator.attrgetter("dtype")


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


def active_mask(leaves: Sequence[Tensor], configs: Optional[Sequence[ParamConfig]],
                dtypes: Optional[Sequence[torch.dtype]] = None) -> list[bool]:
    """Which leaves take part in arithmetic: floating or complex, and operational (``dtypes``: theirs, if read).

    >>> active_mask([torch.ones(1), torch.tensor([1])], None)
    [True, False]
    """
    if dtypes is not None:
        arithmetic = lw.arithmetic_dtypes(dtypes)
        return arithmetic if configs is None else [
            config.operational and on for on, config in zip(arithmetic, configs)]
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
    """In place: ``op`` on every operational leaf; validated before anything is written.

    Torch's own refusals are checked for first: a number it cannot convert (``check_converted``), a leaf
    it cannot write (``check_writable``), a dtype it has no such kernel for (``_probe.check_``).
    """
    dtypes = list(map(_DTYPE, leaves))  # read once, for the mask and the kernel check
    active = active_mask(leaves, configs, dtypes)
    for operand in operands:
        if not isinstance(operand, (list, tuple)):
            scalars.check_scalar(op.name, operand, names, leaves, active)
            scalars.check_converted(op.name, operand, lambda: [
                (name, leaf.dtype) for name, leaf, on in zip(names, leaves, active) if on])
    check_writable(op.name, names, leaves, active)
    probe.check_(op.name, op, leaves, dtypes, operands,
                 lambda i: f"parameter {names[i]!r} ({describe(leaves[i])})", active)
    lw.apply_(op, leaves, *operands, active=written_once(leaves, active))


#: Where a leaf's elements start (see ``address``).
Address = Union[int, tuple[int, int]]

#: What two tied leaves share (see ``tie_key``).
TieKey = tuple[Address, tuple[int, ...], tuple[int, ...], torch.dtype]


def address(leaf: torch.Tensor) -> Address:
    """Where ``leaf``'s elements start: its data pointer, or for a ``FakeTensor`` its storage and byte offset.

    A FakeTensor has no memory (every one sits at address 0) and torch deprecates reading its data
    pointer; its storage object tells two fake tensors apart as the pointer tells real ones.

    >>> w = torch.ones(2, 2)
    >>> address(w) == w.data_ptr(), address(w[1]) - address(w)
    (True, 8)
    """
    if isinstance(leaf, FakeTensor):
        return storage_key(leaf), int(leaf.storage_offset()) * leaf.element_size()
    return leaf.data_ptr()


def tie_key(leaf: torch.Tensor) -> Optional[TieKey]:
    """What two tied leaves share (their memory and its layout); ``None`` for an empty or meta leaf, tied to nothing.

    >>> weight = torch.ones(2, 2)
    >>> tie_key(weight) == tie_key(weight.detach()), tie_key(weight) == tie_key(weight[0])
    (True, False)
    """
    if not leaf.numel() or leaf.device.type == "meta":  # every meta tensor sits at address 0
        return None
    return address(leaf), tuple(leaf.shape), tuple(leaf.stride()), leaf.dtype


def footprint(leaf: torch.Tensor) -> Optional[object]:
    """The memory ``leaf`` covers, equal for two tensors over exactly the same elements; ``None`` for
    an empty or meta tensor (every meta tensor sits at address 0).

    A dense, non-overlapping tensor covers one span whatever its shape and strides (``w``,
    ``w.view(-1)``, ``w.t()``); any other is told by its view too (``tie_key``).

    >>> w = torch.ones(2, 3)
    >>> footprint(w) == footprint(w.t()) == footprint(w.view(-1)), footprint(w) == footprint(w[0])
    (True, False)
    """
    if leaf.numel() and leaf.device.type != "meta" and _dense(leaf):
        return address(leaf), leaf.numel(), leaf.dtype
    return tie_key(leaf)


def _dense(leaf: torch.Tensor) -> bool:
    """Whether ``leaf``'s elements fill one span of memory without gaps or overlaps, in any order."""
    expected = 1
    for size, stride in sorted(((size, stride) for size, stride in zip(leaf.shape, leaf.stride()) if size != 1),
                               key=lambda pair: pair[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def written_once(leaves: Sequence[torch.Tensor], active: list[bool], *,
                 key: Callable[[torch.Tensor], Optional[object]] = footprint) -> list[bool]:
    """``active`` less the leaves over the very memory of an earlier active leaf (written once, not twice).

    Distinct tensors can be one tensor under two names: a buffer registered as a parameter's
    ``Parameter`` or its ``.data`` (or a view of all of it, ``.view(-1)``, ``.t()``), two Parameters
    over one storage.  ``key`` tells them (default ``footprint``: the same memory in any view;
    ``tie_key``: the same view only).  Packed models have none (packing refuses them); the address
    check is skipped under ``torch.func`` transforms, which have no addresses.

    >>> w = torch.ones(2, 2)
    >>> written_once([w, w.detach(), w[:1], w.t()], [True, True, True, True])
    [True, False, True, False]
    >>> written_once([w, w.detach(), w[:1], w.t()], [True, True, True, True], key=tie_key)
    [True, False, True, True]
    """
    # distinct addresses: no ties (read without ``data_ptr``, which torch deprecates on a FakeTensor; fake
    # tensors' addresses are their offsets, and equal ones, theirs or copy-on-write tensors', are told by ``key``)
    if lw.transforms_active() or len(set(addresses(leaves))) == len(leaves):
        return active
    later = ties(leaves, [i for i, on in enumerate(active) if on], key=key)
    return [on and i not in later for i, on in enumerate(active)]


def ties(leaves: Sequence[torch.Tensor], indices: Iterable[int], *,
         key: Callable[[torch.Tensor], Optional[object]] = tie_key) -> dict[int, int]:
    """``{later index: first index}`` for the leaves among ``indices`` tied (equal ``key``) to an earlier one.

    >>> w = torch.ones(2)
    >>> ties([w, torch.ones(2), w.detach()], range(3))
    {2: 0}
    """
    first: dict[object, int] = {}
    later: dict[int, int] = {}
    for index in indices:
        found = key(leaves[index])
        if found is not None and first.setdefault(found, index) != index:
            later[index] = first[found]
    return later


def check_writable(fn: str, names: Sequence[str], leaves: Sequence[Tensor],
                   active: Optional[Sequence[bool]] = None) -> None:
    """Raise before writing anything when some leaf cannot be written in place.

    Expanded views (several elements sharing memory) and inference tensors outside
    inference mode would make torch fail half-way through an in-place update.
    """
    inference = torch.is_inference_mode_enabled()
    picked = leaves if active is None else [leaf for leaf, on in zip(leaves, active) if on]
    # C-level passes first (a Python loop over thousands of leaves costs more than the update): the loop
    # below only runs to name the leaf once one of them found something
    if (inference or not any(map(Tensor.is_inference, picked))) \
            and 1 not in map(torch._debug_has_internal_overlap, picked):
        return
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
