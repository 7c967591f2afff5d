"""EMA / Polyak: ``merge.ema_``, schedules and the ``EMA`` helper against per-tensor references."""
from __future__ import annotations

import copy
import io
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import nytorch
from nytorch import StructureError, merge
from nytorch._packing import flatten_


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.hidden = nn.Linear(4, 4)
        self.decode = nn.Linear(4, 5, bias=False)
        self.decode.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(torch.relu(self.hidden(self.embed(x))))


class Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("steps", torch.tensor(3, dtype=torch.int64))
        self.register_buffer("mask", torch.tensor([True, False]))
        self.register_buffer("scale", torch.ones(2))


class NytoNet(nytorch.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(2, 2)
        self.head = nn.Linear(2, 1)


def bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))


def perturbed(model: nn.Module, seed: int) -> nn.Module:
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(other.parameters()) + list(other.buffers()):
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=gen))
            elif tensor.dtype == torch.bool:
                tensor.logical_not_()
            else:
                tensor.add_(7)
    return other


def reference_ema(target: nn.Module, online: nn.Module, tau: float, buffers: str) -> dict[str, torch.Tensor]:
    """Per-tensor reference: unique tensors once, (1 - tau) * t + tau * o, integer leaves copied."""
    expected: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    online_params = dict(online.named_parameters())
    for name, param in target.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        expected[name] = (1 - tau) * param.detach() + tau * online_params[name].detach()
    online_buffers = dict(online.named_buffers())
    for name, buffer in target.named_buffers():
        source = online_buffers[name]
        if buffers == "keep":
            expected[name] = buffer.clone()
        elif buffers == "copy" or not buffer.is_floating_point():
            expected[name] = source.clone()
        else:
            expected[name] = (1 - tau) * buffer + tau * source
    return expected


def assert_state(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    for name, value in expected.items():
        assert state[name].dtype == value.dtype, name
        torch.testing.assert_close(state[name].detach(), value, msg=name)


MODELS = [bn_net, Tied, Counter, lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))]


@pytest.mark.parametrize("make", MODELS)
@pytest.mark.parametrize("buffers", ["average", "copy", "keep"])
def test_ema_matches_per_tensor_reference(make, buffers):
    torch.manual_seed(0)
    target = make()
    online = perturbed(target, 1)
    expected = reference_ema(target, online, 0.3, buffers)
    assert merge.ema_(target, online, tau=0.3, buffers=buffers) is target
    assert_state(target, expected)


def test_decay_and_tau_are_two_spellings_of_one_weight():
    torch.manual_seed(0)
    a, online = nn.Linear(3, 3), nn.Linear(3, 3)
    b = copy.deepcopy(a)
    merge.ema_(a, online, decay=0.75)
    merge.ema_(b, online, tau=0.25)
    assert torch.equal(a.weight, b.weight)


def test_tied_weight_is_updated_once():
    torch.manual_seed(0)
    target = Tied()
    online = perturbed(target, 2)
    twice = copy.deepcopy(target)
    before = target.embed.weight.detach().clone()
    merge.ema_(target, online, tau=0.5)
    assert target.decode.weight is target.embed.weight
    after = online.embed.weight.detach()
    torch.testing.assert_close(target.embed.weight.detach(), 0.5 * before + 0.5 * after)
    # timm-style iteration over state_dict() visits the tied tensor twice: 0.25 * before + 0.75 * online
    with torch.no_grad():
        for mine, theirs in zip(twice.state_dict().values(), online.state_dict().values()):
            if mine.is_floating_point():
                mine.lerp_(theirs, 0.5)
    torch.testing.assert_close(twice.embed.weight.detach(), 0.25 * before + 0.75 * after)


def test_tied_entries_of_a_state_dict_are_updated_once():
    torch.manual_seed(0)
    target, online = Tied(), Tied()
    before = target.embed.weight.detach().clone()
    state = target.state_dict()  # 'embed.weight' and 'decode.weight' are one tensor
    assert state["embed.weight"].data_ptr() == state["decode.weight"].data_ptr()
    merge.ema_(state, online.state_dict(), tau=0.5)
    torch.testing.assert_close(target.embed.weight.detach(), 0.5 * before + 0.5 * online.embed.weight.detach())


def test_integer_buffers_are_copied_never_truncated():
    torch.manual_seed(0)
    target, online = bn_net(), bn_net()
    target[1].num_batches_tracked.fill_(5)
    online[1].num_batches_tracked.fill_(12)
    merge.ema_(target, online, decay=0.9)
    assert target[1].num_batches_tracked.dtype == torch.int64
    assert int(target[1].num_batches_tracked) == 12
    keep = bn_net()
    keep[1].num_batches_tracked.fill_(5)
    merge.ema_(keep, online, decay=0.9, buffers="keep")
    assert int(keep[1].num_batches_tracked) == 5
    # torch's AveragedModel with use_buffers=True truncates: 5 * 0.9 + 12 * 0.1 = 5.7 -> 5
    averaged = AveragedModel(online, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    averaged.module[1].num_batches_tracked.fill_(5)
    averaged.n_averaged.fill_(1)
    averaged.update_parameters(online)
    assert int(averaged.module[1].num_batches_tracked) == 5


def test_bool_and_int_buffers_copied_float_buffer_averaged():
    target, online = Counter(), Counter()
    online.steps.fill_(9)
    online.mask.copy_(torch.tensor([False, True]))
    online.scale.fill_(3.0)
    merge.ema_(target, online, tau=0.5)
    assert int(target.steps) == 9 and target.mask.tolist() == [False, True]
    assert target.scale.tolist() == [2.0, 2.0]


def test_non_operational_parameters_are_left_alone():
    torch.manual_seed(0)
    target = NytoNet()
    target.set_param_config(operational=False, name="frozen")
    online = NytoNet()
    frozen = target.frozen.weight.detach().clone()
    head = 0.5 * target.head.weight.detach() + 0.5 * online.head.weight.detach()
    merge.ema_(target, online, tau=0.5)
    assert torch.equal(target.frozen.weight, frozen)
    torch.testing.assert_close(target.head.weight.detach(), head)


def test_particles_update_the_model_they_view():
    torch.manual_seed(0)
    target, online = nn.Linear(3, 2), nn.Linear(3, 2)
    expected = 0.9 * target.weight.detach() + 0.1 * online.weight.detach()
    merge.ema_(nytorch.particle(target), nytorch.particle(online), tau=0.1)
    torch.testing.assert_close(target.weight.detach(), expected)


def test_particles_with_buffers_average_floating_buffers():
    torch.manual_seed(0)
    target, online = bn_net(), perturbed(bn_net(), 3)
    expected = reference_ema(target, online, 0.2, "average")
    merge.ema_(nytorch.particle(target, buffers=True), nytorch.particle(online, buffers=True), tau=0.2)
    assert_state(target, expected)


@pytest.mark.parametrize("other, message", [
    (lambda: nn.Sequential(nn.Linear(4, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 2)),
     r"ema_: parameter '0\.weight' differs: shape \(6, 4\) float32 vs shape \(7, 4\) float32 in online"),
    (lambda: nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2, bias=False)),
     r"ema_: parameter '3\.bias' is missing from online"),
    (lambda: nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).double(),
     r"ema_: parameter '0\.weight' differs: shape \(6, 4\) float32 vs shape \(6, 4\) float64"),
    (lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.ReLU(), nn.Linear(6, 2)),
     r"ema_: parameter '1\.weight' is missing from online"),
])
def test_mismatched_models_raise_naming_the_parameter(other, message):
    target = bn_net()
    before = [p.detach().clone() for p in target.parameters()]
    with pytest.raises(StructureError, match=message):
        merge.ema_(target, other(), tau=0.5)
    assert all(torch.equal(a, b) for a, b in zip(before, target.parameters()))


def test_device_mismatch_raises():
    with pytest.raises(nytorch.DeviceMismatchError, match=r"ema_: parameter 'weight' is on cpu but on meta"):
        merge.ema_(nn.Linear(2, 2), nn.Linear(2, 2, device="meta"), tau=0.5)


class Ordered(nn.Module):
    """Parameters ``x``, ``y``, ``z`` registered in the given order."""

    def __init__(self, order: str) -> None:
        super().__init__()
        for name in order:
            self.register_parameter(name, nn.Parameter(torch.zeros(2)))


@pytest.mark.parametrize("call, message", [
    (lambda a, b: merge.ema_(a, b, tau=0.5),
     r"ema_: online lists the same parameters in another order: parameter 'y' is at position 1 in target "
     r"but 2 in online"),
    (lambda a, b: merge.average([a, b]),
     r"average: models\[1\] lists the same parameters in another order: parameter 'y' is at position 1 in "
     r"models\[0\] but 2 in models\[1\]"),
    (lambda a, b: merge.EMA(a).update(b),
     r"EMA\.update: model lists the same parameters in another order: parameter 'y' is at position 1 in the "
     r"average but 2 in model"),
    (lambda a, b: merge.slerp(a, b, 0.5),
     r"slerp: second lists the same parameters in another order: parameter 'y' is at position 1 in first"),
    (lambda a, b: merge.task_arithmetic(a, [a, b]),
     r"task_arithmetic: finetuned\[1\] lists the same parameters in another order: parameter 'y' is at "
     r"position 1 in base but 2 in finetuned\[1\]"),
])
def test_parameters_in_another_order_are_named(call, message):
    first, second = Ordered("xyz"), Ordered("xzy")
    assert sorted(dict(first.named_parameters())) == sorted(dict(second.named_parameters()))
    with pytest.raises(StructureError, match=message):
        call(first, second)


@pytest.mark.parametrize("kwargs, error, message", [
    ({}, TypeError, r"ema_: expected exactly one of decay= .* got neither"),
    ({"decay": 0.9, "tau": 0.1}, TypeError, r"ema_: expected exactly one of decay= .* got both"),
    ({"decay": 1.5}, ValueError, r"ema_: expected decay to be in \[0, 1\], got 1\.5"),
    ({"tau": -0.1}, ValueError, r"ema_: expected tau to be in \[0, 1\], got -0\.1"),
    ({"tau": True}, TypeError, r"ema_: expected tau to be a number in \[0, 1\], got bool"),
    ({"tau": torch.ones(2)}, TypeError, r"ema_: expected tau to be a number or a 0-dim floating tensor"),
    ({"tau": torch.tensor(-3.0)}, ValueError, r"ema_: expected tau to be in \[0, 1\], got tensor\(-3\.\)"),
    ({"decay": torch.tensor(1.5, dtype=torch.float64)}, ValueError,
     r"ema_: expected decay to be in \[0, 1\], got tensor\(1\.5000, dtype=torch\.float64\)"),
    ({"tau": torch.tensor(float("nan"))}, ValueError, r"ema_: expected tau to be in \[0, 1\], got tensor\(nan\)"),
    ({"tau": 0.1, "buffers": "mean"}, ValueError, r"ema_: expected buffers to be one of"),
])
def test_bad_weights_and_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        merge.ema_(nn.Linear(2, 2), nn.Linear(2, 2), **kwargs)


def test_bad_weights_change_nothing():
    target, online = nn.Linear(2, 2), nn.Linear(2, 2)
    before = [p.detach().clone() for p in target.parameters()]
    with pytest.raises(ValueError, match=r"ema_: expected tau to be in \[0, 1\]"):
        merge.ema_(target, online, tau=torch.tensor(1.01))
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), before))


@pytest.mark.parametrize("value", [1.5, torch.tensor(1.5), torch.tensor(-0.5, dtype=torch.float64)])
def test_ema_schedule_out_of_range_raises_for_numbers_and_tensors(value):
    ema = merge.EMA(nn.Linear(2, 2), decay=lambda step: value)
    before = ema.averaged.weight.clone()
    with pytest.raises(ValueError, match=r"EMA\.update: expected decay to be in \[0, 1\], got "):
        ema.update()
    assert ema.step == 0 and torch.equal(ema.averaged.weight, before)


def test_unsupported_operand():
    with pytest.raises(TypeError, match=r"ema_: expected an nn.Module, a Particle, a Swarm or a dict of tensors as "
                                        r"online, got int"):
        merge.ema_(nn.Linear(2, 2), 3, tau=0.5)


def test_zero_dim_tensor_weight():
    torch.manual_seed(0)
    target, online = nn.Linear(2, 2), nn.Linear(2, 2)
    expected = 0.75 * target.weight.detach() + 0.25 * online.weight.detach()
    merge.ema_(target, online, tau=torch.tensor(0.25))
    torch.testing.assert_close(target.weight.detach(), expected)


# -- schedules -------------------------------------------------------------------------


def test_warmup_decay_formula():
    schedule = merge.warmup_decay(0.99)
    for step in range(0, 2000, 7):
        assert schedule(step) == min(0.99, (1 + step) / (10 + step))


def timm_get_decay(step: int, decay: float, gamma: float, power: float, min_decay: float) -> float:
    """timm ModelEmaV3.get_decay with use_warmup=True, update_after_step=0."""
    step = max(0, step - 0 - 1)
    if step <= 0:
        return 0.0
    value = 1 - (1 + step / gamma) ** -power
    return max(min(value, decay), min_decay)


@pytest.mark.parametrize("gamma, power, min_decay", [(1.0, 2 / 3, 0.0), (2.0, 3 / 4, 0.1), (1.0, 0.75, 0.5)])
def test_power_decay_matches_timm(gamma, power, min_decay):
    schedule = merge.power_decay(0.999, gamma=gamma, power=power, min_decay=min_decay)
    for step in list(range(0, 5000, 13)) + [1, 2, 3]:
        expected = timm_get_decay(step + 1, 0.999, gamma, power, min_decay)
        assert schedule(step) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_power_decay_copies_the_model_at_the_first_update_whatever_min_decay():
    """timm returns 0.0 for the first update before it applies ``min_decay``."""
    assert merge.power_decay(0.9999, power=0.75, min_decay=0.1)(0) == 0.0
    schedule = merge.power_decay(0.9999, power=0.75, min_decay=0.5)
    assert [schedule(0), schedule(1)] == [0.0, 0.5]  # 1 - 2**-0.75 = 0.405 < 0.5: min_decay binds from step 1
    model = nn.Linear(2, 2)
    ema = merge.EMA(model, decay=merge.power_decay(0.9, min_decay=0.5))
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    assert torch.equal(ema.averaged.weight, model.weight)


@pytest.mark.parametrize("make, message", [
    (lambda: merge.warmup_decay(1.2), r"warmup_decay: expected decay to be a number in \[0, 1\], got 1\.2"),
    (lambda: merge.power_decay(0.9, gamma=0), r"power_decay: expected gamma to be a positive number, got 0"),
    (lambda: merge.power_decay(0.9, min_decay=0.95), r"power_decay: expected min_decay <= decay"),
    (lambda: merge.warmup_decay(0.9)(-1), r"warmup_decay: expected step to be an integer >= 0, got -1"),
])
def test_schedule_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# -- the EMA helper ----------------------------------------------------------------------


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, gen: torch.Generator) -> None:
    x = torch.randn(16, 4, generator=gen)
    loss = model(x).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("schedule", [None, "warmup", "power"])
def test_ema_helper_matches_reference_loop(schedule):
    torch.manual_seed(0)
    model = bn_net()
    decay = {None: 0.9, "warmup": merge.warmup_decay(0.95), "power": merge.power_decay(0.95)}[schedule]
    ema = merge.EMA(model, decay=decay)
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        train_step(model, optimizer, gen)
        d = decay if isinstance(decay, float) else decay(step)
        assert ema.decay == d
        expected = reference_ema(reference, model, 1 - d, "average")
        reference.load_state_dict(expected)
        ema.update(model)
        assert ema.step == step + 1
        assert_state(ema.averaged, expected)
    assert not ema.averaged.training
    assert all(not p.requires_grad for p in ema.averaged.parameters())


def test_ema_helper_is_independent_of_the_model():
    torch.manual_seed(0)
    model = Tied()
    ema = merge.EMA(model)
    assert ema.averaged.decode.weight is ema.averaged.embed.weight
    assert ema.averaged.embed.weight.data_ptr() != model.embed.weight.data_ptr()
    assert model.embed.weight.requires_grad


def test_swap_puts_averages_in_and_restores_even_on_error():
    torch.manual_seed(0)
    model = bn_net()
    ema = merge.EMA(model, decay=0.5)
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.add_(1.0)
        model[1].running_mean.add_(2.0)
    ema.update()
    trained = copy.deepcopy(model.state_dict())
    with ema.swap() as swapped:
        assert swapped is model
        for name, value in ema.averaged.state_dict().items():
            assert torch.equal(model.state_dict()[name], value), name
    for name, value in trained.items():
        assert torch.equal(model.state_dict()[name], value)
    with pytest.raises(RuntimeError, match="boom"):
        with ema.swap():
            raise RuntimeError("boom")
    for name, value in trained.items():
        assert torch.equal(model.state_dict()[name], value)


def test_copy_to_and_state_dict_round_trip():
    torch.manual_seed(0)
    model = bn_net()
    ema = merge.EMA(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()
    state = copy.deepcopy(ema.state_dict())
    other = merge.EMA(bn_net(), decay=0.5)
    other.load_state_dict(state)
    assert other.step == 1
    assert torch.equal(other.averaged[0].weight, ema.averaged[0].weight)
    fresh = bn_net()
    ema.copy_to(fresh)
    assert torch.equal(fresh[0].weight, ema.averaged[0].weight)
    with pytest.raises(StructureError, match=r"EMA.load_state_dict: parameter '0\.bias' is missing from state"):
        other.load_state_dict({"step": 0, "averaged": {"0.weight": torch.zeros(6, 4)}})


def _trained_ema(model: nn.Module, **kwargs) -> merge.EMA:
    ema = merge.EMA(model, decay=0.5, **kwargs)
    for seed in (1, 2):
        with torch.no_grad():
            for target, source in zip(model.parameters(), perturbed(model, seed).parameters()):
                target.copy_(source)
        ema.update()
    return ema


@pytest.mark.parametrize("make", [bn_net, Tied])
@pytest.mark.parametrize("saved", ["reversed", "sorted", "averaged module", "float64"])
def test_load_state_dict_matches_by_name_and_casts_like_torch(make, saved):
    torch.manual_seed(0)
    ema = _trained_ema(make())
    averaged = ema.state_dict()["averaged"]
    if saved == "reversed":
        values = dict(reversed(list(averaged.items())))
    elif saved == "sorted":
        values = dict(sorted(averaged.items()))
    elif saved == "averaged module":  # every name of a tied weight, like nn.Module.state_dict()
        values = ema.averaged.state_dict()
        assert len(values) > len(averaged) or make is bn_net
    else:
        values = {k: v.double() + 1e-9 if v.is_floating_point() else v for k, v in averaged.items()}
    values = {k: v.clone() for k, v in values.items()}
    other = merge.EMA(make())
    other.load_state_dict({"step": torch.tensor(2), "averaged": values})
    reference = make()  # the torch answer: nn.Module.load_state_dict of the same values
    reference.load_state_dict(values, strict=make is not Tied)  # Tied: one name may stand for both
    assert other.step == 2
    for name, value in reference.state_dict().items():
        assert other.averaged.state_dict()[name].dtype == value.dtype, name
        assert torch.equal(other.averaged.state_dict()[name], value), name


def test_load_state_dict_from_an_averaged_model():
    torch.manual_seed(0)
    model = bn_net()
    swa = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    swa.update_parameters(perturbed(model, 1))
    ema = merge.EMA(bn_net(), buffers="copy")
    ema.load_state_dict({"step": int(swa.n_averaged), "averaged": swa.module.state_dict()})
    for name, value in swa.module.state_dict().items():
        assert torch.equal(ema.averaged.state_dict()[name], value), name
    assert ema.step == 1


@pytest.mark.parametrize("change, error, message", [
    (lambda s: {**s, "extra": torch.zeros(1)}, StructureError,
     r"EMA\.load_state_dict: state has an extra parameter 'extra', which the average does not have"),
    (lambda s: {k: v for k, v in s.items() if k != "3.bias"}, StructureError,
     r"EMA\.load_state_dict: parameter '3\.bias' is missing from state"),
    (lambda s: {**s, "0.weight": torch.zeros(4, 6)}, StructureError,
     r"EMA\.load_state_dict: parameter '0\.weight' differs: shape \(6, 4\) float32 vs shape \(4, 6\) float32 "
     r"in state"),
    (lambda s: {**s, "3.bias": torch.zeros(2, dtype=torch.complex64)}, TypeError,
     r"EMA\.load_state_dict: expected a real tensor for parameter '3\.bias' \(shape \(2,\) float32\), got "
     r"shape \(2,\) complex64 in state"),
])
def test_load_state_dict_errors_change_nothing(change, error, message):
    torch.manual_seed(0)
    ema = _trained_ema(bn_net())
    before = {k: v.clone() for k, v in ema.averaged.state_dict().items()}
    saved = {k: v + 1 if v.is_floating_point() else v for k, v in ema.state_dict()["averaged"].items()}
    with pytest.raises(error, match=message):
        ema.load_state_dict({"step": 7, "averaged": change(dict(reversed(list(saved.items()))))})
    assert ema.step == 2
    assert all(torch.equal(value, before[name]) for name, value in ema.averaged.state_dict().items())


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("kind", ["module", "particle", "other model"])
def test_ema_follows_param_configs_changed_after_it_was_made(pack, kind):
    torch.manual_seed(0)
    model = NytoNet()
    ema = merge.EMA(nytorch.particle(model) if kind == "particle" else model, decay=0.5, pack=pack)

    def step() -> dict[str, torch.Tensor]:
        """Move the model, update, and return the averages before the update."""
        before = {k: v.detach().clone() for k, v in ema.state_dict()["averaged"].items()}
        with torch.no_grad():
            for tensor in model.parameters():
                tensor.add_(1.0)
        ema.update(copy.deepcopy(model) if kind == "other model" else None)
        return before

    def check(before: dict[str, torch.Tensor], frozen: bool) -> None:
        live = dict(model.named_parameters())
        for name, value in ema.state_dict()["averaged"].items():
            expected = before[name] if frozen and name.startswith("frozen.") else 0.5 * (before[name] + live[name])
            torch.testing.assert_close(value, expected.detach(), msg=name)

    check(step(), frozen=False)
    model.set_param_config(operational=False, name="frozen")   # adds configs to the model's table
    check(step(), frozen=True)
    model.apply_param_config(lambda pid, config: setattr(config, "operational", True))  # flips them back
    check(step(), frozen=False)
    model.set_param_config(operational=False, name="frozen")
    check(step(), frozen=True)
    assert ema.step == 4
    if kind != "particle":  # swap and copy_to leave a non-operational parameter alone, as at construction
        trained = model.frozen.weight.detach().clone()
        with ema.swap():
            assert torch.equal(model.frozen.weight, trained)
            assert torch.equal(model.head.weight, ema.averaged.head.weight)
        ema.copy_to()
        assert torch.equal(model.frozen.weight, trained)


def test_saving_part_of_a_packed_model_writes_the_whole_buffer_unless_cloned():
    """What the ``pack`` docs (and the README's "Packing") say about ``torch.save`` after packing."""
    def saved_bytes(value: object) -> int:
        buffer = io.BytesIO()
        torch.save(value, buffer)
        return buffer.tell()

    model = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 100))
    one_layer = 100 * 101 * 4
    assert saved_bytes(model[0].state_dict()) < 1.1 * one_layer   # not packed yet: that layer only
    ema = merge.EMA(model)
    for part in (model[0].weight, model[0].state_dict(), ema.averaged[0].state_dict()):
        assert saved_bytes(part) > 2 * one_layer                   # views: the whole packed buffer
    cloned = {k: v.clone() for k, v in model[0].state_dict().items()}
    assert saved_bytes(cloned) < 1.1 * one_layer
    assert saved_bytes(model.state_dict()) < 2.1 * one_layer      # the whole model: the buffer once
    buffer = io.BytesIO()
    torch.save(cloned, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)
    assert all(torch.equal(loaded[k], v) for k, v in model[0].state_dict().items())


def test_update_with_another_model_is_checked():
    ema = merge.EMA(bn_net())
    with pytest.raises(StructureError, match=r"EMA.update: parameter '3\.weight' differs: shape \(2, 6\) float32 vs "
                                             r"shape \(3, 6\) float32 in model"):
        ema.update(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)))


def test_converted_model_is_noticed():
    model = bn_net()
    ema = merge.EMA(model)
    model.double()
    with pytest.raises(StructureError, match=r"EMA.update: parameter '0\.weight' differs: shape \(6, 4\) float32 vs "
                                             r"shape \(6, 4\) float64 in model"):
        ema.update()


@pytest.mark.parametrize("pack", [True, False])
def test_new_storage_for_any_one_parameter_is_followed(pack):
    """``param.data = ...`` on a middle parameter: the next update averages the new values, like an optimizer."""
    model = nn.Sequential(*(nn.Linear(3, 3) for _ in range(4)))
    ema = merge.EMA(model, decay=0.0, pack=pack)  # decay 0: the average becomes the model
    model[2].weight.data = torch.full((3, 3), 7.0)
    ema.update()
    assert torch.equal(ema.averaged[2].weight, torch.full((3, 3), 7.0))
    assert all(torch.equal(a, b) for a, b in zip(ema.averaged.parameters(), model.parameters()))
    with torch.no_grad():
        model[1].bias.add_(1.0)  # and the next update reads the model's values again, wherever they live
    ema.update()
    assert torch.equal(ema.averaged[1].bias, model[1].bias)


@pytest.fixture
def overwrite_on_conversion():
    """``torch.__future__.set_overwrite_module_params_on_conversion(True)`` for one test, restored afterwards."""
    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(previous)


def perturb_(model: nn.Module, amount: float) -> None:
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point():
                tensor.add_(amount)


@pytest.mark.parametrize("pack", [True, False])
def test_model_moved_to_meta_raises(pack):
    """``.to("meta")`` puts new Parameter objects in the model; the old ones keep their storage."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    ema = merge.EMA(model, decay=0.5, pack=pack)
    weight = model[0].weight
    model.to("meta")
    assert model[0].weight is not weight and weight.device.type == "cpu"
    for _ in range(2):  # and every update after
        with pytest.raises(nytorch.DeviceMismatchError, match=r"EMA\.update: parameter '0\.weight' is on cpu but "
                                                             r"on meta in model; move both to one device first"):
            ema.update()
    assert ema.step == 0


@pytest.mark.parametrize("pack", [True, False])
def test_conversion_to_new_parameter_objects_is_checked_then_followed(pack, overwrite_on_conversion):
    """Under ``overwrite_module_params_on_conversion`` a ``.double()`` makes new Parameter objects."""
    torch.manual_seed(0)
    model = bn_net()
    ema = merge.EMA(model, decay=0.5, pack=pack)
    weight = model[0].weight
    model.double()
    assert model[0].weight is not weight
    with pytest.raises(StructureError, match=r"EMA\.update: parameter '0\.weight' differs: shape \(6, 4\) float32 "
                                             r"vs shape \(6, 4\) float64 in model"):
        ema.update()
    model.float()  # new objects again, of the average's dtypes: the EMA follows them from now on
    for amount in (1.0, -3.0):
        perturb_(model, amount)
        expected = reference_ema(ema.averaged, model, 0.5, "average")
        ema.update()
        assert_state(ema.averaged, expected)
    assert (ema._flat is not None) == pack  # packed again


@pytest.mark.parametrize("pack", [True, False])
def test_new_parameter_and_buffer_objects_are_followed(pack):
    torch.manual_seed(0)
    model = bn_net()
    ema = merge.EMA(model, decay=0.5, pack=pack)
    model[0].bias = nn.Parameter(torch.full((6,), 100.0))
    model[1].running_mean = torch.full((6,), 10.0)
    expected = reference_ema(ema.averaged, model, 0.5, "average")
    ema.update()
    assert_state(ema.averaged, expected)
    model[3].bias = nn.Parameter(torch.zeros(3))
    with pytest.raises(StructureError, match=r"EMA\.update: parameter '3\.bias' differs: shape \(2,\) float32 "
                                             r"vs shape \(3,\) float32 in model"):
        ema.update()


@pytest.mark.parametrize("pack", [True, False])
def test_new_parameter_object_over_the_same_memory_keeps_averaging_its_values(pack):
    """A Parameter re-wrapped over the same storage holds the same values: the EMA goes on reading them."""
    torch.manual_seed(0)
    model = bn_net()
    ema = merge.EMA(model, decay=0.5, pack=pack)
    model[0].weight = nn.Parameter(model[0].weight.detach())  # a new object, the same memory
    for amount in (1.0, -2.0):
        perturb_(model, amount)
        expected = reference_ema(ema.averaged, model, 0.5, "average")
        ema.update()
        assert_state(ema.averaged, expected)
    assert ema.step == 2


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("view", ["transposed", "sliced", "reused address"])
def test_new_parameter_object_at_the_old_address_is_noticed(pack, view):
    """A new object is read again even where its data starts at the old address (a view, a reused block)."""
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 3))
    ema = merge.EMA(net, decay=0.0, pack=pack)  # decay 0: the average becomes the model
    weight = net[1].weight
    if view == "transposed":
        net[1].weight = nn.Parameter(weight.detach().t())
    elif view == "sliced":
        net[1].weight = nn.Parameter(weight.detach()[:2])
    else:
        net[1].weight = nn.Parameter(torch.full((4, 4), 7.0))
        with torch.no_grad():  # the same address, as an allocator reusing a freed block would give
            net[1].weight.data = torch.empty(0).set_(weight.untyped_storage(), weight.storage_offset(), (4, 4))
            net[1].weight.fill_(7.0)
    assert net[1].weight is not weight and net[1].weight.data_ptr() == weight.data_ptr()
    if view == "sliced":
        with pytest.raises(StructureError, match=r"EMA\.update: parameter '1\.weight' differs: shape \(4, 4\) "
                                                 r"float32 vs shape \(2, 4\) float32 in model"):
            ema.update()
        return
    ema.update()
    assert torch.equal(ema.averaged[1].weight, net[1].weight)


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("table", ["_parameters", "_buffers"])
def test_parameter_or_buffer_removed_from_its_table_is_refused_by_name(pack, table):
    """An entry deleted from a module's table (or set to None) makes the EMA read the model again: it names it."""
    model = bn_net()
    ema = merge.EMA(model, decay=0.5, pack=pack)
    before = {k: v.clone() for k, v in ema.averaged.state_dict().items()}
    module, key = (model[0], "bias") if table == "_parameters" else (model[1], "running_mean")
    getattr(module, table)[key] = None
    name = "0.bias" if table == "_parameters" else "1.running_mean"
    with pytest.raises(StructureError, match=rf"EMA\.update: parameter '{re.escape(name)}' is missing from model"):
        ema.update()
    assert ema.step == 0
    assert all(torch.equal(before[k], v) for k, v in ema.averaged.state_dict().items())


def test_constant_decay_is_read_once_and_schedules_every_update():
    model = nn.Linear(2, 2)
    constant = merge.EMA(model, decay=0.25)
    scheduled = merge.EMA(model, decay=lambda step: 0.25 * step)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(4.0)
    constant.update()
    scheduled.update()  # decay 0 at step 0: the average becomes the model
    assert torch.allclose(constant.averaged.weight, start + 3.0)
    assert torch.equal(scheduled.averaged.weight, model.weight)
    with torch.no_grad():
        model.weight.add_(4.0)
    scheduled.update()  # decay 0.25 now
    assert torch.allclose(scheduled.averaged.weight, start + 7.0)


@pytest.mark.parametrize("repack", [False, True])
def test_update_is_seen_by_autograd(repack):
    """A graph that saved an averaged weight raises at backward after ``update`` wrote it, as torch's ops do.

    ``repack``: the average given new storage by someone else, the way ``pack_`` does it
    (``param.data = view``): the EMA notices the move and prepares again.
    """
    model = nn.Sequential(*(nn.Linear(3, 3) for _ in range(3)))
    ema = merge.EMA(model, decay=0.5)
    if repack:
        params = list(ema.averaged.parameters())
        buffer = torch.cat([p.detach().reshape(-1) for p in params])
        for p, view in zip(params, torch._C._nn.unflatten_dense_tensors(buffer, [p.detach() for p in params])):
            p.data = view
        ema.update()  # the move is noticed here
    loss = ema.averaged[2](torch.randn(2, 3, requires_grad=True)).sum()  # saves the last weight
    ema.update()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_ema_packs_the_model_it_follows_by_default():
    model = bn_net()
    weight = model[0].weight
    ema = merge.EMA(model, decay=0.5)
    assert ema._flat is not None and model[0].weight is weight  # same Parameter objects, one buffer
    assert model[0].bias.data_ptr() == model[0].weight.data_ptr() + model[0].weight.numel() * 4
    expected = {k: v.clone() for k, v in ema.averaged.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(ema.averaged.state_dict()[name], 0.5 * expected[name] + 0.5 * value), name


def test_flattened_model_updates_with_one_lerp_and_same_values():
    torch.manual_seed(0)
    plain = bn_net()
    flat_model = copy.deepcopy(plain)
    flatten_(flat_model)
    slow, fast = merge.EMA(plain, decay=0.8, pack=False), merge.EMA(flat_model, decay=0.8)
    assert fast._flat is not None and slow._flat is None
    floating = [t for t in plain.state_dict().values() if t.is_floating_point()]  # parameters, then BN statistics
    assert len(fast._flat[0]) == 1 and fast._flat[0][0].numel() == sum(t.numel() for t in floating)
    gen = torch.Generator().manual_seed(3)
    for step in range(4):
        noise = [torch.randn(p.shape, generator=gen) for p in plain.parameters()]
        with torch.no_grad():
            for a, b, n in zip(plain.parameters(), flat_model.parameters(), noise):
                a.add_(n)
                b.add_(n)
        slow.update()
        fast.update()
    for (name, a), b in zip(slow.averaged.state_dict().items(), fast.averaged.state_dict().values()):
        assert torch.equal(a, b), name


# -- differential test against torch.optim.swa_utils.AveragedModel -----------------------


@pytest.mark.parametrize("use_buffers", [False, True])
def test_matches_averaged_model_with_ema_multi_avg_fn(use_buffers):
    torch.manual_seed(0)
    model = bn_net()
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=use_buffers)
    averaged.update_parameters(model)  # AveragedModel's first update copies; both start from the model
    ema = merge.EMA(model, decay=0.9, buffers="average" if use_buffers else "copy")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        train_step(model, optimizer, gen)
        averaged.update_parameters(model)
        ema.update()
    theirs = averaged.module.state_dict()
    for name, mine in ema.averaged.state_dict().items():
        if mine.is_floating_point():
            assert torch.equal(mine, theirs[name]), name
    # where they disagree: integer buffers (AveragedModel truncates lerp results when use_buffers=True)
    assert int(ema.averaged[1].num_batches_tracked) == int(model[1].num_batches_tracked) == 5


@pytest.mark.parametrize("pack", [True, False])
def test_flattened_model_moved_afterwards_is_packed_again_or_falls_back(pack):
    torch.manual_seed(0)
    model = bn_net()
    flatten_(model)
    ema = merge.EMA(model, decay=0.5, pack=pack)
    assert ema._flat is not None
    with torch.no_grad():  # a .data swap (what model.to(...) does) moves one parameter out of the buffer
        model[0].weight.data = model[0].weight.data.clone()
    expected = reference_ema(ema.averaged, model, 0.5, "average")
    ema.update()
    if pack:  # packed again (the weight back in the one buffer), still one lerp_
        assert ema._flat is not None
        assert model[0].bias.data_ptr() == model[0].weight.data_ptr() + model[0].weight.numel() * 4
    else:
        assert ema._flat is None
    assert_state(ema.averaged, expected)


def test_dict_with_tied_entries_is_averaged_once_under_both_names():
    """A ``state_dict(keep_vars=True)`` of tied weights names one tensor twice: the average shares it too."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(4, 3)
            self.out = nn.Linear(3, 4, bias=False)
            self.out.weight = self.emb.weight

    model = Tied()
    ema = merge.EMA(dict(model.state_dict(keep_vars=True)), decay=0.5)
    start = model.emb.weight.detach().clone()
    with torch.no_grad():
        model.emb.weight.add_(2.0)
    ema.update()
    assert ema.averaged["emb.weight"] is ema.averaged["out.weight"]
    assert torch.allclose(ema.averaged["out.weight"], start + 1.0)


@pytest.mark.parametrize("pack", [True, False])
def test_parameters_tied_through_their_storage_are_updated_once(pack):
    """Two Parameter objects over one storage (``b.weight.data = a.weight.data``) are one weight, as in ``ema_``."""
    def tied() -> nn.Module:
        model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
        model[1].weight.data = model[0].weight.data
        return model

    target, online = tied(), tied()
    with torch.no_grad():
        target[0].weight.zero_()
        online[0].weight.fill_(1.0)
    merge.ema_(target, online, decay=0.5)
    assert torch.equal(target[1].weight, torch.full((3, 3), 0.5))
    ema = merge.EMA(online, decay=0.5, pack=pack)
    with torch.no_grad():
        online[0].weight.fill_(3.0)
    ema.update()
    assert torch.equal(ema.averaged[0].weight, torch.full((3, 3), 2.0))
    assert torch.equal(ema.averaged[1].weight, torch.full((3, 3), 2.0))


def test_dict_entries_replaced_by_new_tensors_are_followed():
    """Functional-style training puts new tensors in the dict: the EMA reads them, as it does a module's."""
    params = {"w": torch.zeros(3), "inner": {"b": torch.zeros(2)}}
    ema = merge.EMA(params, decay=0.5)
    params["w"] = params["w"] + 1.0
    params["inner"]["b"] = params["inner"]["b"] + 2.0
    ema.update()
    assert torch.equal(ema.averaged["w"], torch.full((3,), 0.5))
    assert torch.equal(ema.averaged["inner"]["b"], torch.ones(2))
    params["w"] = torch.zeros(4)
    with pytest.raises(StructureError, match=r"^EMA\.update: parameter 'w' differs: shape \(3,\) float32 vs "
                                             r"shape \(4,\) float32 in model$"):
        ema.update()


@pytest.mark.parametrize("step", [None, 2.9, -1, True, "3", torch.tensor(1.5)])
def test_load_state_dict_checks_the_step_before_writing(step):
    net = nn.Linear(2, 2)
    ema = merge.EMA(net, decay=0.5)
    before = {k: v.clone() for k, v in ema.state_dict()["averaged"].items()}
    state = {"step": step, "averaged": {k: torch.full_like(v, 9.0) for k, v in before.items()}}
    with pytest.raises(TypeError, match=r"^EMA\.load_state_dict: expected state\['step'\] to be a non-negative "
                                        r"int, got "):
        ema.load_state_dict(state)
    assert ema.step == 0
    assert all(torch.equal(before[k], v) for k, v in ema.state_dict()["averaged"].items())


@pytest.mark.parametrize("step", [3, np.int64(3), torch.tensor(3)])
def test_load_state_dict_takes_integer_steps(step):
    ema = merge.EMA(nn.Linear(2, 2), decay=0.5)
    ema.load_state_dict({"step": step, "averaged": ema.state_dict()["averaged"]})
    assert ema.step == 3 and type(ema.step) is int


@pytest.mark.parametrize("pack", [True, False])
def test_average_given_new_tensors_is_read_again(pack):
    """``ema.averaged.load_state_dict(..., assign=True)`` puts new tensors in the average: updates write them."""
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    ema = merge.EMA(net, decay=0.5, pack=pack)
    ema.averaged.load_state_dict({k: torch.zeros_like(v) for k, v in ema.averaged.state_dict().items()}, assign=True)
    with torch.no_grad():
        for param in net.parameters():
            param.fill_(2.0)
    ema.update()
    assert all(torch.equal(value, torch.ones_like(value)) for value in ema.averaged.parameters())
    with ema.swap():
        assert all(torch.equal(value, torch.ones_like(value)) for value in net.parameters())


def test_meta_tensors_are_not_taken_for_tied_ones():
    """Every meta tensor sits at address 0: distinct meta leaves stay distinct (and all are averaged)."""
    from nytorch.merge._ema import plan
    from nytorch.merge._state import operand

    ema = merge.EMA({"a": torch.empty(3, device="meta"), "b": torch.empty(3, device="meta")})
    assert ema.averaged["a"] is not ema.averaged["b"]
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)).to("meta")
    assert plan(operand("demo", model, buffers=False), "average").lerp == [0, 1, 2, 3]


def test_dict_whose_keys_change_order_is_read_once():
    """A functional update that re-inserts a key changes the dict's order: read again once, then cached."""
    from collections import OrderedDict

    from nytorch.merge import _ema_model

    params = OrderedDict(w=torch.zeros(3), b=torch.zeros(2))
    ema = merge.EMA(params, decay=0.5)
    weight = params.pop("w")
    params["w"] = weight + 2.0
    reads = []
    original = _ema_model.operand
    _ema_model.operand = lambda *args, **kwargs: (reads.append(1), original(*args, **kwargs))[1]
    try:
        for _ in range(3):
            ema.update()
    finally:
        _ema_model.operand = original
    assert len(reads) == 1
    assert torch.equal(ema.averaged["w"], torch.full((3,), 1.75))
