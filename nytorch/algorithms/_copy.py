"""Exact copies of one member (or a Particle/model) onto every member of a swarm.

``(1 − 1)·W + 1·T`` is ``T`` only while ``W`` is finite: a diverged member (inf or NaN) would stay
NaN.  The algorithms use ``copy_onto`` for their "jump onto the best" cases instead.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import nn

from .. import _leafwise as lw
from .._particle import Particle
from .._swarm import Swarm

Tensor = torch.Tensor

__all__ = ["copy_onto"]


def _copied_rows(flat: Tensor, row: Tensor) -> Tensor:
    """A new tensor shaped like ``flat`` holding ``row`` (``[1, width]`` or ``flat``'s shape) in every row."""
    return torch.empty_like(flat).copy_(row)


def copy_onto(fn: str, swarm: Swarm, target: Union[Swarm, Particle, nn.Module]) -> Swarm:
    """A new swarm whose arithmetic values are ``target``'s, bit for bit, in every member.

    ``target`` is a Particle, a model or a one-member Swarm of the members' structure (checked, with
    messages naming ``fn``).  Leaves outside arithmetic (non-operational parameters, buffers of a
    swarm built without them) are ``swarm``'s, as with ``swarm * 0 + target``.

    >>> s = Swarm.randn(torch.nn.Linear(2, 1), 3)
    >>> s[1] = float("inf")                           # a diverged member
    >>> copied = copy_onto("demo", s, s[0:1])
    >>> torch.equal(copied.params["weight"], s.params["weight"][0].expand(3, 1, 2))
    True
    """
    return swarm._binary(lw.Op(fn, _copied_rows), target)
