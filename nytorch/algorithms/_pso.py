"""Particle swarm optimisation in its inertia / cognitive / social form, as pure functions."""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import nn

from .. import _swarm_ops as swarm_ops
from .._particle import Particle
from .._swarm import Swarm
from ._checks import checked_target, generator_arg, losses_arg, number_arg, swarm_arg, target_arg

Tensor = torch.Tensor

__all__ = ["PSOState", "pso_init", "pso_velocity", "pso_step"]


class PSOState(NamedTuple):
    """What PSO remembers between steps (the positions are the swarm itself).

    Attributes:
        velocity: one velocity per member (a Swarm of the same structure).
        best: each member's best position so far (personal bests).
        best_loss: the losses of ``best``, shape ``(P,)``.

    >>> import torch
    >>> state = pso_init(Swarm.randn(torch.nn.Linear(2, 1), 3), torch.tensor([3., 1., 2.]))
    >>> type(state).__name__, len(state.velocity), len(state.best), state.best_loss.tolist()
    ('PSOState', 3, 3, [3.0, 1.0, 2.0])
    """

    velocity: Swarm
    best: Swarm
    best_loss: Tensor


def pso_init(swarm: Swarm, losses: Tensor) -> PSOState:
    """Start PSO at ``swarm`` (whose losses are ``losses``): zero velocities, personal bests = positions.

    Args:
        swarm: the starting positions.
        losses: the losses of ``swarm``'s members, a real tensor of shape ``(P,)``.

    Returns:
        A ``PSOState`` of zero velocities, a copy of ``swarm`` as the personal bests and a
        detached copy of ``losses`` as their losses.

    Raises:
        TypeError: ``swarm`` is not a Swarm, or ``losses`` is not a real tensor.
        ValueError: ``losses`` is not of shape ``(P,)``.

    >>> import torch
    >>> s = Swarm.randn(torch.nn.Linear(2, 1), 3)
    >>> state = pso_init(s, torch.tensor([3., 1., 2.]))
    >>> float(state.velocity.norm().sum()), state.best_loss.tolist()
    (0.0, [3.0, 1.0, 2.0])
    """
    fn = "pso_init"
    swarm = swarm_arg(fn, swarm)
    losses = losses_arg(fn, losses, len(swarm))
    return PSOState(Swarm.zeros(swarm), swarm.clone(), losses.clone())


def pso_velocity(swarm: Swarm, velocity: Swarm, best: Swarm, global_best: Union[Particle, nn.Module, int], *,
                 inertia: float, cognitive: float, social: float,
                 generator: Optional[torch.Generator] = None) -> Swarm:
    """The PSO velocity ``w·v + c₁·r₁⊙(best − x) + c₂·r₂⊙(g − x)`` with ``r ~ U[0, 1)`` per value.

    A zero coefficient drops its term and draws nothing.  For complex parameters ``r`` is complex
    (``Swarm.rand``: U[0, 1) real and imaginary parts), so it turns a pull as well as scaling it.

    Args:
        swarm: the positions ``x``.
        velocity: the current velocities ``v``, a Swarm with one member per member of ``swarm``.
        best: the personal bests, a Swarm with one member per member of ``swarm``.
        global_best: ``g``, a Particle or model, or the index of a member of ``swarm`` (as in ``apso``).
        inertia: ``w``, a real number (Python or NumPy number or 0-dim tensor).
        cognitive: ``c₁``, the pull toward each member's own best.
        social: ``c₂``, the pull toward ``global_best``.
        generator: for reproducible ``r₁``, ``r₂`` (on the swarm's device).

    Returns:
        The new velocities, a new Swarm; the inputs are unchanged.

    Raises:
        TypeError: ``swarm``, ``velocity`` or ``best`` is not a Swarm, a coefficient is not a real number,
            ``global_best`` is no index, Particle or model, a model of another class is given, or
            ``generator`` is not a ``torch.Generator``.
        ValueError: ``velocity`` or ``best`` has another number of members than ``swarm``, a coefficient
            is NaN, or (``cognitive`` or ``social`` nonzero) ``generator`` is on another device type
            than the swarm.
        IndexError: ``global_best`` is an index out of range.
        StructureError: ``velocity``, ``best`` or ``global_best`` differs from the members in structure
            (the message names the argument and the parameter).

    >>> import torch
    >>> x = Swarm.randn(torch.nn.Linear(2, 1), 3)
    >>> v = pso_velocity(x, Swarm.zeros(x), x, x[0], inertia=0.7, cognitive=1.5, social=0.0)
    >>> float(v.norm().sum())                       # at its own best, no social pull: no motion
    0.0
    """
    fn = "pso_velocity"
    for name, value in (("swarm", swarm), ("velocity", velocity), ("best", best)):
        swarm_arg(fn, value, name)
    for name, value in (("velocity", velocity), ("best", best)):  # checked even where a zero coefficient skips it
        _per_member(fn, swarm, value, name)
    inertia = number_arg(fn, inertia, "inertia")
    cognitive = number_arg(fn, cognitive, "cognitive")
    social = number_arg(fn, social, "social")
    target_of_all = target_arg(fn, swarm, global_best, "global_best")
    checked_target(fn, swarm, target_of_all, "global_best")
    generator = generator_arg(fn, generator, swarm if cognitive != 0.0 or social != 0.0 else None)
    # a zero coefficient drops its term (no draw either): 0 · (inf − inf) would be NaN, not 0
    out = velocity * inertia if inertia != 0.0 else Swarm.zeros(velocity)
    for coefficient, target in ((cognitive, best), (social, target_of_all)):
        if coefficient != 0.0:
            pull = Swarm.rand(swarm, generator=generator)
            pull *= coefficient
            pull *= target - swarm
            out += pull
    return out


def _per_member(fn: str, swarm: Swarm, value: Swarm, name: str) -> None:
    """Raise (naming ``fn`` and ``name``) unless ``value`` has one member per member of ``swarm``, of their structure."""
    if len(value) != len(swarm):
        raise ValueError(f"{fn}: expected {name} of {len(swarm)} members (one per member of swarm), got {len(value)}")
    swarm_ops.aligned(f"{fn}: {name}", swarm._spec, value)


def pso_step(swarm: Swarm, losses: Tensor, state: PSOState, *, inertia: float = 0.7298,
             cognitive: float = 1.49618, social: float = 1.49618,
             generator: Optional[torch.Generator] = None) -> tuple[Swarm, PSOState]:
    """One PSO iteration: record bests from ``losses`` (the losses of ``swarm``), then move every member.

    A member whose loss is lower than its best so far takes its position as its new best; ``g`` is
    the best of the bests.  Then ``v ← w·v + c₁·r₁⊙(best − x) + c₂·r₂⊙(g − x)`` and ``x ← x + v``
    (``pso_velocity``), with ``r₁`` then ``r₂`` drawn from ``U[0, 1)`` per value (for a model of one
    dtype, each is one ``torch.rand(P, n)`` laid out in ``named_parameters()`` order, so plain torch
    with the same generator visits the same positions; a zero coefficient draws nothing).  Defaults
    are Clerc's constriction coefficients.  With all three coefficients zero the swarm does not move.
    An empty swarm (a rank's empty shard) gives an empty swarm and a state of 0 members.

    Args:
        swarm: the positions ``x``.
        losses: the losses of ``swarm``'s members, shape ``(P,)``.
        state: from ``pso_init`` or the previous ``pso_step``.
        inertia: ``w``.
        cognitive: ``c₁``, the pull toward each member's own best.
        social: ``c₂``, the pull toward the swarm's best.
        generator: for reproducible ``r₁``, ``r₂`` (on the swarm's device).

    Returns:
        ``(new_swarm, new_state)``; the inputs are unchanged.

    Raises:
        TypeError: ``swarm`` (or ``state.best`` / ``state.velocity``) is not a Swarm, ``state`` is not a
            ``PSOState``, losses are not a real tensor, or a coefficient is not a real number.
        ValueError: ``losses``, ``state.best_loss``, ``state.best`` or ``state.velocity`` does not hold
            one entry per member of ``swarm``.
        StructureError: ``state`` holds members of another structure (the message names the part).

    >>> import torch
    >>> x = Swarm.randn(torch.nn.Linear(2, 1), 4)
    >>> losses = x.norm()
    >>> state = pso_init(x, losses)
    >>> x2, state = pso_step(x, losses, state, inertia=0.0, cognitive=0.0, social=0.0)
    >>> torch.equal(x2.params["weight"], x.params["weight"])
    True
    """
    fn = "pso_step"
    swarm = swarm_arg(fn, swarm)
    losses = losses_arg(fn, losses, len(swarm))
    if not isinstance(state, PSOState):
        raise TypeError(f"pso_step: expected a PSOState as state (from pso_init), got {type(state).__name__}")
    for name, part in (("state.best", state.best), ("state.velocity", state.velocity)):
        swarm_arg(fn, part, name)
    if len(state.best) != len(swarm):
        raise ValueError(f"pso_step: the state tracks {len(state.best)} members but the swarm has {len(swarm)}")
    for name, part in (("state.best", state.best), ("state.velocity", state.velocity)):
        if len(part) != len(swarm):
            raise ValueError(f"{fn}: expected {name} of {len(swarm)} members (one per member), got {len(part)}")
        swarm_ops.aligned(f"{fn}: {name}", swarm._spec, part)  # a state of another model: say so before writing
    losses_arg(fn, state.best_loss, len(swarm), "state.best_loss")
    for name, value in (("inertia", inertia), ("cognitive", cognitive), ("social", social)):
        number_arg(fn, value, name)  # checked here too: an empty swarm returns before pso_velocity
    generator_arg(fn, generator, swarm if cognitive != 0.0 or social != 0.0 else None)
    # a NaN best (a diverged first evaluation) is beaten by any number, as if it were +inf; infinite bests
    # stay infinite (nan_to_num would make them finite, and a tie at -inf an improvement)
    inf = float("inf")
    improved = losses < torch.nan_to_num(state.best_loss, nan=inf, posinf=inf, neginf=-inf)
    best = state.best.clone()
    if bool(improved.any()):
        best[improved] = swarm[improved]
    best_loss = torch.where(improved, losses, state.best_loss)
    if len(swarm) == 0:  # no member, no global best: nothing moves
        return swarm.clone(), PSOState(state.velocity.clone(), best, best_loss)
    global_best = best[int(torch.nan_to_num(best_loss, nan=float("inf")).argmin())]
    velocity = pso_velocity(swarm, state.velocity, best, global_best, inertia=inertia, cognitive=cognitive,
                            social=social, generator=generator)
    return swarm + velocity, PSOState(velocity, best, best_loss)
