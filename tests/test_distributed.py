"""``nytorch.distributed`` over real gloo process groups on localhost.

One launch of 4 processes runs every function on every kind of value (models with
every dtype, NytoModules with configs, Particles, Swarms with uneven and empty shards)
plus the invalid calls; the results are compared here with references computed in
this process from the same inputs (per-tensor loops): exact for broadcast, gather and
exchange, 1e-6 for means.  Two more launches of 3 processes kill or freeze one rank
and check that the other two raise ``PeerError`` within the timeout and exit.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import distributed_worker as w
import nytorch as nyto
import nytorch.algorithms as alg
from nytorch import distributed as nd
from nytorch import Swarm

Tensor = torch.Tensor
WORLD = 4
WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------
def start(scenario: str, world: int, outdir: Path, *extra: str) -> list[subprocess.Popen[bytes]]:
    """``world`` worker processes, each in its own session (so a whole group can be killed)."""
    init = f"file://{outdir / 'rendezvous'}"
    env = {**os.environ, "WORLD_SIZE": str(world), "INIT": init, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return [subprocess.Popen([sys.executable, str(WORKER), scenario, str(outdir), *extra],
                             env={**env, "RANK": str(rank)}, cwd=ROOT, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for rank in range(world)]


def kill(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGKILL every process group still running (never leave workers behind)."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


def finish(procs: list[subprocess.Popen[bytes]], deadline: float) -> list[tuple[int, str]]:
    """Wait until ``deadline`` (monotonic) for every process; returns ``(returncode, stderr)``."""
    try:
        results = []
        for proc in procs:
            _, err = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            results.append((proc.returncode, err.decode(errors="replace")))
        return results
    finally:
        kill(procs)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The ``functions`` scenario's results, one dict per rank."""
    outdir = tmp_path_factory.mktemp("functions")
    procs = start("functions", WORLD, outdir)
    results = finish(procs, time.monotonic() + 120)
    for rank, (code, err) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{err[-4000:]}"
    return [torch.load(outdir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


INPUTS = [w.make_inputs(rank) for rank in range(WORLD)]
LOSSES = [w.make_losses(rank) for rank in range(WORLD)]
KEYS = list(INPUTS[0])


# --------------------------------------------------------------------------------------
# References (plain torch)
# --------------------------------------------------------------------------------------
def assert_exact(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert torch.equal(got[name].view(torch.uint8) if got[name].dtype.itemsize == 1 else got[name],
                           want[name].view(torch.uint8) if want[name].dtype.itemsize == 1 else want[name]), name


def averaged(key: str, name: str, leaf: Tensor) -> bool:
    """Whether ``all_reduce_mean`` averages this leaf: floating/complex and operational."""
    operational = not (key == "deep" and name.startswith("block0."))
    if key.startswith("swarm") and name in INPUTS[0][key].buffers:
        return False  # a Swarm averages its buffers only when built with buffers=True, like its arithmetic
    return operational and (leaf.is_floating_point() or leaf.is_complex())


def reference_mean(key: str, rank: int) -> dict[str, Tensor]:
    states = [w.state_of(INPUTS[r][key]) for r in range(WORLD)]
    out = {}
    for name, leaf in states[rank].items():
        if not averaged(key, name, leaf):
            out[name] = leaf
            continue
        wide = torch.complex128 if leaf.is_complex() else torch.float64
        total = sum(state[name].to(wide) for state in states)
        out[name] = (total / WORLD).to(leaf.dtype)  # type: ignore[union-attr]
    return out


def assert_close(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert list(got) == list(want)
    for name in want:
        a, b = got[name], want[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if a.dtype in (torch.float32, torch.float64, torch.complex64, torch.complex128):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), (name, a, b)
        elif a.is_floating_point():  # half, bfloat16, float8: summed on the wire in their own precision
            eps = torch.finfo(a.dtype).eps * 8
            assert torch.allclose(a.float(), b.float(), rtol=eps, atol=eps), (name, a, b)
        else:
            assert torch.equal(a, b), name


# --------------------------------------------------------------------------------------
# Every function against the single-process result
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", KEYS)
def test_broadcast_equals_src_exactly(ranks: list[dict[str, Any]], key: str) -> None:
    src = 2 if key == "shard" else 1
    for rank in range(WORLD):
        assert_exact(ranks[rank][f"broadcast/{key}"], w.state_of(INPUTS[src][key]))
        if isinstance(INPUTS[rank][key], nn.Module):
            assert ranks[rank][f"broadcast/{key}/same"], "models are updated in place (same Parameters)"
        else:
            assert ranks[rank][f"broadcast/{key}/fresh"], "results share no storage with the input"
            assert_exact(ranks[rank][f"broadcast/{key}/input"], w.state_of(INPUTS[rank][key]))


@pytest.mark.parametrize("key", [key for key in KEYS if key != "shard"])
def test_all_reduce_mean_matches_mean_over_ranks(ranks: list[dict[str, Any]], key: str) -> None:
    for rank in range(WORLD):
        assert_close(ranks[rank][f"mean/{key}"], reference_mean(key, rank))
        if isinstance(INPUTS[rank][key], nn.Module):
            assert ranks[rank][f"mean/{key}/same"]
        else:
            assert_exact(ranks[rank][f"mean/{key}/input"], w.state_of(INPUTS[rank][key]))


@pytest.mark.parametrize("case", ["packed on one rank", "pack on one rank"])
def test_all_reduce_mean_pairs_groups_alike_whatever_each_rank_packed(ranks: list[dict[str, Any]],
                                                                     case: str) -> None:
    expected = 10.0 * (WORLD - 1) / 2
    for rank in range(WORLD):
        for name, value in ranks[rank][f"mixed packing/{case}"].items():
            assert torch.equal(value, torch.full_like(value, expected)), (rank, name, value)


@pytest.mark.parametrize("key", KEYS)
def test_all_gather_concatenates_in_rank_order(ranks: list[dict[str, Any]], key: str) -> None:
    states = [w.state_of(INPUTS[r][key]) for r in range(WORLD)]
    if isinstance(INPUTS[0][key], Swarm):
        want = {name: torch.cat([state[name] for state in states]) for name in states[0]}
        size = sum(len(INPUTS[r][key]) for r in range(WORLD))
    else:
        want = {name: torch.stack([state[name] for state in states]) for name in states[0]}
        size = WORLD
    for rank in range(WORLD):
        assert ranks[rank][f"gather/{key}/len"] == size
        assert_exact(ranks[rank][f"gather/{key}"], want)


@pytest.mark.parametrize("shift", [1, -2, WORLD])
@pytest.mark.parametrize("key", ["mixed", "odd", "particle", "shard", "swarm_bn"])
def test_exchange_receives_from_rank_minus_shift(ranks: list[dict[str, Any]], key: str, shift: int) -> None:
    for rank in range(WORLD):
        source = INPUTS[(rank - shift) % WORLD][key]
        assert_exact(ranks[rank][f"exchange{shift}/{key}"], w.state_of(source))
        assert ranks[rank][f"exchange{shift}/{key}/type"] == type(source).__name__
        assert_exact(ranks[rank][f"exchange{shift}/{key}/input"], w.state_of(INPUTS[rank][key]))


def _members(key: str, rank: int) -> list[tuple[float, int]]:
    loss = LOSSES[rank]["swarm" if key == "tie" else key] if key != "tie" else LOSSES[rank]["tie"]
    values = torch.as_tensor(loss, dtype=torch.float64).reshape(-1).tolist()
    return [(v, i) for i, v in enumerate(values)]


@pytest.mark.parametrize("key", ["swarm", "shard", "particle", "mixed", "tie"])
def test_best_is_the_global_argmin(ranks: list[dict[str, Any]], key: str) -> None:
    candidates = []
    for rank in range(WORLD):
        for value, index in _members(key, rank):
            candidates.append((float("inf") if value != value else value, rank, index, value))
    _, rank_, index, value = min(candidates)
    source = INPUTS[rank_]["swarm" if key == "tie" else key]
    member = source[index] if isinstance(source, Swarm) else source
    want = w.state_of(member)
    if key == "tie":
        assert (rank_, index) == (0, 0)
    for rank in range(WORLD):
        state, loss, where, kind = ranks[rank][f"best/{key}"]
        assert where == rank_
        assert_exact(state, want)
        assert float(loss) == pytest.approx(value)
        assert kind == ("Particle" if not isinstance(source, nn.Module) else type(source).__name__)


def test_every_function_works_on_a_subgroup(ranks: list[dict[str, Any]]) -> None:
    states = {r: w.state_of(INPUTS[r]["particle"]) for r in (1, 3)}
    for rank in (0, 2):
        assert "is not a member of the given group" in ranks[rank]["sub/outsider"]
    for rank, other in ((1, 3), (3, 1)):
        result = ranks[rank]
        assert_exact(result["sub/broadcast"], states[3])
        assert_close(result["sub/mean"], {k: (v + states[other][k]) / 2 for k, v in states[rank].items()})
        assert_exact(result["sub/gather"], {k: torch.stack([states[1][k], states[3][k]]) for k in states[1]})
        assert_exact(result["sub/exchange"], states[other])
        state, loss, where = result["sub/best"]
        assert where == 3 and loss == 0.0  # losses are 3 - rank: global rank 3 wins, reported globally
        assert_exact(state, states[3])


SUBGROUP_ERRORS = {  # over new_group([1, 3]): every message names global ranks 1 and 3, never group ranks 0 and 1
    "shape": r"^StructureError: all_reduce_mean: the structures differ across ranks \(found before any data "
             r"moved\): parameter 'weight' is shape \(2, 2\) float32 on rank 1 but shape \(3, 2\) float32 on rank 3$",
    "shift": r"^TypeError: exchange: expected an int as shift, got float \(on rank 3; every rank of the 2 raises "
             r"this error, and nothing was sent\)$",
    "src": r"^ValueError: broadcast: the ranks are not in the same collective call: rank 1 called broadcast\(src=1\), "
           r"rank 3 called broadcast\(src=3\)$",
    "kind": r"^StructureError: all_gather: rank 1 passed a model or Particle but rank 3 passed a Swarm; ",
    "sizes": r"^StructureError: all_reduce_mean: the swarms differ in size across ranks: 1 members on rank 1, 2 on "
             r"rank 3; ",
}


@pytest.mark.parametrize("label", sorted(SUBGROUP_ERRORS))
def test_errors_in_a_subgroup_name_global_ranks(ranks: list[dict[str, Any]], label: str) -> None:
    for rank in (1, 3):
        message = ranks[rank][f"sub/error/{label}"]
        assert re.search(SUBGROUP_ERRORS[label], message), message


def test_shard_then_all_gather_round_trips(ranks: list[dict[str, Any]]) -> None:
    whole = Swarm.normal(w._seeded(0, __import__("conftest").MLP), 7, generator=torch.Generator().manual_seed(1))
    assert [ranks[r]["shard/len"] for r in range(WORLD)] == [2, 2, 2, 1]
    for rank in range(WORLD):
        assert_exact(ranks[rank]["shard/roundtrip"], w.state_of(whole))


def replay_hybrid(sizes: list[int]) -> tuple[list[Swarm], list[Tensor]]:
    """The distributed hybrid loop (4 steps, every=2, subset=2, alpha=0.5) replayed in one process with
    per-tensor arithmetic: an empty shard takes no step; a shard smaller than subset pulls all its members."""
    shards, batches = w.hybrid_inputs(WORLD, sizes)
    generators = [torch.Generator().manual_seed(r) for r in range(WORLD)]
    histories: list[list[Tensor]] = [[] for _ in range(WORLD)]
    for step in range(4):
        losses = []
        for r in range(WORLD):
            if sizes[r]:
                shards[r], loss = alg.sgd_step(shards[r], w.hybrid_loss, *batches[r][step], lr=0.1)
            else:
                loss = torch.zeros(0)
            histories[r].append(loss)
            losses.append(loss)
        if (step + 1) % 2 == 0:
            winner = int(torch.cat(losses).argmin())
            rank_ = next(r for r in range(WORLD) if winner < sum(sizes[:r + 1]))
            index = winner - sum(sizes[:rank_])
            target = {name: leaf[index].clone() for name, leaf in shards[rank_].params.items()}
            for r in range(WORLD):
                count = min(2, sizes[r])
                if not count:
                    continue
                chosen = torch.randperm(sizes[r], generator=generators[r])[:count]
                params = {name: leaf.clone() for name, leaf in shards[r].params.items()}
                for name, leaf in params.items():
                    leaf[chosen] = 0.5 * leaf[chosen] + 0.5 * target[name]
                shards[r] = Swarm.from_params(shards[r], params)
    return shards, [torch.stack(history) for history in histories]


@pytest.mark.parametrize("label", sorted(w.HYBRID_SIZES))
def test_hybrid_matches_a_single_process_replay(ranks: list[dict[str, Any]], label: str) -> None:
    sizes = w.HYBRID_SIZES[label]
    shards, histories = replay_hybrid(sizes)
    for rank in range(WORLD):
        assert len(shards[rank]) == sizes[rank]
        assert_close(ranks[rank][f"hybrid/{label}/shard"], w.state_of(shards[rank]))
        history = ranks[rank][f"hybrid/{label}/history"]
        assert history.shape == (4, sizes[rank])
        assert torch.allclose(history, histories[rank], atol=1e-6)


# --------------------------------------------------------------------------------------
# Invalid calls: every rank raises, before any data moves
# --------------------------------------------------------------------------------------
MISMATCHES = {
    "shape": ("StructureError", r"structures differ across ranks \(found before any data moved\): "
                                r"parameter 'weight' is shape \(4, 3\) float32 on rank 0 "
                                r"but shape \(5, 3\) float32 on rank 3"),
    "missing": ("StructureError", r"parameter 'bias' is missing on rank 2"),
    "src": ("ValueError", r"rank 0 called broadcast\(src=0\), rank 1 called broadcast\(src=1\)"),
    "call": ("ValueError", r"rank 0 called all_reduce_mean, rank 1 called exchange\(shift=1\)"),
    "kind": ("StructureError", r"rank 0 passed a model or Particle but rank 1 passed a Swarm"),
    "sizes": ("StructureError", r"2 members on rank 0, 3 on rank 1"),
    "bad_src": ("ValueError", r"broadcast: expected a rank in \[0, 4\), got 7"),
    "config": ("StructureError", r"parameter 'layer1.weight' is averaged on rank 0 but carried unchanged on rank 1"),
    "meta_one": ("DeviceMismatchError", r"^all_reduce_mean: the structures differ across ranks \(found before "
                                        r"any data moved\): parameter '0.weight' is on cpu on rank 0 and on meta "
                                        r"on rank 1"),
    "meta_all": ("ValueError", r"^broadcast: parameter 'weight' is on the meta device, which holds no values to send"),
    "hybrid_every": ("ValueError", r"^hybrid: the ranks are not in the same collective call: rank 0 called "
                                   r"hybrid\(every=2\), rank 1 called hybrid\(every=3\), rank 2 called "
                                   r"hybrid\(every=2\), rank 3 called hybrid\(every=2\)$"),
}


@pytest.mark.parametrize("label", sorted(MISMATCHES))
def test_mismatch_raises_on_every_rank_before_data_moves(ranks: list[dict[str, Any]], label: str) -> None:
    kind, pattern = MISMATCHES[label]
    for rank in range(WORLD):
        error, message = ranks[rank][f"mismatch/{label}"]
        assert error == kind, (rank, message)
        assert re.search(pattern, message), (rank, message)
        assert ranks[rank][f"mismatch/{label}/data_calls"] == []
        if f"mismatch/{label}/unchanged" in ranks[rank]:
            assert ranks[rank][f"mismatch/{label}/unchanged"]
            assert ranks[rank][f"mismatch/{label}/storage"], "a model is packed only once the handshake passed"
    if label == "meta_one":
        assert all(f"mismatch/{label}/storage" in ranks[rank] for rank in (0, 2, 3))


BAD_ARGUMENTS = {
    "loss": (2, "ValueError", r"best: expected loss as a 1-D tensor of shape \(3,\), one per member of the swarm, "
                              r"got shape \(7,\)"),
    "type": (0, "TypeError", r"all_gather: expected an nn.Module, a Particle or a Swarm, got list"),
    "timeout": (0, "ValueError", r"all_reduce_mean: expected a positive, finite timeout, got 0"),
    "src_type": (1, "TypeError", r"broadcast: expected an int global rank as src, got str"),
    "shift_type": (2, "TypeError", r"exchange: expected an int as shift, got float"),
    "loss_type": (3, "TypeError", r"best: expected loss as a 1-D tensor of shape \(3,\), one per member of the "
                                  r"swarm, got str"),
    "scalar_loss": (1, "TypeError", r"best: expected loss as a number or a one-element tensor, got str"),
    "hybrid_subset": (1, "ValueError", r"hybrid: expected subset \(members pulled per shard\) >= 0, got -1"),
    "hybrid_step_alpha": (2, "TypeError", r"hybrid_step: expected a real number as alpha, got str"),
    "inference": (1, "RuntimeError", r"all_reduce_mean: expected tensors that can be updated in place, got parameter "
                                     r"'weight', an inference tensor \(made under torch.inference_mode\(\)\); build "
                                     r"the model outside inference mode, or pass copy.deepcopy\(model\) \(its copies "
                                     r"are normal tensors\)"),
    "inference_broadcast": (1, "RuntimeError", r"broadcast: expected tensors that can be updated in place, got "
                                               r"parameter 'weight', an inference tensor .*"),
    "sparse": (3, "TypeError", r"all_reduce_mean: expected dense \(strided\) tensors, got parameter 'weight' with "
                               r"layout torch.sparse_coo; make it dense first \(e.g. tensor.to_dense\(\)\)"),
}


@pytest.mark.parametrize("label", sorted(BAD_ARGUMENTS))
def test_a_bad_argument_on_one_rank_raises_the_same_error_on_every_rank(ranks: list[dict[str, Any]],
                                                                        label: str) -> None:
    culprit, kind, pattern = BAD_ARGUMENTS[label]
    where = rf" \(on rank {culprit}; every rank of the {WORLD} raises this error, and nothing was sent\)$"
    errors = {ranks[rank][f"mismatch/{label}"] for rank in range(WORLD)}
    assert len(errors) == 1, errors  # the same class and message everywhere
    error, message = errors.pop()
    assert error == kind and re.search("^" + pattern + where, message), message
    for rank in range(WORLD):
        assert ranks[rank][f"mismatch/{label}/data_calls"] == []
        if f"mismatch/{label}/unchanged" in ranks[rank]:
            assert ranks[rank][f"mismatch/{label}/unchanged"] and ranks[rank][f"mismatch/{label}/storage"]


def test_after_a_bad_argument_the_next_calls_pair_up(ranks: list[dict[str, Any]]) -> None:
    """Every rank raised in the bad call, so the next all_reduce_mean averages the next models: 100 + rank."""
    for rank in range(WORLD):
        assert ranks[rank]["mismatch/paired"] == pytest.approx(100 + (WORLD - 1) / 2)


def test_a_huge_timeout_on_some_ranks_is_capped_and_the_call_averages(ranks: list[dict[str, Any]]) -> None:
    """timeout=1e15 on rank 0 and timedelta.max on rank 1 (others 30): no error, the mean of 50 + rank."""
    for rank in range(WORLD):
        assert ranks[rank]["mismatch/huge_timeout"] == pytest.approx(50 + (WORLD - 1) / 2)


def test_the_group_stays_usable_after_mismatches(ranks: list[dict[str, Any]]) -> None:
    for rank in range(WORLD):
        assert ranks[rank]["mismatch/healthy"] == ("no error", "")


# --------------------------------------------------------------------------------------
# Faults: a peer dies or hangs
# --------------------------------------------------------------------------------------
def _wait_ready(outdir: Path, world: int, procs: list[subprocess.Popen[bytes]], limit: float) -> None:
    deadline = time.monotonic() + limit
    while not all((outdir / f"ready{r}").exists() for r in range(world)):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            kill(procs)
            pytest.fail("workers did not start: " + " | ".join(
                (p.stderr.read().decode(errors="replace")[-2000:] if p.stderr else "") for p in procs))
        time.sleep(0.05)


@pytest.mark.parametrize("mode, timeout", [("kill", 20.0), ("hang", 3.0)])
def test_survivors_raise_peer_error_in_bounded_time(tmp_path: Path, mode: str, timeout: float) -> None:
    procs = start(mode, 3, tmp_path, str(timeout))
    try:
        _wait_ready(tmp_path, 3, procs, 60)
        failed_at = time.monotonic()
        if mode == "kill":
            os.killpg(procs[2].pid, signal.SIGKILL)
        results = finish(procs[:2], failed_at + timeout + 15)
    finally:
        kill(procs)
    exited = time.monotonic() - failed_at
    assert exited < timeout + 15
    for rank, (code, err) in enumerate(results):
        assert code != 0 and "PeerError" in err, err[-3000:]
        record = json.loads((tmp_path / f"error{rank}.json").read_text())
        assert record["error"] == "PeerError"
        assert "a peer process died, hung or closed its connection" in record["message"]
        assert record["elapsed"] < timeout + 2.0, record
        assert record["unchanged"], "a model is written only after every transfer succeeded"
        if mode == "kill":
            assert record["elapsed"] < timeout / 2, "a dead peer is noticed at once, not at the timeout"


@pytest.mark.parametrize("fn", ["all_reduce_mean", "broadcast"])
def test_an_unpacked_model_keeps_its_values_when_a_peer_dies_mid_call(tmp_path: Path, fn: str) -> None:
    """``pack=False``: the model is written only once every transfer succeeded, one-leaf groups included."""
    procs = start("handshake", 2, tmp_path, fn)
    try:
        finish(procs, time.monotonic() + 60)
    finally:
        kill(procs)
    record = json.loads((tmp_path / "handshake0.json").read_text())
    assert record["unchanged"], "a model called with pack=False is written only after every transfer"


# --------------------------------------------------------------------------------------
# In-process checks (no group needed)
# --------------------------------------------------------------------------------------
def test_without_a_process_group_the_error_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match=r"broadcast: torch.distributed is not initialised"):
        nd.broadcast(nn.Linear(2, 1), 0)


@pytest.mark.parametrize("timeout, error, pattern", [
    (0, ValueError, r"all_reduce_mean: expected a positive, finite timeout, got 0"),
    (-1.5, ValueError, r"positive, finite timeout"),
    ("10", TypeError, r"all_reduce_mean: expected timeout as seconds \(a number\), a datetime.timedelta or None, "
                      r"got str"),
])
def test_bad_timeouts_are_rejected(timeout: Any, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        nd.all_reduce_mean(nyto.particle(nn.Linear(2, 1)), timeout=timeout)


@pytest.mark.parametrize("piece_bytes", [8, 64, 1 << 30])
@pytest.mark.parametrize("make", [w.Odd, lambda: __import__("conftest").Mixed(),
                                  lambda: nn.Sequential(*(nn.Linear(9, 9) for _ in range(5)))])
def test_pieces_cover_every_buffer_whole_leaves_in_order(monkeypatch: pytest.MonkeyPatch, piece_bytes: int,
                                                        make: Any) -> None:
    from nytorch.distributed import _flat
    monkeypatch.setattr(_flat, "PIECE_BYTES", piece_bytes)
    flat = _flat.flat_of("test", make())
    pieces = flat.pieces()
    widths = flat.widths()
    for g in range(len(flat.groups)):
        mine = [piece for piece in pieces if piece.group == g]
        assert 1 <= len(mine) <= _flat.MAX_PIECES
        assert mine[0].start == 0 and mine[-1].stop == widths[g]
        assert all(a.stop == b.start for a, b in zip(mine, mine[1:]))
        slots = [i for piece in mine for i in piece.slots]
        assert slots == [i for i, slot in enumerate(flat.slots) if slot.group == g]
        for piece in mine:
            if piece.slots:
                assert flat.slots[piece.slots[0]].start == piece.start
                assert flat.slots[piece.slots[-1]].stop == piece.stop
    packed = flat.flats()
    for name, view in zip(flat.names, flat.views(_flat.whole(packed))):
        assert torch.equal(view[0], w.state_of(flat.source)[name])


def test_a_flattened_model_is_its_own_buffer() -> None:
    import conftest as c
    from nytorch.distributed import _flat
    net = nyto.flatten_(c.Mixed())
    flat = _flat.flat_of("test", net)
    owned = {str(flat.groups[g].dtype): flat.own(g) for g in range(len(flat.groups))}
    assert all(owned[dtype] is not None for dtype in ("torch.float32", "torch.float64", "torch.complex64"))
    assert owned["torch.float32"].data_ptr() == net.w32.data_ptr()  # then `frozen`, then the buffer `stat`
    assert net.get_buffer("stat").data_ptr() == net.frozen.data_ptr() + 2 * 4
    assert owned["torch.float64"].data_ptr() == net.get_parameter("w64").data_ptr()
    plain = _flat.flat_of("test", c.Mixed())
    assert plain.own(next(g for g, group in enumerate(plain.groups) if group.dtype == torch.float32)) is None
    assert _flat.flat_of("test", nyto.particle(nyto.flatten_(c.MLP()))).own(0) is None  # only models


def test_peer_error_is_a_runtime_error() -> None:
    assert issubclass(nd.PeerError, RuntimeError)
    assert set(nd.__all__) == {"broadcast", "all_reduce_mean", "all_gather", "best", "exchange", "shard",
                               "hybrid_step", "hybrid", "PeerError"}


def test_in_place_collectives_pack_a_model_unless_told_not_to() -> None:
    import torch.distributed as dist
    from torch import nn
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        packed, plain = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)), nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
        before = [p.detach().clone() for p in packed.parameters()]
        pointers = [p.data_ptr() for p in plain.parameters()]
        assert nd.all_reduce_mean(packed, timeout=30) is packed
        nd.all_reduce_mean(plain, timeout=30, pack=False)
        nd.broadcast(plain, 0, timeout=30, pack=False)
        weights = list(packed.parameters())
        assert all(b.data_ptr() == a.data_ptr() + a.numel() * 4 for a, b in zip(weights, weights[1:]))
        assert all(torch.equal(a, b) for a, b in zip(before, packed.parameters()))  # the mean over one rank
        assert [p.data_ptr() for p in plain.parameters()] == pointers
    finally:
        dist.destroy_process_group()


def test_in_place_collectives_are_seen_by_autograd() -> None:
    """A graph that saved a parameter raises after all_reduce_mean wrote it in place, as torch's own ops do."""
    import torch.distributed as dist
    from torch import nn
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
        nd.all_reduce_mean(model, timeout=30)  # packs it: the collective then writes its buffer directly
        loss = model[1](torch.randn(4, 3, requires_grad=True)).sum()  # saves the last weight
        version = model[1].weight._version
        nd.all_reduce_mean(model, timeout=30)
        assert model[1].weight._version > version
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("make", ["float32", "float64", "int64", "float16"])
def test_best_takes_numpy_scalars_as_numbers(world_of_one: Any, make: str) -> None:
    import numpy as np
    net = nn.Linear(2, 1)
    member, loss, rank = nd.best(net, getattr(np, make)(1.5 if "float" in make else 3), timeout=30)
    assert loss.dtype == torch.float64 and float(loss) == (1.5 if "float" in make else 3.0) and rank == 0
    assert torch.equal(member.weight, net.weight)


@pytest.mark.parametrize("x, loss, error, pattern", [
    ("model", "abc", TypeError, r"^best: expected loss as a number or a one-element tensor, got str$"),
    ("model", None, TypeError, r"^best: expected loss as a number or a one-element tensor, got NoneType$"),
    ("model", True, TypeError, r"^best: expected loss as a number or a one-element tensor, got bool$"),
    ("model", 1j, TypeError, r"^best: expected loss as a number or a one-element tensor, got complex$"),
    ("model", "ones2", ValueError, r"^best: expected loss as a number or a one-element tensor, got a tensor of "
                                   r"shape \(2,\)$"),
    ("swarm", "x", TypeError, r"^best: expected loss as a 1-D tensor of shape \(3,\), one per member of the swarm, "
                              r"got str$"),
    ("swarm", 0.5, TypeError, r"got float$"),
    ("swarm", "ones2", ValueError, r"^best: expected loss as a 1-D tensor of shape \(3,\), one per member of the "
                                   r"swarm, got shape \(2,\)$"),
])
def test_best_rejects_a_wrong_type_with_type_error_and_a_wrong_shape_with_value_error(
        world_of_one: Any, x: str, loss: Any, error: type, pattern: str) -> None:
    value = nn.Linear(2, 1) if x == "model" else Swarm.zeros(nn.Linear(2, 1), 3)
    with pytest.raises(error, match=pattern):
        nd.best(value, torch.ones(2) if isinstance(loss, str) and loss == "ones2" else loss, timeout=30)


@pytest.mark.parametrize("fn", ["broadcast", "all_reduce_mean", "all_gather", "exchange", "best"])
def test_a_meta_model_raises_a_clear_error(world_of_one: Any, fn: str) -> None:
    net = nn.Linear(2, 3).to("meta")
    args = {"broadcast": (0,), "best": (1.0,)}.get(fn, ())
    with pytest.raises(ValueError, match=rf"^{fn}: parameter 'weight' is on the meta device, which holds no values "
                                         r"to send; materialise the model first"):
        getattr(nd, fn)(net, *args, timeout=30)


@pytest.mark.parametrize("fn", ["broadcast", "all_reduce_mean"])
def test_a_call_that_raises_does_not_pack_the_model(world_of_one: Any, fn: str) -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    pointers = [p.data_ptr() for p in net.parameters()]
    args = (0,) if fn == "broadcast" else ()
    with pytest.raises(ValueError, match=rf"^{fn}: expected a positive, finite timeout, got -1$"):
        getattr(nd, fn)(net, *args, timeout=-1)
    assert [p.data_ptr() for p in net.parameters()] == pointers
    getattr(nd, fn)(net, *args, timeout=30)  # packed once the handshake passed
    weights = list(net.parameters())
    assert all(b.data_ptr() == a.data_ptr() + a.numel() * 4 for a, b in zip(weights, weights[1:]))


@pytest.mark.parametrize("timeout", [1e15, 1e300, datetime.timedelta.max, datetime.timedelta(days=40000)])
def test_huge_timeouts_are_capped_to_the_longest_representable_wait(world_of_one: Any, timeout: Any) -> None:
    from nytorch.distributed._comm import MAX_SECONDS, seconds_of
    assert MAX_SECONDS == 1e9 and seconds_of("f", timeout) == MAX_SECONDS
    assert seconds_of("f", datetime.timedelta(days=1)) == 86400.0  # shorter ones are kept
    net = nn.Linear(2, 1)
    weight = net.weight.detach().clone()
    assert nd.all_reduce_mean(net, timeout=timeout) is net and torch.equal(net.weight, weight)
    assert nd.broadcast(net, 0, timeout=timeout) is net


@pytest.mark.parametrize("fn", ["broadcast", "all_reduce_mean"])
def test_an_inference_model_raises_before_it_is_packed(world_of_one: Any, fn: str) -> None:
    with torch.inference_mode():
        net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    pointers = [p.data_ptr() for p in net.parameters()]
    args = (0,) if fn == "broadcast" else ()
    with pytest.raises(RuntimeError, match=rf"^{fn}: expected tensors that can be updated in place, got parameter "
                                           r"'0.weight', an inference tensor \(made under torch.inference_mode"):
        getattr(nd, fn)(net, *args, timeout=30)
    assert [p.data_ptr() for p in net.parameters()] == pointers
    with torch.inference_mode():  # inside inference mode it may be written
        assert getattr(nd, fn)(net, *args, timeout=30) is net
    copy = __import__("copy").deepcopy(net)  # the hint: its copies are normal tensors
    assert getattr(nd, fn)(copy, *args, timeout=30) is copy
    particle = nd.all_reduce_mean(nyto.particle(net, pack=False), timeout=30)  # values, not in place: fine
    assert torch.equal(particle.params["1.bias"], net[1].bias)


@pytest.mark.parametrize("fn", ["broadcast", "all_reduce_mean"])
def test_a_call_inside_inference_mode_leaves_no_scratch_that_later_calls_cannot_write(world_of_one: Any,
                                                                                     fn: str) -> None:
    """The reused scratch buffer was made under inference mode and kept: the next call outside failed."""
    from nytorch.distributed import _flat as dflat
    dflat._SCRATCH.clear()
    args = (0,) if fn == "broadcast" else ()
    with torch.inference_mode():
        inside = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
        getattr(nd, fn)(inside, *args, timeout=30, pack=False)
    outside = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    values = [p.detach().clone() for p in outside.parameters()]
    assert getattr(nd, fn)(outside, *args, timeout=30, pack=False) is outside
    assert all(torch.equal(p, v) for p, v in zip(outside.parameters(), values))  # a world of one: unchanged


@pytest.mark.parametrize("fn", ["broadcast", "all_reduce_mean", "all_gather", "exchange", "best"])
def test_a_sparse_parameter_raises_type_error(world_of_one: Any, fn: str) -> None:
    net = nn.Linear(2, 3)
    net.weight = nn.Parameter(net.weight.detach().to_sparse())
    args = {"broadcast": (0,), "best": (1.0,)}.get(fn, ())
    with pytest.raises(TypeError, match=rf"^{fn}: expected dense \(strided\) tensors, got parameter 'weight' with "
                                        r"layout torch.sparse_coo; make it dense first"):
        getattr(nd, fn)(net, *args, timeout=30)


def test_first_difference_names_a_device_type_as_a_device_mismatch() -> None:
    from nytorch import DeviceMismatchError, StructureError
    from nytorch.distributed._fingerprint import first_difference
    entry = ["fc.weight", [2, 3], "float32", True, 0, "cpu"]
    error = first_difference("all_reduce_mean", [entry], [entry[:5] + ["meta"]], 0, 2)
    assert type(error) is DeviceMismatchError and isinstance(error, StructureError)
    assert str(error) == ("all_reduce_mean: the structures differ across ranks (found before any data moved): "
                          "parameter 'fc.weight' is on cpu on rank 0 and on meta on rank 2; move the models to one "
                          "kind of device first")
    shape = first_difference("x", [entry], [["fc.weight", [2, 4], "float32", True, 0, "meta"]], 0, 1)
    assert type(shape) is StructureError and "shape (2, 3) float32 on rank 0 but shape (2, 4)" in str(shape)


@pytest.mark.parametrize("timeout", [np.int64(30), np.float32(30.5), torch.tensor(30.0)])
def test_numpy_and_tensor_timeouts_are_numbers(world_of_one: Any, timeout: Any) -> None:
    net = nn.Linear(2, 1)
    assert nd.all_reduce_mean(net, timeout=timeout) is net


def test_a_group_that_is_not_a_process_group_is_named(world_of_one: Any) -> None:
    with pytest.raises(TypeError, match=r"^all_reduce_mean: expected a process group \(from "
                                        r"torch\.distributed\.new_group\) or None as group, got list$"):
        nd.all_reduce_mean(nn.Linear(2, 1), group=[0, 1])
