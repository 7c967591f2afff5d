"""Averages that follow IEEE arithmetic where ``lerp`` does not: at infinities.

The merges average with ``torch.lerp`` (one fused pass; equal finite values stay exactly
equal), which computes ``a + w·(b − a)``: where ``a`` and ``b`` are the same infinity,
``b − a`` is NaN, although the weighted mean ``(1 − w)·a + w·b`` is that infinity (a
``-inf`` attention mask, a quantization observer's ``min_val = +inf`` before it has seen
data).  ``lerp`` leaves a non-finite value exactly where an input is inf or NaN (or where
``b − a`` overflows), and nowhere else, so the merges keep its result where it is finite
and put the IEEE value of the weighted mean where it is not:

* ``mean_exactly`` repairs a finished running mean (``merge.average``): it finds the leaves
  whose sum is not finite (one reduction per leaf, one device sync) and recomputes those;
* ``Exact`` repairs an in-place EMA step on floating buffers without a device sync: it
  computes the weighted mean of the buffers before the fused ``lerp_`` and picks it where
  ``lerp_`` left inf or NaN (a few kernels over the buffers, which are small, and none
  over the parameters).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch

Tensor = torch.Tensor
Weight = Union[float, Tensor]

__all__ = ["nonfinite", "weighted_mean", "mean_exactly", "Exact"]

#: Sums of 2-byte floats overflow at 65504 (float16): they are summed in float32 (complex64).
_WIDER = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.complex32: torch.complex64}


def nonfinite(leaves: Sequence[Tensor]) -> list[int]:
    """Positions of the leaves that hold inf or NaN (or whose sum overflows): one sync per device.

    Leaves without values (meta tensors, tensors made under ``FakeTensorMode``, other subclasses)
    are never listed.

    >>> nonfinite([torch.ones(2), torch.tensor([1., float("-inf")]), torch.tensor([float("nan")])])
    [1, 2]
    """
    by_device: dict[torch.device, list[tuple[int, Tensor]]] = {}
    for position, leaf in enumerate(leaves):
        if type(leaf) is Tensor and not leaf.is_meta and leaf.numel():
            by_device.setdefault(leaf.device, []).append((position, leaf.sum(dtype=_WIDER.get(leaf.dtype))))
    found: list[int] = []
    for sums in by_device.values():
        finite = torch.stack([total for _, total in sums]).isfinite().tolist()
        found.extend(position for (position, _), ok in zip(sums, finite) if not ok)
    return sorted(found)


def weighted_mean(terms: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``Σ (wᵢ / Σ w)·termsᵢ`` in IEEE arithmetic, term by term (equal infinities stay, ``inf − inf`` is NaN).

    >>> inf = float("inf")
    >>> weighted_mean([torch.tensor([-inf, inf, 1.]), torch.tensor([-inf, -inf, 3.])], [1.0, 1.0])
    tensor([-inf, nan, 2.])
    """
    total = sum(weights)
    out = terms[0].detach() * (weights[0] / total)
    for term, weight in zip(terms[1:], weights[1:]):
        out.add_(term.detach(), alpha=weight / total)
    return out


def mean_exactly(means: list[Tensor], terms: Sequence[Sequence[Tensor]], weights: Sequence[float]) -> None:
    """Where a running mean of ``lerp``s holds inf or NaN, put the IEEE weighted mean of the terms instead.

    Args:
        means: the means, one per leaf, written in place where they hold inf or NaN.
        terms: per model, its leaves aligned with ``means``.
        weights: per model, its (positive) weight.

    >>> inf = float("inf")
    >>> a, b = torch.tensor([-inf, 1., inf]), torch.tensor([-inf, 3., -inf])
    >>> mean = [torch.lerp(a, b, 0.5)]
    >>> mean_exactly(mean, [[a], [b]], [1.0, 1.0]); mean[0]
    tensor([-inf, 2., nan])
    """
    for position in nonfinite(means):
        mean = means[position]
        exact = weighted_mean([leaves[position] for leaves in terms], weights)
        torch.where(mean.isfinite(), mean, exact, out=mean)


class Exact:
    """An in-place ``lerp_(ends, starts, τ)`` made IEEE-exact where it would leave inf or NaN.

    Call ``before(τ)`` before the fused ``lerp_`` that writes ``ends`` (among other tensors), and
    ``after()`` once it ran: elements where an input was inf or NaN then hold
    ``(1 − τ)·end + τ·start`` as IEEE arithmetic gives it, the others ``lerp_``'s value.  Each
    (device, dtype) group of tensors is handled as one flat tensor (a tensor of its own, such as
    the tail of a packed buffer, as is), so the cost is a few kernels over the tensors' values and
    a few C++ loops over them, and no device sync.

    >>> inf = float("inf")
    >>> ends, starts = [torch.tensor([-inf, 0., inf]), torch.tensor([inf])], [torch.tensor([-inf, 4., 5.]), torch.tensor([inf])]
    >>> exact = Exact(ends, starts)
    >>> exact.before(0.25); _ = torch._foreach_lerp_(ends, starts, 0.25); exact.after()
    >>> ends
    [tensor([-inf, 1., inf]), tensor([inf])]
    """

    __slots__ = ("groups", "pending")

    def __init__(self, ends: Sequence[Tensor], starts: Sequence[Tensor]) -> None:
        found: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
        for end, start in zip(ends, starts):
            group = found.setdefault((end.device, end.dtype), ([], []))
            group[0].append(end)
            group[1].append(start)
        # per group: its tensors, and for several a flat scratch tensor with views shaped like them
        self.groups: list[tuple[list[Tensor], list[Tensor], list[Tensor]]] = []
        for (device, dtype), (group_ends, group_starts) in found.items():
            views: list[Tensor] = []
            if len(group_ends) > 1:
                scratch = torch.empty(sum(end.numel() for end in group_ends), dtype=dtype, device=device)
                views = [scratch, *torch._C._nn.unflatten_dense_tensors(scratch, group_ends)]
            self.groups.append((group_ends, group_starts, views))
        self.pending: list[Tensor] = []

    def before(self, tau: Weight) -> None:
        """Compute ``(1 − τ)·end + τ·start`` for every group (before ``ends`` are written)."""
        self.pending = []
        for ends, starts, views in self.groups:
            end, start = (ends[0], starts[0]) if not views else (
                torch._C._nn.flatten_dense_tensors(ends), torch._C._nn.flatten_dense_tensors(starts))
            if isinstance(tau, Tensor):
                self.pending.append(end * (1 - tau) + start * tau)
            else:
                self.pending.append(torch.add(end * (1.0 - tau), start, alpha=tau))

    def after(self) -> None:
        """Put the weighted means where the ``lerp_`` just run left inf or NaN."""
        for (ends, _, views), exact in zip(self.groups, self.pending):
            if not views:
                torch.where(ends[0].isfinite(), ends[0], exact, out=ends[0])
                continue
            scratch, parts = views[0], views[1:]
            torch._foreach_copy_(parts, ends)
            torch.where(scratch.isfinite(), scratch, exact, out=scratch)
            torch._foreach_copy_(ends, parts)
        self.pending = []
