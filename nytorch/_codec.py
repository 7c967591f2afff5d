"""The checkpoint codec: Python values to a pickle of tensors and plain containers only, and back.

``encode`` turns Particles, modules, Swarms, generators, NumPy arrays, namedtuples and dataclasses into
tagged dicts (``{"__nytorch__": "particle", ...}``) of tensors, numbers and strings, so
the result pickles without naming any class and loads with ``torch.load(weights_only=True)``.
``plain`` decodes without a template (``restore`` in ``_restore.py`` decodes into one).
"""
from __future__ import annotations

import dataclasses
import math
import reprlib
from collections import OrderedDict
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from ._errors import describe
from ._particle import Particle
from ._walk import Layout, model_class, storage_key

Tensor = torch.Tensor

__all__ = ["CheckpointError", "FORMAT", "VERSION", "TAG", "encode", "plain", "tag_of", "named_tensors",
           "fields_of", "class_of", "same_class", "generator_device", "decode_generator", "decode_ndarray",
           "is_namedtuple", "is_dataclass_instance", "swarm_class", "join", "where"]

FORMAT = "nytorch.checkpoint"
VERSION = 1
TAG = "__nytorch__"
_ATOMS = (bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)
_KEYS = (bool, int, float, str)  # with None: the dict keys torch's weights-only unpickler reads back


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


def _check_storable(tensor: Tensor, what: str) -> None:
    """Raise ``TypeError`` (``save: cannot store <what>: ...``) for tensors ``torch.save`` or ``load`` cannot handle.

    Lazy modules' uninitialised parameters and buffers and FakeTensors hold no values; sparse, MKL-DNN and
    other non-strided layouts have no single storage (``_compact`` needs one); nested tensors
    have no shape for ``load(like=...)`` to check.
    """
    if isinstance(tensor, (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer)):
        raise TypeError(f"save: cannot store {what}: it is not initialised yet (a lazy module); "
                        "run one forward pass first")
    if tensor.is_nested:
        raise TypeError(f"save: cannot store {what}: it is a nested tensor (load could not check its shape); "
                        "store its components (tensor.unbind()) instead")
    if isinstance(tensor, FakeTensor):  # torch.save fails on one, pickling its FakeTensorMode
        raise TypeError(f"save: cannot store {what}: it is a FakeTensor (made under FakeTensorMode), which holds "
                        "no values; save a model made outside the mode")
    if tensor.layout != torch.strided:
        raise TypeError(f"save: cannot store {what}: expected a dense (strided) tensor, got layout "
                        f"{tensor.layout}; convert it with .to_dense() first")
    if tensor.device.type != "meta":
        try:
            tensor.untyped_storage()
        except (NotImplementedError, RuntimeError) as error:
            raise TypeError(f"save: cannot store {what}: it has no storage to write ({error})") from None


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
            key = storage_key(tensor)
            used[key] = used.get(key, 0) + tensor.numel() * tensor.element_size()
    return [tensor.clone() if tensor.device.type != "meta" and tensor.numel() and
            used[storage_key(tensor)] < tensor.untyped_storage().nbytes() else tensor
            for tensor in tensors]


def _tensors(names: list[str], leaves: list[Tensor], path: str) -> dict[str, Tensor]:
    """``names`` to compacted ``leaves``, each checked by ``_check_storable`` (named in messages)."""
    for name, leaf in zip(names, leaves):
        _check_storable(leaf, f"parameter {name!r}{where(path)}")
    return dict(zip(names, _compact(list(leaves))))


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _encode_swarm(obj: Any, path: str) -> dict[str, Any]:
    template = obj.template
    cls = template.model_class if isinstance(template, Particle) else type(template)
    params = dict(obj.params)
    buffers = {name: leaf for name, leaf in obj.buffers.items() if name not in params}
    for name, leaf in {**params, **buffers}.items():
        _check_storable(leaf, f"parameter {name!r}{where(path)}")
    leaves = _compact(list(params.values()) + list(buffers.values()))
    params, buffers = dict(zip(params, leaves)), dict(zip(buffers, leaves[len(params):]))
    # the member count travels too: a swarm of models without tensors (``nn.ReLU``) has no leaf to read it from
    return {TAG: "swarm", "class": _class_name(cls), "params": params, "buffers": buffers, "size": len(obj)}


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
        TypeError: something that cannot be stored without pickling its class, a dict key
            included (names its path).
        ValueError: a dict uses the reserved key ``"__nytorch__"`` or a NaN float key.

    >>> encode({"step": 3, "w": torch.ones(1)}, "")
    {'step': 3, 'w': tensor([1.])}
    >>> encode(torch.nn.Linear(1, 1, bias=False), "")["__nytorch__"]
    'module'
    >>> encode({"opt": {np.int64(0): 1.0}}, "")  # doctest: +NORMALIZE_WHITESPACE
    Traceback (most recent call last):
    TypeError: save: expected dict keys that are exactly str, int, float, bool or None,
    got the key ...0... of type int64 at 'opt'; ...
    """
    swarm = swarm_class()
    if obj is None or type(obj) in _ATOMS:  # exact types: subclasses would pickle their class
        return obj
    if isinstance(obj, Tensor):
        _check_storable(obj, f"the tensor{where(path)}")
        return _compact([obj])[0]
    if isinstance(obj, Particle):
        return {TAG: "particle", "class": _class_name(obj.model_class),
                "tensors": _tensors(list(obj._names), list(obj._leaves), path), "buffers": bool(obj._with_buffers)}
    if swarm is not None and isinstance(obj, swarm):
        return _encode_swarm(obj, path)
    if isinstance(obj, nn.Module):
        layout = Layout(obj)
        return {TAG: "module", "class": _class_name(model_class(obj)),
                "params": _tensors(layout.names, layout.params, path),
                "buffers": _tensors(layout.buffer_names, layout.buffers, path)}
    if isinstance(obj, torch.Generator):
        return {TAG: "generator", "device": str(obj.device), "state": obj.get_state()}
    if isinstance(obj, (np.ndarray, np.generic)):
        return _encode_ndarray(obj, path)
    if type(obj) in (dict, OrderedDict):
        out = type(obj)()
        for key, value in obj.items():
            if key == TAG:
                raise ValueError(f"save: the key {TAG!r} is reserved by nytorch{where(path)}")
            if not (key is None or type(key) in _KEYS):  # exact types: subclasses would pickle their class
                raise TypeError(f"save: expected dict keys that are exactly str, int, float, bool or None, "
                                f"got the key {reprlib.repr(key)} of type {type(key).__name__}{where(path)}; "
                                "convert it first (subclasses such as IntEnum or np.float64 would pickle their "
                                "class)")
            if type(key) is float and math.isnan(key):
                raise ValueError(f"save: expected dict keys equal to themselves, got the float key nan"
                                 f"{where(path)}; load(like=...) could never match it (nan != nan)")
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


def _encode_ndarray(obj: Any, path: str) -> dict[str, Any]:
    """A NumPy array or scalar as raw bytes, shape and dtype description (``np.lib.format.dtype_to_descr``).

    The description is ``dtype.str`` (``'<f4'``) for plain dtypes and a list of
    ``(name, format[, shape])`` tuples for structured ones, so field names, nested fields and
    padding come back; it holds only strings, ints, lists and tuples (nothing to unpickle).
    """
    if isinstance(obj, np.ma.MaskedArray):
        raise TypeError(f"save: cannot store a NumPy masked array{where(path)} (its mask would be lost); "
                        "store its .data and .mask separately")
    array = np.asarray(obj)
    if array.dtype.hasobject:
        raise TypeError(f"save: cannot store a NumPy array of Python objects{where(path)}")
    try:
        descr = np.lib.format.dtype_to_descr(array.dtype)
    except ValueError as error:  # overlapping or out-of-order fields have no descr
        raise TypeError(f"save: cannot store a NumPy array of dtype {array.dtype}{where(path)}: {error}; "
                        "repack it first (numpy.lib.recfunctions.repack_fields)") from None
    raw = torch.from_numpy(np.ascontiguousarray(array).reshape(-1).view(np.uint8).copy())
    return {TAG: "ndarray", "dtype": descr, "shape": list(array.shape),
            "scalar": isinstance(obj, np.generic), "data": raw}


def tag_of(data: Any, path: str = "") -> Optional[str]:
    """The entry kind of an encoded value (``"particle"``, ``"module"``...) or ``None`` for plain values.

    Raises:
        CheckpointError: a dict holds the reserved key ``"__nytorch__"`` with something other than a str.
    """
    if not (isinstance(data, dict) and TAG in data):
        return None
    tag = data[TAG]
    if not isinstance(tag, str):
        raise CheckpointError(f"load: malformed entry{where(path)}: expected an entry kind (a str) under "
                              f"{TAG!r}, got {type(tag).__name__}")
    return tag


def malformed(data: dict[str, Any], path: str, problem: str) -> CheckpointError:
    return CheckpointError(f"load: malformed {data.get(TAG)!r} entry{where(path)}: {problem}")


def class_of(data: dict[str, Any], path: str) -> str:
    """The class name (``module.qualname``) an encoded Particle, module or Swarm was saved from."""
    name = data.get("class")
    if not isinstance(name, str):
        raise malformed(data, path, f"expected the class name (a str) under 'class', got {type(name).__name__}")
    return name


def same_class(saved: str, cls: type) -> bool:
    """True when the class name ``saved`` (from ``class_of``) names ``cls``.

    A class defined in a script is ``__main__.Net`` there and ``script.Net`` when imported,
    so a ``__main__`` class matches a class of the same qualified name in any module.
    Files written before ``encode`` saw through ``parametrize`` name ``Parametrized<Class>``.

    >>> same_class("torch.nn.modules.linear.Linear", torch.nn.Linear)
    True
    >>> same_class("__main__.Linear", torch.nn.Linear), same_class("torch.nn.modules.conv.Conv1d", torch.nn.Linear)
    (True, False)
    """
    qualname = cls.__qualname__
    if saved in (_class_name(cls), f"__main__.{qualname}", f"torch.nn.utils.parametrize.Parametrized{cls.__name__}"):
        return True
    return cls.__module__ == "__main__" and saved.endswith(f".{qualname}")


def named_tensors(data: dict[str, Any], key: str, path: str) -> dict[str, Tensor]:
    """``data[key]`` checked to be a ``dict[str, Tensor]`` (``CheckpointError`` otherwise)."""
    tensors = data.get(key)
    if not isinstance(tensors, dict) or not all(
            isinstance(name, str) and isinstance(value, Tensor) for name, value in tensors.items()):
        raise malformed(data, path, f"expected a dict of named tensors under {key!r}")
    return tensors


def plain(data: Any, path: str) -> Any:
    """Decode ``encode``'s output without a template: Particles, modules and Swarms become ``dict[str, Tensor]``.

    Generators and NumPy arrays come back as themselves, namedtuples as dicts of their fields.
    A container the file holds at several places is decoded once (shared, as ``pickle`` does).

    Raises:
        CheckpointError: an entry is malformed (a container that holds itself included) or of a
            kind this version does not know.

    >>> plain(encode(torch.nn.Linear(1, 1, bias=False), ""), "")
    {'weight': tensor([[...]])}
    """
    return _plain(data, path, {})


_BUSY = object()  # in ``_plain``'s memo while a container is being decoded


def _plain(data: Any, path: str, memo: dict[int, Any]) -> Any:
    """``plain`` with a memo: a container the file holds twice is decoded once (``nytorch.save`` writes
    trees, but a crafted pickle can share one list 100 levels deep, 2**100 paths), and a container
    that holds itself is a ``CheckpointError``.  One frame per level (loops, no generators), so
    whatever ``encode`` (two frames per level) could write loads."""
    container = isinstance(data, (dict, list, tuple)) and not isinstance(data, torch.Size)
    if not container:
        return data
    done = memo.get(id(data), memo)
    if done is _BUSY:
        raise CheckpointError(f"load: malformed checkpoint{where(path)}: expected a tree of containers, got a "
                              f"{type(data).__name__} that holds itself (nytorch.save never writes cycles)")
    if done is not memo:
        return done
    memo[id(data)] = _BUSY
    tag = tag_of(data, path)
    value: Any
    if tag in ("particle", "module", "swarm"):
        class_of(data, path)
    if tag == "particle":
        value = dict(named_tensors(data, "tensors", path))
    elif tag in ("module", "swarm"):
        value = {**named_tensors(data, "params", path), **named_tensors(data, "buffers", path)}
    elif tag == "generator":
        value = decode_generator(data, path)
    elif tag == "ndarray":
        value = decode_ndarray(data, path)
    elif tag in ("namedtuple", "dataclass"):
        value = {}
        for field, item in fields_of(data, path).items():
            value[field] = _plain(item, join(path, field), memo)
    elif tag is not None:
        raise CheckpointError(f"load: unknown entry kind {tag!r}{where(path)}; written by a newer nytorch?")
    elif isinstance(data, dict):  # an OrderedDict stays one; any other dict (a crafted Counter) becomes a dict
        value = OrderedDict() if isinstance(data, OrderedDict) else {}
        for key, item in data.items():
            value[key] = _plain(item, join(path, key), memo)
    else:
        items = []
        for index, item in enumerate(data):
            items.append(_plain(item, join(path, index), memo))
        value = items if isinstance(data, list) else tuple(items)
    memo[id(data)] = value
    return value


def fields_of(data: dict[str, Any], path: str) -> dict[str, Any]:
    """The fields of an encoded namedtuple (``CheckpointError`` when malformed)."""
    fields = data.get("fields")
    if not isinstance(fields, dict):
        raise malformed(data, path, f"expected a dict under 'fields', got {type(fields).__name__}")
    return fields


def generator_device(data: dict[str, Any], path: str) -> torch.device:
    """The device an encoded generator was saved on (``CheckpointError`` when the entry has none)."""
    saved = data.get("device")
    if isinstance(saved, str):
        try:
            return torch.device(saved)
        except RuntimeError:
            pass
    raise malformed(data, path, f"expected a device string under 'device', got {saved!r}")


def decode_generator(data: dict[str, Any], path: str, device: Optional[torch.device] = None) -> torch.Generator:
    """A new ``torch.Generator`` (on ``device``, default the saved one) in the saved state.

    Raises:
        CheckpointError: the entry lacks a device string or a state that fits such a generator.

    >>> generator = decode_generator(encode(torch.Generator().manual_seed(1), ""), "")
    >>> torch.equal(torch.rand(2, generator=generator), torch.rand(2, generator=torch.Generator().manual_seed(1)))
    True
    """
    saved_device, state = generator_device(data, path), data.get("state")
    if not (isinstance(state, Tensor) and state.dtype == torch.uint8 and state.dim() == 1
            and state.device.type != "meta"):
        got = _describe(state)
        raise malformed(data, path, f"expected the generator state (a 1-D uint8 tensor) under 'state', got {got}")
    target = device if device is not None else saved_device
    try:
        generator = torch.Generator(device=target)
    except RuntimeError as error:  # e.g. a CUDA generator on a machine without CUDA
        reason = ("CUDA is not available on this machine" if target.type == "cuda" and not torch.cuda.is_available()
                  else str(error).split(". ")[0])
        raise CheckpointError(f"load: cannot restore the generator{where(path)} on {target}: {reason}; load this "
                              "checkpoint where that device exists") from None
    try:
        generator.set_state(state.cpu())
    except (RuntimeError, TypeError, ValueError) as error:
        raise malformed(data, path, f"the state does not fit a {generator.device} generator ({error})") from None
    return generator


def _dtype(kind: Any) -> Optional[np.dtype[Any]]:
    """The dtype ``_encode_ndarray`` described (a ``dtype.str``, or a descr list for structured dtypes), or None."""
    try:
        if isinstance(kind, str):
            return np.dtype(kind)
        if isinstance(kind, list):  # only str/int/list/tuple inside: the unpickler built nothing else
            return np.lib.format.descr_to_dtype(kind)
    except (TypeError, ValueError, KeyError, IndexError, RecursionError):
        pass
    return None


def decode_ndarray(data: dict[str, Any], path: str) -> Any:
    """The NumPy array (or NumPy scalar) ``encode`` stored as raw bytes, dtype description and shape.

    Raises:
        CheckpointError: the dtype is not a NumPy dtype description (or holds Python objects),
            the shape is not a list of non-negative ints, or the byte count does not fit them.

    >>> decode_ndarray(encode(np.arange(3.0), ""), "")
    array([0., 1., 2.])
    >>> decode_ndarray(encode(np.array([(1, 2.5)], dtype=[("a", "<i4"), ("b", "<f8")]), ""), "")["b"]
    array([2.5])
    """
    kind, shape, raw, scalar = data.get("dtype"), data.get("shape"), data.get("data"), data.get("scalar")
    dtype = _dtype(kind)
    if dtype is None or dtype.hasobject:
        raise malformed(data, path, f"expected a NumPy dtype description (a str, or a list for structured "
                                     f"dtypes) without Python objects under 'dtype', got {reprlib.repr(kind)}")
    if not (isinstance(shape, (list, tuple)) and all(type(n) is int and n >= 0 for n in shape)):
        raise malformed(data, path, f"expected a list of non-negative ints under 'shape', got {shape!r}")
    if type(scalar) is not bool or (scalar and len(shape) != 0):
        raise malformed(data, path, f"expected True or False under 'scalar' (True only with shape []), "
                                     f"got {scalar!r} with shape {list(shape)}")
    if not (isinstance(raw, Tensor) and raw.dtype == torch.uint8 and raw.dim() == 1 and raw.device.type != "meta"):
        raise malformed(data, path, f"expected the array's bytes (a 1-D uint8 tensor) under 'data', "
                                     f"got {_describe(raw)}")
    size = math.prod(shape) * dtype.itemsize
    if raw.numel() != size:
        raise malformed(data, path, f"expected {size} bytes under 'data' for shape {list(shape)} {dtype}, "
                                     f"got {raw.numel()}")
    try:
        # a writable buffer of its own, read as is: a copy would not keep padding bytes between fields
        array = (np.frombuffer(bytearray(raw.cpu().contiguous().numpy()), dtype=dtype).reshape(shape)
                 if dtype.itemsize else np.empty(shape, dtype))  # np.frombuffer refuses 0-byte items
    except (ValueError, MemoryError) as error:
        raise malformed(data, path, f"cannot build an array of shape {list(shape)} {dtype} ({error})") from None
    return array[()] if scalar else array


def _describe(value: Any) -> str:
    return f"a tensor of {describe(value)}" if isinstance(value, Tensor) else f"a {type(value).__name__}"
