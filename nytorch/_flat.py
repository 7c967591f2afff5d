"""One contiguous buffer per (device, dtype): the storage that reaches the memory floor.

Leaf-wise arithmetic over N tensors costs N kernel launches and N allocations;
over one flat buffer holding the same values it is a single pass.  A ``FlatPlan``
says how the arithmetic leaves of a structure pack into such buffers; ``Flat``
holds the buffers of one value.  Leaves are views into them, made only when asked.
``find_flat`` recognises leaves that already are consecutive views of one buffer
(a model packed by ``_packing.pack_`` or ``flatten_``), so their arithmetic takes the one-pass path too.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from ._walk import Placement, placement

Tensor = torch.Tensor

__all__ = ["FlatPlan", "Flat", "plan_for", "find_flat", "written", "own_counters", "unshared", "chunks",
           "wraps_tensors"]


class FlatPlan:
    """How the ``active`` leaves of one signature pack into 1-D buffers, one per (device, dtype).

    On the CPU a (device, dtype) group larger than ``CHUNK_BYTES`` is cut into runs of
    consecutive leaves, one buffer each (see ``CHUNK_BYTES``).

    Attributes:
        active: per leaf, whether it takes part in arithmetic (and so lives in a buffer).
        groups: per buffer, the leaf indices it holds, in leaf order.
        likes: per buffer, meta tensors with the leaves' shapes (to cut views in one C call).
        totals: per buffer, its number of elements.
    """

    __slots__ = ("active", "every", "groups", "likes", "totals", "dtypes", "devices", "floating", "nbytes")

    def __init__(self, signature: Sequence[tuple[torch.Size, torch.dtype, torch.device]],
                 active: Sequence[bool]) -> None:
        self.active = tuple(active)
        self.every = all(self.active)
        found: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, ((_, dtype, device), on) in enumerate(zip(signature, active)):
            if on:
                found.setdefault((device, dtype), []).append(i)
        self.groups, self.devices, self.dtypes = [], [], []
        for (device, dtype), index in found.items():
            for chunk in chunks(index, [signature[i][0].numel() * dtype.itemsize for i in index], device):
                self.groups.append(chunk)
                self.devices.append(device)
                self.dtypes.append(dtype)
        self.likes = [[torch.empty(signature[i][0], dtype=dtype, device="meta") for i in index]
                      for dtype, index in zip(self.dtypes, self.groups)]
        self.totals = [sum(like.numel() for like in likes) for likes in self.likes]
        self.floating = all(dtype.is_floating_point for dtype in self.dtypes)  # real numbers never change them
        self.nbytes = sum(total * dtype.itemsize for total, dtype in zip(self.totals, self.dtypes))


#: On the CPU, results are allocated in runs of leaves of at most this many bytes.  glibc
#: serves blocks above its mmap threshold (at most 32 MiB) with fresh pages every time, and
#: faulting 200 MB of pages in costs 4x the arithmetic; smaller blocks are reused from the heap.
#: Accelerators have caching allocators: one buffer per (device, dtype) there.
CHUNK_BYTES = 8 << 20


def chunks(index: list[int], sizes: list[int], device: torch.device) -> list[list[int]]:
    """``index`` cut into runs of at most ``CHUNK_BYTES`` (a larger leaf is a run of its own)."""
    if device.type != "cpu" or sum(sizes) <= CHUNK_BYTES:
        return [index]
    runs: list[list[int]] = [[]]
    filled = 0
    for i, size in zip(index, sizes):
        if runs[-1] and filled + size > CHUNK_BYTES:
            runs.append([])
            filled = 0
        runs[-1].append(i)
        filled += size
    return runs


def plan_for(signature: Sequence[tuple[torch.Size, torch.dtype, torch.device]],
             active: Sequence[bool]) -> FlatPlan:
    """The packing plan of a signature (see ``FlatPlan``), one object per (signature, active).

    Models of one structure then share their plan, and comparing plans is an identity check.

    >>> signature = [(torch.Size([2]), torch.float32, torch.device("cpu"))]
    >>> plan_for(signature, [True]) is plan_for(list(signature), (True,))
    True
    """
    key = (tuple(signature), tuple(active), CHUNK_BYTES)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= 256:  # a bound, not an LRU: structures are few in practice
            from . import _pool  # local: the pool depends on this module
            _PLANS.clear()
            _pool.clear()  # its buffers are filed under the plans dropped here, which no new result asks for
        plan = _PLANS[key] = FlatPlan(signature, active)
    return plan


_PLANS: dict[tuple, FlatPlan] = {}


class Flat:
    """A value held as flat buffers (its active leaves) plus its other leaves, kept as they are.

    >>> plan = plan_for([(torch.Size([2]), torch.float32, torch.device("cpu"))], [True])
    >>> Flat(plan, [torch.arange(2.)], {}).leaves()
    [tensor([0., 1.])]
    """

    __slots__ = ("plan", "raw", "rest", "placement", "scale", "shared", "owned")

    def __init__(self, plan: FlatPlan, buffers: list[Tensor], rest: dict[int, Tensor],
                 placement: Optional[Placement] = None, scale: float = 1.0, owned: bool = False) -> None:
        self.plan = plan
        self.raw = buffers  # the values are ``scale * raw`` (see ``buffers``)
        self.rest = rest  # inactive leaves by index
        self.placement = placement  # for views of someone else's storage: where every leaf was when found
        self.scale = scale  # a factor not applied yet (see ``scaled``)
        self.shared = False  # ``raw`` is shared with another Flat (``scaled``): copied before it is handed out
        self.owned = owned  # a result's own buffers, which no model or user holds: only those are scaled

    @property
    def buffers(self) -> list[Tensor]:
        """The buffers holding the values, this Flat's own: a pending factor is applied first.

        Everything but the fused sums of ``_kernels.compute`` reads values through here, so a
        pending factor never reaches code that does not know about it, and buffers shared by
        ``scaled`` are copied before anyone can write into them or take views of them.

        >>> plan = plan_for([(torch.Size([2]), torch.float32, torch.device("cpu"))], [True])
        >>> Flat(plan, [torch.arange(2.)], {}, owned=True).scaled(3.0, {}).buffers
        [tensor([0., 3.])]
        """
        if self.scale != 1.0 or self.shared:
            with torch.no_grad():
                scale = self.scale
                # multiplied by the same number as per-tensor arithmetic would: the same rounding
                self.raw = [buffer * scale for buffer in self.raw] if scale != 1.0 else [
                    buffer.clone() for buffer in self.raw]
            self.scale, self.shared = 1.0, False
        return self.raw

    def readable(self) -> list[Tensor]:
        """The buffers to read from (a kernel's inputs): a pending factor applied, shared ones not copied."""
        return self.raw if self.scale == 1.0 else self.buffers

    def scaled(self, factor: float, rest: dict[int, Tensor]) -> "Flat":
        """``factor`` times this value (``rest``: its inactive leaves), sharing the buffers: no pass yet.

        Callers scale only an ``owned`` Flat without a pending factor: reading the result then
        multiplies once, by the same number per-tensor arithmetic would, and a model's own
        buffers are never shared.
        """
        out = Flat(self.plan, list(self.raw), rest, None, factor, owned=True)  # its own list: see ``_pool``
        self.shared = out.shared = True
        return out

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
        return self.placement is None or placement(leaves) == self.placement


_PLAIN = (Tensor, nn.Parameter)


def wraps_tensors(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``__torch_dispatch__`` subclass (its data lives in tensors it wraps).

    Parameters and their plain subclasses are not (their data is their own storage).

    >>> wraps_tensors(torch.ones(1)), wraps_tensors(torch.nn.Parameter(torch.ones(1)))
    (False, False)
    """
    return type(tensor) not in _PLAIN and torch._C._dispatch_keys(tensor).has(torch._C.DispatchKey.Python)


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
    if not torch.is_inference_mode_enabled() and any(map(Tensor.is_inference, leaves)):
        return None  # no view of an inference tensor can be made here: the per-leaf path says what to do
    for index, total, likes, dtype in zip(plan.groups, plan.totals, plan.likes, plan.dtypes):
        # a zero-size leaf holds no memory (its views are fresh tensors, wherever they point): the first
        # leaf with values says where the buffer is
        first = next((leaves[i] for i in index if leaves[i].numel()), leaves[index[0]])
        if wraps_tensors(first):
            # refused in the loop too, but its address is read first: a FakeTensor has none (torch
            # deprecates reading it), so no Flat, and no placement to check on every call, holds one
            return None
        size = first.element_size()
        base = first.data_ptr() - first.storage_offset() * size
        offset = start = first.storage_offset()
        for i, like in zip(index, likes):
            leaf = leaves[i]
            # the shape and dtype too: leaves given other ones since the plan was made must not pass; and
            # no conjugate or negative view: one buffer has one such bit, which its other leaves would take
            if leaf.shape != like.shape or leaf.dtype != dtype or leaf.is_conj() or leaf.is_neg() \
                    or leaf.layout is not torch.strided or wraps_tensors(leaf):
                return None
            if not leaf.numel():
                continue
            if (not leaf.is_contiguous() or leaf.storage_offset() != offset
                    or leaf.data_ptr() - offset * size != base):
                return None
            offset += leaf.numel()
        buffers.append(first.detach().as_strided((total,), (1,), start))
    rest = {i: leaf for i, (leaf, on) in enumerate(zip(leaves, plan.active)) if not on}
    return Flat(plan, buffers, rest, placement(leaves))


def written(leaves: Sequence[Tensor], plan: Optional[FlatPlan] = None) -> None:
    """Tell autograd that ``leaves`` (the active ones of ``plan``, else all) changed in place.

    A packed model's Parameters view its buffers but keep version counters of their own
    (``param.data = view`` keeps them), so a write into the buffers bumps none of them.  A
    graph that saved one would then run backward on the new values, where PyTorch raises
    for any tensor modified in place after it was saved: bumping them keeps that error.

    >>> leaf = torch.zeros(2)
    >>> written([leaf]); leaf._version
    1
    """
    if plan is not None and not plan.every:
        leaves = [leaf for leaf, on in zip(leaves, plan.active) if on]
    torch.autograd.graph.increment_version(leaves)  # type: ignore[arg-type]


def own_counters(leaves: Sequence[Tensor], plan: FlatPlan) -> list[Tensor]:
    """The active ``leaves`` (views of the buffers) as tensors with version counters of their own.

    Views of one buffer share its counter, so an in-place step on one would mark all of them as
    modified for autograd; Parameters made from these do not (``tensor.data`` shares the storage,
    not the counter).  Writes into the buffer then have to tell them (``written``).

    >>> buffer = torch.zeros(4)
    >>> plan = plan_for([(torch.Size([2]), torch.float32, torch.device("cpu"))] * 2, [True, True])
    >>> views = own_counters(list(buffer.split(2)), plan)
    >>> _ = views[0].add_(1); views[1]._version, buffer.tolist()
    (0, [1.0, 1.0, 0.0, 0.0])
    """
    return [leaf.data if on else leaf for leaf, on in zip(leaves, plan.active)]


def unshared(leaves: Sequence[Tensor], buffers: Sequence[Tensor]) -> list[Tensor]:
    """The ``leaves`` whose version counter is none of ``buffers``': a write into the buffers misses them.

    Views of a buffer share its counter; a packed model's Parameters keep their own.  Found by
    bumping the buffers once and seeing who moved: to autograd that bump is a write, so callers
    probe only leaves nothing can have saved yet or that are about to be written (``merge.EMA``
    probes its averaged copy when it builds it, and again after the copy moved).

    >>> buffer = torch.zeros(4)
    >>> views, own = list(buffer.split(2)), torch.zeros(2)
    >>> [leaf is own for leaf in unshared(views + [own], [buffer])]
    [True]
    """
    before = [leaf._version for leaf in leaves]
    torch.autograd.graph.increment_version(buffers)  # type: ignore[arg-type]
    return [leaf for leaf, version in zip(leaves, before) if leaf._version == version]


