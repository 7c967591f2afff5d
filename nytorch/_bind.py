"""Models as parameter pytrees: ``params`` out of a module, ``bind`` back into a fresh one, ``call``."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from . import _algebra as algebra
from ._errors import StructureError
from ._rebuild import rebuild
from ._types import ModuleT
from ._walk import layout_of

Tensor = torch.Tensor

__all__ = ["params", "state", "bind", "call"]


def _require_module(fn: str, module: object) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{fn}: expected an nn.Module as module, got {type(module).__name__}")
    return module


def params(module: nn.Module) -> dict[str, Tensor]:
    """The module's parameters as ``dict[str, Tensor]``, keyed and ordered like ``named_parameters()``.

    Args:
        module: any ``nn.Module``.

    Returns:
        A new dict of detached views sharing storage with ``module``'s parameters (no copy);
        tied parameters appear once, as in ``named_parameters()``.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``, or is (or holds) a TorchScript or ``torch.ao`` quantized module.

    >>> import torch
    >>> list(params(torch.nn.Linear(2, 1)))
    ['weight', 'bias']
    """
    layout = layout_of(_require_module("params", module))
    return {name: leaf.detach() for name, leaf in zip(layout.names, layout.params)}


def state(module: nn.Module) -> dict[str, Tensor]:
    """Parameters then buffers, keyed like ``state_dict()`` (detached, sharing storage).

    Arithmetic on this tree includes floating buffers (e.g. to average BatchNorm statistics);
    integer buffers such as ``num_batches_tracked`` are carried unchanged.

    Args:
        module: any ``nn.Module``.

    Returns:
        A new dict of detached views sharing storage with ``module``: its parameters in
        ``named_parameters()`` order, then its buffers in ``named_buffers()`` order.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``, or is (or holds) a TorchScript or ``torch.ao`` quantized module.

    >>> list(state(torch.nn.BatchNorm1d(2)))
    ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']
    """
    layout = layout_of(_require_module("state", module))
    pairs = zip(layout.names + layout.buffer_names, layout.params + layout.buffers)
    return {name: leaf.detach() for name, leaf in pairs}


def bind(module: ModuleT, params: Mapping[str, Tensor]) -> ModuleT:
    """A fresh module of ``module``'s class holding ``params`` as its Parameters.

    Parameters are leaves and given buffers are detached, so no gradient flows back to
    ``params`` through the result (under ``torch.func.grad`` it comes out zero): to
    differentiate with respect to ``params``, run the model with ``call``.

    Args:
        module: the model giving the class and structure; left untouched.
        params: every parameter name as in ``named_parameters()`` mapped to a tensor of that
            parameter's shape, dtype and device; buffer names may be given too, otherwise
            buffers are cloned from ``module``.

    Returns:
        A fresh module of ``module``'s class whose Parameters wrap the given tensors without
        copying (pass ``nf.clone(params)`` for independent storage).

    Raises:
        TypeError: ``module`` is not a module (or is (or holds) a TorchScript or quantized module) or
            ``params`` not a mapping of tensors.
        StructureError: a parameter is missing, unknown, or has another shape/dtype/device.

    >>> import torch
    >>> net = torch.nn.Linear(1, 1)
    >>> other = bind(net, {"weight": torch.ones(1, 1), "bias": torch.zeros(1)})
    >>> other(torch.tensor([[3.]]))
    tensor([[3.]], grad_fn=<AddmmBackward0>)
    """
    layout = layout_of(_require_module("bind", module))
    if not isinstance(params, Mapping):
        raise TypeError(f"bind: expected a mapping from names to tensors as params, got {type(params).__name__}")
    known = set(layout.names) | set(layout.buffer_names)
    for key, value in params.items():
        if key not in known:
            raise StructureError(f"bind: {type(module).__name__} has no parameter or buffer named {key!r}")
        if not isinstance(value, Tensor):
            raise TypeError(f"bind: expected a tensor for {key!r}, got {type(value).__name__}")
    for name in layout.names:
        if name not in params:
            raise StructureError(f"bind: parameter {name!r} is missing from params")
    values = [params[name] for name in layout.names]
    algebra.check_state("bind", layout.names, layout.params, layout.names, values)
    buffers = [  # detached as the Parameters are: a buffer carrying a graph (an interpolated BatchNorm
        # statistic) would make BatchNorm's forward raise, as torch does not differentiate through it
        (params[name].detach() if params[name].requires_grad else params[name]) if name in params else buffer.clone()
        for name, buffer in zip(layout.buffer_names, layout.buffers)
    ]
    given = [name for name in layout.buffer_names if name in params]
    algebra.check_state("bind", given, [layout.buffers[layout.buffer_names.index(n)] for n in given],
                        given, [params[n] for n in given])
    leaves = [value.detach() if isinstance(value, nn.Parameter) else value for value in values]
    return rebuild(layout, leaves, buffers)  # type: ignore[return-value]


def call(module: nn.Module, params: Mapping[str, Tensor], *args: Any, **kwargs: Any) -> Any:
    """Run ``module`` on ``params`` instead of its own parameters (``torch.func.functional_call``).

    Works inside ``torch.func.vmap`` / ``grad``; tied weights need only one name.

    Args:
        module: the model to run (a Python ``nn.Module``).
        params: names mapped to tensors to use in place of the module's own parameters
            (and buffers); names left out use the module's own.
        *args: positional arguments of ``module``'s forward.
        **kwargs: keyword arguments of ``module``'s forward.

    Returns:
        Whatever ``module``'s forward returns.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``, or is a TorchScript module, or ``params`` is
            not a mapping (a Particle or Swarm: pass its ``.params``).

    >>> import torch
    >>> net = torch.nn.Linear(1, 1)
    >>> call(net, {"weight": torch.ones(1, 1), "bias": torch.zeros(1)}, torch.tensor([[3.]]))
    tensor([[3.]])
    """
    _require_module("call", module)
    if isinstance(module, torch.jit.ScriptModule):  # torch's own refusal would not name ``call``
        raise TypeError(f"call: expected a Python nn.Module, got a TorchScript {type(module).__name__} "
                        "(torch.jit.script / torch.jit.trace), which torch.func.functional_call cannot run; "
                        "call the module before scripting it")
    try:
        named = dict(params)
    except (TypeError, ValueError) as error:  # what dict() takes, as before; a Particle or Swarm has .params
        raise TypeError(f"call: expected a mapping from names to tensors as params, got {type(params).__name__}"
                        + (" (pass its .params)" if isinstance(getattr(type(params), "params", None), property)
                           else "")) from error
    return torch.func.functional_call(module, named, args, kwargs)
