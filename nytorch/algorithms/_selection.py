"""Truncation selection with Gaussian mutation."""
from __future__ import annotations

from typing import Optional

import torch

from .._swarm import Swarm
from ._checks import count_arg, losses_arg, number_arg, swarm_arg

__all__ = ["truncation_selection"]


def truncation_selection(swarm: Swarm, losses: torch.Tensor, *, survivors: int, sigma: float,
                         generator: Optional[torch.Generator] = None) -> Swarm:
    """Keep the ``survivors`` lowest-loss members; refill with mutated copies of random survivors.

    The result has the same size: first the survivors unchanged, best first, then
    ``parent + sigma * N(0, 1)`` for parents drawn uniformly from the survivors.

    Raises:
        ValueError: ``survivors`` outside ``[1, P]``, ``sigma < 0`` or losses of the wrong shape.

    >>> import torch
    >>> s = Swarm.randn(torch.nn.Linear(2, 1), 5)
    >>> losses = torch.tensor([5., 1., 4., 0., 3.])
    >>> new = truncation_selection(s, losses, survivors=2, sigma=0.0)
    >>> torch.equal(new.params["bias"][0], s.params["bias"][3]), len(new)
    (True, 5)
    """
    fn = "truncation_selection"
    swarm = swarm_arg(fn, swarm)
    size = len(swarm)
    losses = losses_arg(fn, losses, size)
    survivors = count_arg(fn, survivors, "survivors", 1, max(size, 1))
    sigma = number_arg(fn, sigma, "sigma", minimum=0.0)
    if size == 0:  # an empty swarm (a rank's empty shard): nothing to select from
        return swarm.clone()
    order = torch.argsort(torch.nan_to_num(losses, nan=float("inf")), stable=True).cpu()
    elite = order[:survivors]
    parents = elite[torch.randint(survivors, (size - survivors,), generator=generator)]
    population = swarm[torch.cat([elite, parents])]
    if sigma > 0.0 and size > survivors:
        children = population[survivors:]  # a view: mutating it mutates the population
        children.add_(Swarm.randn(children, generator=generator), alpha=sigma)
    return population
