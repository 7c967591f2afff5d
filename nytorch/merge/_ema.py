"""EMA / Polyak averaging in place: ``target ← (1 − τ)·target + τ·online`` as one fused ``lerp_``.

The arithmetic is the leaf-wise engine's ``LERP`` (``torch._foreach_lerp_``);
this file only decides which leaves are averaged, which are copied and which
are left alone:

* floating parameters are averaged (non-operational ``ParamConfig`` ones are left alone);
* integer / bool leaves (``num_batches_tracked``, masks) are copied, never averaged or truncated;
* floating buffers are averaged, copied, or left alone (``buffers="average" | "copy" | "keep"``);
  averaged ones follow IEEE arithmetic where an input is inf or NaN (``_ieee.Exact``: ``lerp`` of two
  equal infinities is NaN, their weighted mean that infinity), parameters ``torch.lerp``;
* buffers inside a ``torch.nn.utils.parametrize`` parametrization (``orthogonal``'s ``base``,
  ``spectral_norm``'s ``_u`` / ``_v``) are copied like integer ones: an average of two of them means nothing;
* tied weights are one leaf, so they are updated once.
"""
from __future__ import annotations

import numbers
import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional, TypeVar, Union

import torch

from .. import _leafwise as lw
from .. import _probe as probe
from .. import _scalars as scalars
from .._algebra import check_writable, footprint, written_once
from .._errors import describe
from ._ieee import Exact
from ._state import BufferMode, Operand, check_buffers, matched, operand, parametrization_buffers

Tensor = torch.Tensor
T = TypeVar("T")
Weight = Union[float, Tensor]

__all__ = ["ema_", "Plan", "plan", "apply_plan_", "weight_of", "check_weight", "lerp_", "refuse_unwritable"]


class Plan(NamedTuple):
    """Indices of the leaves an EMA update averages (``lerp``) and copies (``copy``).

    ``exact``: the averaged floating buffers (a subset of ``lerp``), whose averages follow IEEE
    arithmetic where ``lerp`` leaves inf or NaN (``_ieee.Exact``).  ``usual``: every averaged leaf
    has a ``_probe.KNOWN`` dtype (else ``check_kernels`` runs before each update).
    """

    lerp: list[int]
    copy: list[int]
    exact: list[int]
    usual: bool = True


def _unit(fn: str, name: str, value: object) -> Weight:
    if isinstance(value, Tensor):
        if value.dim() != 0 or not (value.is_floating_point() or value.is_complex()):
            raise TypeError(f"{fn}: expected {name} to be a number or a 0-dim floating tensor, "
                            f"got a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}")
        value = value.detach()  # the update runs without autograd (and fused lerp_ refuses a weight that requires grad)
        # checked like a float where reading it is free; an accelerator's would cost a device sync
        if value.device.type == "cpu" and not value.is_complex() and not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{fn}: expected {name} to be in [0, 1], got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: expected {name} to be a number in [0, 1], got {type(value).__name__}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{fn}: expected {name} to be in [0, 1], got {value!r}")
    return float(value)


def weight_of(fn: str, decay: object, tau: object) -> Weight:
    """The interpolation weight ``tau`` from exactly one of ``decay`` (``tau = 1 − decay``) or ``tau``.

    Raises:
        TypeError: neither or both are given, or one is not a number / 0-dim tensor.
        ValueError: a number, or a 0-dim CPU tensor, outside [0, 1] (a tensor on an accelerator
            is not read: that would wait for the device).

    >>> weight_of("demo", 0.75, None)
    0.25
    >>> weight_of("demo", None, torch.tensor(1.5))
    Traceback (most recent call last):
    ...
    ValueError: demo: expected tau to be in [0, 1], got tensor(1.5000)
    """
    if (decay is None) == (tau is None):
        given = "both" if decay is not None else "neither"
        raise TypeError(f"{fn}: expected exactly one of decay= (target keeps this fraction) or tau= "
                        f"(fraction taken from online), got {given}")
    if tau is not None:
        return _unit(fn, "tau", tau)
    value = _unit(fn, "decay", decay)
    return 1.0 - value


def plan(target: Operand, buffers: BufferMode, *, alias: Callable[[Tensor], object] = footprint) -> Plan:
    """Which leaves of ``target`` an EMA update averages and which it copies.

    Tied leaves are planned once (``_algebra.written_once``): one tensor under two names in a dict
    target (a ``state_dict``), two Parameters over one storage, a buffer over a parameter.  ``alias``
    tells them: ``footprint`` (the same memory in any view) for updates in place, ``tie_key`` (the
    same view) for ``EMA``'s copy, which keeps only such ties.
    """
    leaves, count = target.leaves, target.params
    planned = leaves if buffers != "keep" else leaves[:count]
    inside = parametrization_buffers(target) if buffers == "average" else frozenset()
    once = written_once(planned, [True] * len(planned), key=alias)
    # the common case, without per-leaf calls: no configs, and no two parameters over one memory
    if target.configs is None and target.kind != "tree" and all(once[:count]):
        dtypes = list(map(_DTYPE, leaves[:count]))  # each read once: reading a tensor's dtype is what costs here
        arithmetic = lw.arithmetic_dtypes(dtypes)
        lerp = [i for i in range(count) if arithmetic[i]]
        copy = [i for i in range(count) if not arithmetic[i]]
        usual = probe.KNOWN.issuperset(dtypes)
    else:
        lerp, copy = [], []
        for index in range(count):
            if once[index] and target.operational(index):
                (lerp if lw.is_arithmetic(leaves[index]) else copy).append(index)
        usual = probe.KNOWN.issuperset(leaves[i].dtype for i in lerp)
    parameters = len(lerp)
    exact = []
    for index in range(count, len(planned)):
        if once[index]:
            averaged = buffers == "average" and lw.is_arithmetic(leaves[index]) and index not in inside
            (lerp if averaged else copy).append(index)
            if averaged:
                exact.append(index)
    usual = usual and probe.KNOWN.issuperset(leaves[i].dtype for i in lerp[parameters:])
    return Plan(lerp, copy, exact, usual)


def lerp_(ends: list[Tensor], starts: list[Tensor], tau: Weight) -> None:
    """The engine's fused ``LERP`` in place on prepared, checked, all-floating leaf lists."""
    if not ends:
        return
    # a 0-dim tensor weight goes through the engine, which runs it per leaf: ``_foreach_lerp_`` would read it
    # as a Python number, which rounds unlike ``torch.lerp`` (and ``Particle.lerp_``) on float16 / bfloat16
    if lw.transforms_active() or lw.LERP.foreach_ is None or isinstance(tau, Tensor):
        lw.apply_(lw.LERP, ends, starts, tau, active=[True] * len(ends))
    else:
        lw.LERP.foreach_(ends, starts, tau)


def check_kernels(fn: str, model: Operand, steps: Sequence[int], tau: Weight) -> None:
    """Refuse, before writing, a ``lerp_`` torch has no kernel for on the dtype of some leaf of ``steps``
    (``_probe.check_``: float8 and complex32 have none).  Callers skip it for a ``Plan`` that is ``usual``."""
    leaves = [model.leaves[i] for i in steps]
    probe.check_(fn, lw.LERP, leaves, map(_DTYPE, leaves), [leaves, tau],
                 lambda k: f"parameter {model.names[steps[k]]!r} ({describe(leaves[k])})")


_DTYPE = operator.attrgetter("dtype")


def refuse_unwritable(fn: str, model: Operand, steps: list[int]) -> None:
    """Refuse before writing ``model``'s ``steps`` when torch would refuse part-way (inference tensors
    outside inference mode); the scan is skipped when no leaf is an inference tensor."""
    if not torch.is_inference_mode_enabled() and any(map(Tensor.is_inference, model.leaves)):
        check_writable(fn, [model.names[i] for i in steps], [model.leaves[i] for i in steps])


@torch.no_grad()
def apply_plan_(steps: Plan, target: Sequence[Tensor], online: Sequence[Tensor], tau: Weight) -> None:
    """Run one planned EMA update: fused ``lerp_`` on the averaged leaves, ``copy_`` on the copied ones."""
    exact = Exact([target[i] for i in steps.exact], [online[i] for i in steps.exact]) if steps.exact else None
    if exact is not None:
        exact.before(tau)
    if steps.lerp:
        lerp_([target[i] for i in steps.lerp], [online[i] for i in steps.lerp], tau)
    if exact is not None:
        exact.after()
    if steps.copy:
        torch._foreach_copy_([target[i] for i in steps.copy], [online[i] for i in steps.copy])


def check_weight(fn: str, tau: Weight, target: Operand, steps: Plan) -> None:
    if isinstance(tau, float):
        return
    leaves = [target.leaves[i] for i in steps.lerp]
    scalars.check_scalar(fn, tau, [target.names[i] for i in steps.lerp], leaves, [True] * len(leaves))


def ema_(target: T, online: Any, /, *, decay: Optional[Weight] = None, tau: Optional[Weight] = None,
         buffers: BufferMode = "average") -> T:
    """In place ``target ← (1 − τ)·target + τ·online`` (EMA, Polyak averaging, soft target update).

    The plain-torch equivalent is ``torch._foreach_lerp_(target_params, online_params, tau)``
    (timm's ``ModelEmaV3``), but with the right answers where that goes wrong: tied
    weights are updated once, integer buffers are copied (never averaged or truncated),
    and models of another structure raise instead of being zipped silently.

    Args:
        target: the average, updated in place: an ``nn.Module``, a ``Particle``, a ``Swarm``
            (every member at once) or a dict of tensors.
        online: the model being trained, of the same structure (same kinds as ``target``).
        decay: the fraction of ``target`` kept (``tau = 1 − decay``), e.g. 0.999.
        tau: the fraction of ``online`` taken, e.g. 0.005 (give exactly one of the two).  Either
            may be a 0-dim floating tensor (the update then rounds as ``torch.lerp`` with that weight
            does, tensor by tensor); on the CPU its value is checked like a float's, on an
            accelerator it is not read (that would wait for the device).
        buffers: floating buffers (BatchNorm statistics) are ``"average"``-d like
            parameters, ``"copy"``-ed from ``online``, or left alone with ``"keep"``.
            Averaged buffers are ``(1 − τ)·target + τ·online`` in IEEE arithmetic where
            either holds inf or NaN (a ``-inf`` mask stays ``-inf``; parameters follow
            ``torch.lerp``, which gives NaN there).  Integer buffers, and buffers inside a
            ``torch.nn.utils.parametrize`` parametrization (``orthogonal``'s ``base``,
            ``spectral_norm``'s ``_u`` / ``_v``), are copied unless ``"keep"``.  (In a dict
            every floating tensor counts as a parameter and every integer one is copied.)

    Returns:
        ``target``.

    Raises:
        StructureError: names, shapes or dtypes differ (the message names the parameter).
        DeviceMismatchError: a parameter lives on different devices.
        TypeError / ValueError: bad ``decay`` / ``tau`` / ``buffers`` or an unsupported operand.
        TypeError: ``target`` and ``online`` are models of two classes, or one is a Swarm and the other not.
        RuntimeError: ``target`` holds inference tensors (made under ``torch.inference_mode()``) and
            this runs outside it; nothing is written.
        TypeError: torch has no ``lerp_`` for the dtype of an averaged tensor (float8, complex32); nothing
            is written.

    >>> import torch
    >>> online = torch.nn.Linear(2, 1)
    >>> target = torch.nn.Linear(2, 1)
    >>> expected = torch.lerp(target.weight, online.weight, 0.1)
    >>> _ = ema_(target, online, decay=0.9)
    >>> torch.allclose(target.weight, expected)
    True
    """
    tau_value = weight_of("ema_", decay, tau)
    check_buffers("ema_", buffers)
    with_buffers = buffers != "keep"
    ends = operand("ema_", target, buffers=with_buffers, argument="target")
    starts = operand("ema_", online, buffers=with_buffers, argument="online")
    starts = matched("ema_", ends, starts, "online", reference="target")
    steps = plan(ends, buffers)
    check_weight("ema_", tau_value, ends, steps)
    refuse_unwritable("ema_", ends, steps.lerp + steps.copy)
    if not steps.usual:
        check_kernels("ema_", ends, steps.lerp, tau_value)
    apply_plan_(steps, ends.leaves, starts.leaves, tau_value)
    return target
