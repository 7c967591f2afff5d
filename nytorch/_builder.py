"""Straight-line module-tree builders, compiled once per structure that is used often.

Rebuilding a module tree in a Python loop spends most of its time on the loop
itself: which containers to copy, which slots to fill.  For a structure that is
rebuilt again and again (every operation on a model produces one), nytorch
writes that loop out as plain Python statements once and reuses the compiled
function; the generic loop in ``_rebuild.rebuild`` stays the reference and the fallback.

Compiling is not free: CPython's ``compile`` takes about 1 ms per module of the structure, and
the code saves a few µs per module on each use.  So a structure is compiled on its
``COMPILE_AFTER``-th use, not its first: a structure met a few times (one model soup, one task
vector, each candidate of an architecture search) keeps the generic loop and never pays it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import nn

#: ``build(states, types, params, buffers, root) -> new modules`` (see ``compile_builder``)
Builder = Callable[[Sequence[dict], Sequence[type], Sequence[torch.Tensor], Sequence[torch.Tensor], Optional[nn.Module]],
                   list[nn.Module]]
Capture = Callable[[Sequence[nn.Module]], list[dict]]
#: ``compile_gather``'s function: a tree's parameters and buffers, or ``None`` when it is not as listed.
Gather = Callable[[Sequence[nn.Module]], Optional[tuple[list[torch.Tensor], list[torch.Tensor]]]]

#: Compiled functions by structure, with the number of modules each covers, oldest first.
_COMPILED: dict[tuple, tuple[Callable[..., object], int]] = {}
#: The modules covered by ``_COMPILED`` (a function's code and key grow with its structure's modules).
_MODULES = [0]
#: Uses of a structure (rebuilds, captures, checks: each counted apart) before its code is compiled.
#: Measured on a 2-core CPU (``a + b`` on NytoModules, three first uses, then steady state per call):
#: 200 Linear layers 265 ms compiled on first use vs 57-89 ms generic, steady 1.6 vs 1.9 ms;
#: a 48-layer TransformerEncoder 470-680 ms vs 68 ms, steady 1.9-3.1 vs 3.8 ms; 2000 layers 2.1-2.3 s
#: vs 0.34-0.37 s, steady 13 vs 21 ms.  Compiling pays after some tens to hundreds of uses.
COMPILE_AFTER = 32
#: Bounds on ``_COMPILED``: entries, and modules (about 2 KB of code per module, so some 64 MB in all): an
#: architecture search of deep networks (a thousand modules each) would otherwise hold gigabytes.
MAX_ENTRIES, MAX_MODULES = 512, 32768


def _memo(key: tuple, make: Callable[[], Callable[..., object]], modules: int) -> Callable[..., object]:
    """One compiled function per structure of ``modules`` modules, shared by every model of that structure.

    Bounded by ``MAX_ENTRIES`` and ``MAX_MODULES``: the oldest structures' functions go first.
    """
    found = _COMPILED.get(key)
    if found is None:
        if not _COMPILED:
            _MODULES[0] = 0
        while _COMPILED and (len(_COMPILED) >= MAX_ENTRIES or _MODULES[0] + modules > MAX_MODULES):
            _MODULES[0] -= _COMPILED.pop(next(iter(_COMPILED)))[1]
        found = _COMPILED[key] = (make(), modules)
        _MODULES[0] += modules
    return found[0]


def _frozen(tables: Sequence[Sequence[tuple[str, Optional[int]]]]) -> tuple:
    return tuple(map(tuple, tables))


def _shape(states: Sequence[dict], containers: frozenset[str]) -> tuple:
    """What generated code depends on in each state: its size and the containers it holds, with their types
    (``capture`` stands a shared empty one of that type in: a user's ``self._keys = []`` is not a dict)."""
    return tuple((len(state), tuple((key, type(state[key])) for key in sorted(containers.intersection(state))
                                    if state[key] is not None))
                 for state in states)


#: The ``__dict__`` key of a result whose module tree is still pending (``_pending.Pending``).
PENDING = "_nyto_pending"


def adopt(root: object, state: dict) -> None:
    """Give the pending result ``root`` its built ``state`` in the very ``__dict__`` object it has.

    Code that took that dict before the tree was built keeps writing where the module reads:
    ``functools.cached_property`` takes ``instance.__dict__``, computes (which builds the tree),
    then stores its value there.  Keys stored before the build stay unless ``state`` has them; the
    pending marker goes last, once the state is complete.

    >>> class Box: pass
    >>> box = Box(); box.__dict__.update({PENDING: 1, "cached": 2})
    >>> own = box.__dict__
    >>> adopt(box, {"x": 3})
    >>> box.__dict__ is own, box.__dict__
    (True, {'cached': 2, 'x': 3})
    """
    own = root.__dict__
    own.update(state)
    own.pop(PENDING, None)


class Stale(Exception):
    """A module no longer looks like the one the builder was written for."""


def _table(slots: Sequence[tuple[str, Optional[int]]], values: str) -> str:
    """A dict literal: ``{'weight': params[0], ...}`` (``values='n'`` names locals ``n0, n1...``)."""
    def value(i: Optional[int]) -> str:
        return "None" if i is None else f"n{i}" if values == "n" else f"{values}[{i}]"
    return "{" + ", ".join(f"{name!r}: {value(i)}" for name, i in slots) + "}"


def compile_builder(states: Sequence[dict], children: Sequence[Sequence[tuple[str, Optional[int]]]],
                    param_slots: Sequence[Sequence[tuple[str, Optional[int]]]],
                    buffer_slots: Sequence[Sequence[tuple[str, Optional[int]]]],
                    containers: frozenset[str]) -> Builder:
    """``_compile_builder``, once per structure."""
    key = ("build", _shape(states, containers), _frozen(children), _frozen(param_slots), _frozen(buffer_slots))
    make = lambda: _compile_builder(states, children, param_slots, buffer_slots, containers)  # noqa: E731
    return _memo(key, make, len(states))  # type: ignore[return-value]


def _compile_builder(states: Sequence[dict], children: Sequence[Sequence[tuple[str, Optional[int]]]],
                    param_slots: Sequence[Sequence[tuple[str, Optional[int]]]],
                    buffer_slots: Sequence[Sequence[tuple[str, Optional[int]]]],
                    containers: frozenset[str]) -> Builder:
    """A function ``build(states, types, params, buffers, root) -> new modules`` for trees shaped like ``states``.

    ``states`` are the modules' ``__dict__``s (or ``capture``'s copies of them); each is copied, its
    containers too, before it becomes a new module's ``__dict__``.  ``root``, when not ``None``, is the
    object that becomes the new root (its ``__dict__`` is filled in place, see ``adopt``).  It raises ``Stale`` when a
    state's attribute count differs from the one it was written for (then the caller falls back to
    the generic loop).

    >>> layer = torch.nn.Linear(1, 1)
    >>> build = compile_builder([layer.__dict__], [[]], [[("weight", 0), ("bias", 1)]], [[]],
    ...                         frozenset({"_forward_hooks"}))
    >>> new = build([layer.__dict__], [torch.nn.Linear], [torch.nn.Parameter(torch.ones(1, 1)), None], [], None)[0]
    >>> new is layer, new.weight.item(), new._forward_hooks is layer._forward_hooks
    (False, 1.0, False)
    """
    lines = ["def build(states, types, params, buffers, root):"]
    for k, state in enumerate(states):
        lines.append(f"    s{k} = states[{k}].copy()")
        lines.append(f"    if len(s{k}) != {len(state)}: raise Stale")
        for key in sorted(key for key in containers.intersection(state) if state[key] is not None):
            lines.append(f"    s{k}[{key!r}] = s{k}[{key!r}].copy()")
        lines.append(f"    s{k}['_parameters'] = {_table(param_slots[k], 'params')}")
        lines.append(f"    s{k}['_buffers'] = {_table(buffer_slots[k], 'buffers')}")
        made = "new(types[0]) if root is None else root" if k == 0 else f"new(types[{k}])"
        lines.append(f"    n{k} = {made}")
    for k, slots in enumerate(children):
        lines.append(f"    s{k}['_modules'] = {_table(slots, 'n')}")
    # the root's state goes in last: a root that was pending stays so until its tree is complete
    for k in reversed(range(len(states))):
        lines.append(f"    set_state(n{k}, '__dict__', s{k})" if k else "    adopt(root, s0) if root is not None else "
                     "set_state(n0, '__dict__', s0)")
    lines.append("    return [" + ", ".join(f"n{k}" for k in range(len(states))) + "]")
    namespace = {"new": object.__new__, "set_state": object.__setattr__, "adopt": adopt, "Stale": Stale}
    exec(compile("\n".join(lines), "<nytorch rebuild>", "exec"), namespace)  # noqa: S102 - our own generated code
    return namespace.pop("build")  # type: ignore[return-value]  # popped: no function <-> globals cycle


def empty_like(container: object) -> object:
    """A shared empty container of ``container``'s type, or ``container`` copied when it is not empty.

    ``capture`` stores these: builders copy every container again, so the shared empties are never
    handed out, and hooks added to a module after its capture do not reach the copies.

    >>> from collections import OrderedDict
    >>> empty_like(OrderedDict()) is empty_like(OrderedDict()), empty_like({1: 2})
    (True, {1: 2})
    """
    if container:
        return container.copy()  # type: ignore[attr-defined]
    kind = type(container)
    found = _EMPTIES.get(kind)
    if found is None:
        found = _EMPTIES[kind] = kind()
    return found


_EMPTIES: dict[type, object] = {}


def compile_capture(states: Sequence[dict], containers: frozenset[str]) -> Capture:
    """``_compile_capture``, once per structure."""
    return _memo(("capture", _shape(states, containers)),  # type: ignore[return-value]
                 lambda: _compile_capture(states, containers), len(states))


def _compile_capture(states: Sequence[dict], containers: frozenset[str]) -> Capture:
    """A function ``capture(modules) -> states``: each module's ``__dict__`` as it is now, for a later build.

    Containers are copied (empty ones stand for themselves, see ``empty_like``), and the
    parameter, buffer and child tables are dropped: the build fills them in.  It raises ``Stale``
    like the builder.

    >>> layer = torch.nn.Linear(1, 1)
    >>> state = compile_capture([layer.__dict__], frozenset({"_forward_hooks"}))([layer])[0]
    >>> state["_parameters"], state["in_features"], state["_forward_hooks"] is layer._forward_hooks
    (None, 1, False)
    """
    lines = ["def capture(modules):"]
    namespace: dict[str, object] = {"Stale": Stale}
    for k, state in enumerate(states):
        keys = sorted(key for key in containers.intersection(state) if state[key] is not None)
        # containers are nearly always empty: one test for all of them, a copy only for those that are not
        empties = {key: empty_like(type(state[key])()) for key in keys}
        namespace[f"e{k}"] = empties
        lines.append(f"    d{k} = modules[{k}].__dict__")
        lines.append(f"    s{k} = d{k}.copy()")
        lines.append(f"    if len(s{k}) != {len(state)}: raise Stale")
        if keys:
            lines.append(f"    s{k}.update(e{k})")
            lines.append("    if " + " or ".join(f"d{k}[{key!r}]" for key in keys) + ":")
            for key in keys:
                lines.append(f"        if d{k}[{key!r}]: s{k}[{key!r}] = d{k}[{key!r}].copy()")
        lines.append(f"    s{k}['_parameters'] = s{k}['_buffers'] = s{k}['_modules'] = None")
    lines.append("    return [" + ", ".join(f"s{k}" for k in range(len(states))) + "]")
    exec(compile("\n".join(lines), "<nytorch capture>", "exec"), namespace)  # noqa: S102 - our own generated code
    return namespace.pop("capture")  # type: ignore[return-value]  # popped: no function <-> globals cycle


def compile_gather(children: Sequence[Sequence[tuple[str, Optional[int]]]],
                   param_slots: Sequence[Sequence[tuple[str, Optional[int]]]],
                   buffer_slots: Sequence[Sequence[tuple[str, Optional[int]]]]) -> Gather:
    """``_compile_gather``, once per structure."""
    key = ("gather", _frozen(children), _frozen(param_slots), _frozen(buffer_slots))
    make = lambda: _compile_gather(children, param_slots, buffer_slots)  # noqa: E731
    return _memo(key, make, len(children))  # type: ignore[return-value]


def _compile_gather(children: Sequence[Sequence[tuple[str, Optional[int]]]],
                    param_slots: Sequence[Sequence[tuple[str, Optional[int]]]],
                    buffer_slots: Sequence[Sequence[tuple[str, Optional[int]]]]) -> Gather:
    """A function ``gather(modules) -> (params, buffers) or None``: the tensors, if the tree is as listed.

    ``None`` unless every module's child, parameter and buffer tables have the listed names, in the
    listed order, each child being the listed module (``is``) and each tensor listed twice (tied) the
    same object in both places. It reads the tables the way ``_walk.snapshot`` does, minus the loop.

    >>> layer = torch.nn.Linear(1, 1)
    >>> gather = compile_gather([[]], [[("weight", 0), ("bias", 1)]], [[]])
    >>> gather([layer]) == ([layer.weight, layer.bias], [])
    True
    >>> layer.register_parameter("extra", None)
    >>> gather([layer]) is None
    True
    """
    lines = ["def gather(modules):"]
    namespace: dict[str, object] = {}
    assigned: set[str] = set()  # locals holding a tensor already (a later place of it is tied to it)
    for k in range(len(children)):
        lines.append(f"    d = modules[{k}].__dict__")
        for table, slots, local in (("_modules", children[k], "m"), ("_parameters", param_slots[k], "p"),
                                    ("_buffers", buffer_slots[k], "b")):
            if not slots:
                lines.append(f"    if d[{table!r}]: return None")
                continue
            namespace[f"k{k}{table}"] = [name for name, _ in slots]
            lines.append(f"    t = d[{table!r}]")
            lines.append(f"    if [*t] != k{k}{table}: return None")
            tests = []
            for name, i in slots:
                if i is None:
                    tests.append(f"t[{name!r}] is not None")
                elif local == "m":
                    tests.append(f"t[{name!r}] is not modules[{i}]")
                elif f"{local}{i}" in assigned:
                    tests.append(f"t[{name!r}] is not {local}{i}")  # tied: the first place's object
                else:
                    assigned.add(f"{local}{i}")
                    lines.append(f"    {local}{i} = t[{name!r}]")
            if tests:
                lines.append("    if " + " or ".join(tests) + ": return None")
    counts = {"p": 1 + max((i for slots in param_slots for _, i in slots if i is not None), default=-1),
              "b": 1 + max((i for slots in buffer_slots for _, i in slots if i is not None), default=-1)}
    lines.append("    return [" + ", ".join(f"p{i}" for i in range(counts["p"])) + "], ["
                 + ", ".join(f"b{i}" for i in range(counts["b"])) + "]")
    exec(compile("\n".join(lines), "<nytorch gather>", "exec"), namespace)  # noqa: S102 - our own generated code
    return namespace.pop("gather")  # type: ignore[return-value]  # popped: no function <-> globals cycle
