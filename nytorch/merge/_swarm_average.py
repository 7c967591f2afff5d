"""``merge.average`` of a Swarm's members, read straight from its flat ``[P, width]`` buffers.

A list of models is averaged as a running mean, one fused ``lerp`` pass per model; a Swarm's
members already sit as the rows of one buffer per group, so each run of averaged leaves in a
group is one matrix-vector product instead: ``ŵ @ X``, where ``X`` holds the rows of the members
of positive weight (members of weight 0 are left out, not multiplied by 0: ``0·inf`` is NaN) and
``ŵ`` their weights divided by their sum (so the sum cannot overflow where the mean does not).
That product is IEEE arithmetic already (equal infinities stay, ``+inf`` with ``-inf`` is NaN, NaN
propagates).  What the running mean keeps besides, that every member holding one finite value
gives exactly that value, is restored by clamping to the column's ``[min, max]`` wherever the
product lands within rounding of the first member's value or is not finite (a few columns,
usually; their min and max are the only second read).  Float16 and bfloat16 are summed in
float32 and rounded once; complex values are averaged as their real and imaginary parts.
Scratch memory (rows of weight 0 left out, float32 copies of 2-byte floats) is made a bounded
number of columns at a time (``CHUNK`` values).
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

import torch

from .. import _nocast as nocast
from ._ieee import _WIDER

if TYPE_CHECKING:
    from .._swarm import Swarm

Tensor = torch.Tensor

__all__ = ["runs", "mean_of_rows", "swarm_mean"]

#: Values (rows x columns) of scratch per step: the differences ``X − x_r`` of one block of columns.
CHUNK = 1 << 22


def runs(slots: Sequence[tuple[int, int, int]]) -> dict[int, list[tuple[int, int]]]:
    """The column ranges ``(start, stop)`` per group that hold the given ``(group, start, stop)`` slots,
    adjacent ones merged (ranges of width 0 dropped).

    Args:
        slots: where each averaged leaf lives, as ``spec.slots`` gives it (group, start, stop).

    Returns:
        ``{group: [(start, stop), ...]}``, ranges in column order.

    >>> runs([(0, 0, 4), (0, 4, 6), (1, 0, 3), (0, 9, 10), (0, 6, 6)])
    {0: [(0, 6), (9, 10)], 1: [(0, 3)]}
    """
    found: dict[int, list[tuple[int, int]]] = {}
    for group, start, stop in sorted(slots):
        if stop <= start:
            continue
        ranges = found.setdefault(group, [])
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], stop)
        else:
            ranges.append((start, stop))
    return found


def _checkable(tensor: Tensor) -> bool:
    """True when ``tensor`` has values to look at (not meta, not a ``FakeTensor`` or other subclass)."""
    return type(tensor) is Tensor and not tensor.is_meta


@torch.no_grad()
def mean_of_rows(block: Tensor, rows: Optional[Tensor], weights: Tensor) -> Tensor:
    """``Σ ŵᵢ·block[rows[i]]`` over the columns of a real ``[P, n]`` block, in IEEE arithmetic.

    A column whose selected rows all hold one finite value gives exactly that value; every
    result lies within the column's ``[min, max]``.

    Args:
        block: ``[P, n]`` floating values (a view of a swarm's flat buffer is fine; it is not written).
        rows: the rows taking part (``None``: every row, in order).
        weights: one positive weight per row taking part, summing to one, in the accumulation
            dtype (float32 for float16/bfloat16 blocks, else the block's).

    Returns:
        A new ``[n]`` tensor of ``block``'s dtype.

    >>> inf = float("inf")
    >>> block = torch.tensor([[1., inf, inf, 0.1], [3., inf, -inf, 0.1], [7., 7., 7., 7.]])
    >>> mean = mean_of_rows(block, torch.tensor([0, 1]), torch.tensor([0.5, 0.5]))
    >>> mean, bool(mean[3] == block[0, 3])
    (tensor([2.0000, inf, nan, 0.1000]), True)
    """
    wide = weights.dtype
    picked = block if rows is None else block.index_select(0, rows)
    picked = picked.to(wide)
    mean = weights @ picked
    if not _checkable(mean):
        return mean.to(block.dtype)
    # within rounding of the first row (a column of equal values, perhaps) or not finite: clamp
    finfo = torch.finfo(wide)
    slack = (2 * picked.shape[0] + 4) * finfo.eps
    first = picked[0]
    check = (mean - first).abs_().le_(first.abs() * slack + finfo.tiny * slack / finfo.eps)
    check.logical_or_(mean.isfinite().logical_not_())
    columns = check.nonzero().squeeze(1)
    if columns.numel():
        if 2 * columns.numel() > mean.numel():  # most columns: reduce the block as it is, no copy
            low, high = picked.amin(0)[columns], picked.amax(0)[columns]
        else:
            some = picked.index_select(1, columns)
            low, high = some.amin(0), some.amax(0)
        mean[columns] = torch.clamp(mean[columns], low, high)
    return mean.to(block.dtype)


@torch.no_grad()
def swarm_mean(swarm: Swarm, indices: Sequence[int], weights: Sequence[float]) -> list[Tensor]:
    """The weighted mean over a swarm's members of leaves ``indices`` (positions in ``spec.names``).

    Args:
        swarm: a non-empty Swarm.
        indices: the floating or complex leaves to average (parameters and buffers alike).
        weights: one non-negative weight per member with a positive sum; members of weight 0 take no part.

    Returns:
        One new tensor per index, shaped like the member's leaf; leaves of one group are views
        into one fresh buffer per run of adjacent leaves.

    >>> from nytorch import Swarm
    >>> s = Swarm.stack([torch.nn.Linear(2, 1) for _ in range(3)])
    >>> bias, = swarm_mean(s, [1], [1.0, 0.0, 3.0])
    >>> torch.allclose(bias, (s.params["bias"][0] + 3 * s.params["bias"][2]) / 4)
    True
    """
    spec, flats = swarm._spec, swarm._flats
    given = torch.tensor(weights, dtype=torch.float64)
    positive = given.gt(0.0).nonzero().squeeze(1)
    normalised = given[positive] / given[positive].sum()
    every = len(positive) == len(weights)
    slots = [spec.slots[index] for index in indices]
    ranges = runs([(slot.group, slot.start, slot.stop) for slot in slots])
    values: dict[int, list[Tensor]] = {}  # per group, the mean of each of its runs
    for group, spans in ranges.items():
        flat = flats[group]
        pairs = flat.is_complex()  # real and imaginary parts side by side: [P, 2 * width]
        real = torch.view_as_real(flat).flatten(1) if pairs else flat
        scale = 2 if pairs else 1
        cast = normalised.to(device=flat.device, dtype=_WIDER.get(real.dtype, real.dtype))
        rows = None if every else positive.to(flat.device)
        step = max(1, CHUNK // len(positive))
        means: list[Tensor] = []
        with nocast.off([flat]):  # autocast would run the products in bf16/fp16
            for start, stop in spans:
                if len(positive) == 1:  # one member: a copy, as the list path gives
                    means.append(flat[int(positive[0]), start:stop].clone())
                    continue
                parts = [mean_of_rows(real[:, left:min(left + step, scale * stop)], rows, cast)
                         for left in range(scale * start, scale * stop, step)]
                mean = parts[0] if len(parts) == 1 else torch.cat(parts)
                means.append(torch.view_as_complex(mean.view(-1, 2)) if pairs else mean)
        values[group] = means
    out = []
    for slot in slots:
        flat = flats[slot.group]
        if slot.stop <= slot.start:  # an empty leaf: nothing to average
            out.append(torch.empty(slot.shape, dtype=flat.dtype, device=flat.device))
            continue
        spans = ranges[slot.group]
        run = bisect.bisect_right(spans, (slot.start, float("inf"))) - 1
        start = spans[run][0]
        out.append(values[slot.group][run][slot.start - start:slot.stop - start].view(slot.shape))
    return out
