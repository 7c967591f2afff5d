"""Timed collectives on flat tensors over one process group, and the error they raise.

Every call here issues its work on the ``ProcessGroup`` object itself with the
timeout in the op's options (gloo then cancels the op after the timeout and closes
the connection, so nothing is left blocked behind it) and also bounds the wait
(NCCL and other backends).  Any failure on the wire becomes a ``PeerError``.

Measured with gloo in torch 2.13: a peer that dies makes the survivors' pending op
fail at once ("Connection closed by peer"); a peer that hangs makes it fail after
the op's timeout; ``work.wait(timeout)`` alone raises in time but leaves the op
running in gloo's worker thread, so later ops queue behind it.  ``monitored_barrier``
names the missing rank but costs one more round trip per call, so it is not used.

The backend gets fresh aliases of our tensors, tracked in ``_HELD`` so that interpreter
exit waits until gloo's threads have let go of them (otherwise a rank exiting right
after a collective can abort; see there).
"""
from __future__ import annotations

import atexit
import datetime
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.distributed as dist

Tensor = torch.Tensor
#: Seconds (a number) or a ``timedelta``; ``None`` uses the process group's own timeout.
Timeout = Union[float, int, datetime.timedelta, None]

__all__ = ["PeerError", "Timeout", "MAX_SECONDS", "Comm", "seconds_of", "connect", "resolve"]

#: The longest wait a call uses (about 31.7 years): longer finite timeouts (``1e15``,
#: ``timedelta.max``) are capped to it.  The backends count a deadline in int64 nanoseconds of a
#: clock that may start at the epoch, and ``timedelta`` tops out at 999999999 days, so a longer
#: wait is not representable everywhere; no call waits that long in practice.
MAX_SECONDS = 1e9

#: Tensors handed to the backend whose references it may still hold, with their reference count
#: (``Tensor._use_count``) from before.  gloo's worker thread drops its references to a work's
#: tensors a moment *after* the work completes, and in torch 2.13 dropping a C++ reference to a
#: tensor that has a Python object takes the GIL.  If that moment falls into interpreter shutdown
#: the process aborts ("terminate called without an active exception"), which happens when a rank
#: exits right after a collective: importing ``torch._dynamo`` (``torch.func`` does) keeps the
#: default process group, and so its threads, alive past ``destroy_process_group``.  So at exit we
#: wait (briefly, with the GIL released) until the backend has let go of every such tensor.
_HELD: list[tuple[Tensor, int]] = []


def _held(tensors: list[Tensor]) -> list[Tensor]:
    """Fresh aliases of ``tensors`` (same memory) for the backend, remembered in ``_HELD`` (see there).

    Nothing but the backend ever references an alias, so its count returns to where it was
    exactly when the backend has let go.
    """
    aliases = [tensor.view(tensor.shape) for tensor in tensors]
    _HELD.extend((alias, _count(alias)) for alias in aliases)
    return aliases


def _count(tensor: Tensor) -> int:
    """How many C++ references the tensor has (``Tensor._use_count``, absent from the type stubs)."""
    return int(tensor._use_count())  # type: ignore[attr-defined]


def _prune() -> None:
    """Forget the tensors the backend has let go of."""
    _HELD[:] = [(tensor, count) for tensor, count in _HELD if _count(tensor) > count]


def _drain_at_exit(limit: float = 2.0) -> None:
    """At exit, give the backend's threads up to ``limit`` seconds to let go of our tensors (see ``_HELD``)."""
    deadline = time.monotonic() + limit
    _prune()
    while _HELD and time.monotonic() < deadline:
        time.sleep(0.001)  # releases the GIL the worker thread needs
        _prune()


atexit.register(_drain_at_exit)


class PeerError(RuntimeError):
    """A collective failed on the wire: a peer process died, hung past the timeout or dropped its connection.

    The process group cannot be trusted afterwards: let the process exit (or
    destroy the group and start a new one).  The original error is chained as
    ``__cause__``.

    >>> issubclass(PeerError, RuntimeError)
    True
    """


def seconds_of(fn: str, timeout: Timeout) -> Optional[float]:
    """``timeout`` in seconds (``None`` stays ``None``: the group's own timeout), at most ``MAX_SECONDS``
    (a longer finite timeout is capped to it: it means "wait as long as can be said").

    Raises:
        TypeError: the timeout is neither a number (Python, NumPy or a 0-dim real tensor), a ``timedelta``
            nor ``None``.
        ValueError: it is not positive and finite.

    >>> seconds_of("demo", datetime.timedelta(minutes=1)), seconds_of("demo", None)
    (60.0, None)
    >>> seconds_of("demo", 0)
    Traceback (most recent call last):
    ValueError: demo: expected a positive, finite timeout, got 0
    >>> seconds_of("demo", 1e15) == seconds_of("demo", datetime.timedelta.max) == MAX_SECONDS
    True
    """
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, (int, float, np.integer, np.floating)) and not isinstance(timeout, (bool, np.bool_)):
        seconds = float(timeout)  # NumPy numbers are numbers like any other
    elif isinstance(timeout, torch.Tensor) and timeout.dim() == 0 and not timeout.is_complex() \
            and timeout.dtype != torch.bool:
        seconds = float(timeout)
    else:
        raise TypeError(f"{fn}: expected timeout as seconds (a number), a datetime.timedelta or None, "
                        f"got {type(timeout).__name__}")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{fn}: expected a positive, finite timeout, got {timeout!r}")
    return min(seconds, MAX_SECONDS)


class Comm:
    """One call's view of a process group: who we are, the deadline, and timed collectives.

    Attributes:
        fn: the public function's name (for messages).
        group: the ``ProcessGroup``.
        rank / size: this process's rank in the group and the group's size.
        backend: the group's backend name (``"gloo"``, ``"nccl"``...).
        seconds: the timeout in seconds, ``None`` for the group's own.
    """

    def __init__(self, fn: str, group: Any, seconds: Optional[float]) -> None:
        self.fn = fn
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.seconds = seconds
        self._deadline = None if seconds is None else time.monotonic() + seconds

    # -- ranks and devices -----------------------------------------------------------------
    def global_rank(self, group_rank: int) -> int:
        """The global rank of ``group_rank`` in this group (what messages name: the API speaks global ranks)."""
        if self.group is dist.group.WORLD:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def group_rank(self, global_rank: int) -> int:
        """The rank in this group of global rank ``global_rank`` (``ValueError`` if it is not a member)."""
        if self.group is dist.group.WORLD:
            if not 0 <= global_rank < self.size:
                raise ValueError(f"{self.fn}: expected a rank in [0, {self.size}), got {global_rank}")
            return global_rank
        ranks = dist.get_process_group_ranks(self.group)
        if global_rank not in ranks:
            raise ValueError(f"{self.fn}: global rank {global_rank} is not in the process group "
                             f"(its ranks are {ranks})")
        return ranks.index(global_rank)

    def device_for(self, device: torch.device) -> torch.device:
        """Where a buffer on ``device`` must be to travel over this group's backend."""
        backend = self.backend.lower()
        if device.type == "cuda" and "nccl" in backend or device.type == "cpu" and "gloo" in backend:
            return device
        if "nccl" in backend and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if "gloo" in backend:
            return torch.device("cpu")
        return device

    # -- timing ----------------------------------------------------------------------------
    def _remaining(self) -> Optional[datetime.timedelta]:
        if self._deadline is None:
            return None
        left = max(self._deadline - time.monotonic(), 0.001)
        return datetime.timedelta(seconds=left)

    def _failed(self, what: str, error: RuntimeError) -> PeerError:
        limit = "the process group's timeout" if self.seconds is None else f"timeout={self.seconds:g}s"
        where = f"rank {self.global_rank(self.rank)} of {self.size}" if self.group is dist.group.WORLD else (
            f"rank {self.global_rank(self.rank)} (one of the group's {self.size})")
        return PeerError(
            f"{self.fn}: {what} failed on {where} ({limit}): a peer process "
            f"died, hung or closed its connection; the process group is unusable now (exit, or "
            f"destroy it and start again); check the other ranks' logs. Cause: {error}"
        )

    def _start(self, what: str, issue: Callable[[Optional[datetime.timedelta]], Sequence[Any]],
               *, timed_ops: bool = True) -> Callable[[], None]:
        """Issue works (with the time left); returns the wait.  Wire failures become ``PeerError``.

        ``timed_ops``: the works carry the timeout in their options.  gloo honours it
        (cancels the op), so its waits need no timeout of their own; a timed wait there
        would give up first and leave the op running.
        """
        left = self._remaining()
        own_timeout = timed_ops and self.backend.lower() == "gloo"
        try:
            works = issue(left)
        except RuntimeError as error:
            raise self._failed(what, error) from error

        def wait() -> None:
            try:
                for work in works:
                    if left is None or own_timeout:
                        work.wait()
                    else:
                        work.wait(self._remaining() or left)
            except RuntimeError as error:
                raise self._failed(what, error) from error
        return wait

    def _run(self, what: str, issue: Callable[[Optional[datetime.timedelta]], Sequence[Any]],
             *, timed_ops: bool = True) -> None:
        self._start(what, issue, timed_ops=timed_ops)()

    @staticmethod
    def _timed(options: Any, left: Optional[datetime.timedelta]) -> Any:
        if left is not None:
            options.timeout = left
        return options

    # -- collectives (tensors already on ``device_for`` devices, contiguous) ---------------
    def broadcast_(self, tensors: Sequence[Tensor], root: int, what: str) -> Callable[[], None]:
        """Issue an in-place broadcast of every tensor from group rank ``root`` (one op per tensor);
        returns the wait."""
        def issue(left: Optional[datetime.timedelta]) -> list[Any]:
            works = []
            for tensor in tensors:
                options = self._timed(dist.BroadcastOptions(), left)
                options.rootRank, options.rootTensor = root, 0
                works.append(self.group.broadcast(_held([tensor]), options))
            return works
        return self._start(what, issue)

    def all_reduce_sum_(self, tensors: Sequence[Tensor], what: str) -> Callable[[], None]:
        """Issue an in-place sum of every tensor across the group (one op per tensor); returns the wait."""
        def issue(left: Optional[datetime.timedelta]) -> list[Any]:
            works = []
            for tensor in tensors:
                options = self._timed(dist.AllreduceOptions(), left)
                options.reduceOp = dist.ReduceOp.SUM
                works.append(self.group.allreduce(_held([tensor]), options))
            return works
        return self._start(what, issue)

    def all_gather(self, tensors: Sequence[Tensor], what: str) -> list[Tensor]:
        """``[size, *t.shape]`` per tensor: every rank's copy, stacked in rank order."""
        outputs, wait = self.all_gather_start(tensors, what)
        wait()
        return outputs

    def all_gather_start(self, tensors: Sequence[Tensor], what: str) -> tuple[list[Tensor], Callable[[], None]]:
        """``all_gather`` issued: the outputs (filled once the returned wait has returned) and the wait."""
        from torch._C._distributed_c10d import AllgatherOptions  # here: builds without distributed still import us
        outputs = [torch.empty((self.size, *t.shape), dtype=t.dtype, device=t.device) for t in tensors]

        def issue(left: Optional[datetime.timedelta]) -> list[Any]:
            return [self.group.allgather([_held(list(out.unbind(0)))], _held([tensor]),
                                         self._timed(AllgatherOptions(), left))
                    for tensor, out in zip(tensors, outputs)]
        return outputs, self._start(what, issue)

    def send_recv(self, sends: list[Tensor], dst: int, receives: list[Tensor], src: int,
                  what: str) -> None:
        """Send ``sends`` to group rank ``dst`` while receiving ``receives`` from group rank ``src``.

        One ``batch_isend_irecv`` (NCCL groups it, so a ring of sends cannot deadlock); the
        waits carry the timeout (gloo then cancels the transfer).
        """
        to, source = self.global_rank(dst), self.global_rank(src)

        def issue(left: Optional[datetime.timedelta]) -> list[Any]:
            ops = [dist.P2POp(dist.isend, tensor, to, self.group, tag) for tag, tensor in enumerate(_held(sends))]
            ops += [dist.P2POp(dist.irecv, tensor, source, self.group, tag)
                    for tag, tensor in enumerate(_held(receives))]
            return list(dist.batch_isend_irecv(ops)) if ops else []
        self._run(what, issue, timed_ops=False)


def connect(fn: str, group: Any, seconds: Optional[float]) -> Comm:
    """A ``Comm`` for one call on ``group`` (``None``: the world) with a checked timeout in seconds.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
        TypeError: ``group`` is not a process group.
        ValueError: this process is not a member of ``group``.
    """
    _prune()
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{fn}: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group(...) first (torchrun sets the environment)")
    if group is None:
        group = dist.group.WORLD
    elif group is not dist.GroupMember.NON_GROUP_MEMBER and not isinstance(group, dist.ProcessGroup):
        # raised on this rank only: without a valid group there is no one to tell
        raise TypeError(f"{fn}: expected a process group (from torch.distributed.new_group) or None as group, "
                        f"got {type(group).__name__}")
    if group is dist.GroupMember.NON_GROUP_MEMBER or dist.get_rank(group) < 0:
        raise ValueError(f"{fn}: this process (global rank {dist.get_rank()}) is not a member of the given group")
    return Comm(fn, group, seconds)


def resolve(fn: str, group: Any, timeout: Timeout) -> Comm:
    """Check the timeout (``seconds_of``), then ``connect``: a bad timeout raises here, on this rank only.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
        ValueError: this process is not a member of ``group``, or the timeout is not positive.
        TypeError: the timeout is neither a number (Python, NumPy or a 0-dim real tensor), a ``timedelta``
            nor ``None``.
    """
    return connect(fn, group, seconds_of(fn, timeout))
