"""Run every member of a swarm at once: forward, per-member losses and gradients.

The general path is one ``torch.func.vmap`` over the member's forward with the
member's tensors swapped into a private skeleton module (what
``torch.func.functional_call`` does, minus its generic bookkeeping).  Models that
are one chain of ``nn.Linear`` layers and elementwise activations (an
``nn.Sequential`` of them, or a straight-line forward that ``torch.fx`` traces to such a
chain) take a fused path instead (``_swarm_fused``): one ``torch.baddbmm`` per layer
over the stacked weights, which is the compute floor and gives a loop's values up to rounding
(the batched product may sum in another order: the last bit in float32 and float64).

Attributes a forward sets on the skeleton's modules (``self.last = out``, a counter,
``weight_norm``'s recomputed weight) are not kept: every call starts from the skeleton as
it was and leaves it so, as they would otherwise hold one call's batched tensors.
"""
from __future__ import annotations

import contextlib
import dataclasses
import numbers
import operator
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ._swarm_fused import fused_forward
from ._swarm_spec import Spec, bound

Tensor = torch.Tensor
InDims = Union[None, int, Sequence[Any]]

__all__ = ["Member", "forward", "grad_and_value"]

_RANDOMNESS = ("different", "same", "error")


def _assigned(fn: str, spec: Spec, replaced: dict[int, Any]) -> tuple[list[int], list[Tensor]]:
    """The buffers a member's forward assigned anew, as indices and values (a vmapped function's output)."""
    indices = sorted(replaced)
    for index in indices:
        value = replaced[index]
        if not isinstance(value, Tensor):
            raise TypeError(f"{fn}: the forward set buffer {spec.names[index]!r} to a "
                            f"{type(value).__name__}; a swarm's buffers stay tensors of their shape and dtype")
    return indices, [replaced[index] for index in indices]


def _check_assigned(fn: str, spec: Spec, views: Sequence[Tensor], indices: Sequence[int],
                    values: Sequence[Tensor]) -> None:
    """Raise unless what each member's forward assigned to its buffers fits the swarm's (stacked) buffers."""
    for index, value in zip(indices, values):
        view = views[index]
        if value.shape != view.shape or value.dtype != view.dtype:
            raise ValueError(f"{fn}: the forward assigned buffer {spec.names[index]!r} a tensor of shape "
                             f"{tuple(value.shape[1:])} {value.dtype} per member, but it holds shape "
                             f"{tuple(view.shape[1:])} {view.dtype}; update it in place or keep its shape and dtype")
        if view.is_inference() and not torch.is_inference_mode_enabled():
            raise _not_writable(fn, spec, index)


class Member:
    """One swarm member inside a vectorised call: ``member(*inputs)`` runs its forward.

    Attributes:
        params: ``dict[str, Tensor]`` of the member's parameters (per member, batched under ``vmap``).
        buffers: ``dict[str, Tensor]`` of its buffers.
    """

    __slots__ = ("_spec", "_leaves", "_replaced")

    def __init__(self, spec: Spec, leaves: Sequence[Tensor], replaced: Optional[dict[int, Any]] = None) -> None:
        self._spec = spec
        self._leaves = leaves
        self._replaced = replaced

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with bound(self._spec, self._leaves, self._replaced) as module:
            return module(*args, **kwargs)

    @property
    def params(self) -> dict[str, Tensor]:
        spec = self._spec
        return dict(zip(spec.names[:spec.n_params], self._leaves[:spec.n_params]))

    @property
    def buffers(self) -> dict[str, Tensor]:
        spec = self._spec
        return dict(zip(spec.names[spec.n_params:], self._leaves[spec.n_params:]))

    def __getattr__(self, name: str) -> Any:
        # only reached for names a Member lacks: say what it offers instead of a bare AttributeError
        if name.startswith("_"):
            raise AttributeError(name)
        hint = {"parameters": " (member.params.values() for member.parameters())",
                "named_parameters": " (member.params.items() for member.named_parameters())"}.get(name, "")
        raise AttributeError(f"swarm member: expected member(*inputs), member.params or member.buffers inside a "
                             f"vectorised call (a member is not a module), got member.{name}{hint}")


def _in_dims(fn: str, in_dims: InDims, args: Sequence[Any]) -> tuple[Any, ...]:
    if in_dims is None or isinstance(in_dims, int):
        return (in_dims,) * len(args)
    if isinstance(in_dims, (tuple, list)):
        if len(in_dims) != len(args):
            raise ValueError(f"{fn}: in_dims has {len(in_dims)} entries but {len(args)} positional "
                             "arguments were given; give one entry per argument (None: shared, 0: per member)")
        return tuple(in_dims)
    raise TypeError(f"{fn}: expected None, an int or a tuple as in_dims, got {type(in_dims).__name__}")


def _options(fn: str, randomness: object, chunk_size: object) -> Optional[int]:
    """``chunk_size`` as an int (or ``None``); raises unless it is positive and ``randomness`` is one of vmap's."""
    if randomness not in _RANDOMNESS:
        raise ValueError(f"{fn}: expected randomness 'different', 'same' or 'error', got {randomness!r}")
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not hasattr(chunk_size, "__index__"):  # NumPy ints are ints
        raise TypeError(f"{fn}: expected None or a positive int as chunk_size, got {type(chunk_size).__name__}")
    number = operator.index(chunk_size)  # type: ignore[arg-type]
    if number < 1:
        raise ValueError(f"{fn}: expected None or a positive int as chunk_size, got {number}")
    return number


def _hint(spec: Spec, message: str) -> str:
    tracking = [module for module in spec.layout.modules if isinstance(module, nn.modules.batchnorm._BatchNorm)
                and module.training and module.track_running_stats]
    # BatchNorm with momentum=None divides by its batch count read as a number (.item() under vmap)
    if ".item()" in message and any(module.momentum is None for module in tracking):
        return ("BatchNorm with momentum=None reads its batch count as a Python number, which vmap cannot: "
                "give it a momentum, put the swarm in eval mode (swarm.eval()) or build the model with "
                "track_running_stats=False")
    if tracking and ("Batch norm" in message or "running_mean" in message):
        return ("put the swarm in eval mode (swarm.eval()) or build the model with "
                "track_running_stats=False")
    if "randomness" in message:
        return "pass randomness='different' (independent draws per member) or 'same'"
    if "data-dependent" in message or ".item()" in message:
        return ("the forward branches on tensor values; rewrite it with torch.where, or run members one by one "
                "with `[member.module()(x) for member in swarm]`")
    return "run members one by one with `[member.module()(x) for member in swarm]` to locate the problem"


def _vmap(fn: str, spec: Spec, function: Callable[..., Any], in_dims: tuple[Any, ...], randomness: str,
          chunk_size: Optional[int], *args: Any) -> Any:
    mapped = torch.func.vmap(function, in_dims=in_dims, randomness=randomness, chunk_size=chunk_size)
    try:
        return mapped(*args)
    except RuntimeError as error:
        message = str(error)
        raise RuntimeError(
            f"{fn}: the vectorised call (torch.func.vmap) could not run {spec.model_class.__name__}: "
            f"{message}\nHint: {_hint(spec, message)}"
        ) from error


def forward(spec: Spec, views: Sequence[Tensor], size: int, args: Sequence[Any], kwargs: dict[str, Any], *,
            in_dims: InDims = None, randomness: str = "different", chunk_size: Optional[int] = None) -> Any:
    """Every member's forward on ``args`` (shared, or per member where ``in_dims`` says 0), stacked ``[P, ...]``."""
    fn = "Swarm.__call__"
    dims = _in_dims(fn, in_dims, args)
    if in_dims is not None:
        _check_members(fn, args, dims, size)
    if randomness != "different" or chunk_size is not None:
        chunk_size = _options(fn, randomness, chunk_size)
    if chunk_size is None:
        fused = fused_forward(spec, views, size, args, kwargs, dims, randomness)
        if fused is not None:
            return fused

    assigned: list[int] = []
    structure: list[Any] = []  # the output's pytree structure and its non-tensor leaves (None, numbers)

    def member(leaves: list[Tensor], *inputs: Any) -> Any:
        replaced: dict[int, Any] = {}
        with bound(spec, leaves, replaced) as module:
            out = module(*inputs, **kwargs)
        assigned[:], values = _assigned(fn, spec, replaced)
        flat, tree = pytree.tree_flatten(out)  # vmap returns tensors only: keep the rest aside
        structure[:] = [tree, [_TENSOR if isinstance(leaf, Tensor) else _kept(fn, leaf) for leaf in flat]]
        return [leaf for leaf in flat if isinstance(leaf, Tensor)], values

    if size == 0:  # vmap over no members fails in some batching rules: run one stand-in member, keep none
        stand_in = _stand_in_call(fn, spec, views, member, args, dims, randomness)
        return _rebuilt(structure, [tensor[:0] for tensor in stand_in])
    leaves, write_back = _writable(fn, spec, views)
    carrier = leaves or [torch.zeros(size, 0)]  # a model without tensors: still map over the members
    tensors, values = _vmap(fn, spec, member, (0, *dims), randomness, chunk_size, carrier, *args)
    write_back(assigned, values)
    return _rebuilt(structure, tensors)


_TENSOR = object()  # marks where a tensor output goes back
#: Non-tensor outputs a call gives back once, as they are: values that cannot hide a tensor.
_KEPT = (type(None), numbers.Number, str, bytes, torch.dtype, torch.device)


def _kept(fn: str, leaf: Any) -> Any:
    """``leaf``, an output that comes back once as it is; ``TypeError`` for an object holding tensors.

    An object torch's pytree does not look into (a dataclass, a custom class with tensor attributes)
    would carry one member's tensor out of ``vmap``, unusable there and unstacked.  Other objects
    (an enum, a slice, a function, a class without tensors) come back as they are.
    """
    if isinstance(leaf, _KEPT):
        return leaf
    fields = getattr(leaf, "__dict__", None) if not isinstance(leaf, type) else None
    if not dataclasses.is_dataclass(leaf) and not (
            isinstance(fields, dict) and any(isinstance(value, Tensor) for value in fields.values())):
        return leaf
    raise TypeError(f"{fn}: the forward returned an object of class {type(leaf).__name__}, which "
                    "torch.utils._pytree cannot look into, so its tensors cannot be stacked per member; return "
                    "tensors, or tuples, lists, dicts "
                    "or namedtuples of them, or register the class with torch.utils._pytree "
                    "(register_dataclass or register_pytree_node)")


def _rebuilt(structure: list[Any], tensors: Sequence[Tensor]) -> Any:
    """The output of a vectorised call: its stacked tensors put back among its non-tensor leaves."""
    tree, leaves = structure
    stacked = iter(tensors)
    return pytree.tree_unflatten([next(stacked) if leaf is _TENSOR else leaf for leaf in leaves], tree)


def _check_members(fn: str, args: Sequence[Any], dims: Sequence[Any], size: int) -> None:
    """Raise ``ValueError`` unless each tensor that ``in_dims`` maps has ``size`` slices (one per member) there."""
    for position, (arg, dim) in enumerate(zip(args, dims)):
        if type(dim) is not int:
            continue
        for leaf in pytree.tree_leaves(arg):
            if not isinstance(leaf, Tensor):
                continue
            if not -leaf.dim() <= dim < leaf.dim():
                raise ValueError(f"{fn}: in_dims maps dimension {dim} of input {position}, but it is a tensor of "
                                 f"shape {tuple(leaf.shape)}; give its member dimension, or None to share it")
            if leaf.shape[dim] != size:
                raise ValueError(f"{fn}: expected input {position} to have {size} slices (one per member) along "
                                 f"dimension {dim} (in_dims), got shape {tuple(leaf.shape)}; give None in in_dims "
                                 "to share it with every member")


def _stand_in_call(fn: str, spec: Spec, views: Sequence[Tensor], member: Callable[..., Any], args: Sequence[Any],
                   dims: Sequence[Any], randomness: str) -> list[Tensor]:
    """The stacked tensor outputs of one stand-in member (zero parameters, the template's buffers), for an
    empty swarm's output shapes; per-member inputs get one slice of zeros.  Nothing is written back."""
    buffers = spec.layout.buffers
    leaves = [torch.zeros(1, *view.shape[1:], dtype=view.dtype, device=view.device) if i < spec.n_params
              else buffers[i - spec.n_params].detach().clone().unsqueeze(0) for i, view in enumerate(views)]

    def one(tensor: Any, dim: int) -> Any:
        if not isinstance(tensor, Tensor):
            return tensor
        shape = list(tensor.shape)
        shape[dim] = 1
        return tensor.new_zeros(shape)
    inputs = [arg if type(dim) is not int else pytree.tree_map(lambda t, d=dim: one(t, d), arg)
              for arg, dim in zip(args, dims)]
    tensors, _ = _vmap(fn, spec, member, (0, *dims), randomness, None, leaves or [torch.zeros(1, 0)], *inputs)
    return tensors  # type: ignore[no-any-return]


def _writable(fn: str, spec: Spec, views: Sequence[Tensor]
              ) -> tuple[list[Tensor], Callable[[Sequence[int], Sequence[Tensor]], None]]:
    """Leaves for a vmapped call, buffers that may change as contiguous copies, and a function writing them back.

    The buffers of modules in train mode (where BatchNorm's running statistics and batch count, or a
    counter, change) run as copies, which reach the swarm only once the whole call succeeded, with
    what the forward assigned anew (``write_back(indices, values)``, checked before anything is
    written): a call that raises writes none of them.  In eval mode buffers are read in place, with
    no copy (a lookup table or a mask would otherwise be copied twice per call).  Non-contiguous
    buffers are copied too, as some batching rules silently drop in-place updates of strided batched
    tensors.  Buffers made under ``torch.inference_mode()`` are run as copies outside it: a forward
    that only reads them (eval mode) works, one that changes them raises.
    """
    leaves = list(views)
    copies: list[tuple[int, Tensor]] = []
    frozen: list[tuple[int, Tensor]] = []  # copies of inference buffers: written back only if changed
    inference = torch.is_inference_mode_enabled()
    training = _in_train_mode(spec)
    for i in range(spec.n_params, len(leaves)):
        view = views[i]
        if not inference and view.is_inference():
            leaves[i] = view.clone(memory_format=torch.contiguous_format)
            frozen.append((i, leaves[i]))
        elif i in training or not view.is_contiguous():
            leaves[i] = view.clone(memory_format=torch.contiguous_format)
            copies.append((i, leaves[i]))

    def write_back(indices: Sequence[int], values: Sequence[Tensor]) -> None:
        # kernels such as batch_norm update in place without a version bump: copy all
        for i, copy in frozen:
            if not _same(views[i], copy):
                raise _not_writable(fn, spec, i)
        _check_assigned(fn, spec, views, indices, values)
        with torch.no_grad():
            for i, copy in copies:
                views[i].copy_(copy)
            for index, value in zip(indices, values):
                views[index].copy_(value)
    return leaves, write_back


def _in_train_mode(spec: Spec) -> set[int]:
    """Indices (in ``spec.names``) of the buffers held by a module in train mode."""
    layout, first = spec.layout, spec.n_params
    return {first + index for module, slots in zip(layout.modules, layout.buffer_slots) if module.training
            for _, index in slots if index is not None}


def _same(before: Tensor, after: Tensor) -> bool:
    """Whether a buffer holds the same values (a NaN where it was NaN counts as unchanged)."""
    if before.is_floating_point() or before.is_complex():
        return bool(torch.isclose(before, after, rtol=0.0, atol=0.0, equal_nan=True).all())
    return torch.equal(before, after)


def _not_writable(fn: str, spec: Spec, index: int) -> RuntimeError:
    """The error for a forward that changes buffer ``index`` of a swarm made under inference mode."""
    return RuntimeError(f"{fn}: buffer {spec.names[index]!r} is an inference tensor and cannot be updated in place "
                        "outside torch.inference_mode(); run the forward in eval mode (swarm.eval()) or under "
                        "torch.inference_mode(), or clone the swarm outside inference mode first (swarm.clone())")


def grad_and_value(spec: Spec, views: Sequence[Tensor], size: int, loss_fn: Callable[..., Tensor],
                   args: Sequence[Any], kwargs: dict[str, Any], *, in_dims: InDims = None, randomness: str = "different",
                   chunk_size: Optional[int] = None) -> tuple[list[Optional[Tensor]], Tensor]:
    """Per-member gradients (``None`` where not differentiated) and losses of ``loss_fn(member, *args)``.

    Gradients are taken with respect to every operational floating parameter whose template
    parameter requires grad; buffers and frozen parameters are constants.  An empty swarm (a
    rank's empty shard) calls nothing: no gradients and losses of shape ``(0,)``, in the dtype
    and on the device of the first differentiated parameter (else the default dtype, on the CPU).
    """
    fn = "Swarm.grad_and_value"
    if not callable(loss_fn):
        raise TypeError(f"{fn}: expected a callable loss_fn(member, *args) -> 0-dim tensor, "
                        f"got {type(loss_fn).__name__}")
    dims = _in_dims(fn, in_dims, args)
    if in_dims is not None:
        _check_members(fn, args, dims, size)
    chunk_size = _options(fn, randomness, chunk_size)
    template = spec.layout.params
    wanted = [
        i for i in range(spec.n_params)
        if spec.groups[spec.slots[i].group].active and template[i].requires_grad
    ]
    others = [i for i in range(len(spec.names)) if i not in set(wanted)]
    if size == 0:  # vmap over no members fails inside some backward formulas: there is nothing to run
        if wanted:
            losses = torch.zeros(0, dtype=template[wanted[0]].dtype.to_real(), device=template[wanted[0]].device)
        else:
            losses = torch.zeros(0, dtype=torch.get_default_dtype(), device="cpu")
        return [None] * len(spec.names), losses

    assigned: list[int] = []

    def member_loss(diff: list[Tensor], rest: list[Tensor], *inputs: Any) -> tuple[Tensor, list[Tensor]]:
        leaves: list[Tensor] = [None] * len(spec.names)  # type: ignore[list-item]
        for i, leaf in zip(wanted, diff):
            leaves[i] = leaf
        for i, leaf in zip(others, rest):
            leaves[i] = leaf
        replaced: dict[int, Any] = {}
        loss = loss_fn(Member(spec, leaves, replaced), *inputs, **kwargs)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"{fn}: expected loss_fn to return a 0-dim tensor per member, got {shape}; "
                             "reduce it (e.g. .mean()) inside loss_fn")
        if not (loss.is_floating_point() or loss.is_complex()):  # complex: torch's own error, as in a loop
            raise TypeError(f"{fn}: expected loss_fn to return a floating point loss, got "
                            f"{str(loss.dtype).removeprefix('torch.')}; an integer or boolean loss has no "
                            "gradient (loss.backward() refuses it too): return the loss before rounding or comparing")
        assigned[:], values = _assigned(fn, spec, replaced)
        return loss, [value.detach() for value in values]

    leaves, write_back = _writable(fn, spec, views)
    rest = [leaves[i] for i in others] or [torch.zeros(size, 0)]
    # torch.func.grad under inference_mode returns zeros on torch 2.11 and earlier (later torch leaves the
    # mode itself): the gradient is taken outside it, as torch.func.grad ignores the caller's grad mode.
    with torch.inference_mode(False) if torch.is_inference_mode_enabled() else contextlib.nullcontext():
        grads, (losses, values) = _vmap(fn, spec, torch.func.grad_and_value(member_loss, has_aux=True),
                                        (0, 0, *dims), randomness, chunk_size, [leaves[i] for i in wanted], rest,
                                        *args)
    write_back(assigned, values)
    out: list[Optional[Tensor]] = [None] * len(spec.names)
    for i, grad in zip(wanted, grads):
        out[i] = grad
    return out, losses
