"""Hypothesis: the algebra of models over randomly generated architectures.

Architectures mix Linear, Conv, LayerNorm, BatchNorm, Embedding, tied weights and
nested submodules (``conftest.architectures``); each law is checked for
``NytoModule`` models, for ``Particle``s of plain models, and for Particles that
carry buffers, against plain per-tensor computations.
"""
# mypy: disable-error-code="operator"
# (``build`` returns nn.Module, whose arithmetic mypy cannot see)
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import architectures, build, is_arith, named, named_buffers, scalars
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nytorch as nyto

Tensor = torch.Tensor

LAWS = settings(max_examples=30, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FLAVOURS = ["nyto", "particle", "particle_buffers"]
seeds = st.integers(min_value=0, max_value=2**16)


def _make(spec: tuple[Any, ...], seed: int, flavour: str) -> Any:
    model = build(spec, seed, nyto_module=flavour == "nyto")
    if flavour == "nyto":
        return model
    return nyto.particle(model, buffers=flavour == "particle_buffers")


def _values(x: Any) -> dict[str, Tensor]:
    """What the algebra acts on: a Particle's leaves, a NytoModule's parameters (buffers are carried)."""
    if isinstance(x, nyto.Particle):
        return x.params
    return named(x)


def _arith(values: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in values.items() if is_arith(v)}


def _equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return list(a) == list(b) and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y) for x, y in zip(a.values(), b.values()))


def _close(a: dict[str, Tensor], b: dict[str, Tensor], tol: float = 1e-5) -> bool:
    return list(a) == list(b) and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.allclose(x, y, rtol=tol, atol=tol)
        for x, y in zip(a.values(), b.values()))


@pytest.mark.parametrize("flavour", FLAVOURS)
@LAWS
@given(spec=architectures, s1=seeds, s2=seeds)
def test_commutativity(flavour: str, spec: tuple[Any, ...], s1: int, s2: int) -> None:
    a, b = _make(spec, s1, flavour), _make(spec, s2, flavour)
    # integer leaves are carried from the left operand, so only arithmetic leaves commute
    assert _equal(_arith(_values(a + b)), _arith(_values(b + a)))
    assert _equal(_arith(_values(a * b)), _arith(_values(b * a)))
    expected = {k: v + w for (k, v), w in zip(_arith(_values(a)).items(), _arith(_values(b)).values())}
    assert _equal(_arith(_values(a + b)), expected)


@pytest.mark.parametrize("flavour", FLAVOURS)
@LAWS
@given(spec=architectures, s1=seeds, s2=seeds)
def test_add_then_sub_round_trips(flavour: str, spec: tuple[Any, ...], s1: int, s2: int) -> None:
    a, b = _make(spec, s1, flavour), _make(spec, s2, flavour)
    assert _close(_values((a + b) - b), _values(a))
    assert _equal(_arith(_values(a - a)), {k: torch.zeros_like(v) for k, v in _arith(_values(a)).items()})
    assert _equal(_values(-(-a)), _values(a))


@pytest.mark.parametrize("flavour", FLAVOURS)
@LAWS
@given(spec=architectures, seed=seeds)
def test_two_a_equals_a_plus_a(flavour: str, spec: tuple[Any, ...], seed: int) -> None:
    a = _make(spec, seed, flavour)
    assert _equal(_values(2 * a), _values(a + a))
    assert _equal(_values(a * 2), _values(a + a))
    assert _equal(_values(a / 2 + a / 2), _values(a))  # halving is exact in binary floating point


@pytest.mark.parametrize("flavour", FLAVOURS)
@LAWS
@given(spec=architectures, s1=seeds, s2=seeds, c=scalars)
def test_distributivity(flavour: str, spec: tuple[Any, ...], s1: int, s2: int, c: float) -> None:
    a, b = _make(spec, s1, flavour), _make(spec, s2, flavour)
    assert _close(_values(c * (a + b)), _values(c * a + c * b), tol=1e-4)
    assert _close(_values((a + b) * c), _values(a * c + b * c), tol=1e-4)


@pytest.mark.parametrize("flavour", FLAVOURS)
@LAWS
@given(spec=architectures, s1=seeds, s2=seeds, c=scalars,
       op=st.sampled_from(["add", "sub", "mul", "div"]), use_model=st.booleans())
def test_inplace_equals_out_of_place(flavour: str, spec: tuple[Any, ...], s1: int, s2: int, c: float,
                                     op: str, use_model: bool) -> None:
    a, b = _make(spec, s1, flavour), _make(spec, s2, flavour)
    fn: Callable[[Any, Any], Any] = getattr(operator, op if op != "div" else "truediv")
    ifn: Callable[[Any, Any], Any] = getattr(operator, "i" + (op if op != "div" else "truediv"))
    operand = b if use_model else c
    expected = _values(fn(a, operand))
    target = a.clone()
    objects = [id(t) for t in _values(target).values()] if flavour != "nyto" else \
        [id(p) for p in target.parameters()]
    result = ifn(target, operand)
    assert result is target
    assert _equal(_values(target), expected)
    if flavour == "nyto":
        assert [id(p) for p in target.parameters()] == objects


@pytest.mark.parametrize("flavour", ["nyto", "particle"])
@LAWS
@given(spec=architectures, s1=seeds, s2=seeds, w=st.floats(0.0, 1.0))
def test_lerp_is_a_plus_w_b_minus_a(flavour: str, spec: tuple[Any, ...], s1: int, s2: int, w: float) -> None:
    a, b = _make(spec, s1, flavour), _make(spec, s2, flavour)
    assert _close(_values(a.lerp(b, w)), _values(a + w * (b - a)))


@LAWS
@given(spec=architectures, s1=seeds, s2=seeds)
def test_results_keep_structure_buffers_and_ties(spec: tuple[Any, ...], s1: int, s2: int) -> None:
    a, b = build(spec, s1), build(spec, s2)
    result = (a + b) * 0.5
    assert type(result) is type(a)
    assert [(n, p.shape, p.dtype, p.requires_grad) for n, p in result.named_parameters()] == \
        [(n, p.shape, p.dtype, p.requires_grad) for n, p in a.named_parameters()]
    assert _equal(named_buffers(result), named_buffers(a))
    assert not {id(t) for t in result.parameters()} & {id(t) for t in a.parameters()}
    for (name, module), (_, original) in zip(result.named_modules(), a.named_modules()):
        assert type(module) is type(original), name
        head, embed = getattr(module, "head", None), getattr(module, "embed", None)
        if head is not None and embed is not None and original.head.weight is original.embed.weight:
            assert head.weight is embed.weight, name


@LAWS
@given(spec1=architectures, spec2=architectures, s1=seeds, s2=seeds)
def test_combine_exactly_when_structures_match(spec1: tuple[Any, ...], spec2: tuple[Any, ...],
                                               s1: int, s2: int) -> None:
    a, b = build(spec1, s1), build(spec2, s2)
    structure_a = [(n, p.shape, p.dtype) for n, p in a.named_parameters()]
    structure_b = [(n, p.shape, p.dtype) for n, p in b.named_parameters()]
    if structure_a == structure_b:
        expected = {k: v + w for (k, v), w in zip(named(a).items(), named(b).values())}
        assert _equal(named(a + b), expected)
    else:
        with pytest.raises(nyto.StructureError) as info:
            a + b
        # the first position where the parameter lists differ, in named_parameters() order: the message
        # names the parameter found there on either side (a shape/dtype change, or a missing/extra name)
        k = next((i for i, (x, y) in enumerate(zip(structure_a, structure_b)) if x != y),
                 min(len(structure_a), len(structure_b)))
        candidates = {s[k][0] for s in (structure_a, structure_b) if k < len(s)}
        assert any(repr(name) in str(info.value) for name in candidates), (candidates, str(info.value))
        if k < min(len(structure_a), len(structure_b)) and structure_a[k][0] == structure_b[k][0]:
            shapes = [f"shape {tuple(s[k][1])} float32" for s in (structure_a, structure_b)]
            assert " vs ".join(shapes) in str(info.value)
