"""Arithmetic on packed models: one kernel per buffer, results born packed.

A model is packed on first use (``_flat.pack_``): its floating parameters become
views into one buffer per (device, dtype).  The ``Flat`` over those buffers is
remembered per model while its layout holds (same Parameter objects at the same
addresses, which ``layout_of`` checks anyway), so an operator costs one layout
check per operand and one kernel per buffer, written into a dead result's buffers
when ``_pool`` has some.  The result is a ``Pending`` one: its module tree is built
on first touch, with Parameters that are views into the output buffers, and it is
remembered as packed in turn.  Anything this path does not cover (another class, a Particle with
buffers, a model that cannot be packed, configs changed since) returns ``None``
and the caller takes the per-leaf path, which also raises the informative errors.
"""
from __future__ import annotations

import operator
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch import nn

from . import _algebra as algebra
from . import _leafwise as lw
from ._config import ParamConfig, configs_for
from . import _pool as pool
from ._flat import PACKED, Flat, FlatPlan, find_flat, own_counters, pack_, plan_for, written
from ._walk import _CACHE, PENDING, Layout, build_into, capture, layout_of, model_class, wrap_parameters

Tensor = torch.Tensor

__all__ = ["packed", "known", "kernel", "compute", "readable", "exact_fusion", "remember", "binary", "binary_",
           "unary", "carried", "active_for", "flat_operands", "fill", "Pending", "check_converted"]

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

    Returns ``None`` when the model is not packed (``pack=False``) or cannot be (see ``_flat.pack_``).
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


def remember(result: nn.Module, flat: Flat) -> None:
    """Record that ``result`` (just rebuilt from ``flat``'s views) is packed in ``flat``'s buffers."""
    stored = _CACHE.get(result)
    if stored is not None:
        params = stored.params
        rest = {i: params[i] for i in flat.rest}
        stored.packing[0] = Flat(flat.plan, flat.buffers, rest)


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


def flat_operands(fn: str, cls: type, names: Sequence[str], signature: tuple, flat: Flat,
                  others: Sequence[object], reflected: bool) -> Optional[list[object]]:
    """``others`` as ``Flat``s (or scalars) aligned with ``flat``, or ``None`` for the per-leaf path.

    Scalars are checked against the buffers' dtypes here (that raises); models of class ``cls``
    and the same structure are packed on first use; Particles must be flat already.  Anything else, or a structure
    that differs, answers ``None``: the per-leaf path then raises the informative error.
    """
    Particle = _particle_class()
    operands: list[object] = []
    for other in others:
        kind = type(other)
        if (kind is float or (kind is int and lw.in_int_range(other))) and flat.plan.floating:  # type: ignore[arg-type]
            # a real number never changes a floating dtype
            operands.append(other)
            continue
        if lw.is_scalar(other):
            if isinstance(other, Tensor) and _promotes_zero_dim(flat.plan, other):
                return None  # per tensor, a 0-dim leaf computes with it in the promoted dtype; a buffer would not
            firsts = [names[index[0]] for index in flat.plan.groups]
            # each group's first leaf as a view: an error names its shape, not the buffer's
            leaves = [buffer[:likes[0].numel()].view(likes[0].shape) for buffer, likes in zip(flat.raw, flat.plan.likes)]
            lw.check_scalar(fn, other, firsts, leaves, [True] * len(firsts), reflected)
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


def _first_use(model: nn.Module, fn: str, others: Sequence[object],
               reflected: bool) -> Optional[tuple[Layout, Flat, Optional[list[ParamConfig]]]]:
    """``_current(model)``, packing ``model`` first when every operand is one the packed path takes.

    Operands are checked against the model's layout before anything moves: a scalar of a dtype
    the model cannot hold raises here, as on the per-tensor path; any other operand the packed
    path would refuse answers ``None``, and the per-tensor path raises its error.
    """
    found = _current(model)
    if found is not None:
        return found
    Particle = _particle_class()
    layout, cls = layout_of(model), model_class(model)
    for other in others:
        if lw.is_scalar(other):
            # the leaves that take part: a non-operational one keeps its dtype whatever the scalar
            active = active_for(layout.signature, configs_for(layout))
            lw.check_scalar(fn, other, layout.names, layout.params, active, reflected)
        elif isinstance(other, nn.Module):
            if model_class(other) is not cls or not _same_structure(_structure(other), layout.names, layout.signature):
                return None
        elif not (isinstance(other, Particle) and other.model_class is cls
                  and (other._names is layout.names or other._names == layout.names)
                  and (other._signature is layout.signature or other._signature == layout.signature)):
            return None
    return _current(model, pack=True)


def _prepared(model: nn.Module, fn: str, others: Sequence[object], reflected: bool
              ) -> Optional[tuple[Layout, Flat, Optional[list[ParamConfig]], list[object]]]:
    """The packed layout, buffers and configs of ``model`` with its operands as buffers, or ``None``."""
    found = _first_use(model, fn, others, reflected)
    if found is None:
        return None
    layout, flat, configs = found
    packs = PACKED[0]
    operands = flat_operands(fn, model_class(model), layout.names, layout.signature, flat, others, reflected)
    if operands is None:
        return None
    if PACKED[0] != packs and model.__dict__.get(PENDING) is None:
        again = _current(model)
        if again is None or again[1] is not flat:
            return None  # packing an operand moved a Parameter ``model`` shares with it: per leaf then
    return layout, flat, configs, operands


_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_LOCK = threading.RLock()


class Pending:
    """A result whose values are computed and whose module tree is built on first touch.

    An operator on packed models runs its kernels at once and returns an object of the
    model's class holding only this: the output buffers, and the state of every module of its
    operand captured at that moment (train/eval flags, hooks, other attributes), the
    parameters' ``requires_grad`` and clones of its buffers.  The first attribute read,
    assignment, call, pickling or nytorch read builds the tree into that same object
    (``realize``); its Parameters are views into the output buffers.  Chains of operations
    (``0.9 * (a - b) + a``) never build the trees of their intermediate results.
    """

    __slots__ = ("layout", "states", "types", "requires_grad", "flat", "buffers", "configs")

    def __init__(self, layout: Layout, states: list[dict], types: list[type], requires_grad: tuple[bool, ...],
                 flat: Optional[Flat], buffers: list[Tensor], configs: Optional[Sequence[ParamConfig]]) -> None:
        self.layout, self.states, self.types, self.requires_grad = layout, states, types, requires_grad
        self.flat, self.buffers, self.configs = flat, buffers, configs

    def realize(self, root: nn.Module) -> None:
        """Build ``root``'s module tree (once; the built state goes into ``root.__dict__``, the same dict)."""
        # built outside any torch.func transform that happens to be running (a first touch inside
        # ``grad``): the model's Parameters are plain leaves, as if it had been built at once
        with _LOCK, torch._C._DisableFuncTorch():  # two threads touching one result build it once
            if root.__dict__.get(PENDING) is not self:
                return
            flat = self.flat
            # as any new model's, its Parameters get version counters of their own
            leaves = own_counters(flat.leaves(), flat.plan)
            wrapped = wrap_parameters(algebra.fresh_parameters(leaves, self.configs), self.requires_grad)
            build_into(self.layout, self.states, self.types, wrapped, self.buffers, root)
            remember(root, flat)
            self.flat = None  # the buffers are the model's storage now

    def __del__(self) -> None:
        flat = self.flat
        if flat is not None:  # died unseen: its buffers can hold the next result
            try:
                pool.give(flat.plan, flat.raw)
            except Exception:  # pragma: no cover - interpreter shutdown
                pass


Snapshot = tuple[Layout, list[dict], list[type], tuple[bool, ...], list[Tensor]]


def _snapshot(model: nn.Module, layout: Layout) -> Snapshot:
    """What a result of ``model`` keeps of it as it is now: its modules' state, ``requires_grad``, buffer clones.

    Taken before the kernel runs: its passes over memory evict ``model``'s objects from the caches
    that checking it just filled (101 modules and 200 parameters: ~170 µs after a 12 MB kernel,
    ~145 µs right after the check).
    """
    source = model.__dict__.get(PENDING)
    if source is not None:  # a result of a result: same captured state, its own buffers
        return source.layout, source.states, source.types, source.requires_grad, [
            buffer.clone() for buffer in source.buffers]
    if not layout.modules:  # a pending result's layout, and another thread has built its tree since
        layout = layout_of(model)
    states, types = capture(layout)
    return (layout.bare(), states, types, tuple(map(_REQUIRES_GRAD, layout.params)),
            [buffer.clone() for buffer in layout.buffers])


def _result(snapshot: Snapshot, configs: Optional[Sequence[ParamConfig]], out: Flat) -> nn.Module:
    """A result of the model ``snapshot`` was taken of, holding the values ``out`` (built on first touch)."""
    layout, states, types, requires_grad, buffers = snapshot
    pending = Pending(layout, states, types, requires_grad, out, buffers, configs)
    kind = types[0]
    result: nn.Module = object.__new__(kind)
    own = result.__dict__
    # an instance attribute that shadows one of the class (``self.scale = 5.0`` over ``scale = 1.0``,
    # a patched ``forward``) is found without touching the result: it must be there from the start
    for key in _class_names(kind).intersection(states[0]):
        own[key] = states[0][key]
    own[PENDING] = pending
    if not getattr(kind, "_nyto_builds_on_touch", False):  # no hook to build it later: now
        pending.realize(result)
    return result


_CLASS_NAMES: "weakref.WeakKeyDictionary[type, frozenset[str]]" = weakref.WeakKeyDictionary()


def _class_names(kind: type) -> frozenset[str]:
    """Every attribute name ``kind`` defines or inherits (what an instance's own attribute can shadow)."""
    found = _CLASS_NAMES.get(kind)
    if found is None:
        found = _CLASS_NAMES[kind] = frozenset(dir(kind))
    return found


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
    snapshot = _snapshot(model, layout)
    return _result(snapshot, configs, compute(op, flat, operands, rest))


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
    if kind is float or (kind is int and lw.in_int_range(other)):  # type: ignore[arg-type]
        return (layout, flat, configs, [other]) if flat.plan.floating else None
    if kind is not type(model):
        return None
    theirs = _current(other)  # type: ignore[arg-type]
    if theirs is None or theirs[1].plan is not flat.plan:
        return None
    if theirs[0].names is not layout.names or theirs[0].signature is not layout.signature:
        return None
    return layout, flat, configs, [theirs[1]]


_OUT = frozenset({torch.add, torch.sub, torch.mul, torch.div, torch.pow})  # kernels that take ``out=``


def compute(op: lw.Op, flat: Flat, operands: list[object], rest: dict[int, Tensor]) -> Flat:
    """``op(flat, *operands)`` as a new ``Flat`` (``rest``: its inactive leaves); operands are Flats or scalars.

    Two rewrites save passes over memory, and round exactly as per-tensor arithmetic does:

    - a result multiplied by a Python number (``0.9 * (a - b)``) shares its buffers and records
      the factor (``Flat.scaled``); nothing is computed yet, and reading it multiplies once;
    - ``x + s·y``, ``s·x + y`` and ``x - s·y``, where only one side carries such a factor, are one
      ``addcmul`` pass, used only where it rounds like a product then a sum (``exact_fusion``).

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


def binary_(model: nn.Module, op: lw.Op, others: Sequence[object]) -> bool:
    """``op`` in place on ``model``'s buffers; ``False`` (nothing written) when the packed path does not apply.

    >>> net = torch.nn.Linear(2, 1)
    >>> expected = net.weight * 3
    >>> binary_(net, lw.MUL, [3.0]), torch.equal(net.weight, expected)
    (True, True)
    """
    prepared = _prepared(model, op.name, others, False)
    if prepared is None:
        return False
    layout, flat, _, operands = prepared
    check_converted(op.name, layout.names, flat, operands)
    kernel_(op, writable(op.name, layout.names, flat), readable(operands))
    written(layout.params, flat.plan)  # (a result not built yet has no Parameters to tell)
    return True


def check_converted(fn: str, names: Sequence[str], flat: Flat, operands: Sequence[object]) -> None:
    """``_leafwise.check_converted`` for every number among ``operands``, against ``flat``'s buffers.

    >>> plan = plan_for([(torch.Size([2]), torch.float16, torch.device("cpu"))], [True])
    >>> check_converted("pow", ["w"], Flat(plan, [torch.ones(2, dtype=torch.float16)], {}), [1e5])
    Traceback (most recent call last):
    ...
    RuntimeError: pow: the exponent 100000.0 does not fit in float16, so torch cannot apply it to parameter 'w' (float16); nothing was changed
    """
    plan = flat.plan
    for operand in operands:
        if type(operand) is not Flat:
            lw.check_converted(fn, operand, lambda: [(names[index[0]], dtype)
                                                     for index, dtype in zip(plan.groups, plan.dtypes)])


def writable(fn: str, names: Sequence[str], flat: Flat) -> list[Tensor]:
    """``flat``'s own buffers, to be written in place, once ``algebra.check_writable`` would let them.

    A flat buffer is 1-D and contiguous, so none has elements sharing memory: only inference
    tensors can refuse the write, and the full check (which names the parameter) runs for them.

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
    snapshot = _snapshot(model, layout)
    with torch.no_grad():
        buffers = make(flat)
    return _result(snapshot, configs, Flat(flat.plan, buffers, carried(flat, configs), owned=True))


def fill(flat: Flat, method: Callable[[Tensor], Any]) -> list[Tensor]:
    """New buffers like ``flat``'s whose leaf views are filled by ``method`` in leaf order.

    Random fills go leaf by leaf so that a seed gives the same values as per-tensor
    ``randn_like`` (and nytorch 1.1), packed or not.

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
