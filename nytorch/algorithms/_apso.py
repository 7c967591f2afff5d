"""Accelerated particle swarm optimisation (the update from the nytorch documentation)."""
from __future__ import annotations

from typing import Any, Optional

import torch

from .._swarm import Swarm
from ._checks import generator_arg, number_arg, swarm_arg, target_arg

__all__ = ["apso"]


def apso(swarm: Swarm, best: Any, *, alpha: float, beta: float,
         generator: Optional[torch.Generator] = None) -> Swarm:
    """Accelerated PSO: ``W_i ← (1 - β)·W_i + β·W_best + α·ε_i`` with ``ε_i ~ N(0, 1)``.

    Four kernels per dtype group and no temporaries: the noise is drawn into the output,
    then scaled and accumulated in place.

    Args:
        swarm: the current positions.
        best: the index of the best member, or a Particle/model (e.g. the best ever seen).
        alpha: noise scale ``α >= 0`` (exploration).
        beta: attraction ``β`` toward the best (``0``: none, ``1``: jump onto it).
        generator: for reproducible noise (on the swarm's device).

    Returns:
        A new swarm (``swarm`` is unchanged).

    Raises:
        TypeError / ValueError / IndexError: naming the offending argument.

    >>> import torch
    >>> s = Swarm.randn(torch.nn.Linear(2, 1), 4, generator=torch.Generator().manual_seed(0))
    >>> moved = apso(s, 0, alpha=0.0, beta=1.0)      # everyone jumps onto member 0
    >>> torch.equal(moved.params["weight"][3], s.params["weight"][0])
    True
    """
    fn = "apso"
    swarm = swarm_arg(fn, swarm)
    alpha = number_arg(fn, alpha, "alpha", minimum=0.0)
    beta = number_arg(fn, beta, "beta")
    target = target_arg(fn, swarm, best)
    generator = generator_arg(fn, generator, swarm if alpha != 0.0 else None)
    if alpha == 0.0:
        out = swarm * (1.0 - beta)
    else:
        out = Swarm.randn(swarm, generator=generator)
        out *= alpha
        out.add_(swarm, alpha=1.0 - beta)
    return out.add_(target, alpha=beta)
