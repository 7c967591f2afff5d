"""``Swarm``: ``P`` models of one structure as one value, stored stacked, run and updated in batched calls.

The class is a thin shell: storage and structure live in ``_swarm_spec``, construction in
``_swarm_build``, selection in ``_swarm_index``, arithmetic in ``_swarm_ops`` and the
vectorised forward and gradients in ``_vectorise`` (its fused path in ``_swarm_fused``).
"""
from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Optional, Union, overload

import torch
from torch import nn
from typing_extensions import Self

from . import _scalars as scalars
from . import _swarm_build as build
from . import _swarm_index as index_ops
from . import _vectorise as vec
from ._errors import DeviceMismatchError
from ._particle import Particle
from ._swarm_arith import SwarmArithmetic
from ._swarm_spec import Group, Spec, pack_stacked, views_of

Tensor = torch.Tensor
Like = Union[nn.Module, Particle, "Swarm"]

__all__ = ["Swarm"]


class Swarm(SwarmArithmetic):
    """``P`` models of one structure stored stacked: select, combine, run and differentiate them all at once.

    Every member's tensors live in one contiguous ``[P, n]`` buffer per (device, dtype) group;
    ``params`` are views into it, so arithmetic on the whole swarm costs one kernel per group
    (and members' parameters are contiguous, whatever memory format the stacked models had).
    Operands broadcast like tensors: numbers and 0-dim tensors, a 1-D tensor of ``P``
    per-member weights, a ``Particle`` or model of the member structure (applied to every
    member) and another ``Swarm`` of the same size.  In-place operators validate everything
    before writing.  ``swarm[i]`` is a ``Particle`` viewing member ``i`` (in-place ops on it
    write into the swarm, as with tensor views); selections with lists, tensors or masks copy.

    Build one with ``Swarm.stack``, ``Swarm.from_params``, ``Swarm.randn``, ``Swarm.rand``,
    ``Swarm.zeros`` or ``Swarm.normal``.

    >>> import torch, nytorch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> swarm = Swarm.normal(net, 5, std=0.1)
    >>> swarm(torch.randn(2, 4)).shape                   # every member's forward, stacked
    torch.Size([5, 2, 3])
    >>> moved = 0.5 * swarm + 0.5 * swarm[0]             # pull everyone halfway to member 0
    >>> torch.allclose(moved[0].params["0.bias"], swarm[0].params["0.bias"])
    True
    """

    __nytorch_broadcasts__ = True
    __array_ufunc__ = None  # numpy scalars defer to our reflected operators
    __slots__ = ("_spec", "_flats", "_size", "_cache", "__weakref__")

    def __init__(self, spec: Spec, flats: list[Tensor], size: Optional[int] = None) -> None:
        """Private: use ``Swarm.stack``, ``Swarm.from_params`` or a random constructor."""
        self._spec = spec
        self._flats = flats
        self._size = int(flats[0].shape[0]) if flats else int(size or 0)
        self._cache: Optional[list[Tensor]] = None

    def __getstate__(self) -> tuple[Optional[dict[str, Any]], dict[str, Any]]:
        # pickle, deepcopy, torch.save: the views are made again from the copy's own buffers (``pickle``
        # gives each view a storage of its own: writes into the buffers would miss them); what training
        # set on them travels: ``requires_grad`` and ``.grad`` (see ``params``)
        cache = self._cache
        marks = None if cache is None else [(view.requires_grad, view.grad) for view in cache]
        state = {"_spec": self._spec, "_flats": self._flats, "_size": self._size, "_cache": marks}
        return getattr(self, "__dict__", None) or None, state

    def __setstate__(self, state: tuple[Optional[dict[str, Any]], dict[str, Any]]) -> None:
        attributes, slots = state
        if attributes:
            self.__dict__.update(attributes)
        self._spec, self._flats, self._size, self._cache = slots["_spec"], slots["_flats"], slots["_size"], None
        marks = slots.get("_cache")
        if marks and any(requires_grad or grad is not None for requires_grad, grad in marks):
            for view, (requires_grad, grad) in zip(self._views(), marks):
                view.requires_grad_(requires_grad)
                view.grad = grad

    def _views(self) -> list[Tensor]:
        if self._cache is None:
            self._cache = views_of(self._spec, self._flats)
        return self._cache

    def _new(self, flats: list[Tensor], spec: Optional[Spec] = None, size: Optional[int] = None) -> Self:  # type: ignore[override]
        return type(self)(self._spec if spec is None else spec, flats, self._size if size is None else size)

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def stack(cls, items: Iterable[Union[nn.Module, Particle]], *, buffers: Optional[bool] = None) -> "Swarm":
        """Stack models or Particles of one structure into a swarm (one copy of their values).

        Args:
            items: modules and/or Particles with the same class, names, shapes, dtypes and devices.
            buffers: take floating buffers into arithmetic (default: as item 0 when it is a Particle,
                else no); a Particle item must agree.
                Buffers are always stacked, so each member keeps its own (e.g. BatchNorm statistics).

        Returns:
            A swarm of ``len(items)`` members holding a copy of their values (in its own flat storage).

        Every member runs with item 0's modules, so the items must agree in what a forward reads
        besides their tensors: submodule classes, the train/eval mode of module items (a Particle
        has none of its own and runs in item 0's) and the settings of torch's layers (numbers,
        strings, ``None`` and tuples of them, e.g. ``Dropout.p``, ``BatchNorm1d.eps``).  Other
        attributes of your own classes (names, counters, a ``self.scale``) are item 0's, and so are
        the parameters' ``ParamConfig``s (what takes part in arithmetic) and ``requires_grad`` flags
        (what ``grad_and_value`` differentiates).

        Raises:
            ValueError: ``items`` is empty.
            TypeError: an item is not a module or Particle, or is of another class.
            StructureError: an item's structure differs: a parameter or buffer, a submodule's class,
                its train/eval mode or a setting (the message names the item and the path).

        >>> members = [torch.nn.Linear(2, 1) for _ in range(3)]
        >>> swarm = Swarm.stack(members)
        >>> len(swarm), tuple(swarm.params["weight"].shape)
        (3, (3, 1, 2))
        >>> torch.equal(swarm.params["weight"][2], members[2].weight)
        True
        """
        return cls(*build.stacked(items, buffers))

    @classmethod
    def from_params(cls, like: Like, params: Mapping[str, Tensor]) -> "Swarm":
        """A swarm of ``like``'s structure from stacked tensors ``[P, *shape]`` keyed like ``named_parameters()``.

        Args:
            like: a model, Particle or Swarm giving the member structure.
            params: every parameter name (and every buffer name when ``like`` takes buffers into
                arithmetic); other buffer names are optional, missing buffers are copied from ``like``.

        Returns:
            A swarm holding a copy of the values (in its own flat storage).  The copy is not
            differentiable: no gradient flows back to ``params`` through it (under
            ``torch.func.grad`` it comes out zero).  For gradients use ``grad_and_value``, or
            ``torch.func.vmap`` of ``nf.call(model, member_params, x)`` over ``swarm.params``.

        Raises:
            TypeError: ``like`` or a value has the wrong type.
            StructureError: a name is missing or unknown, the leading (member) sizes disagree, or a
                shape, dtype or device differs from ``like``'s.

        >>> net = torch.nn.Linear(2, 1)
        >>> swarm = Swarm.from_params(net, {"weight": torch.zeros(4, 1, 2), "bias": torch.ones(4, 1)})
        >>> len(swarm), swarm[3].params["bias"]
        (4, tensor([1.]))
        """
        return cls(*build.from_stacked(like, params))

    @classmethod
    def _fill(cls, fn: str, like: object, size: Optional[int], buffers: Optional[bool],
              make: Callable[[int, Group, Tensor], Tensor], generator: Optional[torch.Generator] = None,
              per_member: bool = False) -> "Swarm":
        return cls(*build.filled(fn, like, size, buffers, make, generator, per_member=per_member))

    @classmethod
    def randn(cls, like: Like, size: Optional[int] = None, *, buffers: Optional[bool] = None,  # type: ignore[override]
              generator: Optional[torch.Generator] = None) -> "Swarm":
        """A swarm of ``size`` members shaped like ``like`` with N(0, 1) values (``Particle.randn`` for a swarm).

        Non-arithmetic leaves (integer buffers, frozen parameters) are copied from ``like`` (member by
        member from a Swarm of ``size`` members, else from its member 0).
        ``size`` defaults to ``len(like)`` for a Swarm.  Reproducible with ``generator``.

        Args:
            like: a model, Particle or Swarm giving the member structure.
            size: the number of members (a non-negative int; default ``len(like)`` for a Swarm).
            buffers: take floating buffers into arithmetic, and so draw them too (default: as ``like``
                for a Particle or Swarm, else no).
            generator: a ``torch.Generator`` on the device type of the members' tensors.

        Returns:
            A new swarm of ``size`` members.

        Raises:
            TypeError: ``like`` is not a model, Particle or Swarm; ``size`` is missing (``like`` is not a
                Swarm) or not an int; ``generator`` is not a ``torch.Generator``.
            ValueError: ``size`` is negative, or ``generator`` is on another device type than a member tensor.
            StructureError: ``buffers`` disagrees with a Particle ``like`` that has floating buffers.

        >>> noise = Swarm.randn(torch.nn.Linear(2, 1), 8, generator=torch.Generator().manual_seed(0))
        >>> tuple(noise.params["weight"].shape)
        (8, 1, 2)
        """
        return cls._fill("randn", like, size, buffers, lambda n, g, _: torch.randn(
            n, g.width, dtype=g.dtype, device=g.device, generator=generator), generator)

    @classmethod
    def rand(cls, like: Like, size: Optional[int] = None, *, buffers: Optional[bool] = None,  # type: ignore[override]
             generator: Optional[torch.Generator] = None) -> "Swarm":
        """Like ``randn`` with U[0, 1) values (e.g. PSO's random coefficients).

        Args:
            like, size, buffers, generator: as for ``randn``.

        Returns:
            A new swarm of ``size`` members.

        Raises:
            TypeError / ValueError / StructureError: as for ``randn``.

        >>> bool((Swarm.rand(torch.nn.Linear(2, 1), 3).params["bias"] < 1).all())
        True
        """
        return cls._fill("rand", like, size, buffers, lambda n, g, _: torch.rand(
            n, g.width, dtype=g.dtype, device=g.device, generator=generator), generator)

    @classmethod
    def zeros(cls, like: Like, size: Optional[int] = None, *, buffers: Optional[bool] = None) -> "Swarm":
        """Like ``randn`` with zeros (e.g. initial PSO velocities).

        Args:
            like, size, buffers: as for ``randn``.

        Returns:
            A new swarm of ``size`` members.

        Raises:
            TypeError / ValueError / StructureError: as for ``randn`` (there is no generator to check).

        >>> Swarm.zeros(torch.nn.Linear(2, 1), 2).params["bias"]
        tensor([[0.],
                [0.]])
        """
        return cls._fill("zeros", like, size, buffers, lambda n, g, _: torch.zeros(
            n, g.width, dtype=g.dtype, device=g.device))

    @classmethod
    def normal(cls, center: Like, size: Optional[int] = None, *, std: float = 1.0, buffers: Optional[bool] = None,
               generator: Optional[torch.Generator] = None) -> "Swarm":
        """Members drawn around ``center``: ``center + std * N(0, 1)``.

        A model or Particle centre is shared by every member; a Swarm centre gives member ``i``
        its own centre ``center[i]`` (``size`` defaults to ``len(center)``; a one-member swarm
        is shared like a model).

        Args:
            center: a model, Particle or Swarm (one centre per member) giving the structure and the means.
            size: the number of members (default ``len(center)`` for a Swarm).
            std: the standard deviation (a non-negative real number or 0-dim tensor).
            buffers, generator: as for ``randn``.

        Returns:
            A new swarm of ``size`` members.

        Raises:
            TypeError: ``std`` is not a real number (booleans included); otherwise as for ``randn``.
            ValueError: ``std`` is negative or NaN (as for ``torch.normal``), or ``center`` is a Swarm
                whose size is neither ``size`` nor 1.
            DeviceMismatchError: ``std`` is a tensor on another device than the members' values (a CPU
                0-dim tensor works anywhere, as in torch).

        >>> net = torch.nn.Linear(2, 1)
        >>> cloud = Swarm.normal(net, 1000, std=0.01)
        >>> torch.allclose(cloud.mean().params["bias"], net.bias.detach(), atol=0.01)
        True
        >>> centres = Swarm.stack([torch.nn.Linear(2, 1) for _ in range(3)])
        >>> torch.equal(Swarm.normal(centres, std=0.0).params["bias"], centres.params["bias"])
        True
        """
        if (not scalars.is_scalar(std) or isinstance(std, bool)
                or (isinstance(std, Tensor) and (std.is_complex() or std.dtype == torch.bool))
                or (not isinstance(std, Tensor) and not isinstance(std, numbers.Real))):
            kind = (f"a tensor of dtype {str(std.dtype).removeprefix('torch.')} and shape {tuple(std.shape)}"
                    if isinstance(std, Tensor) else type(std).__name__)
            raise TypeError(f"normal: expected a real number as std, got {kind}")
        if not (isinstance(std, Tensor) and std.is_meta) and not float(std) >= 0.0:  # NaN too, as torch.normal
            raise ValueError(f"normal: expected std >= 0 (as torch.normal), got {float(std)}")

        def make(n: int, g: Group, row: Tensor) -> Tensor:
            if isinstance(std, Tensor) and std.device != g.device and std.device.type != "cpu":  # as a scalar operand
                raise DeviceMismatchError(f"normal: std is on {std.device} but the members' "
                                          f"{str(g.dtype).removeprefix('torch.')} values are on "
                                          f"{g.device}; move std there first (a number or CPU tensor works anywhere)")
            noise = torch.randn(n, g.width, dtype=g.dtype, device=g.device, generator=generator)
            return noise.mul_(std).add_(row)
        return cls._fill("normal", center, size, buffers, make, generator, per_member=True)

    @classmethod
    def cat(cls, swarms: Iterable["Swarm"]) -> "Swarm":
        """Join swarms of one structure member-wise (``torch.cat`` along the member dimension).

        The result runs every member with swarm 0's modules, so, as for ``stack``, the swarms must
        agree in their train/eval mode and their layers' settings; ``ParamConfig``s and
        ``requires_grad`` flags are swarm 0's.

        Args:
            swarms: Swarms whose members have one structure.

        Returns:
            A new swarm with the members of ``swarms[0]``, then of ``swarms[1]``, ... (a copy).

        Raises:
            TypeError: ``swarms`` is empty or holds something other than Swarms, or members of another class.
            StructureError: a swarm's parameters or buffers differ, or its train/eval mode or a layer
                setting (e.g. ``Dropout.p``) differs from swarm 0's (the message names the swarm and the path).

        >>> a = Swarm.zeros(torch.nn.Linear(2, 1), 2)
        >>> len(Swarm.cat([a, a + 1]))
        4
        """
        return cls(*build.joined(swarms))

    # -- structure ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        spec = self._spec
        values = sum(slot.stop - slot.start for slot in spec.slots[:spec.n_state])
        return (f"Swarm({spec.model_class.__name__}, {self._size} members, {spec.n_state} tensors, "
                f"{values} values each)")

    @property
    def params(self) -> dict[str, Tensor]:
        """Stacked parameters ``[P, *shape]`` keyed like ``named_parameters()`` (views into the swarm).

        Buffers are included when the swarm takes them into arithmetic (``buffers=True``), as for
        ``Particle.params``.  Usable directly with ``torch.func``.

        Every read returns the same view objects, so autograd can train them: call
        ``requires_grad_()`` on the ones to train (floating parameters, not the buffers a
        ``buffers=True`` swarm lists here) and hand them to a ``torch.optim`` optimizer.  A backward of the
        *sum* of the members' losses gives each member its own gradient (``.mean()`` would scale them
        by ``1/P``), and an element-wise optimizer (SGD, Adam, AdamW, RMSprop) then steps every member
        as its own optimizer would.  Not with ``fused=True``: on the CPU torch's fused kernels write
        these strided views as if they were contiguous.  Arithmetic and ``nytorch.algorithms`` return
        new swarms, whose tensors do not require grad; ``swarm[:] = new`` writes one into the views.

        >>> list(Swarm.zeros(torch.nn.Linear(2, 1), 3).params)
        ['weight', 'bias']
        >>> s = Swarm.stack([torch.nn.Linear(2, 1) for _ in range(3)])
        >>> optimizer = torch.optim.SGD([p.requires_grad_() for p in s.params.values()], lr=0.1)
        >>> s(torch.ones(4, 2)).sum().backward()             # each member's own gradient
        >>> s.params["bias"].grad.flatten()
        tensor([4., 4., 4.])
        >>> optimizer.step()
        """
        spec = self._spec
        return dict(zip(spec.names[:spec.n_state], self._views()[:spec.n_state]))

    @property
    def buffers(self) -> dict[str, Tensor]:
        """Stacked buffers ``[P, *shape]`` keyed like ``named_buffers()`` (views; empty when there are none).

        >>> tuple(Swarm.zeros(torch.nn.BatchNorm1d(4), 2).buffers["running_var"].shape)
        (2, 4)
        """
        spec = self._spec
        return dict(zip(spec.names[spec.n_params:], self._views()[spec.n_params:]))

    @property
    def template(self) -> Particle:
        """A Particle describing one member (class, names, shapes, dtypes, devices, configs).

        Its parameters are zero-memory placeholders: use it as ``like`` (e.g. in
        ``Particle.from_params``), and ``swarm[i]`` or ``swarm.mean()`` for values.

        >>> Swarm.zeros(torch.nn.Linear(2, 1), 3).template.model_class.__name__
        'Linear'
        """
        return self._spec.template

    @property
    def model_class(self) -> type:
        """The class of the member models.

        >>> Swarm.zeros(torch.nn.Linear(2, 1), 3).model_class
        <class 'torch.nn.modules.linear.Linear'>
        """
        return self._spec.model_class

    @property
    def training(self) -> bool:
        """Whether the members run in train mode (set with ``train()`` / ``eval()``).

        >>> s = Swarm.zeros(torch.nn.Linear(2, 1), 3)
        >>> s.training, s.eval().training
        (True, False)
        """
        return self._spec.layout.modules[0].training

    def train(self, mode: bool = True) -> Self:
        """Put every member in train mode (``False``: eval mode); returns ``self``. Other swarms are unaffected.

        Args:
            mode: ``True`` for train mode, ``False`` for eval mode.

        Returns:
            ``self``.

        Raises:
            ValueError: ``mode`` is not a bool (from ``nn.Module.train``).

        >>> s = Swarm.zeros(torch.nn.Dropout(), 2)
        >>> s.eval().training, (s + 1).train().training, s.training
        (False, True, False)
        """
        if not isinstance(mode, bool):  # as nn.Module.train, whatever mode the members are in now
            kind = type(mode)  # qualified outside builtins: NumPy's bool is also called "bool"
            shown = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
            raise ValueError(f"Swarm.train: expected a bool as mode (as nn.Module.train), got {shown}")
        if any(module.training != mode for module in self._spec.layout.modules):
            self._spec = self._spec.with_mode(mode)
        return self

    def eval(self) -> Self:
        """Put every member in eval mode (``train(False)``); returns ``self``.

        Returns:
            ``self``.

        >>> s = Swarm.zeros(torch.nn.BatchNorm1d(2), 3).eval()    # running statistics, as in a loop
        >>> s.training, tuple(s(torch.randn(4, 2)).shape)
        (False, (3, 4, 2))
        """
        return self.train(False)

    def to(self, *args: Any, **kwargs: Any) -> Self:
        """A copy on another device and/or with floating and complex leaves cast to a dtype (like ``Module.to``).

        Casts what ``Module.to`` casts: floating and complex parameters and buffers; integer and
        bool leaves keep their dtype.

        Args:
            *args, **kwargs: ``Module.to``'s arguments (a device, a dtype, both, or a tensor to match).

        Returns:
            A new swarm with its own storage, or ``self`` when nothing changes.

        Raises:
            TypeError: an integer or bool dtype (as ``Module.to``).
            ValueError: a ``memory_format`` other than ``torch.contiguous_format`` /
                ``torch.preserve_format``: members' tensors are stored as contiguous rows.

        >>> s = Swarm.zeros(torch.nn.Linear(2, 1), 3)
        >>> s.to(torch.float64).params["bias"].dtype, s.to(torch.complex64).params["bias"].dtype
        (torch.float64, torch.complex64)
        >>> s.to(torch.int32)
        Traceback (most recent call last):
            ...
        TypeError: Swarm.to: expected a floating point or complex dtype (as Module.to), got torch.int32
        """
        device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
            raise TypeError(f"Swarm.to: expected a floating point or complex dtype (as Module.to), got {dtype}")
        if memory_format not in (None, torch.preserve_format, torch.contiguous_format):
            raise ValueError(f"Swarm.to: expected no memory_format (a swarm stores its members' tensors as "
                             f"contiguous rows), got {memory_format}; convert the inputs instead, or a "
                             "member's module (swarm[i].module().to(memory_format=...))")
        spec = self._spec.converted(device, dtype)
        if spec.signature == self._spec.signature:
            return self
        views = self._views()
        stand_ins = spec.layout.params + spec.layout.buffers
        leaves = [view.to(device=s.device, dtype=s.dtype) for view, s in zip(views, stand_ins)]
        return self._new(pack_stacked(spec, leaves, self._size), spec)

    # -- selection ------------------------------------------------------------------------------
    @overload
    def __getitem__(self, key: int) -> Particle: ...
    @overload
    def __getitem__(self, key: Union[slice, range, list[int], list[bool]]) -> "Swarm": ...
    @overload  # a tensor: a 0-dim one picks a Particle, a 1-D one a Swarm
    def __getitem__(self, key: Any) -> Any: ...
    def __getitem__(self, key: Any) -> Any:
        """``swarm[i]``: a ``Particle`` (a view); ``swarm[a:b]``: a ``Swarm`` of views; lists, tensors and masks
        select copies."""
        index = index_ops.normalise(key, self._size)
        if isinstance(index, int):
            return index_ops.member(self._spec, self._views(), index)
        if isinstance(index, slice):
            return self._new([flat[index] for flat in self._flats], size=len(range(*index.indices(self._size))))
        flats = [flat.index_select(0, index.to(flat.device)) for flat in self._flats]
        return self._new(flats, size=index.numel())

    def __setitem__(self, key: Any, value: Any) -> None:
        """Overwrite selected members with a Particle or model (every member), a Swarm, or a number.

        Particles, models and swarms replace every stored leaf (buffers included); numbers set the
        arithmetic leaves only.  Everything is validated before anything is written (a swarm made
        under ``torch.inference_mode()`` is written only inside it; a number torch cannot convert to
        some member tensor's dtype, such as ``1e39`` for float32, raises ``RuntimeError`` first).
        """
        index_ops.assign(self._spec, self._flats, self._size, index_ops.normalise(key, self._size), value)

    def __iter__(self) -> Iterator[Particle]:
        views = self._views()
        return (index_ops.member(self._spec, views, i) for i in range(self._size))

    def unstack(self) -> list[Particle]:
        """Every member as a ``Particle`` (views into the swarm; ``.clone()`` them to detach).

        Returns:
            ``[swarm[0], swarm[1], ...]``: one Particle per member.

        >>> [type(p).__name__ for p in Swarm.zeros(torch.nn.Linear(2, 1), 2).unstack()]
        ['Particle', 'Particle']
        """
        return list(self)

    # -- vectorised calls -------------------------------------------------------------------------
    def __call__(self, *args: Any, in_dims: vec.InDims = None, randomness: str = "different",
                 chunk_size: Optional[int] = None, **kwargs: Any) -> Any:
        """Every member's forward on the same inputs in one vectorised call; outputs stacked ``[P, ...]``.

        Args:
            *args, **kwargs: the model's inputs (keyword arguments are shared by every member).
            in_dims: ``None`` (default): every member sees the same inputs; ``0``: each positional
                input has a leading ``P`` dimension, one slice per member; or one entry per input.
            randomness: ``torch.func.vmap``'s randomness for dropout and the like: ``"different"``
                (independent per member, as in a loop), ``"same"`` or ``"error"``.
            chunk_size: evaluate this many members at a time to save memory (a positive int).

        The members' forwards run as Python on every call, as a loop's would (only straight-line
        forwards over submodules and torch's activations are fused into one ``baddbmm`` per layer).
        Buffers a forward updates (BatchNorm statistics) are kept per member; those of modules in
        train mode are written once the whole call succeeded, so a call that raises changes none of
        them (in eval mode buffers are read in place, uncopied).  Other attributes a forward sets on its modules
        (``self.last = out``, counters) are not kept on a swarm: every call starts from, and leaves,
        the members' modules as they were.

        Outputs may be any pytree (tuples, dicts) of tensors: each tensor comes back stacked; other
        leaves (``None``, as ``MultiheadAttention(..., need_weights=False)`` returns, numbers, strings)
        come back once, as they are.  An empty swarm returns outputs with 0 members (computed on one
        stand-in member, so their shapes are right).  Forward hooks and pre-hooks (item 0's, as
        stacked) run inside the vectorised call, once per call (per chunk) rather than once per
        member, and see one member's tensors: a hook may change outputs, but tensors it stores
        cannot be used afterwards.

        Raises:
            RuntimeError: the model cannot run under ``torch.func.vmap`` (the message says what to change),
                or the forward updates buffers made under ``torch.inference_mode()``.
            TypeError / ValueError: ``chunk_size`` or ``randomness`` is not one of the values above,
                or an input that ``in_dims`` maps has not ``P`` slices along that dimension.
            TypeError: the output holds an object torch's pytree cannot look into (a dataclass it does
                not know: register it with ``torch.utils._pytree.register_dataclass``).

        >>> s = Swarm.stack([torch.nn.Linear(2, 1) for _ in range(3)])
        >>> x = torch.randn(5, 2)
        >>> torch.allclose(s(x)[1], s[1].module()(x))
        True
        """
        return vec.forward(self._spec, self._views(), self._size, args, kwargs, in_dims=in_dims,
                           randomness=randomness, chunk_size=chunk_size)

    def grad_and_value(self, loss_fn: Callable[..., Tensor], /, *args: Any, in_dims: vec.InDims = None,
                       randomness: str = "different", chunk_size: Optional[int] = None,
                       **kwargs: Any) -> tuple["Swarm", Tensor]:
        """Per-member gradients and losses of ``loss_fn(member, *args, **kwargs)`` in one vectorised call.

        ``member(*inputs)`` runs that member's forward; ``member.params`` / ``member.buffers`` give its
        tensors (for regularisers).  Gradients are taken with respect to every operational floating
        parameter that requires grad in the model; the rest get zeros.  As for ``swarm(...)``,
        attributes a forward sets on its modules (other than buffers) are not kept.

        Args:
            loss_fn: ``loss_fn(member, *args, **kwargs)`` returning that member's loss, a 0-dim tensor.
            *args, **kwargs: passed to ``loss_fn`` after the member.
            in_dims, randomness, chunk_size: as for ``swarm(...)``.

        Returns:
            ``(grads, losses)``: a Swarm of gradients (same structure) and a ``(P,)`` tensor of losses.

        Raises:
            TypeError: ``loss_fn`` is not callable or returns an integer or boolean loss.
            ValueError: ``loss_fn`` returns something other than a 0-dim tensor.

        >>> import torch.nn.functional as F
        >>> s = Swarm.stack([torch.nn.Linear(2, 1) for _ in range(3)])
        >>> x, y = torch.randn(8, 2), torch.randn(8, 1)
        >>> grads, losses = s.grad_and_value(lambda net, x, y: F.mse_loss(net(x), y), x, y)
        >>> grads = grads - 0.1 * grads          # a Swarm like any other
        >>> tuple(losses.shape)
        (3,)
        """
        spec = self._spec
        grads, losses = vec.grad_and_value(spec, self._views(), self._size, loss_fn, args, kwargs,
                                           in_dims=in_dims, randomness=randomness, chunk_size=chunk_size)
        stand_ins = spec.layout.params + spec.layout.buffers
        leaves = [
            grad.detach() if grad is not None
            else torch.zeros(self._size, *s.shape, dtype=s.dtype, device=s.device)
            for grad, s in zip(grads, stand_ins)
        ]
        return self._new(pack_stacked(spec, leaves, self._size)), losses.detach()
