"""The bad-input catalogue: every public entry point, every kind of wrong operand.

Inputs that must raise: each case asserts the exception type, that the message
names the offending parameter (the first one in ``named_parameters()`` order) and
that no operand was touched (values, Parameter objects and in-place version
counters are compared with a snapshot).  Unusual inputs that must work: each case
checks values against a plain per-tensor computation.  The README lists both.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import nytorch
import nytorch.functional as nf
from nytorch import DeviceMismatchError, NytoModule, Particle, StructureError

try:
    from nytorch._swarm import Swarm
except ImportError:  # the swarm issue may not have landed in this checkout
    Swarm = None  # type: ignore[assignment,misc]
try:
    import nytorch.distributed as ndist
except ImportError:
    ndist = None  # type: ignore[assignment]

Tensor = torch.Tensor
needs_swarm = pytest.mark.skipif(Swarm is None, reason="nytorch.Swarm is not available in this checkout")


# -- sample structures ----------------------------------------------------------------------------
# Each variant differs from "base" at two or more parameters; FIRST names the first one in
# the base model's named_parameters() order (what every message must name).
def _layers(module: nn.Module, variant: str) -> None:
    module.fc1 = nn.Linear(3, 4)
    if variant == "shape":
        module.fc2 = nn.Linear(4, 6)
        module.fc3 = nn.Linear(6, 2)
    elif variant == "renamed":
        module.hidden = nn.Linear(4, 5)
        module.fc3 = nn.Linear(5, 2)
    elif variant == "missing":
        module.fc2 = nn.Linear(4, 5, bias=False)
        module.fc3 = nn.Linear(5, 2, bias=False)
    else:
        module.fc2 = nn.Linear(4, 5)
        module.fc3 = nn.Linear(5, 2)
    if variant == "dtype":
        module.fc2.bias = nn.Parameter(module.fc2.bias.detach().double())
        module.fc3.double()
    if variant == "device":
        module.fc2.bias = nn.Parameter(module.fc2.bias.detach().to("meta"))
        module.fc3.to("meta")
    if variant == "extra":
        module.fc2.extra = nn.Parameter(torch.ones(2))
        module.fc3.extra = nn.Parameter(torch.ones(2))
    module.register_buffer("steps", torch.tensor(3))


class Plain(nn.Module):
    def __init__(self, variant: str = "base") -> None:
        super().__init__()
        _layers(self, variant)


class Nyto(NytoModule):
    def __init__(self, variant: str = "base") -> None:
        super().__init__()
        _layers(self, variant)


VARIANTS: dict[str, tuple[type[Exception], str, str]] = {
    # variant: (exception, first offending parameter, a later offending parameter that must not be named)
    "shape": (StructureError, "fc2.weight", "fc3.weight"),
    "dtype": (StructureError, "fc2.bias", "fc3.weight"),
    "device": (DeviceMismatchError, "fc2.bias", "fc3.weight"),
    "renamed": (StructureError, "fc2.weight", "fc2.bias"),
    "missing": (StructureError, "fc2.bias", "fc3.bias"),
    "extra": (StructureError, "fc2.extra", "fc3.extra"),
}


# -- snapshots --------------------------------------------------------------------------------------
def _tensors(obj: Any) -> list[tuple[str, Tensor]]:
    if isinstance(obj, nn.Module):
        return list(obj.named_parameters()) + list(obj.named_buffers())
    if isinstance(obj, Particle):
        return list(zip(obj._names, obj._leaves))
    if Swarm is not None and isinstance(obj, Swarm):
        return list(obj.params.items()) + list(obj.buffers.items())
    if isinstance(obj, Tensor):
        return [("<tensor>", obj)]
    if isinstance(obj, dict):
        return [(f"{key}/{name}", t) for key, value in obj.items() for name, t in _tensors(value)]
    if isinstance(obj, (list, tuple)):
        return [(f"{i}/{name}", t) for i, value in enumerate(obj) for name, t in _tensors(value)]
    return []


def snapshot(*operands: Any) -> list[Any]:
    """Names, tensor objects, version counters and values (cloned) of every tensor in ``operands``."""
    return [[(name, id(t), t._version, t.shape, t.dtype, t.device,
              None if t.device.type == "meta" else t.detach().clone())
             for name, t in _tensors(operand)] for operand in operands]


def same_values(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality that treats NaN as equal to NaN (same positions)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        nan_a, nan_b = torch.isnan(a), torch.isnan(b)
        return torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a], b[~nan_b])
    return torch.equal(a, b)


def assert_unchanged(before: list[Any], *operands: Any) -> None:
    after = snapshot(*operands)
    assert len(after) == len(before)
    for old, new in zip(before, after):
        assert [row[:6] for row in new] == [row[:6] for row in old], "an operand's tensors were replaced or written"
        for row_old, row_new in zip(old, new):
            if row_old[6] is not None:
                assert same_values(row_old[6], row_new[6]), f"{row_old[0]} changed"


def raises_naming(exc: type[Exception], fn: str, first: str, later: str,
                  action: Callable[[], Any], *operands: Any) -> None:
    """``action()`` raises ``exc`` whose message starts with ``fn`` (or ``fn_``), names ``first`` and not ``later``."""
    before = snapshot(*operands)
    with pytest.raises(exc, match=rf"^{re.escape(fn)}_?\b.*'{re.escape(first)}'") as info:  # lerp_ may say so
        action()
    assert f"'{later}'" not in str(info.value), str(info.value)
    assert_unchanged(before, *operands)


# -- inputs that must raise: structure mismatches ----------------------------------------------------
def _inplace(op: str) -> Callable[[Any, Any], Any]:
    def run(a: Any, b: Any) -> Any:
        if op == "add":
            a += b
        elif op == "sub":
            a -= b
        elif op == "mul":
            a *= b
        elif op == "div":
            a /= b
        else:
            a **= b
        return a
    return run


OPERATORS: dict[str, tuple[str, Callable[[Any, Any], Any]]] = {
    "+": ("add", lambda a, b: a + b),
    "-": ("sub", lambda a, b: a - b),
    "*": ("mul", lambda a, b: a * b),
    "/": ("div", lambda a, b: a / b),
    "**": ("pow", lambda a, b: a ** b),
    "+=": ("add", _inplace("add")),
    "-=": ("sub", _inplace("sub")),
    "*=": ("mul", _inplace("mul")),
    "/=": ("div", _inplace("div")),
    "**=": ("pow", _inplace("pow")),
    "lerp": ("lerp", lambda a, b: a.lerp(b, 0.5)),
    "lerp_": ("lerp", lambda a, b: a.lerp_(b, 0.5)),
    "lerp_weight": ("lerp", lambda a, b: a.lerp(a.clone(), b)),
    "lerp__weight": ("lerp", lambda a, b: a.lerp_(a.clone(), b)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("operator", sorted(OPERATORS))
@pytest.mark.parametrize("operand", ["particle", "module"])
def test_particle_operators_reject_mismatch(variant: str, operator: str, operand: str) -> None:
    exc, first, later = VARIANTS[variant]
    fn, action = OPERATORS[operator]
    base = Plain()
    a = nytorch.particle(base)
    other = Plain(variant)
    b = nytorch.particle(other) if operand == "particle" else other
    raises_naming(exc, fn, first, later, lambda: action(a, b), a, base, b, other)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("operator", sorted(OPERATORS))
@pytest.mark.parametrize("operand", ["module", "particle"])
def test_nytomodule_operators_reject_mismatch(variant: str, operator: str, operand: str) -> None:
    exc, first, later = VARIANTS[variant]
    fn, action = OPERATORS[operator]
    a = Nyto()
    other = Nyto(variant)
    b = other if operand == "module" else other.product()
    raises_naming(exc, fn, first, later, lambda: action(a, b), a, b, other)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_particle_methods_reject_mismatch(variant: str) -> None:
    exc, first, later = VARIANTS[variant]
    base, other = Plain(), Plain(variant)
    a, b = nytorch.particle(base), nytorch.particle(other)
    raises_naming(exc, "binary_operator", first, later,
                  lambda: a.binary_operator(b, lambda x, y, config: x + y), a, b)
    # copy_to: the receiving module is the reference structure
    source = nytorch.particle(other)
    target_exc = exc
    raises_naming(target_exc, "copy_to", first, later, lambda: source.copy_to(base), base, source)
    raises_naming(exc, "from_params", first, later, lambda: Particle.from_params(a, nf.params(other)), a, other)
    if variant != "extra":
        raises_naming(exc, "from_params", first, later, lambda: Particle.from_params(base, nf.params(other)),
                      base, other)


def test_from_params_names_an_extra_parameter() -> None:
    base, other = Plain(), Plain("extra")
    raises_naming(StructureError, "from_params", "fc2.extra", "fc3.extra",
                  lambda: Particle.from_params(base, nf.params(other)), base, other)


def test_from_params_names_the_first_difference_in_parameter_order() -> None:
    # 'fc1.weight' has the wrong shape and 'fc3.bias' is missing: the first in named_parameters() order
    # is the one named, as the operators do
    base = Plain()
    given = nf.params(base)
    given["fc1.weight"] = torch.zeros(4, 4)
    del given["fc3.bias"]
    with pytest.raises(StructureError, match=r"^from_params: parameter 'fc1.weight' differs: shape \(4, 3\)"):
        Particle.from_params(base, given)
    stacked = {name: value.unsqueeze(0) for name, value in given.items()}
    with pytest.raises(StructureError, match=r"^from_params: expected 'fc1.weight' of shape \(P, 4, 3\)"):
        nytorch.Swarm.from_params(base, stacked)
    with pytest.raises(TypeError, match=r"^from_params: expected a tensor for 'fc1.weight', got str"):
        nytorch.Swarm.from_params(base, {**stacked, "fc1.weight": "x"})
    complete = {name: value.unsqueeze(0) for name, value in nf.params(base).items()}
    with pytest.raises(StructureError, match=r"^from_params: Plain has no parameter or buffer named 'nope'"):
        nytorch.Swarm.from_params(base, {**complete, "nope": torch.zeros(1)})


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_nytomodule_methods_reject_mismatch(variant: str) -> None:
    exc, first, later = VARIANTS[variant]
    a, b = Nyto(), Nyto(variant)
    raises_naming(exc, "clone_from", first, later, lambda: a.clone_from(b), a, b)
    product = b.product()
    raises_naming(exc, "product_", first, later, lambda: a.product_(product), a, product)


FUNCTIONAL: dict[str, Callable[[Any, Any], Any]] = {
    "add": nf.add, "sub": nf.sub, "mul": nf.mul, "div": nf.div, "pow": nf.pow,
    "lerp": lambda a, b: nf.lerp(a, b, 0.5),
    "lerp_weight": lambda a, b: nf.lerp(a, nf.clone(a), b),
    "dot": nf.dot,
    "tree_map": lambda a, b: nf.tree_map(torch.add, a, b),
}

# Functional ops flatten dicts with optree, which sorts keys; errors still name the first leaf
# in the operand's own (named_parameters()) order.
@pytest.mark.parametrize("variant", [
    v for v in sorted(VARIANTS)])
@pytest.mark.parametrize("name", sorted(FUNCTIONAL))
def test_functional_ops_reject_mismatch(variant: str, name: str) -> None:
    exc, first, later = VARIANTS[variant]
    if name == "tree_map" and variant in ("shape", "dtype", "device"):
        pytest.skip("tree_map checks structure only: fn decides what leaf shapes/dtypes it accepts")
    fn = {"lerp_weight": "lerp"}.get(name, name)
    a, b = nf.params(Plain()), nf.params(Plain(variant))
    raises_naming(exc, fn, first, later, lambda: FUNCTIONAL[name](a, b), a, b)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bind_rejects_mismatch(variant: str) -> None:
    exc, first, later = VARIANTS[variant]
    base, other = Plain(), Plain(variant)
    params = nf.params(other)
    if variant in ("extra", "renamed"):  # bind reports an unknown key before a missing one
        first, later = {"extra": ("fc2.extra", "fc3.extra"), "renamed": ("hidden.weight", "hidden.bias")}[variant]
    raises_naming(exc, "bind", first, later, lambda: nf.bind(base, params), base, params)


# -- inputs that must raise: non-numeric operands ----------------------------------------------------
BAD_OPERANDS: dict[str, Callable[[], Any]] = {
    "str": lambda: "abc",
    "list": lambda: [1.0, 2.0],
    "dict": lambda: {"fc1.weight": 1.0},
    "none": lambda: None,
    "other_module": lambda: nn.Conv2d(1, 1, 1),
    "tensor_1d": lambda: torch.ones(3),
    "ndarray": lambda: __import__("numpy").ones(3),
    "object": lambda: object(),
}


@pytest.mark.parametrize("bad", sorted(BAD_OPERANDS))
@pytest.mark.parametrize("operator", sorted(OPERATORS))
@pytest.mark.parametrize("kind", ["particle", "nytomodule"])
def test_operators_reject_non_numeric_operands(bad: str, operator: str, kind: str) -> None:
    fn, action = OPERATORS[operator]
    base = Plain() if kind == "particle" else Nyto()
    a = nytorch.particle(base) if kind == "particle" else base
    b = BAD_OPERANDS[bad]()
    before = snapshot(a, base, b)
    with pytest.raises(TypeError) as info:
        action(a, b)
    message = str(info.value)
    type_name = type(b).__name__
    if not (operator in ("+", "-", "*", "/", "**") and bad in ("list", "ndarray")):  # Python's own message
        assert message.startswith(f"{fn}:") and type_name in message, message
    assert_unchanged(before, a, base, b)


@pytest.mark.parametrize("bad", sorted(BAD_OPERANDS))
@pytest.mark.parametrize("operator", ["-", "/", "**", "+", "*"])
def test_reflected_operators_reject_non_numeric_operands(bad: str, operator: str) -> None:
    base = Plain()
    a = nytorch.particle(base)
    b = BAD_OPERANDS[bad]()
    action = OPERATORS[operator][1]
    before = snapshot(a, base, b)
    with pytest.raises(TypeError):
        action(b, a)
    assert_unchanged(before, a, base, b)


@pytest.mark.parametrize("bad", sorted(BAD_OPERANDS))
@pytest.mark.parametrize("name", sorted(FUNCTIONAL))
def test_functional_ops_reject_non_numeric_operands(bad: str, name: str) -> None:
    a = nf.params(Plain())
    b = BAD_OPERANDS[bad]()
    before = snapshot(a)
    fn = {"lerp_weight": "lerp"}.get(name, name)
    # every one a TypeError: a dict's leaf 1.0 is not a tensor, and a tensor with dimensions is neither a
    # tree like the first operand nor a scalar (only 0-dim tensors broadcast)
    match = rf"^{fn}: expected a pytree like the first operand or a scalar as (the second operand|the weight|a rest tree), " \
            r"got a tensor of shape \(3,\)" if bad == "tensor_1d" else rf"^{fn}:"
    with pytest.raises(TypeError, match=match):
        FUNCTIONAL[name](a, b)
    assert_unchanged(before, a)


@pytest.mark.parametrize("bad", ["str", "none", "list", "object", "other_module"])
def test_unary_functional_ops_reject_non_trees(bad: str) -> None:
    b = BAD_OPERANDS[bad]()
    for fn, call in [("neg", nf.neg), ("clone", nf.clone), ("randn_like", nf.randn_like),
                     ("zeros_like", nf.zeros_like), ("norm", nf.norm)]:
        if bad == "list":
            b = [1.0, "x"]
        with pytest.raises(TypeError, match=rf"^{fn}: expected a pytree of tensors"):
            call(b)


@pytest.mark.parametrize("bad", ["str", "none", "list", "dict", "object", "tensor_1d"])
def test_module_entry_points_reject_non_modules(bad: str) -> None:
    b = BAD_OPERANDS[bad]()
    for fn, call in [("params", nf.params), ("state", nf.state), ("particle", nytorch.particle),
                     ("bind", lambda m: nf.bind(m, {})), ("call", lambda m: nf.call(m, {}))]:
        with pytest.raises(TypeError, match=rf"^{fn}: expected an nn.Module as"):
            call(b)


@pytest.mark.parametrize("bad", ["str", "none", "list", "object", "tensor_1d"])
def test_params_arguments_must_be_mappings(bad: str) -> None:
    base = Plain()
    b = BAD_OPERANDS[bad]()
    before = snapshot(base)
    with pytest.raises(TypeError, match=r"^bind: expected a mapping"):
        nf.bind(base, b)
    with pytest.raises(TypeError, match=r"^from_params: expected a mapping") as info:
        Particle.from_params(nytorch.particle(base), b)
    with pytest.raises(TypeError) as info:
        Particle.from_params(base, b)
    assert str(info.value).startswith("from_params: expected a mapping"), str(info.value)
    assert_unchanged(before, base)


def test_from_params_rejects_non_tensor_value_naming_it() -> None:
    base = Plain()
    params = dict(nf.params(base), **{"fc2.weight": [[1.0]]})
    with pytest.raises(TypeError, match=r"^from_params: expected a tensor for 'fc2.weight', got list"):
        Particle.from_params(base, params)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^bind: expected a tensor for 'fc2.weight', got list"):
        nf.bind(base, params)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^from_params: expected an nn.Module or a Particle as like, got str"):
        Particle.from_params("net", params)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["str", "none", "list", "dict", "object", "other_module"])
def test_nytomodule_methods_reject_wrong_types(bad: str) -> None:
    a = Nyto()
    b = BAD_OPERANDS[bad]()
    before = snapshot(a)
    if bad != "other_module":
        with pytest.raises(TypeError, match=rf"^clone_from: expected an nn.Module as source, got {type(b).__name__}"):
            a.clone_from(b)
    else:
        with pytest.raises(StructureError, match=r"^clone_from: parameter 'fc1.weight'"):
            a.clone_from(b)
    with pytest.raises(TypeError, match=rf"^product_: expected a Particle as product, got {type(b).__name__}"):
        a.product_(b)
    with pytest.raises(TypeError, match=r"^copy_to: expected a Nyto"):
        a.product().copy_to(nn.Conv2d(1, 1, 1))
    assert_unchanged(before, a)


def test_particle_of_another_class_is_a_type_error_naming_both() -> None:
    a = nytorch.particle(Plain())
    b = nytorch.particle(nn.Sequential(nn.Linear(3, 4)))
    before = snapshot(a, b)
    with pytest.raises(TypeError, match=r"^add: expected a Plain \(or a Particle of one\), got a Sequential"):
        a + b
    with pytest.raises(TypeError, match=r"^add: expected a Nyto \(or a Particle of one\), got a Particle of Plain"):
        Nyto() + a
    assert_unchanged(before, a, b)


MERGES: dict[str, Callable[[Any, Any], Any]] = {
    "average": lambda a, b: nytorch.merge.average([a, b]),
    "ema_": lambda a, b: nytorch.merge.ema_(a, b, decay=0.5),
    "slerp": lambda a, b: nytorch.merge.slerp(a, b, 0.5),
    "task_arithmetic": lambda a, b: nytorch.merge.task_arithmetic(a, [b]),
    "ties": lambda a, b: nytorch.merge.ties(a, [b]),
}
_MERGE_LABELS = {"average": ("models[0]", "models[1]"), "ema_": ("target", "online"), "slerp": ("first", "second"),
                 "task_arithmetic": ("base", "finetuned[0]"), "ties": ("base", "finetuned[0]")}


@pytest.mark.parametrize("name", sorted(MERGES))
def test_merges_refuse_models_of_two_classes_and_a_swarm_with_a_model(name: str) -> None:
    """Merges compared names, shapes and dtypes only: an Embedding merged with an EmbeddingBag."""
    torch.manual_seed(0)
    a, b = nn.Embedding(4, 3), nn.EmbeddingBag(4, 3)
    swarm = nytorch.Swarm.stack([a, a])
    first, second = _MERGE_LABELS[name]
    before = snapshot(a, b)
    with pytest.raises(TypeError, match=rf"^{name}: {re.escape(first)} is of class Embedding and "
                                        rf"{re.escape(second)} of class EmbeddingBag; merges combine models of one class"):
        MERGES[name](a, nytorch.particle(b))
    with pytest.raises(TypeError, match=rf"^{name}: {re.escape(first)} is a Swarm and {re.escape(second)} of class "
                                        r"Particle; a Swarm merges with Swarms"):
        MERGES[name](swarm, nytorch.particle(a))
    assert_unchanged(before, a, b)
    # pytrees are matched by names alone: the documented way to merge two classes
    assert isinstance(MERGES[name](a, nf.params(b)), nn.Embedding)


@pytest.mark.parametrize("operator", sorted(OPERATORS))
def test_scalars_that_would_change_dtype_or_device_raise_naming_first_parameter(operator: str) -> None:
    fn, action = OPERATORS[operator]
    if operator.startswith("lerp") and "weight" not in operator:
        pytest.skip("the scalar here is the end point, not an operand")
    base = Plain()
    a = nytorch.particle(base)
    before = snapshot(a, base)
    with pytest.raises(TypeError, match=rf"^{fn}: the scalar .* would turn parameter 'fc1.weight'"):
        action(a, 1j)
    with pytest.raises(DeviceMismatchError, match=rf"^{fn}: the scalar operand is on meta but parameter "
                                                  r"'fc1.weight' is on cpu"):
        action(a, torch.tensor(2.0, device="meta"))
    assert_unchanged(before, a, base)


_FORMS: dict[str, Callable[[], Any]] = {
    "particle": lambda: nytorch.particle(Plain()),
    "particle pack=False": lambda: nytorch.particle(Plain(), pack=False),
    "NytoModule": Nyto,
    "NytoModule packed": lambda: Nyto() + 0,
    "Swarm": lambda: nytorch.Swarm.stack([Plain(), Plain()]),
    "functional": lambda: nf.params(Plain()),
}


def _values(model: Any) -> dict[str, torch.Tensor]:
    """Copies of every parameter of any form in ``_FORMS``."""
    if isinstance(model, nn.Module):
        model = nf.params(model)
    elif not isinstance(model, dict):
        model = model.params
    return {name: value.detach().clone() for name, value in model.items()}


@pytest.mark.parametrize("form", sorted(_FORMS))
@pytest.mark.parametrize("scalar", [1j, np.complex64(1j), torch.tensor(1j)], ids=["complex", "numpy", "tensor"])
def test_scalar_errors_describe_the_parameter_not_its_buffer(form: str, scalar: object) -> None:
    # a packed model's first parameter sits at the start of a buffer of 26 values: the message
    # gives the parameter's own shape; a NumPy complex scalar is complex (torch alone drops its
    # imaginary part with a warning)
    model = _FORMS[form]()
    before = _values(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ComplexWarning either
        with pytest.raises(TypeError, match=r"^mul: the scalar .* would turn parameter 'fc1.weight' "
                                            r"\(shape \(4, 3\) float32\) into complex64"):
            nf.mul(model, scalar) if isinstance(model, dict) else model * scalar
    after = _values(model)
    assert all(torch.equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize("form", sorted(_FORMS))
def test_subtracting_a_boolean_is_a_type_error(form: str) -> None:
    model = _FORMS[form]()
    before = _values(model)
    message = r"expected a number to subtract, got the boolean (True|tensor\(True\)) \(torch does not subtract booleans\)"
    if isinstance(model, dict):
        calls = [("sub", lambda: nf.sub(model, True)), ("sub", lambda: nf.sub(True, model))]  # the function called
    else:
        calls = [("sub", lambda: model - True), ("rsub", lambda: True - model),
                 ("sub", lambda: model.__isub__(True)), ("sub", lambda: model - torch.tensor(True))]
    for fn, call in calls:
        with pytest.raises(TypeError, match=rf"^{fn}: {message}"):
            call()
    after = _values(model)
    assert all(torch.equal(before[name], after[name]) for name in before)
    added = nf.add(model, True) if isinstance(model, dict) else model + True  # adding a boolean is adding 1
    assert torch.equal(_values(added)["fc1.weight"], before["fc1.weight"] + 1)


def test_product_underscore_names_itself_and_the_right_classes() -> None:
    net = Nyto()
    before = snapshot(net)
    with pytest.raises(TypeError, match=r"^product_: expected a Particle of a Nyto, got a Particle of Linear"):
        net.product_(nytorch.particle(nn.Linear(2, 2)))
    with pytest.raises(StructureError, match=r"^product_: parameter 'fc2.weight'"):
        net.product_(Nyto("shape").product())
    assert_unchanged(before, net)


@pytest.mark.parametrize("form", ["particle", "particle pack=False", "NytoModule"])
@pytest.mark.parametrize("end", [1.5, torch.tensor(1.0)], ids=["number", "tensor"])
def test_lerp_toward_a_number_names_the_functional_form(form: str, end: object) -> None:
    model = _FORMS[form]()
    before = _values(model)
    for fn, call in (("lerp", lambda: model.lerp(end, 0.25)), ("lerp_", lambda: model.lerp_(end, 0.25))):
        with pytest.raises(TypeError, match=rf"^{fn}: expected a model or a Particle as end, got the number .*"
                                            r"nytorch.functional.lerp"):
            call()
    after = _values(model)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_set_param_config_and_get_param_id_reject_unknown() -> None:
    net = Nyto()
    for fn, call in (("set_param_config", lambda name: net.set_param_config(operational=False, name=name)),
                     ("apply_param_config", lambda name: net.apply_param_config(lambda *_: None, name=name))):
        with pytest.raises(ValueError, match=rf"^{fn}: Nyto has no submodule or parameter named 'fc9'"):
            call("fc9")
        with pytest.raises(TypeError, match=rf"^{fn}: expected a str or None as name, got int"):
            call(3)
    with pytest.raises(TypeError, match=r"^set_param_config: expected True, False or None as clone, got str"):
        net.set_param_config(clone="no")  # type: ignore[arg-type]
    assert all(config.clone for _, config in net._configs_in_scope("test", None))
    with pytest.raises(ValueError, match=r"^get_param_id: the given parameter \(\(2,\)\) is not a parameter"):
        net.get_param_id(nn.Parameter(torch.ones(2)))


# -- failures inside the kernels must not half-apply -------------------------------------------------
class _Expanded(nn.Module):
    """The second parameter is an expanded view: in-place writes to it fail inside torch."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(3))
        self.b = nn.Parameter(torch.zeros(1).expand(3))


def test_inplace_failure_inside_torch_changes_nothing() -> None:
    model = _Expanded()
    p = nytorch.particle(model)
    before = snapshot(model)
    with pytest.raises(Exception):  # noqa: B017 - whatever torch raises, nothing may change
        p += 1
    assert_unchanged(before, model)


@pytest.mark.parametrize("form", ["particle", "particle pack=False", "NytoModule"])
def test_models_made_under_inference_mode(form: str) -> None:
    # an inference tensor has no version counter: such a model is never packed, works out of place
    # everywhere and in place inside inference mode, and outside it an in-place step is refused by name
    with torch.inference_mode():
        model = Nyto() if form == "NytoModule" else Plain()
    target = model if form == "NytoModule" else nytorch.particle(model, pack=form == "particle")
    before = _values(model)  # inference tensors have no version counter to snapshot
    objects = [id(param) for param in model.parameters()]
    expected = {name: value + 1 for name, value in before.items()}
    assert all(torch.equal(_values(target + 1)[name], expected[name]) for name in expected)
    assert all(torch.equal(_values(target.clone())[name], before[name]) for name in before)
    for call in (lambda: target.__iadd__(1), lambda: target.lerp_(target, 0.5)):
        with pytest.raises(RuntimeError, match=r"parameter 'fc1.weight' is an inference tensor and cannot be "
                                               r"updated in place outside torch.inference_mode\(\)"):
            call()
        assert all(torch.equal(_values(model)[name], before[name]) for name in before)
    assert [id(param) for param in model.parameters()] == objects
    with torch.inference_mode():
        target += 1
    assert all(torch.equal(_values(model)[name], expected[name]) for name in expected)


class _Lazy(NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.LazyLinear(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_lazy_modules_are_refused_by_name_until_their_first_forward() -> None:
    message = r"parameter '{}' is not initialised yet \(a lazy module\); run one forward pass first"
    for call, name in ((lambda: _Lazy() + 1, "fc.weight"), (lambda: _Lazy().clone(), "fc.weight"),
                       (lambda: nf.params(nn.LazyLinear(2)), "weight"), (lambda: nf.state(nn.LazyLinear(2)), "weight"),
                       (lambda: nytorch.Swarm.stack([nn.LazyLinear(2)]), "weight"),
                       (lambda: nytorch.particle(nn.LazyLinear(2)), "weight")):
        with pytest.raises(ValueError, match=message.format(name)):
            call()
    net = _Lazy()
    net(torch.ones(1, 3))
    assert torch.equal((net + 1).fc.weight, net.fc.weight + 1)


# -- Swarm ------------------------------------------------------------------------------------------
@needs_swarm
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("operator", sorted(OPERATORS))
@pytest.mark.parametrize("operand", ["particle", "module", "swarm"])
def test_swarm_operators_reject_mismatch(variant: str, operator: str, operand: str) -> None:
    assert Swarm is not None
    exc, first, later = VARIANTS[variant]
    fn, action = OPERATORS[operator]
    base = Plain()
    swarm = Swarm.stack([base, Plain()])
    other = Plain(variant)
    b: Any = {"particle": lambda: nytorch.particle(other), "module": lambda: other,
              "swarm": lambda: Swarm.stack([other, Plain(variant)])}[operand]()
    raises_naming(exc, fn, first, later, lambda: action(swarm, b), swarm, base, b, other)


@needs_swarm
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_swarm_constructors_reject_mismatch(variant: str) -> None:
    assert Swarm is not None
    exc, first, later = VARIANTS[variant]
    base, other = Plain(), Plain(variant)
    raises_naming(exc, "stack", first, later, lambda: Swarm.stack([base, other]), base, other)
    stacked = {name: torch.stack([t, t]) for name, t in nf.params(other).items()}
    if variant not in ("extra", "renamed"):  # from_params reports an unknown key before a missing one
        raises_naming(exc, "from_params", first, later, lambda: Swarm.from_params(base, stacked), base, stacked)


@needs_swarm
@pytest.mark.parametrize("bad", sorted(BAD_OPERANDS))
@pytest.mark.parametrize("operator", sorted(OPERATORS))
def test_swarm_rejects_non_numeric_operands(bad: str, operator: str) -> None:
    assert Swarm is not None
    fn, action = OPERATORS[operator]
    swarm = Swarm.stack([Plain(), Plain()])
    b = BAD_OPERANDS[bad]()
    before = snapshot(swarm, b)
    with pytest.raises((TypeError, StructureError)) as info:  # a 1-D tensor of the wrong length: StructureError
        action(swarm, b)
    message = str(info.value)
    assert re.match(rf"^{fn}_?:", message), message
    assert type(b).__name__ in message or "shape (3,)" in message or "length 3" in message, message
    assert_unchanged(before, swarm, b)


@needs_swarm
def test_swarm_rejects_bad_weights_naming_first_parameter() -> None:
    assert Swarm is not None
    swarm = Swarm.stack([Plain(), Plain(), Plain()])
    before = snapshot(swarm)
    with pytest.raises(StructureError, match=r"^mul_?: expected one weight per member .*length 3\), got length 2"):
        swarm * torch.ones(2)
    with pytest.raises(StructureError, match=r"^mul_?: expected one weight per member .*length 3\), got length 4"):
        swarm *= torch.ones(4)
    with pytest.raises(TypeError, match=r"^mul_?: complex weights would turn parameter 'fc1.weight'"):
        swarm *= torch.ones(3, dtype=torch.complex64)
    with pytest.raises(DeviceMismatchError, match=r"^mul_?: the weights are on meta but parameter 'fc1.weight'"):
        swarm *= torch.ones(3, device="meta")
    assert_unchanged(before, swarm)
    with pytest.raises(ValueError, match=r"^stack: expected at least one module or Particle"):
        Swarm.stack([])
    with pytest.raises(TypeError, match=r"^stack: expected modules or Particles, but item 1 is a str"):
        Swarm.stack([Plain(), "x"])


needs_distributed = pytest.mark.skipif(
    ndist is None or not hasattr(ndist, "all_reduce_mean") or not torch.distributed.is_available(),
    reason="nytorch.distributed is not available in this checkout")
DISTRIBUTED = ("broadcast", "all_reduce_mean", "all_gather", "best", "exchange")


def _collective(fn: str, x: Any, rank: int = 0) -> Callable[[], Any]:
    assert ndist is not None
    return {"broadcast": lambda: ndist.broadcast(x, 0, timeout=30),
            "all_reduce_mean": lambda: ndist.all_reduce_mean(x, timeout=30),
            "all_gather": lambda: ndist.all_gather(x, timeout=30),
            "best": lambda: ndist.best(x, float(rank), timeout=30),
            "exchange": lambda: ndist.exchange(x, timeout=30)}[fn]


@needs_distributed
@pytest.mark.parametrize("bad", ["str", "none", "list", "dict", "object", "tensor_1d", "ndarray"])
def test_distributed_helpers_reject_non_models(world_of_one: Any, bad: str) -> None:
    b = BAD_OPERANDS[bad]()
    for fn in DISTRIBUTED:
        with pytest.raises(TypeError, match=rf"^{fn}: expected an nn.Module, a Particle or a Swarm, got"):
            _collective(fn, b)()
    net = Plain()
    before = snapshot(net)
    with pytest.raises((TypeError, ValueError), match=r"^best: expected loss as a number or a one-element tensor"):
        ndist.best(net, b, timeout=30)  # type: ignore[union-attr]
    assert_unchanged(before, net)


_WORKER = """
import json, os, sys
import torch, torch.distributed as dist
from torch import nn
sys.path.insert(0, {tests!r})
import nytorch
from test_bad_input import DISTRIBUTED, Plain, _collective, assert_unchanged, snapshot
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=rank, world_size=2)
rows = []
for variant in ["shape", "dtype", "renamed", "missing", "extra"]:
    for fn in DISTRIBUTED:
        for kind in ["module", "particle"]:
            model = Plain(variant if rank == 1 else "base")
            x = model if kind == "module" else nytorch.particle(model)
            before = snapshot(model)
            try:
                _collective(fn, x, rank)()
                error = None
            except Exception as exc:
                error = [type(exc).__name__, str(exc)]
            try:
                assert_unchanged(before, model)
                unchanged = True
            except AssertionError:
                unchanged = False
            rows.append(dict(variant=variant, fn=fn, kind=kind, error=error, unchanged=unchanged))
dist.destroy_process_group()
print(json.dumps(rows))
"""


@pytest.mark.slow
@needs_distributed
def test_distributed_helpers_reject_mismatch_across_ranks(tmp_path: Any) -> None:
    """Two gloo ranks whose models differ: every collective raises on both ranks, names the parameter,
    and moves no data."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(tests=os.path.dirname(__file__), store=str(tmp_path / "store")))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    workers = [subprocess.Popen([sys.executable, str(script), str(rank)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env) for rank in (0, 1)]
    outputs = []
    for worker in workers:
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-2000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    for rank, rows in enumerate(outputs):
        assert len(rows) == 5 * len(DISTRIBUTED) * 2
        for row in rows:
            exc, first, later = VARIANTS[row["variant"]]
            where = (rank, row["variant"], row["fn"], row["kind"])
            assert row["error"] is not None, where
            name, message = row["error"]
            assert name == exc.__name__, (where, name, message)
            assert message.startswith(f"{row['fn']}:") and f"'{first}'" in message, (where, message)
            assert f"'{later}'" not in message, (where, message)
            assert row["unchanged"], where


# == unusual inputs that must work ===================================================================
class IntOnly(NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.counts = nn.Parameter(torch.arange(4), requires_grad=False)
        self.flags = nn.Parameter(torch.tensor([True, False]), requires_grad=False)
        self.register_buffer("steps", torch.tensor(7))


def _all_ops(p: Any, q: Any) -> list[Any]:
    return [p + 1, p - q, p * 2.5, p / 0, p ** 2, 2 - p, 1 / p, 2 ** p, -p, +p, p.lerp(q, 0.3), p.randn(),
            p.clone()]


@pytest.mark.parametrize("kind", ["particle", "nytomodule"])
def test_integer_only_models_are_carried_unchanged(kind: str) -> None:
    model, other = IntOnly(), IntOnly()
    with torch.no_grad():
        other.counts.add_(5)
    p = nytorch.particle(model) if kind == "particle" else model
    q = nytorch.particle(other) if kind == "particle" else other
    for result in _all_ops(p, q):
        values = result.params if kind == "particle" else nf.params(result)
        assert torch.equal(values["counts"], torch.arange(4)) and values["counts"].dtype == torch.int64
        assert torch.equal(values["flags"], torch.tensor([True, False]))
        assert values["counts"].data_ptr() != model.counts.data_ptr()  # carried by copy, not shared
    before = snapshot(model)
    for action in (_inplace("add"), _inplace("div"), lambda a, b: a.lerp_(b, 0.5)):
        action(p, q)
    assert_unchanged(before, model)
    tree = {"i": torch.arange(3), "b": torch.tensor([True])}
    assert torch.equal(nf.div(tree, 0)["i"], torch.arange(3)) and nf.norm(tree).item() == 0.0
    assert nf.dot(tree, tree).item() == 0.0


class Empty(NytoModule):
    def forward(self, x: Tensor) -> Tensor:
        return x


@pytest.mark.parametrize("kind", ["particle", "nytomodule", "plain_relu"])
def test_empty_models_work(kind: str) -> None:
    model: nn.Module = nn.ReLU() if kind == "plain_relu" else Empty()
    p: Any = model if kind == "nytomodule" else nytorch.particle(model)
    for result in _all_ops(p, p):
        values = nf.params(result) if kind == "nytomodule" else result.params
        assert values == {}
    p += p
    p *= 3
    p.lerp_(p, 0.5)
    out = p if kind == "nytomodule" else (p + 1).module()
    assert type(out) is type(model) and list(out.parameters()) == []
    assert nf.add({}, 1) == {} and nf.neg({}) == {}
    assert nf.norm({}).item() == 0.0 and nf.dot({}, {}).item() == 0.0


def _nonfinite_model() -> nn.Linear:
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, float("inf"), float("nan")]]))
        model.bias.copy_(torch.tensor([-0.0]))
    return model


@pytest.mark.parametrize("kind", ["particle", "functional", "nytomodule"])
def test_nan_inf_and_division_by_zero_follow_ieee(kind: str) -> None:
    model = _nonfinite_model()
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    cases = [
        (lambda p: p / 0, lambda t: t / 0),
        (lambda p: 1 / p, lambda t: 1 / t),
        (lambda p: p * 0, lambda t: t * 0),
        (lambda p: p ** -1, lambda t: t ** -1),
        (lambda p: p + float("nan"), lambda t: t + float("nan")),
        (lambda p: p - float("inf"), lambda t: t - float("inf")),
        (lambda p: 0 ** p, lambda t: torch.pow(0, t)),
        (lambda p: p.lerp(p * 0, float("inf")), lambda t: torch.lerp(t, t * 0, float("inf"))),
    ]
    for op, reference in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # IEEE arithmetic: silent, no warning, no exception
            if kind == "functional":
                result = op(_FunctionalBox(nf.params(model))).tree
            elif kind == "particle":
                result = op(nytorch.particle(model)).params
            else:
                result = nf.params(op(_nyto_of(model)))
        assert same_values(result["weight"], reference(w)), (result["weight"], reference(w))
        assert same_values(result["bias"], reference(b))
    p = nytorch.particle(model)
    p /= 0
    assert same_values(model.weight.detach(), w / 0) and same_values(model.bias.detach(), b / 0)


class _FunctionalBox:
    """Routes operators to ``nytorch.functional`` so one case list serves every style."""

    def __init__(self, tree: Any) -> None:
        self.tree = tree

    def _wrap(self, value: Any) -> Any:
        return value.tree if isinstance(value, _FunctionalBox) else value

    def __add__(self, o: Any) -> "_FunctionalBox":
        return _FunctionalBox(nf.add(self.tree, self._wrap(o)))

    def __sub__(self, o: Any) -> "_FunctionalBox":
        return _FunctionalBox(nf.sub(self.tree, self._wrap(o)))

    def __mul__(self, o: Any) -> "_FunctionalBox":
        return _FunctionalBox(nf.mul(self.tree, self._wrap(o)))

    def __truediv__(self, o: Any) -> "_FunctionalBox":
        return _FunctionalBox(nf.div(self.tree, self._wrap(o)))

    def __rtruediv__(self, o: Any) -> "_FunctionalBox":
        return _FunctionalBox(nf.div(o, self.tree))

    def __pow__(self, o: Any) -> "_FunctionalBox":
        return _FunctionalBox(nf.pow(self.tree, self._wrap(o)))

    def __rpow__(self, o: Any) -> "_FunctionalBox":
        return _FunctionalBox(nf.pow(o, self.tree))

    def lerp(self, end: Any, weight: Any) -> "_FunctionalBox":
        return _FunctionalBox(nf.lerp(self.tree, self._wrap(end), weight))


class _NytoLinear(NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 3))
        self.bias = nn.Parameter(torch.zeros(1))


def _nyto_of(model: nn.Linear) -> _NytoLinear:
    net = _NytoLinear()
    with torch.no_grad():
        net.weight.copy_(model.weight)
        net.bias.copy_(model.bias)
    return net


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_zero_size_tensors_work() -> None:
    with torch.no_grad():
        model = nn.Sequential(nn.Linear(0, 3), nn.Linear(3, 2))
    p = nytorch.particle(model)
    q = (p + 1) * p - p / 2
    assert q.params["0.weight"].shape == (3, 0) and q.params["0.weight"].dtype == torch.float32
    expected = {name: (t + 1) * t - t / 2 for name, t in nf.params(model).items()}
    for name, value in q.params.items():
        assert torch.equal(value, expected[name]), name
    p += p
    assert nf.norm({"e": torch.zeros(0)}).item() == 0.0
    assert torch.equal(nf.dot(p.params, p.params), sum((t * t).sum() for t in p.params.values()))
    assert q.module()(torch.zeros(5, 0)).shape == (5, 2)


def test_meta_device_models_work() -> None:
    model = Plain().to("meta")
    p = nytorch.particle(model)
    for result in _all_ops(p, p) + [p.lerp(p, 0.5)]:
        for name, value in result.params.items():
            source = dict(model.named_parameters()).get(name)
            if source is None:
                continue
            assert value.device.type == "meta" and value.shape == source.shape and value.dtype == source.dtype
    p += 1
    module = (p * 2).module()
    assert all(t.device.type == "meta" for t in module.parameters())
    net = Nyto().to("meta")
    assert all(t.device.type == "meta" for t in (net + net).parameters())
    tree = nf.params(model)
    assert nf.add(tree, tree)["fc1.weight"].device.type == "meta"


def _channels_last_net() -> nn.Sequential:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1))
    return net.to(memory_format=torch.channels_last)


def _layout(t: Tensor) -> tuple[int, ...]:
    """Strides of the dimensions longer than 1 (the strides of size-1 dimensions carry no meaning)."""
    return tuple(stride for size, stride in zip(t.shape, t.stride()) if size > 1)


def test_non_contiguous_and_channels_last_parameters() -> None:
    net = _channels_last_net()
    linear = nn.Linear(3, 4)
    linear.weight = nn.Parameter(torch.randn(3, 4).t())  # a transposed, non-contiguous parameter
    assert not linear.weight.is_contiguous()
    for model in (net, linear):
        reference = {name: t.detach().clone() for name, t in model.named_parameters()}
        p = nytorch.particle(model)
        results = {"add": (p + p, lambda t: t + t), "mul": (p * 3, lambda t: t * 3),
                   "lerp": (p.lerp(p * 0, 0.25), lambda t: torch.lerp(t, t * 0, 0.25)),
                   "clone": (p.clone(), lambda t: t)}
        for label, (result, fn) in results.items():
            for name, value in result.params.items():
                assert torch.equal(value, fn(reference[name])), (label, name)
                assert _layout(value) == _layout(reference[name]), (label, name)  # memory layout kept
        p += 1
        for name, value in model.named_parameters():
            assert torch.equal(value.detach(), reference[name] + 1)
            assert _layout(value.detach()) == _layout(reference[name])
        module = (p * 2).module()
        x = torch.randn(2, 3, 5, 5) if model is net else torch.randn(2, 3)
        expected = torch.func.functional_call(model, {n: (t.detach() * 2) for n, t in model.named_parameters()},
                                              (x,))
        assert torch.allclose(module(x), expected)


def test_requires_grad_false_parameters_keep_their_flag() -> None:
    model = Plain()
    model.fc2.weight.requires_grad_(False)
    for result in [(nytorch.particle(model) * 2).module(), (nytorch.particle(model) + 1).randn().module()]:
        flags = {name: t.requires_grad for name, t in result.named_parameters()}
        assert flags == {name: t.requires_grad for name, t in model.named_parameters()}
        assert torch.is_tensor(result.fc2.weight) and result.fc2.weight.grad_fn is None
    net = Nyto()
    net.fc1.bias.requires_grad_(False)
    out = net * 3
    assert not out.fc1.bias.requires_grad and out.fc1.weight.requires_grad
    assert torch.equal(out.fc1.bias, net.fc1.bias * 3)


class Containers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pl = nn.ParameterList([nn.Parameter(torch.randn(2)), nn.Parameter(torch.randn(3, 1))])
        self.pd = nn.ParameterDict({"alpha": nn.Parameter(torch.randn(4)), "beta": nn.Parameter(torch.randn(1))})


def test_parameter_list_and_dict() -> None:
    model = Containers()
    names = [name for name, _ in model.named_parameters()]
    assert names == ["pl.0", "pl.1", "pd.alpha", "pd.beta"]
    p = nytorch.particle(model)
    reference = {name: t.detach().clone() for name, t in model.named_parameters()}
    out = (p * 2 + 1).module()
    assert isinstance(out.pl, nn.ParameterList) and isinstance(out.pd, nn.ParameterDict)
    assert torch.equal(out.pl[1], model.pl[1] * 2 + 1) and torch.equal(out.pd["alpha"], model.pd["alpha"] * 2 + 1)
    assert list(out.pd.keys()) == ["alpha", "beta"] and len(out.pl) == 2
    assert [name for name, _ in out.named_parameters()] == names
    p -= 1
    assert torch.equal(model.pd["beta"].detach(), reference["pd.beta"] - 1)
    assert torch.equal(model.pl[0].detach(), reference["pl.0"] - 1)


def test_parameter_dict_results_do_not_share_keys_with_the_source() -> None:
    model = Containers()
    out = (nytorch.particle(model) + 1).module()
    out.pd["gamma"] = nn.Parameter(torch.ones(1))
    assert list(model.pd.keys()) == ["alpha", "beta"]


def test_models_with_hooks() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    calls: list[str] = []
    model[0].register_forward_hook(lambda module, args, output: output + 100.0)
    model.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    model[1].register_forward_hook(lambda module, args, output: calls.append("hook") or None)
    x = torch.randn(4, 3)
    p = nytorch.particle(model)
    doubled = (p * 2).module()
    params = {name: t.detach() * 2 for name, t in model.named_parameters()}
    h = torch.nn.functional.linear(x * 2, params["0.weight"], params["0.bias"]) + 100.0
    expected = torch.nn.functional.linear(h, params["1.weight"], params["1.bias"])
    calls.clear()
    assert torch.allclose(doubled(x), expected) and calls == ["hook"]
    # a hook added to the result does not reach the source, and vice versa
    doubled[1].register_forward_hook(lambda module, args, output: output * 0)
    calls.clear()
    assert not torch.equal(model(x), torch.zeros(4, 1)) and calls == ["hook"]
    assert torch.equal(doubled(x), torch.zeros(4, 1))
    # arithmetic itself ignores hooks: values are plain per-tensor results
    for name, value in (p + p).params.items():
        assert torch.equal(value, params[name])


class _Symmetric(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.triu() + x.triu(1).transpose(-1, -2)


def _parametrized(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    parametrize.register_parametrization(net[0], "weight", _Symmetric())
    return net


def test_parametrize_arithmetic_acts_on_named_parameters() -> None:
    a, b = _parametrized(0), _parametrized(1)
    assert [name for name, _ in a.named_parameters()] == [
        "0.bias", "0.parametrizations.weight.original", "1.weight", "1.bias"]
    p, q = nytorch.particle(a), nytorch.particle(b)
    mixed = (p + q) / 2
    original = (a[0].parametrizations.weight.original + b[0].parametrizations.weight.original).detach() / 2
    assert torch.equal(mixed.params["0.parametrizations.weight.original"], original)
    module = mixed.module()
    assert torch.allclose(module[0].weight, _Symmetric()(original))
    assert torch.allclose(module[0].weight, module[0].weight.T)
    x = torch.randn(2, 3)
    assert module(x).shape == (2, 1)
    p += q  # in place through the parametrization's original
    assert torch.equal(a[0].parametrizations.weight.original.detach(), original * 2)


def test_parametrized_roots_combine() -> None:
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    for model in (a, b):
        parametrize.register_parametrization(model, "weight", _Symmetric())
    mixed = nytorch.particle(a) + nytorch.particle(b)
    assert torch.equal(mixed.params["parametrizations.weight.original"],
                       (a.parametrizations.weight.original + b.parametrizations.weight.original).detach())


@needs_swarm
def test_swarm_unusual_members() -> None:
    assert Swarm is not None
    for make in (lambda: nn.ReLU(), IntOnly, _nonfinite_model, _channels_last_net):
        members = [make(), make()]
        swarm = Swarm.stack(members)
        doubled = swarm * 2
        for i, member in enumerate(members):
            for name, value in nf.params(member).items():
                expected = value * 2 if value.is_floating_point() else value
                assert same_values(doubled[i].params[name], expected), name


def _scalar_styles() -> list[tuple[str, Callable[[object], object]]]:
    class Net(nytorch.NytoModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(2, 2)

    particle, module = nytorch.particle(nn.Linear(2, 2)), Net()
    tree = nf.params(nn.Linear(2, 2))
    swarm = nytorch.Swarm.stack([nn.Linear(2, 2) for _ in range(2)])
    return [("Particle", lambda s: particle * s), ("NytoModule", lambda s: module * s),
            ("functional", lambda s: nf.mul(tree, s)), ("Swarm", lambda s: swarm * s),
            ("reflected", lambda s: s * particle)]


@pytest.mark.parametrize("scalar, error, message", [
    (Fraction(1, 2), TypeError, r"mul: expected a Python or NumPy number or a 0-dim tensor as the scalar, got "
                                r"Fraction Fraction\(1, 2\); convert it with float\(\.\.\.\) first"),
    (Decimal("1.5"), TypeError, r"mul: expected a Python or NumPy number or a 0-dim tensor as the scalar, got "
                                r"Decimal Decimal\('1\.5'\)"),
    (10 ** 400, OverflowError, r"mul: the integer 100000000000\.\.\. \(401 digits\) does not fit in 64 bits, which "
                               r"is what torch takes for a scalar; use a float"),
    (-(2 ** 63) - 1, OverflowError, r"mul: the integer -9223372036854775809 does not fit in 64 bits"),
    (np.uint64(2 ** 63), TypeError, r"mul: torch cannot take the NumPy uint64 9223372036854775808 as a scalar; "
                                    r"pass int\(\.\.\.\) of it"),
])
def test_numbers_torch_cannot_take_are_refused_by_name_everywhere(scalar, error, message):
    for style, multiply in _scalar_styles():
        with pytest.raises(error, match="^" + message):
            multiply(scalar)


@pytest.mark.parametrize("scalar", [np.bool_(True), 2 ** 63, -(2 ** 63), np.int64(-3), np.float32(0.5)])
def test_numpy_booleans_and_64_bit_ints_are_numbers_like_any_other(scalar):
    layer = nn.Linear(2, 2)
    expected = layer.weight.detach() * float(scalar)
    assert torch.allclose(nytorch.particle(layer).__mul__(scalar).params["weight"], expected)
    assert torch.allclose(nf.mul(nf.params(layer), scalar)["weight"], expected)
    for _, multiply in _scalar_styles():
        multiply(scalar)
