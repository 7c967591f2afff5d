"""``EMA``: a thin training-loop helper over ``ema_`` that holds the averaged copy and swaps it in.

Like an optimizer, an ``EMA`` keeps the model's tensors it was built with, so
``update()`` neither walks the module tree nor re-validates it: it is one fused
``lerp_`` (a single ``lerp_`` over one buffer: the model is packed when the EMA is made).
Three cheap checks run on every update: that the model's parameter and buffer tables
still hold those tensor objects (a ``model.to("meta")``, a conversion under
``torch.__future__.set_overwrite_module_params_on_conversion(True)`` or ``module.weight =
nn.Parameter(...)`` puts new ones there), that the addresses of their storage are
unchanged (``model.to(...)``, ``param.data = ...``), and that the model's ``ParamConfig``s
are as they were (``set_param_config`` after the EMA was made).  Any change makes the EMA
read the model again and re-validate it.  A dict of tensors is watched through its entries
the same way (new tensors put under its keys are followed), and the average's own tables at
both ends (``ema.averaged.load_state_dict(..., assign=True)`` makes the EMA read its average
again).  Passing another model object to ``update`` reads and checks it.

Packing makes each of the model's parameters (and the average's) a view into one buffer, so
``torch.save`` of one parameter or of a submodule's ``state_dict()`` writes the whole buffer
(torch saves a view's entire storage); ``.clone()`` it first to save it alone.
"""
from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Generic, Optional, TypeVar, Union

import numpy as np
import torch
from torch import nn

from .. import _leafwise as lw
from .._algebra import without_grad
from .._errors import StructureError, describe
from .._flags import flag
from .._flat import Flat, find_flat, plan_for, unshared, written
from .._packing import pack_
from .._walk import Placement, placement
from .._algebra import tie_key, ties
from ._ema import check_kernels, check_weight, apply_plan_, lerp_, plan, refuse_unwritable, weight_of
from ._ieee import Exact
from ._schedule import Schedule
from ._state import BufferMode, Operand, check_buffers, matched, operand, rebuild
from ._watch import Configs, entries, holds

#: What the EMA averages: a model, a Particle, a Swarm or a dict of tensors (``averaged`` is of its kind).
T = TypeVar("T")

Tensor = torch.Tensor

__all__ = ["EMA"]


class EMA(Generic[T]):
    """An exponential moving average of a model for training loops (timm's ``ModelEmaV3``, fixed).

    ``ema.update()`` after each optimizer step applies
    ``averaged ← decay·averaged + (1 − decay)·model`` with ``ema_``'s rules (tied
    weights once, integer buffers copied, floating buffers per ``buffers``);
    ``with ema.swap(): evaluate(model)`` runs code with the averages inside ``model``
    and restores the trained values afterwards, even on error.

    Like an optimizer, it holds the model's tensors (the ``Parameter`` objects): moving or
    converting the model (``model.to(...)``, including conversions that make new
    ``Parameter`` objects such as ``model.to("meta")``), giving a parameter new storage
    (``param.data = ...``) or putting a new parameter or buffer object in its place is
    noticed, and the model is read and re-checked (so moving it to another device raises
    ``DeviceMismatchError`` and converting it to another dtype ``StructureError``).  If you
    replace submodules by new objects, make a new ``EMA`` (or pass the new model object to
    ``update``, which then reads and checks it).  Parameters a ``ParamConfig`` marks
    non-operational are left alone by ``update``, ``swap`` and ``copy_to``, as by ``ema_``;
    configs changed after the EMA was made (``model.set_param_config(...)``) are followed.

    Args:
        model: the model being trained: an ``nn.Module``, a ``Particle``, a ``Swarm`` or a dict of tensors.
        decay: a float in [0, 1] or a schedule ``step -> decay`` such as ``warmup_decay(0.999)``
            (``step`` counts the updates already applied).
        buffers: ``"average"`` (default, like timm), ``"copy"`` (like ``swa_utils.AveragedModel``)
            or ``"keep"`` floating buffers, as ``ema_`` does (averaged ones in IEEE arithmetic where
            inf or NaN meet); integer buffers and buffers inside a ``torch.nn.utils.parametrize``
            parametrization are copied unless ``"keep"``.
        pack: pack a module ``model``'s floating parameters and buffers into one buffer per
            dtype first (as ``nytorch.particle`` does; Parameter objects are kept, so the
            optimizer keeps working), which makes ``update()`` one ``lerp_`` per buffer.
            ``False`` leaves the model's storage alone (one fused ``lerp_`` over its tensors).
            After packing, every parameter is a view into that buffer (so is every tensor of
            ``averaged``): ``torch.save(model.fc.weight, f)`` or
            ``torch.save(model.fc.state_dict(), f)`` writes the whole packed buffer, because
            views share storage; save ``{k: v.clone() for k, v in model.fc.state_dict().items()}``
            to write that part alone.  A whole ``model.state_dict()`` writes the buffer once.

    Attributes:
        averaged: the average, of ``model``'s kind (a module in eval mode without gradients).
        step: the number of updates applied.

    Raises:
        TypeError / ValueError: bad ``decay``, ``buffers`` or ``pack`` (not a bool), or an unsupported ``model``.

    >>> import torch
    >>> net = torch.nn.Linear(2, 1)
    >>> ema = EMA(net, decay=0.9)
    >>> with torch.no_grad():
    ...     _ = net.weight.add_(1.0)
    >>> ema.update()
    >>> with ema.swap():
    ...     torch.allclose(net.weight, ema.averaged.weight)
    True
    """

    def __init__(self, model: T, /, *, decay: Union[float, Schedule] = 0.9999,
                 buffers: BufferMode = "average", pack: bool = True) -> None:
        check_buffers("EMA", buffers)
        pack = bool(flag("EMA", "pack", pack))
        tau = None if callable(decay) else weight_of("EMA", decay, None)
        self._pack = pack and isinstance(model, nn.Module)
        if self._pack:
            pack_(model)  # type: ignore[arg-type]  # a module: ``_pack`` says so
        self._schedule = decay
        self._buffers: BufferMode = buffers
        self._model = model
        self._online = operand("EMA", model, buffers=buffers != "keep")
        self._plan = plan(self._online, buffers, alias=tie_key)
        self.averaged: T = self._copy()
        self._target = operand("EMA", self.averaged, buffers=buffers != "keep")
        self.step = 0
        self._tables, self._keys, self._held = entries(self._online)
        # a constant decay gives the same weight every update (a tensor's values may change: read each time)
        self._tau = tau if isinstance(decay, (int, float)) else None
        self._prepare()

    # -- internals ----------------------------------------------------------------------
    def _flat_group(self, leaves: list[Tensor]) -> tuple[list[int], Optional[Flat]]:
        """The lerp indices whose ``leaves`` sit in flat buffers (all, or the parameters), and those buffers."""
        everything = self._plan.lerp
        params = [i for i in everything if i < self._online.params]
        for group in (everything, params):
            chosen = [leaves[i] for i in group]
            if len(chosen) < 2:
                continue
            found = find_flat(plan_for(lw.signature(chosen), [True] * len(chosen)), chosen)
            if found is not None:
                return group, found
        return [], None

    @torch.inference_mode(False)  # an EMA made under inference_mode still averages (and trains) outside it
    @torch.no_grad()
    def _copy(self) -> Any:
        online = self._online
        leaves = [leaf.detach().clone() for leaf in online.leaves]
        group, found = self._flat_group(online.leaves)
        if found is not None:  # keep the average flat too: the update is then one lerp_ per buffer
            views = Flat(found.plan, [buffer.clone() for buffer in found.buffers], {}).leaves()
            for i, view in zip(group, views):
                leaves[i] = view
        # tied leaves (which ``plan`` updates once, through the first) share one copy too
        for i, first in ties(online.leaves, range(len(leaves))).items():
            leaves[i] = leaves[first]
        result = rebuild(online, leaves)
        if isinstance(result, nn.Module):
            result.requires_grad_(False)
            result.eval()
        return result

    def _pairs(self, steps: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        return [self._target.leaves[i] for i in steps], [self._online.leaves[i] for i in steps]

    def _prepare(self) -> None:
        group, online = self._flat_group(self._online.leaves)
        flat_target, flat_online = self._pairs(group)
        target = None if online is None else find_flat(online.plan, flat_target)
        self._flat: Optional[tuple[list[Tensor], list[Tensor]]] = None
        # the averaged leaves the flat ``lerp_`` writes without autograd seeing it: none while the
        # average is the copy built here (its Parameters are views of its buffer)
        self._flat_target: list[Tensor] = []
        if target is not None and online is not None:
            self._flat = (target.buffers, online.buffers)
            self._flat_target = unshared(flat_target, target.buffers)
        else:
            group = []
        grouped = set(group)
        self._lerp_target, self._lerp_online = self._pairs([i for i in self._plan.lerp if i not in grouped])
        self._exact = self._exact_buffers(group, online, target)
        self._copy_target, self._copy_online = self._pairs(self._plan.copy)
        # The averaged copy is the EMA's own: its first and last addresses tell a move (``.to()``).
        # Every tensor of the model is compared: a ``param.data = ...`` of another shape on any one of
        # them would fail part-way through the kernel (per tensor, with ``pack=False``), and the
        # model's flat buffer stands for every tensor of its group.  So is every copied tensor of
        # the model (integer buffers, few): one given new storage of another shape would fail after
        # the lerp.
        ends = [leaf for leaves in (self._lerp_target, flat_target if group else [])
                for leaf in leaves[:1] + leaves[-1:]]
        self._watch = ends + self._lerp_online + (flat_online if group else []) + self._copy_online
        self._seen = self._fingerprint()
        self._configs = Configs(self._online)
        # the average's first and last table entries: new objects there (``averaged.load_state_dict(...,
        # assign=True)``, ``averaged.to(...)``) make the EMA read its average again
        tables, keys, tensors = entries(self._target)
        self._target_ends = (tables[:1] + tables[1:][-1:], keys[:1] + keys[1:][-1:], tensors[:1] + tensors[1:][-1:])

    def _exact_buffers(self, group: list[int], online: Optional[Flat], target: Optional[Flat]) -> Optional[Exact]:
        """What makes the averaged floating buffers IEEE-exact (``_ieee.Exact``); ``None`` without any.

        In a flat buffer they follow the parameters (``plan`` lists them last): there the tail of
        each buffer stands for all of them, so the repair costs no per-tensor call.
        """
        exact = self._plan.exact
        if not exact:
            return None
        wanted = set(exact)
        ends: list[Tensor] = []
        starts: list[Tensor] = []
        flat: set[int] = set()
        if online is not None and target is not None:
            for positions, likes, end, start in zip(online.plan.groups, online.plan.likes, target.buffers,
                                                    online.buffers):
                marks = [group[p] in wanted for p in positions]
                first = marks.index(True) if True in marks else len(marks)
                if not all(marks[first:]):  # not a tail: per tensor below
                    continue
                offset = sum(like.numel() for like in likes[:first])
                if first < len(marks):
                    ends.append(end[offset:])
                    starts.append(start[offset:])
                    flat.update(group[p] for p in positions[first:])
        rest = [i for i in exact if i not in flat]
        target_rest, online_rest = self._pairs(rest)
        return Exact(ends + target_rest, starts + online_rest)

    def _fingerprint(self) -> Placement:
        return placement(self._watch)

    def _holds(self) -> bool:
        """True while the model's tables still hold the very tensor objects the EMA reads."""
        return holds(self._tables, self._keys, self._held)

    def _keeps(self) -> bool:
        """True while the average's tables still hold, at both ends, the tensors the EMA writes."""
        return holds(*self._target_ends)

    def _cached(self, fn: str) -> Operand:
        if self._holds() and self._keeps() and self._fingerprint() == self._seen and not self._configs.changed():
            return self._online
        if not self._keeps():
            average = operand(fn, self.averaged, buffers=self._buffers != "keep")
            self._target = matched(fn, self._target, average, "the average", reference="the average as made")
        # new tensor objects in the model (e.g. ``.to("meta")``), moved or converted tensors, or
        # other ``ParamConfig``s: read the model again and check it before anything is written
        online = operand(fn, self._model, buffers=self._buffers != "keep")
        online = matched(fn, self._target, online, "model", reference="the average")
        self._online = online
        self._tables, self._keys, self._held = entries(online)
        self._plan = plan(online, self._buffers, alias=tie_key)
        if self._pack:  # e.g. ``model.to(device)`` gave every tensor its own storage again
            pack_(self._model)  # type: ignore[arg-type]
            pack_(self.averaged)  # type: ignore[arg-type]  # and a copy of the EMA (deepcopy, pickle) gave the average's their own
        self._prepare()
        return self._online

    def _read(self, fn: str, model: Any) -> Operand:
        if model is None or model is self._model:
            return self._cached(fn)
        if self._configs.changed():  # the plan follows the model's ParamConfigs
            self._cached(fn)
        other = operand(fn, model, buffers=self._buffers != "keep")
        other = matched(fn, self._target, other, "model", reference="the average")
        return other

    # -- public API ------------------------------------------------------------------------
    @property
    def decay(self) -> float:
        """The decay the next ``update`` will use (the schedule at ``step``).

        Raises:
            TypeError: a schedule returns something other than a real number or a tensor.

        >>> ema = EMA(torch.nn.Linear(1, 1), decay=lambda step: 1 - 1 / (step + 2))
        >>> ema.decay
        0.5
        >>> ema.update(); ema.decay
        0.6666666666666667
        """
        schedule = self._schedule
        value = schedule(self.step) if callable(schedule) else schedule
        if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
            raise TypeError(f"EMA: expected the decay schedule to return a number, got {type(value).__name__}")
        return value  # type: ignore[return-value]

    @without_grad
    def update(self, model: Optional[T] = None) -> None:
        """Fold ``model`` (default: the model given at construction) into the average; ``step += 1``.

        Args:
            model: a model of the average's kind and structure; ``None``: the one given at construction.

        Raises:
            StructureError: ``model`` differs in names, shapes or dtypes (names the parameter).
            DeviceMismatchError: ``model`` was moved to another device than the average, or the decay
                is a 0-dim tensor on another device (not the CPU) than a parameter, as for ``ema_``.
            TypeError: ``model`` is of another class than the average, or a Swarm meets a model.
            TypeError / ValueError: a decay schedule returns an invalid decay.
            TypeError: torch has no ``lerp_`` for the dtype of an averaged tensor (float8, complex32);
                nothing is written.

        >>> net = torch.nn.Linear(1, 1)
        >>> ema = EMA(net, decay=0.5)
        >>> ema.update(); ema.step
        1
        """
        tau = self._tau
        if tau is None:
            tau = weight_of("EMA.update", self.decay, None)
            check_weight("EMA.update", tau, self._target, self._plan)  # a tensor decay on another device: named
        if model is None or model is self._model:
            self._cached("EMA.update")
            if not self._plan.usual:  # some dtype torch may have no ``lerp_`` for: asked before writing
                check_kernels("EMA.update", self._target, self._plan.lerp, tau)
            exact = self._exact
            if exact is not None:  # averaged floating buffers: IEEE where lerp_ would leave inf or NaN
                exact.before(tau)
            if self._flat is not None:
                lerp_(self._flat[0], self._flat[1], tau)
            lerp_(self._lerp_target, self._lerp_online, tau)
            if exact is not None:
                exact.after()
            if self._flat_target:
                written(self._flat_target)
            if self._copy_target:
                torch._foreach_copy_(self._copy_target, self._copy_online)
        else:
            other = self._read("EMA.update", model)
            if not self._plan.usual:  # some dtype torch may have no ``lerp_`` for: asked before writing
                check_kernels("EMA.update", self._target, self._plan.lerp, tau)
            apply_plan_(self._plan, self._target.leaves, other.leaves, tau)
        self.step += 1

    @contextmanager
    def swap(self, model: Optional[T] = None) -> Iterator[T]:
        """Context manager: ``model`` holds the averages inside the block, its own values after.

        Only what the average tracks is swapped (parameters, and buffers unless
        ``buffers="keep"``); the trained values are restored even if the block raises.

        Args:
            model: as for ``update``.

        Yields:
            The model holding the averages (``model``, or the one given at construction).

        Raises:
            StructureError / DeviceMismatchError / TypeError: ``model`` as for ``update``.
            RuntimeError: ``model`` holds inference tensors and this runs outside ``torch.inference_mode()``;
                nothing is written.

        >>> net = torch.nn.Linear(1, 1)
        >>> ema = EMA(net, decay=0.0)
        >>> with torch.no_grad():
        ...     _ = ema.averaged.weight.fill_(7.0)
        >>> with ema.swap() as swapped:
        ...     swapped.weight.item()
        7.0
        >>> net.weight.item() == 7.0
        False
        """
        live_model = self._model if model is None else model
        other = self._read("EMA.swap", model)
        steps = self._plan.lerp + self._plan.copy
        live = [other.leaves[i] for i in steps]
        refuse_unwritable("EMA.swap", other, steps)
        with torch.no_grad():
            saved = [leaf.detach().clone() for leaf in live]
            if live:
                torch._foreach_copy_(live, [self._target.leaves[i] for i in steps])
        try:
            yield live_model
        finally:
            with torch.no_grad():
                if live:
                    torch._foreach_copy_(live, saved)

    @torch.no_grad()
    def copy_to(self, model: Optional[T] = None) -> T:
        """Write the averages into ``model`` (default: the model given at construction) for good.

        Args:
            model: as for ``update``.

        Returns:
            The model written into (``model``, or the one given at construction).

        Raises:
            StructureError / DeviceMismatchError / TypeError / RuntimeError: as for ``swap``; nothing is written.

        >>> net = torch.nn.Linear(1, 1)
        >>> ema = EMA(net)
        >>> ema.copy_to(net) is net
        True
        """
        live_model = self._model if model is None else model
        other = self._read("EMA.copy_to", model)
        steps = self._plan.lerp + self._plan.copy
        refuse_unwritable("EMA.copy_to", other, steps)
        if steps:
            torch._foreach_copy_([other.leaves[i] for i in steps], [self._target.leaves[i] for i in steps])
        return live_model

    def state_dict(self) -> dict[str, Any]:
        """``{"step": int, "averaged": {name: tensor}}`` for checkpoints (tensors are references).

        Returns:
            ``step`` and the average's tracked tensors by name (the average's own tensors, not copies).

        >>> sorted(EMA(torch.nn.Linear(1, 1)).state_dict()["averaged"])
        ['bias', 'weight']
        """
        return {"step": self.step, "averaged": dict(zip(self._target.names, self._target.leaves))}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``step`` and the averages from ``state_dict()`` output (matched by name, like ``nn.Module``).

        ``state["averaged"]`` is matched by name, in any order, so it may also be a module's
        ``state_dict()`` (e.g. ``ema.averaged.state_dict()`` or an ``AveragedModel``'s
        ``module.state_dict()``, tied weights under every name).  As in
        ``nn.Module.load_state_dict``, values are copied into the average's tensors, so they
        take its dtypes and devices (a float64 checkpoint loads into a float32 average).
        Nothing is written unless every name and shape matches and every value can be copied.

        Args:
            state: a mapping with ``"step"`` and ``"averaged"``, as ``state_dict()`` returns.

        Raises:
            TypeError: ``state`` is not a mapping with ``"step"`` (a non-negative int) and
                ``"averaged"``, or holds complex values for real averages, or quantized values
                (``torch.quantize_per_tensor``: ``dequantize()`` them first).
            StructureError: a name is missing or unknown, or a shape differs.
            ValueError: a value is a meta tensor (no values to copy) for a real average, or sparse.

        >>> net = torch.nn.Linear(1, 1)
        >>> ema = EMA(net, decay=0.5)
        >>> with torch.no_grad():
        ...     _ = net.weight.fill_(3.0)
        >>> ema.update()
        >>> saved = {"step": ema.step, "averaged": {k: v.clone() for k, v in ema.state_dict()["averaged"].items()}}
        >>> restored = EMA(torch.nn.Linear(1, 1))
        >>> restored.load_state_dict(saved)
        >>> restored.step, torch.equal(restored.averaged.weight, ema.averaged.weight)
        (1, True)
        """
        fn = "EMA.load_state_dict"
        if not isinstance(state, Mapping) or "step" not in state or "averaged" not in state:
            raise TypeError(f"{fn}: expected a mapping with 'step' and 'averaged', got {type(state).__name__}")
        step = state["step"]
        if isinstance(step, Tensor) and step.dim() == 0 and not step.is_floating_point() and not step.is_complex() \
                and step.dtype != torch.bool:
            step = step.item()
        if isinstance(step, (bool, np.bool_)) or not isinstance(step, numbers.Integral) or step < 0:
            raise TypeError(f"{fn}: expected state['step'] to be a non-negative int, got {step!r}")
        averages = state["averaged"]
        if not isinstance(averages, Mapping) or not all(isinstance(v, Tensor) for v in averages.values()):
            raise TypeError(f"{fn}: expected state['averaged'] to map names to tensors")
        mine = dict(zip(self._target.names, self._target.leaves))
        known = dict(mine)
        if isinstance(self.averaged, nn.Module):  # a module's other names: tied weights, untracked buffers
            for name, value in self.averaged.state_dict(keep_vars=True).items():
                if isinstance(value, Tensor):
                    known.setdefault(name, value)
        targets, values = [], []
        for name, value in averages.items():
            target = known.get(name)
            if target is None:
                raise StructureError(f"{fn}: state has an extra parameter {name!r}, which the average does not have")
            if value.shape != target.shape:
                raise StructureError(f"{fn}: parameter {name!r} differs: {describe(target)} vs "
                                     f"{describe(value)} in state")
            if value.is_complex() and not target.is_complex():
                raise TypeError(f"{fn}: expected a real tensor for parameter {name!r} "
                                f"({describe(target)}), got {describe(value)} in state")
            if value.is_quantized and not target.is_quantized:  # copy_ would fail, after earlier entries
                raise TypeError(f"{fn}: expected a tensor of real values for parameter {name!r} "
                                f"({describe(target)}), got a quantized tensor ({describe(value)}) in state; "
                                "store value.dequantize() instead")
            if (value.is_meta and not target.is_meta) or value.layout != torch.strided:  # copy_ would fail
                what = "a meta tensor (no values)" if value.is_meta else f"a {value.layout} tensor"
                raise ValueError(f"{fn}: expected a dense tensor with values for parameter {name!r} "
                                 f"({describe(target)} on {target.device}), got {what} in state")
            targets.append(target)
            values.append(value)
        given = set(map(id, targets))
        for name, leaf in mine.items():
            if id(leaf) not in given:
                raise StructureError(f"{fn}: parameter {name!r} is missing from state")
        if targets:
            torch._foreach_copy_(targets, values)
        self.step = int(step)

    def __repr__(self) -> str:
        kind = type(self._model).__name__
        return f"EMA({kind}, step={self.step}, buffers={self._buffers!r})"

