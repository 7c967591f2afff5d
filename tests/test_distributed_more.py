"""``nytorch.distributed`` in worlds of 1, 2, 3 and 4 gloo processes, against plain torch.

One launch of 4 processes forms three worlds in turn (4 ranks, then 3, then 2; see
``distributed_worker_more.py``); a world of one runs the same checks in this process.
Every reference is computed here from each rank's inputs as plain ``all_gather_object``
collected them in the worker: means by a float64 sum per tensor, broadcast, gather and
exchange exactly, ``best`` by a hand-written argmin, the hybrid loop by
``algorithms.hybrid`` on the whole swarm in one process.
"""
from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distributed_worker_more as m
import nytorch.algorithms as alg
from nytorch import distributed as nd
from nytorch import Swarm
from test_distributed import finish, kill

Tensor = torch.Tensor
WORKER = Path(__file__).with_name("distributed_worker_more.py")
ROOT = Path(__file__).resolve().parents[1]
WORLDS = [1, 2, 3, 4]


# --------------------------------------------------------------------------------------
# Launching: one launch of 4 processes for the worlds of 4, 3 and 2; the world of 1 here
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    """``results[world][rank]``: what ``checks`` (and the world's fault) recorded."""
    import torch.distributed as dist
    outdir = tmp_path_factory.mktemp("worlds")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(outdir)], env={**env, "RANK": str(rank)}, cwd=ROOT,
                              start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for rank in range(4)]
    try:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            one = [m.checks(0, 1)]  # the world of one, while the launch starts
        finally:
            dist.destroy_process_group()
        ended = finish(procs, time.monotonic() + 90)
    finally:
        kill(procs)
    for rank, (code, err) in enumerate(ended):
        assert code == 0, f"rank {rank} failed:\n{err[-4000:]}"
    out = {1: one}
    for world in m.WORLDS:
        out[world] = [torch.load(outdir / f"w{world}rank{rank}.pt", weights_only=False) for rank in range(world)]
    return out


# --------------------------------------------------------------------------------------
# References (plain torch)
# --------------------------------------------------------------------------------------
def same(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality, NaN included, with dtype and shape."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():  # compare the bits: NaN equals NaN, -0.0 differs from 0.0
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.dtype.itemsize]
        return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))
    return torch.equal(a, b)


def assert_exact(got: dict[str, Tensor], want: dict[str, Tensor], what: Any = "") -> None:
    assert list(got) == list(want), what
    for name in want:
        assert same(got[name], want[name]), (what, name, got[name], want[name])


SWARM_BUFFERS = {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "count"}


def averaged(label: str, name: str, leaf: Tensor) -> bool:
    """Whether ``all_reduce_mean`` averages this leaf (floating and operational; a Swarm's buffers only when
    it takes them into arithmetic)."""
    if label == "nyto" and name.startswith("frozen."):
        return False  # ParamConfig(operational=False): carried
    if label == "swarm" and name in SWARM_BUFFERS:
        return False
    return leaf.is_floating_point()


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("label", ["model", "model_unpacked", "model_mixed", "particle", "uneven"])
def test_broadcast_from_the_last_rank_is_exact(results: dict[int, list[dict[str, Any]]], world: int,
                                               label: str) -> None:
    src = world - 1
    for rank in range(world):
        got = results[world][rank]
        inputs = got[f"broadcast/{label}/inputs"]
        assert_exact(got[f"broadcast/{label}"], inputs[src], (world, rank))
        if label.startswith("model"):
            assert got[f"broadcast/{label}/same"], "a model is updated in place, same Parameter objects"
        if label == "uneven":
            assert got[f"broadcast/{label}/len"] == m.UNEVEN[src], "the result has src's number of members"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("label", ["model", "nyto", "particle", "particle_params", "swarm", "swarm_buffers"])
def test_all_reduce_mean_is_the_mean_of_every_ranks_values(results: dict[int, list[dict[str, Any]]], world: int,
                                                           label: str) -> None:
    for rank in range(world):
        got = results[world][rank]
        inputs = got[f"mean/{label}/inputs"]
        mean = got[f"mean/{label}"]
        assert list(mean) == list(inputs[rank])
        for name, own in inputs[rank].items():
            value = mean[name]
            assert value.dtype == own.dtype and value.shape == own.shape, name
            if not averaged(label, name, own):
                assert same(value, own), (label, name, "kept as this rank has it")
                continue
            want = sum(state[name].double() for state in inputs) / world  # type: ignore[union-attr]
            if own.dtype in (torch.float32, torch.float64):
                assert torch.allclose(value.double(), want, rtol=1e-6, atol=1e-6), (label, name, value, want)
            else:  # float16 / bfloat16 travel and sum in their own precision, as torch.distributed.all_reduce does
                scale = max(float(state[name].double().abs().max()) for state in inputs)
                bound = 2 * world * torch.finfo(own.dtype).eps * max(scale, 1.0)
                assert float((value.double() - want).abs().max()) <= bound, (label, name, value, want)
            assert same(value, results[world][0][f"mean/{label}"][name]), "every rank holds the same mean"
        assert got[f"mean/{label}/in_place"] == (label in ("model", "nyto"))
        if label in ("model", "particle"):  # one flat buffer per averaged dtype, never one message per tensor
            assert sorted(got[f"mean/{label}/sent"]) == [("bfloat16", 6), ("float16", 6), ("float32", 24),
                                                         ("float64", 5)]
        if label not in ("model", "nyto"):
            assert_exact(got[f"mean/{label}/input_after"], inputs[rank], "a Particle or Swarm is left untouched")


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("label", ["uneven", "particle"])
def test_all_gather_concatenates_every_rank_in_rank_order(results: dict[int, list[dict[str, Any]]], world: int,
                                                          label: str) -> None:
    for rank in range(world):
        got = results[world][rank]
        inputs = got[f"gather/{label}/inputs"]
        join = torch.cat if label == "uneven" else torch.stack
        whole = got[f"gather/{label}"]  # a Particle made without buffers: its Swarm's buffers are the template's
        assert_exact({name: whole[name] for name in inputs[0]},
                     {name: join([state[name] for state in inputs]) for name in inputs[0]})
    if label == "uneven":
        assert len(results[world][0]["gather/uneven"]["bias"]) == sum(m.UNEVEN[:world])


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("shift", ["1", "-1", "world + 1", "0"])
@pytest.mark.parametrize("label", ["uneven", "model"])
def test_exchange_receives_what_rank_minus_shift_sent(results: dict[int, list[dict[str, Any]]], world: int,
                                                      shift: str, label: str) -> None:
    step = {"1": 1, "-1": -1, "world + 1": world + 1, "0": 0}[shift]
    for rank in range(world):
        got = results[world][rank]
        inputs = got[f"exchange{step}/{label}/inputs"]
        assert_exact(got[f"exchange{step}/{label}"], inputs[(rank - step) % world], (world, rank, step))
        assert got[f"exchange{step}/{label}/kind"] == ("Swarm" if label == "uneven" else "Dtypes")


def by_hand(all_losses: list[Tensor]) -> tuple[int, int, float]:
    """``(rank, index, loss)`` of the lowest loss, NaN as +inf, ties to the lowest rank then index."""
    candidates = [(math.inf if math.isnan(v) else v, r, i, v)
                  for r, losses in enumerate(all_losses) for i, v in enumerate(losses.tolist())]
    _, rank, index, value = min(candidates)
    return rank, index, value


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("label", ["tie", "tie_later", "nan", "all_nan", "neg_inf", "uneven"])
def test_best_is_the_argmin_found_by_hand(results: dict[int, list[dict[str, Any]]], world: int, label: str) -> None:
    all_losses = results[world][0][f"best/{label}"][0]
    rank_, index, value = by_hand(all_losses)
    expected = {"tie": (0, 0), "all_nan": (0, 0), "neg_inf": (world - 1, 1)}.get(label)
    if expected is not None:
        assert (rank_, index) == expected  # the hand reference itself: ties go to the lowest rank, then member
    member_value = 10.0 * rank_ + index  # every leaf of member `index` on rank `rank_` holds this value
    for rank in range(world):
        losses, state, loss, where = results[world][rank][f"best/{label}"]
        assert all(torch.equal(a, b) or (a.isnan() == b.isnan()).all() for a, b in zip(losses, all_losses))
        assert where == rank_, (label, world, rank)
        assert loss == value or (math.isnan(loss) and math.isnan(value))
        assert_exact(state, {"weight": torch.full((1, 2), member_value), "bias": torch.full((1,), member_value)})


@pytest.mark.parametrize("world", WORLDS)
def test_distributed_hybrid_with_every_member_pulled_equals_algorithms_hybrid_in_one_process(
        results: dict[int, list[dict[str, Any]]], world: int) -> None:
    """With ``subset=None`` every member moves toward the global best, as ``algorithms.hybrid`` moves every
    member toward the best of the whole swarm: the shards, gathered, are its result."""
    whole, batches = m.hybrid_data()
    want, history = alg.hybrid(whole, m.hybrid_loss, batches, lr=0.2, every=2, alpha=0.3,
                               generator=torch.Generator().manual_seed(0))
    bounds = [0, *itertools.accumulate(len(part) for part in torch.tensor_split(torch.arange(len(whole)), world))]
    for rank in range(world):
        got = results[world][rank]
        lo, hi = bounds[rank], bounds[rank + 1]
        for name, leaf in want.params.items():
            assert torch.allclose(got["hybrid/shard"][name], leaf[lo:hi], atol=1e-6), (world, rank, name)
        assert torch.allclose(got["hybrid/history"], history[:, lo:hi], atol=1e-6)


# --------------------------------------------------------------------------------------
# Invalid calls on one rank: every rank raises, before any data moves
# --------------------------------------------------------------------------------------
ERRORS = {  # label: (class, message before the "(on rank ...)" suffix; None: a structure error, see STRUCTURE)
    "generator": ("TypeError", "hybrid: expected a torch.Generator or None as generator, got str"),
    "loss_fn": ("TypeError", "hybrid: expected a callable as loss_fn, got int"),
    "batches": ("TypeError", "hybrid: expected an iterable of batches (tuples of loss_fn arguments), got int"),
    "batch": ("TypeError", "hybrid: expected each batch to be a tuple or list of loss_fn arguments, got Tensor at "
                           "step 1"),
    "step_generator": ("TypeError", "hybrid_step: expected a torch.Generator or None as generator, got int"),
}


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("label", sorted(ERRORS))
def test_a_bad_hybrid_argument_on_the_last_rank_raises_on_every_rank(results: dict[int, list[dict[str, Any]]],
                                                                     world: int, label: str) -> None:
    kind, message = ERRORS[label]
    if world > 1:
        message += f" (on rank {world - 1}; every rank of the {world} raises this error, and nothing was sent)"
    for rank in range(world):
        assert results[world][rank][f"error/{label}"] == (kind, message), (world, rank)
        assert results[world][rank]["error/paired"] == pytest.approx((world - 1) / 2), "the next call pairs up"


@pytest.mark.parametrize("world", [2, 3, 4])
def test_a_structure_mismatch_names_the_parameter_and_the_ranks_on_every_rank(
        results: dict[int, list[dict[str, Any]]], world: int) -> None:
    prefix = "the structures differ across ranks (found before any data moved): "
    want = {
        "shape": f"all_reduce_mean: {prefix}parameter '0.weight' is shape (3, 2) float32 on rank 0 but shape (4, 2) "
                 f"float32 on rank {world - 1}",
        "buffer_dtype": f"broadcast: {prefix}parameter 'running_mean' is shape (3,) float64 on rank 0 but shape (3,) "
                        "float32 on rank 1",
    }
    for rank in range(world):
        got = results[world][rank]
        for label, message in want.items():
            assert got[f"error/{label}"] == ("StructureError", message), (rank, label)
            assert got[f"error/{label}/unchanged"] and got[f"error/{label}/storage"], "left as it was, not packed"


# --------------------------------------------------------------------------------------
# A subgroup of the 4-rank world: group ranks inside, global ranks outside
# --------------------------------------------------------------------------------------
def test_every_function_on_a_subgroup_of_three_speaks_global_ranks(results: dict[int, list[dict[str, Any]]]) -> None:
    ranks = results[4]
    inputs = ranks[0]["sub/inputs"]  # every world rank's value, gathered on the world
    members = [0, 2, 3]
    assert ranks[1]["sub/outsider"] == ("ValueError", "all_reduce_mean: this process (global rank 1) is not a member "
                                                      "of the given group")
    for position, rank in enumerate(members):
        got = ranks[rank]
        assert_exact(got["sub/broadcast"], inputs[3])
        assert_exact({k: got["sub/gather"][k] for k in inputs[0]},
                     {k: torch.stack([inputs[r][k] for r in members]) for k in inputs[0]})
        assert_exact(got["sub/exchange"], inputs[members[position - 1]])  # 0 <- 3, 2 <- 0, 3 <- 2
        for name, value in got["sub/mean"].items():
            want = sum(inputs[r][name].double() for r in members) / 3
            eps = torch.finfo(value.dtype).eps
            assert torch.allclose(value.double(), want, rtol=max(1e-6, 6 * eps), atol=max(1e-6, 6 * eps)), name
        state, loss, where = got["sub/best"]
        assert (where, loss) == (2, 1.0), "a tie of global ranks 2 and 3 goes to the lower, named globally"
        assert_exact(state, inputs[2])
        assert got["sub/error"] == ("ValueError", "broadcast: global rank 1 is not in the process group (its ranks "
                                                  "are [0, 2, 3])")


# --------------------------------------------------------------------------------------
# Faults: a rank that raises does not leave the others waiting past the timeout
# --------------------------------------------------------------------------------------
def test_a_rank_whose_loss_raises_and_leaves_makes_the_others_raise_peer_error(
        results: dict[int, list[dict[str, Any]]]) -> None:
    ranks = results[3]
    assert ranks[2]["fault/error"] == ("KeyError", "'a failing loss'"), "raised where it happened, as it was"
    for rank in (0, 1):
        kind, message = ranks[rank]["fault/error"]
        assert kind == "PeerError" and message.startswith(f"best: comparing structure fingerprints failed on rank "
                                                          f"{rank} of 3 (timeout=10s): a peer process died"), message
        assert ranks[rank]["fault/elapsed"] < 10 + 2


def test_a_rank_raising_mid_call_makes_the_others_raise_within_the_groups_own_timeout(
        results: dict[int, list[dict[str, Any]]]) -> None:
    ranks = results[2]
    assert ranks[1]["mid/error"] == ("MemoryError", "out of memory in the middle of the call")
    kind, message = ranks[0]["mid/error"]
    assert kind == "PeerError" and "(the process group's timeout): a peer process died, hung or closed" in message
    assert 2.5 < ranks[0]["mid/elapsed"] < 3 + 3, "the group was made with timeout=3 s, and no timeout= was given"
    assert ranks[0]["mid/unchanged"] and ranks[1]["mid/unchanged"], "pack=False: written only once all succeeded"


# --------------------------------------------------------------------------------------
# In this process (a group of one)
# --------------------------------------------------------------------------------------
def test_hybrid_step_refuses_a_negative_step_as_algorithms_hybrid_step_does(world_of_one: Any) -> None:
    swarm = Swarm.zeros(nn.Linear(2, 1), 2)
    x, y = torch.randn(4, 2), torch.randn(4, 1)
    with pytest.raises(ValueError, match=r"^hybrid_step: expected step >= 0, got -1$"):
        nd.hybrid_step(swarm, lambda net, x, y: F.mse_loss(net(x), y), x, y, step=-1, lr=0.1, every=2)


def test_hybrid_refuses_a_show_progress_that_is_no_flag(world_of_one: Any) -> None:
    swarm = Swarm.zeros(nn.Linear(2, 1), 2)
    with pytest.raises(TypeError, match=r"^hybrid: expected True, False or None as show_progress, got str$"):
        nd.hybrid(swarm, lambda net, x, y: F.mse_loss(net(x), y), [(torch.randn(4, 2), torch.randn(4, 1))], lr=0.1,
                  show_progress="yes")  # type: ignore[arg-type]
