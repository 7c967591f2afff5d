"""Every style on an accelerator gives what it gives on the CPU, and leaves results there.

Each test runs a computation on models moved to ``device`` and the same computation on CPU
copies, then compares values and checks where results live.  ``device`` is ``cpu`` everywhere
(so the test code itself runs in CI, which has no GPU) and also ``cuda`` where a GPU is present.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import nytorch
import nytorch.functional as nf
from nytorch import Swarm, merge
from nytorch import algorithms as alg

from conftest import make_input, make_nyto, make_plain, named, named_buffers

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> Iterator[torch.device]:
    """The device the computation under test runs on (its reference always runs on the CPU).

    TF32 is off meanwhile: cuDNN convolutions use it by default, and its 10-bit mantissa would
    hide nytorch's own differences from the CPU under a tolerance wide enough for it.
    """
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield torch.device(str(request.param))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def on(device: torch.device, *modules: nn.Module) -> list[nn.Module]:
    """Copies of ``modules`` on ``device`` (the originals stay where they are, as CPU references)."""
    return [copy.deepcopy(module).to(device) for module in modules]


def assert_same(result: dict[str, Tensor], reference: dict[str, Tensor], device: torch.device) -> None:
    """``result`` lives on ``device`` and equals ``reference`` (CPU) up to float rounding."""
    assert list(result) == list(reference)
    for name, value in result.items():
        assert value.device.type == device.type, f"{name} is on {value.device}, expected {device}"
        torch.testing.assert_close(value.cpu(), reference[name], rtol=1e-5, atol=1e-6, msg=name)


EXPRESSIONS: dict[str, Callable[[Any, Any], Any]] = {
    "a + b": lambda a, b: a + b,
    "0.9 * (a - b) + a": lambda a, b: 0.9 * (a - b) + a,
    "2 - a * 3": lambda a, b: 2 - a * 3,
    "-a / 4": lambda a, b: -a / 4,
    "a ** 2": lambda a, b: a ** 2,
}


@pytest.mark.parametrize("expression", sorted(EXPRESSIONS))
def test_nyto_module_operators(device: torch.device, nyto_name: str, expression: str) -> None:
    a, b = make_nyto(nyto_name, 0), make_nyto(nyto_name, 1)
    ga, gb = on(device, a, b)
    result = EXPRESSIONS[expression](ga, gb)
    assert type(result) is type(a)
    assert_same(named(result), named(EXPRESSIONS[expression](a, b)), device)
    assert_same(named(ga), named(a), device)  # operands unchanged


def test_nyto_module_in_place_and_copies(device: torch.device, nyto_name: str) -> None:
    a, b = make_nyto(nyto_name, 0), make_nyto(nyto_name, 1)
    ga, gb = on(device, a, b)
    weights = [param for param in ga.parameters()]
    ga += gb
    a += b
    assert_same(named(ga), named(a), device)
    assert [param for param in ga.parameters()] == weights  # the same Parameter objects, updated
    assert_same(named(ga.clone()), named(a), device)
    assert_same(named(ga.detach()), named(a), device)
    assert_same(named(ga.clone_from(gb)), named(b), device)
    fresh = named(ga.randn())
    assert {name: (value.shape, value.dtype, value.device.type) for name, value in fresh.items()} == {
        name: (value.shape, value.dtype, device.type) for name, value in named(ga).items()}


def test_particle_of_any_module(device: torch.device, plain_name: str) -> None:
    a, b = make_plain(plain_name, 0), make_plain(plain_name, 1)
    ga, gb = on(device, a, b)
    p, q, gp, gq = (nytorch.particle(m, buffers=True) for m in (a, b, ga, gb))
    assert_same((0.9 * (gp - gq) + gp).params, (0.9 * (p - q) + p).params, device)
    gp.lerp_(gq, 0.25)
    p.lerp_(q, 0.25)
    assert_same(named(ga), named(a), device)  # in place: the module's own parameters
    assert_same(named_buffers(ga), named_buffers(a), device)
    module = (gp + gq).module()
    assert_same(named(module), named((p + q).module()), device)
    target, reference = copy.deepcopy(gb), copy.deepcopy(b)
    (gp * 2).copy_to(target)
    (p * 2).copy_to(reference)
    assert_same(named(target), named(reference), device)
    assert_same(named_buffers(target), named_buffers(reference), device)
    x = make_input(plain_name)
    torch.testing.assert_close(module.eval()(x.to(device)).cpu(), (p + q).module().eval()(x), rtol=1e-4, atol=1e-5)


def test_functional_core_and_torch_func(device: torch.device) -> None:
    model = make_plain("linear", 0)
    (gmodel,) = on(device, model)
    p, q = nf.params(model), nf.randn_like(nf.params(model))
    gp, gq = nf.params(gmodel), {name: value.to(device) for name, value in q.items()}
    assert_same(nf.lerp(gp, gq, 0.1), nf.lerp(p, q, 0.1), device)
    assert_same(nf.add(gp, gq), nf.add(p, q), device)
    torch.testing.assert_close(nf.dot(gp, gq).cpu(), nf.dot(p, q))
    torch.testing.assert_close(nf.norm(gp).cpu(), nf.norm(p))
    x = make_input("linear")

    def loss(weight: Tensor, params: dict[str, Tensor], other: dict[str, Tensor], inputs: Tensor) -> Tensor:
        return nf.call(model if inputs.device.type == "cpu" else gmodel,
                       nf.lerp(params, other, weight), inputs).square().mean()

    weight = torch.tensor(0.3)
    expected = torch.func.grad(loss)(weight, p, q, x)
    found = torch.func.grad(loss)(weight.to(device), gp, gq, x.to(device))
    assert found.device.type == device.type
    torch.testing.assert_close(found.cpu(), expected, rtol=1e-4, atol=1e-6)
    weights = torch.linspace(0, 1, 5)
    per_weight = torch.func.vmap(loss, in_dims=(0, None, None, None))
    torch.testing.assert_close(per_weight(weights.to(device), gp, gq, x.to(device)).cpu(),
                               per_weight(weights, p, q, x), rtol=1e-4, atol=1e-6)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def test_swarm_forward_gradients_and_updates(device: torch.device) -> None:
    torch.manual_seed(0)
    members = [mlp() for _ in range(6)]
    swarm, gswarm = Swarm.stack(members), Swarm.stack(on(device, *members))
    assert_same(gswarm.params, swarm.params, device)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    torch.testing.assert_close(gswarm(x.to(device)).cpu(), swarm(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gswarm(x.to(device)).cpu(), torch.stack([m(x) for m in members]),
                               rtol=1e-5, atol=1e-6)

    def loss(member: nn.Module, inputs: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(member(inputs), labels)

    stepped, losses = alg.sgd_step(swarm, loss, x, y, lr=0.1)
    gstepped, glosses = alg.sgd_step(gswarm, loss, x.to(device), y.to(device), lr=0.1)
    torch.testing.assert_close(glosses.cpu(), losses, rtol=1e-5, atol=1e-6)
    assert_same(gstepped.params, stepped.params, device)
    best = int(losses.argmin())
    cpu_noise = torch.Generator().manual_seed(1)
    pulled = alg.apso(stepped, best, alpha=0.0, beta=0.3, generator=cpu_noise)
    gpulled = alg.apso(gstepped, best, alpha=0.0, beta=0.3)  # alpha = 0: no noise, so no generator to match
    assert_same(gpulled.params, pulled.params, device)
    assert_same((0.5 * gswarm + gswarm[best]).params, (0.5 * swarm + swarm[best]).params, device)
    soup = torch.softmax(-losses, 0)
    assert_same((soup.to(device) @ gswarm).params, (soup @ swarm).params, device)


def test_merge_ema_average_and_flatten(device: torch.device) -> None:
    online, start = make_plain("conv_bn", 0), make_plain("conv_bn", 1)
    gonline, gstart = on(device, online, start)
    ema, gema = merge.EMA(online, decay=0.9), merge.EMA(gonline, decay=0.9)
    for step in range(3):  # a "training step" moves the online model, then the average follows
        for model in (online, gonline):
            with torch.no_grad():
                for param in model.parameters():
                    param.add_(0.1 * (step + 1))
        ema.update()
        gema.update()
    assert_same(named(gema.averaged), named(ema.averaged), device)
    assert_same(named_buffers(gema.averaged), named_buffers(ema.averaged), device)
    averaged = merge.average([gonline, gstart], weights=[0.25, 0.75])
    assert_same(named(averaged), named(merge.average([online, start], weights=[0.25, 0.75])), device)
    packed = nytorch.flatten_(copy.deepcopy(gonline))
    assert_same(named(packed), named(online), device)
    merge.ema_(packed, gstart, decay=0.5)
    assert_same(named(packed), named(merge.ema_(copy.deepcopy(online), start, decay=0.5)), device)


def test_checkpoint_round_trip(device: torch.device, tmp_path: Any) -> None:
    a = make_nyto("mlp", 0)
    (ga,) = on(device, a)
    path = tmp_path / "model.pt"
    nytorch.save(ga, path)
    assert_same(named(nytorch.load(path, like=make_nyto("mlp", 3), map_location="cpu")), named(a),
                torch.device("cpu"))
    assert_same(named(nytorch.load(path, like=on(device, make_nyto("mlp", 3))[0], map_location=device)),
                named(a), device)


def test_mixing_devices_raises_and_changes_nothing(device: torch.device) -> None:
    if device.type == "cpu":
        pytest.skip("needs a second device")
    a, b = make_nyto("mlp", 0), make_nyto("mlp", 1)
    (ga,) = on(device, a)
    before = {name: value.cpu() for name, value in named(ga).items()}
    with pytest.raises(nytorch.DeviceMismatchError, match=r"'\w+\.weight'|weight"):
        ga + b
    with pytest.raises(nytorch.DeviceMismatchError):
        ga += b
    assert_same(named(ga), before, device)
