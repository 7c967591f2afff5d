"""``EMA``: a thin training-loop helper over ``ema_`` that holds the averaged copy and swaps it in.

Like an optimizer, an ``EMA`` keeps the model's tensors it was built with, so
``update()`` neither walks the module tree nor re-validates it: it is one fused
``lerp_`` (a single ``lerp_`` over one buffer: the model is packed when the EMA is made).
Two cheap checks run on every update: that the model's parameter and buffer tables
still hold those tensor objects (a ``model.to("meta")``, a conversion under
``torch.__future__.set_overwrite_module_params_on_conversion(True)`` or ``module.weight =
nn.Parameter(...)`` puts new ones there), and that the addresses of their storage are
unchanged (``model.to(...)``, ``param.data = ...``).  Either change makes the EMA read the
model again and re-validate it.  Passing another model object to ``update`` reads and checks it.
"""
from __future__ import annotations

import numbers
import operator
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from torch import nn

from .. import _leafwise as lw
from .._flat import Flat, find_flat, pack_, plan_for, unshared, written
from ._ema import apply_plan_, lerp_, plan, weight_of
from ._schedule import Schedule
from ._state import BufferMode, Operand, check_buffers, check_same, operand, rebuild

Tensor = torch.Tensor

__all__ = ["EMA"]


def _entries(online: Operand) -> tuple[list[dict[str, Any]], list[str], list[Tensor]]:
    """``(tables, keys, tensors)``: each ``_parameters`` / ``_buffers`` entry holding a leaf of a module operand.

    A tied weight is listed once per module holding it.  Empty for Particles, Swarms and dicts.
    """
    tables: list[dict[str, Any]] = []
    keys: list[str] = []
    tensors: list[Tensor] = []
    layout = online.layout
    if online.kind != "module" or layout is None:
        return tables, keys, tensors
    with_buffers = len(online.leaves) > online.params
    for module, param_slots, buffer_slots in zip(layout.modules, layout.param_slots, layout.buffer_slots):
        for table, slots, leaves in ((module._parameters, param_slots, layout.params),
                                     (module._buffers, buffer_slots, layout.buffers if with_buffers else None)):
            if leaves is None:
                continue
            for key, index in slots:
                if index is not None:
                    tables.append(table)
                    keys.append(key)
                    tensors.append(leaves[index])
    return tables, keys, tensors


class EMA:
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
    ``update``, which then reads and checks it).

    Args:
        model: the model being trained: an ``nn.Module``, a ``Particle``, a ``Swarm`` or a dict of tensors.
        decay: a float in [0, 1] or a schedule ``step -> decay`` such as ``warmup_decay(0.999)``
            (``step`` counts the updates already applied).
        buffers: ``"average"`` (default, like timm), ``"copy"`` (like ``swa_utils.AveragedModel``)
            or ``"keep"`` floating buffers; integer buffers are copied unless ``"keep"``.
        pack: pack a module ``model``'s floating parameters and buffers into one buffer per
            dtype first (as ``nytorch.particle`` does; Parameter objects are kept, so the
            optimizer keeps working), which makes ``update()`` one ``lerp_`` per buffer.
            ``False`` leaves the model's storage alone (one fused ``lerp_`` over its tensors).

    Attributes:
        averaged: the average, of ``model``'s kind (a module in eval mode without gradients).
        step: the number of updates applied.

    Raises:
        TypeError / ValueError: bad ``decay`` or ``buffers``, or an unsupported ``model``.

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

    def __init__(self, model: Any, /, *, decay: Union[float, Schedule] = 0.9999,
                 buffers: BufferMode = "average", pack: bool = True) -> None:
        check_buffers("EMA", buffers)
        if not callable(decay):
            weight_of("EMA", decay, None)
        self._pack = pack and isinstance(model, nn.Module)
        if self._pack:
            pack_(model)
        self._schedule = decay
        self._buffers: BufferMode = buffers
        self._model = model
        self._online = operand("EMA", model, buffers=buffers != "keep")
        self._plan = plan(self._online, buffers)
        self.averaged = self._copy()
        self._target = operand("EMA", self.averaged, buffers=buffers != "keep")
        self.step = 0
        self._tables, self._keys, self._held = _entries(self._online)
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

    @torch.no_grad()
    def _copy(self) -> Any:
        online = self._online
        leaves = [leaf.detach().clone() for leaf in online.leaves]
        group, found = self._flat_group(online.leaves)
        if found is not None:  # keep the average flat too: the update is then one lerp_ per buffer
            views = Flat(found.plan, [buffer.clone() for buffer in found.buffers], {}).leaves()
            for i, view in zip(group, views):
                leaves[i] = view
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
        self._copy_target, self._copy_online = self._pairs(self._plan.copy)
        # Per-tensor kernels follow each tensor wherever it moves: the first and last address tell a
        # move (``.to()``), and so they do for the averaged copy, which is the EMA's own.  The model's
        # flat buffer stands for every tensor of the group, so a ``param.data = ...`` on any one of
        # them must be seen: every address there is compared.
        ends = [leaf for leaves in (self._lerp_target, self._lerp_online, flat_target if group else [])
                for leaf in leaves[:1] + leaves[-1:]]
        self._watch = ends + (flat_online if group else [])
        self._seen = self._fingerprint()

    def _fingerprint(self) -> tuple[int, ...]:
        return tuple(map(Tensor.data_ptr, self._watch))

    def _holds(self) -> bool:
        """True while the model's tables still hold the very tensor objects the EMA reads."""
        return all(map(operator.is_, map(dict.get, self._tables, self._keys), self._held))

    def _cached(self, fn: str) -> Operand:
        if not self._holds():  # new tensor objects in the model (e.g. ``.to("meta")``): read it again
            online = operand(fn, self._model, buffers=self._buffers != "keep")
            check_same(fn, self._target, online, "model", reference="the average")
            self._online = online
            self._tables, self._keys, self._held = _entries(online)
        elif self._fingerprint() != self._seen:  # moved or converted since: check again
            check_same(fn, self._target, self._online, "model", reference="the average")
        else:
            return self._online
        if self._pack:  # e.g. ``model.to(device)`` gave every tensor its own storage again
            pack_(self._model)
        self._prepare()
        return self._online

    def _read(self, fn: str, model: Any) -> Operand:
        if model is None or model is self._model:
            return self._cached(fn)
        other = operand(fn, model, buffers=self._buffers != "keep")
        check_same(fn, self._target, other, "model", reference="the average")
        return other

    # -- public API ------------------------------------------------------------------------
    @property
    def decay(self) -> float:
        """The decay the next ``update`` will use (the schedule at ``step``).

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

    @torch.no_grad()
    def update(self, model: Any = None) -> None:
        """Fold ``model`` (default: the model given at construction) into the average; ``step += 1``.

        Raises:
            StructureError: ``model`` differs in names, shapes or dtypes (names the parameter).
            DeviceMismatchError: ``model`` was moved to another device than the average.

        >>> net = torch.nn.Linear(1, 1)
        >>> ema = EMA(net, decay=0.5)
        >>> ema.update(); ema.step
        1
        """
        tau = weight_of("EMA.update", self.decay, None)
        if model is None or model is self._model:
            self._cached("EMA.update")
            if self._flat is not None:
                lerp_(self._flat[0], self._flat[1], tau)
                if self._flat_target:
                    written(self._flat_target)
            lerp_(self._lerp_target, self._lerp_online, tau)
            if self._copy_target:
                torch._foreach_copy_(self._copy_target, self._copy_online)
        else:
            other = self._read("EMA.update", model)
            apply_plan_(self._plan, self._target.leaves, other.leaves, tau)
        self.step += 1

    @contextmanager
    def swap(self, model: Any = None) -> Iterator[Any]:
        """Context manager: ``model`` holds the averages inside the block, its own values after.

        Only what the average tracks is swapped (parameters, and buffers unless
        ``buffers="keep"``); the trained values are restored even if the block raises.

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
    def copy_to(self, model: Any = None) -> Any:
        """Write the averages into ``model`` (default: the model given at construction) for good.

        >>> net = torch.nn.Linear(1, 1)
        >>> ema = EMA(net)
        >>> ema.copy_to(net) is net
        True
        """
        live_model = self._model if model is None else model
        other = self._read("EMA.copy_to", model)
        steps = self._plan.lerp + self._plan.copy
        if steps:
            torch._foreach_copy_([other.leaves[i] for i in steps], [self._target.leaves[i] for i in steps])
        return live_model

    def state_dict(self) -> dict[str, Any]:
        """``{"step": int, "averaged": {name: tensor}}`` for checkpoints (tensors are references).

        >>> sorted(EMA(torch.nn.Linear(1, 1)).state_dict()["averaged"])
        ['bias', 'weight']
        """
        return {"step": self.step, "averaged": dict(zip(self._target.names, self._target.leaves))}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``step`` and the averages from ``state_dict()`` output.

        Raises:
            StructureError: the saved averages have other names or shapes.

        >>> ema = EMA(torch.nn.Linear(1, 1))
        >>> ema.load_state_dict(ema.state_dict())
        """
        if not isinstance(state, Mapping) or "step" not in state or "averaged" not in state:
            raise TypeError("EMA.load_state_dict: expected a mapping with 'step' and 'averaged', "
                            f"got {type(state).__name__}")
        averages = state["averaged"]
        if not isinstance(averages, Mapping) or not all(isinstance(v, Tensor) for v in averages.values()):
            raise TypeError("EMA.load_state_dict: expected state['averaged'] to map names to tensors")
        names = list(averages)
        leaves = [averages[name] for name in names]
        if names == self._target.names:  # like nn.Module.load_state_dict, accept another device
            leaves = [value.to(mine.device) for value, mine in zip(leaves, self._target.leaves)]
        saved = Operand("tree", averages, names, leaves, len(names), None)
        check_same("EMA.load_state_dict", self._target, saved, "state", reference="the average")
        if self._target.leaves:
            torch._foreach_copy_(self._target.leaves, saved.leaves)
        self.step = int(state["step"])

    def __repr__(self) -> str:
        kind = type(self._model).__name__
        return f"EMA({kind}, step={self.step}, buffers={self._buffers!r})"

