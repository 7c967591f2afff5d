"""Whether two models, Particles or parameter pytrees line up for arithmetic, without doing any."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Union

import torch
from torch import nn

from . import _algebra as algebra
from . import _tree_match
from ._errors import StructureError, class_names
from ._packed import _structure
from ._particle import Particle
from ._walk import layout_of, model_class

Tensor = torch.Tensor

__all__ = ["check_structure", "same_structure"]



class _Model(NamedTuple):
    """One side of a model comparison: what arithmetic compares, with the leaves fetched only to name a difference."""

    cls: type
    names: Sequence[str]
    signature: tuple
    leaves: Callable[[], Sequence[Tensor]]


def _model(value: Union[nn.Module, Particle]) -> _Model:
    if isinstance(value, Particle):
        return _Model(value.model_class, value._names, value._current_signature(), lambda: value._leaves)
    layout = _structure(value)  # a result not built yet is compared without building it
    return _Model(model_class(value), layout.names, layout.signature, lambda: layout_of(value).params)


def check_structure(a: Any, b: Any, /) -> None:
    """Raise ``StructureError`` unless ``a`` and ``b`` line up for arithmetic such as ``a + b``.

    Two models or Particles line up when they are of one class and list the same parameters
    (``named_parameters()`` order) with the same shapes, dtypes and devices.  Two pytrees of
    tensors (``nf.params(model)``, a state dict, nested lists...) line up when they have the
    same structure and their leaves agree in shape, dtype and device.  Nothing is computed,
    copied or packed; a result whose module tree is not built yet stays unbuilt.

    Args:
        a: an ``nn.Module``, a ``Particle`` or a pytree of tensors.
        b: the same kind as ``a``: a model or Particle, or a pytree (compare a model with a
            pytree through ``nf.params(model)``).

    Raises:
        StructureError: the first difference, named by parameter path with shapes and dtypes
            (``DeviceMismatchError`` when only devices differ), or the two classes.
        TypeError: an operand is ``None``, a pytree with a leaf that is not a tensor, or a
            model compared with a pytree.

    >>> import torch
    >>> check_structure(torch.nn.Linear(2, 1), torch.nn.Linear(2, 1))
    >>> try:
    ...     check_structure(torch.nn.Linear(2, 1), torch.nn.Linear(3, 1))
    ... except StructureError as error:
    ...     print(error)
    check_structure: parameter 'weight' differs: shape (1, 2) float32 vs shape (1, 3) float32
    """
    _check("check_structure", a, b)


def _check(fn: str, a: Any, b: Any) -> None:
    """``check_structure``, its messages starting with ``fn`` (the public function called)."""
    models = isinstance(a, (nn.Module, Particle)), isinstance(b, (nn.Module, Particle))
    if models == (True, True):
        first, second = _model(a), _model(b)
        if first.cls is not second.cls:
            names = class_names(first.cls, second.cls)
            raise StructureError(f"{fn}: the first operand is a {names[0]} and the second a "
                                 f"{names[1]}; arithmetic combines models of one class")
        if first.names is second.names and first.signature is second.signature:
            return  # models built from one another share both: the common case costs two identity checks
        if list(first.names) == list(second.names) and first.signature == second.signature:
            return
        # names, then the leaves as they are now (what was recorded may be older: a Particle made
        # before ``param.data = ...`` gave a parameter another shape), exactly as arithmetic does
        algebra.check_state(fn, first.names, first.leaves(), second.names, second.leaves())
        return
    if any(models):
        model, other = ("first", "second") if models[0] else ("second", "first")
        raise TypeError(f"{fn}: the {model} operand is a model and the {other} is "
                        f"{type(b if models[0] else a).__name__}; compare a model with a model or a Particle, "
                        "and a pytree with a pytree (nf.params(model) is a model's pytree)")
    _tree_match.aligned(fn, a, b)


def same_structure(a: Any, b: Any, /) -> bool:
    """``True`` when ``check_structure(a, b)`` passes: ``a`` and ``b`` line up for arithmetic.

    Args:
        a, b: as for ``check_structure``.

    Returns:
        ``False`` where ``check_structure`` raises ``StructureError``, else ``True``.

    Raises:
        TypeError: as ``check_structure`` (bad operands are errors, not ``False``).

    >>> import torch
    >>> same_structure(torch.nn.Linear(2, 1), torch.nn.Linear(2, 1))
    True
    >>> same_structure({"w": torch.ones(2)}, {"w": torch.ones(2, dtype=torch.float64)})
    False
    """
    try:
        _check("same_structure", a, b)
    except StructureError:
        return False
    return True
