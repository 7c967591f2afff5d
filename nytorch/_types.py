"""Type aliases shared across nytorch (one place, per the house style)."""
from __future__ import annotations

from typing import Any, Union

import torch

#: A pytree whose leaves are tensors: dicts, lists, tuples, nested.
PyTree = Any
#: Parameters keyed like ``state_dict`` / ``named_parameters()``.
Params = dict[str, torch.Tensor]
#: What broadcasts to every leaf: a Python number or a 0-dim tensor.
Scalar = Union[int, float, complex, bool, torch.Tensor]
