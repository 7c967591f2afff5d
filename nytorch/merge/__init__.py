"""Averaging and merging whole models in memory: EMA, SWA, model soups, task arithmetic, TIES, DARE, SLERP.

Everything accepts ``nn.Module``s (``NytoModule``s included), ``Particle``s and dicts
of tensors, and is built on the particle core's leaf-wise engine.  ``Swarm``s work
member by member (each member as a loop of per-member calls would give it) in ``ema_``,
``EMA``, ``ravel``, ``task_vector``, ``task_arithmetic``, ``ties``, ``dare`` and ``slerp``;
``average`` and ``greedy_soup`` take one Swarm as the collection of its members.
Parameters a ``ParamConfig`` marks non-operational are left out of every merge: a result
holds a clone of the first model's (or ``base``'s), or with ``clone=False`` that very
``Parameter``, as particle arithmetic gives (``EMA``'s average always holds its own copy).

Decay schedules for ``EMA(decay=...)`` have the type ``Schedule``
(``Callable[[int], float]``: the number of updates already applied -> the decay for the
next one); ``warmup_decay`` and ``power_decay`` make them.

>>> import torch
>>> from nytorch import merge
>>> online = torch.nn.Linear(4, 2)
>>> ema = merge.EMA(online, decay=merge.warmup_decay(0.999))
>>> ema.update()
>>> soup = merge.average([online, ema.averaged])
>>> vector, unravel = merge.ravel(soup)
>>> tuple(vector.shape)
(10,)
"""
from ._average import Soup, average, greedy_soup
from ._bn import update_bn
from ._ema import ema_
from ._ema_model import EMA
from ._ravel import ravel
from ._schedule import Schedule, power_decay, warmup_decay
from ._slerp import slerp
from ._task import dare, task_arithmetic, task_vector
from ._ties import ties

__all__ = [
    "ema_", "EMA", "warmup_decay", "power_decay", "Schedule",
    "average", "greedy_soup", "Soup", "update_bn",
    "task_vector", "task_arithmetic", "ties", "dare", "slerp",
    "ravel",
]
