"""EMA decay schedules: ``step -> decay`` functions for warm-up (pass one to ``EMA(decay=...)``).

``step`` counts the updates already applied (0 at the first update).
"""
from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable

__all__ = ["Schedule", "warmup_decay", "power_decay"]

#: A decay schedule: the number of updates already applied -> the decay for the next one.
Schedule = Callable[[int], float]


def _fraction(fn: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{fn}: expected {name} to be a number in [0, 1], got {value!r}")
    return float(value)


def _positive(fn: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) > 0.0 \
            or not math.isfinite(float(value)):
        raise ValueError(f"{fn}: expected {name} to be a positive number, got {value!r}")
    return float(value)


def _step(fn: str, step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or int(step) < 0:
        raise ValueError(f"{fn}: expected step to be an integer >= 0, got {step!r}")
    return int(step)


def warmup_decay(decay: float) -> Schedule:
    """``step ↦ min(decay, (1 + step) / (10 + step))``: TensorFlow's EMA decay warm-up.

    It is ``tf.train.ExponentialMovingAverage``'s decay when given ``num_updates``.

    Early updates use a small decay (0.1, 0.18, 0.25, ...) so the average forgets its
    random start quickly; from step ``(10·decay − 1) / (1 − decay)`` on the decay is ``decay``.

    Args:
        decay: the final decay, in [0, 1].

    Returns:
        A schedule: ``schedule(step)`` is the decay for the update after ``step`` updates.

    Raises:
        ValueError: ``decay`` is outside [0, 1], or a step is negative or not an integer.

    >>> schedule = warmup_decay(0.999)
    >>> [round(schedule(step), 4) for step in (0, 1, 10, 100_000)]
    [0.1, 0.1818, 0.55, 0.999]
    """
    final = _fraction("warmup_decay", "decay", decay)
    # a partial of a module-level function, not a closure: an EMA holding it pickles (torch.save, spawn)
    return functools.partial(_warmup, final)


def _warmup(final: float, step: int) -> float:
    step = _step("warmup_decay", step)
    return min(final, (1.0 + step) / (10.0 + step))


def power_decay(decay: float, *, gamma: float = 1.0, power: float = 2 / 3, min_decay: float = 0.0) -> Schedule:
    """``step ↦ clamp(1 − (1 + step/gamma)^(−power), min_decay, decay)``, 0 at step 0: timm's EMA warm-up.

    The first update (step 0) has decay 0, i.e. copies the model, whatever ``min_decay``
    is (timm returns 0 before it applies ``min_decay``); ``power=2/3`` suits runs of about
    1M steps and ``power=3/4`` shorter ones (timm's advice).  The sequence equals timm's
    ``get_decay(step + 1)`` with ``use_warmup=True, update_after_step=0``.

    Args:
        decay: the largest decay, in [0, 1].
        gamma: the warm-up time scale (timm's ``warmup_gamma``), > 0.
        power: the warm-up exponent (timm's ``warmup_power``), > 0.
        min_decay: the smallest decay from step 1 on, in [0, decay].

    Returns:
        A schedule: ``schedule(step)`` is the decay for the update after ``step`` updates.

    Raises:
        ValueError: an argument is out of range, or a step is negative or not an integer.

    >>> schedule = power_decay(0.9999)
    >>> [round(schedule(step), 4) for step in (0, 1, 7, 10**9)]
    [0.0, 0.37, 0.75, 0.9999]
    >>> [round(power_decay(0.9999, power=0.75, min_decay=0.5)(step), 4) for step in (0, 1, 2)]
    [0.0, 0.5, 0.5613]
    """
    final = _fraction("power_decay", "decay", decay)
    gamma = _positive("power_decay", "gamma", gamma)
    power = _positive("power_decay", "power", power)
    floor = _fraction("power_decay", "min_decay", min_decay)
    if floor > final:
        raise ValueError(f"power_decay: expected min_decay <= decay, got min_decay={min_decay!r} > decay={decay!r}")
    return functools.partial(_power, final, gamma, power, floor)  # picklable, as ``warmup_decay``'s


def _power(final: float, gamma: float, power: float, floor: float, step: int) -> float:
    step = _step("power_decay", step)
    if step == 0:  # timm: ``if step <= 0: return 0.0``, before min_decay
        return 0.0
    value = 1.0 - (1.0 + step / gamma) ** -power
    return max(min(value, final), floor)
