"""Read a module tree once (``Layout``) and rebuild fresh copies of it without deep copies.

``Layout`` lists the unique parameters in ``named_parameters()`` order, the
buffers in ``named_buffers()`` order, and every slot (module, attribute) that
holds them, so tied weights are rebuilt tied.  ``rebuild`` makes new instances
of every module class, sharing nothing mutable with the source: containers are
copied, parameters are the tensors it is given, buffers are cloned unless given.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import nn

Tensor = torch.Tensor

# nn.Module's own containers: copied per instance so hooks added to a result never reach its source.
_CONTAINERS = (
    "_backward_pre_hooks", "_backward_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks", "_non_persistent_buffers_set",
)


class Layout:
    """Where every parameter and buffer of a module tree lives.

    Attributes:
        modules: unique modules, root first, in ``named_modules()`` order.
        names: unique parameter names in ``named_parameters()`` order.
        params: the parameters, aligned with ``names``.
        buffer_names / buffers: the same for buffers.
        children / param_slots / buffer_slots: per module, ``(attribute, index)`` pairs
            (index into ``modules`` / ``params`` / ``buffers``; ``None`` for ``None`` entries).
        prefixes: per module, its dotted path from the root (``""`` for the root).
    """

    __slots__ = ("modules", "prefixes", "names", "params", "buffer_names", "buffers",
                 "children", "param_slots", "buffer_slots")

    def __init__(self, root: nn.Module) -> None:
        self.modules: list[nn.Module] = []
        self.prefixes: list[str] = []
        self.names: list[str] = []
        self.params: list[Tensor] = []
        self.buffer_names: list[str] = []
        self.buffers: list[Tensor] = []
        self.children: list[list[tuple[str, Optional[int]]]] = []
        self.param_slots: list[list[tuple[str, Optional[int]]]] = []
        self.buffer_slots: list[list[tuple[str, Optional[int]]]] = []
        self._visit(root, "", {}, {}, {})

    def _visit(self, module: nn.Module, prefix: str, module_index: dict[int, int],
               param_index: dict[int, int], buffer_index: dict[int, int]) -> int:
        # Recursive preorder, exactly nn.Module.named_modules(remove_duplicate=True).
        index = module_index[id(module)] = len(self.modules)
        self.modules.append(module)
        self.prefixes.append(prefix)
        self.param_slots.append(_slots(module._parameters, prefix, param_index, self.params, self.names))
        self.buffer_slots.append(
            _slots(module._buffers, prefix, buffer_index, self.buffers, self.buffer_names))
        children: list[tuple[str, Optional[int]]] = []
        self.children.append(children)
        for name, child in module._modules.items():
            if child is None:
                children.append((name, None))
                continue
            found = module_index.get(id(child))
            if found is None:
                found = self._visit(child, prefix + name + ".", module_index, param_index, buffer_index)
            children.append((name, found))
        return index


def _slots(table: Mapping[str, Optional[Tensor]], prefix: str, seen: dict[int, int],
           values: list[Tensor], names: list[str]) -> list[tuple[str, Optional[int]]]:
    slots: list[tuple[str, Optional[int]]] = []
    for name, value in table.items():
        if value is None:
            slots.append((name, None))
            continue
        found = seen.get(id(value))
        if found is None:
            found = seen[id(value)] = len(values)
            values.append(value)
            names.append(prefix + name)
        slots.append((name, found))
    return slots


def rebuild(layout: Layout, params: Sequence[Tensor], buffers: Optional[Sequence[Tensor]] = None) -> nn.Module:
    """A fresh copy of ``layout``'s module tree holding ``params`` (and ``buffers``).

    Args:
        layout: the source tree's layout.
        params: tensors aligned with ``layout.params``; each becomes the result's parameter as is
            when it already is an ``nn.Parameter``, else is wrapped in one with the source's
            ``requires_grad``.
        buffers: tensors aligned with ``layout.buffers``; ``None`` clones the source buffers.

    Returns:
        The new root module (same class as the source root).
    """
    if buffers is None:
        buffers = [buffer.clone() for buffer in layout.buffers]
    wrapped = [
        value if isinstance(value, nn.Parameter)
        else nn.Parameter(value, requires_grad=source.requires_grad)
        for value, source in zip(params, layout.params)
    ]
    copies: list[nn.Module] = []
    for module in layout.modules:
        new = object.__new__(type(module))
        state = module.__dict__.copy()
        for key in _CONTAINERS:
            value = state.get(key)
            if value is not None:
                state[key] = value.copy()
        state["_parameters"] = {}
        state["_buffers"] = {}
        state["_modules"] = {}
        new.__dict__ = state
        copies.append(new)
    for new, children, param_slots, buffer_slots in zip(
            copies, layout.children, layout.param_slots, layout.buffer_slots):
        new._modules.update((name, None if i is None else copies[i]) for name, i in children)
        new._parameters.update((name, None if i is None else wrapped[i]) for name, i in param_slots)
        new._buffers.update((name, None if i is None else buffers[i]) for name, i in buffer_slots)
    return copies[0]
