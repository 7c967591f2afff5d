"""The handshake every collective starts with: compare a structure fingerprint across ranks first.

Each rank contributes one small header (a 64-bit hash of its leaves' names, shapes,
dtypes and roles, which collective it is in and with which argument, its member
count and a few call-specific numbers) to one ``all_gather``.  Only when the
hashes differ do the ranks swap their full descriptions, so that every rank raises
the same ``StructureError`` naming the first differing parameter.  No parameter
data moves before the handshake has passed.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, Optional, TypeVar

import torch

from .._errors import StructureError
from ._comm import Comm
from ._flat import Flat

Tensor = torch.Tensor
T = TypeVar("T")

__all__ = ["HASH", "OP", "ARG", "KIND", "SIZE", "VALUE", "INDEX", "ERROR", "fingerprint", "handshake",
           "first_difference"]

# Header fields.
HASH, OP, ARG, KIND, SIZE, VALUE, INDEX, ERROR = range(8)
_OPS = ["broadcast", "all_reduce_mean", "all_gather", "best", "exchange"]
_ARGS = {"broadcast": "src", "exchange": "shift"}
_KINDS = {0: "a model or Particle", 1: "a Swarm"}


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


def first_difference(reference: Sequence[Sequence[Any]], other: Sequence[Sequence[Any]], rank: int,
                     other_rank: int) -> str:
    """What first differs between two descriptions, naming the parameter (``named_parameters()`` order).

    >>> first_difference([["w", [2], "float32", True, 0]], [["w", [3], "float32", True, 0]], 0, 1)
    "parameter 'w' is shape (2,) float32 on rank 0 but shape (3,) float32 on rank 1"
    """
    mine = {entry[0]: entry for entry in reference}
    theirs = {entry[0]: entry for entry in other}
    for name in mine:
        if name not in theirs:
            return f"parameter {name!r} is missing on rank {other_rank} (present on rank {rank})"
    for name in theirs:
        if name not in mine:
            return f"rank {other_rank} has an extra parameter {name!r} (absent on rank {rank})"
    if list(mine) != list(theirs):
        for a, b in zip(mine, theirs):
            if a != b:
                return (f"the parameters come in another order: {a!r} on rank {rank} where rank "
                        f"{other_rank} has {b!r}")
    for name, (_, shape, dtype, active, group) in mine.items():
        _, other_shape, other_dtype, other_active, other_group = theirs[name]
        if (shape, dtype) != (other_shape, other_dtype):
            return (f"parameter {name!r} is {_shape(shape)} {dtype} on rank {rank} but "
                    f"{_shape(other_shape)} {other_dtype} on rank {other_rank}")
        if active != other_active:
            where = (rank, other_rank) if active else (other_rank, rank)
            return (f"parameter {name!r} is averaged on rank {where[0]} but carried unchanged on rank "
                    f"{where[1]} (a ParamConfig operational=False or buffers= setting differs)")
        if group != other_group:
            return (f"parameter {name!r} lands in flat buffer {group} on rank {rank} but {other_group} on rank "
                    f"{other_rank} (are the parameters spread over devices differently?)")
    return "their descriptions hash differently"


def _call(op: int, arg: int) -> str:
    name = _OPS[op] if 0 <= op < len(_OPS) else f"an unknown collective ({op})"
    return f"{name}({_ARGS[name]}={arg})" if name in _ARGS else name


def _descriptions(comm: Comm, description: Sequence[Sequence[Any]], device: torch.device) -> list[Any]:
    """Every rank's description (only called once hashes differ; two small all_gathers)."""
    data = torch.tensor(list(json.dumps(list(description)).encode()), dtype=torch.uint8)
    length = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    lengths = comm.all_gather([length], "exchanging structure descriptions")[0].view(-1).tolist()
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    padded[:data.numel()] = data.to(device)
    gathered = comm.all_gather([padded], "exchanging structure descriptions")[0].cpu()
    return [json.loads(bytes(gathered[r, :n].tolist()).decode()) for r, n in enumerate(lengths)]


def handshake(comm: Comm, flat: Optional[Flat], op: str, *, arg: int = 0, value: float = 0.0, index: int = 0,
              error: Optional[BaseException] = None, overlap: Optional[Callable[[], T]] = None,
              ) -> tuple[Tensor, Optional[T]]:
    """Swap headers with every rank and check they agree; returns the ``[size, 8]`` int64 headers (CPU)
    and what ``overlap()`` returned.

    Args:
        comm: the call's process group view.
        flat: this rank's argument (``None`` when it was invalid: then ``error`` is set).
        op: the collective's name; ``arg``: its argument (``src``, ``shift``).
        value / index: call-specific numbers (``best``: the local best loss and its member).
        error: a local argument error, raised here once every rank knows to stop.
        overlap: local work (e.g. packing the buffers) run while the headers travel.

    Raises:
        StructureError: the structures differ (every rank raises, naming the first parameter).
        ValueError: ranks called different collectives or arguments, or another rank's arguments
            were invalid (that rank raises its own error).
        PeerError: a peer died or hung during the handshake.
    """
    description = flat.describe() if flat is not None else []
    header = torch.zeros(8, dtype=torch.int64)
    header[HASH] = fingerprint(description)
    header[OP], header[ARG] = _OPS.index(op), arg
    header[KIND] = -1 if flat is None else int(flat.kind == "swarm")
    header[SIZE] = 0 if flat is None else flat.size
    header[VALUE] = torch.tensor([value], dtype=torch.float64).view(torch.int64)[0]
    header[INDEX], header[ERROR] = index, int(error is not None)
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
    failed = [r for r in range(comm.size) if headers[r, ERROR]]
    if failed:
        if error is not None:
            raise error
        raise ValueError(f"{fn}: rank {failed[0]} was given invalid arguments (see its error); nothing was sent")
    calls = [_call(int(h[OP]), int(h[ARG])) for h in headers]
    if len(set(calls)) > 1:
        listing = ", ".join(f"rank {r} called {call}" for r, call in enumerate(calls))
        raise ValueError(f"{fn}: the ranks are not in the same collective call: {listing}")
    kinds = headers[:, KIND].tolist()
    if len(set(kinds)) > 1:
        other = next(r for r, kind in enumerate(kinds) if kind != kinds[0])
        raise StructureError(f"{fn}: rank 0 passed {_KINDS[kinds[0]]} but rank {other} passed "
                             f"{_KINDS[kinds[other]]}; pass the same kind of value on every rank")
    hashes = headers[:, HASH].tolist()
    if len(set(hashes)) > 1:
        descriptions = _descriptions(comm, description, device)
        other = next(r for r, value in enumerate(hashes) if value != hashes[0])
        raise StructureError(f"{fn}: the structures differ across ranks (found before any data moved): "
                             + first_difference(descriptions[0], descriptions[other], 0, other))
    return headers, result


def header_value(headers: Tensor, rank: int) -> float:
    """The float64 ``VALUE`` field of one rank's header."""
    return float(headers[rank, VALUE:VALUE + 1].clone().view(torch.float64)[0])
