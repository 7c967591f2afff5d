"""Truncation selection with Gaussian mutation."""
from __future__ import annotations

from typing import Optional

import torch

from .._swarm import Swarm
from ._checks import count_arg, generator_arg, losses_arg, number_arg, swarm_arg
from ._indices import randint

__all__ = ["truncation_selection"]


def truncation_selection(swarm: Swarm, losses: torch.Tensor, *, survivors: int, sigma: float,
                         generator: Optional[torch.Generator] = None) -> Swarm:
    """Keep the ``survivors`` lowest-loss members; refill with mutated copies of random survivors.

    The result has the same size: first the survivors unchanged, best first, then
    ``parent + sigma * N(0, 1)`` for parents drawn uniformly from the survivors.

    An empty swarm (a rank's empty shard) gives an empty swarm.  Parents are drawn with
    ``generator`` on its own device; with ``sigma > 0`` it also draws the mutations on the
    swarm's device, so it must be on that device.

    Args:
        swarm: the population, ``P`` members.
        losses: the losses of ``swarm``'s members, a real tensor of shape ``(P,)`` (NaN ranks as
            ``+inf``).
        survivors: how many members to keep, an int in ``[1, P]``.
        sigma: the mutation scale, ``>= 0`` (``0``: exact copies).
        generator: for reproducible parents and mutations.

    Returns:
        A new Swarm of ``P`` members; ``swarm`` is unchanged.

    Raises:
        TypeError: ``swarm`` is not a Swarm, ``losses`` is not a real tensor, ``survivors`` is not an
            int, ``sigma`` is not a real number, or ``generator`` is not a ``torch.Generator``.
        ValueError: ``survivors`` outside ``[1, P]``, ``sigma < 0`` or NaN, losses of the wrong shape, or
            (``sigma > 0``) a generator on another device type than the swarm.

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
    generator = generator_arg(fn, generator, swarm if sigma > 0.0 else None)
    if size == 0:  # an empty swarm (a rank's empty shard): nothing to select from
        return swarm.clone()
    order = torch.argsort(torch.nan_to_num(losses, nan=float("inf")), stable=True).cpu()
    elite = order[:survivors]
    parents = elite[randint(survivors, size - survivors, generator)]
    population = swarm[torch.cat([elite, parents])]
    if sigma > 0.0 and size > survivors:
        children = population[survivors:]  # a view: mutating it mutates the population
        children.add_(Swarm.randn(children, generator=generator), alpha=sigma)
    return population
