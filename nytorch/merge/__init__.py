"""Averaging and merging whole models in memory: EMA, SWA, model soups, task arithmetic, TIES, DARE, SLERP.

Everything accepts ``nn.Module``s (``NytoModule``s included), ``Particle``s and dicts
of tensors (``EMA``, ``ema_`` and ``ravel`` also ``Swarm``s) and is built on the
particle core's leaf-wise engine.

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
