"""One rank of the ``nytorch.distributed`` tests: ``python tests/distributed_worker.py SCENARIO OUTDIR``.

Launched by ``tests/test_distributed.py`` with ``RANK``, ``WORLD_SIZE`` and ``INIT`` (a
``file://`` rendezvous) in the environment.  Each scenario writes ``OUTDIR/rank{R}.pt``;
the inputs come from ``make_inputs(rank)``, which the tests also call to build the
single-process reference.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import nytorch as nyto  # noqa: E402
from nytorch import distributed as nd  # noqa: E402
from nytorch import Swarm  # noqa: E402

Tensor = torch.Tensor
SHARD_SIZES = [2, 0, 3, 1]  # uneven shards, one empty


class Odd(nn.Module):
    """The dtypes the backends lack or treat specially: half, bfloat16, float8, int16, uint8, bool."""

    def __init__(self) -> None:
        super().__init__()
        self.h = nn.Parameter(torch.randn(3).half())
        self.b = nn.Parameter(torch.randn(2, 2).bfloat16())
        self.f8 = nn.Parameter(torch.randn(4).to(torch.float8_e4m3fn), requires_grad=False)
        self.register_buffer("i16", torch.randint(-100, 100, (3,), dtype=torch.int16))
        self.register_buffer("u8", torch.randint(0, 255, (2,), dtype=torch.uint8))
        self.register_buffer("flag", torch.tensor(True))


def _seeded(seed: int, make: Callable[[], Any]) -> Any:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return make()


def make_inputs(rank: int) -> dict[str, Any]:
    """Every value the function tests pass on ``rank`` (deterministic)."""
    import conftest as c

    def deep() -> nn.Module:
        net = c.Deep()
        net.set_param_config(operational=False, name="block0")
        return c.randomize_buffers(net, seed=rank)

    generator = torch.Generator().manual_seed(10 + rank)
    mlp = _seeded(0, c.MLP)
    return {
        "mixed": _seeded(100 + rank, c.Mixed),
        "deep": _seeded(200 + rank, deep),
        "tied": _seeded(300 + rank, c.TiedLM),
        "odd": _seeded(400 + rank, Odd),
        "flat_mixed": nyto.flatten_(_seeded(800 + rank, c.Mixed)),  # some buffers are its own memory
        "flat_mlp": nyto.flatten_(_seeded(900 + rank, c.MLP)),
        "particle": nyto.particle(_seeded(500 + rank, c.MLP)),
        "particle_buf": nyto.particle(_seeded(600 + rank, lambda: c.randomize_buffers(c.conv_net(), rank)),
                                      buffers=True),
        "swarm": Swarm.normal(mlp, 3, std=1.0, generator=generator),
        "swarm_bn": Swarm.stack([_seeded(700 + 10 * rank + i, lambda: c.randomize_buffers(c.conv_net(), i))
                                 for i in range(2)]),
        "shard": Swarm.normal(mlp, SHARD_SIZES[rank], std=1.0, generator=generator),
        "relu": nn.ReLU(),  # no parameters at all: still one member per rank
        "relu_particle": nyto.particle(nn.ReLU()),
    }


def make_losses(rank: int) -> dict[str, Any]:
    """Losses for ``best``: distinct per member, the global minimum on rank 2 member 1."""
    generator = torch.Generator().manual_seed(50 + rank)
    swarm = torch.rand(3, generator=generator) + 1.0
    if rank == 2:
        swarm[1] = 0.25
    shard = torch.rand(SHARD_SIZES[rank], generator=generator, dtype=torch.float64) + 1.0
    if rank == 3:
        shard[0] = float("nan")
    return {"swarm": swarm, "shard": shard, "particle": 3.0 - rank, "mixed": torch.tensor([float(rank)]),
            "tie": torch.ones(3)}


def state_of(value: Any) -> dict[str, Tensor]:
    """Every tensor a value holds, by name (cloned)."""
    if isinstance(value, Swarm):
        items = {**value.params, **value.buffers}
    elif isinstance(value, nyto.Particle):
        items = value.params
    else:
        items = dict(list(value.named_parameters()) + list(value.named_buffers()))
    return {name: tensor.detach().clone() for name, tensor in items.items()}


def objects(value: nn.Module) -> list[int]:
    return [id(t) for t in list(value.parameters()) + list(value.buffers())]


def pointers(value: Any) -> list[int]:
    """Where each tensor of a value lives (``data_ptr``), to notice that storage moved."""
    return [t.data_ptr() for t in state_of_views(value)]


def storages(value: Any) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in state_of_views(value) if t.numel()}


def state_of_views(value: Any) -> list[Tensor]:
    if isinstance(value, Swarm):
        return list(value.params.values()) + list(value.buffers.values())
    if isinstance(value, nyto.Particle):
        return list(value._leaves)
    return list(value.parameters()) + list(value.buffers())


# --------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------
def functions(rank: int, world: int) -> dict[str, Any]:
    """Every function on every kind of value (compared with the single-process reference by the tests)."""
    out: dict[str, Any] = {}
    for key in make_inputs(rank):
        x = make_inputs(rank)[key]
        before, ids = storages(x), objects(x) if isinstance(x, nn.Module) else None
        result = nd.broadcast(x, 2 if key == "shard" else 1, timeout=30)
        out[f"broadcast/{key}"] = state_of(result)
        if ids is not None:
            out[f"broadcast/{key}/same"] = result is x and objects(x) == ids
        else:
            out[f"broadcast/{key}/fresh"] = not (storages(result) & before)
            out[f"broadcast/{key}/input"] = state_of(x)
    for key in make_inputs(rank):
        if key == "shard":
            continue
        x = make_inputs(rank)[key]
        ids = objects(x) if isinstance(x, nn.Module) else None
        result = nd.all_reduce_mean(x, timeout=30)
        out[f"mean/{key}"] = state_of(result)
        if ids is not None:
            out[f"mean/{key}/same"] = result is x and objects(x) == ids
        else:
            out[f"mean/{key}/input"] = state_of(x)
    for key in make_inputs(rank):
        gathered = nd.all_gather(make_inputs(rank)[key], timeout=30)
        out[f"gather/{key}"] = state_of(gathered)
        out[f"gather/{key}/len"] = len(gathered)
    for shift in (1, -2, world):
        for key in ("mixed", "odd", "particle", "shard", "swarm_bn"):
            x = make_inputs(rank)[key]
            result = nd.exchange(x, shift, timeout=30)
            out[f"exchange{shift}/{key}"] = state_of(result)
            out[f"exchange{shift}/{key}/type"] = type(result).__name__
            out[f"exchange{shift}/{key}/input"] = state_of(x)
    inputs, losses = make_inputs(rank), make_losses(rank)
    for key, x, loss in [("swarm", inputs["swarm"], losses["swarm"]), ("shard", inputs["shard"], losses["shard"]),
                         ("particle", inputs["particle"], losses["particle"]),
                         ("mixed", inputs["mixed"], losses["mixed"]), ("tie", inputs["swarm"], losses["tie"])]:
        member, value, where = nd.best(x, loss, timeout=30)
        out[f"best/{key}"] = (state_of(member), value, where, type(member).__name__)
    out.update(subgroup(rank))
    whole = Swarm.normal(_seeded(0, __import__("conftest").MLP), 7, generator=torch.Generator().manual_seed(1))
    out["shard/len"] = len(nd.shard(whole))
    out["shard/roundtrip"] = state_of(nd.all_gather(nd.shard(whole), timeout=30))
    return out


def subgroup(rank: int) -> dict[str, Any]:
    """Every function over ``new_group([1, 3])``: group ranks inside, global ranks outside."""
    group = dist.new_group([1, 3])
    x = make_inputs(rank)["particle"]
    if rank not in (1, 3):
        try:
            nd.broadcast(x, 3, group=group, timeout=30)
            return {"sub/outsider": "no error"}
        except ValueError as error:
            return {"sub/outsider": str(error)}
    member, loss, where = nd.best(x, make_losses(rank)["particle"], group=group, timeout=30)
    errors = {}  # messages name global ranks (1 and 3), never group ranks (0 and 1)
    for label, run in [
            ("shape", lambda: nd.all_reduce_mean(nn.Linear(2, 3 if rank == 3 else 2), group=group, timeout=30)),
            ("shift", lambda: nd.exchange(x, 1.5 if rank == 3 else 1, group=group, timeout=30)),
            ("src", lambda: nd.broadcast(x, rank, group=group, timeout=30)),
            ("kind", lambda: nd.all_gather(Swarm.stack([x]) if rank == 3 else x, group=group, timeout=30)),
            ("sizes", lambda: nd.all_reduce_mean(Swarm.stack([x] * (rank // 2 + 1)), group=group, timeout=30))]:
        try:
            run()
            errors[f"sub/error/{label}"] = "no error"
        except Exception as error:  # noqa: BLE001 - recorded for the test to check
            errors[f"sub/error/{label}"] = f"{type(error).__name__}: {error}"
    return {
        **errors,
        "sub/broadcast": state_of(nd.broadcast(x, 3, group=group, timeout=30)),
        "sub/mean": state_of(nd.all_reduce_mean(x, group=group, timeout=30)),
        "sub/gather": state_of(nd.all_gather(x, group=group, timeout=30)),
        "sub/exchange": state_of(nd.exchange(x, group=group, timeout=30)),
        "sub/best": (state_of(member), float(loss), where),
    }


def mismatches(rank: int, world: int) -> dict[str, Any]:
    """Invalid calls: every rank must raise, before any data moves; the group stays usable."""
    from nytorch.distributed._comm import Comm
    calls: list[str] = []
    for name in ("broadcast_", "all_reduce_sum_", "send_recv"):
        original = getattr(Comm, name)

        def counted(self: Any, *args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            calls.append(_name)
            return _original(self, *args, **kwargs)
        setattr(Comm, name, counted)
    out: dict[str, Any] = {}

    def attempt(label: str, run: Callable[[], Any], value: Any = None) -> None:
        before = state_of(value) if value is not None else None
        where = pointers(value) if value is not None else None
        start = len(calls)
        try:
            run()
            out[label] = ("no error", "")
        except Exception as error:  # noqa: BLE001 - recorded for the test to check
            out[label] = (type(error).__name__, str(error))
        out[label + "/data_calls"] = calls[start:]
        if before is not None:
            out[label + "/unchanged"] = all(torch.equal(before[k], v) for k, v in state_of(value).items())
            out[label + "/storage"] = pointers(value) == where  # not packed either

    import conftest as c
    torch.manual_seed(rank)
    net = nn.Linear(3, 5 if rank == 3 else 4)
    attempt("shape", lambda: nd.all_reduce_mean(net, timeout=30), net)
    net2 = nn.Linear(3, 4, bias=rank != 2)
    attempt("missing", lambda: nd.broadcast(net2, 0, timeout=30), net2)
    net3 = c.MLP()
    attempt("src", lambda: nd.broadcast(net3, 0 if rank == 0 else 1, timeout=30), net3)
    attempt("call", lambda: nd.exchange(net3, timeout=30) if rank == 1 else nd.all_reduce_mean(net3, timeout=30),
            net3)
    p = nyto.particle(c.MLP())
    x = Swarm.stack([p]) if rank == 1 else p
    attempt("kind", lambda: nd.all_gather(x, timeout=30))
    swarm = Swarm.zeros(c.MLP(), 2 if rank == 0 else 3)
    attempt("sizes", lambda: nd.all_reduce_mean(swarm, timeout=30))
    attempt("loss", lambda: nd.best(swarm, torch.zeros(7 if rank == 2 else len(swarm)), timeout=30))
    attempt("type", lambda: nd.all_gather([1, 2] if rank == 0 else p, timeout=30))  # type: ignore[arg-type]
    attempt("bad_src", lambda: nd.broadcast(p, world + 3, timeout=30))
    attempt("config", lambda: nd.all_reduce_mean(_configured(rank), timeout=30))
    attempt("healthy", lambda: nd.all_reduce_mean(c.MLP(), timeout=30))
    out.update(bad_arguments(rank, world, attempt))
    devices(rank, attempt)
    return out


def _ranked(rank: int, offset: float = 0.0) -> nn.Module:
    net = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(rank + offset)
    return net


def bad_arguments(rank: int, world: int, attempt: Callable[..., None]) -> dict[str, Any]:
    """An invalid argument on one rank only: every rank raises the same error in that same call, and
    the next collective pairs with the next one on every rank (a mis-paired call would average the
    wrong models)."""
    import conftest as c
    out: dict[str, Any] = {}
    p = nyto.particle(c.MLP())
    swarm = Swarm.zeros(c.MLP(), 3)
    bad_timeout = _ranked(rank)
    attempt("timeout", lambda: nd.all_reduce_mean(bad_timeout, timeout=0 if rank == 0 else 30), bad_timeout)
    attempt("src_type", lambda: nd.broadcast(p, "0" if rank == 1 else 0, timeout=30))  # type: ignore[arg-type]
    attempt("shift_type", lambda: nd.exchange(p, 1.5 if rank == 2 else 1, timeout=30))  # type: ignore[arg-type]
    attempt("loss_type", lambda: nd.best(swarm, "x" if rank == 3 else torch.zeros(3), timeout=30))
    attempt("scalar_loss", lambda: nd.best(p, "abc" if rank == 1 else 0.5, timeout=30))
    shards, batches = hybrid_inputs(world, [2, 0, 1, 1])
    attempt("hybrid_subset", lambda: nd.hybrid(shards[rank], hybrid_loss, batches[rank], lr=0.1, every=2,
                                               subset=-1 if rank == 1 else 1, timeout=30))
    attempt("hybrid_step_alpha", lambda: nd.hybrid_step(shards[rank], hybrid_loss, *batches[rank][0], step=1, lr=0.1,
                                                        every=2, alpha="x" if rank == 2 else 0.5, timeout=30))
    attempt("hybrid_every", lambda: nd.hybrid(shards[rank], hybrid_loss, batches[rank], lr=0.1,
                                              every=3 if rank == 1 else 2, timeout=30))
    inference = _ranked(rank)
    if rank == 1:
        with torch.inference_mode():
            inference = _ranked(rank)
    attempt("inference", lambda: nd.all_reduce_mean(inference, timeout=30), inference)
    attempt("inference_broadcast", lambda: nd.broadcast(inference, 0, timeout=30, pack=False), inference)
    sparse = nn.Linear(2, 1)
    if rank == 3:
        sparse.weight = nn.Parameter(sparse.weight.detach().to_sparse())
    attempt("sparse", lambda: nd.all_reduce_mean(sparse, timeout=30), sparse if rank != 3 else None)
    huge = _ranked(rank, 50.0)  # capped, not refused: the call averages
    nd.all_reduce_mean(huge, timeout={0: 1e15, 1: datetime.timedelta.max}.get(rank, 30))
    out["huge_timeout"] = float(huge.weight)
    paired = _ranked(rank, 100.0)
    nd.all_reduce_mean(paired, timeout=30)
    out["paired"] = float(paired.weight)
    return out


def devices(rank: int, attempt: Callable[..., None]) -> None:
    """A meta-device model on one rank (or on all): every rank raises, and the others' models keep
    their values and storage."""
    torch.manual_seed(rank)
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    if rank == 1:
        net = net.to("meta")
    attempt("meta_one", lambda: nd.all_reduce_mean(net, timeout=30), None if rank == 1 else net)
    meta = nn.Linear(2, 3).to("meta")
    attempt("meta_all", lambda: nd.broadcast(meta, 0, timeout=30))


def _configured(rank: int) -> nn.Module:
    import conftest as c
    net = c.MLP()
    if rank == 1:
        net.set_param_config(operational=False, name="layer1")
    return net


#: Shard sizes of the hybrid runs: even, and uneven with an empty shard (``subset=2`` is more than
#: some shards hold: those pull all of their members).
HYBRID_SIZES = {"even": [3, 3, 3, 3], "uneven": [2, 0, 1, 3]}


def hybrid(rank: int, world: int) -> dict[str, Any]:
    """Four steps of the distributed hybrid loop on shard ``rank`` (the tests replay it in one process)."""
    out = {}
    for label, sizes in HYBRID_SIZES.items():
        shards, batches = hybrid_inputs(world, sizes)
        shard, history = nd.hybrid(shards[rank], hybrid_loss, batches[rank], lr=0.1, every=2, subset=2, alpha=0.5,
                                   generator=torch.Generator().manual_seed(rank), timeout=30)
        out.update({f"{label}/shard": state_of(shard), f"{label}/history": history})
    return out


def hybrid_inputs(world: int, sizes: list[int]) -> tuple[list[Swarm], list[list[tuple[Tensor, Tensor]]]]:
    """Per rank: a shard of ``sizes[rank]`` MLPs and 4 batches of data."""
    import conftest as c
    model = _seeded(0, c.MLP)
    shards = [Swarm.normal(model, sizes[r], std=0.5, generator=torch.Generator().manual_seed(r))
              for r in range(world)]
    generator = torch.Generator().manual_seed(99)
    batches = [[(torch.randn(8, 4, generator=generator), torch.randint(0, 3, (8,), generator=generator))
                for _ in range(4)] for _ in range(world)]
    return shards, batches


def hybrid_loss(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return torch.nn.functional.cross_entropy(net(x), y)


def mixed_packing(rank: int) -> dict[str, Any]:
    """Means of a model packed on some ranks only, or with ``pack`` differing by rank.

    A float64 group of one leaf lies back to back whatever ``pack`` says, and rank 0's model is
    packed beforehand: every rank must still send its groups in the same order.
    """
    def model() -> nn.Module:
        made = nn.Sequential(nn.Linear(3, 2), nn.Linear(1, 4, bias=False).double())
        with torch.no_grad():
            for param in made.parameters():
                param.fill_(10.0 * rank)
        return made

    out: dict[str, Any] = {}
    net = model()
    if rank == 0:
        nyto.particle(net)  # packs this rank's model only
    nd.all_reduce_mean(net, timeout=30, pack=False)
    out["packed on one rank"] = state_of(net)
    net = model()
    nd.all_reduce_mean(net, timeout=30, pack=rank == 0)
    out["pack on one rank"] = state_of(net)
    return out


def dies_after_handshake(rank: int, world: int, fn: str, outdir: str) -> dict[str, Any]:
    """Rank ``world - 1`` passes the handshake of ``fn`` then dies: after the first transfer (broadcast, of
    which it is the root) or before any (``all_reduce_mean``).  The others record whether a model called
    with ``pack=False`` kept its values: each dtype group here is one leaf, lying back to back."""
    from nytorch.distributed import _comm

    net = nn.ModuleDict({"a": nn.Linear(4, 1, bias=False), "b": nn.Linear(2, 1, bias=False).double()})
    with torch.no_grad():
        for param in net.parameters():
            param.fill_(rank + 1.0)
    if rank == world - 1:
        method = "broadcast_" if fn == "broadcast" else "all_reduce_sum_"
        original, calls = getattr(_comm.Comm, method), []

        def dies(self: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            if fn == "all_reduce_mean" or len(calls) == 2:
                time.sleep(0.5)
                os._exit(1)
            return original(self, *args, **kwargs)
        setattr(_comm.Comm, method, dies)
    before = state_of(net)
    try:
        if fn == "broadcast":
            nd.broadcast(net, world - 1, timeout=10, pack=False)
        else:
            nd.all_reduce_mean(net, timeout=10, pack=False)
    except nd.PeerError:
        unchanged = all(torch.equal(before[k], v) for k, v in state_of(net).items())
        with open(os.path.join(outdir, f"handshake{rank}.json"), "w") as handle:
            json.dump({"unchanged": unchanged}, handle)
        return {}
    raise SystemExit("expected a PeerError")


def faults(rank: int, world: int, mode: str, timeout: float, outdir: str) -> dict[str, Any]:
    """Loop over collectives until a peer fails: the test kills rank ``world - 1`` (``kill``), or it
    stops answering after three rounds (``hang``)."""
    import conftest as c
    # with a float64 group of one leaf, which lies back to back even unpacked
    net, packed = nn.ModuleDict({"mlp": c.MLP(), "scale": nn.Linear(3, 1, bias=False).double()}), c.MLP()
    swarm = Swarm.normal(net, 2, generator=torch.Generator().manual_seed(rank))
    step = 0
    while True:
        started = time.monotonic()
        before = state_of(net)
        try:
            # pack=False: a model left in its own tensors keeps its values when a transfer fails
            nd.all_reduce_mean(net, timeout=timeout, pack=False)
            swarm = nd.exchange(swarm, timeout=timeout)
            nd.best(swarm, torch.rand(2), timeout=timeout)
            before = state_of(net)
            nd.broadcast(net, 0, timeout=timeout, pack=False)
            nd.all_reduce_mean(packed, timeout=timeout)  # packed: averaged in place
        except nd.PeerError as error:
            unchanged = all(torch.equal(before[k], v) for k, v in state_of(net).items())
            record = {"error": type(error).__name__, "message": str(error), "unchanged": unchanged,
                      "elapsed": time.monotonic() - started, "step": step}
            with open(os.path.join(outdir, f"error{rank}.json"), "w") as handle:
                json.dump(record, handle)
            raise
        step += 1
        if step == 3:
            open(os.path.join(outdir, f"ready{rank}"), "w").close()
        if rank == world - 1 and step >= 3:
            if mode == "hang":
                time.sleep(120)  # alive but silent: the test kills it


def main() -> None:
    scenario, outdir = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=os.environ["INIT"], rank=rank, world_size=world)
    if scenario == "functions":
        from nytorch.distributed import _flat
        _flat.PIECE_BYTES = 96  # every buffer over 192 bytes travels in pieces: both paths run
        result = {**functions(rank, world), **{f"mismatch/{k}": v for k, v in mismatches(rank, world).items()},
                  **{f"hybrid/{k}": v for k, v in hybrid(rank, world).items()},
                  **{f"mixed packing/{k}": v for k, v in mixed_packing(rank).items()}}
    elif scenario in ("kill", "hang"):
        result = faults(rank, world, scenario, float(sys.argv[3]), outdir)
    elif scenario == "handshake":
        result = dies_after_handshake(rank, world, sys.argv[3], outdir)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
