"""The hybrid loop from the nytorch 1.1 "example code" chapter: SGD on every member, and every
``every`` steps a random subset is pulled toward its best member."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, Optional

import torch

from .._swarm import Swarm
from ._checks import callable_arg, count_arg, generator_arg, losses_arg, number_arg, swarm_arg
from ._copy import copy_onto
from ._gradient import sgd_step
from ._indices import randperm
from ._progress import progress, progress_flag, set_postfix

Tensor = torch.Tensor

__all__ = ["pull_toward_best", "hybrid_step", "hybrid"]


def no_history(swarm: Swarm) -> Tensor:
    """The ``(0, P)`` history of a run without steps, where losses would be: the device and real dtype of the
    members' first floating parameter (as ``Swarm.grad_and_value`` of an empty swarm), not the default device."""
    floating = [leaf for leaf in swarm._spec.layout.params if leaf.is_floating_point() or leaf.is_complex()]
    if not floating:
        return torch.zeros(0, len(swarm), device="cpu")
    return torch.zeros(0, len(swarm), dtype=floating[0].dtype.to_real(), device=floating[0].device)


def pull_toward_best(swarm: Swarm, losses: Tensor, *, subset: int, alpha: float,
                     generator: Optional[torch.Generator] = None) -> Swarm:
    """Draw ``subset`` random members and move each toward the best of them: ``W ← (1 − α)·W + α·W_best``.

    The evolutionary step of the nytorch 1.1 example (an accelerated-PSO pull without noise,
    applied to a random subset to keep it cheap).  Members outside the subset are unchanged, and an
    empty swarm (a rank's empty shard) gives an empty swarm.  ``alpha=0`` moves nothing (and draws
    nothing); ``alpha=1`` copies the best exactly, onto diverged (inf or NaN) members too.

    Args:
        swarm: the population, ``P`` members.
        losses: the losses of ``swarm``'s members, a real tensor of shape ``(P,)`` (NaN ranks as
            ``+inf``).
        subset: how many members to draw, an int in ``[1, P]``.
        alpha: ``α``, a real number (Python or NumPy number or 0-dim tensor).
        generator: draws the subset, on its own device (any device: nothing else is drawn).

    Returns:
        A new Swarm of ``P`` members; ``swarm`` is unchanged.

    Raises:
        TypeError: ``swarm`` is not a Swarm, ``losses`` is not a real tensor, ``subset`` is not an
            int, ``alpha`` is not a real number, or ``generator`` is not a ``torch.Generator``.
        ValueError: ``losses`` is not of shape ``(P,)``, ``subset`` is outside ``[1, P]``, or
            ``alpha`` is NaN.

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
    if size == 0 or alpha == 0.0:  # an empty swarm (a rank's empty shard), or no pull: nothing moves
        return swarm.clone()
    chosen = randperm(size, generator)[:subset]
    best = int(chosen[torch.nan_to_num(losses.cpu()[chosen], nan=float("inf")).argmin()])
    others = chosen[chosen != best]
    out = swarm.clone()
    if others.numel():
        # alpha == 1: a copy, not lerp's W_best − (W_best − W)·0, which is NaN where W diverged
        out[others] = (copy_onto(fn, swarm[others], swarm[best:best + 1]) if alpha == 1.0
                       else swarm[others].lerp(swarm[best], alpha))
    return out


class _Args(NamedTuple):
    """The checked arguments of the hybrid loop."""

    lr: float
    every: int
    subset: Optional[int]
    alpha: float
    generator: Optional[torch.Generator]


def _checked(fn: str, swarm: object, loss_fn: object, lr: object, every: object, subset: object, alpha: object,
             generator: object) -> tuple[Swarm, _Args]:
    """Every argument of ``hybrid_step``/``hybrid`` checked up front, errors naming ``fn``."""
    swarm = swarm_arg(fn, swarm)
    callable_arg(fn, loss_fn)
    lr = number_arg(fn, lr, "lr")
    every = count_arg(fn, every, "every", 1, 2**62)
    size = max(len(swarm), 1)
    subset = None if subset is None else count_arg(fn, subset, "subset", 1, size)
    alpha = number_arg(fn, alpha, "alpha")
    return swarm, _Args(lr, every, subset, alpha, generator_arg(fn, generator))  # indices only: any device


def _step(swarm: Swarm, loss_fn: Callable[..., Tensor], args: Sequence[Any], step: int,
          checked: _Args) -> tuple[Swarm, Tensor]:
    swarm, losses = sgd_step(swarm, loss_fn, *args, lr=checked.lr)
    if (step + 1) % checked.every == 0:
        swarm = pull_toward_best(swarm, losses, subset=max(len(swarm), 1) if checked.subset is None else checked.subset,
                                 alpha=checked.alpha, generator=checked.generator)
    return swarm, losses


def hybrid_step(swarm: Swarm, loss_fn: Callable[..., Tensor], /, *args: Any, step: int, lr: float,
                every: int = 5, subset: Optional[int] = None, alpha: float = 0.5,
                generator: Optional[torch.Generator] = None) -> tuple[Swarm, Tensor]:
    """One step of the hybrid loop: ``sgd_step``, then ``pull_toward_best`` when ``(step + 1) % every == 0``.

    The pull picks the best member by the losses ``sgd_step`` returns, those of the positions before
    the SGD step, and moves the stepped positions.  An empty swarm (a rank's empty shard) stays
    empty, with losses of shape ``(0,)``.  Every argument is checked before the gradient step runs
    (numbers may be Python or NumPy numbers or 0-dim tensors).

    Args:
        swarm: the members to step.
        loss_fn: ``loss_fn(member, *args)`` returns a 0-dim loss (as in ``sgd_step``).
        *args: passed to ``loss_fn`` after the member.
        step: the index of this step, an int >= 0 (the pull runs when ``(step + 1) % every == 0``).
        lr: the SGD step size.
        every: pull every ``every`` steps, an int >= 1.
        subset: how many members the pull draws, in ``[1, P]``; ``None``: every member.
        alpha: the pull ``α`` (as in ``pull_toward_best``).
        generator: draws the pull's subset, on its own device.

    Returns:
        ``(new_swarm, losses)`` with the losses before the step.

    Raises:
        TypeError / ValueError: an invalid argument (``step`` an int >= 0, ``every`` >= 1, ``subset``
            in ``[1, P]`` or ``None``, ``lr``/``alpha`` real numbers, ``generator`` a torch.Generator
            or ``None``), naming it, or a ``loss_fn`` result that is no 0-dim floating loss.

    >>> import torch, torch.nn.functional as F
    >>> s = Swarm.stack([torch.nn.Linear(2, 1) for _ in range(4)])
    >>> x, y = torch.randn(8, 2), torch.randn(8, 1)
    >>> s, losses = hybrid_step(s, lambda net, x, y: F.mse_loss(net(x), y), x, y, step=4, lr=0.1)
    >>> tuple(losses.shape)
    (4,)
    """
    fn = "hybrid_step"
    step = count_arg(fn, step, "step", 0, 2**62)
    swarm, checked = _checked(fn, swarm, loss_fn, lr, every, subset, alpha, generator)
    return _step(swarm, loss_fn, args, step, checked)


def hybrid(swarm: Swarm, loss_fn: Callable[..., Tensor], batches: Iterable[Sequence[Any]], *, lr: float,
           every: int = 5, subset: Optional[int] = None, alpha: float = 0.5,
           generator: Optional[torch.Generator] = None, show_progress: Optional[bool] = None
           ) -> tuple[Swarm, Tensor]:
    """Run ``hybrid_step`` over ``batches`` (each a tuple or list of ``loss_fn`` arguments after the member).

    Every argument is checked before the first step (as for ``hybrid_step``), so a bad ``subset`` or
    ``generator`` is refused even when no pull would happen; each batch is checked as it comes.

    Args:
        swarm: the starting members.
        loss_fn: ``loss_fn(member, *batch)`` returns a 0-dim loss (as in ``sgd_step``).
        batches: an iterable (e.g. a DataLoader, iterated once) of tuples or lists of ``loss_fn``
            arguments; step ``k`` uses the ``k``-th batch.
        lr, every, subset, alpha, generator: as in ``hybrid_step``.
        show_progress: a tqdm bar (``None``: only when stderr is a terminal and tqdm is installed).

    Returns:
        ``(final_swarm, history)`` with the per-member losses of every step, shape ``(steps, P)``
        (``(steps, 0)`` for an empty swarm).

    Raises:
        TypeError / ValueError: an invalid argument, naming it, or a ``loss_fn`` result that is no
            0-dim floating loss; ``TypeError`` for a batch that is not a tuple or list.

    >>> import torch, torch.nn.functional as F
    >>> s = Swarm.stack([torch.nn.Linear(2, 1) for _ in range(4)])
    >>> data = [(torch.randn(8, 2), torch.randn(8, 1))] * 10
    >>> s, history = hybrid(s, lambda net, x, y: F.mse_loss(net(x), y), data, lr=0.1, every=3)
    >>> tuple(history.shape)
    (10, 4)
    """
    fn = "hybrid"
    swarm, checked = _checked(fn, swarm, loss_fn, lr, every, subset, alpha, generator)
    if not isinstance(batches, Iterable):  # not iter(batches): a DataLoader would start (and shuffle) twice
        raise TypeError(f"{fn}: expected an iterable of batches (tuples of loss_fn arguments), "
                        f"got {type(batches).__name__}")
    show_progress = progress_flag(fn, show_progress)
    history = []
    bar = progress(batches, desc=fn, enabled=show_progress)
    for step, batch in enumerate(bar):
        if not isinstance(batch, (tuple, list)):
            raise TypeError(f"{fn}: expected each batch to be a tuple or list of loss_fn arguments, "
                            f"got {type(batch).__name__} at step {step}")
        swarm, losses = _step(swarm, loss_fn, batch, step, checked)
        history.append(losses)
        if losses.numel():
            set_postfix(bar, best=float(losses.min()), mean=float(losses.mean()))
    return swarm, torch.stack(history) if history else no_history(swarm)
