"""Checkpoints that cannot run code and cannot be torn: ``save(obj, path)`` / ``load(path, like=...)``.

The file is an ordinary ``torch.save`` archive whose pickle holds only tensors,
numbers, strings, ``None`` and dicts/lists/tuples (see ``_codec.py``), so it loads
with ``torch.load(path, weights_only=True)`` anywhere.  ``load(path, like=...)``
rebuilds Particles, modules and Swarms into the structure ``like`` gives
(``_restore.py``).  Loading always uses torch's restricted unpickler: a file
crafted to run code is refused with ``CheckpointError`` before anything in it
runs.  Writes go through ``atomic_write`` (temporary file, fsync, rename, fsync folder).
"""
from __future__ import annotations

import os
import pickle
from typing import IO, Any, Union

import torch

from ._atomic import PathLike, atomic_write
from ._codec import FORMAT, VERSION, CheckpointError, encode
from ._restore import restore

__all__ = ["save", "load", "CheckpointError"]


def save(obj: Any, path: PathLike) -> None:
    """Write ``obj`` to ``path`` atomically in a format ``torch.load(path, weights_only=True)`` reads.

    ``obj`` is a Particle, an ``nn.Module`` (``NytoModule`` included: parameters and
    buffers), a ``Swarm``, a tensor, or a dict/list/tuple/namedtuple/dataclass of these
    mixed with algorithm state: numbers, strings, ``None``, ``torch.Generator``s, NumPy
    arrays and RNG states (``random.getstate()``, ``nytorch.get_rng_state()``).  Classes
    are never pickled: namedtuples (e.g. ``algorithms.PSOState``) and dataclasses are
    stored field by field and rebuilt from ``like``.  A killed
    writer leaves either the previous file or the new one, never a torn file.

    Args:
        obj: what to store.
        path: the file to create or replace (its folder must exist).

    Raises:
        TypeError: ``obj`` holds something else (the message gives its path inside ``obj``).
        OSError: the file cannot be written (the previous file, if any, is untouched).

    >>> import os, tempfile, torch, nytorch
    >>> net = torch.nn.Linear(2, 1)
    >>> path = os.path.join(tempfile.mkdtemp(), "run.pt")
    >>> save({"model": nytorch.particle(net), "step": 7}, path)
    >>> raw = torch.load(path, weights_only=True)
    >>> raw["format"], raw["data"]["step"]
    ('nytorch.checkpoint', 7)
    """
    payload = {"format": FORMAT, "version": VERSION, "data": encode(obj, "")}

    def write(file: IO[bytes]) -> None:
        torch.save(payload, file)

    atomic_write(path, write)



# -- loading ---------------------------------------------------------------------------------
def _read(path: PathLike, map_location: Any) -> Any:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load: expected a str or os.PathLike as path, got {type(path).__name__}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        detail = str(error).strip().splitlines()
        hint = next((line for line in detail if "Unsupported global" in line or "GLOBAL" in line), "")
        raise CheckpointError(
            f"load: refused {os.fspath(path)!r}: it holds Python objects other than tensors and plain "
            f"containers, which could run code when unpickled ({hint.strip() or 'unsafe pickle'})"
        ) from None
    except OSError:
        raise
    except Exception as error:
        raise CheckpointError(f"load: {os.fspath(path)!r} is not a readable checkpoint (truncated or "
                              f"corrupt?): {type(error).__name__}: {error}") from None
    if not (isinstance(payload, dict) and payload.get("format") == FORMAT and "data" in payload):
        raise CheckpointError(f"load: expected a file written by nytorch.save, got {os.fspath(path)!r} "
                              f"holding a {type(payload).__name__} without the {FORMAT!r} marker")
    if not isinstance(payload.get("version"), int) or payload["version"] > VERSION:
        raise CheckpointError(f"load: {os.fspath(path)!r} has format version {payload.get('version')!r}; "
                              f"this nytorch reads versions up to {VERSION}")
    return payload["data"]


def load(path: PathLike, *, like: Any = None, map_location: Union[str, torch.device, None] = "cpu") -> Any:
    """Read a checkpoint written by ``save``, rebuilding it into the structure of ``like``.

    ``like`` mirrors what was saved: a Particle, module or Swarm gives the structure
    (class, parameter names, shapes, dtypes, devices) for the loaded values, a dict,
    list or tuple gives the same structure of such things (an empty list or tuple
    accepts any length), a tensor or generator the same kind of thing, a namedtuple or
    dataclass the same fields; ``None`` anywhere (or no ``like``) returns the stored
    value as is, with Particles, modules and Swarms as ``dict[str, Tensor]`` and
    namedtuples and dataclasses as dicts of their fields.  Loaded
    tensors move to the device of the matching tensor in ``like``; ``like`` itself
    is never modified.

    Args:
        path: a file written by ``nytorch.save``.
        like: the structure to rebuild into (keyword only).
        map_location: where tensors are loaded before being moved to ``like``'s devices.

    Returns:
        New objects of ``like``'s types (a module of ``like``'s class with fresh Parameters).

    Raises:
        CheckpointError: the file would run code when unpickled (refused before anything
            in it runs), is truncated or corrupt, or was not written by ``nytorch.save``.
        StructureError: the file and ``like`` differ in a name, shape, dtype or kind
            (the message names the first differing parameter in ``named_parameters()`` order).
        FileNotFoundError: ``path`` does not exist.

    >>> import os, tempfile, torch, nytorch
    >>> net = torch.nn.Linear(2, 1)
    >>> path = os.path.join(tempfile.mkdtemp(), "net.pt")
    >>> save({"net": net, "step": 3}, path)
    >>> state = load(path, like={"net": torch.nn.Linear(2, 1), "step": 0})
    >>> torch.equal(state["net"].weight, net.weight), state["step"]
    (True, 3)
    """
    return restore("", _read(path, map_location), like)
