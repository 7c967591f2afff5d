"""The hybrid loop from the nytorch 1.1 "example code" chapter: SGD on every member, and every
``every`` steps a random subset is pulled toward its best member."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional

import torch

from .._swarm import Swarm
from ._checks import count_arg, generator_arg, losses_arg, number_arg, swarm_arg
from ._gradient import sgd_step
from ._indices import randperm
from ._progress import progress, set_postfix

Tensor = torch.Tensor

__all__ = ["pull_toward_best", "hybrid_step", "hybrid"]


def pull_toward_best(swarm: Swarm, losses: Tensor, *, subset: int, alpha: float,
                     generator: Optional[torch.Generator] = None) -> Swarm:
    """Draw ``subset`` random members and move each toward the best of them: ``W ← (1 − α)·W + α·W_best``.

    The evolutionary step of the nytorch 1.1 example (an accelerated-PSO pull without noise,
    applied to a random subset to keep it cheap).  Members outside the subset are unchanged, and an
    empty swarm (a rank's empty shard) gives an empty swarm.  The subset is drawn with ``generator``
    on its own device (any device: nothing else is drawn).

    >>> import torch
    >>> s = Swarm.randn(torch.nn.Linear(2, 1), 4)
    >>> pulled = pull_toward_best(s, torch.tensor([3., 0., 2., 1.]), subset=4, alpha=1.0)
    >>> torch.equal(pulled.params["weight"], s.params["weight"][1].expand(4, 1, 2))
    True
    """
    fn = "pull_toward_best"
    swarm = swarm_arg(fn, swarm)
    size = len(swarm)
    losses = losses_arg(fn, losses, size)
    subset = count_arg(fn, subset, "subset", 1, max(size, 1))
    alpha = number_arg(fn, alpha, "alpha")
    generator = generator_arg(fn, generator)
    if size == 0:  # an empty swarm (a rank's empty shard): nothing to select from
        return swarm.clone()
    chosen = randperm(size, generator)[:subset]
    best = chosen[torch.nan_to_num(losses.cpu()[chosen], nan=float("inf")).argmin()]
    others = chosen[chosen != best]
    out = swarm.clone()
    if others.numel():
        out[others] = swarm[others].lerp(swarm[int(best)], alpha)
    return out


def hybrid_step(swarm: Swarm, loss_fn: Callable[..., Tensor], /, *args: Any, step: int, lr: float,
                every: int = 5, subset: Optional[int] = None, alpha: float = 0.5,
                generator: Optional[torch.Generator] = None) -> tuple[Swarm, Tensor]:
    """One step of the hybrid loop: ``sgd_step``, then ``pull_toward_best`` when ``(step + 1) % every == 0``.

    ``subset`` defaults to every member.  An empty swarm (a rank's empty shard) stays empty, with
    losses of shape ``(0,)``.

    Returns:
        ``(new_swarm, losses)`` with the losses before the step.

    >>> import torch, torch.nn.functional as F
    >>> s = Swarm.stack([torch.nn.Linear(2, 1) for _ in range(4)])
    >>> x, y = torch.randn(8, 2), torch.randn(8, 1)
    >>> s, losses = hybrid_step(s, lambda net, x, y: F.mse_loss(net(x), y), x, y, step=4, lr=0.1)
    >>> tuple(losses.shape)
    (4,)
    """
    every = count_arg("hybrid_step", every, "every", 1, 2**62)
    swarm, losses = sgd_step(swarm, loss_fn, *args, lr=lr)
    if (step + 1) % every == 0:
        swarm = pull_toward_best(swarm, losses, subset=max(len(swarm), 1) if subset is None else subset,
                                 alpha=alpha, generator=generator)
    return swarm, losses


def hybrid(swarm: Swarm, loss_fn: Callable[..., Tensor], batches: Iterable[Sequence[Any]], *, lr: float,
           every: int = 5, subset: Optional[int] = None, alpha: float = 0.5,
           generator: Optional[torch.Generator] = None, show_progress: Optional[bool] = None
           ) -> tuple[Swarm, Tensor]:
    """Run ``hybrid_step`` over ``batches`` (each a tuple of ``loss_fn`` arguments after the member).

    Args:
        show_progress: a tqdm bar (``None``: only when stderr is a terminal and tqdm is installed).

    Returns:
        ``(final_swarm, history)`` with the per-member losses of every step, shape ``(steps, P)``
        (``(steps, 0)`` for an empty swarm).

    >>> import torch, torch.nn.functional as F
    >>> s = Swarm.stack([torch.nn.Linear(2, 1) for _ in range(4)])
    >>> data = [(torch.randn(8, 2), torch.randn(8, 1))] * 10
    >>> s, history = hybrid(s, lambda net, x, y: F.mse_loss(net(x), y), data, lr=0.1, every=3)
    >>> tuple(history.shape)
    (10, 4)
    """
    swarm = swarm_arg("hybrid", swarm)
    history = []
    bar = progress(batches, desc="hybrid", enabled=show_progress)
    for step, batch in enumerate(bar):
        swarm, losses = hybrid_step(swarm, loss_fn, *batch, step=step, lr=lr, every=every, subset=subset,
                                    alpha=alpha, generator=generator)
        history.append(losses)
        if losses.numel():
            set_postfix(bar, best=float(losses.min()), mean=float(losses.mean()))
    return swarm, torch.stack(history) if history else torch.zeros(0, len(swarm))
