"""TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint mean of task vectors."""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Optional, TypeVar, Union

import torch

from .. import _nocast as nocast
from .. import _leafwise as lw
from ._state import members, per_member, rebuild
from ._task import add_scaled, deltas, read_tasks

Tensor = torch.Tensor
M = TypeVar("M")

__all__ = ["ties", "trim", "kept"]


def _density(density: object) -> float:
    if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0.0 < float(density) <= 1.0:
        raise ValueError(f"ties: expected density to be a fraction in (0, 1], got {density!r}")
    return float(density)


def kept(count: int, density: float) -> int:
    """``⌊count·density⌋``, reading a product a few rounding errors below an integer as that integer.

    ``100 * 0.29`` is ``28.999999999999996`` in floating point, so ``int(100 * 0.29)`` is 28
    although ``0.29`` stands for 29/100: the product carries at most a few ulps of error
    (the rounding of ``density`` and of the product), so one within 4 ulps of an integer is
    taken to be that integer.

    >>> int(100 * 0.29), kept(100, 0.29), kept(100, 0.575)
    (28, 29, 57)
    """
    product = count * density
    nearest = round(product)
    if abs(product - nearest) <= 4 * math.ulp(max(abs(product), 1.0)):
        return min(count, int(nearest))
    return min(count, math.floor(product))


def trim(vector: Sequence[Tensor], density: float) -> list[Tensor]:
    """Zero all but the top-``density`` fraction of entries by magnitude, over all tensors together.

    Keeps the ``⌊n·density⌋`` entries of largest magnitude among the ``n`` entries of all
    tensors (more only on exact ties at the threshold), with ``⌊n·density⌋`` as for the
    decimal ``density`` stands for (``kept``: 29 of 100 for 0.29, where ``int(100 * 0.29)``
    is 28).  (The official TIES code keeps one entry more: its threshold is the
    ``(n − ⌊n·density⌋)``-th smallest magnitude.)

    >>> trim([torch.tensor([1., -4.]), torch.tensor([3., 2.])], 0.5)
    [tensor([ 0., -4.]), tensor([3., 0.])]
    >>> int((trim([torch.arange(1., 101.)], 0.29)[0] != 0).sum())
    29
    """
    if density >= 1.0 or not vector:
        return [leaf.clone() for leaf in vector]
    common = torch.float32
    for leaf in vector:
        common = torch.promote_types(common, leaf.dtype)
    device = vector[0].device  # one threshold for a model spread over devices (cuda:0, cuda:1): found on the first
    magnitudes = nocast.cat([leaf.detach().abs().reshape(-1).to(device=device, dtype=common) for leaf in vector])
    count = magnitudes.numel()
    if count == 0:
        return [leaf.clone() for leaf in vector]
    keep = kept(count, density)
    if keep == 0:
        return [torch.zeros_like(leaf) for leaf in vector]
    threshold = magnitudes.kthvalue(count - keep + 1).values
    return [torch.where(leaf.abs().to(common) >= threshold.to(leaf.device), leaf, torch.zeros_like(leaf))
            for leaf in vector]


def _trim_each(vector: Sequence[Tensor], density: float, size: Optional[int]) -> list[Tensor]:
    """``trim``, or for a Swarm's stacked ``[P, ...]`` leaves ``trim`` of each member's entries on their own."""
    if size is None:
        return trim(vector, density)
    return per_member(lambda leaves: trim(leaves, density), size, vector)


@torch.no_grad()
def ties(base: M, finetuned: Sequence[Any], /, *, density: float = 0.2, scale: Union[float, Tensor] = 1.0) -> M:
    """TIES-merging: ``base + λ·τ_m`` with ``τ_m`` the sign-elected disjoint mean of trimmed task vectors.

    Yadav, Tam, Choshen, Raffel, Bansal: "TIES-Merging: Resolving Interference When
    Merging Models" (NeurIPS 2023).  With task vectors ``τₜ = θₜ − θ_base``:

    1. trim: keep the top ``density`` fraction of each ``τₜ``'s entries by magnitude (over
       the whole model, as the official code does; see ``trim``), zero the rest: ``τ̂ₜ``;
    2. elect: ``γ = sign(Σₜ τ̂ₜ)`` per entry;
    3. disjoint mean: ``τ_m = Σₜ [τ̂ₜ·γ > 0]·τ̂ₜ / max(1, Σₜ [τ̂ₜ·γ > 0])`` (entries where
       ``γ = 0`` get 0);

    then ``θ = θ_base + λ·τ_m``.

    Args:
        base: the pre-trained model (a model, Particle or dict of tensors), or a ``Swarm``:
            then ``finetuned`` are Swarms of as many members and each member is merged on its
            own (trimmed over its own entries), exactly as a loop of per-member calls.
        finetuned: models fine-tuned from ``base`` (or a ``Swarm`` of them).
        density: the fraction ``k`` of each task vector kept, in (0, 1] (paper: 0.2).
        scale: ``λ``, the scale of the merged task vector, a number or 0-dim tensor (paper: chosen
            on validation data; 1 here).

    Returns:
        A new value of ``base``'s kind; buffers and integer leaves come from ``base``.

    Raises:
        StructureError: a model differs from ``base``.
        ValueError: ``density`` outside (0, 1].
        TypeError: a complex parameter (signs are undefined), ``scale`` is not a number, or a model
            is of another class than ``base`` (or a Swarm meets a model).

    >>> import torch
    >>> base = {"w": torch.zeros(3)}
    >>> a, b = {"w": torch.tensor([1., -2., 3.])}, {"w": torch.tensor([3., 1., -1.])}
    >>> ties(base, [a, b], density=1.0)["w"]
    tensor([ 2., -2.,  3.])
    """
    keep = _density(density)
    start, read, picked = read_tasks("ties", base, finetuned)
    for index in picked:
        if start.leaves[index].is_complex():
            raise TypeError(f"ties: parameter {start.names[index]!r} is complex; TIES needs real signs")
    if isinstance(scale, Tensor) and scale.dim() == 0:
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"ties: expected scale to be a number, got {type(scale).__name__}")
    every = [True] * len(picked)
    size = members(start)
    trimmed = [_trim_each(deltas(start, model, picked), keep, size) for model in read]
    if not picked:
        return rebuild(start, add_scaled(start, picked, []))  # type: ignore[no-any-return]
    total = [leaf.clone() for leaf in trimmed[0]]
    for vector in trimmed[1:]:
        lw.apply_(lw.ADD, total, vector, active=every)
    signs = [torch.sign(leaf) for leaf in total]
    merged = []
    for position, sign in enumerate(signs):
        numerator = torch.zeros_like(sign)
        count = torch.zeros_like(sign)
        for vector in trimmed:
            agree = vector[position] * sign > 0
            numerator += torch.where(agree, vector[position], torch.zeros_like(sign))
            count += agree.to(count.dtype)
        merged.append(numerator / count.clamp(min=1))
    return rebuild(start, add_scaled(start, picked, merged, float(scale)))  # type: ignore[no-any-return]
