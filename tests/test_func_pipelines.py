# mypy: disable-error-code="union-attr, index, operator, arg-type, assignment"
# (nn.Module.__getattr__ is typed `Tensor | Module`: attribute access on models is untyped noise here)
"""nytorch inside ``torch.func`` / autograd pipelines and across dtypes, against plain PyTorch.

Every expected value is computed with plain per-tensor torch (dict comprehensions, a Python loop of
modules with ``torch.autograd.grad``, ``torch.func.vmap`` of a hand-written forward), never nytorch.
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import nn
from torch.func import grad, grad_and_value, hessian, jacfwd, jacrev, jvp, vjp, vmap

import nytorch as nyto
import nytorch.functional as nf
from nytorch import Swarm

Tensor = torch.Tensor


def _trees(seed: int = 0) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    p = {"w": torch.randn(3, 2, generator=g), "b": torch.randn(3, generator=g)}
    q = {"w": torch.randn(3, 2, generator=g), "b": torch.randn(3, generator=g)}
    return p, q


def _close(x: Any, y: Any, atol: float = 1e-5) -> bool:
    if isinstance(x, dict):
        return list(x) == list(y) and all(_close(x[k], y[k], atol) for k in x)
    if isinstance(x, (tuple, list)):
        return len(x) == len(y) and all(_close(a, b, atol) for a, b in zip(x, y))
    return x.dtype == y.dtype and x.shape == y.shape and torch.allclose(x, y, atol=atol)


def _bitwise(x: Tensor, y: Tensor) -> bool:
    return x.dtype == y.dtype and bool(torch.isclose(x, y, rtol=0, atol=0, equal_nan=True).all())


def _sq(tree: dict[str, Tensor]) -> Tensor:
    return sum((v ** 2).sum() for v in tree.values())


# -- functional ops under every torch.func transform ----------------------------------------------
_P, _Q = _trees()
_OPS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    "add": (lambda a: nf.add(a, _Q), lambda a: {k: a[k] + _Q[k] for k in a}),
    "sub": (lambda a: nf.sub(a, _Q), lambda a: {k: a[k] - _Q[k] for k in a}),
    "mul": (lambda a: nf.mul(a, _Q), lambda a: {k: a[k] * _Q[k] for k in a}),
    "div": (lambda a: nf.div(a, _Q), lambda a: {k: a[k] / _Q[k] for k in a}),
    "pow": (lambda a: nf.pow(a, 2.0), lambda a: {k: a[k] ** 2.0 for k in a}),
    "rpow": (lambda a: nf.pow(2.0, a), lambda a: {k: 2.0 ** a[k] for k in a}),
    "rsub": (lambda a: nf.sub(2.0, a), lambda a: {k: 2.0 - a[k] for k in a}),
    "rdiv": (lambda a: nf.div(2.0, a), lambda a: {k: torch.div(2.0, a[k]) for k in a}),
    "neg": (nf.neg, lambda a: {k: -a[k] for k in a}),
    "lerp": (lambda a: nf.lerp(a, _Q, 0.3), lambda a: {k: torch.lerp(a[k], _Q[k], 0.3) for k in a}),
    "lerp_tree_weight": (lambda a: nf.lerp(a, _Q, {"w": torch.full((3, 2), 0.2), "b": torch.full((3,), 0.7)}),
                         lambda a: {"w": torch.lerp(a["w"], _Q["w"], 0.2), "b": torch.lerp(a["b"], _Q["b"], 0.7)}),
    "mul_0dim": (lambda a: nf.mul(a, torch.tensor(2.5)), lambda a: {k: a[k] * 2.5 for k in a}),
    "clone": (nf.clone, lambda a: {k: a[k].clone() for k in a}),
    "tree_map": (lambda a: nf.tree_map(torch.sin, a), lambda a: {k: torch.sin(a[k]) for k in a}),
}


@pytest.mark.parametrize("name", list(_OPS))
def test_functional_ops_under_every_transform_match_plain_torch(name: str) -> None:
    f, ref = _OPS[name]
    loss, ref_loss = (lambda a: _sq(f(a))), (lambda a: _sq(ref(a)))
    assert _close(grad(loss)(_P), grad(ref_loss)(_P))
    assert _close(grad_and_value(loss)(_P), grad_and_value(ref_loss)(_P))
    out, pullback = vjp(f, _P)
    ref_out, ref_pullback = vjp(ref, _P)
    assert _close(out, ref_out) and _close(pullback(_Q), ref_pullback(_Q))
    assert _close(jvp(f, (_P,), (_Q,)), jvp(ref, (_P,), (_Q,)))
    assert _close(jacrev(f)(_P), jacrev(ref)(_P))
    assert _close(jacfwd(f)(_P), jacfwd(ref)(_P))
    stacked = {k: torch.stack([v, 2 * v, v - 1]) for k, v in _P.items()}
    assert _close(vmap(f)(stacked), vmap(ref)(stacked))
    assert _close(vmap(grad(loss))(stacked), vmap(grad(ref_loss))(stacked))
    nested = {k: v.unsqueeze(0).expand(2, *v.shape) for k, v in stacked.items()}
    assert _close(vmap(vmap(f))(nested), vmap(vmap(ref))(nested))
    # autograd: the graph reaches the inputs, and backward twice accumulates like plain torch
    leaves = {k: v.clone().requires_grad_() for k, v in _P.items()}
    ref_leaves = {k: v.clone().requires_grad_() for k, v in _P.items()}
    total, ref_total = loss(leaves), ref_loss(ref_leaves)
    total.backward(retain_graph=True)
    total.backward()
    ref_total.backward(retain_graph=True)
    ref_total.backward()
    assert _close({k: v.grad for k, v in leaves.items()}, {k: v.grad for k, v in ref_leaves.items()})


_SCALAR_OPS: dict[str, tuple[Callable[[Tensor], Any], Callable[[Tensor], Any]]] = {
    "lerp_weight": (lambda w: nf.lerp(_P, _Q, w), lambda w: {k: _P[k] + w * (_Q[k] - _P[k]) for k in _P}),
    "lerp_end": (lambda w: nf.lerp(_P, w, 0.2), lambda w: {k: _P[k] + 0.2 * (w - _P[k]) for k in _P}),
    "add": (lambda w: nf.add(_P, w), lambda w: {k: _P[k] + w for k in _P}),
    "radd": (lambda w: nf.add(w, _P), lambda w: {k: w + _P[k] for k in _P}),
    "mul": (lambda w: nf.mul(_P, w), lambda w: {k: _P[k] * w for k in _P}),
    "rsub": (lambda w: nf.sub(w, _P), lambda w: {k: w - _P[k] for k in _P}),
    "div": (lambda w: nf.div(_P, w), lambda w: {k: _P[k] / w for k in _P}),
    "rdiv": (lambda w: nf.div(w, _P), lambda w: {k: w / _P[k] for k in _P}),
    "pow": (lambda w: nf.pow(nf.tree_map(torch.abs, _P), w), lambda w: {k: _P[k].abs() ** w for k in _P}),
    "rpow": (lambda w: nf.pow(w, _P), lambda w: {k: w ** _P[k] for k in _P}),
    "dot": (lambda w: {"x": nf.dot(_P, w)}, lambda w: {"x": sum((_P[k] * w).sum() for k in _P)}),
}


@pytest.mark.parametrize("name", list(_SCALAR_OPS))
def test_gradient_with_respect_to_a_0dim_scalar_operand(name: str) -> None:
    """The README's per-sample example differentiates with respect to the weight of ``nf.lerp``."""
    f, ref = _SCALAR_OPS[name]
    w, ws = torch.tensor(0.3), torch.tensor([0.1, 0.5, 0.9])
    assert _close(grad(lambda w: _sq(f(w)))(w), grad(lambda w: _sq(ref(w)))(w))
    assert _close(vmap(f)(ws), vmap(ref)(ws))
    assert _close(vmap(grad(lambda w: _sq(f(w))))(ws), vmap(grad(lambda w: _sq(ref(w))))(ws))
    assert _close(jacfwd(f)(w), jacfwd(ref)(w))
    leaf = w.clone().requires_grad_()
    ref_leaf = w.clone().requires_grad_()
    assert _close(torch.autograd.grad(_sq(f(leaf)), leaf)[0], torch.autograd.grad(_sq(ref(ref_leaf)), ref_leaf)[0])
    with fwad.dual_level():  # plain forward-mode AD (no functorch): a dual scalar keeps its tangent
        tangents = {k: fwad.unpack_dual(v).tangent for k, v in f(fwad.make_dual(w, torch.tensor(1.0))).items()}
    assert _close(tangents, jvp(ref, (w,), (torch.tensor(1.0),))[1])


def test_dot_and_norm_under_transforms_and_double_backward() -> None:
    total = torch.sqrt(_sq(_P))
    assert _close(grad(nf.norm)(_P), {k: _P[k] / total for k in _P})
    assert _close(jacfwd(nf.norm)(_P), {k: _P[k] / total for k in _P})
    assert _close(grad(lambda a: nf.dot(a, _Q))(_P), _Q)
    assert _close(jvp(lambda a: nf.dot(a, a), (_P,), (_Q,))[1], 2 * sum((_P[k] * _Q[k]).sum() for k in _P))
    stacked = {k: torch.stack([v, 2 * v]) for k, v in _P.items()}
    assert _close(vmap(nf.norm)(stacked), torch.stack([total, 2 * total]))
    assert _close(vmap(nf.dot, in_dims=(0, None))(stacked, _Q),
                  torch.stack([s * sum((_P[k] * _Q[k]).sum() for k in _P) for s in (1.0, 2.0)]))

    def f(a: dict[str, Tensor]) -> Tensor:  # exercises pow, rpow, div, add, dot
        return nf.dot(nf.div(nf.pow(2.0, a), nf.add(nf.pow(a, 2), 1.0)), a)

    def f_ref(a: dict[str, Tensor]) -> Tensor:
        return sum(((2.0 ** a[k]) / (a[k] ** 2 + 1) * a[k]).sum() for k in a)

    def hvp(fn: Callable[[dict[str, Tensor]], Tensor]) -> list[Tensor]:
        a = {k: v.clone().requires_grad_() for k, v in _P.items()}
        g = torch.autograd.grad(fn(a), list(a.values()), create_graph=True)
        return list(torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, _Q.values())), list(a.values())))
    assert _close(hvp(f), hvp(f_ref), atol=1e-4)
    assert _close(hessian(f)(_P), hessian(f_ref)(_P), atol=1e-4)
    a = {k: v.clone().requires_grad_() for k, v in _P.items()}
    gn = torch.autograd.grad(nf.norm(a), list(a.values()), create_graph=True)
    r = {k: v.clone().requires_grad_() for k, v in _P.items()}
    gr = torch.autograd.grad(torch.sqrt(_sq(r)), list(r.values()), create_graph=True)
    assert _close(torch.autograd.grad(sum(x.sum() for x in gn), list(a.values())),
                  torch.autograd.grad(sum(x.sum() for x in gr), list(r.values())))


# -- grad modes: requires_grad, no_grad, inference_mode, inference tensors -------------------------
def _leaf_tree(requires_grad: bool, inference: bool, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    context = torch.inference_mode() if inference else contextlib.nullcontext()
    with context:
        tree = {"w": torch.randn(3, 2, generator=g), "b": torch.randn(3, generator=g), "n": torch.tensor([1, 2])}
    if requires_grad:
        tree["w"].requires_grad_()
        tree["b"].requires_grad_()
    return tree


_MODE_OPS = [
    ("add", nf.add, torch.add), ("sub", nf.sub, torch.sub), ("mul", nf.mul, torch.mul),
    ("lerp", lambda a, b: nf.lerp(a, b, 0.3), lambda x, y: torch.lerp(x, y, 0.3)),
    ("pow", lambda a, b: nf.pow(a, 2), lambda x, y: torch.pow(x, 2)),
]
_MODES = {"grad": contextlib.nullcontext, "no_grad": torch.no_grad, "inference": torch.inference_mode}


@pytest.mark.parametrize("mode", list(_MODES))
@pytest.mark.parametrize("name,fn,ref", _MODE_OPS, ids=[op[0] for op in _MODE_OPS])
def test_grad_modes_match_plain_torch(mode: str, name: str, fn: Callable[..., Any], ref: Callable[..., Tensor]) -> None:
    """requires_grad, is_leaf, inference-ness, values and errors are those of the per-tensor loop."""
    for rg_a, rg_b, inf_a, inf_b in itertools.product([False, True], repeat=4):
        if (rg_a and inf_a) or (rg_b and inf_b):
            continue
        a, b = _leaf_tree(rg_a, inf_a, 0), _leaf_tree(rg_b, inf_b, 1)
        with _MODES[mode]():
            try:
                want: Any = {k: ref(v, b[k]) if v.is_floating_point() else v.clone() for k, v in a.items()}
            except RuntimeError as error:
                want = error
            if isinstance(want, RuntimeError):
                with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
                    fn(a, b)
                continue
            got = fn(a, b)
        for k in want:
            props = (got[k].requires_grad, got[k].is_leaf, got[k].is_inference(), got[k].dtype)
            assert props == (want[k].requires_grad, want[k].is_leaf, want[k].is_inference(), want[k].dtype), k
            assert torch.equal(got[k].detach(), want[k].detach()), k


class _Net(nyto.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(3, 2)
        self.s = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: Tensor) -> Tensor:
        return self.l(x) * self.s


def test_model_operators_give_fresh_leaves_with_the_left_operands_requires_grad() -> None:
    torch.manual_seed(0)
    a, b = _Net(), _Net()
    b.l.bias.requires_grad_(False)
    w = torch.tensor(0.5, requires_grad=True)
    x = torch.randn(4, 3)
    for context in (contextlib.nullcontext, torch.no_grad, torch.enable_grad):
        with context():
            results = {"a + b": (a + b, a, lambda s, o: s + o), "b - a": (b - a, b, lambda s, o: o - s),
                       "b * w": (b * w, b, lambda s, o: o * 0.5),
                       "particles": ((nyto.particle(a) + nyto.particle(b)).module(), a, lambda s, o: s + o)}
        for name, (result, left, ref) in results.items():
            for p, pl, pa, pb in zip(result.parameters(), left.parameters(), a.parameters(), b.parameters()):
                assert p.is_leaf and p.grad_fn is None and p.requires_grad == pl.requires_grad, name
                value = ref(pa, pb) if name != "b - a" else pb - pa
                assert torch.equal(p.detach(), value.detach()), name
            result(x).sum().backward()  # trains like any model; nothing reaches the operands
            assert all(p.grad is not None for p in result.parameters() if p.requires_grad), name
    assert w.grad is None and all(p.grad is None for p in a.parameters())


def test_in_place_update_of_parameters_a_graph_saved_raises_at_backward() -> None:
    makers = (_Net, lambda: nyto.particle(nn.Linear(3, 2)), lambda: nyto.particle(nn.Linear(3, 2), pack=False))
    for make in makers:
        m = make()
        module = m if isinstance(m, nn.Module) else m.module()
        out = sum((p ** 2).sum() for p in module.parameters())  # saves the parameters themselves
        m += 1
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.backward()


def test_result_made_under_inference_mode_and_first_touched_outside_is_built_as_at_once() -> None:
    """The README: a result is built on first touch "exactly as if it had been built at once"; one made
    under ``torch.inference_mode()`` and touched outside it raised torch's "Setting requires_grad=True on
    inference tensor outside InferenceMode" instead."""
    torch.manual_seed(0)
    net, x = _Net(), torch.randn(4, 3)
    net.l.bias.requires_grad_(False)
    with torch.inference_mode():
        lazy = 0.9 * (net - net * 2) + net
        eager = 0.9 * (net - net * 2) + net
        eager.l  # built now, inside inference mode
        want = {n: 0.9 * (p - 2 * p) + p for n, p in net.named_parameters()}
    assert torch.equal(lazy(x), eager(x))
    for (name, got), (_, built) in zip(lazy.named_parameters(), eager.named_parameters()):
        assert isinstance(got, nn.Parameter) and torch.equal(got, want[name]), name
        assert (got.is_inference(), got.requires_grad) == (built.is_inference(), built.requires_grad), name
    assert [p.requires_grad for p in lazy.parameters()] == [p.requires_grad for p in net.parameters()]
    assert torch.equal((lazy + 1).l.weight, want["l.weight"] + 1)
    with pytest.raises(RuntimeError, match="add: parameter 's' is an inference tensor and cannot be updated in place"):
        lazy += 1  # as for the model built at once


def test_modules_built_outside_inference_mode_from_inference_values_are_built_as_inside() -> None:
    """``particle.module()``, ``swarm[i].module()`` and ``nf.bind`` of values made under
    ``torch.inference_mode()`` raised torch's "Setting requires_grad=True on inference tensor" outside it."""
    torch.manual_seed(0)
    net, x = _Net(), torch.randn(4, 3)
    with torch.inference_mode():
        particle = nyto.particle(net) * 2
        swarm = Swarm.stack([net, net])
        tree = {name: value * 2 for name, value in nf.params(net).items()}
        inside = particle.module()
    built = [particle.module(), swarm[1].module(), swarm.unstack()[0].module(), nf.bind(net, tree)]
    for module in built:
        for (name, got), (_, want) in zip(module.named_parameters(), inside.named_parameters()):
            assert isinstance(got, nn.Parameter) and got.is_inference(), name
            assert got.requires_grad == want.requires_grad, name
    with torch.no_grad():  # inference tensors cannot be saved for backward (torch's own message)
        assert torch.equal(built[0](x), inside(x)) and torch.equal(built[3](x), inside(x))
        assert torch.equal(built[1](x), net(x))


# -- dtypes ---------------------------------------------------------------------------------------
def _mixed_tree(seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    tree = {str(dt).removeprefix("torch."): torch.randn(2, 3, generator=g).to(dt)
            for dt in (torch.float16, torch.bfloat16, torch.float64, torch.float32)}
    tree["complex64"] = torch.randn(2, 3, dtype=torch.complex64, generator=g)
    tree["zero_dim"] = torch.randn((), generator=g).double()
    tree["int"] = torch.tensor([1, 2, 3]) + seed
    tree["bool"] = torch.tensor([True, False])
    return tree


def _per_leaf(fn: Callable[..., Tensor], a: dict[str, Tensor], b: Any) -> dict[str, Tensor]:
    return {k: fn(v, b[k] if isinstance(b, dict) else b) if v.is_floating_point() or v.is_complex() else v.clone()
            for k, v in a.items()}


@pytest.mark.parametrize("requires_grad", [False, True])
def test_mixed_dtype_trees_match_per_leaf_torch_bitwise(requires_grad: bool) -> None:
    a, b = _mixed_tree(0), _mixed_tree(1)
    if requires_grad:
        a = {k: v.requires_grad_() if v.is_floating_point() or v.is_complex() else v for k, v in a.items()}
    for fn, ref in [(nf.add, torch.add), (nf.sub, torch.sub), (nf.mul, torch.mul), (nf.div, torch.div)]:
        for other in (b, 2, 0.5, torch.tensor(0.5)):
            got, want = fn(a, other), _per_leaf(ref, a, other)
            assert all(_bitwise(got[k].detach(), want[k].detach()) for k in a), (fn, other)
            assert torch.equal(got["int"], a["int"]) and got["int"] is not a["int"]
    got, want = nf.lerp(a, b, 0.25), _per_leaf(lambda x, y: torch.lerp(x, y, 0.25), a, b)
    assert all(_bitwise(got[k].detach(), want[k].detach()) for k in a)
    got, want = nf.pow(a, 2), _per_leaf(lambda x, y: x ** 2, a, 2)
    assert all(_bitwise(got[k].detach(), want[k].detach()) for k in a)
    arithmetic = [k for k in a if a[k].is_floating_point() or a[k].is_complex()]
    # summed in another leaf order (optree's): equal up to rounding, in the promoted dtype
    assert _close(nf.dot(a, b).detach(), sum((a[k] * b[k]).sum() for k in arithmetic).detach(), atol=1e-4)
    if requires_grad:  # gradients keep every leaf's dtype, as plain autograd does
        out = nf.mul(nf.add(a, b), 2)
        grads = torch.autograd.grad(sum((out[k].abs() ** 2).sum().double() for k in arithmetic),
                                    [a[k] for k in arithmetic])
        ref = {k: a[k].detach().clone().requires_grad_() for k in arithmetic}
        ref_grads = torch.autograd.grad(sum((((ref[k] + b[k]) * 2).abs() ** 2).sum().double() for k in arithmetic),
                                        list(ref.values()))
        assert all(_bitwise(x, y) for x, y in zip(grads, ref_grads))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_0dim_tensor_scalars_give_the_per_tensor_result_on_every_path(dtype: torch.dtype) -> None:
    """``pow`` and ``lerp`` with a 0-dim tensor: fused kernels read it as a Python number and rounded
    unlike ``torch.pow(x, torch.tensor(3))`` / ``torch.lerp(half, half, torch.tensor(0.7))``, so a
    result depended on the number of leaves, the model's dtypes and requires_grad."""
    g = torch.Generator().manual_seed(0)
    a = {"x": torch.rand(50, generator=g).to(dtype) + 0.5, "y": torch.rand(9, generator=g).to(dtype) + 0.5}
    b = {k: torch.rand(v.shape, generator=g).to(dtype) for k, v in a.items()}
    cases = [
        ("pow int", lambda t: nf.pow(t, torch.tensor(3)), lambda x, y: torch.pow(x, torch.tensor(3))),
        ("pow f64", lambda t: nf.pow(t, torch.tensor(0.7, dtype=torch.float64)),
         lambda x, y: torch.pow(x, torch.tensor(0.7, dtype=torch.float64))),
        ("rpow", lambda t: nf.pow(torch.tensor(1.7), t), lambda x, y: torch.pow(torch.tensor(1.7), x)),
        ("lerp f32", lambda t: nf.lerp(t, b, torch.tensor(0.7)), lambda x, y: torch.lerp(x, y, torch.tensor(0.7))),
        ("lerp f64", lambda t: nf.lerp(t, b, torch.tensor(0.7, dtype=torch.float64)),
         lambda x, y: torch.lerp(x, y, torch.tensor(0.7, dtype=torch.float64))),
    ]
    for name, fn, ref in cases:
        want = {k: ref(v, b[k]) for k, v in a.items()}
        fused = fn(a)
        per_leaf = fn({k: v.clone().requires_grad_() for k, v in a.items()})
        vmapped = vmap(fn)({k: v.unsqueeze(0) for k, v in a.items()})
        for k in a:
            assert _bitwise(fused[k], want[k]), (name, k)
            assert _bitwise(per_leaf[k].detach(), want[k]), (name, k)
            assert _bitwise(vmapped[k][0], want[k]), (name, k)


class _TwoDtypes(nyto.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.rand(64) + 0.5)
        self.h = nn.Parameter((torch.rand(64) + 0.5).half())


def test_models_of_two_dtypes_with_0dim_tensor_scalars_match_per_tensor_torch() -> None:
    torch.manual_seed(0)
    m, o = _TwoDtypes(), _TwoDtypes()
    s, w = torch.tensor(3), torch.tensor(0.7)
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    other = {k: v.detach().clone() for k, v in o.named_parameters()}
    pw = {k: v ** s for k, v in before.items()}
    lp = {k: torch.lerp(v, other[k], w) for k, v in before.items()}
    assert all(torch.equal(v.detach(), pw[k]) for k, v in (m ** s).named_parameters())
    assert all(torch.equal(v, lp[k]) for k, v in m.product().lerp(o, w).params.items())
    c = m.clone()
    c **= s
    assert all(torch.equal(v.detach(), pw[k]) for k, v in c.named_parameters())
    c = m.clone()
    c.product().lerp_(o, w)
    assert all(torch.equal(v.detach(), lp[k]) for k, v in c.named_parameters())


# -- models: nf.call with tied weights, vmap over stacked params ----------------------------------
class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(4, 4, bias=False)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 4, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mid(self.emb(x))))


def _tied_ref(p: dict[str, Tensor], x: Tensor) -> Tensor:
    w = p["emb.weight"]
    return torch.tanh(x @ w.T @ p["mid.weight"].T + p["mid.bias"]) @ w.T


def test_call_with_tied_weights_under_grad_vmap_and_jacrev() -> None:
    torch.manual_seed(0)
    net, x = _Tied(), torch.randn(5, 4)
    p = nf.params(net)
    assert list(p) == ["emb.weight", "mid.weight", "mid.bias"]
    loss = lambda p, x: (nf.call(net, p, x) ** 2).mean()  # noqa: E731
    ref_loss = lambda p, x: (_tied_ref(p, x) ** 2).mean()  # noqa: E731
    assert _close(grad(loss)(p, x), grad(ref_loss)(p, x), atol=1e-6)
    per_sample = vmap(grad(lambda p, x: loss(p, x[None])), in_dims=(None, 0))(p, x)
    assert _close(per_sample, vmap(grad(lambda p, x: ref_loss(p, x[None])), in_dims=(None, 0))(p, x), atol=1e-6)
    stacked = {k: torch.stack([v, 0.5 * v, -v]) for k, v in p.items()}
    want = torch.stack([_tied_ref({k: v[i] for k, v in stacked.items()}, x) for i in range(3)])
    assert _close(vmap(nf.call, in_dims=(None, 0, None))(net, stacked, x), want, atol=1e-6)
    dims = ({"emb.weight": 0, "mid.weight": None, "mid.bias": None},)
    mixed = {"emb.weight": stacked["emb.weight"], "mid.weight": p["mid.weight"], "mid.bias": p["mid.bias"]}
    want = torch.stack([_tied_ref({**p, "emb.weight": stacked["emb.weight"][i]}, x) for i in range(3)])
    assert _close(vmap(lambda q: nf.call(net, q, x), in_dims=dims)(mixed), want, atol=1e-6)
    twice = {k: torch.stack([v, 2 * v]) for k, v in stacked.items()}
    out = vmap(vmap(lambda q: nf.call(net, q, x)))(twice)
    assert _close(out[1, 2], _tied_ref({k: v[1, 2] for k, v in twice.items()}, x), atol=1e-6)
    assert _close(jacrev(lambda q: nf.call(net, q, x[:1]))(p), jacrev(lambda q: _tied_ref(q, x[:1]))(p), atol=1e-6)
    q = nf.randn_like(p)  # the README's example: per-sample gradients with respect to a lerp weight
    lw = lambda w, x: (nf.call(net, nf.lerp(p, q, w), x[None]) ** 2).mean()  # noqa: E731
    lw_ref = lambda w, x: ref_loss({k: p[k] + w * (q[k] - p[k]) for k in p}, x[None])  # noqa: E731
    w = torch.tensor(0.3)
    assert _close(vmap(grad(lw), in_dims=(None, 0))(w, x), vmap(grad(lw_ref), in_dims=(None, 0))(w, x), atol=1e-6)


def test_bind_and_swarm_from_params_are_not_differentiable_as_documented() -> None:
    """Their docstrings say so: gradients come out zero; ``nf.call`` is the differentiable route."""
    torch.manual_seed(0)
    net, x = nn.Linear(3, 2), torch.randn(4, 3)
    p = nf.params(net)
    assert all(v.abs().sum() == 0 for v in grad(lambda q: nf.bind(net, q)(x).sum())(p).values())
    via_call = grad(lambda q: nf.call(net, q, x).sum())(p)
    assert _close(via_call, {"weight": x.sum(0).expand(2, 3), "bias": torch.full((2,), 4.0)})
    swarm = Swarm.normal(net, 3, std=0.5)
    zero = grad(lambda sp: Swarm.from_params(net, sp)(x).sum())(swarm.params)
    assert all(v.abs().sum() == 0 for v in zero.values())
    members = vmap(grad(lambda q: nf.call(net, q, x).sum()))(swarm.params)
    assert _close(members["weight"], x.sum(0).expand(3, 2, 3))


# -- swarms ---------------------------------------------------------------------------------------
class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.b = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("kind", ["fused", "vmap"])
def test_swarm_forward_is_differentiable_in_its_inputs_like_a_loop(kind: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)) if kind == "fused" else _Custom()
    swarm = Swarm.normal(net, 4, std=0.5)
    members = [swarm[i].module() for i in range(4)]
    x, xs = torch.randn(6, 3), torch.randn(4, 6, 3)
    loop = lambda x: torch.stack([m(x) for m in members])  # noqa: E731
    cube = lambda out: (out ** 3).sum()  # noqa: E731
    for kwargs in ({}, {"chunk_size": 3}):
        assert _close(grad(lambda x: cube(swarm(x, **kwargs)))(x), grad(lambda x: cube(loop(x)))(x))
    assert _close(jacrev(swarm)(x[:2]), jacrev(loop)(x[:2]))
    assert _close(jacfwd(swarm)(x[:2]), jacfwd(loop)(x[:2]))
    assert _close(vmap(grad(lambda x: cube(swarm(x))))(xs), vmap(grad(lambda x: cube(loop(x))))(xs), atol=1e-4)
    per_member = lambda xs: torch.stack([m(xs[i]) for i, m in enumerate(members)])  # noqa: E731
    assert _close(grad(lambda xs: cube(swarm(xs, in_dims=0)))(xs), grad(lambda xs: cube(per_member(xs)))(xs))
    a, r = x.clone().requires_grad_(), x.clone().requires_grad_()
    ga = torch.autograd.grad(cube(swarm(a)), a, create_graph=True)[0]
    gr = torch.autograd.grad(cube(loop(r)), r, create_graph=True)[0]
    assert _close(torch.autograd.grad(ga.sum(), a)[0], torch.autograd.grad(gr.sum(), r)[0], atol=1e-4)
    with torch.no_grad():
        assert not swarm(a).requires_grad
    with torch.inference_mode():
        assert _close(swarm(x), loop(x).detach(), atol=1e-6)


class _TiedBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 4, bias=False)
        self.head.weight = self.emb.weight
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.bn(torch.tanh(self.emb(x))))


def _loop_grads(members: list[nn.Module], loss: Callable[[int, nn.Module], Tensor]
                ) -> tuple[list[dict[str, Tensor]], Tensor]:
    grads, losses = [], []
    for i, m in enumerate(members):
        value = loss(i, m)
        named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
        grads.append(dict(zip([n for n, _ in named], torch.autograd.grad(value, [p for _, p in named]))))
        losses.append(value.detach())
    return grads, torch.stack(losses)


def _assert_swarm_grads(got: tuple[Swarm, Tensor], want: tuple[list[dict[str, Tensor]], Tensor]) -> None:
    grads, losses = got
    assert _close(losses, want[1], atol=1e-6)
    for i, member in enumerate(want[0]):
        for name, value in member.items():
            assert _close(grads.params[name][i], value, atol=1e-6), (i, name)


def test_swarm_grad_and_value_matches_a_loop_of_autograd_grad() -> None:
    torch.manual_seed(0)
    swarm = Swarm.normal(_TiedBN(), 3, std=0.3)
    members = [swarm[i].module() for i in range(3)]  # copies taken before the swarm's BN statistics move
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    anchor = nf.params(_TiedBN())
    loss = lambda m, x, y: (F.mse_loss(m(x), y)  # noqa: E731
                            + 0.1 * nf.dot(nf.sub(m.params, anchor), nf.sub(m.params, anchor)))
    want = _loop_grads(members, lambda i, m: F.mse_loss(m(x), y) + 0.1 * sum(
        ((p - anchor[n]) ** 2).sum() for n, p in m.named_parameters()))
    _assert_swarm_grads(swarm.grad_and_value(loss, x, y), want)
    for i, m in enumerate(members):  # the loop ran every forward once in train mode, as the swarm did
        assert _close(swarm.buffers["bn.running_mean"][i], m.bn.running_mean, atol=1e-6)

    net = nn.Sequential(nn.Linear(3, 6), nn.GELU(), nn.Linear(6, 2))
    net[0].bias.requires_grad_(False)
    swarm = Swarm.normal(net, 5, std=0.4)
    members = [swarm[i].module() for i in range(5)]
    xs, ys, y = torch.randn(5, 7, 3), torch.randn(5, 7, 2), torch.randn(7, 2)
    mse = lambda m, x, y: F.mse_loss(m(x), y)  # noqa: E731
    _assert_swarm_grads(swarm.grad_and_value(mse, xs, ys, in_dims=0),
                        _loop_grads(members, lambda i, m: mse(m, xs[i], ys[i])))
    want = _loop_grads(members, lambda i, m: mse(m, xs[i], y))
    for chunk in (None, 1, 2, 5, 9):
        got = swarm.grad_and_value(mse, xs, y, in_dims=(0, None), chunk_size=chunk)
        _assert_swarm_grads(got, want)
        assert torch.equal(got[0].params["0.bias"], torch.zeros(5, 6))  # frozen: zeros, as documented
    want = _loop_grads(members, lambda i, m: 3.0 * mse(m, xs[0], y))
    _assert_swarm_grads(swarm.grad_and_value(lambda m, x, *, y, k: k * mse(m, x, y), xs[0], y=y, k=3.0), want)
    want = _loop_grads(members, lambda i, m: mse(m, xs[0], y))
    for context in (torch.no_grad, torch.inference_mode):  # torch.func.grad ignores the outer mode
        with context():
            got = swarm.grad_and_value(mse, xs[0], y)
        _assert_swarm_grads(got, want)
        assert not got[1].requires_grad


def test_swarm_dropout_randomness_options() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 50), nn.Dropout(0.5), nn.Linear(50, 1))
    swarm, x = Swarm.stack([net, net, net]), torch.randn(4, 3)
    out = swarm(x)
    assert not torch.equal(out[0], out[1])  # "different": independent masks, as in a loop
    for chunk in (None, 1):
        out = swarm(x, randomness="same", chunk_size=chunk)
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    with pytest.raises(RuntimeError, match="randomness"):
        swarm(x, randomness="error")
    grads, losses = swarm.grad_and_value(lambda m, x: m(x).pow(2).mean(), x, randomness="same")
    assert torch.equal(losses[0], losses[2]) and torch.equal(grads.params["0.weight"][0], grads.params["0.weight"][2])
    _, losses = swarm.grad_and_value(lambda m, x: m(x).pow(2).mean(), x)
    assert not torch.equal(losses[0], losses[1])
    torch.manual_seed(5)
    first = swarm(x)
    torch.manual_seed(5)
    assert torch.equal(first, swarm(x))
    swarm.eval()
    assert _close(swarm(x), net.eval()(x).expand(3, 4, 1))


class _Mixed(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.l = nn.Linear(3, 4).to(dtype)
        self.s = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))  # a 0-dim parameter of another dtype
        self.k = nn.Parameter(torch.tensor([2, 3]), requires_grad=False)  # an integer parameter
        self.register_buffer("count", torch.tensor(5))

    def forward(self, x: Tensor) -> Tensor:
        return (self.l(x.to(self.l.weight.dtype)).double() * self.s).sum(-1) * self.k.sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_swarm_of_mixed_dtypes_matches_torch_vmap(dtype: torch.dtype) -> None:
    """A loop rounds low precision matmuls differently than their batched forms, so the reference
    is ``torch.func.vmap`` of ``functional_call``; float32/float64 are also checked against a loop."""
    torch.manual_seed(0)
    net = _Mixed(dtype)
    swarm = Swarm.normal(net, 3, std=0.2)
    x = torch.randn(5, 3)
    assert torch.equal(swarm[2].params["k"], net.k) and torch.equal(swarm[1].module().k, net.k)
    params = {k: v.clone() for k, v in swarm.params.items()}
    loss = lambda p: (torch.func.functional_call(net, p, (x,)) ** 2).mean()  # noqa: E731
    floats = {k: v for k, v in params.items() if v.is_floating_point()}
    ref_grads, ref_losses = vmap(grad_and_value(lambda f: loss({**f, "k": net.k})))(floats)
    grads, losses = swarm.grad_and_value(lambda m, x: (m(x) ** 2).mean(), x)
    assert torch.equal(losses, ref_losses)
    assert all(torch.equal(grads.params[k], ref_grads[k]) for k in floats)
    assert torch.equal(grads.params["k"], torch.zeros(3, 2, dtype=torch.int64))
    if dtype in (torch.float32, torch.float64):
        members = [swarm[i].module() for i in range(3)]
        assert _close(swarm(x), torch.stack([m(x) for m in members]).detach(), atol=1e-6)
        _assert_swarm_grads((grads, losses), _loop_grads(members, lambda i, m: (m(x) ** 2).mean()))


def test_complex_swarm_grad_and_value_matches_a_loop() -> None:
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="Complex modules"):
        net = nn.Linear(2, 2).to(torch.complex64)
    swarm = Swarm.normal(net, 2, std=0.1)
    x = torch.randn(3, 2, dtype=torch.complex64)
    members = [swarm[i].module() for i in range(2)]
    assert _close(swarm(x), torch.stack([m(x) for m in members]).detach(), atol=1e-6)
    got = swarm.grad_and_value(lambda m, x: m(x).abs().pow(2).mean(), x)
    assert got[1].dtype == torch.float32
    _assert_swarm_grads(got, _loop_grads(members, lambda i, m: m(x).abs().pow(2).mean()))
    with pytest.raises(RuntimeError, match="real scalar outputs"):  # torch's own error, as in a loop
        swarm.grad_and_value(lambda m, x: m(x).sum(), x)
