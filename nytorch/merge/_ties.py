"""TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint mean of task vectors."""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

from .. import _leafwise as lw
from ._state import rebuild
from ._task import add_scaled, deltas, read_tasks

Tensor = torch.Tensor
M = TypeVar("M")

__all__ = ["ties", "trim"]


def _density(density: object) -> float:
    if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0.0 < float(density) <= 1.0:
        raise ValueError(f"ties: expected density to be a fraction in (0, 1], got {density!r}")
    return float(density)


def trim(vector: Sequence[Tensor], density: float) -> list[Tensor]:
    """Zero all but the top-``density`` fraction of entries by magnitude, over all tensors together.

    Keeps the ``⌊n·density⌋`` entries of largest magnitude among the ``n`` entries of all
    tensors (more only on exact ties at the threshold).  (The official TIES code keeps one
    entry more: its threshold is the ``(n − ⌊n·density⌋)``-th smallest magnitude.)

    >>> trim([torch.tensor([1., -4.]), torch.tensor([3., 2.])], 0.5)
    [tensor([ 0., -4.]), tensor([3., 0.])]
    """
    if density >= 1.0 or not vector:
        return [leaf.clone() for leaf in vector]
    common = torch.float32
    for leaf in vector:
        common = torch.promote_types(common, leaf.dtype)
    magnitudes = torch.cat([leaf.detach().abs().reshape(-1).to(common) for leaf in vector])
    count = magnitudes.numel()
    if count == 0:
        return [leaf.clone() for leaf in vector]
    kept = int(count * density)
    if kept == 0:
        return [torch.zeros_like(leaf) for leaf in vector]
    threshold = magnitudes.kthvalue(count - kept + 1).values
    return [torch.where(leaf.abs().to(common) >= threshold, leaf, torch.zeros_like(leaf)) for leaf in vector]


@torch.no_grad()
def ties(base: M, finetuned: Sequence[Any], /, *, density: float = 0.2, scale: float = 1.0) -> M:
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
        base: the pre-trained model (a model, Particle or dict of tensors).
        finetuned: models fine-tuned from ``base`` (or a ``Swarm``).
        density: the fraction ``k`` of each task vector kept, in (0, 1] (paper: 0.2).
        scale: ``λ``, the scale of the merged task vector (paper: chosen on validation data; 1 here).

    Returns:
        A new value of ``base``'s kind; buffers and integer leaves come from ``base``.

    Raises:
        StructureError: a model differs from ``base``.
        ValueError: ``density`` outside (0, 1].
        TypeError: a complex parameter (signs are undefined), or ``scale`` is not a number.

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
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"ties: expected scale to be a number, got {type(scale).__name__}")
    every = [True] * len(picked)
    trimmed = [trim(deltas(start, model, picked), keep) for model in read]
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
