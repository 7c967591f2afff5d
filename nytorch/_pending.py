"""Results built on first touch: the values at once, the module tree when first read.

An operator on packed models (``_packed``) computes its output buffers at once and returns an
object of the model's class that holds a ``Pending``: those buffers and what the result keeps of
its operand (``snapshot_of``).  Its tree is built on first touch (``Pending.realize``), so the
intermediate results of a chain such as ``0.9 * (a - b) + a`` never build theirs.
"""
from __future__ import annotations

import operator
import os
import threading
import weakref
from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from . import _algebra as algebra
from . import _pool as pool
from ._config import ParamConfig
from ._flat import Flat, own_counters
from ._rebuild import build_into, capture, wrap_parameters
from ._walk import _CACHE, PENDING, Layout, layout_of

Tensor = torch.Tensor

__all__ = ["Pending", "Snapshot", "snapshot_of", "pending_result", "remember"]


def remember(result: nn.Module, flat: Flat, params: Sequence[Tensor]) -> None:
    """Record that ``result`` (just rebuilt from ``flat``'s views, its Parameters ``params``) is packed in ``flat``'s buffers."""
    stored = _CACHE.get(result)
    if stored is not None:
        stored.packing[0] = Flat(flat.plan, flat.buffers, {i: params[i] for i in flat.rest})


_REQUIRES_GRAD = operator.attrgetter("requires_grad")


_LOCK = threading.RLock()


def _after_fork() -> None:
    """A forked child gets a lock of its own: another thread of the parent may have been building a result."""
    global _LOCK
    _LOCK = threading.RLock()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork)


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
            remember(root, flat, wrapped)
            self.flat = None  # the buffers are the model's storage now

    def __del__(self) -> None:
        flat = self.flat
        if flat is not None:  # died unseen: its buffers can hold the next result
            try:
                pool.give(flat.plan, flat.raw)
            except Exception:  # pragma: no cover - interpreter shutdown
                pass


Snapshot = tuple[Layout, list[dict], list[type], tuple[bool, ...], list[Tensor]]


def snapshot_of(model: nn.Module, layout: Layout) -> Snapshot:
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


def pending_result(snapshot: Snapshot, configs: Optional[Sequence[ParamConfig]], out: Flat) -> nn.Module:
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
