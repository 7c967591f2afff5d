"""Run every member of a swarm at once: forward, per-member losses and gradients.

The general path is one ``torch.func.vmap`` over the member's forward with the
member's tensors swapped into a private skeleton module (what
``torch.func.functional_call`` does, minus its generic bookkeeping).  Models that
are one chain of ``nn.Linear`` layers and elementwise activations (an
``nn.Sequential`` of them, or any forward that ``torch.fx`` traces to such a
chain) take a fused path instead: one ``torch.baddbmm`` per layer over the
stacked weights, which is the compute floor and gives the same values.

Attributes a forward sets on the skeleton's modules (``self.last = out``, a counter,
``weight_norm``'s recomputed weight) are not kept: every call starts from the skeleton as
it was and leaves it so, as they would otherwise hold one call's batched tensors.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from ._swarm_spec import Spec

Tensor = torch.Tensor
InDims = Union[None, int, Sequence[Any]]

__all__ = ["Member", "forward", "grad_and_value", "bound"]

# Layers that act on each value independently: running them on [P, batch, features] is the same
# as running them per member.  Exact classes only (a subclass may override forward).
_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
    nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.LogSigmoid, nn.Identity, nn.Dropout,
)
_NO_PLAN = ("none",)
_RANDOMNESS = ("different", "same", "error")


@contextmanager
def bound(spec: Spec, leaves: Sequence[Tensor], replaced: Optional[dict[int, Any]] = None) -> Iterator[nn.Module]:
    """The skeleton module holding ``leaves`` (aligned with ``spec.names``) for the duration of the block.

    With ``replaced``, the buffers that the block assigned anew (``self.stat = 0.9 * self.stat + ...``
    in a forward) are recorded there by index, before the skeleton gets its own back.  Every
    module's other attributes are put back as they were too (a forward's ``self.last = out``
    would leave a batched tensor or an fx Proxy in the skeleton every derived swarm shares).
    """
    entries = spec.entries
    modules = spec.layout.modules
    with spec.lock:
        saved = [table[key] for table, key, _ in entries]
        states = [module.__dict__.copy() for module in modules]  # shallow: the tables stay the same objects
        try:
            for table, key, index in entries:
                table[key] = leaves[index]
            yield spec.layout.modules[0]
            if replaced is not None:
                for table, key, index in entries:
                    if index >= spec.n_params and table[key] is not leaves[index]:
                        replaced[index] = table[key]
        finally:
            for module, state in zip(modules, states):
                now = module.__dict__  # put back in place (C-level; cheaper than finding what changed)
                now.clear()
                now.update(state)
            for (table, key, _), old in zip(entries, saved):
                table[key] = old


def _assigned(fn: str, spec: Spec, replaced: dict[int, Any]) -> tuple[list[int], list[Tensor]]:
    """The buffers a member's forward assigned anew, as indices and values (a vmapped function's output)."""
    indices = sorted(replaced)
    for index in indices:
        value = replaced[index]
        if not isinstance(value, Tensor):
            raise TypeError(f"{fn}: the forward set buffer {spec.names[index]!r} to a "
                            f"{type(value).__name__}; a swarm's buffers stay tensors of their shape and dtype")
    return indices, [replaced[index] for index in indices]


def _write_assigned(fn: str, spec: Spec, views: Sequence[Tensor], indices: Sequence[int],
                    values: Sequence[Tensor]) -> None:
    """Copy what each member's forward assigned to its buffers into the swarm's (stacked) buffers."""
    for index, value in zip(indices, values):
        view = views[index]
        if value.shape != view.shape or value.dtype != view.dtype:
            raise ValueError(f"{fn}: the forward assigned buffer {spec.names[index]!r} a tensor of shape "
                             f"{tuple(value.shape[1:])} {value.dtype} per member, but it holds shape "
                             f"{tuple(view.shape[1:])} {view.dtype}; update it in place or keep its shape and dtype")
        if view.is_inference() and not torch.is_inference_mode_enabled():
            raise _not_writable(fn, spec, index)
    with torch.no_grad():
        for index, value in zip(indices, values):
            views[index].copy_(value)


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
    training_norms = any(isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training
                         and module.track_running_stats for module in spec.layout.modules)
    # BatchNorm with momentum=None reads its batch count as a number: that fails as a data-dependent call
    if "Batch norm" in message or "running_mean" in message or (
            training_norms and ("data-dependent" in message or ".item()" in message)):
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


# -- fused path for Sequential stacks of Linear and elementwise layers ---------------------------
def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _flatten(module: nn.Module, out: list[nn.Module]) -> bool:
    if _has_hooks(module):
        return False
    if type(module) is nn.Sequential:
        return all(_flatten(child, out) for child in module._modules.values() if child is not None)
    out.append(module)
    return True


_FUNCTIONS = frozenset({
    torch.relu, torch.tanh, torch.sigmoid, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu,
    F.silu, F.mish, F.tanh, F.sigmoid, F.hardtanh, F.hardsigmoid, F.hardswish, F.softplus, F.softsign,
    F.tanhshrink, F.logsigmoid,
})
_METHODS = frozenset({"relu", "tanh", "sigmoid"})
# In-place forms, used on the fused path's own intermediates when autograd is not recording them.
_IN_PLACE: dict[Any, Callable[[Tensor], Tensor]] = {
    nn.ReLU: torch.relu_, nn.Tanh: torch.tanh_, nn.Sigmoid: torch.sigmoid_,
    torch.relu: torch.relu_, F.relu: torch.relu_, torch.tanh: torch.tanh_, torch.sigmoid: torch.sigmoid_,
}


def _module_step(layout: Any, index: dict[int, int], module: nn.Module) -> Optional[tuple[Any, ...]]:
    if _has_hooks(module) or "forward" in module.__dict__:  # a forward set on the instance (a patch) runs, not ours
        return None
    if type(module) is nn.Linear:
        slots = dict(layout.param_slots[index[id(module)]])
        return ("linear", slots.get("weight"), slots.get("bias"))
    if type(module) in _ELEMENTWISE:
        return ("map", module)
    return None


def _changed(now: dict[str, Any], before: dict[str, Any]) -> bool:
    """Whether a module ``__dict__`` no longer holds the same objects as its copy ``before``."""
    return len(now) != len(before) or any(now.get(key, now) is not value for key, value in before.items())


def _traced_steps(spec: Spec, index: dict[int, int]) -> Optional[list[tuple[Any, ...]]]:
    """Steps of a forward that torch.fx traces to one chain of Linear and elementwise ops (else ``None``).

    Tracing runs the forward, and what it does to the module's own tensors is not in the graph
    (``self.count += 1`` on a buffer): it traces with copies bound, and a forward that writes to
    or reassigns any of them has effects the fused path would drop, so it is not fused.  Nor is
    one that sets any other attribute (``self.last = out``, ``self.calls += 1``): its body would
    never run again, so it takes the vmap path, which runs it on every call.
    """
    layout = spec.layout
    if any(_has_hooks(module) for module in layout.modules):
        return None
    import torch.fx  # only when a plan is first needed

    with torch.inference_mode(False):  # made under inference_mode, copies would have no version counter to watch
        probes = [nn.Parameter(leaf.detach().clone(), leaf.requires_grad) if isinstance(leaf, nn.Parameter)
                  else leaf.detach().clone() for leaf in layout.params + layout.buffers]
    versions = [probe._version for probe in probes]
    try:
        with bound(spec, probes) as root:
            states = [module.__dict__.copy() for module in layout.modules]
            graph = torch.fx.Tracer().trace(root)
            kept = all(table[key] is probes[i] for table, key, i in spec.entries)
            kept = kept and not any(_changed(module.__dict__, state) for module, state in zip(layout.modules, states))
    except Exception:  # noqa: BLE001 - anything untraceable just takes the vmap path
        return None
    if not kept or [probe._version for probe in probes] != versions:
        return None
    nodes = list(graph.nodes)
    if len(nodes) < 3 or nodes[0].op != "placeholder" or nodes[0].args or nodes[-1].op != "output":
        return None
    steps: list[tuple[Any, ...]] = []
    previous = nodes[0]
    for node in nodes[1:-1]:
        inputs = node.all_input_nodes
        if inputs != [previous] or node.args[:1] != (previous,) or len(previous.users) != 1:
            return None
        if node.op == "call_module":
            step = _module_step(layout, index, root.get_submodule(str(node.target)))
        elif node.op == "call_function" and node.target in _FUNCTIONS and not node.kwargs.get("inplace"):
            step = ("fn", node.target, tuple(node.args[1:]), dict(node.kwargs))
        elif node.op == "call_method" and node.target in _METHODS and len(node.args) == 1 and not node.kwargs:
            step = ("fn", getattr(torch, str(node.target)), (), {})
        else:
            return None
        if step is None:
            return None
        steps.append(step)
        previous = node
    if nodes[-1].args != (previous,) or len(previous.users) != 1:
        return None
    return steps


def _build_plan(spec: Spec) -> tuple[Any, ...]:
    layout = spec.layout
    root = layout.modules[0]
    # a plan traces the class's ``forward``; calling the module runs its class's own ``__call__`` or the instance's
    if type(root).__call__ is not nn.Module.__call__ or "forward" in root.__dict__:
        return _NO_PLAN
    index = {id(module): i for i, module in enumerate(layout.modules)}
    leaves: list[nn.Module] = []
    steps: Optional[list[tuple[Any, ...]]]
    if type(layout.modules[0]) is nn.Sequential:
        steps = [] if _flatten(layout.modules[0], leaves) else None
        for module in leaves if steps is not None else []:
            step = _module_step(layout, index, module)
            if step is None:
                return _NO_PLAN
            steps.append(step)  # type: ignore[union-attr]
    else:
        steps = _traced_steps(spec, index)
    if not steps or steps[0][0] != "linear" or steps[0][1] is None:
        return _NO_PLAN
    return tuple(steps)


def _plan(spec: Spec) -> tuple[Any, ...]:
    # built again when the class's forward was replaced since (``Net.forward = ...``), as a module would run it
    forward = type(spec.layout.modules[0]).forward
    if spec.plan is None or spec.planned_for is not forward:
        spec.plan = _build_plan(spec)
        spec.planned_for = forward
    return spec.plan  # type: ignore[return-value]


def _fused(spec: Spec, views: Sequence[Tensor], size: int, args: Sequence[Any], kwargs: dict[str, Any],
           dims: tuple[Any, ...], randomness: str) -> Optional[Tensor]:
    """The fused forward, or ``None`` when it does not apply (then vmap runs)."""
    plan = _plan(spec)
    if plan is _NO_PLAN or kwargs or len(args) != 1 or size == 0:
        return None
    x = args[0]
    first = views[plan[0][1]]
    if not isinstance(x, Tensor) or x.dim() < 1 or x.dtype != first.dtype or x.device != first.device:
        return None
    if x.shape[-1] != first.shape[-1] or dims[0] not in (None, 0):
        return None
    if randomness != "different" and any(
            step[0] == "map" and type(step[1]) is nn.Dropout and step[1].training and step[1].p > 0 for step in plan):
        return None
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None
    if dims[0] == 0:
        if x.dim() < 2 or x.shape[0] != size:
            return None
        batch = x.shape[1:-1]
        h = x.reshape(size, -1, x.shape[-1])
    else:
        batch = x.shape[:-1]
        h = x.reshape(1, -1, x.shape[-1]).expand(size, -1, -1)
    # any layer's tensor, not only the first's: with the first layer frozen, a later trainable layer
    # records, and an in-place activation would overwrite an output its backward saved
    recording = torch.is_grad_enabled() and (x.requires_grad or any(
        views[i].requires_grad for step in plan if step[0] == "linear" for i in step[1:] if i is not None))
    for step in plan:
        if step[0] == "linear":
            weight = views[step[1]].mT
            h = torch.bmm(h, weight) if step[2] is None else torch.baddbmm(views[step[2]].unsqueeze(1), h, weight)
            continue
        key = type(step[1]) if step[0] == "map" else step[1]
        in_place = _IN_PLACE.get(key)
        plain = step[0] == "map" or (not step[2] and set(step[3]) <= {"inplace"})
        if in_place is not None and plain and not recording:
            h = in_place(h)  # h is an intermediate of ours (the plan starts with a Linear)
        elif step[0] == "map":
            h = step[1](h)
        else:
            h = step[1](h, *step[2], **step[3])
    return h.reshape(size, *batch, h.shape[-1])


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
        fused = _fused(spec, views, size, args, kwargs, dims, randomness)
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
        structure[:] = [tree, [_TENSOR if isinstance(leaf, Tensor) else leaf for leaf in flat]]
        return [leaf for leaf in flat if isinstance(leaf, Tensor)], values

    if size == 0:  # vmap over no members fails in some batching rules: run one stand-in member, keep none
        stand_in = _stand_in_call(fn, spec, views, member, args, dims, randomness)
        return _rebuilt(structure, [tensor[:0] for tensor in stand_in])
    leaves, write_back = _writable(fn, spec, views)
    carrier = leaves or [torch.zeros(size, 0)]  # a model without tensors: still map over the members
    tensors, values = _vmap(fn, spec, member, (0, *dims), randomness, chunk_size, carrier, *args)
    write_back()
    _write_assigned(fn, spec, views, assigned, values)
    return _rebuilt(structure, tensors)


_TENSOR = object()  # marks where a tensor output goes back


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


def _writable(fn: str, spec: Spec, views: Sequence[Tensor]) -> tuple[list[Tensor], Callable[[], None]]:
    """Leaves for a vmapped call whose buffers are contiguous, and a function writing buffer updates back.

    Some batching rules (e.g. BatchNorm's running statistics) silently drop in-place updates
    of strided batched tensors, and buffers are strided views into the flat storage.  Buffers
    made under ``torch.inference_mode()`` are run as copies outside it: a forward that only reads
    them (eval mode) works, one that changes them raises before anything is written.
    """
    leaves = list(views)
    copies: list[tuple[int, Tensor]] = []
    frozen: list[tuple[int, Tensor]] = []  # copies of inference buffers: written back only if changed
    inference = torch.is_inference_mode_enabled()
    for i in range(spec.n_params, len(leaves)):
        if not inference and leaves[i].is_inference():
            leaves[i] = leaves[i].clone()
            frozen.append((i, leaves[i]))
        elif not leaves[i].is_contiguous():
            leaves[i] = leaves[i].contiguous()
            copies.append((i, leaves[i]))

    def write_back() -> None:  # kernels such as batch_norm update in place without a version bump: copy all
        for i, copy in frozen:
            if not _same(views[i], copy):
                raise _not_writable(fn, spec, i)
        with torch.no_grad():
            for i, copy in copies:
                views[i].copy_(copy)
    return leaves, write_back


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
    grads, (losses, values) = _vmap(fn, spec, torch.func.grad_and_value(member_loss, has_aux=True), (0, 0, *dims),
                                    randomness, chunk_size, [leaves[i] for i in wanted], rest, *args)
    write_back()
    _write_assigned(fn, spec, views, assigned, values)
    out: list[Optional[Tensor]] = [None] * len(spec.names)
    for i, grad in zip(wanted, grads):
        out[i] = grad
    return out, losses
