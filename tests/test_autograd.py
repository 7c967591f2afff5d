"""Plain autograd (outside ``torch.func``) through nytorch arithmetic, against the same computation in plain torch.

The functional API is differentiable: learned interpolation weights, meta-learning (second order),
gradients into the source models' Parameters, forward mode.  ``Particle``, ``NytoModule``, ``Swarm``
and ``merge`` run without autograd, as the README and their docstrings say: their results are fresh
leaves with the source's ``requires_grad``, no gradient reaches their operands, and the packed
one-pass path and the per-leaf path (``pack=False``, a model that cannot be packed, configs,
``buffers=True``) agree.  Every reference is ``torch.func.functional_call`` over a per-tensor dict.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call

import nytorch as nyto
import nytorch.functional as nf
from nytorch import Swarm, merge

Tensor = torch.Tensor
X = torch.randn(5, 3, generator=torch.Generator().manual_seed(7))


class Mixed(nn.Module):
    """A float32 layer, a float64 layer, a 0-dim parameter, a floating buffer and an integer one."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2).double()
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.register_buffer("shift", torch.zeros(4))
        self.register_buffer("count", torch.tensor(3))

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x) - self.shift).double()) * self.scale * self.count


class Net(nyto.NytoModule):
    def __init__(self, non_contiguous: bool = False) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)
        if non_contiguous:  # packing leaves such a model alone: its operators take the per-leaf path
            self.a.weight = nn.Parameter(torch.randn(3, 4).t())
        self.a.bias.requires_grad_(False)  # a frozen parameter among trainable ones

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


def mixed(seed: int) -> Mixed:
    torch.manual_seed(seed)
    model = Mixed()
    model.shift.uniform_(-1, 1)
    return model


def loss_of(out: Tensor) -> Tensor:
    return out.pow(2).sum()


def grads(tensors: dict[str, Tensor]) -> dict[str, Any]:
    return {name: None if t.grad is None else t.grad.clone() for name, t in tensors.items()}


def close(a: Tensor, b: Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def close_dicts(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert (a[name] is None) == (b[name] is None), name
        if a[name] is not None:
            close(a[name], b[name])


# -- the functional API: differentiable, against functional_call over per-tensor dicts -----------------
def _leaves(model: nn.Module) -> dict[str, Tensor]:
    """Trainable sources: a float copy of each floating parameter and buffer that requires grad, integers as they are."""
    return {name: t.detach().clone().requires_grad_(t.is_floating_point())
            for name, t in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()}


EXPRESSIONS: dict[str, tuple[Callable[..., Any], Callable[..., Tensor]]] = {
    # name: (nytorch on trees, plain torch on one tensor) of start a, end b, weight w
    "a + w * (b - a)": (lambda a, b, w: nf.add(a, nf.mul(w, nf.sub(b, a))), lambda a, b, w: a + w * (b - a)),
    "a + (b - a) * w": (lambda a, b, w: nf.add(a, nf.mul(nf.sub(b, a), w)), lambda a, b, w: a + (b - a) * w),
    "lerp(a, b, w)": (lambda a, b, w: nf.lerp(a, b, w), lambda a, b, w: torch.lerp(a, b, w)),
    "(1 - w) * a + w * b": (lambda a, b, w: nf.add(nf.mul(1 - w, a), nf.mul(w, b)),
                            lambda a, b, w: (1 - w) * a + w * b),
    "a / w - b ** 2 / 4": (lambda a, b, w: nf.sub(nf.div(a, w), nf.div(nf.pow(b, 2), 4)),
                           lambda a, b, w: a / w - b ** 2 / 4),
    "w / (a * a + 1)": (lambda a, b, w: nf.div(w, nf.add(nf.mul(a, a), 1)), lambda a, b, w: w / (a * a + 1)),
}


@pytest.mark.parametrize("name", list(EXPRESSIONS))
def test_learned_interpolation_gradients_match_plain_torch(name: str) -> None:
    """``theta = a + alpha * (b - a)`` and friends: gradients reach alpha and both sources' tensors."""
    ours, plain = EXPRESSIONS[name]
    model = mixed(0)
    results = []
    for use_nytorch in (True, False):
        a, b = _leaves(mixed(1)), _leaves(mixed(2))
        alpha = torch.tensor(0.3, requires_grad=True)
        if use_nytorch:
            theta = ours(a, b, alpha)
        else:  # integer leaves (num_batches_tracked) are carried unchanged
            theta = {k: plain(a[k], b[k], alpha).to(a[k].dtype) if a[k].is_floating_point() else a[k].clone()
                     for k in a}
        assert all(theta[k].requires_grad == a[k].is_floating_point() for k in a)
        loss_of(functional_call(model, theta, (X,))).backward()
        results.append((alpha.grad.clone(), grads(a), grads(b)))
    (alpha_ours, a_ours, b_ours), (alpha_ref, a_ref, b_ref) = results
    close(alpha_ours, alpha_ref)
    close_dicts(a_ours, a_ref)
    close_dicts(b_ours, b_ref)


def test_lerp_weight_tree_scalar_end_and_float64_weight_match_plain_torch() -> None:
    a, b = _leaves(mixed(1)), _leaves(mixed(2))
    floating = [k for k in a if a[k].is_floating_point()]
    weights = {k: torch.full_like(a[k], 0.25).requires_grad_() if a[k].is_floating_point()
               else torch.zeros_like(a[k]) for k in a}
    w64 = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)  # a float64 weight for float32 leaves too
    end = torch.tensor(2.0, requires_grad=True)  # a 0-dim end every leaf moves toward
    out = nf.lerp(nf.lerp(a, b, weights), end, w64)
    assert all(out[k].dtype == a[k].dtype for k in a)
    loss_of(functional_call(mixed(0), out, (X,))).backward()
    got = (grads(a), grads(b), grads(weights), w64.grad.clone(), end.grad.clone())

    a2, b2 = _leaves(mixed(1)), _leaves(mixed(2))
    weights2 = {k: torch.full_like(a2[k], 0.25).requires_grad_() if a2[k].is_floating_point()
                else torch.zeros_like(a2[k]) for k in a2}
    w64b = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    end2 = torch.tensor(2.0, requires_grad=True)
    ref = {k: a2[k].clone() for k in a2}
    for k in floating:
        mid = torch.lerp(a2[k], b2[k], weights2[k])
        ref[k] = (mid + w64b * (end2.to(mid.dtype) - mid)).to(mid.dtype)
    loss_of(functional_call(mixed(0), ref, (X,))).backward()
    close_dicts(got[0], grads(a2))
    close_dicts(got[1], grads(b2))
    close_dicts(got[2], grads(weights2))
    close(got[3], w64b.grad)
    close(got[4], end2.grad)


def test_second_order_meta_learning_matches_plain_torch() -> None:
    """MAML: ``fast = params - lr * grad`` with ``create_graph=True``; the outer loss reaches lr and params."""
    y = torch.randn(5, 2, dtype=torch.float64)
    results = []
    for use_nytorch in (True, False):
        model = mixed(3)
        lr = torch.tensor(0.1, requires_grad=True)
        params = dict(model.named_parameters())
        inner = loss_of(functional_call(model, params, (X,)) - y)
        step = dict(zip(params, torch.autograd.grad(inner, list(params.values()), create_graph=True)))
        fast = nf.sub(params, nf.mul(lr, step)) if use_nytorch else {k: params[k] - lr * step[k] for k in params}
        loss_of(functional_call(model, fast, (X,)) - y).backward()
        results.append((lr.grad.clone(), grads(params)))
    close(results[0][0], results[1][0])
    close_dicts(results[0][1], results[1][1])


def test_gradcheck_of_every_functional_op() -> None:
    a = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)

    def tree(x: Tensor, y: Tensor) -> dict[str, Tensor]:
        return {"x": x, "y": y}

    cases: list[Callable[..., Any]] = [
        lambda a, b, w: tuple(nf.lerp(tree(a, b), tree(b.sum() * a, b * 2), w).values()),
        lambda a, b, w: tuple(nf.pow(tree(a.abs() + 1, b.abs() + 1), w).values()),
        lambda a, b, w: tuple(nf.pow(w.abs() + 1, tree(a, b)).values()),
        lambda a, b, w: tuple(nf.div(w, tree(a.abs() + 1, b.abs() + 1)).values()),
        lambda a, b, w: tuple(nf.sub(w, nf.neg(nf.clone(tree(a, b)))).values()),
        lambda a, b, w: nf.dot(tree(a, b), w) + nf.dot(tree(a, b), tree(a * w, b)),
        lambda a, b, w: nf.norm(tree(a * w, b)),
        lambda a, b, w: tuple(nf.tree_map(torch.mul, tree(a, b), w).values()),
    ]
    for case in cases:
        assert torch.autograd.gradcheck(case, (a, b, w))
        assert torch.autograd.gradgradcheck(case, (a, b, w))


def test_forward_mode_tangents_match_plain_torch() -> None:
    a, b = _leaves(mixed(1)), _leaves(mixed(2))
    a, b = ({k: v.detach() for k, v in t.items()} for t in (a, b))
    with fwAD.dual_level():
        w = fwAD.make_dual(torch.tensor(0.3), torch.tensor(1.0))
        for out in (nf.lerp(a, b, w), nf.add(a, nf.mul(w, nf.sub(b, a)))):
            for k in a:
                tangent = fwAD.unpack_dual(out[k]).tangent
                if a[k].is_floating_point():
                    close(tangent, b[k] - a[k])
                else:
                    assert tangent is None and torch.equal(out[k], a[k])


def test_functional_results_outside_grad_mode_do_not_require_grad() -> None:
    a, b = _leaves(mixed(1)), _leaves(mixed(2))
    w = torch.tensor(0.3, requires_grad=True)
    plain: list[Callable[[Tensor, Tensor], Tensor]] = [
        lambda x, y: torch.lerp(x, y, w.to(x.dtype)), lambda x, y: x * w, torch.add, lambda x, y: x.clone()]
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            for out, fn in zip((nf.lerp(a, b, w), nf.mul(a, w), nf.add(a, b), nf.clone(a)), plain):
                assert not any(t.requires_grad for t in out.values())
                for k in a:
                    expected = fn(a[k], b[k]).to(a[k].dtype) if a[k].is_floating_point() else a[k]
                    close(out[k], expected)


def test_bind_is_a_leaf_and_call_is_differentiable() -> None:
    a, b = nf.params(mixed(1)), nf.params(mixed(2))
    w = torch.tensor(0.3, requires_grad=True)
    bound = nf.bind(mixed(0), nf.lerp(a, b, w))
    assert all(p.is_leaf and p.grad_fn is None for p in bound.parameters())
    loss_of(bound(X)).backward()
    assert w.grad is None  # the documented exception: nf.bind builds fresh leaf Parameters
    loss_of(nf.call(mixed(0), nf.lerp(a, b, w), X)).backward()
    expected = torch.tensor(0.3, requires_grad=True)
    loss_of(functional_call(mixed(0), {k: torch.lerp(a[k], b[k], expected) for k in a}, (X,))).backward()
    close(w.grad, expected.grad)


@pytest.mark.parametrize("how", ["nf.bind", "Particle.from_params(...).module()"])
@pytest.mark.parametrize("train", [True, False])
def test_a_module_bound_from_differentiable_state_has_plain_buffers(how: str, train: bool) -> None:
    """``nf.bind(bn_model, nf.lerp(nf.state(a), nf.state(b), w))`` kept the interpolated BatchNorm statistics
    with their graph as buffers, so the forward raised torch's "not differentiable with respect to argument
    'running_mean'" (train and eval); Parameters were detached leaves already."""
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(2))
    for model in (a, b):
        model(torch.randn(8, 3))  # running statistics of their own
    w = torch.tensor(0.3, requires_grad=True)
    state = nf.lerp(nf.state(a), nf.state(b), w)
    bound = nf.bind(a, state) if how == "nf.bind" else nyto.Particle.from_params(a, state).module()
    bound.train(train)
    for name, buffer in bound.named_buffers():
        assert not buffer.requires_grad and buffer.grad_fn is None, name
        assert buffer.data_ptr() == state[name].data_ptr(), name  # still no copy
    reference = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    reference.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    reference.train(train)
    loss_of(bound(X)).backward()
    loss_of(reference(X)).backward()
    assert w.grad is None
    close_dicts(grads(dict(bound.named_parameters())), grads(dict(reference.named_parameters())))
    close_dicts({k: v.detach() for k, v in bound.named_buffers()}, dict(reference.named_buffers()))


# -- Particle / NytoModule operators: no autograd, fresh leaves, both paths agree -----------------------
def _frozen(model: nn.Module) -> nn.Module:
    model.a.bias.requires_grad_(False)
    return model


PARTICLE_OPS: dict[str, Callable[[Any, Any, Tensor], Any]] = {
    "p + t * (q - p)": lambda p, q, t: p + t * (q - p),
    "p * t": lambda p, q, t: p * t,
    "t * p": lambda p, q, t: t * p,
    "t / p": lambda p, q, t: t / p,
    "p ** (t + 1.25)": lambda p, q, t: p ** (t + 1.25),  # an integer power: defined for negative values
    "lerp": lambda p, q, t: p.lerp(q, t),
    "clone": lambda p, q, t: p.clone(),
    "randn": lambda p, q, t: p.randn(),
    "unary_operator": lambda p, q, t: p.unary_operator(lambda x, c: x * t if x.is_floating_point() else x),
}


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("buffers", [False, True])
@pytest.mark.parametrize("name", list(PARTICLE_OPS))
def test_particle_results_are_fresh_leaves_and_operands_get_no_gradient(pack: bool, buffers: bool, name: str) -> None:
    source, other = _frozen(mixed(1)), _frozen(mixed(2))
    t = torch.tensor(0.75, requires_grad=True)
    p = nyto.particle(source, pack=pack, buffers=buffers)
    q = nyto.particle(other, pack=pack, buffers=buffers)
    torch.manual_seed(5)
    result = PARTICLE_OPS[name](p, q, t)
    assert not any(leaf.requires_grad for leaf in result.params.values())
    module = result.module()
    for (key, mine), theirs in zip(module.named_parameters(), source.parameters()):
        assert type(mine) is nn.Parameter and mine.is_leaf and mine.grad_fn is None and mine.grad is None, key
        assert mine.requires_grad == theirs.requires_grad, key
    assert not any(buffer.requires_grad for buffer in module.buffers())
    loss_of(module(X)).backward()
    assert t.grad is None
    assert all(param.grad is None for model in (source, other) for param in model.parameters())
    # the result trains like a plain model holding the same values
    reference = mixed(0)
    reference.load_state_dict({k: v.detach().clone() for k, v in module.state_dict().items()})
    _frozen(reference)
    loss_of(reference(X)).backward()
    close_dicts(grads(dict(module.named_parameters())), grads(dict(reference.named_parameters())))


@pytest.mark.parametrize("non_contiguous", [False, True])
def test_nytomodule_packed_and_per_leaf_paths_agree_with_configs(non_contiguous: bool) -> None:
    """A ``clone=False`` non-operational parameter is the very same Parameter, so it (only) gets gradients."""
    torch.manual_seed(0)
    net = Net(non_contiguous)
    assert (net.a.weight.untyped_storage().data_ptr() == net.b.weight.untyped_storage().data_ptr()) is False
    net.set_param_config(operational=False, clone=False, name="b.bias")
    net.set_param_config(operational=False, clone=True, name="b.weight")
    t = torch.tensor(2.0, requires_grad=True)
    names = [name for name, _ in net.named_parameters()]
    for make in (lambda: net * t, lambda: t - net, lambda: net.lerp(net * 2, t), lambda: net.clone(),
                 lambda: net.randn(), lambda: net.product().module()):
        net.zero_grad(set_to_none=True)
        result = make()
        same = [mine is theirs for mine, theirs in zip(result.parameters(), net.parameters())]
        assert same == [name == "b.bias" for name in names]
        assert [p.requires_grad for p in result.parameters()] == [p.requires_grad for p in net.parameters()]
        loss_of(result(X)).backward()
        assert t.grad is None
        assert [p.grad is not None for p in net.parameters()] == [name == "b.bias" for name in names]
        reference = Net()
        reference.load_state_dict({k: v.detach().clone() for k, v in result.state_dict().items()})
        loss_of(reference(X)).backward()
        close(net.b.bias.grad, reference.b.bias.grad)
    if not non_contiguous:  # an operator packed it
        assert net.a.weight.untyped_storage().data_ptr() == net.b.weight.untyped_storage().data_ptr()


@pytest.mark.parametrize("kind", ["NytoModule", "particle", "particle pack=False"])
def test_in_place_operators_write_leaves_that_require_grad_and_bump_their_versions(kind: str) -> None:
    """torch refuses ``leaf.add_`` outside no_grad; nytorch's in-place operators run under no_grad (as an
    optimizer step does): same Parameter objects, still leaves, new values, and a saved graph raises."""
    torch.manual_seed(0)
    net, other = Net(), Net()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        net.b.weight.add_(1)
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    ends = {k: v.detach().clone() for k, v in other.named_parameters()}
    objects = list(net.parameters())
    t = torch.tensor(0.25, requires_grad=True)
    saved = loss_of(net(X))  # saves b.weight (its input requires grad)
    target: Any = net if kind == "NytoModule" else nyto.particle(net, pack=kind == "particle")
    target += 1
    target.lerp_(other, t)
    target *= t
    assert list(net.parameters()) == objects
    for name, param in net.named_parameters():
        assert param.is_leaf and param.grad_fn is None and param.requires_grad == (name != "a.bias")
        close(param.detach(), torch.lerp(before[name] + 1, ends[name], 0.25) * 0.25)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()
    assert t.grad is None


@pytest.mark.parametrize("kind", ["NytoModule", "NytoModule per leaf", "particle", "particle pack=False"])
def test_operators_inside_a_forward_mode_dual_level_run_without_autograd_on_both_paths(kind: str) -> None:
    """In place, the per-leaf path gave the model's Parameters the dual operand's tangent and the packed path
    did not; ``copy_to`` of a result of a dual operand raised torch's NotImplementedError (``_foreach_copy_``)."""
    torch.manual_seed(0)
    net, other, target = Net(kind == "NytoModule per leaf"), Net(), Net()
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    ends = {k: v.detach().clone() for k, v in other.named_parameters()}
    with fwAD.dual_level():
        t = fwAD.make_dual(torch.tensor(0.5), torch.tensor(1.0))
        operand: Any = net if kind.startswith("NytoModule") else nyto.particle(net, pack=kind == "particle")
        operand *= t
        operand.lerp_(other, t)
        assert all(fwAD.unpack_dual(p).tangent is None for p in net.parameters())
        result = (operand if kind.startswith("particle") else nyto.particle(operand)) * t
        result.copy_to(target)
        for model in (net, target):
            assert all(fwAD.unpack_dual(p).tangent is None for p in model.parameters())
            assert fwAD.unpack_dual(model(X)).tangent is None
    for name, param in net.named_parameters():
        close(param.detach(), torch.lerp(before[name] * 0.5, ends[name], 0.5))
        close(target.get_parameter(name).detach(), param.detach() * 0.5)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_results_made_or_first_touched_without_grad_still_train(context: Callable[[], Any]) -> None:
    """A result built on first touch inside ``inference_mode`` (an evaluation) gets ordinary Parameters."""
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        made_without_grad = net + 1
    results = [made_without_grad, net * 2, net.clone(), (nyto.particle(net) * 2).module()]
    with context():
        for result in results:
            result(X)  # the first touch of the pending ones
    for result in results:
        assert [p.requires_grad for p in result.parameters()] == [p.requires_grad for p in net.parameters()]
        assert not any(t.is_inference() for t in [*result.parameters(), *result.buffers()])
        reference = Net()
        reference.load_state_dict({k: v.detach().clone() for k, v in result.state_dict().items()})
        for model in (result, reference):
            loss_of(model(X)).backward()
            torch.optim.SGD(model.parameters(), lr=0.1).step()
        close_dicts({k: v.detach() for k, v in result.named_parameters()},
                    {k: v.detach() for k, v in reference.named_parameters()})


def test_detach_shares_parameters_so_gradients_still_reach_them() -> None:
    """nytorch 1.1's ``detach`` (a new species), not autograd's."""
    torch.manual_seed(0)
    net = Net()
    copy = net.detach()
    assert all(a is b for a, b in zip(copy.parameters(), net.parameters()))
    loss_of(copy(X)).backward()
    reference = Net()
    reference.load_state_dict(net.state_dict())
    loss_of(reference(X)).backward()
    close_dicts(grads(dict(net.named_parameters())), grads(dict(reference.named_parameters())))
    clone = net.clone()
    assert all(a is not b for a, b in zip(clone.parameters(), net.parameters()))


def test_particle_module_and_from_params_do_not_differentiate() -> None:
    source, other = mixed(1), mixed(2)
    w = torch.tensor(0.3, requires_grad=True)
    values = nf.lerp(nf.params(source), nf.params(other), w)
    p = nyto.Particle.from_params(source, values)
    module = p.module()
    assert all(param.is_leaf for param in module.parameters())
    assert [param.requires_grad for param in module.parameters()] == [x.requires_grad for x in source.parameters()]
    loss_of(module(X)).backward()
    assert w.grad is None
    loss_of((p * 2).module()(X)).backward()
    assert w.grad is None


def test_packing_keeps_gradients_and_a_graph_recorded_before_it() -> None:
    reference = mixed(4)
    loss_of(reference(X)).backward()
    expected = grads(dict(reference.named_parameters()))
    model = mixed(4)
    loss_of(model(X)).backward()
    nyto.particle(model)  # packs: storage moves, Parameter objects, flags and .grad stay
    assert model.a.weight.untyped_storage().data_ptr() == model.a.bias.untyped_storage().data_ptr()
    close_dicts(grads(dict(model.named_parameters())), expected)
    model = mixed(4)
    pending = loss_of(model(X))
    nyto.particle(model)  # packed between forward and backward
    pending.backward()
    close_dicts(grads(dict(model.named_parameters())), expected)
    model.zero_grad(set_to_none=True)
    loss_of(model(X)).backward()  # and after
    close_dicts(grads(dict(model.named_parameters())), expected)


# -- Swarm and merge: no autograd (documented), and the documented differentiable recipes ----------------
def test_swarm_matmul_mean_norm_give_no_gradient_and_the_documented_recipes_do() -> None:
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)) for _ in range(3)]
    swarm = Swarm.stack(models)
    views = swarm.params
    for view in views.values():
        view.requires_grad_()
    w = torch.tensor([0.2, 0.3, 0.5], requires_grad=True)
    for result in ((w @ swarm).module(), swarm.mean().module(), (swarm * w).mean().module()):
        loss_of(result(X)).backward()
    assert w.grad is None and all(view.grad is None for view in views.values())
    assert not swarm.norm().requires_grad

    # learned soup (the ``__rmatmul__`` docstring's recipe): same values as ``w @ swarm``, gradients as a loop
    soup = nf.tree_map(lambda v: torch.tensordot(w, v, 1), swarm.params)
    for key, value in (w @ swarm).params.items():
        close(soup[key].detach(), value)
    loss_of(nf.call(models[0], soup, X)).backward()
    w_ref = torch.tensor([0.2, 0.3, 0.5], requires_grad=True)
    members = [{k: v.detach().clone().requires_grad_() for k, v in m.named_parameters()} for m in models]
    mix = {k: sum(w_ref[i] * members[i][k] for i in range(3)) for k in members[0]}
    loss_of(functional_call(models[0], mix, (X,))).backward()
    close(w.grad, w_ref.grad)
    for key, view in views.items():
        close(view.grad, torch.stack([member[key].grad for member in members]))

    # differentiable norm (the ``norm`` docstring's recipe): same values, gradients as a loop
    for view in views.values():
        view.grad = None
    norms = sum(v.flatten(1).pow(2).sum(1) for v in swarm.params.values()).sqrt()
    close(norms.detach(), swarm.norm())
    (norms * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    for i, member in enumerate(members):
        flat = torch.cat([v.flatten() for v in member.values()]).detach().requires_grad_()
        ((i + 1.0) * flat.norm()).backward()
        pieces = flat.grad.split([v.numel() for v in member.values()])
        for (key, value), piece in zip(member.items(), pieces):
            close(views[key].grad[i], piece.view_as(value))


def test_merge_weights_get_no_gradient_and_unravel_of_a_dict_does() -> None:
    models = [mixed(s) for s in range(3)]
    w = torch.tensor([0.2, 0.3, 0.5], requires_grad=True)
    soup = merge.average(models, weights=w)
    assert all(param.is_leaf for param in soup.parameters())
    loss_of(soup(X)).backward()
    assert w.grad is None
    with pytest.raises(TypeError, match="slerp: expected t to be a finite real number"):
        merge.slerp(models[0], models[1], torch.tensor(0.5, requires_grad=True))

    params = dict(models[0].named_parameters())
    vector, unravel = merge.ravel(params)
    v = vector.detach().clone().requires_grad_()
    out = unravel(v)
    assert [out[k].dtype for k in params] == [p.dtype for p in params.values()]
    loss_of(functional_call(models[0], out, (X,))).backward()
    v_ref = vector.detach().clone().requires_grad_()
    keys = sorted(params)  # a plain dict's leaves in optree's order
    pieces = v_ref.split([params[k].numel() for k in keys])
    ref = {k: piece.view(params[k].shape).to(params[k].dtype) for k, piece in zip(keys, pieces)}
    loss_of(functional_call(models[0], ref, (X,))).backward()
    close(v.grad, v_ref.grad)


def test_docstrings_say_which_paths_have_no_autograd() -> None:
    def text(obj: Any) -> str:
        return " ".join((obj.__doc__ or "").split())

    assert "torch.no_grad()" in text(nyto.NytoModule) and "nf.call" in text(nyto.NytoModule)
    assert "torch.no_grad()" in text(nyto.Particle)
    assert "not autograd's" in text(nyto.NytoModule.detach)
    assert "no gradient flows back" in text(nyto.Particle.module)
    assert "buffers are detached" in text(nyto.Particle.module) and "buffers are detached" in text(nf.bind)
    assert "do not differentiate" in text(nyto.Particle.from_params)
    for method in (Swarm.__rmatmul__, Swarm.mean, Swarm.norm):
        assert "without autograd" in text(method), method.__name__
