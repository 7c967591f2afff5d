"""The member structure of a ``Swarm`` and its flat storage.

A swarm of ``P`` models keeps every member's tensors in one contiguous ``[P, n]``
buffer per group of leaves sharing a device, a dtype and a role (taking part in
arithmetic or carried unchanged).  ``Swarm.params`` are views into those buffers,
so arithmetic on the whole swarm is one kernel per group.

``Spec`` describes one member: a private *skeleton* copy of the model whose
parameters are zero-memory placeholders (expanded 0-dim zeros) and whose buffers
are clones of the source's, the leaf names, and where each leaf lives in the
flat buffers.  Swarms derived from one another share their ``Spec``.
"""
from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import _leafwise as lw
from . import _nocast as nocast
from ._config import ParamConfig, configs_for
from ._particle import Particle
from ._rebuild import rebuild
from ._walk import Layout, model_class

Tensor = torch.Tensor

__all__ = ["bound", "Group", "Slot", "Spec", "make_spec", "pack_members", "pack_stacked", "views_of", "rows_of",
           "stand_in"]


class Group(NamedTuple):
    """One flat ``[P, width]`` buffer: its device, dtype, role and width."""

    device: torch.device
    dtype: torch.dtype
    active: bool
    width: int


class Slot(NamedTuple):
    """Where one leaf lives: ``flats[group][:, start:stop].view(P, *shape)``."""

    group: int
    start: int
    stop: int
    shape: torch.Size


def stand_in(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A zero-memory placeholder of the given shape (a 0-dim zero, expanded).

    >>> t = stand_in((1000, 1000), torch.float32, torch.device("cpu"))
    >>> tuple(t.shape), t.stride()
    ((1000, 1000), (0, 0))
    """
    return torch.zeros((), dtype=dtype, device=device).expand(tuple(shape))  # a tuple: () for 0-dim leaves


class Spec:
    """The structure of one member, shared by every swarm derived from one another.

    Attributes:
        layout: layout of the private skeleton module (placeholder parameters).
        names: every stored leaf: parameter names then buffer names.
        n_params: how many of ``names`` are parameters.
        n_state: how many leaves a member ``Particle`` holds (parameters, plus buffers
            when the swarm carries buffers in arithmetic).
        with_buffers: floating buffers take part in arithmetic.
        configs: ``ParamConfig`` per Particle leaf (``None``: all default).
        slots / groups: where each leaf lives in the flat buffers.
        template: a ``Particle`` of the skeleton (structure only).
    """

    __slots__ = ("layout", "names", "n_params", "n_state", "with_buffers", "configs", "slots", "groups",
                 "template", "signature", "entries", "lock", "plan", "planned_for", "encoders", "inside", "__weakref__")

    def __init__(self, layout: Layout, with_buffers: bool) -> None:
        self.layout = layout
        self.names: list[str] = layout.names + layout.buffer_names
        self.n_params = len(layout.names)
        self.with_buffers = with_buffers
        self.n_state = len(self.names) if with_buffers else self.n_params
        state_names = self.names[:self.n_state]
        self.configs: Optional[list[ParamConfig]] = configs_for(layout, state_names)
        leaves = layout.params + layout.buffers
        active = [
            i < self.n_state and lw.is_arithmetic(leaf)
            and (self.configs is None or self.configs[i].operational)
            for i, leaf in enumerate(leaves)
        ]
        keys: dict[tuple[torch.device, torch.dtype, bool], int] = {}
        widths: list[int] = []
        slots: list[Slot] = []
        for leaf, on in zip(leaves, active):
            key = (leaf.device, leaf.dtype, on)
            index = keys.setdefault(key, len(keys))
            if index == len(widths):
                widths.append(0)
            start = widths[index]
            widths[index] += leaf.numel()
            slots.append(Slot(index, start, widths[index], leaf.shape))
        self.slots = slots
        self.groups = [Group(device, dtype, on, width) for (device, dtype, on), width in zip(keys, widths)]
        self.template: Particle[Any] = Particle(layout, state_names, leaves[:self.n_state], self.configs, with_buffers)
        self.signature = (type(layout.modules[0]), tuple(self.names), tuple(self.slots), tuple(self.groups))
        # (table, key, leaf index) for every slot holding a parameter or buffer: the forward swaps these.
        self.entries: list[tuple[dict[str, Any], str, int]] = []
        for module, param_slots, buffer_slots in zip(layout.modules, layout.param_slots, layout.buffer_slots):
            self.entries += [(module._parameters, key, i) for key, i in param_slots if i is not None]
            self.entries += [(module._buffers, key, self.n_params + i) for key, i in buffer_slots if i is not None]
        self.lock = threading.RLock()
        self.plan: object = None  # the fused forward plan, built on first use (see _swarm_fused)
        self.planned_for: object = None  # the root class's ``forward`` the plan was built from
        self.encoders = _encoders(layout)
        self.inside: Optional[tuple[list[Any], list[dict[str, Any]]]] = None  # ``bound``'s saved state, in a call
        _SPECS.add(self)

    def __getstate__(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__
                if name not in ("lock", "plan", "planned_for", "encoders", "inside", "__weakref__")}

    def __setstate__(self, state: dict[str, object]) -> None:
        for name, value in state.items():
            setattr(self, name, value)
        self.lock = threading.RLock()
        self.plan = self.planned_for = None
        self.encoders = _encoders(self.layout)
        self.inside = None
        _SPECS.add(self)

    @property
    def model_class(self) -> type:
        """The class of the member model (seen through ``parametrize``'s per-instance class, as a Particle's)."""
        return model_class(self.layout.modules[0])

    def leaf_name(self, group: int) -> str:
        """The first leaf stored in ``group`` (for error messages)."""
        return next(name for name, slot in zip(self.names, self.slots) if slot.group == group)

    def with_mode(self, training: bool) -> "Spec":
        """The same structure with every skeleton module in train (``True``) or eval mode."""
        root = rebuild(self.layout, self.layout.params, self.layout.buffers)
        root.train(training)
        return Spec(Layout(root), self.with_buffers)

    def converted(self, device: Optional[torch.device], dtype: Optional[torch.dtype]) -> "Spec":
        """The same structure on ``device`` and/or with floating and complex leaves cast to ``dtype``
        (a floating or complex dtype, as ``Module.to`` casts them)."""
        def target(leaf: Tensor) -> tuple[torch.dtype, torch.device]:
            cast = dtype is not None and (leaf.is_floating_point() or leaf.is_complex())
            new_dtype = dtype if cast and dtype is not None else leaf.dtype
            return new_dtype, (leaf.device if device is None else device)
        params = [stand_in(leaf.shape, *target(leaf)) for leaf in self.layout.params]
        buffers = [leaf.to(device=target(leaf)[1], dtype=target(leaf)[0]) for leaf in self.layout.buffers]
        root = rebuild(self.layout, params, buffers)
        return Spec(Layout(root), self.with_buffers)


def make_spec(source: Layout, with_buffers: bool) -> Spec:
    """A ``Spec`` for members shaped like ``source`` (a layout of any module), sharing none of its tensors.

    >>> import torch
    >>> spec = make_spec(Layout(torch.nn.Linear(3, 2)), False)
    >>> spec.names, [tuple(g)[1:] for g in spec.groups]
    (['weight', 'bias'], [(torch.float32, True, 8)])
    """
    params = [stand_in(shape, dtype, device) for shape, dtype, device in source.signature]  # names a lazy one
    buffers = [leaf.detach().clone() for leaf in source.buffers]
    root = rebuild(source, params, buffers)
    return Spec(Layout(root), with_buffers)


@torch.no_grad()
def pack_members(spec: Spec, members: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """Copy per-member leaf lists (aligned with ``spec.names``) into fresh flat buffers."""
    size = len(members)
    flats = [torch.empty(size, g.width, dtype=g.dtype, device=g.device) for g in spec.groups]
    destinations: list[Tensor] = []
    sources: list[Tensor] = []
    for row, leaves in enumerate(members):
        for slot, leaf in zip(spec.slots, leaves):
            if slot.stop > slot.start:
                destinations.append(flats[slot.group][row, slot.start:slot.stop].view(slot.shape))
                sources.append(leaf.detach())
    if destinations:
        torch._foreach_copy_(destinations, sources)
    return flats


@torch.no_grad()
def pack_stacked(spec: Spec, leaves: Sequence[Tensor], size: int) -> list[Tensor]:
    """Flat buffers from stacked leaves ``[size, *shape]`` aligned with ``spec.names`` (one ``cat`` per group)."""
    parts: list[list[Tensor]] = [[] for _ in spec.groups]
    for slot, leaf in zip(spec.slots, leaves):
        parts[slot.group].append(leaf.detach().reshape(size, slot.stop - slot.start))  # size may be 0
    return [nocast.cat(part, dim=1) for part in parts]


def views_of(spec: Spec, flats: Sequence[Tensor]) -> list[Tensor]:
    """Every leaf as a ``[P, *shape]`` view into the flat buffers (aligned with ``spec.names``)."""
    return [flats[s.group][:, s.start:s.stop].view(flats[s.group].shape[0], *s.shape) for s in spec.slots]


def rows_of(spec: Spec, leaves: Sequence[Tensor], groups: Optional[Sequence[int]] = None) -> list[Optional[Tensor]]:
    """One member's leaves (aligned with ``spec.names``) as ``[1, width]`` rows per group (``None``: skipped)."""
    wanted = range(len(spec.groups)) if groups is None else groups
    parts: list[list[Tensor]] = [[] for _ in spec.groups]
    for slot, leaf in zip(spec.slots, leaves):
        parts[slot.group].append(leaf.detach().reshape(1, -1))
    rows: list[Optional[Tensor]] = [None] * len(spec.groups)
    for g in wanted:
        part = parts[g]
        rows[g] = nocast.cat(part, dim=1) if len(part) > 1 else part[0]
    return rows


def module_leaves(module: nn.Module) -> tuple[Layout, list[Tensor]]:
    """A module's layout and its parameters followed by its buffers."""
    layout = Layout(module)
    return layout, layout.params + layout.buffers


def _encoders(layout: Layout) -> tuple[nn.TransformerEncoder, ...]:
    """The skeleton's ``nn.TransformerEncoder``s: their nested-tensor fast path cannot run under vmap."""
    return tuple(module for module in layout.modules if isinstance(module, nn.TransformerEncoder))


#: The process-wide switches swarm calls have set aside: how many calls hold each, what to put back.
_SWITCHES_LOCK = threading.Lock()
_HELD = {"fast path": 0, "cache": 0}
_SAVED: dict[str, Any] = {}


@contextmanager
def _torch_switches(spec: Spec) -> Iterator[None]:
    """torch's process-wide switches set aside while the skeleton runs, as members one by one would not see them.

    ``parametrize.cached()``: torch keys its cache by the *source* module (a closure), which the
    skeleton's copy shares; a skeleton call would read the source's cached weight and leave its own
    batched one (or an fx Proxy) for the source.  Swarm calls get a cache of their own meanwhile.
    A ``TransformerEncoder`` in eval mode with a padding mask converts its input to a nested tensor,
    which vmap cannot batch: its fast path is off for the call (the slow path computes the same).

    Both are process-wide, so they are counted: the first swarm call (of any thread) sets a switch
    aside, the last one puts back what was there, unless the user changed it meanwhile.  Other
    threads see them set aside while a swarm call runs: they lose a cache or a fast path, not values.
    """
    cache = bool(parametrize._cache_enabled)
    fast_path = bool(spec.encoders) and any(encoder.use_nested_tensor for encoder in spec.encoders)
    with _SWITCHES_LOCK:
        if fast_path:
            if not _HELD["fast path"]:
                _SAVED["fast path"] = torch.backends.mha.get_fastpath_enabled()
                torch.backends.mha.set_fastpath_enabled(False)
            _HELD["fast path"] += 1
        if cache:
            if not _HELD["cache"]:
                _SAVED["cache"] = parametrize._cache
                parametrize._cache = _SAVED["own cache"] = {}
            _HELD["cache"] += 1
    try:
        yield
    finally:
        with _SWITCHES_LOCK:
            if fast_path:
                _HELD["fast path"] -= 1
                if not _HELD["fast path"]:
                    saved = _SAVED.pop("fast path")
                    if not torch.backends.mha.get_fastpath_enabled():  # (unless the user set it meanwhile)
                        torch.backends.mha.set_fastpath_enabled(saved)
            if cache:
                _HELD["cache"] -= 1
                if not _HELD["cache"]:
                    saved, own = _SAVED.pop("cache"), _SAVED.pop("own cache")
                    # a cached() block that ended meanwhile left a fresh dict: keep it, never the old entries
                    if parametrize._cache is own:
                        parametrize._cache = saved


def _switched(spec: Spec) -> Any:
    """``_torch_switches(spec)``, or a no-op where no switch applies (the common case, without a generator)."""
    if parametrize._cache_enabled or spec.encoders:
        return _torch_switches(spec)
    return _NO_SWITCH


_NO_SWITCH = nullcontext()


@contextmanager
def bound(spec: Spec, leaves: Sequence[Tensor], replaced: Optional[dict[int, Any]] = None) -> Iterator[nn.Module]:
    """The skeleton module holding ``leaves`` (aligned with ``spec.names``) for the duration of the block.

    With ``replaced``, the buffers that the block assigned anew (``self.stat = 0.9 * self.stat + ...``
    in a forward) are recorded there by index, before the skeleton gets its own back.  Every
    module's other attributes are put back as they were too (a forward's ``self.last = out``
    would leave a batched tensor or an fx Proxy in the skeleton every derived swarm shares).
    """
    entries = spec.entries
    modules = spec.layout.modules
    with spec.lock, _switched(spec):
        saved = [table[key] for table, key, _ in entries]
        states = [module.__dict__.copy() for module in modules]  # shallow: the tables stay the same objects
        outer = spec.inside is None  # (a forward calling its own swarm enters again, in this thread)
        if outer:
            spec.inside = (saved, states)  # what a process forked meanwhile puts back (``_after_fork``)
        try:
            for table, key, index in entries:
                table[key] = leaves[index]
            yield spec.layout.modules[0]
            if replaced is not None:
                for table, key, index in entries:
                    if index >= spec.n_params and table[key] is not leaves[index]:
                        replaced[index] = table[key]
        finally:
            _put_back(spec, saved, states)
            if outer:
                spec.inside = None


def _put_back(spec: Spec, saved: Sequence[Any], states: Sequence[dict[str, Any]]) -> None:
    """Give the skeleton its own tensors and attributes back, as ``bound`` found them."""
    for module, state in zip(spec.layout.modules, states):
        now = module.__dict__  # put back in place (C-level; cheaper than finding what changed)
        now.clear()
        now.update(state)
    for (table, key, _), old in zip(spec.entries, saved):
        table[key] = old


#: Every Spec alive, for ``_after_fork``.
_SPECS: "weakref.WeakSet[Spec]" = weakref.WeakSet()


def _after_fork() -> None:
    """In a forked child: new locks, and skeletons and switches as no call holds them.

    ``fork`` copies only the thread that called it: a lock another thread held (a swarm call under
    way, a switch set aside) would stay held forever in the child, and its skeleton would keep that
    call's tensors.  A DataLoader's worker forked while a thread evaluates a swarm would hang.
    """
    global _SWITCHES_LOCK
    _SWITCHES_LOCK = threading.Lock()
    for spec in list(_SPECS):
        spec.lock = threading.RLock()
        if spec.inside is not None:
            _put_back(spec, *spec.inside)
            spec.inside = None
    if _HELD["fast path"]:
        torch.backends.mha.set_fastpath_enabled(_SAVED.pop("fast path"))
    if _HELD["cache"]:
        parametrize._cache = _SAVED.pop("cache")
        _SAVED.pop("own cache", None)
    _HELD["fast path"] = _HELD["cache"] = 0


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork)
