"""Swarms in gradient-based population training (audit 18): autograd through ``swarm(x)``, optimizers over
its stacked parameters, ``torch.func`` transforms, Dropout / BatchNorm in train mode, train/eval
propagation, gradient checkpointing, no-grad forwards and the algorithms between gradient steps.

The reference is always a Python loop over plain ``nn.Module`` copies of the members, each with its own
``loss.backward()`` and its own optimizer.  The stacked parameters are made trainable the way a PyTorch
user would: ``requires_grad_()`` on the ``swarm.params`` views (the same tensor objects on every read).
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nytorch import StructureError, Swarm
from nytorch import algorithms as alg

Tensor = torch.Tensor
P = 3


def close(actual: Tensor, expected: Tensor, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol)


def trainable(swarm: Swarm, skip: tuple[str, ...] = ()) -> Swarm:
    """Make the stacked parameters autograd leaves that require grad (except names starting with ``skip``)."""
    for name, view in swarm.params.items():
        if not name.startswith(skip):
            view.requires_grad_()
    return swarm


def stacked(models: list[nn.Module], attr: str) -> dict[str, Tensor]:
    """``named_parameters()`` grads (``attr='grad'``), values (``'data'``) or buffers (``'buffer'``), stacked."""
    if attr == "buffer":
        return {name: torch.stack([dict(m.named_buffers())[name] for m in models])
                for name, _ in models[0].named_buffers()}
    out = {}
    for name, _ in models[0].named_parameters():
        tensors = [dict(m.named_parameters())[name] for m in models]
        if attr == "grad":
            tensors = [t.grad if t.grad is not None else torch.zeros_like(t) for t in tensors]
        out[name] = torch.stack([t.detach() for t in tensors])
    return out


def assert_like_loop(swarm: Swarm, models: list[nn.Module], *, grads: bool = True, atol: float = 1e-6) -> None:
    """Grads (where given), values and buffers of the swarm equal the loop's, member by member."""
    if grads:
        for name, expected in stacked(models, "grad").items():
            got = swarm.params[name].grad
            close(torch.zeros_like(expected) if got is None else got, expected, atol)
    for name, expected in stacked(models, "data").items():
        close(swarm.params[name].detach(), expected, atol)
    for name, expected in stacked(models, "buffer").items():
        torch.testing.assert_close(swarm.buffers[name].double(), expected.double(), rtol=1e-5, atol=atol)


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp (fused path)": (lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Sigmoid(),
                                               nn.Linear(8, 3)), (5, 4)),
    "layernorm (vmap path)": (lambda: nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3)),
                              (5, 4)),
    "batchnorm train": (lambda: nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.Tanh(),
                                              nn.Linear(8, 3)), (6, 4)),
    "conv bn2d train": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                              nn.Linear(16, 3)), (5, 2, 4, 4)),
    "instancenorm tracked": (lambda: nn.Sequential(nn.Conv1d(2, 4, 3), nn.InstanceNorm1d(4, affine=True,
                                                   track_running_stats=True), nn.Flatten(), nn.Linear(20, 3)),
                             (5, 2, 7)),
}


# -- loss.backward() through swarm(x) ------------------------------------------------------------------------
@pytest.mark.parametrize("per_member", [False, True], ids=["shared input", "in_dims=0"])
@pytest.mark.parametrize("name", list(MODELS))
def test_backward_through_the_forward_matches_a_loop_of_modules(name: str, per_member: bool) -> None:
    torch.manual_seed(0)
    make, shape = MODELS[name]
    models = [make() for _ in range(P)]
    swarm = trainable(Swarm.stack(models))
    x = torch.randn(P, *shape) if per_member else torch.randn(*shape)
    y = torch.randint(0, 3, (shape[0],))
    out = swarm(x, in_dims=0) if per_member else swarm(x)
    sum(F.cross_entropy(out[i], y) for i in range(P)).backward()  # members are independent: own gradients
    for i, model in enumerate(models):
        F.cross_entropy(model(x[i] if per_member else x), y).backward()
    assert_like_loop(swarm, models)  # BatchNorm / InstanceNorm statistics moved as in the loop too


def test_backward_with_a_frozen_first_layer_on_the_fused_path() -> None:
    """A frozen first Linear and trainable later ones (fine-tuning): the fused Linear-chain forward
    used in-place activations whenever the first layer did not record, so backward raised
    'modified by an inplace operation' (two activations in a row) instead of giving the loop's gradients."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Sigmoid(), nn.ReLU(),
                            nn.Linear(8, 3)) for _ in range(P)]
    for model in models:
        model[0].requires_grad_(False)
    swarm = trainable(Swarm.stack(models), skip=("0.",))
    x = torch.randn(5, 4)
    swarm(x).pow(2).sum().backward()
    for model in models:
        model(x).pow(2).sum().backward()
    assert swarm.params["0.weight"].grad is None
    assert_like_loop(swarm, models)
    # only a later bias trainable, with every weight frozen: still recorded
    swarm = Swarm.stack(models)
    swarm.params["6.bias"].requires_grad_()
    swarm(x).pow(2).sum().backward()
    close(swarm.params["6.bias"].grad, stacked(models, "grad")["6.bias"])


def test_backward_equals_grad_and_value_and_accumulates_like_leaves() -> None:
    torch.manual_seed(1)
    models = [MODELS["layernorm (vmap path)"][0]() for _ in range(P)]
    swarm = trainable(Swarm.stack(models))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))

    def loss_fn(member: Any, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(member(x), y)
    grads, losses = swarm.grad_and_value(loss_fn, x, y)
    out = swarm(x)
    total = sum(F.cross_entropy(out[i], y) for i in range(P))
    total.backward()
    for name, view in swarm.params.items():
        close(view.grad, grads.params[name])
    close(losses.sum(), total.detach())
    out = swarm(x)
    sum(F.cross_entropy(out[i], y) for i in range(P)).backward()  # a second backward adds, as for leaves
    for name, view in swarm.params.items():
        close(view.grad, 2 * grads.params[name])
    views = list(swarm.params.values())  # the same leaves on every read, through modes and in-place updates
    swarm.eval().train().add_(0.0)
    swarm[0] = swarm[1]
    assert all(a is b and a.requires_grad and a.grad is not None for a, b in zip(views, swarm.params.values()))


# -- optimizers over the stacked parameters -------------------------------------------------------------
OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd momentum nesterov wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True,
                                                          weight_decay=0.01),
    "adam wd": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1),
    "adam wd for-loop": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1, foreach=False),
    "adamw amsgrad": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.05, amsgrad=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_one_optimizer_over_the_swarm_steps_like_per_member_optimizers(name: str) -> None:
    torch.manual_seed(2)
    make = OPTIMIZERS[name]
    models = [MODELS["batchnorm train"][0]() for _ in range(P)]
    swarm = trainable(Swarm.stack(models))
    optimizer = make(list(swarm.params.values()))
    optimizers = [make(model.parameters()) for model in models]
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    for _ in range(3):
        optimizer.zero_grad()
        out = swarm(x)
        sum(F.cross_entropy(out[i], y) for i in range(P)).backward()
        optimizer.step()
        for model, opt in zip(models, optimizers):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert_like_loop(swarm, models, grads=False, atol=1e-5)
    member = swarm[1].module()  # a member trained in the swarm runs like its loop twin
    close(member.eval()(x), models[1].eval()(x).detach(), atol=1e-5)


def test_sgd_step_with_batchnorm_equals_a_loop_of_backward_and_optimizer_step() -> None:
    torch.manual_seed(3)
    models = [MODELS["batchnorm train"][0]() for _ in range(P)]
    swarm = Swarm.stack(models)
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.1) for model in models]
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    for _ in range(2):
        swarm, losses = alg.sgd_step(swarm, lambda m, x, y: F.cross_entropy(m(x), y), x, y, lr=0.1)
        for i, (model, opt) in enumerate(zip(models, optimizers)):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            close(losses[i], loss.detach())
    assert_like_loop(swarm, models, grads=False)


def test_algorithms_return_untrained_new_swarms_and_assignment_keeps_an_optimizer_working() -> None:
    torch.manual_seed(4)
    models = [MODELS["mlp (fused path)"][0]() for _ in range(P)]
    swarm = trainable(Swarm.stack(models))
    optimizer = torch.optim.SGD(list(swarm.params.values()), lr=0.1)
    x = torch.randn(5, 4)
    swarm(x).pow(2).sum().backward()
    before = {name: view.grad.clone() for name, view in swarm.params.items()}
    values = {name: view.detach().clone() for name, view in swarm.params.items()}
    pulled = alg.apso(swarm, 0, alpha=0.0, beta=0.5)  # pure: a new swarm, the old one and its grads untouched
    noise = alg.es_noise(swarm[0], 2)
    for new in (pulled, swarm + noise[0], alg.pull_toward_best(swarm, torch.tensor([1.0, 0.0, 2.0]), subset=P,
                                                                 alpha=0.5)):
        assert all(not view.requires_grad and view.grad is None for view in new.params.values())
    for name, view in swarm.params.items():
        assert torch.equal(view.grad, before[name]) and torch.equal(view.detach(), values[name])
    expected = {name: values[name][0] * 0.5 + values[name] * 0.5 for name in values}
    swarm[:] = pulled  # in place: the optimizer's leaves now hold the pulled values
    for name, view in swarm.params.items():
        close(view.detach(), expected[name])
        assert view.requires_grad and torch.equal(view.grad, before[name])
    optimizer.step()  # steps the pulled values with the gradients still held
    for name, view in swarm.params.items():
        close(view.detach(), expected[name] - 0.1 * before[name])


# -- torch.func and checkpointing ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp (fused path)", "layernorm (vmap path)"])
def test_input_gradients_and_func_transforms_match_a_loop(name: str) -> None:
    torch.manual_seed(5)
    models = [MODELS[name][0]() for _ in range(P)]
    swarm = Swarm.stack(models)
    x, tangent = torch.randn(5, 4), torch.randn(5, 4)
    leaf = x.clone().requires_grad_()
    swarm(leaf).pow(2).sum().backward()
    expected = torch.func.grad(lambda x: sum(m(x).pow(2).sum() for m in models))(x)
    close(leaf.grad, expected, 1e-5)
    close(torch.func.grad(lambda x: swarm(x).pow(2).sum())(x), expected, 1e-5)
    _, jvp = torch.func.jvp(swarm, (x,), (tangent,))
    close(jvp, torch.stack([torch.func.jvp(m, (x,), (tangent,))[1] for m in models]), 1e-5)
    row = x[0]
    close(torch.func.hessian(lambda r: swarm(r).pow(2).sum())(row),
          sum(torch.func.hessian(lambda r: m(r).pow(2).sum())(row) for m in models), 1e-4)
    batches = torch.randn(2, 5, 4)
    close(torch.func.vmap(swarm)(batches),
          torch.stack([torch.stack([m(b) for m in models]) for b in batches]).detach(), 1e-5)


def test_gradient_penalty_double_backward_per_member() -> None:
    torch.manual_seed(6)
    models = [MODELS["layernorm (vmap path)"][0]() for _ in range(P)]
    swarm = trainable(Swarm.stack(models))
    x = torch.randn(5, 4)
    xs = x.expand(P, 5, 4).clone().requires_grad_()
    (gx,) = torch.autograd.grad(swarm(xs, in_dims=0).sum(), xs, create_graph=True)
    gx.pow(2).sum().backward()
    for model in models:
        leaf = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(model(leaf).sum(), leaf, create_graph=True)
        g.pow(2).sum().backward()
    assert_like_loop(swarm, models, atol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 2], ids=["fused", "vmap chunks"])
def test_checkpointed_forward_gives_the_same_gradients_dropout_included(reentrant: bool,
                                                                         chunk_size: Any) -> None:
    torch.manual_seed(7)
    models = [nn.Sequential(nn.Linear(4, 30), nn.Dropout(0.5), nn.ReLU(), nn.Linear(30, 3)) for _ in range(P)]
    plain, saved = trainable(Swarm.stack(models)), trainable(Swarm.stack(models))
    x = torch.randn(6, 4, requires_grad=reentrant)  # the reentrant form needs an input that requires grad
    torch.manual_seed(8)
    plain(x, chunk_size=chunk_size).pow(2).sum().backward()
    torch.manual_seed(8)
    checkpoint(lambda x: saved(x, chunk_size=chunk_size), x, use_reentrant=reentrant).pow(2).sum().backward()
    for name, view in plain.params.items():
        close(saved.params[name].grad, view.grad)


# -- Dropout, BatchNorm and modes ------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [None, 1], ids=["fused", "vmap"])
def test_dropout_draws_a_mask_per_member_in_train_mode_and_none_in_eval(chunk_size: Any) -> None:
    torch.manual_seed(9)
    net = nn.Sequential(nn.Linear(4, 200), nn.Dropout(0.5))
    swarm = Swarm.stack([net] * P)  # identical members: only the masks can differ
    x = torch.randn(1, 4)
    out = swarm(x, chunk_size=chunk_size)
    kept = out != 0
    assert not torch.equal(kept[0], kept[1]) and not torch.equal(kept[1], kept[2])
    full = (net[0](x) * 2).detach()  # kept values are scaled by 1 / (1 - p), as in a loop
    for i in range(P):
        close(out[i][kept[i]], full[kept[i]])
        assert 0.3 < kept[i].float().mean() < 0.7
    same = swarm(x, randomness="same", chunk_size=chunk_size)
    assert torch.equal(same[0], same[1]) and torch.equal(same[1], same[2])
    swarm.eval()
    torch.testing.assert_close(swarm(x, chunk_size=chunk_size), net.eval()(x).expand(P, 1, 200).detach())
    swarm.train()
    assert not torch.equal(swarm(x, chunk_size=chunk_size)[0] != 0, swarm(x, chunk_size=chunk_size)[0] != 0)


def test_batchnorm_train_forward_without_grad_updates_statistics_as_a_loop() -> None:
    torch.manual_seed(10)
    models = [MODELS["conv bn2d train"][0]() for _ in range(P)]
    swarm = trainable(Swarm.stack(models))
    x = torch.randn(5, 2, 4, 4)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            out = swarm(x)
            expected = torch.stack([model(x) for model in models])
        assert not out.requires_grad
        close(out, expected, 1e-5)
        assert_like_loop(swarm, models, grads=False)
    assert all(view.grad is None for view in swarm.params.values())
    swarm.eval()
    for model in models:
        model.eval()
    out = swarm(x)  # eval: running statistics, nothing moves; the graph reaches the stacked leaves
    out.sum().backward()
    for model in models:
        model(x).sum().backward()
    assert_like_loop(swarm, models, atol=1e-5)
    assert [int(n) for n in swarm.buffers["1.num_batches_tracked"]] == [2] * P


def test_train_and_eval_reach_members_results_and_selections() -> None:
    make = MODELS["batchnorm train"][0]
    models = [make().eval() for _ in range(P)]
    swarm = Swarm.stack(models)
    assert not swarm.training
    derived = [swarm + 1, swarm.clone(), swarm[[0, 2]], swarm[0:2], swarm.to(torch.float64),
               alg.apso(swarm, 0, alpha=0.1, beta=0.1), Swarm.randn(swarm), Swarm.normal(swarm, std=0.0)]
    assert not any(s.training for s in derived)
    assert all(not m.training for p in (swarm[1], swarm.mean(), torch.ones(P) / P @ swarm)
               for m in p.module().modules())
    x = torch.randn(6, 4)
    close(swarm(x), torch.stack([m(x) for m in models]).detach())
    assert swarm.train() is swarm and swarm.training
    assert all(m.training for m in swarm[0].module().modules()) and not derived[0].training
    mixed = make()
    mixed[1].eval()  # a frozen BatchNorm inside a model in train mode is run as such
    swarm = Swarm.stack([mixed, copy.deepcopy(mixed)])
    assert swarm.training and not swarm[0].module()[1].training
    swarm(x)
    assert swarm.buffers["1.num_batches_tracked"].tolist() == [0, 0]
    swarm.train()
    swarm(x)
    assert swarm.buffers["1.num_batches_tracked"].tolist() == [1, 1]


def test_cat_refuses_swarms_in_another_mode_or_with_other_settings() -> None:
    """``Swarm.stack`` refuses items in different modes; ``Swarm.cat`` silently ran every member in
    swarm 0's mode (an eval-mode elite joined with fresh members trained without Dropout)."""
    def make(p: float = 0.5) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), nn.Dropout(p), nn.Linear(8, 3))
    evaluated, fresh = Swarm.stack([make(), make()]).eval(), Swarm.stack([make(), make()])
    with pytest.raises(StructureError, match=r"cat: swarm 1: expected the root module \(Sequential\) in eval mode "
                                             r"\(as in item 0\), got train mode"):
        Swarm.cat([evaluated, fresh])
    with pytest.raises(StructureError, match=r"cat: swarm 2: expected submodule '1' \(Dropout\) attribute 'p' = "
                                             r"0.5 \(as in item 0\), got 0.1"):
        Swarm.cat([fresh, fresh, Swarm.stack([make(0.1)])])
    joined = Swarm.cat([evaluated, fresh.clone().eval(), evaluated + 1])
    assert len(joined) == 6 and not joined.training
    for i, source in enumerate([evaluated, fresh, evaluated + 1]):
        for name, view in joined.params.items():
            assert torch.equal(view[2 * i:2 * i + 2], source.params[name])
