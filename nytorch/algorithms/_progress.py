"""Optional progress bars: tqdm when it is installed and the output is a terminal, otherwise nothing."""
from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, Optional, TypeVar

from .._flags import flag

T = TypeVar("T")

__all__ = ["progress", "progress_flag"]


def progress(iterable: Iterable[T], *, total: Optional[int] = None, desc: Optional[str] = None,
             enabled: Optional[bool] = None) -> Iterable[T]:
    """``iterable`` wrapped in a ``tqdm`` bar, or returned as is.

    Args:
        iterable: what to iterate over.
        total: the bar's length (default: ``len(iterable)`` where it has one, as tqdm does).
        desc: the bar's label.
        enabled: ``True``/``False`` to force; ``None`` (default) shows a bar only when stderr is a
            terminal.  Without tqdm installed there is never a bar.

    Returns:
        A ``tqdm`` wrapping ``iterable`` when a bar is shown, otherwise ``iterable`` itself.

    >>> list(progress(range(3), enabled=False))
    [0, 1, 2]
    """
    if enabled is None:
        enabled = bool(getattr(sys.stderr, "isatty", lambda: False)())
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc)  # type: ignore[no-any-return]


def progress_flag(fn: str, show_progress: object) -> Optional[bool]:
    """``show_progress`` checked and made a bool (``None`` kept: a bar only on a terminal).

    Args:
        fn: the caller's name, for the message.
        show_progress: ``True``, ``False`` or ``None``; Python and NumPy ints and bools too (nonzero
            is ``True``).

    Returns:
        ``None``, ``True`` or ``False``.

    Raises:
        TypeError: ``show_progress`` is anything else (a string, a float...).

    >>> progress_flag("hybrid", 0), progress_flag("hybrid", None)
    (False, None)
    """
    return flag(fn, "show_progress", show_progress, none=True)


def set_postfix(bar: Any, **values: Any) -> None:
    """Show ``values`` next to the bar (no-op without one).

    >>> set_postfix(iter([]), loss=1.0)
    """
    if hasattr(bar, "set_postfix"):
        bar.set_postfix(values, refresh=False)


