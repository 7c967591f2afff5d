"""Compiled rebuilds (nytorch/_builder.py) build exactly what the generic loop builds."""
import copy

import pytest
import torch
from torch import nn

import nytorch
from conftest import PRODUCTION_COMPILE_AFTER
from nytorch import _builder
from nytorch._rebuild import _build_generic
from nytorch._walk import layout_of


class Tied(nytorch.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.body = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Identity())
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight
        self.extra = nn.ParameterDict({"alpha": nn.Parameter(torch.ones(2))})
        self.skip = None
        self.register_buffer("steps", torch.tensor(3))


def _describe(module: nn.Module) -> list:
    return [(name, type(m).__name__, sorted(m._parameters), sorted(m._buffers), sorted(m._modules))
            for name, m in module.named_modules(remove_duplicate=False)]


def test_repeated_operations_use_the_compiled_builder_and_match_the_generic_one():
    net = Tied()
    results = [net * 2 for _ in range(3)]
    for result in results:  # results build their tree on first touch; the second build of a structure compiles it
        assert result.training
    assert layout_of(net)._family.build is not None
    for result in results:
        assert _describe(result) == _describe(net)
        assert result.head.weight is result.embed.weight
        assert result.skip is None and torch.equal(result.steps, net.steps) and result.steps is not net.steps
        torch.testing.assert_close(result.extra["alpha"], net.extra["alpha"] * 2)
    layout = layout_of(net)
    generic = _build_generic(layout, [module.__dict__ for module in layout.modules], list(map(type, layout.modules)),
                             list(layout.params), list(layout.buffers), None)[0]
    assert _describe(generic) == _describe(results[-1])


@pytest.mark.parametrize("after", [PRODUCTION_COMPILE_AFTER, 5])
def test_a_structure_is_compiled_on_its_nth_use_and_builds_alike_before_and_after(monkeypatch, after):
    monkeypatch.setattr(_builder, "COMPILE_AFTER", after)
    net = Tied()
    results = []
    for use in range(1, after + 2):
        results.append(net * 2)
        assert results[-1].training  # built: capture, build and the operand's check each counted once more
        family = layout_of(net)._family  # the structure's, once an operation remembered net's layout
        compiled = (family.capture is not None, family.build is not None)
        assert compiled == ((use >= after,) * 2), (use, compiled)
    assert family.gather is not None
    for result in (results[0], results[-1]):  # generic, then compiled: the same tree
        assert _describe(result) == _describe(net)
        assert result.head.weight is result.embed.weight
        torch.testing.assert_close(result.extra["alpha"], net.extra["alpha"] * 2)


def test_hooks_and_containers_added_to_a_compiled_result_stay_there():
    net = Tied()
    _ = net + 1
    result = net + 1
    calls = []
    result.body.register_forward_hook(lambda *args: calls.append("result"))
    result.extra["beta"] = nn.Parameter(torch.zeros(1))
    net.body(torch.randn(2, 3))
    assert calls == [] and "beta" not in net.extra
    result.body(torch.randn(2, 3))
    assert calls == ["result"]


def test_a_module_that_gained_an_attribute_falls_back_to_the_generic_loop():
    net = Tied()
    _ = net + 1
    _ = net + 1
    net.body[0].note = "changed"  # not structural: same layout, but the compiled code no longer fits
    result = net + 1
    assert result.body[0].note == "changed"
    torch.testing.assert_close(result.body[0].weight, net.body[0].weight + 1)


def test_compiled_functions_are_freed_without_the_cycle_collector(monkeypatch) -> None:
    """The compiled cache is bounded (cleared when full): a dropped function must not be cyclic garbage.

    ``exec`` puts the function in its own globals; left there, function and namespace would form a
    cycle that only the collector frees (found by the long-run cycle test when the cache filled).
    """
    import gc
    import weakref

    from nytorch import _builder
    from nytorch._rebuild import _CONTAINER_SET, _capture_generic
    from nytorch._walk import Layout

    layout = Layout(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    states = [_capture_generic(module) for module in layout.modules]
    monkeypatch.setattr(_builder, "_COMPILED", {})  # a cache of its own, dropped below as when full
    gc.disable()
    try:
        made = [_builder.compile_gather(layout.children, layout.param_slots, layout.buffer_slots),
                _builder.compile_capture(states, _CONTAINER_SET),
                _builder.compile_builder(states, layout.children, layout.param_slots, layout.buffer_slots,
                                         _CONTAINER_SET)]
        refs = [weakref.ref(function) for function in made]
        del made
        _builder._COMPILED.clear()
        assert [ref() for ref in refs] == [None, None, None]
    finally:
        gc.enable()


def test_compiled_code_is_bounded_by_the_modules_it_covers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache was bounded by entries only, and each entry grows with its structure: 280 deep networks
    of an architecture search (600 to 1400 modules each) held 1.5 GB of generated code."""
    from nytorch import _builder
    from nytorch._walk import Layout

    monkeypatch.setattr(_builder, "_COMPILED", {})
    monkeypatch.setattr(_builder, "_MODULES", [0])
    monkeypatch.setattr(_builder, "MAX_MODULES", 100)
    layouts = [Layout(nn.Sequential(*[nn.Linear(2, 2) for _ in range(depth)])) for depth in (30, 40, 20, 60)]
    gathers = [_builder.compile_gather(layout.children, layout.param_slots, layout.buffer_slots) for layout in layouts]
    covered = [len(key[1]) for key in _builder._COMPILED]  # a key: ("gather", children, ...)
    # each tree is its root and its layers: 31, 41, 21 and 61 modules; the oldest went first, to stay within 100
    assert covered == [21, 61] and _builder._MODULES == [82]
    for layout, gather in zip(layouts, gathers):  # what was compiled still reads its tree
        assert gather(layout.modules) == (layout.params, layout.buffers)
    again = _builder.compile_gather(layouts[3].children, layouts[3].param_slots, layouts[3].buffer_slots)
    assert again is gathers[3]  # still remembered: not compiled again


def test_compiled_gather_reads_what_a_walk_reads_and_refuses_any_change() -> None:
    """The remembered layout holds no tensor: its compiled code reads them from the tree, tied ones once."""
    from nytorch._builder import compile_gather
    from nytorch._walk import Layout

    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 2))
    model[2].weight = model[0].weight  # tied
    model[1].register_parameter("unused", None)
    layout = Layout(model)
    gather = compile_gather(layout.children, layout.param_slots, layout.buffer_slots)
    params, buffers = gather(layout.modules)
    assert [id(p) for p in params] == [id(p) for p in layout.params] and len(params) == 5  # the tied weight once
    assert [id(b) for b in buffers] == [id(b) for b in layout.buffers] and len(buffers) == 3
    changes = [
        lambda m: setattr(m[2], "weight", nn.Parameter(m[0].weight.detach().clone())),  # untied
        lambda m: m.register_buffer("extra", torch.zeros(1)),  # a new entry
        lambda m: m.__setitem__(1, nn.BatchNorm1d(2)),  # another child object
        lambda m: m[1].register_parameter("unused", nn.Parameter(torch.ones(1))),  # None replaced
    ]
    for change in changes:
        changed = copy.deepcopy(model)
        reference = Layout(changed)
        assert gather(reference.modules) == (reference.params, reference.buffers)  # before: as a walk reads
        change(changed)
        assert gather(reference.modules) is None
