"""A simple evolution strategy (OpenAI-ES with antithetic sampling), as pure functions."""
from __future__ import annotations

from typing import Any, Optional, TypeVar, Union, overload

import torch
from torch import nn

from .._module import NytoModule
from .._particle import Particle
from .._swarm import Swarm
from ._checks import checked_target, count_arg, generator_arg, losses_arg, number_arg, swarm_arg

Tensor = torch.Tensor

__all__ = ["es_noise", "es_gradient", "es_step", "centered_ranks"]


def es_noise(center: Any, size: int, *, generator: Optional[torch.Generator] = None) -> Swarm:
    """Antithetic N(0, 1) noise shaped like ``center``: member ``i + size/2`` is ``-(member i)``.

    Evaluate the population ``center + sigma * noise`` (a Swarm), then call ``es_step``.

    Args:
        center: a model, Particle or Swarm giving the structure.
        size: an even population size (a Python or NumPy int).
        generator: for reproducible noise (on the device of ``center``'s values).

    Returns:
        A new Swarm of ``size`` members of ``center``'s member structure: ``size // 2`` draws, then
        their negations.

    Raises:
        TypeError: ``center`` is not a model, Particle or Swarm, ``size`` is not an int, or
            ``generator`` is not a ``torch.Generator``.
        ValueError: ``size`` is below 2 or odd, or ``generator`` is on another device type than
            ``center``'s values.

    >>> import torch
    >>> eps = es_noise(torch.nn.Linear(2, 1), 4)
    >>> torch.equal(eps.params["bias"][0], -eps.params["bias"][2])
    True
    """
    fn = "es_noise"
    _center_arg(fn, center)
    size = count_arg(fn, size, "size", 2, 2**62)
    if size % 2:
        raise ValueError(f"{fn}: expected an even size (antithetic pairs), got {size}")
    if generator is not None:  # checked here, so that a mismatch names es_noise
        generator = generator_arg(fn, generator, Swarm.zeros(center, 0))
    half = Swarm.randn(center, size // 2, generator=generator)
    return Swarm.cat([half, -half])


def es_gradient(noise: Swarm, losses: Tensor, *, sigma: float) -> Particle:
    """The OpenAI-ES estimate of the gradient of the expected loss: ``Σ (L_i − mean L)·ε_i / (P·σ)``.

    ``losses[i]`` is the loss of ``center + sigma * noise[i]`` (any real dtype: integer and bool
    losses are taken in the default float dtype).  Pass ``centered_ranks(losses)`` instead of raw
    losses for rank-based fitness shaping.

    For complex parameters the estimate is half of what autograd gives (torch's complex
    gradient is ``2·∂L/∂z̄``, and complex standard noise has variance ½ per component): double
    ``lr`` to step as ``sgd_step`` does.

    Args:
        noise: the ``ε`` of the population, a Swarm of ``P`` members (e.g. from ``es_noise``).
        losses: a real tensor of shape ``(P,)``, on any device (moved to ``noise``'s).
        sigma: ``σ > 0``, the noise scale the population was evaluated with (a Python or NumPy
            number or a 0-dim tensor).

    Returns:
        A new Particle of ``noise``'s member structure.

    Raises:
        TypeError: ``noise`` is not a Swarm, ``losses`` is not a real tensor, or ``sigma`` is not a
            real number.
        ValueError: ``losses`` is not of shape ``(P,)``, or ``sigma`` is not positive.

    >>> import torch
    >>> eps = es_noise(torch.nn.Linear(1, 1, bias=False), 2000, generator=torch.Generator().manual_seed(0))
    >>> w = 0.01 * eps.params["weight"].flatten()         # losses of a linear function: L = 3·w
    >>> g = es_gradient(eps, 3 * w, sigma=0.01)
    >>> abs(float(g.params["weight"]) - 3.0) < 0.3
    True
    """
    return _gradient("es_gradient", noise, losses, sigma)


def _center_arg(fn: str, center: object) -> None:
    if not isinstance(center, (nn.Module, Particle, Swarm)):
        raise TypeError(f"{fn}: expected a model, a Particle or a Swarm as center, got {type(center).__name__}")


def _gradient(fn: str, noise: object, losses: object, sigma: object) -> Particle:
    """``es_gradient`` with its errors naming ``fn``."""
    noise = swarm_arg(fn, noise, "noise")
    losses = losses_arg(fn, losses, len(noise), floating=True)
    sigma = number_arg(fn, sigma, "sigma", minimum=0.0, strict=True)  # the gradient divides by sigma
    devices = [group.device for group in noise._spec.groups if group.active]
    if devices:  # losses may live anywhere, as for the other algorithms (a CPU list of a GPU swarm's losses)
        losses = losses.to(devices[0])
    weights = (losses - losses.mean()) / (len(noise) * sigma)
    return weights @ noise  # type: ignore[no-any-return]


#: A NytoModule centre: ``es_step`` gives back a model of its class.
NytoT = TypeVar("NytoT", bound=NytoModule)


@overload
def es_step(center: Swarm, noise: Swarm, losses: Tensor, *, sigma: float, lr: float) -> Swarm: ...
@overload
def es_step(center: NytoT, noise: Swarm, losses: Tensor, *,  # type: ignore[overload-overlap]
            sigma: float, lr: float) -> NytoT: ...
@overload
def es_step(center: Union[Particle, nn.Module], noise: Swarm, losses: Tensor, *, sigma: float, lr: float) -> Particle: ...


def es_step(center: Any, noise: Swarm, losses: Tensor, *, sigma: float, lr: float) -> Any:
    """One OpenAI-ES step: ``center − lr · es_gradient(noise, losses, sigma=sigma)`` (descends the loss).

    Every argument is checked first, errors naming ``es_step``; ``lr=0`` returns ``center``'s values
    exactly (even where the estimate is inf or NaN, e.g. from an infinite loss).

    Args:
        center: the current point, a model, Particle or Swarm (then each member steps by the one
            estimate).
        noise: the ``ε`` the population ``center + sigma * noise`` was made with, a Swarm of ``P``
            members.
        losses: the losses of that population, a real tensor of shape ``(P,)`` (on any device).
        sigma: ``σ > 0``, as in ``es_gradient``.
        lr: the step size, a real number.

    Returns:
        A new Particle (or a new model of ``center``'s class for a NytoModule centre; a new Swarm for
        a Swarm centre).

    Raises:
        TypeError: ``center`` is not a model, Particle or Swarm, or is a model (or a Particle of one)
            of another class than ``noise``'s members; ``noise`` is not a Swarm, ``losses`` is not a
            real tensor, or ``sigma`` / ``lr`` is not a real number.
        ValueError: ``losses`` is not of shape ``(P,)``, ``sigma`` is not positive, or ``lr`` is NaN.
        StructureError: a model or Particle ``center`` differs from ``noise``'s members in structure.

    >>> import torch
    >>> from nytorch import particle
    >>> center = particle(torch.nn.Linear(3, 1, bias=False)) + 1
    >>> loss = lambda s: (s.params["weight"] ** 2).sum(dim=(1, 2))   # a quadratic
    >>> eps = es_noise(center, 200, generator=torch.Generator().manual_seed(0))
    >>> new = es_step(center, eps, loss(center + 0.1 * eps), sigma=0.1, lr=0.1)
    >>> float((new.params["weight"] ** 2).sum()) < float((center.params["weight"] ** 2).sum())
    True
    """
    fn = "es_step"
    _center_arg(fn, center)
    noise = swarm_arg(fn, noise, "noise")
    checked_target(fn, noise, center, "center")  # a Swarm centre broadcasts member by member, unchecked here
    lr = number_arg(fn, lr, "lr")
    gradient = _gradient(fn, noise, losses, sigma)
    if lr == 0.0:  # a zero step moves nothing: 0 · inf would be NaN, not 0
        return center - Swarm.zeros(noise, 1)[0]
    return center - lr * gradient


def centered_ranks(losses: Tensor) -> Tensor:
    """Fitness shaping: the ranks of ``losses`` scaled to ``[-0.5, 0.5]`` (lowest loss → -0.5).

    Floating losses give ranks in their dtype; integer and bool losses, in the default float dtype.
    Equal losses get distinct ranks, the lower to the earlier member (a stable sort), not their average.

    Args:
        losses: a 1-D real tensor.

    Returns:
        A new tensor of ``losses``' shape, on its device: rank ``r`` (0 for the lowest) maps to
        ``r / (P - 1) - 0.5`` (``-0.5`` for a single loss).

    Raises:
        TypeError: ``losses`` is not a 1-D tensor, or is complex.

    >>> centered_ranks(torch.tensor([10., -3., 7.]))
    tensor([ 0.5000, -0.5000,  0.0000])
    >>> centered_ranks(torch.tensor([10, -3, 7]))
    tensor([ 0.5000, -0.5000,  0.0000])
    """
    if not isinstance(losses, Tensor) or losses.dim() != 1:
        raise TypeError(f"centered_ranks: expected a 1-D tensor of losses, got "
                        f"{tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__}")
    if losses.is_complex():
        raise TypeError(f"centered_ranks: expected real losses, got {losses.dtype}")
    size = losses.shape[0]
    dtype = losses.dtype if losses.is_floating_point() else torch.get_default_dtype()
    # counted in at least float32 (float16 / bfloat16 cannot count past 2048 / 256) and scaled by one
    # division of exact integers, (2r - span) / (2 span): r / span - 0.5 would cancel, and its rounding
    # error near 0 would exceed float16's whole spacing there; then rounded once to the losses' dtype
    work = torch.promote_types(dtype, torch.float32)
    ranks = torch.empty(size, dtype=work, device=losses.device)
    ranks[losses.argsort(stable=True)] = torch.arange(size, dtype=work, device=losses.device)
    span = max(size - 1, 1)
    return ((2 * ranks - span) / (2 * span)).to(dtype)
