# mypy: disable-error-code="union-attr, index, operator, arg-type, assignment"
# (nn.Module.__getattr__ is typed `Tensor | Module`: attribute access on models is untyped noise here)
"""``NytoModule``: the seed behaviour, operators, in-place semantics and model-level guarantees."""
from __future__ import annotations

import copy
import gc
import operator
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import (
    MLP, Block, Deep, MixedNyto, NytoLinear, TiedNyto, assert_dicts, assert_fresh_leaf_parameters,
    assert_snapshot, is_arith, make_nyto, named, named_buffers, randomize_buffers, ref_map, snapshot, storages,
)
from torch import nn

import nytorch as nyto

Tensor = torch.Tensor

OPS: dict[str, Callable[[Any, Any], Any]] = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv, "pow": operator.pow,
}
IOPS: dict[str, Callable[[Any, Any], Any]] = {
    "add": operator.iadd, "sub": operator.isub, "mul": operator.imul, "div": operator.itruediv,
    "pow": operator.ipow,
}


def _positive(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.abs_().add_(0.5)
    return model


# -- 1. the seed behaviour, exactly ---------------------------------------------------------------
def test_seed_example_exact() -> None:
    net = NytoLinear()
    net2 = net + 10
    assert type(net2) is NytoLinear and net2 is not net
    assert torch.equal(net2.weight, torch.tensor([12.0])) and torch.equal(net2.bias, torch.tensor([11.0]))
    assert torch.equal(net.weight, torch.tensor([2.0])) and torch.equal(net.bias, torch.tensor([1.0]))
    x = torch.arange(4)
    assert torch.equal(net(x), torch.tensor([1.0, 3.0, 5.0, 7.0]))
    assert torch.equal(net2(x), torch.tensor([11.0, 23.0, 35.0, 47.0]))
    net3 = net + net2
    assert type(net3) is NytoLinear
    assert torch.equal(net3.weight, torch.tensor([14.0])) and torch.equal(net3.bias, torch.tensor([12.0]))
    assert torch.equal(net.weight, torch.tensor([2.0])) and torch.equal(net2.weight, torch.tensor([12.0]))


def test_seed_randn() -> None:
    net = NytoLinear()
    torch.manual_seed(3)
    r1 = net.randn()
    torch.manual_seed(3)
    r2 = net.randn()
    assert type(r1) is NytoLinear
    assert_dicts(named(r1), named(r2))
    for (name, value), param in zip(named(r1).items(), net.parameters()):
        assert (value.shape, value.dtype, value.device) == (param.shape, param.dtype, param.device)
    assert torch.equal(net.weight, torch.tensor([2.0]))
    assert_fresh_leaf_parameters(r1, net)
    # N(0, 1) values: a wide model has sample mean ~0 and std ~1
    wide = MLP(100, 200, 10)
    torch.manual_seed(0)
    values = torch.cat([t.reshape(-1) for t in wide.randn().parameters()]).detach()
    assert abs(values.mean().item()) < 0.02 and abs(values.std().item() - 1) < 0.02


def test_seed_clone() -> None:
    net = NytoLinear()
    c = net.clone()
    assert type(c) is NytoLinear
    assert c.weight is not net.weight and c.bias is not net.bias
    assert torch.equal(c.weight, net.weight) and torch.equal(c.bias, net.bias)
    assert c.weight.data_ptr() != net.weight.data_ptr()
    assert_fresh_leaf_parameters(c, net)


@pytest.mark.parametrize("expr, weight, bias", [
    ("net + 10", 12.0, 11.0), ("10 + net", 12.0, 11.0), ("net - 1", 1.0, 0.0), ("2 - net", 0.0, 1.0),
    ("net * 3", 6.0, 3.0), ("3 * net", 6.0, 3.0), ("net / 4", 0.5, 0.25), ("2 / net", 1.0, 2.0),
    ("net ** 2", 4.0, 1.0), ("2 ** net", 4.0, 2.0), ("-net", -2.0, -1.0), ("+net", 2.0, 1.0),
    ("net + torch.tensor(10.)", 12.0, 11.0), ("torch.tensor(2.) - net", 0.0, 1.0),
    ("torch.tensor(2.) ** net", 4.0, 2.0), ("torch.tensor(2.) / net", 1.0, 2.0),
    ("net * torch.tensor(3, dtype=torch.int64)", 6.0, 3.0), ("net + net", 4.0, 2.0), ("net - net", 0.0, 0.0),
    ("net * net", 4.0, 1.0), ("net / net", 1.0, 1.0), ("net ** net", 4.0, 1.0), ("net + net.product()", 4.0, 2.0),
    ("net * True", 2.0, 1.0), ("net.lerp(net * 3, 0.5)", 4.0, 2.0),
])
def test_seed_operator_table(expr: str, weight: float, bias: float) -> None:
    net = NytoLinear()
    result = eval(expr, {"net": net, "torch": torch})
    assert type(result) is NytoLinear and result is not net
    assert torch.equal(result.weight, torch.tensor([weight])) and torch.equal(result.bias, torch.tensor([bias]))
    assert result.weight.dtype == torch.float32
    assert_fresh_leaf_parameters(result, net)
    assert torch.equal(net.weight, torch.tensor([2.0])) and torch.equal(net.bias, torch.tensor([1.0]))


@pytest.mark.parametrize("op, weight, bias", [
    ("+=", 12.0, 11.0), ("-=", -8.0, -9.0), ("*=", 20.0, 10.0), ("/=", 0.2, 0.1), ("**=", 1024.0, 1.0),
])
def test_seed_inplace_table(op: str, weight: float, bias: float) -> None:
    net = NytoLinear()
    w, b = net.weight, net.bias
    scope = {"net": net}
    exec(f"net {op} 10", scope)
    assert scope["net"] is net and net.weight is w and net.bias is b
    assert torch.allclose(net.weight.detach(), torch.tensor([weight])), net.weight
    assert torch.allclose(net.bias.detach(), torch.tensor([bias]))
    assert net.weight.is_leaf and net.weight.requires_grad


# -- operators over the sample models -----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["int", "float", "tensor0d", "model", "particle"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_binary_ops_match_per_tensor_loop(nyto_name: str, op: str, kind: str) -> None:
    a, b = _positive(make_nyto(nyto_name, 0)), _positive(make_nyto(nyto_name, 1))
    before_a, before_b = snapshot(a), snapshot(b)
    operand: Any = {"int": 3, "float": 0.5, "tensor0d": torch.tensor(1.25), "model": b,
                    "particle": b.product()}[kind]
    fn = OPS[op]
    result = fn(a, operand)
    assert type(result) is type(a)
    if kind in ("model", "particle"):
        expected = ref_map(fn, named(a), named(b))
    else:
        expected = ref_map(lambda x: fn(x, operand).to(x.dtype), named(a))
    assert_dicts(named(result), expected, exact=kind != "tensor0d", rtol=1e-6, atol=0)
    assert_fresh_leaf_parameters(result, a)
    assert_dicts(named_buffers(result), named_buffers(a))
    assert storages(result).isdisjoint(storages(a) | storages(b))
    assert_snapshot(a, before_a)
    assert_snapshot(b, before_b)


@pytest.mark.parametrize("scalar", [2, 0.5, torch.tensor(2.0)], ids=repr)
@pytest.mark.parametrize("op", sorted(OPS))
def test_reflected_ops(nyto_name: str, op: str, scalar: Any) -> None:
    a = _positive(make_nyto(nyto_name))
    before = snapshot(a)
    result = OPS[op](scalar, a)
    assert type(result) is type(a)
    expected = ref_map(lambda x: OPS[op](scalar, x).to(x.dtype), named(a))
    assert_dicts(named(result), expected, exact=not isinstance(scalar, Tensor), rtol=1e-6, atol=0)
    assert_fresh_leaf_parameters(result, a)
    assert_snapshot(a, before)


def test_unary_ops(nyto_name: str) -> None:
    a = make_nyto(nyto_name)
    neg, pos = -a, +a
    assert type(neg) is type(a) and type(pos) is type(a) and pos is not a
    assert_dicts(named(neg), ref_map(torch.neg, named(a)))
    assert_dicts(named(pos), named(a))
    assert_fresh_leaf_parameters(neg, a)
    assert_fresh_leaf_parameters(pos, a)
    assert storages(pos).isdisjoint(storages(a))


def test_results_train_like_any_model() -> None:
    torch.manual_seed(0)
    net = MLP()
    result = net * 0.5 + 1
    optimizer = torch.optim.SGD(result.parameters(), lr=0.1)
    before_result, before_net = named(result), snapshot(net)
    before_result = {k: v.clone() for k, v in before_result.items()}
    result(torch.randn(5, 4)).pow(2).mean().backward()
    grads = {k: p.grad.clone() for k, p in result.named_parameters()}
    optimizer.step()
    assert_dicts(named(result), {k: before_result[k] - 0.1 * grads[k] for k in grads}, exact=False)
    assert all(p.grad is None for p in net.parameters())
    assert_snapshot(net, before_net)


@pytest.mark.parametrize("expr", ["net * s", "s * net", "net + s", "net / s", "s / net", "s - net"])
def test_scalar_requiring_grad_still_gives_leaf_parameters(expr: str) -> None:
    net = _positive(MLP())
    s = torch.tensor(2.0, requires_grad=True)
    result = eval(expr, {"net": net, "s": s})
    assert_fresh_leaf_parameters(result, net)
    fn = {"net * s": lambda x: x * 2, "s * net": lambda x: 2 * x, "net + s": lambda x: x + 2,
          "net / s": lambda x: x / 2, "s / net": lambda x: 2 / x, "s - net": lambda x: 2 - x}[expr]
    assert_dicts(named(result), ref_map(fn, named(net)), exact=False, rtol=1e-6, atol=0)


@pytest.mark.parametrize("expr", ["net - s", "net ** s", "s ** net", "net.lerp(net, s)", "net.product() - s"])
def test_scalar_requiring_grad_sub_pow_lerp(expr: str) -> None:
    net = _positive(MLP())
    s = torch.tensor(2.0, requires_grad=True)
    eval(expr, {"net": net, "s": s})


@pytest.mark.parametrize("op", ["-=", "**="])
def test_inplace_scalar_requiring_grad_sub_pow(op: str) -> None:
    net = _positive(MLP())
    s = torch.tensor(2.0, requires_grad=True)
    exec(f"net {op} s", {"net": net, "s": s})


# -- in-place -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["scalar", "tensor0d", "model", "particle"])
@pytest.mark.parametrize("op", sorted(IOPS))
def test_inplace_keeps_parameter_objects_and_values_match(nyto_name: str, op: str, kind: str) -> None:
    a, b = _positive(make_nyto(nyto_name, 0)), _positive(make_nyto(nyto_name, 1))
    objects = [id(t) for t in a.parameters()]
    operand: Any = {"scalar": 1.5, "tensor0d": torch.tensor(1.5), "model": b, "particle": b.product()}[kind]
    if kind in ("model", "particle"):
        expected = ref_map(OPS[op], named(a), named(b))
    else:
        expected = ref_map(lambda x: OPS[op](x, operand).to(x.dtype), named(a))
    result = IOPS[op](a, operand)
    assert result is a
    assert [id(t) for t in a.parameters()] == objects
    assert_dicts(named(a), expected, exact=False, rtol=1e-6, atol=0)
    for param in a.parameters():
        assert param.is_leaf and param.grad_fn is None


@pytest.mark.parametrize("op", sorted(IOPS))
def test_optimizer_keeps_working_after_inplace_op(op: str) -> None:
    torch.manual_seed(0)
    net, other = _positive(MLP()), _positive(MLP())
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    x = torch.randn(8, 4)
    net(x).pow(2).mean().backward()
    optimizer.step()  # Adam now holds state keyed by these Parameter objects
    optimizer.zero_grad()
    IOPS[op](net, other)
    after_op = {k: v.clone() for k, v in named(net).items()}
    # reference: the same Adam step on a plain copy holding the same state
    reference = MLP()
    reference.load_state_dict(net.state_dict())
    ref_optimizer = torch.optim.Adam(reference.parameters(), lr=0.01)
    ref_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    net(x).pow(2).mean().backward()
    reference(x).pow(2).mean().backward()
    optimizer.step()
    ref_optimizer.step()
    assert len(optimizer.state) == 4 and all(p in optimizer.state for p in net.parameters())
    assert_dicts(named(net), named(reference), exact=False, rtol=1e-6, atol=1e-7)
    assert not all(torch.equal(after_op[k], v) for k, v in named(net).items())  # the step did move them


@pytest.mark.parametrize("op", sorted(IOPS))
@pytest.mark.parametrize("bad", ["text", None, [1.0], {"layer0.weight": 1.0}, 1j, torch.tensor(1j),
                                 torch.ones(3), "mismatched", "other_class", "other_particle"], ids=repr)
def test_failed_op_raises_and_changes_nothing(op: str, bad: Any) -> None:
    net = MLP()
    operand = {"mismatched": MLP(4, 5, 3), "other_class": Deep(),
               "other_particle": Deep().product()}.get(bad, bad) if isinstance(bad, str) else bad
    before = snapshot(net)
    for fn in (IOPS[op], OPS[op], lambda x, y: OPS[op](y, x)):
        with pytest.raises((TypeError, ValueError)) as info:
            fn(net, operand)
        assert not isinstance(info.value, AssertionError)
        assert_snapshot(net, before)


def test_failure_after_a_partial_structure_match_changes_nothing() -> None:
    class Two(nyto.NytoModule):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.first = nn.Linear(2, 2)
            self.last = nn.Linear(2, n)

    net, other = Two(2), Two(3)  # the first parameters match, the last do not
    before = snapshot(net)
    with pytest.raises(nyto.StructureError, match=r"'last.weight' differs"):
        net += other
    assert_snapshot(net, before)


# -- semantics ----------------------------------------------------------------------------------------
def test_mismatch_names_first_parameter_in_named_parameters_order() -> None:
    class Net(nyto.NytoModule):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.zeta = nn.Linear(2, n)   # registered first, alphabetically last
            self.alpha = nn.Linear(n, 3)

    a, b = Net(3), Net(4)
    assert [n for n, _ in a.named_parameters()][0] == "zeta.weight"
    with pytest.raises(nyto.StructureError,
                       match=r"add: parameter 'zeta.weight' differs: shape \(3, 2\) float32 vs shape \(4, 2\) float32"):
        a + b
    c = Net(3).double()
    with pytest.raises(ValueError, match=r"mul: parameter 'zeta.weight' differs: shape \(3, 2\) float32 vs "
                                         r"shape \(3, 2\) float64"):
        a * c


def test_models_of_other_class_are_type_errors() -> None:
    with pytest.raises(TypeError, match=r"add: expected a MLP \(or a Particle of one\), got a Deep"):
        MLP() + Deep()
    with pytest.raises(TypeError, match=r"got a Particle of Linear"):
        MLP() + nyto.particle(nn.Linear(1, 1))
    with pytest.raises(TypeError, match=r"only 0-dim tensors broadcast"):
        MLP() * torch.ones(2)


def test_independent_instances_with_same_structure_combine() -> None:
    a, b = MLP(4, 6, 3), MLP(4, 6, 3)
    assert_dicts(named((a + b) / 2), ref_map(lambda x, y: (x + y) / 2, named(a), named(b)))


def test_integer_parameters_and_buffers_are_carried() -> None:
    a, b = MixedNyto(), MixedNyto()
    with torch.no_grad():
        b.counts.add_(10)
    result = a + b
    assert torch.equal(result.counts, a.counts) and result.counts.dtype == torch.int64
    assert result.counts is not a.counts
    assert torch.equal(result.steps, a.steps) and result.steps is not a.steps
    assert torch.equal(result.wc, a.wc + b.wc)  # complex takes part
    assert not result.frozen.requires_grad and result.w64.dtype == torch.float64


def test_buffers_cloned_by_default_and_averaged_on_request() -> None:
    a, b = make_nyto("deep", 0), randomize_buffers(make_nyto("deep", 1), seed=5)
    result = a + b
    assert_dicts(named_buffers(result), named_buffers(a))
    assert storages(dict(result.named_buffers())).isdisjoint(storages(a))
    soup = ((a.product(buffers=True) + b.product(buffers=True)) / 2).module()
    assert type(soup) is Deep
    assert_dicts(named_buffers(soup), ref_map(lambda x, y: (x + y) / 2, named_buffers(a), named_buffers(b)))
    assert torch.equal(soup.bn.num_batches_tracked, a.bn.num_batches_tracked)
    assert_dicts(named(soup), ref_map(lambda x, y: (x + y) / 2, named(a), named(b)))


def test_tied_parameters_stay_tied() -> None:
    net, other = TiedNyto(), TiedNyto()
    for result in (net + 1, net * other, net.randn(), net.clone(), 2 ** net, -net, net.detach(),
                   net.clone_from(other), net.product().module()):
        assert result.head.weight is result.embed.weight
    tied_ptr = net.embed.weight
    net += other
    assert net.head.weight is net.embed.weight is tied_ptr


def test_dtype_and_device_kept() -> None:
    net = MLP().double()
    for result in (net + 1, net * net, 2 - net, net.randn(), net.clone()):
        assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in result.parameters())


def test_device_mismatch_is_a_clear_error() -> None:
    net = MLP()
    meta = MLP().to("meta")
    with pytest.raises(nyto.DeviceMismatchError, match=r"'layer0.weight' is on cpu in the first operand and on meta"):
        net + meta


def test_train_eval_mode_kept() -> None:
    net = make_nyto("deep")
    net.block0.eval()
    for result in (net + 1, net.clone(), net.randn(), net.detach()):
        assert [m.training for m in result.modules()] == [m.training for m in net.modules()]
    net.eval()
    assert not any(m.training for m in (net * 2).modules())


def test_operating_on_a_submodule_returns_the_submodule_class_independent_of_root() -> None:
    net = make_nyto("deep")
    before = snapshot(net)
    out = net.block0 * 2 + 1
    assert type(out) is Block
    assert_dicts(named(out), ref_map(lambda x: x * 2 + 1, named(net.block0)))
    assert not {id(m) for m in out.modules()} & {id(m) for m in net.modules()}
    assert storages(out).isdisjoint(storages(net))
    with torch.no_grad():
        for param in out.parameters():
            param.zero_()
    assert_snapshot(net, before)
    assert net.block0 is not out


def test_lerp_and_lerp_() -> None:
    a, b = MLP(), MLP()
    expected = ref_map(lambda x, y: torch.lerp(x, y, 0.1), named(a), named(b))
    out = a.lerp(b, 0.1)
    assert type(out) is MLP
    assert_dicts(named(out), expected)
    objects = [id(p) for p in a.parameters()]
    assert a.lerp_(b, 0.1) is a
    assert_dicts(named(a), expected)
    assert [id(p) for p in a.parameters()] == objects


def test_no_reference_cycles() -> None:
    net, other = make_nyto("deep", 0), make_nyto("deep", 1)
    gc.collect()
    gc.disable()
    try:
        makers = [lambda: net + 1, lambda: net * other, lambda: 2 - net, lambda: -net, lambda: net.clone(),
                  lambda: net.randn(), lambda: net.detach(), lambda: net.clone_from(other),
                  lambda: net.product().module(), lambda: net.block0 + 1, lambda: net.product() * 2,
                  lambda: Deep()]
        for make in makers:
            result = make()
            ref = weakref.ref(result)
            del result
            assert ref() is None
        # a chain of operations also leaves nothing behind
        chain = ((net + other) * 0.5 - net.randn()).clone()
        ref = weakref.ref(chain)
        del chain
        assert ref() is None
    finally:
        gc.enable()


def test_operand_sources_survive_results() -> None:
    # results hold no hidden pointer back to their operands
    net = MLP()
    result = net + 1
    ref = weakref.ref(net)
    gc.collect()
    gc.disable()
    try:
        del net
        assert ref() is None
        assert type(result(torch.ones(1, 4))) is torch.Tensor
    finally:
        gc.enable()


def test_hooks_added_to_a_result_do_not_reach_the_source() -> None:
    net = MLP()
    result = net + 1
    calls: list[str] = []
    result.register_forward_hook(lambda *args: calls.append("result"))
    net(torch.ones(1, 4))
    assert calls == []
    result(torch.ones(1, 4))
    assert calls == ["result"]


def test_nested_nytomodule_values_from_every_level() -> None:
    net = make_nyto("deep")
    out = net * 3
    assert_dicts(named(out.block1), ref_map(lambda x: x * 3, named(net.block1)))
    assert type(out.block1) is Block and out.block1 is not net.block1


def test_is_arith_helper_sanity() -> None:
    assert is_arith(torch.ones(1)) and is_arith(torch.ones(1, dtype=torch.complex64))
    assert not is_arith(torch.ones(1, dtype=torch.int64))


def test_edge_operands_and_models() -> None:
    import copy
    import pickle

    import numpy as np

    net = NytoLinear()
    assert torch.equal((net + np.float32(2)).weight, torch.tensor([4.0]))
    assert torch.equal((np.int64(3) * net).bias, torch.tensor([3.0]))

    class Empty(nyto.NytoModule):
        def forward(self, x: Tensor) -> Tensor:
            return x

    empty = Empty()
    assert type(empty + 1) is Empty and type(empty * empty) is Empty
    empty += 1
    result = net + 1
    for restored in (copy.deepcopy(result), pickle.loads(pickle.dumps(result))):
        assert type(restored) is NytoLinear and torch.equal(restored.weight, result.weight)
        assert torch.equal((restored + 1).weight, torch.tensor([4.0]))


def test_results_do_not_copy_gradients_or_share_mode() -> None:
    net = MLP()
    net(torch.randn(2, 4)).sum().backward()
    result = net * 2
    assert all(p.grad is None for p in result.parameters())
    assert all(p.grad is not None for p in net.parameters())
    result.eval()
    assert net.training and all(m.training for m in net.modules())


def test_inplace_device_mismatch_changes_nothing() -> None:
    net = MLP()
    before = snapshot(net)
    with pytest.raises(nyto.DeviceMismatchError, match=r"'layer0.weight' is on cpu in the first operand and on meta"):
        net += MLP().to("meta")
    with pytest.raises(nyto.DeviceMismatchError):
        net *= torch.tensor(2.0, device="meta")
    assert_snapshot(net, before)


def test_product_and_product_() -> None:
    net, other = MLP(), MLP()
    p = net.product()
    assert isinstance(p, nyto.ParamProduct) and p.model_class is MLP
    assert_dicts(p.params, named(net))
    objects = [id(t) for t in net.parameters()]
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    assert net.product_((other.product() + 1) * 2) is net
    assert [id(t) for t in net.parameters()] == objects
    assert_dicts(named(net), ref_map(lambda x: (x + 1) * 2, named(other)))
    for param in net.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()
    assert_dicts(named(net), ref_map(lambda x: (x + 1) * 2 - 1, named(other)), exact=False)
    before = snapshot(net)
    with pytest.raises(TypeError, match=r"product_: expected a Particle"):
        net.product_(other)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        net.product_(Deep().product())
    with pytest.raises(nyto.StructureError):
        net.product_(MLP(4, 5, 3).product())
    assert_snapshot(net, before)
