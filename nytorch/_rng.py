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


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')} on {value.device}"
    return f"a {type(value).__name__}"


def _bad(key: str, expected: str, value: Any, error: Exception) -> Exception:
    """``set_rng_state``'s error for entry ``key``: a ``TypeError`` for a wrong type, else a ``ValueError``."""
    kind = TypeError if isinstance(error, TypeError) else ValueError
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return kind(f"set_rng_state: expected {expected} under {key!r}, got {_describe(value)} ({reason}); "
                "no generator was changed")


def _check_cuda(states: Any) -> None:
    """``states`` must be a list/tuple of 1-D uint8 CPU tensors; on CUDA, at most one per device, each one it takes."""
    expected = "a list of CUDA generator states (1-D uint8 tensors) from torch.cuda.get_rng_state_all()"
    if not isinstance(states, (list, tuple)):
        raise _bad("cuda", expected, states, TypeError("not a list"))
    for index, value in enumerate(states):
        if not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1
                and value.device.type == "cpu"):
            raise _bad("cuda", expected, states, TypeError(f"item {index} is {_describe(value)}"))
    if not torch.cuda.is_available():
        return  # not applied on a machine without CUDA
    if len(states) > torch.cuda.device_count():
        raise _bad("cuda", expected, states,
                   ValueError(f"{len(states)} states for {torch.cuda.device_count()} CUDA devices"))
    for index, value in enumerate(states):
        try:
            torch.Generator(device=f"cuda:{index}").set_state(value)
        except (RuntimeError, TypeError, ValueError) as error:
            raise _bad("cuda", expected, states, type(error)(f"item {index}: {error}")) from None


def _check_numpy(value: Any) -> None:
    """Raise where ``numpy.random.RandomState.set_state`` would refuse ``value``."""
    # NumPy before 1.26 reads a legacy tuple's items unchecked: 2 or 4 items crashed the interpreter there.
    if isinstance(value, (tuple, list)) and len(value) in (0, 1, 2, 4):
        raise ValueError(f"a legacy NumPy state has 3 or 5 items (name, key, position[, has_gauss, gauss]), "
                         f"got {len(value)}")
    np.random.RandomState().set_state(value)


def _check(state: dict[str, Any]) -> None:
    """Raise for the first entry of ``state`` its generator would refuse, trying each on a fresh generator."""
    checks = {
        "python": ("a state from random.getstate()", lambda value: random.Random().setstate(value)),
        "numpy": ("a state from numpy.random.get_state()", _check_numpy),
        "torch": ("torch's CPU generator state (a 1-D uint8 tensor) from torch.get_rng_state()",
                  lambda value: torch.Generator().set_state(value)),
    }
    for key, (expected, check) in checks.items():
        if key in state:
            try:
                check(state[key])
            except Exception as error:  # whatever the generator raises: nothing has been applied yet
                raise _bad(key, expected, state[key], error) from None
    if "cuda" in state:
        _check_cuda(state["cuda"])


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generators from ``get_rng_state()`` (keys that are absent are left alone).

    Every entry is checked (on a fresh generator of its kind) before any generator is
    set, so a bad state changes nothing.  ``"cuda"`` is ignored on a machine without CUDA.

    Args:
        state: the dict from ``get_rng_state()``, or part of it.

    Raises:
        TypeError: ``state`` is not a dict, or an entry has the wrong type (the message names it).
        ValueError: ``state`` has a key other than ``python``, ``numpy``, ``torch``, ``cuda``, or an
            entry holds a value its generator refuses (the message names the entry).

    >>> state = get_rng_state()
    >>> first = random.random()
    >>> set_rng_state(state)
    >>> random.random() == first
    True
    >>> set_rng_state({"python": state["python"], "torch": "garbage"})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    TypeError: set_rng_state: expected torch's CPU generator state ... under 'torch', got a str (...); no generator ...
    """
    if not isinstance(state, dict):
        raise TypeError(f"set_rng_state: expected the dict from get_rng_state() as state, got {type(state).__name__}")
    unknown = [key for key in state if key not in ("python", "numpy", "torch", "cuda")]
    if unknown:
        raise ValueError(f"set_rng_state: expected keys among 'python', 'numpy', 'torch', 'cuda', "
                         f"got unknown key {unknown[0]!r}")
    _check(state)
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
