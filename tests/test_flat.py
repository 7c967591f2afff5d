"""The one-buffer path (nytorch/_flat.py) gives exactly the per-tensor results."""
import pytest
import torch
from torch import nn

import nytorch
import nytorch.functional as nf
from nytorch._flat import find_flat, flatten_, plan_for


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
