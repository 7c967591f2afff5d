"""The hybrid swarm loop across processes: each rank trains its own shard, and every ``every``
steps the global best member is found and a random subset of every shard is pulled toward it.

Built from ``nytorch.algorithms`` (``sgd_step`` for the vectorised gradient step, ``apso``
without noise for the pull) and ``best`` (one small all_gather plus one broadcast of the winner).
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import nn

from .. import algorithms as alg
from .._particle import Particle
from .._swarm import Swarm
from ..algorithms._checks import callable_arg, generator_arg, number_arg, swarm_arg
from ..algorithms._hybrid import no_history
from ..algorithms._indices import randperm
from ..algorithms._progress import progress_flag
from ._migration import best_of
from ._transfer import begin, int_arg
from ._comm import Timeout, resolve

Tensor = torch.Tensor

__all__ = ["shard", "hybrid_step", "hybrid"]


def shard(swarm: Swarm, *, group: Any = None) -> Swarm:
    """This rank's contiguous block of ``swarm`` (``torch.tensor_split`` over the group's ranks; a view).

    ``all_gather(shard(swarm))`` gives ``swarm`` back on every rank.  Nothing is communicated.

    Args:
        swarm: the whole swarm (the same on every rank, e.g. built from one seed).
        group: the process group (default: the world).

    Returns:
        ``swarm[start:stop]`` for this rank (a Swarm of views, possibly empty): the first
        ``len(swarm) % world_size`` ranks get one member more.

    Raises:
        TypeError: ``swarm`` is not a Swarm.

    >>> import torch, torch.distributed as dist
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> len(shard(Swarm.zeros(torch.nn.Linear(2, 1), 5)))
    5
    >>> dist.destroy_process_group()
    """
    if not isinstance(swarm, Swarm):
        raise TypeError(f"shard: expected a Swarm, got {type(swarm).__name__}")
    comm = resolve("shard", group, None)
    base, extra = divmod(len(swarm), comm.size)
    start = comm.rank * base + min(comm.rank, extra)
    return swarm[start:start + base + (comm.rank < extra)]  # type: ignore[no-any-return]


class _Args(NamedTuple):
    every: int
    subset: Optional[int]
    lr: float
    alpha: float


def _int(fn: str, value: object, name: str, minimum: Optional[int] = None) -> int:
    """An int (Python, NumPy or 0-dim integer tensor; not bool), at least ``minimum``."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{fn}: expected an int as {name}, got {type(value).__name__}")
    number = operator.index(value)  # type: ignore[arg-type]
    if minimum is not None and number < minimum:
        raise ValueError(f"{fn}: expected {name} >= {minimum}, got {number}")
    return number


def _args(fn: str, swarm: object, loss_fn: object, every: object, subset: object, lr: object, alpha: object,
          generator: object) -> _Args:
    """The loop's arguments, checked alike on every rank (nothing here depends on the shard's size)."""
    swarm_arg(fn, swarm)
    callable_arg(fn, loss_fn)
    generator_arg(fn, generator)  # indices only: a generator on any device
    every = _int(fn, every, "every", 1)
    subset = None if subset is None else _int(fn, subset, "subset (members pulled per shard)", 0)
    return _Args(every, subset, number_arg(fn, lr, "lr"), number_arg(fn, alpha, "alpha"))


def hybrid_step(swarm: Swarm, loss_fn: Callable[..., Tensor], /, *args: Any, step: int, lr: float,
                every: int = 5, subset: Optional[int] = None, alpha: float = 0.5,
                generator: Optional[torch.Generator] = None, group: Any = None, timeout: Timeout = None,
                ) -> tuple[Swarm, Tensor, Optional[tuple[Union[nn.Module, Particle], Tensor, int]]]:
    """One distributed hybrid step on this rank's shard: ``algorithms.sgd_step``, then, when
    ``(step + 1) % every == 0``, the global ``best`` and ``W ← (1 − α)·W + α·W_best`` on ``subset``
    random members of the shard (``algorithms.apso`` without noise).

    Shards may differ in size and may be empty (``shard`` of 2 members over 3 ranks): an empty
    shard takes no local step (its losses have shape ``(0,)``) but still takes part in ``best``
    (which raises ``ValueError`` on every rank when every shard is empty).
    Every rank must call it with the same ``step`` and ``every`` (the pull is a collective).

    Args:
        swarm: this rank's shard.
        loss_fn: ``loss_fn(member, *args)`` returns a 0-dim loss (as for ``algorithms.sgd_step``).
        *args: this step's batch, passed to ``loss_fn`` after the member.
        step / lr / every / alpha / generator: as ``algorithms.hybrid_step``.
        subset: members pulled per shard, at most the shard's size (a smaller shard pulls all of
            its members); default all of them.
        group / timeout: as for the collectives.

    Returns:
        ``(new_shard, losses, found)``: the local losses before the step, and ``found``, the
        ``(member, loss, rank)`` from ``best`` on pulling steps (``None`` otherwise).

    Raises:
        TypeError / ValueError: an invalid argument.  On a pulling step an invalid ``swarm``, ``loss_fn``,
            ``subset``, ``lr``, ``alpha`` or ``generator`` on one rank, or a failing local step, is raised on
            every rank (the error travels in ``best``'s handshake).  An invalid ``step`` or ``every``
            (which decide whether this is a pulling step), or anything on the other steps, where nothing is
            communicated, is raised on this rank; none of the checks depends on the shard, so ranks given the same
            arguments raise alike.  ``ValueError`` also when every rank's shard is empty.
        PeerError: a peer died or hung during the pull.

    >>> import torch, torch.distributed as dist, torch.nn.functional as F
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> s = Swarm.stack([torch.nn.Linear(2, 1) for _ in range(4)])
    >>> x, y = torch.randn(8, 2), torch.randn(8, 1)
    >>> s, losses, found = hybrid_step(s, lambda net, x, y: F.mse_loss(net(x), y), x, y, step=4, lr=0.1)
    >>> tuple(losses.shape), found[2]
    ((4,), 0)
    >>> dist.destroy_process_group()
    """
    fn = "hybrid_step"
    every = _int(fn, every, "every", 1)
    pulling = (_int(fn, step, "step", 0) + 1) % every == 0
    error: Optional[Exception] = None
    losses: Optional[Tensor] = None
    try:
        checked = _args(fn, swarm, loss_fn, every, subset, lr, alpha, generator)
        count = len(swarm) if checked.subset is None else min(checked.subset, len(swarm))
        swarm, losses = alg.sgd_step(swarm, loss_fn, *args, lr=checked.lr)  # an empty shard: empty losses
    except Exception as caught:
        if not pulling:
            raise
        error = caught
    if not pulling:
        return swarm, losses, None  # type: ignore[return-value]
    found = best_of(swarm, losses, group=group, timeout=timeout, error=error)
    if count:
        chosen = randperm(len(swarm), generator)[:count]  # on the generator's device, as the algorithms draw
        pulled = swarm.clone()
        pulled[chosen] = alg.apso(swarm[chosen], found[0], alpha=0.0, beta=checked.alpha)
        swarm = pulled
    return swarm, losses, found  # type: ignore[return-value]


def hybrid(swarm: Swarm, loss_fn: Callable[..., Tensor], batches: Iterable[Sequence[Any]], *, lr: float,
           every: int = 5, subset: Optional[int] = None, alpha: float = 0.5,
           generator: Optional[torch.Generator] = None, show_progress: Optional[bool] = None,
           group: Any = None, timeout: Timeout = None) -> tuple[Swarm, Tensor]:
    """Run the distributed ``hybrid_step`` over ``batches`` (``algorithms.hybrid`` with a global best).

    Every rank passes its own shard (shards may differ in size, and may be empty) and the same
    number of batches (its own data or the same) and the same ``every`` (which decides the steps
    that communicate).  The ranks first agree on the arguments and the members' structure, in one
    small handshake: an invalid argument on one rank (e.g. no Swarm, or ``every=0``) raises that
    rank's error on every rank, ranks given different ``every`` raise ``ValueError`` on every rank,
    and shards of different structures raise ``StructureError`` on every rank, before any step.
    ``lr``, ``subset`` and ``alpha`` act on each rank's own shard only, so they may differ.

    Args:
        swarm: this rank's shard.
        loss_fn: ``loss_fn(member, *batch)`` returns a 0-dim loss.
        batches: an iterable of tuples or lists of ``loss_fn`` arguments, one per step.
        show_progress: a tqdm bar on the group's rank 0 (``None``: only when stderr is a terminal).
        the others: as for ``hybrid_step``.

    Returns:
        ``(final_shard, history)`` with this shard's per-member losses of every step, ``(steps, P_local)``.

    Raises:
        TypeError / ValueError: an invalid argument on any rank (every rank raises it).  A batch that is
            not a tuple or list raises ``TypeError`` when it comes (on every rank when it falls on a
            pulling step; on a step that communicates nothing, on its own rank).
        ValueError: the ranks were given different ``every`` (every rank raises it).
        StructureError: the shards' members differ in structure across ranks (every rank raises it).
        PeerError: a peer died or hung.

    >>> import torch, torch.distributed as dist, torch.nn.functional as F
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> s = Swarm.stack([torch.nn.Linear(2, 1) for _ in range(4)])
    >>> data = [(torch.randn(8, 2), torch.randn(8, 1))] * 6
    >>> s, history = hybrid(s, lambda net, x, y: F.mse_loss(net(x), y), data, lr=0.1, every=3)
    >>> tuple(history.shape)
    (6, 4)
    >>> dist.destroy_process_group()
    """
    fn = "hybrid"
    error: Optional[Exception] = None
    try:
        checked = _args(fn, swarm, loss_fn, every, subset, lr, alpha, generator)
        if not isinstance(batches, Iterable):  # not iter(batches): a DataLoader would start (and shuffle) twice
            raise TypeError(f"{fn}: expected an iterable of batches (tuples of loss_fn arguments), "
                            f"got {type(batches).__name__}")
        show_progress = progress_flag(fn, show_progress)
    except (TypeError, ValueError) as caught:
        error = caught
    comm, flat, _, _ = begin(fn, swarm, group, timeout, error=error,
                              arg=lambda: int_arg(fn, every, "every", "an int"))
    flat.release()
    leader = comm.rank == 0
    history = []
    bar = alg.progress(batches, desc="hybrid", enabled=show_progress if leader else False)
    for step, batch in enumerate(bar):
        if not isinstance(batch, (tuple, list)):  # as algorithms.hybrid; a tensor would be unpacked row by row
            wrong = TypeError(f"{fn}: expected each batch to be a tuple or list of loss_fn arguments, "
                              f"got {type(batch).__name__} at step {step}")
            if (step + 1) % checked.every == 0:  # a pulling step: the peers are in best, so every rank raises it
                best_of(swarm, None, group=group, timeout=timeout, error=wrong)
            raise wrong
        swarm, losses, found = hybrid_step(swarm, loss_fn, *batch, step=step, lr=lr, every=every, subset=subset,
                                           alpha=alpha, generator=generator, group=group, timeout=timeout)
        history.append(losses)
        if found is not None and hasattr(bar, "set_postfix"):
            bar.set_postfix(best=float(found[1]), refresh=False)
    return swarm, torch.stack(history) if history else no_history(swarm)
