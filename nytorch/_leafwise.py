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

import math
import numbers
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple, Optional, Union

import numpy as np
import torch
import torch.autograd.forward_ad as _forward_ad

from ._errors import DeviceMismatchError, StructureError

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


#: The operations (by the name callers pass as ``fn``) that torch refuses for boolean operands.
_SUBTRACTIONS = frozenset({SUB.name, RSUB.name})


def is_scalar(value: object) -> bool:
    """True for what broadcasts to every leaf: a Python or NumPy number (booleans too) or a 0-dim tensor."""
    if isinstance(value, Tensor):
        return value.dim() == 0
    return isinstance(value, (numbers.Number, np.bool_))


#: The Python ints torch takes as scalars (int64 and uint64 values).
INT_RANGE = (-(1 << 63), (1 << 64) - 1)


def in_int_range(value: int) -> bool:
    """True when torch can take the Python int ``value`` as a scalar (it is at most 64 bits)."""
    return INT_RANGE[0] <= value <= INT_RANGE[1]


def _check_kind(fn: str, scalar: object) -> None:
    """Raise for numbers torch cannot take: other ``numbers.Number`` types, and ints beyond 64 bits."""
    if isinstance(scalar, int) and not isinstance(scalar, bool) and not in_int_range(int(scalar)):
        shown = str(scalar) if len(str(scalar)) <= 40 else f"{str(scalar)[:12]}... ({len(str(abs(scalar)))} digits)"
        raise OverflowError(f"{fn}: the integer {shown} does not fit in 64 bits, which is what torch takes "
                            f"for a scalar; use a float")
    if isinstance(scalar, np.unsignedinteger) and int(scalar) >= 1 << 63:
        raise TypeError(f"{fn}: torch cannot take the NumPy {type(scalar).__name__} {scalar} as a scalar; "
                        f"pass int(...) of it")
    if not isinstance(scalar, (Tensor, int, float, complex, np.generic)):
        raise TypeError(f"{fn}: expected a Python or NumPy number or a 0-dim tensor as the scalar, got "
                        f"{type(scalar).__name__} {scalar!r}; convert it with float(...) first")


def as_numbers(operands: tuple[object, ...]) -> tuple[object, ...]:
    """``operands`` with NumPy scalars as the Python numbers they hold, which is how nytorch judges them.

    torch reads ``np.complex64(1 + 1j)`` as the real number 1, dropping the imaginary part with only
    a warning; ``check_scalar`` judges it as ``1 + 1j``, and so must the arithmetic.

    >>> as_numbers((np.complex64(1 + 1j), 2.0))
    ((1+1j), 2.0)
    """
    for operand in operands:
        if isinstance(operand, np.generic):
            return tuple(o.item() if isinstance(o, np.generic) else o for o in operands)
    return operands


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


def describe(leaf: Tensor) -> str:
    """``shape (2, 3) float32`` (plus the device when it is not the CPU)."""
    text = f"shape {tuple(leaf.shape)} {str(leaf.dtype).removeprefix('torch.')}"
    return text if leaf.device.type == "cpu" else f"{text} on {leaf.device}"


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


def check_scalar(fn: str, scalar: object, names: Union[Sequence[str], Callable[[], Sequence[str]]],
                 leaves: Sequence[Tensor], active: Sequence[bool], reflected: bool = False) -> None:
    """Raise ``TypeError`` when a scalar would change a leaf's dtype (e.g. complex on float).

    A 0-dim tensor scalar is judged like a Python number of its kind (float, complex),
    also against 0-dim leaves, whose results ``apply`` casts back to the leaf's dtype.
    ``names`` may be a callable, called only when a leaf has to be checked; ``active`` marks the
    leaves that take part in the operation, all of them floating or complex.
    """
    if type(scalar) is not float:
        _check_kind(fn, scalar)
    if fn in _SUBTRACTIONS and (isinstance(scalar, (bool, np.bool_))
                                or (isinstance(scalar, Tensor) and scalar.dtype == torch.bool)):
        raise TypeError(f"{fn}: expected a number to subtract, got the boolean {scalar!r} "
                        "(torch does not subtract booleans); use an int or a float")
    if isinstance(scalar, (bool, int, float)) and not any(dtype.is_complex for dtype in set(map(_DTYPE, leaves))):
        # the common case: a real Python number never changes a floating dtype (and integer
        # leaves take no part); the dtypes are read in one C-level pass, as on every operation
        return
    if isinstance(scalar, np.generic):
        # torch reads a NumPy scalar as a real number of its own kind, dropping ``np.complex64(1j)``'s
        # imaginary part with only a warning: judge it as the Python number it holds
        scalar = scalar.item()
    if callable(names):
        names = names()
    seen: set[tuple[torch.dtype, torch.device]] = set()
    for name, leaf, on in zip(names, leaves, active):
        if not on or (leaf.dtype, leaf.device) in seen:
            continue
        seen.add((leaf.dtype, leaf.device))
        if isinstance(scalar, Tensor) and scalar.device != leaf.device and scalar.device.type != "cpu":
            raise DeviceMismatchError(
                f"{fn}: the scalar operand is on {scalar.device} but parameter {name!r} is on {leaf.device}"
            )
        stand_in = _stand_in(leaf.dtype)  # a 1-dim leaf: 0-dim scalars never promote its dtype
        pair = (scalar, stand_in) if reflected else (stand_in, scalar)
        result = torch.result_type(*pair)  # type: ignore[arg-type]
        if result != leaf.dtype:
            raise TypeError(
                f"{fn}: the scalar {scalar!r} would turn parameter {name!r} ({describe(leaf)}) into "
                f"{str(result).removeprefix('torch.')}; nytorch keeps every dtype, so convert the model first"
            )


#: Per operation, the largest magnitude torch converts a number to for a leaf of each dtype without
#: raising "value cannot be converted to type ... without overflow": ``pow``'s exponent to the leaf's
#: dtype (float16, bfloat16), ``lerp``'s weight to its compute type (float32 for these dtypes).
_CONVERTIBLE: dict[str, dict[torch.dtype, float]] = {
    "pow": {torch.float16: torch.finfo(torch.float16).max, torch.bfloat16: torch.finfo(torch.bfloat16).max},
    "lerp": dict.fromkeys((torch.float16, torch.bfloat16, torch.float32, torch.complex64),
                          torch.finfo(torch.float32).max),
}
_SMALLEST_LIMIT = torch.finfo(torch.float16).max


def check_converted(fn: str, scalar: object, named_dtypes: Callable[[], Iterable[tuple[str, torch.dtype]]]) -> None:
    """Raise ``RuntimeError`` before an in-place ``pow`` / ``lerp`` that torch would refuse half-way through.

    torch refuses a number it cannot convert for a leaf (``t.pow_(70000.0)`` on float16, a ``lerp_``
    weight of ``1e300`` on float32), but only when it reaches that leaf: leaves of other dtypes,
    written before, would keep their new values.  ``named_dtypes`` gives ``(name, dtype)`` of every
    leaf to be written; it is called only for numbers that large.

    >>> check_converted("pow", 70000.0, lambda: [("w", torch.float32)])
    >>> check_converted("pow", 70000.0, lambda: [("w", torch.float16)])
    Traceback (most recent call last):
    ...
    RuntimeError: pow: the exponent 70000.0 does not fit in float16, so torch cannot apply it to parameter 'w' (float16); nothing was changed
    """
    op = fn.rstrip("_")  # ``lerp_`` checks as ``lerp`` and is named as called
    limits = _CONVERTIBLE.get(op)
    if limits is None or isinstance(scalar, Tensor) or not isinstance(scalar, (numbers.Number, np.generic)):
        return
    value: complex = scalar.item() if isinstance(scalar, np.generic) else scalar  # type: ignore[assignment]
    parts = (value.real, value.imag)  # a real number's imaginary part is 0
    big = max((abs(part) for part in parts if math.isfinite(part)), default=0.0)  # torch converts inf and nan
    if big <= _SMALLEST_LIMIT:
        return
    for name, dtype in named_dtypes():
        limit = limits.get(dtype)
        if limit is not None and big > limit:
            into = str(dtype if op == "pow" else torch.float32).removeprefix("torch.")
            raise RuntimeError(f"{fn}: the {'exponent' if op == 'pow' else 'weight'} {scalar!r} does not fit in {into}, "
                               f"so torch cannot apply it to parameter {name!r} ({str(dtype).removeprefix('torch.')}); "
                               "nothing was changed")


_STAND_INS: dict[torch.dtype, Tensor] = {}


def _stand_in(dtype: torch.dtype) -> Tensor:
    found = _STAND_INS.get(dtype)
    if found is None:
        found = _STAND_INS[dtype] = torch.empty(1, dtype=dtype, device="meta")
    return found


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
