"""Straight-line module-tree builders, compiled once per structure.

Rebuilding a module tree in a Python loop spends most of its time on the loop
itself: which containers to copy, which slots to fill.  For a structure that is
rebuilt again and again (every operation on a model produces one), nytorch
writes that loop out as plain Python statements once and reuses the compiled
function; the generic loop in ``_walk.rebuild`` stays the reference and the fallback.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import nn

Builder = Callable[[Sequence[nn.Module], Sequence[torch.Tensor], Sequence[torch.Tensor]], list[nn.Module]]


class Stale(Exception):
    """A module no longer looks like the one the builder was written for."""


def _table(slots: Sequence[tuple[str, Optional[int]]], values: str) -> str:
    """A dict literal: ``{'weight': params[0], ...}`` (``values='n'`` names locals ``n0, n1...``)."""
    def value(i: Optional[int]) -> str:
        return "None" if i is None else f"n{i}" if values == "n" else f"{values}[{i}]"
    return "{" + ", ".join(f"{name!r}: {value(i)}" for name, i in slots) + "}"


def compile_builder(modules: Sequence[nn.Module], children: Sequence[Sequence[tuple[str, Optional[int]]]],
                    param_slots: Sequence[Sequence[tuple[str, Optional[int]]]],
                    buffer_slots: Sequence[Sequence[tuple[str, Optional[int]]]],
                    containers: frozenset[str]) -> Builder:
    """A function ``build(modules, params, buffers) -> new modules`` for trees shaped like ``modules``.

    It raises ``Stale`` when a module's attribute count differs from the one it was written for
    (then the caller falls back to the generic loop).

    >>> layer = torch.nn.Linear(1, 1)
    >>> build = compile_builder([layer], [[]], [[("weight", 0), ("bias", 1)]], [[]], frozenset({"_forward_hooks"}))
    >>> new = build([layer], [torch.nn.Parameter(torch.ones(1, 1)), None], [])[0]
    >>> new is layer, new.weight.item(), new._forward_hooks is layer._forward_hooks
    (False, 1.0, False)
    """
    lines = ["def build(modules, params, buffers):"]
    for k, module in enumerate(modules):
        state = module.__dict__
        lines.append(f"    s{k} = modules[{k}].__dict__.copy()")
        lines.append(f"    if len(s{k}) != {len(state)}: raise Stale")
        for key in sorted(key for key in containers.intersection(state) if state[key] is not None):
            lines.append(f"    s{k}[{key!r}] = s{k}[{key!r}].copy()")
        lines.append(f"    s{k}['_parameters'] = {_table(param_slots[k], 'params')}")
        lines.append(f"    s{k}['_buffers'] = {_table(buffer_slots[k], 'buffers')}")
        lines.append(f"    n{k} = new(type(modules[{k}]))")
        lines.append(f"    set_state(n{k}, '__dict__', s{k})")
    for k, slots in enumerate(children):
        lines.append(f"    s{k}['_modules'] = {_table(slots, 'n')}")
    lines.append("    return [" + ", ".join(f"n{k}" for k in range(len(modules))) + "]")
    namespace = {"new": object.__new__, "set_state": object.__setattr__, "Stale": Stale}
    exec(compile("\n".join(lines), "<nytorch rebuild>", "exec"), namespace)  # noqa: S102 - our own generated code
    return namespace["build"]  # type: ignore[no-any-return, return-value]
