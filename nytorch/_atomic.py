"""Crash-safe file replacement: write a temporary file beside the target, fsync, rename, fsync the folder.

A process killed at any moment leaves the target either as it was or as the
new complete file, never torn (POSIX ``rename`` is atomic within a file system).
A kill before the rename can leave a hidden ``.NAME.*.tmp`` file beside the
target; it is never read and may be deleted.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import IO, Union

__all__ = ["atomic_write", "PathLike"]

PathLike = Union[str, "os.PathLike[str]"]


def _default_mode() -> int:
    """``0o666`` minus the process umask (read without changing it, so threads are safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


def _fsync_directory(directory: str) -> None:
    """Persist a rename by syncing its folder (a no-op where folders cannot be opened, e.g. Windows)."""
    if os.name == "nt":  # pragma: no cover - no directory fds on Windows
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], object]) -> str:
    """Replace ``path`` with what ``write(file)`` writes, atomically and durably.

    Steps: temporary file in the target's folder, ``write``, flush, ``fsync``,
    ``os.replace`` onto the target, ``fsync`` of the folder.  A symlink target is
    resolved first, so the file it points to is replaced.  An existing target's
    permission bits are kept; a new file gets ``0o666`` minus the umask.

    Args:
        path: the file to create or replace.
        write: called once with the temporary file opened for binary writing.

    Returns:
        The resolved path written.

    Raises:
        TypeError: ``path`` is not a str or ``os.PathLike``.
        OSError: the folder does not exist or is not writable (nothing is left behind).

    >>> import os, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> target = os.path.join(folder, "x.bin")
    >>> _ = atomic_write(target, lambda file: file.write(b"new"))
    >>> open(target, "rb").read(), os.listdir(folder)
    (b'new', ['x.bin'])
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"atomic_write: expected a str or os.PathLike as path, got {type(path).__name__}")
    target = os.path.realpath(os.fspath(path))
    directory, name = os.path.split(target)
    try:
        mode = os.stat(target).st_mode & 0o7777
    except FileNotFoundError:
        mode = _default_mode()
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    _fsync_directory(directory)
    return target
