"""Type aliases shared across nytorch (one place, per the house style)."""
from __future__ import annotations

from typing import Any, TypeVar, Union

import torch
from torch import nn

#: A pytree whose leaves are tensors: dicts, lists, tuples, nested.
PyTree = Any
#: Parameters keyed like ``state_dict`` / ``named_parameters()``.
Params = dict[str, torch.Tensor]
#: What broadcasts to every leaf: a Python number or a 0-dim tensor.
Scalar = Union[int, float, complex, bool, torch.Tensor]
#: A tree a function gives back in its own structure (``nf.add(params, 1)`` is a dict like ``params``).
TreeT = TypeVar("TreeT")
#: A model a function gives back, or one of its class (``flatten_(net)``, ``nf.bind(net, ...)``).
ModuleT = TypeVar("ModuleT", bound=nn.Module)
