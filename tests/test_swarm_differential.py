# mypy: disable-error-code="union-attr, index, operator, arg-type, assignment"
"""Differential tests: every ``Swarm`` operation against the same thing done member by member.

Random swarms (1-6 members, several model shapes: Linear chains, Conv + BatchNorm, Dropout,
Embedding + LayerNorm, a ``NytoModule`` with a non-operational parameter; mixed ``requires_grad``;
``buffers=True/False``) are drawn by hypothesis; each result is compared with a reference computed
with plain torch on the members' own ``state_dict``-like dicts (``named_parameters()`` then
``named_buffers()``), with modules deep-copied from the stacked items, never with ``Swarm`` itself.
"""
from __future__ import annotations

import copy
import operator
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import nytorch as nyto
from nytorch import Particle, StructureError, Swarm
from conftest import torch_assigns

Tensor = torch.Tensor
#: examples per property (raise with SWARM_DIFF_EXAMPLES=500 for a longer hunt)
EXAMPLES = int(os.environ.get("SWARM_DIFF_EXAMPLES", "12"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
MORE = settings(max_examples=3 * EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


# --------------------------------------------------------------------------------------
# Sample models and inputs
# --------------------------------------------------------------------------------------
class Gate(nyto.NytoModule):
    """A NytoModule with a BatchNorm and a parameter of its own (made non-operational in the cases)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.scale = nn.Parameter(torch.randn(4))
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.bn(self.fc1(x))) * self.scale)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))


def conv_bn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))


def drop() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.5), nn.Linear(6, 2))


def embed() -> nn.Module:
    return nn.Sequential(nn.Embedding(7, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def f64() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 2), nn.Sigmoid()).double()


class Dtypes(nn.Module):
    """float32, float64 and complex64 parameters, an integer parameter, float, integer and bool buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.w32 = nn.Parameter(torch.randn(3, 2))
        self.w64 = nn.Parameter(torch.randn(2, dtype=torch.float64))
        self.wc = nn.Parameter(torch.randn(2, dtype=torch.complex64))
        self.counts = nn.Parameter(torch.arange(3), requires_grad=False)
        self.register_buffer("stat", torch.randn(2))
        self.register_buffer("steps", torch.tensor(5))
        self.register_buffer("mask", torch.tensor([True, False]))

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.w32) * self.w64.float() + (self.wc * self.wc.conj()).real * self.mask + self.stat


#: name -> (factory, input of batch n)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], Tensor]]] = {
    "mlp": (mlp, lambda n: torch.randn(n, 3)),
    "conv_bn": (conv_bn, lambda n: torch.randn(n, 1, 4, 4)),
    "drop": (drop, lambda n: torch.randn(n, 3)),
    "embed": (embed, lambda n: torch.randint(0, 7, (n,))),
    "gate": (Gate, lambda n: torch.randn(n, 3)),
    "f64": (f64, lambda n: torch.randn(n, 3, dtype=torch.float64)),
    "dtypes": (Dtypes, lambda n: torch.randn(n, 3)),
}
NONOP = {"gate": ("scale", "fc1.bias")}  # candidates for ParamConfig(operational=False)


def floating(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def state(module: nn.Module) -> dict[str, Tensor]:
    """Plain torch: parameters then buffers, cloned and detached."""
    out = {name: p.detach().clone() for name, p in module.named_parameters()}
    out.update({name: b.detach().clone() for name, b in module.named_buffers()})
    return out


@dataclass
class Case:
    name: str
    items: list[nn.Module]  # the modules the swarm was stacked from (untouched copies)
    buffers: bool
    nonop: tuple[str, ...]
    grad_flags: dict[str, bool]  # item 0's requires_grad flags

    @property
    def size(self) -> int:
        return len(self.items)

    def arith(self) -> set[str]:
        """Names that take part in arithmetic: floating operational parameters, floating buffers if asked."""
        first = self.items[0]
        names = {n for n, p in first.named_parameters() if floating(p) and n not in self.nonop}
        if self.buffers:
            names |= {n for n, b in first.named_buffers() if floating(b)}
        return names

    def states(self) -> list[dict[str, Tensor]]:
        return [state(m) for m in self.items]

    def x(self, n: int = 5) -> Tensor:
        return MODELS[self.name][1](n)

    def swarm(self, *, via: str = "modules") -> Swarm:
        items = [copy.deepcopy(m) for m in self.items]
        if via == "particles":
            return Swarm.stack([nyto.particle(m, buffers=self.buffers) for m in items])
        return Swarm.stack(items, buffers=self.buffers)


def make_items(name: str, size: int, seed: int, nonop: tuple[str, ...], frozen: tuple[str, ...]) -> list[nn.Module]:
    torch.manual_seed(seed)
    items = []
    for i in range(size):
        m = MODELS[name][0]()
        with torch.no_grad():
            for _, b in m.named_buffers():
                if b.is_floating_point():
                    b.uniform_(0.5, 1.5)
                else:
                    b.fill_(i + 3)
        for n, p in m.named_parameters():
            if n in frozen:
                p.requires_grad_(False)
        items.append(m)
    if nonop:
        for n in nonop:
            items[0].set_param_config(operational=False, name=n)
    return items


@st.composite
def cases(draw: Any, names: tuple[str, ...] = tuple(MODELS), min_size: int = 1) -> Case:
    name = draw(st.sampled_from(names))
    size = draw(st.integers(min_size, 6))
    seed = draw(st.integers(0, 2**16))
    nonop = tuple(draw(st.sets(st.sampled_from(NONOP[name])))) if name in NONOP else ()
    param_names = [n for n, _ in MODELS[name][0]().named_parameters()]
    frozen = tuple(draw(st.sets(st.sampled_from(param_names), max_size=2)))
    items = make_items(name, size, seed, nonop, frozen)
    flags = {n: p.requires_grad for n, p in items[0].named_parameters()}
    return Case(name, items, draw(st.booleans()), nonop, flags)


def assert_state(got: dict[str, Tensor], want: dict[str, Tensor], *, exact: bool = True, what: str = "",
                 tol: Any = None) -> None:
    assert list(got) == list(want), what
    for key in want:
        g, w = got[key], want[key]
        assert g.dtype == w.dtype and g.shape == w.shape, \
            f"{what} {key}: {g.dtype}{tuple(g.shape)} vs {w.dtype}{tuple(w.shape)}"
        if exact:
            assert torch.equal(g, w) or (floating(g) and torch.equal(g.isnan(), w.isnan())
                                         and torch.equal(g.nan_to_num(), w.nan_to_num())), f"{what} {key}: {g} vs {w}"
        else:
            rtol, atol = tol if tol else (None, None)
            torch.testing.assert_close(g, w, equal_nan=True, rtol=rtol, atol=atol, msg=f"{what} {key}: {g} vs {w}")


def member_states(swarm: Swarm) -> list[dict[str, Tensor]]:
    """Each member rebuilt as a plain module (``swarm[i].module()``), read with plain torch."""
    return [state(swarm[i].module()) for i in range(len(swarm))]


def assert_members(swarm: Swarm, want: list[dict[str, Tensor]], *, exact: bool = True, what: str = "") -> None:
    assert len(swarm) == len(want), what
    got = member_states(swarm)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_state(g, w, exact=exact, what=f"{what} member {i}")
    # the stacked views say the same as the rebuilt members
    for key, stacked in {**swarm.params, **swarm.buffers}.items():
        for i in range(len(swarm)):
            assert torch.equal(stacked[i], got[i][key]) or torch.equal(stacked[i].isnan(), got[i][key].isnan())


def ref_map(fn: Callable[..., Tensor], a: dict[str, Tensor], arith: set[str], *others: Any) -> dict[str, Tensor]:
    """``fn`` on every arithmetic leaf of ``a`` (with the same leaf of dict operands), the rest copied."""
    return {k: (fn(v, *(o[k] if isinstance(o, dict) else o for o in others)) if k in arith else v.clone())
            for k, v in a.items()}


# --------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------
@SETTINGS
@given(case=cases(), via=st.sampled_from(["modules", "particles"]))
def test_stack_members_are_the_items(case: Case, via: str) -> None:
    swarm = case.swarm(via=via)
    assert_members(swarm, case.states())
    assert len(swarm) == case.size and swarm.model_class is type(case.items[0])
    assert list(swarm.params) == [n for n, _ in case.items[0].named_parameters()] + (
        [n for n, _ in case.items[0].named_buffers()] if case.buffers else [])
    assert list(swarm.buffers) == [n for n, _ in case.items[0].named_buffers()]
    # iteration and unstack give the same members, as views
    for i, (a, b) in enumerate(zip(swarm, swarm.unstack())):
        assert isinstance(a, Particle) and isinstance(b, Particle)
        assert_state(state(a.module()), case.states()[i])
        assert_state(state(b.module()), case.states()[i])
    # a copy: the items are not the swarm's storage
    before = case.states()
    swarm += 1.0
    for item, want in zip(case.items, before):
        assert_state(state(item), want)


@SETTINGS
@given(case=cases())
def test_from_params_and_cat(case: Case) -> None:
    swarm = case.swarm()
    states = case.states()
    stacked = {k: torch.stack([s[k] for s in states]) for k in states[0]}
    # from_params with every name, and with only the parameters (buffers come from ``like``)
    full = Swarm.from_params(case.items[0], stacked) if not case.buffers else \
        Swarm.from_params(nyto.particle(copy.deepcopy(case.items[0]), buffers=True), stacked)
    assert_members(full, states)
    param_names = [n for n, _ in case.items[0].named_parameters()]
    if not case.buffers:
        partial = Swarm.from_params(case.items[2 % case.size], {k: stacked[k] for k in param_names})
        like = state(case.items[2 % case.size])
        assert_members(partial, [{**like, **{k: s[k] for k in param_names}} for s in states])
    # from_params with a Swarm as like: missing buffers come from like's members (its member 0 for
    # another size)
    assert_members(Swarm.from_params(swarm, {k: stacked[k] for k in swarm.params}), states)
    assert_members(Swarm.from_params(swarm, {k: stacked[k][:1].expand(7, *stacked[k].shape[1:])
                                             for k in swarm.params}),
                   [{**states[0], **{k: states[0][k] for k in swarm.params}}] * 7)
    # cat joins member-wise, in order
    cut = case.size // 2
    joined = Swarm.cat([swarm[:cut], swarm[cut:], swarm[:1]])
    assert_members(joined, states[:cut] + states[cut:] + states[:1])


def test_from_params_errors() -> None:
    net = nn.Linear(2, 1)
    with pytest.raises(StructureError, match=r"from_params: parameter 'bias' is missing from params"):
        Swarm.from_params(net, {"weight": torch.zeros(3, 1, 2)})
    with pytest.raises(StructureError, match=r"'bias' has 2 and 'weight' has 3"):
        Swarm.from_params(net, {"weight": torch.zeros(3, 1, 2), "bias": torch.zeros(2, 1)})
    with pytest.raises(StructureError, match=r"has no parameter or buffer named 'extra'"):
        Swarm.from_params(net, {"weight": torch.zeros(3, 1, 2), "bias": torch.zeros(3, 1), "extra": torch.zeros(3)})
    with pytest.raises(StructureError, match=r"expected 'weight' of shape \(P, 1, 2\) float32"):
        Swarm.from_params(net, {"weight": torch.zeros(3, 2, 1), "bias": torch.zeros(3, 1)})


# --------------------------------------------------------------------------------------
# Indexing
# --------------------------------------------------------------------------------------
def index_keys(size: int) -> st.SearchStrategy[tuple[Any, list[int]]]:
    """(key, the member indices it selects), for every index kind a swarm takes."""
    ints = st.integers(-size, size - 1)
    lists = st.lists(ints, max_size=8)
    masks = st.lists(st.booleans(), min_size=size, max_size=size)
    starts = st.one_of(st.none(), st.integers(-size - 2, size + 2))
    slices = st.builds(slice, starts, starts, st.one_of(st.none(), st.integers(1, 3)))
    ranges = st.builds(lambda a, b, c: range(a, b, c), st.integers(0, size - 1), st.integers(-1, size),
                       st.sampled_from([-2, -1, 1, 2]))

    def picked(key: Any) -> tuple[Any, list[int]]:
        members = list(range(size))
        if isinstance(key, slice):
            return key, members[key]
        if isinstance(key, range):
            return key, [members[i] for i in key]
        return key, [i % size for i in key]

    def as_mask(bits: list[bool]) -> tuple[Any, list[int]]:
        return bits, [i for i, b in enumerate(bits) if b]

    kinds = [
        ints.map(lambda i: (i, i % size)),
        ints.map(lambda i: (torch.tensor(i), i % size)),
        ints.map(lambda i: (np.int64(i), i % size)),
        slices.map(picked), ranges.map(picked), lists.map(picked),
        lists.map(lambda xs: (torch.tensor(xs, dtype=torch.long), [i % size for i in xs])),
        lists.map(lambda xs: (torch.tensor(xs, dtype=torch.int32), [i % size for i in xs])),
        lists.map(lambda xs: (np.array(xs, dtype=np.int64), [i % size for i in xs])),
        masks.map(as_mask),
        masks.map(lambda bits: (torch.tensor(bits), as_mask(bits)[1])),
        masks.map(lambda bits: (np.array(bits), as_mask(bits)[1])),
    ]
    return st.one_of(*kinds)


@MORE
@given(data=st.data(), case=cases(("dtypes", "mlp", "gate", "conv_bn")))
def test_getitem_every_index_kind(data: Any, case: Case) -> None:
    swarm = case.swarm()
    states = case.states()
    key, picked = data.draw(index_keys(case.size))
    got = swarm[key]
    if isinstance(picked, int):
        assert isinstance(got, Particle)
        assert_state(state(got.module()), states[picked])
        assert got.model_class is type(case.items[0])
    else:
        assert isinstance(got, Swarm)
        assert_members(got, [states[i] for i in picked])
        # a selection is a swarm like any other: arithmetic on it is the members' arithmetic
        arith = case.arith()
        assert_members(got * 2.0, [ref_map(lambda v: v * 2.0, states[i], arith) for i in picked])


@SETTINGS
@given(case=cases(("mlp", "gate")))
def test_views_and_copies(case: Case) -> None:
    """``swarm[i]`` and ``swarm[a:b]`` view the swarm (writes reach it); lists, tensors and masks copy."""
    swarm = case.swarm()
    states = case.states()
    arith = case.arith()
    member = swarm[-1]
    member += 1.0
    view = swarm[::2]
    view *= 3.0
    copied = swarm[[0]]
    copied -= 100.0
    want = [dict(s) for s in states]
    want[-1] = ref_map(lambda v: v + 1.0, want[-1], arith)
    for i in range(0, case.size, 2):
        want[i] = ref_map(lambda v: v * 3.0, want[i], arith)
    assert_members(swarm, want)


@pytest.mark.parametrize("key, error, message", [
    (4, IndexError, r"Swarm: index 4 is out of range for a swarm of 4 members"),
    (-5, IndexError, r"Swarm: index -5 is out of range for a swarm of 4 members"),
    ([0, 4], IndexError, r"index 4 is out of range"),
    (torch.tensor([-5, 0]), IndexError, r"index -5 is out of range"),
    (np.array([0, 7]), IndexError, r"index 7 is out of range"),
    (torch.tensor(4), IndexError, r"index 4 is out of range"),
    ([True, False], IndexError, r"a boolean mask must have shape \(4,\), got \(2,\)"),
    (torch.tensor([True] * 5), IndexError, r"a boolean mask must have shape \(4,\), got \(5,\)"),
    (np.array([True] * 3), IndexError, r"a boolean mask must have shape \(4,\), got \(3,\)"),
    ([True, 1, 0, 0], TypeError, r"a list index mixes booleans with integers"),
    (slice(None, None, -1), ValueError, r"expected a slice with a positive step"),
    (torch.tensor([0.0]), IndexError, r"got a float32 tensor of shape \(1,\)"),
    (1.0, TypeError, r"got float"),
    ("0", TypeError, r"got str"),
    ((0, 1), TypeError, r"got tuple"),
])
def test_index_errors(key: Any, error: type, message: str) -> None:
    swarm = Swarm.stack([nn.Linear(2, 1) for _ in range(4)])
    before = {k: v.clone() for k, v in swarm.params.items()}
    with pytest.raises(error, match=message):
        swarm[key]
    with pytest.raises(error, match=message):
        swarm[key] = 0.0
    for k, v in swarm.params.items():
        assert torch.equal(v, before[k])


@SETTINGS
@given(data=st.data(), case=cases(("dtypes", "mlp", "gate", "conv_bn"), min_size=2))
def test_setitem_every_index_kind(data: Any, case: Case) -> None:
    states = case.states()
    arith = case.arith()
    key, picked = data.draw(index_keys(case.size))
    rows = [picked] if isinstance(picked, int) else picked
    kind = data.draw(st.sampled_from(["number", "particle", "model", "swarm", "swarm1"]))
    if kind == "swarm" and not rows:
        kind = "swarm1"
    swarm = case.swarm()
    donor = make_items(case.name, 1, 99, (), ())[0]
    donors = [make_items(case.name, 1, 100 + j, (), ())[0] for j in range(len(rows))]
    want = [dict(s) for s in states]
    if kind == "number":
        value: Any = 0.25
        new = [ref_map(lambda v: torch.full_like(v, 0.25), states[i], arith) for i in rows]
    elif kind == "particle":
        value = nyto.particle(copy.deepcopy(donor), buffers=case.buffers)
        new = [state(donor)] * len(rows)
    elif kind == "model":
        value = copy.deepcopy(donor)
        new = [state(donor)] * len(rows)
    elif kind == "swarm1":
        value = Swarm.stack([copy.deepcopy(donor)], buffers=case.buffers)
        new = [state(donor)] * len(rows)
    else:
        value = Swarm.stack([copy.deepcopy(d) for d in donors], buffers=case.buffers)
        new = [state(d) for d in donors]
    for i, row in zip(rows, new):  # repeated indices: the last write wins, as for tensors
        want[i] = row
    if kind == "swarm" and len(set(rows)) != len(rows):
        # torch leaves the order of writes to repeated indices unspecified: only check the others
        swarm[key] = value
        got = member_states(swarm)
        for i in range(case.size):
            if i not in rows:
                assert_state(got[i], states[i])
        return
    swarm[key] = value
    assert_members(swarm, want)


@SETTINGS
@given(case=cases(("mlp", "gate"), min_size=2))
def test_failed_setitem_changes_nothing(case: Case) -> None:
    swarm = case.swarm()
    states = case.states()
    other_size = Swarm.stack([copy.deepcopy(case.items[0])] * (case.size + 1), buffers=case.buffers)
    with pytest.raises(StructureError,
                       match=r"Swarm.__setitem__: expected a swarm of 2 members \(or 1\) to assign, got"):
        swarm[[0, 1]] = other_size
    with pytest.raises(TypeError,
                       match=r"Swarm.__setitem__: expected a .*, a Particle or a Swarm of one, or a number, got str"):
        swarm[0] = "x"
    with pytest.raises(TypeError, match=r"expected a .* \(or a Particle or Swarm of one\), got a Linear"):
        swarm[:] = nn.Linear(3, 4)
    assert_members(swarm, states)


# --------------------------------------------------------------------------------------
# Arithmetic
# --------------------------------------------------------------------------------------
OPS: dict[str, Callable[[Any, Any], Any]] = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "truediv": operator.truediv, "pow": operator.pow,
}
IOPS: dict[str, Callable[[Any, Any], Any]] = {
    "add": operator.iadd, "sub": operator.isub, "mul": operator.imul, "truediv": operator.itruediv,
    "pow": operator.ipow,
}
OPERANDS = ["int", "float", "tensor0", "weights", "particle", "model", "swarm", "swarm1"]


def operand(case: Case, kind: str, draw: Any) -> tuple[Any, list[Any]]:
    """(the operand given to the swarm, what member ``i`` combines with: a number, 0-dim tensor or state)."""
    size = case.size
    if kind == "int":
        n = draw(st.integers(-3, 3))
        return n, [n] * size
    if kind == "float":
        x = draw(st.floats(-2, 2, allow_nan=False).filter(lambda v: abs(v) > 1e-3))
        return x, [x] * size
    if kind == "tensor0":
        t = torch.tensor(draw(st.floats(0.5, 2)), dtype=draw(st.sampled_from([torch.float32, torch.float64])))
        return t, [t] * size
    if kind == "weights":
        w = torch.rand(size, dtype=draw(st.sampled_from([torch.float32, torch.float64]))) + 0.5
        return w, [w[i] for i in range(size)]
    other = make_items(case.name, size, draw(st.integers(0, 1000)), (), ())
    for m in other:
        with torch.no_grad():
            for p in m.parameters():
                if p.is_floating_point():
                    p.abs_().add_(0.5)  # positive bases for pow
    states = [state(m) for m in other]
    if kind == "particle":
        return nyto.particle(copy.deepcopy(other[0]), buffers=case.buffers), [states[0]] * size
    if kind == "model":
        return copy.deepcopy(other[0]), [states[0]] * size
    if kind == "swarm1":
        return Swarm.stack([copy.deepcopy(other[0])], buffers=case.buffers), [states[0]] * size
    return Swarm.stack([copy.deepcopy(m) for m in other], buffers=case.buffers), states


def positive_case(case: Case) -> Case:
    for m in case.items:
        with torch.no_grad():
            for _, t in list(m.named_parameters()) + list(m.named_buffers()):
                if t.is_floating_point():
                    t.abs_().add_(0.5)
    return case


@MORE
@given(data=st.data(), case=cases(("dtypes", "mlp", "gate", "conv_bn", "f64", "embed")),
       op=st.sampled_from(list(OPS)), kind=st.sampled_from(OPERANDS))
def test_binary_ops_match_member_loop(data: Any, case: Case, op: str, kind: str) -> None:
    case = positive_case(case)
    swarm = case.swarm()
    states, arith = case.states(), case.arith()
    value, per_member = operand(case, kind, data.draw)
    fn = OPS[op]
    want = [ref_map(fn, s, arith, v) for s, v in zip(states, per_member)]
    # README: packed ``**``, complex ``*`` and ``/`` may differ from per-tensor torch in the last bit (tails)
    exact = op != "pow" and not (case.name == "dtypes" and op in ("mul", "truediv"))
    assert_members(fn(swarm, value), want, exact=exact, what=f"swarm {op} {kind}")
    # reflected forms: number/tensor/Particle/model OP swarm; each member's carried leaves stay its own
    if kind in ("int", "float", "tensor0", "weights", "particle"):
        rwant = [ref_map(lambda a, b: fn(b, a), s, arith, v) for s, v in zip(states, per_member)]
        assert_members(fn(value, swarm), rwant, exact=exact, what=f"{kind} {op} swarm")
    # in place: the same values, written into the same storage (views taken before see them)
    target = swarm.clone()
    before = target.params
    member = target[0]
    out = IOPS[op](target, value)
    assert out is target
    assert_members(target, want, exact=exact, what=f"swarm {op}= {kind}")
    for key, view in before.items():
        assert torch.equal(view, target.params[key]) or torch.equal(view.isnan(), target.params[key].isnan())
    assert_state(state(member.module()), member_states(target)[0])
    # the operand and the source swarm are unchanged
    assert_members(swarm, states)


@SETTINGS
@given(case=cases(("mlp", "gate", "conv_bn")), other_kind=st.sampled_from(["swarm", "weights"]))
def test_failed_inplace_changes_nothing(case: Case, other_kind: str) -> None:
    swarm = case.swarm()
    states = case.states()
    views = {k: (v, v._version) for k, v in swarm.params.items()}
    bad: list[tuple[Any, type, str]] = [
        ("x", TypeError, r"add: expected a number, a 0-dim tensor, a 1-D tensor of"),
        (torch.ones(case.size + 1), StructureError,
         rf"expected one weight per member \(a 1-D tensor of length {case.size}\)"),
        (torch.ones(case.size, 2), TypeError, r"1-D tensor of .* per-member weights, got a tensor of shape"),
        (1j, TypeError, r"add: the scalar 1j would turn parameter"),
        (torch.ones(case.size, dtype=torch.complex64), TypeError, r"complex weights would turn parameter"),
        (Swarm.stack([copy.deepcopy(case.items[0])] * (case.size + 1), buffers=case.buffers), StructureError,
         rf"add: cannot broadcast a swarm of {case.size + 1} members into a swarm of {case.size} members"),
        (nn.Linear(3, 4), TypeError, r"add: expected a .* \(or a Particle or Swarm of one\), got a Linear"),
        (nyto.particle(copy.deepcopy(case.items[0]), buffers=not case.buffers), StructureError, r"add: "),
    ]
    for value, error, message in bad:
        if value is bad[-1][0] and not any(b.is_floating_point() for b in case.items[0].buffers()):
            continue  # buffers=True/False agree for a model without floating buffers
        with pytest.raises(error, match=message):
            swarm += value
        with pytest.raises(error, match=message):
            swarm.add_(value, alpha=2)
        with pytest.raises(error, match=message.replace("add", "lerp_")):
            swarm.lerp_(value, 0.5)
    with pytest.raises(StructureError, match=r"lerp_: expected one weight per member"):
        swarm.lerp_(swarm.clone(), torch.ones(case.size + 2))
    assert_members(swarm, states)
    for k, (v, version) in views.items():
        assert v._version == version, k


# --------------------------------------------------------------------------------------
# add(alpha), lerp, lerp_, clone, matmul, mean, norm
# --------------------------------------------------------------------------------------
@SETTINGS
@given(data=st.data(), case=cases(("dtypes", "mlp", "gate", "conv_bn", "embed")),
       kind=st.sampled_from(["float", "weights", "particle", "swarm", "swarm1", "model"]))
def test_add_alpha_and_lerp(data: Any, case: Case, kind: str) -> None:
    swarm = case.swarm()
    states, arith = case.states(), case.arith()
    end, per_member = operand(case, kind, data.draw)
    alpha = data.draw(st.sampled_from([2, -0.5, np.float32(0.25)]))
    want = [ref_map(lambda a, b: torch.add(a, b, alpha=float(alpha)), s, arith, v) for s, v in zip(states, per_member)]
    assert_members(swarm.add(end, alpha=alpha), want, what="add")
    clone = swarm.clone()
    assert clone.add_(end, alpha=alpha) is clone
    assert_members(clone, want, what="add_")
    if kind == "weights":
        return
    weight_kind = data.draw(st.sampled_from(["float", "tensor0", "weights"]))
    weight, weights = operand(case, weight_kind, data.draw)
    want = [ref_map(lambda a, b, w: torch.lerp(a, b.to(a.dtype) if isinstance(b, Tensor) else torch.full_like(a, b),
                                               w.to(a.dtype) if isinstance(w, Tensor) else w), s, arith, e, w)
            for s, e, w in zip(states, per_member, weights)]
    assert_members(swarm.lerp(end, weight), want, what="lerp")
    clone = swarm.clone()
    assert clone.lerp_(end, weight) is clone
    assert_members(clone, want, what="lerp_")
    assert_members(swarm, states)


@SETTINGS
@given(case=cases(("dtypes", "mlp", "gate", "conv_bn", "f64")), rows=st.integers(1, 3))
def test_matmul_mean_norm(case: Case, rows: int) -> None:
    swarm = case.swarm()
    states, arith = case.states(), case.arith()
    params = [n for n, _ in case.items[0].named_parameters()]
    names = list(swarm.params)  # what a member Particle holds
    dtype = states[0][params[0]].dtype
    w = torch.randn(case.size, dtype=dtype)

    def mix(weights: Tensor) -> dict[str, Tensor]:
        out = {}
        for k in names:
            if k in arith:
                out[k] = sum(weights[i] * states[i][k] for i in range(case.size))
            else:
                out[k] = states[0][k]
        return out
    got = w @ swarm
    assert isinstance(got, Particle)
    assert_state(dict(got.params), mix(w), exact=False, what="w @ swarm")
    matrix = torch.randn(rows, case.size, dtype=dtype)
    many = matrix @ swarm
    assert isinstance(many, Swarm) and len(many) == rows
    for q in range(rows):
        assert_state({k: many.params[k][q] for k in names}, mix(matrix[q]), exact=False, what=f"row {q}")
    mean = swarm.mean()
    want = {k: (torch.stack([s[k] for s in states]).mean(0) if k in arith else states[0][k]) for k in names}
    assert_state(dict(mean.params), want, exact=False, what="mean")
    norms = torch.stack([torch.sqrt(sum((s[k].abs().double() ** 2).sum() for k in arith)
                                    if arith else torch.tensor(0.0))
                         for s in states]).to(swarm.norm().dtype)
    torch.testing.assert_close(swarm.norm(), norms)


def test_matmul_errors() -> None:
    swarm = Swarm.stack([nn.Linear(2, 1) for _ in range(3)])
    with pytest.raises(StructureError, match=r"matmul: expected weights of shape \(3,\) or \(Q, 3\), got \(2,\)"):
        torch.ones(2) @ swarm
    with pytest.raises(StructureError, match=r"got \(2, 2, 3\)"):
        torch.ones(2, 2, 3) @ swarm


# --------------------------------------------------------------------------------------
# Modes, forward, randomness, chunks, gradients, dtype
# --------------------------------------------------------------------------------------
def loop_forward(case: Case, x: Tensor, training: bool,
                 per_member: bool = False) -> tuple[Tensor, list[dict[str, Tensor]]]:
    modules = [copy.deepcopy(m).train(training) for m in case.items]
    with torch.no_grad():
        outs = [m(x[i] if per_member else x) for i, m in enumerate(modules)]
    return torch.stack(outs), [state(m) for m in modules]


@SETTINGS
@given(case=cases(("dtypes", "mlp", "gate", "conv_bn", "embed", "f64", "drop")), training=st.booleans(),
       in_dims=st.sampled_from([None, 0]), chunk=st.sampled_from([None, 1, 2, 4]))
def test_forward_matches_loop(case: Case, training: bool, in_dims: Any, chunk: Any) -> None:
    if case.name == "drop":
        training = False  # random: see test_dropout_randomness
    swarm = case.swarm().train(training)
    assert swarm.training is training
    for i in range(case.size):  # the mode reaches every member's rebuilt module
        assert all(m.training is training for m in swarm[i].module().modules())
    x = torch.stack([case.x() for _ in range(case.size)]) if in_dims == 0 else case.x()
    want, after = loop_forward(case, x, training, per_member=in_dims == 0)
    with torch.no_grad():
        got = swarm(x, in_dims=in_dims, chunk_size=chunk)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # buffers a forward updates (BatchNorm statistics, counters) are kept per member, as in the loop
    assert_members(swarm, after, exact=False, what="after forward")


def test_train_eval_propagate_to_results() -> None:
    swarm = Swarm.stack([drop() for _ in range(3)])
    assert swarm.training
    evaluated = swarm.eval()
    assert evaluated is swarm and not swarm.training
    for result in (swarm + 1, swarm[[0, 1]], swarm[1:], swarm.clone(), swarm.to(torch.float64),
                   Swarm.cat([swarm, swarm])):
        assert result.training is False
        assert all(not m.training for m in result[0].module().modules())
    assert all(not m.training for m in swarm.mean().module().modules())
    trained = (swarm * 2).train()
    assert trained.training and not swarm.training  # other swarms are unaffected


def test_dropout_randomness_against_loop() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.5))
    swarm = Swarm.stack([copy.deepcopy(net) for _ in range(4)])  # identical members: only masks differ
    x = torch.randn(40, 3)
    with torch.no_grad():
        hidden = net[0](x)
        for chunk in (None, 1, 3):
            different = swarm(x, randomness="different", chunk_size=chunk)
            same = swarm(x, randomness="same", chunk_size=chunk)
            # each member's output is what a loop's Dropout gives: every value dropped (0) or scaled by 2
            for out in (different, same):
                for i in range(4):
                    assert bool(((out[i] == 0) | torch.isclose(out[i], 2 * hidden)).all()), (chunk, i)
                    assert 0 < int((out[i] == 0).sum()) < out[i].numel()
            # "different": independent masks per member, as in a loop; "same": one mask for all
            assert not any(torch.equal(different[0], different[i]) for i in range(1, 4)), chunk
            if chunk is None:
                assert all(torch.equal(same[0], same[i]) for i in range(1, 4))
        # eval mode: every member equals the loop, whatever the randomness
        swarm.eval()
        want = copy.deepcopy(net).eval()(x)
        for randomness in ("different", "same", "error"):
            got = swarm(x, randomness=randomness)
            for i in range(4):
                torch.testing.assert_close(got[i], want)
    with pytest.raises(RuntimeError, match=r"randomness"):
        swarm.train()(x, randomness="error")
    with pytest.raises(ValueError, match=r"expected randomness 'different', 'same' or 'error', got 'other'"):
        swarm(x, randomness="other")


@SETTINGS
@given(case=cases(("dtypes", "mlp", "gate", "conv_bn", "embed", "f64")), training=st.booleans(),
       chunk=st.sampled_from([None, 1, 3]))
def test_grad_and_value_matches_autograd_loop(case: Case, training: bool, chunk: Any) -> None:
    swarm = case.swarm().train(training)
    x = case.x(6)
    y = torch.randn(6, 2, dtype=torch.float64 if case.name == "f64" else torch.float32)

    def loss_fn(member: Any, x: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(member(x), y)
    grads, losses = swarm.grad_and_value(loss_fn, x, y, chunk_size=chunk)
    flags = case.grad_flags
    want_grads, want_losses, afters = [], [], []
    for item in case.items:
        module = copy.deepcopy(item).train(training)
        named = dict(module.named_parameters())
        wanted = [n for n in named if flags[n] and floating(named[n]) and n not in case.nonop]
        for n, p in named.items():
            p.requires_grad_(n in wanted)
        loss = F.mse_loss(module(x), y)
        got = torch.autograd.grad(loss, [named[n] for n in wanted]) if wanted else []
        g = dict(zip(wanted, got))
        full = {n: g.get(n, torch.zeros_like(p)).detach() for n, p in named.items()}
        if case.buffers:
            full.update({n: torch.zeros_like(b) for n, b in module.named_buffers()})
        want_grads.append(full)
        want_losses.append(loss.detach())
        afters.append(state(module))
    torch.testing.assert_close(losses, torch.stack(want_losses))
    for i in range(case.size):
        got_i = {k: v[i] for k, v in grads.params.items()}
        # float32 tolerances: the float64 parameter's gradient flows through float32 ops (``Dtypes``)
        assert_state(got_i, want_grads[i], exact=False, what=f"grad member {i}", tol=(1e-5, 1e-6))
    assert_members(swarm, afters, exact=False, what="buffers after grad_and_value")


@pytest.mark.filterwarnings("ignore:Casting complex values to real")  # as Module.to warns
@SETTINGS
@given(case=cases(("dtypes", "mlp", "gate", "conv_bn", "embed")),
       dtype=st.sampled_from([torch.float64, torch.float16, torch.bfloat16]))
def test_to_dtype_matches_module_to(case: Case, dtype: torch.dtype) -> None:
    swarm = case.swarm()
    moved = swarm.to(dtype)
    assert moved is not swarm
    want = [state(copy.deepcopy(m).to(dtype)) for m in case.items]
    assert_members(moved, want)
    assert moved.to(dtype) is moved  # nothing changes: self
    # arithmetic on the cast swarm is the members' arithmetic in that dtype
    arith = case.arith()
    assert_members(moved * 3, [ref_map(lambda v: v * 3, s, arith) for s in want])
    # requires_grad flags and configs travel: the same gradients are taken
    assert [p.requires_grad for p in moved.template.module().parameters()] == \
        [p.requires_grad for p in swarm.template.module().parameters()]


@pytest.mark.parametrize("mode", [1, 0, None, "no", np.bool_(True)])
def test_train_refuses_non_bool_whatever_the_current_mode(mode: Any) -> None:
    """As ``nn.Module.train``: a non-bool mode raises, also when the members are already in that mode."""
    module = drop()
    with pytest.raises(ValueError, match="training mode is expected to be boolean"):
        module.train(mode)
    for start in (True, False):
        swarm = Swarm.stack([drop() for _ in range(2)]).train(start)
        with pytest.raises(ValueError, match=rf"Swarm.train: expected a bool as mode \(as nn.Module.train\), "
                                             rf"got {'numpy.' if isinstance(mode, np.bool_) else ''}{type(mode).__name__}"):
            swarm.train(mode)
        assert swarm.training is start


# --------------------------------------------------------------------------------------
# Aliasing, broadcasting a one-member swarm, NumPy scalars, other configs
# --------------------------------------------------------------------------------------
@SETTINGS
@given(case=cases(("dtypes", "mlp", "gate", "conv_bn"), min_size=2), shift=st.integers(1, 3))
def test_overlapping_views_read_the_values_from_before(case: Case, shift: int) -> None:
    """``s[k:] += s[:-k]``, ``s[:-k] = s[k:]``, ``s.lerp_(s[::-1 as list], w)``: as if the operand were copied first."""
    shift = min(shift, case.size - 1)
    states, arith = case.states(), case.arith()
    size = case.size
    swarm = case.swarm()
    view = swarm[shift:]
    view += swarm[:-shift]
    want = [states[i] if i < shift else ref_map(operator.add, states[i], arith, states[i - shift]) for i in range(size)]
    assert_members(swarm, want, what="s[k:] += s[:-k]")
    swarm = case.swarm()
    swarm[:-shift] = swarm[shift:]
    assert_members(swarm, [states[i + shift] if i < size - shift else states[i] for i in range(size)],
                   what="s[:-k] = s[k:]")
    swarm = case.swarm()
    swarm[shift:] *= swarm[0]
    assert_members(swarm, [states[i] if i < shift else ref_map(operator.mul, states[i], arith, states[0])
                           for i in range(size)], what="s[k:] *= s[0]")
    swarm = case.swarm()
    back = list(range(size - 1, -1, -1))
    swarm.lerp_(swarm[back], 0.25)
    assert_members(swarm, [ref_map(lambda a, b: torch.lerp(a, b, 0.25), states[i], arith, states[size - 1 - i])
                           for i in range(size)], what="lerp_ toward reversed self")
    swarm = case.swarm()
    swarm += swarm
    assert_members(swarm, [ref_map(operator.add, s, arith, s) for s in states], what="s += s")


@SETTINGS
@given(case=cases(("dtypes", "mlp", "gate", "conv_bn")), op=st.sampled_from(list(OPS)))
def test_one_member_swarm_broadcasts_on_either_side(case: Case, op: str) -> None:
    case = positive_case(case)
    states, arith = case.states(), case.arith()
    swarm = case.swarm()
    one = swarm[[case.size - 1]]
    fn = OPS[op]
    exact = op != "pow"
    # the result takes its non-arithmetic leaves from the left operand, member 0 of a one-member swarm
    assert_members(fn(one, swarm), [ref_map(fn, states[-1], arith, s) for s in states], exact=exact, what="one op s")
    assert_members(fn(swarm, one), [ref_map(fn, s, arith, states[-1]) for s in states], exact=exact, what="s op one")
    if case.size > 1:
        with pytest.raises(StructureError, match=rf"cannot broadcast a swarm of {case.size} members into a swarm of 1"):
            IOPS[op](one, swarm)
        assert_members(one, [states[-1]])


@SETTINGS
@given(case=cases(("dtypes", "mlp", "gate", "f64")), scalar=st.sampled_from([np.float64(0.75), np.float32(1.5), np.int64(-2),
                                                                  np.int32(3)]), op=st.sampled_from(list(OPS)))
def test_numpy_scalars_are_numbers(case: Case, scalar: Any, op: str) -> None:
    case = positive_case(case)
    states, arith = case.states(), case.arith()
    swarm = case.swarm()
    fn = OPS[op]
    number = scalar.item()
    exact = op != "pow"
    assert_members(fn(swarm, scalar), [ref_map(lambda v: fn(v, number), s, arith) for s in states], exact=exact)
    assert_members(fn(scalar, swarm), [ref_map(lambda v: fn(number, v), s, arith) for s in states], exact=exact)
    with pytest.raises(TypeError, match=r"mul: expected a number, a 0-dim tensor, a 1-D tensor of .*got ndarray"):
        np.ones(case.size) * swarm


@SETTINGS
@given(case=cases(("gate",)), other_nonop=st.sets(st.sampled_from(NONOP["gate"])), op=st.sampled_from(["add", "mul"]))
def test_swarm_operand_with_other_configs(case: Case, other_nonop: set[str], op: str) -> None:
    """The left swarm's ParamConfigs decide what takes part; the other swarm's values are used as they are."""
    states, arith = case.states(), case.arith()
    swarm = case.swarm()
    others = make_items("gate", case.size, 7, tuple(other_nonop), ())
    other = Swarm.stack(others, buffers=case.buffers)
    fn = OPS[op]
    want = [ref_map(fn, s, arith, state(o)) for s, o in zip(states, others)]
    assert_members(fn(swarm, other), want)
    inplace = swarm.clone()
    IOPS[op](inplace, other)
    assert_members(inplace, want)
    joined = Swarm.cat([swarm, other])  # swarm 0's configs, every member's values
    assert_members(joined, states + [state(o) for o in others])
    assert_members(joined + 1.0, [ref_map(lambda v: v + 1.0, s, arith) for s in states + [state(o) for o in others]])


def test_cat_refuses_other_modes_and_settings() -> None:
    a = Swarm.stack([drop() for _ in range(2)])
    b = Swarm.stack([drop() for _ in range(2)]).eval()
    with pytest.raises(StructureError, match=r"cat: swarm 1: expected the root module \(Sequential\) in train mode"):
        Swarm.cat([a, b])
    c = Swarm.stack([nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.1), nn.Linear(6, 2))])
    with pytest.raises(StructureError, match=r"cat: swarm 1: expected submodule '1' \(Dropout\) attribute 'p' = 0.5"):
        Swarm.cat([a, c])
    with pytest.raises(TypeError, match=r"cat: expected a non-empty list of Swarms"):
        Swarm.cat([a, drop()])


@SETTINGS
@given(case=cases(("dtypes", "mlp", "gate", "conv_bn", "embed")), chunk=st.sampled_from([None, 2]))
def test_grad_and_value_per_member_inputs(case: Case, chunk: Any) -> None:
    """``in_dims=0``: member ``i`` gets ``x[i]``, ``y[i]``; gradients as ``torch.autograd.grad`` in a loop."""
    swarm = case.swarm().eval()
    x = torch.stack([case.x(4) for _ in range(case.size)])
    y = torch.randn(case.size, 4, 2)

    def loss_fn(member: Any, x: Tensor, y: Tensor, *, scale: float) -> Tensor:
        return scale * (member(x) - y).pow(2).mean()
    grads, losses = swarm.grad_and_value(loss_fn, x, y, in_dims=0, chunk_size=chunk, scale=3.0)
    for i, item in enumerate(case.items):
        module = copy.deepcopy(item).eval()
        named = dict(module.named_parameters())
        wanted = [n for n in named if case.grad_flags[n] and n not in case.nonop]
        loss = loss_fn(module, x[i], y[i], scale=3.0)
        got = dict(zip(wanted, torch.autograd.grad(loss, [named[n] for n in wanted]))) if wanted else {}
        torch.testing.assert_close(losses[i], loss.detach())
        for n, p in named.items():
            torch.testing.assert_close(grads.params[n][i], got.get(n, torch.zeros_like(p)), rtol=1e-5, atol=1e-6,
                                       msg=f"{n} member {i}")


@pytest.mark.filterwarnings("ignore:Casting complex values to real")  # as Module.to warns
@SETTINGS
@given(case=cases(("dtypes", "mlp", "gate", "conv_bn", "embed")))
def test_cast_swarm_runs_like_cast_members(case: Case) -> None:
    swarm = case.swarm().eval().to(torch.float64)
    x = case.x()
    x = x if not x.is_floating_point() else x.double()
    with torch.no_grad():
        want = torch.stack([copy.deepcopy(m).to(torch.float64).eval()(x) for m in case.items])
        torch.testing.assert_close(swarm(x), want)


# --------------------------------------------------------------------------------------
# Numbers torch refuses for one dtype group only: nothing is written
# --------------------------------------------------------------------------------------
class TwoDtypes(nn.Module):
    """A float64 parameter registered before a float32 one, then a float16 one: three dtype groups."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(3, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(2))
        self.h = nn.Parameter(torch.randn(2, dtype=torch.float16))


@pytest.mark.parametrize("number, refused", [(1e10, "'h' (float16)"), (1e39, "'b' (float32)")])
@pytest.mark.parametrize("action", ["add_", "add_ weights", "setitem int", "setitem mask", "setitem all"])
def test_number_refused_for_one_group_changes_nothing(number: float, refused: str, action: str) -> None:
    """torch refuses an ``alpha`` (float16: beyond 65504) or an assigned value (float32: beyond its range)
    only on the tensor whose dtype cannot hold it: the swarm refuses before writing any group."""
    torch.manual_seed(0)
    items = [TwoDtypes() for _ in range(3)]
    swarm = Swarm.stack(items)
    states = [state(m) for m in items]
    versions = {k: v._version for k, v in swarm.params.items()}
    if action.startswith("setitem") and all(torch_assigns(v, 0, number) for v in swarm.params.values()):
        swarm[0] = number  # torch 2.13 takes 1e10 as inf in a float16 assignment: no refusal, as torch
        assert torch.isinf(swarm.params["h"][0]).all()
        assert torch.equal(swarm.params["a"][0], torch.full((3,), 1e10, dtype=torch.float64))
        return
    # the loop refuses too, for the same tensor (so the swarm is right to raise)
    loop = state(items[0])
    with pytest.raises(RuntimeError, match="value cannot be converted"):
        for key in ("a", "b", "h"):
            if action.startswith("add_"):
                loop[key].add_(1.0, alpha=number)
            else:
                loop[key][...] = number  # swarm[i] = number assigns each member's whole tensor
    fn = "add_" if action.startswith("add_") else "Swarm.__setitem__"
    with pytest.raises(RuntimeError, match=re.escape(f"{fn}: torch cannot apply the number {number!r} to parameter "
                                                     f"{refused}: value cannot be converted") + ".*nothing was changed"):
        if action == "add_":
            swarm.add_(1.0, alpha=number)
        elif action == "add_ weights":
            swarm.add_(torch.ones(3), alpha=number)
        elif action == "setitem int":
            swarm[-1] = number
        elif action == "setitem mask":
            swarm[[True, False, True]] = number
        else:
            swarm[:] = number
    assert_members(swarm, states)
    assert {k: v._version for k, v in swarm.params.items()} == versions


@SETTINGS
@given(case=cases(("dtypes", "mlp", "gate", "embed")))
def test_params_with_torch_func_vmap_match_members(case: Case) -> None:
    """README: ``swarm.params`` are ``[P, ...]`` views usable directly with ``torch.func``."""
    import nytorch.functional as nf

    swarm = case.swarm().eval()
    x = case.x()
    model = copy.deepcopy(case.items[0]).eval()
    buffers = swarm.buffers
    names = [n for n, _ in model.named_parameters()]
    params = {n: swarm.params[n] for n in names}

    def run(p: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
        return nf.call(model, {**p, **b}, x)
    with torch.no_grad():
        got = torch.func.vmap(run)(params, buffers)
        want = torch.stack([copy.deepcopy(m).eval()(x) for m in case.items])
    torch.testing.assert_close(got, want)


@SETTINGS
@given(data=st.data(), case=cases(("dtypes", "gate", "conv_bn"), min_size=2), steps=st.integers(3, 8))
def test_random_programs_match_member_lists(data: Any, case: Case, steps: int) -> None:
    """A random sequence of in-place updates, selections, joins and assignments on a swarm, replayed on a
    Python list of per-member state dicts with plain torch."""
    swarm = case.swarm()
    states, arith = case.states(), case.arith()
    for _ in range(steps):
        size = len(states)
        action = data.draw(st.sampled_from(["iop", "view_iop", "select", "cat", "set", "lerp_", "mode"]))
        if action == "iop":
            op = data.draw(st.sampled_from(["add", "sub", "mul"]))
            w = torch.rand(size) + 0.5
            IOPS[op](swarm, w)
            states = [ref_map(OPS[op], s, arith, w[i]) for i, s in enumerate(states)]
        elif action == "view_iop":
            start = data.draw(st.integers(0, size - 1))
            step = data.draw(st.integers(1, 2))
            view = swarm[start::step]
            view *= 1.5
            for i in range(start, size, step):
                states[i] = ref_map(lambda v: v * 1.5, states[i], arith)
        elif action == "select":
            picked = data.draw(st.lists(st.integers(-size, size - 1), min_size=1, max_size=6))
            swarm = swarm[torch.tensor(picked)]
            states = [states[i % size] for i in picked]
        elif action == "cat":
            swarm = Swarm.cat([swarm, swarm[-1:]])
            states = states + states[-1:]
        elif action == "set":
            i, j = data.draw(st.integers(0, size - 1)), data.draw(st.integers(0, size - 1))
            swarm[i] = swarm[j]
            states[i] = states[j]
        elif action == "lerp_":
            end = states[0]
            swarm.lerp_(swarm[0], 0.5)
            states = [ref_map(lambda a, b: torch.lerp(a, b, 0.5), s, arith, end) for s in states]
        else:
            swarm.train(data.draw(st.booleans()))
        assert_members(swarm, states, exact=False, what=action)


@SETTINGS
@given(case=cases(("conv_bn", "gate"), min_size=2), start=st.integers(0, 2), step=st.integers(1, 2),
       grad=st.booleans())
def test_forward_of_a_slice_updates_those_members(case: Case, start: int, step: int, grad: bool) -> None:
    """``swarm[a::k]`` views the swarm: its forward in train mode updates those members' BatchNorm
    statistics in the parent swarm, as a loop over those members' modules updates theirs."""
    swarm = case.swarm()
    x = case.x(6)
    loop = [copy.deepcopy(m) for m in case.items]
    picked = list(range(case.size))[start::step]
    with torch.no_grad():
        want = [loop[i](x) for i in picked]
    if grad:
        swarm[start::step].grad_and_value(lambda member, x: member(x).pow(2).mean(), x)
    else:
        with torch.no_grad():
            got = swarm[start::step](x)
        if picked:
            torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-6)
    assert_members(swarm, [state(m) for m in loop], exact=False)


@SETTINGS
@given(case=cases(("mlp", "conv_bn")), dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32,
                                                              torch.float64]),
       op=st.sampled_from(["add", "sub", "mul", "truediv"]), reflected=st.booleans())
def test_low_precision_weights_within_one_rounding_of_the_loop(case: Case, dtype: torch.dtype, op: str,
                                                               reflected: bool) -> None:
    """README: per-member weights are exact against a loop in float32 / float64 and within one rounding
    step of it in float16 / bfloat16 (the loop multiplies by the float32 weight, the swarm by its cast)."""
    swarm = case.swarm().to(dtype)
    states = [state(copy.deepcopy(m).to(dtype)) for m in case.items]
    arith = case.arith()
    w = torch.rand(case.size) + 0.5  # float32 weights
    fn = OPS[op]
    got = member_states(fn(w, swarm) if reflected else fn(swarm, w))
    for i, s in enumerate(states):
        want = ref_map(lambda v: fn(w[i], v) if reflected else fn(v, w[i]), s, arith)
        for key in want:
            g, e = got[i][key], want[key]
            if dtype in (torch.float32, torch.float64) or key not in arith:
                assert torch.equal(g, e), (key, i)
            else:  # at most one step apart: g lies between e's neighbours
                up = torch.nextafter(e, e.new_tensor(float("inf")))
                down = torch.nextafter(e, e.new_tensor(float("-inf")))
                assert bool(((g >= down) & (g <= up)).all()), (key, i, (g - e).abs().max())


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.norm = nn.LayerNorm(2)

    def forward(self, x: Tensor, y: Tensor, *, scale: float = 1.0) -> Tensor:
        return self.norm(self.fc(x)) * scale + y


@SETTINGS
@given(size=st.integers(1, 5), dims=st.sampled_from([(0, None), (None, 0), (0, 0), (None, None)]),
       chunk=st.sampled_from([None, 1, 2]))
def test_in_dims_per_input_and_shared_kwargs(size: int, dims: tuple[Any, Any], chunk: Any) -> None:
    items = [TwoInputs() for _ in range(size)]
    swarm = Swarm.stack(copy.deepcopy(items))
    x = torch.randn(size, 4, 3) if dims[0] == 0 else torch.randn(4, 3)
    y = torch.randn(size, 4, 2) if dims[1] == 0 else torch.randn(4, 2)
    with torch.no_grad():
        got = swarm(x, y, in_dims=dims, chunk_size=chunk, scale=2.0)
        want = torch.stack([m(x[i] if dims[0] == 0 else x, y[i] if dims[1] == 0 else y, scale=2.0)
                            for i, m in enumerate(items)])
    # a LayerNorm of two features divides by their difference, which can magnify the batched kernel's
    # last-bit rounding (it sums in another order than the loop's) past float32's default tolerance
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match=r"in_dims has 1 entries but 2 positional arguments were given"):
        swarm(x, y, in_dims=(0,))
