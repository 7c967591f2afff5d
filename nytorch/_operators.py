"""The one operator table shared by ``Particle`` and ``NytoModule``.

A class mixes in ``Operators`` and provides three small methods: ``_state()``
(names, leaves, configs), ``_operand(fn, other)`` (a leaf list or a scalar, or
``NotImplemented``) and ``_new(state, leaves)`` (a fresh instance).  Every
operator is then one call into ``_algebra``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, overload

import torch
from typing_extensions import Self

from . import _algebra as algebra
from . import _leafwise as lw
from . import _scalars as scalars
from ._config import ParamConfig

if TYPE_CHECKING:  # ``particle + swarm`` is a Swarm (``Swarm.__radd__`` answers): the overloads below say so
    from ._swarm import Swarm

Tensor = torch.Tensor


class State(NamedTuple):
    """What an operator needs of its left operand."""

    names: Sequence[str]
    leaves: Sequence[Tensor]
    configs: Optional[Sequence[ParamConfig]]
    source: Any  # whatever ``_new`` needs to build the result (a Layout, a Particle)


def defers(other: object) -> bool:
    """True for containers (e.g. ``Swarm``) that broadcast over particles: let them answer."""
    return getattr(other, "__nytorch_broadcasts__", False) is True


class Operators:
    """``+ - * / **``, their reflected and in-place forms, ``-x``, ``+x``, ``lerp``."""

    __slots__ = ()
    # NumPy defers to our reflected operators instead of broadcasting an array over us
    # (``np.ones(3) + p`` would otherwise build an object array of Particles).
    __array_ufunc__ = None

    # -- to be provided by the class ------------------------------------------------
    def _state(self) -> State:
        raise NotImplementedError

    def _operand(self, fn: str, other: object, state: State) -> Any:
        raise NotImplementedError

    def _new(self, state: State, leaves: list[Tensor]) -> Self:
        raise NotImplementedError

    # -- shared machinery -------------------------------------------------------------
    def _binary(self, op: lw.Op, *others: object, reflected: bool = False) -> Self:
        state = self._state()
        operands = []
        for other in others:
            if defers(other):
                return NotImplemented
            operands.append(self._operand(op.name, other, state))
        leaves = algebra.combine(op, state.names, state.leaves, *operands,
                                 configs=state.configs, reflected=reflected)
        return self._new(state, leaves)

    def _binary_(self, op: lw.Op, *others: object) -> Self:
        state = self._state()
        operands = []
        for other in others:
            if defers(other):
                raise TypeError(f"{op.name}: cannot write a {type(other).__name__} into a single "
                                f"{type(self).__name__} in place; use the out-of-place form")
            operand = self._operand(op.name, other, state)
            if isinstance(operand, list):  # in place: re-check every leaf, cached signatures may be stale
                lw.check_pairs(op.name, state.names, state.leaves, operand)
            operands.append(operand)
        algebra.combine_(op, state.names, state.leaves, *operands, configs=state.configs)
        return self

    def _reflected(self, op: lw.Op, other: object) -> Self:
        if defers(other):
            return NotImplemented
        if not scalars.is_scalar(other):
            state = self._state()
            self._operand(op.name, other, state)  # raises the informative TypeError
        return self._binary(lw.reflected_op(op, other), other, reflected=True)

    # -- operators ---------------------------------------------------------------------
    @overload
    def __add__(self, other: Swarm) -> Swarm: ...
    @overload
    def __add__(self, other: Any) -> Self: ...
    def __add__(self, other: Any) -> Any:
        return self._binary(lw.ADD, other)

    def __radd__(self, other: Any) -> Self:
        return self._reflected(lw.ADD, other)

    @overload
    def __iadd__(self, other: Swarm) -> Swarm: ...  # a TypeError, unless self is a Swarm
    @overload
    def __iadd__(self, other: Any) -> Self: ...
    def __iadd__(self, other: Any) -> Any:  # type: ignore[misc]  # mypy finds no overloaded in-place form compatible
        return self._binary_(lw.ADD, other)

    @overload
    def __sub__(self, other: Swarm) -> Swarm: ...
    @overload
    def __sub__(self, other: Any) -> Self: ...
    def __sub__(self, other: Any) -> Any:
        return self._binary(lw.SUB, other)

    def __rsub__(self, other: Any) -> Self:
        return self._reflected(lw.RSUB, other)

    @overload
    def __isub__(self, other: Swarm) -> Swarm: ...  # a TypeError, unless self is a Swarm
    @overload
    def __isub__(self, other: Any) -> Self: ...
    def __isub__(self, other: Any) -> Any:  # type: ignore[misc]  # (see __iadd__)
        return self._binary_(lw.SUB, other)

    @overload
    def __mul__(self, other: Swarm) -> Swarm: ...
    @overload
    def __mul__(self, other: Any) -> Self: ...
    def __mul__(self, other: Any) -> Any:
        return self._binary(lw.MUL, other)

    def __rmul__(self, other: Any) -> Self:
        return self._reflected(lw.MUL, other)

    @overload
    def __imul__(self, other: Swarm) -> Swarm: ...  # a TypeError, unless self is a Swarm
    @overload
    def __imul__(self, other: Any) -> Self: ...
    def __imul__(self, other: Any) -> Any:  # type: ignore[misc]  # (see __iadd__)
        return self._binary_(lw.MUL, other)

    @overload
    def __truediv__(self, other: Swarm) -> Swarm: ...
    @overload
    def __truediv__(self, other: Any) -> Self: ...
    def __truediv__(self, other: Any) -> Any:
        return self._binary(lw.DIV, other)

    def __rtruediv__(self, other: Any) -> Self:
        return self._reflected(lw.RTRUEDIV, other)

    @overload
    def __itruediv__(self, other: Swarm) -> Swarm: ...  # a TypeError, unless self is a Swarm
    @overload
    def __itruediv__(self, other: Any) -> Self: ...
    def __itruediv__(self, other: Any) -> Any:  # type: ignore[misc]  # (see __iadd__)
        return self._binary_(lw.DIV, other)

    @overload
    def __pow__(self, other: Swarm) -> Swarm: ...
    @overload
    def __pow__(self, other: Any) -> Self: ...
    def __pow__(self, other: Any) -> Any:
        return self._binary(lw.POW, other)

    def __rpow__(self, other: Any) -> Self:
        return self._reflected(lw.RPOW, other)

    @overload
    def __ipow__(self, other: Swarm) -> Swarm: ...  # a TypeError, unless self is a Swarm
    @overload
    def __ipow__(self, other: Any) -> Self: ...
    def __ipow__(self, other: Any) -> Any:  # type: ignore[misc]  # (see __iadd__)
        return self._binary_(lw.POW, other)

    def __neg__(self) -> Self:
        return self._binary(lw.NEG)

    def __pos__(self) -> Self:
        return self.clone()

    def clone(self) -> Self:
        """A copy with fresh storage (non-operational ``clone=False`` parameters are shared).

        >>> import nytorch
        >>> p = nytorch.particle(torch.nn.Linear(2, 1))
        >>> q = p.clone()
        >>> torch.equal(q.params["weight"], p.params["weight"]), q.params["weight"] is p.params["weight"]
        (True, False)
        """
        state = self._state()
        return self._new(state, algebra.clone_all(state.leaves, state.configs))

    def lerp(self, end: Any, weight: Any) -> Self:
        """``self + weight * (end - self)``: the EMA / Polyak step as a new object.

        See ``lerp_`` for the in-place form.

        Args:
            end: a model or Particle of this class and structure.
            weight: a scalar (a Python number or a 0-dim tensor).

        Returns:
            A new object of this kind (Particle or module).

        Raises:
            TypeError: ``end`` is a number, a Swarm (use the Swarm's own ``lerp``), or a model or
                Particle of another class; ``weight`` is not an operand arithmetic takes (a str, a list...).
            StructureError: ``end``'s parameters differ (the message names the first one).
            OverflowError: a Python int ``weight`` does not fit in 64 bits (what torch takes for a scalar).

        >>> import nytorch
        >>> a, b = nytorch.particle(torch.nn.Linear(2, 1)), nytorch.particle(torch.nn.Linear(2, 1))
        >>> mid = a.lerp(b, 0.25)
        >>> torch.allclose(mid.params["bias"], 0.75 * a.params["bias"] + 0.25 * b.params["bias"])
        True
        """
        _model_end("lerp", end)
        result = self._binary(lw.LERP, end, weight)
        if result is NotImplemented:
            raise TypeError(f"lerp: {type(end).__name__} broadcasts over particles; call its own lerp instead")
        return result

    def lerp_(self, end: Any, weight: Any) -> Self:
        """In place ``self ← self + weight * (end - self)`` in one fused pass (EMA / soft target update).

        Args:
            end, weight: as for ``lerp``.

        Returns:
            ``self``.

        Raises:
            TypeError / StructureError / OverflowError: as ``lerp``; nothing is written when it raises.
            RuntimeError: a tensor to write is an inference tensor and this runs outside
                ``torch.inference_mode()``; nothing is written.

        >>> import nytorch
        >>> online, target = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
        >>> ema = nytorch.particle(target)                       # views target's tensors
        >>> expected = torch.lerp(target.weight, online.weight, 0.01)
        >>> _ = ema.lerp_(online, 0.01)                          # target ← 0.99·target + 0.01·online
        >>> torch.allclose(target.weight, expected)
        True
        """
        _model_end("lerp_", end)
        return self._binary_(lw.LERP, end, weight)

    def randn(self) -> Self:
        """Same structure, N(0, 1) values (reproducible under ``torch.manual_seed``).

        >>> import nytorch
        >>> p = nytorch.particle(torch.nn.Linear(2, 1))
        >>> _ = torch.manual_seed(0); a = p.randn()
        >>> _ = torch.manual_seed(0); b = p.randn()
        >>> tuple(a.params["weight"].shape), torch.equal(a.params["weight"], b.params["weight"])
        ((1, 2), True)
        """
        state = self._state()
        return self._new(state, algebra.map_unary(torch.randn_like, state.leaves, state.configs))

    def rand(self) -> Self:
        """Same structure, U[0, 1) values (nytorch 1.1's ``rand``).

        >>> import nytorch
        >>> values = nytorch.particle(torch.nn.Linear(2, 1)).rand().params["weight"]
        >>> bool(((0 <= values) & (values < 1)).all())
        True
        """
        state = self._state()
        return self._new(state, algebra.map_unary(torch.rand_like, state.leaves, state.configs))


def _model_end(fn: str, end: object) -> None:
    """``TypeError`` for a number as ``end``: ``lerp`` moves toward another model (``nf.lerp`` takes numbers)."""
    if scalars.is_scalar(end):
        raise TypeError(f"{fn}: expected a model or a Particle as end, got the number {end!r}; move toward a number "
                        f"with nytorch.functional.lerp(params, {end!r}, weight) or with self + weight * ({end!r} - self)")
