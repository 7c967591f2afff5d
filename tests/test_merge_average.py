"""Averages (uniform, weighted, greedy soup) and update_bn against per-tensor references and torch."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim import swa_utils

import nytorch
from nytorch import StructureError, merge


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.embed.weight


class NytoNet(nytorch.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.body(x))))


def bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def family(make, count: int, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    models = []
    for index in range(count):
        model = make()
        with torch.no_grad():
            for buffer in model.buffers():
                if buffer.is_floating_point():
                    buffer.uniform_(0.5, 1.5)
                else:
                    buffer.fill_(10 * (index + 1))
        models.append(model)
    return models


def reference_average(models: list[nn.Module], weights: list[float], buffers: str) -> dict[str, torch.Tensor]:
    """Per-tensor reference: Σ w x / Σ w for floating tensors, first model's integer buffers."""
    total = sum(weights)
    expected = {}
    named = [dict(model.named_parameters()) for model in models]
    for name in named[0]:
        expected[name] = sum(w * params[name].detach() for w, params in zip(weights, named)) / total
    buffer_sets = [dict(model.named_buffers()) for model in models]
    for name, buffer in buffer_sets[0].items():
        if buffers == "average" and buffer.is_floating_point():
            expected[name] = sum(w * b[name] for w, b in zip(weights, buffer_sets)) / total
        else:
            expected[name] = buffer.clone()
    return expected


def assert_state(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    for name, value in expected.items():
        assert state[name].dtype == value.dtype, name
        torch.testing.assert_close(state[name].detach(), value, msg=name)


@pytest.mark.parametrize("make", [bn_net, NytoNet, Tied, lambda: nn.Conv2d(2, 3, 3)])
@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5, 3.0], [0.0, 1.0, 0.0, 1.0]])
@pytest.mark.parametrize("buffers", ["average", "copy"])
def test_average_matches_per_tensor_reference(make, weights, buffers):
    models = family(make, 4)
    soup = merge.average(models, weights=weights, buffers=buffers)
    assert type(soup) is type(models[0])
    assert_state(soup, reference_average(models, weights or [1.0] * 4, buffers))
    for model in models:  # inputs untouched, result independent
        assert all(p.data_ptr() != q.data_ptr() for p, q in zip(soup.parameters(), model.parameters()))


def test_uniform_soup_equals_stacked_mean():
    models = family(bn_net, 8)
    soup = merge.average(models)
    for name, param in soup.named_parameters():
        stacked = torch.stack([dict(m.named_parameters())[name].detach() for m in models])
        torch.testing.assert_close(param.detach(), stacked.mean(0))
        assert param.requires_grad


def test_average_keeps_ties_and_integer_buffers_from_the_first_model():
    soup = merge.average(family(Tied, 3))
    assert soup.out.weight is soup.embed.weight
    models = family(bn_net, 3)
    soup = merge.average(models)
    assert soup[1].num_batches_tracked.dtype == torch.int64 and int(soup[1].num_batches_tracked) == 10


def test_average_of_particles_and_dicts():
    models = family(bn_net, 3)
    expected = reference_average(models, [1.0, 1.0, 1.0], "average")
    soup = merge.average([nytorch.particle(m) for m in models])
    assert isinstance(soup, nytorch.Particle)
    for name, value in soup.params.items():
        torch.testing.assert_close(value, expected[name])
    dicts = merge.average([nytorch.functional.state(m) for m in models])
    assert list(dicts) == list(nytorch.functional.state(models[0]))
    for name, value in dicts.items():
        torch.testing.assert_close(value, expected[name])


@pytest.mark.parametrize("weights, error, message", [
    ([1.0, 2.0], ValueError, r"average: expected 3 weights \(one per model\), got 2"),
    ([1.0, -1.0, 1.0], ValueError, r"average: expected weights >= 0, got weights\[1\] = -1\.0"),
    ([0.0, 0.0, 0.0], ValueError, r"average: expected the weights to have a positive sum"),
    (torch.ones(3, 1), ValueError, r"average: expected weights to be 1-D, got shape \(3, 1\)"),
    (np.ones((3, 1)), ValueError, r"average: expected weights to be 1-D, got shape \(3, 1\)"),
    (np.ones(2), ValueError, r"average: expected 3 weights \(one per model\), got 2"),
    ([torch.tensor(1.0), torch.tensor(-0.5), 1.0], ValueError,
     r"average: expected weights >= 0, got weights\[1\] = -0\.5"),
    ([1.0, 1.0, float("inf")], ValueError, r"average: expected weights >= 0, got weights\[2\] = inf"),
    ([1.0, torch.ones(1), 1.0], TypeError,
     r"average: expected weights\[1\] to be a number or a 0-dim real tensor, got a float32 tensor of shape \(1,\)"),
    ([1.0, 1.0, "2"], TypeError, r"average: expected weights\[2\] to be a number, got str"),
    (np.array([True, False, True]), TypeError, r"average: expected weights\[0\] to be a number, got bool"),
    ("abc", ValueError, r"average: expected 3 weights \(one per model\), got str"),
])
def test_bad_weights(weights, error, message):
    with pytest.raises(error, match=message):
        merge.average(family(bn_net, 3), weights=weights)


@pytest.mark.parametrize("convert", [
    lambda w: [torch.tensor(x) for x in w],                       # list(torch.softmax(scores, 0))
    lambda w: list(torch.tensor(w, dtype=torch.float64)),
    lambda w: np.array(w),
    lambda w: np.array(w, dtype=np.float32),
    lambda w: [np.float32(x) for x in w],
    lambda w: torch.tensor(w),
    lambda w: tuple(w),
])
def test_weights_of_common_types_equal_a_list_of_floats(convert):
    models = family(bn_net, 3)
    weights = torch.softmax(torch.tensor([0.3, -1.0, 2.0]), 0).tolist()
    soup = merge.average(models, weights=convert(weights))
    assert_state(soup, reference_average(models, weights, "average"))


def test_mismatched_model_is_named():
    models = family(bn_net, 3)
    models[2] = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(StructureError, match=r"average: parameter '0\.weight' differs: shape \(4, 3\) float32 vs "
                                             r"shape \(5, 3\) float32 in models\[2\]"):
        merge.average(models)
    with pytest.raises(TypeError, match=r"average: expected a non-empty sequence of models"):
        merge.average([])


# -- greedy soup ------------------------------------------------------------------------------


def reference_greedy(models, evaluate):
    """Wortsman et al. 2022 Algorithm 1 with strict improvement, written out with the reference average."""
    scores = [evaluate(m) for m in models]
    order = sorted(range(len(models)), key=lambda i: -scores[i])
    kept = [order[0]]
    best = scores[order[0]]
    for index in order[1:]:
        candidate = reference_average([models[i] for i in kept + [index]], [1.0] * (len(kept) + 1), "average")
        score = evaluate_state(candidate)
        if score > best:
            kept.append(index)
            best = score
    return kept, best


TARGET = {}


def evaluate_state(state: dict[str, torch.Tensor]) -> float:
    return -sum(float((state[name] - value).pow(2).sum()) for name, value in TARGET.items())


def evaluate_model(model: nn.Module) -> float:
    return evaluate_state({name: p.detach() for name, p in model.named_parameters()})


def test_greedy_soup_matches_reference_algorithm():
    models = family(bn_net, 6, seed=3)
    TARGET.clear()
    middle = reference_average(models[:3], [1.0, 1.0, 1.0], "average")
    TARGET.update({name: middle[name] for name, _ in models[0].named_parameters()})
    calls = []

    def evaluate(model):
        calls.append(model)
        return evaluate_model(model)

    soup = merge.greedy_soup(models, evaluate)
    kept, best = reference_greedy(models, evaluate_model)
    assert soup.ingredients == kept and sorted(kept) == [0, 1, 2]
    assert soup.score == pytest.approx(best)
    assert any(soup.model is model for model in calls) and len(kept) > 1
    assert_state(soup.model, reference_average([models[i] for i in kept], [1.0] * len(kept), "average"))
    assert len(calls) == len(models) + 1 + (len(models) - 1)


def test_greedy_soup_adds_only_on_strict_improvement():
    models = family(bn_net, 3)
    soup = merge.greedy_soup(models, lambda model: 1.0)
    assert soup.ingredients == [0] and soup.score == 1.0
    assert_state(soup.model, reference_average(models[:1], [1.0], "average"))


def test_greedy_soup_with_recomputed_batchnorm():
    models = family(bn_net, 3)
    data = [torch.randn(8, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    seen = []

    def evaluate(model):
        merge.update_bn(model, data)
        seen.append(model)
        return float(model[1].running_mean.sum())

    soup = merge.greedy_soup(models, evaluate)
    assert any(soup.model is model for model in seen)
    check = copy.deepcopy(soup.model)
    swa_utils.update_bn(data, check)
    assert torch.equal(check[1].running_mean, soup.model[1].running_mean)


def test_greedy_soup_needs_a_number():
    with pytest.raises(TypeError, match=r"greedy_soup: expected evaluate to return a number .* got str"):
        merge.greedy_soup(family(bn_net, 2), lambda model: "good")


# -- update_bn ---------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", ["tensor", "tuple"])
def test_update_bn_matches_swa_utils(batch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, momentum=0.3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(12, 4), nn.BatchNorm1d(4))
    model.eval()
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(5, 2, 4, 4, generator=gen) for _ in range(4)]
    loader = data if batch == "tensor" else [(x, torch.zeros(5)) for x in data]
    theirs = copy.deepcopy(model)
    assert merge.update_bn(model, loader) is model
    swa_utils.update_bn(loader, theirs)
    for (name, mine), other in zip(model.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(mine, other), name
    assert not model.training and model[1].momentum == 0.3


def test_update_bn_averages_instance_norm_statistics_over_the_batches():
    # InstanceNorm reads momentum=None as 0 (it would keep its reset statistics): each batch is
    # weighed 1/k instead, the cumulative average BatchNorm computes
    torch.manual_seed(0)
    norm = nn.InstanceNorm1d(2, track_running_stats=True, momentum=0.2)
    data = [torch.randn(4, 2, 50) * 3 + 5 for _ in range(3)]
    merge.update_bn(norm, data)
    torch.testing.assert_close(norm.running_mean, torch.stack([x.mean(2).mean(0) for x in data]).mean(0))
    torch.testing.assert_close(norm.running_var, torch.stack([x.var(2).mean(0) for x in data]).mean(0))
    assert norm.momentum == 0.2 and not norm._forward_pre_hooks


def test_update_bn_restores_state_on_error():
    model = bn_net()

    def broken():
        yield torch.randn(4, 3)
        raise RuntimeError("loader failed")

    with pytest.raises(RuntimeError, match="loader failed"):
        merge.update_bn(model.eval(), broken())
    assert not model.training and model[1].momentum == 0.1


def test_dicts_listing_the_same_names_in_another_order_are_matched_by_name():
    """A plain dict flattens sorted, an OrderedDict (a ``state_dict()``) in insertion order: matched by name."""
    from collections import OrderedDict
    net = nn.Linear(2, 3)
    ordered = net.state_dict()
    shifted = {name: value + 1 for name, value in ordered.items()}
    soup = merge.average([ordered, shifted])
    assert list(soup) == ["weight", "bias"]
    for name in ordered:
        assert torch.allclose(soup[name], ordered[name] + 0.5)
    start = OrderedDict(b=torch.zeros(2), a=torch.zeros(3))
    merge.ema_(start, {"a": torch.ones(3), "b": torch.full((2,), 2.0)}, decay=0.5)
    assert torch.equal(start["a"], torch.full((3,), 0.5)) and torch.equal(start["b"], torch.ones(2))
    task = merge.task_arithmetic(start, [{"b": torch.ones(2), "a": torch.ones(3)}], scale=1.0)
    assert torch.equal(task["a"], torch.ones(3)) and torch.equal(task["b"], torch.ones(2))
    with pytest.raises(StructureError, match=r"^average: parameter 'bias' is missing from models\[1\]$"):
        merge.average([ordered, {"weight": shifted["weight"], "other": shifted["bias"]}])


@pytest.mark.parametrize("flag, shown", [(None, False), (False, False), (True, True), (np.True_, True), (0, False)])
def test_greedy_soup_and_update_bn_show_progress_when_asked(flag: object, shown: bool,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Long loops over user evaluations and loaders: a tqdm bar on request (None: only on a terminal)."""
    pytest.importorskip("tqdm")
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)) for _ in range(3)]
    data = [torch.randn(8, 2) for _ in range(4)]

    def evaluate(model: nn.Module) -> float:
        return -float(model(data[0]).pow(2).mean())

    reference = merge.greedy_soup([copy.deepcopy(m) for m in models], evaluate, show_progress=False)
    capsys.readouterr()
    soup = merge.greedy_soup(models, evaluate, show_progress=flag)  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert soup.ingredients == reference.ingredients and soup.score == reference.score
    assert ("greedy_soup: ranking: 100%" in err and "3/3" in err and "greedy_soup: souping: 100%" in err) == shown
    assert shown or err == ""
    net, expected = copy.deepcopy(models[0]), copy.deepcopy(models[0])
    torch.optim.swa_utils.update_bn(data, expected)
    merge.update_bn(net, data, show_progress=flag)  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert torch.equal(net[1].running_mean, expected[1].running_mean)
    assert ("update_bn: 100%" in err and "4/4" in err) == shown and (shown or err == "")
    for call in (lambda: merge.greedy_soup(models, evaluate, show_progress="yes"),
                 lambda: merge.update_bn(net, data, show_progress=0.5)):
        with pytest.raises(TypeError, match=r"^(greedy_soup|update_bn): expected True, False or None as show_progress"):
            call()
