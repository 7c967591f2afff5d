"""Hypothesis: laws a user relies on across the API, beyond ``test_algebra_laws``.

Swarm arithmetic is member-wise (out of place, reflected, in place, through member views),
selection agrees with torch indexing on the member dimension, ``w @ swarm`` and ``mean`` are
weighted sums of the members, merges reduce to the identity where they should
(``average([m] * k)``, ``task_arithmetic(base, [base])``, ``ema_`` with decay 1 and 0,
``slerp`` at 0 and 1, ``ravel``/``unravel``), and the functional, Particle and NytoModule
forms of one expression agree bit for bit where the README promises it (real ``+ - * /`` and
the pending-factor expressions such as ``0.9 * (a - b) + a``).  References are plain torch
loops over the members' tensors, never nytorch.
"""
# mypy: disable-error-code="operator, union-attr, index"
from __future__ import annotations

import operator
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from conftest import architectures, build, is_arith, named, named_buffers
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import nytorch as nyto
import nytorch.functional as nf
from nytorch import StructureError, Swarm, merge

Tensor = torch.Tensor

LAWS = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
seeds = st.integers(min_value=0, max_value=2**16)
sizes = st.integers(min_value=1, max_value=4)
dtypes = st.sampled_from([torch.float32, torch.float64])
EXACT_OPS = ["add", "sub", "mul", "truediv"]


def _same(x: Tensor, y: Tensor) -> bool:
    """Bit for bit up to NaN payloads: same dtype, shape, values, NaN where the other has NaN."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if not is_arith(x):
        return torch.equal(x, y)
    return bool(((x == y) | (x.isnan() & y.isnan())).all())


def _close(x: Tensor, y: Tensor, tol: float = 1e-9) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape and torch.allclose(x, y, rtol=tol, atol=tol, equal_nan=True)


def _assert_same(a: dict[str, Tensor], b: dict[str, Tensor], what: str = "") -> None:
    assert list(a) == list(b), (what, list(a), list(b))
    for key in a:
        assert _same(a[key], b[key]), (what, key, a[key], b[key])


def _assert_close(a: dict[str, Tensor], b: dict[str, Tensor], tol: float = 1e-9, what: str = "") -> None:
    assert list(a) == list(b), (what, list(a), list(b))
    for key in a:
        assert _close(a[key], b[key], tol), (what, key, a[key], b[key])


def _members(spec: tuple[Any, ...], seed: int, count: int, dtype: torch.dtype) -> list[nn.Module]:
    return [build(spec, seed + k, nyto_module=False).to(dtype) for k in range(count)]


def _torch_op(name: str) -> Callable[[Any, Any], Any]:
    return getattr(operator, name)


# --------------------------------------------------------------------------------------
# Swarm arithmetic is member-wise
# --------------------------------------------------------------------------------------
OPERANDS = ["swarm", "float", "int", "scalar_tensor", "numpy", "weights", "particle", "model"]


def _operand(kind: str, spec: tuple[Any, ...], seed: int, size: int, dtype: torch.dtype,
             value: float) -> tuple[Any, Callable[[int], Any], Callable[[int, str], Any]]:
    """(operand for the swarm, the matching operand for member i's Particle, the plain-torch operand of leaf k)."""
    if kind == "swarm":
        other = Swarm.stack(_members(spec, seed + 100, size, dtype))
        return other, lambda i: other[i], lambda i, k: other.params[k][i]
    if kind in ("particle", "model"):
        model = build(spec, seed + 200, nyto_module=False).to(dtype)
        particle = nyto.particle(model)
        return particle if kind == "particle" else model, lambda i: particle, lambda i, k: named(model)[k]
    if kind == "numpy":
        number = np.float32(value) if dtype == torch.float32 else np.float64(value)
        return number, lambda i: number, lambda i, k: number
    if kind == "float":
        return value, lambda i: value, lambda i, k: value
    if kind == "int":
        number = int(round(value)) or 2
        return number, lambda i: number, lambda i, k: number
    if kind == "scalar_tensor":
        scalar = torch.tensor(value, dtype=dtype)
        return scalar, lambda i: scalar, lambda i, k: scalar
    weights = torch.linspace(-2.0, 3.0, size, dtype=dtype) + value
    # member i of ``s op w`` is ``s[i] op w[i]`` with ``w[i]`` a 0-dim tensor, as torch broadcasts
    return weights, lambda i: weights[i], lambda i, k: weights[i]


values = st.floats(min_value=-3.0, max_value=3.0, allow_nan=False).filter(lambda v: abs(v) > 0.05)


@LAWS
@given(spec=architectures, seed=seeds, size=sizes, dtype=dtypes, op=st.sampled_from(EXACT_OPS),
       kind=st.sampled_from(OPERANDS), value=values, reflected=st.booleans())
def test_swarm_operators_are_member_wise(spec: tuple[Any, ...], seed: int, size: int, dtype: torch.dtype,
                                         op: str, kind: str, value: float, reflected: bool) -> None:
    members = _members(spec, seed, size, dtype)
    swarm = Swarm.stack(members)
    other, member_other, leaf_other = _operand(kind, spec, seed, size, dtype, value)
    fn = _torch_op(op)
    result = fn(other, swarm) if reflected else fn(swarm, other)
    assert isinstance(result, Swarm) and len(result) == size
    for i in range(size):
        particle = fn(member_other(i), swarm[i]) if reflected else fn(swarm[i], member_other(i))
        _assert_same(result[i].params, particle.params, f"member {i}")
        # against plain per-tensor torch on the member's own tensors
        reference = {}
        for k, mine in named(members[i]).items():
            if not is_arith(mine):
                reference[k] = mine
            else:
                theirs = leaf_other(i, k)
                reference[k] = fn(theirs, mine) if reflected else fn(mine, theirs)
        _assert_same(result[i].params, reference, f"member {i} vs torch")
        # buffers are carried from the left swarm operand (member i's own)
        left = other[i].module() if reflected and kind == "swarm" else members[i]
        _assert_same(named_buffers(result[i].module()), named_buffers(left), f"buffers {i}")


@LAWS
@given(spec=architectures, seed=seeds, size=sizes, dtype=dtypes, op=st.sampled_from(EXACT_OPS),
       kind=st.sampled_from(OPERANDS), value=values)
def test_swarm_in_place_operators_are_member_wise(spec: tuple[Any, ...], seed: int, size: int, dtype: torch.dtype,
                                                  op: str, kind: str, value: float) -> None:
    swarm = Swarm.stack(_members(spec, seed, size, dtype))
    before = swarm.clone()
    views = swarm.unstack()  # Particles viewing the members: they see the in-place update
    other, member_other, _ = _operand(kind, spec, seed, size, dtype, value)
    storage = [flat.data_ptr() for flat in swarm.params.values()]
    target = swarm
    target = getattr(operator, "i" + op)(target, other)
    assert target is swarm
    assert [flat.data_ptr() for flat in swarm.params.values()] == storage
    for i in range(size):
        expected = _torch_op(op)(before[i], member_other(i))
        _assert_same(swarm[i].params, expected.params, f"member {i}")
        _assert_same(views[i].params, expected.params, f"view {i}")


@LAWS
@given(spec=architectures, seed=seeds, size=st.integers(2, 4), dtype=dtypes, op=st.sampled_from(EXACT_OPS),
       value=values, pick=st.integers(-4, 3))
def test_in_place_on_one_member_changes_only_that_member(spec: tuple[Any, ...], seed: int, size: int,
                                                         dtype: torch.dtype, op: str, value: float,
                                                         pick: int) -> None:
    swarm = Swarm.stack(_members(spec, seed, size, dtype))
    before = swarm.clone()
    i = pick % size if pick >= 0 else max(pick, -size)
    member = swarm[i]
    getattr(operator, "i" + op)(member, value)  # a view: writes into the swarm
    for j in range(size):
        expected = _torch_op(op)(before[j], value) if j == i % size else before[j]
        _assert_same(swarm[j].params, expected.params, f"member {j}")
    swarm2 = before.clone()
    target = swarm2[i]
    target = getattr(operator, "i" + op)(target, value)
    swarm2[i] = target  # what ``swarm[i] += value`` does
    _assert_same(swarm2.params, swarm.params)


@LAWS
@given(spec=architectures, seed=seeds, size=sizes, dtype=dtypes, weight=st.floats(0.0, 1.0),
       per_member=st.booleans(), end_kind=st.sampled_from(["swarm", "particle"]))
def test_swarm_lerp_is_member_wise(spec: tuple[Any, ...], seed: int, size: int, dtype: torch.dtype,
                                   weight: float, per_member: bool, end_kind: str) -> None:
    swarm = Swarm.stack(_members(spec, seed, size, dtype))
    end, member_end, _ = _operand(end_kind, spec, seed, size, dtype, 1.0)
    weights = torch.linspace(0.0, 1.0, size, dtype=dtype) * weight if per_member else weight
    result = swarm.lerp(end, weights)
    in_place = swarm.clone().lerp_(end, weights)
    for i in range(size):
        w = weights[i] if per_member else weight
        reference = {k: torch.lerp(v, member_end(i).params[k], w) if is_arith(v) else v
                     for k, v in swarm[i].params.items()}
        _assert_same(result[i].params, reference, f"lerp member {i}")
        _assert_same(in_place[i].params, reference, f"lerp_ member {i}")


# --------------------------------------------------------------------------------------
# Construction, selection and torch indexing on the member dimension
# --------------------------------------------------------------------------------------
@LAWS
@given(spec=architectures, seed=seeds, size=sizes, more=sizes, dtype=dtypes)
def test_stack_unstack_cat_round_trips(spec: tuple[Any, ...], seed: int, size: int, more: int,
                                       dtype: torch.dtype) -> None:
    xs = _members(spec, seed, size, dtype)
    ys = _members(spec, seed + 50, more, dtype)
    a, b = Swarm.stack(xs), Swarm.stack(ys)
    for i, model in enumerate(xs):
        _assert_same(a[i].params, named(model), f"stack member {i}")
        _assert_same(named_buffers(a[i].module()), named_buffers(model), f"stack buffers {i}")
    again = Swarm.stack(a.unstack())
    _assert_same(again.params, a.params)
    _assert_same(again.buffers, a.buffers)
    joined = Swarm.cat([a, b])
    assert len(joined) == size + more
    _assert_same(joined[:size].params, a.params)
    _assert_same(joined[size:].params, b.params)
    _assert_same(joined[size:].buffers, b.buffers)
    for j, model in enumerate(ys):
        _assert_same(joined[size + j].params, named(model), f"cat member {j}")
    _assert_same(Swarm.stack([*xs, *ys]).params, joined.params)


def _keys(size: int) -> st.SearchStrategy[Any]:
    ints = st.integers(-size, size - 1)
    bounds = st.one_of(st.none(), st.integers(-size - 2, size + 2))
    return st.one_of(
        ints,
        st.builds(slice, bounds, bounds, st.one_of(st.none(), st.integers(1, 3))),
        st.lists(ints, max_size=6),
        st.lists(st.booleans(), min_size=size, max_size=size),
        st.lists(ints, max_size=6).map(lambda xs: torch.tensor(xs, dtype=torch.long)),
        st.lists(ints, max_size=6).map(lambda xs: torch.tensor(xs, dtype=torch.int32)),
        st.lists(st.booleans(), min_size=size, max_size=size).map(torch.tensor),
        ints.map(torch.tensor),
        st.lists(ints, min_size=1, max_size=6).map(np.array),
        st.lists(st.booleans(), min_size=size, max_size=size).map(np.array),
    )


@LAWS
@given(spec=architectures, seed=seeds, data=st.data())
def test_selection_agrees_with_torch_indexing(spec: tuple[Any, ...], seed: int, data: st.DataObject) -> None:
    size = data.draw(st.integers(1, 5), label="size")
    swarm = Swarm.stack(_members(spec, seed, size, torch.float32))
    key = data.draw(_keys(size), label="key")
    torch_key = torch.as_tensor(key) if isinstance(key, (list, np.ndarray)) else key
    if isinstance(key, list) and not key:
        torch_key = torch.zeros(0, dtype=torch.long)
    picked = swarm[key]
    for name, stacked in {**swarm.params, **swarm.buffers}.items():
        expected = stacked[torch_key]
        got = {**picked.params, **(picked.buffers if isinstance(picked, Swarm) else
                                   named_buffers(picked.module()))}[name]
        assert _same(got, expected), (name, key)
    if isinstance(picked, Swarm):
        assert len(picked) == swarm.params[next(iter(swarm.params))][torch_key].shape[0]


@pytest.mark.parametrize("key", [slice(None, None, -1), slice(3, 0, -2)])
def test_negative_step_slices_are_refused_as_documented(key: slice) -> None:
    swarm = Swarm.zeros(nn.Linear(2, 1), 4)
    with pytest.raises(ValueError, match="positive step"):
        swarm[key]


@pytest.mark.parametrize("key", [4, -5, [0, 4], torch.tensor([-5])])
def test_out_of_range_selection_raises_index_error_like_torch(key: Any) -> None:
    swarm = Swarm.zeros(nn.Linear(2, 1), 4)
    with pytest.raises(IndexError):
        swarm.params["weight"][key]
    with pytest.raises(IndexError, match="out of range for a swarm of 4 members"):
        swarm[key]


# --------------------------------------------------------------------------------------
# Reductions: w @ swarm, mean, norm
# --------------------------------------------------------------------------------------
@LAWS
@given(spec=architectures, seed=seeds, size=sizes, rows=st.integers(1, 3), wseed=seeds)
def test_matmul_and_mean_are_weighted_sums_of_members(spec: tuple[Any, ...], seed: int, size: int, rows: int,
                                                      wseed: int) -> None:
    members = _members(spec, seed, size, torch.float64)
    swarm = Swarm.stack(members)
    weights = torch.randn(rows, size, dtype=torch.float64, generator=torch.Generator().manual_seed(wseed))
    mixed = weights @ swarm
    assert isinstance(mixed, Swarm) and len(mixed) == rows
    for q in range(rows):
        single = weights[q] @ swarm
        total = {k: sum((weights[q, i] * named(m)[k] for i, m in enumerate(members)),
                        torch.zeros_like(v)) if is_arith(v) else v for k, v in named(members[0]).items()}
        _assert_close(single.params, total, what=f"w @ swarm row {q}")
        _assert_close(mixed[q].params, total, what=f"W @ swarm row {q}")
        # the same as the Particle expression sum_i w_i * swarm[i]
        expression = swarm[0] * weights[q, 0]
        for i in range(1, size):
            expression = expression + swarm[i] * weights[q, i]
        _assert_close(single.params, expression.params, what="vs Particle sum")
    mean = {k: sum((named(m)[k] for m in members), torch.zeros_like(v)) / size if is_arith(v) else v
            for k, v in named(members[0]).items()}
    _assert_close(swarm.mean().params, mean, what="mean")
    _assert_close((torch.full((size,), 1.0 / size, dtype=torch.float64) @ swarm).params, mean, what="uniform @")
    norms = torch.stack([torch.linalg.vector_norm(torch.cat(
        [v.reshape(-1) for v in named(m).values() if is_arith(v)])) for m in members])
    assert torch.allclose(swarm.norm(), norms, rtol=1e-12, atol=1e-12)
    assert torch.allclose(swarm.norm()[0], nf.norm(swarm[0].params), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------
# Merges that reduce to the identity, and weighted averages
# --------------------------------------------------------------------------------------
@LAWS
@given(spec=architectures, seed=seeds, k=st.integers(1, 5), kind=st.sampled_from(["module", "particle", "dict"]))
def test_average_of_copies_is_the_model(spec: tuple[Any, ...], seed: int, k: int, kind: str) -> None:
    model = build(spec, seed, nyto_module=False)
    value: Any = {"module": model, "particle": nyto.particle(model, buffers=True), "dict": nf.state(model)}[kind]
    soup = merge.average([value] * k)
    got = soup if kind == "dict" else (soup.params if kind == "particle" else named(soup))
    want = nf.state(model) if kind != "module" else named(model)
    _assert_same(dict(got), dict(want))
    if kind == "module":
        _assert_same(named_buffers(soup), named_buffers(model))
    swarm = Swarm.stack([model] * k)
    _assert_same(merge.average(swarm).params, named(model))


@LAWS
@given(spec=architectures, seed=seeds, k=st.integers(1, 4), data=st.data())
def test_weighted_average_is_the_normalised_weighted_sum(spec: tuple[Any, ...], seed: int, k: int,
                                                         data: st.DataObject) -> None:
    models = _members(spec, seed, k, torch.float64)
    weights = data.draw(st.lists(st.floats(0.0, 5.0), min_size=k, max_size=k).filter(lambda w: sum(w) > 0.1),
                        label="weights")
    soup = merge.average(models, weights=weights)
    total = sum(weights)
    expected = {k2: sum((w * named(m)[k2] for w, m in zip(weights, models)), torch.zeros_like(v)) / total
                if is_arith(v) else v for k2, v in named(models[0]).items()}
    _assert_close(named(soup), expected)
    buffers = {k2: sum((w * named_buffers(m)[k2] for w, m in zip(weights, models)), torch.zeros_like(v)) / total
               if is_arith(v) else v for k2, v in named_buffers(models[0]).items()}
    _assert_close(named_buffers(soup), buffers)
    # scaling every weight changes nothing; one positive weight picks that model exactly
    _assert_close(named(merge.average(models, weights=[3.0 * w for w in weights])), named(soup))
    one_hot = [0.0] * k
    one_hot[k - 1] = 2.5
    _assert_same(named(merge.average(models, weights=one_hot)), named(models[-1]))
    # a Swarm of the models: the same soup, and the same as its w @ swarm on the parameters
    swarm = Swarm.stack(models)
    _assert_close(merge.average(swarm, weights=weights).params, expected)
    normalised = torch.tensor(weights, dtype=torch.float64) / total
    _assert_close((normalised @ swarm).params, expected)


@LAWS
@given(spec=architectures, seed=seeds, scale=st.floats(-3.0, 3.0), count=st.integers(1, 3))
def test_task_arithmetic_of_the_base_is_the_base(spec: tuple[Any, ...], seed: int, scale: float, count: int) -> None:
    base = build(spec, seed, nyto_module=False)
    merged = merge.task_arithmetic(base, [base] * count, scale=scale)
    _assert_same(named(merged), named(base))
    _assert_same(named_buffers(merged), named_buffers(base))
    other = build(spec, seed + 1, nyto_module=False)
    _assert_same(named(merge.task_arithmetic(base, [other], scale=0.0)), named(base))
    _assert_same(named(merge.task_vector(base, base)),
                 {k: torch.zeros_like(v) if is_arith(v) else v for k, v in named(base).items()})
    # swarm form: member by member
    swarm = Swarm.stack([base, other])
    _assert_same(merge.task_arithmetic(swarm, [swarm], scale=scale).params, swarm.params)


@LAWS
@given(spec=architectures, seed=seeds, kind=st.sampled_from(["module", "particle", "swarm", "dict"]))
def test_ema_with_decay_one_and_zero(spec: tuple[Any, ...], seed: int, kind: str) -> None:
    def make(s: int) -> Any:
        model = build(spec, s, nyto_module=False)
        if kind == "module":
            return model
        if kind == "particle":
            return nyto.particle(model, buffers=True)
        if kind == "swarm":
            return Swarm.stack([model, build(spec, s + 7, nyto_module=False)])
        return nf.state(model)

    def state(x: Any) -> dict[str, Tensor]:
        if kind == "module":
            return {**named(x), **named_buffers(x)}
        if kind == "particle":
            return dict(x.params)
        if kind == "swarm":
            return {**x.params, **x.buffers}
        return dict(x)

    def floating(values: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v for k, v in values.items() if is_arith(v)}

    target, online = make(seed), make(seed + 1)
    before = {k: v.clone() for k, v in state(target).items()}
    assert merge.ema_(target, online, decay=1.0) is target
    _assert_same(floating(state(target)), floating(before))  # integer buffers are copied (documented)
    merge.ema_(target, online, tau=0.0, buffers="keep")
    _assert_same(floating(state(target)), floating(before))
    merge.ema_(target, online, decay=0.0)
    _assert_same(state(target), state(online))


@LAWS
@given(spec=architectures, s1=seeds, s2=seeds, kind=st.sampled_from(["module", "particle", "swarm", "dict"]))
def test_slerp_ends_are_the_operands(spec: tuple[Any, ...], s1: int, s2: int, kind: str) -> None:
    def make(s: int) -> Any:
        model = build(spec, s, nyto_module=False)
        if kind == "module":
            return model
        if kind == "particle":
            return nyto.particle(model)
        if kind == "swarm":
            return Swarm.stack([model, build(spec, s + 3, nyto_module=False)])
        return nf.params(model)

    def values(x: Any) -> dict[str, Tensor]:
        return named(x) if kind == "module" else dict(x.params if kind in ("particle", "swarm") else x)

    a, b = make(s1), make(s2)
    _assert_same(values(merge.slerp(a, b, 0.0)), values(a))
    _assert_same(values(merge.slerp(a, b, 1)), values(b))
    _assert_same(values(merge.slerp(a, a, 0.37)), values(a))


@LAWS
@given(spec=architectures, seed=seeds, kind=st.sampled_from(["module", "particle", "swarm", "dict"]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_ravel_unravel_round_trips(spec: tuple[Any, ...], seed: int, kind: str, dtype: torch.dtype) -> None:
    model = build(spec, seed, nyto_module=False).to(dtype)
    value: Any = {"module": model, "particle": nyto.particle(model, buffers=True),
                  "swarm": Swarm.stack([model, build(spec, seed + 1, nyto_module=False).to(dtype)]),
                  "dict": nf.params(model)}[kind]
    vector, unravel = merge.ravel(value)
    back = unravel(vector)
    if kind == "module":
        _assert_same(named(back), named(model))
        _assert_same(named_buffers(back), named_buffers(model))
    elif kind in ("particle", "swarm"):
        _assert_same(back.params, value.params)
    else:
        _assert_same(back, value)
    again, _ = merge.ravel(back)
    assert _same(again, vector)
    if kind == "swarm":
        for i in range(len(value)):
            assert _same(vector[i], merge.ravel(value[i])[0])
    if dtype != torch.bfloat16:
        assert _same(merge.ravel(unravel(vector.numpy()))[0], vector)


# --------------------------------------------------------------------------------------
# Functional laws, and the functional, Particle and NytoModule forms agreeing
# --------------------------------------------------------------------------------------
@LAWS
@given(spec=architectures, s1=seeds, s2=seeds, dtype=dtypes)
def test_functional_laws(spec: tuple[Any, ...], s1: int, s2: int, dtype: torch.dtype) -> None:
    a = nf.params(build(spec, s1, nyto_module=False).to(dtype))
    b = nf.params(build(spec, s2, nyto_module=False).to(dtype))
    _assert_same(nf.lerp(a, b, 0.0), a)
    _assert_same(nf.lerp(a, b, 1.0), b)
    _assert_same(nf.lerp(a, b, torch.tensor(0.0, dtype=dtype)), a)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    _assert_close(nf.sub(nf.add(a, b), b), a, tol=tol)
    _assert_same(nf.sub(a, a), {k: torch.zeros_like(v) for k, v in a.items()})
    _assert_same(nf.neg(nf.neg(a)), a)
    squares = nf.norm(a) ** 2
    assert torch.allclose(nf.dot(a, a), squares.to(nf.dot(a, a).dtype), rtol=tol)
    reference = sum(float((v.double() * v.double()).sum()) for v in a.values())
    assert abs(float(nf.dot(a, a)) - reference) <= tol * max(1.0, reference)
    assert torch.allclose(nf.dot(a, b), nf.dot(b, a))


EXPRESSIONS: dict[str, Callable[[Any, Any, float], Any]] = {
    "a+b": lambda a, b, c: a + b,
    "a-b": lambda a, b, c: a - b,
    "a*b": lambda a, b, c: a * b,
    "a/b": lambda a, b, c: a / b,
    "c*a": lambda a, b, c: c * a,
    "a/c": lambda a, b, c: a / c,
    "c-a": lambda a, b, c: c - a,
    "c/a": lambda a, b, c: c / a,
    "c*(a-b)+a": lambda a, b, c: c * (a - b) + a,
    "a+c*(a-b)": lambda a, b, c: a + c * (a - b),
    "a-c*b": lambda a, b, c: a - c * b,
    "c*a-b": lambda a, b, c: c * a - b,
    "(a*c)*c+b": lambda a, b, c: (a * c) * c + b,
    "c*a+c*b": lambda a, b, c: c * a + c * b,
    "-(c*a)+b": lambda a, b, c: -(c * a) + b,
    "(c*a)/c": lambda a, b, c: (c * a) / c,
    "b-(a*c)": lambda a, b, c: b - (a * c),
}


def _per_tensor(name: str, a: dict[str, Tensor], b: dict[str, Tensor], c: float) -> dict[str, Tensor]:
    """The expression evaluated tensor by tensor in plain torch (integer leaves carried from ``a``)."""
    return {k: EXPRESSIONS[name](v, b[k], c) if is_arith(v) else v for k, v in a.items()}


def _functional(name: str, a: dict[str, Tensor], b: dict[str, Tensor], c: float) -> dict[str, Tensor]:
    table: dict[str, Callable[[], Any]] = {
        "a+b": lambda: nf.add(a, b), "a-b": lambda: nf.sub(a, b), "a*b": lambda: nf.mul(a, b),
        "a/b": lambda: nf.div(a, b), "c*a": lambda: nf.mul(c, a), "a/c": lambda: nf.div(a, c),
        "c-a": lambda: nf.sub(c, a), "c/a": lambda: nf.div(c, a),
        "c*(a-b)+a": lambda: nf.add(nf.mul(c, nf.sub(a, b)), a),
        "a+c*(a-b)": lambda: nf.add(a, nf.mul(c, nf.sub(a, b))),
        "a-c*b": lambda: nf.sub(a, nf.mul(c, b)), "c*a-b": lambda: nf.sub(nf.mul(c, a), b),
        "(a*c)*c+b": lambda: nf.add(nf.mul(nf.mul(a, c), c), b),
        "c*a+c*b": lambda: nf.add(nf.mul(c, a), nf.mul(c, b)),
        "-(c*a)+b": lambda: nf.add(nf.neg(nf.mul(c, a)), b),
        "(c*a)/c": lambda: nf.div(nf.mul(c, a), c),
        "b-(a*c)": lambda: nf.sub(b, nf.mul(a, c)),
    }
    return dict(table[name]())


@LAWS
@given(spec=architectures, s1=seeds, s2=seeds, dtype=dtypes, c=values,
       name=st.sampled_from(sorted(EXPRESSIONS)))
def test_functional_particle_and_nyto_module_agree_bit_for_bit(spec: tuple[Any, ...], s1: int, s2: int,
                                                               dtype: torch.dtype, c: float, name: str) -> None:
    plain_a = build(spec, s1, nyto_module=False).to(dtype)
    plain_b = build(spec, s2, nyto_module=False).to(dtype)
    a, b = named(plain_a), named(plain_b)
    reference = _per_tensor(name, a, b, c)
    # ``nf.div(number, tree)`` is ``torch.div`` (one rounding), documented to differ from ``/``
    functional = reference if name != "c/a" else {k: torch.div(c, v) for k, v in a.items()}
    _assert_same(_functional(name, a, b, c), functional, "functional")
    particle = EXPRESSIONS[name](nyto.particle(plain_a), nyto.particle(plain_b), c)
    _assert_same(particle.params, reference, "Particle")
    unpacked = EXPRESSIONS[name](nyto.particle(build(spec, s1, nyto_module=False).to(dtype), pack=False),
                                 nyto.particle(build(spec, s2, nyto_module=False).to(dtype), pack=False), c)
    _assert_same(unpacked.params, reference, "Particle, pack=False")
    module = EXPRESSIONS[name](build(spec, s1).to(dtype), build(spec, s2).to(dtype), c)
    _assert_same(named(module), reference, "NytoModule")
    swarm = EXPRESSIONS[name](Swarm.stack([plain_a]), Swarm.stack([plain_b]), c)
    _assert_same(swarm[0].params, reference, "Swarm of one")


@LAWS
@given(spec=architectures, s1=seeds, s2=seeds, dtype=dtypes, number=st.floats(0.0, 1.0), tensor=st.booleans())
def test_lerp_forms_agree_bit_for_bit(spec: tuple[Any, ...], s1: int, s2: int, dtype: torch.dtype, number: float,
                                      tensor: bool) -> None:
    plain_a = build(spec, s1, nyto_module=False).to(dtype)
    plain_b = build(spec, s2, nyto_module=False).to(dtype)
    a, b = named(plain_a), named(plain_b)
    w: Any = torch.tensor(number, dtype=dtype) if tensor else number
    reference = {k: torch.lerp(v, b[k], w) if is_arith(v) else v for k, v in a.items()}
    _assert_same(nf.lerp(a, b, w), reference, "functional")
    _assert_same(nyto.particle(plain_a).lerp(nyto.particle(plain_b), w).params, reference, "Particle")
    module_a = build(spec, s1).to(dtype)
    _assert_same(named(module_a.lerp(build(spec, s2).to(dtype), w)), reference, "NytoModule")
    target = nyto.particle(build(spec, s1, nyto_module=False).to(dtype))
    target.lerp_(nyto.particle(plain_b), w)
    _assert_same(target.params, reference, "Particle.lerp_")
    ema = build(spec, s1, nyto_module=False).to(dtype)
    merge.ema_(ema, plain_b, tau=w, buffers="keep")
    _assert_same(named(ema), reference, "ema_")
    swarm = Swarm.stack([plain_a, plain_a]).lerp(Swarm.stack([plain_b, plain_b]), w)
    _assert_same(swarm[1].params, reference, "Swarm.lerp")


@LAWS
@given(spec=architectures, seed=seeds, data=st.data(), kind=st.sampled_from(["swarm", "one", "particle", "model",
                                                                            "number"]))
def test_assignment_agrees_with_torch_index_put(spec: tuple[Any, ...], seed: int, data: st.DataObject,
                                                kind: str) -> None:
    size = data.draw(st.integers(1, 5), label="size")
    swarm = Swarm.stack(_members(spec, seed, size, torch.float32))
    key = data.draw(_keys(size), label="key")
    torch_key = torch.as_tensor(key) if isinstance(key, (list, np.ndarray)) else key
    if isinstance(key, list) and not key:
        torch_key = torch.zeros(0, dtype=torch.long)
    chosen = torch.arange(size)[torch_key].reshape(-1)
    assume(len(set(chosen.tolist())) == chosen.numel())  # torch leaves repeated targets unspecified
    picked = swarm[key]
    count = len(picked) if isinstance(picked, Swarm) else None  # None: one member, torch drops the dimension
    source = _members(spec, seed + 300, max(count or 1, 1), torch.float32)
    stacked = {**swarm.params, **swarm.buffers}
    expected = {name: t.clone() for name, t in stacked.items()}
    value: Any = 0.5
    if kind == "number":
        for name, t in expected.items():
            if is_arith(t) and name in swarm.params:  # "numbers set the arithmetic leaves only"
                t[torch_key] = 0.5
    else:
        if kind == "swarm" and count is not None:
            value = Swarm.stack(source)[:count]
            rows = {**value.params, **value.buffers}
        elif kind == "one" and count is not None:
            value = Swarm.stack(source[:1])
            rows = {name: t[0] for name, t in {**value.params, **value.buffers}.items()}
        else:
            value = source[0] if kind == "model" else nyto.particle(source[0])
            rows = {**named(source[0]), **named_buffers(source[0])}
        for name, t in expected.items():
            t[torch_key] = rows[name]
    swarm[key] = value
    _assert_same({**swarm.params, **swarm.buffers}, expected, f"swarm[{key!r}] = {kind}")


@LAWS
@given(spec=architectures, seed=seeds, size=sizes, t=st.floats(-0.5, 1.5), scale=st.floats(-2.0, 2.0),
       density=st.floats(0.1, 1.0))
def test_swarm_merges_are_exactly_loops_over_members(spec: tuple[Any, ...], seed: int, size: int, t: float,
                                                     scale: float, density: float) -> None:
    base, one, two = (Swarm.stack(_members(spec, seed + 100 * k, size, torch.float32)) for k in range(3))
    merged = {
        "task_arithmetic": (merge.task_arithmetic(base, [one, two], scale=scale),
                            lambda i: merge.task_arithmetic(base[i], [one[i], two[i]], scale=scale)),
        "task_vector": (merge.task_vector(one, base), lambda i: merge.task_vector(one[i], base[i])),
        "ties": (merge.ties(base, [one, two], density=density), lambda i: merge.ties(base[i], [one[i], two[i]],
                                                                                      density=density)),
        "slerp": (merge.slerp(base, one, t), lambda i: merge.slerp(base[i], one[i], t)),
    }
    for name, (whole, member) in merged.items():
        for i in range(size):
            _assert_same(whole[i].params, member(i).params, f"{name} member {i}")
        _assert_same(whole.buffers, base.buffers if name != "task_vector" else one.buffers, f"{name} buffers")
    generator = torch.Generator().manual_seed(seed)
    whole = merge.dare(base, [one, two], drop=0.5, generator=torch.Generator().manual_seed(seed))
    for i in range(size):  # the masks are drawn member by member, as a loop draws them
        _assert_same(whole[i].params, merge.dare(base[i], [one[i], two[i]], drop=0.5, generator=generator).params)


# --------------------------------------------------------------------------------------
# Fixes found by this audit
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", [torch.tensor([1, 0, 1], dtype=torch.uint8), np.array([1, 0, 1], dtype=np.uint8),
                                 torch.tensor(1, dtype=torch.uint8)])
def test_uint8_index_is_refused_not_read_unlike_torch(key: Any) -> None:
    # torch reads a uint8 tensor as a (deprecated) mask, members 0 and 2; nytorch read it as the indices
    # [1, 0, 1], a silently different selection.  It is ambiguous (NumPy reads uint8 as indices): refused.
    swarm = Swarm.stack([nn.Linear(1, 1) for _ in range(3)])
    before = swarm.clone()
    for select in (lambda: swarm[key], lambda: swarm.__setitem__(key, 0.0)):
        with pytest.raises(IndexError, match=r"got a uint8 tensor of shape .*pass \.bool\(\) for a mask or "
                                             r"\.long\(\) for indices"):
            select()
    _assert_same(swarm.params, before.params)
    mask = torch.as_tensor(key).bool()
    if mask.dim():
        _assert_same(swarm[mask].params, {k: v[mask] for k, v in before.params.items()})


class _RealAndComplex(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))
        self.w64 = nn.Parameter(torch.randn(2, dtype=torch.float64))
        self.c = nn.Parameter(torch.randn(2, dtype=torch.complex64))


@pytest.mark.parametrize("kind", ["module", "particle", "swarm", "dict"])
def test_unravel_of_a_complex_model_warns_nothing_and_round_trips(kind: str) -> None:
    # the vector is complex128 beside a complex parameter; unravel cast its real pieces with ``.to``, which
    # warned "Casting complex values to real discards the imaginary part" on every model's own vector
    model = _RealAndComplex()
    value: Any = {"module": model, "particle": nyto.particle(model), "swarm": Swarm.stack([model, _RealAndComplex()]),
                  "dict": nf.params(model)}[kind]
    vector, unravel = merge.ravel(value)
    assert vector.dtype == torch.complex128
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = unravel(vector)
        shifted = unravel(vector + 1j)  # an imaginary part in the real slots: their real part is kept
    got = named(back) if kind == "module" else dict(back if kind == "dict" else back.params)
    want = named(model) if kind == "module" else dict(value if kind == "dict" else value.params)
    _assert_same(got, want)
    moved = named(shifted) if kind == "module" else dict(shifted if kind == "dict" else shifted.params)
    for name, leaf in want.items():
        expected = leaf + 1j if leaf.is_complex() else leaf
        assert _same(moved[name], expected), name
        assert moved[name].is_contiguous(), name


@LAWS
@given(spec=architectures, seed=seeds, data=st.data(), value=values)
def test_slices_are_views_and_index_selections_copies(spec: tuple[Any, ...], seed: int, data: st.DataObject,
                                                      value: float) -> None:
    size = data.draw(st.integers(1, 5), label="size")
    swarm = Swarm.stack(_members(spec, seed, size, torch.float32))
    key = data.draw(_keys(size), label="key")
    expected = {name: t.clone() for name, t in swarm.params.items()}
    view = isinstance(key, (int, slice)) or (isinstance(key, Tensor) and key.dim() == 0)
    if view:  # as torch: ``t[key] += value`` writes through a basic-indexing view
        for t in expected.values():
            if is_arith(t):
                t[key] += value
    picked = swarm[key]
    picked += value
    _assert_same(swarm.params, expected, f"after swarm[{key!r}] += {value}")


def _mixed(seed: int) -> nn.Module:
    from conftest import Mixed
    torch.manual_seed(seed)
    model = Mixed()
    with torch.no_grad():
        model.counts.add_(seed)
        model.stat.normal_()
    return model


@pytest.mark.parametrize("op", EXACT_OPS)
def test_member_wise_on_every_dtype(op: str) -> None:
    # float32, float64, complex64, a frozen float, an integer parameter, floating/integer/bool buffers
    fn = _torch_op(op)
    xs, ys = [_mixed(k) for k in range(3)], [_mixed(10 + k) for k in range(3)]
    swarm, other = Swarm.stack(xs), Swarm.stack(ys)
    weights = torch.tensor([0.5, -2.0, 3.0])
    for operand, member in [(other, lambda i: other[i]), (1.5, lambda i: 1.5), (weights, lambda i: weights[i]),
                            (ys[0], lambda i: nyto.particle(ys[0]))]:
        result = fn(swarm, operand)
        in_place = getattr(operator, "i" + op)(swarm.clone(), operand)
        for i in range(3):
            right = member(i)
            reference = {k: (fn(v, right.params[k] if isinstance(right, nyto.Particle) else right)
                             if is_arith(v) and k != "counts" else v) for k, v in named(xs[i]).items()}
            for got in (result[i].params, in_place[i].params):
                want = reference
                if op in ("mul", "truediv"):  # complex * and / of packed buffers: the last bit may differ (README)
                    _assert_close({"wc": got["wc"]}, {"wc": want["wc"]}, tol=1e-6)
                    got, want = ({k: v for k, v in d.items() if k != "wc"} for d in (got, want))
                _assert_same(got, want, f"{op} {type(operand).__name__} member {i}")
            _assert_same(named_buffers(result[i].module()), named_buffers(xs[i]))
    with_buffers = Swarm.stack([nyto.particle(m, buffers=True) for m in xs])
    result = fn(with_buffers, Swarm.stack([nyto.particle(m, buffers=True) for m in ys]))
    for i in range(3):
        expected = fn(nyto.particle(xs[i], buffers=True), nyto.particle(ys[i], buffers=True))
        _assert_same(result[i].params, expected.params, f"buffers=True member {i}")


def test_in_place_with_aliased_operands_reads_before_writing() -> None:
    # what ``x -= x[0]``, ``x[1:] += x[:-1]`` and swaps give for a tensor whose operands are read first
    swarm = Swarm.stack([_mixed(k) for k in range(4)])
    old = swarm.clone()
    swarm -= swarm[0]
    for i in range(4):
        _assert_same(swarm[i].params, (old[i] - old[0]).params, f"-= member 0, member {i}")
    swarm = old.clone()
    tail = swarm[1:]
    tail += swarm[:-1]
    for i in range(4):
        _assert_same(swarm[i].params, (old[i] + old[i - 1]).params if i else old[0].params, f"overlap {i}")
    swarm = old.clone()
    swarm.lerp_(swarm[2], 0.25)
    for i in range(4):
        _assert_same(swarm[i].params, old[i].lerp(old[2], 0.25).params, f"lerp_ toward member 2, member {i}")
    swarm = old.clone()
    swarm[[3, 0]] = swarm[[0, 3]]
    swarm[1:] = swarm[:-1]
    for i, j in enumerate([3, 3, 1, 2]):
        _assert_same(swarm[i].params, old[j].params, f"assignments, member {i}")


def test_ravel_of_an_empty_swarm_round_trips() -> None:
    # ``merge.ravel(swarm[:0])`` raised torch's "cannot reshape tensor of 0 elements into shape [0, -1]"
    # where every other merge takes an empty swarm; now a [0, n] vector whose unravel gives the empty swarm back
    swarm = Swarm.stack([nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)) for _ in range(2)])
    vector, unravel = merge.ravel(swarm[:0])
    assert vector.shape == (0, 15) and vector.dtype == torch.float32
    back = unravel(vector)
    assert isinstance(back, Swarm) and len(back) == 0
    for got, want in ((back.params, swarm.params), (back.buffers, swarm.buffers)):
        assert {k: tuple(v.shape) for k, v in got.items()} == {k: (0, *v.shape[1:]) for k, v in want.items()}
    full, _ = merge.ravel(swarm)
    with pytest.raises(StructureError, match=r"^unravel: expected a vector of shape \[0, 15\] \(the swarm raveled "
                                             r"had no member to carry buffers and integer leaves from\), "
                                             r"got shape \(2, 15\)$"):
        unravel(full)  # the BatchNorm statistics of 2 members would have to come from a member 0 it lacks
    linear = Swarm.stack([nn.Linear(2, 3) for _ in range(2)])
    full, _ = merge.ravel(linear)
    _, unravel = merge.ravel(linear[:0])
    _assert_same(unravel(full).params, linear.params)  # nothing to carry: any member count


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["module", "particle", "swarm", "dict"])
def test_ema_with_a_tensor_weight_rounds_as_torch_lerp(dtype: torch.dtype, kind: str) -> None:
    # ``ema_`` called ``_foreach_lerp_`` with a 0-dim tensor tau, which reads it as a Python number: on half
    # dtypes the update differed from ``torch.lerp(target, online, tau)`` (and from ``Particle.lerp_``) by up
    # to half a unit in the last place of 1.0; the engine runs such a weight per leaf, as ema_ now does
    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3)).to(dtype)

    def wrap(model: nn.Module) -> Any:
        return {"module": model, "particle": nyto.particle(model), "swarm": Swarm.stack([model, model]),
                "dict": nf.params(model)}[kind]

    def values(x: Any) -> dict[str, Tensor]:
        return named(x) if kind == "module" else dict(x if kind == "dict" else x.params)

    tau = torch.tensor(0.3)
    target, online = wrap(make(0)), wrap(make(1))
    expected = {k: torch.lerp(v.clone(), values(online)[k], tau) for k, v in values(target).items()}
    merge.ema_(target, online, tau=tau)
    _assert_same(values(target), expected)
    lerped = wrap(make(0))
    if kind in ("particle", "swarm"):
        _assert_same(values(lerped.lerp_(online, tau)), expected)  # the same law in the operator form
    ema = merge.EMA(make(0), decay=lambda step: torch.tensor(0.7))
    start = {k: v.clone() for k, v in named(ema.averaged).items()}
    ema.update(make(1))
    _assert_same(named(ema.averaged), {k: torch.lerp(v.clone(), named(make(1))[k], 1.0 - torch.tensor(0.7))
                                       for k, v in start.items()})
