"""``nytorch.Swarm``: every vectorised result checked against a per-member Python loop of plain modules."""
from __future__ import annotations

import gc
import io
import operator
import pickle
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import Deep, Mixed, TiedLM, conv_net, embed_net, is_arith, named, named_buffers, randomize_buffers
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nytorch
from nytorch import Particle, StructureError
from nytorch import _swarm_fused as fused
from nytorch import _vectorise as vec
from nytorch._swarm import Swarm

Tensor = torch.Tensor
P = 4
# float32 results vs the per-member loop, at torch's float32 defaults: a batched kernel sums in another
# order than the loop's, and which order depends on the CPU (MKL's kernels for SSE4.2, AVX2, AVX-512)
ATOL = 1e-5
RTOL = 1.3e-6

OPS: dict[str, Callable[[Any, Any], Any]] = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv, "pow": operator.pow,
}
IOPS: dict[str, Callable[[Any, Any], Any]] = {
    "add": operator.iadd, "sub": operator.isub, "mul": operator.imul, "div": operator.itruediv,
    "pow": operator.ipow,
}


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


class ClassMLP(nn.Module):
    """An MLP written as a class with functional activations."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)).sigmoid())


class Branchy(nn.Module):
    """A forward that branches on tensor values: not vectorisable."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.fc(x)
        return out if float(out.sum()) > 0 else -out


def positive(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.abs_().add_(0.5)
    return model


#: name -> (factory, input factory); forward-able in eval mode.
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], Tensor]]] = {
    "linear": (lambda: nn.Linear(3, 2), lambda: torch.randn(5, 3)),
    "mlp": (mlp, lambda: torch.randn(6, 4)),
    "class_mlp": (ClassMLP, lambda: torch.randn(6, 4)),
    "no_bias": (lambda: nn.Sequential(nn.Linear(4, 8, bias=False), nn.LeakyReLU(0.2), nn.Dropout(0.0),
                                      nn.Linear(8, 2)), lambda: torch.randn(3, 2, 4)),
    "conv_bn": (lambda: randomize_buffers(conv_net()), lambda: torch.randn(2, 1, 4, 4)),
    "embed": (embed_net, lambda: torch.randint(0, 6, (2, 5))),
    "tied": (TiedLM, lambda: torch.randint(0, 7, (2, 3))),
    "deep": (lambda: randomize_buffers(Deep()), lambda: torch.randn(4, 3)),
}


def members(name: str, count: int = P, seed: int = 0) -> list[nn.Module]:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        out = [MODELS[name][0]() if name in MODELS else Mixed() for _ in range(count)]
    for i, module in enumerate(out):
        randomize_buffers(module, seed + i)
    return out


def sample(name: str, seed: int = 1) -> Tensor:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MODELS[name][1]()


def state(module: nn.Module) -> dict[str, Tensor]:
    return {**named(module), **named_buffers(module)}


def stacked(modules: list[nn.Module]) -> dict[str, Tensor]:
    """The reference: ``torch.stack`` of each named parameter and buffer."""
    states = [state(m) for m in modules]
    return {name: torch.stack([s[name] for s in states]) for name in states[0]}


def assert_swarm(swarm: Swarm, expected: dict[str, Tensor], *, exact: bool = True) -> None:
    got = {**swarm.params, **swarm.buffers}
    assert list(got) == list(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        if exact:
            assert torch.equal(got[name], value), name
        else:
            torch.testing.assert_close(got[name], value, rtol=RTOL, atol=ATOL, msg=name)


# -- construction -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [*MODELS, "mixed"])
def test_stack_holds_every_member(name: str) -> None:
    modules = members(name)
    swarm = Swarm.stack(modules)
    assert len(swarm) == P and swarm.model_class is type(modules[0])
    assert_swarm(swarm, stacked(modules))
    assert list(swarm.params) == [n for n, _ in modules[0].named_parameters()]
    assert list(swarm.buffers) == [n for n, _ in modules[0].named_buffers()]
    before = stacked(modules)
    with torch.no_grad():  # the swarm holds a copy
        for module in modules:
            for param in module.parameters():
                param.add_(1) if is_arith(param) else None
    assert_swarm(swarm, before)


def test_stack_is_one_flat_copy_per_dtype() -> None:
    modules = members("mixed")
    swarm = Swarm.stack(modules)
    leaves = list(swarm.params.values()) + list(swarm.buffers.values())
    storages = {leaf.untyped_storage().data_ptr() for leaf in leaves if leaf.numel()}
    total = sum(leaf.numel() * leaf.element_size() for leaf in leaves)
    held = sum(flat.untyped_storage().nbytes() for flat in swarm._flats)
    assert len(storages) == len(swarm._flats) < len(leaves)
    assert held == total  # exactly one copy of the values, nothing else


def test_stack_does_not_keep_items_alive() -> None:
    modules = members("mlp")
    refs = [weakref.ref(p) for p in modules[0].parameters()] + [weakref.ref(modules[0])]
    swarm = Swarm.stack(modules)
    del modules
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert len(swarm) == P


def test_stack_of_particles_and_modules() -> None:
    modules = members("deep")
    items: list[Any] = [nytorch.particle(m) for m in modules[:2]] + modules[2:]
    assert_swarm(Swarm.stack(items), stacked(modules))
    with_buffers = Swarm.stack([nytorch.particle(m, buffers=True) for m in modules])
    assert "bn.running_mean" in with_buffers.params
    assert_swarm(with_buffers, stacked(modules))


def test_stack_errors_name_the_item_and_parameter() -> None:
    with pytest.raises(ValueError, match=r"stack: expected at least one module or Particle, got an empty"):
        Swarm.stack([])
    with pytest.raises(TypeError, match=r"stack: expected a list of modules or Particles, got Linear"):
        Swarm.stack(nn.Linear(1, 1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"item 1 is a str"):
        Swarm.stack([nn.Linear(1, 1), "x"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"stack: item 1: expected a Linear .*got a Conv1d"):
        Swarm.stack([nn.Linear(1, 1), nn.Conv1d(1, 1, 1)])
    with pytest.raises(StructureError, match=r"stack: item 2: parameter 'weight' differs: shape \(1, 3\) float32 "
                                             r"vs shape \(1, 2\) float32"):
        Swarm.stack([nn.Linear(3, 1), nn.Linear(3, 1), nn.Linear(2, 1)])
    with pytest.raises(StructureError, match=r"stack: item 1: parameter 'bias' is missing"):
        Swarm.stack([nn.Linear(3, 1), nn.Linear(3, 1, bias=False)])
    with pytest.raises(StructureError, match=r"'weight' differs: .*float32 vs .*float64"):
        Swarm.stack([nn.Linear(3, 1), nn.Linear(3, 1).double()])
    with pytest.raises(nytorch.DeviceMismatchError, match=r"'weight' is on cpu .* and on meta"):
        Swarm.stack([nn.Linear(3, 1), nn.Linear(3, 1, device="meta")])


def test_from_params_round_trip_and_errors() -> None:
    modules = members("deep")
    swarm = Swarm.stack(modules)
    again = Swarm.from_params(modules[0], {**swarm.params, **swarm.buffers})
    assert_swarm(again, stacked(modules))
    assert again.params["scale"].data_ptr() != swarm.params["scale"].data_ptr()
    only_params = Swarm.from_params(modules[1], swarm.params)  # buffers: modules[1]'s, for every member
    assert torch.equal(only_params.buffers["bn.running_var"][3], modules[1].bn.running_var)
    assert torch.equal(Swarm.from_params(swarm.template, swarm.params).params["scale"], swarm.params["scale"])
    net = nn.Linear(2, 1)
    good = {"weight": torch.zeros(3, 1, 2), "bias": torch.zeros(3, 1)}
    with pytest.raises(StructureError, match=r"from_params: parameter 'bias' is missing from params"):
        Swarm.from_params(net, {"weight": good["weight"]})
    with pytest.raises(StructureError, match=r"from_params: Linear has no parameter or buffer named 'extra'"):
        Swarm.from_params(net, {**good, "extra": torch.zeros(3)})
    with pytest.raises(StructureError, match=r"same leading \(member\) size, but 'bias' has 4 and 'weight' has 3"):
        Swarm.from_params(net, {"weight": good["weight"], "bias": torch.zeros(4, 1)})
    with pytest.raises(StructureError, match=r"expected 'weight' of shape \(P, 1, 2\) float32 .*got shape \(1, 2\)"):
        Swarm.from_params(net, {"weight": torch.zeros(1, 2), "bias": good["bias"]})
    with pytest.raises(StructureError, match=r"got shape \(3, 1, 2\) float64"):
        Swarm.from_params(net, {"weight": good["weight"].double(), "bias": good["bias"]})
    with pytest.raises(TypeError, match=r"from_params: expected a tensor for 'bias', got list"):
        Swarm.from_params(net, {"weight": good["weight"], "bias": [0.0]})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"from_params: expected an nn.Module, a Particle or a Swarm as like"):
        Swarm.from_params("net", good)  # type: ignore[arg-type]


def test_random_constructors() -> None:
    model = Mixed()
    for make in (Swarm.randn, Swarm.rand):
        a = make(model, 3, generator=torch.Generator().manual_seed(1))
        b = make(model, 3, generator=torch.Generator().manual_seed(1))
        assert_swarm(a, {**b.params, **b.buffers})
        assert a.params["w32"].shape == (3, 2, 3) and a.params["wc"].dtype == torch.complex64
        assert torch.equal(a.params["counts"], model.counts.expand(3, 4))  # integer leaves: copied
        assert torch.equal(a.buffers["stat"], model.stat.expand(3, 3))    # buffers: copied
        assert not torch.equal(a.params["w32"][0], a.params["w32"][1])
    assert (Swarm.rand(model, 50).params["w64"] >= 0).all()
    assert Swarm.zeros(model, 2).params["w32"].abs().sum() == 0
    cloud = Swarm.normal(model, 4000, std=0.1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cloud.mean().params["w32"], model.w32.detach(), atol=0.01, rtol=0)
    swarm = Swarm.randn(model, 5)
    assert len(Swarm.randn(swarm)) == 5 and len(Swarm.zeros(swarm, 2)) == 2
    around = Swarm.normal(swarm, std=0.0)
    assert_swarm(around, {**swarm.params, **swarm.buffers})
    with pytest.raises(TypeError, match=r"randn: expected size \(the number of members\) unless like is a Swarm"):
        Swarm.randn(model)
    with pytest.raises(ValueError, match=r"zeros: expected a non-negative int as size, got -1"):
        Swarm.zeros(model, -1)
    for bad in ("3", 2.0, True):
        with pytest.raises(TypeError, match=rf"randn: expected a non-negative int as size, got {type(bad).__name__}"):
            Swarm.randn(model, bad)  # type: ignore[arg-type]
    assert len(Swarm.zeros(model, np.int64(2))) == len(Swarm.zeros(model, torch.tensor(2))) == 2


# -- selection ------------------------------------------------------------------------------------
def test_indexing_gives_views_and_copies() -> None:
    modules = members("mlp", 6)
    swarm = Swarm.stack(modules)
    for i in (0, 3, -1):
        member = swarm[i]
        assert isinstance(member, Particle) and member.model_class is nn.Sequential
        for name, value in named(modules[i]).items():
            assert torch.equal(member.params[name], value)
    chosen = swarm[[4, 1, 1]]
    assert isinstance(chosen, Swarm) and len(chosen) == 3
    assert_swarm(chosen, stacked([modules[4], modules[1], modules[1]]))
    mask = torch.tensor([True, False, False, True, False, True])
    assert_swarm(swarm[mask], stacked([modules[0], modules[3], modules[5]]))
    assert_swarm(swarm[torch.tensor([-1, 0])], stacked([modules[5], modules[0]]))
    assert_swarm(swarm[1:5:2], stacked([modules[1], modules[3]]))
    assert len(swarm[[]]) == 0
    # views: slices and members write through; list/tensor selections are copies
    part = swarm[1:3]
    part += 1.0
    swarm[0] *= 0.0
    chosen += 100.0
    expected = stacked(modules)
    for name in expected:
        expected[name][1:3] += 1.0
        expected[name][0] *= 0.0
    assert_swarm(swarm, expected)
    assert [torch.equal(p.params["0.bias"], swarm.params["0.bias"][i]) for i, p in enumerate(swarm)] == [True] * 6
    assert [p.params["0.bias"].data_ptr() for p in swarm.unstack()] == \
        [swarm[i].params["0.bias"].data_ptr() for i in range(6)]


def test_a_list_of_booleans_is_a_mask() -> None:
    modules = members("mlp", 5)
    swarm = Swarm.stack(modules)
    assert_swarm(swarm[[True, False, True, False, True]], stacked([modules[0], modules[2], modules[4]]))
    assert_swarm(swarm[[False] * 5], {name: value[:0] for name, value in stacked(modules).items()})
    with pytest.raises(TypeError, match=r"mixes booleans with integers"):
        swarm[[True, 1]]
    with pytest.raises(IndexError, match=r"integer or boolean member indices"):
        swarm[[0.5]]  # not member 0
    with pytest.raises(IndexError, match=r"boolean mask must have shape \(5,\), got \(2,\)"):
        swarm[[True, False]]


def test_index_errors() -> None:
    swarm = Swarm.zeros(nn.Linear(1, 1), 3)
    with pytest.raises(IndexError, match=r"index 3 is out of range for a swarm of 3 members"):
        swarm[3]
    with pytest.raises(IndexError, match=r"index -4 is out of range"):
        swarm[[0, -4]]
    with pytest.raises(IndexError, match=r"boolean mask must have shape \(3,\), got \(2,\)"):
        swarm[torch.tensor([True, False])]
    with pytest.raises(IndexError, match=r"integer or boolean member indices"):
        swarm[torch.tensor([0.5])]
    with pytest.raises(TypeError, match=r"expected an int, a slice, a list"):
        swarm["0"]


def test_member_particle_carries_its_own_buffers() -> None:
    modules = members("deep")
    swarm = Swarm.stack(modules)
    for i in (0, 2):
        rebuilt = swarm[i].module()
        assert torch.equal(rebuilt.bn.running_mean, modules[i].bn.running_mean)
        assert rebuilt.bn.running_mean.data_ptr() != swarm.buffers["bn.running_mean"][i].data_ptr()
        x = torch.randn(5, 3)
        modules[i].eval(), rebuilt.eval()
        torch.testing.assert_close(rebuilt(x), modules[i](x), rtol=0, atol=0)
    mean = swarm.mean()
    torch.testing.assert_close(mean.params["scale"], stacked(modules)["scale"].mean(0), rtol=RTOL, atol=ATOL)


def test_setitem_and_its_atomicity() -> None:
    modules = members("deep", 5)
    swarm = Swarm.stack(modules)
    expected = stacked(modules)
    swarm[1] = modules[4]
    swarm[[0, 3]] = swarm[2]
    swarm[torch.tensor([False, False, False, False, True])] = 0.5
    for name in expected:
        expected[name][1] = expected[name][4]
        expected[name][[0, 3]] = expected[name][2].clone()
        if name in dict(modules[0].named_parameters()):
            expected[name][4] = 0.5
    assert_swarm(swarm, expected)
    swarm[1:3] = Swarm.stack(modules[3:5])
    for name in expected:
        expected[name][1:3] = stacked(modules[3:5])[name]
    assert_swarm(swarm, expected)
    swarm[0:3] = swarm[1:4]  # overlapping views of itself
    for name in expected:
        expected[name][0:3] = expected[name][1:4].clone()
    assert_swarm(swarm, expected)
    with pytest.raises(StructureError, match=r"expected a swarm of 2 members \(or 1\) to assign, got 5"):
        swarm[[0, 1]] = swarm
    with pytest.raises(StructureError, match=r"parameter 'scale' differs"):
        swarm[0] = Deep(width=4)
    with pytest.raises(TypeError, match=r"expected a Deep, a Particle or a Swarm of one, or a number, got str"):
        swarm[0] = "x"
    assert_swarm(swarm, expected)


class _ThreeGroups(nn.Module):
    """Two float32 parameters in one group, a float64 one alone in another."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(3))
        self.b = nn.Parameter(torch.randn(2))
        self.c = nn.Parameter(torch.randn(2, dtype=torch.float64))


IN_PLACE_SELF: dict[str, tuple[Callable[[Swarm], Any], Callable[[Swarm], Any]]] = {
    # name: (in place, out of place): the operand is (a view of) the swarm itself
    "s += s[0]": (lambda s: s.__iadd__(s[0]), lambda s: s + s[0]),
    "s -= s[-1]": (lambda s: s.__isub__(s[-1]), lambda s: s - s[-1]),
    "s *= s[1:2]": (lambda s: s.__imul__(s[1:2]), lambda s: s * s[1:2]),
    "s.add_(s[2], alpha=-0.5)": (lambda s: s.add_(s[2], alpha=-0.5), lambda s: s.add(s[2], alpha=-0.5)),
    "s.lerp_(s[0], 0.3)": (lambda s: s.lerp_(s[0], 0.3), lambda s: s.lerp(s[0], 0.3)),
    "s.lerp_(s[3:], w)": (lambda s: s.lerp_(s[3:], torch.tensor([0.1, 0.2, 0.3, 0.4])),
                          lambda s: s.lerp(s[3:], torch.tensor([0.1, 0.2, 0.3, 0.4]))),
    "s -= s": (lambda s: s.__isub__(s), lambda s: s - s),
}


@pytest.mark.parametrize("case", sorted(IN_PLACE_SELF))
@pytest.mark.parametrize("factory", [_ThreeGroups, lambda: nn.Linear(2, 1, bias=False), mlp],
                         ids=["three groups", "one tensor", "mlp"])
def test_in_place_ops_read_the_swarm_as_it_was(case: str, factory: Callable[[], nn.Module]) -> None:
    # s += s[0] reads member 0 while writing it: every member must add member 0's values from before
    # the step, exactly as s + s[0] does (torch alone refuses such overlaps half-way through)
    in_place, out_of_place = IN_PLACE_SELF[case]
    swarm = Swarm.stack([factory() for _ in range(4)])
    expected = out_of_place(swarm).params
    assert in_place(swarm) is swarm
    for name, value in expected.items():
        assert torch.equal(swarm.params[name], value), name


# -- arithmetic -------------------------------------------------------------------------------------
def _reference(op: Callable[[Any, Any], Any], left: dict[str, Tensor], right: Callable[[str, int], Any],
               active: Callable[[str], bool], size: int) -> dict[str, Tensor]:
    """Per-member, per-tensor loop: ``op(left[name][i], right(name, i))`` on arithmetic leaves."""
    out = {}
    for name, value in left.items():
        if not active(name):
            out[name] = value.clone()
            continue
        out[name] = torch.stack([op(value[i], right(name, i)) for i in range(size)])
    return out


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("kind", ["scalar", "tensor0", "weights", "particle", "model", "swarm", "swarm1"])
@pytest.mark.parametrize("name", ["mixed", "deep"])
def test_binary_ops_match_per_member_loop(name: str, op: str, kind: str) -> None:
    modules = [positive(m) for m in members(name)]
    others = [positive(m) for m in members(name, seed=7)]
    swarm, other_swarm = Swarm.stack(modules), Swarm.stack(others)
    params = set(swarm.params)
    left = stacked(modules)
    weights = torch.tensor([0.5, 1.5, 2.0, 3.0])
    operands: dict[str, tuple[Any, Callable[[str, int], Any]]] = {
        "scalar": (1.5, lambda n, i: 1.5),
        "tensor0": (torch.tensor(1.5), lambda n, i: torch.tensor(1.5)),
        "weights": (weights, lambda n, i: weights[i].to(left[n].dtype)),
        "particle": (nytorch.particle(others[1]), lambda n, i: state(others[1])[n]),
        "model": (others[2], lambda n, i: state(others[2])[n]),
        "swarm": (other_swarm, lambda n, i: state(others[i])[n]),
        "swarm1": (other_swarm[2:3], lambda n, i: state(others[2])[n]),
    }
    operand, right = operands[kind]
    fn = OPS[op]
    expected = _reference(fn, left, right, lambda n: n in params and is_arith(left[n]), P)
    assert_swarm(fn(swarm, operand), expected, exact=False)
    assert_swarm(swarm, stacked(modules))  # operands untouched
    if kind in ("scalar", "tensor0", "weights", "particle", "model"):  # reflected forms
        reflected = _reference(lambda a, b: fn(b, a), left, right, lambda n: n in params and is_arith(left[n]), P)
        assert_swarm(fn(operand, swarm), reflected, exact=False)
    pointers = [flat.data_ptr() for flat in swarm._flats]
    result = IOPS[op](swarm, operand)
    assert result is swarm and [flat.data_ptr() for flat in swarm._flats] == pointers
    assert_swarm(swarm, expected, exact=False)


def test_unary_lerp_add_and_numpy_scalars() -> None:
    modules = members("mlp")
    swarm = Swarm.stack(modules)
    left = stacked(modules)
    assert_swarm(-swarm, {n: -v for n, v in left.items()})
    positive_copy = +swarm
    assert positive_copy is not swarm and positive_copy.params["0.bias"].data_ptr() != swarm.params["0.bias"].data_ptr()
    assert_swarm(np.float64(2.0) * swarm, {n: 2 * v for n, v in left.items()}, exact=False)
    end = nytorch.particle(modules[0])
    w = torch.tensor([0.0, 0.25, 0.5, 1.0])
    expected = {n: torch.stack([torch.lerp(v[i], left[n][0], w[i]) for i in range(P)]) for n, v in left.items()}
    assert_swarm(swarm.lerp(end, w), expected, exact=False)
    assert_swarm(swarm.lerp(swarm[0:1], 0.5), {n: torch.lerp(v, v[0], 0.5) for n, v in left.items()}, exact=False)
    assert_swarm(swarm.lerp(0, torch.tensor(0.5, dtype=torch.float64)), {n: v / 2 for n, v in left.items()},
                 exact=False)
    assert_swarm(swarm.add(swarm, alpha=-0.5), {n: v - 0.5 * v for n, v in left.items()}, exact=False)
    copy = swarm.clone()
    copy.lerp_(end, 1.0)
    copy.add_(1.0, alpha=2.0)
    assert_swarm(copy, {n: left[n][0].expand_as(v) + 2.0 for n, v in left.items()}, exact=False)
    with pytest.raises(TypeError, match=r"add: expected a real number as alpha, got str"):
        swarm.add(swarm, alpha="x")  # type: ignore[arg-type]


def test_operand_errors_name_the_problem_and_change_nothing() -> None:
    modules = members("deep")
    swarm = Swarm.stack(modules)
    before = stacked(modules)
    cases: list[tuple[Any, type, str]] = [
        (torch.ones(3), StructureError,
         r"mul: expected one weight per member \(a 1-D tensor of length 4\), got length 3"),
        (torch.ones(4, 1), TypeError, r"mul: expected a number, a 0-dim tensor or a 1-D tensor of 4 per-member "
                                      r"weights, got a tensor of shape \(4, 1\)"),
        (torch.ones(4, dtype=torch.complex64), TypeError, r"complex weights would turn parameter 'scale'"),
        (1j, TypeError, r"mul: the scalar 1j would turn parameter 'scale'"),
        (Deep(width=4), StructureError, r"mul: parameter 'scale' differs: shape \(3,\) float32 vs shape \(4,\)"),
        (nn.Linear(3, 3), TypeError, r"mul: expected a Deep \(or a Particle or Swarm of one\), got a Linear"),
        (Swarm.stack(members("deep", 3)), StructureError, r"mul: cannot broadcast a swarm of 3 members into a "
                                                          r"swarm of 4 members"),
        (Swarm.stack([nn.Linear(1, 1)]), TypeError, r"got a Linear"),
        ("x", TypeError, r"mul: expected a number, a 0-dim tensor, a 1-D tensor of 4 per-member weights, a Deep"),
        (torch.ones(4, device="meta"), nytorch.DeviceMismatchError, r"the weights are on meta"),
    ]
    for operand, error, message in cases:
        with pytest.raises(error, match=message):
            swarm *= operand
        assert_swarm(swarm, before)
    with pytest.raises(StructureError, match=r"one swarm takes buffers into arithmetic and the other does not"):
        swarm + Swarm.stack(modules, buffers=True)


def test_particle_and_model_operands_reach_the_swarm() -> None:
    modules = members("mlp")
    swarm = Swarm.stack(modules)
    particle = nytorch.particle(modules[1])
    left = stacked(modules)
    right = state(modules[1])
    for result, fn in ((particle + swarm, torch.add), (particle - swarm, torch.sub), (modules[1] - swarm, torch.sub),
                       (particle * swarm, torch.mul)):
        assert isinstance(result, Swarm)
        assert_swarm(result, {n: fn(right[n], v) for n, v in left.items()}, exact=False)


def test_buffers_follow_particle_semantics() -> None:
    modules = members("deep")
    plain, opted = Swarm.stack(modules), Swarm.stack(modules, buffers=True)
    doubled, doubled_opted = plain * 2, opted * 2
    left = stacked(modules)
    assert torch.equal(doubled.buffers["bn.running_mean"], left["bn.running_mean"])
    assert doubled.buffers["bn.running_mean"].data_ptr() != plain.buffers["bn.running_mean"].data_ptr()
    assert torch.equal(doubled_opted.buffers["bn.running_mean"], 2 * left["bn.running_mean"])
    assert torch.equal(doubled_opted.buffers["bn.num_batches_tracked"], left["bn.num_batches_tracked"])


def test_param_configs_keep_frozen_parameters_out() -> None:
    from conftest import MLP
    net = MLP()
    net.set_param_config(operational=False, name="layer0.bias")
    swarm = Swarm.randn(net, 3)
    moved = swarm + 1
    assert torch.equal(moved.params["layer0.bias"], swarm.params["layer0.bias"])
    assert torch.equal(moved.params["layer1.bias"], swarm.params["layer1.bias"] + 1)
    plain = Swarm.stack([MLP() for _ in range(3)])
    mixed = plain + swarm  # same leaves, grouped differently: regrouped
    assert torch.equal(mixed.params["layer0.weight"], plain.params["layer0.weight"] + swarm.params["layer0.weight"])


@settings(max_examples=25, deadline=None)
@given(a=st.floats(-3, 3, allow_nan=False), b=st.floats(-3, 3, allow_nan=False), seed=st.integers(0, 2**16))
def test_algebraic_laws(a: float, b: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3))
    x, y = Swarm.randn(model, 3, generator=g), Swarm.randn(model, 3, generator=g)
    w = torch.randn(3, generator=g)

    def close(s: Swarm, t: Swarm) -> None:
        for name in s.params:
            torch.testing.assert_close(s.params[name], t.params[name], rtol=1e-5, atol=1e-5)

    close(x + y, y + x)
    close((x + y) - y, x)
    close(2 * x, x + x)
    close(a * (x + y), a * x + a * y)
    close(w * (x + y), w * x + w * y)
    close((a + b) * x, a * x + b * x)
    close(x + x[1], x + nytorch.particle(x[1].module()))
    inplace = x.clone()
    inplace *= a
    inplace += y
    close(inplace, x * a + y)
    close(torch.full((3,), 1 / 3) @ x, x.mean() + Swarm.zeros(x, 1)[0])


# -- reductions and conversions ---------------------------------------------------------------------
def test_mean_matmul_norm() -> None:
    modules = members("mixed")
    swarm = Swarm.stack(modules)
    left = stacked(modules)
    mean = swarm.mean()
    assert isinstance(mean, Particle)
    for name in ("w32", "w64", "wc"):
        torch.testing.assert_close(mean.params[name], left[name].mean(0), rtol=RTOL, atol=ATOL)
    assert torch.equal(mean.params["counts"], left["counts"][0])
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    total = weights @ swarm
    torch.testing.assert_close(total.params["w32"], sum(weights[i] * left["w32"][i] for i in range(P)))
    mixing = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0]])
    mixed = mixing @ swarm
    assert isinstance(mixed, Swarm) and len(mixed) == 2
    torch.testing.assert_close(mixed.params["w64"][1], (left["w64"][0] + left["w64"][1]) / 2)
    reference = torch.stack([
        torch.sqrt(sum(left[n][i].abs().pow(2).sum().double() for n in ("w32", "w64", "wc", "frozen")))
        for i in range(P)])
    torch.testing.assert_close(swarm.norm().double(), reference)
    with pytest.raises(StructureError, match=r"matmul: expected weights of shape \(4,\) or \(Q, 4\), got \(3,\)"):
        torch.ones(3) @ swarm
    with pytest.raises(ValueError, match=r"mean: expected a swarm with at least one member"):
        swarm[[]].mean()


def test_to_train_eval_template_repr_and_pickle() -> None:
    modules = members("deep")
    swarm = Swarm.stack(modules)
    double = swarm.to(torch.float64)
    assert double.params["scale"].dtype == torch.float64
    assert double.buffers["bn.num_batches_tracked"].dtype == torch.long
    torch.testing.assert_close(double.params["scale"], swarm.params["scale"].double())
    assert swarm.to("cpu") is swarm
    derived = swarm * 1
    assert swarm.training and derived.training
    assert swarm.eval() is swarm and not swarm.training and derived.training
    template = swarm.template
    assert isinstance(template, Particle) and template.model_class is Deep
    assert [tuple(v.shape) for v in template.params.values()] == [tuple(v.shape[1:]) for v in swarm.params.values()]
    assert repr(swarm) == "Swarm(Deep, 4 members, 11 tensors, 45 values each)"
    buffer = io.BytesIO()
    torch.save(swarm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert_swarm(loaded, {**swarm.params, **swarm.buffers})
    assert not loaded.training
    x = torch.randn(2, 3)
    torch.testing.assert_close(loaded(x), swarm(x))
    assert_swarm(pickle.loads(pickle.dumps(swarm)), {**swarm.params, **swarm.buffers})


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.complex64, torch.complex128])
@pytest.mark.filterwarnings("ignore:Complex modules:UserWarning", "ignore:Casting complex:UserWarning")
def test_to_casts_like_module_to(dtype: torch.dtype) -> None:
    import copy
    modules = members("mixed")  # float32, float64, complex, frozen, integer parameter; float, int, bool buffers
    swarm = Swarm.stack(modules).to(dtype)
    assert_swarm(swarm, stacked([copy.deepcopy(module).to(dtype) for module in modules]))
    doubled = swarm * 2  # cast values take part in arithmetic, integer ones stay out
    assert torch.equal(doubled.params["w32"], 2 * swarm.params["w32"])
    assert torch.equal(doubled.params["counts"], swarm.params["counts"])
    assert Swarm.stack(modules)[:0].to(dtype).params["w32"].shape == (0, 2, 3)  # an empty swarm converts too


@pytest.mark.filterwarnings("ignore:Complex modules:UserWarning")
def test_to_complex_runs_like_a_complex_module_and_refuses_what_module_to_refuses() -> None:
    linears = [nn.Linear(3, 2) for _ in range(P)]
    swarm = Swarm.stack(linears).to(torch.complex64)
    x = torch.randn(5, 3, dtype=torch.complex64)
    expected = torch.stack([linear.to(torch.complex64)(x) for linear in linears]).detach()
    torch.testing.assert_close(swarm(x), expected, rtol=RTOL, atol=ATOL)
    for dtype in (torch.int32, torch.bool):
        with pytest.raises(TypeError, match=r"nn.Module.to only accepts floating point or complex"):
            nn.Linear(3, 2).to(dtype)  # the behaviour followed
        with pytest.raises(TypeError, match=rf"^Swarm.to: expected a floating point or complex dtype "
                                            rf"\(as Module.to\), got {dtype}$"):
            swarm.to(dtype)
    with pytest.raises(TypeError, match=r"^Swarm.to: expected a floating point or complex dtype .* got torch.int64"):
        swarm.to(torch.zeros(1, dtype=torch.long))  # a tensor to match
    with pytest.raises(ValueError, match=r"^Swarm.to: expected no memory_format \(a swarm stores its members' "
                                         r"tensors as contiguous rows\), got torch.channels_last"):
        swarm.to(memory_format=torch.channels_last)
    assert swarm.to(memory_format=torch.contiguous_format) is swarm


# -- vectorised forward ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_matches_loop(name: str) -> None:
    modules = members(name)
    for module in modules:
        module.eval()
    swarm = Swarm.stack(modules).eval()
    x = sample(name)
    with torch.no_grad():
        expected = torch.stack([module(x) for module in modules])
        torch.testing.assert_close(swarm(x), expected, rtol=RTOL, atol=ATOL)
        general = vec.forward(swarm._spec, swarm._views(), P, (x,), {}, chunk_size=P)  # the vmap path
        torch.testing.assert_close(general, expected, rtol=RTOL, atol=ATOL)
        per_member = torch.stack([sample(name, seed) for seed in range(P)])
        expected = torch.stack([module(per_member[i]) for i, module in enumerate(modules)])
        torch.testing.assert_close(swarm(per_member, in_dims=0), expected, rtol=RTOL, atol=ATOL)


def test_fused_path_is_taken_for_linear_chains() -> None:
    for factory in (mlp, ClassMLP):
        swarm = Swarm.stack([factory() for _ in range(3)])
        swarm(torch.randn(2, 4))
        assert swarm._spec.plan and swarm._spec.plan[0][0] == "linear"
    for factory in (Branchy, TiedLM, lambda: nn.Sequential(nn.Linear(2, 2), nn.Softmax(-1))):
        swarm = Swarm.stack([factory() for _ in range(2)])
        assert fused.plan_of(swarm._spec) == ("none",)
    hooked = nn.Sequential(nn.Linear(2, 2))
    hooked[0].register_forward_hook(lambda module, args, out: out * 0)
    assert fused.plan_of(Swarm.stack([hooked]) ._spec) == ("none",)
    assert Swarm.stack([hooked])(torch.ones(1, 2)).abs().sum() == 0  # hooks run on the vmap path


class _Counting(nn.Module):
    """A Linear whose forward also counts its calls in a buffer (an effect outside the graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.fc(x)


def test_forwards_that_write_their_buffers_are_not_fused() -> None:
    modules = [_Counting() for _ in range(3)]
    swarm = Swarm.stack(modules)
    template_calls = swarm._spec.layout.buffers[0].clone()
    x = torch.randn(5, 2)
    out = swarm(x)
    expected = torch.stack([module(x) for module in modules])
    torch.testing.assert_close(out, expected)
    assert fused.plan_of(swarm._spec) == ("none",)  # tracing saw the write: the vmap path runs it
    assert swarm.buffers["calls"].tolist() == [1.0, 1.0, 1.0] == [module.calls.item() for module in modules]
    assert torch.equal(swarm._spec.layout.buffers[0], template_calls)  # tracing wrote to copies only


class _Averaging(nn.Module):
    """A forward that assigns a buffer anew: a running mean of its inputs."""

    def __init__(self, width: int = 2) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 3)
        self.register_buffer("mean", torch.zeros(width))

    def forward(self, x: Tensor) -> Tensor:
        self.mean = 0.9 * self.mean + 0.1 * x.mean(0)
        return self.fc(x)


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_buffers_assigned_in_forward_reach_every_member(chunk_size: Any) -> None:
    modules = [_Averaging() for _ in range(3)]
    swarm = Swarm.stack(modules)
    shared, per_member = torch.randn(5, 2), torch.randn(3, 5, 2)
    torch.testing.assert_close(swarm(shared, chunk_size=chunk_size), torch.stack([m(shared) for m in modules]))
    torch.testing.assert_close(swarm(per_member, in_dims=0, chunk_size=chunk_size),
                               torch.stack([m(x) for m, x in zip(modules, per_member)]))
    torch.testing.assert_close(swarm.buffers["mean"], torch.stack([m.mean for m in modules]))
    grads, losses = swarm.grad_and_value(lambda member, x: member(x).square().mean(), per_member, in_dims=0,
                                         chunk_size=chunk_size)
    expected = [nn.functional.mse_loss(m(x), torch.zeros(5, 3), reduction="mean") for m, x in zip(modules, per_member)]
    torch.testing.assert_close(losses, torch.stack(expected).detach())
    torch.testing.assert_close(swarm.buffers["mean"], torch.stack([m.mean for m in modules]))


def test_a_buffer_assigned_another_shape_or_none_is_refused() -> None:
    class Reshaping(_Averaging):
        def forward(self, x: Tensor) -> Tensor:
            self.mean = x.mean(0, keepdim=True)  # (1, 2) where the buffer holds (2,)
            return self.fc(x)

    class Dropping(_Averaging):
        def forward(self, x: Tensor) -> Tensor:
            self.mean = None
            return self.fc(x)

    for kind, error, message in ((Reshaping, ValueError, r"assigned buffer 'mean' a tensor of shape \(1, 2\)"),
                                 (Dropping, TypeError, r"set buffer 'mean' to a NoneType")):
        swarm = Swarm.stack([kind() for _ in range(2)])
        before = swarm.buffers["mean"].clone()
        with pytest.raises(error, match=rf"^Swarm.__call__: the forward {message}"):
            swarm(torch.randn(4, 2))
        assert torch.equal(swarm.buffers["mean"], before)


def test_forward_shapes_kwargs_and_randomness() -> None:
    swarm = Swarm.stack([mlp() for _ in range(3)])
    assert swarm(torch.randn(4)).shape == (3, 3)  # unbatched input
    assert swarm(torch.randn(2, 5, 4)).shape == (3, 2, 5, 3)
    dropout = Swarm.stack([nn.Sequential(nn.Linear(4, 50), nn.Dropout(0.5)) for _ in range(3)])
    out = dropout(torch.ones(1, 4))
    assert not torch.equal(out[0] == 0, out[1] == 0)  # independent masks per member
    same = dropout(torch.ones(1, 4), randomness="same")
    assert torch.equal(same[0] == 0, same[1] == 0) or not torch.equal(same[0], same[1])
    with pytest.raises(RuntimeError, match=r"Swarm.__call__: .*vmap.*randomness"):
        dropout(torch.ones(1, 4), randomness="error")
    with pytest.raises(ValueError, match=r"in_dims has 2 entries but 1 positional arguments were given"):
        swarm(torch.randn(2, 4), in_dims=(0, None))

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x: Tensor, *, scale: float = 1.0) -> Tensor:
            return self.fc(x) * scale

    scaled = [Scaled() for _ in range(2)]
    x = torch.randn(3, 2)
    torch.testing.assert_close(Swarm.stack(scaled)(x, scale=2.0), torch.stack([m(x, scale=2.0) for m in scaled]))


def test_forward_refuses_unvectorisable_models_with_a_hint() -> None:
    swarm = Swarm.stack([Branchy() for _ in range(2)])
    with pytest.raises(RuntimeError, match=r"could not run Branchy.*\n.*Hint: .*torch.where"):
        swarm(torch.randn(3, 2))
    # a cumulative BatchNorm (momentum=None) reads its batch count as a number: the hint says so, and eval()
    norms = Swarm.stack([nn.BatchNorm1d(3, momentum=None) for _ in range(2)])
    with pytest.raises(RuntimeError, match=r"\n.*Hint: BatchNorm with momentum=None .*give it a momentum, put the "
                                           r"swarm in eval mode \(swarm.eval\(\)\)"):
        norms(torch.randn(4, 3))
    torch.testing.assert_close(norms.eval()(torch.ones(4, 3)), torch.ones(2, 4, 3), rtol=1e-4, atol=1e-4)


def test_batchnorm_train_mode_updates_each_members_statistics() -> None:
    modules = members("conv_bn")
    swarm = Swarm.stack(modules)
    assert swarm.training
    x = sample("conv_bn")
    out = swarm(x)
    expected = torch.stack([module(x) for module in modules])  # train mode: updates running stats
    torch.testing.assert_close(out, expected.detach(), rtol=RTOL, atol=ATOL)
    assert_swarm(swarm, stacked(modules), exact=False)


# -- per-member gradients ------------------------------------------------------------------------------
def _loss(net: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(net(x).reshape(-1, 3) if net(x).shape[-1] == 3 else net(x).reshape(-1, 2),
                           y.reshape(-1))


@pytest.mark.parametrize("name", ["linear", "mlp", "class_mlp", "conv_bn", "tied", "embed", "deep"])
def test_grad_and_value_match_autograd_loop(name: str) -> None:
    modules = members(name)
    for module in modules:
        module.eval()
    swarm = Swarm.stack(modules).eval()
    x = sample(name)
    with torch.no_grad():
        classes = modules[0](x).shape[-1]
    y = torch.randint(0, classes, modules[0](x).shape[:-1], generator=torch.Generator().manual_seed(0))

    def loss_fn(net: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(net(x).reshape(-1, classes), y.reshape(-1))

    grads, losses = swarm.grad_and_value(loss_fn, x, y)
    for i, module in enumerate(modules):
        module.zero_grad()
        loss = loss_fn(module, x, y)
        loss.backward()
        torch.testing.assert_close(losses[i], loss.detach(), rtol=RTOL, atol=ATOL)
        for pname, param in module.named_parameters():
            expected = param.grad if param.grad is not None else torch.zeros_like(param)
            torch.testing.assert_close(grads.params[pname][i], expected, rtol=RTOL, atol=ATOL, msg=pname)
    assert isinstance(grads, Swarm) and not losses.requires_grad


def test_grad_and_value_per_member_batches_frozen_params_and_errors() -> None:
    modules = members("mlp")
    modules[0][0].bias.requires_grad_(False)  # the template's flags decide what is differentiated
    swarm = Swarm.stack(modules)
    xs, ys = torch.randn(P, 5, 4), torch.randn(P, 5, 3)
    grads, losses = swarm.grad_and_value(lambda net, x, y: F.mse_loss(net(x), y) + net.params["2.weight"].sum(),
                                         xs, ys, in_dims=0)
    for i, module in enumerate(modules):
        module.zero_grad()
        loss = F.mse_loss(module(xs[i]), ys[i]) + module[2].weight.sum()
        loss.backward()
        torch.testing.assert_close(losses[i], loss.detach(), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(grads.params["4.weight"][i], module[4].weight.grad, rtol=RTOL, atol=ATOL)
    assert grads.params["0.bias"].abs().sum() == 0
    with pytest.raises(ValueError, match=r"grad_and_value: expected loss_fn to return a 0-dim tensor per member, "
                                         r"got \(5, 3\)"):
        swarm.grad_and_value(lambda net, x: net(x), xs[0])
    with pytest.raises(TypeError, match=r"grad_and_value: expected a callable loss_fn"):
        swarm.grad_and_value(3, xs[0])  # type: ignore[arg-type]


def test_params_work_with_torch_func_and_models_without_tensors() -> None:
    modules = members("mlp")
    swarm = Swarm.stack(modules)
    x = torch.randn(3, 4)
    out = torch.func.vmap(lambda p: torch.func.functional_call(modules[0], p, (x,)))(swarm.params)
    torch.testing.assert_close(out, torch.stack([m(x) for m in modules]).detach(), rtol=RTOL, atol=ATOL)
    empty = Swarm.stack([nn.ReLU() for _ in range(3)])
    assert len(empty) == 3 and empty.params == {} and empty(x).shape == (3, 3, 4)
    assert torch.equal((empty * 2)(x), empty(x))
    grads, losses = empty.grad_and_value(lambda net, x: net(x).sum(), x)
    assert torch.equal(losses, x.relu().sum().expand(3))


def test_updates_allocate_no_more_than_their_outputs() -> None:
    from torch.profiler import ProfilerActivity, profile
    swarm = Swarm.stack([mlp() for _ in range(16)])
    other = swarm.clone()
    output_bytes = sum(flat.numel() * flat.element_size() for flat in swarm._flats)

    def allocated(fn: Callable[[], Any]) -> int:
        fn()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        return sum(event.cpu_memory_usage for event in prof.events()
                   if event.cpu_memory_usage > 0 and event.cpu_parent is None)

    assert allocated(lambda: swarm + other) <= output_bytes + 256
    assert allocated(lambda: swarm.lerp(other, 0.5)) <= output_bytes + 256
    assert allocated(lambda: swarm.add_(other, alpha=0.0)) <= 256
    assert allocated(lambda: swarm.__imul__(1.0)) <= 256


def test_a_swarm_pickles_after_its_structure_compiled_code() -> None:
    # repeated conversions and module() builds make a structure compile straight-line code,
    # which is not picklable: a pickled swarm carries none of it and makes it again when needed
    swarm = Swarm.normal(mlp(), 3)
    for dtype in (torch.float64, torch.float16, torch.float32):
        swarm = swarm.to(dtype)
    for _ in range(3):
        swarm[0].module()
    for copy in (pickle.loads(pickle.dumps(swarm)), torch.load(_saved(swarm), weights_only=False)):
        assert_swarm(copy, {**swarm.params, **swarm.buffers})
        assert torch.equal(copy[1].module()[0].weight, swarm[1].module()[0].weight)


def _saved(value: Any) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_and_value_of_an_empty_swarm_is_empty(dtype: torch.dtype) -> None:
    calls = []

    def loss(net: Any, x: Tensor, y: Tensor) -> Tensor:
        calls.append(1)
        return F.mse_loss(net(x), y)  # its backward fails under vmap over no members: it is not run

    model = mlp().to(dtype)
    model[2].weight.requires_grad_(False)
    empty = Swarm.zeros(model, 0)
    grads, losses = empty.grad_and_value(loss, torch.randn(5, 4, dtype=dtype), torch.randn(5, 3, dtype=dtype))
    assert calls == [] and losses.shape == (0,) and losses.dtype == dtype
    assert {name: (tuple(value.shape), value.dtype) for name, value in grads.params.items()} == {
        name: ((0, *param.shape), dtype) for name, param in model.named_parameters()}
    _, losses = Swarm.stack([nn.ReLU()])[:0].grad_and_value(lambda net, x: net(x).sum(), torch.randn(2))
    assert losses.shape == (0,) and losses.dtype == torch.get_default_dtype()


def test_random_fills_refuse_a_generator_on_another_device() -> None:
    meta = Swarm.zeros(nn.Linear(2, 1, device="meta"), 3)
    for fill in (Swarm.randn, Swarm.rand):
        with pytest.raises(ValueError, match=rf"^{fill.__name__}: expected a generator on meta \(where the "
                                             r"swarm's 'weight' lives\), got one on cpu; create it there"):
            fill(meta, generator=torch.Generator())
        assert fill(meta).params["weight"].is_meta  # without a generator: the default one
    with pytest.raises(ValueError, match=r"^normal: expected a generator on meta"):
        Swarm.normal(meta, std=0.1, generator=torch.Generator())
    with pytest.raises(TypeError, match=r"^randn: expected a torch.Generator or None as generator, got int"):
        Swarm.randn(nn.Linear(2, 1), 3, generator=0)  # type: ignore[arg-type]
    seeded = Swarm.randn(nn.Linear(2, 1), 2, generator=torch.Generator().manual_seed(0))  # one [2, 3] draw
    assert torch.equal(seeded.params["bias"], torch.randn(2, 3, generator=torch.Generator().manual_seed(0))[:, 2:])


class _WithScalar(nn.Module):
    """A 0-dim parameter beside a vector one."""

    def __init__(self, value: float = 0.5) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(value))
        self.shift = nn.Parameter(torch.ones(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x + self.shift


def test_models_with_0_dim_parameters_stack_and_run() -> None:
    modules = [_WithScalar(0.5), _WithScalar(2.0)]
    swarm = Swarm.stack(modules)
    assert swarm.params["scale"].tolist() == [0.5, 2.0] and swarm[1].params["scale"].shape == ()
    assert (swarm + 1).params["scale"].tolist() == [1.5, 3.0]
    assert Swarm.zeros(_WithScalar(), 3).params["scale"].tolist() == [0.0, 0.0, 0.0]
    x = torch.randn(4, 2)
    torch.testing.assert_close(swarm(x), torch.stack([module(x) for module in modules]))


# -- audit 16: forwards that set attributes, stack settings, normal centres, loss dtypes, inference, options --
class Caching(nn.Module):
    """A forward that keeps its last output and counts its calls (attributes, not buffers)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.last: Any = None
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        out = torch.relu(self.fc(x))  # a Linear chain: fx traces it, but it must not be fused
        self.last = out.detach()
        return out


def weight_normed() -> nn.Sequential:
    with pytest.warns(FutureWarning):
        first = torch.nn.utils.weight_norm(nn.Linear(3, 4))
    return nn.Sequential(first, nn.Tanh(), nn.Linear(4, 2))


def skeleton_state(swarm: Swarm) -> list[dict[str, int]]:
    return [{key: id(value) for key, value in module.__dict__.items()} for module in swarm._spec.layout.modules]


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch has no batching rule for weight_norm
@pytest.mark.parametrize("make", [Caching, weight_normed], ids=["caching", "weight_norm"])
def test_attributes_set_by_a_forward_are_not_kept(make: Callable[[], nn.Module]) -> None:
    torch.manual_seed(0)
    modules = [make() for _ in range(3)]
    swarm = Swarm.stack(modules)
    before = skeleton_state(swarm)
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    torch.testing.assert_close(swarm(x), torch.stack([m(x) for m in modules]), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(swarm(x, chunk_size=2), torch.stack([m(x) for m in modules]), atol=ATOL, rtol=RTOL)
    grads, losses = swarm.grad_and_value(lambda net, x, y: F.mse_loss(net(x), y), x, y)
    expected = []
    for module in modules:
        module.zero_grad()
        loss = F.mse_loss(module(x), y)
        loss.backward()
        expected.append(loss.detach())
    torch.testing.assert_close(losses, torch.stack(expected), atol=ATOL, rtol=RTOL)
    name = "fc.bias" if make is Caching else "2.bias"
    reference = [m.get_parameter(name).grad for m in modules]
    torch.testing.assert_close(grads.params[name], torch.stack(reference),  # type: ignore[arg-type]
                               atol=ATOL, rtol=RTOL)
    assert skeleton_state(swarm) == before  # the same objects: nothing batched or traced was left behind
    for value in (swarm, swarm + 1, swarm[0], swarm[0].module(), swarm[1:]):
        assert pickle.loads(pickle.dumps(value)) is not None
    torch.save(swarm, io.BytesIO())
    again = pickle.loads(pickle.dumps(swarm))
    torch.testing.assert_close(again(x), swarm(x))
    if make is Caching:
        member = swarm[0].module()
        assert member.last is None and member.calls == 0  # as stacked
        assert swarm._spec.plan is fused.NO_PLAN  # its body runs on every call (the vmap path)


def test_traced_forward_without_attributes_is_still_fused() -> None:
    swarm = Swarm.stack(members("class_mlp"))
    swarm(torch.randn(2, 4))
    plan: Any = swarm._spec.plan
    assert plan is not fused.NO_PLAN and plan[0][0] == "linear"


def _bn_eval() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()


@pytest.mark.parametrize(("first", "second", "message"), [
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), _bn_eval,
     r"^stack: item 1: expected the root module \(Sequential\) in train mode \(as in item 0\), got eval mode; "),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)),
     lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4).eval()),
     r"^stack: item 1: expected submodule '1' \(BatchNorm1d\) in train mode \(as in item 0\), got eval mode"),
    (lambda: nn.Sequential(nn.Linear(2, 2), nn.ReLU()), lambda: nn.Sequential(nn.Linear(2, 2), nn.Tanh()),
     r"^stack: item 1: expected submodule '1' to be a ReLU \(as in item 0\), got a Tanh; "),
    (lambda: nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)), lambda: nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.2)),
     r"^stack: item 1: expected submodule '1' \(Dropout\) attribute 'p' = 0\.5 \(as in item 0\), got 0\.2; "),
    (lambda: nn.LeakyReLU(0.1), lambda: nn.LeakyReLU(0.2),
     r"^stack: item 1: expected the root module \(LeakyReLU\) attribute 'negative_slope' = 0\.1 .*got 0\.2"),
    (lambda: nn.BatchNorm1d(2), lambda: nn.BatchNorm1d(2, eps=1e-3),
     r"^stack: item 1: expected the root module \(BatchNorm1d\) attribute 'eps' = 1e-05 .*got 0\.001"),
    (lambda: nn.BatchNorm1d(2), lambda: nn.BatchNorm1d(2, momentum=None),
     r"attribute 'momentum' = 0\.1 \(as in item 0\), got None"),
    (lambda: nn.Conv1d(1, 1, 3), lambda: nn.Conv1d(1, 1, 3, padding=1),
     r"^stack: item 1: expected the root module \(Conv1d\) attribute 'padding' = \(0,\) .*got \(1,\)"),
    (lambda: nn.Sequential(nn.Linear(2, 2)), lambda: nn.Sequential(nn.Linear(2, 2), nn.ReLU()),
     r"^stack: item 1: submodule '1' \(ReLU\) is only in this item"),
    (lambda: nn.BatchNorm1d(2), lambda: nn.BatchNorm1d(2, track_running_stats=False),
     r"^stack: item 1: buffer 'running_mean' is missing from this item$"),
], ids=["mode", "submodule-mode", "class", "dropout-p", "slope", "eps", "momentum", "padding", "extra-module",
        "buffers"])
def test_stack_refuses_members_that_would_run_differently(first: Callable[[], nn.Module],
                                                          second: Callable[[], nn.Module], message: str) -> None:
    with pytest.raises(StructureError, match=message):
        Swarm.stack([first(), first(), second()][1:])  # item 1 is the odd one
    particles = [first(), nytorch.particle(first()), nytorch.particle(second())]
    if " mode" in message:  # a Particle has no train/eval mode of its own: the swarm's is item 0's
        assert len(Swarm.stack(particles)) == 3
        return
    with pytest.raises(StructureError, match=message.replace("item 1", "item 2")):
        Swarm.stack(particles)


def test_stack_leaves_the_attributes_of_user_classes_to_item_0() -> None:
    """Attributes of classes written outside torch (names, counters, histories) are the user's: not compared."""
    class Member(nn.Module):
        def __init__(self, name: str, best: object) -> None:
            super().__init__()
            self.layer = nn.Linear(2, 2)
            self.name, self.best = name, best

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x)

    members = [Member("member0", None), Member("member1", 0.31), Member("member2", 0.5)]
    swarm = Swarm.stack(members)
    x = torch.randn(3, 2)
    torch.testing.assert_close(swarm(x), torch.stack([m(x) for m in members]), atol=ATOL, rtol=RTOL)
    with pytest.raises(StructureError, match=r"^stack: item 1: expected the root module \(Member\) in train mode"):
        Swarm.stack([members[0], Member("other", None).eval()])


def test_stack_accepts_equal_settings_and_names_buffers() -> None:
    nan = float("nan")
    swarm = Swarm.stack([nn.LeakyReLU(nan), nn.LeakyReLU(float("nan"))])  # NaN settings are equal
    assert len(swarm) == 2
    modules = [_bn_eval() for _ in range(3)]
    for i, module in enumerate(modules):
        module[1].get_buffer("running_mean").fill_(i)
    swarm = Swarm.stack(modules)
    x = torch.randn(6, 3)
    torch.testing.assert_close(swarm(x), torch.stack([m(x) for m in modules]), atol=ATOL, rtol=RTOL)
    with pytest.raises(StructureError, match=r"^stack: item 1: buffer 'running_var' differs: shape \(2,\) float32 "
                                             r"vs shape \(2,\) float64 \(item 0 vs this item\)"):
        bn = nn.BatchNorm1d(2)
        bn.running_var = bn.get_buffer("running_var").double()
        Swarm.stack([nn.BatchNorm1d(2), bn])


def test_normal_around_a_swarm_centres_each_member_on_its_own() -> None:
    centre = Swarm.stack([nn.Linear(2, 1) for _ in range(4)])
    same = Swarm.normal(centre, 4, std=0.0)
    assert torch.equal(same.params["weight"], centre.params["weight"])
    assert torch.equal(Swarm.normal(centre, std=0.0).params["bias"], centre.params["bias"])
    noisy = Swarm.normal(centre, std=1e-3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(noisy.params["bias"], centre.params["bias"], atol=1e-2)
    assert not torch.equal(noisy.params["bias"], centre.params["bias"])
    one = Swarm.normal(centre[:1], 3, std=0.0)  # one member: shared like a model
    assert torch.equal(one.params["bias"], centre.params["bias"][:1].expand(3, 1))
    with pytest.raises(ValueError, match=r"^normal: expected size 4 \(the centre swarm's size: .*got size 8"):
        Swarm.normal(centre, 8, std=0.0)


@pytest.mark.parametrize(("loss_fn", "dtype"), [
    (lambda net, x: (net(x).sum() * 100).long(), "int64"), (lambda net, x: net(x).sum() > 0, "bool"),
])
def test_integer_or_bool_losses_are_refused(loss_fn: Callable[..., Tensor], dtype: str) -> None:
    swarm = Swarm.normal(nn.Linear(4, 3), 3)
    x = torch.randn(6, 4)
    with pytest.raises(RuntimeError):  # the per-member loop refuses it too
        loss_fn(swarm[0].module(), x).backward()
    message = rf"^Swarm.grad_and_value: expected loss_fn to return a floating point loss, got {dtype}; "
    with pytest.raises(TypeError, match=message):
        swarm.grad_and_value(loss_fn, x)
    with pytest.raises(TypeError, match=message):
        nytorch.algorithms.sgd_step(swarm, loss_fn, x, lr=0.1)


def test_swarms_made_under_inference_mode() -> None:
    with torch.inference_mode():
        modules = [_bn_eval() for _ in range(3)]
        for i, module in enumerate(modules):
            module[1].get_buffer("running_var").fill_(i + 1.0)
        swarm = Swarm.stack(modules)
    x = torch.randn(5, 3)
    with torch.no_grad():  # the modules' inference tensors cannot be saved for backward
        expected = torch.stack([m(x) for m in modules])
    torch.testing.assert_close(swarm(x), expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(swarm(x, chunk_size=2), expected, atol=ATOL, rtol=RTOL)
    before = {name: value.clone() for name, value in {**swarm.params, **swarm.buffers}.items()}
    with pytest.raises(RuntimeError, match=r"^Swarm.__call__: buffer '1.running_mean' is an inference tensor and "
                                           r"cannot be updated in place outside torch.inference_mode\(\); "):
        swarm.train()(x)
    writes: list[Callable[[], Any]] = [
        lambda: operator.iadd(swarm, 1), lambda: swarm.lerp_(0.0, 0.5), lambda: swarm.add_(swarm, alpha=2),
        lambda: swarm.__setitem__(0, _bn_eval()), lambda: swarm.__setitem__(slice(1, None), 1.0),
    ]
    for write, fn in zip(writes, ["add", "lerp_", "add_", "Swarm.__setitem__", "Swarm.__setitem__"]):
        with pytest.raises(RuntimeError, match=rf"^{fn}: parameter '0.weight' is an inference tensor and cannot be "
                                               r"updated in place outside torch.inference_mode\(\)"):
            write()
    for name, value in {**swarm.params, **swarm.buffers}.items():
        assert torch.equal(value, before[name]), name
    with torch.inference_mode():
        swarm += 1
        swarm.train()(x)
    assert torch.equal(swarm.params["0.bias"], before["0.bias"] + 1)
    clone = swarm.clone()
    clone += 1
    clone.train()(x)


def test_call_options_and_indices_are_checked() -> None:
    net = mlp()
    swarm = Swarm.normal(net, 5)
    general = Swarm.normal(nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)), 5)
    x = torch.randn(6, 4)
    for s in (swarm, general):  # the fused path and the vmap path
        with pytest.raises(TypeError, match=r"^Swarm.__call__: expected None or a positive int as chunk_size, got str"):
            s(x, chunk_size="2")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"^Swarm.__call__: expected None or a positive int as chunk_size, got 0"):
            s(x, chunk_size=0)
        with pytest.raises(ValueError, match=r"^Swarm.__call__: expected randomness 'different', 'same' or 'error', "
                                             r"got 'foo'"):
            s(x, randomness="foo")
        with pytest.raises(ValueError, match=r"^Swarm.grad_and_value: expected randomness .*got 'foo'"):
            s.grad_and_value(lambda m, x: m(x).sum(), x, randomness="foo")
        with pytest.raises(TypeError, match=r"^Swarm.grad_and_value: expected None or a positive int as chunk_size, "
                                            r"got float"):
            s.grad_and_value(lambda m, x: m(x).sum(), x, chunk_size=2.0)  # type: ignore[arg-type]
        torch.testing.assert_close(s(x, chunk_size=np.int64(2)), s(x), atol=ATOL, rtol=RTOL)
    for key in (slice(None, None, -1), slice(None, None, 0)):
        with pytest.raises(ValueError, match=r"^Swarm: expected a slice with a positive step \(a slice is a view\)"):
            swarm[key]
        with pytest.raises(ValueError, match=r"^Swarm: expected a slice with a positive step"):
            swarm[key] = 0.0
    order = np.argsort(np.array([3.0, 1.0, 2.0, 0.0, 4.0]))
    assert torch.equal(swarm[order].params["0.weight"], swarm[order.tolist()].params["0.weight"])
    mask = np.array([True, False, True, False, False])
    assert torch.equal(swarm[mask].params["0.bias"], swarm.params["0.bias"][[0, 2]])
    with pytest.raises(TypeError, match=r"^Swarm: expected an integer or boolean array as index, got one of dtype"):
        swarm[np.array(["a"])]
    copy = swarm.clone()
    copy[np.array([1, 3])] = 0.0
    assert copy.params["0.bias"][[1, 3]].abs().sum() == 0 and copy.params["0.bias"][0].abs().sum() > 0


@pytest.mark.parametrize("alpha", [np.float32(-0.5), np.int64(3), -0.5, 3])
def test_add_takes_numpy_numbers_as_alpha(alpha):
    s = Swarm.zeros(nn.Linear(1, 1), 2)
    assert torch.equal(s.add(s + 1, alpha=alpha).params["bias"], torch.full((2, 1), float(alpha)))
    s.add_(s + 1, alpha=alpha)
    assert torch.equal(s.params["bias"], torch.full((2, 1), float(alpha)))
    with pytest.raises(TypeError, match=r"^add: expected a real number as alpha, got bool_?$"):
        s.add(s, alpha=np.bool_(True))


def test_eval_forward_of_an_inference_swarm_whose_buffers_hold_nan():
    """A NaN statistic is unchanged by an eval forward: NaN counts as equal to itself there."""
    with torch.inference_mode():
        members = [nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)).eval() for _ in range(2)]
        members[0][1].running_mean.fill_(float("nan"))
        swarm = Swarm.stack(members)
    x = torch.randn(4, 2)
    out = swarm(x)
    with torch.inference_mode():
        expected = torch.stack([member(x) for member in members])
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL, equal_nan=True)


@pytest.mark.parametrize("value", [np.True_, np.float32(2.5), np.float16(1.5), np.int64(3)])
def test_numpy_scalars_assign_like_python_numbers(value):
    swarm = Swarm.zeros(nn.Linear(2, 1), 3)
    swarm[1] = value
    assert torch.equal(swarm.params["weight"][1], torch.full((1, 2), float(value)))
    assert torch.equal(swarm.params["weight"][0], torch.zeros(1, 2))


def test_stack_names_particles_whose_buffers_differ_and_checks_modes_after_a_particle():
    with_buffers = lambda take: nytorch.particle(nn.BatchNorm1d(2), buffers=take)  # noqa: E731
    with pytest.raises(StructureError, match=r"^stack: item 1: the Particle takes its buffers into arithmetic "
                                             r"\(particle\(\.\.\., buffers=True\)\) but the swarm does not "
                                             r"\(buffers=False\); make them alike$"):
        Swarm.stack([nn.BatchNorm1d(2), with_buffers(True)])
    with pytest.raises(StructureError, match=r"^stack: item 1: the Particle leaves its buffers out of arithmetic "
                                             r"\(particle\(\.\.\., buffers=False\)\) but the swarm takes them "
                                             r"\(buffers=True\); make them alike$"):
        Swarm.stack([with_buffers(True), with_buffers(False)])
    first = nytorch.particle(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))
    with pytest.raises(StructureError, match=r"^stack: item 1: expected the root module \(Sequential\) in train mode"):
        Swarm.stack([first, nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).eval()])
