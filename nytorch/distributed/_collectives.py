"""Collectives on whole models, Particles and Swarms: one flat buffer per (dtype, role) on the wire.

Every function takes the value positionally and ``group`` (default: the world) and
``timeout`` (seconds or a ``timedelta`` for the whole call; ``None``: the group's own) as
keywords, starts with the structure handshake (``_fingerprint``), and raises ``PeerError``
when a peer dies or hangs.  Ranks given to or returned by these functions are global
ranks, as in ``torch.distributed``.

What raises where: an invalid argument on any rank (a timeout, ``src``, ``shift``, a loss,
a value that is no model, Particle or Swarm, a sparse or other non-dense tensor, or, for the
in-place ``broadcast`` and ``all_reduce_mean``, a model holding inference tensors outside
``torch.inference_mode()``) is sent in the handshake and raised on *every* rank, of the same
class and with the same message (naming the global rank given it), in that same call: no
rank's next call can pair with another rank's current one.  A rank with an invalid timeout
runs the handshake under the group's own; a finite timeout longer than ``_comm.MAX_SECONDS``
(about 31.7 years; ``1e15``, ``timedelta.max``) is capped to it.  Only a ``group`` that is no
process group raises on its own rank alone: without a group there is no one to tell.  Values
whose device types differ across ranks (``cpu`` and ``meta``) raise ``DeviceMismatchError``
on every rank; values on the ``meta`` device everywhere raise ``ValueError`` (they hold
nothing to send).  All of these
are raised before any data moves and before a model is packed: when a call raises, no
operand has changed, storage included.

A model's or Particle's buffer of more than 64 MiB travels in up to four leaf-aligned
pieces of that one buffer, so that packing a piece overlaps the transfer of the previous
one (``_flat.PIECE_BYTES``); everything else is one collective per buffer.

What each kind of value does:

* a model (any ``nn.Module``, ``NytoModule`` included) travels with its parameters and
  all its buffers.  ``broadcast`` and ``all_reduce_mean`` update it **in place** (the same
  Parameter objects, so optimizers keep working) and return it; the others return new
  values (a fresh model of the same class for ``exchange`` and ``best``).
* a ``Particle`` or a ``Swarm`` is a value: every function returns a new one and leaves
  its argument untouched.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any, Optional, TypeVar, Union

import torch
from torch import nn

from .. import _nocast as nocast
from .._errors import StructureError
from .._flags import flag
from .._packing import pack_
from .._particle import Particle
from .._swarm import Swarm
from ._comm import Comm, Timeout
from ._fingerprint import SIZE
from ._flat import Flat, Piece, prescaled, restore_, unwire, whole
from ._transfer import begin, int_arg, moved, pipeline, send_buffers

Tensor = torch.Tensor
V = TypeVar("V", bound=Union[nn.Module, Particle, Swarm])
T = TypeVar("T")

__all__ = ["broadcast", "all_reduce_mean", "all_gather"]


def _packed_(comm: Comm, flat: Flat, x: object, pack: bool,
             prepare: Callable[[Comm, Flat], Optional[T]], prepared: Optional[T]) -> Optional[T]:
    """After the handshake: pack a model (``pack_``) when asked; when that moved its storage, prepare again
    (the scratch buffers prepared while the headers travelled were planned for the old storage)."""
    if not pack or not isinstance(x, nn.Module):
        return prepared
    before = flat.pointers()
    pack_(x, whole=True)
    if flat.pointers() == before:
        return prepared
    flat.release()
    return prepare(comm, flat)


def _model_buffers(flat: Flat, size: int, groups: Sequence[int], *,
                   in_place: bool, own: bool) -> tuple[list[Optional[Tensor]], set[int]]:
    """Buffers for ``groups`` and which of them are a model's own memory.

    For an in-place call with ``own`` (``pack=True``) on a model whose leaves already lie back to
    back (packed: ``_packing.pack_``), a buffer is the model's memory itself: nothing is copied, and
    the collective writes the model directly.  The others are new (reused scratch for in-place
    calls), and with ``pack=False`` every one is: the model is written only once all went well.
    """
    owned: dict[int, Tensor] = {}
    if in_place and own:
        for g in groups:
            view = flat.own(g)
            if view is not None:
                owned[g] = view
    flats = flat.empty(size, [g for g in groups if g not in owned], scratch=in_place)
    for g, view in owned.items():
        flats[g] = view
    return flats, set(owned)


@torch.no_grad()
def broadcast(x: V, src: int = 0, *, group: Any = None, timeout: Timeout = None, pack: bool = True) -> V:
    """Every rank gets rank ``src``'s value: ``torch.distributed.broadcast`` for a whole model, Particle or Swarm.

    Args:
        x: a model, a ``Particle`` or a ``Swarm``, of the same structure on every rank (a Swarm
            may have another number of members: the result has ``src``'s).
        src: the global rank whose value is sent.
        group: the process group (default: the world).
        timeout: seconds (or a ``timedelta``) before a dead or hung peer raises ``PeerError``.
        pack: first pack a model's floating parameters and buffers into one buffer per dtype
            (as ``nytorch.particle`` does; the Parameter objects are kept), so that they receive
            directly, with no copy.  ``False``: leave the model's storage as it is.

    Returns:
        A model: ``x`` itself, updated in place (parameters and buffers, the same Parameter
        objects).  Leaves lying back to back in memory (packed) receive directly, and after a
        ``PeerError`` their values are undefined, as with ``torch.distributed.broadcast``; the
        others (``pack=False``, or a model packing would change) are written only once the
        transfer has succeeded.  A Particle or Swarm: a new
        one holding ``src``'s values (on ``src`` too: a copy).

    Raises:
        StructureError: the structures differ across ranks (raised on every rank before any data moves);
            ``DeviceMismatchError`` when their device types differ.
        ValueError: ``src`` is not a rank of the group, or the ranks disagree on ``src``.
        TypeError / ValueError: an argument is invalid on some rank (every rank raises that rank's error),
            or the value is on the meta device.
        RuntimeError: a model holds inference tensors (made under ``torch.inference_mode()``) on some rank
            and this call is outside inference mode (every rank raises it; the model is not packed).
        PeerError: a peer died or hung.

    >>> import torch, torch.distributed as dist
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> net = torch.nn.Linear(2, 1)
    >>> broadcast(net, src=0, timeout=30) is net
    True
    >>> dist.destroy_process_group()
    """
    fn = "broadcast"
    pack = bool(flag(fn, "pack", pack))
    in_place = isinstance(x, nn.Module)

    def prepare(comm: Comm, flat: Flat) -> Optional[tuple[list[Optional[Tensor]], set[int]]]:
        """The sender packs its first piece while the headers travel (a bad ``src`` raises later)."""
        try:
            if comm.rank != comm.group_rank(operator.index(src)):  # type: ignore[arg-type]
                return None
        except (TypeError, ValueError):
            return None
        flats, owned = _model_buffers(flat, flat.size, range(len(flat.groups)), in_place=in_place, own=pack)
        flat.pack(flats, [piece for piece in flat.pieces()[:1] if piece.group not in owned])
        return flats, owned
    comm, flat, headers, packed = begin(fn, x, group, timeout, overlap=prepare, in_place=in_place,
                                         arg=lambda: int_arg(fn, src, "src", "an int global rank"))
    try:
        # every rank agrees on src by now (an int: checked in the handshake), so every rank raises alike
        root = comm.group_rank(operator.index(src))  # type: ignore[arg-type]
        packed = _packed_(comm, flat, x, pack, prepare, packed)
        size = int(headers[root, SIZE])
        if packed is not None:
            flats, owned = packed
            moved(comm, flat, flats, root, "broadcasting the parameters",
                   pack=lambda i, piece: flat.pack(flats, [piece]) if i and piece.group not in owned else None)
        else:
            flats, owned = _model_buffers(flat, size, range(len(flat.groups)), in_place=in_place, own=pack)
            moved(comm, flat, flats, root, "broadcasting the parameters")
        if in_place:
            if comm.rank != root:
                flat.write_([None if g in owned else f for g, f in enumerate(flats)], owned)
            return x
        return flat.like(whole(flats), size)  # type: ignore[return-value]
    finally:
        flat.release()


@torch.no_grad()
def all_reduce_mean(x: V, *, group: Any = None, timeout: Timeout = None, pack: bool = True) -> V:
    """The element-wise mean of ``x`` over the ranks, on every rank (model averaging, FedAvg).

    What is averaged: floating and complex leaves, i.e. a model's parameters and floating
    buffers (BatchNorm statistics too), a Particle's or Swarm's arithmetic leaves (buffers
    only when made with ``buffers=True``, as for their arithmetic).  Integer and bool leaves
    and non-operational parameters (``ParamConfig``) stay as each rank has them.  Values are
    divided by the group size while being packed, then summed on the wire in their own
    dtype (one buffer per dtype; float8 in float32; complex32, which has no CPU division, divided
    after the sum).  A model is packed first (``pack``) and
    averaged right there in its buffers, with no copy at all; a ``PeerError`` then leaves its
    values undefined, as it does for ``torch.distributed.all_reduce``.  A model that is not
    packed (``pack=False``, or one that packing would change, see ``nytorch.particle``) is
    written only once every transfer has succeeded: after a ``PeerError`` it still holds
    its own values.

    Args:
        x: a model, a ``Particle`` or a ``Swarm`` (same number of members on every rank:
            member ``i`` is averaged with member ``i`` of the other ranks).
        group: the process group (default: the world).
        timeout: seconds (or a ``timedelta``) before a dead or hung peer raises ``PeerError``.
        pack: first pack a model's floating parameters and buffers into one buffer per dtype
            (once; the Parameter objects are kept, so optimizers keep working).  ``False``:
            leave the model's storage as it is (one extra copy each way per call).

    Returns:
        A model: ``x`` itself, averaged in place.  A Particle or Swarm: a new one.

    Raises:
        StructureError: the structures (or swarm sizes) differ across ranks; raised on every rank
            before any data moves (``DeviceMismatchError`` when their device types differ).
        TypeError / ValueError: an argument is invalid on some rank (every rank raises that rank's error),
            or the value is on the meta device.
        RuntimeError: a model holds inference tensors (made under ``torch.inference_mode()``) on some rank
            and this call is outside inference mode (every rank raises it; the model is not packed).
        PeerError: a peer died or hung.

    >>> import torch, torch.distributed as dist
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> p = Particle.from_params(torch.nn.Linear(2, 1), {"weight": torch.ones(1, 2), "bias": torch.ones(1)})
    >>> torch.equal(all_reduce_mean(p).params["bias"], p.params["bias"])
    True
    >>> dist.destroy_process_group()
    """
    fn = "all_reduce_mean"
    pack = bool(flag(fn, "pack", pack))
    in_place = isinstance(x, nn.Module)

    def prepare(comm: Comm, flat: Flat) -> tuple[list[Optional[Tensor]], set[int], list[Piece]]:
        """Allocate and pack the first piece while the headers travel."""
        active = [g for g, kind in enumerate(flat.groups) if kind.active]
        flats, owned = _model_buffers(flat, flat.size, active if in_place else range(len(flat.groups)),
                                      in_place=in_place, own=pack)
        # Pieces go in group order, which every rank shares (which groups a rank owns may differ: one
        # rank's model may be packed and another's not).  The model's own buffers are divided by the
        # group size just before they are sent (never here: the handshake may still fail).
        pieces = flat.pieces(active)
        flat.pack(flats, pieces[:1] if pieces and pieces[0].group not in owned else [], divide=comm.size)
        return flats, owned, pieces
    comm, flat, headers, prepared = begin(fn, x, group, timeout, overlap=prepare, in_place=in_place)
    try:
        sizes = headers[:, SIZE].tolist()
        if len(set(sizes)) > 1:
            other = next(r for r, size in enumerate(sizes) if size != sizes[0])
            raise StructureError(f"{fn}: the swarms differ in size across ranks: {sizes[0]} members on rank "
                                 f"{comm.global_rank(0)}, {sizes[other]} on rank {comm.global_rank(other)}; "
                                 "averaging pairs member i with member i")
        prepared = _packed_(comm, flat, x, pack, prepare, prepared)
        if not (prepared is not None):  # an internal invariant
            raise RuntimeError("nytorch internal error: expected prepared is not None")
        flats, owned, pieces = prepared
        carried = [g for g, kind in enumerate(flat.groups) if not kind.active]
        def prepare_piece(i: int, piece: Piece) -> None:
            if piece.group in owned:
                own = flats[piece.group]
                if own is not None and prescaled(own.dtype):
                    own[:, piece.start:piece.stop].div_(comm.size)  # sums of x / n travel as they are
            elif i:
                flat.pack(flats, [piece], divide=comm.size)
        sent = pipeline(comm, flats, pieces, comm.all_reduce_sum_, "summing the parameters", reduce=True,
                         pack=prepare_piece, meanwhile=None if in_place else lambda: flat.pack(flats, flat.pieces(carried)))
        for piece, view, tensor in sent:
            if not prescaled(view.dtype):
                tensor.div_(comm.size)
            restore_(view, tensor)
        if in_place:
            flat.write_([None if g in owned else f for g, f in enumerate(flats)], owned)
            return x
        return flat.like(whole(flats), flat.size, carry=True)  # type: ignore[return-value]
    finally:
        flat.release()


@torch.no_grad()
def all_gather(x: Union[nn.Module, Particle, Swarm], *, group: Any = None, timeout: Timeout = None) -> Swarm:
    """The whole swarm on every rank: each rank's shard (or model/Particle), concatenated in rank order.

    Args:
        x: this rank's shard: a ``Swarm`` (shards may differ in size) or one model or ``Particle``
            (one member per rank).
        group: the process group (default: the world).
        timeout: seconds (or a ``timedelta``) before a dead or hung peer raises ``PeerError``.

    Returns:
        A new ``Swarm`` whose members are rank 0's, then rank 1's, and so on.

    Raises:
        StructureError: the structures differ across ranks (raised on every rank before any data moves).
        TypeError / ValueError: an argument is invalid on some rank (every rank raises that rank's error),
            or the value is on the meta device.
        PeerError: a peer died or hung.

    >>> import torch, torch.distributed as dist
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> whole = all_gather(Swarm.zeros(torch.nn.Linear(2, 1), 3))
    >>> len(whole)
    3
    >>> dist.destroy_process_group()
    """
    fn = "all_gather"
    comm, flat, headers, _ = begin(fn, x, group, timeout)
    sizes = headers[:, SIZE].tolist()
    top, total = max(sizes), sum(sizes)
    padded: list[Tensor] = []
    for own in flat.flats():
        if not (own is not None):  # an internal invariant
            raise RuntimeError("nytorch internal error: expected own is not None")
        if own.shape[0] == top:
            padded.append(own)
        else:
            pad = torch.zeros(top, own.shape[1], dtype=own.dtype, device=own.device)
            pad[:own.shape[0]] = own
            padded.append(pad)
    moving = [p for p in padded if p.numel()]
    gathered = iter(comm.all_gather(send_buffers(comm, moving), "gathering the members"))
    flats = []
    for pad, group_ in zip(padded, flat.groups):
        if not pad.numel():
            flats.append(torch.empty(total, pad.shape[1], dtype=pad.dtype, device=pad.device))
            continue
        every = unwire(next(gathered), group_.dtype, group_.device)  # [ranks, top, width]
        if all(size == top for size in sizes):
            flats.append(every.reshape(total, -1))
        else:
            flats.append(nocast.cat([every[r, :size] for r, size in enumerate(sizes)]))
    return flat.gathered(flats, total)


