"""The hybrid swarm loop across processes: each rank trains its own shard, and every ``every``
steps the global best member is found and a random subset of every shard is pulled toward it.

Built from ``nytorch.algorithms`` (``sgd_step`` for the vectorised gradient step, ``apso``
without noise for the pull) and ``best`` (one small all_gather plus one broadcast of the winner).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from .. import algorithms as alg
from .._particle import Particle
from .._swarm import Swarm
from ._collectives import best
from ._comm import Timeout, resolve

Tensor = torch.Tensor

__all__ = ["shard", "hybrid_step", "hybrid"]


def shard(swarm: Swarm, *, group: Any = None) -> Swarm:
    """This rank's contiguous block of ``swarm`` (``torch.tensor_split`` over the group's ranks; a view).

    ``all_gather(shard(swarm))`` gives ``swarm`` back on every rank.  Nothing is communicated.

    Args:
        swarm: the whole swarm (the same on every rank, e.g. built from one seed).
        group: the process group (default: the world).

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


def hybrid_step(swarm: Swarm, loss_fn: Callable[..., Tensor], /, *args: Any, step: int, lr: float,
                every: int = 5, subset: Optional[int] = None, alpha: float = 0.5,
                generator: Optional[torch.Generator] = None, group: Any = None, timeout: Timeout = None,
                ) -> tuple[Swarm, Tensor, Optional[tuple[Union[nn.Module, Particle], Tensor, int]]]:
    """One distributed hybrid step on this rank's shard: ``algorithms.sgd_step``, then, when
    ``(step + 1) % every == 0``, the global ``best`` and ``W ← (1 − α)·W + α·W_best`` on ``subset``
    random members of the shard (``algorithms.apso`` without noise).

    Every rank must call it with the same ``step`` and ``every`` (the pull is a collective).

    Args:
        swarm: this rank's shard.
        loss_fn: ``loss_fn(member, *args)`` returns a 0-dim loss (as for ``algorithms.sgd_step``).
        step / lr / every / subset / alpha / generator: as ``algorithms.hybrid_step`` (``subset``:
            members pulled per shard, default all of them).
        group / timeout: as for the collectives.

    Returns:
        ``(new_shard, losses, found)``: the local losses before the step, and ``(member, loss, rank)``
        from ``best`` on pulling steps (``None`` otherwise).

    Raises:
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
    if not isinstance(swarm, Swarm):
        raise TypeError(f"{fn}: expected a Swarm as swarm, got {type(swarm).__name__}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"{fn}: expected a positive int as every, got {every!r}")
    size = len(swarm)
    count = size if subset is None else subset
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= size:
        raise ValueError(f"{fn}: expected subset in [0, {size}] (members of this shard), got {subset!r}")
    swarm, losses = alg.sgd_step(swarm, loss_fn, *args, lr=lr)
    if (step + 1) % every:
        return swarm, losses, None
    found = best(swarm, losses, group=group, timeout=timeout)
    if count:
        chosen = torch.randperm(size, generator=generator)[:count]
        pulled = swarm.clone()
        pulled[chosen] = alg.apso(swarm[chosen], found[0], alpha=0.0, beta=alpha)
        swarm = pulled
    return swarm, losses, found


def hybrid(swarm: Swarm, loss_fn: Callable[..., Tensor], batches: Iterable[Sequence[Any]], *, lr: float,
           every: int = 5, subset: Optional[int] = None, alpha: float = 0.5,
           generator: Optional[torch.Generator] = None, show_progress: Optional[bool] = None,
           group: Any = None, timeout: Timeout = None) -> tuple[Swarm, Tensor]:
    """Run the distributed ``hybrid_step`` over ``batches`` (``algorithms.hybrid`` with a global best).

    Every rank passes its own shard and the same number of batches (its own data or the same).

    Args:
        show_progress: a tqdm bar on the group's rank 0 (``None``: only when stderr is a terminal).

    Returns:
        ``(final_shard, history)`` with this shard's per-member losses of every step, ``(steps, P_local)``.

    Raises:
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
    if not isinstance(swarm, Swarm):
        raise TypeError(f"hybrid: expected a Swarm as swarm, got {type(swarm).__name__}")
    leader = dist.get_rank(group) == 0 if dist.is_initialized() else True
    history = []
    bar = alg.progress(batches, desc="hybrid", enabled=show_progress if leader else False)
    for step, batch in enumerate(bar):
        swarm, losses, found = hybrid_step(swarm, loss_fn, *batch, step=step, lr=lr, every=every, subset=subset,
                                           alpha=alpha, generator=generator, group=group, timeout=timeout)
        history.append(losses)
        if found is not None and hasattr(bar, "set_postfix"):
            bar.set_postfix(best=float(found[1]), refresh=False)
    return swarm, torch.stack(history) if history else torch.zeros(0, len(swarm))
