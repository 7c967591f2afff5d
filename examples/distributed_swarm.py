"""One swarm of MLPs spread over processes: the distributed hybrid loop on iris, with island migration.

Each process (rank) owns a shard of ``--members`` MLPs, an island.  Every step runs SGD on the
shard's members in one vectorised call; every ``--every`` steps the globally best member is
found across all ranks (``nytorch.distributed.best``: one tiny all_gather plus one broadcast
of the winner) and half of every shard is pulled toward it; every ``--migrate`` steps each
island sends its two best members to the next rank, which puts them in place of its two
worst (``exchange``).  At the end the whole swarm is gathered on every rank (``all_gather``)
and the ranks' best members are averaged into a model soup (``all_reduce_mean``).

Run on this CPU machine (gloo)::

    torchrun --standalone --nproc-per-node 4 examples/distributed_swarm.py

The same script runs unchanged on GPUs (NCCL, one GPU per process): the backend follows
``torch.cuda.is_available()``.  Every collective has a timeout: if a process dies or hangs,
the others stop with ``nytorch.distributed.PeerError`` instead of waiting forever.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_iris
from sklearn.model_selection import train_test_split
from torch import nn

from nytorch import distributed as nd
from nytorch import Swarm


def load_data(device: torch.device) -> tuple[torch.Tensor, ...]:
    """Iris, 80/20 split (``random_state=0``), features standardised on the training set."""
    iris = load_iris()
    x_train, x_test, y_train, y_test = train_test_split(iris.data, iris.target, test_size=0.2, random_state=0)
    x_train, x_test = torch.tensor(x_train, dtype=torch.float32), torch.tensor(x_test, dtype=torch.float32)
    mean, std = x_train.mean(0), x_train.std(0)
    data = ((x_train - mean) / std, torch.tensor(y_train), (x_test - mean) / std, torch.tensor(y_test))
    return tuple(t.to(device) for t in data)


def model() -> nn.Module:
    """One member: a 4-16-3 MLP."""
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def loss_fn(member: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of one member (``member(x)`` runs its forward)."""
    return F.cross_entropy(member(x), y)


def losses_of(swarm: Swarm, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Every member's loss from one vectorised forward, shape ``(P,)``."""
    logits = swarm(x)
    return F.cross_entropy(logits.flatten(0, 1), y.repeat(len(swarm)), reduction="none").view(len(swarm), -1).mean(1)


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of ``x`` that ``net`` classifies right."""
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=8, help="members per rank")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--every", type=int, default=5, help="pull toward the global best every this many steps")
    parser.add_argument("--migrate", type=int, default=25, help="ring migration every this many steps")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a silent peer is an error")
    args = parser.parse_args()
    for option, value in (("--members", args.members), ("--steps", args.steps), ("--every", args.every),
                          ("--migrate", args.migrate)):
        if value < 1:  # refused here, by every rank alike, rather than as a traceback per rank mid-run
            parser.error(f"{option}: expected a positive whole number, got {value}")
    if not args.timeout > 0:
        parser.error(f"--timeout: expected a positive number of seconds, got {args.timeout}")
    if "RANK" not in os.environ:
        parser.error("expected to be started by torchrun, which sets RANK and WORLD_SIZE: "
                     "torchrun --standalone --nproc-per-node 4 examples/distributed_swarm.py")

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    timeout = args.timeout
    x_train, y_train, x_test, y_test = load_data(device)
    started = time.perf_counter()
    try:
        torch.manual_seed(rank)
        center = model().to(device)
        nd.broadcast(center, 0, timeout=timeout)  # every island starts around rank 0's model (in place)
        noise = torch.Generator(device=device).manual_seed(1000 + rank)
        shard = Swarm.normal(center, args.members, std=0.5, generator=noise)
        picks = torch.Generator().manual_seed(rank)  # which members are pulled (CPU)
        for start in range(0, args.steps, args.migrate):
            batches = [(x_train, y_train)] * min(args.migrate, args.steps - start)
            shard, _ = nd.hybrid(shard, loss_fn, batches, lr=args.lr, every=args.every, subset=args.members // 2,
                                 alpha=0.5, generator=picks, show_progress=False, timeout=timeout)
            losses = losses_of(shard, x_train, y_train)
            order = losses.argsort()
            arrived = nd.exchange(shard[order[:2]], shift=1, timeout=timeout)  # my best two go to rank + 1
            shard[order[-2:]] = arrived                                        # rank - 1's best replace my worst
            _, loss, where = nd.best(shard, losses_of(shard, x_train, y_train), timeout=timeout)
            if rank == 0:
                print(f"step {start + len(batches):4d}  global best loss {float(loss):.4f} (on rank {where})",
                      flush=True)
        whole = nd.all_gather(shard, timeout=timeout)
        member, loss, where = nd.best(shard, losses_of(shard, x_train, y_train), timeout=timeout)
        local_best = shard[int(losses_of(shard, x_train, y_train).argmin())].clone().module()
        soup = nd.all_reduce_mean(local_best, timeout=timeout)  # in place: the average of the ranks' bests
    except nd.PeerError as error:
        print(f"rank {rank}: stopping, {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    if rank == 0:
        members = torch.tensor([accuracy(m.module(), x_test, y_test) for m in whole])
        print(f"{world} ranks x {args.members} members = {len(whole)} models, backend {dist.get_backend()}, "
              f"{time.perf_counter() - started:.1f} s")
        print(f"test accuracy: global best (rank {where}, train loss {float(loss):.4f}) "
              f"{accuracy(member.module(), x_test, y_test):.3f}; soup of the ranks' bests "
              f"{accuracy(soup, x_test, y_test):.3f}; swarm mean {float(members.mean()):.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
