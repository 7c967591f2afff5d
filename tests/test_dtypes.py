# mypy: disable-error-code="union-attr, index, operator, arg-type, assignment"
"""The dtype matrix beyond the core operators: Swarm, merge, algorithms, checkpoints, distributed.

Models hold float16, bfloat16, float32, float64 and complex64 parameters side by side, plus
integer and bool parameters (``requires_grad=False``) and integer and float16 buffers.  Every
result is compared with plain torch computed tensor by tensor in the same dtype: dtypes are
kept, integer and bool leaves are carried unchanged, and values equal the per-tensor reference
(bit for bit where the docs promise it, else within the rounding they state).
"""
from __future__ import annotations

import copy
import math
import warnings
from fractions import Fraction
from typing import Any

import pytest
import torch
from torch import nn

import nytorch as nyto
from nytorch import Swarm, merge
from nytorch import algorithms as alg
from nytorch import distributed as nd
from conftest import torch_assigns

Tensor = torch.Tensor

pytestmark = pytest.mark.filterwarnings("ignore:Complex modules:UserWarning",
                                        "ignore:ComplexHalf support:UserWarning")


class Mixed(nn.Module):
    """Every common dtype side by side; ``i``/``m`` are integer/bool parameters, ``ib``/``hb`` buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.h = nn.Linear(3, 2).half()
        self.f = nn.Linear(3, 2)
        self.b = nn.Linear(3, 2).to(torch.bfloat16)
        self.d = nn.Parameter(torch.randn(4, dtype=torch.float64))
        self.c = nn.Parameter(torch.randn(3, dtype=torch.complex64))
        self.i = nn.Parameter(torch.arange(5), requires_grad=False)
        self.m = nn.Parameter(torch.tensor([True, False, True]), requires_grad=False)
        self.register_buffer("ib", torch.arange(3, dtype=torch.int32))
        self.register_buffer("hb", torch.randn(2).half())

    def forward(self, x: Tensor) -> Tensor:
        return (self.h(x.half()).float() + self.f(x) + self.b(x.bfloat16()).float()
                + self.d.sum().float() + self.c.real.sum() + self.i.sum() + self.m.sum())


class Real(nn.Module):
    """Real floating dtypes only (for SLERP and TIES, which refuse complex), an integer parameter and
    a bfloat16 BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.h = nn.Linear(6, 5).half()
        self.b = nn.Linear(6, 5).bfloat16()
        self.f = nn.Linear(6, 5)
        self.d = nn.Parameter(torch.randn(7, dtype=torch.float64))
        self.i = nn.Parameter(torch.arange(3), requires_grad=False)
        self.bn = nn.BatchNorm1d(5).to(torch.bfloat16)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.b(x.bfloat16())).float() + self.h(x.half()).float() + self.f(x)


def mixed(seed: int) -> Mixed:
    torch.manual_seed(seed)
    return Mixed()


def real(seed: int) -> Real:
    torch.manual_seed(seed)
    return Real()


def arithmetic(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def params(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def bits(t: Tensor) -> bytes:
    """The exact bytes of a tensor's values (NaN payloads and signed zeros included)."""
    return bytes(t.detach().contiguous().clone().untyped_storage())


def assert_same(got: Tensor, want: Tensor, where: str) -> None:
    assert got.dtype == want.dtype, f"{where}: dtype {got.dtype} vs {want.dtype}"
    assert got.shape == want.shape, f"{where}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    assert torch.equal(got, want), f"{where}: values differ ({got.dtype})"


def weighted_sum_close(got: Tensor, weights: Tensor, stacked: Tensor, where: str) -> None:
    """``got`` is ``Σ weights[i] * stacked[i]`` in ``got``'s dtype up to the rounding of a sum of ``P`` terms:
    at most ``(P + 1)·eps·Σ|weights[i]·stacked[i]|`` from the exact sum (float64 / complex128)."""
    assert got.dtype == stacked.dtype, where
    wide = torch.complex128 if stacked.is_complex() else torch.float64
    terms = [weights[i].to(wide) * stacked[i].to(wide) for i in range(len(weights))]
    exact = sum(terms)
    scale = sum(term.abs() for term in terms)
    eps = torch.finfo(stacked.real.dtype if stacked.is_complex() else stacked.dtype).eps
    error = (got.to(wide) - exact).abs()
    assert bool((error <= (len(terms) + 1) * eps * scale).all()), f"{where}: off by {float(error.max())}"


# ---------------------------------------------------------------------------------------------
# Swarm
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def trio() -> list[Mixed]:
    return [mixed(seed) for seed in range(3)]


def test_stack_keeps_every_dtype_and_member_values(trio: list[Mixed]) -> None:
    swarm = Swarm.stack(trio)
    for i, model in enumerate(trio):
        for name, value in params(model).items():
            assert_same(swarm.params[name][i], value, name)
            assert_same(swarm[i].params[name], value, f"swarm[{i}] {name}")
        for name, value in model.named_buffers():
            assert_same(swarm.buffers[name][i], value, name)
    picked = swarm[[2, 0]]
    for name, value in swarm.params.items():
        assert_same(picked.params[name], value[[2, 0]], f"swarm[[2, 0]] {name}")


@pytest.mark.parametrize("name, op", [
    ("mul", lambda a: a * 0.3), ("add", lambda a: a + 1.7), ("div", lambda a: a / 3), ("sub", lambda a: a - 0.1),
    ("pow", lambda a: a ** 2), ("rsub", lambda a: 2.5 - a), ("rdiv", lambda a: 1 / a), ("neg", lambda a: -a),
])
def test_swarm_scalar_arithmetic_equals_torch_per_tensor(trio: list[Mixed], name: str, op: Any) -> None:
    swarm = Swarm.stack(trio)
    out = op(swarm)
    for key, value in swarm.params.items():
        assert_same(out.params[key], op(value) if arithmetic(value) else value, f"{name} {key}")
    for key, value in swarm.buffers.items():
        assert_same(out.buffers[key], value, f"{name} buffer {key}")


def test_swarm_operands_equal_torch_per_tensor(trio: list[Mixed]) -> None:
    swarm, other = Swarm.stack(trio), Swarm.stack([mixed(seed) for seed in (7, 8, 9)])
    centre = nyto.particle(mixed(20))
    weights = torch.tensor([0.1, 0.7, 1.3])
    cases = {
        "swarm + swarm": (swarm + other, lambda k, v: v + other.params[k]),
        "swarm * particle": (swarm * centre, lambda k, v: v * centre.params[k]),
        # per-member weights are cast to each dtype first (README: within one rounding in half precision)
        "swarm * weights": (swarm * weights,
                            lambda k, v: torch.stack([v[i] * weights[i].to(v.dtype) for i in range(3)])),
        "add alpha": (swarm.add(other, alpha=0.3), lambda k, v: torch.add(v, other.params[k], alpha=0.3)),
        "lerp number": (swarm.lerp(other, 0.3), lambda k, v: torch.lerp(v, other.params[k], 0.3)),
        "lerp float64 0-dim": (swarm.lerp(centre, torch.tensor(0.3, dtype=torch.float64)),
                               lambda k, v: torch.lerp(v, centre.params[k].expand_as(v),
                                                       torch.tensor(0.3, dtype=torch.float64).to(v.dtype))),
        "lerp per member": (swarm.lerp(other, weights), lambda k, v: torch.stack(
            [torch.lerp(v[i], other.params[k][i], weights[i].to(v.dtype)) for i in range(3)])),
        "lerp to a number": (swarm.lerp(2.0, 0.25), lambda k, v: torch.lerp(v, torch.full_like(v, 2.0), 0.25)),
    }
    in_place = swarm.clone()
    in_place.lerp_(other, 0.3)
    cases["lerp_"] = (in_place, lambda k, v: torch.lerp(v, other.params[k], 0.3))
    for case, (out, reference) in cases.items():
        for key, value in swarm.params.items():
            assert_same(out.params[key], reference(key, value) if arithmetic(value) else value, f"{case} {key}")


def test_swarm_setitem_rounds_like_torch_item_assignment(trio: list[Mixed]) -> None:
    swarm = Swarm.stack(trio)
    for value in (1e5, torch.tensor(0.1, dtype=torch.float64)):  # 1e5 overflows float16 to inf, as t[0] = 1e5
        out = swarm.clone()
        if not all(torch_assigns(stacked, [0, 2], value.to(stacked.dtype) if isinstance(value, Tensor) else value)
                   for stacked in swarm.params.values() if arithmetic(stacked)):
            # torch 2.15 refuses the overflow (2.13 stores inf): so does the swarm, before writing anything
            with pytest.raises(RuntimeError, match=r"^Swarm\.__setitem__: .*; nothing was changed$"):
                out[[0, 2]] = value
            for key, stacked in swarm.params.items():
                assert_same(out.params[key], stacked, f"refused swarm[[0, 2]] = {value!r}: {key}")
            continue
        out[[0, 2]] = value
        for key, stacked in swarm.params.items():
            expected = stacked.clone()
            if arithmetic(stacked):
                expected[[0, 2]] = value.to(stacked.dtype) if isinstance(value, Tensor) else value
            assert_same(out.params[key], expected, f"swarm[[0, 2]] = {value!r}: {key}")
    out = swarm.clone()
    out[1] = trio[0]
    for key, value in params(trio[0]).items():
        assert_same(out.params[key][1], value, f"swarm[1] = model: {key}")


def test_mean_and_weighted_sum_per_dtype(trio: list[Mixed]) -> None:
    swarm = Swarm.stack(trio)
    mean = swarm.mean()
    weights = torch.tensor([0.2, 0.3, 0.5])
    mix = weights @ swarm
    for key, value in swarm.params.items():
        if not arithmetic(value):  # member 0's
            assert_same(mean.params[key], value[0], f"mean {key}")
            assert_same(mix.params[key], value[0], f"w @ swarm {key}")
            continue
        assert_same(mean.params[key], value.mean(0), f"mean {key}")
        weighted_sum_close(mix.params[key], weights.to(value.dtype), value, f"w @ swarm {key}")


def test_norm_promotes_across_dtypes_and_matches_the_members(trio: list[Mixed]) -> None:
    swarm = Swarm.stack(trio)
    norms = swarm.norm()
    assert norms.dtype == torch.float64  # complex64's norm is float32; promoted with float64's
    for i, model in enumerate(trio):
        exact = math.sqrt(sum(float(v.abs().double().pow(2).sum()) for v in params(model).values() if arithmetic(v)))
        assert abs(float(norms[i]) - exact) <= 8 * 2.0 ** -8 * exact  # bfloat16 parts round to 8 bits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.complex64])
def test_random_constructors_lay_out_one_draw_per_dtype(dtype: torch.dtype) -> None:
    net = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)).to(dtype)
    centre = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    for make, draw in ((lambda g: Swarm.randn(net, 4, generator=g), torch.randn),
                       (lambda g: Swarm.rand(net, 4, generator=g), torch.rand),
                       (lambda g: Swarm.normal(net, 4, std=0.5, generator=g),
                        lambda *shape, **kw: centre + 0.5 * torch.randn(*shape, **kw))):
        swarm = make(torch.Generator().manual_seed(0))
        flat = torch.cat([v.reshape(4, -1) for v in swarm.params.values()], 1)
        assert_same(flat, draw(4, 14, dtype=dtype, generator=torch.Generator().manual_seed(0)), str(make))
    zeros = Swarm.zeros(net, 2)
    assert all(v.dtype == dtype and not v.any() for v in zeros.params.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.complex64])
def test_swarm_to_casts_like_module_to(trio: list[Mixed], dtype: torch.dtype) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own warning: casting complex parameters drops their imaginary part
        converted = Swarm.stack(trio).to(dtype)
        for i, model in enumerate(trio):
            reference = copy.deepcopy(model).to(dtype)
            for key, value in params(reference).items():
                assert_same(converted.params[key][i], value, f"to({dtype}) {key}")
            for key, value in reference.named_buffers():
                assert_same(converted.buffers[key][i], value, f"to({dtype}) buffer {key}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64])
def test_swarm_forward_per_dtype_matches_a_loop_up_to_rounding(dtype: torch.dtype) -> None:
    # the fused path (a Sequential of Linear layers) and the vmap one (a root nn.Linear): each keeps the
    # dtype; the values are a loop's up to rounding (vmap adds a batched Linear's bias as its own rounding)
    torch.manual_seed(0)
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-5)
    for make in (lambda: nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4)), lambda: nn.Linear(16, 8)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's warning about complex modules
            models = [make().to(dtype) for _ in range(3)]
        swarm = Swarm.stack(models)
        x = torch.randn(5, 16).to(dtype)
        with torch.no_grad():
            out, loop = swarm(x), torch.stack([model(x) for model in models])
        assert out.dtype == dtype and out.shape == loop.shape
        assert torch.allclose(out, loop, rtol=tolerance, atol=tolerance), float((out - loop).abs().max())


def test_grad_and_value_gives_each_dtype_its_own_gradient(trio: list[Mixed]) -> None:
    swarm = Swarm.stack(trio)
    x = torch.randn(4, 3)

    def loss(member: Any, x: Tensor) -> Tensor:
        return member(x).sum() + member.params["c"].abs().pow(2).sum() + member.params["d"].pow(2).sum().float()

    grads, losses = swarm.grad_and_value(loss, x)
    assert losses.dtype == torch.float32
    for i, model in enumerate(trio):
        model.zero_grad()
        (model(x).sum() + model.c.abs().pow(2).sum() + model.d.pow(2).sum().float()).backward()
        for key, p in model.named_parameters():
            expected = p.grad if p.grad is not None else torch.zeros_like(p)
            assert_same(grads.params[key][i], expected, f"grad {key}")
        for key, value in model.named_buffers():
            assert grads.buffers[key].dtype == value.dtype


# ---------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------
def test_average_is_the_running_lerp_per_tensor_and_carries_integers() -> None:
    models = [mixed(seed) for seed in range(4)]
    for weights in (None, [1.0, 2.0, 3.0, 4.0]):
        soup = merge.average(models, weights=weights)
        w = weights or [1.0] * 4
        for key, first in params(models[0]).items():
            if not arithmetic(first):
                assert_same(params(soup)[key], first, key)
                continue
            running, total = first.clone(), w[0]
            for k in range(1, 4):  # the documented running mean: lerp(mean, x_k, w_k / (w_1 + ... + w_k))
                total += w[k]
                running = torch.lerp(running, params(models[k])[key], w[k] / total)
            assert_same(params(soup)[key], running, f"average {key}")
        buffers = dict(soup.named_buffers())
        assert_same(buffers["ib"], models[0].ib, "integer buffer from the first model")
        assert buffers["hb"].dtype == torch.float16


def test_ema_update_per_dtype_integers_copied() -> None:
    target, online = mixed(0), mixed(1)
    before, source = params(target), params(online)
    for tau in (0.1, torch.tensor(0.25, dtype=torch.float64)):
        model = copy.deepcopy(target)
        merge.ema_(model, online, tau=tau)
        for key, value in before.items():
            weight = tau if isinstance(tau, float) else tau.to(value.dtype)
            expected = torch.lerp(value, source[key], weight) if arithmetic(value) else source[key]
            assert_same(params(model)[key], expected, f"ema_ tau={tau!r} {key}")
        assert_same(model.ib, online.ib, "ib")
        assert_same(model.hb, torch.lerp(target.hb, online.hb, tau if isinstance(tau, float) else tau.half()), "hb")


@pytest.mark.parametrize("pack", [True, False])
def test_ema_class_per_dtype(pack: bool) -> None:
    model = mixed(0)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ema = merge.EMA(model, decay=0.75, pack=pack)
    with torch.no_grad():
        for p in model.parameters():
            if arithmetic(p):
                p.mul_(1.5)
        model.hb.add_(1)
        model.ib.add_(1)
    ema.update()
    now, averaged = model.state_dict(), ema.averaged.state_dict()
    for key, value in start.items():
        expected = torch.lerp(value, now[key], 1.0 - 0.75) if arithmetic(value) else now[key]
        assert_same(averaged[key], expected, f"EMA {key}")


def test_task_vector_and_arithmetic_per_dtype() -> None:
    base, tuned = mixed(0), [mixed(1), mixed(2)]
    b, t = params(base), [params(m) for m in tuned]
    vector = merge.task_vector(tuned[0], base)
    merged = merge.task_arithmetic(base, tuned, scale=0.5)
    for key, value in b.items():
        if not arithmetic(value):
            assert_same(params(vector)[key], t[0][key], key)
            assert_same(params(merged)[key], value, key)
            continue
        assert_same(params(vector)[key], t[0][key] - value, f"task_vector {key}")
        total = (t[0][key] - value) * 0.5
        total += (t[1][key] - value) * 0.5
        assert_same(params(merged)[key], value + total, f"task_arithmetic {key}")


def test_dare_masks_per_dtype_as_documented() -> None:
    base, tuned = mixed(0), [mixed(1), mixed(2)]
    merged = merge.dare(base, tuned, drop=0.5, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    b = params(base)
    total: dict[str, Tensor] = {}
    for model in tuned:  # per tensor, model by model; u in float32 (float64 for float64 parameters)
        for key, value in b.items():
            if not arithmetic(value):
                continue
            delta = params(model)[key] - value
            u = torch.rand(value.shape, generator=generator,
                           dtype=torch.float64 if value.dtype == torch.float64 else torch.float32)
            delta = delta * (u >= 0.5).to(value.dtype) / 0.5
            total[key] = delta if key not in total else total[key] + delta
    for key, value in b.items():
        assert_same(params(merged)[key], value + total[key] if arithmetic(value) else value, f"dare {key}")


def _slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    a64, b64 = a.double().flatten(), b.double().flatten()
    norms = float(a64.norm()) * float(b64.norm())
    if norms == 0.0:
        return torch.lerp(a, b, t)
    cosine = max(-1.0, min(1.0, float(a64 @ b64) / norms))
    if abs(cosine) > 0.9995:
        return torch.lerp(a, b, t)
    omega = math.acos(cosine)
    return a * (math.sin((1 - t) * omega) / math.sin(omega)) + b * (math.sin(t * omega) / math.sin(omega))


def test_slerp_and_ties_per_real_dtype_and_refuse_complex_by_name() -> None:
    models = [real(seed) for seed in range(4)]
    p = [params(m) for m in models]
    out = merge.slerp(models[0], models[1], 0.3)
    for key, value in p[0].items():
        assert_same(params(out)[key], _slerp(value, p[1][key], 0.3) if arithmetic(value) else value, f"slerp {key}")
    # TIES by hand (Yadav et al.): trim over the whole model, elect signs, disjoint mean
    taus = [{k: q[k] - v for k, v in p[0].items() if arithmetic(v)} for q in p[1:]]
    trimmed = []
    for tau in taus:
        magnitudes = torch.cat([v.abs().double().flatten() for v in tau.values()])
        keep = magnitudes.numel() // 2
        threshold = magnitudes.kthvalue(magnitudes.numel() - keep + 1).values
        trimmed.append({k: torch.where(v.abs().double() >= threshold, v, torch.zeros_like(v)) for k, v in tau.items()})
    merged = merge.ties(models[0], models[1:], density=0.5)
    for key, value in p[0].items():
        if not arithmetic(value):
            assert_same(params(merged)[key], value, key)
            continue
        sign = torch.sign(sum(t[key] for t in trimmed))
        numerator, count = torch.zeros_like(sign), torch.zeros_like(sign)
        for t in trimmed:
            agree = t[key] * sign > 0
            numerator += torch.where(agree, t[key], torch.zeros_like(sign))
            count += agree.to(count.dtype)
        assert_same(params(merged)[key], value + numerator / count.clamp(min=1), f"ties {key}")
    with pytest.raises(TypeError, match=r"^slerp: parameter 'c' is complex"):
        merge.slerp(mixed(0), mixed(1), 0.5)
    with pytest.raises(TypeError, match=r"^ties: parameter 'c' is complex"):
        merge.ties(mixed(0), [mixed(1)])


def test_ravel_round_trip_keeps_dtypes_and_carries_integers() -> None:
    model = mixed(0)
    vector, unravel = merge.ravel(model)
    assert vector.dtype == torch.complex128  # complex64 promoted with float64
    assert vector.numel() == sum(v.numel() for v in params(model).values() if arithmetic(v))
    back = unravel(vector)
    for key, value in params(model).items():
        assert_same(params(back)[key], value, f"unravel {key}")
    swarm = Swarm.stack([model, mixed(1)])
    stacked, unravel_swarm = merge.ravel(swarm)
    again = unravel_swarm(stacked)
    for key, value in swarm.params.items():
        assert_same(again.params[key], value, f"unravel swarm {key}")
    for key, value in swarm.buffers.items():
        assert_same(again.buffers[key], value, f"unravel swarm buffer {key}")


def test_update_bn_in_bfloat16_equals_swa_utils() -> None:
    ours, theirs = real(0), real(0)
    data = [torch.randn(8, 6) for _ in range(3)]
    merge.update_bn(ours, data)
    torch.optim.swa_utils.update_bn(data, theirs)
    for (key, a), (_, b) in zip(ours.named_buffers(), theirs.named_buffers()):
        assert_same(a, b, f"update_bn {key}")


# ---------------------------------------------------------------------------------------------
# algorithms
# ---------------------------------------------------------------------------------------------
def _carried(out: Swarm, swarm: Swarm, where: str) -> None:
    for key, value in swarm.params.items():
        assert out.params[key].dtype == value.dtype, f"{where} {key}"
        if not arithmetic(value):
            assert_same(out.params[key], value, f"{where} {key}")
    for key, value in swarm.buffers.items():
        assert out.buffers[key].dtype == value.dtype, f"{where} buffer {key}"


def test_algorithms_keep_dtypes_and_carry_integer_leaves(trio: list[Mixed]) -> None:
    swarm = Swarm.stack(trio + [mixed(3)])
    losses = torch.tensor([3.0, 1.0, 2.0, 0.5])
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    state = alg.pso_init(swarm, losses)
    moved, state = alg.pso_step(swarm, losses, state, generator=g())
    _carried(moved, swarm, "pso_step")
    _carried(alg.apso(swarm, 1, alpha=0.1, beta=0.3, generator=g()), swarm, "apso")
    _carried(alg.truncation_selection(swarm, losses, survivors=2, sigma=0.1, generator=g()), swarm, "selection")
    noise = alg.es_noise(trio[0], 4, generator=g())
    _carried(noise, swarm, "es_noise")
    step = alg.es_step(nyto.particle(trio[0]), noise, losses, sigma=0.1, lr=0.1)
    gradient = alg.es_gradient(noise, losses, sigma=0.1)
    weights = (losses - losses.mean()) / (4 * 0.1)
    for key, value in params(trio[0]).items():
        assert step.params[key].dtype == value.dtype
        if not arithmetic(value):
            assert_same(step.params[key], value, f"es_step {key}")
            continue
        weighted_sum_close(gradient.params[key], weights.to(value.dtype), noise.params[key], f"es_gradient {key}")
    stepped, _ = alg.sgd_step(swarm, lambda member, x: member(x).pow(2).mean(), torch.randn(5, 3), lr=0.1)
    _carried(stepped, swarm, "sgd_step")


def _centered(size: int, rank: int) -> Fraction:
    return Fraction(rank, max(size - 1, 1)) - Fraction(1, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("size", [1, 2, 300, 3001])
def test_centered_ranks_are_the_formula_rounded_once(dtype: torch.dtype, size: int) -> None:
    # bfloat16 cannot count past 256 (float16 past 2048), and r / (P - 1) - 0.5 cancels near 0: computed in
    # the losses' own dtype the ranks were off by several units in the last place (0.005 at P = 300)
    losses = torch.randn(size, generator=torch.Generator().manual_seed(size)).to(dtype)
    ranks = alg.centered_ranks(losses)
    assert ranks.dtype == dtype
    order = losses.argsort(stable=True).tolist()
    eps = Fraction(torch.finfo(dtype).eps)
    for rank, index in enumerate(order):
        exact = _centered(size, rank)
        got = Fraction(float(ranks[index]))
        # rounded once: at most half the spacing of dtype at the exact value (eps * 2^(e - 1) on [2^(e-1), 2^e))
        half_spacing = eps * Fraction(2) ** (math.frexp(float(exact))[1] - 2) if exact else Fraction(0)
        assert abs(got - exact) <= half_spacing, (rank, float(got), float(exact))
    assert float(ranks.min()) == -0.5 and float(ranks.max()) == (0.5 if size > 1 else -0.5)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
class Exotic(nn.Module):
    """NaN payloads, signed zeros and infinities in half precision, and the rarer dtypes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0x7FC1, -1, -32768, 0x7F80, 1], dtype=torch.int16).view(torch.bfloat16))
        self.h = nn.Parameter(torch.tensor([0x7E01, -1024, -32768, 1], dtype=torch.int16).view(torch.float16))
        self.c = nn.Parameter(torch.tensor([0x7FC00001, -(2 ** 31), 5, 7], dtype=torch.int32).view(torch.complex64))
        self.q = nn.Parameter(torch.randn(4).to(torch.float8_e5m2), requires_grad=False)
        self.u = nn.Parameter(torch.tensor([1, 2, 60000], dtype=torch.int32).to(torch.uint16), requires_grad=False)
        self.register_buffer("flag", torch.tensor([True, False]))
        self.register_buffer("edges", torch.tensor([float("-inf"), -0.0]).half())


def test_checkpoints_round_trip_every_dtype_bit_for_bit(tmp_path: Any) -> None:
    model, swarm = Exotic(), Swarm.stack([mixed(0), mixed(1)])
    nyto.particle(model)  # packed first: views into one buffer per dtype are saved as themselves
    state = {"model": model, "particle": nyto.particle(mixed(2), buffers=True), "swarm": swarm,
             "loose": {"c128": torch.randn(3, dtype=torch.complex128), "c32": torch.randn(2, dtype=torch.complex32)}}
    path = tmp_path / "dtypes.pt"
    nyto.save(state, path)
    like = {"model": Exotic(), "particle": nyto.particle(mixed(5), buffers=True),
            "swarm": Swarm.stack([mixed(6), mixed(7)]),
            "loose": {k: torch.zeros_like(v) for k, v in state["loose"].items()}}
    back = nyto.load(path, like=like)
    pairs = [(f"model {k}", v, back["model"].state_dict()[k]) for k, v in model.state_dict().items()]
    pairs += [(f"particle {k}", v, back["particle"].params[k]) for k, v in state["particle"].params.items()]
    pairs += [(f"swarm {k}", v, back["swarm"].params[k]) for k, v in swarm.params.items()]
    pairs += [(f"swarm buffer {k}", v, back["swarm"].buffers[k]) for k, v in swarm.buffers.items()]
    pairs += [(f"loose {k}", v, back["loose"][k]) for k, v in state["loose"].items()]
    for where, saved, loaded in pairs:
        assert loaded.dtype == saved.dtype and loaded.shape == saved.shape, where
        assert bits(loaded) == bits(saved), where
    with pytest.raises(nyto.StructureError, match=r"parameter 'weight' differs: like has shape \(1, 2\) float32, "
                                                   r"the checkpoint has shape \(1, 2\) bfloat16"):
        nyto.save({"m": nn.Linear(2, 1).bfloat16()}, tmp_path / "bf16.pt")
        nyto.load(tmp_path / "bf16.pt", like={"m": nn.Linear(2, 1)})


# ---------------------------------------------------------------------------------------------
# distributed, in a world of one
# ---------------------------------------------------------------------------------------------
class Wire(nn.Module):
    """Dtypes that travel specially: complex32 (no CPU division), float8 and uint16 (raw bytes), bool."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(3))
        self.ch = nn.Parameter(torch.randn(3, dtype=torch.complex32))
        self.q = nn.Parameter(torch.randn(4).to(torch.float8_e5m2), requires_grad=False)
        self.u = nn.Parameter(torch.tensor([1, 2, 60000], dtype=torch.int32).to(torch.uint16), requires_grad=False)
        self.c = nn.Parameter(torch.randn(2, dtype=torch.complex128))
        self.register_buffer("flag", torch.tensor([True, False]))
        self.register_buffer("bf", torch.randn(3).bfloat16())


@pytest.mark.parametrize("make", [Wire, lambda: mixed(0)], ids=["wire", "mixed"])
@pytest.mark.parametrize("kind", ["model", "unpacked model", "particle", "particle with buffers", "swarm"])
def test_collectives_in_a_world_of_one_return_every_dtype_unchanged(world_of_one: Any, make: Any, kind: str) -> None:
    # all_reduce_mean of a model holding complex32 raised torch's "div_cpu not implemented for 'ComplexHalf'"
    # (and, with more ranks, after dividing the groups before it); it now divides it after the sum
    source = make()
    saved = {k: v.detach().clone() for k, v in source.state_dict().items()}
    for name, collective in (("broadcast", lambda x, **kw: nd.broadcast(x, 0, **kw)),
                             ("all_reduce_mean", nd.all_reduce_mean)):
        model = copy.deepcopy(source)
        options = {"pack": False} if kind == "unpacked model" else {}
        x: Any = {"model": model, "unpacked model": model, "particle": nyto.particle(model),
                  "particle with buffers": nyto.particle(model, buffers=True),
                  "swarm": Swarm.stack([model, model])}[kind]
        out = collective(x, **options)
        if kind in ("model", "unpacked model"):
            assert out is model
            values = model.state_dict()
        elif kind == "swarm":
            values = {**{k: v[1] for k, v in out.params.items()}, **{k: v[1] for k, v in out.buffers.items()}}
        else:
            values = {**out.params, **dict(out.module().named_buffers())}
        for key, value in saved.items():
            assert values[key].dtype == value.dtype and bits(values[key]) == bits(value), f"{name} {kind} {key}"
    swarm = Swarm.stack([source, make()])
    whole = nd.all_gather(swarm)
    moved = nd.exchange(swarm)
    member, loss, rank = nd.best(swarm, torch.tensor([2.0, 1.0], dtype=torch.bfloat16))
    assert (loss.dtype, float(loss), rank) == (torch.bfloat16, 1.0, 0)
    for key, value in swarm.params.items():
        assert bits(whole.params[key]) == bits(value) and bits(moved.params[key]) == bits(value), key
        assert bits(member.params[key]) == bits(value[1]), key
    for key, value in swarm.buffers.items():
        assert bits(whole.buffers[key]) == bits(value), key


# ---------------------------------------------------------------------------------------------
# refusals name the parameter and its dtype
# ---------------------------------------------------------------------------------------------
def test_dtype_refusals_name_the_parameter_and_dtype(trio: list[Mixed]) -> None:
    swarm = Swarm.stack(trio)
    complex_weights = torch.tensor([1j, 2j, 3j])
    with pytest.raises(TypeError, match=r"^mul: complex weights would turn parameter 'd' \(float64\) complex"):
        swarm * complex_weights
    # ``w @ swarm`` named the parameter but not its dtype
    with pytest.raises(TypeError, match=r"^matmul: complex weights would turn parameter 'd' \(float64\) complex; "
                                        r"nytorch keeps every dtype"):
        complex_weights @ swarm
    with pytest.raises(TypeError, match=r"^mul: the scalar 1j would turn parameter 'd' \(shape \(4,\) float64\)"):
        swarm * 1j
    with pytest.raises(TypeError, match=r"^lerp_: the scalar 0\.5j would turn parameter 'd'"):
        swarm.clone().lerp_(swarm, 0.5j)
    with pytest.raises(TypeError, match=r"^Swarm\.__setitem__: the scalar 1j would turn parameter 'd'"):
        swarm[0] = 1j
    with pytest.raises(nyto.StructureError, match=r"^stack: item 1: parameter 'weight' differs: shape \(1, 2\) "
                                                   r"float32 vs shape \(1, 2\) float16"):
        Swarm.stack([nn.Linear(2, 1), nn.Linear(2, 1).half()])
    with pytest.raises(nyto.StructureError, match=r"^average: parameter 'weight' differs: shape \(1, 2\) float32 vs "
                                                   r"shape \(1, 2\) float16 in models\[1\]"):
        merge.average([nn.Linear(2, 1), nn.Linear(2, 1).half()])
    with pytest.raises(nyto.StructureError, match=r"^ema_: parameter 'weight' differs: shape \(1, 2\) float32 vs "
                                                   r"shape \(1, 2\) float64 in online"):
        merge.ema_(nn.Linear(2, 1), nn.Linear(2, 1).double(), tau=0.5)
    with pytest.raises(TypeError, match=r"^ema_: the scalar tensor\(0\.\+0\.5000j\) would turn parameter 'weight'"):
        merge.ema_(nn.Linear(2, 1), nn.Linear(2, 1), tau=torch.tensor(0.5j))
    with pytest.raises(nyto.StructureError, match=r"^from_params: expected 'weight' of shape \(P, 1, 2\) float32"):
        Swarm.from_params(nn.Linear(2, 1), {"weight": torch.zeros(3, 1, 2, dtype=torch.float64),
                                            "bias": torch.zeros(3, 1)})
    with pytest.raises(TypeError, match=r"^unravel: expected a real vector for float32 parameters"):
        merge.ravel(nn.Linear(2, 1))[1](torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"^Swarm\.to: expected a floating point or complex dtype"):
        swarm.to(torch.int32)


# ---------------------------------------------------------------------------------------------
# in-place updates on dtypes torch has no such kernel for: refused before anything is written
# ---------------------------------------------------------------------------------------------
class Fp8(nyto.NytoModule):
    """float32 layers around one of ``dtype`` (float8 has no add_/mul_/div_/pow_/lerp_ on the CPU,
    complex32 no div_/pow_/lerp_): the float32 layer before it is what a half-done update would change."""

    def __init__(self, dtype: torch.dtype = torch.float8_e4m3fn) -> None:
        super().__init__()
        self.a = nn.Linear(2, 3)
        self.odd = nn.Linear(3, 2).to(dtype)
        self.z = nn.Linear(2, 2)


def _fp8_pair(dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[Fp8, Fp8]:
    torch.manual_seed(0)
    return Fp8(dtype), Fp8(dtype)


def _exactly(tensors: Any) -> list[tuple[Tensor, int, int, Tensor]]:
    """Each tensor, its address, version counter and bits (torch.equal has no float8 / complex32 kernel)."""
    return [(t, t.data_ptr(), t._version, t.detach().view(torch.uint8).clone()) for t in tensors]


def _unchanged(before: list[tuple[Tensor, int, int, Tensor]], tensors: Any) -> bool:
    now = list(tensors)
    return len(now) == len(before) and all(
        t is was and t.data_ptr() == ptr and t._version == version and torch.equal(t.detach().view(torch.uint8), bits)
        for t, (was, ptr, version, bits) in zip(now, before))


def _every(x: Any) -> list[Tensor]:
    if isinstance(x, Swarm):
        return list(x.params.values())
    return [*x.parameters(), *x.buffers()]


_FP8_UPDATES = {
    "*=": (lambda p, q: p.__imul__(2), "mul"), "+=": (lambda p, q: p.__iadd__(q), "add"),
    "-=": (lambda p, q: p.__isub__(q), "sub"), "/=": (lambda p, q: p.__itruediv__(2), "div"),
    "**=": (lambda p, q: p.__ipow__(2), "pow"), "lerp_": (lambda p, q: p.lerp_(q, 0.5), "lerp"),
    "lerp_ tensor weight": (lambda p, q: p.lerp_(q, torch.tensor(0.5)), "lerp"),
}


@pytest.mark.parametrize("how", ["Particle", "Particle, model operand", "Particle pack=False", "NytoModule",
                                 "NytoModule unpacked"])
@pytest.mark.parametrize("update", list(_FP8_UPDATES))
def test_in_place_updates_refuse_a_float8_model_before_writing(how: str, update: str) -> None:
    a, b = _fp8_pair()
    if how == "NytoModule unpacked":  # a non-contiguous weight: never packed, the per-tensor path
        a.odd.weight.data = a.odd.weight.data.t().contiguous().t()
        b.odd.weight.data = b.odd.weight.data.t().contiguous().t()
    call, op = _FP8_UPDATES[update]
    if how.startswith("Particle"):
        p = nyto.particle(a, pack=how != "Particle pack=False")
        q = b if how == "Particle, model operand" else nyto.particle(b, pack=how != "Particle pack=False")
    else:
        p, q = a, b
    before, other = _exactly(_every(a)), _exactly(_every(b))  # storage included: nothing is packed either
    with pytest.raises(TypeError, match=rf"^{op}: torch has no in-place {op} for float8_e4m3fn tensors on cpu \(.*not "
                                        rf"implemented for 'Float8_e4m3fn'\), which parameter 'odd\.weight' \(shape "
                                        r"\(2, 3\) float8_e4m3fn\) holds: the update would fail there after writing the "
                                        r"tensors before it; nothing was changed"):
        call(p, q)
    assert _unchanged(before, _every(a)) and _unchanged(other, _every(b))


@pytest.mark.parametrize("update", ["/=", "**=", "lerp_"])
@pytest.mark.parametrize("pack", [True, False])
def test_in_place_updates_refuse_complex32_where_torch_has_no_kernel(update: str, pack: bool) -> None:
    a, b = _fp8_pair(torch.complex32)
    p, q = nyto.particle(a, pack=pack), nyto.particle(b, pack=pack)
    before = _exactly(_every(a))
    call, op = _FP8_UPDATES[update]
    with pytest.raises(TypeError, match=rf"^{op}: torch has no in-place {op} for complex32 tensors on cpu .* which "
                                        r"parameter 'odd\.weight'"):
        call(p, q)
    assert _unchanged(before, _every(a))
    # what torch has (complex32 add_ and mul_) still runs, as per tensor
    expected = [t.detach().clone() * 2 if t.dtype != torch.complex32 else (t.detach().clone().mul_(2))
                for t in a.parameters()]
    p *= 2
    assert all(torch.equal(t.detach().view(torch.uint8), e.view(torch.uint8)) for t, e in zip(a.parameters(), expected))


@pytest.mark.parametrize("update", ["+= swarm", "*= 2", "add_", "lerp_"])
def test_swarm_in_place_updates_refuse_a_float8_group_before_writing(update: str) -> None:
    a, b = _fp8_pair()
    swarm = Swarm.stack([a, b])
    before = _exactly(_every(swarm))
    op = {"+= swarm": "add", "*= 2": "mul", "add_": "add_", "lerp_": "lerp_"}[update]
    kernel = {"add_": "add", "lerp_": "lerp"}.get(op, op)
    with pytest.raises(TypeError, match=rf"^{op}: torch has no in-place {kernel} for float8_e4m3fn tensors on cpu "
                                        r".* which parameter 'odd\.weight' holds"):
        if update == "+= swarm":
            swarm += swarm.clone()
        elif update == "*= 2":
            swarm *= 2
        elif update == "add_":
            swarm.add_(swarm.clone(), alpha=0.5)
        else:
            swarm.lerp_(a, 0.5)
    assert _unchanged(before, _every(swarm))


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("decay", [0.9, torch.tensor(0.9)], ids=["number", "tensor"])
def test_ema_refuses_a_float8_model_before_writing(pack: bool, decay: Any) -> None:
    a, b = _fp8_pair()
    ema = merge.EMA(a, decay=decay, pack=pack)
    with torch.no_grad():
        for t in a.parameters():  # the model moves away from its average: an update would change it
            if t.dtype == torch.float32:
                t.add_(1.0)
    before = _exactly(_every(ema.averaged))
    for call in (lambda: ema.update(), lambda: ema.update(b)):
        with pytest.raises(TypeError, match=r"^EMA\.update: torch has no in-place lerp for float8_e4m3fn tensors on "
                                            r"cpu .* which parameter 'odd\.weight' \(shape \(2, 3\) float8_e4m3fn\)"):
            call()
        assert _unchanged(before, _every(ema.averaged))
    assert ema.step == 0
    target = copy.deepcopy(b)
    before = _exactly(_every(target))
    with pytest.raises(TypeError, match=r"^ema_: torch has no in-place lerp for float8_e4m3fn tensors on cpu .* "
                                        r"which parameter 'odd\.weight'"):
        merge.ema_(target, a, decay=decay)
    assert _unchanged(before, _every(target))
    # with the float8 layer left out of arithmetic the rest is averaged as per tensor
    target = copy.deepcopy(b)
    target.set_param_config(name="odd", operational=False)
    merge.ema_(target, a, decay=0.5)
    assert torch.equal(target.a.weight, torch.lerp(b.a.weight, a.a.weight, 0.5))
