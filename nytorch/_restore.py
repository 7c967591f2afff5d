"""Decode a checkpoint into the structure of a template (``like``), checking every name, shape and dtype."""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from . import _algebra as algebra
from ._bind import bind
from ._codec import (TAG, CheckpointError, fields_of, is_dataclass_instance, is_namedtuple, join, named_tensors,
                     plain, swarm_class, tag_of)
from ._errors import StructureError
from ._particle import Particle
from ._walk import Layout

Tensor = torch.Tensor

__all__ = ["restore"]


def _fn(path: str) -> str:
    return f"load (at {path!r})" if path else "load"


def _aligned(path: str, names: list[str], leaves: list[Tensor], saved: Mapping[str, Tensor],
             *, optional: tuple[str, ...] = ()) -> list[Optional[Tensor]]:
    """Saved tensors in ``names`` order, checked against ``leaves`` and moved to their devices.

    Names in ``optional`` may be absent from ``saved`` (``None`` is returned for them).
    """
    fn = _fn(path)
    expected = [name for name in names if name in saved or name not in optional]
    algebra.check_names(fn, expected, list(saved), "the checkpoint")
    out: list[Optional[Tensor]] = []
    for name, leaf in zip(names, leaves):
        value = saved.get(name)
        if value is None:
            out.append(None)
            continue
        if value.shape != leaf.shape or value.dtype != leaf.dtype:
            raise StructureError(f"{fn}: parameter {name!r} differs: like has {_describe(leaf)}, "
                                 f"the checkpoint has {_describe(value)}")
        if value.device.type == "meta" and leaf.device.type != "meta":
            raise CheckpointError(f"{fn}: parameter {name!r} was saved on the meta device and has no "
                                  "values to load")
        out.append(value.to(leaf.device))
    return out


def _describe(leaf: Tensor) -> str:
    return f"shape {tuple(leaf.shape)} {str(leaf.dtype).removeprefix('torch.')}"


def _expect(path: str, data: Any, kinds: tuple[str, ...], like: Any) -> dict[str, Any]:
    tag = tag_of(data)
    if tag not in kinds:
        found = f"a {tag}" if tag else f"a {type(data).__name__}"
        raise StructureError(f"{_fn(path)}: like is a {type(like).__name__} but the checkpoint holds {found}")
    return data  # type: ignore[no-any-return]


def _saved_state(path: str, data: dict[str, Any]) -> dict[str, Tensor]:
    if data[TAG] == "particle":
        return named_tensors(data, "tensors", path)
    return {**named_tensors(data, "params", path), **named_tensors(data, "buffers", path)}


def _into_particle(path: str, data: Any, like: Particle) -> Particle:
    data = _expect(path, data, ("particle", "module"), like)
    saved = _saved_state(path, data)
    names = list(like._names)
    if data[TAG] == "module" and not like._with_buffers:
        saved = named_tensors(data, "params", path)
    values = _aligned(path, names, list(like._leaves), saved)
    return Particle.from_params(like, dict(zip(names, values)))  # type: ignore[arg-type]


def _into_module(path: str, data: Any, like: nn.Module) -> nn.Module:
    data = _expect(path, data, ("module", "particle"), like)
    layout = Layout(like)
    names = list(layout.names) + list(layout.buffer_names)
    values = _aligned(path, names, list(layout.params) + list(layout.buffers), _saved_state(path, data),
                      optional=tuple(layout.buffer_names))
    return bind(like, {name: value for name, value in zip(names, values) if value is not None})


def _into_swarm(path: str, data: Any, like: Any) -> Any:
    data = _expect(path, data, ("swarm",), like)
    saved = {**named_tensors(data, "params", path), **named_tensors(data, "buffers", path)}
    expected = {**like.params, **like.buffers}  # params hold the buffers too when they take part in arithmetic
    names = list(expected)
    values = _aligned(path, names, list(expected.values()), saved)
    return type(like).from_params(like, dict(zip(names, values)))


def restore(path: str, data: Any, like: Any) -> Any:
    """Decode ``data`` (from ``encode``) into new objects shaped like ``like`` (see ``nytorch.load``).

    Args:
        path: where ``data`` sits in the checkpoint (``""`` at the top; used in messages).
        data: the encoded value read from the file.
        like: the template; ``None`` decodes as is (``plain``).

    Raises:
        StructureError: names, shapes, dtypes or kinds differ (names the first differing parameter).
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
        if not isinstance(data, Tensor):
            _expect(path, data, (), like)
        return _aligned(path, ["<tensor>"] if not path else [path], [like], {path or "<tensor>": data})[0]
    if isinstance(like, torch.Generator):
        _expect(path, data, ("generator",), like)
        generator = torch.Generator(device=like.device)
        generator.set_state(data["state"])
        return generator
    if isinstance(like, (np.ndarray, np.generic)):
        _expect(path, data, ("ndarray",), like)
        return plain(data, path)
    if is_namedtuple(like):
        fields = fields_of(_expect(path, data, ("namedtuple",), like), path)
        algebra.check_names(_fn(path), list(like._fields), list(fields), "the checkpoint")
        return type(like)(*(restore(join(path, field), fields[field], getattr(like, field))
                            for field in like._fields))
    if is_dataclass_instance(like):
        fields = fields_of(_expect(path, data, ("dataclass",), like), path)
        declared = dataclasses.fields(like)
        algebra.check_names(_fn(path), [field.name for field in declared], list(fields), "the checkpoint")
        values = {field.name: restore(join(path, field.name), fields[field.name], getattr(like, field.name))
                  for field in declared}
        result = dataclasses.replace(like, **{field.name: values[field.name] for field in declared if field.init})
        for field in declared:
            if not field.init:
                object.__setattr__(result, field.name, values[field.name])
        return result
    if isinstance(like, Mapping):
        if not isinstance(data, dict) or tag_of(data) is not None:
            _expect(path, data, (), like)
        algebra.check_names(_fn(path), [str(key) for key in like], [str(key) for key in data], "the checkpoint")
        items = [(key, restore(join(path, key), data[key], value)) for key, value in like.items()]
        return OrderedDict(items) if isinstance(like, OrderedDict) else dict(items)
    if isinstance(like, (list, tuple)) and not isinstance(like, torch.Size):
        if not like and type(data) is type(like):  # an empty list or tuple stands for one of any length
            return plain(data, path)
        if not isinstance(data, (list, tuple)) or len(data) != len(like):
            found = (f"{len(data)} items" if isinstance(data, (list, tuple))
                     else f"a {tag_of(data) or type(data).__name__}")
            raise StructureError(f"{_fn(path)}: like is a {type(like).__name__} of {len(like)} items "
                                 f"but the checkpoint holds {found}")
        return type(like)(restore(join(path, i), item, value) for i, (item, value) in enumerate(zip(data, like)))
    value = plain(data, path)
    if not _same_kind(value, like):
        raise StructureError(f"{_fn(path)}: like is a {type(like).__name__} but the checkpoint holds "
                             f"a {tag_of(data) or type(value).__name__}")
    return value


def _same_kind(value: Any, like: Any) -> bool:
    """Numbers match numbers (bools only bools); anything else must have ``like``'s exact type."""
    if isinstance(like, bool) or isinstance(value, bool):
        return type(value) is type(like)
    if isinstance(like, (int, float)):
        return isinstance(value, (int, float))
    return type(value) is type(like)


