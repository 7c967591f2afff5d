"""Swarm algorithms as small pure functions over ``nytorch.Swarm`` values.

Each function takes swarms (and losses you computed, e.g. with ``swarm(x)`` or
``swarm.grad_and_value``) and returns new ones; nothing is mutated and there are
no hidden objects.  Bigger loops are compositions of these steps.

* ``pso_init`` / ``pso_step`` (and ``pso_velocity``): particle swarm optimisation, inertia form.
* ``apso``: accelerated PSO, ``W_i ← (1 − β)·W_i + β·W_best + α·ε``.
* ``es_noise`` / ``es_gradient`` / ``es_step`` / ``centered_ranks``: OpenAI-ES with antithetic sampling.
* ``truncation_selection``: keep the best, refill with mutated copies.
* ``sgd_step``: gradient descent on every member in one vectorised call.
* ``pull_toward_best`` / ``hybrid_step`` / ``hybrid``: the nytorch 1.1 hybrid loop.
* ``progress``: an optional tqdm bar (off when not a terminal or tqdm is missing).

>>> import torch, nytorch
>>> from nytorch import algorithms as alg
>>> swarm = nytorch.Swarm.randn(torch.nn.Linear(3, 1), 8, generator=torch.Generator().manual_seed(0))
>>> losses = swarm.norm()
>>> swarm = alg.apso(swarm, int(losses.argmin()), alpha=0.1, beta=0.5)
>>> len(swarm)
8
"""
from ._apso import apso
from ._es import centered_ranks, es_gradient, es_noise, es_step
from ._gradient import sgd_step
from ._hybrid import hybrid, hybrid_step, pull_toward_best
from ._progress import progress
from ._pso import PSOState, pso_init, pso_step, pso_velocity
from ._selection import truncation_selection

__all__ = [
    "PSOState", "pso_init", "pso_velocity", "pso_step", "apso",
    "es_noise", "es_gradient", "es_step", "centered_ranks",
    "truncation_selection", "sgd_step", "pull_toward_best", "hybrid_step", "hybrid", "progress",
]
