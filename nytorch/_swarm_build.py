"""Building a swarm's flat storage: from models or Particles, from stacked tensors, or by filling.

Each function returns ``(spec, flats, size)`` for the ``Swarm`` constructor; ``Swarm``'s
class methods are thin shells over them.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, Optional

import torch
from torch import nn

from . import _algebra as algebra
from . import _nocast as nocast
from . import _swarm_ops as ops
from ._errors import DeviceMismatchError, StructureError, class_names, describe
from ._flags import flag
from ._particle import Particle
from ._swarm_spec import Group, Spec, make_spec, pack_members, pack_stacked, rows_of, views_of
from ._walk import Layout, model_class

Tensor = torch.Tensor
Built = tuple[Spec, list[Tensor], int]

__all__ = ["spec_and_rows", "stacked", "from_stacked", "filled", "joined", "generator_for"]


def spec_and_rows(fn: str, like: object, buffers: Optional[bool]) -> tuple[Spec, list[Tensor]]:
    """The member structure of ``like`` and its values as flat rows (``[1, w]``, or ``[P, w]`` for a swarm)."""
    buffers = flag(fn, "buffers", buffers, none=True)
    if ops.is_swarm(like):
        swarm: Any = like
        if buffers is None or buffers == swarm._spec.with_buffers:
            return swarm._spec, list(swarm._flats)
        spec = make_spec(swarm._spec.layout, buffers)
        return spec, pack_stacked(spec, views_of(swarm._spec, swarm._flats), len(swarm))
    if isinstance(like, Particle):
        spec = make_spec(like._layout, like._with_buffers if buffers is None else buffers)
    elif isinstance(like, nn.Module):
        spec = make_spec(Layout(like), bool(buffers))
    else:
        raise TypeError(f"{fn}: expected an nn.Module, a Particle or a Swarm as like, got {type(like).__name__}")
    return spec, [row for row in rows_of(spec, ops.full_leaves(fn, spec, like)) if row is not None]


_SCALARS = frozenset({int, float, bool, str, type(None)})
_MISSING = object()
#: Not settings: set by hook registration, the train/eval mode (compared on its own, for modules only), or
#: the id of a ``torch.compile`` wrapper (one per ``OptimizedModule``).
_IGNORED = frozenset({"_is_full_backward_hook", "training", "_torchdynamo_wrapper_id"})


def _simple(value: object) -> bool:
    """A hyper-parameter-like value: a number, bool, string, ``None``, or a tuple of them."""
    return type(value) in _SCALARS or (type(value) is tuple and all(map(_simple, value)))  # type: ignore[arg-type]


def _settings(module: nn.Module) -> dict[str, object]:
    """The simple attributes of a module (``training``, ``p``, ``eps``, ``negative_slope``, ...)."""
    scalars = _SCALARS
    found = {key: value for key, value in module.__dict__.items()
             if type(value) in scalars or (type(value) is tuple and _simple(value))}
    for key in _IGNORED.intersection(found):
        del found[key]
    return found


class _Reference(NamedTuple):
    """Item 0's settings of one module, and a C-level way to read the same keys from another module.

    ``keys`` is ``None`` for a module of a class written outside torch: its attributes are the
    user's (names, histories, counters), not settings, and are not compared.
    """

    keys: Optional[frozenset]
    read: Callable[[dict], object]
    values: object
    settings: dict[str, object]


def _torch_layer(module: nn.Module) -> bool:
    """A layer that torch ships (``nn.Dropout``, ``nn.BatchNorm1d``...): its simple attributes are settings."""
    return type(module).__module__.startswith("torch.")


def _reference(module: nn.Module) -> _Reference:
    settings = _settings(module) if _torch_layer(module) else {}
    read = operator.itemgetter(*settings) if settings else (lambda state: ())
    keys = frozenset(module.__dict__) if _torch_layer(module) else None
    return _Reference(keys, read, read(module.__dict__), settings)


def _matches(state: dict, known: _Reference) -> bool:
    """Whether a module ``__dict__`` has item 0's attributes and settings (``False``: look closer)."""
    try:
        return (known.keys is None or state.keys() == known.keys) and bool(known.read(state) == known.values)
    except Exception:  # noqa: BLE001 - e.g. a tensor where item 0 has a number: the slow path names it
        return False


def _same(a: object, b: object) -> bool:
    """``a == b`` for settings, with NaN equal to NaN (element-wise for tuples)."""
    if type(a) is tuple and type(b) is tuple:
        return len(a) == len(b) and all(map(_same, a, b))  # type: ignore[arg-type]
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


def _where(prefix: str, module: nn.Module) -> str:
    path = prefix.rstrip(".")
    kind = model_class(module).__name__
    return f"submodule {path!r} ({kind})" if path else f"the root module ({kind})"


def _check_item(i: int, spec: Spec, layout: Layout, reference: list[_Reference], modes: bool,
                fn: Optional[str] = None) -> None:
    """Raise unless item ``i`` (its ``layout``) has the member structure of item 0 (``spec``, whose modules'
    settings are ``reference``): the same tensors, submodule classes, torch layers' settings and, when
    ``modes`` (the item is a module: a Particle has no mode of its own), the train/eval modes of item 0's
    modules, which the swarm runs with.

    A swarm runs every member with item 0's modules (one skeleton), so anything else a member's
    forward reads must agree; it is compared cheaply as a whole, and only walked to name a difference.
    """
    fn = fn or f"stack: item {i}"
    ours = spec.layout
    for kind, names, leaves, other_names, other_leaves in (
            ("parameter", ours.names, ours.params, layout.names, layout.params),
            ("buffer", ours.buffer_names, ours.buffers, layout.buffer_names, layout.buffers)):
        if names is not other_names and list(names) != list(other_names):
            algebra.check_names(fn, names, other_names, "this item", "item 0", kind=kind)
        for name, a, b in zip(names, leaves, other_leaves):
            if a.shape != b.shape or a.dtype != b.dtype:
                raise StructureError(f"{fn}: {kind} {name!r} differs: {describe(a)} vs {describe(b)} "
                                     "(item 0 vs this item)")
            if a.device != b.device:
                raise DeviceMismatchError(f"{fn}: {kind} {name!r} is on {a.device} in item 0 and on {b.device} "
                                          "in this item; move every item to one device first (e.g. model.to(device))")
    modules = layout.modules
    if len(modules) != len(ours.modules) or layout.prefixes != ours.prefixes:
        for prefix, other_prefix, module in zip(ours.prefixes, layout.prefixes, ours.modules):
            if prefix != other_prefix:
                raise StructureError(f"{fn}: expected {_where(prefix, module)} (as in item 0), got submodule "
                                     f"{other_prefix.rstrip('.')!r}; stack models built alike")
        longer = ours if len(ours.modules) > len(modules) else layout
        extra = len(min(ours.modules, modules, key=len))
        raise StructureError(f"{fn}: {_where(longer.prefixes[extra], longer.modules[extra])} is only in "
                             f"{'item 0' if longer is ours else 'this item'}; stack models built alike")
    for prefix, own, module, known in zip(ours.prefixes, ours.modules, modules, reference):
        same_type = type(module) is type(own)
        if same_type and (not modes or module.training == own.training) and _matches(module.__dict__, known):
            continue  # the common case: the same attributes, equal settings
        if not same_type and model_class(module) is not model_class(own):
            where = f"submodule {prefix.rstrip('.')!r}" if prefix else "the root module"
            expected, got = class_names(model_class(own), model_class(module))
            raise StructureError(f"{fn}: expected {where} to be a {expected} (as in item 0), got a "
                                 f"{got}; a swarm runs every member with item 0's "
                                 "modules, so stack models built alike")
        if modes and module.training != own.training:
            mode = ("train", "eval") if own.training else ("eval", "train")
            raise StructureError(f"{fn}: expected {_where(prefix, own)} in {mode[0]} mode (as in item 0), got "
                                 f"{mode[1]} mode; put every item in one mode first (a swarm has one: "
                                 "swarm.train() / swarm.eval() switch every member)")
        other, settings = (_settings(module) if known.keys is not None else {}), known.settings
        for key in list(settings) + [key for key in other if key not in settings]:
            mine, theirs = settings.get(key, _MISSING), other.get(key, _MISSING)
            if mine is _MISSING or theirs is _MISSING or not _same(mine, theirs):
                shown = ["not set" if value is _MISSING else repr(value) for value in (mine, theirs)]
                raise StructureError(f"{fn}: expected {_where(prefix, own)} attribute {key!r} = {shown[0]} "
                                     f"(as in item 0), got {shown[1]}; a swarm runs every member with item 0's "
                                     "settings, so build the items with the same settings")


def stacked(items: Iterable[Any], buffers: Optional[bool]) -> Built:
    """``Swarm.stack``: one copy of the values of modules/Particles of one structure.

    Items after the first must match it in everything their forward reads besides their own
    tensors: submodule classes, train/eval modes (of modules) and the simple settings of torch's
    own layers (numbers, strings, ``None`` and tuples of them in their ``__dict__``: Dropout's
    ``p``, BatchNorm's ``eps``); see ``_check_item``.  Attributes of classes written outside
    torch are item 0's, as the swarm runs item 0's modules.
    """
    if isinstance(items, (nn.Module, Particle)) or ops.is_swarm(items) or not isinstance(items, Iterable):
        raise TypeError(f"stack: expected a list of modules or Particles, got {type(items).__name__}")
    items = list(items)
    if not items:
        raise ValueError("stack: expected at least one module or Particle, got an empty sequence")
    members = []
    spec: Optional[Spec] = None
    for i, item in enumerate(items):
        if not isinstance(item, (nn.Module, Particle)):
            raise TypeError(f"stack: expected modules or Particles, but item {i} is a {type(item).__name__}"
                            + (" (use Swarm.cat to join swarms)" if ops.is_swarm(item) else ""))
        fn = f"stack: item {i}"
        if spec is None:
            spec = spec_and_rows("stack", item, buffers)[0]
            reference = [_reference(module) for module in spec.layout.modules]
            members.append(ops.full_leaves(fn, spec, item))
            continue
        ops.check_class(fn, spec, item.model_class if isinstance(item, Particle) else model_class(item))
        layout = item._layout if isinstance(item, Particle) else Layout(item)
        _check_item(i, spec, layout, reference, not isinstance(item, Particle))
        # a module's tensors are what ``_check_item`` just compared; a Particle's own may be others
        members.append(ops.full_leaves(fn, spec, item) if isinstance(item, Particle)
                       else layout.params + layout.buffers)
    if not (spec is not None):  # items is non-empty
        raise RuntimeError("nytorch internal error: expected spec is not None")
    return spec, pack_members(spec, members), len(members)


def _checked(fn: str, spec: Spec, params: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], int]:
    if not isinstance(params, Mapping):
        raise TypeError(f"{fn}: expected a mapping from names to stacked tensors, got {type(params).__name__}")
    size: Optional[int] = None
    first = ""
    given: dict[str, Tensor] = {}
    # in named_parameters() order, the first difference of any kind is the one named
    for index, (name, slot, stand_in) in enumerate(zip(spec.names, spec.slots, spec.layout.params + spec.layout.buffers)):
        if name not in params:
            if index < spec.n_state:
                raise StructureError(f"{fn}: parameter {name!r} is missing from params")
            continue
        value = params[name]
        if not isinstance(value, Tensor):
            raise TypeError(f"{fn}: expected a tensor for {name!r}, got {type(value).__name__}")
        if value.dim() == 0 or value.shape[1:] != slot.shape or value.dtype != stand_in.dtype:
            raise StructureError(
                f"{fn}: expected {name!r} of shape (P, {', '.join(map(str, slot.shape))}) "
                f"{str(stand_in.dtype).removeprefix('torch.')} (a leading member dimension), got {describe(value)}")
        if value.device != stand_in.device:
            raise DeviceMismatchError(f"{fn}: {name!r} is on {value.device} but the model is on {stand_in.device}; "
                                      "move it first")
        if size is None:
            size, first = int(value.shape[0]), name
        elif value.shape[0] != size:
            raise StructureError(f"{fn}: expected every tensor to have the same leading (member) size, "
                                 f"but {name!r} has {value.shape[0]} and {first!r} has {size}")
        given[name] = value
    for key in params:
        if key not in given:
            raise StructureError(f"{fn}: {spec.model_class.__name__} has no parameter or buffer named {key!r}")
    return given, size if size is not None else 0


def from_stacked(like: object, params: Mapping[str, Tensor]) -> Built:
    """``Swarm.from_params``: copy stacked ``[P, *shape]`` tensors; missing buffers come from ``like``."""
    fn = "from_params"
    spec, rows = spec_and_rows(fn, like, None)
    given, size = _checked(fn, spec, params)
    leaves = []
    for name, slot in zip(spec.names, spec.slots):
        if name in given:
            leaves.append(given[name])
            continue
        source = rows[slot.group][:, slot.start:slot.stop]
        source = source if source.shape[0] == size else source[:1].expand(size, -1)
        leaves.append(source.reshape(size, *slot.shape))
    return spec, pack_stacked(spec, leaves, size), size


def _size(fn: str, like: object, size: Optional[int]) -> int:
    if size is None:
        if ops.is_swarm(like):
            return len(like)  # type: ignore[arg-type]
        raise TypeError(f"{fn}: expected size (the number of members) unless like is a Swarm")
    if isinstance(size, bool) or not hasattr(size, "__index__"):  # NumPy and 0-dim integer tensors are ints
        raise TypeError(f"{fn}: expected a non-negative int as size, got {type(size).__name__}")
    number = operator.index(size)
    if number < 0:
        raise ValueError(f"{fn}: expected a non-negative int as size, got {number}")
    return number


def generator_for(fn: str, generator: object, spec: Optional[Spec] = None) -> Optional[torch.Generator]:
    """``generator`` (``None`` or a ``torch.Generator``); with ``spec``, one that can draw its members' values.

    The rule for every random draw on a swarm: values are drawn on each arithmetic group's device,
    so the generator must be on that device type (as ``torch.randn(device=..., generator=...)``
    requires; checked for every device, meta included, so a mismatch is one clear error).  Member
    indices are drawn on the generator's device and then moved (see ``algorithms``).

    >>> generator_for("randn", torch.Generator(), make_spec(Layout(nn.Linear(2, 1, device="meta")), False))
    Traceback (most recent call last):
        ...
    ValueError: randn: expected a generator on meta (where the swarm's 'weight' lives), got one on cpu; ...
    """
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: expected a torch.Generator or None as generator, got {type(generator).__name__}")
    if spec is None:
        return generator
    for index, group in enumerate(spec.groups):
        if group.active and group.device.type != generator.device.type:
            raise ValueError(f"{fn}: expected a generator on {group.device.type} (where the swarm's "
                             f"{spec.leaf_name(index)!r} lives), got one on {generator.device}; "
                             "create it there (torch.Generator(device=...)) or pass none")
    return generator


def filled(fn: str, like: object, size: Optional[int], buffers: Optional[bool],
           make: Callable[[int, Group, Tensor], Tensor], generator: Optional[torch.Generator] = None, *,
           per_member: bool = False) -> Built:
    """Arithmetic groups from ``make(size, group, like_rows)``; the other leaves copied from ``like``.

    ``generator`` (the one ``make`` draws with) is checked against the groups' devices first.
    A Swarm ``like`` of another size than ``size`` (and not of one member) gives its member 0's
    rows, or raises ``ValueError`` with ``per_member`` (``like`` is a centre, one row per member).
    """
    count = _size(fn, like, size)
    spec, rows = spec_and_rows(fn, like, buffers)
    generator_for(fn, generator, spec)
    centres = len(like) if ops.is_swarm(like) else 1  # type: ignore[arg-type]
    if centres not in (count, 1):
        if per_member:
            raise ValueError(f"{fn}: expected size {centres} (the centre swarm's size: each member is drawn "
                             f"around its own centre) or a centre of one member, got size {count}; pick the "
                             "centres first (e.g. center[indices]) or draw around center.mean()")
        rows = [row[:1] for row in rows]  # another size: carry member 0's values
    flats = [
        make(count, group, row) if group.active
        else (row.expand(count, -1).clone() if row.shape[0] != count else row.clone())
        for group, row in zip(spec.groups, rows)
    ]
    return spec, flats, count


def joined(swarms: Iterable[Any]) -> Built:
    """``Swarm.cat``: members of several swarms of one structure, in order."""
    items = list(swarms)
    if not items or not all(ops.is_swarm(item) for item in items):
        raise TypeError("cat: expected a non-empty list of Swarms")
    spec = items[0]._spec
    parts = [ops.aligned(f"cat: swarm {i}", spec, item) for i, item in enumerate(items)]
    # the result runs every member with swarm 0's modules: modes and layer settings must agree, as for stack
    others = [(i, item._spec) for i, item in enumerate(items) if item._spec is not spec]
    if others:
        reference = [_reference(module) for module in spec.layout.modules]
        for i, other in others:
            _check_item(i, spec, other.layout, reference, True, fn=f"cat: swarm {i}")
    flats = [nocast.cat([part[g] for part in parts]) for g in range(len(spec.groups))]
    return spec, flats, sum(len(item) for item in items)
