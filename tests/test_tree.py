# mypy: disable-error-code="union-attr, index, operator, arg-type, assignment"
# (nn.Module.__getattr__ is typed `Tensor | Module`: attribute access on models is untyped noise here)
"""Leaf-wise functions of ``nytorch.functional`` on pytrees, against per-leaf torch loops."""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import optree
import pytest
import torch
from conftest import MLP, is_arith

import nytorch
import nytorch.functional as nf
from nytorch import StructureError

Tensor = torch.Tensor


def _trees(seed: int = 0, positive: bool = False) -> dict[str, Any]:
    """Sample trees: every container kind, nested, plus integer/bool and complex leaves."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        t = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
        return t.abs() + 0.5 if positive else t

    return {
        "dict": {"weight": r(3, 2), "bias": r(3)},
        "list": [r(2), r(2, 2), r(1)],
        "tuple": (r(4), r(1, 1, 3)),
        "nested": {"layer": {"w": r(2, 3), "b": [r(3), (r(1),)]}, "scale": r(())},
        "bare": r(5),
        "dtypes": {"f64": r(3, dtype=torch.float64), "f16": r(2, dtype=torch.float16),
                   "count": torch.tensor(7), "mask": torch.tensor([True, False]), "idx": torch.arange(3)},
    }


TREE_KINDS = sorted(_trees())


def _ref(fn: Callable[..., Tensor], *trees: Any) -> Any:
    """Per-leaf reference: ``fn`` on floating/complex leaves, others carried."""
    return optree.tree_map(lambda x, *rest: fn(x, *rest) if is_arith(x) else x, *trees)


def _assert_tree(actual: Any, expected: Any, *, exact: bool = True) -> None:
    leaves_a, spec_a = optree.tree_flatten(actual)
    leaves_e, spec_e = optree.tree_flatten(expected)
    assert spec_a == spec_e, (spec_a, spec_e)
    for a, e in zip(leaves_a, leaves_e):
        assert isinstance(a, Tensor)
        assert a.dtype == e.dtype and a.shape == e.shape and a.device == e.device, (a, e)
        if exact:
            assert torch.equal(a, e) or torch.allclose(a, e, equal_nan=True, rtol=0, atol=0), (a, e)
        else:
            assert torch.allclose(a, e, rtol=1e-5, atol=1e-6, equal_nan=True), (a, e)


def _snapshot(tree: Any) -> list[tuple[int, Tensor]]:
    return [(id(t), t.clone()) for t in optree.tree_leaves(tree)]


def _unchanged(tree: Any, before: list[tuple[int, Tensor]]) -> None:
    leaves = optree.tree_leaves(tree)
    assert [id(t) for t in leaves] == [i for i, _ in before]
    for leaf, (_, value) in zip(leaves, before):
        assert torch.equal(leaf, value)


def _no_alias(result: Any, *inputs: Any) -> None:
    inputs_ptrs = {t.data_ptr() for tree in inputs for t in optree.tree_leaves(tree)
                   if isinstance(t, Tensor) and t.numel()}
    for leaf in optree.tree_leaves(result):
        if leaf.numel():
            assert leaf.data_ptr() not in inputs_ptrs


BINARY: dict[str, tuple[Callable[..., Any], Callable[..., Tensor]]] = {
    "add": (nf.add, torch.add), "sub": (nf.sub, torch.sub), "mul": (nf.mul, torch.mul),
    "div": (nf.div, torch.div), "pow": (nf.pow, torch.pow),
}


# -- binary ops: tree with tree, tree with scalar, scalar with tree -------------------------
@pytest.mark.parametrize("kind", TREE_KINDS)
@pytest.mark.parametrize("op", sorted(BINARY))
def test_binary_tree_tree(op: str, kind: str) -> None:
    fn, ref = BINARY[op]
    a, b = _trees(0, positive=True)[kind], _trees(1, positive=True)[kind]
    sa, sb = _snapshot(a), _snapshot(b)
    out = fn(a, b)
    _assert_tree(out, _ref(ref, a, b))
    _unchanged(a, sa)
    _unchanged(b, sb)
    _no_alias(out, a, b)


@pytest.mark.parametrize("scalar", [2, 2.5, -0.5, True, torch.tensor(1.5), torch.tensor(3, dtype=torch.int64),
                                    torch.tensor(0.5, dtype=torch.float64)], ids=repr)
@pytest.mark.parametrize("kind", TREE_KINDS)
@pytest.mark.parametrize("op", sorted(BINARY))
def test_binary_tree_scalar_and_reflected(op: str, kind: str, scalar: Any) -> None:
    fn, ref = BINARY[op]
    a = _trees(2, positive=True)[kind]
    before = _snapshot(a)
    if op == "sub" and scalar is True:
        pytest.skip("torch itself refuses `tensor - True`")
    # fused kernels may round a tensor scalar differently in the last bit than the plain op
    exact = not isinstance(scalar, Tensor)
    out = fn(a, scalar)
    _assert_tree(out, _ref(lambda x: ref(x, scalar).to(x.dtype), a), exact=exact)
    reflected = fn(scalar, a)
    _assert_tree(reflected, _ref(lambda x: ref(scalar, x).to(x.dtype), a), exact=exact)
    _unchanged(a, before)
    _no_alias(out, a)
    _no_alias(reflected, a)


def test_integer_and_bool_leaves_are_carried_unchanged() -> None:
    tree = _trees()["dtypes"]
    for out in (nf.add(tree, 3.5), nf.mul(tree, tree), nf.neg(tree), nf.pow(2, tree),
                nf.lerp(tree, tree, 0.3), nf.randn_like(tree), nf.zeros_like(tree)):
        for key in ("count", "mask", "idx"):
            assert torch.equal(out[key], tree[key]) and out[key].dtype == tree[key].dtype
            assert out[key] is not tree[key]


def test_complex_leaves_take_part() -> None:
    a = {"z": torch.tensor([1 + 2j, -1j], dtype=torch.complex64), "r": torch.tensor([1.0])}
    b = {"z": torch.tensor([3 - 1j, 2 + 0j], dtype=torch.complex64), "r": torch.tensor([2.0])}
    _assert_tree(nf.mul(a, b), {"z": a["z"] * b["z"], "r": torch.tensor([2.0])})
    _assert_tree(nf.sub(a, b), {"z": a["z"] - b["z"], "r": torch.tensor([-1.0])})
    only_complex = {"z": a["z"]}
    _assert_tree(nf.mul(only_complex, 1j), {"z": a["z"] * 1j})


def test_dtypes_are_kept() -> None:
    tree = {"h": torch.ones(2, dtype=torch.float16), "d": torch.ones(2, dtype=torch.float64),
            "b": torch.ones(2, dtype=torch.bfloat16)}
    for out in (nf.mul(tree, 3.0), nf.add(tree, torch.tensor(1.0, dtype=torch.float64)), nf.div(1, tree),
                nf.lerp(tree, tree, 0.5), nf.randn_like(tree), nf.clone(tree)):
        assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in tree.items()}


def test_zero_dim_leaf_with_wider_zero_dim_scalar_is_accepted_consistently() -> None:
    scalar = torch.tensor(0.5, dtype=torch.float64)
    outcomes = []
    for tree in ({"s": torch.tensor(1.0)}, {"a": torch.ones(2), "s": torch.tensor(1.0)}):
        try:
            out = nf.add(tree, scalar)
            assert out["s"].dtype == torch.float32 and out["s"].item() == 1.5
            outcomes.append("ok")
        except TypeError:
            outcomes.append("rejected")
    assert outcomes[0] == outcomes[1], outcomes


def test_zero_dim_leaf_keeps_dtype_in_reflected_op() -> None:
    tree = {"a": torch.ones(2), "s": torch.tensor(1.0)}
    try:
        out = nf.sub(torch.tensor(0.5, dtype=torch.float64), tree)
    except TypeError:
        return  # consistent rejection is acceptable too
    assert out["s"].dtype == torch.float32


def test_zero_dim_leaf_keeps_dtype_under_autograd() -> None:
    tree = {"a": torch.ones(2, requires_grad=True), "s": torch.tensor(1.0, requires_grad=True)}
    try:
        out = nf.add(tree, torch.tensor(0.5, dtype=torch.float64))
    except TypeError:
        return
    assert out["s"].dtype == torch.float32


def test_bare_tensor_with_zero_dim_tensor_broadcasts_like_a_scalar() -> None:
    x = torch.tensor([1.0, 2.0, 3.0])
    s = torch.tensor(2.0)
    assert torch.equal(nf.mul(x, s), x * s)
    assert torch.equal(nf.sub(s, x), s - x)
    assert torch.equal(nf.lerp(x, torch.zeros(3), s), torch.lerp(x, torch.zeros(3), s))


# -- unary ops ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", TREE_KINDS)
def test_neg(kind: str) -> None:
    a = _trees(3)[kind]
    before = _snapshot(a)
    out = nf.neg(a)
    _assert_tree(out, _ref(torch.neg, a))
    _unchanged(a, before)
    _no_alias(out, a)


@pytest.mark.parametrize("kind", TREE_KINDS)
def test_clone_equal_values_fresh_storage(kind: str) -> None:
    a = _trees(4)[kind]
    out = nf.clone(a)
    _assert_tree(out, a)
    _no_alias(out, a)


def test_clone_keeps_strides_and_memory_format() -> None:
    t = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    transposed = torch.randn(3, 4).t()
    out = nf.clone({"cl": t, "tr": transposed})
    assert out["cl"].stride() == t.stride() and out["tr"].stride() == transposed.stride()


@pytest.mark.parametrize("kind", TREE_KINDS)
def test_randn_like_shapes_reproducible(kind: str) -> None:
    a = _trees(5)[kind]
    torch.manual_seed(123)
    first = nf.randn_like(a)
    torch.manual_seed(123)
    second = nf.randn_like(a)
    _assert_tree(first, second)
    third = nf.randn_like(a)
    for x, y, z, src in zip(*(optree.tree_leaves(t) for t in (first, second, third, a))):
        assert x.shape == src.shape and x.dtype == src.dtype and x.device == src.device
        if is_arith(src) and src.numel() > 1:
            assert not torch.equal(x, src) and not torch.equal(y, z)


def test_randn_like_is_standard_normal() -> None:
    torch.manual_seed(0)
    out = nf.randn_like({"a": torch.zeros(200_000), "b": torch.zeros(100, dtype=torch.float64)})
    assert abs(out["a"].mean().item()) < 0.01 and abs(out["a"].std().item() - 1) < 0.01
    assert out["b"].dtype == torch.float64


@pytest.mark.parametrize("kind", TREE_KINDS)
def test_zeros_like(kind: str) -> None:
    a = _trees(6)[kind]
    _assert_tree(nf.zeros_like(a), _ref(torch.zeros_like, a))


# -- lerp ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", TREE_KINDS)
@pytest.mark.parametrize("weight", [0.0, 0.25, 1.0, 1.5, torch.tensor(0.75)], ids=repr)
def test_lerp_scalar_weight(kind: str, weight: Any) -> None:
    a, b = _trees(7)[kind], _trees(8)[kind]
    sa, sb = _snapshot(a), _snapshot(b)
    out = nf.lerp(a, b, weight)
    _assert_tree(out, _ref(lambda x, y: torch.lerp(x, y, weight), a, b))
    _assert_tree(out, _ref(lambda x, y: x + weight * (y - x), a, b), exact=False)
    _unchanged(a, sa)
    _unchanged(b, sb)


def test_lerp_of_plain_dicts_keeps_key_order_and_names_the_right_leaf() -> None:
    a = {"z": torch.tensor([1.0, 2.0], dtype=torch.float64), "a": torch.tensor([3.0])}
    b = {"z": torch.tensor([5.0, 6.0], dtype=torch.float64), "a": torch.tensor([7.0])}
    out = nf.lerp(a, b, 0.25)
    assert list(out) == ["z", "a"]
    _assert_tree(out, {key: torch.lerp(a[key], b[key], 0.25) for key in a})
    # keys in another order: matched by key, not by position
    shuffled = {"a": b["a"], "z": b["z"]}
    _assert_tree(nf.lerp(a, shuffled, 0.5), {key: torch.lerp(a[key], b[key], 0.5) for key in a})
    with pytest.raises(TypeError, match=r"parameter 'z' \(shape \(2,\) float64\) into complex128"):
        nf.lerp(a, b, 1j)


@pytest.mark.parametrize("kind", TREE_KINDS)
@pytest.mark.parametrize("end", [3.0, -2, torch.tensor(0.5)], ids=repr)
def test_lerp_dot_and_tree_map_take_a_scalar_second_operand(kind: str, end: Any) -> None:
    # "each taking a tree or a scalar as the second operand": the scalar broadcasts to every leaf
    a = _trees(13)[kind]
    snapshot = _snapshot(a)
    _assert_tree(nf.lerp(a, end, 0.25), _ref(lambda x: torch.lerp(x, torch.full_like(x, float(end)), 0.25), a))
    weights = nf.tree_map(lambda x: torch.rand_like(x) if is_arith(x) else x, a)
    _assert_tree(nf.lerp(a, end, weights),
                 _ref(lambda x, w: torch.lerp(x, torch.full_like(x, float(end)), w), a, weights))
    expected_dot = sum((leaf * float(end)).sum() for leaf in optree.tree_leaves(a) if is_arith(leaf))
    torch.testing.assert_close(nf.dot(a, end), torch.as_tensor(expected_dot).to(nf.dot(a, a).dtype))
    _assert_tree(nf.tree_map(lambda x, y: x * y, a, end), optree.tree_map(lambda x: x * end, a))
    _unchanged(a, snapshot)


def test_lerp_toward_a_scalar_is_differentiable_and_checks_dtypes() -> None:
    end = torch.tensor(3.0, requires_grad=True)
    out = nf.lerp({"w": torch.ones(2)}, end, 0.25)
    out["w"].sum().backward()
    assert end.grad is not None and end.grad.item() == 0.5
    with pytest.raises(TypeError, match=r"^lerp: the scalar 1j would turn parameter 'w'"):
        nf.lerp({"w": torch.ones(2)}, 1j, 0.5)


def test_a_bad_lerp_weight_is_named_the_weight() -> None:
    a = {"w": torch.ones(2)}
    with pytest.raises(TypeError, match=r"^lerp: expected a pytree of tensors or a scalar as the weight, "
                                        r"but the leaf at '<root>' is a str"):
        nf.lerp(a, a, "x")
    with pytest.raises(StructureError, match=r"^lerp: the weight has an extra parameter 'z'"):
        nf.lerp(a, a, {"w": torch.ones(2), "z": torch.ones(1)})


def test_lerp_tree_weight() -> None:
    a, b = _trees(9)["nested"], _trees(10)["nested"]
    w = nf.tree_map(lambda t: torch.rand_like(t), a)
    _assert_tree(nf.lerp(a, b, w), optree.tree_map(torch.lerp, a, b, w))


# -- tree_map ----------------------------------------------------------------------------------
def test_tree_map_sees_every_leaf_and_rest_trees() -> None:
    a, b = _trees(11)["dtypes"], _trees(12)["dtypes"]
    seen: list[torch.dtype] = []

    def fn(x: Tensor, y: Tensor) -> Tensor:
        seen.append(x.dtype)
        return x + y if x.dtype != torch.bool else x | y

    out = nf.tree_map(fn, a, b)
    assert sorted(map(str, seen)) == sorted(str(t.dtype) for t in optree.tree_leaves(a))
    _assert_tree(out, optree.tree_map(fn, a, b))
    with pytest.raises(nytorch.StructureError, match=r"tree_map: parameter 'w' is missing"):
        nf.tree_map(torch.add, {"w": torch.ones(1), "b": torch.ones(1)}, {"b": torch.ones(1)})


# -- dot / norm ----------------------------------------------------------------------------------
def _flat64(tree: Any) -> Tensor:
    leaves = [t for t in optree.tree_leaves(tree) if is_arith(t)]
    return torch.cat([t.reshape(-1).to(torch.complex128 if t.is_complex() else torch.float64) for t in leaves])


@pytest.mark.parametrize("kind", TREE_KINDS)
def test_dot_and_norm_values(kind: str) -> None:
    a, b = _trees(13)[kind], _trees(14)[kind]
    dot = nf.dot(a, b)
    norm = nf.norm(a)
    assert dot.dim() == 0 and norm.dim() == 0
    tol = 5e-3 if kind == "dtypes" else 1e-5  # float16 leaves
    assert torch.allclose(dot.double(), torch.dot(_flat64(a), _flat64(b)), rtol=tol, atol=tol)
    assert torch.allclose(norm.double(), torch.linalg.vector_norm(_flat64(a)), rtol=tol, atol=tol)


def test_dot_complex_is_not_conjugated_and_empty_trees_give_zero() -> None:
    z = {"z": torch.tensor([1 + 1j, 2j], dtype=torch.complex64)}
    assert torch.allclose(nf.dot(z, z), (z["z"] * z["z"]).sum())
    assert torch.allclose(nf.norm(z), torch.linalg.vector_norm(z["z"]))
    ints = {"i": torch.arange(3)}
    assert nf.dot(ints, ints).item() == 0 and nf.norm(ints).item() == 0
    assert nf.norm({}).item() == 0


def test_norm_mixed_dtypes_promotes() -> None:
    tree = {"a": torch.tensor([3.0]), "b": torch.tensor([4.0], dtype=torch.float64)}
    out = nf.norm(tree)
    assert out.dtype == torch.float64 and out.item() == 5.0
    assert nf.dot(tree, tree).item() == 25.0


# -- errors -----------------------------------------------------------------------------------------
def test_structure_errors_name_the_leaf() -> None:
    one = torch.ones(2)
    with pytest.raises(nytorch.StructureError, match=r"add: parameter 'b' is missing from the second operand"):
        nf.add({"a": one, "b": one}, {"a": one})
    with pytest.raises(nytorch.StructureError, match=r"sub: the second operand has an extra parameter 'c'"):
        nf.sub({"a": one}, {"a": one, "c": one})
    with pytest.raises(nytorch.StructureError,
                       match=r"mul: parameter 'layer.w' differs: shape \(2,\) float32 vs shape \(3,\) float32"):
        nf.mul({"layer": {"w": one}}, {"layer": {"w": torch.ones(3)}})
    with pytest.raises(nytorch.StructureError, match=r"'w' differs: shape \(2,\) float32 vs shape \(2,\) float64"):
        nf.lerp({"w": one}, {"w": one.double()}, 0.5)
    with pytest.raises(nytorch.StructureError, match=r"different container types"):
        nf.add([one, one], (one, one))
    with pytest.raises(nytorch.StructureError, match=r"dot: parameter 'x' is missing"):
        nf.dot({"x": one}, {"y": one})


def test_device_mismatch_is_a_clear_error() -> None:
    with pytest.raises(nytorch.DeviceMismatchError, match=r"'w' is on cpu in the first operand and on meta"):
        nf.add({"w": torch.ones(2)}, {"w": torch.ones(2, device="meta")})
    with pytest.raises(nytorch.DeviceMismatchError, match=r"scalar operand is on meta"):
        nf.add({"w": torch.ones(2)}, torch.tensor(1.0, device="meta"))


@pytest.mark.parametrize("bad", ["text", None, [1.0, 2.0], {"w": 1.0}, object()],
                         ids=["text", "None", "list", "dict", "object"])
def test_unsupported_operands_raise_type_or_value_error(bad: Any) -> None:
    tree = {"w": torch.ones(2)}
    for fn in (nf.add, nf.sub, nf.mul, nf.div, nf.pow, nf.dot):
        with pytest.raises((TypeError, ValueError)) as info:
            fn(tree, bad)
        assert not isinstance(info.value, AssertionError)
    with pytest.raises(TypeError, match=r"expected a pytree of tensors"):
        nf.neg(bad if bad is not None else None)


def test_non_tensor_leaf_message_names_its_path() -> None:
    with pytest.raises(TypeError, match=r"add: expected a pytree of tensors or a scalar as the first operand, "
                                        r"but the leaf at 'layer.b' is a str"):
        nf.add({"layer": {"w": torch.ones(1), "b": "x"}}, 1)
    with pytest.raises(TypeError, match=r"got None"):
        nf.add(None, 1)
    with pytest.raises(TypeError, match=r"got two scalars"):
        nf.add(1, 2)


def test_complex_scalar_on_float_tree_is_rejected() -> None:
    tree = {"w": torch.ones(2)}
    with pytest.raises(TypeError, match=r"mul: the scalar 1j would turn parameter 'w' \(shape \(2,\) float32\) "
                                        r"into complex64"):
        nf.mul(tree, 1j)
    with pytest.raises(TypeError, match=r"would turn parameter 'w'"):
        nf.sub(torch.tensor(1j), tree)
    with pytest.raises(TypeError, match=r"would turn parameter 'w'"):
        nf.lerp(tree, tree, 0.5j)


# -- autograd ---------------------------------------------------------------------------------------
def _grad_tree(seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": (torch.rand(3, 2, generator=g) + 0.5).requires_grad_(),
            "b": (torch.rand(2, generator=g) + 0.5).requires_grad_()}


def _loss(tree: dict[str, Tensor], coef: dict[str, Tensor]) -> Tensor:
    return sum((tree[k] * coef[k]).sum() for k in tree)  # type: ignore[return-value]


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "pow", "neg", "lerp"])
def test_gradients_match_manual(op: str) -> None:
    a, b = _grad_tree(0), _grad_tree(1)
    w = torch.tensor(0.3, requires_grad=True)
    coef = {k: torch.randn(v.shape) for k, v in a.items()}
    out = {"add": lambda: nf.add(a, b), "sub": lambda: nf.sub(a, b), "mul": lambda: nf.mul(a, b),
           "div": lambda: nf.div(a, b), "pow": lambda: nf.pow(a, b), "neg": lambda: nf.neg(a),
           "lerp": lambda: nf.lerp(a, b, w)}[op]()
    assert all(t.grad_fn is not None for t in out.values())
    _loss(out, coef).backward()
    for k in a:
        x, y, c = a[k].detach(), b[k].detach(), coef[k]
        expected_a = {"add": c, "sub": c, "mul": c * y, "div": c / y, "pow": c * y * x ** (y - 1),
                      "neg": -c, "lerp": c * (1 - 0.3)}[op]
        assert torch.allclose(a[k].grad, expected_a, rtol=1e-5, atol=1e-6), k
        if op != "neg":
            expected_b = {"add": c, "sub": -c, "mul": c * x, "div": -c * x / y ** 2,
                          "pow": c * x ** y * torch.log(x), "lerp": c * 0.3}[op]
            assert torch.allclose(b[k].grad, expected_b, rtol=1e-5, atol=1e-6), k
    if op == "lerp":
        expected_w = sum(((b[k] - a[k]).detach() * coef[k]).sum() for k in a)
        assert torch.allclose(w.grad, expected_w)


@pytest.mark.parametrize("op", ["mul", "add", "div", "pow", "rsub"])
def test_gradient_wrt_zero_dim_scalar_on_constant_tree(op: str) -> None:
    # the foreach pitfall: only the 0-dim scalar requires grad
    tree = {k: v.detach() for k, v in _grad_tree(2).items()}
    s = torch.tensor(1.7, requires_grad=True)
    out = {"mul": lambda: nf.mul(tree, s), "add": lambda: nf.add(tree, s), "div": lambda: nf.div(tree, s),
           "pow": lambda: nf.pow(tree, s), "rsub": lambda: nf.sub(s, tree)}[op]()
    sum(v.sum() for v in out.values()).backward()
    sv = s.detach()
    expected = sum({"mul": lambda x: x.sum(), "add": lambda x: torch.tensor(float(x.numel())),
                    "div": lambda x: (-x / sv ** 2).sum(), "pow": lambda x: (x ** sv * torch.log(x)).sum(),
                    "rsub": lambda x: torch.tensor(float(x.numel()))}[op](x) for x in tree.values())
    assert torch.allclose(s.grad, expected, rtol=1e-5)


def test_dot_and_norm_gradients() -> None:
    a, b = _grad_tree(3), _grad_tree(4)
    nf.dot(a, b).backward()
    for k in a:
        assert torch.allclose(a[k].grad, b[k].detach()) and torch.allclose(b[k].grad, a[k].detach())
    c = _grad_tree(5)
    value = nf.norm(c)
    value.backward()
    for k in c:
        assert torch.allclose(c[k].grad, c[k].detach() / value.detach())


def test_no_grad_results_do_not_track() -> None:
    a = _grad_tree(6)
    with torch.no_grad():
        out = nf.mul(a, 2.0)
    assert all(not t.requires_grad for t in out.values())


# -- torch.func -----------------------------------------------------------------------------------
def test_vmap_over_batched_tree() -> None:
    batched = {"w": torch.randn(5, 3, 2), "b": torch.randn(5, 2)}
    other = {"w": torch.randn(3, 2), "b": torch.randn(2)}

    def f(t: dict[str, Tensor]) -> Any:
        return nf.lerp(nf.mul(nf.add(t, 1.0), 2.0), other, 0.25)

    out = torch.func.vmap(f)(batched)
    for i in range(5):
        sample = {k: v[i] for k, v in batched.items()}
        expected = {k: torch.lerp((sample[k] + 1) * 2, other[k], 0.25) for k in sample}
        for k in expected:
            assert torch.allclose(out[k][i], expected[k])
    norms = torch.func.vmap(nf.norm)(batched)
    dots = torch.func.vmap(nf.dot, in_dims=(0, None))(batched, other)
    for i in range(5):
        flat = torch.cat([batched["b"][i].reshape(-1), batched["w"][i].reshape(-1)])
        assert torch.allclose(norms[i], flat.norm())
        assert torch.allclose(dots[i], sum((batched[k][i] * other[k]).sum() for k in other))


def test_vmap_over_scalar_weight() -> None:
    p = {"w": torch.randn(2, 3), "b": torch.randn(3)}
    q = {"w": torch.randn(2, 3), "b": torch.randn(3)}
    ws = torch.tensor([0.0, 0.5, 1.0, -0.25])
    out = torch.func.vmap(lambda w: nf.lerp(p, q, w))(ws)
    for i, w in enumerate(ws):
        for k in p:
            assert torch.allclose(out[k][i], torch.lerp(p[k], q[k], w))
    out2 = torch.func.vmap(lambda w: nf.sub(w, nf.mul(p, w)))(ws)
    for i, w in enumerate(ws):
        for k in p:
            assert torch.allclose(out2[k][i], w - p[k] * w)


def _mse(out: Tensor, y: Tensor) -> Tensor:
    return ((out - y) ** 2).mean()


def test_per_sample_gradient_wrt_lerp_weight() -> None:
    torch.manual_seed(0)
    model = MLP(4, 5, 2)
    p = nf.params(model)
    q = {k: v + torch.randn_like(v) for k, v in p.items()}
    x, y = torch.randn(6, 4), torch.randn(6, 2)
    w = torch.tensor(0.3)

    def loss(weight: Tensor, xi: Tensor, yi: Tensor) -> Tensor:
        return _mse(nf.call(model, nf.lerp(p, q, weight), xi.unsqueeze(0)), yi.unsqueeze(0))

    shared = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(w, x, y)
    per_w = torch.linspace(-0.5, 1.5, 6)
    own = torch.func.vmap(torch.func.grad(loss))(per_w, x, y)
    for i in range(6):
        for weight, got in ((w, shared[i]), (per_w[i], own[i])):
            leaf = weight.clone().requires_grad_()
            params = {k: p[k] + leaf * (q[k] - p[k]) for k in p}  # plain torch, plain autograd
            out = torch.func.functional_call(model, params, (x[i:i + 1],))
            (expected,) = torch.autograd.grad(_mse(out, y[i:i + 1]), leaf)
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6), (i, got, expected)


def test_func_grad_wrt_tree() -> None:
    torch.manual_seed(1)
    model = MLP(3, 4, 1)
    p = nf.params(model)
    delta = nf.randn_like(p)
    x, y = torch.randn(5, 3), torch.randn(5, 1)

    def loss(params: dict[str, Tensor]) -> Tensor:
        return _mse(nf.call(model, nf.add(params, nf.mul(delta, 0.1)), x), y) + 0.01 * nf.norm(params) ** 2

    grads = torch.func.grad(loss)(p)
    leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
    out = torch.func.functional_call(model, {k: leaves[k] + 0.1 * delta[k] for k in leaves}, (x,))
    total = _mse(out, y) + 0.01 * sum((v ** 2).sum() for v in leaves.values())
    expected = torch.autograd.grad(total, list(leaves.values()))
    for (k, got), want in zip(grads.items(), expected):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), k


def test_operator_module_functions_match_python_operators() -> None:
    # nf functions agree with torch operators on a bare tensor tree
    x, y = torch.rand(4) + 0.5, torch.rand(4) + 0.5
    for fn, op in ((nf.add, operator.add), (nf.sub, operator.sub), (nf.mul, operator.mul),
                   (nf.div, operator.truediv), (nf.pow, operator.pow)):
        assert torch.equal(fn(x, y), op(x, y))
        assert torch.equal(fn([x], [y])[0], op(x, y))


@pytest.mark.parametrize("fn", ["sub", "pow", "lerp", "rpow"])
def test_scalar_requiring_grad_under_no_grad(fn: str) -> None:
    tree = {"w": torch.rand(3) + 0.5}
    s = torch.tensor(2.0, requires_grad=True)
    with torch.no_grad():
        out = {"sub": lambda: nf.sub(tree, s), "pow": lambda: nf.pow(tree, s),
               "lerp": lambda: nf.lerp(tree, tree, s), "rpow": lambda: nf.pow(s, tree)}[fn]()
    expected = {"sub": tree["w"] - 2, "pow": tree["w"] ** 2, "lerp": tree["w"], "rpow": 2 ** tree["w"]}[fn]
    assert torch.allclose(out["w"], expected)


def test_plain_dicts_keep_their_key_order_and_pair_by_key() -> None:
    """Plain dicts of tensors take a fast path (no pytree flattening); answers match the general one."""
    a = {"b": torch.tensor([1.0, 2.0]), "a": torch.tensor([3.0])}
    same_order = {"b": torch.tensor([10.0, 20.0]), "a": torch.tensor([30.0])}
    other_order = {"a": torch.tensor([30.0]), "b": torch.tensor([10.0, 20.0])}
    for b in (same_order, other_order):
        result = nf.add(a, b)
        assert list(result) == ["b", "a"]
        assert torch.equal(result["b"], torch.tensor([11.0, 22.0])) and torch.equal(result["a"], torch.tensor([33.0]))
    scaled = nf.mul(2.0, a)
    assert list(scaled) == ["b", "a"] and torch.equal(scaled["a"], torch.tensor([6.0]))
    with pytest.raises(TypeError, match="'b'"):
        nf.mul({"b": torch.ones(1), "a": torch.ones(1)}, 1j)
    with pytest.raises(nytorch.StructureError, match="'a'"):
        nf.add(a, {"b": torch.ones(2), "a": torch.ones(2)})
