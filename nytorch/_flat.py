"""One contiguous buffer per (device, dtype): the storage that reaches the memory floor.

Leaf-wise arithmetic over N tensors costs N kernel launches and N allocations;
over one flat buffer holding the same values it is a single pass.  A ``FlatPlan``
says how the arithmetic leaves of a structure pack into such buffers; ``Flat``
holds the buffers of one value.  Leaves are views into them, made only when asked.
``find_flat`` recognises leaves that already are consecutive views of one buffer
(e.g. after ``flatten_(model)``), so their arithmetic takes the one-pass path too.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

Tensor = torch.Tensor

__all__ = ["FlatPlan", "Flat", "plan_for", "find_flat", "flatten_"]


class FlatPlan:
    """How the ``active`` leaves of one signature pack into one 1-D buffer per (device, dtype).

    Attributes:
        active: per leaf, whether it takes part in arithmetic (and so lives in a buffer).
        groups: per buffer, the leaf indices it holds, in leaf order.
        likes: per buffer, meta tensors with the leaves' shapes (to cut views in one C call).
        totals: per buffer, its number of elements.
    """

    __slots__ = ("active", "groups", "likes", "totals", "dtypes", "devices")

    def __init__(self, signature: Sequence[tuple[torch.Size, torch.dtype, torch.device]],
                 active: Sequence[bool]) -> None:
        self.active = tuple(active)
        found: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, ((_, dtype, device), on) in enumerate(zip(signature, active)):
            if on:
                found.setdefault((device, dtype), []).append(i)
        self.groups = list(found.values())
        self.devices = [device for device, _ in found]
        self.dtypes = [dtype for _, dtype in found]
        self.likes = [[torch.empty(signature[i][0], dtype=dtype, device="meta") for i in index]
                      for (_, dtype), index in zip(found, self.groups)]
        self.totals = [sum(like.numel() for like in likes) for likes in self.likes]


def plan_for(signature: Sequence[tuple[torch.Size, torch.dtype, torch.device]],
             active: Sequence[bool]) -> FlatPlan:
    """The packing plan of a signature (see ``FlatPlan``)."""
    return FlatPlan(signature, active)


class Flat:
    """A value held as flat buffers (its active leaves) plus its other leaves, kept as they are.

    >>> plan = plan_for([(torch.Size([2]), torch.float32, torch.device("cpu"))], [True])
    >>> Flat(plan, [torch.arange(2.)], {}).leaves()
    [tensor([0., 1.])]
    """

    __slots__ = ("plan", "buffers", "rest", "pointers")

    def __init__(self, plan: FlatPlan, buffers: list[Tensor], rest: dict[int, Tensor],
                 pointers: Optional[tuple[int, ...]] = None) -> None:
        self.plan = plan
        self.buffers = buffers
        self.rest = rest  # inactive leaves by index
        self.pointers = pointers  # for views of someone else's storage: data_ptr of every leaf when found

    def leaves(self) -> list[Tensor]:
        """Every leaf, active ones as views into the buffers."""
        out: list[Optional[Tensor]] = [None] * len(self.plan.active)
        for buffer, index, likes in zip(self.buffers, self.plan.groups, self.plan.likes):
            for i, view in zip(index, torch._C._nn.unflatten_dense_tensors(buffer, likes)):
                out[i] = view
        for i, leaf in self.rest.items():
            out[i] = leaf
        return out  # type: ignore[return-value]

    def still_views(self, leaves: Sequence[Tensor]) -> bool:
        """True while ``leaves`` still sit where they were found (no ``.data`` swap, no ``.to()``)."""
        return self.pointers is None or tuple(map(Tensor.data_ptr, leaves)) == self.pointers


def find_flat(plan: FlatPlan, leaves: Sequence[Tensor]) -> Optional[Flat]:
    """A ``Flat`` over ``leaves`` when each group's leaves are consecutive views of one buffer.

    >>> storage = torch.arange(6.)
    >>> leaves = [storage[:2].view(1, 2), storage[2:]]
    >>> signature = [(leaf.shape, leaf.dtype, leaf.device) for leaf in leaves]
    >>> found = find_flat(plan_for(signature, [True, True]), leaves)
    >>> found.buffers[0].data_ptr() == storage.data_ptr()
    True
    """
    buffers = []
    for index, total in zip(plan.groups, plan.totals):
        first = leaves[index[0]]
        size = first.element_size()
        base = first.data_ptr() - first.storage_offset() * size
        offset = start = first.storage_offset()
        for i in index:
            leaf = leaves[i]
            if (not leaf.is_contiguous() or leaf.storage_offset() != offset
                    or leaf.data_ptr() - offset * size != base):
                return None
            offset += leaf.numel()
        buffers.append(first.detach().as_strided((total,), (1,), start))
    rest = {i: leaf for i, (leaf, on) in enumerate(zip(leaves, plan.active)) if not on}
    return Flat(plan, buffers, rest, tuple(map(Tensor.data_ptr, leaves)))


@torch.no_grad()
def flatten_(module: nn.Module) -> nn.Module:
    """Move ``module``'s floating parameters into one contiguous buffer per (device, dtype), in place.

    Parameter objects are kept (optimizers holding them keep working); only their
    storage moves.  Afterwards every nytorch operation on the model (e.g. an EMA
    ``lerp_``) is one kernel over that buffer instead of one per tensor.

    Returns:
        ``module``.

    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> weight = net[0].weight
    >>> _ = flatten_(net)
    >>> net[0].weight is weight, net[1].bias.data_ptr() - net[0].weight.data_ptr()
    (True, 32)
    """
    from ._walk import layout_of  # local: _walk does not depend on this module

    params = layout_of(module).params
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for param in params:
        if param.is_floating_point() or param.is_complex():
            groups.setdefault((param.device, param.dtype), []).append(param)
    for members in groups.values():
        buffer = torch.cat([param.detach().reshape(-1) for param in members])
        views = torch._C._nn.unflatten_dense_tensors(buffer, [param.detach() for param in members])
        for param, view in zip(members, views):
            param.data = view
    return module
