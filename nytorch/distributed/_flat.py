"""A Particle, a model or a Swarm seen as flat ``[P, width]`` buffers, one per (device, dtype, role).

Collectives move these buffers, never single tensors.  Leaves are grouped like
``Swarm`` storage: by device, dtype and role (*active*: floating/complex and
operational, so averaged; the rest are only moved).  A Particle or a model is a
value with ``P = 1``; a Swarm already stores its members this way, so packing it
costs nothing.

A model contributes its parameters and all its buffers; a Particle its own leaves
(parameters, plus buffers when made with ``buffers=True``); a Swarm every stored
leaf (parameters and buffers).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import nn

from .. import _algebra as algebra
from .._config import configs_for
from .._flat import written
from .._particle import Particle, layout_state
from .._swarm import Swarm
from .._rebuild import rebuild
from .._walk import Layout

Tensor = torch.Tensor
#: What the collectives accept.
Value = Union[nn.Module, Particle, Swarm]

__all__ = ["Group", "Slot", "Piece", "PIECE_BYTES", "MAX_PIECES", "Flat", "whole", "flat_of", "prescaled", "wire",
           "unwire", "restore_"]


#: One reusable scratch buffer per (device, dtype) for in-place collectives on models: allocating
#: (and page-faulting) a fresh model-sized buffer on every call costs more than the copy itself.
#: It keeps the size of the largest model averaged or broadcast in place.
_SCRATCH: dict[tuple[torch.device, torch.dtype], Tensor] = {}
#: Buffers larger than twice this travel in leaf-aligned pieces (at most ``MAX_PIECES``), so that
#: packing a piece overlaps the transfer of the previous one (measured: 1.4x -> 1.15x the floor).
PIECE_BYTES = 32 << 20
MAX_PIECES = 4


class Group(NamedTuple):
    """One flat buffer: where it lives, its dtype and whether it is averaged."""

    device: torch.device
    dtype: torch.dtype
    active: bool


class Piece(NamedTuple):
    """Columns ``[start, stop)`` of buffer ``group``, holding the leaves ``slots`` (indices) whole."""

    group: int
    start: int
    stop: int
    slots: tuple[int, ...]


class Slot(NamedTuple):
    """Where one leaf lives: ``flats[group][:, start:stop].view(P, *shape)``."""

    group: int
    start: int
    stop: int
    shape: tuple[int, ...]


def _plan(leaves: Sequence[Tensor], active: Sequence[bool]) -> tuple[list[Group], list[Slot]]:
    keys: dict[Group, int] = {}
    widths: list[int] = []
    slots: list[Slot] = []
    for leaf, on in zip(leaves, active):
        index = keys.setdefault(Group(leaf.device, leaf.dtype, bool(on)), len(keys))
        if index == len(widths):
            widths.append(0)
        start = widths[index]
        widths[index] += leaf.numel()
        slots.append(Slot(index, start, widths[index], tuple(leaf.shape)))
    return list(keys), slots


class Flat:
    """One collective argument as flat buffers.

    Attributes:
        source: the value given (a model, a Particle or a Swarm).
        kind: ``"swarm"`` or ``"single"`` (a model or a Particle).
        names / slots: every leaf's name and place.
        groups: the flat buffers' device, dtype and role.
        size: number of members (``1`` unless a Swarm).
    """

    __slots__ = ("source", "kind", "names", "slots", "groups", "size", "_leaves", "_borrowed")

    def __init__(self, source: Value, kind: str, names: Sequence[str], slots: Sequence[Slot],
                 groups: Sequence[Group], size: int, leaves: Optional[Sequence[Tensor]]) -> None:
        self.source = source
        self.kind = kind
        self.names = list(names)
        self.slots = list(slots)
        self.groups = list(groups)
        self.size = size
        self._leaves = None if leaves is None else list(leaves)
        self._borrowed: list[Tensor] = []

    def describe(self) -> list[list[Any]]:
        """``[name, shape, dtype, averaged, group, device type]`` per leaf (what the structure fingerprint
        hashes).  The device's type only (``cpu``, ``cuda``, ``meta``...): with NCCL every rank has its own GPU."""
        return [[name, list(slot.shape), str(self.groups[slot.group].dtype).removeprefix("torch."),
                 self.groups[slot.group].active, slot.group, self.groups[slot.group].device.type]
                for name, slot in zip(self.names, self.slots)]

    def meta(self) -> Optional[str]:
        """The first leaf on the ``meta`` device (it has no values to send), or ``None``."""
        return next((name for name, slot in zip(self.names, self.slots)
                     if self.groups[slot.group].device.type == "meta"), None)

    def inference(self) -> Optional[str]:
        """The first leaf of a model or Particle that is an inference tensor (made under
        ``torch.inference_mode()``: it cannot be written in place outside that mode), or ``None``."""
        leaves = self._leaves or []
        return next((name for name, leaf in zip(self.names, leaves) if leaf.is_inference()), None)

    def pointers(self) -> list[int]:
        """Where a model's or Particle's leaves are now (to notice that packing moved them)."""
        return [] if self._leaves is None else [leaf.data_ptr() for leaf in self._leaves]

    def widths(self) -> list[int]:
        """Each buffer's width (values per member)."""
        widths = [0] * len(self.groups)
        for slot in self.slots:
            widths[slot.group] = max(widths[slot.group], slot.stop)
        return widths

    # -- to buffers --------------------------------------------------------------------------
    def empty(self, size: int, groups: Optional[Sequence[int]] = None, *,
              scratch: bool = False) -> list[Optional[Tensor]]:
        """Uninitialised ``[size, width]`` buffers for ``groups`` (default all; ``None`` for the others).

        ``scratch``: reused buffers, for temporaries only (give them back with ``release``).
        """
        wanted = range(len(self.groups)) if groups is None else groups
        widths = self.widths()
        return [None if g not in wanted else self._borrow(g, widths[g], size) if scratch else
                torch.empty(size, widths[g], dtype=group.dtype, device=group.device)
                for g, group in enumerate(self.groups)]

    def own(self, group: int) -> Optional[Tensor]:
        """A model's buffer ``group`` as a ``[1, width]`` view of the model's own memory, when its leaves
        already lie there back to back in slot order (a packed model, see ``_flat.pack_``); else ``None``."""
        if self.kind != "single" or not isinstance(self.source, nn.Module) or self._leaves is None:
            return None
        base: Optional[tuple[int, int]] = None  # (storage pointer, storage offset of column 0)
        anchor: Optional[Tensor] = None
        for slot, leaf in zip(self.slots, self._leaves):
            if slot.group != group or slot.stop == slot.start:
                continue
            here = (leaf.untyped_storage().data_ptr(), int(leaf.storage_offset()) - slot.start)
            if not leaf.is_contiguous() or (base is not None and here != base):
                return None
            base, anchor = here, anchor if anchor is not None else leaf
        if base is None or anchor is None:
            return None
        width = self.widths()[group]
        return anchor.detach().as_strided((1, width), (width, 1), base[1])

    def pieces(self, groups: Optional[Sequence[int]] = None) -> list[Piece]:
        """Leaf-aligned column ranges of the buffers of ``groups``, in packing order.

        One piece per buffer, except that a model's or Particle's buffer of more than
        ``2 * PIECE_BYTES`` is cut into up to ``MAX_PIECES`` pieces at leaf boundaries, so that
        packing one piece overlaps the transfer of the previous ones.
        """
        wanted = range(len(self.groups)) if groups is None else groups
        widths = self.widths()
        out: list[Piece] = []
        for g in wanted:
            members = tuple(i for i, slot in enumerate(self.slots) if slot.group == g)
            total = widths[g] * self.groups[g].dtype.itemsize
            count = 1 if self.kind == "swarm" else max(1, min(MAX_PIECES, total // PIECE_BYTES))
            target, start, chosen, made = widths[g] / count, 0, [], 1
            for i in members:
                chosen.append(i)
                stop = self.slots[i].stop
                if stop - start >= target and made < count:
                    out.append(Piece(g, start, stop, tuple(chosen)))
                    start, chosen, made = stop, [], made + 1
            if chosen or start == 0:
                out.append(Piece(g, start, widths[g], tuple(chosen)))
        return out

    @torch.no_grad()
    def pack(self, flats: Sequence[Optional[Tensor]], pieces: Sequence[Piece], *, divide: int = 1) -> None:
        """Copy the source's values of ``pieces`` into ``flats``; averaged buffers that travel as they
        are (``prescaled``) are divided by ``divide`` on the way (the mean's division costs no pass)."""
        sources: list[Tensor] = []
        targets: list[Tensor] = []
        for piece in pieces:
            flat = flats[piece.group]
            if not (flat is not None):  # an internal invariant
                raise RuntimeError("nytorch internal error: expected flat is not None")
            divides = divide != 1 and self.groups[piece.group].active and prescaled(flat.dtype)
            if isinstance(self.source, Swarm):
                own = self.source._flats[piece.group]
                torch.div(own, divide, out=flat) if divides else flat.copy_(own)
                continue
            if not (self._leaves is not None):  # an internal invariant
                raise RuntimeError("nytorch internal error: expected self._leaves is not None")
            for i in piece.slots:
                slot, leaf = self.slots[i], self._leaves[i]
                if slot.stop == slot.start:
                    continue
                target = flat[0, slot.start:slot.stop].view(slot.shape)
                if divides:
                    torch.div(leaf.detach(), divide, out=target)
                else:
                    sources.append(leaf.detach())
                    targets.append(target)
        if targets:
            torch._foreach_copy_(targets, sources)

    def flats(self, groups: Optional[Sequence[int]] = None, *, fresh: bool = False) -> list[Optional[Tensor]]:
        """The ``[P, width]`` buffers of ``groups``: a Swarm's own storage (read only!) unless ``fresh``,
        else a packed copy."""
        if isinstance(self.source, Swarm) and not fresh:
            wanted = range(len(self.groups)) if groups is None else groups
            return [flat.contiguous() if g in wanted else None for g, flat in enumerate(self.source._flats)]
        out = self.empty(self.size, groups)
        self.pack(out, self.pieces(groups))
        return out

    @torch.no_grad()
    def member_rows(self, index: int) -> list[Tensor]:
        """Member ``index`` as ``[1, width]`` buffers (a copy)."""
        return [flat[index:index + 1].clone() for flat in self.flats() if flat is not None]

    def _borrow(self, group: int, width: int, size: int) -> Tensor:
        device, dtype = self.groups[group].device, self.groups[group].dtype
        buffer = _SCRATCH.pop((device, dtype), None)
        if buffer is None or buffer.numel() < width * size:
            buffer = torch.empty(width * size, dtype=dtype, device=device)
        self._borrowed.append(buffer)
        return buffer[:width * size].view(size, width)

    def release(self) -> None:
        """Give the scratch buffers back for the next call (after the last use of their views)."""
        for buffer in self._borrowed:
            if not buffer.is_inference():  # one made under inference mode could not be written outside it
                _SCRATCH[(buffer.device, buffer.dtype)] = buffer
        self._borrowed.clear()

    def views(self, flats: Sequence[Tensor]) -> list[Tensor]:
        """Every leaf as a ``[P, *shape]`` view into ``flats``."""
        return [flats[s.group][:, s.start:s.stop].view(flats[s.group].shape[0], *s.shape) for s in self.slots]

    # -- from buffers ------------------------------------------------------------------------
    def like(self, flats: list[Tensor], size: int, *, carry: bool = False) -> Value:
        """A new value of the source's kind holding ``flats`` (no copy; a model gets fresh Parameters).

        ``carry``: a Particle result keeps the source's own non-operational ``clone=False``
        parameters (as Particle arithmetic does).
        """
        source = self.source
        if isinstance(source, Swarm):
            return type(source)(source._spec, flats, size)
        leaves = [view[0] for view in self.views(flats)]
        if isinstance(source, Particle):
            if carry and source._configs is not None:
                leaves = [own if not config.operational and not config.clone else leaf
                          for leaf, own, config in zip(leaves, source._leaves, source._configs)]
            return type(source)(source._layout, source._names, leaves, source._configs, source._with_buffers)
        layout = Layout(source)
        count = len(layout.params)
        return rebuild(layout, leaves[:count], leaves[count:])

    def member(self, rows: list[Tensor]) -> Union[Particle, nn.Module]:
        """One member from ``[1, width]`` buffers: a Particle for a Swarm or a Particle, a model for a model."""
        value = self.like(rows, 1)
        return value[0] if isinstance(value, Swarm) else value

    def gathered(self, flats: list[Tensor], size: int) -> Swarm:
        """A Swarm of ``size`` members from stacked buffers (members shaped like the source)."""
        if isinstance(self.source, Swarm):
            return type(self.source)(self.source._spec, flats, size)
        if not self.names:  # nothing travelled (e.g. nn.ReLU()): one member per rank all the same
            return Swarm.zeros(self.source, size)
        params = dict(zip(self.names, self.views(flats)))
        return Swarm.from_params(self.source, params)

    @torch.no_grad()
    def write_(self, flats: Sequence[Optional[Tensor]], owned: Iterable[int] = ()) -> None:
        """Copy ``flats`` (``[1, width]``; ``None`` skips a group) into the source model's tensors in place.

        ``owned``: groups whose buffer was the model's own memory, written by the collective itself;
        their tensors are only told they changed (``_flat.written``), as a copy into them would.
        """
        if not (self._leaves is not None):  # an internal invariant
            raise RuntimeError("nytorch internal error: expected self._leaves is not None")
        owned = set(owned)
        if owned:
            written([leaf for slot, leaf in zip(self.slots, self._leaves) if slot.group in owned])
        targets, values = [], []
        for slot, leaf in zip(self.slots, self._leaves):
            flat = flats[slot.group]
            if flat is not None:
                targets.append(leaf)
                values.append(flat[0, slot.start:slot.stop].view(slot.shape))
        if targets:
            torch._foreach_copy_(targets, values)


def whole(flats: Sequence[Optional[Tensor]]) -> list[Tensor]:
    """``flats`` when every group has a buffer (what ``empty``/``flats`` give without ``groups``)."""
    out = [flat for flat in flats if flat is not None]
    if not (len(out) == len(flats)):  # an internal invariant
        raise RuntimeError("nytorch internal error: expected len(out) == len(flats)")
    return out


def flat_of(fn: str, x: object) -> Flat:
    """``x`` (a model, a Particle or a Swarm) as a ``Flat``.

    Raises:
        TypeError: ``x`` is none of those, or one of its tensors is not dense (a sparse or other
            non-strided layout: only dense tensors pack into flat buffers).

    >>> flat = flat_of("demo", torch.nn.Linear(2, 1))
    >>> flat.kind, flat.names, [tuple(f.shape) for f in flat.flats()]
    ('single', ['weight', 'bias'], [(1, 3)])
    >>> net = torch.nn.Linear(2, 1)
    >>> net.weight = torch.nn.Parameter(net.weight.detach().to_sparse())
    >>> flat_of("demo", net)
    Traceback (most recent call last):
    TypeError: demo: expected dense (strided) tensors, got parameter 'weight' with layout torch.sparse_coo; ...
    """
    if isinstance(x, Swarm):
        spec = x._spec
        groups = [Group(g.device, g.dtype, g.active) for g in spec.groups]
        slots = [Slot(s.group, s.start, s.stop, tuple(s.shape)) for s in spec.slots]
        return Flat(x, "swarm", spec.names, slots, groups, len(x), None)
    if isinstance(x, Particle):
        names, leaves = list(x._names), list(x._leaves)
        active = algebra.active_mask(leaves, x._configs)
    elif isinstance(x, nn.Module):
        layout = Layout(x)
        names, leaves = layout_state(layout, buffers=True)
        active = algebra.active_mask(leaves, configs_for(layout, names))
    else:
        raise TypeError(f"{fn}: expected an nn.Module, a Particle or a Swarm, got {type(x).__name__}")
    for name, leaf in zip(names, leaves):
        if leaf.layout != torch.strided:
            raise TypeError(f"{fn}: expected dense (strided) tensors, got parameter {name!r} with layout "
                            f"{leaf.layout}; make it dense first (e.g. tensor.to_dense())")
    groups, slots = _plan(leaves, active)
    return Flat(x, "single", names, slots, groups, 1, leaves)


# -- what travels on the wire ------------------------------------------------------------------
_MOVES = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8,
          torch.int32, torch.int64}
_SUMS = {torch.float16, torch.bfloat16, torch.float32, torch.float64}


def prescaled(dtype: torch.dtype) -> bool:
    """Whether a sum's buffer of this dtype travels as is (so a mean may divide while packing).

    >>> prescaled(torch.float32), prescaled(torch.float8_e4m3fn), prescaled(torch.complex32)
    (True, False, False)
    """
    # complex32 has no division on the CPU: it is divided after the sum, as its float16 real view
    return dtype in _SUMS or (dtype.is_complex and dtype != torch.complex32)


def wire(flat: Tensor, device: torch.device, *, reduce: bool) -> Tensor:
    """``flat`` as a tensor every backend moves (``reduce``: and sums) on ``device``.

    Complex buffers travel as their real view, other dtypes the backends lack as raw
    bytes (moves) or in float32 (sums of e.g. float8).  The result may be ``flat``
    itself or a view of it: read results back with ``unwire`` / ``restore_``.
    """
    if flat.dtype.is_complex:
        out = torch.view_as_real(flat)
    elif (reduce and flat.dtype not in _SUMS) and flat.is_floating_point():
        out = flat.to(torch.float32)
    elif not reduce and flat.dtype not in _MOVES:
        out = flat.view(torch.uint8)
    else:
        out = flat
    return out.to(device).contiguous()


def unwire(sent: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The ``dtype`` tensor a wire tensor ``sent`` stands for, on ``device`` (a view when it can be)."""
    if dtype.is_complex:
        sent = torch.view_as_complex(sent)
    elif sent.dtype == torch.uint8 and dtype != torch.uint8:
        sent = sent.view(dtype)
    return sent.to(device=device, dtype=dtype)


@torch.no_grad()
def restore_(flat: Tensor, sent: Tensor) -> Tensor:
    """Write the wire tensor ``sent`` back into ``flat`` unless it already is a view of it; returns ``flat``."""
    if sent.device == flat.device and sent.data_ptr() == flat.data_ptr() and sent.numel() > 0:
        return flat
    flat.copy_(unwire(sent, flat.dtype, flat.device))
    return flat
