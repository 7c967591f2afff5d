"""Read a module tree once (``Layout``), and again only when it changed (``layout_of``).

``Layout`` lists the unique parameters in ``named_parameters()`` order, the
buffers in ``named_buffers()`` order, and every slot (module, attribute) that
holds them, so tied weights are rebuilt tied (``_rebuild``).  ``layout_of`` keeps the last
layout per root and reuses it while the tree holds the same objects in the same places.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn

from . import _leafwise as lw
from . import _builder
from ._builder import PENDING, Gather, compile_gather
from ._quantized import CLASSES as QUANTIZED_CLASSES
from ._quantized import quantized, refusal

Tensor = torch.Tensor

# Containers torch's modules mutate in place: copied per instance so hooks added to a result never reach its source.
CONTAINERS = (
    "_backward_pre_hooks", "_backward_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks", "_non_persistent_buffers_set",
    "_keys",  # nn.ParameterDict's own key table
    # RNN modules' lists of their weights, written in place by ``rnn.weight_ih_l0 = ...``: shared, an
    # assignment on a result would make its source run the result's weight
    "_flat_weights", "_flat_weight_refs",
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


class _Family:
    """What layouts of one structure share: its compiled code, and how often it was needed before."""

    __slots__ = ("build", "builds", "capture", "captures", "gather", "checks")

    def __init__(self) -> None:
        # each compiled once its use was counted ``_builder.COMPILE_AFTER`` times
        self.build: Optional[Callable[..., list]] = None  # ``_builder.compile_builder``
        self.builds = 0
        self.capture: Optional[Callable[..., list]] = None  # ``_builder.compile_capture``
        self.captures = 0
        self.gather: Optional[Gather] = None  # ``_builder.compile_gather``
        self.checks = 0

    def __reduce__(self) -> tuple[type, tuple[()]]:
        # compiled code is not picklable and is made again when needed: a copy starts afresh
        return (_Family, ())


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
                 "children", "param_slots", "buffer_slots", "tables", "_signature", "_placement", "_expect",
                 "_family", "packing")

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
        self._placement: Optional[Placement] = None
        self._expect: Optional[list] = None
        self._family = _Family()  # shared by sibling layouts
        # what ``_packed.packed`` found out about this tree (shared by ``layout_of``'s answers for one root)
        # [packing found, this layout without modules and tensors (``bare``)]
        self.packing: list = [None, None]
        self._visit(root, "", {}, {}, {})
        self.names = _interned(self.names)  # models of one structure share it: comparing them is ``is``

    @property
    def signature(self) -> tuple:
        """``(shape, dtype, device)`` per parameter, computed once per family of layouts.

        Layouts of modules rebuilt from one another share it (their shapes match by
        construction), so comparing two of them is usually an identity check.
        """
        if self._signature is None:
            try:
                self._signature = _interned(tuple((p.shape, p.dtype, p.device) for p in self.params))
            except RuntimeError:
                lazy = [name for name, p in zip(self.names, self.params) if nn.parameter.is_lazy(p)]
                if not lazy:
                    raise
                raise ValueError(f"{type(self.modules[0]).__name__}: parameter {lazy[0]!r} is not initialised yet "
                                 "(a lazy module); run one forward pass first") from None
        return self._signature

    def _visit(self, module: nn.Module, prefix: str, module_index: dict[int, int],
               param_index: dict[int, int], buffer_index: dict[int, int]) -> int:
        # Recursive preorder, exactly nn.Module.named_modules(remove_duplicate=True).
        if isinstance(module, torch.jit.ScriptModule):  # its tables are C++ wrappers: nothing to rebuild from
            root = type(self.modules[0] if self.modules else module).__name__
            where = f"submodule {prefix.rstrip('.')!r}" if prefix else "the module"
            raise TypeError(f"{root}: expected Python nn.Modules, but {where} is a TorchScript "
                            f"{type(module).__name__} (torch.jit.script / torch.jit.trace), which nytorch cannot "
                            "read or rebuild; use the module before scripting it (and script the result)")
        verdict = QUANTIZED_CLASSES.get(type(module))  # (inline: one lookup per module, see ``_quantized``)
        if verdict or (verdict is None and quantized(type(module))):
            raise TypeError(refusal(self.modules[0] if self.modules else module, prefix, module))
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
        other._placement = None
        other._expect = None
        other._family = self._family
        other.packing = [None, None]
        return other

    def bare(self) -> "Layout":
        """This layout without its modules, parameters and buffers (structure and config tables only).

        Pending results keep one (``_pending.Pending``): it must not keep its operands' tensors alive.
        """
        cell = self.packing
        found = cell[1]
        if found is None:
            found = cell[1] = self._sibling([], [], [])
        return found  # type: ignore[no-any-return]

    def _gather(self, root: nn.Module, modules: list) -> Optional[tuple[list[Tensor], list[Tensor]]]:
        """``root``'s parameters and buffers, while its tree holds exactly what this remembered layout lists.

        A remembered layout (``remember_layout``) holds the modules below the root by weak reference
        (``modules``: the root, then those read, ``None`` for one gone, which no tree holds) and its
        tensors by ``id`` only, in ``params`` and ``buffers``: the tensors are read from the tree, then
        compared with those ids, then their memory with the placement remembered (an id reused by a
        new tensor at the same address, shape and strides views the same memory, which is all the
        layout's packing depends on). The first check of a structure reads the whole tree into one
        flat list (``snapshot``) and compares it with the one taken when the layout was made; once
        checked often (``_builder.COMPILE_AFTER``), the structure has compiled code (``_builder.compile_gather``) that reads and
        compares each table entry directly.
        """
        gather = self._family.gather
        try:
            if gather is not None:
                found = gather(modules)
                if found is None:
                    return None
                params, buffers = found
                if list(map(id, params)) != self.params or list(map(id, buffers)) != self.buffers:
                    return None
            else:
                if self._expect is None or snapshot(modules) != self._expect:
                    return None
                params = _read(modules, self.param_slots, "_parameters")
                buffers = _read(modules, self.buffer_slots, "_buffers")
                family = self._family
                family.checks += 1
                if family.checks >= _builder.COMPILE_AFTER:  # checked often: worth writing the check out once
                    family.gather = compile_gather(self.children, self.param_slots, self.buffer_slots)
        except (KeyError, AttributeError):  # a module lost one of nn.Module's tables (or is gone)
            return None
        for _, config_table, k in self.tables:
            owner = root if k == 0 else modules[k]
            if owner.__dict__.get(CONFIG_ATTR) is not config_table:
                return None
        # Same Parameter objects can hold new storage (``.data = ...``, ``.double()``, ``.to()``).
        return (params, buffers) if placement(params) == self._placement else None


def _read(modules: Sequence[nn.Module], slots: list[list[tuple[str, Optional[int]]]], table: str) -> list[Tensor]:
    """The tensors a layout's ``param_slots`` (``table="_parameters"``) or ``buffer_slots`` point at, by index."""
    found: dict[int, Tensor] = {}
    for module, entries in zip(modules, slots):
        values = module.__dict__[table]
        for name, index in entries:
            if index is not None and index not in found:
                found[index] = values[name]
    return [found[index] for index in range(len(found))]


#: Addresses, shapes and strides of some tensors (``placement``).
Placement = tuple[tuple[Any, ...], tuple[torch.Size, ...], tuple[tuple[int, ...], ...]]


def _by_pointer(tensors: Sequence[Tensor]) -> tuple[int, ...]:
    return tuple(map(Tensor.const_data_ptr, tensors))  # type: ignore[attr-defined]


def _by_storage(tensors: Sequence[Tensor]) -> tuple[tuple[int, Any], ...]:
    # torch before Tensor.const_data_ptr (2.12): the storage's address and the offset, both read-only
    return tuple(zip(map(torch._C._data_address, tensors),  # type: ignore[attr-defined]
                     map(Tensor.storage_offset, tensors)))


#: Where each tensor's first element is, one C-level pass without ``data_ptr``'s mutable read, which
#: torch deprecates (and under ``torch.compile`` refuses) on a ``FakeTensor`` and which copies a
#: copy-on-write tensor.  Equal for tensors of one dtype over the same first element, else different;
#: a FakeTensor has no memory, so fake tensors are told by their offset alone (as meta ones).
addresses: Callable[[Sequence[Tensor]], tuple] = (
    _by_pointer if hasattr(Tensor, "const_data_ptr")
    else _by_storage if hasattr(torch._C, "_data_address")
    else lambda tensors: tuple(map(Tensor.data_ptr, tensors)))  # older still: as before, warns on fake tensors


def storage_key(tensor: Tensor) -> int:
    """Which storage ``tensor`` views: the storage object's identity, as ``torch.save`` tells storages apart.

    Not its data pointer: a FakeTensor's storage has no memory (every one sits at address 0) and
    torch deprecates reading its pointer.

    >>> w = torch.zeros(4)
    >>> storage_key(w[2:]) == storage_key(w) != storage_key(torch.zeros(4))
    True
    """
    return tensor.untyped_storage()._cdata  # type: ignore[no-any-return]


def placement(tensors: Sequence[Tensor]) -> Placement:
    """Where ``tensors`` sit in memory, to compare with a later reading: addresses, shapes and strides.

    The same Parameter objects can be given other memory (``param.data = ...``, ``.to()``,
    ``torch.utils.swap_tensors``) and so change address; a view of their own memory keeps the
    address (``w.data = w.data[:2]``, ``w.data = w.data.t()``), and only its shape or strides tell.

    A fake tensor moved to another fake tensor of the same shape, strides and offset goes unseen
    (``addresses``): nothing kept about a fake model depends on its storage, since ``find_flat``
    refuses fake leaves.  No check per tensor here: this runs on every operation on a model.

    >>> w = torch.zeros(4, 4)
    >>> before = placement([w])
    >>> w.data = w.data[:2]
    >>> placement([w]) == before
    False
    """
    return addresses(tensors), tuple(map(Tensor.size, tensors)), tuple(map(Tensor.stride, tensors))


_INTERNED: dict[tuple, object] = {}


def _interned(value: Any) -> Any:
    """One object per distinct name list or signature (bounded; equal values compare by identity)."""
    key = (type(value), tuple(value))
    found = _INTERNED.get(key)
    if found is None:
        if len(_INTERNED) >= 1024:
            _INTERNED.clear()
        found = _INTERNED[key] = value
    return found


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


# Layouts of recently seen roots. The roots are weak keys, and a value holds none of the tree's objects: its
# modules by weak reference and its tensors by id (``Layout._gather``). A value holding them would keep its
# key alive whenever the tree leads back to the root (a forward hook that is a bound method of the root, a
# child that stores it, a parameter hook closing over it), and a module-level table is never collected, so
# such a model would never be freed, even by ``gc.collect()``; and a replaced layer would live on until the
# model was read again. Tensors are not weakly referenced: ``torch.utils.swap_tensors`` refuses those.
_CACHE: "weakref.WeakKeyDictionary[nn.Module, Layout]" = weakref.WeakKeyDictionary()
#: Called on a ``weakref.ref``: its referent, ``None`` when gone (mapped over a list in C).
_CALL: Callable[[Any], Any] = weakref.ref.__call__


def remember_layout(root: nn.Module, layout: Layout) -> None:
    if lw.transforms_active():
        return  # tensors batched by vmap (or wrapped by grad) have no address: nothing to remember them by
    try:
        # the modules below the root by weak reference (a lookup has the root itself), the tensors by id
        remembered: Any = (list(map(weakref.ref, layout.modules[1:])), list(map(id, layout.params)),
                           list(map(id, layout.buffers)))
        stored = layout._sibling(*remembered)
    except TypeError:  # pragma: no cover - objects that cannot be weakly referenced: nothing is remembered
        return
    stored.packing = layout.packing
    try:
        stored._placement = placement(layout.params)
    except RuntimeError:  # a tensor without storage (sparse): named here rather than by torch's internals
        name, param = next(((name, param) for name, param in zip(layout.names, layout.params)
                            if param.layout is not torch.strided), (None, None))
        if param is None:
            raise
        raise TypeError(f"{type(root).__name__}: expected dense (strided) parameters, but parameter {name!r} has "
                        f"layout {param.layout}; nytorch's arithmetic is elementwise over dense tensors: convert it "
                        "with .to_dense()") from None
    if layout._family.gather is None:  # compiled code compares ids instead
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
    realized(root)  # a result still pending builds its tree first
    stored = _CACHE.get(root)
    if stored is not None:
        modules = [root, *map(_CALL, stored.modules)]  # a remembered layout's modules: its root's children
        tensors = stored._gather(root, modules)
        if tensors is not None:
            found = stored._sibling(modules, *tensors)
            found.packing = stored.packing
            return found
    layout = Layout(root)
    remember_layout(root, layout)
    return layout


def realized(root: nn.Module) -> nn.Module:
    """``root``, with its module tree built first if it is a result whose tree is still pending.

    Operator results on packed ``NytoModule``s hold their values and the state of their
    modules, and build the module tree on first touch (``NytoModule.__getattr__``); code that
    reads a module's ``__dict__`` directly calls this first.

    >>> import torch
    >>> net = torch.nn.Linear(1, 1)
    >>> realized(net) is net
    True
    """
    pending = root.__dict__.get(PENDING)
    if pending is not None:
        pending.realize(root)
    return root


