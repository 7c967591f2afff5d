"""Swarm paths of nytorch.merge: EMA / ema_, ravel ([P, n]) and averages of a swarm's members."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import nytorch
from nytorch import StructureError, merge

try:
    from nytorch._swarm import Swarm
except ImportError:  # pragma: no cover - the swarm issue is not merged yet
    Swarm = None  # type: ignore[assignment,misc]

pytestmark = pytest.mark.skipif(Swarm is None, reason="nytorch.Swarm is not available yet")


def bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def members(count: int, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    models = []
    for index in range(count):
        model = bn_net()
        with torch.no_grad():
            model[1].running_mean.uniform_()
            model[1].num_batches_tracked.fill_(index + 1)
        models.append(model)
    return models


def test_ema_of_a_swarm_matches_per_member_reference():
    target_models, online_models = members(3, 0), members(3, 1)
    target, online = Swarm.stack(target_models), Swarm.stack(online_models)
    assert merge.ema_(target, online, tau=0.25) is target
    for index, (t, o) in enumerate(zip(target_models, online_models)):
        member = target[index]
        for name, value in member.params.items():
            expected = 0.75 * dict(t.named_parameters())[name].detach() + 0.25 * dict(o.named_parameters())[name]
            torch.testing.assert_close(value, expected.detach())
    buffers = target.buffers
    for index, (t, o) in enumerate(zip(target_models, online_models)):
        torch.testing.assert_close(buffers["1.running_mean"][index], 0.75 * t[1].running_mean + 0.25 * o[1].running_mean)
        assert int(buffers["1.num_batches_tracked"][index]) == int(o[1].num_batches_tracked)


def test_ema_helper_on_a_swarm():
    online_models = members(2, 2)
    swarm = Swarm.stack(online_models)
    ema = merge.EMA(swarm, decay=0.5)
    assert isinstance(ema.averaged, Swarm) and len(ema.averaged) == 2
    before = ema.averaged.params["0.weight"].clone()
    swarm += 1.0
    ema.update()
    torch.testing.assert_close(ema.averaged.params["0.weight"], 0.5 * before + 0.5 * swarm.params["0.weight"])
    with ema.swap():
        assert torch.equal(swarm.params["0.weight"], ema.averaged.params["0.weight"])
    assert not torch.equal(swarm.params["0.weight"], ema.averaged.params["0.weight"])


def test_ema_of_swarms_of_other_sizes_raises():
    with pytest.raises(StructureError, match=r"ema_: parameter '0\.weight' differs: shape \(3, 4, 3\) float32 vs "
                                             r"shape \(2, 4, 3\) float32 in online"):
        merge.ema_(Swarm.stack(members(3)), Swarm.stack(members(2)), tau=0.5)


def test_ravel_of_a_swarm_is_p_by_n_and_round_trips():
    models = members(3)
    swarm = Swarm.stack(models)
    vector, unravel = merge.ravel(swarm)
    n = sum(p.numel() for p in models[0].parameters())
    assert tuple(vector.shape) == (3, n)
    for index, model in enumerate(models):
        assert torch.equal(vector[index], merge.ravel(model)[0])
    again = unravel(vector.numpy() * 2)
    assert isinstance(again, Swarm) and len(again) == 3
    torch.testing.assert_close(merge.ravel(again)[0], vector * 2)
    five = unravel(torch.zeros(5, n))  # another population size, e.g. a CMA-ES generation
    assert len(five) == 5 and five.params["0.weight"].abs().sum() == 0
    with pytest.raises(StructureError, match=rf"unravel: expected a vector of shape \[P, {n}\], got shape \({n},\)"):
        unravel(torch.zeros(n))


def test_average_of_a_swarm_is_the_member_mean():
    models = members(4)
    soup = merge.average(Swarm.stack(models))
    assert isinstance(soup, nytorch.Particle)
    for name, value in soup.params.items():
        expected = torch.stack([dict(m.named_parameters())[name].detach() for m in models]).mean(0)
        torch.testing.assert_close(value, expected)


# -- merges of Swarms: member by member, exactly as a loop of per-member calls ------------------

PER_MEMBER = {
    "slerp": lambda base, first, second, gen: merge.slerp(first, second, 0.3),
    "ties": lambda base, first, second, gen: merge.ties(base, [first, second], density=0.29, scale=0.8),
    "dare": lambda base, first, second, gen: merge.dare(base, [first, second], drop=0.5, scale=[0.5, 2.0],
                                                        generator=gen),
    "task_arithmetic": lambda base, first, second, gen: merge.task_arithmetic(base, [first, second],
                                                                              scale=[0.3, -0.7]),
    "task_vector": lambda base, first, second, gen: merge.task_vector(first, base),
    "average": lambda base, first, second, gen: merge.average([base, first, second], weights=[1.0, 2.0, 3.0]),
}


@pytest.mark.parametrize("name", list(PER_MEMBER))
def test_merges_of_swarms_equal_a_loop_over_the_member_models(name):
    merging = PER_MEMBER[name]
    models = [members(3, seed) for seed in (0, 1, 2)]  # base, first, second: 3 members each
    with torch.no_grad():  # one member pair parallel, for slerp's linear fallback in that member only
        models[2][1][0].weight.copy_(2 * models[1][1][0].weight)
    whole = merging(*(Swarm.stack(group) for group in models), torch.Generator().manual_seed(5))
    assert isinstance(whole, Swarm) and len(whole) == 3
    gen = torch.Generator().manual_seed(5)  # one generator through the loop, as a user's loop would pass it
    for index in range(3):
        one = merging(*(group[index] for group in models), gen)
        for param_name, value in one.named_parameters():
            assert torch.equal(whole[index].params[param_name], value.detach()), (index, param_name)


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare"])
def test_a_swarm_of_finetuned_models_counts_as_its_members(name):
    base, finetuned = members(1, 3)[0], members(3, 4)
    merging = PER_MEMBER[name]
    whole = merging(base, *finetuned[:2], torch.Generator().manual_seed(1))
    merged = {"task_arithmetic": lambda fts: merge.task_arithmetic(base, fts, scale=[0.3, -0.7]),
              "ties": lambda fts: merge.ties(base, fts, density=0.29, scale=0.8),
              "dare": lambda fts: merge.dare(base, fts, drop=0.5, scale=[0.5, 2.0],
                                             generator=torch.Generator().manual_seed(1))}[name]
    from_swarm = merged(Swarm.stack(finetuned[:2]))
    for param_name, value in whole.named_parameters():
        assert torch.equal(dict(from_swarm.named_parameters())[param_name], value), param_name


def test_a_swarm_base_needs_a_list_of_swarms():
    base, finetuned = Swarm.stack(members(2, 0)), Swarm.stack(members(2, 1))
    with pytest.raises(TypeError, match=r"ties: expected a list of Swarms as finetuned when base is a Swarm .* "
                                        r"got one Swarm; pass \[finetuned\]"):
        merge.ties(base, finetuned)
    merged = merge.ties(base, [finetuned])
    assert isinstance(merged, Swarm) and len(merged) == 2


class _Frozen(nytorch.NytoModule):
    """A NytoModule whose first layer is left out of particle operations (``ParamConfig``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)
        self.set_param_config(operational=False, name="body")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _frozen_members(seed: int) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [_Frozen() for _ in range(3)]


PER_MEMBER_CONFIGS = {**PER_MEMBER,
                      "ema_": lambda base, first, second, gen: merge.ema_(base.clone(), first, decay=0.25)}


@pytest.mark.parametrize("name", sorted(PER_MEMBER_CONFIGS))
def test_merges_of_swarms_keep_the_members_param_configs(name):
    # a Swarm of NytoModules keeps their ParamConfigs: a non-operational layer stays out of every merge,
    # exactly as in a loop of per-member calls
    merging = PER_MEMBER_CONFIGS[name]
    models = [_frozen_members(seed) for seed in (0, 1, 2)]
    whole = merging(*(Swarm.stack(group) for group in models), torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    for index in range(3):
        one = merging(*(group[index].clone() if name == "ema_" else group[index] for group in models), gen)
        for param_name, value in one.named_parameters():
            assert torch.equal(whole[index].params[param_name], value.detach()), (index, param_name)


def test_ravel_of_a_swarm_keeps_the_members_param_configs():
    models = _frozen_members(0)
    vector, _ = merge.ravel(Swarm.stack(models))
    single, _ = merge.ravel(models[0])
    assert vector.shape == (3, single.numel()) == (3, 10)  # the head only: 4 * 2 + 2
    torch.testing.assert_close(vector[0], single)


@pytest.mark.parametrize("count", [1, 3, 5])
def test_unravel_of_a_swarm_carries_non_operational_parameters_to_any_member_count(count):
    # the frozen layer is not in the vector; for another member count it is member 0's, as Swarm.zeros carries it
    models = _frozen_members(0)
    swarm = Swarm.stack(models)
    vector, unravel = merge.ravel(swarm)
    values = torch.arange(count * vector.shape[1], dtype=torch.float32).reshape(count, -1)
    result = unravel(values.numpy())
    assert isinstance(result, Swarm) and len(result) == count
    for index in range(count):
        frozen = models[index if count == 3 else 0].body
        assert torch.equal(result.params["body.weight"][index], frozen.weight.detach())
        assert torch.equal(result.params["body.bias"][index], frozen.bias.detach())
        assert torch.equal(result.params["head.weight"][index].reshape(-1), values[index, :8])
        assert torch.equal(result.params["head.bias"][index], values[index, 8:])
    assert torch.equal(result.params["body.weight"], Swarm.zeros(swarm, count).params["body.weight"])
    assert tuple(result(torch.ones(7, 3)).shape) == (count, 7, 2)


# -- average of a Swarm: read from its flat buffers, the same as average of the member models -----
# The list path is a running mean of lerps, the swarm path one weighted sum: they agree up to float
# rounding (float32: a few ulps, checked at rtol=atol=1e-6), exactly where every member holds one value.

def wide_bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3), nn.BatchNorm1d(3))


def bn_members(count: int, seed: int, dtype: torch.dtype = torch.float32) -> list[nn.Module]:
    torch.manual_seed(seed)
    models = []
    for index in range(count):
        model = wide_bn_net()
        with torch.no_grad():
            for norm in (model[1], model[4]):
                norm.running_mean.normal_()
                norm.running_var.uniform_(0.5, 2.0)
                norm.num_batches_tracked.fill_(10 * index + 1)
        models.append(model.to(dtype))
    return models


def state_of(value) -> dict[str, torch.Tensor]:
    """Parameters and buffers of an average's result (a Particle of a swarm member, or a model)."""
    module = value.module() if isinstance(value, nytorch.Particle) else value
    return {**{n: p.detach() for n, p in module.named_parameters()}, **dict(module.named_buffers())}


def assert_state_close(got, want, rtol: float = 1e-6, atol: float = 1e-6) -> None:
    got, want = state_of(got), state_of(want)
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, equal_nan=True, msg=name)


WEIGHTS = {
    "uniform": lambda p, gen: None,
    "random": lambda p, gen: torch.rand(p, generator=gen),
    "zeros": lambda p, gen: torch.rand(p, generator=gen) * (torch.arange(p) % 3 != 0),  # member 0 has weight 0
    "one": lambda p, gen: torch.eye(p)[p - 2] * 2.5,
    "numpy": lambda p, gen: torch.rand(p, generator=gen).double().numpy(),
    "list": lambda p, gen: [float(x) for x in torch.rand(p, generator=gen)],
}


@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("buffers", ["average", "copy", "keep"])
@pytest.mark.parametrize("swarm_buffers", [False, True])
def test_average_of_a_swarm_equals_average_of_its_member_models(weights, buffers, swarm_buffers):
    models = bn_members(7, 0)
    swarm = Swarm.stack(models, buffers=swarm_buffers)
    w = WEIGHTS[weights](7, torch.Generator().manual_seed(1))
    soup = merge.average(swarm, weights=w, buffers=buffers)
    assert isinstance(soup, nytorch.Particle) and soup._with_buffers == swarm_buffers
    reference = merge.average(models, weights=w, buffers=buffers)
    assert_state_close(soup, reference)
    got = state_of(soup)
    # integer buffers (and with "copy"/"keep" every buffer) are member 0's, as the list path gives
    assert torch.equal(got["1.num_batches_tracked"], torch.tensor(1))
    if buffers != "average":
        assert torch.equal(got["4.running_mean"], models[0][4].running_mean)
    if weights == "one":  # one member of positive weight: that member, exactly
        for name, value in state_of(models[5]).items():
            if value.is_floating_point() and (buffers == "average" or "running" not in name):
                assert torch.equal(got[name], value), name


def test_average_of_a_swarm_keeps_values_every_member_shares_exactly():
    models = bn_members(6, 2)
    with torch.no_grad():
        for model in models[1:]:
            model[0].weight.copy_(models[0][0].weight)
            model[1].running_var.copy_(models[0][1].running_var)
        models[0][3].bias.fill_(0.1)
        for model in models[1:]:
            model[3].bias.fill_(0.1)
    soup = state_of(merge.average(Swarm.stack(models), weights=torch.rand(6) + 0.1))
    for name in ("0.weight", "1.running_var", "3.bias"):
        assert torch.equal(soup[name], state_of(models[0])[name]), name
    copies = Swarm.stack([models[0]] * 5)
    assert all(torch.equal(value, state_of(models[0])[name])
               for name, value in state_of(merge.average(copies, weights=[3, 1, 4, 1, 5])).items())


def test_average_of_a_swarm_follows_ieee_at_infinities_as_the_list_does():
    inf, nan = float("inf"), float("nan")
    models = bn_members(4, 3)
    columns = {  # running_mean[k] of members 0..3 (member 3 has weight 0)
        0: [-inf, -inf, -inf, 5.0],    # equal infinities stay
        1: [inf, -inf, 1.0, 1.0],      # +inf with -inf: NaN
        2: [nan, 1.0, 2.0, 3.0],       # NaN propagates
        3: [1.0, 2.0, 3.0, inf],       # a member of weight 0 takes no part, not 0 * inf
        4: [inf, 1.0, 2.0, -inf],      # one infinity: that infinity
        5: [3e38, 3e38, 3e38, 0.0],    # near the float32 maximum: no overflow
        6: [3e38, 3.4e38, 3.3e38, 0.0],
    }
    with torch.no_grad():
        for column, values in columns.items():
            for model, value in zip(models, values):
                model[1].running_mean[column] = value
    weights = [1.0, 2.0, 0.5, 0.0]
    soup = merge.average(Swarm.stack(models), weights=weights)
    reference = merge.average(models, weights=weights)
    assert_state_close(soup, reference)
    mean = state_of(soup)["1.running_mean"]
    assert mean[0] == -inf and mean[1].isnan() and mean[2].isnan() and mean[4] == inf
    assert torch.isclose(mean[3], torch.tensor((1.0 + 4.0 + 1.5) / 3.5)) and mean[5] == torch.tensor(3e38)
    assert mean[6].isfinite() and mean[6] <= torch.tensor(3.4e38)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_average_of_a_swarm_in_other_dtypes(dtype):
    models = bn_members(9, 4, dtype)
    weights = torch.rand(9, generator=torch.Generator().manual_seed(2)) * (torch.arange(9) != 4)
    soup = merge.average(Swarm.stack(models), weights=weights)
    # exact reference: float64 sums of the same values; the swarm sums 2-byte floats in float32 and rounds once
    wide = merge.average([model.double() for model in bn_members(9, 4, dtype)], weights=weights)
    eps = torch.finfo(dtype).eps
    for name, value in state_of(soup).items():
        assert value.dtype == state_of(models[0])[name].dtype, name
        want = state_of(wide)[name].to(value.dtype)
        torch.testing.assert_close(value, want, rtol=eps, atol=eps, msg=name)  # within one rounding
    # and close to the list path, whose running mean in the 2-byte dtype rounds once per member
    assert_state_close(soup, merge.average(models, weights=weights), rtol=8 * eps, atol=8 * eps)


@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")
def test_average_of_a_complex_swarm_equals_the_list():
    models = [nn.Linear(3, 2).to(torch.complex64) for _ in range(4)]
    with torch.no_grad():
        for model in models:
            model.weight.imag.normal_()
    weights = [0.5, 0.0, 2.0, 1.0]
    soup = merge.average(Swarm.stack(models), weights=weights)
    assert_state_close(soup, merge.average(models, weights=weights))


def test_average_of_a_swarm_in_chunks_equals_one_pass(monkeypatch):
    from nytorch.merge import _swarm_average

    models = bn_members(5, 5)
    with torch.no_grad():
        models[2][0].weight[3, 1] = float("inf")
    weights = [0.0, 1.0, 2.0, 3.0, 4.0]
    whole = state_of(merge.average(Swarm.stack(models), weights=weights))
    monkeypatch.setattr(_swarm_average, "CHUNK", 7)  # one or two columns at a time
    chunked = state_of(merge.average(Swarm.stack(models), weights=weights))
    for name, value in whole.items():
        torch.testing.assert_close(chunked[name], value, rtol=1e-6, atol=1e-6, equal_nan=True, msg=name)
    assert chunked["0.weight"][3, 1] == float("inf")


def test_average_of_a_swarm_leaves_non_operational_parameters_out():
    class Net(nytorch.NytoModule):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(3, 4)
            self.head = nn.Linear(4, 2)

    torch.manual_seed(6)
    models = [Net() for _ in range(3)]
    for model in models:
        model.set_param_config(operational=False, name="body")
    swarm = Swarm.stack(models)
    soup = merge.average(swarm, weights=[0.0, 1.0, 3.0])
    reference = merge.average(models, weights=[0.0, 1.0, 3.0])
    for name, value in soup.params.items():
        torch.testing.assert_close(value, dict(reference.named_parameters())[name].detach(), msg=name)
    assert torch.equal(soup.params["body.weight"], models[0].body.weight)  # member 0's, as the list's


def test_average_of_a_swarm_under_autocast_keeps_dtypes_and_values():
    models = bn_members(4, 7)
    swarm, weights = Swarm.stack(models), [1.0, 2.0, 3.0, 4.0]
    plain = state_of(merge.average(swarm, weights=weights))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = state_of(merge.average(swarm, weights=weights))
    for name, value in plain.items():
        assert under[name].dtype == value.dtype and torch.equal(under[name], value), name


def test_average_of_a_swarm_checks_its_weights_and_size():
    swarm = Swarm.stack(bn_members(3, 8))
    with pytest.raises(ValueError, match=r"average: expected weights >= 0, got weights\[1\] = -1\.0"):
        merge.average(swarm, weights=torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match=r"average: expected 3 weights \(one per model\), got 2"):
        merge.average(swarm, weights=np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"average: expected the weights to have a positive sum"):
        merge.average(swarm, weights=torch.zeros(3))
    with pytest.raises(TypeError, match=r"average: expected weights\[0\] to be a number, got bool"):
        merge.average(swarm, weights=torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"average: expected a non-empty sequence of models .* got an empty Swarm"):
        merge.average(swarm[:0])
