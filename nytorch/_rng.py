"""Every global random number generator's state as one value, for checkpoints and exact resume."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["get_rng_state", "set_rng_state"]


def get_rng_state() -> dict[str, Any]:
    """The state of Python's ``random``, NumPy's global RNG, torch's CPU RNG (and CUDA's when initialised).

    Store it with ``nytorch.save`` and restore it with ``set_rng_state`` to continue a
    run with the same random numbers.

    Returns:
        ``{"python": ..., "numpy": ..., "torch": ByteTensor, "cuda": [ByteTensor, ...]}``
        (``"cuda"`` only when CUDA is initialised).

    >>> state = get_rng_state()
    >>> first = torch.rand(2)
    >>> set_rng_state(state)
    >>> torch.equal(torch.rand(2), first)
    True
    """
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generators from ``get_rng_state()`` (keys that are absent are left alone).

    Raises:
        TypeError: ``state`` is not a dict.
        ValueError: ``state`` has a key other than ``python``, ``numpy``, ``torch``, ``cuda``.

    >>> state = get_rng_state()
    >>> first = random.random()
    >>> set_rng_state(state)
    >>> random.random() == first
    True
    """
    if not isinstance(state, dict):
        raise TypeError(f"set_rng_state: expected the dict from get_rng_state() as state, got {type(state).__name__}")
    unknown = sorted(set(state) - {"python", "numpy", "torch", "cuda"})
    if unknown:
        raise ValueError(f"set_rng_state: expected keys among 'python', 'numpy', 'torch', 'cuda', "
                         f"got unknown key {unknown[0]!r}")
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
