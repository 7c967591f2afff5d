"""Accelerated particle swarm optimisation (the update from the nytorch documentation)."""
from __future__ import annotations

from typing import Any, Optional

import torch

from .._swarm import Swarm
from ._checks import checked_target, generator_arg, number_arg, swarm_arg, target_arg
from ._copy import copy_onto

__all__ = ["apso"]


def apso(swarm: Swarm, best: Any, *, alpha: float, beta: float,
         generator: Optional[torch.Generator] = None) -> Swarm:
    """Accelerated PSO: ``W_i ← (1 - β)·W_i + β·W_best + α·ε_i`` with ``ε_i ~ N(0, 1)``.

    Four kernels per dtype group and no temporaries: the noise is drawn into the output,
    then scaled and accumulated in place.  A zero coefficient drops its term (``0·inf`` would be
    NaN), so ``alpha=0, beta=0`` returns an exact copy of ``swarm`` whatever the best holds, and
    ``beta=1`` puts the best itself (plus the noise) in every member, diverged members included.

    Args:
        swarm: the current positions.
        best: the index of the best member (an int, a NumPy int such as ``np.argmin(losses)`` or a
            0-dim integer tensor), or a Particle/model (e.g. the best ever seen).
        alpha: noise scale ``α >= 0`` (exploration); a Python or NumPy number or a 0-dim tensor.
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
    checked_target(fn, swarm, target)
    generator = generator_arg(fn, generator, swarm if alpha != 0.0 else None)
    # a zero coefficient drops its term: 0 · inf would be NaN, not 0 (as in pso_velocity)
    if alpha == 0.0:
        if beta == 0.0:
            return swarm.clone()
        if beta == 1.0:
            return copy_onto(fn, swarm, target)
        out = swarm * (1.0 - beta)
    else:
        out = Swarm.randn(swarm, generator=generator)
        out *= alpha
        if beta != 1.0:
            out.add_(swarm, alpha=1.0 - beta)
        if beta == 0.0:
            return out
    return out.add_(target, alpha=beta)
