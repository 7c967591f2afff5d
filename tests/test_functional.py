# mypy: disable-error-code="union-attr, index, operator, arg-type, assignment"
# (nn.Module.__getattr__ is typed `Tensor | Module`: attribute access on models is untyped noise here)
"""``nytorch.functional``: params / state / bind / call against plain PyTorch."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import (
    MLP, TiedLM, assert_dicts, assert_snapshot, is_arith, make_input, make_plain, named, named_buffers,
    randomize_buffers, snapshot, storages,
)
from torch import nn

import nytorch
import nytorch.functional as nf


# -- params / state ------------------------------------------------------------------------
def test_params_keys_order_and_values_match_named_parameters(plain_name: str) -> None:
    model = make_plain(plain_name)
    params = nf.params(model)
    assert isinstance(params, dict)
    assert list(params) == [name for name, _ in model.named_parameters()]
    for (name, param), value in zip(model.named_parameters(), params.values()):
        assert torch.equal(value, param.detach()), name
        assert value.dtype == param.dtype and value.device == param.device


def test_params_are_detached_views_sharing_storage(plain_name: str) -> None:
    model = make_plain(plain_name)
    params = nf.params(model)
    for name, param in model.named_parameters():
        value = params[name]
        assert not isinstance(value, nn.Parameter)
        assert value.grad_fn is None and not value.requires_grad, name
        assert value.data_ptr() == param.data_ptr(), name
    # a write into the module is visible through the view (shared storage, no copy)
    with torch.no_grad():
        first_name, first = next(iter(model.named_parameters()))
        first.add_(1)
    assert torch.equal(params[first_name], first.detach())


def test_params_of_tied_model_lists_the_shared_tensor_once() -> None:
    model = TiedLM()
    params = nf.params(model)
    assert "head.weight" not in params and "embed.weight" in params
    assert list(params) == [name for name, _ in model.named_parameters()]


def test_state_is_params_then_buffers(plain_name: str) -> None:
    model = make_plain(plain_name)
    state = nf.state(model)
    expected = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    assert list(state) == expected
    assert set(state) <= set(model.state_dict())  # keyed like state_dict (tied aliases listed once)
    for name, value in state.items():
        assert not value.requires_grad
    for name, buffer in model.named_buffers():
        assert state[name].data_ptr() == buffer.data_ptr()


@pytest.mark.parametrize("fn", [nf.params, nf.state])
def test_params_state_reject_non_modules(fn) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError, match=r"expected an nn.Module as module, got dict"):
        fn({"w": torch.ones(1)})


# -- bind ------------------------------------------------------------------------------------
def test_bind_returns_fresh_module_of_same_class_holding_given_tensors(plain_name: str) -> None:
    model = make_plain(plain_name)
    before = snapshot(model)
    new_values = {name: (t * 2 + 1 if is_arith(t) else t.clone()) for name, t in nf.params(model).items()}
    bound = nf.bind(model, new_values)
    assert type(bound) is type(model) and bound is not model
    assert_snapshot(model, before)  # the original is untouched
    assert {id(m) for m in bound.modules()}.isdisjoint({id(m) for m in model.modules()})
    for name, param in bound.named_parameters():
        assert isinstance(param, nn.Parameter) and param.is_leaf, name
        assert torch.equal(param.detach(), new_values[name])
        assert param.data_ptr() == new_values[name].data_ptr(), name  # no copy
        assert param.requires_grad == dict(model.named_parameters())[name].requires_grad
    # buffers are cloned from the original: same values, own storage
    for (name, buffer), (_, original) in zip(bound.named_buffers(), model.named_buffers()):
        assert torch.equal(buffer, original), name
        assert buffer.data_ptr() != original.data_ptr(), name
    assert bound.training == model.training


def test_bind_forward_equals_module_with_those_values(plain_name: str) -> None:
    model = make_plain(plain_name).eval()
    x = make_input(plain_name)
    values = {name: (t * 0.5 if is_arith(t) else t) for name, t in nf.params(model).items()}
    reference = make_plain(plain_name).eval()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            param.copy_(values[name])
        expected = reference(x)
        assert torch.allclose(nf.bind(model, values)(x), expected)


def test_bind_accepts_buffers_by_name() -> None:
    model = nn.BatchNorm1d(3)
    mean = torch.arange(3.0)
    bound = nf.bind(model, {**nf.params(model), "running_mean": mean})
    assert bound.running_mean is mean
    assert torch.equal(model.running_mean, torch.zeros(3))


def test_bind_keeps_ties() -> None:
    model = TiedLM()
    values = nf.clone(nf.params(model))
    bound = nf.bind(model, values)
    assert bound.head.weight is bound.embed.weight
    assert bound.head.weight is not model.head.weight


def test_bind_parameters_train() -> None:
    model = nn.Linear(2, 1)
    bound = nf.bind(model, nf.clone(nf.params(model)))
    bound(torch.ones(3, 2)).sum().backward()
    assert torch.equal(bound.weight.grad, torch.full((1, 2), 3.0))
    assert model.weight.grad is None


def test_bind_errors() -> None:
    model = MLP()
    good = nf.params(model)
    missing = {k: v for k, v in good.items() if k != "layer1.weight"}
    with pytest.raises(nytorch.StructureError, match=r"bind: parameter 'layer1.weight' is missing"):
        nf.bind(model, missing)
    with pytest.raises(nytorch.StructureError, match=r"bind: MLP has no parameter or buffer named 'extra'"):
        nf.bind(model, {**good, "extra": torch.ones(1)})
    shape = {**good, "layer0.bias": torch.ones(5)}
    with pytest.raises(nytorch.StructureError,
                       match=r"bind: parameter 'layer0.bias' differs: shape \(6,\) float32 vs shape \(5,\) float32"):
        nf.bind(model, shape)
    dtype = {**good, "layer0.bias": torch.ones(6, dtype=torch.float64)}
    with pytest.raises(nytorch.StructureError, match=r"'layer0.bias' differs: shape \(6,\) float32 vs shape \(6,\) float64"):
        nf.bind(model, dtype)
    with pytest.raises(TypeError, match=r"bind: expected a tensor for 'layer0.bias', got list"):
        nf.bind(model, {**good, "layer0.bias": [1.0] * 6})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"bind: expected a mapping"):
        nf.bind(model, list(good.values()))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"bind: expected an nn.Module"):
        nf.bind("model", good)  # type: ignore[arg-type]
    assert isinstance(nytorch.StructureError("x"), ValueError)


def test_bind_of_a_nytomodule_shares_its_configs() -> None:
    model = MLP()
    model.set_param_config(operational=False, name="layer0")
    bound = nf.bind(model, nf.clone(nf.params(model)))
    assert type(bound) is MLP
    doubled = bound * 2
    assert torch.equal(doubled.layer0.weight, bound.layer0.weight)
    assert torch.equal(doubled.layer1.weight, bound.layer1.weight * 2)


# -- call ------------------------------------------------------------------------------------
def test_call_equals_forward(plain_name: str) -> None:
    model = make_plain(plain_name).eval()
    x = make_input(plain_name)
    with torch.no_grad():
        assert torch.equal(nf.call(model, nf.params(model), x), model(x))
        other = {k: (v + 0.25 if is_arith(v) else v) for k, v in nf.params(model).items()}
        assert torch.allclose(nf.call(model, other, x), nf.bind(model, other)(x))
    assert_dicts(named(model), named(make_plain(plain_name)))  # model untouched by call


def test_call_passes_kwargs() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.tensor([2.0]))

        def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
            return self.w * x * scale

    model = Scaled()
    out = nf.call(model, {"w": torch.tensor([3.0])}, torch.tensor([1.0]), scale=10.0)
    assert torch.equal(out, torch.tensor([30.0]))


def test_call_is_differentiable_wrt_params() -> None:
    model = nn.Linear(3, 1)
    x = torch.randn(4, 3)
    params = {k: v.clone().requires_grad_() for k, v in nf.params(model).items()}
    nf.call(model, params, x).sum().backward()
    assert torch.allclose(params["weight"].grad, x.sum(0, keepdim=True))
    assert torch.allclose(params["bias"].grad, torch.tensor([4.0]))


def test_call_rejects_non_module() -> None:
    with pytest.raises(TypeError, match=r"call: expected an nn.Module"):
        nf.call(lambda x: x, {}, torch.ones(1))  # type: ignore[arg-type]


# -- no reference cycles -------------------------------------------------------------------
def test_bind_result_freed_by_refcount_alone() -> None:
    model = make_plain("conv_bn")
    gc.collect()
    gc.disable()
    try:
        bound = nf.bind(model, nf.add(nf.params(model), 1.0))
        ref = weakref.ref(bound)
        del bound
        assert ref() is None
    finally:
        gc.enable()


def test_state_includes_buffers_for_soups() -> None:
    a = make_plain("conv_bn", seed=0)
    b = make_plain("conv_bn", seed=1)
    randomize_buffers(b, seed=7)
    soup = nf.div(nf.add(nf.state(a), nf.state(b)), 2)
    bound = nf.bind(a, soup)
    expected_buffers = {}
    for (name, x), (_, y) in zip(a.named_buffers(), b.named_buffers()):
        expected_buffers[name] = (x + y) / 2 if is_arith(x) else x
    assert_dicts(named_buffers(bound), expected_buffers)
    assert storages(bound).isdisjoint(storages(a) | storages(b))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's own, in forward AD
def test_forward_mode_autodiff_sees_dual_scalars_and_dual_trees():
    """``torch.autograd.forward_ad``: tangents flow through a dual weight, a dual scalar and a dual tree."""
    import torch.autograd.forward_ad as forward_ad

    torch.manual_seed(0)
    p = nf.params(nn.Linear(3, 2))
    q = nf.randn_like(p)
    with forward_ad.dual_level():
        weight = forward_ad.make_dual(torch.tensor(0.3), torch.tensor(1.0))
        tangent = forward_ad.unpack_dual(nf.lerp(p, q, weight)["weight"]).tangent
        assert torch.allclose(tangent, q["weight"] - p["weight"])
        tangent = forward_ad.unpack_dual(nf.add(p, weight)["bias"]).tangent
        assert torch.equal(tangent, torch.ones(2))
        dual = {name: forward_ad.make_dual(value.detach(), torch.ones_like(value)) for name, value in p.items()}
        flat = torch.cat([value.detach().reshape(-1) for value in p.values()])
        expected = forward_ad.unpack_dual(torch.linalg.vector_norm(
            forward_ad.make_dual(flat, torch.ones_like(flat)))).tangent
        assert torch.allclose(forward_ad.unpack_dual(nf.norm(dual)).tangent, expected)


def test_lerp_refuses_a_number_as_its_start_by_name():
    with pytest.raises(TypeError, match=r"^lerp: expected a pytree of tensors as the first operand \(the start\), "
                                        r"got the number 1\.0; only the end and the weight may be numbers$"):
        nf.lerp(1.0, {"w": torch.ones(1)}, 0.5)


def test_randn_like_of_params_draws_what_the_other_styles_draw_under_one_seed() -> None:
    """``nf.randn_like`` flattened dicts with optree, which sorts keys: with 11 or more layers
    ``0, 1, 10, 2, ...``, and ``bias`` before ``weight``, so one seed gave other values than ``net.randn()``."""
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(3, 2 if i == 11 else 3) for i in range(12)])
    params = nf.params(net)
    torch.manual_seed(1)
    drawn = nf.randn_like(params)
    torch.manual_seed(1)
    reference = {name: torch.randn_like(tensor) for name, tensor in params.items()}  # named_parameters() order
    torch.manual_seed(1)
    particle_drawn = nytorch.particle(net).randn().params
    assert list(drawn) == list(params)
    for name in params:
        assert torch.equal(drawn[name], reference[name]), name
        assert torch.equal(particle_drawn[name], reference[name]), name
