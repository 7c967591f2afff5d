"""torch's global modes and settings while nytorch runs.

Deterministic algorithms, anomaly detection, the default dtype, global grad mode, inference mode,
autocast, seeded RNG streams and ``fork_rng``, print options, ``torch.compile`` of user functions,
and ``TorchFunctionMode`` / ``TorchDispatchMode`` (a FLOP counter, ``FakeTensorMode``) active around
nytorch.  References are plain torch: per-tensor loops over ``named_parameters()``, a Python loop of
member forwards, or the same nytorch call made with every setting at its default.  Every test checks
that nytorch leaves the settings as it found them (``settings_kept``).
"""
# mypy: disable-error-code="union-attr, index, operator, arg-type, assignment"
from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import nytorch as nyto
import nytorch.functional as nf
from nytorch import Particle, Swarm, merge
from nytorch import algorithms as alg

from conftest import assert_like_loop

Tensor = torch.Tensor
X = torch.randn(5, 3, generator=torch.Generator().manual_seed(7))


def _settings() -> tuple[Any, ...]:
    import torch.utils.deterministic as tud
    return (torch.get_default_dtype(), torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            tud.fill_uninitialized_memory, torch.is_anomaly_enabled(), torch.is_autocast_enabled("cpu"),
            torch._C._len_torch_dispatch_stack(), torch._C._len_torch_function_stack(),
            dict(vars(torch._tensor_str.PRINT_OPTS)))


@pytest.fixture(autouse=True)
def settings_kept() -> Iterator[None]:
    """Each test starts and ends with torch's settings as they were (nytorch changes none of them)."""
    before = _settings()
    yield
    assert _settings() == before


class Net(nyto.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


def seq(seed: int, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Made with float32 as the default dtype, whatever it is now (so models never depend on it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)
    finally:
        torch.set_default_dtype(previous)


def net(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net()


def tensors(x: Any) -> list[Tensor]:
    """The tensors of a result, in ``named_parameters()`` order (plain torch reads them)."""
    if isinstance(x, nn.Module):
        return [p.detach() for p in x.parameters()]
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, dict):
        return list(x.values())
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in tensors(item)]
    return list(x.params.values())


def assert_same(got: Any, expected: Any) -> None:
    g, e = tensors(got), tensors(expected)
    assert len(g) == len(e)
    for i, (a, b) in enumerate(zip(g, e)):
        assert a.dtype == b.dtype and type(a) is type(b), (i, a.dtype, b.dtype)
        assert torch.equal(a, b), i


def ops(dtype: torch.dtype = torch.float32) -> dict[str, Callable[[], Any]]:
    """nytorch operations that create numbers, weights, buffers and random draws of their own.

    The tensors given here are float32 whatever the default dtype: only nytorch's own may not depend on it.
    """
    a, b = seq(0, dtype), seq(1, dtype)
    swarm = Swarm.stack([seq(2, dtype), seq(3, dtype), seq(4, dtype)])
    noise = alg.es_noise(a, 4, generator=torch.Generator().manual_seed(0))
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731

    def ema(decay: Any) -> nn.Module:
        model = seq(5, dtype)
        average = merge.EMA(model, decay=decay)
        for _ in range(3):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1)
            average.update()
        return average.averaged

    return {
        "p * 0.1": lambda: nyto.particle(a) * 0.1,
        "p / 3": lambda: nyto.particle(a, pack=False) / 3,
        "expression": lambda: 0.9 * (nyto.particle(a) - nyto.particle(b)) + nyto.particle(a),
        "lerp": lambda: nyto.particle(a).lerp(nyto.particle(b), 0.3),
        "nf.lerp": lambda: nf.lerp(nf.params(a), nf.params(b), 0.3),
        "nf.norm": lambda: nf.norm(nf.params(a)),
        "nf.dot": lambda: nf.dot(nf.params(a), nf.params(b)),
        "ema_": lambda: merge.ema_(seq(0, dtype), b, decay=0.999),
        "EMA": lambda: ema(0.9999),
        "EMA warmup": lambda: ema(merge.warmup_decay(0.9999)),
        "average": lambda: merge.average([a, b], weights=[0.1, 0.9]),
        "slerp": lambda: merge.slerp(a, b, 0.3),
        "ties": lambda: merge.ties(a, [b], density=0.5),
        "dare": lambda: merge.dare(a, [b], drop=0.5, generator=gen()),
        "dare swarm": lambda: merge.dare(swarm, [swarm * 2], drop=0.5, generator=gen()),
        "stack": lambda: Swarm.stack([a, b]),
        "swarm * w": lambda: swarm * torch.tensor([0.1, 0.2, 0.3], dtype=torch.float32),
        "swarm lerp_ w": lambda: swarm.clone().lerp_(swarm * 2, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float32)),
        "swarm mean": lambda: swarm.mean(),
        "swarm norm": lambda: swarm.norm(),
        "w @ swarm": lambda: torch.tensor([0.2, 0.3, 0.5], dtype=torch.float32) @ swarm,
        "Swarm.randn": lambda: Swarm.randn(a, 3, generator=gen()),
        "Swarm.normal": lambda: Swarm.normal(a, 3, std=0.1, generator=gen()),
        "Swarm.zeros": lambda: Swarm.zeros(a, 2),
        "es_noise": lambda: alg.es_noise(a, 4, generator=gen()),
        "es_gradient": lambda: alg.es_gradient(noise, torch.tensor([1., 2., 3., 4.], dtype=torch.float32), sigma=0.1),
        "apso": lambda: alg.apso(swarm, 0, alpha=0.1, beta=0.3, generator=gen()),
        "pso_step": lambda: alg.pso_step(swarm, torch.tensor([3., 2., 1.], dtype=torch.float32),
                                         alg.pso_init(swarm, torch.tensor([1., 2., 3.], dtype=torch.float32)), generator=gen())[0],
        "ravel": lambda: merge.ravel(swarm)[0],
        "unravel": lambda: merge.ravel(a)[1](merge.ravel(a)[0].tolist()),
        "flatten_": lambda: nyto.flatten_(seq(6, dtype)),
    }


def run_all(dtype: torch.dtype = torch.float32) -> dict[str, list[Tensor]]:
    return {name: [t.clone() for t in tensors(fn())] for name, fn in ops(dtype).items()}


def assert_runs_equal(got: dict[str, list[Tensor]], expected: dict[str, list[Tensor]]) -> None:
    for name in expected:
        assert len(got[name]) == len(expected[name]), name
        for a, b in zip(got[name], expected[name]):
            assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
            assert torch.equal(a, b), name


# -- deterministic algorithms, anomaly detection ------------------------------------------------------

@pytest.mark.parametrize("warn_only", [False, True])
def test_deterministic_algorithms_change_no_value_and_warn_nothing(warn_only: bool) -> None:
    """``use_deterministic_algorithms`` also fills fresh memory with NaN: packed buffers must hold no gap."""
    expected = run_all()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = run_all()
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert_runs_equal(got, expected)
    a, b = seq(0), seq(1)    # and against plain torch
    for p, q, r in zip(nyto.particle(a).params.values(), b.parameters(), tensors(expected["expression"])):
        assert torch.equal(r, 0.9 * (p - q) + p)


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
def test_anomaly_detection_changes_no_value_and_gradients_match_a_loop() -> None:
    expected = run_all()
    models = [net(i) for i in range(3)]
    with torch.autograd.detect_anomaly():
        got = run_all()
        grads, losses = Swarm.stack(models).grad_and_value(lambda m, x: m(x).pow(2).mean(), X)
    assert_runs_equal(got, expected)
    for k, model in enumerate(models):
        loss = model(X).pow(2).mean()
        loss.backward()
        assert torch.allclose(losses[k], loss.detach(), rtol=1e-6, atol=0)
        for g, p in zip(grads[k].params.values(), model.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


# -- the default dtype: nytorch's own numbers, weights and draws keep the models' dtypes ----------------

@pytest.mark.parametrize("default", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_default_dtype_changes_no_value_or_dtype(default: torch.dtype, dtype: torch.dtype) -> None:
    """E.g. a decay of 0.9999 made a tensor under a float16 default would round to 1.0 (no update)."""
    expected = run_all(dtype)
    torch.set_default_dtype(default)
    try:
        got = run_all(dtype)
    finally:
        torch.set_default_dtype(torch.float32)
    assert_runs_equal(got, expected)


def test_ema_under_float16_default_matches_a_float32_loop() -> None:
    model = seq(0)
    average = [p.detach().clone() for p in model.parameters()]
    torch.set_default_dtype(torch.float16)
    try:
        ema = merge.EMA(model, decay=0.9999)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1)
        ema.update()
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for a, p in zip(average, model.parameters()):
            a.lerp_(p, 1 - 0.9999)
    for got, ref in zip(ema.averaged.parameters(), average):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)


def test_checkpoint_loads_under_another_default_dtype(tmp_path: Any) -> None:
    state = {"swarm": Swarm.stack([seq(0), seq(1)]), "step": 3, "lr": 0.1, "half": seq(2, torch.float16)}
    nyto.save(state, tmp_path / "run.pt")
    torch.set_default_dtype(torch.float64)
    try:
        back = nyto.load(tmp_path / "run.pt", like=state)
    finally:
        torch.set_default_dtype(torch.float32)
    assert back["step"] == 3 and back["lr"] == 0.1
    assert_same(back["swarm"], state["swarm"])
    assert_same(back["half"], state["half"])


# -- global grad mode ---------------------------------------------------------------------------------

def test_grad_and_value_and_sgd_step_with_grad_disabled_globally_match_autograd() -> None:
    models = [net(i) for i in range(3)]
    swarm = Swarm.stack(models)
    loss_fn = lambda m, x: m(x).pow(2).mean()  # noqa: E731
    torch.set_grad_enabled(False)
    try:
        grads, losses = swarm.grad_and_value(loss_fn, X)
        stepped, step_losses = alg.sgd_step(swarm, loss_fn, X, lr=0.1)
    finally:
        torch.set_grad_enabled(True)
    assert torch.equal(losses, step_losses)
    for k, model in enumerate(models):
        loss_fn(model, X).backward()
        for (name, p), g, s in zip(model.named_parameters(), grads[k].params.values(), stepped[k].params.values()):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(s, p.detach() - 0.1 * p.grad, rtol=1e-5, atol=1e-7)


def test_enable_grad_inside_no_grad_differentiates_nf_and_leaves_particle_results_as_leaves() -> None:
    a, b = seq(0), seq(1)
    w = torch.tensor(0.3, requires_grad=True)
    with torch.no_grad():
        assert not nf.lerp(nf.params(a), nf.params(b), w)["0.weight"].requires_grad   # as torch.lerp
        with torch.enable_grad():
            mixed = nf.lerp(nf.params(a), nf.params(b), w)
            total = sum(v.sum() for v in mixed.values())
            total.backward()
            result = nyto.particle(a) * 2 + nyto.particle(b)
            module = result.module()
    expected = sum((q - p).sum() for p, q in zip(a.parameters(), b.parameters())).detach()
    torch.testing.assert_close(w.grad, expected)
    assert all(p.is_leaf and p.requires_grad and p.grad_fn is None for p in module.parameters())


def test_grad_mode_is_restored_after_a_refused_operation() -> None:
    p = nyto.particle(seq(0))
    for enabled in (True, False):
        torch.set_grad_enabled(enabled)
        try:
            with pytest.raises(TypeError, match=r"mul: the scalar 1j would turn parameter '0\.weight'"):
                p * 1j
            assert torch.is_grad_enabled() is enabled
        finally:
            torch.set_grad_enabled(True)


# -- inference mode around swarm forwards, merges and EMA -----------------------------------------------

def test_ema_swap_and_update_inside_inference_mode_then_training_matches_torch() -> None:
    model, reference = net(0), net(0)
    ema = merge.EMA(model, decay=0.5)
    average = [p.detach().clone() for p in reference.parameters()]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, reference)]
    for x in X.split(2):
        for m, o in zip((model, reference), opts):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
        with torch.inference_mode():      # evaluation in inference mode, then training goes on
            ema.update()
            with ema.swap():
                swapped = model(X)
        with torch.no_grad():
            for a, p in zip(average, reference.parameters()):
                a.lerp_(p, 0.5)
        plain = copy.deepcopy(reference)
        with torch.no_grad():
            for p, a in zip(plain.parameters(), average):
                p.copy_(a)
        torch.testing.assert_close(swapped, plain(X), rtol=1e-6, atol=1e-6)
    assert not any(p.is_inference() for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))


def test_swarm_updated_inside_inference_mode_trains_outside() -> None:
    models = [net(i) for i in range(2)]
    swarm = Swarm.stack(models)
    with torch.inference_mode():
        out = swarm(X)
        swarm += 1
        swarm.lerp_(swarm * 2, 0.5)
    assert_like_loop(out, torch.stack([m(X) for m in models]))
    grads, losses = swarm.grad_and_value(lambda m, x: m(x).sum(), X)
    for k, model in enumerate(models):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1).mul_(1.5)
        model(X).sum().backward()
        for g, p in zip(grads[k].params.values(), model.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)


def test_result_first_touched_inside_inference_mode_trains_outside() -> None:
    a, b, reference = net(0), net(1), net(0)
    result = a + b
    with torch.no_grad():
        for p, q in zip(reference.parameters(), b.parameters()):
            p.add_(q)
    with torch.inference_mode():
        result.a.weight.sum()
    for m in (result, reference):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m(X).pow(2).sum().backward()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(result.parameters(), reference.parameters()))


# -- autocast -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_autocast_keeps_every_dtype_and_value(dtype: torch.dtype, autocast: torch.dtype) -> None:
    """A float16 model under bfloat16 autocast (and the reverse) raised "Unexpected floating ScalarType in
    at::autocast::prioritize" from the ``torch.cat`` that packs it, stacks a Swarm or makes noise."""
    expected = run_all(dtype)
    with torch.autocast("cpu", dtype=autocast):
        got = run_all(dtype)
    assert_runs_equal(got, expected)


def test_half_swarm_under_bfloat16_autocast_matches_per_tensor_torch() -> None:
    members = [seq(i, torch.float16) for i in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        swarm = Swarm.stack(members)
        norms = swarm.norm()
        norm = nf.norm(nf.params(members[0]))
        vector = merge.ravel(members[0])[0]
    for name, stacked in swarm.params.items():
        assert stacked.dtype == torch.float16
        assert torch.equal(stacked, torch.stack([dict(m.named_parameters())[name].detach() for m in members]))
    flat = [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in members]
    assert torch.equal(vector, flat[0])
    torch.testing.assert_close(norms.double(), torch.stack([f.double().norm() for f in flat]), rtol=2e-3, atol=0)
    torch.testing.assert_close(norm.double(), flat[0].double().norm(), rtol=2e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_swarm_forward_under_autocast_equals_a_loop_of_members(dtype: torch.dtype) -> None:
    members = [seq(i, dtype) for i in range(3)]
    swarm = Swarm.stack(members)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = swarm(X.to(dtype))
        loop = torch.stack([m(X.to(dtype)) for m in members])
    assert out.dtype == loop.dtype == torch.bfloat16
    assert torch.equal(out, loop)


# -- seeded random streams and fork_rng ------------------------------------------------------------------

def _draws() -> dict[str, Callable[[Any], Any]]:
    a, b = net(0), net(1)
    swarm = Swarm.stack([a, b, a])
    state = alg.pso_init(swarm, torch.tensor([1., 2., 3.]))
    return {
        "NytoModule.randn": lambda g: a.randn(),
        "NytoModule.rand": lambda g: a.rand(),
        "Particle.randn": lambda g: nyto.particle(b).randn(),
        "Particle.randn unpacked": lambda g: nyto.particle(b, pack=False).randn(),
        "Swarm.randn": lambda g: Swarm.randn(a, 3, generator=g),
        "Swarm.normal": lambda g: Swarm.normal(a, 3, std=0.1, generator=g),
        "Swarm.rand": lambda g: Swarm.rand(a, 3, generator=g),
        "dare": lambda g: merge.dare(a, [b], drop=0.5, generator=g),
        "es_noise": lambda g: alg.es_noise(a, 4, generator=g),
        "es_gradient": lambda g: alg.es_gradient(alg.es_noise(a, 4, generator=g), torch.arange(4.), sigma=0.1),
        "apso": lambda g: alg.apso(swarm, 0, alpha=0.1, beta=0.3, generator=g),
        "pso_step": lambda g: alg.pso_step(swarm, torch.tensor([3., 2., 1.]), state, generator=g)[0],
        "pso_velocity": lambda g: alg.pso_velocity(swarm, swarm * 0.1, swarm, 0, inertia=0.5, cognitive=1.0,
                                                   social=1.0, generator=g),
    }


@pytest.mark.parametrize("name", sorted(_draws()))
def test_manual_seed_and_fork_rng_reproduce_every_draw(name: str) -> None:
    draw = _draws()[name]
    torch.manual_seed(5)
    first, after_first = [t.clone() for t in tensors(draw(None))], torch.get_rng_state()
    torch.manual_seed(5)
    second, after_second = tensors(draw(None)), torch.get_rng_state()
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    assert torch.equal(after_first, after_second)          # the same amount of the stream used
    torch.manual_seed(6)
    assert not all(torch.equal(x, y) for x, y in zip(first, tensors(draw(None))))
    outside = torch.get_rng_state()
    with torch.random.fork_rng():
        torch.manual_seed(5)
        forked = tensors(draw(None))
    assert torch.equal(torch.get_rng_state(), outside)
    assert all(torch.equal(x, y) for x, y in zip(first, forked))
    if "generator=g" in draw.__code__.co_names or name.startswith(("Swarm", "dare", "es_", "apso", "pso")):
        # a seeded generator draws what the seeded global stream draws, and leaves the global one alone
        given = tensors(draw(torch.Generator().manual_seed(5)))
        assert torch.equal(torch.get_rng_state(), outside)
        assert all(torch.equal(x, y) for x, y in zip(first, given))


def test_seeded_particle_randn_is_the_per_tensor_stream() -> None:
    model = net(0)
    torch.manual_seed(3)
    got = nyto.particle(model).randn()
    torch.manual_seed(3)
    expected = [torch.randn_like(p) for p in model.parameters()]
    assert all(torch.equal(g, e) for g, e in zip(got.params.values(), expected, strict=True))


# -- print options ------------------------------------------------------------------------------------

def test_print_options_change_no_value() -> None:
    expected = run_all()
    torch.set_printoptions(precision=1, sci_mode=True, threshold=1, edgeitems=1, linewidth=10)
    try:
        got = run_all()
        repr(nyto.particle(seq(0))), repr(Swarm.stack([seq(0)]))
    finally:
        torch.set_printoptions(profile="default")
        torch.set_printoptions(sci_mode=None)
    assert_runs_equal(got, expected)


# -- torch.compile of user functions calling nytorch -----------------------------------------------------

def _unraisable() -> Any:
    seen: list[Any] = []
    return seen, (lambda hook_args: seen.append(hook_args.exc_value))


def test_particle_never_initialised_is_deleted_quietly() -> None:
    """torch.compile makes Particles without ``__init__``: deleting one raised AttributeError in ``__del__``."""
    seen, hook = _unraisable()
    previous, sys.unraisablehook = sys.unraisablehook, hook
    try:
        blank = Particle.__new__(Particle)
        del blank
    finally:
        sys.unraisablehook = previous
    assert seen == []


def test_compiled_functions_calling_nf_and_particle_ops_give_equal_values() -> None:
    torch._dynamo.reset()
    a, b = seq(0), seq(1)
    pa, pb = nf.params(a), nf.params(b)
    P, Q = nyto.particle(a, pack=False), nyto.particle(b, pack=False)   # per-tensor: made half-built Particles

    def functional(p: dict[str, Tensor], q: dict[str, Tensor], x: Tensor) -> Tensor:
        return nf.call(a, nf.lerp(p, q, 0.3), x) + nf.norm(nf.sub(p, q))

    def particles() -> Particle:
        return 0.9 * (P - Q) + P

    seen, hook = _unraisable()
    previous, sys.unraisablehook = sys.unraisablehook, hook
    try:
        got = torch.compile(functional, backend="eager")(pa, pb, X), torch.compile(particles, backend="eager")()
    finally:
        sys.unraisablehook = previous
        torch._dynamo.reset()
    assert seen == []
    lerped = {k: torch.lerp(pa[k], pb[k], 0.3) for k in pa}
    distance = torch.cat([(pa[k] - pb[k]).reshape(-1) for k in pa]).norm()
    torch.testing.assert_close(got[0], torch.func.functional_call(a, lerped, (X,)) + distance, rtol=1e-6, atol=1e-6)
    for value, p, q in zip(got[1].params.values(), a.parameters(), b.parameters()):
        assert torch.equal(value, 0.9 * (p - q) + p)


# -- TorchFunctionMode / TorchDispatchMode -------------------------------------------------------------

class _Passthrough(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


class _Logged(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", [_Passthrough, _Logged, lambda: FlopCounterMode(display=False)],
                         ids=["TorchFunctionMode", "TorchDispatchMode", "FlopCounterMode"])
def test_passthrough_modes_change_no_value(mode: Callable[[], Any]) -> None:
    expected = run_all()
    with mode():
        got = run_all()
    assert_runs_equal(got, expected)


def test_flop_counter_counts_a_swarm_forward_as_a_loop_of_members() -> None:
    members = [net(i) for i in range(3)]
    swarm = Swarm.stack(members)
    counters = [FlopCounterMode(display=False) for _ in range(2)]
    with counters[0]:
        out = swarm(X)
    with counters[1]:
        loop = torch.stack([m(X) for m in members])
    assert counters[0].get_total_flops() == counters[1].get_total_flops() == 3 * 2 * 5 * (3 * 4 + 4 * 2)
    torch.testing.assert_close(out, loop, rtol=0, atol=1e-6)


@pytest.mark.parametrize("call", [
    lambda a, b: nyto.particle(a) + 1,
    lambda a, b: merge.EMA(a).averaged,
    lambda a, b: nyto.particle(b, buffers=True) + nyto.particle(a, buffers=True),
    lambda a, b: merge.average([a, b]),
    lambda a, b: Swarm.stack([a, b])(X),
], ids=["particle", "EMA", "two-particles", "average", "swarm-forward"])
def test_real_models_keep_their_values_under_fake_tensor_mode(call: Callable[[Any, Any], Any]) -> None:
    """Packing made its buffer under the mode: a FakeTensor on meta, so the model lost its values."""
    a, b = seq(0), seq(1)
    before = [[p.detach().clone() for p in m.parameters()] for m in (a, b)]
    with FakeTensorMode(allow_non_fake_inputs=True):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nytorch reads no FakeTensor's data_ptr() (torch deprecates it)
            result = call(a, b)
    assert all(isinstance(t, FakeTensor) for t in tensors(result))
    for model, values in zip((a, b), before):
        for p, v in zip(model.parameters(), values):
            assert type(p.data) is Tensor and p.device.type == "cpu"
            assert torch.equal(p, v)
    assert torch.equal(a(X), seq(0)(X))


def test_nytomodule_operands_keep_their_values_under_fake_tensor_mode() -> None:
    a, b, other = net(0), net(1), net(2)
    before = [p.detach().clone() for p in b.parameters()]
    with FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings():
        warnings.simplefilter("error")
        result = a + b
        with pytest.raises(ValueError, match=r"flatten_: cannot pack the parameters of this Net: a TorchDispatchMode "
                                             r"active here \(e\.g\. FakeTensorMode\) makes new tensors FakeTensors"):
            nyto.flatten_(other)
    assert all(isinstance(p, FakeTensor) for p in result.parameters())
    assert all(torch.equal(p, v) and p.device.type == "cpu" for p, v in zip(b.parameters(), before))
    expected = [p + q for p, q in zip(a.parameters(), b.parameters())]
    assert all(torch.equal(p, e) for p, e in zip((a + b).parameters(), expected))


class Big(nyto.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(512, 256)   # 512 KiB: large enough for the result pool


def test_results_made_under_fake_tensor_mode_never_reach_the_result_pool() -> None:
    """A dead fake result's buffer was pooled, and the next real result was written into a FakeTensor."""
    from nytorch import _pool
    _pool.clear()
    torch.manual_seed(0)
    a, b = Big(), Big()
    a + b       # packs both outside the mode
    _pool.clear()
    with FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            result = nyto.particle(a) + 1
            del result
    assert _pool.held_bytes() == 0
    for _ in range(3):
        result = nyto.particle(a) + 1
        for value, p in zip(result.params.values(), a.parameters()):
            assert type(value) is Tensor and torch.equal(value, p + 1)
    _pool.clear()


# -- FakeTensorMode: nytorch reads no FakeTensor's data pointer -------------------------------------------
# torch deprecates ``data_ptr()`` on a FakeTensor (a UserWarning, an error under ``-W error`` and under
# torch.compile's setting). It warns once per process, so these tests make the mode refuse every read
# (``_strict_fake_mode``), and one runs the warning itself in a fresh interpreter.

def _strict_fake_mode() -> FakeTensorMode:
    """A FakeTensorMode whose tensors raise on ``data_ptr()`` (torch.compile's setting) rather than warn once."""
    import torch._functorch.config as functorch_config
    with functorch_config.patch(fake_tensor_allow_unsafe_data_ptr_access=False):
        return FakeTensorMode()


def _fake_ops() -> dict[str, Callable[[], Any]]:
    """The operations found reading data pointers, each making its models when called (fake under the mode)."""
    def model(seed: int) -> nn.Sequential:  # no .to(): under the mode torch's _apply cannot swap parameters
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

    def iadd(make: Callable[[int], Any], wrap: Callable[[Any], Any]) -> Any:
        target = make(0)
        total = wrap(target)
        total += wrap(make(1))
        return target

    def ema() -> nn.Module:
        average = merge.EMA(model(0), decay=0.9)
        average.update()
        return average.averaged

    def loss(m: nn.Module, x: Tensor) -> Tensor:
        return m(x).sum()

    x = lambda: torch.randn(5, 3)  # noqa: E731
    return {
        "p + q": lambda: nyto.particle(model(0)) + nyto.particle(model(1)),
        "0.5 * p": lambda: 0.5 * nyto.particle(model(0)),
        "(p + 1).module()": lambda: (nyto.particle(model(0)) + 1).module(),
        "p += q": lambda: iadd(model, nyto.particle),
        "NytoModule +": lambda: net(0) + net(1),
        "NytoModule +=": lambda: iadd(net, lambda m: m),
        "EMA.update": ema,
        "ema_": lambda: merge.ema_(model(0), model(1), decay=0.9),
        "average": lambda: merge.average([model(0), model(1)]),
        "Swarm forward": lambda: Swarm.stack([model(0), model(1)])(x()),
        "grad_and_value": lambda: Swarm.stack([model(0), model(1)]).grad_and_value(loss, x()),
        "Swarm.randn.norm": lambda: Swarm.randn(model(0), 3).norm(),
        "nf.dot": lambda: nf.dot(nf.params(model(0)), nf.params(model(1))),
        "nf.lerp": lambda: nf.lerp(nf.params(model(0)), nf.params(model(1)), 0.3),
        "pso_init": lambda: alg.pso_init(Swarm.stack([model(0), model(1)]), torch.tensor([1.0, 2.0])),
    }


def _shapes(result: Any) -> list[tuple[torch.Size, torch.dtype, torch.device]]:
    return [(t.shape, t.dtype, t.device) for t in tensors(result)]


@pytest.fixture(params=["const_data_ptr", "storage"])
def addresses(request: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """Addresses as this torch reads them, and as torch before ``Tensor.const_data_ptr`` (2.12) does."""
    from nytorch import _algebra, _walk
    if request.param == "storage":
        monkeypatch.setattr(_walk, "addresses", _walk._by_storage)
        monkeypatch.setattr(_algebra, "addresses", _walk._by_storage)
    elif not hasattr(Tensor, "const_data_ptr"):
        pytest.skip("this torch has no Tensor.const_data_ptr")
    return str(request.param)


def test_both_address_readings_tell_the_same_tensors_apart(addresses: str) -> None:
    from nytorch._walk import addresses as read
    base = torch.zeros(4, 4)
    views = [base, base.view(16), base.t(), base[1], base[1:], base[:, 1], torch.zeros(4, 4), base.detach()]
    got = read(views)
    assert [[a == b for b in got] for a in got] == [[a.data_ptr() == b.data_ptr() for b in views] for a in views]


@pytest.mark.parametrize("name", list(_fake_ops()))
def test_fake_models_read_no_data_pointer_and_keep_real_shapes(name: str, addresses: str) -> None:
    """nytorch read ``data_ptr()`` of FakeTensors (``placement``, ``find_flat``, tie keys): a UserWarning from
    torch, an error under ``-W error::UserWarning``. The result has the real run's shapes, dtypes, devices."""
    expected = _shapes(_fake_ops()[name]())
    mode = _strict_fake_mode()
    with mode, warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError):  # the mode really refuses: a read anywhere fails the test
            torch.zeros(1).data_ptr()
        result = _fake_ops()[name]()
    assert expected and _shapes(result) == expected
    assert all(isinstance(t, FakeTensor) for t in tensors(result))


class _Writes(TorchDispatchMode):
    """How often each tensor (by id) is written by an in-place aten op (FakeTensors' version counters
    miss ``_foreach`` writes, so they cannot tell)."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[int] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        for schema, value in zip(func._schema.arguments, args):
            if schema.alias_info is not None and schema.alias_info.is_write:
                self.ids += [id(t) for t in (value if isinstance(value, (list, tuple)) else [value])]
        return func(*args, **(kwargs or {}))


def test_fake_parameters_are_written_once_each_and_tied_ones_once_together(addresses: str) -> None:
    """Every FakeTensor sits at address 0, so all same-sized fake parameters had one tie key: ``p += 1``
    wrote the first and skipped the rest. Their storages tell them apart now, as addresses do real ones."""
    mode = _strict_fake_mode()
    with mode, warnings.catch_warnings():
        warnings.simplefilter("error")
        model = nn.Module()
        shared = torch.zeros(4, 4)
        model.a, model.b = nn.Parameter(shared), nn.Parameter(shared.view(16))  # one tensor, two names
        model.c = nn.Parameter(torch.zeros(4, 4))
        model.d = nn.Parameter(shared[1])  # part of a: its own tensor
        model.e = nn.Parameter(torch.zeros(16))
        p = nyto.particle(model)
        with _Writes() as writes:
            p += 1
    assert [writes.ids.count(id(t)) for t in model.parameters()] == [1, 0, 1, 1, 1]
    real = nn.Module()
    shared = torch.zeros(4, 4)
    real.a, real.b = nn.Parameter(shared), nn.Parameter(shared.view(16))
    real.c, real.d, real.e = nn.Parameter(torch.zeros(4, 4)), nn.Parameter(shared[1]), nn.Parameter(torch.zeros(16))
    q = nyto.particle(real, pack=False)
    q += 1
    expected = torch.ones(4, 4)
    expected[1] += 1  # a (and b, the same tensor) once, d (its row 1) once more
    assert torch.equal(shared, expected)
    assert torch.equal(real.c, torch.ones(4, 4)) and torch.equal(real.e, torch.ones(16))


def test_saving_a_fake_model_names_it(tmp_path: Any) -> None:
    """``save`` read the data pointer of the fake storages, then torch.save failed pickling the mode."""
    mode = _strict_fake_mode()
    with mode, warnings.catch_warnings():
        warnings.simplefilter("error")
        model = nn.Linear(3, 2)
        with pytest.raises(TypeError, match=r"save: cannot store parameter 'weight': it is a FakeTensor"):
            nyto.save(nyto.particle(model), tmp_path / "fake.pt")
    assert not list(tmp_path.iterdir())


def test_default_fake_mode_under_warnings_as_errors_in_a_fresh_interpreter() -> None:
    """The user's case: torch's default (one UserWarning per process), ``python -W error::UserWarning``."""
    import subprocess
    code = ("import torch; from torch import nn; from torch._subclasses.fake_tensor import FakeTensorMode\n"
            "from nytorch import Swarm, particle\n"
            "with FakeTensorMode():\n"
            "    net = nn.Linear(4, 2)\n"
            "    p = particle(net)\n"
            "    print(tuple(Swarm.stack([net, net])(torch.randn(5, 4)).shape),\n"
            "          tuple((p + p).params['weight'].shape))\n")
    done = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["(2,", "5,", "2)", "(2,", "4)"]
