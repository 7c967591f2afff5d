"""Swarms across processes and machines on ``torch.distributed`` (gloo on CPU, NCCL on GPU, ``torchrun``).

Collectives on whole models, ``Particle``s and ``Swarm``s, each moving one coalesced flat
buffer per dtype (never one message per tensor), each starting with a cheap structure
handshake (mismatches raise ``nytorch.StructureError`` on every rank, naming the parameter,
before any data moves; an invalid argument on one rank raises that rank's error on every
rank, in the same call) and each bounded by a ``timeout`` (a dead or hung peer raises
``PeerError`` instead of hanging):

* ``broadcast(x, src)``: rank ``src``'s value everywhere (models in place);
* ``all_reduce_mean(x)``: model averaging / federated averaging (models in place);
* ``all_gather(shard)``: every rank's members as one ``Swarm``;
* ``best(x, loss)``: the globally best member, its loss and its rank;
* ``exchange(x, shift=1)``: ring migration for island models;
* ``shard``, ``hybrid_step``, ``hybrid``: the hybrid swarm loop with a global best.

Every function takes ``group=`` (default: the world) and ``timeout=`` (seconds or a
``timedelta``; default: the process group's own timeout).

>>> import torch, torch.distributed as dist, nytorch
>>> from nytorch import distributed as nd
>>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
>>> net = torch.nn.Linear(4, 2)
>>> nd.all_reduce_mean(net, timeout=30) is net       # averaged in place across the ranks
True
>>> len(nd.all_gather(nytorch.particle(net)))        # one member per rank
1
>>> dist.destroy_process_group()
"""
from ._collectives import all_gather, all_reduce_mean, broadcast
from ._migration import best, exchange
from ._comm import PeerError
from ._hybrid import hybrid, hybrid_step, shard

__all__ = [
    "broadcast", "all_reduce_mean", "all_gather", "best", "exchange",
    "shard", "hybrid_step", "hybrid", "PeerError",
]
