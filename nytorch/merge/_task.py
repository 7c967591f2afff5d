"""Task vectors: ``task_vector``, task arithmetic (Ilharco et al. 2023) and DARE (Yu et al. 2023).

A task vector is ``finetuned − base`` over the floating, operational parameters;
buffers and integer leaves of a merge come from ``base``.  The arithmetic is the
leaf-wise engine's (``SUB``, ``MUL``, ``DIV``, ``ADD``; fused ``torch._foreach_*``).
"""
from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Any, Optional, TypeVar, Union

import numpy as np
import torch

from .. import _leafwise as lw
from .._swarm_build import generator_for
from ._state import Operand, carry, is_swarm, matched, members, operand, per_member, rebuild

Tensor = torch.Tensor
M = TypeVar("M")
Scale = Union[float, Tensor, Sequence[float]]

__all__ = ["task_vector", "task_arithmetic", "dare", "read_tasks", "deltas", "scales", "add_scaled"]


def read_tasks(fn: str, base: Any, finetuned: Sequence[Any], *, one: bool = False) -> tuple[Operand, list[Operand], list[int]]:
    """Read ``base`` and every fine-tuned model; return them and the indices of the merged leaves.

    ``one``: ``finetuned`` wraps a single model given as ``finetuned`` (messages name it so, not ``finetuned[0]``).
    """
    if is_swarm(finetuned):
        if is_swarm(base):
            raise TypeError(f"{fn}: expected a list of Swarms as finetuned when base is a Swarm (member i is "
                            "merged with member i of each), got one Swarm; pass [finetuned]")
        finetuned = finetuned.unstack()  # type: ignore[attr-defined]
    if isinstance(finetuned, (str, bytes)) or not isinstance(finetuned, Sequence) or not len(finetuned):
        raise TypeError(f"{fn}: expected a non-empty sequence of fine-tuned models as finetuned, "
                        f"got {type(finetuned).__name__}{' (empty)' if isinstance(finetuned, Sequence) else ''}")
    start = operand(fn, base, buffers=False, argument="base")
    read = []
    for index, model in enumerate(finetuned):
        label = "finetuned" if one else f"finetuned[{index}]"
        other = operand(fn, model, buffers=False, argument=label)
        other = matched(fn, start, other, label, reference="base")
        read.append(other)
    return start, read, [index for index in range(len(start.leaves)) if start.active(index)]


def scales(fn: str, scale: Any, count: int) -> list[float]:
    """One float per task from a number (a 0-dim tensor or array counts as one) or ``count`` numbers
    (a sequence, a 1-D tensor or a 1-D numpy array)."""
    if isinstance(scale, (Tensor, np.ndarray)) and scale.ndim == 0:
        scale = scale.item()
    many = isinstance(scale, (Sequence, Tensor, np.ndarray)) and not isinstance(scale, str)
    values = list(scale) if many else [scale] * count
    if len(values) != count:
        raise ValueError(f"{fn}: expected one scale per fine-tuned model ({count}), got {len(values)}")
    for index, value in enumerate(values):
        if isinstance(value, Tensor) and value.numel() == 1:
            value = values[index] = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{fn}: expected scale to be a number or a sequence of numbers, "
                            f"got {type(value).__name__}")
    return [float(value) for value in values]


def deltas(start: Operand, model: Operand, picked: Sequence[int]) -> list[Tensor]:
    """``model − start`` on the picked leaves (fresh tensors)."""
    return lw.apply(lw.SUB, [model.leaves[i] for i in picked], [start.leaves[i] for i in picked],
                    active=[True] * len(picked))


def add_scaled(start: Operand, picked: Sequence[int], vectors: Sequence[Tensor], scale: float = 1.0) -> list[Tensor]:
    """Leaves of ``start`` with ``scale · vectors`` added on the picked leaves (all others cloned)."""
    out = [carry(start, index) for index in range(len(start.leaves))]
    if picked:
        every = [True] * len(picked)
        if scale != 1.0:
            lw.apply_(lw.MUL, list(vectors), scale, active=every)
        lw.apply_(lw.ADD, [out[i] for i in picked], list(vectors), active=every)
    return out


@torch.no_grad()
def task_vector(finetuned: M, base: Any, /) -> M:
    """``finetuned − base``: the task vector of Ilharco et al. 2023, as a value of ``finetuned``'s kind.

    Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt, Hajishirzi, Farhadi: "Editing models
    with task arithmetic" (ICLR 2023).

    Args:
        finetuned: the fine-tuned model, Particle, Swarm or dict of tensors.
        base: the model it was fine-tuned from, of the same structure (a Swarm when ``finetuned``
            is one: then member by member).

    Returns:
        A new value of ``finetuned``'s kind holding ``finetuned − base`` in its floating,
        operational parameters; integer leaves, non-operational parameters and buffers are
        carried from ``finetuned``.

    Raises:
        StructureError: the models differ (names the parameter).
        TypeError: an operand is not a model, Particle, Swarm or dict of tensors, the models are of
            two classes, or one is a Swarm and the other not.

    >>> import torch
    >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    >>> torch.allclose(task_vector(a, b).weight, a.weight - b.weight)
    True
    """
    start, (end,), picked = read_tasks("task_vector", base, [finetuned], one=True)
    out = [carry(end, index) for index in range(len(end.leaves))]
    for index, value in zip(picked, deltas(start, end, picked)):
        out[index] = value
    return rebuild(end, out)  # type: ignore[no-any-return]


@torch.no_grad()
def task_arithmetic(base: M, finetuned: Sequence[Any], /, *, scale: Scale = 1.0) -> M:
    """``base + Σᵢ λᵢ·(finetunedᵢ − base)``: task arithmetic (Ilharco et al. 2023).

    Ilharco et al., "Editing models with task arithmetic" (ICLR 2023): adding task
    vectors ``τᵢ = θᵢ − θ_base`` scaled by ``λ`` merges skills (negative ``λ`` forgets).

    Args:
        base: the pre-trained model (a model, Particle or dict of tensors), or a ``Swarm``:
            then ``finetuned`` are Swarms of as many members, merged member by member.
        finetuned: models fine-tuned from ``base`` (or a ``Swarm`` of them).
        scale: ``λ``, one number (or 0-dim tensor) for all, or one per model (a sequence,
            a 1-D tensor or a 1-D numpy array).

    Returns:
        A new value of ``base``'s kind; buffers and integer leaves come from ``base``.

    Raises:
        StructureError: a model differs from ``base`` (names the model and parameter).
        ValueError / TypeError: bad ``scale`` or ``finetuned``.
        TypeError: a model is of another class than ``base``, or a Swarm meets a model.

    >>> import torch
    >>> base, a, b = (torch.nn.Linear(2, 1) for _ in range(3))
    >>> merged = task_arithmetic(base, [a, b], scale=0.5)
    >>> expected = base.bias + 0.5 * (a.bias - base.bias) + 0.5 * (b.bias - base.bias)
    >>> torch.allclose(merged.bias, expected)
    True
    """
    start, read, picked = read_tasks("task_arithmetic", base, finetuned)
    lambdas = scales("task_arithmetic", scale, len(read))
    total: list[Tensor] = []
    for model, weight in zip(read, lambdas):
        vector = deltas(start, model, picked)
        if not picked:
            break
        total = _accumulate(total, vector, weight)
    return rebuild(start, add_scaled(start, picked, total))  # type: ignore[no-any-return]


def _accumulate(total: list[Tensor], vector: list[Tensor], weight: float) -> list[Tensor]:
    """``total + weight * vector``, written into ``vector`` and ``total`` in place (``vector`` when empty)."""
    every = [True] * len(vector)
    lw.apply_(lw.MUL, vector, weight, active=every)
    if not total:
        return vector
    lw.apply_(lw.ADD, total, vector, active=every)
    return total


def _probability(fn: str, drop: object) -> float:
    if isinstance(drop, bool) or not isinstance(drop, numbers.Real):
        raise TypeError(f"{fn}: expected drop to be a real number, got {type(drop).__name__}")
    if not 0.0 <= float(drop) < 1.0:
        raise ValueError(f"{fn}: expected drop to be a probability in [0, 1), got {drop!r}")
    return float(drop)


def _uniform(leaf: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    dtype = torch.float64 if leaf.dtype == torch.float64 else torch.float32
    return torch.rand(leaf.shape, generator=generator, dtype=dtype, device=leaf.device)


@torch.no_grad()
def dare(base: M, finetuned: Sequence[Any], /, *, drop: float = 0.9, scale: Scale = 1.0,
         generator: Optional[torch.Generator] = None) -> M:
    """DARE (Yu et al. 2023): drop each task-vector entry with probability ``p``, rescale, then add.

    Yu, Yu, Yu, Huang, Li: "Language Models are Super Mario: Absorbing Abilities from
    Homologous Models as a Free Lunch" (2023).  For each model,
    ``τ̃ᵢ = mᵢ ⊙ (θᵢ − θ_base) / (1 − p)`` with ``mᵢ ~ Bernoulli(1 − p)`` elementwise,
    then ``base + Σᵢ λᵢ·τ̃ᵢ``.  An entry is kept when ``u >= p`` for ``u = torch.rand(shape)``
    (float32; float64 for float64 parameters) drawn per tensor, model by model, in
    parameter order, so a seeded ``generator`` reproduces the masks.

    Args:
        base: the pre-trained model, or a ``Swarm``: then ``finetuned`` are Swarms of as many
            members and each member is merged on its own; masks are drawn member by member, so
            a seeded ``generator`` gives exactly what a loop of per-member calls gives.
        finetuned: models fine-tuned from ``base`` (or a ``Swarm`` of them).
        drop: ``p``, the drop probability in [0, 1) (the paper uses up to 0.9 and beyond).
        scale: ``λ``, one number (or 0-dim tensor) or one per model (as in ``task_arithmetic``).
        generator: a ``torch.Generator`` for reproducible masks (default: the global RNG).

    Returns:
        A new value of ``base``'s kind; buffers and integer leaves come from ``base``.

    Raises:
        StructureError: a model differs from ``base``.
        ValueError: ``drop`` outside [0, 1), or ``generator`` on another device type than a merged
            parameter (``torch.rand`` draws each mask on its parameter's device).
        TypeError: a model is of another class than ``base``, or a Swarm meets a model; ``drop`` is not
            a real number, or ``generator`` not a ``torch.Generator``.

    >>> import torch
    >>> base, a = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    >>> same = dare(base, [a], drop=0.0)
    >>> torch.allclose(same.weight, a.weight)
    True
    """
    p = _probability("dare", drop)
    generator = generator_for("dare", generator)
    start, read, picked = read_tasks("dare", base, finetuned)
    lambdas = scales("dare", scale, len(read))
    # meta leaves hold no values: torch.rand draws nothing there and takes any generator
    wrong = [i for i in picked if generator is not None
             and start.leaves[i].device.type not in (generator.device.type, "meta")]
    if wrong and generator is not None:  # masks are drawn on each parameter's device (torch.rand's rule)
        raise ValueError(f"dare: expected a generator on {start.leaves[wrong[0]].device.type} (where base's "
                         f"{start.names[wrong[0]]!r} lives), got one on {generator.device}; "
                         "create it there (torch.Generator(device=...)) or pass none")
    total: list[Tensor] = []
    if not picked:
        return rebuild(start, add_scaled(start, picked, total))  # type: ignore[no-any-return]
    size = members(start)
    vectors: Iterable[list[Tensor]] = (deltas(start, model, picked) for model in read)
    if size is not None:  # a Swarm: masks drawn member by member, as a loop of per-member calls draws them
        vectors = list(vectors)
        stacked = iter(_member_masks(vectors, p, generator, size))
    every = [True] * len(picked)
    for vector, weight in zip(vectors, lambdas):
        masks = _masks(vector, p, generator) if size is None else next(stacked)
        lw.apply_(lw.MUL, vector, masks, active=every)
        lw.apply_(lw.DIV, vector, 1.0 - p, active=every)
        total = _accumulate(total, vector, weight)
    return rebuild(start, add_scaled(start, picked, total))  # type: ignore[no-any-return]


def _masks(vector: Sequence[Tensor], p: float, generator: Optional[torch.Generator]) -> list[Tensor]:
    """DARE's keep masks ``u >= p`` for one task vector, drawn tensor by tensor."""
    return [(_uniform(leaf, generator) >= p).to(leaf.dtype) for leaf in vector]


def _member_masks(vectors: Sequence[Sequence[Tensor]], p: float, generator: Optional[torch.Generator],
                  size: int) -> list[list[Tensor]]:
    """Stacked ``[P, ...]`` masks per task vector, drawn member by member, then model by model, then tensor."""
    flat = per_member(lambda *member: [mask for leaves in member for mask in _masks(leaves, p, generator)],
                      size, *vectors)
    starts = [0]
    for vector in vectors:
        starts.append(starts[-1] + len(vector))
    return [flat[start:stop] for start, stop in zip(starts, starts[1:])]
