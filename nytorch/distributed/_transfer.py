"""How every collective starts and moves its buffers: the arguments checked, the handshake run, buffers sent.

``begin`` resolves the group, reads the value as flat buffers (``_flat.flat_of``) and runs the
structure handshake (``_fingerprint.handshake``), carrying any argument error so that every rank
raises it in the same call.  ``pipeline`` and ``moved`` send buffers piece by piece, so that
packing a piece overlaps the transfer of the previous one.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any, Optional, TypeVar

import torch

from ._comm import Comm, Timeout, connect, seconds_of
from ._fingerprint import handshake
from ._flat import Flat, Piece, flat_of, restore_, wire

Tensor = torch.Tensor
T = TypeVar("T")

__all__ = ["int_arg", "begin", "send_buffers", "pipeline", "moved"]


def int_arg(fn: str, value: object, name: str, what: str) -> int:
    """``value`` as an int (Python, NumPy or 0-dim integer tensor; not bool) that fits the handshake header."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{fn}: expected {what} as {name}, got {type(value).__name__}")
    number = operator.index(value)  # type: ignore[arg-type]
    if not -2**63 <= number < 2**63:
        raise ValueError(f"{fn}: expected {name} to fit in 64 bits, got {number}")
    return number


def begin(fn: str, x: object, group: Any, timeout: Timeout, *, arg: Callable[[], int] = lambda: 0,
           check: Optional[Callable[[Comm, Flat], tuple[float, int]]] = None,
           overlap: Optional[Callable[[Comm, Flat], T]] = None, error: Optional[Exception] = None,
           in_place: bool = False) -> tuple[Comm, Flat, Tensor, Optional[T]]:
    """Resolve the group, check the arguments, read ``x`` and run the handshake.

    Argument errors (the timeout, ``arg()``, ``x``, ``check``, and for ``in_place`` calls a model holding
    inference tensors; or ``error``, found by the caller) are not
    raised here but sent in the handshake, so that every rank raises the same error in this call and
    no rank's next collective pairs with another rank's current one.  A rank with a bad timeout uses
    the group's own for the handshake.  ``overlap(comm, flat)`` runs while the headers travel
    (packing into scratch buffers, never into the model); its result is returned.
    """
    try:
        seconds = seconds_of(fn, timeout)
    except (TypeError, ValueError) as caught:
        seconds, error = None, error or caught
    try:
        comm = connect(fn, group, seconds)
    except (RuntimeError, ValueError):
        if error is not None:  # no group to tell: the argument error is the one to fix first
            raise error from None
        raise
    flat: Optional[Flat] = None
    number, value, index = 0, 0.0, 0
    if error is None:
        try:
            number = arg()
            flat = flat_of(fn, x)
            inference = flat.inference() if in_place and not torch.is_inference_mode_enabled() else None
            if inference is not None:
                raise RuntimeError(
                    f"{fn}: expected tensors that can be updated in place, got parameter {inference!r}, an inference "
                    "tensor (made under torch.inference_mode()); build the model outside inference mode, or pass "
                    "copy.deepcopy(model) (its copies are normal tensors)")
            if check is not None:
                value, index = check(comm, flat)
        except Exception as caught:  # noqa: BLE001 - raised on every rank by the handshake
            error, flat = caught, None
    local = None if flat is None or overlap is None or flat.meta() is not None else (
        lambda: overlap(comm, flat))  # type: ignore[arg-type]
    try:
        headers, prepared = handshake(comm, flat, fn, arg=number, value=value, index=index, error=error,
                                      overlap=local)
        if not (flat is not None):  # handshake raised otherwise
            raise RuntimeError("nytorch internal error: expected flat is not None")
        meta = flat.meta()
        if meta is not None:  # the structures agree, so every rank raises this
            raise ValueError(f"{fn}: parameter {meta!r} is on the meta device, which holds no values to send; "
                             "materialise the model first (e.g. model.to_empty(device=...) then load its weights)")
    except BaseException:
        if flat is not None:
            flat.release()
        raise
    return comm, flat, headers, prepared


def send_buffers(comm: Comm, flats: list[Tensor], *, reduce: bool = False) -> list[Tensor]:
    return [wire(flat, comm.device_for(flat.device), reduce=reduce) for flat in flats]


def pipeline(comm: Comm, flats: Sequence[Optional[Tensor]], pieces: Sequence[Piece],
              start: Callable[[list[Tensor], str], Callable[[], None]], what: str, *, reduce: bool = False,
              pack: Optional[Callable[[int, Piece], None]] = None, meanwhile: Optional[Callable[[], None]] = None,
              ) -> list[tuple[Piece, Tensor, Tensor]]:
    """Per piece: ``pack(i, piece)`` then issue ``start`` on it; ``meanwhile()``; wait for all.

    Returns ``(piece, buffer view, wire tensor)`` for ``restore_``.  Empty pieces are skipped
    (alike on every rank: the structures agree).
    """
    waits: list[Callable[[], None]] = []
    sent: list[tuple[Piece, Tensor, Tensor]] = []
    for i, piece in enumerate(pieces):
        if pack is not None:
            pack(i, piece)
        flat = flats[piece.group]
        if not (flat is not None):  # an internal invariant
            raise RuntimeError("nytorch internal error: expected flat is not None")
        view = flat[:, piece.start:piece.stop]
        if not view.numel():
            continue
        tensor = wire(view, comm.device_for(view.device), reduce=reduce)
        waits.append(start([tensor], what))
        sent.append((piece, view, tensor))
    if meanwhile is not None:
        meanwhile()
    for wait in waits:
        wait()
    return sent


def moved(comm: Comm, flat: Flat, flats: list[Optional[Tensor]], root: int, what: str,
           pack: Optional[Callable[[int, Piece], None]] = None) -> None:
    """Broadcast ``flats`` in place from group rank ``root`` (the root may pack piece by piece)."""
    def start(tensors: list[Tensor], what: str) -> Callable[[], None]:
        return comm.broadcast_(tensors, root, what)
    for _, view, sent in pipeline(comm, flats, flat.pieces(), start, what, pack=pack):
        restore_(view, sent)
