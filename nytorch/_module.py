"""``NytoModule``: an ``nn.Module`` you can add, scale and interpolate (nytorch 1.1 API)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional, Union

import torch
from torch import nn
from typing_extensions import Self

from . import _algebra as algebra
from . import _leafwise as lw
from . import _scalars as scalars
from ._config import CONFIG_ATTR, ParamConfig, configs_for, configs_in_scope, copy_tables
from ._errors import class_names
from ._flags import flag
from ._operators import Operators, State
from . import _packed as packed
from ._kernels import fill
from ._particle import Particle, layout_state
from ._rebuild import rebuild
from ._walk import PENDING, layout_of, model_class, realized

Tensor = torch.Tensor

__all__ = ["NytoModule"]

_module_getattr, _module_setattr, _module_delattr = nn.Module.__getattr__, nn.Module.__setattr__, nn.Module.__delattr__
_module_getstate, _module_dir = nn.Module.__getstate__, nn.Module.__dir__
#: nytorch 1.1 members that the design made unnecessary, and what to do instead.
_GONE_11 = {
    "touch": "nytorch 1.1's touch() is gone, as nytorch reads the module tree as it is on every operation; "
             "delete the call",
    "is_root": "nytorch 1.1's is_root is gone, as there are no species roots any more: any two models of "
               "one class with matching parameters combine",
}
#: Methods through which a subclass could reach a result's state without building it first.
_TOUCH_HOOKS = ("__getattr__", "__getattribute__", "__setattr__", "__delattr__", "__getstate__",
                "__setstate__", "__dir__", "__reduce__", "__reduce_ex__", "__copy__", "__deepcopy__")


class NytoModule(Operators, nn.Module):
    """An ``nn.Module`` whose instances do arithmetic: ``net + 10``, ``0.9 * (a - b) + a``.

    Subclass it instead of ``nn.Module``.  Every operator returns a new instance of
    the same class whose parameters are fresh leaf ``nn.Parameter``s (same
    ``requires_grad``), buffers cloned, train/eval mode and tied weights kept.
    In-place operators (``net += other``) keep the Parameter objects, so an
    optimizer holding them keeps working.  Operands: Python numbers, 0-dim tensors,
    models of the same class and structure, and ``Particle``s of such models.
    Operators run under ``torch.no_grad()``, as nytorch 1.1's did: no gradient reaches an
    operand (``net * alpha`` gives ``alpha`` none, even when it requires grad); to differentiate
    through model arithmetic use ``nytorch.functional`` (``nf.lerp``, ``nf.add``...) and ``nf.call``.

    >>> import torch
    >>> class NytoLinear(NytoModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.weight = torch.nn.Parameter(torch.Tensor([2.]))
    ...         self.bias = torch.nn.Parameter(torch.Tensor([1.]))
    ...     def forward(self, x):
    ...         return self.weight * x + self.bias
    >>> net = NytoLinear()
    >>> net2 = net + 10
    >>> net2(torch.arange(4))
    tensor([11., 23., 35., 47.], grad_fn=<AddBackward0>)
    >>> (net + net2).weight
    Parameter containing:
    tensor([14.], requires_grad=True)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.__dict__[CONFIG_ATTR] = {}

    # -- results build their module tree on first touch (see ``_pending.Pending``) ----------------
    _nyto_builds_on_touch = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A class of its own attribute access (``def __getattr__``: ``nn.Module.__getattr__(self, name)``,
        # a ``__setattr__`` that calls ``nn.Module``'s) can bypass the hooks above: its results are built at once.
        # So can a mixin's (``class Net(AttrMixin, NytoModule)``): every class of the MRO but NytoModule's own.
        if any(hook in vars(base) for base in cls.__mro__ if base not in _OWN_BASES for hook in _TOUCH_HOOKS):
            cls._nyto_builds_on_touch = False

    # An operator's values are computed at once; only the Python module objects wait.  Any
    # attribute that is not in the instance dict (every one, while pending) lands here first.
    # typed as ``nn.Module.__getattr__`` is: a checker finds what ``__init__`` assigns without it
    def __getattr__(self, name: str) -> Union[Tensor, nn.Module]:
        pending = self.__dict__.get(PENDING)
        if pending is not None:
            pending.realize(self)
            return getattr(self, name)
        if name in self.__dict__:  # another thread built this result between the failed lookup and here
            return object.__getattribute__(self, name)
        try:
            return _module_getattr(self, name)
        except AttributeError as error:
            if name in _GONE_11:  # a 1.1 program: say what became of it rather than only that it is missing
                raise AttributeError(f"{error}: {_GONE_11[name]} (see the README's migration section)") from None
            raise

    def __setattr__(self, name: str, value: Any) -> None:
        _module_setattr(realized(self), name, value)

    def __delattr__(self, name: str) -> None:
        _module_delattr(realized(self), name)

    def __getstate__(self) -> Any:
        return _module_getstate(realized(self))

    def __dir__(self) -> list[str]:
        return _module_dir(realized(self))  # type: ignore[no-any-return]

    # -- Operators protocol -----------------------------------------------------------
    def _state(self) -> State:
        layout = layout_of(self)
        return State(layout.names, layout.params, configs_for(layout), layout)

    def _new(self, state: State, leaves: list[Tensor]) -> Self:
        return rebuild(state.source, leaves)  # type: ignore[return-value]

    # -- the one-pass path: packed models, one kernel per buffer (see ``_packed``) ------------
    # Models are packed on first use (their operands checked first: an operation that raises
    # leaves its operands exactly as they were); from then on operations take the packed path.
    def _binary(self, op: lw.Op, *others: object, reflected: bool = False) -> Self:
        result = packed.binary(self, op, others, reflected)
        return super()._binary(op, *others, reflected=reflected) if result is None else result  # type: ignore[return-value]

    def _binary_(self, op: lw.Op, *others: object) -> Self:
        return self if packed.binary_(self, op, others) else super()._binary_(op, *others)

    def _unary(self, make: Callable[[Any], list[Tensor]], fallback: Callable[[], Self]) -> Self:
        result = packed.unary(self, make)
        return fallback() if result is None else result  # type: ignore[return-value]

    def clone(self) -> Self:
        """A copy with fresh storage (non-operational ``clone=False`` parameters are shared).

        Returns:
            A new module of this class (fresh leaf Parameters, buffers cloned).

        >>> class Net(NytoModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.weight = torch.nn.Parameter(torch.ones(2))
        >>> a = Net()
        >>> b = a.clone()
        >>> torch.equal(a.weight, b.weight), a.weight is b.weight
        (True, False)
        """
        return self._unary(lambda flat: [buffer.clone() for buffer in flat.readable()], super().clone)

    def randn(self) -> Self:
        """Same structure, N(0, 1) values (reproducible under ``torch.manual_seed``).

        Returns:
            A new module of this class (non-operational parameters are carried over, not drawn).

        >>> class Net(NytoModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.weight = torch.nn.Parameter(torch.ones(2))
        >>> tuple(Net().randn().weight.shape)
        (2,)
        """
        return self._unary(lambda flat: fill(flat, Tensor.normal_), super().randn)

    def rand(self) -> Self:
        """Same structure, U[0, 1) values (nytorch 1.1's ``rand``).

        Returns:
            A new module of this class (non-operational parameters are carried over, not drawn).

        >>> class Net(NytoModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.weight = torch.nn.Parameter(torch.ones(2))
        >>> bool((Net().rand().weight < 1).all())
        True
        """
        return self._unary(lambda flat: fill(flat, Tensor.uniform_), super().rand)

    def _operand(self, fn: str, other: object, state: State) -> Any:
        if scalars.is_scalar(other):
            return other
        if isinstance(other, Particle):
            if other.model_class is not model_class(self):
                expected, got = class_names(model_class(self), other.model_class)
                raise TypeError(f"{fn}: expected a {expected} (or a Particle of one), got a Particle of {got}")
            algebra.check_state(fn, state.names, state.leaves, other._names, other._leaves,
                                (state.source.signature, other._current_signature()))
            return other._leaves
        elif isinstance(other, nn.Module):
            if model_class(other) is not model_class(self):
                expected, got = class_names(model_class(self), model_class(other))
                raise TypeError(f"{fn}: expected a {expected} (or a Particle of one), got a {got}")
            layout = layout_of(other)
            algebra.check_state(fn, state.names, state.leaves, layout.names, layout.params,
                                (state.source.signature, layout.signature))
            return layout.params
        else:
            raise TypeError(
                f"{fn}: expected a number, a 0-dim tensor, a {type(self).__name__} or a Particle of one, "
                f"got {type(other).__name__}"
                + (f" of shape {tuple(other.shape)} (only 0-dim tensors broadcast)"
                   if isinstance(other, Tensor) else "")
            )

    # -- nytorch 1.1 API ----------------------------------------------------------------
    def detach(self) -> Self:
        """A new module sharing this one's Parameter objects, with its own configs (a new species).

        nytorch 1.1's ``detach``, not autograd's: the Parameters are the very same objects, so a loss
        of the new module still sends gradients to them (``clone()`` gives Parameters of their own).

        Returns:
            A new module of this class holding the same Parameter and buffer objects.

        >>> class Net(NytoModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.weight = torch.nn.Parameter(torch.ones(2))
        >>> net = Net()
        >>> net.detach().weight is net.weight
        True
        """
        layout = layout_of(self)
        result = rebuild(layout, layout.params, layout.buffers)
        copy_tables(result)
        return result  # type: ignore[return-value]

    def clone_from(self, source: nn.Module) -> Self:
        """A clone of ``self`` (sharing its configs) holding ``source``'s values.

        Args:
            source: any module with the same parameter and buffer names, shapes and dtypes.

        Returns:
            A new module of this class holding copies of ``source``'s parameters and buffers.

        Raises:
            TypeError: ``source`` is not an ``nn.Module``.
            StructureError: names, shapes or dtypes differ (names the parameter).

        >>> class Net(NytoModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.weight = torch.nn.Parameter(torch.randn(2))
        >>> a, b = Net(), Net()
        >>> torch.equal(a.clone_from(b).weight, b.weight)
        True
        """
        if not isinstance(source, nn.Module):
            raise TypeError(f"clone_from: expected an nn.Module as source, got {type(source).__name__}")
        layout = layout_of(self)
        other = layout_of(source)
        names, leaves = layout_state(layout, buffers=True)
        other_names, other_leaves = layout_state(other, buffers=True)
        algebra.check_state("clone_from", names, leaves, other_names, other_leaves)
        with torch.no_grad():
            params = [leaf.detach().clone() for leaf in other.params]
            buffers = [leaf.detach().clone() for leaf in other.buffers]
        return rebuild(layout, params, buffers)  # type: ignore[return-value]

    def product(self, *, buffers: bool = False) -> Particle[Self]:
        """This model as a ``Particle`` (nytorch 1.1's ``ParamProduct``), configs included.

        Args:
            buffers: also take floating buffers into arithmetic (see ``nytorch.particle``).

        Returns:
            A Particle viewing this module's tensors (in-place operations on it write into the module).

        >>> class Net(NytoModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.weight = torch.nn.Parameter(torch.ones(1))
        >>> (Net().product() * 3).module().weight
        Parameter containing:
        tensor([3.], requires_grad=True)
        """
        buffers = bool(flag("product", "buffers", buffers))
        layout = layout_of(self)
        names, leaves = layout_state(layout, buffers)
        return Particle(layout, names, leaves, configs_for(layout, names), buffers)

    def product_(self, product: Particle) -> Self:
        """Write ``product``'s values into this module's Parameters, in place; returns ``self``.

        Args:
            product: a Particle of this module's class and structure.

        Returns:
            ``self`` (its Parameter objects are kept).

        Raises:
            TypeError: ``product`` is not a Particle, or is one of another class.
            StructureError: its parameters differ from this module's (names the first one).

        >>> class Net(NytoModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.weight = torch.nn.Parameter(torch.ones(1))
        >>> net = Net()
        >>> before = net.weight
        >>> net.product_(net.product() + 1).weight is before, net.weight.item()
        (True, 2.0)
        """
        if not isinstance(product, Particle):
            raise TypeError(f"product_: expected a Particle as product, got {type(product).__name__}")
        if product.model_class is not model_class(self):
            expected, got = class_names(model_class(self), product.model_class)
            raise TypeError(f"product_: expected a Particle of a {expected}, got a Particle of {got}")
        product._write_into("product_", self)
        return self

    def set_param_config(self, operational: Optional[bool] = None, clone: Optional[bool] = None,
                         name: Optional[str] = None) -> None:
        """Set ``operational`` / ``clone`` of every parameter (or those under attribute ``name``).

        Configs are shared by every model derived from this one by particle operations.

        Args:
            operational: ``True`` / ``False`` to take part in arithmetic or not; ``None`` leaves it as it is.
            clone: for non-operational parameters, whether results get a clone (``True``) or the very
                same Parameter (``False``); ``None`` leaves it as it is.
            name: a submodule or parameter path (``"layer0"``, ``"layer0.weight"``); ``None``: all.
                Any path that reaches it counts, and a submodule means every Parameter it holds,
                tied ones included (``name="dec"`` with ``dec.weight = enc.weight`` sets both).

        Raises:
            TypeError: ``operational`` or ``clone`` is not a bool or ``None``, or ``name`` not a str or ``None``.
            ValueError: ``name`` is neither a submodule nor a parameter of this module.

        >>> class DNN(NytoModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer0 = torch.nn.Linear(1, 1)
        ...         self.layer1 = torch.nn.Linear(1, 1)
        >>> net = DNN()
        >>> net.set_param_config(operational=False, name="layer0")
        >>> doubled = 2 * net
        >>> torch.equal(doubled.layer0.weight, net.layer0.weight)
        True
        """
        operational = flag("set_param_config", "operational", operational, none=True)
        clone = flag("set_param_config", "clone", clone, none=True)
        for _, config in self._configs_in_scope("set_param_config", name):
            if operational is not None:
                config.operational = operational
            if clone is not None:
                config.clone = clone

    def apply_param_config(self, fn: Callable[[int, ParamConfig], None], name: Optional[str] = None) -> None:
        """Call ``fn(param_id, config)`` for every parameter (or those under attribute ``name``).

        Custom attributes set on ``config`` are kept.

        Args:
            fn: ``fn(param_id, config)``, where ``param_id`` is the parameter's index in
                ``self.named_parameters()`` (see ``get_param_id``).
            name: a submodule or parameter path; ``None``: every parameter.

        Raises:
            TypeError: ``name`` is not a str or ``None``.
            ValueError: ``name`` is neither a submodule nor a parameter of this module.

        >>> class Net(NytoModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = torch.nn.Linear(1, 1)
        >>> Net().apply_param_config(lambda pid, config: print(pid, config))
        0 ParamConfig(operational=True, clone=True)
        1 ParamConfig(operational=True, clone=True)
        """
        for param_id, config in self._configs_in_scope("apply_param_config", name):
            fn(param_id, config)

    def _configs_in_scope(self, fn: str, name: Optional[str]) -> list[tuple[int, ParamConfig]]:
        """``(param_id, config)`` of every parameter under attribute ``name`` (all with ``None``), checked."""
        if name is None:
            return configs_in_scope(layout_of(self), "")
        if not isinstance(name, str):
            raise TypeError(f"{fn}: expected a str or None as name, got {type(name).__name__}")
        # resolved by object, not by spelling: a submodule registered under two names, or a Parameter
        # tied into another submodule (``dec.weight = enc.weight``), is listed by named_parameters()
        # under its first name only, yet ``name="dec"`` must reach every Parameter ``self.dec`` holds
        target: Any = None
        if name:
            root = realized(self)
            for lookup in (root.get_submodule, root.get_parameter):
                try:
                    target = lookup(name)
                    break
                except AttributeError:
                    pass
        if target is None:
            raise ValueError(f"{fn}: {type(self).__name__} has no submodule or parameter named {name!r}")
        wanted = {id(param) for param in (target.parameters() if isinstance(target, nn.Module) else (target,))}
        layout = layout_of(root)  # its Parameters are the ones ``target`` holds
        return configs_in_scope(layout, "", {own for own, param in zip(layout.names, layout.params)
                                             if id(param) in wanted})

    def get_param_id(self, target_param: Tensor) -> int:
        """The index of ``target_param`` in ``self.named_parameters()`` (same across derived models).

        Args:
            target_param: a Parameter of this module (1.1's name, so ``get_param_id(target_param=p)`` works).

        Returns:
            Its index, counting each shared (tied) Parameter once.

        Raises:
            ValueError: ``target_param`` is not a parameter of this module.

        >>> layer = torch.nn.Linear(1, 1)
        >>> class Net(NytoModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = layer
        >>> Net().get_param_id(layer.bias)
        1
        """
        for index, candidate in enumerate(self.parameters()):
            if candidate is target_param:
                return index
        shape = tuple(target_param.shape) if isinstance(target_param, Tensor) else type(target_param).__name__
        raise ValueError(f"get_param_id: the given parameter ({shape}) is not a parameter of this "
                         f"{type(self).__name__}")


_OWN_BASES = frozenset(NytoModule.__mro__)
