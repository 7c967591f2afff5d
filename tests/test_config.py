# mypy: disable-error-code="union-attr, index, operator, arg-type, assignment, attr-defined"
# (nn.Module.__getattr__ is typed `Tensor | Module`: attribute access on models is untyped noise here)
# (attr-defined: ParamConfig takes user attributes, e.g. config.is_weight, which mypy cannot see)
"""``ParamConfig`` and the nytorch 1.1 config API of ``NytoModule``."""
from __future__ import annotations

import pytest
import torch
from conftest import MLP, Block, Deep, assert_dicts, named, ref_map
from torch import nn

import nytorch as nyto
from nytorch import ParamConfig

Tensor = torch.Tensor


class Root(nyto.NytoModule):
    """1.1's test layout: an own parameter and two NytoModule submodules."""

    def __init__(self) -> None:
        super().__init__()
        self.param = nn.Parameter(torch.tensor([1.0]))
        self.sub_module1 = Sub(torch.tensor([2.0]))
        self.sub_module2 = Sub(torch.tensor([3.0]))


class Sub(nyto.NytoModule):
    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.param = nn.Parameter(value)


# -- ParamConfig --------------------------------------------------------------------------------------
def test_paramconfig_defaults_user_attributes_copy() -> None:
    config = ParamConfig()
    assert config.operational is True and config.clone is True
    config.is_weight = True
    assert config.is_weight is True
    assert repr(config) == "ParamConfig(operational=True, clone=True, is_weight=True)"
    copy = config.copy()
    assert copy == config and copy is not config and copy.is_weight is True
    copy.operational = False
    assert config.operational is True and copy != config
    assert ParamConfig(operational=False, clone=False, tag="x").tag == "x"


# -- operational / clone -------------------------------------------------------------------------------
@pytest.mark.parametrize("operational, clone", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("by_name", [False, True])
def test_operational_and_clone_grid(operational: bool, clone: bool, by_name: bool) -> None:
    root = Root()
    p0, p1, p2 = root.param, root.sub_module1.param, root.sub_module2.param
    if by_name:
        root.set_param_config(operational=operational, clone=clone, name="sub_module1")
    else:
        root.sub_module1.set_param_config(operational=operational, clone=clone)
    for result in (root + 1, root * 3 - 2, 1 - root, -root):
        assert result.param is not p0 and result.sub_module2.param is not p2
        if operational:
            assert result.sub_module1.param is not p1
        elif clone:
            assert result.sub_module1.param is not p1 and torch.equal(result.sub_module1.param, p1)
            assert result.sub_module1.param.data_ptr() != p1.data_ptr()
        else:
            assert result.sub_module1.param is p1
    result = root + 1
    assert torch.equal(result.param, p0 + 1) and torch.equal(result.sub_module2.param, p2 + 1)
    expected1 = p1 + 1 if operational else p1
    assert torch.equal(result.sub_module1.param, expected1)


def test_non_operational_in_every_operation() -> None:
    net, other = MLP(), MLP()
    net.set_param_config(operational=False, name="layer0")
    frozen = named(net.layer0)
    for result in (net + other, net * 2, 2 ** net, net.randn(), net.lerp(other, 0.5), net.clone(),
                   (net.product() + 1).module(), net.product().randn().module()):
        assert_dicts(named(result.layer0), frozen)
        assert result.layer0.weight is not net.layer0.weight
    assert_dicts(named((net + other).layer1), ref_map(torch.add, named(net.layer1), named(other.layer1)))
    # in place: non-operational parameters are not touched
    net *= 5
    assert_dicts(named(net.layer0), frozen)


def test_clone_false_shares_parameter_object_and_clone_keeps_it() -> None:
    net = MLP()
    net.set_param_config(operational=False, clone=False, name="layer1")
    for result in (net + 1, net.clone(), net.randn(), +net, net.product().module()):
        assert result.layer1.weight is net.layer1.weight and result.layer1.bias is net.layer1.bias
        assert result.layer0.weight is not net.layer0.weight


def test_set_param_config_by_parameter_name() -> None:
    net = MLP()
    net.set_param_config(operational=False, name="layer0.bias")
    result = net + 1
    assert torch.equal(result.layer0.bias, net.layer0.bias)
    assert torch.equal(result.layer0.weight, net.layer0.weight + 1)


def test_set_param_config_deep_name_from_root_and_from_submodule_agree() -> None:
    a = Deep()
    a.set_param_config(operational=False, name="block0.norm")
    b = Deep()
    b.block0.set_param_config(operational=False, name="norm")
    for net in (a, b):
        result = net * 2
        assert_dicts(named(result.block0.norm), named(net.block0.norm))
        assert_dicts(named(result.block0.linear), ref_map(lambda x: x * 2, named(net.block0.linear)))
        assert_dicts(named(result.block1), ref_map(lambda x: x * 2, named(net.block1)))


def test_unknown_names_raise() -> None:
    net = MLP()
    with pytest.raises(ValueError, match=r"set_param_config: MLP has no submodule or parameter named 'nope'"):
        net.set_param_config(operational=False, name="nope")
    with pytest.raises(ValueError, match=r"'layer0.w'"):
        net.set_param_config(operational=False, name="layer0.w")
    with pytest.raises(TypeError, match=r"expected a str or None as name, got int"):
        net.apply_param_config(lambda pid, config: None, name=3)  # type: ignore[arg-type]


# -- configs shared by derived models ------------------------------------------------------------------------
def test_config_set_after_deriving_applies_to_both() -> None:
    net = MLP()
    derived = [net + 1, net.clone(), net.randn(), net * net, net.clone_from(MLP()), (net.product() * 2).module()]
    net.set_param_config(operational=False, name="layer0")
    for model in [net, *derived]:
        result = model + 10
        assert_dicts(named(result.layer0), named(model.layer0))
        assert_dicts(named(result.layer1), ref_map(lambda x: x + 10, named(model.layer1)))
    # and the other way round: set on a derived model, seen by the original
    derived[0].set_param_config(operational=True, name="layer0")
    assert_dicts(named((net + 10).layer0), ref_map(lambda x: x + 10, named(net.layer0)))


def test_detach_shares_parameters_but_starts_a_new_species() -> None:
    net = MLP()
    net.set_param_config(operational=False, name="layer0")
    detached = net.detach()
    assert type(detached) is MLP
    assert all(a is b for a, b in zip(detached.parameters(), net.parameters()))
    # configs are copied at detach time ...
    assert_dicts(named((detached + 1).layer0), named(net.layer0))
    # ... and evolve independently afterwards
    detached.set_param_config(operational=True)
    assert_dicts(named((detached + 1).layer0), ref_map(lambda x: x + 1, named(net.layer0)))
    assert_dicts(named((net + 1).layer0), named(net.layer0))


def test_clone_from_joins_self_species_with_source_values() -> None:
    net, source = MLP(), MLP()
    net.set_param_config(operational=False, name="layer1")
    copy = net.clone_from(source)
    assert type(copy) is MLP
    assert_dicts(named(copy), named(source))
    assert not {id(p) for p in copy.parameters()} & ({id(p) for p in source.parameters()}
                                                      | {id(p) for p in net.parameters()})
    assert_dicts(named((copy + 1).layer1), named(copy.layer1))  # net's configs apply
    with pytest.raises(nyto.StructureError, match=r"clone_from: parameter 'layer0.weight' differs"):
        net.clone_from(MLP(4, 5, 3))
    with pytest.raises(TypeError, match=r"clone_from: expected an nn.Module"):
        net.clone_from("x")  # type: ignore[arg-type]


# -- apply_param_config / get_param_id -------------------------------------------------------------------------
def test_apply_param_config_ids_match_get_param_id_and_user_attributes_persist() -> None:
    net = Deep()
    calls: list[int] = []

    def tag(param_id: int, config: ParamConfig) -> None:
        calls.append(param_id)
        config.pid = param_id
        config.is_weight = True

    net.apply_param_config(tag)
    params = list(net.parameters())
    assert calls == list(range(len(params)))
    assert [net.get_param_id(p) for p in params] == calls
    # user attributes reach custom operators, and the pid addresses the same parameter
    seen: list[bool] = []

    def check(param: Tensor, config: ParamConfig) -> Tensor:
        seen.append(param is params[config.pid] and config.is_weight)
        return param
    net.product().unary_operator(check)
    assert seen == [True] * len(params)

    def check2(a: Tensor, b: Tensor, config: ParamConfig) -> Tensor:
        seen.append(a is params[config.pid])
        return a
    net.product().binary_operator(net.clone().product(), check2)
    assert all(seen)
    # derived models see the same configs
    assert all(getattr(c, "is_weight", False) for c in _configs(net + 1))


def _configs(net: nyto.NytoModule) -> list[ParamConfig]:
    found: list[ParamConfig] = []
    net.apply_param_config(lambda pid, config: found.append(config))
    return found


def test_apply_param_config_scope() -> None:
    net = Deep()
    ids: list[int] = []
    net.apply_param_config(lambda pid, config: ids.append(pid), name="block1")
    names = [n for n, _ in net.named_parameters()]
    assert [names[i] for i in ids] == [n for n in names if n.startswith("block1.")]
    ids.clear()
    net.apply_param_config(lambda pid, config: ids.append(pid), name="scale")
    assert [names[i] for i in ids] == ["scale"]


def test_get_param_id_same_across_derived_models_and_errors() -> None:
    net = MLP()
    result = net * 2
    for (name, a), (_, b) in zip(net.named_parameters(), result.named_parameters()):
        assert net.get_param_id(a) == result.get_param_id(b)
    with pytest.raises(ValueError, match=r"get_param_id: the given parameter \(\(2,\)\) is not a parameter of this MLP"):
        net.get_param_id(nn.Parameter(torch.ones(2)))


def test_particle_of_nytomodule_honours_configs() -> None:
    net = MLP()
    net.set_param_config(operational=False, name="layer0")
    for p in (net.product(), nyto.particle(net)):
        out = (p * 3).module()
        assert type(out) is MLP
        assert_dicts(named(out.layer0), named(net.layer0))
        assert_dicts(named(out.layer1), ref_map(lambda x: x * 3, named(net.layer1)))


def test_unary_operator_sees_non_operational_config() -> None:
    net = MLP()
    net.set_param_config(operational=False, name="layer1")
    flags: list[bool] = []

    def fn(param: Tensor, config: ParamConfig) -> Tensor:
        flags.append(config.operational)
        return param + 1 if config.operational else param

    out = net.product().unary_operator(fn).module()
    assert flags == [True, True, False, False]
    assert torch.equal(out.layer0.weight, net.layer0.weight + 1)
    assert torch.equal(out.layer1.weight, net.layer1.weight)


def test_configs_on_submodule_ops() -> None:
    net = Deep()
    net.block0.set_param_config(operational=False, name="linear")
    out = net.block0 + 1
    assert type(out) is Block
    assert_dicts(named(out.linear), named(net.block0.linear))
    assert_dicts(named(out.norm), ref_map(lambda x: x + 1, named(net.block0.norm)))


def test_config_set_from_root_applies_to_operations_on_the_submodule() -> None:
    root = Root()
    root.set_param_config(operational=False, clone=False, name="sub_module1")
    out = root.sub_module1 + 1
    assert type(out) is Sub and out.param is root.sub_module1.param
    out2 = root.sub_module2 + 1
    assert torch.equal(out2.param, root.sub_module2.param + 1)
    # and a config set on the submodule is seen from the root
    root.sub_module2.set_param_config(operational=False)
    assert torch.equal((root + 1).sub_module2.param, root.sub_module2.param)
