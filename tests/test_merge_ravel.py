"""ravel / unravel: flat vectors and numpy round trips for models, Particles and dicts."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import nytorch
from nytorch import StructureError, merge


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(4, 3)
        self.out = nn.Linear(3, 4)
        self.out.weight = self.embed.weight


class NytoNet(nytorch.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(2, 3)
        self.head = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.frozen(x))


def bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def unique_params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach() for p in model.parameters()]  # parameters() yields tied tensors once


@pytest.mark.parametrize("make", [bn_net, Tied, lambda: nn.Conv2d(2, 3, 3)])
def test_ravel_is_concatenation_in_parameter_order(make):
    torch.manual_seed(0)
    model = make()
    vector, unravel = merge.ravel(model)
    expected = torch.cat([p.reshape(-1) for p in unique_params(model)])
    assert torch.equal(vector, expected) and not vector.requires_grad
    assert vector.data_ptr() != unique_params(model)[0].data_ptr()
    copy = unravel(vector * 2)
    assert type(copy) is type(model)
    for mine, theirs in zip(unique_params(copy), unique_params(model)):
        assert torch.equal(mine, 2 * theirs)
    for mine, theirs in zip(copy.buffers(), model.buffers()):
        assert torch.equal(mine, theirs) and mine.data_ptr() != theirs.data_ptr()


def test_numpy_round_trip_keeps_dtypes_and_values():
    torch.manual_seed(0)
    model = bn_net()
    vector, unravel = merge.ravel(model)
    array = vector.numpy().astype(np.float64) + 1.0
    copy = unravel(array)
    for mine, theirs in zip(copy.parameters(), model.parameters()):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine.detach(), theirs.detach() + 1.0)
    back, _ = merge.ravel(copy)
    np.testing.assert_allclose(back.numpy(), array, rtol=1e-6)
    assert torch.equal(merge.ravel(unravel(list(vector.tolist())))[0], vector)


def test_bfloat16_model_round_trips_through_float32_numpy():
    """numpy has no bfloat16: ``vector.float().numpy()`` out, ``unravel(float32 array)`` back, exactly."""
    torch.manual_seed(0)
    model = bn_net().bfloat16()
    vector, unravel = merge.ravel(model)
    assert vector.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="BFloat16"):  # torch's own message: why ravel's docstring says .float()
        vector.numpy()
    array = vector.float().numpy()
    assert array.dtype == np.float32
    copy = unravel(array)
    for mine, theirs in zip(copy.parameters(), model.parameters()):
        assert mine.dtype == torch.bfloat16
        assert torch.equal(mine, theirs)
    moved = unravel(array + np.float32(0.5))  # values of the optimiser's float arrays are rounded to bfloat16
    for mine, theirs in zip(moved.parameters(), model.parameters()):
        assert torch.equal(mine, (theirs.float() + 0.5).bfloat16())


def test_unravel_result_owns_its_values():
    model = nn.Linear(2, 2)
    vector, unravel = merge.ravel(model)
    array = vector.numpy().copy()
    copy = unravel(array)
    array[:] = 100.0
    assert torch.equal(copy.weight.detach().reshape(-1), vector[:4])


def test_tied_weights_count_once_and_stay_tied():
    model = Tied()
    vector, unravel = merge.ravel(model)
    assert vector.numel() == 4 * 3 + 4
    copy = unravel(torch.arange(16.0))
    assert copy.out.weight is copy.embed.weight
    assert copy.out.bias.tolist() == [12.0, 13.0, 14.0, 15.0]


def test_non_operational_parameters_are_carried():
    model = NytoNet()
    model.set_param_config(operational=False, name="frozen")
    vector, unravel = merge.ravel(model)
    assert vector.numel() == 3 + 1
    copy = unravel(torch.zeros(4))
    assert isinstance(copy, NytoNet)
    assert torch.equal(copy.frozen.weight, model.frozen.weight) and copy.head.weight.abs().sum() == 0


def test_particle_with_buffers_includes_floating_buffers():
    model = bn_net()
    p = nytorch.particle(model, buffers=True)
    vector, unravel = merge.ravel(p)
    floating = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    assert vector.numel() == sum(t.numel() for t in floating)
    result = unravel(vector)
    assert isinstance(result, nytorch.Particle)
    assert int(result.params["1.num_batches_tracked"]) == int(model[1].num_batches_tracked)


def test_mixed_dtypes_promote_and_cast_back():
    tree = {"a": torch.ones(2, dtype=torch.float16), "b": torch.full((3,), 2.0, dtype=torch.float64),
            "n": torch.tensor([5])}
    vector, unravel = merge.ravel(tree)
    assert vector.dtype == torch.float64 and vector.tolist() == [1.0, 1.0, 2.0, 2.0, 2.0]
    back = unravel(vector + 0.5)
    assert back["a"].dtype == torch.float16 and back["a"].tolist() == [1.5, 1.5]
    assert back["n"].tolist() == [5]


def test_gradients_flow_through_unravel_of_a_dict():
    model = nn.Linear(3, 1)
    vector, unravel = merge.ravel(nytorch.functional.params(model))
    vector.requires_grad_(True)
    out = nytorch.functional.call(model, unravel(vector), torch.ones(2, 3)).sum()
    out.backward()
    assert vector.grad is not None and vector.grad.tolist() == [2.0, 2.0, 2.0, 2.0]


def test_unravel_copies_arrays_torch_cannot_view_without_warning(recwarn):
    model = nn.Linear(3, 2)
    vector, unravel = merge.ravel(model)
    expected = vector.numpy().copy()
    reversed_ = unravel(expected[::-1].copy()[::-1])  # negative strides: copied, values in order
    read_only = expected.copy()
    read_only.flags.writeable = False
    stacked = [expected[:3], expected[3:]]
    strided = np.zeros(2 * expected.size, dtype=np.float64)
    strided[::2] = expected
    for result in (reversed_, unravel(read_only), unravel(strided[::2])):
        assert torch.equal(merge.ravel(result)[0], vector)
    backwards = unravel(expected[::-1])
    assert torch.equal(merge.ravel(backwards)[0], torch.from_numpy(expected[::-1].copy()))
    assert not recwarn.list, [str(w.message) for w in recwarn.list]
    # numpy before 1.24 makes an object array of a ragged list, which torch refuses
    with pytest.raises(TypeError, match=r"unravel: expected a tensor or an array of shape \(8,\), got list "
                                        r"\(.*(inhomogeneous|numpy\.object_)"):
        unravel(stacked)


def test_unravel_of_a_swarm_takes_a_list_of_arrays_without_warning(recwarn):
    swarm = nytorch.Swarm.stack([nn.Linear(3, 2) for _ in range(4)])
    vector, unravel = merge.ravel(swarm)
    rows = [row.numpy().astype(np.float64) for row in vector * 3]  # e.g. cma's ask()
    result = unravel(rows)
    assert len(result) == 4 and torch.equal(merge.ravel(result)[0], vector * 3)
    assert not recwarn.list, [str(w.message) for w in recwarn.list]


@pytest.mark.parametrize("value, error, message", [
    (torch.zeros(5), StructureError, r"unravel: expected a vector of shape \(4,\), got shape \(5,\)"),
    (torch.zeros(2, 2), StructureError, r"unravel: expected a vector of shape \(4,\), got shape \(2, 2\)"),
    (torch.zeros(4, dtype=torch.complex64), TypeError, r"unravel: expected a real vector"),
    ("abcd", TypeError, r"unravel: expected a tensor or an array of shape \(4,\), got str"),
])
def test_unravel_errors(value, error, message):
    _, unravel = merge.ravel(nn.Linear(3, 1))
    with pytest.raises(error, match=message):
        unravel(value)


def test_ravel_errors():
    with pytest.raises(TypeError, match=r"ravel: expected an nn.Module, a Particle, a Swarm or a dict of tensors as x"):
        merge.ravel(3.0)
    mixed = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, device="meta"))
    with pytest.raises(nytorch.DeviceMismatchError, match=r"ravel: parameter '1\.weight' is on meta but '0\.weight'"):
        merge.ravel(mixed)
