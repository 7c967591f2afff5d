"""Pure functions on parameter pytrees: the functional style of nytorch.

>>> import torch, nytorch.functional as nf
>>> net = torch.nn.Linear(2, 1)
>>> p = nf.params(net)
>>> q = nf.lerp(p, nf.randn_like(p), 0.1)
>>> out = nf.call(net, q, torch.ones(3, 2))
>>> tuple(out.shape)
(3, 1)
"""
from ._bind import bind, call, params, state
from ._tree import add, clone, div, dot, lerp, mul, neg, norm, pow, randn_like, sub, tree_map, zeros_like

__all__ = [
    "params", "state", "bind", "call",
    "add", "sub", "mul", "div", "pow", "neg", "lerp", "clone", "randn_like", "zeros_like",
    "tree_map", "dot", "norm",
]
