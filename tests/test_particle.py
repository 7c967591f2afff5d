# mypy: disable-error-code="union-attr, index, operator, arg-type, assignment"
# (nn.Module.__getattr__ is typed `Tensor | Module`: attribute access on models is untyped noise here)
"""``nytorch.particle`` / ``Particle``: any nn.Module wrapped, checked against per-tensor loops."""
from __future__ import annotations

import gc
import operator
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import (
    TiedLM, assert_dicts, assert_snapshot, conv_net, is_arith, make_input, make_plain, named, named_buffers,
    randomize_buffers, ref_map, snapshot, storages,
)
from torch import nn

import nytorch
from nytorch import Particle

Tensor = torch.Tensor

OPS: dict[str, Callable[[Any, Any], Any]] = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv, "pow": operator.pow,
}
IOPS: dict[str, Callable[[Any, Any], Any]] = {
    "add": operator.iadd, "sub": operator.isub, "mul": operator.imul, "div": operator.itruediv,
    "pow": operator.ipow,
}


def _positive(model: nn.Module) -> nn.Module:
    """Positive floating values, so ``**`` with fractional exponents stays real."""
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.abs_().add_(0.5)
    return model


# -- construction ---------------------------------------------------------------------------------
def test_particle_views_the_model(plain_name: str) -> None:
    model = make_plain(plain_name)
    p = nytorch.particle(model)
    assert isinstance(p, Particle) and p.model_class is type(model)
    assert_dicts(p.params, named(model))
    assert len(p) == len(list(model.parameters()))
    for name, param in model.named_parameters():
        assert p.params[name].data_ptr() == param.data_ptr()
        assert not p.params[name].requires_grad
    assert type(model).__name__ in repr(p)


def test_particle_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match=r"particle: expected an nn.Module as model, got dict"):
        nytorch.particle({"w": torch.ones(1)})  # type: ignore[arg-type]


def test_paramproduct_is_particle() -> None:
    assert nytorch.ParamProduct is nytorch.Particle


# -- arithmetic -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["int", "float", "tensor0d", "particle", "module"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_binary_ops_match_per_tensor_loop(plain_name: str, op: str, kind: str) -> None:
    a, b = _positive(make_plain(plain_name, 0)), _positive(make_plain(plain_name, 1))
    before_a, before_b = snapshot(a), snapshot(b)
    operand: Any = {"int": 2, "float": 0.75, "tensor0d": torch.tensor(1.5),
                    "particle": nytorch.particle(b), "module": b}[kind]
    ref_operand = {"particle": named(b), "module": named(b)}.get(kind)
    fn = OPS[op]
    result = fn(nytorch.particle(a), operand)
    assert isinstance(result, Particle) and result.model_class is type(a)
    if ref_operand is None:
        expected = ref_map(lambda x: fn(x, operand).to(x.dtype), named(a))
    else:
        expected = ref_map(fn, named(a), ref_operand)
    # pow over one packed buffer and pow per tensor may round the last bit differently (SIMD vs scalar tail)
    assert_dicts(result.params, expected, exact=kind != "tensor0d" and op != "pow", rtol=1e-6, atol=0)
    assert_snapshot(a, before_a)
    assert_snapshot(b, before_b)
    assert storages(result.params).isdisjoint(storages(a) | storages(b))


@pytest.mark.parametrize("scalar", [2, 0.5, torch.tensor(3.0)], ids=repr)
@pytest.mark.parametrize("op", sorted(OPS))
def test_reflected_ops(plain_name: str, op: str, scalar: Any) -> None:
    a = _positive(make_plain(plain_name))
    before = snapshot(a)
    fn = OPS[op]
    result = fn(scalar, nytorch.particle(a))
    assert isinstance(result, Particle)
    expected = ref_map(lambda x: fn(scalar, x).to(x.dtype), named(a))
    assert_dicts(result.params, expected, exact=not isinstance(scalar, Tensor) and op != "pow", rtol=1e-6, atol=0)
    assert_snapshot(a, before)


def test_unary_ops(plain_name: str) -> None:
    a = make_plain(plain_name)
    p = nytorch.particle(a)
    assert_dicts((-p).params, ref_map(torch.neg, named(a)))
    plus = +p
    assert_dicts(plus.params, named(a))
    assert storages(plus.params).isdisjoint(storages(a))


@pytest.mark.parametrize("op", sorted(IOPS))
def test_inplace_ops_write_into_the_model(plain_name: str, op: str) -> None:
    a, b = _positive(make_plain(plain_name, 0)), _positive(make_plain(plain_name, 1))
    objects = [id(t) for t in a.parameters()]
    expected_scalar = ref_map(lambda x: OPS[op](x, 1.5).to(x.dtype), named(a))
    p = nytorch.particle(a)
    q = IOPS[op](p, 1.5)
    assert q is p
    assert_dicts(named(a), expected_scalar, exact=op != "pow", rtol=1e-6, atol=0)
    expected_model = ref_map(OPS[op], named(a), named(b))
    p2 = nytorch.particle(a)
    p2 = IOPS[op](p2, b)
    assert_dicts(named(a), expected_model, exact=False, rtol=1e-6, atol=0)  # complex `/=` rounds differently
    assert [id(t) for t in a.parameters()] == objects


@pytest.mark.parametrize("bad", ["text", None, [1.0], {"weight": 1.0}, 1j, torch.tensor(1j), torch.ones(3),
                                 nn.Linear(3, 2), nn.Linear(2, 2)], ids=repr)
@pytest.mark.parametrize("op", sorted(IOPS))
def test_failed_ops_raise_and_change_nothing(op: str, bad: Any) -> None:
    model = nn.Linear(3, 2) if not isinstance(bad, nn.Linear) else nn.Sequential(nn.Linear(3, 2))
    if isinstance(bad, nn.Linear) and bad.in_features == 3:
        model = nn.Linear(2, 2)  # same class, other shapes
        bad = nn.Linear(3, 2)
    before = snapshot(model)
    p = nytorch.particle(model)
    for fn in (OPS[op], IOPS[op], lambda x, y: OPS[op](y, x)):
        with pytest.raises((TypeError, ValueError)) as info:
            fn(p, bad)
        assert not isinstance(info.value, AssertionError)
        assert_snapshot(model, before)


def test_mismatch_message_names_first_differing_parameter() -> None:
    a = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 4), nn.Linear(4, 5))
    b = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 6), nn.Linear(6, 5))
    with pytest.raises(nytorch.StructureError,
                       match=r"add: parameter '1.weight' differs: shape \(4, 3\) float32 vs shape \(6, 3\) float32"):
        nytorch.particle(a) + b
    c = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 4).double(), nn.Linear(4, 5))
    with pytest.raises(ValueError, match=r"'1.weight' differs: shape \(4, 3\) float32 vs shape \(4, 3\) float64"):
        nytorch.particle(a) - nytorch.particle(c)
    with pytest.raises(TypeError, match=r"expected a Sequential \(or a Particle of one\), got a Linear"):
        nytorch.particle(a) * nn.Linear(2, 3)
    d = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 4, bias=False), nn.Linear(4, 5))
    with pytest.raises(nytorch.StructureError, match=r"'1.bias' is missing from the second operand"):
        nytorch.particle(a) + d


def test_independent_instances_combine() -> None:
    a, b = conv_net(), conv_net()  # built separately: structures match, so they combine
    out = (nytorch.particle(a) + nytorch.particle(b)) / 2
    assert_dicts(out.params, ref_map(lambda x, y: (x + y) / 2, named(a), named(b)))


def test_device_mismatch_raises_clear_error() -> None:
    a = nn.Linear(2, 2)
    b = nn.Linear(2, 2, device="meta")
    with pytest.raises(nytorch.DeviceMismatchError, match=r"'weight' is on cpu in the first operand and on meta"):
        nytorch.particle(a) + b
    with pytest.raises(nytorch.DeviceMismatchError):
        nytorch.particle(a) * torch.tensor(2.0, device="meta")


def test_results_keep_dtype() -> None:
    model = nn.Sequential(nn.Linear(2, 2).double(), nn.Linear(2, 2).half())
    p = nytorch.particle(model)
    for result in (p * 3, 1 - p, p + p, p.randn(), p.clone(), -p, p ** 2):
        assert [t.dtype for t in result.params.values()] == [t.dtype for t in model.parameters()]
        assert result.module()[1].weight.dtype == torch.float16


# -- randn / clone / lerp ----------------------------------------------------------------------------
def test_randn_reproducible_and_typed(plain_name: str) -> None:
    model = make_plain(plain_name)
    p = nytorch.particle(model)
    before = snapshot(model)
    torch.manual_seed(7)
    r1 = p.randn()
    torch.manual_seed(7)
    r2 = p.randn()
    assert_dicts(r1.params, r2.params)
    for (name, value), param in zip(r1.params.items(), model.parameters()):
        assert value.shape == param.shape and value.dtype == param.dtype and value.device == param.device
        if not is_arith(param):
            assert torch.equal(value, param)
        elif param.numel() > 1:
            assert not torch.equal(value, param)
    assert_snapshot(model, before)


def test_clone_is_equal_and_independent(plain_name: str) -> None:
    model = make_plain(plain_name)
    c = nytorch.particle(model).clone()
    assert_dicts(c.params, named(model))
    assert storages(c.params).isdisjoint(storages(model))
    c += 1
    assert_dicts(named(model), named(make_plain(plain_name)))


def test_lerp_and_lerp_() -> None:
    a, b = make_plain("conv_bn", 0), make_plain("conv_bn", 1)
    expected = ref_map(lambda x, y: torch.lerp(x, y, 0.25), named(a), named(b))
    assert_dicts(nytorch.particle(a).lerp(b, 0.25).params, expected)
    weight = a[0].weight
    ema = nytorch.particle(a)
    assert ema.lerp_(nytorch.particle(b), 0.25) is ema
    assert_dicts(named(a), expected)
    assert a[0].weight is weight


# -- unary_operator / binary_operator --------------------------------------------------------------------
def test_unary_operator_applies_fn_with_config(plain_name: str) -> None:
    model = make_plain(plain_name)
    seen: list[tuple[int, nytorch.ParamConfig]] = []

    def fn(param: Tensor, config: nytorch.ParamConfig) -> Tensor:
        seen.append((id(param), config))
        return param * 3 if is_arith(param) else param.clone()

    result = nytorch.particle(model).unary_operator(fn)
    assert isinstance(result, Particle)
    assert_dicts(result.params, ref_map(lambda x: x * 3, named(model)))
    assert [i for i, _ in seen] == [id(p) for p in model.parameters()]  # the model's own tensors, in order
    assert all(c.operational and c.clone for _, c in seen)


def test_binary_operator(plain_name: str) -> None:
    a, b = make_plain(plain_name, 0), make_plain(plain_name, 1)

    def fn(x: Tensor, y: Tensor, config: nytorch.ParamConfig) -> Tensor:
        return x * 2 - y if is_arith(x) else x.clone()

    expected = ref_map(lambda x, y: x * 2 - y, named(a), named(b))
    assert_dicts(nytorch.particle(a).binary_operator(nytorch.particle(b), fn).params, expected)
    assert_dicts(nytorch.particle(a).binary_operator(b, fn).params, expected)
    with pytest.raises(TypeError, match=r"binary_operator: expected a Particle"):
        nytorch.particle(a).binary_operator(2.0, fn)


# -- module() / copy_to / from_params --------------------------------------------------------------------
def test_module_is_a_fresh_trainable_model(plain_name: str) -> None:
    model = make_plain(plain_name)
    model.eval()
    p = nytorch.particle(model) * 2
    out = p.module()
    assert type(out) is type(model) and out is not model
    assert_dicts(named(out), p.params)
    for name, param in out.named_parameters():
        source = dict(model.named_parameters())[name]
        assert isinstance(param, nn.Parameter) and param.is_leaf and param.grad_fn is None
        assert param.requires_grad == source.requires_grad
        assert param.data_ptr() == p.params[name].data_ptr()  # shares storage with the Particle
    assert [m.training for m in out.modules()] == [m.training for m in model.modules()]
    assert_dicts(named_buffers(out), named_buffers(model))
    assert storages(dict(out.named_buffers())).isdisjoint(storages(model))
    x = make_input(plain_name)
    reference = make_plain(plain_name).eval()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if is_arith(param):
                param.mul_(2)
        assert torch.allclose(out(x), reference(x))


def test_module_of_particle_of_model_shares_storage_with_model() -> None:
    model = nn.Linear(2, 2)
    out = nytorch.particle(model).module()
    assert out.weight is not model.weight and out.weight.data_ptr() == model.weight.data_ptr()


def test_copy_to_writes_in_place_keeping_parameter_objects(plain_name: str) -> None:
    source, target = make_plain(plain_name, 0), make_plain(plain_name, 1)
    objects = [id(t) for t in target.parameters()]
    optimizer = torch.optim.SGD([p for p in target.parameters() if p.requires_grad], lr=0.1)
    p = nytorch.particle(source) * 2
    assert p.copy_to(target) is target
    assert [id(t) for t in target.parameters()] == objects
    assert_dicts(named(target), p.params)
    # the optimizer still drives the same Parameters
    for param in target.parameters():
        if param.requires_grad:
            param.grad = torch.ones_like(param)
    optimizer.step()
    expected = {k: (v - 0.1 if dict(target.named_parameters())[k].requires_grad else v)
                for k, v in p.params.items()}
    assert_dicts(named(target), expected, exact=False)


def test_copy_to_errors_leave_target_untouched() -> None:
    target = nn.Linear(2, 3)
    before = snapshot(target)
    with pytest.raises(TypeError, match=r"copy_to: expected a Sequential"):
        nytorch.particle(nn.Sequential(nn.Linear(2, 3))).copy_to(target)
    with pytest.raises(nytorch.StructureError, match=r"copy_to: parameter 'weight' differs"):
        nytorch.particle(nn.Linear(2, 4)).copy_to(target)
    assert_snapshot(target, before)


def test_from_params() -> None:
    model = nn.Linear(2, 3)
    params = {"weight": torch.ones(3, 2), "bias": torch.zeros(3)}
    p = nytorch.Particle.from_params(model, params)
    assert p.params["weight"].data_ptr() == params["weight"].data_ptr()
    assert_dicts((p + 1).params, {"weight": torch.full((3, 2), 2.0), "bias": torch.ones(3)})
    with pytest.raises(nytorch.StructureError, match=r"'bias' is missing from params"):
        nytorch.Particle.from_params(model, {"weight": torch.ones(3, 2)})
    with pytest.raises(nytorch.StructureError, match=r"extra parameter 'other'"):
        nytorch.Particle.from_params(model, {**params, "other": torch.ones(1)})
    with pytest.raises(TypeError):
        nytorch.Particle.from_params("model", params)  # type: ignore[arg-type]


# -- buffers -----------------------------------------------------------------------------------------------
def test_buffers_are_cloned_not_shared_by_default() -> None:
    a, b = make_plain("conv_bn", 0), randomize_buffers(make_plain("conv_bn", 1), seed=3)
    result = (nytorch.particle(a) + b).module()
    assert_dicts(named_buffers(result), named_buffers(a))
    assert storages(dict(result.named_buffers())).isdisjoint(storages(a) | storages(b))
    result[1].running_mean.add_(100)
    assert_dicts(named_buffers(a), named_buffers(make_plain("conv_bn", 0)))


def test_buffers_opt_in_averages_floating_buffers() -> None:
    a, b = make_plain("conv_bn", 0), randomize_buffers(make_plain("conv_bn", 1), seed=3)
    pa, pb = nytorch.particle(a, buffers=True), nytorch.particle(b, buffers=True)
    soup = ((pa + pb) / 2).module()
    expected = ref_map(lambda x, y: (x + y) / 2, named_buffers(a), named_buffers(b))
    assert_dicts(named_buffers(soup), expected)
    assert soup[1].num_batches_tracked.dtype == torch.long
    assert torch.equal(soup[1].num_batches_tracked, a[1].num_batches_tracked)
    assert_dicts(named(soup), ref_map(lambda x, y: (x + y) / 2, named(a), named(b)))
    # a buffers-Particle accepts a plain model as operand too (its buffers included)
    soup2 = ((pa + b) / 2).module()
    assert_dicts(named_buffers(soup2), expected)


# -- semantics ---------------------------------------------------------------------------------------------
def test_tied_parameters_stay_tied() -> None:
    model = TiedLM()
    p = nytorch.particle(model)
    for result in (p + 1, p * p, p.randn(), p.clone(), 2 - p):
        out = result.module()
        assert out.head.weight is out.embed.weight
        assert not {id(t) for t in out.parameters()} & {id(t) for t in model.parameters()}


def test_train_eval_mode_kept() -> None:
    model = conv_net()
    model[1].eval()
    out = (nytorch.particle(model) + 1).module()
    assert [m.training for m in out.modules()] == [m.training for m in model.modules()]
    model.eval()
    assert not any(m.training for m in (nytorch.particle(model) * 2).module().modules())


def test_submodule_particle_gives_submodule_class() -> None:
    model = conv_net()
    out = (nytorch.particle(model[0]) * 2).module()
    assert type(out) is nn.Conv2d
    assert torch.equal(out.weight, model[0].weight * 2)
    out.weight.data.zero_()
    assert not torch.equal(model[0].weight, torch.zeros_like(model[0].weight))


def test_results_are_freed_by_refcounting() -> None:
    model = conv_net()
    gc.collect()
    gc.disable()
    try:
        for make in (lambda: nytorch.particle(model) + 1, lambda: (nytorch.particle(model) * 2).module(),
                     lambda: nytorch.particle(model).randn(), lambda: nytorch.particle(model, buffers=True) / 2):
            result = make()
            ref = weakref.ref(result)
            del result
            assert ref() is None
    finally:
        gc.enable()


def test_broadcasting_containers_get_the_reflected_operator() -> None:
    class Broadcaster:
        __nytorch_broadcasts__ = True

        def __radd__(self, other: Any) -> str:
            return "radd"

        def __rmul__(self, other: Any) -> str:
            return "rmul"

    p = nytorch.particle(nn.Linear(1, 1))
    assert p + Broadcaster() == "radd"
    assert p * Broadcaster() == "rmul"


def test_particle_results_can_be_trained() -> None:
    model = nn.Linear(3, 1)
    out = (nytorch.particle(model) * 0.5).module()
    out(torch.ones(2, 3)).sum().backward()
    assert torch.equal(out.weight.grad, torch.full((1, 3), 2.0))
    assert model.weight.grad is None


def test_parametrized_and_parameterless_modules() -> None:
    from torch.nn.utils import parametrize

    class Symmetric(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x.triu() + x.triu(1).transpose(-1, -2)

    layer = nn.Linear(3, 3)
    parametrize.register_parametrization(layer, "weight", Symmetric())
    doubled = (nytorch.particle(layer) * 2).module()
    x = torch.randn(2, 3)
    reference = {k: v * 2 for k, v in named(layer).items()}
    assert_dicts(named(doubled), reference)
    with torch.no_grad():
        expected = x @ Symmetric()(reference["parametrizations.weight.original"]).T + reference["bias"]
        assert torch.allclose(doubled(x), expected)
    empty = (nytorch.particle(nn.ReLU()) + 1).module()
    assert type(empty) is nn.ReLU


def test_buffers_particle_in_place_and_copy_to() -> None:
    model = make_plain("conv_bn", 0)
    before_buffers = {k: v.clone() for k, v in named_buffers(model).items()}
    before_params = {k: v.clone() for k, v in named(model).items()}
    p = nytorch.particle(model, buffers=True)
    p *= 2
    assert_dicts(named_buffers(model), ref_map(lambda x: x * 2, before_buffers))
    assert_dicts(named(model), ref_map(lambda x: x * 2, before_params))
    target = make_plain("conv_bn", 1)
    (nytorch.particle(model, buffers=True) + 1).copy_to(target)
    assert_dicts(named_buffers(target), ref_map(lambda x: x + 1, named_buffers(model)))
    assert_dicts(named(target), ref_map(lambda x: x + 1, named(model)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_mixed_dtypes_and_devices() -> None:
    a, b = make_plain("mixed", 0).cuda(), make_plain("mixed", 1).cuda()
    for result, expected in ((nytorch.particle(a) + b, ref_map(torch.add, named(a), named(b))),
                             (nytorch.particle(a) * torch.tensor(2.0), ref_map(lambda x: x * 2, named(a))),
                             (nytorch.particle(a) * torch.tensor(2.0, device="cuda"),
                              ref_map(lambda x: x * 2, named(a))),
                             (2 - nytorch.particle(a), ref_map(lambda x: 2 - x, named(a)))):
        assert_dicts(result.params, expected, exact=False, rtol=1e-6, atol=0)
    p = nytorch.particle(a)
    p += b
    with pytest.raises(nytorch.DeviceMismatchError, match=r"is on cuda:0 in the first operand and on cpu"):
        nytorch.particle(a) + make_plain("mixed", 1)


def test_module_of_a_result_has_version_counters_of_its_own_and_stays_in_sync():
    """``(p + q).module()``: a step on one Parameter does not mark the others as modified for autograd,
    and in-place operations on the Particle afterwards are seen by autograd in the module."""
    torch.manual_seed(0)
    first, second = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    p = nytorch.particle(first) + nytorch.particle(second)
    module = p.module()
    x = torch.randn(5, 4, requires_grad=True)
    loss = module[1](x).sum()  # saves module[1].weight
    with torch.no_grad():
        module[0].bias.add_(1.0)  # another Parameter, as one optimizer of two would
    loss.backward()
    loss = module[1](x).sum()
    p += 1.0  # writes every Parameter of the module (they share storage with p)
    assert torch.equal(module[1].weight, first[1].weight + second[1].weight + 1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    assert torch.equal((p * 2).params["0.bias"], module[0].bias * 2)  # and p still reads the module's values


def test_clone_randn_and_len_make_no_leaf_views():
    """``len(p)`` counts names, and ``clone``/``randn``/``rand`` test their flat result with ``is None``
    (``or`` asked ``len``, which made 200 views per call: clone on 200 tensors was 5x slower)."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(4, 4) for _ in range(5)))
    p = nytorch.particle(model)
    for result in (p.clone(), p.randn(), p.rand(), p * 2.0):
        assert result._leaf_list is None  # one buffer, no views yet
        assert len(result) == 10
    assert torch.equal(p.clone().params["3.weight"], model[3].weight.detach())


@pytest.mark.parametrize("fn, message", [
    (lambda leaf, config: leaf.sum(), r"returned shape \(\) float32 on cpu for parameter 'weight' \(shape \(2, 3\) "
                                      r"float32 on cpu\)"),
    (lambda leaf, config: leaf.double(), r"returned shape \(2, 3\) float64 on cpu for parameter 'weight'"),
])
def test_unary_operator_refuses_results_of_another_shape_or_dtype(fn, message):
    p = nytorch.particle(nn.Linear(3, 2))
    with pytest.raises(nytorch.StructureError, match=r"^unary_operator: the function " + message):
        p.unary_operator(fn)
    with pytest.raises(nytorch.StructureError, match=r"^binary_operator: the function " + message):
        p.binary_operator(p, lambda a, b, config: fn(a, config))


def test_unary_operator_refuses_results_that_are_not_tensors():
    p = nytorch.particle(nn.Linear(3, 2))
    with pytest.raises(TypeError, match=r"^unary_operator: expected the function to return a tensor for parameter "
                                        r"'weight', got float$"):
        p.unary_operator(lambda leaf, config: 3.0)


def test_a_particle_of_a_model_packed_later_takes_the_one_pass_path_then() -> None:
    """``particle(m, pack=False)`` finds m's tensors scattered; after ``flatten_(m)`` it finds them flat."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    p = nytorch.particle(model, pack=False)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    assert all(torch.equal(v, before[k] * 2) for k, v in (p * 2).params.items())
    assert p._flat is False
    nytorch.flatten_(model)
    doubled = (p * 2).params
    assert p._flat and all(torch.equal(v, before[k] * 2) for k, v in doubled.items())
    p += 1.0  # in place: into the model's (now packed) tensors
    assert all(torch.equal(param.detach(), before[name] + 1) for name, param in model.named_parameters())
