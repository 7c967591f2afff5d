"""Averages of N models: uniform (SWA, uniform soup), weighted, and greedy soup.

An average of a list of models is a running mean built from the engine's fused ``lerp_``:
``mean_k = lerp(mean_{k-1}, x_k, w_k / (w_1 + … + w_k))``, one pass per model.  Where that
leaves inf or NaN (an input is inf or NaN: ``lerp`` of two equal infinities is NaN), the
IEEE value of ``Σ wᵢ·xᵢ / Σ wᵢ`` is put instead (``_ieee.mean_exactly``).  An average of a
Swarm is read from its flat ``[P, width]`` buffers, one weighted sum per group of averaged
leaves (``_swarm_average``), with the same semantics.  Buffers inside a
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
from ._swarm_average import swarm_mean

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
        if members:
            return [read_member(fn, member, index, buffers=buffers, argument=argument)
                    for index, member in enumerate(members)]
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


def read_member(fn: str, member: Particle, index: int, *, buffers: bool, argument: str = "models") -> Operand:
    """Read a Swarm's member ``index`` (a Particle, ``swarm[index]``) as ``read_all`` reads each.

    A member's own buffers (BatchNorm statistics) live in its layout when the swarm leaves them out
    of arithmetic: with ``buffers`` they are read after its parameters, as for a model or a Swarm,
    so that a merge averages (or copies) them too.  Its leaves are then aligned with the swarm's
    ``spec.names``.
    """
    label = f"{argument}[{index}]"
    if buffers and not member._with_buffers and member._layout.buffers:
        read = operand(fn, member, buffers=False, argument=label)
        return read._replace(names=read.names + list(member._layout.buffer_names),
                             leaves=read.leaves + list(member._layout.buffers))
    return operand(fn, member, buffers=buffers, argument=label)


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


def _plain_weights(weights: Union[Tensor, np.ndarray], count: int) -> Optional[list[float]]:
    """``count`` valid weights as floats, checked as one array (a swarm may have thousands), or
    ``None`` where one is not a finite non-negative real, the count or the sum is wrong: then
    ``_weights`` checks them one by one and says which.

    >>> _plain_weights(torch.tensor([1, 3]), 2), _plain_weights(np.array([1.0, -1.0]), 2)
    ([1.0, 3.0], None)
    """
    if isinstance(weights, Tensor):
        if weights.is_complex() or weights.dtype == torch.bool:
            return None
        values = weights.detach().to(device="cpu", dtype=torch.float64)
    elif weights.dtype.kind in "iuf":
        values = torch.from_numpy(np.asarray(weights, dtype=np.float64))
    else:
        return None
    if len(values) != count or not bool(((values >= 0) & (values < float("inf"))).all()) or \
            not float(values.sum()) > 0.0:
        return None
    return values.tolist()  # type: ignore[no-any-return]


def _weights(fn: str, weights: Any, count: int) -> list[float]:
    """One float per model from a sequence of numbers or 0-dim tensors, a 1-D tensor or a 1-D numpy array."""
    if weights is None:
        return [1.0] * count
    if isinstance(weights, (Tensor, np.ndarray)):
        if weights.ndim != 1:
            raise ValueError(f"{fn}: expected weights to be 1-D, got shape {tuple(weights.shape)}")
        plain = _plain_weights(weights, count)
        if plain is not None:
            return plain
        weights = weights.tolist()  # one device sync for a tensor, not one per weight
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != count:
        size = len(weights) if isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)) \
            else type(weights).__name__
        raise ValueError(f"{fn}: expected {count} weights (one per model), got {size}")
    values = [_weight(fn, index, weight) for index, weight in enumerate(weights)]
    if not sum(values) > 0.0:
        raise ValueError(f"{fn}: expected the weights to have a positive sum, got {values}")
    return values


def averaged_leaves(first: Operand, buffers: BufferMode) -> list[int]:
    """The positions of ``first``'s leaves an average computes: arithmetic parameters, and with
    ``buffers="average"`` floating buffers outside a parametrization (the rest are carried).

    >>> read = operand("demo", torch.nn.BatchNorm1d(2), buffers=True)
    >>> [read.names[i] for i in averaged_leaves(read, "average")], averaged_leaves(read, "copy")
    (['weight', 'bias', 'running_mean', 'running_var'], [0, 1])
    """
    inside = parametrization_buffers(first) if buffers == "average" else frozenset()
    return [
        index for index in range(len(first.leaves))
        if first.active(index) and (index < first.params or (buffers == "average" and index not in inside))
    ]


@torch.no_grad()
def mean_leaves(read: Sequence[Operand], weights: Sequence[float], buffers: BufferMode) -> list[Tensor]:
    """The weighted mean of aligned operands' arithmetic leaves; other leaves cloned from the first.

    Models of weight 0 take no part.  The mean is ``lerp``'s running mean where that is finite and
    the IEEE value of ``Σ wᵢ·xᵢ / Σ wᵢ`` elsewhere (equal infinities stay, ``+inf`` with ``-inf`` is
    NaN, NaN propagates).  Buffers inside a parametrization (``parametrization_buffers``) are
    cloned from the first model, as integer ones are.
    """
    first = read[0]
    averaged = averaged_leaves(first, buffers)
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
    Computed as a running mean with one fused ``lerp_`` per model, or for a Swarm as one weighted
    sum over its flat buffers per dtype (members of weight 0 left out; a few kernels whatever P,
    float16/bfloat16 summed in float32; equal to the loop's mean up to rounding); wherever a model
    holds inf or NaN the result is IEEE's ``Σ wᵢ·xᵢ / Σ wᵢ`` (equal infinities stay, ``+inf`` with
    ``-inf`` is NaN, NaN propagates; models of weight 0 take no part), and a value every model
    shares is kept exactly.  For BatchNorm,
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
    if is_swarm(models):
        return _average_swarm(models, weights, buffers)
    read = read_all("average", models, buffers=True)
    values = _weights("average", weights, len(read))
    return rebuild(read[0], mean_leaves(read, values, buffers))  # type: ignore[no-any-return]


def _average_swarm(swarm: Swarm, weights: Optional[Weights], buffers: BufferMode) -> Particle:
    """``average`` of a Swarm's members from its flat buffers (``swarm_mean``); the rest as for a list.

    Leaves left out of the average (integer buffers, parametrization state, non-operational
    parameters, buffers with ``"copy"``/``"keep"``) are member 0's, as ``mean_leaves`` carries them.
    """
    if not len(swarm):
        raise TypeError("average: expected a non-empty sequence of models or Particles as models, got an empty Swarm")
    first = read_member("average", swarm[0], 0, buffers=True)
    values = _weights("average", weights, len(swarm))
    averaged = averaged_leaves(first, buffers)
    means = dict(zip(averaged, swarm_mean(swarm, averaged, values)))
    return rebuild(first, [means[index] if index in means else carry(first, index)  # type: ignore[no-any-return]
                           for index in range(len(first.leaves))])  # type: ignore[no-any-return]


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
