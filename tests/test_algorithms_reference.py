"""``nytorch.algorithms`` and Swarm basics checked differentially against references written from the
published update rules and the docstrings (plain per-tensor, per-member torch in float64), on swarms of
MLPs, BatchNorm models, integer buffers, frozen parameters, float64/float16 and mixed-dtype members,
with P = 1 and P large.  Random draws are shared by seeding the same generator for the reference
(``Swarm.randn``/``Swarm.rand``/``torch.randperm``/``torch.randint`` with that generator)."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nytorch
import nytorch.algorithms as alg
from nytorch import Swarm

Tensor = torch.Tensor
INF = float("inf")
NAN = float("nan")


# -- sample models --------------------------------------------------------------------------------
class Frozen(nytorch.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class IntBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.register_buffer("count", torch.tensor([1, 2, 3]))
        self.register_buffer("scale", torch.tensor([2.0]))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) * self.scale


class Mixed(nn.Module):
    """Parameters of three dtypes (three storage groups); its forward ignores them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4).double()
        self.b = nn.Linear(4, 2).half()
        self.c = nn.Parameter(torch.randn(5))

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :2]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def batchnorm() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))


def frozen_config() -> nn.Module:
    model = Frozen()
    model.set_param_config(operational=False, name="fc1.weight")
    return model


def frozen_grad() -> nn.Module:
    model = mlp()
    model[0].weight.requires_grad_(False)
    return model


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": mlp, "batchnorm": batchnorm, "int_buffers": IntBuffers, "frozen_config": frozen_config,
    "frozen_grad": frozen_grad, "float64": lambda: mlp().double(), "float16": lambda: mlp().half(), "mixed": Mixed,
}
#: parameters left out of arithmetic (ParamConfig operational=False)
FROZEN = {"frozen_config": {"fc1.weight"}}
TOL = {torch.float16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-10}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_swarm(name: str, size: int, *, buffers: bool = False, seed: int = 0) -> Swarm:
    torch.manual_seed(seed)
    return Swarm.normal(MODELS[name](), size, std=1.0, buffers=buffers, generator=seeded(seed))


def state(swarm: Swarm) -> dict[str, Tensor]:
    """Every stored leaf, cloned: buffers then parameters (with arithmetic buffers)."""
    leaves = dict(swarm.buffers)
    leaves.update(swarm.params)
    return {name: value.clone() for name, value in leaves.items()}


def active(swarm: Swarm, name: str) -> set[str]:
    """The leaves the update rules apply to: floating parameters (and buffers when taken into arithmetic),
    minus non-operational ones."""
    return {k for k, v in swarm.params.items() if v.is_floating_point() and k not in FROZEN.get(name, ())}


def assert_leaves(ours: dict[str, Tensor], expected: dict[str, Tensor], *, scale: float = 1.0) -> None:
    assert set(expected) <= set(ours)
    for name, reference in expected.items():
        value = ours[name]
        assert value.shape == reference.shape, name
        if not value.is_floating_point() or not reference.is_floating_point():
            assert value.dtype == reference.dtype and torch.equal(value, reference), name
            continue
        tol = TOL[value.dtype] * scale
        torch.testing.assert_close(value.double(), reference.double(), rtol=tol, atol=tol, equal_nan=True,
                                   msg=lambda m, name=name: f"{name}: {m}")


def assert_unchanged(swarm: Swarm, before: dict[str, Tensor]) -> None:
    now = state(swarm)
    assert now.keys() == before.keys()
    for name, value in now.items():
        assert torch.equal(value, before[name]) or torch.allclose(value, before[name], equal_nan=True), name


def nan_last(losses: Tensor) -> list[tuple[int, float]]:
    """Sort keys putting NaN after every number (+inf included)."""
    return [(1, 0.0) if math.isnan(v) else (0, v) for v in losses.tolist()]


# -- references (from the published rules and the docstrings) ---------------------------------------
def ref_apso(leaves: dict[str, Tensor], act: set[str], best: dict[str, Tensor], alpha: float, beta: float,
             noise: dict[str, Tensor]) -> dict[str, Tensor]:
    """Yang's accelerated PSO: W_i <- (1 - beta) W_i + beta W_best + alpha eps_i (a zero coefficient drops its term)."""
    out = {}
    for k, w in leaves.items():
        if k not in act:
            out[k] = w.clone()
            continue
        rows = []
        for i in range(w.shape[0]):
            row = w[i].double() * (1 - beta) if beta != 1 else torch.zeros_like(w[i], dtype=torch.float64)
            if beta != 0:
                row = row + beta * best[k].double()
            if alpha != 0:
                row = row + alpha * noise[k][i].double()
            rows.append(row)
        out[k] = torch.stack(rows)
    return out


def ref_pso_step(x: dict[str, Tensor], velocity: dict[str, Tensor], best: dict[str, Tensor], best_loss: Tensor,
                 losses: Tensor, act: set[str], w: float, c1: float, c2: float,
                 r1: dict[str, Tensor], r2: dict[str, Tensor]) -> tuple[dict, dict, dict, Tensor]:
    """Inertia PSO (Shi & Eberhart): strict personal-best improvement (a NaN best is beaten by any number),
    global best = lowest personal best (first on ties), v' = w v + c1 r1 (p - x) + c2 r2 (g - x), x' = x + v'."""
    size = losses.shape[0]
    new_best = {k: v.clone() for k, v in best.items()}
    new_loss = best_loss.clone()
    for i in range(size):
        old, new = new_loss[i].item(), losses[i].item()
        if not math.isnan(new) and (math.isnan(old) or new < old):
            new_loss[i] = losses[i]
            for k in new_best:
                new_best[k][i] = x[k][i]
    keys = [INF if math.isnan(v) else v for v in new_loss.tolist()]
    g = min(range(size), key=lambda i: (keys[i], i))
    new_x, new_v = {}, {}
    for k in x:
        if k not in act:
            new_x[k] = x[k].clone()
            continue
        pos = x[k].double()
        v = w * velocity[k].double() if w else torch.zeros_like(pos)
        if c1:
            v = v + c1 * r1[k].double() * (new_best[k].double() - pos)
        if c2:
            v = v + c2 * r2[k].double() * (new_best[k][g].double() - pos)
        new_v[k], new_x[k] = v, pos + v
    return new_x, new_v, new_best, new_loss


def ref_es_gradient(noise: dict[str, Tensor], losses: Tensor, sigma: float, act: set[str]) -> dict[str, Tensor]:
    """OpenAI-ES (Salimans et al. 2017) with a mean baseline: sum_i (L_i - mean L) eps_i / (P sigma)."""
    size = losses.shape[0]
    centred = losses.double() - losses.double().mean()
    return {k: sum(centred[i] * noise[k][i].double() for i in range(size)) / (size * sigma) for k in act}


def ref_centered_ranks(losses: Tensor) -> Tensor:
    """OpenAI's compute_centered_ranks: ranks scaled to [-0.5, 0.5]."""
    return torch.argsort(torch.argsort(losses)).double() / (losses.shape[0] - 1) - 0.5


def ref_truncation(leaves: dict[str, Tensor], act: set[str], losses: Tensor, survivors: int, sigma: float,
                   seed: int, like: Swarm) -> dict[str, Tensor]:
    """Elites (lowest losses, best first, NaN last, stable), then parent + sigma N(0, 1), parents uniform."""
    size = losses.shape[0]
    keys = nan_last(losses)
    elite = sorted(range(size), key=lambda i: (keys[i], i))[:survivors]
    generator = seeded(seed)
    parents = [elite[j] for j in torch.randint(survivors, (size - survivors,), generator=generator).tolist()]
    noise = state(Swarm.randn(like, size - survivors, generator=generator)) if sigma and parents else {}
    order = elite + parents
    out = {}
    for k, w in leaves.items():
        rows = [w[i].double() if k in act else w[i] for i in order]
        if noise and k in act:
            rows[survivors:] = [row + sigma * noise[k][j].double() for j, row in enumerate(rows[survivors:])]
        out[k] = torch.stack(rows)
    return out


def ref_pull(leaves: dict[str, Tensor], act: set[str], losses: Tensor, subset: int, alpha: float,
             seed: int) -> dict[str, Tensor]:
    """The nytorch 1.1 pull: a random subset (randperm), each moved toward the subset's best (NaN last)."""
    out = {k: (w.double().clone() if k in act else w.clone()) for k, w in leaves.items()}
    if alpha == 0:
        return out
    chosen = torch.randperm(losses.shape[0], generator=seeded(seed))[:subset].tolist()
    keys = nan_last(losses)
    best = min(chosen, key=lambda i: (keys[i], chosen.index(i)))
    for i in chosen:
        for k in act:
            if i != best:
                out[k][i] = (1 - alpha) * leaves[k][i].double() + alpha * leaves[k][best].double()
    return out


class Member:
    """What ``loss_fn`` receives in the loop reference: a callable module with ``.params``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.params = dict(module.named_parameters())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def loss_fn(member: Any, x: Tensor, y: Tensor) -> Tensor:
    reg = sum(v.float().pow(2).sum() for v in member.params.values() if v.is_floating_point())
    return F.mse_loss(member(x).float(), y) + 0.01 * reg


def ref_sgd(name: str, leaves: dict[str, Tensor], x: Tensor, y: Tensor, lr: float,
            train: bool) -> tuple[dict[str, Tensor], Tensor]:
    """A Python loop: load member i into a fresh module, backward, p -= lr * p.grad for trainable parameters."""
    size = next(iter(leaves.values())).shape[0]
    out: dict[str, list[Tensor]] = {k: [] for k in leaves}
    losses = []
    for i in range(size):
        module = MODELS[name]().train(train)
        module.load_state_dict({k: v[i] for k, v in leaves.items()})
        for k, p in module.named_parameters():
            if k in FROZEN.get(name, ()):
                p.requires_grad_(False)
        loss = loss_fn(Member(module), x, y)
        loss.backward()
        losses.append(loss.detach())
        with torch.no_grad():
            for p in module.parameters():
                if p.grad is not None:
                    p -= lr * p.grad
        for k, v in module.state_dict().items():
            out[k].append(v.detach())
    return {k: torch.stack(v) for k, v in out.items()}, torch.stack(losses)


def inputs(name: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = seeded(seed)
    dtype = {"float64": torch.float64, "float16": torch.float16}.get(name, torch.float32)
    return torch.randn(5, 3, generator=generator).to(dtype), torch.randn(5, 2, generator=generator)


SIZES = [1, 3, 96]
CASES = [(name, size) for name in MODELS for size in SIZES]


# -- accelerated PSO ---------------------------------------------------------------------------------
@pytest.mark.parametrize("buffers", [False, True])
@pytest.mark.parametrize("name,size", CASES)
def test_apso_matches_the_reference(name: str, size: int, buffers: bool) -> None:
    swarm = make_swarm(name, size, buffers=buffers)
    before, act = state(swarm), active(swarm, name)
    noise = state(Swarm.randn(swarm, generator=seeded(3)))
    for alpha, beta in [(0.3, 0.25), (0.0, 0.0), (0.0, 1.0), (0.1, 1.0), (0.0, 0.4), (0.2, 0.0)]:
        for best in (size - 1, swarm[0].clone()):
            out = alg.apso(swarm, best, alpha=alpha, beta=beta, generator=seeded(3))
            target = {k: v[size - 1] for k, v in before.items()} if isinstance(best, int) else \
                {k: v[0] for k, v in before.items()}
            assert_leaves(state(out), ref_apso(before, act, target, alpha, beta, noise))
            assert_unchanged(swarm, before)


# -- PSO ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,size", CASES)
def test_pso_steps_match_the_reference(name: str, size: int) -> None:
    swarm = make_swarm(name, size)
    act = active(swarm, name)
    pso = alg.pso_init(swarm, swarm.norm().float())
    for step in range(3):
        losses = torch.randn(size, generator=seeded(step))
        if step == 1 and size > 3:  # NaN, infinities and a tie
            losses[:4] = torch.tensor([NAN, INF, -INF, losses[3].item()])
        if step == 2:
            losses[:] = losses[0].item()  # every loss ties
        x, v, b, bl = state(swarm), state(pso.velocity), state(pso.best), pso.best_loss.clone()
        for w, c1, c2 in [(0.0, 0.0, 0.0), (0.0, 1.2, 0.0), (0.5, 0.0, 2.0), (0.7, 1.5, 1.5)]:
            generator = seeded(10 + step)
            moved, new = alg.pso_step(swarm, losses, pso, inertia=w, cognitive=c1, social=c2, generator=generator)
            generator = seeded(10 + step)
            r1 = state(Swarm.rand(swarm, generator=generator)) if c1 else {}
            r2 = state(Swarm.rand(swarm, generator=generator)) if c2 else {}
            rx, rv, rb, rbl = ref_pso_step(x, v, b, bl, losses, act, w, c1, c2, r1, r2)
            assert_leaves(state(moved), rx)
            assert_leaves({k: t for k, t in state(new.velocity).items() if k in act}, rv)
            assert_leaves(state(new.best), rb, scale=0.0)
            assert torch.equal(new.best_loss, rbl) or torch.allclose(new.best_loss, rbl, equal_nan=True)
            assert_unchanged(swarm, x)
            assert_unchanged(pso.best, b)
        swarm, pso = moved, new


def test_pso_step_keeps_the_old_best_on_a_tie_at_minus_infinity() -> None:
    """Improvement is strict everywhere: nan_to_num made a -inf best finite, so a tie at -inf replaced it."""
    swarm = Swarm.randn(nn.Linear(2, 1), 3, generator=seeded(0))
    pso = alg.pso_init(swarm, torch.tensor([-INF, INF, NAN]))
    moved = swarm + 1
    _, new = alg.pso_step(moved, torch.tensor([-INF, INF, INF]), pso, inertia=0.0, cognitive=0.0, social=0.0)
    assert torch.equal(new.best.params["bias"], swarm.params["bias"])  # no strict improvement anywhere
    assert new.best_loss[0] == -INF and new.best_loss[1] == INF and math.isnan(new.best_loss[2])
    _, new = alg.pso_step(moved, torch.tensor([-INF, 3e38, 3.0]), pso, inertia=0.0, cognitive=0.0, social=0.0)
    assert [torch.equal(new.best.params["bias"][i], moved.params["bias"][i]) for i in range(3)] == [False, True, True]


def test_pso_errors_name_the_malformed_part_and_change_nothing() -> None:
    swarm, other = make_swarm("batchnorm", 5), make_swarm("mlp", 5)
    losses = torch.randn(5)
    pso = alg.pso_init(swarm, losses)
    snapshots = [(part, state(part)) for part in (swarm, pso.velocity, pso.best)]
    best_loss, generator = pso.best_loss.clone(), seeded(0)
    drawn = generator.get_state()
    zeros = Swarm.zeros(swarm)
    cases: list[tuple[Callable[[], Any], type, str]] = [
        (lambda: alg.pso_step(swarm, losses, alg.PSOState(Swarm.zeros(swarm, 3), pso.best, pso.best_loss),
                              generator=generator),
         ValueError, r"^pso_step: expected state.velocity of 5 members \(one per member\), got 3$"),
        (lambda: alg.pso_step(swarm, losses, alg.PSOState(pso.velocity, pso.best, torch.zeros(3)), generator=generator),
         ValueError, r"^pso_step: expected state.best_loss of shape \(5,\) \(one per member\), got \(3,\)$"),
        (lambda: alg.pso_step(swarm, losses, alg.PSOState(pso.velocity, pso.best, [0.0] * 5),  # type: ignore[arg-type]
                              generator=generator),
         TypeError, r"^pso_step: expected a tensor of 5 losses as state.best_loss, got list$"),
        (lambda: alg.pso_step(swarm, losses, alg.PSOState(pso.velocity, None, pso.best_loss),  # type: ignore[arg-type]
                              generator=generator),
         TypeError, r"^pso_step: expected a Swarm as state.best, got NoneType$"),
        (lambda: alg.pso_velocity(swarm, zeros[:2], swarm, 0, inertia=1, cognitive=1, social=1, generator=generator),
         ValueError, r"^pso_velocity: expected velocity of 5 members \(one per member of swarm\), got 2$"),
        (lambda: alg.pso_velocity(swarm, zeros, swarm[:2], 0, inertia=1, cognitive=1, social=1, generator=generator),
         ValueError, r"^pso_velocity: expected best of 5 members \(one per member of swarm\), got 2$"),
        # another model is refused even where a zero coefficient would not read it
        (lambda: alg.pso_velocity(swarm, Swarm.zeros(other), swarm, 0, inertia=0, cognitive=1, social=1,
                                  generator=generator),
         nytorch.StructureError, r"^pso_velocity: velocity: parameter "),
        (lambda: alg.pso_velocity(swarm, zeros, other, 0, inertia=1, cognitive=0, social=1, generator=generator),
         nytorch.StructureError, r"^pso_velocity: best: parameter "),
        (lambda: alg.pso_velocity(swarm, zeros, swarm, mlp(), inertia=1, cognitive=1, social=0, generator=generator),
         nytorch.StructureError, r"^pso_velocity: global_best: parameter "),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
        for part, before in snapshots:
            assert_unchanged(part, before)
        assert torch.equal(pso.best_loss, best_loss) and torch.equal(generator.get_state(), drawn)


# -- OpenAI-ES ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("size", [2, 8, 200])
def test_es_matches_the_reference(name: str, size: int) -> None:
    torch.manual_seed(size)
    model = MODELS[name]()
    one = Swarm.stack([model])
    act = active(one, name)
    centre = {k: v[0] for k, v in state(one).items()}
    noise = alg.es_noise(model, size, generator=seeded(1))
    eps = state(noise)
    for k, value in eps.items():  # antithetic pairs; leaves outside arithmetic are the centre's
        if k in act:
            assert torch.equal(value[: size // 2], -value[size // 2:]), k
        else:
            assert torch.equal(value, centre[k].expand_as(value)), k

    def close(ours: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
        for k, reference in expected.items():  # relative to the largest entry: float32 losses bound float64 leaves
            tol = (1e-2 if ours[k].dtype == torch.float16 else 1e-6) * float(reference.abs().max())
            torch.testing.assert_close(ours[k].double(), reference, rtol=0, atol=tol, msg=lambda m, k=k: f"{k}: {m}")

    for losses in (torch.randn(size, generator=seeded(2)) * 10, torch.randint(0, 9, (size,), generator=seeded(2))):
        sigma, lr = 0.1, 0.05
        gradient = ref_es_gradient(eps, losses, sigma, act)
        close(alg.es_gradient(noise, losses, sigma=sigma).params, gradient)
        for center in (nytorch.particle(model), model, Swarm.stack([model, model])):
            new = alg.es_step(center, noise, losses, sigma=sigma, lr=lr)
            if isinstance(new, Swarm):
                values = {k: v[1] for k, v in new.params.items()}
            elif isinstance(new, nn.Module):
                assert type(new) is type(model)
                values = {k: v.detach() for k, v in new.named_parameters()}
            else:
                values = dict(new.params)
            close(values, {k: centre[k].double() - lr * gradient[k] for k in act})
            for k in values:
                if k not in act:
                    assert torch.equal(values[k], centre[k]), k
    losses = torch.randn(size, generator=seeded(4))
    ranks = alg.centered_ranks(losses)
    assert ranks.dtype == losses.dtype
    torch.testing.assert_close(ranks.double(), ref_centered_ranks(losses))


def test_centered_ranks_put_nan_last_and_rank_ties_as_a_permutation() -> None:
    ranks = alg.centered_ranks(torch.tensor([NAN, 1.0, -INF, INF]))
    torch.testing.assert_close(ranks, torch.tensor([0.5, -1 / 6, -0.5, 1 / 6]))
    ties = alg.centered_ranks(torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert ties[3] == -0.5 and sorted(ties[:3].tolist()) == pytest.approx([-1 / 6, 1 / 6, 0.5])
    # a stable sort: tied members keep their order, on every call and at every size
    for size in (3, 17, 300):
        tied = alg.centered_ranks(torch.ones(size))
        torch.testing.assert_close(tied, torch.arange(size, dtype=torch.float32) / (size - 1) - 0.5)


# -- truncation selection and the hybrid pull --------------------------------------------------------
LOSS_CASES = ["random", "nan_inf", "ties", "all_nan"]


def losses_for(case: str, size: int) -> Tensor:
    losses = torch.randn(size, generator=seeded(LOSS_CASES.index(case)))
    if case == "nan_inf" and size > 3:
        losses[:4] = torch.tensor([NAN, -INF, INF, NAN])
    elif case == "ties":
        losses[:] = 1.0
    elif case == "all_nan":
        losses[:] = NAN
    return losses


@pytest.mark.parametrize("case", LOSS_CASES)
@pytest.mark.parametrize("name,size", [(n, s) for n in ("batchnorm", "int_buffers", "frozen_config", "float16", "mixed")
                                       for s in (1, 7, 64)])
def test_truncation_and_pull_match_the_reference(name: str, size: int, case: str) -> None:
    for buffers in (False, True):
        swarm = make_swarm(name, size, buffers=buffers)
        before, act = state(swarm), active(swarm, name)
        losses = losses_for(case, size)
        for survivors in sorted({1, (size + 1) // 2, size}):
            for sigma in (0.0, 0.3):
                out = alg.truncation_selection(swarm, losses, survivors=survivors, sigma=sigma, generator=seeded(7))
                assert_leaves(state(out), ref_truncation(before, act, losses, survivors, sigma, 7, swarm))
        for subset in sorted({1, max(1, size // 2), size}):
            for alpha in (0.0, 0.4, 1.0):
                out = alg.pull_toward_best(swarm, losses, subset=subset, alpha=alpha, generator=seeded(5))
                assert_leaves(state(out), ref_pull(before, act, losses, subset, alpha, 5))
        assert_unchanged(swarm, before)


# -- gradient steps and the hybrid loop --------------------------------------------------------------
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name,size", [(n, s) for n in MODELS for s in (1, 3)] + [("batchnorm", 48)])
def test_sgd_step_matches_a_loop_of_modules(name: str, size: int, train: bool) -> None:
    swarm = make_swarm(name, size).train(train)
    x, y = inputs(name)
    if name == "mixed":
        y = y[:, :2]
    before = state(swarm)
    for lr in (0.1, 0.0):
        out, losses = alg.sgd_step(swarm, loss_fn, x, y, lr=lr)
        assert_unchanged(swarm, before)  # BatchNorm statistics in train mode included
        reference, reference_losses = ref_sgd(name, before, x, y, lr, train)
        assert_leaves(state(out), reference, scale=2.0)
        loss_tol = 1e-2 if name == "float16" else 1e-5  # float16 forwards accumulate in another order
        torch.testing.assert_close(losses.double(), reference_losses.double(), rtol=loss_tol, atol=loss_tol)


def test_sgd_step_updates_batchnorm_statistics_in_the_result_only() -> None:
    swarm = make_swarm("batchnorm", 3)
    before = state(swarm)
    x, y = inputs("batchnorm")
    out, _ = alg.sgd_step(swarm, loss_fn, x, y, lr=0.0)
    assert_unchanged(swarm, before)
    assert torch.equal(out.buffers["1.num_batches_tracked"], before["1.num_batches_tracked"] + 1)
    assert not torch.equal(out.buffers["1.running_mean"], before["1.running_mean"])
    for k in swarm.params:
        assert torch.equal(out.params[k], before[k])  # lr=0: the parameters exactly
    stepped, _ = alg.hybrid_step(swarm, loss_fn, x, y, step=0, lr=0.1, every=1)
    assert_unchanged(swarm, before)
    assert torch.equal(stepped.buffers["1.num_batches_tracked"], before["1.num_batches_tracked"] + 1)
    final, _ = alg.hybrid(swarm, loss_fn, [(x, y)] * 3, lr=0.1, every=2, show_progress=False)
    assert_unchanged(swarm, before)
    assert torch.equal(final.buffers["1.num_batches_tracked"][0], before["1.num_batches_tracked"][0] + 3)


@pytest.mark.parametrize("name", ["mlp", "batchnorm", "frozen_config"])
def test_hybrid_matches_sgd_and_pull_written_out(name: str) -> None:
    swarm = make_swarm(name, 6)
    data = [inputs(name, seed) for seed in range(7)]
    out, history = alg.hybrid(swarm, loss_fn, data, lr=0.1, every=3, subset=4, alpha=0.5,
                              generator=seeded(1), show_progress=False)
    generator = seeded(1)
    leaves, losses_seen = state(swarm), []
    act = active(swarm, name)
    for step, (x, y) in enumerate(data):
        leaves, losses = ref_sgd(name, leaves, x, y, 0.1, True)
        losses_seen.append(losses)
        if (step + 1) % 3 == 0:
            chosen = torch.randperm(6, generator=generator)[:4].tolist()
            best = min(chosen, key=lambda i: (losses[i].item(), chosen.index(i)))
            for i in chosen:
                for k in act:
                    if i != best:
                        leaves[k][i] = 0.5 * leaves[k][i] + 0.5 * leaves[k][best]
    assert_leaves(state(out), leaves, scale=2.0)
    torch.testing.assert_close(history, torch.stack(losses_seen), rtol=1e-5, atol=1e-6)
    # hybrid is hybrid_step in a loop, bit for bit
    stepped, generator = swarm, seeded(1)
    for step, (x, y) in enumerate(data):
        stepped, _ = alg.hybrid_step(stepped, loss_fn, x, y, step=step, lr=0.1, every=3, subset=4, alpha=0.5,
                                     generator=generator)
    for k, v in state(stepped).items():
        assert torch.equal(v, state(out)[k]), k


def test_hybrid_progress_bar_shown_hidden_and_closed_on_error(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    tqdm = pytest.importorskip("tqdm")
    swarm = make_swarm("mlp", 3)
    data = [inputs("mlp")] * 2
    open_bars: list[int] = []

    def counting(member: Any, x: Tensor, y: Tensor) -> Tensor:
        open_bars.append(len(tqdm.tqdm._instances))
        return loss_fn(member, x, y)

    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    alg.hybrid(swarm, counting, data, lr=0.1)
    assert open_bars == [0, 0] and "hybrid" not in capsys.readouterr().err  # not a terminal: no bar
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    alg.hybrid(swarm, counting, data, lr=0.1)
    assert open_bars[2:] == [1, 1] and "hybrid" in capsys.readouterr().err
    alg.hybrid(swarm, counting, data, lr=0.1, show_progress=False)
    assert open_bars[4:] == [0, 0] and "hybrid" not in capsys.readouterr().err

    def failing(member: Any, x: Tensor, y: Tensor) -> Tensor:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        alg.hybrid(swarm, failing, data, lr=0.1, show_progress=True)
    assert len(tqdm.tqdm._instances) == 0
    with pytest.raises(TypeError, match="at step 2"):
        alg.hybrid(swarm, loss_fn, data + [{"x": 1}], lr=0.1, show_progress=True)
    assert len(tqdm.tqdm._instances) == 0


@pytest.mark.parametrize("step", ["apso", "pso", "es_noise", "truncation", "pull", "hybrid", "normal", "rand"])
def test_every_draw_follows_torch_manual_seed(step: str) -> None:
    swarm = make_swarm("mlp", 6)
    losses = torch.randn(6, generator=seeded(1))
    pso = alg.pso_init(swarm, losses)
    data = [inputs("mlp")] * 3
    calls: dict[str, Callable[[], Any]] = {
        "apso": lambda: alg.apso(swarm, 0, alpha=0.1, beta=0.3),
        "pso": lambda: alg.pso_step(swarm, losses, pso)[0],
        "es_noise": lambda: alg.es_noise(swarm[0], 6),
        "truncation": lambda: alg.truncation_selection(swarm, losses, survivors=2, sigma=0.1),
        "pull": lambda: alg.pull_toward_best(swarm, losses, subset=3, alpha=0.5),
        "hybrid": lambda: alg.hybrid(swarm, loss_fn, data, lr=0.1, every=1, subset=3, show_progress=False)[0],
        "normal": lambda: Swarm.normal(swarm[0], 4),
        "rand": lambda: Swarm.rand(swarm),
    }
    results = []
    for seed in (123, 123, 124):
        torch.manual_seed(seed)
        results.append(state(calls[step]()))
    assert all(torch.equal(v, results[1][k]) for k, v in results[0].items())
    assert not all(torch.equal(v, results[2][k]) for k, v in results[0].items())


# -- Swarm basics ------------------------------------------------------------------------------------
@pytest.mark.parametrize("buffers", [False, True])
@pytest.mark.parametrize("name", list(MODELS))
def test_mean_zeros_normal_and_selection_match_plain_torch(name: str, buffers: bool) -> None:
    torch.manual_seed(0)
    items = [MODELS[name]() for _ in range(5)]
    swarm = Swarm.stack(items, buffers=buffers)
    leaves, act = state(swarm), active(swarm, name)
    mean = swarm.mean()
    module = mean.module()
    values = {**dict(module.named_buffers()), **dict(mean.params)}
    for k, v in leaves.items():
        if k in act:
            assert values[k].dtype == v.dtype
            assert_leaves({k: values[k]}, {k: v.double().mean(0)}, scale=0.1)
        else:
            assert torch.equal(values[k], v[0]), k  # non-arithmetic leaves are member 0's
    for k, v in state(Swarm.zeros(swarm)).items():
        assert torch.equal(v, torch.zeros_like(v) if k in act else leaves[k]), k
    cloud = state(Swarm.normal(items[0], 4000, std=0.5, buffers=buffers, generator=seeded(0)))
    centre = {k: v[0] for k, v in leaves.items()}
    for k, v in cloud.items():
        if k in act:
            deviation = v.double() - centre[k].double()
            assert abs(float(deviation.mean())) < 0.03 and abs(float(deviation.std()) - 0.5) < 0.03, k
        else:
            assert torch.equal(v, centre[k].expand_as(v)), k
    for k, v in state(Swarm.normal(swarm, std=0.0)).items():
        assert torch.equal(v, leaves[k]), k
    for index in ([4, 0, 0], torch.tensor([True, False, True, False, True]), slice(1, 4), slice(0, 5, 2), [-1, -2]):
        rows = torch.arange(5)[index] if not isinstance(index, list) else torch.tensor(index) % 5
        for k, v in state(swarm[index]).items():
            assert torch.equal(v, leaves[k][rows]), (k, index)
    member = swarm[-1]
    values = {**dict(member.module().named_buffers()), **dict(member.params)}
    for k, v in values.items():
        assert torch.equal(v, leaves[k][4]), k


@pytest.mark.parametrize("name", list(MODELS))
def test_assignment_matches_plain_torch_and_is_atomic(name: str) -> None:
    torch.manual_seed(0)
    for buffers in (False, True):
        swarm = Swarm.stack([MODELS[name]() for _ in range(5)], buffers=buffers)
        act = active(swarm, name)
        new = MODELS[name]()
        if name == "batchnorm":
            new[1].running_mean.fill_(3.0)
            new[1].num_batches_tracked.fill_(7)
        if name == "int_buffers":
            new.count.fill_(9)
        expected = state(swarm)
        swarm[1] = new  # a model: every leaf, buffers and frozen parameters included
        for k, v in new.state_dict().items():
            expected[k][1] = v
        assert_leaves(state(swarm), expected, scale=0.0)
        swarm[[0, 2]] = 3.0  # a number: the arithmetic leaves only
        for k in act:
            expected[k][[0, 2]] = 3.0
        assert_leaves(state(swarm), expected, scale=0.0)
        swarm[torch.tensor([True, False, False, True, False])] = swarm[[2, 1]]
        for k in expected:
            expected[k][[0, 3]] = expected[k][[2, 1]].clone()
        assert_leaves(state(swarm), expected, scale=0.0)
        swarm[1:4] = swarm[0:3]  # overlapping views of one swarm
        for k in expected:
            expected[k][1:4] = expected[k][0:3].clone()
        assert_leaves(state(swarm), expected, scale=0.0)
        for bad in (mlp() if name == "batchnorm" else batchnorm(), "x", swarm[[0, 1]], torch.zeros(5), 1j):
            with pytest.raises((TypeError, ValueError)):
                swarm[[0, 1, 2]] = bad
            assert_leaves(state(swarm), expected, scale=0.0)


def test_swarm_normal_refuses_what_torch_normal_refuses() -> None:
    net = mlp()
    for std, error, message in [
            (-1.0, ValueError, r"^normal: expected std >= 0 \(as torch.normal\), got -1.0$"),
            (NAN, ValueError, r"^normal: expected std >= 0 \(as torch.normal\), got nan$"),
            (torch.tensor(-0.5), ValueError, r"^normal: expected std >= 0 \(as torch.normal\), got -0.5$"),
            (True, TypeError, r"^normal: expected a real number as std, got bool$"),
            (torch.tensor(1j), TypeError, r"^normal: expected a real number as std, got a tensor of dtype complex64"),
            (torch.tensor([0.5]), TypeError, r"^normal: expected a real number as std, got a tensor of dtype float32 "
                                             r"and shape \(1,\)$"),
            ("x", TypeError, r"^normal: expected a real number as std, got str$")]:
        rng = torch.get_rng_state()
        with pytest.raises(error, match=message):
            Swarm.normal(net, 3, std=std)
        assert torch.equal(torch.get_rng_state(), rng)
    as_tensor = Swarm.normal(net, 3, std=torch.tensor(0.5), generator=seeded(0))
    as_number = Swarm.normal(net, 3, std=0.5, generator=seeded(0))
    assert all(torch.equal(v, as_number.params[k]) for k, v in as_tensor.params.items())


# -- the vectorised forward against a loop of modules ------------------------------------------------
class Keywords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor, *, scale: float = 1.0, mask: Any = None, extra: Any = None) -> Any:
        h = self.drop(self.bn(self.fc(x))) * scale
        if mask is not None:
            h = h * mask
        if extra is not None:
            h = h + extra["b"]
        return {"out": h, "aux": (h.sum(), [h.mean()])}


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout2d(0.3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(F.relu(self.bn(self.conv(x)))).mean((2, 3)))


FORWARDS: list[tuple[Callable[[], nn.Module], Callable[[], Tensor], dict[str, Any]]] = [
    (Keywords, lambda: torch.randn(6, 3),
     {"scale": 2.0, "mask": torch.ones(4), "extra": {"b": torch.full((4,), 0.5)}}),
    (ConvNet, lambda: torch.randn(2, 2, 5, 5), {}),
    (batchnorm, lambda: torch.randn(6, 3), {}),
    (lambda: mlp().double(), lambda: torch.randn(4, 3, dtype=torch.float64), {}),
    (lambda: mlp().half(), lambda: torch.randn(4, 3).half(), {}),
]


@pytest.mark.parametrize("make,data,kwargs", FORWARDS)
def test_forward_matches_a_loop_of_modules(make: Callable[[], nn.Module], data: Callable[[], Tensor],
                                           kwargs: dict[str, Any]) -> None:
    torch.manual_seed(0)
    x = data()
    tol = 1e-3 if x.dtype == torch.float16 else 1e-5
    items = [make() for _ in range(4)]
    for item in items:
        for module in item.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
        item.eval()
    swarm = Swarm.stack(items)
    out = swarm(x, **kwargs)
    stacked = torch.stack([x + i for i in range(4)])
    per_member = swarm(stacked, in_dims=0, **kwargs)
    for i, item in enumerate(items):
        member = torch.utils._pytree.tree_map(lambda t, i=i: t[i], out)
        torch.testing.assert_close(member, item(x, **kwargs), rtol=tol, atol=tol)
        torch.testing.assert_close(member, swarm[i].module()(x, **kwargs), rtol=tol, atol=tol)
        torch.testing.assert_close(torch.utils._pytree.tree_map(lambda t, i=i: t[i], per_member),
                                   item(stacked[i], **kwargs), rtol=tol, atol=tol)
    # train mode (dropout off): outputs and the running statistics each member's forward leaves
    for item in items:
        item.train()
        for module in item.modules():
            if isinstance(module, (nn.Dropout, nn.Dropout2d)):
                module.p = 0.0
    swarm = Swarm.stack(items)
    out = swarm(x, **kwargs)
    for i, item in enumerate(items):
        torch.testing.assert_close(torch.utils._pytree.tree_map(lambda t, i=i: t[i], out), item(x, **kwargs),
                                   rtol=tol, atol=tol)
        for k, buffer in item.named_buffers():
            torch.testing.assert_close(swarm.buffers[k][i], buffer, rtol=tol, atol=tol)
