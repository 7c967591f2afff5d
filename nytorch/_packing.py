"""Pack a model's parameters into one buffer per (device, dtype), in place, when that changes nothing else.

``pack_`` (what ``particle(model)`` and NytoModule arithmetic do on first use) and ``flatten_``
(the public, raising form) move the floating parameters, then the floating buffers, into
consecutive views of one buffer per (device, dtype), keeping the Parameter objects.  A model
whose behaviour packing would change (RNN modules, ``torch.ao`` observers and fake-quantize modules,
lazy or meta parameters, non-contiguous or ``channels_last`` weights, shared memory, distinct
parameters sharing storage) is left as it is.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from . import _leafwise as lw
from . import _nocast as nocast
from ._flat import chunks, wraps_tensors
from ._quantized import loaded
from ._types import ModuleT

Tensor = torch.Tensor

__all__ = ["PACKED", "lazy_name", "pack_", "flatten_"]


def lazy_name(module: nn.Module) -> Optional[str]:
    """The name of the first parameter or buffer of a lazy module not initialised yet, else ``None``.

    >>> lazy_name(torch.nn.LazyLinear(2)), lazy_name(torch.nn.Linear(1, 2))
    ('weight', None)
    """
    named: list[tuple[str, Tensor]] = [*module.named_parameters(), *module.named_buffers()]
    return next((name for name, tensor in named if nn.parameter.is_lazy(tensor)), None)


#: ``torch.ao.quantization`` classes whose modules ``resize_`` their own buffers in ``forward`` (an observer's
#: ``min_val``, a fake-quantize module's ``scale`` and ``zero_point``): a packed view resized in place grows
#: over the tensors after it in the buffer.  Read with ``_quantized.loaded``, never imported: where torch has not
#: loaded these modules no instance of their classes can exist.
_RESIZING = (("torch.ao.quantization.observer", "ObserverBase"),
             ("torch.ao.quantization.fake_quantize", "FakeQuantizeBase"))


def _unpackable_module(module: nn.Module) -> Optional[str]:
    """Why a submodule of ``module`` must keep its tensors' own storage, or ``None``.

    >>> _unpackable_module(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.GRU(2, 2)))
    "submodule '1' (GRU): RNN modules manage their own flat weight buffer"
    """
    resizing = loaded(_RESIZING)
    for path, sub in module.named_modules(remove_duplicate=False):
        where = f"submodule {path!r} ({type(sub).__name__})" if path else f"the model ({type(sub).__name__})"
        if isinstance(sub, nn.RNNBase):
            return f"{where}: RNN modules manage their own flat weight buffer"
        if resizing and isinstance(sub, resizing):
            return f"{where} is a torch.ao.quantization observer or fake-quantize module, which resizes its " \
                   "buffers in place (resize_) in forward: a packed view would grow over the tensors after it"
    return None


def _packable(module: nn.Module, params: Sequence[Tensor], labels: Sequence[str]) -> Optional[str]:
    """Why ``module``'s parameters must keep their own storage, or ``None`` when they can be packed.

    ``labels`` name ``params`` in messages (``"parameter '0.weight'"``, ``"buffer '1.running_mean'"``).
    """
    unpackable = _unpackable_module(module)
    if unpackable is not None:
        return unpackable
    spans: dict[int, list[tuple[int, int, str]]] = {}
    for param, label in zip(params, labels):
        if param.device.type == "meta":
            return f"{label} is on the meta device (it has no values to pack)"
        if param.layout is not torch.strided:
            return f"{label} has layout {param.layout} (only strided tensors are packed)"
        if wraps_tensors(param):
            return f"{label} is a {type(param).__name__}, a tensor subclass whose values live in the tensors it " \
                   "wraps: packing would replace them"
        if not param.is_contiguous():
            return f"{label} is not contiguous (strides {param.stride()}, e.g. channels_last): " \
                   "packing would change its memory format"
        if param.dim() in (4, 5) and param.numel() > 1 and param.stride() != _contiguous_strides(param.shape):
            # contiguous, but laid out as channels_last (a 1x1 or single-input-channel convolution's weight):
            # a packed view would have the default strides, and convolutions follow the weight's format
            # (only 4-D and 5-D tensors have a memory format other than the contiguous one)
            return f"{label} has strides {param.stride()}, not the contiguous {_contiguous_strides(param.shape)} " \
                   "(e.g. channels_last): packing would change its memory format"
        if param.device.type == "cpu" and param.is_shared():
            # other processes (``share_memory()``, torch.multiprocessing) hold the shared block: a new buffer
            # would cut the model off from them
            return f"{label} is in shared memory (share_memory()): packing would move it out of it; " \
                   "pack before share_memory()"
        if param.is_inference():
            # an inference tensor has no version counter, and ``param.data = view`` would keep that
            return f"{label} is an inference tensor (made under torch.inference_mode())"
        if param.numel():  # a zero-size tensor holds no memory
            start = int(param.storage_offset()) * param.element_size()  # in bytes: views of other dtypes meet
            spans.setdefault(param.untyped_storage().data_ptr(), []).append(
                (start, start + int(param.numel()) * param.element_size(), label))
    for ranges in spans.values():  # parameters in one storage are fine (packed), overlapping ones are tied
        ranges.sort()
        tied = next(((earlier, later) for earlier, later in zip(ranges, ranges[1:]) if later[0] < earlier[1]), None)
        if tied is not None:
            return f"{tied[0][2]} and {tied[1][2]} share memory: packing would untie them"
    return None


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape`` (what a packed view gets).

    >>> _contiguous_strides(torch.Size([8, 1, 3, 3]))
    (9, 9, 3, 1)
    """
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _arithmetic_groups(params: Sequence[Tensor]) -> list[list[Tensor]]:
    """Floating tensors by (device, dtype), in order (parameters before buffers, so both fit a plan)."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for param in params:
        if param.is_floating_point() or param.is_complex():
            groups.setdefault((param.device, param.dtype), []).append(param)
    return list(groups.values())


def _consecutive(members: Sequence[Tensor]) -> bool:
    # zero-size members hold no memory (see ``find_flat``); conjugate and negative views are resolved by packing
    first = next((member for member in members if member.numel()), members[0])
    offset = first.storage_offset()
    for member in members:
        if member.is_conj() or member.is_neg() or member.layout is not torch.strided or wraps_tensors(member):
            return False  # (``_packable`` says why the last two are not packed)
        if not member.numel():
            continue
        if (not member.is_contiguous() or member.storage_offset() != offset
                or member.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()):
            return False
        offset += member.numel()
    return True


#: How many times ``pack_`` has moved parameters.  Packing one model can move a Parameter it
#: shares with another (a common submodule): code holding the other's buffers looks again then.
PACKED = [0]


@torch.inference_mode(False)  # under inference_mode the buffer would be an inference tensor: never trainable again
@torch.no_grad()
def _pack_groups(groups: Sequence[Sequence[Tensor]]) -> Optional[str]:
    """Pack each group into a new buffer; ``None`` when done, else why a group was left as it was."""
    PACKED[0] += 1
    for members in groups:
        buffer = nocast.cat([param.detach().reshape(-1) for param in members])
        if type(buffer) is not Tensor:
            # an active TorchDispatchMode made it: under FakeTensorMode a FakeTensor, which holds no values
            return f"a TorchDispatchMode active here (e.g. FakeTensorMode) makes new tensors {type(buffer).__name__}s"
        views = torch._C._nn.unflatten_dense_tensors(buffer, [param.detach() for param in members])
        for param, view in zip(members, views):
            param.data = view
    return None


def _runs_consecutive(members: Sequence[Tensor], whole: bool) -> bool:
    """Whether ``members`` (one dtype) lie back to back: as one run (``whole``) or chunk by chunk."""
    if whole:
        return _consecutive(members)
    sizes = [member.numel() * member.element_size() for member in members]
    runs = chunks(list(range(len(members))), sizes, members[0].device)
    return all(_consecutive([members[i] for i in run]) for run in runs)


def _pack_or_reason(module: nn.Module, whole: bool) -> Optional[str]:
    """Pack ``module`` unless that would change it; ``None`` when packed (or already), else why not."""
    from ._walk import layout_of  # local: _walk does not depend on this module

    if lazy_name(module) is not None:
        return "a parameter is not initialised yet (lazy module)"  # shapes unknown until the first forward
    if lw.transforms_active():
        return "it is inside a torch.func transform (vmap, grad), whose tensors cannot be moved"
    layout = layout_of(module)
    groups = _arithmetic_groups(layout.params + layout.buffers)
    loose = [members for members in groups if not _runs_consecutive(members, whole)]
    if not loose:
        return None
    # the floating tensors in named_parameters() then named_buffers() order, so the first named is that one
    tensors = layout.params + layout.buffers
    labels = [f"parameter {name!r}" for name in layout.names] + [f"buffer {name!r}" for name in layout.buffer_names]
    chosen = [i for i, tensor in enumerate(tensors) if tensor.is_floating_point() or tensor.is_complex()]
    reason = _packable(module, [tensors[i] for i in chosen], [labels[i] for i in chosen])
    return _pack_groups(loose) if reason is None else reason


def pack_(module: nn.Module, *, whole: bool = False) -> bool:
    """Pack ``module``'s floating parameters (then floating buffers) into one buffer per (device, dtype).

    What ``particle(model)`` and NytoModule arithmetic do on first use.  Parameter
    objects are kept (optimizers holding them keep working); only their storage
    moves, once.  Models are left as they are, and ``False`` returned, when packing
    would change their behaviour (so this is only done when it is safe): RNN modules (they keep their own flat buffer),
    ``torch.ao`` observers and fake-quantize modules (QAT; they ``resize_`` their buffers), lazy or meta parameters, non-contiguous parameters or ones laid out as ``channels_last``
    (a 1x1 convolution's weight too), parameters in shared memory (``share_memory()``: pack
    before), or distinct parameters sharing storage.

    Args:
        module: the model.
        whole: require each (device, dtype) group to be one run (what in-place collectives
            use); by default runs of at most ``_flat.CHUNK_BYTES`` in separate blocks also count as
            packed (results of operators are allocated that way on the CPU).

    Returns:
        True when every floating parameter now sits in packed buffers.

    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> pack_(net), net[1].bias.data_ptr() - net[0].weight.data_ptr()
    (True, 32)
    """
    return _pack_or_reason(module, whole) is None


def flatten_(module: ModuleT) -> ModuleT:
    """Move ``module``'s floating parameters (then buffers) into one buffer per (device, dtype), in place.

    Parameter objects are kept (optimizers holding them keep working); only their
    storage moves.  Afterwards every nytorch operation on the model (e.g. an EMA
    ``lerp_``) is one kernel over that buffer instead of one per tensor.  Unlike the
    automatic packing of ``particle(model)`` (see ``pack_``) this always packs, and
    raises instead of silently skipping a model that packing would change.

    Args:
        module: the model to pack (any ``nn.Module``).

    Returns:
        ``module``.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``, or is (or holds) a TorchScript or ``torch.ao``
            quantized module.
        ValueError: packing would change the model's behaviour (the message says why).

    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> weight = net[0].weight
    >>> _ = flatten_(net)
    >>> net[0].weight is weight, net[1].bias.data_ptr() - net[0].weight.data_ptr()
    (True, 32)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"flatten_: expected an nn.Module, got {type(module).__name__}")
    reason = _pack_or_reason(module, whole=True)
    if reason is not None:
        raise ValueError(f"flatten_: cannot pack the parameters of this {type(module).__name__}: {reason}")
    return module
