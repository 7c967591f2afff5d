"""Task vectors, task arithmetic, TIES, DARE and SLERP against per-tensor reference implementations."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from torch import nn

import nytorch
from nytorch import StructureError, merge
from nytorch.merge import _ties


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))


def finetunes(count: int, seed: int = 0) -> tuple[nn.Module, list[nn.Module]]:
    torch.manual_seed(seed)
    base = net()
    models = []
    for index in range(count):
        model = net()
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.1 * torch.randn_like(param))
            model[1].running_mean.fill_(float(index + 1))
            model[1].num_batches_tracked.fill_(index + 5)
        models.append(model)
    return base, models


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def assert_params(model: nn.Module, expected: dict[str, torch.Tensor], **tolerance: float) -> None:
    got = params(model)
    assert list(got) == list(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, msg=name, **tolerance)


def assert_buffers_from(model: nn.Module, source: nn.Module) -> None:
    for (name, mine), theirs in zip(model.named_buffers(), source.buffers()):
        assert torch.equal(mine, theirs), name


# -- task vectors and task arithmetic ----------------------------------------------------------


def test_task_vector_is_per_tensor_difference():
    base, (model,) = finetunes(1)
    vector = merge.task_vector(model, base)
    assert_params(vector, {n: params(model)[n] - params(base)[n] for n in params(base)})
    assert_buffers_from(vector, model)


@pytest.mark.parametrize("scale", [1.0, 0.3, -1.0, [0.5, 1.5, -0.25]])
def test_task_arithmetic_matches_reference(scale):
    base, models = finetunes(3)
    scales = scale if isinstance(scale, list) else [scale] * 3
    expected = {}
    for name, value in params(base).items():
        expected[name] = value + sum(s * (params(m)[name] - value) for s, m in zip(scales, models))
    merged = merge.task_arithmetic(base, models, scale=scale)
    assert type(merged) is nn.Sequential
    assert_params(merged, expected)
    assert_buffers_from(merged, base)


def test_task_arithmetic_on_particles_and_dicts():
    base, models = finetunes(2)
    expected = {n: v + sum(params(m)[n] - v for m in models) for n, v in params(base).items()}
    merged = merge.task_arithmetic(nytorch.particle(base), [nytorch.particle(m) for m in models])
    assert isinstance(merged, nytorch.Particle)
    for name, value in merged.params.items():
        torch.testing.assert_close(value, expected[name])
    merged = merge.task_arithmetic(params(base), [params(m) for m in models])
    for name, value in merged.items():
        torch.testing.assert_close(value, expected[name])


@pytest.mark.parametrize("merging", [
    lambda base, models, scale: merge.task_arithmetic(base, models, scale=scale),
    lambda base, models, scale: merge.ties(base, models, scale=scale),
    lambda base, models, scale: merge.dare(base, models, scale=scale, drop=0.5,
                                           generator=torch.Generator().manual_seed(3)),
], ids=["task_arithmetic", "ties", "dare"])
def test_zero_dim_tensor_scale_counts_as_a_number(merging):
    base, models = finetunes(2)
    expected = merging(base, models, 0.5)
    for scale in (torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64)):
        assert_params(merging(base, models, scale), params(expected), rtol=0, atol=0)


def test_task_arithmetic_errors():
    base, models = finetunes(2)
    with pytest.raises(ValueError, match=r"task_arithmetic: expected one scale per fine-tuned model \(2\), got 3"):
        merge.task_arithmetic(base, models, scale=[1.0, 2.0, 3.0])
    other = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 4))
    with pytest.raises(StructureError, match=r"task_arithmetic: parameter '3\.weight' differs: shape \(3, 7\) "
                                             r"float32 vs shape \(4, 7\) float32 in finetuned\[1\]"):
        merge.task_arithmetic(base, [models[0], other])
    with pytest.raises(TypeError, match=r"task_arithmetic: expected a non-empty sequence of fine-tuned models"):
        merge.task_arithmetic(base, [])


# -- TIES --------------------------------------------------------------------------------------


def reference_ties(base: nn.Module, models: list[nn.Module], density: float, scale: float) -> dict[str, torch.Tensor]:
    """Trim (global top-k by magnitude per task), elect sign of the sum, mean of agreeing non-zeros."""
    names = list(params(base))
    trimmed = []
    for model in models:
        vector = {n: params(model)[n] - params(base)[n] for n in names}
        magnitudes = torch.cat([vector[n].abs().flatten() for n in names])
        kept = math.floor(magnitudes.numel() * Fraction(str(density)))  # exact, for the decimal density
        threshold = magnitudes.sort(descending=True).values[kept - 1] if kept else math.inf
        trimmed.append({n: torch.where(vector[n].abs() >= threshold, vector[n], 0.0) for n in names})
    expected = {}
    for name in names:
        stack = torch.stack([t[name] for t in trimmed])
        elected = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == elected) & (stack != 0)
        mean = (stack * agree).sum(0) / agree.sum(0).clamp(min=1)
        expected[name] = params(base)[name] + scale * mean
    return expected


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0, 0.01])
@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_ties_matches_reference(density, scale):
    base, models = finetunes(4, seed=1)
    merged = merge.ties(base, models, density=density, scale=scale)
    assert_params(merged, reference_ties(base, models, density, scale))
    assert_buffers_from(merged, base)


def test_ties_trims_globally_and_resolves_signs_by_hand():
    base = {"a": torch.zeros(3), "b": torch.zeros(1)}
    first = {"a": torch.tensor([4.0, -1.0, 0.5]), "b": torch.tensor([-3.0])}
    second = {"a": torch.tensor([-2.0, -6.0, 0.1]), "b": torch.tensor([1.0])}
    # density 0.5 keeps 2 of 4 entries per task: first -> a0=4, b=-3; second -> a0=-2, a1=-6
    # a0: 4 - 2 = 2 > 0, so only +4 agrees; a1: only -6; a2: nothing kept; b: only -3
    merged = merge.ties(base, [first, second], density=0.5)
    assert merged["a"].tolist() == [4.0, -6.0, 0.0] and merged["b"].tolist() == [-3.0]


DENSITIES = ["0.01", "0.1", "0.2", "0.29", "0.3", "0.33", "0.57", "0.58", "0.7", "0.575", "0.99", "1"]


@pytest.mark.parametrize("count", [1, 7, 10, 100, 1000, 12345])
@pytest.mark.parametrize("density", DENSITIES)
def test_trim_keeps_floor_of_n_times_density_as_exact_rationals(count, density):
    """``int(100 * 0.29)`` is 28: trim must keep the 29 entries 0.29 stands for."""
    expected = math.floor(count * Fraction(density))
    magnitudes = torch.randperm(count, generator=torch.Generator().manual_seed(count)).double() + 1  # no ties
    signs = torch.where(torch.arange(count) % 3 == 0, -1.0, 1.0).double()
    first, second = (magnitudes * signs)[: count // 2], (magnitudes * signs)[count // 2:]
    trimmed = torch.cat(_ties.trim([first, second], float(density)))
    chosen = trimmed != 0
    assert int(chosen.sum()) == expected
    everything = torch.cat([first, second])
    assert torch.equal(everything.abs()[chosen].sort().values, magnitudes.sort().values[count - expected:])  # largest
    assert torch.equal(trimmed[chosen], everything[chosen])  # kept entries unchanged, with their signs


@pytest.mark.parametrize("density", [Fraction(1, 3), Fraction(2, 7), Fraction(5, 11)])
def test_kept_count_matches_rationals_that_are_not_decimals(density):
    for count in range(1, 3000):
        assert _ties.kept(count, float(density)) == math.floor(count * density), count


def test_ties_errors():
    base, models = finetunes(2)
    with pytest.raises(ValueError, match=r"ties: expected density to be a fraction in \(0, 1\], got 0"):
        merge.ties(base, models, density=0)
    with pytest.raises(TypeError, match=r"ties: parameter 'w' is complex"):
        merge.ties({"w": torch.zeros(2, dtype=torch.complex64)}, [{"w": torch.ones(2, dtype=torch.complex64)}])


# -- DARE --------------------------------------------------------------------------------------


def reference_dare(base, models, drop, scales, seed):
    gen = torch.Generator().manual_seed(seed)
    totals = {n: torch.zeros_like(v) for n, v in params(base).items()}
    for model, scale in zip(models, scales):
        for name, value in params(base).items():
            vector = params(model)[name] - value
            keep = torch.rand(vector.shape, generator=gen) >= drop
            totals[name] = totals[name] + scale * ((vector * keep) / (1 - drop))
    return {n: params(base)[n] + totals[n] for n in totals}


@pytest.mark.parametrize("drop, scale", [(0.9, 1.0), (0.5, [0.5, 2.0, 1.0]), (0.0, 1.0)])
def test_dare_matches_reference(drop, scale):
    base, models = finetunes(3, seed=2)
    scales = scale if isinstance(scale, list) else [scale] * 3
    merged = merge.dare(base, models, drop=drop, scale=scale, generator=torch.Generator().manual_seed(7))
    assert_params(merged, reference_dare(base, models, drop, scales, 7))
    assert_buffers_from(merged, base)


def test_dare_drops_the_expected_fraction_and_rescales():
    base = {"w": torch.zeros(20_000)}
    model = {"w": torch.ones(20_000)}
    merged = merge.dare(base, [model], drop=0.75, generator=torch.Generator().manual_seed(0))["w"]
    kept = merged != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    assert torch.all(merged[kept] == 4.0)


def test_dare_errors():
    base, models = finetunes(1)
    with pytest.raises(ValueError, match=r"dare: expected drop to be a probability in \[0, 1\), got 1\.0"):
        merge.dare(base, models, drop=1.0)
    with pytest.raises(TypeError, match=r"^dare: expected drop to be a real number, got str$"):
        merge.dare(base, models, drop="0.5")
    with pytest.raises(TypeError, match=r"^dare: expected a torch.Generator or None as generator, got int$"):
        merge.dare(base, models, generator=3)


# -- SLERP -------------------------------------------------------------------------------------


def reference_slerp(a: torch.Tensor, b: torch.Tensor, t: float, threshold: float = 0.9995) -> torch.Tensor:
    x, y = a.double().flatten(), b.double().flatten()
    nx, ny = x.norm(), y.norm()
    if nx == 0 or ny == 0:
        return (a + t * (b - a)).to(a.dtype)
    cosine = torch.clamp(x @ y / (nx * ny), -1, 1)
    if cosine.abs() > threshold:
        return (a.double() + t * (b.double() - a.double())).to(a.dtype)
    omega = torch.arccos(cosine)
    out = torch.sin((1 - t) * omega) / torch.sin(omega) * a.double() + torch.sin(t * omega) / torch.sin(omega) * b.double()
    return out.to(a.dtype)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0, 1.3])
def test_slerp_matches_reference(t):
    base, (first, second) = finetunes(2, seed=3)
    with torch.no_grad():
        second[0].bias.copy_(2 * first[0].bias)  # parallel: the linear fallback
        second[3].bias.zero_()  # a zero tensor: the linear fallback
    merged = merge.slerp(first, second, t)
    expected = {n: reference_slerp(params(first)[n], params(second)[n], t) for n in params(first)}
    assert_params(merged, expected, rtol=1e-5, atol=1e-6)
    assert_buffers_from(merged, first)
    assert torch.equal(merged[0].bias, torch.lerp(first[0].bias, second[0].bias, t))


def test_slerp_keeps_the_norm_between_orthogonal_unit_tensors():
    a, b = {"w": torch.tensor([1.0, 0.0, 0.0])}, {"w": torch.tensor([0.0, 0.0, 1.0])}
    for t in (0.1, 0.5, 0.9):
        w = merge.slerp(a, b, t)["w"]
        assert w.norm().item() == pytest.approx(1.0, abs=1e-6)
        assert w[0].item() == pytest.approx(math.cos(t * math.pi / 2), abs=1e-6)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_slerp_with_threshold_one_lerps_exactly_parallel_tensors(sign):
    """``threshold=1.0`` is allowed: exactly (anti-)parallel tensors, whose sine is 0, are lerped."""
    a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([2.0, 4.0]) * sign}
    assert torch.equal(merge.slerp(a, b, 0.25, threshold=1.0)["w"], torch.lerp(a["w"], b["w"], 0.25))


def test_slerp_errors():
    with pytest.raises(StructureError, match=r"slerp: parameter 'w' differs: shape \(2,\) float32 vs shape \(3,\)"):
        merge.slerp({"w": torch.ones(2)}, {"w": torch.ones(3)}, 0.5)
    with pytest.raises(TypeError, match=r"slerp: expected t to be a finite real number, got nan"):
        merge.slerp({"w": torch.ones(2)}, {"w": torch.ones(2)}, float("nan"))
    with pytest.raises(ValueError, match=r"slerp: expected threshold in \[0, 1\], got 2"):
        merge.slerp({"w": torch.ones(2)}, {"w": torch.ones(2)}, 0.5, threshold=2)
