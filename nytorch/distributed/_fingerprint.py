"""The handshake every collective starts with: compare a structure fingerprint across ranks first.

Each rank contributes one small header (a 64-bit hash of its leaves' names, shapes,
dtypes, device types and roles, which collective it is in and with which argument,
its member count, a few call-specific numbers, and whether its own arguments were
invalid) to one ``all_gather``.  Only when something differs do the ranks swap text:
their full descriptions, so that every rank raises the same ``StructureError`` naming
the first differing parameter, or the first invalid argument's message, so that every
rank raises that same error.  No parameter data moves before the handshake has passed,
and a call that raises on one rank raises on every rank, so no rank's next collective
can pair with another rank's current one.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, Optional, TypeVar

import torch

from .._errors import DeviceMismatchError, StructureError
from ._comm import Comm
from ._flat import Flat

Tensor = torch.Tensor
T = TypeVar("T")

__all__ = ["HASH", "OP", "ARG", "KIND", "SIZE", "VALUE", "INDEX", "ERROR", "fingerprint", "handshake",
           "first_difference", "shared_error"]

# Header fields.
HASH, OP, ARG, KIND, SIZE, VALUE, INDEX, ERROR = range(8)
_OPS = ["broadcast", "all_reduce_mean", "all_gather", "best", "exchange", "hybrid"]
_ARGS = {"broadcast": "src", "exchange": "shift", "hybrid": "every"}
_KINDS = {0: "a model or Particle", 1: "a Swarm"}
#: What a local argument error is raised as on every rank: its code in the header is its index + 1
#: here (the first class it is an instance of; anything else becomes a ``RuntimeError``).
_ERRORS: tuple[type[Exception], ...] = (DeviceMismatchError, StructureError, TypeError, IndexError, ValueError,
                                        NotImplementedError, RuntimeError)


def fingerprint(description: Sequence[Sequence[Any]]) -> int:
    """A signed 64-bit hash of a structure description (stable across processes and machines).

    >>> fingerprint([["w", [2], "float32", True, 0]]) == fingerprint([["w", [2], "float32", True, 0]])
    True
    >>> fingerprint([["w", [2], "float32", True, 0]]) == fingerprint([["w", [3], "float32", True, 0]])
    False
    """
    text = json.dumps(list(description), separators=(",", ":"))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def _shape(shape: Sequence[int]) -> str:
    return f"shape {tuple(shape)}"


def _difference(reference: Sequence[Sequence[Any]], other: Sequence[Sequence[Any]], rank: int,
                other_rank: int) -> tuple[type[StructureError], str]:
    mine = {entry[0]: entry for entry in reference}
    theirs = {entry[0]: entry for entry in other}
    for name in mine:
        if name not in theirs:
            return StructureError, f"parameter {name!r} is missing on rank {other_rank} (present on rank {rank})"
    for name in theirs:
        if name not in mine:
            return StructureError, f"rank {other_rank} has an extra parameter {name!r} (absent on rank {rank})"
    if list(mine) != list(theirs):
        for a, b in zip(mine, theirs):
            if a != b:
                return StructureError, (f"the parameters come in another order: {a!r} on rank {rank} where rank "
                                        f"{other_rank} has {b!r}")
    for name, (_, shape, dtype, active, group, device) in mine.items():
        _, other_shape, other_dtype, other_active, other_group, other_device = theirs[name]
        if (shape, dtype) != (other_shape, other_dtype):
            return StructureError, (f"parameter {name!r} is {_shape(shape)} {dtype} on rank {rank} but "
                                    f"{_shape(other_shape)} {other_dtype} on rank {other_rank}")
        if device != other_device:
            return DeviceMismatchError, (f"parameter {name!r} is on {device} on rank {rank} and on {other_device} "
                                         f"on rank {other_rank}; move the models to one kind of device first")
        if active != other_active:
            where = (rank, other_rank) if active else (other_rank, rank)
            return StructureError, (f"parameter {name!r} is averaged on rank {where[0]} but carried unchanged on "
                                    f"rank {where[1]} (a ParamConfig operational=False or buffers= setting differs)")
        if group != other_group:
            return StructureError, (f"parameter {name!r} lands in flat buffer {group} on rank {rank} but "
                                    f"{other_group} on rank {other_rank} (are the parameters spread over devices "
                                    "differently?)")
    return StructureError, "their descriptions hash differently"


def first_difference(fn: str, reference: Sequence[Sequence[Any]], other: Sequence[Sequence[Any]], rank: int,
                     other_rank: int) -> StructureError:
    """The error for what first differs between two descriptions, naming the parameter (``named_parameters()``
    order): a ``DeviceMismatchError`` when the first difference is a device type, else a ``StructureError``.

    >>> w2, w3 = ["w", [2], "float32", True, 0, "cpu"], ["w", [3], "float32", True, 0, "cpu"]
    >>> error = first_difference("demo", [w2], [w3], 0, 1)
    >>> type(error).__name__, str(error).split("moved): ")[1]
    ('StructureError', "parameter 'w' is shape (2,) float32 on rank 0 but shape (3,) float32 on rank 1")
    >>> type(first_difference("demo", [w2], [w2[:5] + ["meta"]], 0, 1)).__name__
    'DeviceMismatchError'
    """
    kind, detail = _difference(reference, other, rank, other_rank)
    return kind(f"{fn}: the structures differ across ranks (found before any data moved): {detail}")


def _call(op: int, arg: int) -> str:
    name = _OPS[op] if 0 <= op < len(_OPS) else f"an unknown collective ({op})"
    return f"{name}({_ARGS[name]}={arg})" if name in _ARGS else name


def _texts(comm: Comm, text: str, device: torch.device) -> list[str]:
    """Every rank's ``text`` (only called once something differs; two small all_gathers)."""
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device="cpu")  # not the default device
    length = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    lengths = comm.all_gather([length], "exchanging structure descriptions")[0].view(-1).tolist()
    padded = torch.zeros(max(max(lengths), 1), dtype=torch.uint8, device=device)
    padded[:data.numel()] = data.to(device)
    gathered = comm.all_gather([padded], "exchanging structure descriptions")[0].cpu()
    return [bytes(gathered[r, :n].tolist()).decode() for r, n in enumerate(lengths)]


def _code(error: Optional[BaseException]) -> int:
    """The header's ``ERROR`` field for a local argument error (``0``: none)."""
    if error is None:
        return 0
    return next((code for code, kind in enumerate(_ERRORS, 1) if isinstance(error, kind)), len(_ERRORS))


def _message(error: BaseException) -> str:
    code = _code(error)
    return str(error) if isinstance(error, _ERRORS[code - 1]) else f"{type(error).__name__}: {error}"


def shared_error(fn: str, failed: Sequence[int], code: int, message: str, size: int) -> Exception:
    """The error every rank raises when ranks ``failed`` (global ranks) were given invalid arguments (or
    failed otherwise before the handshake): that of the first of them, with its class (from ``code``) and
    message, saying where it came from.

    >>> error = shared_error("exchange", [1], 3, "exchange: expected an int as shift, got str", 4)
    >>> type(error).__name__, str(error).split(" (")[1]
    ('TypeError', 'on rank 1; every rank of the 4 raises this error, and nothing was sent)')
    """
    kind = _ERRORS[code - 1] if 1 <= code <= len(_ERRORS) else RuntimeError
    where = f"on rank {failed[0]}"
    if len(failed) > 1:
        where += f"; ranks {', '.join(map(str, failed))} all failed"
    return kind(f"{message} ({where}; every rank of the {size} raises this error, and nothing was sent)")


def handshake(comm: Comm, flat: Optional[Flat], op: str, *, arg: int = 0, value: float = 0.0, index: int = 0,
              error: Optional[BaseException] = None, overlap: Optional[Callable[[], T]] = None,
              ) -> tuple[Tensor, Optional[T]]:
    """Swap headers with every rank and check they agree; returns the ``[size, 8]`` int64 headers (CPU)
    and what ``overlap()`` returned.

    Args:
        comm: the call's process group view.
        flat: this rank's argument (``None`` when it was invalid: then ``error`` is set).
        op: the collective's name; ``arg``: its argument that must agree (``src``, ``shift``, ``every``).
        value / index: call-specific numbers (``best``: the local best loss and its member).
        error: a local argument error; every rank raises it once every rank knows to stop.
        overlap: local work (e.g. packing the buffers) run while the headers travel.

    Raises:
        TypeError, ValueError, ...: some rank's arguments were invalid: every rank raises that rank's error
            (the first such rank's), of its class and with its message (``shared_error``).
        StructureError: the structures differ (every rank raises, naming the first parameter);
            ``DeviceMismatchError`` when they differ in a device type (e.g. ``cpu`` and ``meta``).
        ValueError: ranks called different collectives or arguments.

    Every rank named in a message is a global rank (``torch.distributed.get_global_rank``), as in the API.
        PeerError: a peer died or hung during the handshake.
    """
    description = flat.describe() if flat is not None else []
    header = torch.zeros(8, dtype=torch.int64, device="cpu")  # not on torch.set_default_device's device
    header[HASH] = fingerprint(description)
    header[OP], header[ARG] = _OPS.index(op), arg
    header[KIND] = -1 if flat is None else int(flat.kind == "swarm")
    header[SIZE] = 0 if flat is None else flat.size
    header[VALUE] = torch.tensor([value], dtype=torch.float64, device="cpu").view(torch.int64)[0]
    header[INDEX], header[ERROR] = index, _code(error)
    device = comm.device_for(torch.device("cpu"))
    gathered, wait = comm.all_gather_start([header.to(device)], "comparing structure fingerprints")
    result: Optional[T] = None
    try:
        if overlap is not None and error is None:
            result = overlap()
    finally:
        wait()
    headers = gathered[0].cpu()
    fn = comm.fn
    ranks = [comm.global_rank(r) for r in range(comm.size)]  # messages name global ranks
    failed = [r for r in range(comm.size) if headers[r, ERROR]]
    if failed:
        if comm.size == 1 and error is not None:
            raise error
        messages = _texts(comm, "" if error is None else _message(error), device)
        shared = shared_error(fn, [ranks[r] for r in failed], int(headers[failed[0], ERROR]), messages[failed[0]],
                              comm.size)
        if error is not None:
            raise shared from error
        raise shared
    calls = [_call(int(h[OP]), int(h[ARG])) for h in headers]
    if len(set(calls)) > 1:
        listing = ", ".join(f"rank {ranks[r]} called {call}" for r, call in enumerate(calls))
        raise ValueError(f"{fn}: the ranks are not in the same collective call: {listing}")
    kinds = headers[:, KIND].tolist()
    if len(set(kinds)) > 1:
        other = next(r for r, kind in enumerate(kinds) if kind != kinds[0])
        raise StructureError(f"{fn}: rank {ranks[0]} passed {_KINDS[kinds[0]]} but rank {ranks[other]} passed "
                             f"{_KINDS[kinds[other]]}; pass the same kind of value on every rank")
    hashes = headers[:, HASH].tolist()
    if len(set(hashes)) > 1:
        descriptions = [json.loads(text) for text in _texts(comm, json.dumps(description), device)]
        other = next(r for r, value in enumerate(hashes) if value != hashes[0])
        raise first_difference(fn, descriptions[0], descriptions[other], ranks[0], ranks[other])
    return headers, result


def header_value(headers: Tensor, rank: int) -> float:
    """The float64 ``VALUE`` field of one rank's header."""
    return float(headers[rank, VALUE:VALUE + 1].clone().view(torch.float64)[0])
