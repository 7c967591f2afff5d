"""Scalar operands: what broadcasts to every leaf, and whether torch can apply it to each leaf's dtype.

A scalar is a Python or NumPy number or a 0-dim tensor (``is_scalar``).  Before any leaf is
written, ``check_scalar`` refuses one that would change a leaf's dtype (``1j`` on a float model)
or that torch cannot take at all (an int beyond 64 bits), and ``check_converted`` one that torch
would refuse only when it reaches a leaf of some dtype (``pow_(70000.0)`` on float16).
"""
from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Union

import numpy as np
import torch

from ._errors import DeviceMismatchError, describe

Tensor = torch.Tensor

__all__ = ["is_scalar", "INT_RANGE", "in_int_range", "as_numbers", "check_scalar", "check_converted",
           "SAFE_MAGNITUDE", "magnitude"]

_DTYPE = operator.attrgetter("dtype")
#: The operations (by the name callers pass as ``fn``) that torch refuses for boolean operands.
_SUBTRACTIONS = frozenset({"sub", "rsub"})


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


#: Numbers up to this magnitude convert to every floating dtype torch checks (float16's largest).
SAFE_MAGNITUDE = torch.finfo(torch.float16).max


def magnitude(value: complex) -> float:
    """The largest finite magnitude among a number's real and imaginary parts (torch converts inf and nan).

    >>> magnitude(3 - 4j), magnitude(float("inf"))
    (4.0, 0.0)
    """
    return max((abs(part) for part in (value.real, value.imag) if math.isfinite(part)), default=0.0)


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
    big = magnitude(value)
    if big <= SAFE_MAGNITUDE:
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
