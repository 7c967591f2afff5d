"""What the ``EMA`` watches to notice a changed model cheaply: its tensor tables and its ``ParamConfig``s."""
from __future__ import annotations

import operator
from typing import Any, Optional

import optree
import torch

from .._config import ParamConfig
from .._walk import CONFIG_ATTR
from ._state import Operand

Tensor = torch.Tensor
_OPERATIONAL = operator.itemgetter("operational")  # read from a ParamConfig's ``__dict__``: the fastest way

__all__ = ["entries", "holds", "Configs"]


def entries(online: Operand) -> tuple[list[dict[str, Any]], list[str], list[Tensor]]:
    """``(tables, keys, tensors)``: each ``_parameters`` / ``_buffers`` entry holding a leaf of a module operand.

    A tied weight is listed once per module holding it.  For a pytree of dicts (``{"w": w}``, a
    ``state_dict()``), each leaf's entry in the dict holding it.  Empty for Particles, Swarms
    and pytrees with other containers.
    """
    tables: list[dict[str, Any]] = []
    keys: list[str] = []
    tensors: list[Tensor] = []
    layout = online.layout
    if online.kind == "tree":
        return _dict_entries(online)
    if online.kind != "module" or layout is None:
        return tables, keys, tensors
    with_buffers = len(online.leaves) > online.params
    for module, param_slots, buffer_slots in zip(layout.modules, layout.param_slots, layout.buffer_slots):
        for table, slots, leaves in ((module._parameters, param_slots, layout.params),
                                     (module._buffers, buffer_slots, layout.buffers if with_buffers else None)):
            if leaves is None:
                continue
            for key, index in slots:
                if index is not None:
                    tables.append(table)
                    keys.append(key)
                    tensors.append(leaves[index])
    return tables, keys, tensors


def holds(tables: list[dict[str, Any]], keys: list[str], tensors: list[Tensor]) -> bool:
    """True while each table still holds, under its key, the very tensor object given for it (``entries``)."""
    return all(map(operator.is_, map(dict.get, tables, keys), tensors))


def _dict_entries(online: Operand) -> tuple[list[dict[str, Any]], list[str], list[Tensor]]:
    """``entries`` of a pytree operand whose containers are all dicts (empty otherwise)."""
    tables: list[dict[str, Any]] = []
    keys: list[str] = []
    for path in optree.tree_paths(online.source):
        table = online.source
        for key in path[:-1]:
            table = table[key] if isinstance(table, dict) else None
        if not path or not isinstance(table, dict):
            return [], [], []
        tables.append(table)
        keys.append(path[-1])
    # the tensors now under those keys: the operand's leaves may be in another operand's order (``matched``)
    return tables, keys, [table[key] for table, key in zip(tables, keys)]


class Configs:
    """Whether an operand's ``ParamConfig``s changed since it was read (``changed()``, a few µs).

    ``set_param_config`` adds configs to a module's table or flips ``operational`` on the
    config objects it already holds (shared by every model built from it).  Both are seen
    here, from each table's size (and object: a table put on a module in place of another
    counts too) and the flag of each distinct config: ~4 µs for 200 configs, nothing for a
    model without configs.  Swarms are read through their ``ParamConfig`` list only.

    >>> import torch
    >>> from nytorch import NytoModule
    >>> from nytorch.merge._state import operand
    >>> class Net(NytoModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.layer = torch.nn.Linear(1, 1)
    >>> net = Net()
    >>> watch = Configs(operand("demo", net, buffers=False))
    >>> watch.changed()
    False
    >>> net.set_param_config(operational=False, name="layer")   # adds configs
    >>> watch.changed()
    True
    >>> watch = Configs(operand("demo", net, buffers=False))
    >>> net.set_param_config(operational=True)                   # flips them
    >>> watch.changed()
    True
    """

    __slots__ = ("tables", "states", "flags")

    def __init__(self, op: Operand) -> None:
        layout = op.layout if op.kind == "module" else op.source._layout if op.kind == "particle" else None
        self.tables: list[tuple[Optional[dict[str, Any]], dict[str, ParamConfig], int]] = []
        if layout is not None:
            for _, table, k in layout.tables:
                owner = layout.modules[k].__dict__ if k < len(layout.modules) else None
                self.tables.append((owner, table, len(table)))
        distinct = {} if op.configs is None else {id(config): config for config in op.configs}
        self.states: list[dict[str, Any]] = [vars(config) for config in distinct.values()]
        self.flags: list[bool] = list(map(_OPERATIONAL, self.states))

    def changed(self) -> bool:
        for owner, table, size in self.tables:
            if len(table) != size or (owner is not None and owner.get(CONFIG_ATTR) is not table):
                return True
        return list(map(_OPERATIONAL, self.states)) != self.flags
