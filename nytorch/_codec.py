"""The checkpoint codec: Python values to a pickle of tensors and plain containers only, and back.

``encode`` turns Particles, modules, Swarms, generators, NumPy arrays, namedtuples and dataclasses into
tagged dicts (``{"__nytorch__": "particle", ...}``) of tensors, numbers and strings, so
the result pickles without naming any class and loads with ``torch.load(weights_only=True)``.
``plain`` decodes without a template (``restore`` in ``_restore.py`` decodes into one).
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ._particle import Particle
from ._walk import Layout

Tensor = torch.Tensor

__all__ = ["CheckpointError", "FORMAT", "VERSION", "TAG", "encode", "plain", "tag_of", "named_tensors",
           "fields_of", "is_namedtuple", "is_dataclass_instance", "swarm_class", "join", "where"]

FORMAT = "nytorch.checkpoint"
VERSION = 1
TAG = "__nytorch__"
_ATOMS = (bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


class CheckpointError(ValueError):
    """A file is not a loadable nytorch checkpoint: unsafe (would run code), corrupt, or of another format.

    >>> issubclass(CheckpointError, ValueError)
    True
    """


def swarm_class() -> Optional[type]:
    """``nytorch.Swarm`` when this checkout has it, else ``None``."""
    try:
        from ._swarm import Swarm  # the swarm issue's module; absent in older checkouts
    except ImportError:  # pragma: no cover - depends on the checkout
        return None
    return Swarm


def where(path: str) -> str:
    """`` at 'a.b'`` for error messages (empty at the top level)."""
    return f" at {path!r}" if path else ""


def join(path: str, key: object) -> str:
    """The path of ``key`` inside ``path`` (``a.b``)."""
    return f"{path}.{key}" if path else str(key)


def _plain_tensor(tensor: Tensor) -> Tensor:
    tensor = tensor.detach()
    return tensor if type(tensor) is Tensor else tensor.as_subclass(Tensor)


def _compact(tensors: list[Tensor]) -> list[Tensor]:
    """Detached plain tensors; views that use only part of their storage are copied.

    ``torch.save`` writes a tensor's whole storage, so saving one member of a Swarm (a view
    into the swarm's flat buffer) would write the whole swarm.  Views that together cover
    their storage (all of a swarm's leaves) stay views and the storage is written once.
    """
    tensors = [_plain_tensor(tensor) for tensor in tensors]
    used: dict[int, int] = {}
    for tensor in tensors:
        if tensor.device.type != "meta":
            key = tensor.untyped_storage().data_ptr()
            used[key] = used.get(key, 0) + tensor.numel() * tensor.element_size()
    return [tensor.clone() if tensor.device.type != "meta" and tensor.numel() and
            used[tensor.untyped_storage().data_ptr()] < tensor.untyped_storage().nbytes() else tensor
            for tensor in tensors]


def _tensors(names: list[str], leaves: list[Tensor]) -> dict[str, Tensor]:
    return dict(zip(names, _compact(list(leaves))))


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _encode_swarm(obj: Any) -> dict[str, Any]:
    template = obj.template
    cls = template.model_class if isinstance(template, Particle) else type(template)
    params = dict(obj.params)
    buffers = {name: leaf for name, leaf in obj.buffers.items() if name not in params}
    leaves = _compact(list(params.values()) + list(buffers.values()))
    params, buffers = dict(zip(params, leaves)), dict(zip(buffers, leaves[len(params):]))
    return {TAG: "swarm", "class": _class_name(cls), "params": params, "buffers": buffers}


def is_namedtuple(obj: object) -> bool:
    """True for instances of ``typing.NamedTuple`` / ``collections.namedtuple`` classes."""
    return isinstance(obj, tuple) and isinstance(getattr(type(obj), "_fields", None), tuple)


def is_dataclass_instance(obj: object) -> bool:
    """True for instances of ``@dataclasses.dataclass`` classes (not the classes themselves)."""
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def encode(obj: Any, path: str) -> Any:
    """``obj`` as tensors, numbers, strings, ``None`` and dicts/lists/tuples only (see the module docstring).

    Args:
        obj: what ``nytorch.save`` was given.
        path: where ``obj`` sits inside the saved value (for error messages; ``""`` at the top).

    Raises:
        TypeError: something that cannot be stored without pickling its class (names its path).
        ValueError: a dict uses the reserved key ``"__nytorch__"``.

    >>> encode({"step": 3, "w": torch.ones(1)}, "")
    {'step': 3, 'w': tensor([1.])}
    >>> encode(torch.nn.Linear(1, 1, bias=False), "")["__nytorch__"]
    'module'
    """
    swarm = swarm_class()
    if obj is None or type(obj) in _ATOMS:  # exact types: subclasses would pickle their class
        return obj
    if isinstance(obj, Tensor):
        return _compact([obj])[0]
    if isinstance(obj, Particle):
        return {TAG: "particle", "class": _class_name(obj.model_class),
                "tensors": _tensors(list(obj._names), list(obj._leaves)), "buffers": bool(obj._with_buffers)}
    if swarm is not None and isinstance(obj, swarm):
        return _encode_swarm(obj)
    if isinstance(obj, nn.Module):
        layout = Layout(obj)
        return {TAG: "module", "class": _class_name(type(obj)),
                "params": _tensors(layout.names, layout.params),
                "buffers": _tensors(layout.buffer_names, layout.buffers)}
    if isinstance(obj, torch.Generator):
        return {TAG: "generator", "device": str(obj.device), "state": obj.get_state()}
    if isinstance(obj, (np.ndarray, np.generic)):
        array = np.asarray(obj)
        if array.dtype.hasobject:
            raise TypeError(f"save: cannot store a NumPy array of Python objects{where(path)}")
        raw = torch.from_numpy(np.ascontiguousarray(array).reshape(-1).view(np.uint8).copy())
        return {TAG: "ndarray", "dtype": array.dtype.str, "shape": list(array.shape),
                "scalar": isinstance(obj, np.generic), "data": raw}
    if type(obj) in (dict, OrderedDict):
        out = type(obj)()
        for key, value in obj.items():
            if key == TAG:
                raise ValueError(f"save: the key {TAG!r} is reserved by nytorch{where(path)}")
            if not (key is None or isinstance(key, (bool, int, float, str))):
                raise TypeError(f"save: expected dict keys that are str, int, float, bool or None, "
                                f"got a {type(key).__name__} key{where(path)}")
            out[key] = encode(value, join(path, key))
        return out
    if type(obj) in (list, tuple):
        return type(obj)(encode(value, join(path, i)) for i, value in enumerate(obj))
    if is_namedtuple(obj) or is_dataclass_instance(obj):  # stored by field: the class is never pickled
        kind = "namedtuple" if is_namedtuple(obj) else "dataclass"
        names = obj._fields if kind == "namedtuple" else [field.name for field in dataclasses.fields(obj)]
        return {TAG: kind, "class": _class_name(type(obj)),
                "fields": {name: encode(getattr(obj, name), join(path, name)) for name in names}}
    raise TypeError(
        f"save: cannot store a {type(obj).__name__}{where(path)}; expected tensors, Particles, modules, "
        "Swarms, generators, NumPy arrays, numbers, strings, None and dicts/lists/tuples/namedtuples/"
        "dataclasses of them"
    )


def tag_of(data: Any) -> Optional[str]:
    """The entry kind of an encoded value (``"particle"``, ``"module"``...) or ``None`` for plain values."""
    if isinstance(data, dict) and isinstance(data.get(TAG), str):
        return str(data[TAG])
    return None


def named_tensors(data: dict[str, Any], key: str, path: str) -> dict[str, Tensor]:
    """``data[key]`` checked to be a ``dict[str, Tensor]`` (``CheckpointError`` otherwise)."""
    tensors = data.get(key)
    if not isinstance(tensors, dict) or not all(
            isinstance(name, str) and isinstance(value, Tensor) for name, value in tensors.items()):
        raise CheckpointError(f"load: malformed {data.get(TAG)!r} entry{where(path)}: "
                              f"expected a dict of named tensors under {key!r}")
    return tensors


def plain(data: Any, path: str) -> Any:
    """Decode ``encode``'s output without a template: Particles, modules and Swarms become ``dict[str, Tensor]``.

    Generators and NumPy arrays come back as themselves, namedtuples as dicts of their fields.

    Raises:
        CheckpointError: an entry is malformed or of a kind this version does not know.

    >>> plain(encode(torch.nn.Linear(1, 1, bias=False), ""), "")
    {'weight': tensor([[...]])}
    """
    tag = tag_of(data)
    if tag == "particle":
        return dict(named_tensors(data, "tensors", path))
    if tag in ("module", "swarm"):
        return {**named_tensors(data, "params", path), **named_tensors(data, "buffers", path)}
    if tag == "generator":
        generator = torch.Generator(device=data["device"])
        generator.set_state(data["state"])
        return generator
    if tag == "ndarray":
        raw = data["data"].numpy().tobytes()
        array = np.frombuffer(raw, dtype=np.dtype(data["dtype"])).reshape(data["shape"]).copy()
        return array[()] if data["scalar"] else array
    if tag in ("namedtuple", "dataclass"):
        return {field: plain(value, join(path, field)) for field, value in fields_of(data, path).items()}
    if tag is not None:
        raise CheckpointError(f"load: unknown entry kind {tag!r}{where(path)}; written by a newer nytorch?")
    if isinstance(data, dict):
        return type(data)((key, plain(value, join(path, key))) for key, value in data.items())
    if isinstance(data, (list, tuple)) and not isinstance(data, torch.Size):
        return type(data)(plain(value, join(path, i)) for i, value in enumerate(data))
    return data


def fields_of(data: dict[str, Any], path: str) -> dict[str, Any]:
    """The fields of an encoded namedtuple (``CheckpointError`` when malformed)."""
    fields = data.get("fields")
    if not isinstance(fields, dict):
        raise CheckpointError(f"load: malformed {data.get(TAG)!r} entry{where(path)}: expected a dict under 'fields'")
    return fields


