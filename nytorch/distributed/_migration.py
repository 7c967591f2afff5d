"""Choosing and migrating members across ranks: ``best`` (the global winner) and ``exchange`` (a ring shift).

Both follow the rules of every collective here (see ``_collectives``): the value positionally,
``group`` and ``timeout`` as keywords, the structure handshake first, argument errors raised on
every rank in the same call.
"""
from __future__ import annotations

import numbers
import operator
from collections.abc import Callable
from typing import Any, Optional, TypeVar, Union, overload

import torch
from torch import nn

from .._particle import Particle
from .._swarm import Swarm
from ._comm import Comm, Timeout
from ._fingerprint import INDEX, SIZE, header_value
from ._flat import Flat, restore_, whole
from ._transfer import begin, int_arg, moved, send_buffers

Tensor = torch.Tensor
V = TypeVar("V", bound=Union[nn.Module, Particle, Swarm])
M = TypeVar("M", bound=nn.Module)

__all__ = ["best", "best_of", "exchange"]


def _loss_check(loss: object) -> Callable[[Comm, Flat], tuple[float, int]]:
    def check(comm: Comm, flat: Flat) -> tuple[float, int]:
        fn = "best"
        if flat.kind == "swarm":
            want = f"a 1-D tensor of shape ({flat.size},), one per member of the swarm"
            if not isinstance(loss, Tensor):
                raise TypeError(f"{fn}: expected loss as {want}, got {type(loss).__name__}")
            if loss.dim() != 1 or loss.shape[0] != flat.size:
                raise ValueError(f"{fn}: expected loss as {want}, got shape {tuple(loss.shape)}")
            values = loss.detach()
        elif isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(f"{fn}: expected loss as a number or a one-element tensor, got a tensor of shape "
                                 f"{tuple(loss.shape)}")
            values = loss.detach().reshape(1)
        elif isinstance(loss, numbers.Real) and not isinstance(loss, bool):  # NumPy scalars too
            values = torch.tensor([float(loss)], dtype=torch.float64, device="cpu")
        else:
            raise TypeError(f"{fn}: expected loss as a number or a one-element tensor, got {type(loss).__name__}")
        if values.is_complex() or values.dtype == torch.bool:
            raise TypeError(f"{fn}: expected a real loss, got dtype {str(values.dtype).removeprefix('torch.')}")
        if values.numel() == 0:
            return float("inf"), -1
        values = values.to(device="cpu", dtype=torch.float64)
        keys = torch.where(values.isnan(), torch.full_like(values, float("inf")), values)
        index = int(keys.argmin())
        return float(values[index]), index
    return check


def _rank_key(value: float) -> float:
    return float("inf") if value != value else value


@overload
def best(x: Union[Particle, Swarm], loss: Any, *, group: Any = None, timeout: Timeout = None,
         ) -> tuple[Particle, Tensor, int]: ...


@overload
def best(x: M, loss: Any, *, group: Any = None, timeout: Timeout = None) -> tuple[M, Tensor, int]: ...


@torch.no_grad()
def best(x: Union[nn.Module, Particle, Swarm], loss: Any, *, group: Any = None, timeout: Timeout = None,
         ) -> tuple[Union[nn.Module, Particle], Tensor, int]:
    """The globally best member (lowest loss) with its loss and rank, on every rank.

    One small ``all_gather`` of each rank's best loss (the handshake), then one broadcast of
    the winner's values only.  NaN losses count as ``+inf``; ties go to the lowest rank,
    then the lowest member index.

    Args:
        x: this rank's ``Swarm`` shard (may be empty), or one model or ``Particle``.
        loss: a 1-D tensor with one loss per member for a Swarm; a number or a one-element tensor
            for a model or Particle.
        group: the process group (default: the world).
        timeout: seconds (or a ``timedelta``) before a dead or hung peer raises ``PeerError``.

    Returns:
        ``(member, loss, rank)``: the winner as a new ``Particle`` (a new model of the same class
        when ``x`` is a model), its loss as a 0-dim tensor (float64 for a Python number, else the
        local loss's dtype and device) and the global rank that held it.

    Raises:
        TypeError: a loss is not a number (Python or NumPy) or a tensor, or another argument is
            invalid (on any rank: every rank raises that rank's error).
        ValueError: a loss has the wrong shape (on any rank: every rank raises it), every shard is empty,
            or the value is on the meta device.
        StructureError: the structures differ across ranks.
        PeerError: a peer died or hung.

    >>> import torch, torch.distributed as dist
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> swarm = Swarm.zeros(torch.nn.Linear(2, 1), 3) + torch.tensor([0., 1., 2.])
    >>> member, loss, rank = best(swarm, torch.tensor([0.5, 0.2, 0.9]))
    >>> member.params["bias"], loss, rank
    (tensor([1.]), tensor(0.2000), 0)
    >>> dist.destroy_process_group()
    """
    return best_of(x, loss, group=group, timeout=timeout)


def best_of(x: Union[nn.Module, Particle, Swarm], loss: Any, *, group: Any, timeout: Timeout,
          error: Optional[Exception] = None) -> tuple[Union[nn.Module, Particle], Tensor, int]:
    """``best``; ``error``: the caller's own argument error, raised on every rank by the handshake."""
    fn = "best"
    comm, flat, headers, _ = begin(fn, x, group, timeout, check=_loss_check(loss), error=error)
    candidates = [(_rank_key(header_value(headers, r)), r) for r in range(comm.size) if int(headers[r, INDEX]) >= 0]
    if not candidates:
        raise ValueError(f"{fn}: every rank's swarm is empty; there is no member to choose")
    _, winner = min(candidates)
    index = int(headers[winner, INDEX])
    rows = flat.member_rows(index) if comm.rank == winner else whole(flat.empty(1))
    moved(comm, flat, list(rows), winner, "broadcasting the best member")
    like = loss if isinstance(loss, Tensor) else torch.zeros((), dtype=torch.float64, device="cpu")
    value = torch.tensor(header_value(headers, winner), dtype=torch.float64, device="cpu")  # not the default device
    value = value.to(like.dtype).to(like.device)
    return flat.member(rows), value, comm.global_rank(winner)


@torch.no_grad()
def exchange(x: V, shift: int = 1, *, group: Any = None, timeout: Timeout = None) -> V:
    """Ring migration: send ``x`` to rank ``rank + shift`` and return what rank ``rank - shift`` sent.

    Ranks count within the group, modulo its size; ``shift`` may be negative.  For island-model
    algorithms: pick the migrants (``swarm[indices]``), exchange them, put them in place of the
    worst members (``swarm[worst] = received``).

    Args:
        x: a model, a ``Particle`` or a ``Swarm`` (swarms may differ in size across ranks).
        shift: how many ranks along the ring to send (the same on every rank).
        group: the process group (default: the world).
        timeout: seconds (or a ``timedelta``) before a dead or hung peer raises ``PeerError``.

    Returns:
        A new value of ``x``'s kind (a new model for a model) holding the values received.

    Raises:
        StructureError: the structures differ across ranks (raised on every rank before any data moves).
        ValueError: the ranks disagree on ``shift``.
        TypeError / ValueError: an argument is invalid on some rank (every rank raises that rank's error),
            or the value is on the meta device.
        PeerError: a peer died or hung.

    >>> import torch, torch.distributed as dist
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> p = Particle.from_params(torch.nn.Linear(2, 1), {"weight": torch.ones(1, 2), "bias": torch.ones(1)})
    >>> torch.equal(exchange(p).params["weight"], p.params["weight"])
    True
    >>> dist.destroy_process_group()
    """
    fn = "exchange"
    comm, flat, headers, _ = begin(fn, x, group, timeout, arg=lambda: int_arg(fn, shift, "shift", "an int"))
    step = operator.index(shift) % comm.size  # type: ignore[arg-type]
    if step == 0:
        return flat.like(whole(flat.flats(fresh=True)), flat.size)  # type: ignore[return-value]
    dst, src = (comm.rank + step) % comm.size, (comm.rank - step) % comm.size
    size = int(headers[src, SIZE])
    sends = whole(flat.flats())
    received = whole(flat.empty(size))
    send_wires = send_buffers(comm, [f for f in sends if f.numel()])
    recv_wires = send_buffers(comm, [f for f in received if f.numel()])
    comm.send_recv(send_wires, dst, recv_wires, src, f"sending to rank {comm.global_rank(dst)} and "
                   f"receiving from rank {comm.global_rank(src)}")
    for target, sent in zip([f for f in received if f.numel()], recv_wires):
        restore_(target, sent)
    return flat.like(received, size)  # type: ignore[return-value]
