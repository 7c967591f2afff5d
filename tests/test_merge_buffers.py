"""Averages of buffers: IEEE arithmetic at infinities, parametrization state copied, checkpoints refused whole.

References are plain per-tensor torch: ``(1 − τ)·a + τ·b`` (or ``Σ wᵢ·xᵢ / Σ wᵢ``) where an input is
inf or NaN, ``torch.lerp`` (the running mean of lerps) where every input is finite.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.parametrizations import orthogonal, spectral_norm

import nytorch
from nytorch import merge

INF = float("inf")
NAN = float("nan")


class Masked(nn.Module):
    """A linear layer with a causal ``-inf`` mask and observer-like ``+inf`` / ``-inf`` buffers."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(4, 4)
        self.register_buffer("mask", torch.full((4, 4), -INF).triu(1))
        self.register_buffer("min_val", torch.tensor(INF))
        self.register_buffer("max_val", torch.tensor(-INF))
        self.register_buffer("scale", torch.randn(4))


MASK = torch.full((4, 4), -INF).triu(1)


def assert_same(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal values, NaN where NaN (and the same infinities)."""
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


def ema_step(make: Callable[[], Any], kind: str, target: Any, online: Any, tau: float) -> Any:
    if kind == "ema_":
        merge.ema_(target, online, tau=tau)
        return target
    ema = merge.EMA(target, decay=1 - tau, pack=kind == "EMA")
    ema.update(online)
    return ema.averaged


# -- 1. infinities ---------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", [None, [3.0, 1.0], [0.2, 0.0, 0.8]])
def test_average_keeps_equal_infinities_in_buffers(weights: Any) -> None:
    models = [Masked(seed) for seed in range(3 if weights is None or len(weights) == 3 else 2)]
    soup = merge.average(models, weights=weights)
    assert_same(soup.mask, MASK)
    assert soup.min_val.item() == INF and soup.max_val.item() == -INF
    # finite buffers and parameters: the running mean of lerps, as before
    w = [1.0] * len(models) if weights is None else weights
    total = sum(w)
    expected = sum(wi * m.scale for wi, m in zip(w, models)) / total
    torch.testing.assert_close(soup.scale, expected)
    assert not soup.lin.weight.isnan().any()


def test_average_follows_ieee_where_infinities_differ_and_nan_propagates() -> None:
    a, b = Masked(0), Masked(1)
    a.mask[0, 0], b.mask[0, 0] = INF, -INF  # +inf with -inf: NaN
    a.mask[1, 0], b.mask[1, 0] = INF, 2.0  # inf with a finite value: inf
    a.mask[2, 0], b.mask[2, 0] = NAN, 2.0  # NaN propagates
    with torch.no_grad():
        a.lin.weight[0, 0], b.lin.weight[0, 0] = -INF, -INF  # parameters too
        a.lin.weight[0, 1], b.lin.weight[0, 1] = INF, -INF
    soup = merge.average([a, b])
    expected = MASK.clone()
    expected[0, 0], expected[1, 0], expected[2, 0] = NAN, INF, NAN
    assert_same(soup.mask, expected)
    assert_same(soup.mask, (a.mask + b.mask) / 2)  # what Particle arithmetic gives
    assert soup.lin.weight[0, 0].item() == -INF and soup.lin.weight[0, 1].isnan()
    rest = torch.ones(4, 4, dtype=torch.bool)
    rest[0, :2] = False
    assert_same(soup.lin.weight[rest], torch.lerp(a.lin.weight, b.lin.weight, 0.5)[rest])


def test_average_of_all_finite_models_is_unchanged() -> None:
    """The repair touches only non-finite elements: finite soups are the running mean of lerps, bit for bit."""
    models = [Masked(seed) for seed in range(4)]
    for m in models:
        m.mask.zero_(), m.min_val.zero_(), m.max_val.zero_()
    weights = [0.1, 0.4, 0.3, 0.2]
    soup = merge.average(models, weights=weights)
    for name, leaf in soup.state_dict().items():
        leaves = [m.state_dict()[name] for m in models]
        mean, total = leaves[0].clone(), weights[0]
        for value, weight in zip(leaves[1:], weights[1:]):
            total += weight
            mean = torch.lerp(mean, value, weight / total)
        assert torch.equal(leaf, mean), name


def test_greedy_soup_keeps_equal_infinities() -> None:
    soup = merge.greedy_soup([Masked(0), Masked(1)], lambda m: 1.0 + float(len(m.scale)))
    assert_same(soup.model.mask, MASK)


@pytest.mark.parametrize("kind", ["ema_", "EMA", "EMA unpacked"])
@pytest.mark.parametrize("tau", [0.001, 0.25, 0.5, 0.9])
def test_ema_keeps_equal_infinities_in_buffers(kind: str, tau: float) -> None:
    target, online = Masked(0), Masked(1)
    online.min_val.fill_(-3.0)  # observed data: the average of +inf and -3 is +inf in IEEE arithmetic
    online.mask[0, 1] = INF  # -inf with +inf: NaN
    reference = {name: (1 - tau) * t + tau * o for (name, t), o in
                 zip(target.state_dict().items(), online.state_dict().values())}
    finite = {name: torch.lerp(t, o, tau) for (name, t), o in
              zip(target.state_dict().items(), online.state_dict().values())}
    averaged = ema_step(Masked, kind, target, online, tau)
    expected_mask = MASK.clone()
    expected_mask[0, 1] = NAN
    assert_same(averaged.mask, expected_mask)
    assert_same(averaged.mask, reference["mask"])
    assert averaged.min_val.item() == INF and averaged.max_val.item() == -INF
    assert torch.equal(averaged.scale, finite["scale"])  # finite buffers: lerp, as before
    assert torch.equal(averaged.lin.weight, finite["lin.weight"])


def test_ema_update_keeps_infinities_over_many_steps_packed_and_in_a_flat_tail() -> None:
    model = nn.Sequential(Masked(0), nn.BatchNorm1d(4), Masked(1))
    ema = merge.EMA(model, decay=0.9)
    assert ema._flat is not None  # packed: the buffers are the tail of one buffer
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
            model[1].running_mean.add_(1.0)
        ema.update()
    assert_same(ema.averaged[0].mask, MASK)
    assert_same(ema.averaged[2].mask, MASK)
    assert ema.averaged[0].min_val.item() == INF
    assert not ema.averaged[1].running_mean.isnan().any()
    expected = 0.0
    for step in (1.0, 2.0, 3.0):
        expected = 0.9 * expected + 0.1 * step
    assert torch.allclose(ema.averaged[1].running_mean, torch.full((4,), expected))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([INF, -INF, NAN, 0.0, -1.5, 2.0, 1e30]), min_size=2, max_size=2),
       st.lists(st.sampled_from([INF, -INF, NAN, 0.0, 3.0, -7.25]), min_size=2, max_size=2),
       st.sampled_from([0.0, 0.001, 0.3, 0.5, 0.75, 1.0]))
def test_ema_buffer_law_ieee_weighted_mean_or_lerp(a: list[float], b: list[float], tau: float) -> None:
    """Per element: ``(1 − τ)·a + τ·b`` where an input is inf or NaN, ``torch.lerp`` elsewhere."""
    target, online = nn.Module(), nn.Module()
    target.register_buffer("x", torch.tensor(a))
    online.register_buffer("x", torch.tensor(b))
    start, end = target.x.clone(), online.x.clone()
    merge.ema_(target, online, tau=tau)
    finite = start.isfinite() & end.isfinite()
    expected = torch.where(finite, torch.lerp(start, end, tau), (1 - tau) * start + tau * end)
    assert_same(target.x, expected)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from([INF, -INF, NAN, 0.0, 1.0, -2.5]), min_size=3, max_size=3),
                min_size=1, max_size=4),
       st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=4, max_size=4))
def test_average_law_ieee_weighted_mean(values: list[list[float]], weights: list[float]) -> None:
    """Where any model is inf or NaN the soup is IEEE's ``Σ (wᵢ / Σ w)·xᵢ`` (as Particle arithmetic gives)."""
    leaves = [{"x": torch.tensor(row)} for row in values]
    used = weights[:len(values)]
    soup = merge.average(leaves, weights=used)["x"]
    stacked = torch.stack([leaf["x"] for leaf in leaves])
    total = sum(used)
    ieee = sum((w / total) * leaf["x"] for w, leaf in zip(used, leaves))
    bad = ~stacked.isfinite().all(0)
    assert_same(soup[bad], ieee[bad])
    assert soup[~bad].isfinite().all()


# -- 2. parametrizations ---------------------------------------------------------------------------
def _orthogonal(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return orthogonal(nn.Linear(4, 4))


def _gap(weight: torch.Tensor) -> float:
    return float((weight @ weight.T - torch.eye(len(weight))).abs().max())


def test_average_of_orthogonal_models_stays_orthogonal() -> None:
    a, b = _orthogonal(0), _orthogonal(1)
    assert not torch.equal(a.parametrizations.weight[0].base, b.parametrizations.weight[0].base)
    soup = merge.average([a, b])
    assert torch.equal(soup.parametrizations.weight[0].base, a.parametrizations.weight[0].base)
    assert _gap(soup.weight.detach()) < 1e-5
    # the parametrized tensor itself is averaged: the same soup as with buffers="copy"
    copied = merge.average([a, b], buffers="copy")
    assert torch.equal(soup.parametrizations.weight.original, copied.parametrizations.weight.original)


def test_average_of_spectral_norm_models_copies_u_and_v() -> None:
    torch.manual_seed(0)
    a, b = spectral_norm(nn.Linear(4, 3)), spectral_norm(nn.Linear(4, 3))
    for model in (a, b):
        model(torch.randn(2, 4))  # a power iteration step in training mode
    soup = merge.average([a, b])
    state = a.parametrizations.weight[0]
    assert torch.equal(soup.parametrizations.weight[0]._u, state._u)
    assert torch.equal(soup.parametrizations.weight[0]._v, state._v)
    expected = (a.parametrizations.weight.original + b.parametrizations.weight.original) / 2
    torch.testing.assert_close(soup.parametrizations.weight.original, expected)


@pytest.mark.parametrize("kind", ["ema_", "EMA", "EMA unpacked"])
def test_ema_copies_parametrization_buffers_from_online(kind: str) -> None:
    target, online = _orthogonal(0), _orthogonal(1)
    sn_target, sn_online = spectral_norm(nn.Linear(4, 3)), spectral_norm(nn.Linear(4, 3))
    sn_online(torch.randn(2, 4))
    averaged = ema_step(_orthogonal, kind, target, online, 0.25)
    assert torch.equal(averaged.parametrizations.weight[0].base, online.parametrizations.weight[0].base)
    assert _gap(averaged.weight.detach()) < 1e-5
    sn = ema_step(None, kind, sn_target, sn_online, 0.25)  # type: ignore[arg-type]
    assert torch.equal(sn.parametrizations.weight[0]._u, sn_online.parametrizations.weight[0]._u)
    assert torch.equal(sn.parametrizations.weight[0]._v, sn_online.parametrizations.weight[0]._v)


def test_a_parametrized_buffer_is_still_averaged() -> None:
    """Only the parametrization's own state is copied: a parametrized *buffer* (``original``) is averaged."""
    class Scale(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

    models = []
    for value in (1.0, 3.0):
        model = nn.Module()
        model.register_buffer("b", torch.full((2,), value))
        torch.nn.utils.parametrize.register_parametrization(model, "b", Scale())
        models.append(model)
    soup = merge.average(models)
    assert torch.equal(soup.parametrizations.b.original, torch.full((2,), 2.0))


def test_swarm_average_copies_parametrization_buffers() -> None:
    a, b = _orthogonal(0), _orthogonal(1)
    swarm = nytorch.Swarm.stack([a, b])
    soup = merge.average(swarm).module()
    assert torch.equal(soup.parametrizations.weight[0].base, a.parametrizations.weight[0].base)


# -- 3. EMA.load_state_dict ------------------------------------------------------------------------
def test_ema_load_state_dict_refuses_quantized_values_before_writing() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ema = merge.EMA(net, decay=0.5)
    before = {name: value.clone() for name, value in ema.state_dict()["averaged"].items()}
    values = {name: torch.full_like(value, 7.0) for name, value in before.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates quantized tensor creation
        values["1.bias"] = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)
    with pytest.raises(TypeError, match=r"EMA\.load_state_dict: expected a tensor of real values for parameter "
                                        r"'1\.bias' \(shape \(2,\) float32\), got a quantized tensor "
                                        r"\(shape \(2,\) qint8\) in state; store value\.dequantize\(\) instead"):
        ema.load_state_dict({"step": 5, "averaged": values})
    after = ema.state_dict()
    assert after["step"] == 0
    for name, value in after["averaged"].items():
        assert torch.equal(value, before[name]), name
    values["1.bias"] = values["1.bias"].dequantize()
    ema.load_state_dict({"step": 5, "averaged": copy.copy(values)})
    assert ema.step == 5 and torch.equal(ema.averaged[1].bias, torch.ones(2))
