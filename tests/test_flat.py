"""The one-buffer path (nytorch/_flat.py) gives exactly the per-tensor results."""
import pytest
import torch
from torch import nn

import nytorch
import nytorch.functional as nf
from conftest import MLP
from nytorch._flat import find_flat, plan_for
from nytorch._packing import flatten_


def _mixed() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model.register_parameter("counts", nn.Parameter(torch.tensor([1, 2]), requires_grad=False))
    model.register_parameter("precise", nn.Parameter(torch.ones(3, dtype=torch.float64)))
    return model


def _reference(model: nn.Module, fn) -> dict[str, torch.Tensor]:
    return {name: fn(p.detach()) if p.is_floating_point() else p.detach().clone()
            for name, p in model.named_parameters()}


def test_flatten_keeps_parameter_objects_and_values():
    model = _mixed()
    before = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    flatten_(model)
    for name, p in model.named_parameters():
        assert p is before[name][0]
        assert torch.equal(p, before[name][1])
    floats = [p for p in model.parameters() if p.dtype == torch.float32]
    assert all(b.data_ptr() == a.data_ptr() + a.numel() * 4 for a, b in zip(floats, floats[1:]))


@pytest.mark.parametrize("flat", [False, True])
def test_flat_and_per_tensor_paths_agree(flat):
    a, b = _mixed(), _mixed()
    with torch.no_grad():
        for p in b.parameters():
            if p.is_floating_point():
                p.add_(torch.rand_like(p))
    if flat:
        flatten_(a)
        flatten_(b)
    pa, pb = nytorch.particle(a), nytorch.particle(b)
    result = 0.9 * (pa - pb) + pa
    expected = {name: 0.9 * (x - y) + x if x.is_floating_point() else x
                for (name, x), y in zip(nf.params(a).items(), nf.params(b).values())}
    for name, value in result.params.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-12)
        assert value.dtype == expected[name].dtype
    module = result.module()
    assert torch.equal(module.counts, a.counts) and module.counts is not a.counts


def test_in_place_on_a_flat_view_writes_into_the_model():
    model = flatten_(_mixed())
    expected = _reference(model, lambda t: t.lerp(torch.zeros_like(t), 0.25))
    target = nytorch.particle(model)
    target.lerp_(target.clone() * 0, 0.25)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name])


def test_moved_storage_is_noticed():
    model = flatten_(_mixed())
    p = nytorch.particle(model)
    assert p._flat_form() is not None
    with torch.no_grad():
        model[0].weight.data = model[0].weight.data.clone()  # storage moved under the Particle's feet
    doubled = p * 2
    torch.testing.assert_close(doubled.params["0.weight"], model[0].weight.detach() * 2)


def test_find_flat_refuses_gaps_and_order():
    storage = torch.arange(10.)
    gap = [storage[:2], storage[3:5]]
    plan = plan_for([(t.shape, t.dtype, t.device) for t in gap], [True, True])
    assert find_flat(plan, gap) is None
    swapped = [storage[2:4], storage[:2]]
    assert find_flat(plan, swapped) is None


def test_configs_changed_after_packing_fall_back():
    class Net(nytorch.NytoModule):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.ones(2))
            self.b = nn.Parameter(torch.ones(2))
    net = Net()
    p = flatten_(net).product()
    first = p * 2
    assert first._flat_form() is not None
    net.set_param_config(operational=False, name="a")
    second = first * 10
    assert torch.equal(second.params["a"], torch.full((2,), 2.0))
    assert torch.equal(second.params["b"], torch.full((2,), 20.0))


def _backward_after(model: nn.Module, update) -> str:
    """What ``backward`` says about a graph that saved ``model``'s last weight, after ``update()``.

    Only the last layer runs: the packed buffer shares its version counter with the first
    parameter, so a graph through the first layer would notice the write anyway.
    """
    x = torch.randn(5, 6, requires_grad=True)  # so that the layer saves its weight
    loss = (model.layer1 if isinstance(model, MLP) else model[-1])(x).sum()
    update()
    try:
        loss.backward()
    except RuntimeError as error:
        return str(error)
    return "no error"


def _in_place_updates():
    def particle_add(model):
        return lambda: nytorch.particle(model).__iadd__(1.0)

    def particle_lerp(model):
        other = MLP()
        return lambda: nytorch.particle(model).lerp_(nytorch.particle(other), 0.5)

    def module_add(model):
        other = MLP()

        def update():
            result = model
            result += other  # NytoModule's in-place operator: same Parameter objects
            assert result is model
        return update

    def ema_update(model):
        from nytorch.merge import EMA
        ema = EMA(MLP(), decay=0.5)
        model.load_state_dict(ema.averaged.state_dict())
        return ema  # the test runs the graph through ema.averaged instead

    return {"Particle +=": particle_add, "Particle.lerp_": particle_lerp, "NytoModule +=": module_add,
            "EMA.update": ema_update}


@pytest.mark.parametrize("name", list(_in_place_updates()))
def test_writes_into_packed_buffers_are_seen_by_autograd(name):
    """A graph that saved a packed model's parameters raises after nytorch writes them in place, as torch does."""
    torch.manual_seed(0)
    model = MLP()
    nytorch.particle(model)  # packed: every parameter views one buffer
    made = _in_place_updates()[name](model)
    if name == "EMA.update":
        message = _backward_after(made.averaged, made.update)
    else:
        message = _backward_after(model, made)
    assert "modified by an inplace operation" in message
    plain = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))  # the same with plain torch

    def add_one() -> None:
        with torch.no_grad():
            for p in plain.parameters():
                p.add_(1.0)
    assert "modified by an inplace operation" in _backward_after(plain, add_one)


def test_written_bumps_only_active_leaves():
    leaves = [torch.zeros(2), torch.zeros(2, dtype=torch.int64)]
    signature = [(leaf.shape, leaf.dtype, leaf.device) for leaf in leaves]
    from nytorch._flat import written
    written(leaves, plan_for(signature, [True, False]))
    assert [leaf._version for leaf in leaves] == [1, 0]


@pytest.mark.parametrize("bad", [3, None, {"w": torch.zeros(1)}])
def test_flatten_names_what_is_not_a_module(bad: object) -> None:
    with pytest.raises(TypeError, match=rf"^flatten_: expected an nn.Module, got {type(bad).__name__}$"):
        flatten_(bad)  # type: ignore[arg-type]
