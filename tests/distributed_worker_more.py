"""One rank of ``tests/test_distributed_more.py``: ``python tests/distributed_worker_more.py OUTDIR``.

Launched 4 times with ``RANK`` in the environment.  The same processes then form three
worlds in turn, on fresh ``file://`` rendezvous: 4 ranks, then ranks 0-2, then ranks 0-1
(a rank outside the next world exits).  Each world runs ``checks`` (every function against
the plain torch view of every rank's inputs, which each call first gathers with
``torch.distributed.all_gather_object``) and ends with a fault: in the 3-rank world one
rank's ``loss_fn`` raises inside ``hybrid`` and that rank leaves; in the 2-rank world one rank
raises in the middle of ``all_reduce_mean`` over a group made with a 3 s timeout, and stays
silent.  Each rank writes ``OUTDIR/w{world}rank{rank}.pt``.

``checks(rank, world)`` also runs in the test process itself over a one-rank group.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import nytorch as nyto  # noqa: E402
from distributed_worker import state_of  # noqa: E402
from nytorch import distributed as nd  # noqa: E402
from nytorch import Swarm  # noqa: E402

Tensor = torch.Tensor
WORLDS = (4, 3, 2)
UNEVEN = [2, 0, 3, 1]  # swarm shard sizes by rank (the first `world` of them)
NAN, INF = float("nan"), float("inf")


class Dtypes(nn.Module):
    """float32, float64, float16 and bfloat16 parameters, a BatchNorm (float and int64 buffers), an int32 buffer."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w32 = nn.Parameter(torch.randn(3, 4, generator=g))
        self.w64 = nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))
        self.h = nn.Parameter(torch.randn(6, generator=g).half())
        self.bf = nn.Parameter(torch.randn(2, 3, generator=g).bfloat16())
        self.bn = nn.BatchNorm1d(3)
        with torch.no_grad():
            self.bn.running_mean.normal_(generator=g)
            self.bn.running_var.uniform_(0.5, 2.0, generator=g)
            self.bn.num_batches_tracked.fill_(seed)
        self.register_buffer("count", torch.arange(3, dtype=torch.int32) + seed)


class Net(nyto.NytoModule):
    """A NytoModule whose first layer is non-operational (``ParamConfig``): carried, never averaged."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.frozen = nn.Linear(2, 3)
            self.head = nn.Linear(3, 1)
        self.set_param_config(operational=False, name="frozen")


def uneven(rank: int, world: int) -> Swarm:
    """Rank's shard: ``UNEVEN[rank]`` members, member ``i`` filled with ``10 * rank + i``."""
    size = UNEVEN[rank]
    return Swarm.zeros(nn.Linear(2, 1), size) + torch.arange(size, dtype=torch.float32) + 10.0 * rank


def hybrid_data(steps: int = 4) -> tuple[Swarm, list[tuple[Tensor, Tensor]]]:
    """The whole swarm (7 MLPs) and the batches every rank uses."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    whole = Swarm.normal(model, 7, std=0.5, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(5)
    return whole, [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(steps)]


def hybrid_loss(net: Any, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(net(x), y)


def gathered(value: Any, world: int) -> list[dict[str, Tensor]]:
    """Every rank's ``state_of(value)``, by plain ``all_gather_object`` (the reference's inputs)."""
    out: list[Any] = [None] * world
    dist.all_gather_object(out, state_of(value))
    return out


def attempt(run: Callable[[], Any]) -> tuple[str, str]:
    try:
        run()
        return "no error", ""
    except Exception as error:  # noqa: BLE001 - recorded for the test to check
        return type(error).__name__, str(error)


@contextlib.contextmanager
def counted() -> Iterator[list[tuple[str, int]]]:
    """``(dtype, numel)`` of every tensor the sums hand to the backend, in order."""
    from nytorch.distributed._comm import Comm
    sent: list[tuple[str, int]] = []
    original = Comm.all_reduce_sum_

    def sums(self: Comm, tensors: Any, what: str) -> Any:
        sent.extend((str(tensor.dtype).removeprefix("torch."), tensor.numel()) for tensor in tensors)
        return original(self, tensors, what)
    Comm.all_reduce_sum_ = sums  # type: ignore[method-assign]
    try:
        yield sent
    finally:
        Comm.all_reduce_sum_ = original  # type: ignore[method-assign]


def checks(rank: int, world: int) -> dict[str, Any]:
    """Every function in a world of ``world`` ranks; inputs and results recorded for the test."""
    out: dict[str, Any] = {}
    src = world - 1  # a non-zero src wherever there are two ranks or more
    # broadcast: a model (packed by the call, pack=False, and packed on even ranks only), a Particle, uneven
    # Swarms (src's size wins)
    for label, make in [("model", lambda: Dtypes(rank)), ("model_unpacked", lambda: Dtypes(rank + 20)),
                        ("model_mixed", lambda: Dtypes(rank + 30)),
                        ("particle", lambda: nyto.particle(Dtypes(rank + 40), buffers=True)),
                        ("uneven", lambda: uneven(rank, world))]:
        x = make()
        out[f"broadcast/{label}/inputs"] = gathered(x, world)
        ids = [id(t) for t in x.parameters()] if isinstance(x, nn.Module) else None
        pack = {"model_unpacked": False, "model_mixed": rank % 2 == 0}.get(label, True)
        result = nd.broadcast(x, src, timeout=30, pack=pack)
        out[f"broadcast/{label}"] = state_of(result)
        out[f"broadcast/{label}/same"] = result is x and ids == [id(t) for t in x.parameters()] if ids else None
        out[f"broadcast/{label}/len"] = len(result) if isinstance(result, Swarm) else None
    # all_reduce_mean: a model with every dtype (in place), a NytoModule with a frozen layer, a Particle with
    # buffers, equal Swarms with and without buffers in arithmetic
    for label, make in [("model", lambda: Dtypes(rank + 60)), ("nyto", lambda: Net(rank)),
                        ("particle", lambda: nyto.particle(Dtypes(rank + 80), buffers=True)),
                        ("particle_params", lambda: nyto.particle(Dtypes(rank + 90))),
                        ("swarm", lambda: Swarm.stack([Dtypes(rank + 100), Dtypes(rank + 110)])),
                        ("swarm_buffers", lambda: Swarm.stack([Dtypes(rank + 120), Dtypes(rank + 130)], buffers=True))]:
        x = make()
        out[f"mean/{label}/inputs"] = gathered(x, world)
        with counted() as sent:
            result = nd.all_reduce_mean(x, timeout=30)
        out[f"mean/{label}/sent"] = sent
        out[f"mean/{label}"] = state_of(result)
        out[f"mean/{label}/in_place"] = result is x
        out[f"mean/{label}/input_after"] = state_of(x)
    # all_gather: uneven shards (one empty), one Particle per rank
    for label, make in [("uneven", lambda: uneven(rank, world)),
                        ("particle", lambda: nyto.particle(Dtypes(rank + 140)))]:
        x = make()
        out[f"gather/{label}/inputs"] = gathered(x, world)
        out[f"gather/{label}"] = state_of(nd.all_gather(x, timeout=30))
    # exchange: ring shifts, uneven swarms
    for shift in (1, -1, world + 1, 0):
        for label, make in [("uneven", lambda: uneven(rank, world)), ("model", lambda: Dtypes(rank + 160))]:
            x = make()
            out[f"exchange{shift}/{label}/inputs"] = gathered(x, world)
            result = nd.exchange(x, shift, timeout=30)
            out[f"exchange{shift}/{label}"] = state_of(result)
            out[f"exchange{shift}/{label}/kind"] = type(result).__name__
    # best: the losses every rank passes are recorded; the test finds the winner by hand
    for label, losses in best_losses(rank, world).items():
        x = uneven(rank, world) if label == "uneven" else Swarm.zeros(nn.Linear(2, 1), 2) + torch.tensor(
            [0.0, 1.0]) + 10.0 * rank
        all_losses: list[Any] = [None] * world
        dist.all_gather_object(all_losses, losses)
        member, loss, where = nd.best(x, losses, timeout=30)
        out[f"best/{label}"] = (all_losses, state_of(member), float(loss), where)
    # the distributed hybrid loop over shard(whole) with subset=None: every member is pulled toward the global
    # best, which is what algorithms.hybrid does in one process
    whole, batches = hybrid_data()
    mine, history = nd.hybrid(nd.shard(whole), hybrid_loss, batches, lr=0.2, every=2, alpha=0.3, timeout=30,
                              generator=torch.Generator().manual_seed(rank))
    out["hybrid/shard"] = state_of(mine)
    out["hybrid/history"] = history
    # mismatches and bad arguments on the last rank only: every rank raises, nothing moves
    out.update(errors(rank, world))
    return out


def best_losses(rank: int, world: int) -> dict[str, Any]:
    """``best``'s loss on this rank for each case (ties across ranks, NaNs, -inf, an empty shard)."""
    return {
        "tie": torch.tensor([1.0, 1.0]),                                   # every member of every rank ties
        "tie_later": torch.tensor([5.0, 2.0]) if rank else torch.tensor([3.0, 9.0]),  # ranks >= 1 tie at 2
        "nan": torch.tensor([NAN, NAN]) if rank != world - 1 else torch.tensor([NAN, 7.0]),
        "all_nan": torch.tensor([NAN, NAN]),
        "neg_inf": torch.tensor([0.0, -INF]) if rank == world - 1 else torch.tensor([0.0, 0.0]),
        "uneven": torch.arange(UNEVEN[rank], dtype=torch.float64) + abs(rank - 2),  # rank 2 (or the last) wins
    }


def errors(rank: int, world: int) -> dict[str, Any]:
    """An invalid call on the last rank only (or on rank 0): every rank raises, the models are untouched."""
    out: dict[str, Any] = {}
    last = rank == world - 1

    def record(label: str, run: Callable[[], Any], value: Any = None) -> None:
        before = state_of(value) if value is not None else None
        where = [t.data_ptr() for t in value.parameters()] if isinstance(value, nn.Module) else None
        out[f"error/{label}"] = attempt(run)
        if before is not None:
            after = state_of(value)
            out[f"error/{label}/unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
        if where is not None:
            out[f"error/{label}/storage"] = where == [t.data_ptr() for t in value.parameters()]

    net = nn.Sequential(nn.Linear(2, 4 if last else 3), nn.Linear(3, 1))
    record("shape", lambda: nd.all_reduce_mean(net, timeout=30), net)
    bn = nn.BatchNorm1d(3)
    if rank == 0:
        bn.running_mean = bn.running_mean.double()
    record("buffer_dtype", lambda: nd.broadcast(bn, world - 1, timeout=30), bn)
    shard, batches = nd.shard(hybrid_data()[0]), hybrid_data()[1]
    record("generator", lambda: nd.hybrid(shard, hybrid_loss, batches, lr=0.1, every=2, timeout=30,
                                          generator="seed" if last else None))  # type: ignore[arg-type]
    record("loss_fn", lambda: nd.hybrid(shard, 3 if last else hybrid_loss, batches, lr=0.1, every=2,  # type: ignore
                                        timeout=30))
    record("batches", lambda: nd.hybrid(shard, hybrid_loss, 4 if last else batches, lr=0.1, every=2,  # type: ignore
                                        timeout=30))
    bad = [batches[0], batches[1][0]] if last else batches[:2]  # a tensor, not a tuple, on the pulling step 1
    record("batch", lambda: nd.hybrid(shard, hybrid_loss, bad, lr=0.1, every=2, timeout=30))
    record("step_generator", lambda: nd.hybrid_step(shard, hybrid_loss, *batches[0], step=1, lr=0.1, every=2,
                                                    timeout=30, generator=1 if last else None))  # type: ignore
    paired = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        paired.weight.fill_(float(rank))
    nd.all_reduce_mean(paired, timeout=30)  # pairs with the same call on every rank
    out["error/paired"] = float(paired.weight.detach())
    return out


def subgroup(rank: int, world: int) -> dict[str, Any]:
    """Every function over ``new_group([0, 2, 3])`` of the 4-rank world (rank 1 is outside)."""
    members = [0, 2, 3]
    group = dist.new_group(members)
    x = nyto.particle(Dtypes(rank + 200))
    everyone = gathered(x, world)  # on the world: the test reads the members' entries
    out: dict[str, Any] = {"sub/inputs": everyone}
    if rank not in members:
        out["sub/outsider"] = attempt(lambda: nd.all_reduce_mean(x, group=group, timeout=30))
        return out
    out["sub/broadcast"] = state_of(nd.broadcast(x, 3, group=group, timeout=30))
    out["sub/mean"] = state_of(nd.all_reduce_mean(x, group=group, timeout=30))
    out["sub/gather"] = state_of(nd.all_gather(x, group=group, timeout=30))
    out["sub/exchange"] = state_of(nd.exchange(x, 1, group=group, timeout=30))
    member, loss, where = nd.best(x, {0: 5.0, 2: 1.0, 3: 1.0}[rank], group=group, timeout=30)
    out["sub/best"] = (state_of(member), float(loss), where)
    out["sub/error"] = attempt(lambda: nd.broadcast(x, 1, group=group, timeout=30))  # 1 is not a member
    return out


def hybrid_fault(rank: int, world: int) -> dict[str, Any]:
    """The last rank's loss_fn raises on step 0 (no communication): it raises there and leaves; the others
    reach the pull of step 1 and raise ``PeerError`` within the timeout instead of hanging."""
    whole, batches = hybrid_data()

    def loss(net: Any, x: Tensor, y: Tensor) -> Tensor:
        if rank == world - 1:
            raise KeyError("a failing loss")
        return hybrid_loss(net, x, y)
    started = time.monotonic()
    error = attempt(lambda: nd.hybrid(nd.shard(whole), loss, batches, lr=0.1, every=2, timeout=10))
    return {"fault/error": error, "fault/elapsed": time.monotonic() - started}


def raises_mid_call(rank: int, world: int) -> dict[str, Any]:
    """The last rank raises inside ``all_reduce_mean`` after the handshake and stays alive; the others raise
    ``PeerError`` within the group's own timeout (a group made with 3 s; no ``timeout=`` given)."""
    from nytorch.distributed import _comm
    group = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=3))
    if rank == world - 1:
        def raises(self: Any, *args: Any, **kwargs: Any) -> Any:
            raise MemoryError("out of memory in the middle of the call")
        _comm.Comm.all_reduce_sum_ = raises  # type: ignore[method-assign]
    net = Dtypes(rank + 300)
    started = time.monotonic()
    before = state_of(net)
    error = attempt(lambda: nd.all_reduce_mean(net, group=group, pack=False))
    elapsed = time.monotonic() - started
    if rank == world - 1:
        time.sleep(6.0)  # silent, alive: the others must not wait for it past their timeout
    after = state_of(net)
    return {"mid/error": error, "mid/elapsed": elapsed, "mid/unchanged": all(torch.equal(before[k], after[k])
                                                                            for k in before)}


def main() -> None:
    outdir = sys.argv[1]
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    for world in WORLDS:
        if rank >= world:
            return
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(outdir, f'rendezvous{world}')}",
                                rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
        result = checks(rank, world)
        if world == 4:
            result.update(subgroup(rank, world))
        elif world == 3:
            result.update(hybrid_fault(rank, world))
        else:
            result.update(raises_mid_call(rank, world))
        torch.save(result, os.path.join(outdir, f"w{world}rank{rank}.pt"))
        if world == 3 and rank == world - 1:
            return  # leaves without a word: its peers already raised PeerError
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
