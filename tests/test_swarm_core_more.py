"""More ``Swarm`` core cases (audit 17): each result against a Python loop over the members.

The reference is always plain PyTorch: the stacked source models run one by one,
``torch.autograd.grad`` per member, per-member tensor arithmetic.
"""
from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nytorch
from nytorch import StructureError, Swarm

Tensor = torch.Tensor
P = 3


def close(actual: Any, expected: Any, exact: bool = False) -> None:
    tol = {"rtol": 0.0, "atol": 0.0} if exact else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(actual, expected, **tol)


def stacked_outputs(models: list[nn.Module], *args: Any, **kwargs: Any) -> Any:
    """The loop reference of ``swarm(*args)``: every model's output, tensors stacked, other leaves kept."""
    outs = [model(*args, **kwargs) for model in models]
    if isinstance(outs[0], tuple):
        return tuple(None if part is None else torch.stack([out[i] for out in outs])
                     for i, part in enumerate(outs[0]))
    return torch.stack(outs)


def loop_grads(models: list[nn.Module], loss_fn: Callable[..., Tensor], *args: Any) -> tuple[dict, Tensor]:
    """Per-member ``torch.autograd.grad`` (zeros for frozen or unused parameters), stacked by name."""
    grads: dict[str, list[Tensor]] = {}
    losses = []
    for model in models:
        named = list(model.named_parameters())
        wanted = [p for _, p in named if p.requires_grad]
        loss = loss_fn(model, *args)
        found = iter(torch.autograd.grad(loss, wanted, allow_unused=True))
        for name, param in named:
            grad = next(found) if param.requires_grad else None
            grads.setdefault(name, []).append(torch.zeros_like(param) if grad is None else grad)
        losses.append(loss.detach())
    return {name: torch.stack(values) for name, values in grads.items()}, torch.stack(losses)


# -- assignment of 0-dim tensors ------------------------------------------------------------------
@pytest.mark.parametrize("key", [slice(None), slice(1, 3), [0, 2], torch.tensor([True, False, True]), 1])
@pytest.mark.parametrize("value", [torch.tensor(2.5), torch.tensor(0.1, dtype=torch.float64), torch.tensor(3)])
def test_a_0_dim_tensor_assigns_like_the_number_it_holds(key: Any, value: Tensor) -> None:
    swarm = Swarm.stack([nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)) for _ in range(P)])
    picked = range(P)[key] if isinstance(key, (slice, int)) else [i for i in range(P) if i in (0, 2)]
    picked = [picked] if isinstance(picked, int) else list(picked)
    before = {name: view.clone() for name, view in {**swarm.params, **swarm.buffers}.items()}
    swarm[key] = value
    for name, view in swarm.params.items():
        for i in range(P):  # per member: the number, cast to the parameter's dtype, or unchanged
            expected = torch.full_like(before[name][i], value.item()) if i in picked else before[name][i]
            close(view[i], expected, exact=True)
    for name, view in swarm.buffers.items():  # numbers set arithmetic leaves only
        close(view, before[name], exact=True)


def test_a_0_dim_tensor_view_of_the_swarm_assigns_its_value_and_bad_scalars_change_nothing() -> None:
    swarm = Swarm.stack([nn.Linear(3, 2) for _ in range(P)])
    value = swarm.params["bias"][1, 0]  # a view into the very storage being written
    expected = value.item()
    swarm[:] = value
    assert bool((swarm.params["weight"] == expected).all()) and bool((swarm.params["bias"] == expected).all())
    before = {name: view.clone() for name, view in swarm.params.items()}
    with pytest.raises(TypeError, match=r"Swarm.__setitem__: the scalar .* would turn parameter 'weight'"):
        swarm[[0, 1]] = torch.tensor(1j)
    with pytest.raises(nytorch.DeviceMismatchError, match="the scalar operand is on meta"):
        swarm[0:2] = torch.tensor(1.0, device="meta")
    for name, view in swarm.params.items():
        close(view, before[name], exact=True)


# -- outputs that are not all tensors ---------------------------------------------------------------
def test_none_in_outputs_comes_back_as_none_multihead_attention() -> None:
    models = [nn.MultiheadAttention(8, 2, batch_first=True).eval() for _ in range(P)]
    swarm = Swarm.stack(models)
    q = torch.randn(2, 5, 8)
    out, weights = swarm(q, q, q, need_weights=False)
    assert weights is None
    close(out, stacked_outputs(models, q, q, q, need_weights=False)[0])
    out, weights = swarm(q, q, q)  # the default: per-member attention weights, stacked
    ref_out, ref_weights = stacked_outputs(models, q, q, q)
    close(out, ref_out)
    close(weights, ref_weights)


class Mixed(nn.Module):
    """A forward returning tensors, None and a number, nested."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: Tensor, scale: float = 1.0) -> Any:
        return {"y": self.fc(x) * scale, "rest": (None, 3, self.fc.weight.sum())}


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_pytree_outputs_stack_tensors_and_keep_other_leaves(chunk_size: Any) -> None:
    models = [Mixed() for _ in range(P)]
    swarm = Swarm.stack(models)
    x = torch.randn(4, 3)
    out = swarm(x, scale=2.0, chunk_size=chunk_size)
    refs = [model(x, scale=2.0) for model in models]
    assert set(out) == {"y", "rest"} and out["rest"][0] is None and out["rest"][1] == 3
    close(out["y"], torch.stack([ref["y"] for ref in refs]))
    close(out["rest"][2], torch.stack([ref["rest"][2] for ref in refs]))


class ReturnsNone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> None:
        return None


def test_a_forward_returning_none_returns_none() -> None:
    assert Swarm.stack([ReturnsNone(), ReturnsNone()])(torch.randn(2, 3)) is None


# -- in_dims checked against the swarm's size ---------------------------------------------------------
def test_per_member_inputs_of_the_wrong_size_are_named_and_change_nothing() -> None:
    models = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(P)]
    swarm = Swarm.stack(models)
    before = {name: view.clone() for name, view in swarm.buffers.items()}
    with pytest.raises(ValueError, match=r"Swarm.__call__: expected input 0 to have 3 slices \(one per member\) "
                                         r"along dimension 0 \(in_dims\), got shape \(2, 6, 3\)"):
        swarm(torch.randn(2, 6, 3), in_dims=0)
    with pytest.raises(ValueError, match=r"Swarm.__call__: expected input 0 to have 3 slices .* dimension 1 .* "
                                         r"got shape \(6, 2, 3\)"):
        swarm(torch.randn(6, 2, 3), in_dims=1)
    with pytest.raises(ValueError, match=r"Swarm.__call__: in_dims maps dimension 5 of input 0, but it is a "
                                         r"tensor of shape \(3, 6, 3\)"):
        swarm(torch.randn(3, 6, 3), in_dims=5)
    y = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"Swarm.grad_and_value: expected input 1 to have 3 slices .* "
                                         r"got shape \(6, 4\)"):
        swarm.grad_and_value(lambda m, x, y: F.mse_loss(m(x), y), torch.randn(3, 6, 3), y, in_dims=0)
    for name, view in swarm.buffers.items():
        close(view, before[name], exact=True)
    x = torch.randn(6, 3, 3)  # the member dimension second: as a loop over x[:, i]
    close(swarm(x, in_dims=1), torch.stack([model(x[:, i]) for i, model in enumerate(models)]))


# -- empty swarms ---------------------------------------------------------------------------------------
EMPTY_CASES: list[tuple[str, Callable[[], nn.Module], Callable[[], tuple[Tensor, ...]]]] = [
    ("conv", lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU()), lambda: (torch.randn(4, 2, 6),)),
    ("bn-train", lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), lambda: (torch.randn(5, 3),)),
    ("embedding", lambda: nn.Embedding(5, 2), lambda: (torch.tensor([[1, 2], [0, 4]]),)),
    ("no-tensors", lambda: nn.ReLU(), lambda: (torch.randn(2, 3),)),
]


@pytest.mark.parametrize("name, make, inputs", EMPTY_CASES, ids=[case[0] for case in EMPTY_CASES])
def test_an_empty_swarm_returns_outputs_with_no_members(name: str, make: Callable[[], nn.Module],
                                                       inputs: Callable[[], tuple[Tensor, ...]]) -> None:
    model = make()
    args = inputs()
    one = model(*args)  # what one member returns: an empty swarm stacks none of these
    swarm = Swarm.zeros(model, 0)
    out = swarm(*args)
    assert out.shape == (0, *one.shape) and out.dtype == one.dtype
    per_member = swarm(*(arg.unsqueeze(0)[:0] for arg in args), in_dims=0)
    assert per_member.shape == (0, *one.shape)
    assert all(view.shape[0] == 0 for view in swarm.buffers.values())


def test_an_empty_swarm_of_attention_keeps_none_and_the_shapes() -> None:
    model = nn.MultiheadAttention(4, 2).eval()
    q = torch.randn(3, 1, 4)
    out, weights = Swarm.zeros(model, 0)(q, q, q)
    ref_out, ref_weights = model(q, q, q)
    assert out.shape == (0, *ref_out.shape) and weights.shape == (0, *ref_weights.shape)
    out, weights = Swarm.zeros(model, 0)(q, q, q, need_weights=False)
    assert out.shape == (0, *ref_out.shape) and weights is None


# -- hooks --------------------------------------------------------------------------------------------
def test_hooks_change_every_members_output_once_per_call() -> None:
    models = [nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)) for _ in range(4)]
    calls: list[int] = []
    for model in models:
        model[0].register_forward_hook(lambda module, inputs, out: out * 2)
        model.register_forward_pre_hook(lambda module, inputs: (inputs[0] + 1,))
        model[2].register_forward_hook(lambda module, inputs, out: calls.append(1))
    swarm = Swarm.stack(models)
    x = torch.randn(5, 3)
    expected = stacked_outputs(models, x)
    calls.clear()
    close(swarm(x), expected)
    assert len(calls) == 1  # once per vectorised call, as documented
    calls.clear()
    close(swarm(x, chunk_size=2), expected)
    assert len(calls) == 2  # once per chunk


# -- construction against the source models ----------------------------------------------------------
class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.out = nn.Linear(4, 5, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.emb(x))


MODELS: list[tuple[str, Callable[[], nn.Module], Callable[[], tuple[Tensor, ...]]]] = [
    ("tied", Tied, lambda: (torch.randint(0, 5, (6,)),)),
    ("weight_norm", lambda: nn.utils.parametrizations.weight_norm(nn.Linear(3, 2)), lambda: (torch.randn(4, 3),)),
    ("conv2d-groups", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), lambda: (torch.randn(2, 4, 7, 7),)),
    ("channels_last", lambda: nn.Conv2d(4, 6, 3).to(memory_format=torch.channels_last),
     lambda: (torch.randn(2, 4, 7, 7),)),
    ("embedding-max_norm", lambda: nn.Embedding(6, 3, max_norm=1.0), lambda: (torch.tensor([0, 3, 5]),)),
    ("encoder-layer", lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
     lambda: (torch.randn(2, 5, 8),)),
    ("float64", lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double(),
     lambda: (torch.randn(5, 3, dtype=torch.float64),)),
]


@pytest.mark.parametrize("name, make, inputs", MODELS, ids=[case[0] for case in MODELS])
def test_forward_and_members_match_the_stacked_models(name: str, make: Callable[[], nn.Module],
                                                      inputs: Callable[[], tuple[Tensor, ...]]) -> None:
    torch.manual_seed(0)
    models = [make() for _ in range(P)]
    swarm = Swarm.stack(models)
    args = inputs()
    close(swarm(*args), stacked_outputs(models, *args))
    for i, model in enumerate(models):  # a member's module runs exactly like its source
        close(swarm[i].module()(*args), model(*args), exact=True)
    close(Swarm.stack([nytorch.particle(model) for model in models])(*args), stacked_outputs(models, *args))


def test_tied_weights_are_stored_once_and_stay_tied_in_members() -> None:
    swarm = Swarm.stack([Tied() for _ in range(P)])
    assert list(swarm.params) == ["emb.weight"]
    member = swarm[1].module()
    assert member.out.weight is member.emb.weight


def test_batchnorm_statistics_taken_into_arithmetic_are_updated_per_member() -> None:
    models = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(P)]
    swarm = Swarm.stack(models, buffers=True)
    x = torch.randn(8, 3)
    close(swarm(x), stacked_outputs(models, x))
    for i, model in enumerate(models):
        close(swarm.params["1.running_mean"][i], model[1].running_mean)
        close(swarm.params["1.running_var"][i], model[1].running_var)
        assert int(swarm.buffers["1.num_batches_tracked"][i]) == int(model[1].num_batches_tracked) == 1


# -- gradients --------------------------------------------------------------------------------------------
GRAD_CASES: list[tuple[str, Callable[[], nn.Module], Callable[[], tuple[Tensor, ...]]]] = [
    ("tied", Tied, lambda: (torch.randint(0, 5, (6,)),)),
    ("weight_norm", lambda: nn.utils.parametrizations.weight_norm(nn.Linear(3, 2)), lambda: (torch.randn(4, 3),)),
    ("frozen", lambda: nn.Sequential(nn.Linear(3, 4).requires_grad_(False), nn.Tanh(), nn.Linear(4, 2)),
     lambda: (torch.randn(5, 3),)),
    ("bn-train", lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)),
     lambda: (torch.randn(6, 3),)),
]


@pytest.mark.parametrize("name, make, inputs", GRAD_CASES, ids=[case[0] for case in GRAD_CASES])
def test_grad_and_value_matches_autograd_per_member(name: str, make: Callable[[], nn.Module],
                                                    inputs: Callable[[], tuple[Tensor, ...]]) -> None:
    torch.manual_seed(1)
    models = [make() for _ in range(P)]
    swarm = Swarm.stack(models)
    args = inputs()

    def loss_fn(member: Any, x: Tensor) -> Tensor:
        return member(x).pow(2).mean()
    grads, losses = swarm.grad_and_value(loss_fn, *args)
    ref_grads, ref_losses = loop_grads(models, loss_fn, *args)  # also moves the BatchNorm statistics
    close(losses, ref_losses)
    assert list(grads.params) == list(ref_grads)
    for param_name, grad in grads.params.items():
        close(grad, ref_grads[param_name])
    for buffer_name, view in swarm.buffers.items():
        close(view, torch.stack([dict(model.named_buffers())[buffer_name] for model in models]))


def test_requires_grad_is_item_0s_as_documented() -> None:
    frozen, free = nn.Linear(3, 2), nn.Linear(3, 2)
    frozen.weight.requires_grad_(False)
    x = torch.randn(4, 3)
    grads, _ = Swarm.stack([frozen, free]).grad_and_value(lambda m, x: m(x).sum(), x)
    assert not grads.params["weight"].any()  # item 0 is frozen: no member's weight is differentiated
    grads, _ = Swarm.stack([free, frozen]).grad_and_value(lambda m, x: m(x).sum(), x)
    close(grads.params["weight"][1], x.sum(0).expand(2, 3))


# -- arithmetic against per-member loops ---------------------------------------------------------------
def test_per_member_weights_of_any_real_dtype_match_a_loop() -> None:
    swarm = Swarm.stack([nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(P)])
    for weights in (torch.tensor([0.5, 2.0, -1.0]), torch.tensor([1, 0, 3]), torch.tensor([True, False, True]),
                    torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)):
        for result, op in ((swarm * weights, torch.mul), (weights - swarm, lambda a, w: w - a),
                           (swarm / weights.double().clamp(min=0.5), torch.div)):
            column = weights.double().clamp(min=0.5) if op is torch.div else weights
            for name, view in result.params.items():
                for i in range(P):
                    expected = op(swarm.params[name][i], column[i].to(view.dtype))
                    close(view[i], expected, exact=True)
            for name, view in result.buffers.items():
                close(view, swarm.buffers[name], exact=True)


def test_swarms_particles_and_models_broadcast_like_a_loop() -> None:
    models = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(P)]
    swarm, other = Swarm.stack(models), Swarm.stack([nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
                                                     for _ in range(P)])
    single = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    particle = nytorch.particle(single)
    fixed = dict(single.named_parameters())
    cases = [
        (swarm - other, lambda n, i: swarm.params[n][i] - other.params[n][i]),
        (particle - swarm, lambda n, i: fixed[n].detach() - swarm.params[n][i]),
        (swarm * particle, lambda n, i: swarm.params[n][i] * fixed[n].detach()),
        (swarm + single, lambda n, i: swarm.params[n][i] + fixed[n].detach()),
        (swarm[[2]] + swarm, lambda n, i: swarm.params[n][2] + swarm.params[n][i]),
    ]
    for result, expected in cases:
        for name, view in result.params.items():
            for i in range(P):
                close(view[i], expected(name, i), exact=True)
    inplace = swarm.clone()
    inplace -= particle
    for name, view in inplace.params.items():
        for i in range(P):
            close(view[i], swarm.params[name][i] - fixed[name].detach(), exact=True)
    with pytest.raises(StructureError, match="expected one weight per member .* got length 2"):
        inplace *= torch.ones(2)
    with pytest.raises(TypeError, match="complex weights would turn parameter '0.weight'"):
        swarm * torch.ones(P, dtype=torch.complex64)
    with pytest.raises(nytorch.DeviceMismatchError, match="the weights are on meta"):
        swarm * torch.ones(P, device="meta")


def test_weighted_sum_mean_and_norm_match_a_loop() -> None:
    swarm = Swarm.stack([nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(P)])
    weights = torch.tensor([0.2, -0.5, 1.5])
    total = weights @ swarm
    for name, view in total.params.items():
        close(view, sum(weights[i] * swarm.params[name][i] for i in range(P)))
        close(swarm.mean().params[name], swarm.params[name].mean(0))
    norms = torch.stack([torch.sqrt(sum(view[i].pow(2).sum() for view in swarm.params.values())) for i in range(P)])
    close(swarm.norm(), norms)


# -- copies, conversion, checkpoints ------------------------------------------------------------------------
def test_copies_conversions_and_checkpoints_keep_every_member(tmp_path: Any) -> None:
    models = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(P)]
    for model in models:
        model(torch.randn(5, 3))
    swarm = Swarm.stack(models)
    path = tmp_path / "swarm.pt"
    nytorch.save(swarm, path)
    copies = [swarm.clone(), copy.deepcopy(swarm), pickle.loads(pickle.dumps(swarm)),
              nytorch.load(path, like=Swarm.zeros(models[0], P))]
    for other in copies:
        for name, view in {**swarm.params, **swarm.buffers}.items():
            theirs = {**other.params, **other.buffers}[name]
            close(theirs, view, exact=True)
            assert theirs.data_ptr() != view.data_ptr()
    wide = swarm.to(torch.float64)
    for i, model in enumerate(models):
        for name, tensor in model.named_parameters():
            close(wide.params[name][i], tensor.detach().double(), exact=True)
    assert wide.buffers["1.num_batches_tracked"].dtype == torch.int64
    x = torch.randn(5, 3, dtype=torch.float64)
    close(wide.eval()(x), torch.stack([copy.deepcopy(model).double().eval()(x) for model in models]))
