"""The fused swarm forward: chains of ``nn.Linear`` and elementwise layers as one ``baddbmm`` per layer.

A model that is one chain of Linear layers and elementwise activations (an ``nn.Sequential``
of them, or a forward that ``torch.fx`` traces to such a chain and whose trace holds for every
call: straight-line code over submodules and torch's activations, see ``_follows_trace``) runs every member at once
over the stacked weights: the compute floor, with a loop of members' values up to rounding
(``baddbmm`` may sum in another order than a member's ``addmm``: the last bit in float32 / float64).
Anything else (hooks, other layers, a forward with side effects) gets ``NO_PLAN`` and
``_vectorise`` runs it under ``torch.func.vmap``.
"""
from __future__ import annotations

import builtins
import dis
import types
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._swarm_spec import Spec, bound

Tensor = torch.Tensor

__all__ = ["NO_PLAN", "plan_of", "fused_forward"]

# Layers that act on each value independently: running them on [P, batch, features] is the same
# as running them per member.  Exact classes only (a subclass may override forward).
_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
    nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.LogSigmoid, nn.Identity, nn.Dropout,
)
#: The plan of a model the fused path does not run.
NO_PLAN = ("none",)


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

# Instructions of a forward whose one fx trace holds for every later call: loads, stores of locals,
# calls, and loops (over submodule containers: see ``_follows_trace``).  A branch, an exception
# handler, a closure or an import is missing on purpose: any of them could send a later call down
# another path than the traced one (``if self.cfg["act"] == "relu"``, ``if torch.is_grad_enabled()``).
_STRAIGHT_LINE = frozenset({
    "RESUME", "NOP", "CACHE", "EXTENDED_ARG", "NOT_TAKEN",
    "LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_AND_CLEAR", "LOAD_FAST_LOAD_FAST", "LOAD_FAST_BORROW",
    "LOAD_FAST_BORROW_LOAD_FAST_BORROW", "STORE_FAST", "STORE_FAST_LOAD_FAST", "STORE_FAST_STORE_FAST",
    "LOAD_CONST", "LOAD_SMALL_INT", "RETURN_VALUE", "RETURN_CONST", "LOAD_GLOBAL", "LOAD_ATTR", "LOAD_METHOD",
    "PUSH_NULL", "PRECALL", "CALL", "CALL_KW", "CALL_FUNCTION", "CALL_METHOD", "CALL_FUNCTION_KW", "KW_NAMES",
    "POP_TOP", "COPY", "SWAP", "ROT_TWO", "ROT_THREE", "DUP_TOP", "BINARY_SUBSCR", "BUILD_TUPLE", "BUILD_LIST",
    "UNPACK_SEQUENCE", "GET_ITER", "FOR_ITER", "JUMP_BACKWARD", "JUMP_ABSOLUTE", "END_FOR", "POP_ITER",
})
_FUNCTION_NAMES = frozenset(function.__name__ for function in _FUNCTIONS)


def _is_torch(value: object) -> bool:
    return isinstance(value, types.ModuleType) and (value.__name__ == "torch" or value.__name__.startswith("torch."))


def _follows_trace(modules: Sequence[nn.Module]) -> bool:
    """Whether every forward of ``modules`` outside torch is straight-line code whose fx trace holds for every call.

    Tracing records what one call did; Python the graph cannot see (a branch on a config dict, a
    global flag or ``torch.is_grad_enabled()``, an argument read from ``self.slope``) is frozen
    in it.  So a forward qualifies only if it branches nowhere and reads nothing but submodules
    (by attribute), torch and its modules (by global name), torch's activations and constants:
    then every call runs what the trace recorded.  Anything else runs under vmap, as the
    members' own forwards would.

    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(2, 2)
    ...     def forward(self, x):
    ...         return torch.relu(self.fc(x))
    >>> _follows_trace([Net()]), _follows_trace([nn.Sequential(nn.Linear(2, 2))])
    (True, True)
    """
    attributes = _FUNCTION_NAMES | _METHODS | {name for module in modules for name in module._modules}
    for forward in {type(module).forward for module in modules}:
        if getattr(forward, "__module__", "").startswith("torch."):  # torch's own forwards: Sequential, leaves
            continue
        code = getattr(forward, "__code__", None)
        if code is None or code.co_freevars:
            return False
        for instruction in dis.get_instructions(code):
            name, value = instruction.opname, instruction.argval
            if name not in _STRAIGHT_LINE:
                return False
            if name == "LOAD_GLOBAL" and not _is_torch(forward.__globals__.get(value, getattr(builtins, value, None))):
                return False
            if name in ("LOAD_ATTR", "LOAD_METHOD") and value not in attributes and value not in ("nn", "functional"):
                return False
    return True


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
    if any(_has_hooks(module) for module in layout.modules) or not _follows_trace(layout.modules):
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
        return NO_PLAN
    index = {id(module): i for i, module in enumerate(layout.modules)}
    leaves: list[nn.Module] = []
    steps: Optional[list[tuple[Any, ...]]]
    if type(layout.modules[0]) is nn.Sequential:
        steps = [] if _flatten(layout.modules[0], leaves) else None
        for module in leaves if steps is not None else []:
            step = _module_step(layout, index, module)
            if step is None:
                return NO_PLAN
            steps.append(step)  # type: ignore[union-attr]
    else:
        steps = _traced_steps(spec, index)
    if not steps or steps[0][0] != "linear" or steps[0][1] is None:
        return NO_PLAN
    return tuple(steps)


def plan_of(spec: Spec) -> tuple[Any, ...]:
    # built again when the class's forward was replaced since (``Net.forward = ...``), as a module would run it
    forward = type(spec.layout.modules[0]).forward
    if spec.plan is None or spec.planned_for is not forward:
        spec.plan = _build_plan(spec)
        spec.planned_for = forward
    return spec.plan  # type: ignore[return-value]


def fused_forward(spec: Spec, views: Sequence[Tensor], size: int, args: Sequence[Any], kwargs: dict[str, Any],
           dims: tuple[Any, ...], randomness: str) -> Optional[Tensor]:
    """The fused forward, or ``None`` when it does not apply (then vmap runs)."""
    plan = plan_of(spec)
    if plan is NO_PLAN or kwargs or len(args) != 1 or size == 0:
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
