"""The leaf-wise engine: one operation applied to every tensor of a flat leaf list.

Everything arithmetic in nytorch (functional ops, ``Particle``, ``NytoModule``)
ends here.  Fused ``torch._foreach_*`` kernels run when they apply; a per-leaf
loop runs under ``torch.func`` transforms (foreach kernels have no batching
rule) and whenever autograd must see the computation (foreach kernels mishandle
0-dim scalars that require grad).

Only floating and complex leaves take part in arithmetic; integer and bool
leaves (``num_batches_tracked``, masks) are carried through unchanged.
"""
from __future__ import annotations

import numbers
import operator
from collections.abc import Callable, Sequence
from typing import NamedTuple, Optional, Union

import torch
import torch.autograd.forward_ad as _forward_ad

from ._errors import DeviceMismatchError, StructureError, describe
from ._scalars import as_numbers

Tensor = torch.Tensor
Operand = Union[Sequence[Tensor], numbers.Number, Tensor]


class Op(NamedTuple):
    """How one elementwise operation runs per leaf, fused, and fused in place."""

    name: str
    leaf: Callable[..., Tensor]
    foreach: Optional[Callable[..., Sequence[Tensor]]] = None
    foreach_: Optional[Callable[..., object]] = None
    leaf_: Optional[Callable[..., object]] = None


def _reflected(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``fn(scalar, leaf)`` for reflected operators such as ``2 - model``."""
    def leaf(a: Tensor, b: object) -> Tensor:
        return fn(b, a)
    return leaf


def _rtruediv(leaf: Tensor, scalar: object) -> Tensor:
    """``scalar / leaf`` as the ``/`` operator rounds it: for a number, torch's ``Tensor.__rtruediv__``
    is ``leaf.reciprocal() * scalar`` (two roundings, unlike ``torch.div(scalar, leaf)``); a 0-dim
    tensor on the left divides (``Tensor.__truediv__``)."""
    if isinstance(scalar, Tensor):
        return torch.div(scalar, leaf)
    return torch.reciprocal(leaf) * scalar  # type: ignore[operator]  # a number, checked by callers


ADD = Op("add", torch.add, torch._foreach_add, torch._foreach_add_, Tensor.add_)
SUB = Op("sub", torch.sub, torch._foreach_sub, torch._foreach_sub_, Tensor.sub_)
MUL = Op("mul", torch.mul, torch._foreach_mul, torch._foreach_mul_, Tensor.mul_)
DIV = Op("div", torch.div, torch._foreach_div, torch._foreach_div_, Tensor.div_)
POW = Op("pow", torch.pow, torch._foreach_pow, torch._foreach_pow_, Tensor.pow_)
RSUB = Op("rsub", _reflected(torch.sub))
RDIV = Op("rdiv", _reflected(torch.div))  # ``torch.div(scalar, leaf)``: ``nf.div(2, tree)``
RTRUEDIV = Op("rdiv", _rtruediv)  # ``2 / model``, rounded as ``2 / tensor`` is
RPOW = Op("rpow", _reflected(torch.pow), lambda leaves, base: torch._foreach_pow(base, leaves))
NEG = Op("neg", torch.neg, torch._foreach_neg, torch._foreach_neg_, Tensor.neg_)
LERP = Op("lerp", torch.lerp, torch._foreach_lerp, torch._foreach_lerp_, Tensor.lerp_)

REFLECTED = {"sub": RSUB, "div": RDIV, "pow": RPOW, "add": ADD, "mul": MUL}
#: ``c * model`` for a 0-dim tensor ``c``: ``torch.mul(c, leaf)``, as ``c * tensor`` is.  torch rounds
#: ``c`` to a float16 / bfloat16 leaf's dtype first when it comes first, not when it comes second.
_TENSOR_REFLECTED = {"add": Op("add", _reflected(torch.add)), "mul": Op("mul", _reflected(torch.mul))}


def reflected_op(op: Op, scalar: object) -> Op:
    """The op that computes ``scalar <op> leaf`` as torch's operator does, for a reflected ``op``.

    ``ADD`` and ``MUL`` serve ``2 + model`` and ``2 * model`` (torch computes ``2 * t`` as ``t * 2``);
    a 0-dim tensor on the left runs ``torch.mul(scalar, leaf)``, per leaf.

    >>> reflected_op(MUL, 2.0) is MUL, reflected_op(MUL, torch.tensor(2.0)) is MUL
    (True, False)
    """
    if isinstance(scalar, Tensor) and (op is ADD or op is MUL):
        return _TENSOR_REFLECTED[op.name]
    return op


#: Ops whose fused kernels round a 0-dim tensor operand as their per-tensor kernels do.  The others
#: (pow, rpow, lerp) have no ``Tensor`` overload: they read it as a Python number, which rounds unlike
#: ``torch.pow(x, torch.tensor(3))`` or ``torch.lerp(half, half, torch.tensor(0.7))``, so they run per leaf.
_FUSED_TENSOR_SCALARS = frozenset({ADD.name, SUB.name, MUL.name, DIV.name})



def is_arithmetic(leaf: Tensor) -> bool:
    """True for leaves that take part in arithmetic (floating or complex dtypes)."""
    return leaf.is_floating_point() or leaf.is_complex()


class _ArithmeticDtypes(dict):
    """``dtype -> takes part in arithmetic``, filled on first sight (lookups stay in C)."""

    def __missing__(self, dtype: torch.dtype) -> bool:
        self[dtype] = value = dtype.is_floating_point or dtype.is_complex
        return value


_ARITHMETIC_DTYPES = _ArithmeticDtypes()
_DTYPE = operator.attrgetter("dtype")
_SHAPE = operator.attrgetter("shape")
_IS_CPU = operator.attrgetter("is_cpu")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")


def arithmetic_mask(leaves: Sequence[Tensor]) -> list[bool]:
    """``is_arithmetic`` of every leaf, in one C-level pass (it runs on every operation).

    >>> arithmetic_mask([torch.ones(1), torch.tensor([1])])
    [True, False]
    """
    return list(map(_ARITHMETIC_DTYPES.__getitem__, map(_DTYPE, leaves)))


def arithmetic_dtypes(dtypes: Sequence[torch.dtype]) -> list[bool]:
    """``arithmetic_mask`` of leaves whose dtypes were read already.

    >>> arithmetic_dtypes([torch.float32, torch.int64])
    [True, False]
    """
    return list(map(_ARITHMETIC_DTYPES.__getitem__, dtypes))


def same_layout(left: Sequence[Tensor], right: Sequence[Tensor]) -> bool:
    """True when the two leaf lists agree in shape, dtype and device, leaf by leaf.

    >>> same_layout([torch.ones(2)], [torch.zeros(2)]), same_layout([torch.ones(2)], [torch.zeros(3)])
    (True, False)
    """
    if list(map(_SHAPE, left)) != list(map(_SHAPE, right)) or list(map(_DTYPE, left)) != list(map(_DTYPE, right)):
        return False
    if all(map(_IS_CPU, left)) and all(map(_IS_CPU, right)):
        return True
    return [leaf.device for leaf in left] == [leaf.device for leaf in right]


def signature(leaves: Sequence[Tensor]) -> tuple[tuple[torch.Size, torch.dtype, torch.device], ...]:
    """``(shape, dtype, device)`` of every leaf: equal signatures mean operands line up.

    >>> signature([torch.zeros(2)])
    ((torch.Size([2]), torch.float32, device(type='cpu')),)
    """
    return tuple((leaf.shape, leaf.dtype, leaf.device) for leaf in leaves)


def check_pairs(fn: str, names: Sequence[str], left: Sequence[Tensor], right: Sequence[Tensor]) -> None:
    """Raise ``StructureError`` naming the first leaf pair whose shape, dtype or device differs."""
    for name, a, b in zip(names, left, right):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise StructureError(f"{fn}: parameter {name!r} differs: {describe(a)} vs {describe(b)}")
        if a.device != b.device:
            raise DeviceMismatchError(
                f"{fn}: parameter {name!r} is on {a.device} in the first operand and on {b.device} "
                "in the second; move both to one device first (e.g. model.to(device))"
            )


#: True inside ``torch.func.vmap`` / ``grad`` / ``jacrev`` (foreach kernels cannot batch there, and
#: their tensors have no address to find packed buffers by): torch's own C call, without a Python frame.
transforms_active: Callable[[], bool] = torch._C._are_functorch_transforms_active


def needs_per_leaf(*groups: object) -> bool:
    """Decide whether autograd or a ``torch.func`` transform must see per-leaf ops.

    Inside ``torch.autograd.forward_ad.dual_level()`` they always do: foreach kernels drop the
    tangent of a dual scalar operand.
    """
    if transforms_active() or _forward_ad._current_level >= 0:
        return True
    if not torch.is_grad_enabled():
        return False
    for group in groups:
        if isinstance(group, Tensor):
            if group.requires_grad:
                return True
        elif isinstance(group, (list, tuple)):
            if any(map(_REQUIRES_GRAD, group)):  # leaf lists hold tensors only; a C-level loop
                return True
    return False


def _select(values: Sequence[Tensor], index: Sequence[int]) -> list[Tensor]:
    return [values[i] for i in index]


def groups(leaves: Sequence[Tensor]) -> Optional[list[list[int]]]:
    """Indices of leaves sharing a (device, dtype), or ``None`` when one fused call can take them all.

    On the CPU every foreach kernel loops per tensor anyway, so only accelerator
    leaves are split: their fused kernels need one device and one dtype per call.
    """
    if all(map(_IS_CPU, leaves)):
        return None
    found: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, leaf in enumerate(leaves):
        found.setdefault((leaf.device, leaf.dtype), []).append(i)
    return None if len(found) == 1 else list(found.values())


def _fused(fn: Callable[..., object], leaves: list[Tensor], operands: list[object]) -> list[Tensor]:
    split = groups(leaves)
    if split is None:
        return fn(leaves, *operands)  # type: ignore[return-value]
    out: list[Tensor] = [leaves[0]] * len(leaves)
    for index in split:
        part = fn(_select(leaves, index),
                  *(_select(o, index) if isinstance(o, list) else o for o in operands))  # type: ignore[arg-type]
        if part is not None:
            for i, value in zip(index, part):  # type: ignore[call-overload]
                out[i] = value
    return out


def _pick(left: Sequence[Tensor], operands: tuple[object, ...], active: Sequence[bool]
          ) -> tuple[list[int], list[Tensor], list[object]]:
    index = [i for i, on in enumerate(active) if on]
    if len(index) == len(left):
        return index, list(left), [list(o) if isinstance(o, (list, tuple)) else o for o in operands]
    return index, _select(left, index), [
        _select(o, index) if isinstance(o, (list, tuple)) else o for o in operands]  # type: ignore[arg-type]


def apply(op: Op, left: Sequence[Tensor], *operands: object,
          active: Optional[Sequence[bool]] = None,
          carry: Callable[[Tensor], Tensor] = Tensor.clone) -> list[Tensor]:
    """Apply ``op`` out of place to every active leaf; inactive leaves go through ``carry``.

    Each operand is either a leaf list aligned with ``left`` or a scalar.
    Callers have already checked structures and dtypes.

    >>> apply(ADD, [torch.ones(2), torch.tensor([1, 2])], 1.5)
    [tensor([2.5000, 2.5000]), tensor([1, 2])]
    """
    if active is None:
        active = arithmetic_mask(left)
    if not left:
        return []
    operands = as_numbers(operands)
    if all(active):  # the common case: no selection, no carrying
        picked = [list(o) if isinstance(o, tuple) else o for o in operands]
        # one tensor (a packed buffer): a plain kernel call skips foreach's list handling
        if len(left) > 1 and op.foreach is not None and not needs_per_leaf(left, *picked) \
                and not _foreach_rounds(op, left, picked, False):
            results = list(_fused(op.foreach, list(left), _detached(picked)))
        else:
            results = [op.leaf(leaf, *(o[k] if isinstance(o, list) else o for o in picked))
                       for k, leaf in enumerate(left)]
        for operand in picked:
            if isinstance(operand, Tensor):  # 0-dim leaves promote with 0-dim tensor scalars
                return [r.to(leaf.dtype) if r.dtype != leaf.dtype else r for r, leaf in zip(results, left)]
        return results
    index, picked_left, picked = _pick(left, operands, active)
    out: list[Tensor] = [leaf if on else carry(leaf) for leaf, on in zip(left, active)]
    if not index:
        return out
    if op.foreach is not None and not needs_per_leaf(picked_left, *picked) \
            and not _foreach_rounds(op, picked_left, picked, False):
        results = _fused(op.foreach, picked_left, _detached(picked))
    else:
        results = [
            op.leaf(leaf, *(operand[k] if isinstance(operand, list) else operand for operand in picked))
            for k, leaf in enumerate(picked_left)
        ]
    tensor_scalar = any(isinstance(operand, Tensor) for operand in picked)
    for i, result in zip(index, results):
        # 0-dim leaves promote with 0-dim tensor scalars; check_scalar allowed only same-kind ones
        out[i] = result.to(left[i].dtype) if tensor_scalar and result.dtype != left[i].dtype else result
    return out


#: Dtypes for which ``torch._foreach_mul_`` rounds a Python number to the leaf's dtype before multiplying
#: (``t.mul_(0.1)`` and the out-of-place ``_foreach_mul`` multiply by it in float32): per leaf there.
_ROUNDS_NUMBER = frozenset({torch.float16, torch.bfloat16, torch.complex32})


def _foreach_rounds(op: Op, leaves: Sequence[Tensor], operands: Sequence[object], inplace: bool) -> bool:
    """True when the fused kernel (``op.foreach_`` if ``inplace``, else ``op.foreach``) would round unlike
    ``op``'s per-tensor kernel on some leaf; then every leaf runs per leaf.

    Three cases: any tensor operand of an op outside ``_FUSED_TENSOR_SCALARS`` (its fused kernel reads
    it as a Python number), a 0-dim tensor operand with a 0-dim leaf whose dtype it promotes (``leaf - scalar`` and
    ``leaf.sub_(scalar)`` compute in the promoted dtype, the fused kernels in the leaf's when every leaf
    is 0-dim, or in place), and ``_foreach_mul_`` with a Python number on float16 / bfloat16 leaves.

    >>> _foreach_rounds(MUL, [torch.ones(2, dtype=torch.float16)], [0.1], True)
    True
    >>> _foreach_rounds(MUL, [torch.ones(2, dtype=torch.float16)], [0.1], False), _foreach_rounds(MUL, [torch.ones(2)], [0.1], True)
    (False, False)
    >>> _foreach_rounds(ADD, [torch.ones((), dtype=torch.float16)], [torch.tensor(0.7)], False)
    True
    >>> _foreach_rounds(POW, [torch.ones(2)], [torch.tensor(3.0)], False)
    True
    """
    for operand in operands:
        if isinstance(operand, Tensor):
            if op.name not in _FUSED_TENSOR_SCALARS:
                return True
            if operand.dim() == 0 and any(leaf.dim() == 0 and torch.promote_types(leaf.dtype, operand.dtype) != leaf.dtype
                                          for leaf in leaves):
                return True
        elif inplace and op is MUL and not isinstance(operand, list) and not _ROUNDS_NUMBER.isdisjoint(map(_DTYPE, leaves)):
            return True
    return False


def _detached(operands: list[object]) -> list[object]:
    """Fused kernels refuse scalar tensors that require grad; here autograd is not recording anyway."""
    return [o.detach() if isinstance(o, Tensor) and o.requires_grad else o for o in operands]


def dual_level_active() -> bool:
    """True inside ``torch.autograd.forward_ad.dual_level()`` and outside ``torch.func`` transforms.

    >>> dual_level_active()
    False
    """
    return _forward_ad._current_level >= 0 and not transforms_active()


def _without_tangents(operands: list[object]) -> list[object]:
    """``operands`` detached, dropping forward-mode tangents (``torch.no_grad()`` keeps those).

    In-place updates run without autograd, forward mode included: inside
    ``torch.autograd.forward_ad.dual_level()`` a dual operand would otherwise give the tensors written
    per leaf a tangent, and not the packed path's (which writes a buffer the Parameters only view).
    """
    return [[item.detach() for item in operand] if isinstance(operand, list)
            else operand.detach() if isinstance(operand, Tensor) else operand for operand in operands]


def apply_(op: Op, left: Sequence[Tensor], *operands: object,
           active: Optional[Sequence[bool]] = None) -> None:
    """Apply ``op`` in place to every active leaf of ``left`` (callers validated everything first).

    >>> leaves = [torch.ones(2)]
    >>> apply_(MUL, leaves, 3.0)
    >>> leaves
    [tensor([3., 3.])]
    """
    if active is None:
        active = arithmetic_mask(left)
    index, picked_left, picked = _pick(left, as_numbers(operands), active)
    if not index:
        return
    if dual_level_active():
        picked = _without_tangents(picked)
    if len(picked_left) > 1 and op.foreach_ is not None and not transforms_active() \
            and not _foreach_rounds(op, picked_left, picked, True):
        _fused(op.foreach_, picked_left, _detached(picked))
        return
    leaf_ = op.leaf_
    for k, leaf in enumerate(picked_left):
        args = [o[k] if isinstance(o, list) else o for o in picked]
        if leaf_ is None:  # reflected ops have no in-place form: compute, then copy in
            leaf.copy_(op.leaf(leaf, *args))
        else:
            leaf_(leaf, *args)
