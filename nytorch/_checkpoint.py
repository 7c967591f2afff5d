"""Checkpoints that cannot run code and cannot be torn: ``save(obj, path)`` / ``load(path, like=...)``.

The file is an ordinary ``torch.save`` archive whose pickle holds only tensors,
numbers, strings, ``None`` and dicts/lists/tuples (see ``_codec.py``), so it loads
with ``torch.load(path, weights_only=True)`` anywhere.  ``load(path, like=...)``
rebuilds Particles, modules and Swarms into the structure ``like`` gives
(``_restore.py``).  Loading always uses torch's restricted unpickler: a file
crafted to run code is refused with ``CheckpointError`` before anything in it
runs, and every record of the archive is checked against the CRC-32 that
``torch.save`` stores for it (``torch.load`` does not), so a flipped bit is a
``CheckpointError`` rather than a wrong value.  ``save`` always writes the CRC-32s,
even while a user has turned them off with ``torch.serialization.set_crc32_options(False)``.
Writes go through ``atomic_write`` (temporary file, fsync, rename, fsync folder).
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import sys
import threading
import traceback
import zipfile
from collections.abc import Iterator
from typing import IO, Any, Union

import torch
import torch._weights_only_unpickler as _weights_only

from ._atomic import PathLike, atomic_write
from ._codec import FORMAT, VERSION, CheckpointError, encode
from ._restore import restore

__all__ = ["save", "load", "CheckpointError"]

_CHUNK = 1 << 20
_FOLDER = 0x10  # the MS-DOS folder bit of a zip record's external attributes


class _Crc32On:
    """Turns on ``torch.save``'s CRC-32s while any ``save`` runs, then puts back the caller's setting.

    ``torch.serialization.set_crc32_options`` is process-wide: the first ``save`` to enter
    records the setting and turns CRCs on, the last to leave restores it, so saves in
    several threads never turn CRCs off under one another.  (A ``torch.save`` elsewhere that
    runs meanwhile also gets CRCs: harmless.)  Torch versions without the option always
    write CRCs.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._caller = True

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        get = getattr(torch.serialization, "get_crc32_options", None)
        set_ = getattr(torch.serialization, "set_crc32_options", None)
        if get is None or set_ is None:  # pragma: no cover - torch < 2.4 always writes CRCs
            yield
            return
        with self._lock:
            if self._users == 0:
                self._caller = bool(get())
                set_(True)
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    set_(self._caller)


_crc32_on = _Crc32On()


class _Recorder:
    """``file`` for ``torch.save``, keeping the exception a write raised.

    torch's zip writer turns any exception of a write (an ``OSError`` when the disk is full, a
    ``KeyboardInterrupt`` when Ctrl-C lands inside it) into ``RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos``; ``save`` re-raises the recorded exception instead.
    """

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.error: Union[BaseException, None] = None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except BaseException as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self.file.flush()


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

    Every record of the file gets its CRC-32 (checked by ``load``), whatever
    ``torch.serialization.set_crc32_options`` says; the caller's setting is restored.

    Raises:
        TypeError: ``obj`` holds something else (sparse, MKL-DNN or nested tensors, a lazy module's
            uninitialised parameters, NumPy masked arrays or arrays of Python objects included),
            or a dict key that is not exactly a
            ``str``, ``int``, ``float``, ``bool`` or ``None`` (subclasses such as ``IntEnum``
            or ``np.float64`` would pickle their class); the message gives its path inside ``obj``.
            Also when ``path`` is not a ``str`` or an ``os.PathLike`` giving one.
        ValueError: a dict key is ``"__nytorch__"`` (reserved) or a NaN float (``nan != nan``:
            ``load(like=...)`` could never match it); or a container holds itself (a cycle) or
            containers nest deeper than Python's recursion limit.
        OSError: the file cannot be written, e.g. the disk is full (``errno.ENOSPC``); the
            message names ``path``, the error the write raised is chained, and the previous
            file, if any, is untouched (no temporary file is left).  Any other exception the
            write raised (``KeyboardInterrupt`` from Ctrl-C) comes out as itself, the same way.

    >>> import os, tempfile, torch, nytorch
    >>> net = torch.nn.Linear(2, 1)
    >>> path = os.path.join(tempfile.mkdtemp(), "run.pt")
    >>> save({"model": nytorch.particle(net), "step": 7}, path)
    >>> raw = torch.load(path, weights_only=True)
    >>> raw["format"], raw["data"]["step"]
    ('nytorch.checkpoint', 7)
    """
    name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(name, str):
        raise TypeError(f"save: expected a str or os.PathLike as path, got {type(path).__name__}"
                        + ("" if name is None else f" of {type(name).__name__}"))
    try:
        payload = {"format": FORMAT, "version": VERSION, "data": encode(obj, "")}
    except RecursionError:
        raise ValueError(f"save: expected a tree of values, got containers that hold themselves or nest deeper "
                         f"than Python's recursion limit ({sys.getrecursionlimit()})") from None

    def write(file: IO[bytes]) -> None:
        recorder = _Recorder(file)
        try:
            with _crc32_on():
                torch.save(payload, recorder)  # type: ignore[arg-type]
        except RuntimeError as failure:
            error, recorder.error = recorder.error, None  # the recorder must not keep the traceback: a cycle
            if error is None:
                raise
            # torch's writer frames hold the exception in flight (a cycle keeping ``obj`` alive): clear them
            traceback.clear_frames(failure.__traceback__)
            try:
                raise error from None  # what torch's writer swallowed: disk full, Ctrl-C
            finally:
                del error

    try:
        atomic_write(name, write)
    except OSError as error:
        message = f"save: cannot write {name!r}: {error.strerror or error}"
        raise (OSError(message) if error.errno is None else OSError(error.errno, message)) from error


# -- loading ---------------------------------------------------------------------------------
def _check_records(file: IO[bytes]) -> None:
    """Raise ``zipfile.BadZipFile`` naming the first record whose bytes fail the CRC-32 stored for it.

    ``torch.save`` writes a zip archive with a CRC-32 per record (pickle and tensor data) but
    ``torch.load`` does not check them, so a flipped bit would load as a wrong value.  Records
    stored with a CRC of 0 (``torch.serialization.set_crc32_options(False)`` in the writer; never
    ``nytorch.save``, which always writes them) are not checked.
    A record marked as a folder is refused too: torch reads no bytes for it (uninitialised values);
    so is a compressed record (``torch.save`` stores them as they are; a crafted one can unpack to
    a thousand times the file's size) and an archive that does not start at the first byte (bytes
    prepended, or archives concatenated: ``zipfile`` would check other bytes than torch reads).
    Files that are not zip archives are left to ``torch.load`` (which refuses or fails on them).
    """
    if not zipfile.is_zipfile(file):
        return
    file.seek(0)
    with zipfile.ZipFile(file) as archive:
        records = archive.infolist()
        if records and min(info.header_offset for info in records) != 0:
            raise zipfile.BadZipFile("the archive does not start at the first byte of the file (bytes prepended, "
                                     "or archives concatenated)")
        for info in records:
            if info.external_attr & _FOLDER:  # torch would read no bytes: an uninitialised tensor
                raise zipfile.BadZipFile(f"record {info.filename!r} is marked as a folder")
            if info.compress_type != zipfile.ZIP_STORED:
                raise zipfile.BadZipFile(f"record {info.filename!r} is compressed (torch.save stores records as "
                                         "they are)")
            if info.CRC == 0:
                continue
            with archive.open(info) as record:  # reading to the end checks the CRC-32
                while record.read(_CHUNK):
                    pass


_LEGACY_PICKLES = 5  # a file in torch's legacy format: magic number, protocol, system info, the value, storage keys


def _check_globals(file: IO[bytes]) -> None:
    """Raise ``pickle.UnpicklingError`` naming a global in the file's pickles that torch does not allow by default.

    ``torch.load(weights_only=True)`` also builds the classes this process allowlisted with
    ``torch.serialization.add_safe_globals`` (running their ``__setstate__``); nytorch files never
    hold one, so they are refused whatever the process allowlisted.  The pickles are scanned
    (nothing is built) as ``torch.load`` reads them: ``data.pkl`` through torch's own zip reader,
    or a legacy file's pickles one after another; a pickle the scan cannot parse raises what the
    restricted unpickler raises for it (``Unsupported operand``).  Skipped on a torch without
    these helpers.
    """
    scan = getattr(_weights_only, "get_globals_in_pkl", None)
    allowed_globals = getattr(_weights_only, "_get_allowed_globals", None)
    if scan is None or allowed_globals is None:  # pragma: no cover - depends on the torch version
        return
    start = file.read(4)
    file.seek(0)
    found: set[str] = set()
    if start == b"PK\x03\x04":  # torch.load's own test for its zip format
        try:
            record = torch._C.PyTorchFileReader(file).get_record("data.pkl")
        except Exception:  # torch.load fails on this archive the same way  # noqa: BLE001
            return
        found = scan(io.BytesIO(record))
    else:
        for index in range(_LEGACY_PICKLES):
            if index and not file.read(1):  # no more pickles
                break
            file.seek(-1 if index else 0, os.SEEK_CUR)
            found |= scan(file)
    refused = sorted(name for name in found if name not in allowed_globals())
    if refused:
        raise pickle.UnpicklingError(f"GLOBAL {refused[0]}: not one of the globals torch allows by default")


def _read(path: PathLike, map_location: Any) -> Any:
    name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(name, str):
        raise TypeError(f"load: expected a str or os.PathLike as path, got {type(path).__name__}"
                        + ("" if name is None else f" of {type(name).__name__}"))
    with open(name, "rb") as file:  # cannot open (missing, no permission, a folder): OSError as is
        try:
            _check_records(file)
            file.seek(0)
            _check_globals(file)
            file.seek(0)
            payload = torch.load(file, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            detail = [line.strip() for line in str(error).splitlines() if line.strip()]
            hint = next((line for line in detail if "GLOBAL" in line), "")
            if not hint:  # not a refused class: bytes the restricted unpickler cannot parse
                reason = next((line for line in detail if "Unsupported operand" in line), "unparsable pickle")
                raise CheckpointError(f"load: {name!r} is not a readable checkpoint (truncated or corrupt?): "
                                      f"{reason}") from None
            raise CheckpointError(
                f"load: refused {name!r}: it holds Python objects other than tensors and plain "
                f"containers, which could run code when unpickled ({hint})"
            ) from None
        except zipfile.BadZipFile as error:
            raise CheckpointError(f"load: {name!r} is not a readable checkpoint (truncated or corrupt?): "
                                  f"{error}") from None
        except Exception as error:  # torch's reader raises RuntimeError, OSError, EOFError... on bad bytes
            raise CheckpointError(f"load: {name!r} is not a readable checkpoint (truncated or "
                                  f"corrupt?): {type(error).__name__}: {error}") from error
    if not (isinstance(payload, dict) and payload.get("format") == FORMAT and "data" in payload):
        raise CheckpointError(f"load: expected a file written by nytorch.save, got {name!r} "
                              f"holding a {type(payload).__name__} without the {FORMAT!r} marker")
    version = payload.get("version")
    if type(version) is not int or not 1 <= version <= VERSION:
        raise CheckpointError(f"load: {name!r} has format version {version!r}; "
                              f"this nytorch reads versions up to {VERSION}")
    return payload["data"]


def load(path: PathLike, *, like: Any = None, map_location: Union[str, torch.device, None] = "cpu") -> Any:
    """Read a checkpoint written by ``save``, rebuilding it into the structure of ``like``.

    ``like`` mirrors what was saved: a Particle, module or Swarm gives the structure
    (class, parameter names, shapes, dtypes, devices) for the loaded values and must be
    of the saved class (a class defined in ``__main__`` matches one of the same qualified
    name in any module, so a script's checkpoints load where the class is imported), a dict,
    list or tuple gives the same structure of such things (an empty list or tuple
    accepts any length), a tensor, NumPy array or generator the same kind of thing (a
    tensor or array of the same shape and dtype), a namedtuple or
    dataclass the same fields; ``None`` anywhere (or no ``like``) returns the stored
    value as is, with Particles, modules and Swarms as ``dict[str, Tensor]`` and
    namedtuples and dataclasses as dicts of their fields.  Loaded
    tensors move to the device of the matching tensor in ``like``; ``like`` itself
    is never modified.  Dict keys match by value and type (``1`` is not ``"1"``), in any order,
    and so do the parameters of a Particle, module or Swarm (by name).  Generators are
    restored on ``like``'s device, or without ``like`` on the device they were saved on
    (``map_location`` does not apply to them).  ``ParamConfig``s are not stored: a NytoModule
    or Particle loaded into ``like`` gets ``like``'s configs (shared with it, as arithmetic
    results share their operand's).

    The file's pickle may name only the globals torch's restricted unpickler allows by default
    (tensors, storages, dtypes, plain containers): those a process added with
    ``torch.serialization.add_safe_globals`` are refused here too.  The file's bytes are checked against the CRC-32 stored for each record of the archive
    before anything is unpickled (about 15 ms per 50 MB on one CPU core).  ``save`` always
    stores them; records stored with a CRC of 0 (files written by other tools, or by older
    nytorch, under ``torch.serialization.set_crc32_options(False)``) still load, unchecked.

    Args:
        path: a file written by ``nytorch.save``.
        like: the structure to rebuild into (keyword only).
        map_location: where tensors are loaded before being moved to ``like``'s devices (a device
            this machine has; torch's dict and callable forms are passed through).

    Returns:
        New objects of ``like``'s types (a module of ``like``'s class with fresh Parameters; an
        ``nn.Parameter`` for an ``nn.Parameter``; tensors take ``like``'s ``requires_grad``; a NumPy
        scalar or array as ``like`` is one).

    Raises:
        CheckpointError: the file would run code when unpickled (refused before anything
            in it runs), is truncated or corrupt (its bytes fail their CRC-32), holds a
            malformed entry, or was not written by ``nytorch.save``; the message names the file
            or the entry.  Also a generator saved on a device this machine lacks (a CUDA
            generator where CUDA is not available).
        StructureError: the file and ``like`` differ in a name, shape, dtype or kind
            (the message names the first differing parameter in ``like``'s order, e.g.
            ``named_parameters()`` order).
        TypeError: a Particle, module or Swarm in the file was saved from another class than
            ``like``'s (the message names both); or ``map_location`` is not a ``str``, ``torch.device``,
            dict or callable; or ``path`` is not a ``str`` or an ``os.PathLike`` giving one (as for ``save``).
        OSError: the file cannot be opened (``FileNotFoundError``, ``PermissionError``,
            ``IsADirectoryError``); unreadable contents are ``CheckpointError``.
        ValueError: ``map_location`` names no device of this machine (``"cuda"`` without CUDA),
            checked before the file is read, so the file is never blamed for it.

    >>> import os, tempfile, torch, nytorch
    >>> net = torch.nn.Linear(2, 1)
    >>> path = os.path.join(tempfile.mkdtemp(), "net.pt")
    >>> save({"net": net, "step": 3}, path)
    >>> state = load(path, like={"net": torch.nn.Linear(2, 1), "step": 0})
    >>> torch.equal(state["net"].weight, net.weight), state["step"]
    (True, 3)
    """
    data = _read(path, _location(map_location))
    try:
        return restore("", data, like)
    except RecursionError:  # only a crafted file: save refuses such nesting
        raise CheckpointError(f"load: {os.fspath(path)!r} nests containers deeper than Python's recursion limit "
                              f"({sys.getrecursionlimit()}); nytorch.save never writes such files") from None


def _location(map_location: Any) -> Any:
    """``map_location`` checked: a device this machine has (``ValueError`` otherwise), or torch's other forms.

    Without this check torch's reader fails inside the file ("Attempting to deserialize object on a
    CUDA device"), which ``load`` would report as an unreadable checkpoint.
    """
    if map_location is None or callable(map_location) or isinstance(map_location, dict):
        return map_location
    if not isinstance(map_location, (str, torch.device)):
        raise TypeError(f"load: expected a device (a str or torch.device) as map_location, "
                        f"got {type(map_location).__name__}")
    try:
        device = torch.device(map_location)
        torch.empty(0, device=device)  # raises where this machine lacks the device
    except Exception as error:  # RuntimeError, AssertionError ("Torch not compiled with CUDA"), ...
        raise ValueError(f"load: expected a device of this machine as map_location, got {map_location!r} "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    return "cpu" if device.type == "cpu" else device  # torch's reader refuses an index on "cpu"
