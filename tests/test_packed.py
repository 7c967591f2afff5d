"""Packed models (``nytorch/_packed.py``, ``_packing.pack_``): one buffer per dtype, same answers as per tensor."""
from __future__ import annotations

import copy
import gc
import pickle
import threading
import types
import weakref
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nytorch
import nytorch.functional as nf
from nytorch import _kernels, _packed
from nytorch._packing import flatten_, pack_
from nytorch._walk import PENDING, realized


class Net(nytorch.NytoModule):
    def __init__(self, lstm: bool = False) -> None:
        super().__init__()
        self.layer1 = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.layer2 = nn.Linear(4, 2)
        self.scale64 = nn.Parameter(torch.randn(3, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(7))
        if lstm:
            self.rnn = nn.LSTM(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(torch.relu(self.norm(self.layer1(x))))


def _consecutive(tensors: list[torch.Tensor]) -> bool:
    base = tensors[0].untyped_storage().data_ptr()
    offset = tensors[0].storage_offset()
    for tensor in tensors:
        if tensor.untyped_storage().data_ptr() != base or tensor.storage_offset() != offset:
            return False
        offset += tensor.numel()
    return True


def _float32(model: nn.Module) -> list[torch.Tensor]:
    """Floating float32 parameters then float32 buffers: the packing order."""
    return ([p for p in model.parameters() if p.dtype == torch.float32]
            + [b for b in model.buffers() if b.dtype == torch.float32])


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- pack_ ----------------------------------------------------------------------------------
def test_pack_moves_parameters_then_buffers_into_one_buffer_per_dtype() -> None:
    torch.manual_seed(0)
    net = Net()
    before, objects = _snapshot(net), [id(p) for p in net.parameters()]
    assert pack_(net)
    assert _consecutive(_float32(net))
    assert [id(p) for p in net.parameters()] == objects  # optimizers holding them keep working
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert net.count.dtype == torch.int64 and net.count.item() == 7
    pointer = net.layer1.weight.data_ptr()
    assert pack_(net) and net.layer1.weight.data_ptr() == pointer  # already packed: nothing copied


def test_packed_model_still_trains_and_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    plain, packed = Net(), Net()
    packed.load_state_dict(plain.state_dict())
    pack_(packed)
    x = torch.randn(5, 3)
    for model in (plain, packed):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            optimizer.zero_grad()
            model(x).square().sum().backward()
            optimizer.step()
    for (name, a), b in zip(plain.state_dict().items(), packed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert _consecutive(_float32(packed))  # the optimizer wrote into the buffer


@pytest.mark.parametrize("case", ["lstm", "lazy", "channels_last", "shared memory"])
def test_pack_leaves_models_it_would_change_alone(case: str) -> None:
    if case == "lstm":
        model: nn.Module = nn.Sequential(nn.Linear(2, 2), nn.LSTM(2, 2))
    elif case == "lazy":
        model = nn.Sequential(nn.LazyLinear(2), nn.Linear(2, 2))
    elif case == "channels_last":
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)).to(memory_format=torch.channels_last)
    else:
        model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        model[1].weight.data = model[0].weight.data  # two Parameters, one memory: packing would untie them
    pointers = [p.data_ptr() for p in model.parameters() if not isinstance(p, nn.parameter.UninitializedParameter)]
    assert pack_(model) is False
    assert [p.data_ptr() for p in model.parameters()
            if not isinstance(p, nn.parameter.UninitializedParameter)] == pointers
    with pytest.raises(ValueError, match="flatten_: cannot pack the parameters of this Sequential: "):
        flatten_(model)


def _qat_model() -> nn.Module:
    """A QAT-prepared model: its observers and fake-quantize modules ``resize_`` their buffers in forward."""
    import warnings

    import torch.ao.quantization as tq

    torch.manual_seed(0)
    model = nn.Sequential(tq.QuantStub(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), tq.DeQuantStub())
    model.qconfig = tq.get_default_qat_qconfig("fbgemm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        return tq.prepare_qat(model.train(), inplace=False)


@pytest.mark.parametrize("how", ["particle", "EMA", "ema_", "particle with buffers", "result"])
def test_qat_models_are_left_unpacked_and_run_as_their_copies_do(how: str) -> None:
    model = _qat_model()
    reference = copy.deepcopy(model)
    pointers = [t.data_ptr() for t in [*model.parameters(), *model.buffers()]]
    if how == "particle":
        nytorch.particle(model)
    elif how == "EMA":
        nytorch.merge.EMA(model)
    elif how == "ema_":
        # (buffers="copy": an unobserved observer's min_val is inf, and lerp(inf, inf, w) is nan)
        nytorch.merge.ema_(model, copy.deepcopy(model), decay=0.5, buffers="copy")
    elif how == "particle with buffers":
        nytorch.particle(model, buffers=True) * 1
    else:  # a result run in place of its operand
        model = (nytorch.particle(model, buffers=True) * 1).module()
    if how != "result":
        assert [t.data_ptr() for t in [*model.parameters(), *model.buffers()]] == pointers
    x = torch.randn(5, 4)
    for _ in range(3):  # the first forward resizes the observers' buffers; later ones read them
        expected = reference(x)
        assert torch.equal(model(x), expected)
    for (name, value), other in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(value, other), name


def test_flatten_refuses_a_qat_model_naming_the_observer() -> None:
    model = _qat_model()
    pointers = [t.data_ptr() for t in [*model.parameters(), *model.buffers()]]
    with pytest.raises(ValueError, match=r"flatten_: cannot pack the parameters of this Sequential: submodule "
                                         r"'0\.activation_post_process' \(FusedMovingAvgObsFakeQuantize\) is a "
                                         r"torch\.ao\.quantization observer or fake-quantize module, which resizes "
                                         r"its buffers in place \(resize_\)"):
        flatten_(model)
    assert [t.data_ptr() for t in [*model.parameters(), *model.buffers()]] == pointers
    with pytest.raises(ValueError, match=r"submodule '1' \(LSTM\): RNN modules manage their own flat weight buffer"):
        flatten_(nn.Sequential(nn.Linear(2, 2), nn.LSTM(2, 2)))


def test_tied_weights_stay_tied() -> None:
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5))
    model[1].weight = model[0].weight
    assert pack_(model)
    assert model[1].weight is model[0].weight
    assert model[1].bias.data_ptr() == model[0].weight.data_ptr() + 15 * 4


# -- particle(model, pack=...) ------------------------------------------------------------------
def test_particle_packs_by_default_and_pack_false_leaves_storage_alone() -> None:
    model, other = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)), nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    pointers = [p.data_ptr() for p in other.parameters()]
    nytorch.particle(model)
    nytorch.particle(other, pack=False)
    assert _consecutive(list(model.parameters()))
    assert [p.data_ptr() for p in other.parameters()] == pointers


def test_tensors_taken_before_packing_stop_sharing_memory() -> None:
    """Documented: ``nf.params(model)`` taken before ``particle(model)`` keeps the old storage."""
    model = nn.Linear(2, 1)
    early = nf.params(model)
    p = nytorch.particle(model)
    p += 1
    assert not torch.equal(early["bias"], model.bias)
    assert torch.equal(nf.params(model)["bias"], model.bias)


# -- NytoModule on the packed path ---------------------------------------------------------
def test_results_are_born_packed_and_remembered() -> None:
    torch.manual_seed(0)
    a, b = Net(), Net()
    _ = a + b  # the first operation on a model takes the per-tensor path, then packs it
    assert _packed.packed(a, pack=False) is not None and _packed.packed(b, pack=False) is not None
    result = 0.9 * (a - b) + a
    assert _consecutive([p for p in result.parameters() if p.dtype == torch.float32])
    assert _packed.known(result)
    expected = {name: 0.9 * (x - y) + x for (name, x), y in zip(a.named_parameters(), b.parameters())}
    for name, value in result.named_parameters():
        assert torch.allclose(value, expected[name], rtol=1e-6, atol=1e-7), name
    assert torch.equal(result.count, a.count) and result.count is not a.count
    assert all(p.requires_grad and p.is_leaf for p in result.parameters())


def test_packed_and_unpacked_models_give_the_same_values() -> None:
    torch.manual_seed(0)
    a, b = Net(lstm=True), Net(lstm=True)  # an LSTM inside: never packed, the per-leaf path
    c, d = Net(), Net()
    c.load_state_dict(a.state_dict(), strict=False)
    d.load_state_dict(b.state_dict(), strict=False)
    slow, fast = a * 2 - b / 4 + 1, c * 2 - d / 4 + 1
    assert not _packed.known(a)
    for name, value in fast.named_parameters():
        assert torch.equal(value, slow.get_parameter(name)), name


def test_seeded_randn_is_the_same_packed_or_not() -> None:
    model, unpacked = Net(), nytorch.particle(Net(), pack=False)
    torch.manual_seed(3)
    reference = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    torch.manual_seed(3)
    packed = model.randn()
    torch.manual_seed(3)
    from_particle = unpacked.randn().params
    for name, value in packed.named_parameters():
        assert torch.equal(value, reference[name]), name
        assert torch.equal(from_particle[name], reference[name]), name


def test_a_swapped_parameter_is_noticed_and_packed_again() -> None:
    a, b = Net(), Net()
    _ = a + b  # packs both
    with torch.no_grad():
        a.layer2.bias.data = torch.full((2,), 5.0)  # leaves the buffer
    result = a + b
    assert torch.equal(result.layer2.bias, 5.0 + b.layer2.bias)
    assert _consecutive(_float32(a))


def test_a_replaced_submodule_is_noticed() -> None:
    a, b = Net(), Net()
    _ = a + b
    a.layer2 = nn.Linear(4, 2)
    with torch.no_grad():
        a.layer2.weight.fill_(1.0)
    result = a + b
    assert torch.equal(result.layer2.weight, 1.0 + b.layer2.weight)


def test_in_place_keeps_parameter_objects() -> None:
    a, b = Net(), Net()
    objects, expected = [id(p) for p in a.parameters()], [x + 2 * y for x, y in zip(a.parameters(), b.parameters())]
    a += b * 2
    assert [id(p) for p in a.parameters()] == objects
    for value, want in zip(a.parameters(), expected):
        assert torch.allclose(value, want)


def test_non_operational_parameters_are_carried_on_the_packed_path() -> None:
    a, b = Net(), Net()
    a.set_param_config(operational=False, name="layer1")
    result = a + b
    assert torch.equal(result.layer1.weight, a.layer1.weight) and result.layer1.weight is not a.layer1.weight
    assert torch.equal(result.layer2.weight, a.layer2.weight + b.layer2.weight)


def test_results_die_without_the_garbage_collector() -> None:
    a, b = Net(), Net()
    gc.collect()
    gc.disable()
    try:
        result = a + b
        _ = result + a  # the result is remembered as packed and used once more
        ref = weakref.ref(result)
        del result, _
        assert ref() is None
    finally:
        gc.enable()


def test_packed_helpers_answer_none_off_the_path() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.LSTM(2, 2))
    assert _packed.packed(model) is None
    assert _packed.binary(model, nytorch._leafwise.ADD, [1.0]) is None
    assert _packed.binary_(model, nytorch._leafwise.ADD, [1.0]) is False


def test_a_lazy_model_is_refused_with_its_parameter_named() -> None:
    with pytest.raises(ValueError, match=r"particle: parameter '0.weight' is not initialised yet"):
        nytorch.particle(nn.Sequential(nn.LazyLinear(2)))


def test_large_cpu_results_come_in_runs_of_at_most_chunk_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    from nytorch import _flat
    monkeypatch.setattr(_flat, "CHUNK_BYTES", 64)  # 16 float32 values per run
    a, b = Net(), Net()
    _ = a + b  # packs a and b
    result = realized(a + b)  # built on first touch, then remembered as packed
    flat = _packed.known(result)
    assert len(flat.buffers) > 2 and all(buffer.numel() * 4 <= 64 or len(index) == 1
                                          for buffer, index in zip(flat.buffers, flat.plan.groups))
    for name, value in result.named_parameters():
        assert torch.equal(value, a.get_parameter(name) + b.get_parameter(name)), name
    assert pack_(result, whole=True) and _consecutive(_float32(result))  # collectives want one run


class Plain(nytorch.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))


def test_runs_of_a_result_count_as_packed(monkeypatch: pytest.MonkeyPatch) -> None:
    from nytorch import _flat
    monkeypatch.setattr(_flat, "CHUNK_BYTES", 64)
    a, b = Plain(), Plain()
    _ = a + b
    result = a + b
    pointers = [p.data_ptr() for p in result.parameters()]
    assert pack_(result) and [p.data_ptr() for p in result.parameters()] == pointers  # nothing copied


@pytest.mark.parametrize("bad", ["text", [1.0], 1j])
def test_an_operation_that_raises_leaves_storage_alone(bad: object) -> None:
    a, b = Net(), nn.Linear(2, 1)
    pointers = [t.data_ptr() for t in a.state_dict().values()]
    with pytest.raises(TypeError):
        _ = a + bad
    with pytest.raises(TypeError):
        a += bad
    with pytest.raises(TypeError):
        _ = nytorch.particle(b, pack=False) + a  # another class: refused before anything moves
    assert [t.data_ptr() for t in a.state_dict().values()] == pointers
    _ = a + 1.0  # succeeds: packed now
    assert _consecutive(_float32(a))


_BAD_WEIGHTS = {"str": ("x", TypeError, r"^lerp: expected a number, a 0-dim tensor"),
                "complex": (1j, TypeError, r"^lerp: the scalar 1j would turn parameter"),
                "1-D tensor": (torch.ones(2), TypeError, r"^lerp: expected a number, a 0-dim tensor"),
                "meta 0-dim tensor": (torch.tensor(0.5, device="meta"), nytorch.DeviceMismatchError,
                                      r"^lerp: the scalar operand is on meta but parameter")}


@pytest.mark.parametrize("weight", list(_BAD_WEIGHTS))
@pytest.mark.parametrize("style", ["Particle.lerp_", "Particle.lerp", "NytoModule.lerp_", "NytoModule.lerp",
                                   "unpacked NytoModule.lerp_"])
def test_a_bad_lerp_weight_is_refused_before_the_end_model_is_packed(style: str, weight: str) -> None:
    value, error, message = _BAD_WEIGHTS[weight]
    torch.manual_seed(0)
    if style.startswith("Particle"):
        a, b = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        start = nytorch.particle(a)  # packs a, not b
    else:
        a, b = Net(), Net()
        if not style.startswith("unpacked"):
            _ = a + 1.0  # packs a, not b
        start = a
    pointers = [(t.data_ptr(), t._version) for t in [*a.state_dict().values(), *b.state_dict().values()]]
    values = [t.detach().clone() for t in [*a.state_dict().values(), *b.state_dict().values()]]
    with pytest.raises(error, match=message):
        if style.endswith("lerp_"):
            start.lerp_(b, value)
        else:
            start.lerp(b, value)
    now = [*a.state_dict().values(), *b.state_dict().values()]
    assert [(t.data_ptr(), t._version) for t in now] == pointers  # b's storage did not move
    assert all(torch.equal(t, v) for t, v in zip(now, values))
    start.lerp_(b, 0.5)  # a good weight goes on as before, and packs b then
    assert _consecutive(_float32(b))


def test_a_particle_packs_a_model_operand_after_the_first_success() -> None:
    online, target = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)), nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    ema = nytorch.particle(target)
    expected = [torch.lerp(t, o, 0.5) for t, o in zip(target.parameters(), online.parameters())]
    ema.lerp_(online, 0.5)
    assert all(torch.allclose(t, e) for t, e in zip(target.parameters(), expected))
    assert _consecutive(list(online.parameters()))  # the next update is one kernel


# -- results build their module tree on first touch ------------------------------------------
def _pending(model: nn.Module) -> bool:
    return PENDING in model.__dict__


def _expected_sum(a: nn.Module, b: nn.Module) -> dict[str, torch.Tensor]:
    return {name: x.detach() + y.detach() for (name, x), y in zip(a.named_parameters(), b.parameters())}


def _warm_pair() -> tuple[Net, Net]:
    torch.manual_seed(0)
    a, b = Net(), Net()
    _ = a + b  # the first operation packs both
    return a, b


def test_a_result_is_an_instance_of_the_class_and_builds_its_tree_on_first_touch() -> None:
    a, b = _warm_pair()
    expected = _expected_sum(a, b)
    result = a + b
    assert _pending(result) and type(result) is Net and isinstance(result, nytorch.NytoModule)
    assert result.training  # any attribute read builds the tree
    assert not _pending(result)
    for name, value in result.named_parameters():
        assert torch.equal(value, expected[name]), name
        assert type(value) is nn.Parameter and value.is_leaf and value.requires_grad
    assert _consecutive([p for p in result.parameters() if p.dtype == torch.float32])  # views of the output
    assert torch.equal(result.count, a.count) and result.count is not a.count


@pytest.mark.parametrize("touch", [
    lambda m: m(torch.randn(5, 3)),
    lambda m: list(m.parameters()),
    lambda m: m.state_dict(),
    lambda m: repr(m),
    lambda m: dir(m),
    lambda m: setattr(m, "tag", 1),
    lambda m: m.layer1,
    lambda m: torch.func.functional_call(m, dict(m.named_parameters()), (torch.randn(5, 3),)),
    lambda m: copy.deepcopy(m),
    lambda m: pickle.loads(pickle.dumps(m)),
    lambda m: nytorch.particle(m),
    # first touched inside torch.func transforms: the tree is built outside them, with plain Parameters
    lambda m: torch.func.grad(lambda t: (m.layer2.weight * t).sum())(torch.tensor(1.0)),
    lambda m: torch.func.jacrev(lambda t: m.layer1.weight * t)(torch.tensor(2.0)),
    lambda m: torch.func.vmap(lambda t: m.layer1.bias * t)(torch.ones(3)),
])
def test_every_way_of_touching_a_result_sees_the_same_model(touch: Callable[[nn.Module], object]) -> None:
    a, b = _warm_pair()
    expected = _expected_sum(a, b)
    result = a + b
    touch(result)
    assert not _pending(result)
    for name, value in result.named_parameters():
        assert torch.equal(value, expected[name]), name
        assert type(value) is nn.Parameter and value.is_leaf
    assert torch.equal((result + 1).layer1.weight, expected["layer1.weight"] + 1)  # and it works on


class _Scaled(nytorch.NytoModule):
    """An instance attribute over a class attribute of the same name."""

    scale = 1.0

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 2)
        self.scale = 5.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) * self.scale


def test_instance_attributes_over_class_ones_are_seen_before_the_tree_is_built() -> None:
    net = _Scaled()
    assert (net + 1).scale == 5.0  # not the class's 1.0
    net.forward = types.MethodType(lambda self, x: torch.zeros(1), net)  # a patched forward
    result = net + 1
    assert result(torch.ones(3, 2)).shape == (1,) and result(torch.ones(3, 2)).shape == (1,)


def test_copies_and_pickles_of_a_result_are_whole_models() -> None:
    a, b = _warm_pair()
    for copied in (copy.deepcopy(a + b), pickle.loads(pickle.dumps(a + b)), copy.copy(a + b)):
        assert not _pending(copied)
        for name, value in copied.named_parameters():
            assert torch.equal(value, a.get_parameter(name) + b.get_parameter(name)), name


def test_a_result_holds_its_operands_state_at_the_time_of_the_operation() -> None:
    a, b = _warm_pair()
    calls: list[str] = []
    a.layer1.register_forward_hook(lambda *_: calls.append("before"))
    values = _expected_sum(a, b)
    buffers = {name: value.clone() for name, value in a.named_buffers()}
    result = a + b
    # after the operation: mode, hooks, requires_grad, attributes, buffers and values of the operand change
    a.eval()
    a.layer2.register_forward_hook(lambda *_: calls.append("after"))
    a.layer2.weight.requires_grad_(False)
    a.layer1.tag = "new"
    a.train()(torch.randn(8, 3))  # a forward in train mode moves BatchNorm's running statistics
    with torch.no_grad():
        a.layer1.weight.add_(100.0)
    a.eval()
    for name, value in result.named_buffers():
        assert torch.equal(value, buffers[name]), name
    for name, value in result.named_parameters():
        assert torch.equal(value, values[name]), name
    assert result.training and all(module.training for module in result.modules())
    assert result.layer2.weight.requires_grad and not hasattr(result.layer1, "tag")
    calls.clear()
    result(torch.randn(5, 3))
    assert calls == ["before"]  # hooks present at the operation are kept, later ones are not


def test_chains_of_operations_on_results_match_the_per_tensor_arithmetic() -> None:
    a, b = _warm_pair()
    intermediate = a - b
    result = 0.9 * intermediate + a
    assert _pending(intermediate) and _pending(result)
    result += 1.0  # in place on a result that is still pending
    clone = result.clone()
    for name, value in result.named_parameters():
        x, y = a.get_parameter(name).detach(), b.get_parameter(name).detach()
        expected = 0.9 * (x - y) + x + 1.0
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(clone.get_parameter(name), value) and clone.get_parameter(name) is not value
    assert _pending(intermediate)  # never needed as a module


def test_a_result_does_not_keep_its_operands_alive() -> None:
    a, b = _warm_pair()
    result = 2.0 * (a + b)
    watch = [weakref.ref(a), weakref.ref(b), weakref.ref(a.layer1.weight)]
    del a, b
    gc.collect()
    assert all(ref() is None for ref in watch)
    assert _pending(result) and result.layer1.weight.shape == (4, 3)


def test_seeded_randn_of_a_result_matches_the_model_it_came_from() -> None:
    a, b = _warm_pair()
    torch.manual_seed(3)
    expected = (a + b).randn()
    torch.manual_seed(3)
    live = realized(a + b).randn()
    for name, value in live.named_parameters():
        assert torch.equal(value, expected.get_parameter(name)), name


def test_threads_touching_one_result_build_it_once() -> None:
    a, b = _warm_pair()
    for _ in range(20):
        result = a + b
        seen: list[object] = []
        threads = [threading.Thread(target=lambda: seen.append(result.layer1.weight)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(seen) == 4 and all(weight is seen[0] for weight in seen)


def test_a_config_changed_after_the_operation_is_honoured_by_the_next_one() -> None:
    a, b = _warm_pair()
    result = a + b
    a.set_param_config(operational=False, name="layer1")  # results share their source's configs
    doubled = 2 * result
    assert torch.equal(doubled.layer1.weight, result.layer1.weight)
    assert torch.equal(doubled.layer2.weight, 2 * result.layer2.weight)


def test_plain_modules_never_see_a_pending_result() -> None:
    net = nn.Linear(2, 1)
    result = _packed.binary(net, nytorch._leafwise.ADD, [net])
    assert result is not None and not _pending(result) and torch.equal(result.weight, 2 * net.weight)


_STEPS = st.lists(st.tuples(st.sampled_from(["add", "sub", "mul", "scale", "iadd", "clone", "touch", "mutate"]),
                            st.floats(-2, 2, allow_nan=False, width=32)), min_size=1, max_size=8)


@settings(max_examples=40, deadline=None)
@given(steps=_STEPS)
def test_any_mix_of_operations_touches_and_operand_changes_matches_eager_arithmetic(
        steps: list[tuple[str, float]]) -> None:
    torch.manual_seed(0)
    a, b = Plain(), Plain()
    _ = a + b  # packed
    value = a * 1.0
    expected = {name: p.detach().clone() for name, p in a.named_parameters()}
    for step, number in steps:
        other = {name: p.detach().clone() for name, p in b.named_parameters()}
        if step == "add":
            value, expected = value + b, {k: v + other[k] for k, v in expected.items()}
        elif step == "sub":
            value, expected = b - value, {k: other[k] - v for k, v in expected.items()}
        elif step == "mul":
            value, expected = value * number, {k: v * number for k, v in expected.items()}
        elif step == "scale":
            value, expected = number * value + value, {k: number * v + v for k, v in expected.items()}
        elif step == "iadd":
            value += number
            expected = {k: v + number for k, v in expected.items()}
        elif step == "clone":
            value = value.clone()
        elif step == "touch":
            assert value.training
        else:  # the operands change after the operations that read them
            with torch.no_grad():
                for p in b.parameters():
                    p.add_(number)
    for name, p in value.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-5)


# -- a product by a number stays pending, and sums with it are one exact pass -----------------------
_EXPRESSIONS = {
    "0.9 * (a - b) + a": lambda a, b: 0.9 * (a - b) + a,
    "a - 0.5 * (b - a)": lambda a, b: a - 0.5 * (b - a),
    "(a - b) * 3 - a": lambda a, b: (a - b) * 3 - a,
    "0.5 * (0.9 * (a - b)) + b": lambda a, b: 0.5 * (0.9 * (a - b)) + b,
    "-(2 * (a + b)) + a": lambda a, b: -(2 * (a + b)) + a,
    "(a + b) * 2": lambda a, b: (a + b) * 2,
}


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("name", list(_EXPRESSIONS))
def test_expressions_are_bitwise_the_per_tensor_arithmetic(name: str, exact: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    if not exact:  # a device whose fused kernel rounds once: no rewrites, same values
        monkeypatch.setattr(_kernels, "exact_fusion", lambda plan: False)
    expression = _EXPRESSIONS[name]
    torch.manual_seed(0)
    a, b = Plain(), Plain()
    _ = a + b
    pa, pb = nytorch.particle(a), nytorch.particle(b)
    tensors = {key: expression(x.detach(), y.detach())
               for (key, x), y in zip(a.named_parameters(), b.parameters())}
    module, particle_value = expression(a, b), expression(pa, pb)
    for key, value in module.named_parameters():
        assert torch.equal(value.detach(), tensors[key]), key
    for key, value in particle_value.params.items():
        assert torch.equal(value, tensors[key]), key


def test_a_pending_product_is_applied_before_anyone_writes_or_views() -> None:
    a, b = _warm_pair()
    difference = a - b
    product = 0.5 * difference  # shares the difference's buffers, factor pending
    expected = {key: 0.5 * value.detach() for key, value in difference.named_parameters()}
    difference += 100.0  # writes into its own copy, not into the product's
    for key, value in product.named_parameters():
        assert torch.equal(value.detach(), expected[key]), key
    model = Plain()
    p = nytorch.particle(model)
    before = {key: value.clone() for key, value in p.params.items()}
    q = p * 2  # a Particle of a live model is never shared: ``p -= 1`` must reach the model
    p -= 1
    for key, value in q.params.items():
        assert torch.equal(value, 2 * before[key]), key
    for key, value in model.named_parameters():
        assert torch.equal(value.detach(), before[key] - 1), key


def test_a_difference_that_is_exactly_zero_is_plus_zero_as_in_per_tensor_arithmetic() -> None:
    a, b = _warm_pair()
    for left, right in ((nytorch.particle(a), nytorch.particle(b)), (a, b)):
        scaled = (left + right) * 2  # the factor stays pending
        settled = (left + right) * 2 + 0.0  # the same values, computed
        zero = scaled - settled
        leaves = zero.params.values() if isinstance(zero, nytorch.Particle) else [
            p.detach() for p in zero.parameters()]
        for leaf in leaves:
            if leaf.is_floating_point():
                assert not torch.signbit(leaf).any() and not leaf.any()


_PROGRAM = st.lists(st.tuples(st.sampled_from(["mul", "add", "sub", "rsub", "neg", "iadd", "imul", "read",
                                               "clone", "sub_from"]),
                              st.sampled_from([0.5, -0.9, 2, 3.0, 0.1])), min_size=1, max_size=10)


@settings(max_examples=60, deadline=None)
@given(program=_PROGRAM)
def test_any_program_on_particles_is_bitwise_the_per_tensor_arithmetic(program: list[tuple[str, float]]) -> None:
    from nytorch import _pool
    minimum, _pool.MIN_BYTES = _pool.MIN_BYTES, 0  # small buffers: let the pool reuse them too
    try:
        _run_program(program)
    finally:
        _pool.MIN_BYTES = minimum
        _pool.clear()


def _run_program(program: list[tuple[str, float]]) -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(64, 64), nn.Linear(64, 64)
    pa, pb = nytorch.particle(a), nytorch.particle(b)
    ta = {k: v.detach().clone() for k, v in a.named_parameters()}
    tb = {k: v.detach().clone() for k, v in b.named_parameters()}
    value, tensors = pa - pb, {k: ta[k] - tb[k] for k in ta}  # a result: its own buffers
    kept = []  # earlier values stay alive and unchanged
    for step, number in program:
        if step == "mul":
            value, tensors = value * number, {k: v * number for k, v in tensors.items()}
        elif step == "add":
            value, tensors = value + pa, {k: v + ta[k] for k, v in tensors.items()}
        elif step == "sub":
            value, tensors = value - pb, {k: v - tb[k] for k, v in tensors.items()}
        elif step == "sub_from":
            value, tensors = pa - value, {k: ta[k] - v for k, v in tensors.items()}
        elif step == "rsub":
            value, tensors = number - value, {k: number - v for k, v in tensors.items()}
        elif step == "neg":
            value, tensors = -value, {k: -v for k, v in tensors.items()}
        elif step == "iadd":
            value += number
            tensors = {k: v + number for k, v in tensors.items()}
        elif step == "imul":
            value *= number
            tensors = {k: v * number for k, v in tensors.items()}
        elif step == "read":
            for k, leaf in value.params.items():
                assert torch.equal(leaf, tensors[k]), k
        else:
            kept.append((value, tensors))
            value, tensors = value.clone(), dict(tensors)
    for held, expected in kept + [(value, tensors)]:
        for k, leaf in held.params.items():
            assert torch.equal(leaf, expected[k]) and torch.equal(torch.signbit(leaf), torch.signbit(expected[k])), k


def test_a_result_s_parameters_have_version_counters_of_their_own():
    """As in any new model: a step on one parameter does not mark the others as modified for autograd."""
    torch.manual_seed(0)
    a, b = Net(), Net()
    result = a + b
    x = torch.randn(5, 4, requires_grad=True)
    loss = result.layer2(x).sum()  # saves layer2.weight
    with torch.no_grad():
        result.layer1.bias.add_(1.0)  # another parameter, as one optimizer of two would
    loss.backward()  # no error: layer2.weight did not change
    loss = result.layer2(x).sum()
    result += 1.0  # this one does write layer2.weight
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


_VERSION_STEPS = st.lists(st.sampled_from(["particle +=", "particle lerp_", "module +=", "one parameter",
                                           "new result", "module of a particle result"]), min_size=1, max_size=8)


@settings(max_examples=100, deadline=None)
@given(_VERSION_STEPS)
def test_version_counters_move_exactly_when_values_are_written(steps):
    """Any program of in-place writes: a Parameter's version counter moves when its values were written
    (autograd then refuses a graph that saved it) and stays when only its siblings were (no false alarm)."""
    torch.manual_seed(0)
    model, other = Net(), Net()
    with torch.no_grad():  # no two parameters alike (BatchNorm starts every model at ones and zeros)
        for param in [*model.parameters(), *other.parameters()]:
            param.add_(torch.rand_like(param) + 0.5)
    for step in steps:
        params = list(model.parameters())
        before = [(p._version, p.detach().clone()) for p in params]
        touched = set(range(len(params)))  # what the step writes; every floating parameter unless said
        if step == "particle +=":
            p = nytorch.particle(model)
            p += 0.5
        elif step == "particle lerp_":
            nytorch.particle(model).lerp_(nytorch.particle(other), 0.25)
        elif step == "module +=":
            same = model
            model += 0.5
            assert model is same
        elif step == "one parameter":
            with torch.no_grad():
                params[1].add_(1.0)
            touched = {1}
        elif step == "new result":
            model = model + other  # a fresh model: nothing to compare in this step
            continue
        else:  # a module made from a Particle result, then written through the Particle
            source = nytorch.particle(model) * 1.0
            model = source.module()
            params = list(model.parameters())
            before = [(p._version, p.detach().clone()) for p in params]
            source += 0.5
        for i, (param, (version, values)) in enumerate(zip(params, before)):
            if not param.is_floating_point():
                continue
            changed = not torch.equal(param.detach(), values)
            assert changed == (i in touched), (step, i)
            assert (param._version != version) == changed, (step, i)


@pytest.mark.parametrize("op", ["+=", "*=", "lerp_"])
@pytest.mark.parametrize("style", ["Particle", "NytoModule"])
def test_in_place_op_with_an_operand_sharing_a_layer_updates_the_shared_parameters(op, style):
    """Packing the operand on first use moves a Parameter both models hold: the write still reaches it."""
    torch.manual_seed(0)
    shared = nn.Linear(2, 2)

    class Net(nytorch.NytoModule):
        def __init__(self) -> None:
            super().__init__()
            self.shared = shared
            self.own = nn.Linear(2, 2)

    first, second = Net(), Net()
    before = {name: value.detach().clone() for name, value in first.named_parameters()}
    other = {name: value.detach().clone() for name, value in second.named_parameters()}
    target = nytorch.particle(first) if style == "Particle" else first
    if op == "+=":
        target += second
        expected = {name: before[name] + other[name] for name in before}
    elif op == "*=":
        target *= second
        expected = {name: before[name] * other[name] for name in before}
    else:
        target.lerp_(second, 0.25)
        expected = {name: torch.lerp(before[name], other[name], 0.25) for name in before}
    expected["shared.weight"] = {"+=": 2 * before["shared.weight"], "*=": before["shared.weight"] ** 2,
                                 "lerp_": before["shared.weight"]}[op]
    expected["shared.bias"] = {"+=": 2 * before["shared.bias"], "*=": before["shared.bias"] ** 2,
                               "lerp_": before["shared.bias"]}[op]
    for name, value in first.named_parameters():
        assert torch.allclose(value, expected[name]), name
    assert torch.equal(second.shared.weight, first.shared.weight)


@pytest.mark.parametrize("style", ["Particle", "NytoModule"])
def test_operators_take_a_scalar_batched_by_vmap(style):
    """Under ``torch.func.vmap`` the packed path steps aside: the per-leaf one batches a scalar operand."""
    class Net(nytorch.NytoModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(2, 2)

    net = Net()
    model = nytorch.particle(net) if style == "Particle" else net

    def weight_sum(scale: torch.Tensor) -> torch.Tensor:
        result = model * scale + model
        return (result.params["layer.weight"] if style == "Particle" else result.layer.weight).sum()

    scales = torch.tensor([1.0, 2.0, -0.5])
    expected = net.layer.weight.detach().sum() * (scales + 1)
    assert torch.allclose(torch.func.vmap(weight_sum)(scales), expected)


def test_particle_made_inside_a_transform_is_left_unpacked():
    """Packing moves storage, which a torch.func transform's tensors do not allow: the model stays as it is."""
    layer = nn.Linear(2, 2)
    weight = layer.weight.detach().clone()
    values = torch.func.vmap(lambda s: (nytorch.particle(layer) * s).params["weight"].sum())(torch.tensor([1.0, 3.0]))
    assert torch.allclose(values, weight.sum() * torch.tensor([1.0, 3.0]))
    assert torch.equal(layer.weight, weight)
    torch.func.grad(lambda s: (nytorch.particle(layer) * s).params["weight"].sum())(torch.tensor(2.0))  # no crash
