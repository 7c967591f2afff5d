"""Read a module tree once (``Layout``) and rebuild fresh copies of it without deep copies.

``Layout`` lists the unique parameters in ``named_parameters()`` order, the
buffers in ``named_buffers()`` order, and every slot (module, attribute) that
holds them, so tied weights are rebuilt tied.  ``rebuild`` makes new instances
of every module class, sharing nothing mutable with the source: containers are
copied, parameters are the tensors it is given, buffers are cloned unless given.
"""
from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import nn

from ._builder import Stale, compile_builder

Tensor = torch.Tensor

# nn.Module's own containers: copied per instance so hooks added to a result never reach its source.
_CONTAINERS = (
    "_backward_pre_hooks", "_backward_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks", "_non_persistent_buffers_set",
    "_keys",  # nn.ParameterDict's own key table
)


def model_class(module: nn.Module) -> type:
    """``type(module)``, seen through the per-instance class ``torch.nn.utils.parametrize`` creates.

    >>> import torch
    >>> from torch.nn.utils import parametrize
    >>> layer = torch.nn.Linear(2, 2)
    >>> _ = parametrize.register_parametrization(layer, "weight", torch.nn.Identity())
    >>> type(layer).__name__, model_class(layer).__name__
    ('ParametrizedLinear', 'Linear')
    """
    cls = type(module)
    while cls.__module__ == "torch.nn.utils.parametrize" and cls.__bases__:
        cls = cls.__bases__[0]
    return cls


CONFIG_ATTR = "_nyto_param_configs"
_MISSING = object()


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
        tables: ``(prefix, config dict, module index)`` of every module holding ``ParamConfig``s.

    The structural lists (names, prefixes, slots) are shared between layouts of
    modules built from one another and must never be mutated.

    >>> import torch
    >>> layout = Layout(torch.nn.Sequential(torch.nn.Linear(1, 1)))
    >>> layout.names, layout.prefixes
    (['0.weight', '0.bias'], ['', '0.'])
    """

    __slots__ = ("modules", "prefixes", "names", "params", "buffer_names", "buffers",
                 "children", "param_slots", "buffer_slots", "tables", "_signature", "_pointers", "_expect",
                 "_family")

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
        self.tables: list[tuple[str, dict, int]] = []
        self._signature: Optional[tuple] = None
        self._pointers: Optional[tuple[int, ...]] = None
        self._expect: Optional[list] = None
        self._family: list = [None, 0]  # shared by sibling layouts: [compiled builder, rebuilds so far]
        self._visit(root, "", {}, {}, {})

    @property
    def signature(self) -> tuple:
        """``(shape, dtype, device)`` per parameter, computed once per family of layouts.

        Layouts of modules rebuilt from one another share it (their shapes match by
        construction), so comparing two of them is usually an identity check.
        """
        if self._signature is None:
            self._signature = tuple((p.shape, p.dtype, p.device) for p in self.params)
        return self._signature

    def _visit(self, module: nn.Module, prefix: str, module_index: dict[int, int],
               param_index: dict[int, int], buffer_index: dict[int, int]) -> int:
        # Recursive preorder, exactly nn.Module.named_modules(remove_duplicate=True).
        index = module_index[id(module)] = len(self.modules)
        self.modules.append(module)
        self.prefixes.append(prefix)
        table = module.__dict__.get(CONFIG_ATTR)
        if table is not None:
            self.tables.append((prefix, table, index))
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

    def _sibling(self, modules: list[nn.Module], params: list[Tensor], buffers: list[Tensor]) -> "Layout":
        """A layout of another tree with this one's structure (shares the structural lists)."""
        other = object.__new__(Layout)
        other.modules, other.params, other.buffers = modules, params, buffers
        other.prefixes, other.names, other.buffer_names = self.prefixes, self.names, self.buffer_names
        other.children, other.param_slots, other.buffer_slots = self.children, self.param_slots, self.buffer_slots
        other.tables = self.tables  # rebuilt modules share their config dicts with the source
        other._signature = self.signature
        other._pointers = None
        other._expect = None
        other._family = self._family
        return other

    def _matches(self, root: nn.Module) -> bool:
        """True while ``root``'s tree still holds exactly the modules, parameters and buffers listed.

        Object ids are compared: this layout holds every listed object, so none of those ids
        can have been reused by another object.  The whole tree is read into one flat list
        (``snapshot``) and compared with the one taken when the layout was made.
        """
        modules = self.modules
        if snapshot([root] + modules[1:]) != self._expect:
            return False
        for _, config_table, k in self.tables:
            owner = root if k == 0 else modules[k]
            if owner.__dict__.get(CONFIG_ATTR) is not config_table:
                return False
        # Same Parameter objects can hold new storage (``.data = ...``, ``.double()``, ``.to()``).
        return tuple(map(Tensor.data_ptr, self.params)) == self._pointers


def snapshot(modules: Sequence[nn.Module]) -> list:
    """Per module and per table (children, parameters, buffers): its length, names and object ids.

    Built with C-level list operations: it runs on every operation on a model.

    >>> import torch
    >>> snapshot([torch.nn.Linear(1, 1)])[:4]
    [0, 2, 'weight', 'bias']
    """
    seen: list = []
    append, extend = seen.append, seen.extend
    for module in modules:
        for table in (module._modules, module._parameters, module._buffers):
            append(len(table))
            extend(table)
            extend(map(id, table.values()))
    return seen


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


# Layouts of recently seen roots, without the root itself (a value must not keep its weak key alive).
_CACHE: "weakref.WeakKeyDictionary[nn.Module, Layout]" = weakref.WeakKeyDictionary()


def _remember(root: nn.Module, layout: Layout) -> None:
    stored = layout._sibling([None] + layout.modules[1:], layout.params, layout.buffers)  # type: ignore[list-item, arg-type]
    stored._pointers = tuple(map(Tensor.data_ptr, layout.params))
    stored._expect = snapshot(layout.modules)  # the tree was just walked or built: it is what the layout says
    try:
        _CACHE[root] = stored
    except TypeError:  # pragma: no cover - modules that cannot be weakly referenced
        pass


def layout_of(root: nn.Module) -> Layout:
    """``Layout(root)``, reusing the last one while the tree still holds the same objects.

    >>> import torch
    >>> net = torch.nn.Linear(1, 1)
    >>> layout_of(net).params[0] is net.weight
    True
    """
    stored = _CACHE.get(root)
    if stored is not None and stored._matches(root):
        return stored._sibling([root] + stored.modules[1:], stored.params, stored.buffers)
    layout = Layout(root)
    _remember(root, layout)
    return layout


_CONTAINER_SET = frozenset(_CONTAINERS)


def _as_parameter(value: Tensor, source: Tensor) -> nn.Parameter:
    if isinstance(value, nn.Parameter):
        return value
    return nn.Parameter(value, requires_grad=source.requires_grad)


def _build_generic(layout: Layout, wrapped: Sequence[Tensor], buffers: Sequence[Tensor]) -> list[nn.Module]:
    copies: list[nn.Module] = []
    make, set_state = object.__new__, object.__setattr__
    for module, param_slots, buffer_slots in zip(layout.modules, layout.param_slots, layout.buffer_slots):
        state = module.__dict__.copy()
        for key in _CONTAINER_SET.intersection(state):
            value = state[key]
            if value is not None:
                state[key] = value.copy()
        state["_parameters"] = {name: None if i is None else wrapped[i] for name, i in param_slots}
        state["_buffers"] = {name: None if i is None else buffers[i] for name, i in buffer_slots}
        new = make(type(module))
        set_state(new, "__dict__", state)
        copies.append(new)
    for new, children in zip(copies, layout.children):
        new.__dict__["_modules"] = {name: None if i is None else copies[i] for name, i in children}
    return copies


def _build(layout: Layout, wrapped: Sequence[Tensor], buffers: Sequence[Tensor]) -> list[nn.Module]:
    """New module objects for ``layout``: compiled straight-line code from a family's second rebuild on."""
    family = layout._family
    builder = family[0]
    if builder is None:
        family[1] += 1
        if family[1] < 2:  # a structure rebuilt once (e.g. merging N independent models) is not worth compiling
            return _build_generic(layout, wrapped, buffers)
        builder = family[0] = compile_builder(layout.modules, layout.children, layout.param_slots,
                                              layout.buffer_slots, _CONTAINER_SET)
    try:
        return builder(layout.modules, wrapped, buffers)
    except (Stale, KeyError, AttributeError):  # a module gained or lost attributes since: the generic loop
        return _build_generic(layout, wrapped, buffers)


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
    make_parameter, plain = Tensor._make_subclass, Tensor
    wrapped = [
        # nn.Parameter.__new__ does exactly this for plain tensors, minus a Python frame
        make_parameter(nn.Parameter, value, source.requires_grad) if type(value) is plain
        else _as_parameter(value, source)
        for value, source in zip(params, layout.params)
    ]
    copies = _build(layout, wrapped, buffers)
    result = copies[0]
    _remember(result, layout._sibling(copies, wrapped, buffers))  # type: ignore[arg-type]
    return result
