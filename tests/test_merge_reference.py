"""``nytorch.merge`` checked differentially against references written from the papers and from the
documented behaviour of timm (``ModelEmaV3``), ``torch.optim.swa_utils`` and scipy, never from our code.

References: Polyak / EMA (timm ``ModelEmaV3.get_decay`` and ``apply_update_``; TensorFlow's
``ExponentialMovingAverage`` warm-up), SWA (``AveragedModel``, ``update_bn``), model soups and greedy
soup (Wortsman et al. 2022, Algorithm 1), task arithmetic (Ilharco et al. 2023), TIES (Yadav et al.
2023), DARE (Yu et al. 2023), SLERP (Shoemake 1985, per tensor).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim import swa_utils

import nytorch as nyto
import nytorch.functional as nf
from nytorch import StructureError, merge

Tensor = torch.Tensor


# -- sample models ----------------------------------------------------------------------------------
class Net(nyto.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.norm(self.body(x))))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5)
        self.out.weight = self.embed.weight


def bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def stirred(model: nn.Module, index: int) -> nn.Module:
    """Distinct BatchNorm statistics and counts per model, so averaging vs copying shows."""
    with torch.no_grad():
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)
            else:
                buffer.fill_(10 * (index + 1))
    return model


def family(make, count: int, seed: int = 0) -> list:
    torch.manual_seed(seed)
    return [stirred(make(), index) for index in range(count)]


def state(model) -> dict[str, Tensor]:
    """Every named tensor of a model / Particle / dict, detached (a module's state_dict has tied names twice)."""
    if isinstance(model, nn.Module):
        return {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()}
    if isinstance(model, nyto.Particle):
        return {k: v.detach() for k, v in model.params.items()}
    return {k: v.detach() for k, v in model.items()}


def snapshot(values: list) -> list[dict[str, tuple[Tensor, int]]]:
    return [{k: (v.clone(), v.data_ptr()) for k, v in state(x).items()} for x in values]


def assert_untouched(values: list, before: list[dict[str, tuple[Tensor, int]]]) -> None:
    for value, saved in zip(values, before):
        now = state(value)
        assert now.keys() == saved.keys()
        for name, (copy_, pointer) in saved.items():
            assert torch.equal(now[name], copy_), name
            assert now[name].data_ptr() == pointer, name


# -- references (from the papers / the libraries' documented code) -------------------------------
def timm_get_decay(step: int, decay: float, min_decay: float = 0.0, warmup_gamma: float = 1.0,
                   warmup_power: float = 2 / 3, update_after_step: int = 0) -> float:
    """timm ``ModelEmaV3.get_decay(step)`` with ``use_warmup=True``."""
    step = max(0, step - update_after_step - 1)
    if step <= 0:
        return 0.0
    value = 1 - (1 + step / warmup_gamma) ** -warmup_power
    return max(min(value, decay), min_decay)


def timm_v3_update_(ema_state: dict[str, Tensor], model_state: dict[str, Tensor], decay: float) -> None:
    """timm ``ModelEmaV3.apply_update_`` (foreach): lerp floating state_dict entries, copy the others."""
    lerp_e, lerp_m = [], []
    for ema_v, model_v in zip(ema_state.values(), model_state.values()):
        if ema_v.is_floating_point():
            lerp_e.append(ema_v)
            lerp_m.append(model_v)
        else:
            ema_v.copy_(model_v)
    torch._foreach_lerp_(lerp_e, lerp_m, weight=1.0 - decay)


def ref_mean(values: list[dict[str, Tensor]], weights: list[float]) -> dict[str, Tensor]:
    """Σ wᵢ xᵢ / Σ wᵢ in float64, per tensor; integer tensors from the first."""
    total = sum(weights)
    out = {}
    for name, first in values[0].items():
        if first.is_floating_point():
            acc = sum(w * v[name].double() for w, v in zip(weights, values))
            out[name] = (acc / total).to(first.dtype)
        else:
            out[name] = first.clone()
    return out


def ref_greedy(values: list[dict[str, Tensor]], evaluate) -> tuple[list[int], float]:
    """Wortsman et al. 2022, Algorithm 1, ranked by held-out score; a candidate joins only if it scores higher."""
    scores = [evaluate(v) for v in values]
    order = sorted(range(len(values)), key=lambda i: -scores[i])
    kept, best = [order[0]], evaluate(values[order[0]])
    for index in order[1:]:
        candidate = ref_mean([values[i] for i in kept + [index]], [1.0] * (len(kept) + 1))
        score = evaluate(candidate)
        if score > best:
            kept, best = kept + [index], score
    return kept, best


def ref_task_arithmetic(base: dict[str, Tensor], tuned: list[dict[str, Tensor]], lambdas: list[float]):
    """Ilharco et al.: θ = θ_base + Σ λᵢ (θᵢ − θ_base)."""
    return {k: (b.double() + sum(l * (t[k] - b).double() for l, t in zip(lambdas, tuned))).to(b.dtype)
            for k, b in base.items()}


def ref_ties(base: dict[str, Tensor], tuned: list[dict[str, Tensor]], density: float, lam: float = 1.0):
    """Yadav et al. 2023: trim each task vector to its top-k magnitudes over the whole model (k = ⌊n·density⌋,
    ties at the threshold kept), elect γ = sign(Σ τ̂), disjoint mean over the agreeing entries."""
    names = list(base)
    trimmed = []
    for model in tuned:
        tau = {k: (model[k] - base[k]).double() for k in names}  # τ in the model's dtype, then exact
        flat = torch.cat([tau[k].reshape(-1) for k in names]).abs()
        keep = min(flat.numel(), math.floor(flat.numel() * density + 1e-9))
        if density >= 1.0:
            trimmed.append(tau)
            continue
        threshold = flat.sort(descending=True).values[keep - 1] if keep else math.inf
        trimmed.append({k: torch.where(v.abs() >= threshold, v, torch.zeros_like(v)) for k, v in tau.items()})
    out = {}
    for k in names:
        stack = torch.stack([t[k] for t in trimmed])
        gamma = torch.sign(stack.sum(0))
        agree = stack * gamma > 0
        merged = (stack * agree).sum(0) / agree.sum(0).clamp(min=1)
        out[k] = (base[k].double() + lam * merged).to(base[k].dtype)
    return out


def ref_dare(base: dict[str, Tensor], tuned: list[dict[str, Tensor]], p: float, lambdas: list[float],
             generator: torch.Generator) -> dict[str, Tensor]:
    """Yu et al. 2023: τ̃ = m ⊙ τ / (1 − p), m ~ Bernoulli(1 − p) drawn as ``rand >= p`` per tensor,
    model by model (the documented draw order); then θ_base + Σ λᵢ τ̃ᵢ."""
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in base.items()}
    for model, lam in zip(tuned, lambdas):
        for k, b in base.items():
            tau = model[k] - b
            draw = torch.rand(tau.shape, generator=generator,
                              dtype=torch.float64 if tau.dtype == torch.float64 else torch.float32)
            total[k] += lam * (tau.double() * (draw >= p).double() / (1 - p))
    return {k: (b.double() + total[k]).to(b.dtype) for k, b in base.items()}


def ref_slerp(a: Tensor, b: Tensor, t: float, threshold: float = 0.9995) -> Tensor:
    """Shoemake's SLERP on the flattened tensor, lerp when nearly (anti-)parallel or zero."""
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    norms = float(x.norm() * y.norm())
    if norms == 0.0:
        return torch.lerp(a, b, t)
    cosine = max(-1.0, min(1.0, float(x @ y) / norms))
    if abs(cosine) > threshold or math.sin(math.acos(cosine)) < 1e-6:
        return torch.lerp(a, b, t)
    omega = math.acos(cosine)
    sine = math.sin(omega)
    mixed = math.sin((1 - t) * omega) / sine * a.double() + math.sin(t * omega) / sine * b.double()
    return mixed.to(a.dtype)


def params_of(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def close(actual: Tensor, expected: Tensor, dtype: torch.dtype = torch.float32, name: str = "") -> None:
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(actual.detach(), expected, rtol=tol, atol=tol, msg=name)


# -- EMA / Polyak -----------------------------------------------------------------------------------
def train_steps(models_and_opts, steps: int, seed: int = 0):
    """The same SGD steps on every (model, optimizer) pair, yielding after each."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 3, generator=generator)
        for model, opt in models_and_opts:
            opt.zero_grad()
            model.train()
            model(x).pow(2).sum().backward()
            opt.step()
        yield


@pytest.mark.parametrize("use_buffers,buffers", [(True, "average"), (False, "copy")])
def test_ema_equals_averaged_model_with_ema_multi_avg_fn(use_buffers, buffers):
    torch.manual_seed(0)
    online = bn_net()
    twin = copy.deepcopy(online)
    reference = swa_utils.AveragedModel(twin, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.9),
                                        use_buffers=use_buffers)
    reference.update_parameters(twin)  # n_averaged == 0: a copy, as EMA(...) makes
    ema = merge.EMA(online, decay=0.9, buffers=buffers)
    pairs = [(online, torch.optim.SGD(online.parameters(), lr=0.1)), (twin, torch.optim.SGD(twin.parameters(), lr=0.1))]
    for _ in train_steps(pairs, 6):
        ema.update()
        reference.update_parameters(twin)
    ours, theirs = state(ema.averaged), state(reference.module)
    for name, value in ours.items():
        if value.is_floating_point():
            assert torch.equal(value, theirs[name]), name
    # the integer count is the model's (AveragedModel with use_buffers=True truncates it to 0)
    assert int(ours["1.num_batches_tracked"]) == int(online[1].num_batches_tracked) == 6


@pytest.mark.parametrize("decay,kwargs", [(0.9999, {}), (0.999, {"power": 0.75}),
                                          (0.99, {"gamma": 3.0, "power": 0.5, "min_decay": 0.3}),
                                          (0.5, {"min_decay": 0.5}), (1.0, {}), (0.0, {})])
def test_power_decay_is_timm_get_decay_of_the_next_step(decay, kwargs):
    schedule = merge.power_decay(decay, **kwargs)
    timm = dict(decay=decay, min_decay=kwargs.get("min_decay", 0.0), warmup_gamma=kwargs.get("gamma", 1.0),
                warmup_power=kwargs.get("power", 2 / 3))
    for step in list(range(300)) + [10**4, 10**6, 10**9]:
        # timm's train loop calls update(model, step=num_updates) after num_updates += 1
        assert schedule(step) == timm_get_decay(step + 1, **timm), step


def test_warmup_decay_is_the_tensorflow_num_updates_formula():
    for decay in (0.0, 0.5, 0.9, 0.999, 1.0):
        schedule = merge.warmup_decay(decay)
        for step in range(200):
            assert schedule(step) == min(decay, (1 + step) / (10 + step))
    # the docstring's switch-over step (10·decay − 1) / (1 − decay)
    schedule = merge.warmup_decay(0.9)
    assert schedule(79) < 0.9 == schedule(80)


def test_ema_with_schedule_follows_a_hand_written_model_ema_v3_loop():
    torch.manual_seed(1)
    online = bn_net()
    average = {k: v.clone() for k, v in online.state_dict().items()}
    ema = merge.EMA(online, decay=merge.power_decay(0.99, power=0.75))
    opt = torch.optim.SGD(online.parameters(), lr=0.05)
    for step, _ in enumerate(train_steps([(online, opt)], 25, seed=3)):
        ema.update()
        timm_v3_update_(average, online.state_dict(), timm_get_decay(step + 1, 0.99, warmup_power=0.75))
    for name, value in state(ema.averaged).items():
        assert torch.equal(value, average[name]), name
    assert ema.step == 25


@pytest.mark.parametrize("kind", ["module", "state_dict", "particle"])
def test_ema_updates_a_tied_weight_once(kind):
    torch.manual_seed(2)
    target, online = Tied(), Tied()
    start, end = target.embed.weight.detach().clone(), online.embed.weight.detach().clone()
    wrap = {"module": lambda m: m, "state_dict": lambda m: m.state_dict(), "particle": nyto.particle}[kind]
    merge.ema_(wrap(target), wrap(online), tau=0.25)
    once = torch.lerp(start, end, 0.25)
    assert torch.equal(target.embed.weight.detach(), once)
    assert target.out.weight is target.embed.weight
    assert not torch.equal(once, torch.lerp(once, end, 0.25))  # what a twice-updated tie would give


def test_ema_on_a_swarm_equals_a_loop_over_members_with_a_schedule():
    torch.manual_seed(3)
    members = [Net() for _ in range(3)]
    swarm = nyto.Swarm.stack(members)
    ema = merge.EMA(swarm, decay=merge.warmup_decay(0.9))
    expected = [{k: v.clone() for k, v in swarm[i].params.items()} for i in range(3)]
    for step in range(4):
        with torch.no_grad():
            for leaf in swarm.params.values():
                leaf.add_(torch.randn_like(leaf))
        ema.update()
        tau = 1 - min(0.9, (1 + step) / (10 + step))
        for i in range(3):
            for name, value in expected[i].items():
                value.lerp_(swarm.params[name][i], tau)
    for i in range(3):
        for name, value in expected[i].items():
            assert torch.equal(ema.averaged.params[name][i], value), (i, name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_ema_keeps_dtype_and_equals_torch_lerp(dtype):
    torch.manual_seed(4)
    online = bn_net().to(dtype)
    expected = {k: v.clone() for k, v in online.state_dict().items()}
    ema = merge.EMA(online, decay=0.8)
    for _ in range(3):
        with torch.no_grad():
            for p in online.parameters():
                p.add_(torch.randn_like(p))
            online[1].running_mean.add_(0.5)
            online[1].num_batches_tracked.add_(1)
        ema.update()
        for name, value in online.state_dict().items():
            if value.is_floating_point():
                expected[name] = torch.lerp(expected[name], value, 1 - 0.8)
            else:
                expected[name] = value.clone()
    for name, value in state(ema.averaged).items():
        assert value.dtype == expected[name].dtype and torch.equal(value, expected[name]), name


def test_ema_leaves_frozen_parameters_and_kept_buffers_alone():
    torch.manual_seed(5)
    target, online = stirred(Net(), 0), stirred(Net(), 1)
    target.set_param_config(operational=False, name="head.bias")
    before = state(target)
    before = {k: v.clone() for k, v in before.items()}
    merge.ema_(target, online, tau=0.5, buffers="keep")
    after = state(target)
    for name, value in before.items():
        if name == "head.bias" or "norm.running" in name or "num_batches" in name:
            assert torch.equal(after[name], value), name
        else:
            assert torch.equal(after[name], torch.lerp(value, state(online)[name], 0.5)), name


# -- averages ---------------------------------------------------------------------------------------
def test_uniform_average_equals_swa_running_mean_of_averaged_model():
    models = family(bn_net, 5)
    reference = swa_utils.AveragedModel(copy.deepcopy(models[0]), use_buffers=True)
    for model in models:
        reference.update_parameters(model)
    soup = merge.average(models)
    theirs = state(reference.module)
    for name, value in state(soup).items():
        if value.is_floating_point():
            torch.testing.assert_close(value, theirs[name], rtol=2e-7, atol=1e-7, msg=name)
        else:  # ours: the first model's count; AveragedModel's averaged integer counts are not comparable
            assert int(value) == 10


@pytest.mark.parametrize("kind", ["module", "particle", "dict", "swarm"])
@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5, 3.0], [0.0, 1.0, 0.0, 0.0], np.array([2, 1, 1, 0])])
@pytest.mark.parametrize("buffers", ["average", "copy", "keep"])
def test_average_matches_the_weighted_mean_for_every_kind(kind, weights, buffers):
    models = family(Net, 4, seed=6)
    make = {"module": lambda m: m, "particle": lambda m: nyto.particle(m, buffers=True, pack=False),
            "dict": lambda m: dict(m.state_dict()), "swarm": lambda m: m}[kind]
    inputs = [make(m) for m in models]
    if kind == "swarm":
        inputs = nyto.Swarm.stack(inputs)
    before = snapshot(models)
    soup = merge.average(inputs, weights=weights, buffers=buffers)
    assert_untouched(models, before)
    w = [1.0] * 4 if weights is None else [float(x) for x in weights]
    values = [state(m) for m in models]
    expected = ref_mean(values, w)
    got = state(soup)
    for name, value in got.items():
        if "running" in name and buffers != "average" and kind != "dict":  # a dict has no buffers
            close(value, values[0][name], name=name)
        else:
            close(value, expected[name], name=name)
        assert value.dtype == values[0][name].dtype
    if kind == "module":
        assert type(soup) is Net and all(p.is_leaf and p.requires_grad for p in soup.parameters())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_average_keeps_low_and_high_precision(dtype):
    torch.manual_seed(7)
    values = [{"w": (torch.randn(64, dtype=torch.float64) + 2).to(dtype), "n": torch.tensor(i)} for i in range(5)]
    soup = merge.average(values, weights=[1, 2, 3, 4, 5])
    expected = ref_mean(values, [1, 2, 3, 4, 5])
    assert soup["w"].dtype == dtype and int(soup["n"]) == 0
    # a running mean in the model's dtype: within a few roundings of the exactly rounded mean
    ulp = {torch.float64: 1e-15, torch.bfloat16: 4 * 2 ** -8, torch.float16: 4 * 2 ** -11}[dtype]
    torch.testing.assert_close(soup["w"].double(), expected["w"].double(), rtol=ulp, atol=0)


def test_greedy_soup_follows_algorithm_1_of_model_soups():
    torch.manual_seed(8)
    target = {"w": torch.randn(4, 3), "b": torch.randn(4)}

    def evaluate(value) -> float:
        value = state(value)
        return -sum(float((value[k] - target[k]).pow(2).sum()) for k in target)

    for _ in range(15):
        values = [{k: v + torch.randn_like(v) for k, v in target.items()} for _ in range(6)]
        kept, best = ref_greedy(values, evaluate)
        soup = merge.greedy_soup(values, evaluate)
        assert soup.ingredients == kept
        assert soup.score == pytest.approx(best, rel=1e-5)
        expected = ref_mean([values[i] for i in kept], [1.0] * len(kept))
        for name in target:
            close(soup.model[name], expected[name], name=name)


def test_greedy_soup_needs_a_strict_improvement_and_returns_the_evaluated_object():
    models = family(bn_net, 4, seed=9)
    seen = []

    def evaluate(model) -> float:
        seen.append(model)
        return 1.0

    soup = merge.greedy_soup(models, evaluate)
    assert soup.ingredients == [0] and soup.score == 1.0  # equal scores never join
    assert any(soup.model is m for m in seen) and all(soup.model is not m for m in models)
    assert torch.equal(soup.model[0].weight, models[0][0].weight)


def test_greedy_soup_of_a_swarm_equals_that_of_its_members():
    torch.manual_seed(10)
    members = [Net() for _ in range(5)]
    swarm = nyto.Swarm.stack(members)
    score = lambda p: -float(state(p)["head.weight"].pow(2).sum())  # noqa: E731
    ours = merge.greedy_soup(swarm, score)
    loop = merge.greedy_soup([nyto.particle(m) for m in members], score)
    assert ours.ingredients == loop.ingredients
    for name, value in ours.model.params.items():
        assert torch.equal(value, loop.model.params[name]), name


def test_update_bn_gives_exactly_swa_utils_update_bn():
    torch.manual_seed(11)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, momentum=0.3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(48, 5), nn.BatchNorm1d(5, momentum=None), nn.Linear(5, 2),
                        nn.BatchNorm1d(2, affine=False))
    net.eval()
    twin = copy.deepcopy(net)
    data = [(torch.randn(4, 2, 6, 6), torch.zeros(4)) for _ in range(5)]
    assert merge.update_bn(net, data) is net
    swa_utils.update_bn(data, twin)
    theirs = twin.state_dict()
    for name, value in net.state_dict().items():
        assert torch.equal(value, theirs[name]), name
    assert [net[1].momentum, net[5].momentum, net[7].momentum] == [0.3, None, 0.1]
    assert not any(m.training for m in net.modules())
    # the exact mean of the inputs over the data (equal batches), the mean of the batch variances
    small = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    batches = [torch.randn(8, 2) for _ in range(4)]
    merge.update_bn(small, batches)
    with torch.no_grad():
        features = [small[0](x) for x in batches]
    torch.testing.assert_close(small[1].running_mean, torch.cat(features).mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(small[1].running_var, torch.stack([f.var(0) for f in features]).mean(0),
                               rtol=1e-6, atol=1e-6)
    assert int(small[1].num_batches_tracked) == 4
    # generators of bare tensors, and a model without BatchNorm (returned untouched)
    again, twin2 = copy.deepcopy(twin), copy.deepcopy(twin)
    merge.update_bn(again, (x for x, _ in data))
    swa_utils.update_bn((x for x, _ in data), twin2)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), twin2.state_dict().values()))
    plain = nn.Linear(2, 2)
    saved = copy.deepcopy(plain.state_dict())
    assert merge.update_bn(plain, [torch.randn(3, 2)]) is plain
    assert all(torch.equal(v, saved[k]) for k, v in plain.state_dict().items())


def test_update_bn_on_a_soup_of_nyto_modules_equals_torch():
    models = family(Net, 3, seed=12)
    data = [torch.randn(8, 3) for _ in range(4)]
    for soup in (merge.average(models), (models[0] + models[1] + models[2]) / 3):
        twin = copy.deepcopy(soup)
        merge.update_bn(soup, data)
        swa_utils.update_bn(data, twin)
        for (name, a), b in zip(soup.state_dict().items(), twin.state_dict().values()):
            assert torch.equal(a, b), name


# -- task arithmetic, TIES, DARE, SLERP ---------------------------------------------------------------
def merge_inputs(kind: str, models: list):
    if kind == "module":
        return models
    if kind == "particle":
        return [nyto.particle(m, pack=False) for m in models]
    return [params_of(m) for m in models]


@pytest.mark.parametrize("kind", ["module", "particle", "dict"])
def test_task_arithmetic_matches_ilharco_for_every_kind(kind):
    models = family(Net, 4, seed=13)
    before = snapshot(models)
    base, *tuned = merge_inputs(kind, models)
    merged = merge.task_arithmetic(base, tuned, scale=[0.3, -1.0, 2.0])
    assert_untouched(models, before)
    expected = ref_task_arithmetic(params_of(models[0]), [params_of(m) for m in models[1:]], [0.3, -1.0, 2.0])
    got = state(merged)
    for name, value in expected.items():
        close(got[name], value, name=name)
    if kind == "module":  # buffers from base
        assert torch.equal(merged.norm.running_mean, models[0].norm.running_mean)
        assert merged.norm.running_mean is not models[0].norm.running_mean


@pytest.mark.parametrize("density", [0.2, 0.29, 0.5, 0.575, 1.0, 0.01])
@pytest.mark.parametrize("kind", ["module", "particle", "dict"])
def test_ties_matches_yadav_et_al(density, kind):
    models = family(Net, 4, seed=14)
    before = snapshot(models)
    base, *tuned = merge_inputs(kind, models)
    merged = merge.ties(base, tuned, density=density, scale=0.7)
    assert_untouched(models, before)
    expected = ref_ties(params_of(models[0]), [params_of(m) for m in models[1:]], density, 0.7)
    got = state(merged)
    for name, value in expected.items():
        close(got[name], value, name=name)


def test_ties_trim_keeps_exactly_k_and_ties_at_the_threshold():
    base = {"w": torch.zeros(100)}
    merged = merge.ties(base, [{"w": torch.arange(1.0, 101.0)}], density=0.29)
    assert int((merged["w"] != 0).sum()) == 29 and float(merged["w"][merged["w"] != 0].min()) == 72.0
    tied = {"w": torch.tensor([1.0, -1.0, 1.0, 2.0, 0.5, -1.0])}
    # k = 3: threshold |1|, all four entries of magnitude 1 stay
    assert merge.ties({"w": torch.zeros(6)}, [tied], density=0.5)["w"].tolist() == [1.0, -1.0, 1.0, 2.0, 0.0, -1.0]
    # a zero sum elects no sign: the entry is 0; disjoint mean over agreeing entries only
    a, b = {"w": torch.tensor([1.0, 3.0, -2.0])}, {"w": torch.tensor([-1.0, 1.0, 4.0])}
    assert merge.ties({"w": torch.zeros(3)}, [a, b], density=1.0)["w"].tolist() == [0.0, 2.0, 4.0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_ties_in_other_dtypes(dtype):
    torch.manual_seed(15)
    base = {"a": torch.randn(64).to(dtype), "b": torch.randn(3, 5).to(dtype)}
    tuned = [{k: v + torch.randn_like(v) for k, v in base.items()} for _ in range(3)]
    merged = merge.ties(base, tuned, density=0.3)
    expected = ref_ties(base, tuned, 0.3)
    for name, value in expected.items():
        assert merged[name].dtype == dtype
        # bf16: the election and the mean in bf16 round once or twice more than the float64 reference
        tol = 1e-12 if dtype == torch.float64 else 2 ** -6
        torch.testing.assert_close(merged[name].double(), value.double(), rtol=tol, atol=tol, msg=name)


def test_ties_counts_only_operational_parameters():
    models = family(Net, 3, seed=16)
    models[0].set_param_config(operational=False, name="body.weight")
    merged = merge.ties(models[0], models[1:], density=0.25)
    names = [n for n, _ in models[0].named_parameters() if n != "body.weight"]
    pick = lambda m: {k: v for k, v in params_of(m).items() if k in names}  # noqa: E731
    expected = ref_ties(pick(models[0]), [pick(m) for m in models[1:]], 0.25)
    got = state(merged)
    assert torch.equal(got["body.weight"], models[0].body.weight.detach())
    for name, value in expected.items():
        close(got[name], value, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dare_matches_yu_et_al_with_a_seeded_generator(dtype):
    models = [m.to(dtype) for m in family(Net, 4, seed=17)]
    before = snapshot(models)
    merged = merge.dare(models[0], models[1:], drop=0.7, scale=[0.5, 1.0, 2.0],
                        generator=torch.Generator().manual_seed(5))
    assert_untouched(models, before)
    expected = ref_dare(params_of(models[0]), [params_of(m) for m in models[1:]], 0.7, [0.5, 1.0, 2.0],
                        torch.Generator().manual_seed(5))
    got = state(merged)
    for name, value in expected.items():
        assert got[name].dtype == dtype
        tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 5e-2}[dtype]
        torch.testing.assert_close(got[name].double(), value.double(), rtol=tol, atol=tol, msg=name)


def test_dare_keeps_about_one_minus_p_rescaled_and_drop_zero_is_task_arithmetic():
    base, tuned = {"w": torch.zeros(200_000)}, {"w": torch.ones(200_000)}
    merged = merge.dare(base, [tuned], drop=0.9, generator=torch.Generator().manual_seed(0))["w"]
    assert abs(float((merged != 0).double().mean()) - 0.1) < 0.005
    kept = merged[merged != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 10.0))  # 1 / (1 − p)
    models = family(Net, 3, seed=18)
    plain = merge.task_arithmetic(models[0], models[1:], scale=0.4)
    same = merge.dare(models[0], models[1:], drop=0.0, scale=0.4)
    for name, value in state(plain).items():
        assert torch.equal(value, state(same)[name]), name
    # the global RNG is the default: the same seed gives the same masks
    torch.manual_seed(3)
    first = merge.dare(models[0], models[1:], drop=0.5)
    torch.manual_seed(3)
    second = merge.dare(models[0], models[1:], drop=0.5)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))


@pytest.mark.parametrize("t", [0.0, 1.0, 0.3, 0.5, -0.5, 1.5])
@pytest.mark.parametrize("kind", ["module", "particle", "dict"])
def test_slerp_matches_shoemake_per_tensor(t, kind):
    models = family(Net, 2, seed=19)
    before = snapshot(models)
    a, b = merge_inputs(kind, models)
    merged = merge.slerp(a, b, t)
    assert_untouched(models, before)
    got = state(merged)
    for name, x in params_of(models[0]).items():
        y = params_of(models[1])[name]
        if t in (0.0, 1.0):  # exact at the ends
            assert torch.equal(got[name], x if t == 0.0 else y), name
        else:
            close(got[name], ref_slerp(x, y, t), name=name)


def test_slerp_falls_back_to_lerp_for_parallel_opposite_and_zero_tensors():
    torch.manual_seed(20)
    x = torch.randn(50)
    near = x + 1e-3 * torch.randn(50)  # |cos| > 0.9995
    cases = {"near": near, "opposite": -2 * x, "same_direction": 3 * x}
    for name, y in cases.items():
        merged = merge.slerp({"w": x}, {"w": y}, 0.3)["w"]
        assert torch.equal(merged, torch.lerp(x, y, 0.3)), name
    zero = merge.slerp({"w": torch.zeros(3)}, {"w": torch.ones(3)}, 0.25)["w"]
    assert torch.equal(zero, torch.full((3,), 0.25))
    # threshold=1 still lerps exactly opposite tensors; a right angle is true SLERP
    assert torch.equal(merge.slerp({"w": x}, {"w": -x}, 0.5, threshold=1.0)["w"], torch.zeros(50))
    quarter = merge.slerp({"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}, 1 / 3)["w"]
    torch.testing.assert_close(quarter, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))


def test_merges_of_swarms_equal_loops_over_members():
    torch.manual_seed(21)
    base, one, two = (nyto.Swarm.stack(family(Net, 3, seed=s)) for s in (22, 23, 24))
    cases = {
        "task_arithmetic": lambda b, f: merge.task_arithmetic(b, f, scale=[0.3, 0.6]),
        "ties": lambda b, f: merge.ties(b, f, density=0.4, scale=0.9),
        "slerp": lambda b, f: merge.slerp(b, f[0], 0.4),
    }
    for name, fn in cases.items():
        merged = fn(base, [one, two])
        for i in range(3):
            single = fn(base[i], [one[i], two[i]])
            for key, value in single.params.items():
                assert torch.equal(merged.params[key][i], value), (name, i, key)
    merged = merge.dare(base, [one, two], drop=0.5, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)
    for i in range(3):
        single = merge.dare(base[i], [one[i], two[i]], drop=0.5, generator=generator)
        for key, value in single.params.items():
            assert torch.equal(merged.params[key][i], value), ("dare", i, key)


def test_merges_keep_tied_weights_tied():
    torch.manual_seed(25)
    models = [Tied() for _ in range(3)]
    results = [merge.average(models), merge.task_arithmetic(models[0], models[1:]),
               merge.ties(models[0], models[1:]), merge.dare(models[0], models[1:]),
               merge.slerp(models[0], models[1], 0.5)]
    for result in results:
        assert result.out.weight is result.embed.weight


def test_frozen_clone_false_parameters_are_shared_by_merge_results_as_by_arithmetic():
    models = family(Net, 3, seed=26)
    models[0].set_param_config(operational=False, clone=False, name="body.weight")
    frozen = models[0].body.weight
    assert (models[0] + models[1]).body.weight is frozen  # what particle arithmetic gives
    results = [merge.average(models), merge.greedy_soup(models, lambda m: 0.0).model,
               merge.task_arithmetic(models[0], models[1:]), merge.ties(models[0], models[1:]),
               merge.dare(models[0], models[1:]), merge.slerp(models[0], models[1], 0.5)]
    vector, unravel = merge.ravel(models[0])
    results.append(unravel(vector))
    particles = [nyto.particle(m, pack=False) for m in models]
    results.append(merge.average(particles).module())
    for result in results:
        assert result.body.weight is frozen
    # clone=True (the default): a copy with the same values
    models[0].set_param_config(clone=True, name="body.weight")
    soup = merge.average(models)
    assert soup.body.weight is not frozen and torch.equal(soup.body.weight, frozen)


# -- ravel / unravel ------------------------------------------------------------------------------
def test_ravel_of_a_tied_state_dict_takes_the_tie_once_and_ties_it_again():
    model = Tied()
    vector, unravel = merge.ravel(model.state_dict())
    assert torch.equal(vector, merge.ravel(model)[0])
    back = unravel(torch.arange(20.0))
    assert back["out.weight"] is back["embed.weight"]
    assert back["embed.weight"].flatten().tolist() == list(map(float, range(15)))
    assert back["out.bias"].tolist() == [15.0, 16.0, 17.0, 18.0, 19.0]


def test_ravel_round_trips_mixed_dtypes_through_numpy():
    torch.manual_seed(27)
    values = {"a": torch.randn(3).bfloat16(), "b": torch.randn(2).half(), "c": torch.randn(2, dtype=torch.float64),
              "i": torch.arange(3)}
    vector, unravel = merge.ravel(values)
    assert vector.dtype == torch.float64 and vector.shape == (7,)
    # optree's order for a plain dict: sorted keys
    assert torch.equal(vector, torch.cat([values[k].double() for k in "abc"]))
    # a list of Python floats (doubles) keeps float64 precision
    for given in (vector, vector.numpy(), vector.numpy()[::-1][::-1], vector.tolist(), tuple(vector.tolist())):
        back = unravel(given)
        for name, value in values.items():
            assert back[name].dtype == value.dtype and torch.equal(back[name], value), name
    array = vector.numpy().copy()
    back = unravel(array)
    array[:] = 9.0  # a copy, not a view
    assert torch.equal(back["c"], values["c"])


def test_ravel_of_a_swarm_is_member_rows():
    members = family(Net, 4, seed=28)
    swarm = nyto.Swarm.stack(members)
    vector, unravel = merge.ravel(swarm)
    for i, member in enumerate(members):
        assert torch.equal(vector[i], merge.ravel(member)[0])
        assert torch.equal(vector[i], torch.cat([p.detach().reshape(-1) for p in member.parameters()]))
    smaller = unravel(vector[:2].numpy() * 2)
    assert len(smaller) == 2
    for i in range(2):
        for name, value in params_of(members[i]).items():
            assert torch.equal(smaller[i].params[name], 2 * value), name


def test_ravel_drives_scipy_to_the_least_squares_solution():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    torch.manual_seed(29)
    x = torch.randn(60, 3, dtype=torch.float64)
    noise = 0.01 * torch.randn(60, 1, dtype=torch.float64)
    y = x @ torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64).T + 0.3 + noise
    net = nn.Linear(3, 1).double()
    params = nf.params(net)
    vector, unravel = merge.ravel(params)

    def loss_and_grad(array):
        flat = torch.tensor(array, requires_grad=True)
        loss = (nf.call(net, unravel(flat), x) - y).pow(2).mean()
        loss.backward()
        return loss.item(), flat.grad.numpy()

    found = scipy_optimize.minimize(loss_and_grad, vector.numpy(), jac=True, method="L-BFGS-B",
                                    options={"gtol": 1e-12, "ftol": 1e-15})
    solution = np.linalg.lstsq(np.c_[x.numpy(), np.ones(60)], y.numpy().ravel(), rcond=None)[0]
    fitted = unravel(found.x)
    np.testing.assert_allclose(fitted["weight"].numpy().ravel(), solution[:3], atol=1e-6)
    np.testing.assert_allclose(fitted["bias"].numpy(), solution[3:], atol=1e-6)
    # a derivative-free method on a module result, and a hand-written gradient loop on the vector
    module_vector, module_unravel = merge.ravel(net)
    powell = scipy_optimize.minimize(lambda a: float((module_unravel(a)(x) - y).pow(2).mean().detach()),
                                     module_vector.numpy(), method="Powell",
                                     options={"xtol": 1e-10, "ftol": 1e-14, "maxiter": 20000})
    np.testing.assert_allclose(powell.x, solution, atol=1e-5)
    flat = vector.clone().requires_grad_()
    for _ in range(2000):
        loss = (nf.call(net, unravel(flat), x) - y).pow(2).mean()
        (grad,) = torch.autograd.grad(loss, flat)
        with torch.no_grad():
            flat -= 0.1 * grad
    np.testing.assert_allclose(unravel(flat.detach())["weight"].numpy().ravel(), solution[:3], atol=1e-6)


def test_scale_takes_numpy_arrays_like_average_weights():
    models = family(Net, 3, seed=30)
    merged = merge.task_arithmetic(models[0], models[1:], scale=np.array([0.5, 2.0]))
    expected = ref_task_arithmetic(params_of(models[0]), [params_of(m) for m in models[1:]], [0.5, 2.0])
    for name, value in expected.items():
        close(state(merged)[name], value, name=name)
    same = merge.dare(models[0], models[1:], drop=0.0, scale=np.float64(0.5))
    halves = merge.task_arithmetic(models[0], models[1:], scale=np.array(0.5))
    assert all(torch.equal(a, b) for a, b in zip(same.parameters(), halves.parameters()))
    with pytest.raises(ValueError, match=r"task_arithmetic: expected one scale per fine-tuned model \(2\), got 3"):
        merge.task_arithmetic(models[0], models[1:], scale=np.ones(3))


# -- argument validation ------------------------------------------------------------------------------
def _bad_calls():
    a, b, wide = nn.Linear(2, 1), nn.Linear(2, 1), nn.Linear(3, 1)
    return [
        (lambda: merge.ema_(a, wide, tau=0.1), StructureError,
         r"ema_: parameter 'weight' differs: .*\(1, 3\).* in online"),
        (lambda: merge.ema_(a, b), TypeError, r"ema_: expected exactly one of decay=.* got neither"),
        (lambda: merge.ema_(a, b, tau=0.1, decay=0.9), TypeError, r"got both"),
        (lambda: merge.ema_(a, b, tau=float("nan")), ValueError, r"ema_: expected tau to be in \[0, 1\], got nan"),
        (lambda: merge.ema_(a, b, tau=0.1, buffers="avg"), ValueError, r"expected buffers to be one of"),
        (lambda: merge.ema_(a, b.double(), tau=0.1), StructureError, r"float32 vs .*float64"),
        (lambda: merge.EMA(a, decay=1.5), ValueError, r"EMA: expected decay to be in \[0, 1\], got 1.5"),
        (lambda: merge.average([]), TypeError, r"average: expected a non-empty sequence .* got an empty list"),
        (lambda: merge.average([a, wide]), StructureError, r"average: parameter 'weight' differs.* in models\[1\]"),
        (lambda: merge.average([a, b], weights=[1]), ValueError, r"expected 2 weights \(one per model\), got 1"),
        (lambda: merge.average([a, b], weights=[1, -1]), ValueError, r"expected weights >= 0, got weights\[1\] = -1"),
        (lambda: merge.average([a, b], weights=[0, 0]), ValueError, r"positive sum"),
        (lambda: merge.average([a, b], weights=np.ones((1, 2))), ValueError,
         r"expected weights to be 1-D, got shape \(1, 2\)"),
        (lambda: merge.greedy_soup([a, b], lambda m: "x"), TypeError,
         r"greedy_soup: expected evaluate to return a number"),
        (lambda: merge.ties(a, [b], density=0), ValueError,
         r"ties: expected density to be a fraction in \(0, 1\], got 0"),
        (lambda: merge.ties(a, [wide]), StructureError, r"ties: parameter 'weight' differs.* in finetuned\[0\]"),
        (lambda: merge.ties(a, []), TypeError, r"ties: expected a non-empty sequence of fine-tuned models"),
        (lambda: merge.dare(a, [b], drop=1.0), ValueError,
         r"dare: expected drop to be a probability in \[0, 1\), got 1.0"),
        (lambda: merge.task_arithmetic(a, [b], scale="x"), TypeError, r"expected scale to be a number or a sequence"),
        (lambda: merge.slerp(a, b, 0.5, threshold=2), ValueError, r"slerp: expected threshold in \[0, 1\], got 2"),
        (lambda: merge.slerp(a, b, float("inf")), TypeError, r"slerp: expected t to be a finite real number"),
        (lambda: merge.slerp(a, nn.Sequential(nn.Linear(2, 1)), 0.5), TypeError,
         r"first is of class Linear and second of class Sequential"),
        (lambda: merge.ravel("x"), TypeError, r"ravel: expected an nn.Module, a Particle, a Swarm or a dict"),
        (lambda: merge.ravel(a)[1](np.zeros(4)), StructureError,
         r"unravel: expected a vector of shape \(3,\), got shape \(4,\)"),
        (lambda: merge.update_bn({"x": 1}, []), TypeError, r"update_bn: expected an nn.Module as model, got dict"),
        (lambda: merge.power_decay(0.9, min_decay=0.95), ValueError, r"expected min_decay <= decay"),
        (lambda: merge.warmup_decay(0.9)(-1), ValueError, r"expected step to be an integer >= 0, got -1"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_arguments_raise_house_style_messages(index):
    call, error, pattern = _bad_calls()[index]
    with pytest.raises(error, match=pattern):
        call()
