"""Yes/no keyword arguments (``buffers=``, ``pack=``, ``show_progress=``), checked alike by every entry point.

A string is the mistake this catches: ``particle(model, buffers="copy")`` reads like
``merge.average``'s buffer modes, and any non-empty string is truthy.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["flag"]


def flag(fn: str, name: str, value: object, *, none: bool = False) -> Optional[bool]:
    """``value`` as a bool: ``True``/``False``, Python or NumPy ints and bools (nonzero is ``True``).

    Args:
        fn: the caller's name, for the message.
        name: the argument's name, for the message.
        value: what the caller was given.
        none: ``None`` is allowed too (and returned as it is).

    Returns:
        ``True`` or ``False`` (or ``None`` where allowed).

    Raises:
        TypeError: ``value`` is anything else (a string, a float, ``None`` where not allowed).

    >>> flag("particle", "buffers", np.True_), flag("hybrid", "show_progress", None, none=True)
    (True, None)
    """
    if value is None and none:
        return None
    if not isinstance(value, (bool, int, np.integer, np.bool_)):
        expected = "True, False or None" if none else "True or False"
        raise TypeError(f"{fn}: expected {expected} as {name}, got {type(value).__name__}")
    return bool(value)
