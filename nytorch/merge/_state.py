"""What the merge functions accept, as aligned leaf lists: models, Particles, Swarms, dicts of tensors.

``operand(fn, x)`` reads any accepted value once into an ``Operand`` (names,
leaves, how many of them are parameters, configs).  ``matched`` checks one operand against
another (``StructureError`` naming the first differing parameter), after putting a pytree's
leaves in the other's order.
``rebuild`` turns new leaves back into a value of the operand's kind (a model
gives a fresh model of the same class, a Particle a Particle, a dict a dict).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Optional

import optree
import torch
from torch import nn
from torch.nn.utils.parametrize import ParametrizationList

from .. import _algebra as algebra
from .. import _leafwise as lw
from .. import _nocast as nocast
from .._config import ParamConfig, configs_for
from .._errors import DeviceMismatchError, StructureError, class_names, describe
from .._particle import Particle, layout_state
from .._tree_match import flatten, path_names
from .._rebuild import rebuild as rebuild_module
from .._walk import Layout, layout_of, model_class

if TYPE_CHECKING:
    from typing_extensions import TypeGuard

    from .._swarm import Swarm

Tensor = torch.Tensor
Kind = Literal["module", "particle", "swarm", "tree"]
#: How buffers take part: averaged (floating ones; integer ones copied), copied, or left alone.
BufferMode = Literal["average", "copy", "keep"]
BUFFER_MODES = ("average", "copy", "keep")

__all__ = ["Operand", "operand", "matched", "rebuild", "is_swarm", "members", "per_member", "check_buffers",
           "BufferMode", "shares", "carry", "parametrization_buffers"]


class Operand(NamedTuple):
    """One value read as leaves: ``leaves[:params]`` are parameters, the rest buffers."""

    kind: Kind
    source: Any
    names: list[str]
    leaves: list[Tensor]
    params: int
    configs: Optional[Sequence[ParamConfig]]
    spec: Optional[optree.PyTreeSpec] = None
    layout: Optional[Layout] = None

    def active(self, index: int) -> bool:
        """True when leaf ``index`` takes part in arithmetic (floating and operational)."""
        leaf = self.leaves[index]
        if not lw.is_arithmetic(leaf):
            return False
        return self.configs is None or index >= len(self.configs) or self.configs[index].operational

    def operational(self, index: int) -> bool:
        """False only for parameters a ``ParamConfig`` leaves out of particle operations."""
        return self.configs is None or index >= len(self.configs) or self.configs[index].operational


def is_swarm(value: object) -> TypeGuard[Swarm]:
    """True for a ``nytorch.Swarm`` (a broadcasting container with stacked ``params``)."""
    return getattr(type(value), "__nytorch_broadcasts__", False) is True and hasattr(value, "params")


def members(value: Operand) -> Optional[int]:
    """How many members a Swarm operand has (its leaves are stacked ``[P, ...]``); ``None`` for any other kind."""
    return len(value.source) if value.kind == "swarm" else None


def per_member(fn: Callable[..., Sequence[Tensor]], size: int, *stacked: Sequence[Tensor]) -> list[Tensor]:
    """``fn`` on each member's rows of ``stacked`` leaf lists (``[P, ...]`` each), results stacked back.

    Exactly a loop of per-member calls: member ``k`` gets ``[leaf[k] for leaf in leaves]`` of each list,
    and members run in order (so random draws inside ``fn`` come in a loop's order).

    >>> per_member(lambda xs: [x * 2 for x in xs], 2, [torch.tensor([1., 2.])])
    [tensor([2., 4.])]
    """
    rows = [fn(*([leaf[k] for leaf in leaves] for leaves in stacked)) for k in range(size)]
    return [nocast.stack(column) for column in zip(*rows)]


def shares(value: Operand, index: int) -> bool:
    """True when results hold leaf ``index`` as is: a model's or Particle's parameter that a
    ``ParamConfig(operational=False, clone=False)`` leaves out of arithmetic (as particle arithmetic does)."""
    configs = value.configs
    if configs is None or index >= len(configs) or value.kind not in ("module", "particle"):
        return False
    return not configs[index].operational and not configs[index].clone


def carry(value: Operand, index: int) -> Tensor:
    """Leaf ``index`` of ``value`` for a result that leaves it out of arithmetic: a clone, or itself (``shares``).

    >>> carry(operand("demo", {"w": torch.ones(1)}, buffers=False), 0)
    tensor([1.])
    """
    leaf = value.leaves[index]
    return leaf if shares(value, index) else leaf.detach().clone()


def parametrization_buffers(value: Operand) -> frozenset[int]:
    """Indices of ``value``'s buffers that live inside a ``torch.nn.utils.parametrize`` parametrization.

    Those are the parametrization's own state (``orthogonal``'s ``base``, ``spectral_norm``'s
    ``_u`` / ``_v``): the modules under a ``ParametrizationList`` (``module.parametrizations.weight.0``),
    not the tensor they parametrize (``original``, a parameter, or a buffer when a buffer is
    parametrized).  Merges copy them from one model, never average them: an average of two
    orthogonal bases is not one.  A pytree has no modules: none of its leaves count.

    >>> from torch.nn.utils.parametrizations import orthogonal
    >>> model = orthogonal(torch.nn.Linear(2, 2))
    >>> read = operand("demo", model, buffers=True)
    >>> [read.names[i] for i in sorted(parametrization_buffers(read))]
    ['parametrizations.weight.0.base']
    """
    if value.kind == "module":
        layout = value.layout if value.layout is not None else layout_of(value.source)
    elif value.kind == "particle":
        layout = value.source._layout
    elif value.kind == "swarm":
        layout = value.source._spec.layout
    else:
        return frozenset()
    inside = tuple(layout.prefixes[child] for module, children in zip(layout.modules, layout.children)
                   if isinstance(module, ParametrizationList) for _, child in children if child is not None)
    if not inside:
        return frozenset()
    return frozenset(index for index in range(value.params, len(value.names)) if value.names[index].startswith(inside))


def check_buffers(fn: str, buffers: object) -> None:
    """Raise ``ValueError`` unless ``buffers`` is one of ``"average"``, ``"copy"``, ``"keep"``."""
    if buffers not in BUFFER_MODES:
        raise ValueError(f"{fn}: expected buffers to be one of 'average', 'copy', 'keep', got {buffers!r}")


def operand(fn: str, value: object, *, buffers: bool, argument: str = "model") -> Operand:
    """Read ``value`` (model, Particle, Swarm or pytree of tensors) as aligned names and leaves.

    Args:
        fn: the public function name, for messages.
        value: what to read.
        buffers: include a model's (or Swarm's) buffers after its parameters.  A
            Particle carries buffers only if it was made with ``buffers=True``.
        argument: how messages name ``value``.

    Raises:
        TypeError: ``value`` is none of the accepted kinds.
    """
    if isinstance(value, Particle):
        names, leaves = list(value._names), list(value._leaves)
        count = len(value._layout.params) if value._with_buffers else len(names)
        if not buffers:
            names, leaves = names[:count], leaves[:count]
        configs = value._configs
        return Operand("particle", value, names, leaves, count, configs)
    if isinstance(value, nn.Module):
        layout = layout_of(value)
        names, leaves = layout_state(layout, buffers)
        return Operand("module", value, list(names), list(leaves), len(layout.names),
                       configs_for(layout, layout.names), None, layout)
    if is_swarm(value):
        stacked = dict(getattr(value, "buffers", None) or {})
        params = {name: leaf for name, leaf in value.params.items() if name not in stacked}  # type: ignore[attr-defined]
        names, leaves = list(params), list(params.values())
        if buffers:
            names += list(stacked)
            leaves += list(stacked.values())
        # the members' ParamConfigs (a Swarm of NytoModules keeps them): parameters first, as here
        configs = value._spec.configs  # type: ignore[attr-defined]
        return Operand("swarm", value, names, leaves, len(params), None if configs is None else configs[:len(params)])
    if isinstance(value, (dict, list, tuple, Tensor)):
        leaves, spec = flatten(fn, value, argument, scalar=False)  # a merge takes no scalar
        return Operand("tree", value, path_names(value), leaves, len(leaves), None, spec)
    raise TypeError(f"{fn}: expected an nn.Module, a Particle, a Swarm or a dict of tensors as {argument}, "
                    f"got {type(value).__name__}")


def matched(fn: str, first: Operand, other: Operand, label: str, *, reference: str = "the first operand") -> Operand:
    """``other``, checked against ``first`` by ``check_same``; a pytree's leaves first put in ``first``'s order.

    A plain dict flattens with its keys sorted, an ``OrderedDict`` (a ``state_dict()``) in insertion
    order: a pytree naming the same leaves as ``first`` in another order is matched by name.

    >>> a = operand("demo", {"w": torch.zeros(1), "b": torch.ones(2)}, buffers=False)
    >>> from collections import OrderedDict
    >>> b = operand("demo", OrderedDict(w=torch.zeros(1), b=torch.ones(2)), buffers=False)
    >>> a.names, b.names, matched("demo", a, b, "b").names
    (['b', 'w'], ['w', 'b'], ['b', 'w'])
    """
    _check_kinds(fn, first, other, label, reference)
    if other.kind == "tree" and first.names != other.names and len(first.names) == len(other.names):
        where = dict(zip(other.names, other.leaves))
        if len(where) == len(other.names) and where.keys() == set(first.names):
            other = other._replace(names=list(first.names), leaves=[where[name] for name in first.names])
    check_same(fn, first, other, label, reference=reference)
    return other


def _model_class(value: Operand) -> Optional[type]:
    """The class of the model ``value`` stands for (a Swarm's members'); ``None`` for a pytree."""
    if value.kind == "module":
        return model_class(value.source)
    return None if value.kind == "tree" else value.source.model_class  # type: ignore[no-any-return]


def _check_kinds(fn: str, first: Operand, other: Operand, label: str, reference: str) -> None:
    """Raise ``TypeError`` when a Swarm meets a model or Particle, or two models are of two classes.

    Merges combine models of one class, as arithmetic does (pytrees are matched by names alone).
    """
    if first.kind == "tree" or other.kind == "tree":
        return
    if (first.kind == "swarm") != (other.kind == "swarm"):
        swarm, single = (reference, label) if first.kind == "swarm" else (label, reference)
        kind = type((other if first.kind == "swarm" else first).source).__name__
        raise TypeError(f"{fn}: {swarm} is a Swarm and {single} of class {kind}; "
                        "a Swarm merges with Swarms of as many members (member i with member i)")
    first_class, other_class = _model_class(first), _model_class(other)
    if first_class is not other_class:
        names = class_names(first_class, other_class)  # type: ignore[arg-type]
        raise TypeError(f"{fn}: {reference} is of class {names[0]} and {label} of class {names[1]}; "
                        "merges combine models of one class (pass nf.params(...) of each to match by names alone)")


def check_same(fn: str, first: Operand, other: Operand, label: str, *, reference: str = "the first operand") -> None:
    """Raise ``StructureError`` naming the first parameter whose name, shape, dtype or device differs.

    ``label`` names ``other`` in messages (e.g. ``"online"``, ``"models[2]"``), ``reference``
    names ``first`` (e.g. ``"target"``, ``"models[0]"``).
    """
    if first.names is not other.names and first.names != other.names:
        algebra.check_names(fn, first.names, other.names, label, reference)
    for name, a, b in zip(first.names, first.leaves, other.leaves):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise StructureError(f"{fn}: parameter {name!r} differs: {describe(a)} vs "
                                 f"{describe(b)} in {label}")
        if a.device != b.device:
            raise DeviceMismatchError(f"{fn}: parameter {name!r} is on {a.device} but on {b.device} in "
                                      f"{label}; move both to one device first (e.g. model.to(device))")


def rebuild(base: Operand, leaves: Sequence[Tensor]) -> Any:
    """A new value of ``base``'s kind holding ``leaves`` (aligned with ``base.leaves``).

    A model gives a fresh model of the same class (buffers from ``leaves`` when
    ``base`` included them, else cloned); a Particle a Particle; a Swarm
    ``Swarm.from_params``; a pytree the same pytree.
    """
    leaves = list(leaves)
    if base.kind == "module":
        layout = base.layout if base.layout is not None else layout_of(base.source)
        count = base.params
        buffers = leaves[count:] if len(leaves) > count else None
        return rebuild_module(layout, leaves[:count], buffers)
    if base.kind == "particle":
        source: Particle = base.source
        count = len(source._leaves)
        if len(leaves) > count and not source._with_buffers:  # a Swarm member's own buffers, merged
            module = rebuild_module(source._layout, leaves[:count], leaves[count:])
            return type(source)(Layout(module), source._names, leaves[:count], source._configs, False)
        if len(leaves) < count:  # buffers were left out: carry clones
            leaves += [leaf.detach().clone() for leaf in source._leaves[len(leaves):]]
        return type(source)(source._layout, source._names, leaves, source._configs, source._with_buffers)
    if base.kind == "swarm":
        swarm = base.source
        given = dict(zip(base.names, leaves))
        current = swarm.params  # parameters, plus buffers the swarm takes into arithmetic
        count = leaves[0].shape[0] if leaves else len(swarm)
        chosen = {}
        for name, value in current.items():
            if name not in given:  # left out of this operation: carried (member 0's when sizes differ)
                given[name] = value.clone() if value.shape[0] == count else value[:1].expand(count, *value.shape[1:])
            chosen[name] = given[name]
        result = type(swarm).from_params(swarm, chosen)
        rest = {name: value for name, value in given.items() if name not in chosen}
        if rest:
            own = result.buffers
            with torch.no_grad():
                for name, value in rest.items():
                    own[name].copy_(value)
        return result
    if base.spec is None:
        raise TypeError(f"rebuild: cannot rebuild a {base.kind} operand")
    return optree.tree_unflatten(base.spec, leaves)
