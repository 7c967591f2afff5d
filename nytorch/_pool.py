"""Output buffers of results that nobody can see any more, reused by the next result of the same plan.

A CPU result block of a few MiB is fresh memory from the C allocator, and every
first write to a fresh page faults: for a model of tens of MB the faults can cost
more than the arithmetic (``benchmarks/RESULTS.md``).  CUDA has its own caching
allocator; on the CPU, nytorch keeps the buffers of results that died unseen (a
pending NytoModule result never built, a Particle whose leaves were never taken)
and writes the next result of the same plan into them.  A buffer is kept only when
nothing but its owner refers to it: no view, no other Python reference.  At most
``POOL_BYTES`` are held.

>>> from nytorch._flat import plan_for
>>> plan = plan_for([(torch.Size([1 << 20]), torch.float32, torch.device("cpu"))], [True])
>>> give(plan, [torch.zeros(1 << 20)])
>>> [buffer.shape for buffer in take(plan)]
[torch.Size([1048576])]
>>> take(plan) is None
True
"""
from __future__ import annotations

import os
import sys
import threading
from typing import Optional

import torch

from ._flat import FlatPlan

Tensor = torch.Tensor

__all__ = ["POOL_BYTES", "PER_PLAN", "MIN_BYTES", "give", "take", "clear", "held_bytes", "set_result_pool"]

#: The most bytes of dead results' buffers kept for reuse (CPU).  ``0`` turns the pool off.
POOL_BYTES = 64 << 20
#: The most dead results kept per plan: ``0.9 * (a - b) + a`` in a loop needs two.
PER_PLAN = 2
#: Smaller results are left to the allocator: its small blocks are reused without faults, and
#: checking who holds a buffer would cost more than allocating it.
MIN_BYTES = 256 << 10

_FREE: dict[FlatPlan, list[list[Tensor]]] = {}
_HELD = [0]
# Reentrant: ``give`` runs from ``__del__``, which the garbage collector may call inside ``take``.
_LOCK = threading.RLock()


def _after_fork() -> None:
    """A forked child gets a lock of its own: another thread of the parent may have held this one."""
    global _LOCK
    _LOCK = threading.RLock()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork)


def _users(buffers: list[Tensor]) -> list[tuple[int, int, int]]:
    """Per buffer: its Python references, the users of its storage and the users of the tensor itself.

    The tensor's users count autograd's saved tensors and DLPack exports, which hold no Python
    reference; the storage's count views.
    """
    return [(sys.getrefcount(buffer), torch._C._storage_Use_Count(buffer.untyped_storage()._cdata),
             buffer._use_count()) for buffer in buffers]  # type: ignore[attr-defined]


# What an unshared buffer shows, measured once with the same call ``give`` makes.
_ALONE = _users([torch.empty(1)])[0]


def give(plan: FlatPlan, buffers: list[Tensor]) -> None:
    """Keep ``buffers`` (a dead result's, laid out by ``plan``) for reuse, when nobody else can see them.

    Buffers that are not on the CPU, that anything else refers to (a view, another Python
    reference, autograd), in shared memory (sent to another process, which may still read them:
    torch moves what it sends there), inference tensors (made under ``torch.inference_mode()``), tensor
    subclasses (``FakeTensor``s made under ``FakeTensorMode``) or larger than ``POOL_BYTES``
    are left to the allocator. When the pool is full, the buffers of the structures given
    longest ago are dropped to make room: those of structures no longer in use go first.
    """
    size = plan.nbytes
    if size < MIN_BYTES or not buffers or buffers[0].device.type != "cpu" or len(buffers) != len(plan.totals):
        return
    kept = _FREE.get(plan)
    if size > POOL_BYTES or (kept is not None and len(kept) >= PER_PLAN):
        return
    references, storage_users, tensor_users = _ALONE
    for (mine, storage, tensor), buffer in zip(_users(buffers), buffers):
        if (mine > references or storage > storage_users or tensor > tensor_users
                or buffer.requires_grad or buffer.storage_offset() != 0
                or buffer.is_inference()  # made under inference_mode: a later result could never be trained
                or buffer.is_shared()  # sent to another process (a Queue, a DataLoader worker): still read there
                or type(buffer) is not Tensor):  # made under a TorchDispatchMode (a FakeTensor): not real memory
            return
    with _LOCK:
        kept = _FREE.get(plan)
        if size > POOL_BYTES or (kept is not None and len(kept) >= PER_PLAN):
            return
        _make_room(size, plan)
        # to the end of the order: the structures given to longest ago go first when the pool is full
        kept = _FREE.pop(plan, None) or []
        kept.append(list(buffers))
        _FREE[plan] = kept
        _HELD[0] += size


def _make_room(size: int, plan: FlatPlan) -> None:
    """Drop the buffers of the structures given longest ago until ``size`` more bytes fit (lock held).

    ``_FREE`` is in the order structures were last given to: an architecture search's dead
    structures come first, a structure in use last.
    """
    while _HELD[0] + size > POOL_BYTES:
        oldest = next((other for other in _FREE if other is not plan), None)
        if oldest is None:
            return
        _HELD[0] -= oldest.nbytes * len(_FREE.pop(oldest))


def take(plan: FlatPlan) -> Optional[list[Tensor]]:
    """Buffers laid out by ``plan`` to write a result into, or ``None`` when the pool has none."""
    if plan.nbytes < MIN_BYTES:
        return None
    if not _FREE.get(plan):
        return None
    with _LOCK:
        sets = _FREE.get(plan)
        if not sets:
            return None
        buffers = sets.pop()
        if not sets:
            del _FREE[plan]  # no structure stays referenced here once its buffers are gone
        _HELD[0] -= plan.nbytes
    return buffers


def clear() -> None:
    """Hand every kept buffer back to the allocator.

    >>> clear(); held_bytes()
    0
    """
    with _LOCK:
        _FREE.clear()
        _HELD[0] = 0


def held_bytes() -> int:
    """Bytes the pool holds now."""
    return _HELD[0]


def set_result_pool(max_bytes: int) -> int:
    """Set how many bytes of dead results' CPU buffers nytorch keeps for reuse; returns the old limit.

    Results of operations on packed models (NytoModule operators, Particles) are written into
    the buffers of results that died unseen, instead of fresh memory whose pages fault in.  The
    pool keeps at most two dead results per structure, of at least 256 KiB each, and at most
    ``max_bytes`` in all (64 MiB by default); when it is full, the structures given to longest ago
    make room for a new one.  ``0`` turns it off and frees what it holds.

    Args:
        max_bytes: the new limit, in bytes (a non-negative int).

    Returns:
        The previous limit.

    Raises:
        TypeError: ``max_bytes`` is not an int.
        ValueError: ``max_bytes`` is negative.

    >>> import nytorch
    >>> old = nytorch.set_result_pool(0)  # off: every result gets fresh memory
    >>> nytorch.set_result_pool(old)
    0
    """
    global POOL_BYTES
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
        raise TypeError(f"set_result_pool: expected an int as max_bytes, got {type(max_bytes).__name__}")
    if max_bytes < 0:
        raise ValueError(f"set_result_pool: max_bytes must be >= 0, got {max_bytes}")
    old, POOL_BYTES = POOL_BYTES, max_bytes
    if _HELD[0] > max_bytes:
        clear()
    return old
