"""Gradient descent on every member at once."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._swarm import Swarm
from ._checks import callable_arg, number_arg, swarm_arg

__all__ = ["sgd_step"]


def sgd_step(swarm: Swarm, loss_fn: Callable[..., torch.Tensor], /, *args: Any, lr: float,
             **kwargs: Any) -> tuple[Swarm, torch.Tensor]:
    """One SGD step on every member: ``swarm − lr · ∇loss`` from one vectorised gradient call.

    ``lr=0`` returns the parameters exactly as they were (even where a gradient is inf or NaN),
    with the losses.  Buffers the forward updates (BatchNorm statistics in train mode) are updated
    in the result, as in a loop of ``loss.backward(); optimizer.step()``; ``swarm`` itself is
    unchanged.

    Args:
        swarm: the members to step.
        loss_fn: ``loss_fn(member, *args)`` returns a 0-dim loss; ``member(x)`` runs that member's forward.
        *args: passed to ``loss_fn`` after the member.
        lr: the step size, a Python or NumPy number or a 0-dim tensor.
        **kwargs: passed to ``Swarm.grad_and_value``: its options (``in_dims``, ``randomness``,
            ``chunk_size``), any others on to ``loss_fn``.

    Returns:
        ``(new_swarm, losses)`` with the losses *before* the step, shape ``(P,)``.

    Raises:
        TypeError: ``swarm`` is not a Swarm, ``loss_fn`` is not callable or returns an integer or
            boolean loss, or ``lr`` is not a real number.
        ValueError: ``lr`` is NaN, or ``loss_fn`` returns something other than a 0-dim tensor.

    >>> import torch, torch.nn.functional as F
    >>> s = Swarm.stack([torch.nn.Linear(2, 1) for _ in range(4)])
    >>> x, y = torch.randn(16, 2), torch.randn(16, 1)
    >>> loss = lambda net, x, y: F.mse_loss(net(x), y)
    >>> s2, before = sgd_step(s, loss, x, y, lr=0.1)
    >>> bool((s2.grad_and_value(loss, x, y)[1] < before).all())
    True
    """
    fn = "sgd_step"
    swarm = swarm_arg(fn, swarm)
    callable_arg(fn, loss_fn)
    lr = number_arg(fn, lr, "lr")
    out = swarm.clone()  # the forward updates buffers (BatchNorm statistics) in place: in the result only
    grads, losses = out.grad_and_value(loss_fn, *args, **kwargs)
    if lr == 0.0:  # a zero step moves nothing: 0 · inf would be NaN, not 0
        return out, losses
    return out.add_(grads, alpha=-lr), losses
