"""Averages of N models: uniform (SWA, uniform soup), weighted, and greedy soup.

Every average is a running mean built from the engine's fused ``lerp_``:
``mean_k = lerp(mean_{k-1}, x_k, w_k / (w_1 + … + w_k))``, one pass per model.  Where that
leaves inf or NaN (an input is inf or NaN: ``lerp`` of two equal infinities is NaN), the
IEEE value of ``Σ wᵢ·xᵢ / Σ wᵢ`` is put instead (``_ieee.mean_exactly``).  Buffers inside a
``torch.nn.utils.parametrize`` parametrization are copied from the first model, never averaged.
"""
from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, TypeVar, Union, overload

import numpy as np
import torch

from .. import _leafwise as lw
from ..algorithms._progress import progress, progress_flag
from ._ieee import mean_exactly
from ._state import (BufferMode, Operand, carry, check_buffers, is_swarm, matched, operand, parametrization_buffers,
                     rebuild)

if TYPE_CHECKING:
    from .._particle import Particle
    from .._swarm import Swarm

Tensor = torch.Tensor
M = TypeVar("M")
#: What ``average(weights=...)`` takes: numbers or 0-dim tensors, a 1-D tensor or a 1-D numpy array.
Weights = Union[Sequence[Union[float, Tensor]], Tensor, np.ndarray]

__all__ = ["average", "greedy_soup", "Soup", "read_all"]


def read_all(fn: str, models: Union[Sequence[Any], Swarm], *, buffers: bool,
             argument: str = "models") -> list[Operand]:
    """Read every model and check each has the first one's structure (messages say "model i")."""
    if is_swarm(models):
        members = models.unstack()
        if buffers and members and not members[0]._with_buffers and members[0]._layout.buffers:
            # a member's own buffers (BatchNorm statistics) live in its layout: read them after its
            # parameters, as for a model or a Swarm, so the merge averages (or copies) them too
            read = [operand(fn, member, buffers=False, argument=f"{argument}[{index}]")
                    for index, member in enumerate(members)]
            return [op._replace(names=op.names + list(member._layout.buffer_names),
                                leaves=op.leaves + list(member._layout.buffers))
                    for op, member in zip(read, members)]
        models = members
    if isinstance(models, (str, bytes)) or not isinstance(models, Sequence) or not len(models):
        got = f"an empty {type(models).__name__}" if isinstance(models, Sequence) else type(models).__name__
        raise TypeError(f"{fn}: expected a non-empty sequence of models or Particles as {argument}, got {got}")
    first = operand(fn, models[0], buffers=buffers, argument=f"{argument}[0]")
    read = [first]
    for index, model in enumerate(models[1:], start=1):
        other = operand(fn, model, buffers=buffers, argument=f"{argument}[{index}]")
        other = matched(fn, first, other, f"{argument}[{index}]", reference=f"{argument}[0]")
        read.append(other)
    return read


def _weight(fn: str, index: int, weight: object) -> float:
    if isinstance(weight, Tensor):
        if weight.dim() != 0 or weight.is_complex() or weight.dtype == torch.bool:
            raise TypeError(f"{fn}: expected weights[{index}] to be a number or a 0-dim real tensor, got a "
                             f"{str(weight.dtype).removeprefix('torch.')} tensor of shape {tuple(weight.shape)}")
        weight = weight.item()
    if isinstance(weight, (bool, np.bool_)) or not isinstance(weight, numbers.Real):
        raise TypeError(f"{fn}: expected weights[{index}] to be a number, got {type(weight).__name__}")
    value = float(weight)
    if not 0.0 <= value < float("inf"):
        raise ValueError(f"{fn}: expected weights >= 0, got weights[{index}] = {weight!r}")
    return value


def _weights(fn: str, weights: Any, count: int) -> list[float]:
    """One float per model from a sequence of numbers or 0-dim tensors, a 1-D tensor or a 1-D numpy array."""
    if weights is None:
        return [1.0] * count
    if isinstance(weights, (Tensor, np.ndarray)):
        if weights.ndim != 1:
            raise ValueError(f"{fn}: expected weights to be 1-D, got shape {tuple(weights.shape)}")
        weights = weights.tolist()  # one device sync for a tensor, not one per weight
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != count:
        size = len(weights) if isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)) \
            else type(weights).__name__
        raise ValueError(f"{fn}: expected {count} weights (one per model), got {size}")
    values = [_weight(fn, index, weight) for index, weight in enumerate(weights)]
    if not sum(values) > 0.0:
        raise ValueError(f"{fn}: expected the weights to have a positive sum, got {values}")
    return values


@torch.no_grad()
def mean_leaves(read: Sequence[Operand], weights: Sequence[float], buffers: BufferMode) -> list[Tensor]:
    """The weighted mean of aligned operands' arithmetic leaves; other leaves cloned from the first.

    Models of weight 0 take no part.  The mean is ``lerp``'s running mean where that is finite and
    the IEEE value of ``Σ wᵢ·xᵢ / Σ wᵢ`` elsewhere (equal infinities stay, ``+inf`` with ``-inf`` is
    NaN, NaN propagates).  Buffers inside a parametrization (``parametrization_buffers``) are
    cloned from the first model, as integer ones are.
    """
    first = read[0]
    inside = parametrization_buffers(first) if buffers == "average" else frozenset()
    averaged = [
        index for index in range(len(first.leaves))
        if first.active(index) and (index < first.params or (buffers == "average" and index not in inside))
    ]
    chosen = set(averaged)
    out = [leaf if index in chosen else carry(first, index) for index, leaf in enumerate(first.leaves)]
    if not averaged:
        return out
    order = [k for k, weight in enumerate(weights) if weight > 0.0]
    every = [True] * len(averaged)
    start, total = order[0], weights[order[0]]
    if len(order) == 1:
        ends = [read[start].leaves[i].detach().clone() for i in averaged]
    else:  # the first step out of place: no separate copy pass
        second = order[1]
        total += weights[second]
        ends = lw.apply(lw.LERP, [read[start].leaves[i] for i in averaged],
                        [read[second].leaves[i] for i in averaged], weights[second] / total, active=every)
    for k in order[2:]:
        total += weights[k]
        lw.apply_(lw.LERP, ends, [read[k].leaves[i] for i in averaged], weights[k] / total, active=every)
    if len(order) > 1:
        mean_exactly(ends, [[read[k].leaves[i] for i in averaged] for k in order], [weights[k] for k in order])
    for index, value in zip(averaged, ends):
        out[index] = value
    return out


@overload
def average(models: Swarm, /, *, weights: Optional[Weights] = None, buffers: BufferMode = "average") -> Particle: ...
@overload
def average(models: Sequence[M], /, *, weights: Optional[Weights] = None, buffers: BufferMode = "average") -> M: ...


def average(models: Union[Sequence[M], Swarm], /, *, weights: Optional[Weights] = None,
            buffers: BufferMode = "average") -> Union[M, Particle]:
    """``Σ wᵢ·modelᵢ / Σ wᵢ``: uniform average (SWA, uniform model soup) or weighted average.

    Uniform soups are Wortsman et al. 2022, "Model soups: averaging weights of multiple
    fine-tuned models improves accuracy without increasing inference time" (ICML).
    Computed as a running mean with one fused ``lerp_`` per model; wherever a model holds inf or
    NaN the result is IEEE's ``Σ wᵢ·xᵢ / Σ wᵢ`` (equal infinities stay, ``+inf`` with ``-inf`` is
    NaN, NaN propagates; models of weight 0 take no part).  For BatchNorm,
    either average the statistics (``buffers="average"``) or recompute them on data:
    ``update_bn(average(models), loader)``.

    Args:
        models: models (``nn.Module``/``NytoModule``), Particles or dicts of tensors of one
            structure, or a ``Swarm`` (its members).
        weights: one non-negative weight per model (normalised to sum to one): a sequence of
            numbers or 0-dim tensors, a 1-D tensor or a 1-D numpy array; default uniform.
        buffers: ``"average"`` floating buffers (integer ones such as ``num_batches_tracked``,
            and those inside a ``torch.nn.utils.parametrize`` parametrization such as
            ``orthogonal``'s ``base`` or ``spectral_norm``'s ``_u`` / ``_v``, come from the first
            model), or ``"copy"``/``"keep"`` all buffers from the first model.

    Returns:
        A new value of the first model's kind (a fresh model of its class; a Particle for a Swarm).

    Raises:
        StructureError: a model differs from the first (names the model and the parameter).
        ValueError: bad weights (count, shape, a negative or infinite one, a zero sum) or ``buffers``.
        TypeError: ``models`` is empty or not a sequence, a weight is not a number, or the models
            are of two classes or mix a Swarm and a model (merges combine models of one class).

    >>> import torch
    >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    >>> soup = average([a, b], weights=[3, 1])
    >>> torch.allclose(soup.weight, (3 * a.weight + b.weight) / 4)
    True
    """
    check_buffers("average", buffers)
    read = read_all("average", models, buffers=True)
    values = _weights("average", weights, len(read))
    return rebuild(read[0], mean_leaves(read, values, buffers))  # type: ignore[no-any-return]


class Soup(NamedTuple):
    """What ``greedy_soup`` found: the soup, the indices of its ingredients (in order added), its score.

    Attributes:
        model: the soup, a new value of the first model's kind.
        ingredients: the indices in ``models`` of the models averaged into it, in the order added
            (the best-scoring model first).
        score: ``evaluate(model)`` as a float.

    >>> import torch
    >>> models = [torch.nn.Linear(1, 1) for _ in range(2)]
    >>> soup, ingredients, score = greedy_soup(models, lambda m: 1.0)   # nothing beats the first
    >>> ingredients, score, type(soup).__name__
    ([0], 1.0, 'Linear')
    """

    model: Any
    ingredients: list[int]
    score: float


def _score(fn: str, evaluate: Callable[[Any], Any], model: Any) -> float:
    value = evaluate(model)
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: expected evaluate to return a number (higher is better), got {type(value).__name__}")
    return float(value)


def greedy_soup(models: Union[Sequence[Any], Swarm], evaluate: Callable[[Any], Any], /, *,
                buffers: BufferMode = "average", show_progress: Optional[bool] = None) -> Soup:
    """Greedy soup (Wortsman et al. 2022, Algorithm 1): add a model only if the evaluation improves.

    Models are ranked by ``evaluate`` (higher is better); starting from the best one, each
    next model joins the soup only if the uniform average with it scores strictly higher
    than the soup without it (the paper keeps ties; here an ingredient must help).  To
    recompute BatchNorm statistics for each candidate, evaluate with
    ``lambda m: accuracy(update_bn(m, loader))``: the soup returned is the very object
    that was evaluated, so the recomputed statistics stay in it.  One Swarm is the
    collection of its members; a list of Swarms is souped as whole Swarms (``evaluate``
    scores each Swarm, and every member gets the same ingredients), so for one soup per
    member loop over the members instead.

    Args:
        models: models, Particles or dicts of tensors of one structure (or a ``Swarm``).
        evaluate: ``model -> float`` on held-out data (e.g. validation accuracy).
        buffers: as in ``average``.
        show_progress: tqdm bars over the evaluations, one while ranking the models and one while
            souping (``None``: only when stderr is a terminal and tqdm is installed).

    Returns:
        ``Soup(model, ingredients, score)``: the soup (a new value of the first model's kind),
        the indices of the models in it in the order they were added, and its score.

    Raises:
        StructureError: a model differs from the first (names the model and the parameter).
        TypeError: ``evaluate`` does not return a number, or the models are of two classes or mix a
            Swarm and a model, or ``show_progress`` is not ``True``, ``False`` or ``None``.

    >>> import torch
    >>> models = [torch.nn.Linear(1, 1) for _ in range(3)]
    >>> soup = greedy_soup(models, lambda m: -float(m.bias.detach().abs().sum()))
    >>> soup.ingredients[0] == max(range(3), key=lambda i: -float(models[i].bias.detach().abs()))
    True
    """
    check_buffers("greedy_soup", buffers)
    show_progress = progress_flag("greedy_soup", show_progress)
    read = read_all("greedy_soup", models, buffers=True)
    members = models.unstack() if is_swarm(models) else models
    scores = [_score("greedy_soup", evaluate, model)
              for model in progress(members, desc="greedy_soup: ranking", enabled=show_progress)]
    order = sorted(range(len(read)), key=lambda i: -scores[i])
    kept = [order[0]]
    soup = rebuild(read[order[0]], mean_leaves([read[order[0]]], [1.0], buffers))
    best = _score("greedy_soup", evaluate, soup)
    for index in progress(order[1:], desc="greedy_soup: souping", enabled=show_progress):
        chosen = [read[i] for i in kept + [index]]
        candidate = rebuild(read[0], mean_leaves(chosen, [1.0] * len(chosen), buffers))
        score = _score("greedy_soup", evaluate, candidate)
        if score > best:
            kept.append(index)
            soup, best = candidate, score
    return Soup(soup, kept, best)
