"""``nytorch.algorithms``: each step checked against a per-member loop over plain tensors, plus invariants."""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nytorch
import nytorch.algorithms as alg
from nytorch._swarm import Swarm

Tensor = torch.Tensor
ATOL = 1e-6
RTOL = 1e-6  # float32 results vs the per-member loop: 1e-6


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def population(size: int = 6, seed: int = 0) -> Swarm:
    return Swarm.randn(net(), size, generator=torch.Generator().manual_seed(seed))


def per_member(swarm: Swarm) -> list[dict[str, Tensor]]:
    """The swarm as a list of plain dicts (cloned): the loop reference's input."""
    return [{name: value[i].clone() for name, value in swarm.params.items()} for i in range(len(swarm))]


def assert_members(swarm: Swarm, expected: list[dict[str, Tensor]], *, exact: bool = False) -> None:
    assert len(swarm) == len(expected)
    for name, value in swarm.params.items():
        reference = torch.stack([member[name] for member in expected])
        if exact:
            assert torch.equal(value, reference), name
        else:
            torch.testing.assert_close(value, reference, rtol=RTOL, atol=ATOL, msg=name)


def quadratic(swarm: Swarm) -> Tensor:
    """Per-member sum of squares: a convex bowl with its minimum at zero."""
    return sum(value.pow(2).flatten(1).sum(1) for value in swarm.params.values())  # type: ignore[return-value]


# -- accelerated PSO --------------------------------------------------------------------------------
def test_apso_matches_loop_and_noise() -> None:
    swarm = population()
    members = per_member(swarm)
    alpha, beta, best = 0.3, 0.25, 2
    out = alg.apso(swarm, best, alpha=alpha, beta=beta, generator=torch.Generator().manual_seed(5))
    noise = per_member(Swarm.randn(swarm, generator=torch.Generator().manual_seed(5)))
    expected = [{n: (1 - beta) * m[n] + beta * members[best][n] + alpha * noise[i][n] for n in m}
                for i, m in enumerate(members)]
    assert_members(out, expected)
    assert_members(swarm, members, exact=True)  # pure
    target = nytorch.particle(net())
    to_model = alg.apso(swarm, target, alpha=0.0, beta=0.5)
    assert_members(to_model, [{n: 0.5 * m[n] + 0.5 * target.params[n] for n in m} for m in members])
    assert_members(alg.apso(swarm, -1, alpha=0.0, beta=1.0), [members[-1]] * len(members), exact=True)


def test_apso_zero_coefficients_leave_the_swarm_unchanged() -> None:
    swarm = population()
    assert_members(alg.apso(swarm, 0, alpha=0.0, beta=0.0), per_member(swarm), exact=True)


def test_apso_allocates_only_its_output() -> None:
    from torch.profiler import ProfilerActivity, profile
    swarm = Swarm.stack([nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3)) for _ in range(16)])
    alg.apso(swarm, 3, alpha=0.1, beta=0.5)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = alg.apso(swarm, 3, alpha=0.1, beta=0.5)
    allocated = sum(event.cpu_memory_usage for event in prof.events()
                    if event.cpu_memory_usage > 0 and event.cpu_parent is None)
    output = sum(value.numel() * value.element_size() for value in out.params.values())
    assert output <= allocated <= output + 256


def bits(value: Tensor) -> Tensor:
    """The raw bits of a float32 tensor: equal bits mean the same value, NaN payloads and -0.0 included."""
    assert value.dtype == torch.float32
    return value.contiguous().view(torch.int32)


def assert_bits(swarm: Swarm, expected: list[dict[str, Tensor]]) -> None:
    """``swarm``'s members hold exactly ``expected``'s values, bit for bit."""
    assert len(swarm) == len(expected)
    for name, value in swarm.params.items():
        assert torch.equal(bits(value), bits(torch.stack([member[name] for member in expected]))), name


def diverged(size: int = 6) -> Swarm:
    """A population where member 2 diverged to +inf, member 4 holds a NaN and member 0 a -0.0."""
    swarm = population(size)
    swarm[2] = float("inf")
    swarm.params["2.bias"][4, 1] = float("nan")
    swarm.params["0.weight"][0, 1, 2] = -0.0
    return swarm


def test_apso_zero_coefficients_drop_their_terms_whatever_the_best_holds() -> None:
    swarm = diverged()
    members = per_member(swarm)
    for best in (2, 4, 0, nytorch.particle(net()) * float("inf")):  # inf, NaN, finite member; an inf model
        assert_bits(alg.apso(swarm, best, alpha=0.0, beta=0.0), members)  # not 0 · inf = NaN
    assert_bits(swarm, members)  # pure
    # alpha > 0, beta = 0: the noise is added to each member, the best (+inf) plays no part
    out = alg.apso(swarm, 2, alpha=0.5, beta=0.0, generator=torch.Generator().manual_seed(3))
    noise = per_member(Swarm.randn(swarm, generator=torch.Generator().manual_seed(3)))
    assert_bits(out, [{n: 0.5 * noise[i][n] + m[n] for n in m} for i, m in enumerate(members)])
    assert not out.params["0.weight"][[0, 1, 3, 5]].isnan().any()


def test_apso_beta_one_copies_the_best_exactly() -> None:
    swarm = diverged()
    members = per_member(swarm)
    # the diverged members (2: inf, 4: NaN) become the best too, and its -0.0 stays -0.0
    copied = alg.apso(swarm, 0, alpha=0.0, beta=1.0)
    assert_bits(copied, [members[0]] * 6)
    assert torch.signbit(copied.params["0.weight"][:, 1, 2]).all()
    assert_bits(alg.apso(swarm, 2, alpha=0.0, beta=1.0), [members[2]] * 6)  # an inf best: inf everywhere
    assert_bits(alg.apso(swarm, 4, alpha=0.0, beta=1.0), [members[4]] * 6)  # its NaN copied, not made
    target = nytorch.particle(net())
    assert_bits(alg.apso(swarm, target, alpha=0.0, beta=1.0), [dict(target.params)] * 6)
    # with noise: best + alpha · noise, no (1 - 1) · inf = NaN from the diverged members
    out = alg.apso(swarm, 0, alpha=0.25, beta=1.0, generator=torch.Generator().manual_seed(4))
    noise = per_member(Swarm.randn(swarm, generator=torch.Generator().manual_seed(4)))
    assert_bits(out, [{n: 0.25 * noise[i][n] + members[0][n] for n in members[0]} for i in range(6)])
    assert not any(value.isnan().any() for value in out.params.values())
    assert_bits(swarm, members)  # pure


def test_apso_keeps_other_leaves_and_checks_the_best_even_when_unused() -> None:
    from conftest import MLP
    model = MLP()
    model.set_param_config(operational=False, name="layer0.bias")  # frozen: carried, never mixed
    swarm = Swarm.randn(model, 4, generator=torch.Generator().manual_seed(0))
    swarm.params["layer0.bias"].copy_(torch.randn(swarm.params["layer0.bias"].shape))  # members differ
    for beta in (0.0, 1.0, 0.5):
        out = alg.apso(swarm, 1, alpha=0.0, beta=beta)
        assert torch.equal(out.params["layer0.bias"], swarm.params["layer0.bias"]), beta
        expected = torch.lerp(swarm.params["layer1.weight"], swarm.params["layer1.weight"][1:2], beta)
        torch.testing.assert_close(out.params["layer1.weight"], expected, rtol=RTOL, atol=ATOL)
    for beta in (0.0, 1.0, 0.5):  # a wrong best is refused by name, even where beta = 0 ignores it
        with pytest.raises(nytorch.StructureError, match=r"^apso: best: parameter 'layer0.weight' differs"):
            alg.apso(swarm, MLP(in_feat=5), alpha=0.0, beta=beta)
        with pytest.raises(TypeError, match=r"^apso: best: expected a MLP \(or a Particle or Swarm of one\), "
                                            r"got a Tanh"):
            alg.apso(swarm, nn.Tanh(), alpha=0.1, beta=beta)


def test_apso_argument_errors() -> None:
    swarm = population()
    with pytest.raises(ValueError, match=r"apso: expected alpha >= 0, got -1.0"):
        alg.apso(swarm, 0, alpha=-1.0, beta=0.5)
    with pytest.raises(IndexError, match=r"apso: best=6 is out of range for a swarm of 6 members"):
        alg.apso(swarm, 6, alpha=0.1, beta=0.5)
    with pytest.raises(TypeError, match=r"apso: expected a Swarm as swarm, got Linear"):
        alg.apso(nn.Linear(1, 1), 0, alpha=0.1, beta=0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"apso: expected a real number as beta, got str"):
        alg.apso(swarm, 0, alpha=0.1, beta="x")  # type: ignore[arg-type]


# -- PSO -----------------------------------------------------------------------------------------------
def test_pso_zero_coefficients_leave_the_swarm_unchanged() -> None:
    swarm = population()
    losses = quadratic(swarm)
    state = alg.pso_init(swarm, losses)
    moved, state = alg.pso_step(swarm, losses, state, inertia=0.0, cognitive=0.0, social=0.0)
    assert_members(moved, per_member(swarm), exact=True)
    moved, _ = alg.pso_step(moved, quadratic(moved), state, inertia=0.9, cognitive=0.0, social=0.0)
    assert_members(moved, per_member(swarm), exact=True)  # zero velocity stays zero


def test_pso_zero_coefficients_hold_infinite_values_and_nan_bests_are_beaten() -> None:
    swarm = population()
    swarm.params["0.weight"][1, 0, 0] = float("inf")  # a diverged member
    losses = quadratic(swarm)
    losses[2] = float("nan")
    state = alg.pso_init(swarm, losses)
    moved, state = alg.pso_step(swarm, losses, state, inertia=0.0, cognitive=0.0, social=0.0)
    assert_members(moved, per_member(swarm), exact=True)  # no 0 * (inf - inf) = NaN
    assert not moved.params["0.weight"].isnan().any()
    new_losses = quadratic(moved)
    new_losses[2] = 1.0
    _, state = alg.pso_step(moved, new_losses, state, inertia=0.0, cognitive=0.0, social=0.0)
    assert state.best_loss[2].item() == 1.0  # a NaN personal best is beaten by any number


def test_pso_step_matches_loop() -> None:
    swarm = population()
    state = alg.pso_init(swarm, quadratic(swarm))
    moved, state = alg.pso_step(swarm, quadratic(swarm), state, generator=torch.Generator().manual_seed(1))
    # second step, checked member by member against plain tensors
    x, v, best = per_member(moved), per_member(state.velocity), per_member(state.best)
    losses = quadratic(moved)
    improved = (losses < state.best_loss).tolist()
    best = [x[i] if improved[i] else best[i] for i in range(len(x))]
    best_loss = torch.where(losses < state.best_loss, losses, state.best_loss)
    g = best[int(best_loss.argmin())]
    generator = torch.Generator().manual_seed(2)
    r1, r2 = per_member(Swarm.rand(moved, generator=generator)), per_member(Swarm.rand(moved, generator=generator))
    w, c1, c2 = 0.5, 1.2, 0.8
    velocity = [{n: w * v[i][n] + c1 * r1[i][n] * (best[i][n] - x[i][n]) + c2 * r2[i][n] * (g[n] - x[i][n])
                 for n in x[i]} for i in range(len(x))]
    new, new_state = alg.pso_step(moved, losses, state, inertia=w, cognitive=c1, social=c2,
                                  generator=torch.Generator().manual_seed(2))
    assert_members(new_state.velocity, velocity)
    assert_members(new, [{n: x[i][n] + velocity[i][n] for n in x[i]} for i in range(len(x))])
    assert_members(new_state.best, best, exact=True)
    assert torch.equal(new_state.best_loss, best_loss)


def test_pso_minimises_a_quadratic() -> None:
    swarm = population(16)
    generator = torch.Generator().manual_seed(0)
    state = alg.pso_init(swarm, quadratic(swarm))
    start = float(state.best_loss.min())
    for _ in range(40):
        swarm, state = alg.pso_step(swarm, quadratic(swarm), state, generator=generator)
    assert float(state.best_loss.min()) < 0.2 * start


def test_pso_errors() -> None:
    swarm = population()
    with pytest.raises(ValueError, match=r"pso_init: expected losses of shape \(6,\) \(one per member\), got \(5,\)"):
        alg.pso_init(swarm, torch.zeros(5))
    state = alg.pso_init(swarm, torch.zeros(6))
    with pytest.raises(ValueError, match=r"pso_step: the state tracks 6 members but the swarm has 3"):
        alg.pso_step(swarm[:3], torch.zeros(3), state)
    with pytest.raises(TypeError, match=r"pso_step: expected a PSOState as state"):
        alg.pso_step(swarm, torch.zeros(6), (1, 2, 3))  # type: ignore[arg-type]
    other = alg.pso_init(Swarm.stack([nn.Linear(4, 2) for _ in range(6)]), torch.zeros(6))
    with pytest.raises(TypeError, match=r"^pso_step: state.best: expected a Sequential \(or a Particle or Swarm of one\), "
                                        r"got a Linear"):
        alg.pso_step(swarm, torch.zeros(6), other)
    wider = alg.pso_init(Swarm.stack([nn.Sequential(*[nn.Linear(5, 5)] * 3) for _ in range(6)]), torch.zeros(6))
    with pytest.raises(nytorch.StructureError, match=r"^pso_step: state.best: parameter '0.weight'"):
        alg.pso_step(swarm, torch.zeros(6), wider)


def test_selections_of_an_empty_swarm_are_empty() -> None:
    empty = population()[:0]
    assert len(alg.pull_toward_best(empty, torch.zeros(0), subset=1, alpha=0.5)) == 0
    assert len(alg.truncation_selection(empty, torch.zeros(0), survivors=1, sigma=0.1)) == 0
    with pytest.raises(ValueError, match=r"^pull_toward_best: expected subset in \[1, 1\], got 0"):
        alg.pull_toward_best(empty, torch.zeros(0), subset=0, alpha=0.5)


def test_steps_on_an_empty_swarm_do_nothing() -> None:
    # an empty shard on some rank of a distributed loop: empty results, the same argument checks
    empty = population()[:0]
    x, y = _regression()
    none = torch.zeros(0)

    def is_empty(swarm: Swarm) -> bool:
        return {n: tuple(v.shape) for n, v in swarm.params.items()} == {
            n: (0, *v.shape[1:]) for n, v in population().params.items()}

    new, losses = alg.sgd_step(empty, _mse, x, y, lr=0.1)
    assert is_empty(new) and losses.shape == (0,) and losses.dtype == torch.float32
    for step in (0, 1):  # a plain step and a pulling one
        new, losses = alg.hybrid_step(empty, _mse, x, y, step=step, lr=0.1, every=2)
        assert is_empty(new) and losses.shape == (0,)
    new, history = alg.hybrid(empty, _mse, [(x, y)] * 3, lr=0.1, every=2, show_progress=True)
    assert is_empty(new) and history.shape == (3, 0)
    state = alg.pso_init(empty, none)
    new, state = alg.pso_step(empty, none, state, generator=torch.Generator().manual_seed(0))
    assert is_empty(new) and is_empty(state.velocity) and is_empty(state.best) and state.best_loss.shape == (0,)
    with pytest.raises(TypeError, match=r"^pso_step: expected a real number as inertia, got str"):
        alg.pso_step(empty, none, state, inertia="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^sgd_step: expected a real number as lr, got str"):
        alg.sgd_step(empty, _mse, x, y, lr="x")  # type: ignore[arg-type]


def test_integer_and_bool_losses_are_taken_as_floats() -> None:
    noise = alg.es_noise(net(), 4, generator=torch.Generator().manual_seed(0))
    eps = per_member(noise)
    ints = torch.tensor([1, 2, 3, 7])
    grad = alg.es_gradient(noise, ints, sigma=0.1)
    for name in eps[0]:  # the formula, in float arithmetic
        expected = sum((float(ints[i]) - 3.25) * eps[i][name] for i in range(4)) / (4 * 0.1)
        torch.testing.assert_close(grad.params[name], expected, rtol=RTOL, atol=ATOL)
    center = nytorch.particle(net())
    stepped = alg.es_step(center, noise, ints, sigma=0.1, lr=0.5)
    for name, value in center.params.items():
        torch.testing.assert_close(stepped.params[name], value - 0.5 * grad.params[name], rtol=RTOL, atol=ATOL)
    flags = torch.tensor([True, False, False, True])
    torch.testing.assert_close(alg.es_gradient(noise, flags, sigma=0.1).params["0.bias"],
                               alg.es_gradient(noise, flags.float(), sigma=0.1).params["0.bias"])
    ranks = alg.centered_ranks(torch.tensor([30, -2, 5]))
    assert ranks.dtype == torch.get_default_dtype() and ranks.tolist() == [0.5, -0.5, 0.0]
    assert alg.centered_ranks(torch.tensor([1.0, 0.0], dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(TypeError, match=r"^centered_ranks: expected real losses, got torch.complex64"):
        alg.centered_ranks(torch.ones(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"^es_gradient: expected real losses, got torch.complex64"):
        alg.es_gradient(noise, torch.ones(4, dtype=torch.complex64), sigma=0.1)


def test_generators_draw_indices_anywhere_and_values_on_the_swarms_device() -> None:
    # the rule: member indices are drawn on the generator's device (then used on the CPU); values
    # (noise) on the swarm's device, which the generator must then share.  A meta swarm stands in for
    # a CUDA one: torch itself would accept a CPU generator there, the check refuses it the same way.
    meta = Swarm.zeros(nn.Linear(3, 2, device="meta"), 5)
    losses, cpu = torch.arange(5.0), torch.Generator()
    message = r"expected a generator on meta \(where the swarm's 'weight' lives\), got one on cpu"
    with pytest.raises(ValueError, match=rf"^truncation_selection: {message}"):
        alg.truncation_selection(meta, losses, survivors=2, sigma=0.1, generator=cpu)
    with pytest.raises(ValueError, match=rf"^truncation_selection: {message}"):
        alg.truncation_selection(meta[:0], losses[:0], survivors=1, sigma=0.1, generator=cpu)  # empty: checked alike
    with pytest.raises(ValueError, match=rf"^apso: {message}"):
        alg.apso(meta, 0, alpha=0.1, beta=0.5, generator=cpu)
    with pytest.raises(ValueError, match=rf"^pso_velocity: {message}"):
        alg.pso_velocity(meta, meta, meta, 0, inertia=0.5, cognitive=1.0, social=0.0, generator=cpu)
    with pytest.raises(TypeError, match=r"^pull_toward_best: expected a torch.Generator or None as generator, "
                                        r"got int"):
        alg.pull_toward_best(meta, losses, subset=2, alpha=0.5, generator=1)  # type: ignore[arg-type]
    # drawing only indices (or nothing), any generator will do
    assert len(alg.truncation_selection(meta, losses, survivors=2, sigma=0.0, generator=cpu)) == 5
    assert len(alg.pull_toward_best(meta, losses, subset=3, alpha=0.5, generator=cpu)) == 5
    assert len(alg.apso(meta, 0, alpha=0.0, beta=0.5, generator=cpu)) == 5


def test_pso_velocity_takes_a_member_index_as_global_best() -> None:
    swarm = population()
    by_index = alg.pso_velocity(swarm, Swarm.zeros(swarm), swarm, 2, inertia=0.0, cognitive=0.0, social=1.0,
                                generator=torch.Generator().manual_seed(0))
    by_member = alg.pso_velocity(swarm, Swarm.zeros(swarm), swarm, swarm[2], inertia=0.0, cognitive=0.0, social=1.0,
                                 generator=torch.Generator().manual_seed(0))
    for name, value in by_member.params.items():
        assert torch.equal(by_index.params[name], value), name
    assert by_index.params["0.weight"][2].abs().sum() == 0  # member 2 is the global best: no pull on it
    with pytest.raises(TypeError, match=r"^pso_velocity: expected a member index, a Particle or a model as "
                                        r"global_best, got float"):
        alg.pso_velocity(swarm, Swarm.zeros(swarm), swarm, 0.0,  # type: ignore[arg-type]
                         inertia=0.0, cognitive=0.0, social=1.0)
    with pytest.raises(IndexError, match=r"^pso_velocity: global_best=6 is out of range for a swarm of 6 members"):
        alg.pso_velocity(swarm, Swarm.zeros(swarm), swarm, 6, inertia=0.0, cognitive=0.0, social=1.0)


# -- ES ------------------------------------------------------------------------------------------------
def test_es_noise_is_antithetic_and_gradient_matches_formula() -> None:
    center = nytorch.particle(net())
    noise = alg.es_noise(center, 8, generator=torch.Generator().manual_seed(0))
    eps = per_member(noise)
    for i in range(4):
        for name in eps[i]:
            assert torch.equal(eps[i][name], -eps[i + 4][name])
    losses = torch.arange(8.0)
    sigma = 0.2
    grad = alg.es_gradient(noise, losses, sigma=sigma)
    for name in eps[0]:
        expected = sum((losses[i] - losses.mean()) * eps[i][name] for i in range(8)) / (8 * sigma)
        torch.testing.assert_close(grad.params[name], expected, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match=r"es_noise: expected an even size \(antithetic pairs\), got 7"):
        alg.es_noise(center, 7)
    with pytest.raises(ValueError, match=r"es_gradient: expected sigma > 0, got 0"):
        alg.es_gradient(noise, losses, sigma=0.0)
    for negative in (-1.0, torch.tensor(-0.5)):  # one rule, one message: not ">= 0" for negatives
        with pytest.raises(ValueError, match=r"^es_gradient: expected sigma > 0, got -"):
            alg.es_gradient(noise, losses, sigma=negative)


def test_es_step_reduces_a_quadratic() -> None:
    generator = torch.Generator().manual_seed(0)
    center: Any = nytorch.particle(net()) + 1.0

    def loss(p: Any) -> float:
        return float(sum(v.pow(2).sum() for v in p.params.values()))

    start = loss(center)
    for _ in range(5):
        noise = alg.es_noise(center, 64, generator=generator)
        population_ = center + 0.05 * noise
        assert isinstance(population_, Swarm)
        before = loss(center)
        center = alg.es_step(center, noise, quadratic(population_), sigma=0.05, lr=0.1)
        assert loss(center) < before
    assert loss(center) < 0.6 * start
    shaped = alg.centered_ranks(torch.tensor([3.0, -1.0, 2.0, 10.0]))
    assert shaped.tolist() == pytest.approx([1 / 6, -0.5, -1 / 6, 0.5])


# -- selection ------------------------------------------------------------------------------------------
def test_truncation_selection_keeps_the_best_and_mutates_copies() -> None:
    swarm = population(8)
    members = per_member(swarm)
    losses = torch.tensor([5.0, 1.0, 7.0, 0.0, 3.0, float("nan"), 2.0, 6.0])
    exact = alg.truncation_selection(swarm, losses, survivors=3, sigma=0.0, generator=torch.Generator().manual_seed(0))
    elite = [members[3], members[1], members[6]]
    result = per_member(exact)
    assert_members(exact[:3], elite, exact=True)
    for child in result[3:]:  # every child is an exact copy of a survivor
        assert any(all(torch.equal(child[n], e[n]) for n in child) for e in elite)
    mutated = alg.truncation_selection(swarm, losses, survivors=3, sigma=0.1,
                                       generator=torch.Generator().manual_seed(0))
    assert_members(mutated[:3], elite, exact=True)
    generator = torch.Generator().manual_seed(0)
    parents = torch.randint(3, (5,), generator=generator)
    noise = per_member(Swarm.randn(swarm[:5], generator=generator))
    expected = [{n: elite[int(parents[k])][n] + 0.1 * noise[k][n] for n in members[0]} for k in range(5)]
    assert_members(mutated[3:], expected)
    with pytest.raises(ValueError, match=r"truncation_selection: expected survivors in \[1, 8\], got 0"):
        alg.truncation_selection(swarm, losses, survivors=0, sigma=0.1)
    with pytest.raises(ValueError, match=r"truncation_selection: expected sigma >= 0, got -1"):
        alg.truncation_selection(swarm, losses, survivors=2, sigma=-1)


# -- gradient descent and the hybrid loop -------------------------------------------------------------
def _regression(seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 3, generator=generator)
    return x, torch.stack([x.sum(1), x[:, 0] - x[:, 2]], dim=1)


def _mse(member: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(member(x), y)


def test_sgd_step_matches_torch_optim_per_member() -> None:
    torch.manual_seed(0)
    modules = [net() for _ in range(5)]
    swarm = Swarm.stack(modules)
    x, y = _regression()
    new, losses = alg.sgd_step(swarm, _mse, x, y, lr=0.05)
    for i, module in enumerate(modules):
        optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
        optimizer.zero_grad()
        loss = _mse(module, x, y)
        loss.backward()
        optimizer.step()
        torch.testing.assert_close(losses[i], loss.detach(), rtol=RTOL, atol=ATOL)
        for name, param in module.named_parameters():
            torch.testing.assert_close(new.params[name][i], param.detach(), rtol=RTOL, atol=ATOL)


def test_pull_toward_best_matches_loop() -> None:
    swarm = population(8)
    members = per_member(swarm)
    losses = torch.tensor([4.0, 3.0, 9.0, 1.0, 5.0, 0.5, 2.0, 8.0])
    generator = torch.Generator().manual_seed(3)
    out = alg.pull_toward_best(swarm, losses, subset=4, alpha=0.3, generator=generator)
    chosen = torch.randperm(8, generator=torch.Generator().manual_seed(3))[:4].tolist()
    best = min(chosen, key=lambda i: float(losses[i]))
    expected = [
        {n: torch.lerp(m[n], members[best][n], 0.3) for n in m} if i in chosen and i != best else m
        for i, m in enumerate(members)
    ]
    assert_members(out, expected)
    assert_members(swarm, members, exact=True)


def test_hybrid_loop_trains_every_member() -> None:
    torch.manual_seed(0)
    swarm = Swarm.stack([net() for _ in range(8)])
    data = [_regression(seed) for seed in range(40)]
    final, history = alg.hybrid(swarm, _mse, data, lr=0.1, every=5, subset=4, alpha=0.5,
                                generator=torch.Generator().manual_seed(0), show_progress=False)
    assert history.shape == (40, 8)
    assert float(history[-5:].mean()) < 0.5 * float(history[:5].mean())
    x, y = _regression(99)
    assert float(final.grad_and_value(_mse, x, y)[1].mean()) < float(swarm.grad_and_value(_mse, x, y)[1].mean())


def test_hybrid_step_pulls_only_every_k_steps() -> None:
    swarm = population(4)
    x, y = _regression()
    plain, _ = alg.sgd_step(swarm, _mse, x, y, lr=0.1)
    same, _ = alg.hybrid_step(swarm, _mse, x, y, step=0, lr=0.1, every=2, alpha=1.0)
    assert_members(same, per_member(plain), exact=True)
    pulled, losses = alg.hybrid_step(swarm, _mse, x, y, step=1, lr=0.1, every=2, alpha=1.0)
    best = int(losses.argmin())
    assert_members(pulled, [per_member(plain)[best]] * 4, exact=True)


def test_pull_toward_best_zero_and_one_are_exact() -> None:
    swarm = diverged(8)
    members = per_member(swarm)
    losses = torch.arange(8.0)  # member 0 is the best, and holds a -0.0
    generator = torch.Generator().manual_seed(1)
    state = generator.get_state()
    assert_bits(alg.pull_toward_best(swarm, losses, subset=8, alpha=0.0, generator=generator), members)
    assert torch.equal(generator.get_state(), state)  # no pull, no draw (as PSO's zero coefficients)
    losses[2] = -1.0  # the +inf member is the best: a zero pull still leaves every member as it was
    assert_bits(alg.pull_toward_best(swarm, losses, subset=8, alpha=0.0), members)
    losses[2] = 2.0
    pulled = alg.pull_toward_best(swarm, losses, subset=8, alpha=1.0)
    assert_bits(pulled, [members[0]] * 8)  # the diverged members 2 and 4 included: not lerp's NaN
    # a subset: only the chosen members move, onto the best of them, bit for bit
    out = alg.pull_toward_best(swarm, losses, subset=3, alpha=1.0, generator=torch.Generator().manual_seed(5))
    chosen = torch.randperm(8, generator=torch.Generator().manual_seed(5))[:3].tolist()
    best = min(chosen, key=lambda i: float(losses[i]))
    assert_bits(out, [members[best] if i in chosen else m for i, m in enumerate(members)])


def test_zero_learning_rates_move_nothing() -> None:
    swarm = population(4)
    swarm[1] = 1e30  # its squared error overflows: inf loss, NaN gradients
    x, y = _regression()
    grads, losses = swarm.grad_and_value(_mse, x, y)
    assert not grads.params["0.weight"][1].isfinite().all() and not losses[1].isfinite()
    members = per_member(swarm)
    new, before = alg.sgd_step(swarm, _mse, x, y, lr=0.0)
    assert_bits(new, members)  # not 0 · NaN
    assert torch.equal(before[[0, 2, 3]], losses[[0, 2, 3]]) and before[1] == losses[1]
    assert new.params["0.weight"].data_ptr() != swarm.params["0.weight"].data_ptr()  # a new swarm
    center = nytorch.particle(net())
    noise = alg.es_noise(center, 4, generator=torch.Generator().manual_seed(0))
    infinite = torch.tensor([1.0, float("inf"), 2.0, 3.0])  # a NaN estimate
    assert alg.es_gradient(noise, infinite, sigma=0.1).params["0.weight"].isnan().all()
    stepped = alg.es_step(center, noise, infinite, sigma=0.1, lr=0.0)
    for name, value in center.params.items():
        assert torch.equal(bits(stepped.params[name]), bits(value)), name
    module = net()
    stepped = alg.es_step(module, noise, infinite, sigma=0.1, lr=0.0)
    for name, value in module.named_parameters():
        assert torch.equal(stepped.params[name], value.detach()), name


def _counting() -> tuple[list[int], Callable[..., Tensor]]:
    calls = [0]

    def loss(member: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
        calls[0] += 1
        return _mse(member, x, y)
    return calls, loss


HYBRID_ERRORS: list[tuple[dict[str, Any], type, str]] = [
    ({"subset": 10}, ValueError, r"expected subset in \[1, 4\], got 10"),
    ({"subset": -3, "every": 50}, ValueError, r"expected subset in \[1, 4\], got -3"),  # never used: still checked
    ({"subset": 2.0}, TypeError, r"expected an int as subset, got float"),
    ({"generator": "g", "every": 50}, TypeError, r"expected a torch.Generator or None as generator, got str"),
    ({"alpha": "x"}, TypeError, r"expected a real number as alpha, got str"),
    ({"alpha": float("nan")}, ValueError, r"expected a number as alpha, got nan"),
    ({"lr": None}, TypeError, r"expected a real number as lr, got NoneType"),
    ({"lr": np.bool_(True)}, TypeError, r"expected a real number as lr, got bool_?"),
    ({"every": 0}, ValueError, r"expected every in \[1, \d+\], got 0"),
    ({"every": True}, TypeError, r"expected an int as every, got bool"),
    ({"every": torch.tensor([2, 3])}, TypeError,
     r"expected an int as every, got a tensor of dtype int64 and shape \(2,\)"),
    ({"swarm": nn.Linear(3, 2)}, TypeError, r"expected a Swarm as swarm, got Linear"),
    ({"loss_fn": 3}, TypeError, r"expected a callable as loss_fn, got int"),
]


@pytest.mark.parametrize("change, error, message", HYBRID_ERRORS)
def test_hybrid_checks_every_argument_before_any_step(change: dict[str, Any], error: type, message: str) -> None:
    calls, loss = _counting()
    x, y = _regression()
    kwargs: dict[str, Any] = {"swarm": population(4), "loss_fn": loss, "lr": 0.1, "every": 2} | change
    swarm, loss_fn = kwargs.pop("swarm"), kwargs.pop("loss_fn")
    with pytest.raises(error, match=rf"^hybrid: {message}$"):
        alg.hybrid(swarm, loss_fn, [(x, y)] * 3, **kwargs)
    with pytest.raises(error, match=rf"^hybrid_step: {message}$"):
        alg.hybrid_step(swarm, loss_fn, x, y, step=0, **kwargs)
    assert calls[0] == 0  # refused before the first gradient step


def test_hybrid_checks_step_batches_and_show_progress() -> None:
    calls, loss = _counting()
    swarm, (x, y) = population(4), _regression()
    for step, error, message in ((None, TypeError, "expected an int as step, got NoneType"),
                                 (1.5, TypeError, "expected an int as step, got float"),
                                 (True, TypeError, "expected an int as step, got bool"),
                                 (-1, ValueError, r"expected step in \[0, \d+\], got -1")):
        with pytest.raises(error, match=rf"^hybrid_step: {message}$"):
            alg.hybrid_step(swarm, loss, x, y, step=step, lr=0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^hybrid: expected an iterable of batches \(tuples of loss_fn arguments\), "
                                        r"got int$"):
        alg.hybrid(swarm, loss, 5, lr=0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^hybrid: expected True, False or None as show_progress, got str$"):
        alg.hybrid(swarm, loss, [(x, y)], lr=0.1, show_progress="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^hybrid: expected each batch to be a tuple or list of loss_fn arguments, "
                                        r"got Tensor at step 0$"):
        alg.hybrid(swarm, loss, [x], lr=0.1)  # type: ignore[list-item]
    assert calls[0] == 0
    _, history = alg.hybrid(swarm, loss, [[x, y], (x, y)], lr=0.1)  # lists and tuples alike
    assert history.shape == (2, 4)


# -- NumPy scalars are numbers like any other ----------------------------------------------------------------
def _same(a: Any, b: Any) -> None:
    """Two results of one step (a Swarm, Particle, PSOState, tensor, or a tuple of them) hold equal values."""
    if isinstance(a, tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for left, right in zip(a, b):
            _same(left, right)
    elif isinstance(a, Tensor):
        assert torch.equal(a, b)
    else:
        assert a.params.keys() == b.params.keys()
        for name, value in a.params.items():
            assert torch.equal(value, b.params[name]), name


def _numpy_cases() -> list[tuple[str, Callable[..., Any], dict[str, Any], dict[str, Any]]]:
    """``(name, step, python_kwargs, other_kwargs)``: the step run with Python numbers, then with NumPy
    scalars or 0-dim tensors in their place, from the same seed."""
    losses = np.array([0.5, 0.25, 3.0, 1.0, 2.0, 4.0], dtype=np.float32)
    x, y = _regression()

    def seeded(fn: Callable[..., Any], *args: Any) -> Callable[..., Any]:
        return lambda **kw: fn(*args, generator=torch.Generator().manual_seed(0), **kw)

    def state() -> Any:
        return alg.pso_init(population(), quadratic(population()))

    noise = alg.es_noise(net(), 6, generator=torch.Generator().manual_seed(0))
    center = nytorch.particle(net())
    pairs = [  # (Python, NumPy, tensor)
        {"alpha": (0.25, np.float32(0.25), torch.tensor(0.25)), "beta": (0.5, np.float64(0.5), torch.tensor(0.5)),
         "best": (1, np.argmin(losses), torch.tensor(losses).argmin())},
    ]
    cases: list[tuple[str, Callable[..., Any], dict[str, Any], dict[str, Any]]] = []

    def add(name: str, step: Callable[..., Any], values: dict[str, tuple[Any, Any, Any]]) -> None:
        python = {k: v[0] for k, v in values.items()}
        cases.append((f"{name}-numpy", step, python, {k: v[1] for k, v in values.items()}))
        cases.append((f"{name}-tensor", step, python, {k: v[2] for k, v in values.items()}))

    add("apso", lambda best, **kw: alg.apso(population(), best, generator=torch.Generator().manual_seed(0), **kw),
        pairs[0])
    add("apso-jump", lambda best, **kw: alg.apso(population(), best, alpha=0.0, **kw),
        {"best": (3, np.int64(3), torch.tensor(3, dtype=torch.int32)), "beta": (1, np.int8(1), torch.tensor(1))})
    add("pso_step", lambda **kw: alg.pso_step(population(), quadratic(population()), state(),
                                              generator=torch.Generator().manual_seed(0), **kw),
        {"inertia": (0.5, np.float16(0.5), torch.tensor(0.5, dtype=torch.float64)),
         "cognitive": (1.5, np.float32(1.5), torch.tensor(1.5)), "social": (2, np.int32(2), torch.tensor(2))})
    add("pso_velocity", lambda global_best, **kw: alg.pso_velocity(
        population(), Swarm.zeros(population()), population(), global_best,
        generator=torch.Generator().manual_seed(0), **kw),
        {"global_best": (-1, np.int16(-1), torch.tensor(-1)), "inertia": (0.0, np.float64(0.0), torch.tensor(0.0)),
         "cognitive": (0.0, np.float32(0.0), torch.tensor(0.0)), "social": (1.0, np.float32(1), torch.tensor(1.0))})
    add("sgd_step", lambda **kw: alg.sgd_step(population(), _mse, x, y, **kw),
        {"lr": (0.125, np.float32(0.125), torch.tensor(0.125))})
    add("es_noise", lambda size: seeded(alg.es_noise, net())(size=size),
        {"size": (4, np.int64(4), torch.tensor(4))})
    add("es_gradient", lambda **kw: alg.es_gradient(noise, torch.arange(6.0), **kw),
        {"sigma": (0.5, np.float32(0.5), torch.tensor(0.5))})
    add("es_step", lambda **kw: alg.es_step(center, noise, torch.arange(6.0), **kw),
        {"sigma": (0.5, np.float64(0.5), torch.tensor(0.5)), "lr": (0.25, np.float32(0.25), torch.tensor(0.25))})
    add("truncation_selection", lambda **kw: seeded(alg.truncation_selection, population(), torch.tensor(losses))(**kw),
        {"survivors": (2, np.int64(2), torch.tensor(2)), "sigma": (0.5, np.float32(0.5), torch.tensor(0.5))})
    add("pull_toward_best", lambda **kw: seeded(alg.pull_toward_best, population(), torch.tensor(losses))(**kw),
        {"subset": (3, np.uint8(3), torch.tensor(3)), "alpha": (0.75, np.float32(0.75), torch.tensor(0.75))})
    add("hybrid_step", lambda **kw: seeded(alg.hybrid_step, population(), _mse, x, y)(**kw),
        {"step": (1, np.int64(1), torch.tensor(1)), "every": (2, np.int32(2), torch.tensor(2)),
         "subset": (4, np.int64(4), torch.tensor(4)), "lr": (0.125, np.float32(0.125), torch.tensor(0.125)),
         "alpha": (0.5, np.float64(0.5), torch.tensor(0.5))})
    add("hybrid", lambda **kw: seeded(alg.hybrid, population(), _mse, [(x, y)] * 3)(**kw),
        {"every": (2, np.int64(2), torch.tensor(2)), "subset": (3, np.int64(3), torch.tensor(3)),
         "lr": (0.125, np.float32(0.125), torch.tensor(0.125)), "alpha": (0.5, np.float32(0.5), torch.tensor(0.5))})
    return cases


_NUMPY_CASES = _numpy_cases()


@pytest.mark.parametrize("name, step, python, other", _NUMPY_CASES, ids=[case[0] for case in _NUMPY_CASES])
def test_numpy_scalars_and_0_dim_tensors_are_numbers(name: str, step: Callable[..., Any], python: dict[str, Any],
                                                      other: dict[str, Any]) -> None:
    _same(step(**other), step(**python))


def test_booleans_are_still_refused() -> None:
    swarm, losses = population(), torch.arange(6.0)
    for value in (True, np.bool_(True), torch.tensor(True)):
        kind = "a tensor of dtype bool and shape \\(\\)" if isinstance(value, Tensor) else "bool_?"  # numpy 1.x names np.bool_ bool_
        with pytest.raises(TypeError, match=rf"^apso: expected a member index, a Particle or a model as best, "
                                            rf"got {kind}$"):
            alg.apso(swarm, value, alpha=0.0, beta=0.5)
        with pytest.raises(TypeError, match=rf"^apso: expected a real number as beta, got {kind}$"):
            alg.apso(swarm, 0, alpha=0.0, beta=value)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=rf"^truncation_selection: expected an int as survivors, got {kind}$"):
            alg.truncation_selection(swarm, losses, survivors=value, sigma=0.0)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=rf"^sgd_step: expected a real number as lr, got {kind}$"):
            alg.sgd_step(swarm, _mse, *_regression(), lr=value)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^apso: expected a member index, a Particle or a model as best, "
                                        r"got float64$"):
        alg.apso(swarm, np.float64(1.0), alpha=0.0, beta=0.5)  # a float index, NumPy or not
    with pytest.raises(TypeError, match=r"^es_noise: expected an int as size, "
                                        r"got a tensor of dtype float32 and shape \(\)$"):
        alg.es_noise(net(), torch.tensor(4.0))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^apso: expected a real number as alpha, got complex128$"):
        alg.apso(swarm, 0, alpha=np.complex128(1), beta=0.5)


def test_progress_is_optional(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    items = [1, 2, 3]
    assert alg.progress(items) is items  # stderr is not a terminal under pytest
    assert alg.progress(items, enabled=False) is items
    assert list(alg.progress(items, enabled=True, desc="demo")) == items
    assert "demo" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tqdm", None)  # tqdm not installed
    assert alg.progress(items, enabled=True) is items


def test_public_surface() -> None:
    assert set(alg.__all__) >= {"pso_init", "pso_step", "apso", "es_noise", "es_step", "truncation_selection",
                                "sgd_step", "hybrid", "progress"}
    for name in alg.__all__:
        assert getattr(alg, name).__doc__, name


@pytest.mark.skipif(not hasattr(nytorch, "Swarm"), reason="exported from nytorch/__init__.py by the lead")
def test_swarm_is_exported() -> None:
    assert nytorch.Swarm is Swarm
    assert "Swarm" in nytorch.__all__ and "algorithms" in nytorch.__all__


def test_hybrid_iterates_its_batches_once():
    """A DataLoader shuffles (and starts its workers) on each ``iter``: ``hybrid`` must start one pass only."""
    swarm = Swarm.stack([nn.Linear(2, 1) for _ in range(3)])
    data = [(torch.randn(8, 2), torch.randn(8, 1))] * 3

    class Counted:
        started = 0

        def __iter__(self):
            Counted.started += 1
            return iter(data)

    _, history = alg.hybrid(swarm, lambda m, x, y: F.mse_loss(m(x), y), Counted(), lr=0.1)
    assert Counted.started == 1 and history.shape == (3, 3)


@pytest.mark.parametrize("options", [dict(every=np.array(2)), dict(subset=torch.tensor([2])),
                                     dict(subset=np.int64(2)), dict(show_progress=0), dict(show_progress=1)])
def test_hybrid_takes_integer_arrays_tensors_and_flags(options):
    torch.manual_seed(0)
    swarm = Swarm.stack([nn.Linear(2, 1) for _ in range(3)])
    data = [(torch.randn(8, 2), torch.randn(8, 1))] * 2
    plain = {key: int(value) if key != "show_progress" else bool(value) for key, value in options.items()}
    loss = lambda m, x, y: F.mse_loss(m(x), y)  # noqa: E731
    torch.manual_seed(1)
    expected = alg.hybrid(swarm, loss, data, lr=0.1, **plain)[1]
    torch.manual_seed(1)
    assert torch.equal(alg.hybrid(swarm, loss, data, lr=0.1, **options)[1], expected)


def test_es_gradient_of_complex_parameters_is_half_of_autograds_as_documented() -> None:
    class Z(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.z = nn.Parameter(torch.tensor([1 + 2j], dtype=torch.complex64))

    model, sigma = Z(), 0.01
    eps = alg.es_noise(model, 100_000, generator=torch.Generator().manual_seed(0))
    z = (nytorch.particle(model) + sigma * eps).params["z"].flatten()
    estimate = alg.es_gradient(eps, (z.abs() ** 2).float(), sigma=sigma).params["z"]
    reference = model.z.detach().clone().requires_grad_()
    (reference.abs() ** 2).sum().backward()  # plain autograd: 2·z
    assert reference.grad is not None
    assert torch.allclose(estimate, reference.grad / 2, atol=0.06)
