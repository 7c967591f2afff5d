"""Kernels over flat buffers: one call per buffer, into pooled memory, with exact two-pass fusions.

What ``_packed`` (models) and ``_particle`` (Particles) run once their operands are flat:
``compute`` (a new result, with the ``0.9 * (a - b) + a`` rewrites), ``kernel``/``kernel_``
(out of place and in place), ``fill`` (leaf-ordered random fills), and the checks that must
pass before a buffer is written (``check_converted``, ``writable``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from . import _algebra as algebra
from . import _leafwise as lw
from . import _probe as probe
from . import _scalars as scalars
from . import _pool as pool
from ._flat import Flat, FlatPlan

Tensor = torch.Tensor

__all__ = ["compute", "exact_fusion", "kernel", "kernel_", "check_converted", "check_kernel_", "writable", "readable",
           "fill"]


_OUT = frozenset({torch.add, torch.sub, torch.mul, torch.div, torch.pow})  # kernels that take ``out=``


def compute(op: lw.Op, flat: Flat, operands: list[object], rest: dict[int, Tensor]) -> Flat:
    """``op(flat, *operands)`` as a new ``Flat`` (``rest``: its inactive leaves); operands are Flats or scalars.

    Two rewrites save passes over memory, and round exactly as per-tensor arithmetic does:

    - a result multiplied by a Python number (``0.9 * (a - b)``) shares its buffers and records
      the factor (``Flat.scaled``); nothing is computed yet, and reading it multiplies once;
    - ``x + s·y``, ``s·x + y`` and ``x - s·y``, where only one side carries such a factor, are one
      ``addcmul`` pass, used only where it rounds like a product then a sum (``exact_fusion``).

    >>> from nytorch._flat import plan_for
    >>> plan = plan_for([(torch.Size([2]), torch.float32, torch.device("cpu"))], [True])
    >>> a, b = Flat(plan, [torch.ones(2)], {}), Flat(plan, [torch.full((2,), 3.0)], {}, owned=True)
    >>> twice = compute(lw.MUL, b, [2.0], {})
    >>> twice.scale, compute(lw.ADD, a, [twice], {}).buffers
    (2.0, [tensor([7., 7.])])
    """
    if len(operands) == 1 and flat.plan.floating:
        other = operands[0]
        kind = type(other)
        if op is lw.MUL and (kind is float or kind is int) and flat.owned and flat.scale == 1.0 \
                and exact_fusion(flat.plan):
            return flat.scaled(other, rest)  # type: ignore[arg-type]
        if isinstance(other, Flat) and (flat.scale == 1.0) != (other.scale == 1.0) and exact_fusion(flat.plan) \
                and _fits(flat.scale * other.scale, flat.plan):
            plan = flat.plan
            if flat.scale == 1.0 and (op is lw.ADD or op is lw.SUB):  # x ± s·y
                factor = other.scale if op is lw.ADD else -other.scale
                return Flat(plan, _fused(flat.raw, other.raw, factor, plan), rest, owned=True)
            if op is lw.ADD:  # s·x + y
                return Flat(plan, _fused(other.raw, flat.raw, flat.scale, plan), rest, owned=True)
            # s·x - y: -(y - s·x) would turn an exact +0 into -0, so the factor is applied first
    return Flat(flat.plan, kernel(op, flat.readable(), readable(operands), flat.plan), rest, owned=True)


def _fused(left: list[Tensor], right: list[Tensor], factor: float, plan: FlatPlan) -> list[Tensor]:
    """``left + factor * right`` per buffer in one pass, into pooled buffers when there are some."""
    out = pool.take(plan) if plan.nbytes >= pool.MIN_BYTES else None
    ones = [_one(buffer) for buffer in left]
    if out is None:
        return [torch.addcmul(x, y, one, value=factor) for x, y, one in zip(left, right, ones)]
    for x, y, one, into in zip(left, right, ones, out):
        torch.addcmul(x, y, one, value=factor, out=into)
    return out


_ONES: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _one(like: Tensor) -> Tensor:
    key = (like.dtype, like.device)
    one = _ONES.get(key)
    if one is None:
        one = _ONES[key] = torch.ones((), dtype=like.dtype, device=like.device)
    return one


_FLOAT32_MAX = torch.finfo(torch.float32).max


def _fits(factor: float, plan: FlatPlan) -> bool:
    """Whether ``addcmul`` takes ``factor`` as its ``value`` for every buffer of ``plan``: it converts it to the
    compute type (float32 below float64) and refuses a finite number beyond its range, where ``x + s * y``
    gives ``inf``.

    >>> from nytorch._flat import plan_for
    >>> plan = plan_for([(torch.Size([2]), torch.float32, torch.device("cpu"))], [True])
    >>> _fits(0.9, plan), _fits(1e300, plan), _fits(float("inf"), plan)
    (True, False, True)
    """
    if not abs(factor) > _FLOAT32_MAX or abs(factor) == float("inf"):  # (nan compares False)
        return True
    return all(dtype == torch.float64 for dtype in plan.dtypes)


_EXACT: dict[tuple[torch.dtype, torch.device], bool] = {}


def exact_fusion(plan: FlatPlan) -> bool:
    """Whether ``addcmul(x, y, 1, value=s)`` equals ``x + s * y`` bit for bit for every buffer of ``plan``.

    It does where the kernel multiplies and adds as two operations (this CPU build's kernels); a
    kernel contracted into one fused multiply-add (as CUDA compilers may do) rounds once instead
    of twice, and there the rewrites of ``compute`` are not made.  Checked once per
    (dtype, device) on 4,099 random values, with factors of either sign.

    >>> from nytorch._flat import plan_for
    >>> exact_fusion(plan_for([(torch.Size([2]), torch.float32, torch.device("cpu"))], [True])) in (True, False)
    True
    """
    for dtype, device in zip(plan.dtypes, plan.devices):
        key = (dtype, device)
        found = _EXACT.get(key)
        if found is None:
            generator = torch.Generator(device=device).manual_seed(0)
            x, y = (torch.randn(4099, generator=generator, device=device).to(dtype) for _ in range(2))
            one = torch.ones((), dtype=dtype, device=device)
            found = _EXACT[key] = all(
                torch.equal(torch.addcmul(x, y, one, value=s), x + s * y) for s in (0.9, -0.9, 1 / 3, -1e-3))
        if not found:
            return False
    return True


def _direct(operands: Sequence[object]) -> bool:
    """True when every operand is a buffer list or a Python number: one plain call per buffer then,
    with nothing for autograd to record (the buffers are detached)."""
    for operand in operands:
        kind = type(operand)
        if kind is not list and kind is not float and kind is not int:
            return False
    return True


def _at(operands: Sequence[object], k: int) -> list[object]:
    """The arguments of buffer ``k``'s kernel call: the ``k``-th buffer of each list, numbers as they are."""
    return [operand[k] if type(operand) is list else operand for operand in operands]  # type: ignore[index]


def kernel(op: lw.Op, buffers: list[Tensor], operands: list[object], plan: Optional[FlatPlan] = None
           ) -> list[Tensor]:
    """``op`` over the buffers, one plain call per buffer for Python numbers and buffers, else ``apply``.

    With ``plan`` (the buffers' layout) the results go into buffers of a dead result from the pool
    when it has some (``_pool``), instead of fresh memory.

    >>> kernel(lw.ADD, [torch.ones(2)], [[torch.ones(2)]])
    [tensor([2., 2.])]
    """
    if _direct(operands):
        leaf = op.leaf
        if plan is not None and plan.nbytes >= pool.MIN_BYTES and leaf in _OUT:
            out = pool.take(plan)
            if out is not None:
                for k, (buffer, into) in enumerate(zip(buffers, out)):
                    leaf(buffer, *_at(operands, k), out=into)
                return out
        if len(buffers) == 1:
            if len(operands) == 1:  # the common case (``a + b``, ``a * 0.5``): no argument list to build
                operand = operands[0]
                return [leaf(buffers[0], operand[0] if type(operand) is list else operand)]  # type: ignore[index]
            return [leaf(buffers[0], *_at(operands, 0))]
    with torch.no_grad():
        return lw.apply(op, buffers, *operands)


def kernel_(op: lw.Op, buffers: list[Tensor], operands: list[object]) -> None:
    """``op`` in place on the buffers: one plain call per buffer for Python numbers and buffers, else ``apply_``.

    Callers have checked that the buffers can be written (``algebra.check_writable``).

    >>> buffers = [torch.ones(2)]
    >>> kernel_(lw.LERP, buffers, [[torch.zeros(2)], 0.5])
    >>> buffers
    [tensor([0.5000, 0.5000])]
    """
    leaf_ = op.leaf_
    if leaf_ is not None and _direct(operands):
        for k, buffer in enumerate(buffers):
            leaf_(buffer, *_at(operands, k))
        return
    with torch.no_grad():
        lw.apply_(op, buffers, *operands)


def check_converted(fn: str, names: Sequence[str], flat: Flat, operands: Sequence[object]) -> None:
    """``_scalars.check_converted`` for every number among ``operands``, against ``flat``'s buffers.

    >>> from nytorch._flat import plan_for
    >>> plan = plan_for([(torch.Size([2]), torch.float16, torch.device("cpu"))], [True])
    >>> check_converted("pow", ["w"], Flat(plan, [torch.ones(2, dtype=torch.float16)], {}), [1e5])
    Traceback (most recent call last):
    ...
    RuntimeError: pow: the exponent 100000.0 does not fit in float16, so torch cannot apply it to parameter 'w' (float16); nothing was changed
    """
    plan = flat.plan
    for operand in operands:
        if type(operand) is not Flat:
            scalars.check_converted(fn, operand, lambda: [(names[index[0]], dtype)
                                                     for index, dtype in zip(plan.groups, plan.dtypes)])


def check_kernel_(op: lw.Op, names: Sequence[str], flat: Flat, operands: Sequence[object]) -> None:
    """``_probe.check_`` for ``op`` in place on ``flat``'s buffers: one set comparison for the usual dtypes.

    >>> from nytorch._flat import plan_for
    >>> plan = plan_for([(torch.Size([2]), torch.float8_e5m2, torch.device("cpu"))], [True])
    >>> check_kernel_(lw.ADD, ["w"], Flat(plan, [torch.ones(2).to(torch.float8_e5m2)], {}), [1.0])
    Traceback (most recent call last):
    ...
    TypeError: add: torch has no in-place add for float8_e5m2 tensors on cpu (...), which parameter 'w' (shape (2,) float8_e5m2) holds: ...
    """
    plan = flat.plan
    if probe.KNOWN.issuperset(plan.dtypes):
        return

    def label(g: int) -> str:
        like = plan.likes[g][0]
        where = "" if plan.devices[g].type == "cpu" else f" on {plan.devices[g]}"
        return (f"parameter {names[plan.groups[g][0]]!r} (shape {tuple(like.shape)} "
                f"{str(like.dtype).removeprefix('torch.')}{where})")
    probe.check_(op.name, op, flat.raw, plan.dtypes, operands, label)


def writable(fn: str, names: Sequence[str], flat: Flat) -> list[Tensor]:
    """``flat``'s own buffers, to be written in place, once ``algebra.check_writable`` would let them.

    A flat buffer is 1-D and contiguous, so none has elements sharing memory: only inference
    tensors can refuse the write, and the full check (which names the parameter) runs for them.

    >>> from nytorch._flat import plan_for
    >>> plan = plan_for([(torch.Size([2]), torch.float32, torch.device("cpu"))], [True])
    >>> writable("add", ["w"], Flat(plan, [torch.ones(2)], {}))
    [tensor([1., 1.])]
    """
    buffers = flat.buffers
    if any(map(Tensor.is_inference, buffers)):
        algebra.check_writable(fn, [names[index[0]] for index in flat.plan.groups], buffers)
    return buffers


def readable(operands: Sequence[object]) -> list[object]:
    """Operands from ``flat_operands`` as buffer lists to read (a pending factor applied) or scalars."""
    return [operand.readable() if type(operand) is Flat else operand for operand in operands]  # type: ignore[attr-defined]


def fill(flat: Flat, method: Callable[[Tensor], Any]) -> list[Tensor]:
    """New buffers like ``flat``'s whose leaf views are filled by ``method`` in leaf order.

    Random fills go leaf by leaf so that a seed gives the same values as per-tensor
    ``randn_like`` (and nytorch 1.1), packed or not.

    >>> from nytorch._flat import plan_for
    >>> plan = plan_for([(torch.Size([2]), torch.float32, torch.device("cpu"))], [True])
    >>> fill(Flat(plan, [torch.zeros(2)], {}), lambda view: view.fill_(1.0))
    [tensor([1., 1.])]
    """
    buffers = [torch.empty_like(buffer) for buffer in flat.raw]
    views: dict[int, Tensor] = {}
    for buffer, index, likes in zip(buffers, flat.plan.groups, flat.plan.likes):
        views.update(zip(index, torch._C._nn.unflatten_dense_tensors(buffer, likes)))
    with torch.no_grad():
        for i in sorted(views):
            method(views[i])
    return buffers
