"""SLERP between two models, tensor by tensor, with a linear fallback for nearly parallel tensors."""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

from .. import _leafwise as lw
from ._state import carry, matched, members, operand, per_member, rebuild

Tensor = torch.Tensor
M = TypeVar("M")

__all__ = ["slerp"]


#: Below this sine the angle is lost in rounding (the cosine's last bit moves Ω by ~1e-8 near 0
#: and π) and the SLERP coefficients blow up: such tensors are lerped whatever the threshold.
_PARALLEL = 1e-6


def _coefficients(first: Tensor, second: Tensor, t: float, threshold: float) -> tuple[float, float] | None:
    """``(sin((1−t)Ω)/sin Ω, sin(tΩ)/sin Ω)`` for the angle Ω between two tensors, or ``None`` to lerp."""
    a = first.detach().reshape(-1).to(torch.float64)
    b = second.detach().reshape(-1).to(torch.float64)
    norms = float(torch.linalg.vector_norm(a)) * float(torch.linalg.vector_norm(b))
    if norms == 0.0 or not math.isfinite(norms):
        return None
    cosine = max(-1.0, min(1.0, float(torch.dot(a, b)) / norms))
    if abs(cosine) > threshold:
        return None
    omega = math.acos(cosine)
    sine = math.sin(omega)
    if sine < _PARALLEL:  # (anti-)parallel to float64 precision, which ``threshold=1.0`` lets through
        return None
    return math.sin((1.0 - t) * omega) / sine, math.sin(t * omega) / sine


@torch.no_grad()
def slerp(first: M, second: Any, t: float, /, *, threshold: float = 0.9995) -> M:
    """Spherical linear interpolation from ``first`` (t = 0) to ``second`` (t = 1), per tensor.

    Shoemake, "Animating rotation with quaternion curves" (SIGGRAPH 1985), applied to
    each parameter tensor as one vector (as mergekit does): with
    ``Ω = arccos(⟨a, b⟩ / (‖a‖·‖b‖))``,
    ``slerp(a, b; t) = sin((1 − t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b``.  When
    ``|cos Ω| > threshold`` (nearly parallel or anti-parallel, where ``sin Ω ≈ 0``), when
    ``sin Ω < 1e-6`` (parallel to float64 precision, even with ``threshold=1``) or when a
    tensor is zero, it falls back to ``lerp(a, b, t) = a + t·(b − a)``.  The angle is
    computed in float64.

    Args:
        first: a model, Particle or dict of tensors, or a ``Swarm``: then each member is
            interpolated with the same member of ``second`` (a Swarm of as many members), with
            its own angles, exactly as ``[slerp(first[i], second[i], t) for i in range(P)]``.
        second: the same structure.
        t: the interpolation position (0 gives ``first``, 1 gives ``second``).
        threshold: the ``|cos Ω|`` above which tensors count as parallel.

    Returns:
        A new value of ``first``'s kind; buffers and integer leaves come from ``first``.

    Raises:
        StructureError: the structures differ (names the parameter).
        TypeError: ``t`` is not a real number, a parameter is complex, or the models are of two
            classes (or one is a Swarm and the other not).
        ValueError: ``threshold`` outside [0, 1].

    >>> import torch
    >>> a, b = {"w": torch.tensor([1., 0.])}, {"w": torch.tensor([0., 1.])}
    >>> slerp(a, b, 0.5)["w"]
    tensor([0.7071, 0.7071])
    """
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(float(t)):
        raise TypeError(f"slerp: expected t to be a finite real number, got {t!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"slerp: expected threshold in [0, 1], got {threshold!r}")
    position = float(t)
    start = operand("slerp", first, buffers=False, argument="first")
    end = operand("slerp", second, buffers=False, argument="second")
    end = matched("slerp", start, end, "second", reference="first")
    picked = [index for index in range(len(start.leaves)) if start.active(index)]
    for index in picked:
        if start.leaves[index].is_complex():
            raise TypeError(f"slerp: parameter {start.names[index]!r} is complex; SLERP needs real tensors")
    firsts = [start.leaves[index] for index in picked]
    seconds = [end.leaves[index] for index in picked]
    size = members(start)
    if size is None:
        merged = _slerp_tensors(firsts, seconds, position, float(threshold))
    else:  # a Swarm: each member's angles are its own, exactly as a loop of per-member calls
        merged = per_member(lambda a, b: _slerp_tensors(a, b, position, float(threshold)), size, firsts, seconds)
    out = [carry(start, index) for index in range(len(start.leaves))]
    for index, value in zip(picked, merged):
        out[index] = value
    return rebuild(start, out)  # type: ignore[no-any-return]


def _slerp_tensors(firsts: Sequence[Tensor], seconds: Sequence[Tensor], position: float,
                   threshold: float) -> list[Tensor]:
    """SLERP of aligned real tensors pair by pair, with ``lerp`` for nearly parallel or zero pairs."""
    out: list[Tensor] = []
    linear = []
    for k, (a, b) in enumerate(zip(firsts, seconds)):
        pair = _coefficients(a, b, position, threshold)
        if pair is None:
            linear.append(k)
            out.append(a)  # replaced below
        else:
            out.append(a.detach() * pair[0] + b.detach() * pair[1])
    if linear:
        mixed = lw.apply(lw.LERP, [firsts[k] for k in linear], [seconds[k] for k in linear], position,
                         active=[True] * len(linear))
        for k, value in zip(linear, mixed):
            out[k] = value
    return out
