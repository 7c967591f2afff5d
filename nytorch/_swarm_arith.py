"""Arithmetic of a ``Swarm``: its operators, ``add``/``lerp`` and reductions, one kernel per dtype group.

A mixin for ``Swarm`` (which provides ``_spec``, ``_flats``, ``_size`` and ``_new``); every
method is one call into ``_swarm_ops``.  Doctests use ``nytorch.Swarm``'s constructors.
"""
from __future__ import annotations

from typing import Any, Union

import numpy as np
import torch
from typing_extensions import Self

from . import _leafwise as lw
from . import _scalars as scalars
from . import _swarm_ops as ops
from ._errors import StructureError
from ._operators import Operators
from ._particle import Particle
from ._swarm_spec import Spec

Tensor = torch.Tensor

__all__ = ["SwarmArithmetic"]


class SwarmArithmetic(Operators):
    """``add``, ``lerp``, ``clone``, ``w @ s``, ``mean``, ``norm``; the operators come from ``Operators``
    (the one operator table), routed through this class's broadcasting ``_binary``."""

    __slots__ = ()
    _spec: Spec
    _flats: list[Tensor]
    _size: int

    def _new(self, flats: list[Tensor], spec: Any = None, size: Any = None) -> Self:  # type: ignore[override]
        raise NotImplementedError

    # -- arithmetic -----------------------------------------------------------------------------
    def _binary(self, op: lw.Op, *others: object, reflected: bool = False) -> Self:
        spec = self._spec
        values = [ops.operand(op.name, spec, self._size, other, reflected=reflected) for other in others]
        return self._new(ops.combine(op, spec, self._flats, *values), size=None if self._flats else self._size)

    def _binary_(self, op: lw.Op, *others: object) -> Self:
        spec = self._spec
        values = [ops.operand(op.name, spec, self._size, other, inplace=True) for other in others]
        ops.check_writable(op.name, spec, self._flats, True)
        self._check_converted(op.name, values)
        ops.combine_(op, spec, self._flats, *values)
        return self

    def _check_converted(self, fn: str, values: list[Any]) -> None:
        """Refuse, before writing, a number torch would refuse for some group half-way (``scalars.check_converted``)."""
        spec = self._spec
        for value in values:
            if not isinstance(value, list):
                scalars.check_converted(fn, value, lambda: [(spec.leaf_name(g), group.dtype)
                                                       for g, group in enumerate(spec.groups) if group.active])

    def _reflected(self, op: lw.Op, other: object) -> Self:
        return self._binary(lw.reflected_op(op, other), other, reflected=True)

    def add(self, other: Any, *, alpha: Union[int, float] = 1) -> Self:
        """``self + alpha * other`` in one kernel per group (``torch.add`` with ``alpha``).

        Args:
            other: any operand the operators take: a number, a 0-dim tensor, a 1-D tensor of ``P``
                per-member weights, a Particle or model of the member structure, or a Swarm.
            alpha: a real number multiplying ``other``.

        Returns:
            A new swarm.

        Raises:
            TypeError: ``alpha`` is not a real number (booleans included), ``other`` is an unsupported
                operand or of another model class, or a number that would change a dtype.
            StructureError: ``other``'s names, shapes or dtypes, its weight count or its swarm size differ.
            DeviceMismatchError: ``other`` lives on another device.
            OverflowError: a Python int ``other`` or ``alpha`` does not fit in 64 bits (what torch
                takes for a scalar).

        >>> from nytorch import Swarm
        >>> s = Swarm.zeros(torch.nn.Linear(1, 1), 2)
        >>> s.add(s + 1, alpha=-0.5).params["bias"].flatten()
        tensor([-0.5000, -0.5000])
        """
        return self._binary(ops.AXPY, other, self._check_alpha("add", alpha))

    def add_(self, other: Any, *, alpha: Union[int, float] = 1) -> Self:
        """In place ``self += alpha * other`` (the SGD step ``swarm.add_(grads, alpha=-lr)``).

        Args:
            other, alpha: as for ``add``.

        Returns:
            ``self``.

        Raises:
            TypeError / StructureError / DeviceMismatchError / OverflowError: as for ``add``; nothing
                is written.
            TypeError: torch has no such in-place kernel for a group's dtype (float8); nothing is written.
            RuntimeError: the swarm holds inference tensors and this runs outside ``torch.inference_mode()``,
                or torch cannot convert a number ``alpha`` to a member tensor's dtype (``1e10`` on float16).

        >>> from nytorch import Swarm
        >>> s = Swarm.zeros(torch.nn.Linear(1, 1), 2)
        >>> s.add_(torch.tensor([1.0, 2.0]), alpha=3).params["bias"].flatten()
        tensor([3., 6.])
        """
        alpha = self._check_alpha("add_", alpha)
        spec = self._spec
        ops.check_writable("add_", spec, self._flats, True)
        values = [ops.operand(ops.AXPY.name, spec, self._size, value, inplace=True) for value in (other, alpha)]
        ops.check_numbers_fit("add_", spec, self._flats, ops.AXPY.leaf, *values)  # an alpha too large for a later group
        ops.combine_(ops.AXPY, spec, self._flats, *values, fn="add_")
        return self

    def _check_alpha(self, fn: str, alpha: object) -> Union[int, float]:
        """``alpha`` as a Python number (NumPy ones are numbers like any other); booleans are refused."""
        if isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, (int, float, np.integer, np.floating)):
            raise TypeError(f"{fn}: expected a real number as alpha, got {type(alpha).__name__}")
        return alpha.item() if isinstance(alpha, np.generic) else alpha

    def lerp(self, end: Any, weight: Any) -> Self:
        """``self + weight * (end - self)`` for every member; ``weight`` a number or ``P`` per-member weights.

        Args:
            end: a Particle or model (every member moves toward it), a Swarm, or a number.
            weight: a number, a 0-dim tensor, or a 1-D tensor of ``P`` per-member weights.

        Returns:
            A new swarm.

        Raises:
            TypeError / StructureError / DeviceMismatchError / OverflowError: an operand as for ``add``.

        >>> from nytorch import Swarm
        >>> s = Swarm.zeros(torch.nn.Linear(1, 1), 2)
        >>> s.lerp(s + 10, torch.tensor([0.1, 0.5])).params["bias"].flatten()
        tensor([1., 5.])
        """
        operands = ops.lerp_operands("lerp", self._spec, self._size, end, weight, False)
        return self._new(ops.combine(lw.LERP, self._spec, self._flats, *operands),
                         size=None if self._flats else self._size)

    def lerp_(self, end: Any, weight: Any) -> Self:
        """In place ``lerp`` (one fused pass per group): an EMA of every member toward ``end``.

        Args:
            end, weight: as for ``lerp``.

        Returns:
            ``self``.

        Raises:
            TypeError / StructureError / DeviceMismatchError / OverflowError: as for ``lerp``; nothing
                is written.
            TypeError: torch has no such in-place kernel for a group's dtype (float8); nothing is written.
            RuntimeError: the swarm holds inference tensors and this runs outside ``torch.inference_mode()``,
                or a number ``weight`` does not fit in a member tensor's dtype.

        >>> from nytorch import Swarm
        >>> s = Swarm.zeros(torch.nn.Linear(1, 1), 2)
        >>> s.lerp_(1.0, 0.25).params["bias"].flatten()
        tensor([0.2500, 0.2500])
        """
        operands = ops.lerp_operands("lerp_", self._spec, self._size, end, weight, True)
        ops.check_writable("lerp_", self._spec, self._flats, True)
        self._check_converted("lerp_", operands)
        ops.combine_(lw.LERP, self._spec, self._flats, *operands, fn="lerp_")
        return self

    def clone(self) -> Self:
        """A copy with its own storage.

        Returns:
            A new swarm with the same values.

        >>> from nytorch import Swarm
        >>> s = Swarm.zeros(torch.nn.Linear(1, 1), 2)
        >>> s.clone().params["bias"].data_ptr() != s.params["bias"].data_ptr()
        True
        """
        return self._new([flat.clone() for flat in self._flats])

    # -- reductions ------------------------------------------------------------------------------
    def __rmatmul__(self, weights: Any) -> Any:
        """``w @ swarm``: the weighted sum ``Σ w[i] * swarm[i]`` as a Particle (``w`` of shape ``(P,)``);
        a ``(Q, P)`` matrix gives a Swarm of ``Q`` mixtures.  Non-arithmetic leaves are member 0's.

        Computed without autograd, like every Swarm operator: no gradient reaches ``w`` (nor the
        ``params`` views, when they require grad).  For a learned soup, mix the views yourself and run
        the mixture with ``nf.call``: ``nf.tree_map(lambda v: torch.tensordot(w, v, 1), swarm.params)``.

        >>> from nytorch import Swarm
        >>> s = Swarm.stack([torch.nn.Linear(1, 1) for _ in range(3)])
        >>> total = torch.ones(3) @ s
        >>> torch.allclose(total.params["bias"], s.params["bias"].sum(0))
        True
        """
        if not isinstance(weights, Tensor):
            return NotImplemented
        if weights.dim() not in (1, 2) or weights.shape[-1] != self._size:
            raise StructureError(f"matmul: expected weights of shape ({self._size},) or (Q, {self._size}), "
                                 f"got {tuple(weights.shape)}")
        matrix = weights if weights.dim() == 2 else weights.unsqueeze(0)
        mixed: Any = self._new(ops.mixed("matmul", self._spec, self._flats, self._size, matrix), size=matrix.shape[0])
        return mixed[0] if weights.dim() == 1 else mixed

    def mean(self) -> Particle:
        """The average member as a new Particle (non-arithmetic leaves, e.g. integer buffers, are member 0's).

        Returns:
            A new Particle of the member structure (its own storage), computed without autograd.

        Raises:
            ValueError: the swarm is empty.

        >>> from nytorch import Swarm
        >>> s = Swarm.stack([torch.nn.Linear(1, 1) for _ in range(4)])
        >>> torch.allclose(s.mean().params["weight"], s.params["weight"].mean(0))
        True
        """
        mean: Any = self._new(ops.mean_rows(self._spec, self._flats, self._size), size=1)
        return mean[0]  # type: ignore[no-any-return]

    def norm(self) -> Tensor:
        """Per-member L2 norm over the arithmetic values, shape ``(P,)``.

        Returns:
            A ``(P,)`` tensor: the norm of each member's arithmetic values together (zeros when it has none), on
            the device of its first floating tensor (a swarm spread over devices too).  It is computed
            without autograd, so it carries no gradient even when the ``params`` views require grad; as a
            differentiable penalty use ``sum(v.flatten(1).pow(2).sum(1) for v in swarm.params.values()).sqrt()``.

        >>> from nytorch import Swarm
        >>> Swarm.zeros(torch.nn.Linear(3, 1), 2).add(1).norm()
        tensor([2., 2.])
        """
        return ops.norms(self._spec, self._flats, self._size)

