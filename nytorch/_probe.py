"""Refuse, before anything is written, an in-place update torch has no kernel for on some dtype.

torch lacks some kernels for some dtypes (float8 has no ``mul_``, ``add_``, ``div_``, ``pow_`` or
``lerp_``; complex32 no ``div_``, ``pow_`` or ``lerp_`` on the CPU) and says so only when it reaches a
tensor of that dtype, after the tensors before it were written.  ``check_`` tries the kernel once on
a one-element scratch tensor per (op, dtype, device type, operands), remembers the answer, and
raises ``TypeError`` naming the first parameter concerned.  Dtypes every kernel has (``KNOWN``) are
never tried: for them the check is one set comparison.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Optional

import torch
from torch.utils._python_dispatch import _disable_current_modes

from . import _leafwise as lw
from ._scalars import as_numbers

Tensor = torch.Tensor

__all__ = ["KNOWN", "check_", "verdict"]

#: Dtypes with every in-place kernel nytorch runs (``+ - * / **``, ``lerp``) on every device type that has them.
KNOWN = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128})

_NUMBERS = (bool, int, float, complex)
_LIKE = "like"  # a tensor operand aligned with the target (a leaf list, flat buffers): its dtype

#: ``(op, dtype, device type, operand keys) -> None`` (the kernel ran) or torch's message; cleared when
#: it grows past ``_MOST`` entries (numbers are part of the key, and an EMA's weight can change every step).
_VERDICTS: dict[tuple, Optional[str]] = {}
_MOST = 4096


def _key(operand: object) -> object:
    """What of ``operand`` can choose the kernel: a number's type and value (``pow_(1)`` is a copy, ``pow_(2)``
    is not), a 0-dim tensor's dtype and device type (and value on the CPU, where torch reads it as a number)."""
    kind = type(operand)
    if kind in _NUMBERS:
        return kind, operand if operand == operand else repr(operand)  # (nan is not equal to itself)
    if isinstance(operand, Tensor):
        if operand.dim():  # a tensor operand broadcast against the target (a Swarm's per-member weights)
            return operand.dtype, operand.device.type, "tensor"
        if operand.device.type == "cpu" and type(operand) in (Tensor, torch.nn.Parameter):
            value = operand.item()
            return operand.dtype, "cpu", value if value == value else repr(value)
        return operand.dtype, operand.device.type
    return _LIKE


def verdict(op: lw.Op, dtype: torch.dtype, device: torch.device, operands: Sequence[object]) -> Optional[str]:
    """``None`` when ``op`` runs in place on a ``dtype`` tensor on ``device`` with such ``operands``, else why not.

    Operands are Python numbers, 0-dim tensors, tensors with dimensions (stood in for by a one-element
    tensor of their dtype), or anything else for a tensor like the target (a leaf list, flat buffers),
    stood in for by a one-element tensor of the target's dtype.  Tried once per combination on one-element
    scratch tensors, outside any ``TorchDispatchMode`` (under ``FakeTensorMode`` too the answer is real).

    >>> verdict(lw.MUL, torch.float32, torch.device("cpu"), [2.0]) is None
    True
    >>> verdict(lw.MUL, torch.float8_e4m3fn, torch.device("cpu"), [2.0])
    '"mul_cpu_reduced_float" not implemented for \\'Float8_e4m3fn\\''
    """
    operands = as_numbers(tuple(operands))
    key = (op, dtype, device.type, tuple(map(_key, operands)))
    try:
        return _VERDICTS[key]
    except KeyError:
        pass
    with torch.no_grad(), _disable_current_modes():
        scratch = torch.ones(1, dtype=dtype, device=device)
        args = [operand if type(operand) in _NUMBERS
                else torch.ones(1, dtype=operand.dtype, device=operand.device) if isinstance(operand, Tensor)
                and operand.dim() else operand.detach() if isinstance(operand, Tensor)
                else torch.ones_like(scratch) for operand in operands]
        try:
            if op.leaf_ is not None:
                op.leaf_(scratch, *args)
            else:  # reflected ops have no in-place form: computed, then copied in
                scratch.copy_(op.leaf(scratch, *args))
            found = None
        except (NotImplementedError, RuntimeError) as error:
            found = str(error).split("\n")[0]
    if len(_VERDICTS) >= _MOST:
        _VERDICTS.clear()
    _VERDICTS[key] = found
    return found


def check_(fn: str, op: lw.Op, targets: Sequence[Tensor], dtypes: Iterable[torch.dtype], operands: Sequence[object],
           label: Callable[[int], str], active: Optional[Sequence[bool]] = None) -> None:
    """Raise ``TypeError`` before ``op`` writes ``targets`` in place when torch has no kernel for one of them.

    Args:
        fn: the function name messages start with.
        op: the operation about to run in place.
        targets: the tensors it will write (leaves or flat buffers).
        dtypes: their dtypes, aligned with ``targets`` (callers pass ones they hold already: reading
            a tensor's dtype costs more than comparing it).
        operands: the other operands, as ``verdict`` takes them.
        label: ``label(i)`` describes ``targets[i]`` in a message (``"parameter 'fc.weight' (shape (3, 2)
            float8_e4m3fn)"``); called only to raise.
        active: which targets are written (default: every floating or complex one).

    Raises:
        TypeError: torch has no such kernel for some written target's dtype; nothing was written.

    >>> w = torch.ones(2).to(torch.float8_e4m3fn)
    >>> check_("mul", lw.MUL, [torch.ones(2), w], [torch.float32, w.dtype], [2.0], lambda i: f"parameter {'ab'[i]!r}")
    Traceback (most recent call last):
    ...
    TypeError: mul: torch has no in-place mul for float8_e4m3fn tensors on cpu ("mul_cpu_reduced_float" not implemented for 'Float8_e4m3fn'), which parameter 'b' holds: the update would fail there after writing the tensors before it; nothing was changed. Convert such parameters to a dtype torch computes with (e.g. .float()), or leave them out of arithmetic (ParamConfig(operational=False))
    """
    if not isinstance(dtypes, (list, tuple)):
        dtypes = list(dtypes)
    if KNOWN.issuperset(dtypes):
        return
    asked: dict[tuple[torch.dtype, torch.device], Optional[str]] = {}  # one verdict per dtype and device
    for i, dtype in enumerate(dtypes):
        if dtype in KNOWN or not (dtype.is_floating_point or dtype.is_complex) or (active is not None and not active[i]):
            continue
        device = targets[i].device
        if (dtype, device) not in asked:
            asked[dtype, device] = verdict(op, dtype, device, operands)
        found = asked[dtype, device]
        if found is not None:
            raise TypeError(f"{fn}: torch has no in-place {op.name} for {str(dtype).removeprefix('torch.')} tensors on "
                            f"{device.type} ({found}), which {label(i)} holds: the update would fail there after "
                            "writing the tensors before it; nothing was changed. Convert such parameters to a dtype "
                            "torch computes with (e.g. .float()), or leave them out of arithmetic "
                            "(ParamConfig(operational=False))")
