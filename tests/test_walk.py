# mypy: disable-error-code="union-attr, index, operator, arg-type, assignment"
# (nn.Module.__getattr__ is typed `Tensor | Module`: attribute access on models is untyped noise here)
"""``nytorch._walk``: ``Layout`` / ``layout_of`` / ``rebuild`` against ``nn.Module``'s own walkers."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import MLP, Deep, TiedLM, assert_dicts, make_plain, named, named_buffers, storages
from torch import nn

import nytorch as nyto
from nytorch._rebuild import rebuild
from nytorch._walk import Layout, layout_of

Tensor = torch.Tensor


class Shared(nn.Module):
    """One submodule reachable under two names, a None child and a None parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2, bias=False)
        self.b = self.a
        self.empty = None
        self.inner = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


def _check_layout(layout: Layout, root: nn.Module) -> None:
    assert layout.names == [n for n, _ in root.named_parameters()]
    assert all(a is b for a, b in zip(layout.params, root.parameters()))
    assert len(layout.params) == len(list(root.parameters()))
    assert layout.buffer_names == [n for n, _ in root.named_buffers()]
    assert all(a is b for a, b in zip(layout.buffers, root.buffers()))
    assert [m for m in layout.modules] == [m for _, m in root.named_modules()]
    assert layout.prefixes == [(n + "." if n else "") for n, _ in root.named_modules()]


@pytest.mark.parametrize("factory", [lambda: make_plain("conv_bn"), lambda: make_plain("mixed"), TiedLM, Shared,
                                     Deep, MLP], ids=["conv_bn", "mixed", "tied", "shared", "deep", "mlp"])
def test_layout_matches_named_walkers(factory: Callable[[], nn.Module]) -> None:
    root = factory()
    _check_layout(Layout(root), root)
    _check_layout(layout_of(root), root)
    _check_layout(layout_of(root), root)  # cached


@pytest.mark.parametrize("factory", [lambda: make_plain("conv_bn"), TiedLM, Shared, Deep],
                         ids=["conv_bn", "tied", "shared", "deep"])
def test_rebuild_fresh_tree(factory: Callable[[], nn.Module]) -> None:
    root = factory()
    root.eval()
    next(iter(root.children())).train()
    layout = Layout(root)
    values = [p.detach() * 2 for p in layout.params]
    copy = rebuild(layout, values)
    assert type(copy) is type(root)
    assert [type(m) for _, m in copy.named_modules()] == [type(m) for _, m in root.named_modules()]
    assert not {id(m) for m in copy.modules()} & {id(m) for m in root.modules()}
    assert [m.training for m in copy.modules()] == [m.training for m in root.modules()]
    assert [n for n, _ in copy.named_parameters()] == layout.names
    for value, (name, param), source in zip(values, copy.named_parameters(), root.parameters()):
        assert isinstance(param, nn.Parameter) and param.data_ptr() == value.data_ptr(), name
        assert param.requires_grad == source.requires_grad and param.is_leaf
    assert_dicts(named_buffers(copy), named_buffers(root))
    assert storages(dict(copy.named_buffers())).isdisjoint(storages(root))
    assert list(copy.state_dict()) == list(root.state_dict())  # non-persistent buffers stay non-persistent


def test_rebuild_keeps_shared_modules_none_slots_and_ties() -> None:
    root = Shared()
    copy = rebuild(Layout(root), [p.detach().clone() for p in root.parameters()])
    assert copy.b is copy.a and copy.a is not root.a
    assert copy.empty is None and copy.a.bias is None
    tied = TiedLM()
    copy2 = rebuild(Layout(tied), [p.detach().clone() for p in tied.parameters()])
    assert copy2.head.weight is copy2.embed.weight


def test_rebuild_uses_given_parameters_and_buffers_as_is() -> None:
    root = nn.BatchNorm1d(2)
    layout = Layout(root)
    weight, bias = nn.Parameter(torch.ones(2)), torch.zeros(2)
    mean = torch.full((2,), 3.0)
    copy = rebuild(layout, [weight, bias], [mean, torch.ones(2), torch.tensor(4)])
    assert copy.weight is weight
    assert isinstance(copy.bias, nn.Parameter) and copy.bias.data_ptr() == bias.data_ptr()
    assert copy.running_mean is mean and copy.num_batches_tracked.item() == 4


def test_rebuild_wraps_with_source_requires_grad() -> None:
    root = nn.Linear(2, 2)
    root.bias.requires_grad_(False)
    copy = rebuild(Layout(root), [torch.ones(2, 2), torch.zeros(2)])
    assert copy.weight.requires_grad and not copy.bias.requires_grad


def test_hooks_do_not_leak_between_source_and_rebuilt() -> None:
    root = nn.Linear(2, 2)
    calls: list[str] = []
    root.register_forward_hook(lambda *args: calls.append("source"))
    copy = rebuild(Layout(root), [p.detach() for p in root.parameters()])
    copy.register_forward_hook(lambda *args: calls.append("copy"))
    root(torch.ones(1, 2))
    assert calls == ["source"]
    calls.clear()
    copy(torch.ones(1, 2))
    assert calls == ["source", "copy"]  # the copy starts with the source's hooks, adds its own
    root.register_forward_pre_hook(lambda *args: calls.append("late"))
    calls.clear()
    copy(torch.ones(1, 2))
    assert "late" not in calls


# -- layout_of follows structural changes ------------------------------------------------------------------
def _mutations() -> dict[str, Callable[[nn.Module], None]]:
    def replace_param(m: nn.Module) -> None:
        m.layer0.weight = nn.Parameter(torch.randn(6, 4))

    def replace_child(m: nn.Module) -> None:
        m.layer1 = nn.Linear(6, 5)

    def none_child(m: nn.Module) -> None:
        m.layer1 = None

    def delete_child(m: nn.Module) -> None:
        del m.layer1

    def add_child(m: nn.Module) -> None:
        m.extra = nn.Linear(1, 1)

    def add_buffer(m: nn.Module) -> None:
        m.register_buffer("stat", torch.ones(3))

    def tie(m: nn.Module) -> None:
        m.layer1.bias = m.layer0.bias if m.layer0.bias.shape == m.layer1.bias.shape else m.layer1.bias
        m.extra_param = m.layer0.weight

    def none_param(m: nn.Module) -> None:
        m.layer0.bias = None

    def new_configs(m: nn.Module) -> None:
        m.__dict__["_nyto_param_configs"] = {"layer0.weight": nyto.ParamConfig(operational=False)}

    return {f.__name__: f for f in (replace_param, replace_child, none_child, delete_child, add_child, add_buffer,
                                    tie, none_param, new_configs)}


@pytest.mark.parametrize("mutation", sorted(_mutations()))
def test_layout_of_sees_every_structural_change(mutation: str) -> None:
    root = MLP()
    _ = root + 1  # cache a layout of root and of the result
    layout_of(root)
    _mutations()[mutation](root)
    _check_layout(layout_of(root), root)
    result = root * 2  # operations use the new structure
    assert [n for n, _ in result.named_parameters()] == [n for n, _ in root.named_parameters()]
    frozen = {"layer0.weight"} if mutation == "new_configs" else set()  # the new config table applies
    for (name, got), (_, source) in zip(result.named_parameters(), root.named_parameters()):
        assert torch.equal(got, source if name in frozen else source * 2), name


def test_layout_of_on_submodule_change_deep_in_the_tree() -> None:
    root = Deep()
    _ = root + 1
    root.block1.linear = nn.Linear(3, 3, bias=False)
    _check_layout(layout_of(root), root)
    assert "block1.linear.bias" not in dict((root + 1).named_parameters())
    other = Deep()
    with pytest.raises(nyto.StructureError, match=r"block1.linear.bias"):
        root + other


def test_dtype_change_in_place_is_seen_by_structure_checks() -> None:
    a, b = MLP(), MLP()
    _ = a + b  # caches both layouts and their signatures
    a.double()  # same Parameter objects, new dtype
    with pytest.raises(nyto.StructureError, match=r"'layer0.weight' differs: shape \(6, 4\) float64 vs "
                                                  r"shape \(6, 4\) float32"):
        a + b
    with pytest.raises(nyto.StructureError):
        b + a  # currently returns an MLP with float64 parameters: b's dtype is not kept


def test_shape_change_through_data_is_a_structure_error() -> None:
    a, b = MLP(), MLP()
    _ = a + b
    a.layer0.weight.data = torch.zeros(5, 4)
    with pytest.raises(nyto.StructureError, match=r"'layer0.weight' differs"):
        a + b  # currently a RuntimeError from inside the fused kernel


def test_dtype_change_then_ops_keep_the_new_dtype() -> None:
    a = MLP()
    _ = a * 2
    a.double()
    assert all(p.dtype == torch.float64 for p in (a * 2).parameters())
    assert all(p.dtype == torch.float64 for p in a.clone().parameters())


def test_rebuilt_results_report_their_own_layout() -> None:
    root = make_plain("conv_bn")
    result = (nyto.particle(root) + 1).module()
    _check_layout(layout_of(result), result)
    assert_dicts(named(result), {k: v + 1 for k, v in named(root).items()})
