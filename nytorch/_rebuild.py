"""Rebuild fresh copies of a module tree from its ``Layout``, without deep copies.

``rebuild`` makes new instances of every module class, sharing nothing mutable with the
source: the containers torch mutates in place are copied (``_walk.CONTAINERS``), parameters are
the tensors it is given, buffers are cloned unless given.  ``capture`` takes the state a result
keeps of its source now, for a build later (``build_into``, on first touch).  Hooks bound to the
source's modules, and ``torch.compile`` wrappers, are re-pointed at the copy's own, as
``copy.deepcopy`` would.
"""
from __future__ import annotations

import operator
import sys
from types import MethodType
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from . import _builder
from ._builder import Stale, adopt, compile_builder, compile_capture, empty_like
from ._walk import CONTAINERS, Layout, remember_layout

Tensor = torch.Tensor

__all__ = ["capture", "build_into", "rebuild", "wrap_parameters"]


_CONTAINER_SET = frozenset(CONTAINERS)


def _build_generic(layout: Layout, states: Sequence[dict], types: Sequence[type], wrapped: Sequence[Tensor],
                   buffers: Sequence[Tensor], root: Optional[nn.Module]) -> list[nn.Module]:
    copies: list[nn.Module] = []
    make, set_state = object.__new__, object.__setattr__
    news: list[dict] = []
    for k, (source, kind, param_slots, buffer_slots) in enumerate(
            zip(states, types, layout.param_slots, layout.buffer_slots)):
        state = source.copy()
        for key in _CONTAINER_SET.intersection(state):
            value = state[key]
            if value is not None:
                state[key] = value.copy()
        state["_parameters"] = {name: None if i is None else wrapped[i] for name, i in param_slots}
        state["_buffers"] = {name: None if i is None else buffers[i] for name, i in buffer_slots}
        news.append(state)
        copies.append(root if k == 0 and root is not None else make(kind))
    for state, children in zip(news, layout.children):
        state["_modules"] = {name: None if i is None else copies[i] for name, i in children}
    for new, state in reversed(list(zip(copies, news))):  # the root last: see ``compile_builder``
        if new is root:
            adopt(root, state)
        else:
            set_state(new, "__dict__", state)
    return copies


def _build(layout: Layout, states: Sequence[dict], types: Sequence[type], wrapped: Sequence[Tensor],
           buffers: Sequence[Tensor], root: Optional[nn.Module] = None) -> list[nn.Module]:
    """New module objects for ``layout``: compiled straight-line code once a family was rebuilt often."""
    family = layout._family
    builder = family.build
    if builder is None:
        family.builds += 1
        if family.builds < _builder.COMPILE_AFTER:  # a structure rebuilt a few times is not worth compiling
            return _build_generic(layout, states, types, wrapped, buffers, root)
        builder = family.build = compile_builder(states, layout.children, layout.param_slots,
                                              layout.buffer_slots, _CONTAINER_SET)
    try:
        return builder(states, types, wrapped, buffers, root)  # type: ignore[no-any-return]
    except (Stale, KeyError, AttributeError):  # a module gained or lost attributes since: the generic loop
        return _build_generic(layout, states, types, wrapped, buffers, root)


def capture(layout: Layout) -> tuple[list[dict], list[type]]:
    """The state of every module of ``layout`` now, for a build later (see ``_builder.compile_capture``).

    >>> import torch
    >>> states, types = capture(Layout(torch.nn.Linear(1, 1)))
    >>> states[0]["in_features"], types
    (1, [<class 'torch.nn.modules.linear.Linear'>])
    """
    modules = layout.modules
    types = list(map(type, modules))
    _refuse_shared_state(types)
    family = layout._family
    capturer = family.capture
    if capturer is None:
        states = [_capture_generic(module) for module in modules]
        family.captures += 1
        if family.captures >= _builder.COMPILE_AFTER:
            family.capture = compile_capture(states, _CONTAINER_SET)
    else:
        try:
            states = capturer(modules)
        except (Stale, KeyError):
            states = [_capture_generic(module) for module in modules]
    _rebind_hooks(modules, states, None)
    return states, types


def _capture_generic(module: nn.Module) -> dict:
    state = module.__dict__.copy()
    for key in _CONTAINER_SET.intersection(state):
        value = state[key]
        if value is not None:
            state[key] = empty_like(value)
    state["_parameters"] = state["_buffers"] = state["_modules"] = None
    return state


def wrap_parameters(params: Sequence[Tensor], requires_grad: Sequence[bool]) -> list[Tensor]:
    """``params`` as ``nn.Parameter``s: plain tensors wrapped (with ``requires_grad``), Parameters kept.

    >>> import torch
    >>> [type(p).__name__ for p in wrap_parameters([torch.ones(1), torch.nn.Parameter(torch.ones(1))], [False, True])]
    ['Parameter', 'Parameter']
    """
    make_parameter, plain = Tensor._make_subclass, Tensor
    try:
        return [
            # nn.Parameter.__new__ does exactly this for plain tensors, minus a Python frame
            make_parameter(nn.Parameter, value, flag) if type(value) is plain
            else value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=flag)
            for value, flag in zip(params, requires_grad)
        ]
    except RuntimeError:
        # Values made under torch.inference_mode() get their Parameters in it, as they would have
        # there: outside it torch refuses requires_grad=True on an inference tensor.
        if torch.is_inference_mode_enabled() or not any(value.is_inference() for value in params):
            raise
    with torch.inference_mode():
        return wrap_parameters(params, requires_grad)


def _refuse_shared_state(types: Sequence[type]) -> None:
    """Raise for module classes whose copies would share state a new model must not share.

    A ``DistributedDataParallel`` copy would keep the source's reducer, so its gradients would
    never be averaged across ranks: a silent divergence.  Arithmetic belongs on ``ddp.module``.
    """
    if _DDP in types:  # one C-level scan: this runs on every result
        raise TypeError("DistributedDataParallel: expected a model, got a DistributedDataParallel wrapper, whose "
                        "copy would share its reducer (gradients never averaged across ranks); build results from "
                        "ddp.module (in-place operations on the wrapped model are fine)")


_DDP = nn.parallel.DistributedDataParallel


def _rebind_compiled(copies: Sequence[nn.Module], types: Sequence[type]) -> None:
    """Point every ``torch.compile`` wrapper among ``copies`` at its own ``_orig_mod``.

    An ``OptimizedModule`` keeps its compiled ``forward`` in its ``__dict__``, bound to the module
    it wrapped: a shallow copy would run the source's parameters.  Rebuilt as unpickling does
    (``OptimizedModule.__setstate__``), it wraps the copy's own.
    """
    frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
    optimized = getattr(frame, "OptimizedModule", None)
    if optimized is None or optimized not in types:  # one C-level scan: this runs on every build
        return
    for module, kind in zip(copies, types):
        if kind is optimized:
            module.__setstate__(module.__dict__)


# hook tables (not their ``_with_kwargs`` / ``_always_called`` flag tables)
_HOOK_TABLES = tuple(name for name in CONTAINERS if name.endswith("_hooks"))


_hook_tables = operator.itemgetter(*_HOOK_TABLES)


_WrappedHook: Any = getattr(sys.modules["torch.nn.modules.module"], "_WrappedHook", None)


class _Rebind:
    """A hook bound to modules of its tree, by position: a bound method's ``self`` (``method_of``) and
    the module that ``register_load_state_dict_pre_hook`` keeps (``owner``), made again for a copy.

    It keeps the hook's function, never the source's module: pending results hold these, and a chain
    of results (``net = net + noise`` in a loop) would otherwise keep the first model alive for good.
    """

    __slots__ = ("function", "method_of", "owner", "wrapped", "outside")

    def __init__(self, hook: Any, method_of: Optional[int], owner: Optional[int]) -> None:
        self.method_of, self.owner = method_of, owner
        self.wrapped = not isinstance(hook, MethodType)  # else a ``_WrappedHook``
        if not self.wrapped:
            self.function, self.outside = hook.__func__, None
            return
        inner = hook.hook
        self.function = inner if method_of is None else inner.__func__
        # the weak reference to a module outside the tree, kept as it is
        self.outside = hook.module if owner is None and hook.with_module else None

    def bind(self, copies: Sequence[nn.Module]) -> Any:
        """The hook bound to ``copies`` (the new tree's modules, in the source's order)."""
        function, method_of, owner = self.function, self.method_of, self.owner
        if not self.wrapped:
            return MethodType(function, copies[method_of])  # type: ignore[index]
        inner = function if method_of is None else MethodType(function, copies[method_of])
        made = _WrappedHook(inner, copies[owner] if owner is not None else None)
        if self.outside is not None:
            made.module, made.with_module = self.outside, True
        return made


def _rebind_of(hook: Any, index: dict[int, int]) -> Optional[_Rebind]:
    """``hook`` as a ``_Rebind`` when it is bound to a module of the tree (``index``: id -> position)."""
    if isinstance(hook, MethodType):
        method_of = index.get(id(hook.__self__))
        return None if method_of is None else _Rebind(hook, method_of, None)
    if _WrappedHook is not None and isinstance(hook, _WrappedHook):
        inner = hook.hook
        method_of = index.get(id(inner.__self__)) if isinstance(inner, MethodType) else None
        owner = hook.module() if hook.with_module else None
        owner_at = None if owner is None else index.get(id(owner))
        return None if method_of is None and owner_at is None else _Rebind(hook, method_of, owner_at)
    return None


def _rebind_hooks(sources: Sequence[nn.Module], states: Sequence[dict],
                  copies: Optional[Sequence[nn.Module]]) -> None:
    """Hooks of ``states`` bound to a module of ``sources`` made ``_Rebind``s, or bound to ``copies`` if given.

    As ``copy.deepcopy`` does, a result's bound-method hooks (``self.register_forward_hook(self.method)``)
    and ``register_load_state_dict_pre_hook``'s module reference must name the result's modules, not the
    source's (whose ``load_state_dict`` would hand the source to the hook, and raise once it died).
    ``capture`` marks them (``copies`` None; the source may be gone by the build), builds bind them.
    The tables of ``states`` are their own copies (see ``CONTAINERS``): entries are replaced in place.
    """
    try:
        if not any(map(any, map(_hook_tables, states))):  # nearly always: one C-level pass
            return
    except KeyError:  # a module without some table (its own __dict__ handling): the loop below
        pass
    index: Optional[dict[int, int]] = None
    for state in states:
        for key in _HOOK_TABLES:
            table = state.get(key)
            if not table:
                continue
            if index is None:
                index = {id(source): position for position, source in enumerate(sources)}
            for handle, hook in list(table.items()):
                found = hook if type(hook) is _Rebind else _rebind_of(hook, index)
                if found is not None:
                    table[handle] = found if copies is None else found.bind(copies)


def build_into(layout: Layout, states: Sequence[dict], types: Sequence[type], wrapped: Sequence[Tensor],
               buffers: Sequence[Tensor], root: Optional[nn.Module] = None) -> nn.Module:
    """The tree of ``layout`` built from ``states`` holding ``wrapped`` and ``buffers``, remembered; its root."""
    copies = _build(layout, states, types, wrapped, buffers, root)
    _rebind_compiled(copies, types)
    _rebind_hooks(layout.modules, list(map(vars, copies)), copies)
    result = copies[0]
    remember_layout(result, layout._sibling(copies, list(wrapped), list(buffers)))  # type: ignore[arg-type]
    return result


def rebuild(layout: Layout, params: Sequence[Tensor], buffers: Optional[Sequence[Tensor]] = None) -> nn.Module:
    """A fresh copy of ``layout``'s module tree holding ``params`` (and ``buffers``).

    Args:
        layout: the source tree's layout.
        params: tensors aligned with ``layout.params``; an ``nn.Parameter`` is used as is,
            any other tensor is wrapped in a new one with the source's ``requires_grad``.
        buffers: tensors aligned with ``layout.buffers``; ``None`` clones the source buffers.

    Returns:
        The new root module (same class as the source root).

    >>> import torch
    >>> net = torch.nn.Linear(1, 1)
    >>> copy = rebuild(Layout(net), [torch.ones(1, 1), torch.zeros(1)])
    >>> copy is net, copy.weight.item(), copy.weight.requires_grad
    (False, 1.0, True)
    """
    if buffers is None:
        buffers = [buffer.clone() for buffer in layout.buffers]
    else:
        buffers = list(buffers)
    modules = layout.modules
    types = list(map(type, modules))
    _refuse_shared_state(types)
    wrapped = wrap_parameters(params, [source.requires_grad for source in layout.params])
    return build_into(layout, [module.__dict__ for module in modules], types, wrapped, buffers)
