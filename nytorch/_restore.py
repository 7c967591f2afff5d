"""Decode a checkpoint into the structure of a template (``like``), checking every name, shape and dtype."""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Optional, cast

import numpy as np
import torch
from torch import nn

from ._bind import bind
from ._codec import (TAG, CheckpointError, malformed, class_of, decode_generator, fields_of, generator_device,
                     is_dataclass_instance, is_namedtuple, join, named_tensors, plain, same_class, swarm_class, tag_of)
from ._errors import StructureError, describe
from ._particle import Particle
from ._walk import Layout, model_class

Tensor = torch.Tensor

__all__ = ["restore"]


def _fn(path: str) -> str:
    return f"load (at {path!r})" if path else "load"


def _aligned(path: str, names: list[str], leaves: list[Tensor], saved: Mapping[str, Tensor],
             *, optional: tuple[str, ...] = ()) -> list[Optional[Tensor]]:
    """Saved tensors in ``names`` order, checked against ``leaves`` and moved to their devices.

    Saved tensors are matched by name, in any order (the result follows ``names``).  The first
    difference in ``names`` order is reported (a missing name or another shape, dtype or
    meta-ness), then names only the checkpoint has.  Names in ``optional`` may be absent
    from ``saved`` (``None`` is returned for them).
    """
    fn = _fn(path)
    for name, leaf in zip(names, leaves):
        value = saved.get(name)
        if value is None:
            if name in optional:
                continue
            raise StructureError(f"{fn}: parameter {name!r} is missing from the checkpoint")
        if value.shape != leaf.shape or value.dtype != leaf.dtype:
            raise StructureError(f"{fn}: parameter {name!r} differs: like has {describe(leaf)}, "
                                 f"the checkpoint has {describe(value)}")
        if value.device.type == "meta" and leaf.device.type != "meta":
            raise CheckpointError(f"{fn}: parameter {name!r} was saved on the meta device and has no "
                                  "values to load")
    wanted = set(names)
    extra = next((name for name in saved if name not in wanted), None)
    if extra is not None:
        raise StructureError(f"{fn}: the checkpoint has an extra parameter {extra!r}")
    return [None if name not in saved else saved[name].to(leaf.device) for name, leaf in zip(names, leaves)]


def _found(data: Any, path: str) -> str:
    """What the checkpoint holds, for messages: ``a particle``, ``a NumPy scalar``, ``a dict``..."""
    tag = tag_of(data, path)
    if tag == "ndarray":
        return "a NumPy scalar" if data.get("scalar") is True else "a NumPy array"
    return f"a {tag}" if tag else f"a {type(data).__name__}"


def _expect(path: str, data: Any, kinds: tuple[str, ...], like: Any) -> dict[str, Any]:
    if tag_of(data, path) not in kinds:
        raise StructureError(f"{_fn(path)}: like is a {type(like).__name__} but the checkpoint holds "
                             f"{_found(data, path)}")
    return data  # type: ignore[no-any-return]


def _describe_array(array: np.ndarray[Any, Any]) -> str:
    return f"shape {tuple(array.shape)} {array.dtype}"


def _into_tensor(path: str, data: Any, like: Tensor) -> Tensor:
    """A tensor of ``like``'s shape and dtype on its device; an ``nn.Parameter`` for one, with its ``requires_grad``."""
    if not isinstance(data, Tensor):
        _expect(path, data, (), like)
    name = path or "<tensor>"
    value = cast(Tensor, _aligned(path, [name], [like], {name: data})[0])  # not optional: never None
    if isinstance(like, nn.Parameter):
        return nn.Parameter(value, requires_grad=like.requires_grad)
    return value.requires_grad_() if like.requires_grad else value


def _into_ndarray(path: str, data: Any, like: Any) -> Any:
    """A NumPy array (or scalar, as ``like`` is) of ``like``'s shape and dtype, structured dtypes included."""
    _expect(path, data, ("ndarray",), like)
    value, expected = np.asarray(plain(data, path)), np.asarray(like)
    if value.shape != expected.shape or value.dtype != expected.dtype:
        raise StructureError(f"{_fn(path)}: parameter {path or '<array>'!r} differs: like has "
                             f"{_describe_array(expected)}, the checkpoint has {_describe_array(value)}")
    return value[()] if isinstance(like, np.generic) else value


def _expect_model(path: str, data: Any, kinds: tuple[str, ...], like: Any, cls: type) -> dict[str, Any]:
    """``_expect``, then the saved class must be ``cls`` (``TypeError`` naming both, as the operators do)."""
    data = _expect(path, data, kinds, like)
    saved = class_of(data, path)
    if not same_class(saved, cls):
        of = "" if isinstance(like, nn.Module) else f"{type(like).__name__} of "
        raise TypeError(f"{_fn(path)}: expected a checkpoint of a {of}{cls.__module__}.{cls.__qualname__} "
                        f"(like's class), got one of a {saved}")
    return data


def _saved_state(path: str, data: dict[str, Any]) -> dict[str, Tensor]:
    if data[TAG] == "particle":
        return named_tensors(data, "tensors", path)
    return {**named_tensors(data, "params", path), **named_tensors(data, "buffers", path)}


def _into_particle(path: str, data: Any, like: Particle) -> Particle:
    data = _expect_model(path, data, ("particle", "module"), like, like.model_class)
    saved = _saved_state(path, data)
    names = list(like._names)
    if data[TAG] == "module" and not like._with_buffers:
        saved = named_tensors(data, "params", path)
    values = _aligned(path, names, list(like._leaves), saved)
    return Particle.from_params(like, dict(zip(names, values)))  # type: ignore[arg-type]


def _into_module(path: str, data: Any, like: nn.Module) -> nn.Module:
    data = _expect_model(path, data, ("module", "particle"), like, model_class(like))
    layout = Layout(like)
    names = list(layout.names) + list(layout.buffer_names)
    values = _aligned(path, names, list(layout.params) + list(layout.buffers), _saved_state(path, data),
                      optional=tuple(layout.buffer_names))
    return bind(like, {name: value for name, value in zip(names, values) if value is not None})


def _into_swarm(path: str, data: Any, like: Any) -> Any:
    data = _expect_model(path, data, ("swarm",), like, like.model_class)
    saved = {**named_tensors(data, "params", path), **named_tensors(data, "buffers", path)}
    expected = {**like.params, **like.buffers}  # params hold the buffers too when they take part in arithmetic
    names = list(expected)
    values = _aligned(path, names, list(expected.values()), saved)
    if not names:  # no tensor holds the member count: the record's own (files older than it: like's)
        size = data.get("size", len(like))
        if type(size) is not int or size < 0:
            raise malformed(data, path, f"expected a non-negative int under 'size', got {size!r}")
        if size != len(like):
            raise StructureError(f"{_fn(path)}: like is a swarm of {len(like)} members, the checkpoint holds "
                                 f"one of {size} (of a model without tensors)")
        return like.clone()
    return type(like).from_params(like, dict(zip(names, values)))


def _into_items(path: str, like: list[tuple[Any, Any]], data: Mapping[Any, Any]) -> list[Any]:
    """Restore ``data[key]`` into each ``(key, template)`` of ``like``, in ``like``'s order.

    Keys must match exactly (type included: ``1`` is not ``"1"``), in any order.  The first
    difference in ``like``'s order is reported; keys only in ``data`` come after.
    """
    fn = _fn(path)
    stored = {(type(key), key) for key in data}
    out = []
    for key, template in like:
        if (type(key), key) not in stored:
            near = next((other for other in data if str(other) == str(key)), None)
            hint = "" if near is None else f" (it has the key {near!r} of type {type(near).__name__})"
            raise StructureError(f"{fn}: parameter {key!r} is missing from the checkpoint{hint}")
        out.append(restore(join(path, key), data[key], template))
    wanted = {(type(key), key) for key, _ in like}
    extra = [key for key in data if (type(key), key) not in wanted]
    if extra:
        raise StructureError(f"{fn}: the checkpoint has an extra parameter {extra[0]!r}")
    return out


def restore(path: str, data: Any, like: Any) -> Any:
    """Decode ``data`` (from ``encode``) into new objects shaped like ``like`` (see ``nytorch.load``).

    Args:
        path: where ``data`` sits in the checkpoint (``""`` at the top; used in messages).
        data: the encoded value read from the file.
        like: the template; ``None`` decodes as is (``plain``).

    Raises:
        StructureError: names, shapes, dtypes or kinds differ (names the first differing parameter).
        TypeError: a Particle, module or Swarm was saved from another class than ``like``'s.
        CheckpointError: an entry is malformed, or holds meta tensors where ``like`` has values.

    >>> from ._codec import encode
    >>> net = torch.nn.Linear(1, 1)
    >>> copy = restore("", encode(net, ""), torch.nn.Linear(1, 1))
    >>> torch.equal(copy.weight, net.weight)
    True
    """
    swarm = swarm_class()
    if like is None:
        return plain(data, path)
    if isinstance(like, Particle):
        return _into_particle(path, data, like)
    if swarm is not None and isinstance(like, swarm):
        return _into_swarm(path, data, like)
    if isinstance(like, nn.Module):
        return _into_module(path, data, like)
    if isinstance(like, Tensor):
        return _into_tensor(path, data, like)
    if isinstance(like, torch.Generator):
        saved = generator_device(_expect(path, data, ("generator",), like), path)
        if saved.type != like.device.type:
            raise StructureError(f"{_fn(path)}: like is a generator on {like.device} but the checkpoint holds "
                                 f"one on {saved}")
        return decode_generator(data, path, like.device)
    if isinstance(like, (np.ndarray, np.generic)):
        return _into_ndarray(path, data, like)
    if is_namedtuple(like):
        fields = fields_of(_expect(path, data, ("namedtuple",), like), path)
        return type(like)(*_into_items(path, [(field, getattr(like, field)) for field in like._fields], fields))
    if is_dataclass_instance(like):
        fields = fields_of(_expect(path, data, ("dataclass",), like), path)
        declared = dataclasses.fields(like)
        values = dict(zip([field.name for field in declared],
                          _into_items(path, [(field.name, getattr(like, field.name)) for field in declared], fields)))
        result = dataclasses.replace(like, **{field.name: values[field.name] for field in declared if field.init})
        for field in declared:
            if not field.init:
                object.__setattr__(result, field.name, values[field.name])
        return result
    if isinstance(like, Mapping):
        if not isinstance(data, dict) or tag_of(data, path) is not None:
            _expect(path, data, (), like)
        items = list(zip(like, _into_items(path, list(like.items()), data)))
        return OrderedDict(items) if isinstance(like, OrderedDict) else dict(items)
    if isinstance(like, (list, tuple)) and not isinstance(like, torch.Size):
        if not like and isinstance(data, (list, tuple)) and not isinstance(data, torch.Size):
            # an empty list or tuple stands for one of any length (like a non-empty one, either kind)
            return type(like)(plain(item, join(path, i)) for i, item in enumerate(data))
        if not isinstance(data, (list, tuple)) or len(data) != len(like):
            found = f"{len(data)} items" if isinstance(data, (list, tuple)) else _found(data, path)
            raise StructureError(f"{_fn(path)}: like is a {type(like).__name__} of {len(like)} items "
                                 f"but the checkpoint holds {found}")
        return type(like)(restore(join(path, i), item, value) for i, (item, value) in enumerate(zip(data, like)))
    value = plain(data, path)
    if not _same_kind(value, like):
        raise StructureError(f"{_fn(path)}: like is a {type(like).__name__} but the checkpoint holds "
                             f"{_found(data, path)}")
    return value


def _same_kind(value: Any, like: Any) -> bool:
    """Numbers match numbers (bools only bools); anything else must have ``like``'s exact type."""
    if isinstance(like, bool) or isinstance(value, bool):
        return type(value) is type(like)
    if isinstance(like, (int, float)):
        return isinstance(value, (int, float))
    return type(value) is type(like)


