"""``Particle``: any ``nn.Module``'s parameters as one value you can do arithmetic on."""
from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, Optional, cast

import torch
from torch import nn
from typing_extensions import Self, TypeVar

from . import _algebra as algebra
from . import _leafwise as lw
from . import _scalars as scalars
from ._config import ParamConfig, configs_for
from ._operators import Operators, State
from ._errors import StructureError, class_names, describe
from ._flags import flag
from ._flat import Flat, FlatPlan, find_flat, own_counters, plan_for, written
from ._packing import PACKED, lazy_name, pack_
from ._kernels import check_converted, compute, fill, kernel_, readable, writable
from ._packed import active_for, carried, flat_operands
from ._pool import give
from ._rebuild import rebuild
from ._types import ModuleT
from ._walk import Layout, _interned, layout_of, model_class, placement

#: The class of the model a Particle came from (``particle(net).module()`` is typed like ``net``);
#: a bare ``Particle`` annotation means ``Particle[nn.Module]``. nytorch 1.1's ``ParamProduct[Net]`` reads the same.
M = TypeVar("M", bound=nn.Module, covariant=True, default=nn.Module)

Tensor = torch.Tensor

__all__ = ["Particle", "particle", "layout_state"]


def layout_state(layout: Layout, buffers: bool) -> tuple[list[str], list[Tensor]]:
    """Names and leaves of a layout: parameters, then buffers when asked for."""
    if not buffers:
        return layout.names, layout.params
    return layout.names + layout.buffer_names, layout.params + layout.buffers


def _class_name(value: object) -> str:
    return type(value).__name__


class Particle(Operators, Generic[M]):
    """A model's parameters as a value: ``p + q``, ``0.9 * p``, ``p.randn()``, then ``p.module()``.

    Build one with ``nytorch.particle(model)`` (any ``nn.Module``) or ``NytoModule.product()``.
    Arithmetic gives new Particles holding fresh tensors; in-place operators
    (``p += q``) write into this Particle's tensors.  A Particle made straight from
    a model views that model's parameters, so ``particle(model) += 1`` updates the model.

    Operators run under ``torch.no_grad()``, as nytorch 1.1's did: results hold tensors with no
    autograd history, and no gradient reaches any operand (a 0-dim tensor that requires grad
    included).  To differentiate through model arithmetic (a learned interpolation weight, meta
    learning), use ``nytorch.functional`` (``nf.lerp``, ``nf.add``...) and ``nf.call``.

    Attributes:
        params: ``dict[str, Tensor]`` keyed like ``named_parameters()`` (detached views).

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Linear(2, 1)
    >>> p = particle(net)
    >>> doubled = (p * 2).module()
    >>> torch.equal(doubled.weight, net.weight * 2)
    True
    """

    __slots__ = ("_layout", "_names", "_leaf_list", "_with_buffers", "_signature",
                 "_flat", "_plan", "_looked", "_pickled", "__weakref__")

    def __init__(self, layout: Layout, names: Sequence[str], leaves: Optional[Sequence[Tensor]],
                 configs: Optional[Sequence[ParamConfig]] = None, with_buffers: bool = False,
                 signature: Optional[tuple] = None, flat: Optional[Flat] = None,
                 plan: Optional[FlatPlan] = None) -> None:
        """Private: use ``nytorch.particle(model)``, ``Particle.from_params`` or ``NytoModule.product()``."""
        self._layout = layout
        self._names = names
        self._leaf_list = None if leaves is None else list(leaves)
        del configs  # configs are read live from the model's config tables (see ``_configs``)
        self._with_buffers = with_buffers
        # A Particle records the shapes, dtypes and devices of its leaves when it is made.
        self._signature = _interned(lw.signature(self._leaves)) if signature is None else signature
        self._flat: Any = flat  # a Flat; None: not looked for yet; False: the leaves are not flat
        self._plan = plan
        self._looked = -1  # ``PACKED[0]`` when the leaves were found not flat: packing since may have made them

    @property
    def _configs(self) -> Optional[list[ParamConfig]]:
        """The current config of every leaf, shared with the model it came from (``None``: all default)."""
        return configs_for(self._layout, self._names)

    @property
    def _leaves(self) -> list[Tensor]:
        """The leaves, aligned with ``_names`` (views into the flat buffers, made on first use)."""
        if self._leaf_list is None:
            flat = self._flat
            self._leaf_list = flat.leaves()  # type: ignore[union-attr]
            # views of its buffers are out now (``params``, ``module()``): a later ``0.9 * p`` must not
            # share them (``Flat.scaled``), or writes through either would reach the other
            flat.owned = False  # type: ignore[union-attr]
        return self._leaf_list

    def __del__(self) -> None:
        # ``getattr``: an instance never initialised has no slots set (torch.compile makes such ones)
        flat = getattr(self, "_flat", None)
        # a result whose leaves were never taken: nobody else can hold its buffers (``_pool`` checks)
        if flat and self._leaf_list is None and flat.placement is None:
            try:
                give(flat.plan, flat.raw)
            except Exception:  # pragma: no cover - interpreter shutdown
                pass

    # -- Operators protocol -----------------------------------------------------------
    def _state(self) -> State:
        return State(self._names, self._leaves, self._configs, self)

    def _new(self, state: State, leaves: list[Tensor]) -> Self:
        return type(self)(self._layout, self._names, leaves, self._configs, self._with_buffers,
                          self._signature, None, self._plan)

    def _from_flat(self, flat: Flat) -> Self:
        return type(self)(self._layout, self._names, None, self._configs, self._with_buffers,
                          self._signature, flat, flat.plan)

    # -- the one-pass path over flat buffers --------------------------------------------
    def _active_for(self, configs: Optional[Sequence[ParamConfig]]) -> tuple[bool, ...]:
        return active_for(self._signature, configs)

    def _flat_form(self) -> Optional[Flat]:
        """This Particle's flat buffers, when its arithmetic leaves are (or sit in) one buffer per dtype."""
        flat = self._flat
        if flat is False:
            if self._looked == PACKED[0] or lw.transforms_active():
                return None
            flat = self._flat = None  # a model was packed since (``flatten_``, an EMA): these leaves may be now
        if lw.transforms_active():  # a transform's tensors have no address: per leaf there
            return None
        configs = self._configs
        active = None if configs is None else self._active_for(configs)
        if active is not None and flat is not None and flat.plan.active != active:
            return None  # a config changed since: the packing no longer matches what takes part
        if flat is None:
            plan = self._plan
            if plan is None or (active is not None and plan.active != active):
                plan = self._plan = plan_for(self._signature, active or self._active_for(None))
            flat = find_flat(plan, self._leaves)
            self._flat = False if flat is None else flat
            self._looked = PACKED[0]
            return flat
        if flat.placement is not None and not flat.still_views(self._leaves):
            self._flat = None  # the storage moved (``.data`` swap, ``.to()``): look again next time
            # ``param.data = ...`` can change a shape or dtype too: what was recorded is out of date
            self._signature, self._plan = _interned(lw.signature(self._leaves)), None
            return None
        return flat

    def _current_signature(self) -> tuple:
        """The leaves' signature as they are now.

        A Particle of a model views its Parameters, which ``param.data = ...`` can give another
        shape: flat ones notice it through their addresses (``_flat_form``), the others are read again.
        """
        if self._flat_form() is None:
            self._signature = _interned(lw.signature(self._leaves))
        return self._signature  # type: ignore[no-any-return]

    def _flat_operands(self, fn: str, others: tuple[object, ...], flat: Flat, reflected: bool,
                       inplace: Optional[lw.Op] = None) -> Optional[list]:
        return flat_operands(fn, self.model_class, self._names, self._signature, flat, others, reflected, inplace)

    def _carried(self, flat: Flat) -> dict[int, Tensor]:
        return carried(flat, self._configs if flat.rest else None)

    def _flat_binary(self, op: lw.Op, others: Sequence[object], reflected: bool = False) -> Optional[Self]:
        """``op`` as one kernel per flat buffer, or ``None`` when some operand is not flat like this one."""
        flat = self._flat_form()
        operands = None if flat is None else self._flat_operands(op.name, tuple(others), flat, reflected)
        if operands is None:
            return None
        return self._from_flat(compute(op, flat, operands, self._carried(flat)))  # type: ignore[arg-type]

    def _flat_binary_(self, op: lw.Op, others: Sequence[object]) -> bool:
        """``op`` in place, one kernel per flat buffer; ``False`` (nothing written) when not flat."""
        flat = self._flat_form()
        if flat is None:
            return False
        packs = PACKED[0]
        operands = self._flat_operands(op.name, tuple(others), flat, False, op)  # (kernels checked before packing)
        if operands is None:
            return False
        if PACKED[0] != packs and not flat.still_views(self._leaves):
            return False  # packing an operand moved a Parameter this Particle shares with it: per leaf then
        check_converted(op.name, self._names, flat, operands)
        kernel_(op, writable(op.name, self._names, flat), readable(operands))
        if flat.placement is not None:  # leaves of someone else's storage (a model's Parameters)
            written(self._leaves, flat.plan)
        return True

    def _binary(self, op: lw.Op, *others: object, reflected: bool = False) -> Self:
        result = self._flat_binary(op, others, reflected)
        return super()._binary(op, *others, reflected=reflected) if result is None else result

    def _binary_(self, op: lw.Op, *others: object) -> Self:
        return self if self._flat_binary_(op, others) else super()._binary_(op, *others)

    def _flat_unary(self, fn: Callable[[Tensor], Tensor]) -> Optional[Self]:
        flat = self._flat_form()
        if flat is None:
            return None
        with torch.no_grad():
            return self._from_flat(Flat(flat.plan, [fn(buffer) for buffer in flat.readable()], self._carried(flat),
                                        owned=True))

    def _flat_fill(self, method: Callable[[Tensor], Any]) -> Optional[Self]:
        """A flat result whose leaf views are filled by ``method`` in leaf order (see ``_kernels.fill``)."""
        flat = self._flat_form()
        if flat is None:
            return None
        return self._from_flat(Flat(flat.plan, fill(flat, method), self._carried(flat), owned=True))

    def clone(self) -> Self:
        """A copy with fresh storage (non-operational ``clone=False`` parameters are shared).

        Returns:
            A new Particle of the same structure.

        >>> p = particle(torch.nn.Linear(1, 1))
        >>> torch.equal(p.clone().params["weight"], p.params["weight"])
        True
        """
        result = self._flat_unary(torch.clone)
        return super().clone() if result is None else result

    def randn(self) -> Self:
        """Same structure, N(0, 1) values (reproducible under ``torch.manual_seed``).

        Returns:
            A new Particle (non-operational parameters and integer leaves are carried over, not drawn).

        >>> tuple(particle(torch.nn.Linear(2, 1)).randn().params["weight"].shape)
        (1, 2)
        """
        result = self._flat_fill(Tensor.normal_)
        return super().randn() if result is None else result

    def rand(self) -> Self:
        """Same structure, U[0, 1) values (nytorch 1.1's ``rand``).

        Returns:
            A new Particle (non-operational parameters and integer leaves are carried over, not drawn).

        >>> bool((particle(torch.nn.Linear(2, 1)).rand().params["bias"] < 1).all())
        True
        """
        result = self._flat_fill(Tensor.uniform_)
        return super().rand() if result is None else result

    def _operand(self, fn: str, other: object, state: State) -> Any:
        if scalars.is_scalar(other):
            return other
        if isinstance(other, Particle):
            self._check_class(fn, other._layout.modules[0])  # names alone do not tell: they are shared
            algebra.check_state(fn, self._names, self._leaves, other._names, other._leaves,
                                (self._current_signature(), other._current_signature()))
            return other._leaves
        if isinstance(other, nn.Module):
            self._check_class(fn, other)
            names, leaves = layout_state(layout_of(other), self._with_buffers)
            algebra.check_state(fn, self._names, self._leaves, names, leaves)
            return leaves
        raise TypeError(
            f"{fn}: expected a number, a 0-dim tensor, a Particle or a {self.model_class.__name__}, "
            f"got {_class_name(other)}"
            + (f" of shape {tuple(other.shape)} (only 0-dim tensors broadcast)" if isinstance(other, Tensor) else "")
        )

    def _check_class(self, fn: str, module: nn.Module) -> None:
        if model_class(module) is not self.model_class:
            expected, got = class_names(self.model_class, model_class(module))
            raise TypeError(f"{fn}: expected a {expected} (or a Particle of one), got a {got}")

    # -- public API --------------------------------------------------------------------
    @classmethod
    def from_params(cls, like: "nn.Module | Particle", params: Mapping[str, Tensor]) -> "Particle":
        """A Particle of ``like``'s structure holding the tensors in ``params`` (no copy).

        Args:
            like: a model or a Particle giving the structure (class, names, shapes, dtypes).
            params: ``dict[str, Tensor]`` with every parameter name (plus every buffer name
                for a Particle that carries buffers).

        Returns:
            A Particle viewing the tensors in ``params``.  Its arithmetic and ``module()`` do not
            differentiate: no gradient reaches these tensors through them (see ``module``).

        Raises:
            TypeError: ``like`` is neither a module nor a Particle, ``params`` is not a mapping, or a value
                is not a tensor.
            StructureError: a name is missing or extra, or a shape/dtype/device differs.

        >>> net = torch.nn.Linear(2, 1)
        >>> p = Particle.from_params(net, {"weight": torch.zeros(1, 2), "bias": torch.ones(1)})
        >>> p.params["bias"]
        tensor([1.])
        """
        if not isinstance(params, Mapping):
            raise TypeError(f"from_params: expected a mapping of tensors as params, got {_class_name(params)}")
        if isinstance(like, Particle):
            layout, names, leaves = like._layout, like._names, like._leaves
            configs, with_buffers = like._configs, like._with_buffers
        elif isinstance(like, nn.Module):
            layout = layout_of(like)
            with_buffers = any(name in params for name in layout.buffer_names)
            names, leaves = layout_state(layout, with_buffers)
            configs = configs_for(layout, names)
        else:
            raise TypeError(f"from_params: expected an nn.Module or a Particle as like, got {_class_name(like)}")
        # in named_parameters() order, the first difference of any kind is the one named
        for name, leaf in zip(names, leaves):
            if name not in params:
                raise StructureError(f"from_params: parameter {name!r} is missing from params")
            value = params[name]
            if not isinstance(value, Tensor):
                raise TypeError(f"from_params: expected a tensor for {name!r}, got {_class_name(value)}")
            lw.check_pairs("from_params", [name], [leaf], [value])
        known = set(names)
        extra = next((name for name in params if name not in known), None)
        if extra is not None:
            raise StructureError(f"from_params: params has an extra parameter {extra!r}")
        return cls(layout, names, [params[name] for name in names], configs, with_buffers)

    @property
    def model_class(self) -> type[M]:
        """The class of the model this Particle came from (before any ``parametrize`` wrapping).

        >>> particle(torch.nn.Linear(2, 1)).model_class
        <class 'torch.nn.modules.linear.Linear'>
        """
        return model_class(self._layout.modules[0])

    @property
    def params(self) -> dict[str, Tensor]:
        """The parameters (and buffers, if the Particle carries them) as a ``dict[str, Tensor]``.

        >>> sorted(particle(torch.nn.Linear(2, 1)).params)
        ['bias', 'weight']
        """
        return {name: leaf.detach() for name, leaf in zip(self._names, self._leaves)}

    def __len__(self) -> int:
        return len(self._names)  # the names, not the leaves: a result's leaf views are made only when asked

    def __copy__(self) -> Self:
        # ``copy.copy``: a Particle viewing the same tensors (``clone()`` copies them).  Not the slots as
        # they are: two Particles sharing one unseen ``Flat`` would each hand its buffers to ``_pool``.
        return self._new(self._state(), self._leaves)

    def __getstate__(self) -> tuple[Optional[dict[str, Any]], dict[str, Any]]:
        # pickle, deepcopy, torch.save: the slots, less what a copy cannot keep.  ``pickle`` gives every
        # tensor a storage of its own, so leaf views of a result's buffers would each carry (and write)
        # a copy of them: the copy makes its views again.  A Flat over a model's storage records
        # addresses: the copy looks for its flat buffers again from its own leaves.
        state = {name: getattr(self, name) for name in Particle.__slots__ if name not in ("__weakref__", "_pickled")}
        flat = self._flat
        if self._leaf_list is not None and flat:
            state["_leaf_list" if flat.placement is None else "_flat"] = None
        layout = self._layout
        if not any(map(operator.is_, self._leaves, layout.params)):
            # a result holds its own values: its template's parameters are the source model's, which
            # pickling would write too (and a multiprocessing Queue move into shared memory).  The copy
            # stays with this Particle until it is pickled again: a Queue or a spawned process sends its
            # tensors by file descriptor, valid only while they live
            state["_layout"] = self._pickled = _template(layout)
        return getattr(self, "__dict__", None) or None, state

    def __repr__(self) -> str:
        count = sum(leaf.numel() for leaf in self._leaves)
        return f"Particle({self.model_class.__name__}, {len(self._leaves)} tensors, {count} values)"

    def module(self) -> M:
        """A fresh module of the model's class holding this Particle's values as Parameters.

        The Parameters share storage with this Particle (no copy is made); use
        ``p.clone().module()`` for a module independent of ``p``.  They are leaves (with the
        ``requires_grad`` of the model's parameters) and its buffers are detached, so no gradient
        flows back to this Particle's tensors through them, even to tensors given to ``from_params``
        that require grad; as with ``nf.bind``, differentiate through ``nf.call(model, params, x)``.

        Returns:
            A new module of ``model_class``.

        >>> net = torch.nn.Linear(2, 1)
        >>> copy = (particle(net) + 1).module()
        >>> type(copy).__name__, torch.equal(copy.bias, net.bias + 1)
        ('Linear', True)
        """
        leaves = algebra.fresh_parameters(self._leaves, self._configs)
        count = len(self._layout.params)
        flat = self._flat
        own = bool(flat) and flat.placement is None  # this Particle's own buffers (a result's)
        if own:
            # As any new model's, the module's Parameters get version counters of their own; this
            # Particle then views the module, like ``particle(module)``, so its in-place operations
            # tell those Parameters (``_flat.written``).
            leaves = own_counters(leaves, flat.plan)
        if self._with_buffers:
            buffers = self._leaves[count:]
            if any(buffer.requires_grad for buffer in buffers):  # given to ``from_params``: detached, as in ``nf.bind``
                buffers = [buffer.detach() for buffer in buffers]
            result = rebuild(self._layout, leaves[:count], buffers)
        else:
            result = rebuild(self._layout, leaves)
        if own:
            self._leaf_list = layout_state(layout_of(result), self._with_buffers)[1]
            flat.placement = placement(self._leaf_list)
        return cast(M, result)

    def particle(self) -> M:
        """nytorch 1.1 spelling of ``module()``.

        Returns:
            ``self.module()``.

        >>> type(particle(torch.nn.Linear(2, 1)).particle()).__name__
        'Linear'
        """
        return self.module()

    def copy_to(self, module: ModuleT) -> ModuleT:
        """Write this Particle's values into ``module``'s existing Parameters, in place.

        Args:
            module: a model of this Particle's class and structure.

        Returns:
            ``module`` (its Parameter objects are kept, so optimizers holding them keep working).

        Raises:
            TypeError: ``module`` is of another class.
            StructureError: names, shapes or dtypes differ (names the parameter).

        >>> net = torch.nn.Linear(2, 1)
        >>> noise, weight = particle(net).randn(), net.weight
        >>> noise.copy_to(net) is net, net.weight is weight, torch.equal(net.weight, noise.params["weight"])
        (True, True, True)
        """
        self._check_class("copy_to", module)
        self._write_into("copy_to", module)
        return module

    @torch.no_grad()
    def _write_into(self, fn: str, module: nn.Module) -> None:
        """``copy_to`` after the class check, its errors naming ``fn`` (``copy_to`` or ``product_``)."""
        names, leaves = layout_state(layout_of(module), self._with_buffers)
        algebra.check_state(fn, names, leaves, self._names, self._leaves)
        algebra.check_writable(fn, names, leaves)
        if leaves:
            # detached: inside ``forward_ad.dual_level()`` a leaf with a tangent (a result of arithmetic with a
            # dual operand) would make ``_foreach_copy_`` raise, and a copy runs without autograd anyway
            sources = [leaf.detach() for leaf in self._leaves] if lw.dual_level_active() else self._leaves
            torch._foreach_copy_(leaves, sources)

    def unary_operator(self, fn: Callable[[Tensor, ParamConfig], Tensor]) -> Self:
        """A new Particle with ``fn(param, config)`` applied to every parameter (nytorch 1.1 API).

        ``fn`` runs under ``torch.no_grad()`` and decides itself what to do with
        non-operational parameters (``config.operational``).

        Args:
            fn: ``fn(param, config)`` returning a tensor of the parameter's shape, dtype and device.

        Returns:
            A new Particle holding ``fn``'s results.

        Raises:
            TypeError: ``fn`` returns something other than a tensor.
            StructureError: ``fn`` changes a shape, dtype or device.

        >>> p = particle(torch.nn.Linear(1, 1, bias=False))
        >>> q = p.unary_operator(lambda param, config: param + 10 if config.operational else param)
        >>> torch.equal(q.params["weight"], p.params["weight"] + 10)
        True
        """
        return self._new(self._state(), self._checked("unary_operator", algebra.custom(fn, self._leaves, [],
                                                                                        self._configs)))

    def binary_operator(self, other: Any, fn: Callable[[Tensor, Tensor, ParamConfig], Tensor]) -> Self:
        """A new Particle with ``fn(param, other_param, config)`` for every parameter pair (1.1 API).

        ``fn`` runs under ``torch.no_grad()``, as for ``unary_operator``.

        Args:
            other: a Particle or model of this class and structure.
            fn: ``fn(param, other_param, config)`` returning a tensor of the parameter's shape, dtype and device.

        Returns:
            A new Particle holding ``fn``'s results.

        Raises:
            TypeError: ``other`` is not a Particle or model of this class, or ``fn`` returns a non-tensor.
            StructureError: ``other``'s parameters differ, or ``fn`` changes a shape, dtype or device.

        >>> p = particle(torch.nn.Linear(1, 1, bias=False))
        >>> q = p.binary_operator(p, lambda a, b, config: a - b)
        >>> q.params["weight"].item()
        0.0
        """
        state = self._state()
        leaves = self._operand("binary_operator", other, state)
        if not isinstance(leaves, list):
            raise TypeError(f"binary_operator: expected a Particle or a {self.model_class.__name__}, "
                            f"got {_class_name(other)}")
        return self._new(state, self._checked("binary_operator", algebra.custom(fn, self._leaves, [leaves],
                                                                                 self._configs)))

    def _checked(self, fn: str, results: list[Any]) -> list[Tensor]:
        """``results`` of a user function, one per leaf, once each is a tensor of its leaf's shape, dtype and device."""
        for name, leaf, value in zip(self._names, self._leaves, results):
            if not isinstance(value, Tensor):
                raise TypeError(f"{fn}: expected the function to return a tensor for parameter {name!r}, "
                                f"got {_class_name(value)}")
            if value.shape != leaf.shape or value.dtype != leaf.dtype or value.device != leaf.device:
                raise StructureError(f"{fn}: the function returned {describe(value)} on {value.device} for "
                                     f"parameter {name!r} ({describe(leaf)} on {leaf.device}); results keep "
                                     "each parameter's shape, dtype and device")
        return results


def _template(layout: Layout) -> Layout:
    """``layout`` over a copy of its modules whose parameters hold no values (zero-memory stand-ins) and
    whose buffers are copies: what a result pickles, as its own leaves are its parameters.  (The layout's
    own buffers may view a packed model's storage, which pickling would write whole.)

    >>> layout = layout_of(torch.nn.Linear(2, 1))
    >>> [tuple(param.shape) for param in _template(layout).params], _template(layout).params[0].stride()
    ([(1, 2), (1,)], (0, 0))
    """
    if any(type(param) not in (Tensor, nn.Parameter) for param in layout.params):
        return layout  # a subclass (uninitialised, tensor subclasses) would not stand in as it is: as before
    memo: dict[int, Any] = {}
    for param in layout.params:
        blank = torch.zeros((), dtype=param.dtype, device=param.device).expand(param.shape)
        memo[id(param)] = nn.Parameter(blank, param.requires_grad) if type(param) is nn.Parameter else blank
    for buffer in layout.buffers:
        memo[id(buffer)] = buffer.detach().clone()
    try:
        return Layout(copy.deepcopy(layout.modules[0], memo))
    except Exception:  # noqa: BLE001 - what deepcopy refuses (old-style weight_norm's computed weight): as before
        return layout


def particle(model: ModuleT, *, buffers: bool = False, pack: bool = True) -> Particle[ModuleT]:
    """Wrap any ``nn.Module`` as a ``Particle`` (no subclassing, no copy of its values per operation).

    Args:
        model: any module (``nn.Sequential``, a torchvision-style model, a NytoModule...).
        buffers: also take floating buffers (e.g. BatchNorm statistics) into arithmetic;
            integer buffers are carried unchanged.  By default buffers are only cloned
            into results.
        pack: move ``model``'s floating parameters, then floating buffers, into one
            contiguous buffer per (device, dtype) first (once; see ``nytorch._packing.pack_``), so that every
            operation is one kernel per buffer instead of one per tensor.  Parameter
            objects are kept, so optimizers holding them keep working; tensors taken
            from the model before (``p.detach()``, ``nf.params(model)``) stop sharing
            memory with it.  Models that packing would change (RNNs, lazy, non-contiguous
            or ``channels_last`` parameters, parameters in shared memory or sharing memory,
            tensor subclasses) are left as they are.  ``False``: never move storage.

    Returns:
        A Particle viewing ``model``'s parameters (in-place operators write into ``model``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or is (or holds) a TorchScript or ``torch.ao`` quantized
            module; ``buffers`` or ``pack`` is not a bool (a string such as ``"copy"``, which ``merge``'s buffer
            modes use).
        ValueError: ``model`` is a lazy module not run yet (its shapes are unknown).

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    >>> p = particle(net)
    >>> soup = (p + p.randn()) / 2
    >>> type(soup.module()).__name__
    'Sequential'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"particle: expected an nn.Module as model, got {_class_name(model)}")
    buffers, pack = bool(flag("particle", "buffers", buffers)), bool(flag("particle", "pack", pack))
    lazy = lazy_name(model)
    if lazy is not None:
        raise ValueError(f"particle: parameter {lazy!r} is not initialised yet (a lazy module); "
                         "run one forward pass first")
    if pack:
        pack_(model)
    layout = layout_of(model)
    names, leaves = layout_state(layout, buffers)
    configs = configs_for(layout, names)
    return Particle(layout, names, leaves, configs, buffers)

