"""Degenerate and unusual model structures through the whole public API.

Models with no parameters, only buffers, a 0-dim or a zero-size parameter, thousands of tiny
parameters, 120 levels of nesting, torch's containers, a submodule registered twice, tied weights
(across submodules and to a buffer), ``None`` parameters, extra state, non-persistent buffers,
forwards returning dicts / tuples / ``None``.  Every value is checked against plain per-tensor torch.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from torch import nn

import nytorch
import nytorch.functional as nf
from nytorch import StructureError, Swarm, merge


# --------------------------------------------------------------------------- sample models

class Empty(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class OnlyBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("b", torch.randn(3))
        self.register_buffer("n", torch.tensor(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b.sum()


class Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.randn(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.s * x


class ZeroSize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.z = nn.Parameter(torch.randn(0, 3))
        self.w = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w + self.z.sum()


class Containers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.md = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})
        self.ml = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2, bias=False)])
        self.pl = nn.ParameterList([nn.Parameter(torch.randn(2)), nn.Parameter(torch.randn(3))])
        self.pd = nn.ParameterDict({"alpha": nn.Parameter(torch.randn(2)), "beta": nn.Parameter(torch.randn(1))})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.md["a"](x) + self.md["b"](x)
        for layer in self.ml:
            x = layer(x)
        return x * self.pl[0] + self.pd["alpha"] + self.pl[1].sum() + self.pd["beta"]


class Twice(nn.Module):
    """One Linear registered under two names."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.Linear(2, 2)
        self.a = layer
        self.b = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class Tied(nn.Module):
    """Encoder/decoder weight tying."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(3, 3)
        self.dec = nn.Linear(3, 3)
        self.dec.weight = self.enc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.enc(x))


class NoneParam(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(2))
        self.register_parameter("x", None)
        self.register_buffer("nb", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


class NonPersistent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(2))
        self.register_buffer("np", torch.randn(2), persistent=False)
        self.register_buffer("p", torch.randn(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w + self.np + self.p


class Deep(nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(2))
        self.child = Deep(depth - 1) if depth > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.w
        return x if self.child is None else self.child(x)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "empty": Empty, "only_buffers": OnlyBuffers, "scalar": Scalar, "zero_size": ZeroSize,
    "containers": Containers, "twice": Twice, "tied": Tied, "none_param": NoneParam,
    "non_persistent": NonPersistent,
}
INPUT_WIDTH = {"zero_size": 3, "tied": 3}


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Reference: copies of the parameters then buffers, read straight from torch (tied ones once)."""
    return {**params(model), **{k: v.detach().clone() for k, v in model.named_buffers()}}


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def assert_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], exact: bool = True) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype, name
        if exact:
            assert torch.equal(got[name], want[name]), name
        else:
            torch.testing.assert_close(got[name], want[name], msg=name)


def pair(kind: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return MODELS[kind](), MODELS[kind]()


def x_for(kind: str) -> torch.Tensor:
    return torch.randn(4, INPUT_WIDTH.get(kind, 2))


# --------------------------------------------------------------------------- Particle arithmetic

@pytest.mark.parametrize("kind", sorted(MODELS))
def test_particle_arithmetic_matches_per_tensor_torch(kind: str) -> None:
    a, b = pair(kind)
    pa, pb = nytorch.particle(a), nytorch.particle(b)
    ref_a, ref_b = params(a), params(b)
    assert_state((pa + pb).params, {k: ref_a[k] + ref_b[k] for k in ref_a})
    assert_state((2 ** pa).params, {k: 2 ** ref_a[k] for k in ref_a})
    assert_state((pa * 3 - pb / 2).params, {k: ref_a[k] * 3 - ref_b[k] / 2 for k in ref_a})
    result = (pa - pb).module()
    assert type(result) is type(a)
    assert_state(params(result), {k: ref_a[k] - ref_b[k] for k in ref_a})
    # buffers are clones of the left operand's, in arithmetic with buffers=True too
    assert_state(dict(result.named_buffers()), dict(a.named_buffers()))
    with_buffers = (nytorch.particle(a, buffers=True) * 2).module()
    assert_state(state(with_buffers), {k: v * 2 if v.is_floating_point() else v for k, v in state(a).items()})
    # in place writes into the model's own Parameters
    objects = list(a.parameters())
    pa.lerp_(pb, 0.25)
    assert list(a.parameters()) == objects
    assert_state(params(a), {k: torch.lerp(ref_a[k], ref_b[k], 0.25) for k in ref_a}, exact=False)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_functional_core_matches_torch(kind: str) -> None:
    a, b = pair(kind)
    assert_state(nf.params(a), params(a))
    assert_state(nf.state(a), state(a))
    ref_a, ref_b = params(a), params(b)
    assert_state(nf.add(nf.params(a), nf.params(b)), {k: ref_a[k] + ref_b[k] for k in ref_a})
    want_dot = sum(((ref_a[k] * ref_b[k]).sum() for k in ref_a), torch.tensor(0.))
    torch.testing.assert_close(nf.dot(nf.params(a), nf.params(b)), want_dot)
    want_norm = torch.linalg.vector_norm(torch.cat([v.flatten() for v in ref_a.values()])) if ref_a \
        else torch.tensor(0.)
    torch.testing.assert_close(nf.norm(nf.params(a)), want_norm)
    bound = nf.bind(a, nf.params(b))
    assert_state(params(bound), ref_b)
    x = x_for(kind)
    torch.testing.assert_close(nf.call(a, nf.params(b), x), torch.func.functional_call(a, ref_b, (x,)))


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_swarm_matches_a_loop_over_members(kind: str) -> None:
    a, b = pair(kind)
    ref_a, ref_b = params(a), params(b)
    swarm = Swarm.stack([a, b])
    assert len(swarm) == 2 and len(Swarm.stack([a])) == 1
    assert_state({k: v for k, v in swarm.params.items()},
                 {k: torch.stack([ref_a[k], ref_b[k]]) for k in ref_a})
    assert_state(swarm[1].params, params(b))
    assert_state(swarm[[1, 0]][0].params, params(b))
    assert len(swarm[[]]) == 0 and len(swarm[torch.tensor([], dtype=torch.long)]) == 0
    assert_state(swarm.mean().params, {k: (ref_a[k] + ref_b[k]) / 2 for k in ref_a}, exact=False)
    w = torch.tensor([0.25, 0.75])
    assert_state((w @ swarm).params, {k: 0.25 * ref_a[k] + 0.75 * ref_b[k] for k in ref_a},
                 exact=False)
    doubled = swarm * 2 + nytorch.particle(a)
    for i, member in enumerate(doubled.unstack()):
        source = (a, b)[i]
        assert_state(member.params, {k: (ref_a, ref_b)[i][k] * 2 + ref_a[k] for k in ref_a})
        rebuilt = member.module()
        assert_state(dict(rebuilt.named_buffers()), dict(source.named_buffers()))
    x = x_for(kind)
    out = swarm(x)
    torch.testing.assert_close(out, torch.stack([a(x), b(x)]))


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_merges_match_per_tensor_references(kind: str) -> None:
    a, b = pair(kind)
    ref_a, ref_b = state(a), state(b)
    averaged = merge.average([a, b])
    assert_state(state(averaged), {k: (ref_a[k] + ref_b[k]) / 2 if ref_a[k].is_floating_point() else ref_a[k]
                                   for k in ref_a}, exact=False)
    task = merge.task_arithmetic(a, [b], scale=0.5)
    assert_state(params(task), {k: ref_a[k] + 0.5 * (ref_b[k] - ref_a[k]) for k in params(a)}, exact=False)
    target, online = pair(kind)
    want = {k: torch.lerp(v, state(online)[k], 0.25) if v.is_floating_point() else state(online)[k]
            for k, v in state(target).items()}
    merge.ema_(target, online, tau=0.25)
    assert_state(state(target), want, exact=False)
    vector, unravel = merge.ravel(a)
    assert vector.numel() == sum(p.numel() for p in a.parameters())
    assert_state(params(unravel(vector * 2)), {k: v * 2 for k, v in params(a).items()})
    assert nytorch.same_structure(a, b)
    nytorch.check_structure(a, b)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_save_load_round_trip(kind: str, tmp_path: "os.PathLike[str]") -> None:
    a, b = pair(kind)
    path = os.path.join(tmp_path, "m.pt")
    nytorch.save({"model": a, "swarm": Swarm.stack([a, b]), "particle": nytorch.particle(b)}, path)
    like = {"model": MODELS[kind](), "swarm": Swarm.stack([MODELS[kind]()] * 2),
            "particle": nytorch.particle(MODELS[kind]())}
    loaded = nytorch.load(path, like=like)
    assert_state(state(loaded["model"]), state(a))
    assert_state(loaded["swarm"][1].params, params(b))
    assert_state(loaded["particle"].params, params(b))


@pytest.mark.parametrize("kind", ["empty", "only_buffers"])
def test_save_load_keeps_the_size_of_a_swarm_of_models_without_parameters(kind: str,
                                                                           tmp_path: "os.PathLike[str]") -> None:
    path = os.path.join(tmp_path, "s.pt")
    swarm = Swarm.stack([MODELS[kind]() for _ in range(3)])
    nytorch.save({"swarm": swarm}, path)
    loaded = nytorch.load(path, like={"swarm": Swarm.stack([MODELS[kind]() for _ in range(3)])})["swarm"]
    assert isinstance(loaded, Swarm) and len(loaded) == 3
    assert_state(dict(loaded.buffers), dict(swarm.buffers))
    with pytest.raises(StructureError, match=r"^load \(at 'swarm'\): "):
        nytorch.load(path, like={"swarm": Swarm.stack([MODELS[kind]() for _ in range(5)])})


def test_load_refuses_a_malformed_swarm_size(tmp_path: "os.PathLike[str]") -> None:
    path = os.path.join(tmp_path, "s.pt")
    nytorch.save(Swarm.stack([Empty(), Empty()]), path)
    raw = torch.load(path, weights_only=True)
    raw["data"]["size"] = "two"
    torch.save(raw, path)
    with pytest.raises(nytorch.CheckpointError, match=r"^load: malformed 'swarm' entry: expected a non-negative "
                                                      r"int under 'size', got 'two'"):
        nytorch.load(path, like=Swarm.stack([Empty(), Empty()]))
    del raw["data"]["size"]  # a file written before the size was stored: like's size
    torch.save(raw, path)
    assert len(nytorch.load(path, like=Swarm.stack([Empty(), Empty()]))) == 2


# --------------------------------------------------------------------------- tied weights stay tied

def test_tied_weights_stay_tied_everywhere(tmp_path: "os.PathLike[str]") -> None:
    a, b = pair("tied")
    assert list(nf.params(a)) == ["enc.weight", "enc.bias", "dec.bias"]
    results = {
        "add": (nytorch.particle(a) + nytorch.particle(b)).module(),
        "bind": nf.bind(a, nf.params(b)),
        "swarm member": Swarm.stack([a, b])[1].module(),
        "unstack": Swarm.stack([a, b]).unstack()[0].module(),
        "average": merge.average([a, b]),
        "slerp": merge.slerp(a, b, 0.3),
        "ties": merge.ties(a, [b], density=0.5),
        "dare": merge.dare(a, [b], drop=0.5),
        "task": merge.task_arithmetic(a, [b], scale=0.5),
    }
    path = os.path.join(tmp_path, "t.pt")
    nytorch.save(a, path)
    results["load"] = nytorch.load(path, like=Tied())
    for label, result in results.items():
        assert result.dec.weight is result.enc.weight, label
    torch.testing.assert_close(results["add"].enc.weight, a.enc.weight + b.enc.weight)
    torch.testing.assert_close(results["average"].enc.weight, (a.enc.weight + b.enc.weight) / 2)
    assert torch.equal(results["load"].enc.weight, a.enc.weight)


def test_a_submodule_registered_twice_stays_one_module() -> None:
    a, b = pair("twice")
    assert list(nf.params(a)) == ["a.weight", "a.bias"]
    result = (nytorch.particle(a) * 2).module()
    assert result.a is result.b
    member = Swarm.stack([a, b])[1].module()
    assert member.a is member.b
    x = torch.randn(3, 2)
    torch.testing.assert_close(Swarm.stack([a, b])(x)[1], b(x))


# --------------------------------------------------------------------------- a buffer tied to a parameter

class BufferIsParameter(nn.Module):
    """The weight's Parameter also registered as a buffer (one tensor under two names)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("wb", self.lin.weight)


class BufferIsData(nn.Module):
    """A buffer over the weight's memory (``weight.data``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("wb", self.lin.weight.data)


@pytest.mark.parametrize("cls", [BufferIsParameter, BufferIsData])
@pytest.mark.parametrize("buffers", ["average", "copy"])
def test_ema_updates_a_buffer_tied_to_a_parameter_once(cls: type[nn.Module], buffers: str) -> None:
    torch.manual_seed(0)
    target, online = cls(), cls()
    want = {k: torch.lerp(v, params(online)[k], 0.25) for k, v in params(target).items()}
    merge.ema_(target, online, tau=0.25, buffers=buffers)  # type: ignore[arg-type]
    assert_state(params(target), want, exact=False)
    assert target.wb.data_ptr() == target.lin.weight.data_ptr()  # still the weight's memory


@pytest.mark.parametrize("cls", [BufferIsParameter, BufferIsData])
def test_ema_class_updates_a_buffer_tied_to_a_parameter_once(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = cls()
    start = params(model)
    ema = merge.EMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    assert_state(params(ema.averaged), {k: v + 0.5 for k, v in start.items()}, exact=False)
    assert torch.equal(ema.averaged.wb, ema.averaged.lin.weight.detach())


@pytest.mark.parametrize("cls", [BufferIsParameter, BufferIsData])
def test_in_place_particle_with_buffers_writes_a_tied_buffer_once(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model, other = cls(), cls()
    want = {k: v * 2 + 1 for k, v in params(model).items()}
    p = nytorch.particle(model, buffers=True)
    p *= 2
    p += 1
    assert_state(params(model), want)
    assert torch.equal(model.wb, model.lin.weight.detach())
    end = params(other)
    want = {k: torch.lerp(v, end[k], 0.5) for k, v in params(model).items()}
    p.lerp_(nytorch.particle(other, buffers=True), 0.5)
    assert_state(params(model), want, exact=False)


class TwoParametersOneStorage(nytorch.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(3))
        self.b = nn.Parameter(self.a.data)  # another Parameter object over the same memory


def test_in_place_operators_write_parameters_over_one_storage_once() -> None:
    torch.manual_seed(0)
    net = TwoParametersOneStorage()
    start = net.a.detach().clone()
    net *= 3
    net -= 1
    assert torch.equal(net.a.detach(), start * 3 - 1) and net.a.data_ptr() == net.b.data_ptr()
    p = nytorch.particle(net)
    p /= 2
    assert torch.equal(net.b.detach(), (start * 3 - 1) / 2)


# --------------------------------------------------------------------------- 1.1 configs by any name

class NTwice(nytorch.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.Linear(2, 2)
        self.a = layer
        self.b = layer
        self.c = nn.Linear(2, 2)


class NTied(nytorch.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(3, 3)
        self.dec = nn.Linear(3, 3)
        self.dec.weight = self.enc.weight


@pytest.mark.parametrize("name", ["b", "b.weight"])
def test_set_param_config_finds_a_submodule_registered_twice_by_either_name(name: str) -> None:
    torch.manual_seed(0)
    net = NTwice()
    net.set_param_config(operational=False, name=name)
    doubled = 2 * net
    assert torch.equal(doubled.a.weight, net.a.weight)  # frozen through its second name
    assert torch.equal(doubled.c.weight, 2 * net.c.weight)
    if name == "b":
        assert torch.equal(doubled.a.bias, net.a.bias)
    else:
        assert torch.equal(doubled.a.bias, 2 * net.a.bias)
    seen: list[int] = []
    net.apply_param_config(lambda pid, config: seen.append(pid), name=name)
    want = [net.get_param_id(net.b.weight)] + ([net.get_param_id(net.b.bias)] if name == "b" else [])
    assert seen == want


def test_set_param_config_on_a_submodule_reaches_its_tied_weight() -> None:
    torch.manual_seed(0)
    net = NTied()
    net.set_param_config(operational=False, name="dec")  # dec.weight is enc.weight
    doubled = 2 * net
    assert doubled.dec.weight is doubled.enc.weight
    assert torch.equal(doubled.dec.weight, net.dec.weight)
    assert torch.equal(doubled.dec.bias, net.dec.bias)
    assert torch.equal(doubled.enc.bias, 2 * net.enc.bias)
    seen: list[int] = []
    net.apply_param_config(lambda pid, config: seen.append(pid), name="dec")
    assert seen == sorted({net.get_param_id(p) for p in net.dec.parameters()}) == [0, 2]
    other = NTied()
    other.set_param_config(operational=False, name="dec.weight")
    tripled = 3 * other
    assert torch.equal(tripled.enc.weight, other.enc.weight)
    assert torch.equal(tripled.dec.bias, 3 * other.dec.bias)


def test_set_param_config_still_refuses_what_is_no_parameter() -> None:
    class Net(nytorch.NytoModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("buf", torch.ones(2))
            self.register_parameter("nothing", None)

    net = Net()
    for name in ("buf", "nothing", "", "lin.nope", "nope.weight"):
        with pytest.raises(ValueError, match=rf"^set_param_config: Net has no submodule or parameter named {name!r}"):
            net.set_param_config(operational=False, name=name)
    assert all(config.operational for _, config in net._configs_in_scope("test", None))


# --------------------------------------------------------------------------- NytoModule 1.1 API on degenerate models

class NEmpty(nytorch.NytoModule):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class NScalar(nytorch.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.randn(()))


class NZero(nytorch.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.z = nn.Parameter(torch.randn(0, 3))
        self.w = nn.Parameter(torch.randn(3))
        self.register_parameter("x", None)


@pytest.mark.parametrize("cls", [NEmpty, NScalar, NZero, NTied, NTwice])
def test_nytomodule_api_on_degenerate_models(cls: type[nytorch.NytoModule]) -> None:
    torch.manual_seed(0)
    net, other = cls(), cls()
    ref, ref_other = params(net), params(other)
    assert_state(params(net.clone()), ref)
    assert list(net.detach().parameters()) == list(net.parameters())
    assert_state(params(-(2 - net) ** 2 / 4 + other),
                 {k: -(2 - ref[k]) ** 2 / 4 + ref_other[k] for k in ref}, exact=False)
    assert_state(net.product().params, ref)
    shapes = {k: (v.shape, v.dtype) for k, v in params(net.randn()).items()}
    assert shapes == {k: (v.shape, v.dtype) for k, v in ref.items()}
    net.set_param_config(operational=False)
    assert_state(params(net * 5), ref)
    net.set_param_config(operational=True)
    target = cls()
    objects = list(target.parameters())
    target.product_((net + other).product())
    assert list(target.parameters()) == objects
    assert_state(params(target), {k: ref[k] + ref_other[k] for k in ref})
    copy = target.clone_from(other)
    assert copy is not target and type(copy) is cls
    assert_state(params(copy), ref_other)
    in_place = cls()
    objects = list(in_place.parameters())
    in_place *= 0
    in_place += net
    assert list(in_place.parameters()) == objects
    assert_state(params(in_place), ref)


# --------------------------------------------------------------------------- structure captured when made

def test_a_particle_keeps_the_structure_it_was_made_with() -> None:
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    snapshot = nytorch.particle(model)
    model.extra = nn.Parameter(torch.ones(3))
    assert list((snapshot + 1).module().state_dict()) == ["weight", "bias"]
    with pytest.raises(StructureError, match=r"^add: the second operand has an extra parameter 'extra'"):
        snapshot + nytorch.particle(model)
    assert not nytorch.same_structure(snapshot, model)


def test_ema_of_a_model_that_lost_a_parameter_names_it() -> None:
    model = nn.Linear(2, 2)
    ema = merge.EMA(model, decay=0.5)
    model.bias = None  # type: ignore[assignment]
    with pytest.raises(StructureError, match=r"^EMA.update: parameter 'bias' is missing from model"):
        ema.update()


# --------------------------------------------------------------------------- sizes: deep and many

def test_120_levels_of_nesting() -> None:
    torch.manual_seed(0)
    a, b = Deep(120), Deep(120)
    ref_a, ref_b = params(a), params(b)
    assert len(nf.params(a)) == 121
    result = (nytorch.particle(a) + nytorch.particle(b)).module()
    assert_state(params(result), {k: ref_a[k] + ref_b[k] for k in ref_a})
    swarm = Swarm.stack([a, b])
    x = torch.randn(2)
    torch.testing.assert_close(swarm(x), torch.stack([a(x), b(x)]))
    assert_state(params(merge.average([a, b])), {k: (ref_a[k] + ref_b[k]) / 2 for k in ref_a}, exact=False)


def test_5000_tiny_parameters() -> None:
    torch.manual_seed(0)

    class Many(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ps = nn.ParameterList([nn.Parameter(torch.randn(2)) for _ in range(5000)])

    a, b = Many(), Many()
    ref_a, ref_b = params(a), params(b)
    total = (nytorch.particle(a) * 0.5 + nytorch.particle(b)).params
    assert_state(total, {k: ref_a[k] * 0.5 + ref_b[k] for k in ref_a})
    swarm = Swarm.stack([a, b])
    assert_state(swarm[0].params, ref_a)
    assert_state(swarm.mean().params, {k: (ref_a[k] + ref_b[k]) / 2 for k in ref_a}, exact=False)


# --------------------------------------------------------------------------- Swarm forward outputs

class Outputs(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> object:
        y = self.lin(x)
        if self.kind == "dict":
            return {"y": y, "z": (y.sum(), [y * 2])}
        if self.kind == "tuple":
            return y, y.mean()
        return None


@pytest.mark.parametrize("kind", ["dict", "tuple", "none"])
def test_swarm_forward_of_dicts_tuples_and_none(kind: str) -> None:
    torch.manual_seed(0)
    members = [Outputs(kind), Outputs(kind), Outputs(kind)]
    x = torch.randn(4, 2)
    got = Swarm.stack(members)(x)
    loop = [m(x) for m in members]
    if kind == "none":
        assert got is None
        return
    want = torch.utils._pytree.tree_map(lambda *leaves: torch.stack(leaves), *loop)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", ["empty", "only_buffers", "scalar", "zero_size", "tied", "containers", "twice"])
def test_grad_and_value_matches_autograd_member_by_member(kind: str) -> None:
    torch.manual_seed(0)
    swarm = Swarm.randn(MODELS[kind](), 3)
    x = x_for(kind)

    def loss(member: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return (member(x) ** 2).mean()

    grads, losses = swarm.grad_and_value(loss, x)
    assert len(grads) == 3
    for i, member in enumerate(swarm):
        model = member.module()
        value = loss(model, x)
        torch.testing.assert_close(losses[i], value.detach())
        named = dict(model.named_parameters())
        if named:
            want = torch.autograd.grad(value, list(named.values()))
            for name, g in zip(named, want):
                torch.testing.assert_close(grads.params[name][i], g, msg=name)
