"""``nytorch.check_structure`` / ``same_structure`` (``nytorch/_structure.py``): the check arithmetic makes, on its own."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nytorch
import nytorch.functional as nf
from nytorch import DeviceMismatchError, StructureError, check_structure, same_structure
from nytorch._walk import PENDING


class Net(nytorch.NytoModule):
    def __init__(self, hidden: int = 4, bias: bool = True, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.layer1 = nn.Linear(3, hidden, bias=bias, dtype=dtype)
        self.norm = nn.BatchNorm1d(hidden, dtype=dtype)
        self.layer2 = nn.Linear(hidden, 2, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.norm(self.layer1(x)))


class Other(Net):
    pass


def _storage(model: nn.Module) -> list[int]:
    return [p.data_ptr() for p in model.parameters()]


def test_models_of_one_structure_pass_and_nothing_moves() -> None:
    a, b = Net(), Net()
    before = _storage(a), _storage(b)
    values = [p.detach().clone() for p in a.parameters()]
    check_structure(a, b)
    assert same_structure(a, b) and same_structure(b, a)
    assert (_storage(a), _storage(b)) == before  # not packed, not copied
    assert all(torch.equal(p, v) for p, v in zip(a.parameters(), values))


def test_results_particles_and_plain_modules() -> None:
    a, b = Net(), Net()
    result = a + b
    assert PENDING in result.__dict__
    check_structure(result, a)
    check_structure(a, result)
    assert PENDING in result.__dict__  # compared without building its module tree
    check_structure(nytorch.particle(a), result)
    check_structure(nytorch.particle(a), nytorch.particle(b) * 2)
    check_structure(nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize(("other", "message"), [
    (lambda: Net(hidden=5), r"check_structure: parameter 'layer1\.weight' differs: shape \(4, 3\) float32 vs "
                            r"shape \(5, 3\) float32"),
    (lambda: Net(dtype=torch.float64), r"parameter 'layer1\.weight' differs: shape \(4, 3\) float32 vs "
                                       r"shape \(4, 3\) float64"),
    (lambda: Net(bias=False), r"parameter 'layer1\.bias' is missing from the second operand"),
    (lambda: Other(), r"the first operand is a Net and the second a Other; arithmetic combines models of one class"),
])
def test_a_difference_is_named(other, message) -> None:
    a, b = Net(), other()
    with pytest.raises(StructureError, match=message):
        check_structure(a, b)
    assert not same_structure(a, b) and not same_structure(b, a)


def test_extra_parameter_and_order() -> None:
    with pytest.raises(StructureError, match=r"the second operand has an extra parameter 'layer1\.bias'"):
        check_structure(Net(bias=False), Net())


def test_devices_differ() -> None:
    with pytest.raises(DeviceMismatchError, match=r"parameter 'weight' is on cpu in the first operand and on meta"):
        check_structure(nn.Linear(2, 1), nn.Linear(2, 1, device="meta"))
    assert not same_structure(nn.Linear(2, 1), nn.Linear(2, 1, device="meta"))


def test_particle_with_buffers_lists_them() -> None:
    with pytest.raises(StructureError, match=r"extra parameter 'norm\.running_mean'"):
        check_structure(nytorch.particle(Net()), nytorch.particle(Net(), buffers=True))


def test_pytrees() -> None:
    a, b = Net(), Net()
    check_structure(nf.params(a), nf.params(b))
    check_structure({"x": [torch.ones(2), torch.zeros(1)]}, {"x": [torch.zeros(2), torch.ones(1)]})
    with pytest.raises(StructureError, match=r"check_structure: parameter 'x\.1' differs: shape \(1,\) float32 "
                                             r"vs shape \(2,\) float32"):
        check_structure({"x": [torch.ones(2), torch.zeros(1)]}, {"x": [torch.zeros(2), torch.ones(2)]})
    with pytest.raises(StructureError, match=r"parameter 'layer1\.bias' is missing from the second operand"):
        check_structure(nf.params(a), nf.params(Net(bias=False)))
    assert same_structure(nf.params(a), nf.params(b))
    assert not same_structure({"w": torch.ones(2)}, {"v": torch.ones(2)})


@pytest.mark.parametrize(("a", "b", "message"), [
    (None, {"w": torch.ones(1)}, r"expected a pytree of tensors or a scalar as the first operand, got None"),
    ({"w": torch.ones(1)}, {"w": "text"}, r"the leaf at 'w' is a str"),
    (nn.Linear(1, 1), {"weight": torch.ones(1, 1)}, r"the first operand is a model and the second is dict; "
                                                    r"compare a model with a model or a Particle"),
    ({"weight": torch.ones(1, 1)}, nn.Linear(1, 1), r"the second operand is a model and the first is dict"),
])
def test_bad_operands_raise_type_error(a, b, message) -> None:
    # each function's messages start with its own name
    with pytest.raises(TypeError, match=rf"^check_structure: .*{message}"):
        check_structure(a, b)
    with pytest.raises(TypeError, match=rf"^same_structure: .*{message}"):
        same_structure(a, b)


_SHAPES = st.sampled_from([(Net, 4, True, torch.float32), (Net, 5, True, torch.float32),
                           (Net, 4, False, torch.float32), (Net, 4, True, torch.float64),
                           (Other, 4, True, torch.float32)])


@settings(max_examples=60, deadline=None)
@given(_SHAPES, _SHAPES, st.sampled_from(["module", "particle", "result"]),
       st.sampled_from(["module", "particle", "result"]))
def test_agrees_with_arithmetic(left, right, left_kind, right_kind) -> None:
    """``same_structure(a, b)`` is ``True`` exactly when ``a + b`` works, whatever the operands' kinds."""
    def make(spec, kind):
        model = spec[0](*spec[1:])
        return {"module": model, "particle": nytorch.particle(model), "result": model * 1}[kind]

    a, b = make(left, left_kind), make(right, right_kind)
    try:
        (a if left_kind != "module" else nytorch.particle(a)) + b
        combines = True
    except (StructureError, TypeError):  # another structure, or another class
        combines = False
    assert same_structure(a, b) is combines
    assert same_structure(b, a) is combines
    assert combines is (left == right)


def test_judges_parameters_as_they_are_now_like_arithmetic() -> None:
    """A Particle made before ``param.data = ...`` changed a shape: both checks read the parameters now."""
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    p = nytorch.particle(a)
    a.weight.data = torch.zeros(3, 2)
    assert not same_structure(p, b)
    with pytest.raises(StructureError, match=r"parameter 'weight' differs: shape \(3, 2\) float32 vs shape \(2, 2\)"):
        p + nytorch.particle(b)
    b.weight.data = torch.zeros(3, 2)
    check_structure(p, b)
    p + nytorch.particle(b)


def test_a_particle_made_before_a_shape_change_computes_with_the_new_shape() -> None:
    """One parameter given another shape of the same size between ``particle(model)`` and its first use."""
    model = nn.Linear(3, 2, bias=False)
    p = nytorch.particle(model)
    model.weight.data = torch.arange(6.0).reshape(3, 2)
    result = p + 1.0
    assert result.params["weight"].shape == (3, 2)
    assert torch.equal(result.params["weight"], torch.arange(6.0).reshape(3, 2) + 1.0)


def test_particles_of_two_classes_of_one_structure_do_not_combine() -> None:
    """``Other`` has ``Net``'s parameter names (shared, interned lists): the classes still differ."""
    a, b = nytorch.particle(Net()), nytorch.particle(Other())
    assert not same_structure(a, b)
    for left, right in ((a, b), (b, a)):
        with pytest.raises(TypeError, match=r"add: expected a (Net|Other) \(or a Particle of one\), got a (Other|Net)"):
            left + right
        with pytest.raises(TypeError, match=r"expected a (Net|Other)"):
            left.clone().__iadd__(right)
