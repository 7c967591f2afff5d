"""Copies of nytorch's objects: ``copy.copy``, ``copy.deepcopy``, ``pickle``, ``torch.save`` of whole
objects and ``torch.multiprocessing`` (spawn).

Every copy is compared with a reference computed with plain per-tensor torch on the original's
values: the copy holds the same values and ``ParamConfig``s, is independent of the original
(``copy.copy`` excepted: shallow, as for ``nn.Module``), and its arithmetic, in-place operators
included, gives the per-tensor answer whether or not its parameters are still views of one buffer.
"""
from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import nytorch as nyto
from nytorch import merge

Tensor = torch.Tensor


class Net(nyto.NytoModule):
    """Two dtypes, a BatchNorm (floating and integer buffers) and an integer buffer of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.b = nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.randn(3, dtype=torch.float64))
        self.register_buffer("steps", torch.tensor(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.relu(self.norm(self.a(x))))


def _plain() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _torch_save(obj: Any) -> Any:
    file = io.BytesIO()
    torch.save(obj, file)
    file.seek(0)
    return torch.load(file, weights_only=False)


DEEP: dict[str, Callable[[Any], Any]] = {
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
    "deepcopy": copy.deepcopy,
    "torch.save": _torch_save,
}


def _values(model: nn.Module) -> dict[str, Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _configs(model: nyto.NytoModule) -> dict[str, tuple[bool, bool, object]]:
    """Every parameter's config by name (param ids are indices into ``named_parameters()``)."""
    names = [name for name, _ in model.named_parameters()]
    found: dict[str, tuple[bool, bool, object]] = {}
    model.apply_param_config(lambda i, c: found.setdefault(names[i], (c.operational, c.clone, getattr(c, "tag", None))))
    return found


def _configured() -> Net:
    net = Net()
    net.set_param_config(operational=False, clone=False, name="a.bias")
    net.apply_param_config(lambda i, c: setattr(c, "tag", "kept"), name="a.bias")
    return net


# -- NytoModules: fresh, packed, and results not read yet ------------------------------------------
SOURCES: dict[str, Callable[[Net], Net]] = {
    "fresh": lambda net: net,
    "packed result, built": lambda net: _built(net + 0),
    "pending result": lambda net: net * 1,
    "pending scaled sum": lambda net: 0.5 * (net + net),
}


def _built(result: Net) -> Net:
    _ = result.a  # first touch builds it
    return result


@pytest.mark.parametrize("way", list(DEEP))
@pytest.mark.parametrize("source", list(SOURCES))
def test_deep_copies_of_nytomodules_are_independent_with_values_and_configs(way: str, source: str) -> None:
    torch.manual_seed(0)
    original = SOURCES[source](_configured())
    copied = DEEP[way](original)
    values = _values(original)  # after the copy: touching a pending result is what copying does too
    assert type(copied) is Net and copied is not original
    assert _values(copied).keys() == values.keys()
    for name, value in _values(copied).items():
        assert torch.equal(value, values[name]) and value.dtype == values[name].dtype, name
    assert _configs(copied) == _configs(original)
    assert _configs(copied)["a.bias"] == (False, False, "kept")
    result = copied + 1  # a.bias is not operational and clone=False: the very same Parameter
    for name, value in result.named_parameters():
        expected = values[name] if name == "a.bias" else values[name] + 1
        assert torch.equal(value, expected), name
    assert result.a.bias is copied.a.bias
    copied += 2
    copied.set_param_config(operational=True, name="a.bias")
    for name, value in original.state_dict().items():  # the original saw none of it
        assert torch.equal(value, values[name]), name
    assert _configs(original)["a.bias"] == (False, False, "kept")
    for name, value in copied.named_parameters():
        assert torch.equal(value, values[name] if name == "a.bias" else values[name] + 2), name


def test_copy_copy_of_a_nytomodule_is_shallow_like_nn_module() -> None:
    # ``copy.copy`` of an nn.Module shares its tables and Parameters: so does a NytoModule's
    plain, net = nn.Linear(2, 2), _built(Net() + 0)
    assert copy.copy(plain).weight is plain.weight
    shallow = copy.copy(net)
    assert shallow.a.weight is net.a.weight and shallow.scale is net.scale
    before = net.a.weight.detach().clone()
    shallow += 1
    assert torch.equal(net.a.weight, before + 1)


def test_copy_copy_of_a_pending_result_is_the_built_model() -> None:
    a, b = Net(), Net()
    expected = {name: value.detach() + b.get_parameter(name).detach() for name, value in a.named_parameters()}
    shallow = copy.copy(a + b)
    for name, value in shallow.named_parameters():
        assert torch.equal(value, expected[name]), name


# -- Particles -----------------------------------------------------------------------------------
@pytest.mark.parametrize("way", list(DEEP))
def test_a_copied_particle_result_whose_leaves_were_read_keeps_its_in_place_writes(way: str) -> None:
    """``pickle`` gave the leaf views and the flat buffers storages of their own: ``+=`` wrote the buffers only."""
    torch.manual_seed(0)
    model = _plain()
    result = nyto.particle(model) + 1
    expected = {name: value.clone() for name, value in result.params.items()}  # the views are out now
    copied = DEEP[way](result)
    copied += 1
    copied *= 3
    for name, value in copied.params.items():
        assert torch.equal(value, (expected[name] + 1) * 3), name
    rebuilt = copied.module()
    for name, value in rebuilt.named_parameters():
        assert torch.equal(value, (expected[name] + 1) * 3), name
    for name, value in result.params.items():
        assert torch.equal(value, expected[name]), name


def test_a_pickled_particle_result_is_no_larger_once_its_leaves_were_read() -> None:
    """Each leaf view pickled the whole result buffer: 8 leaves, 8 more copies of it."""
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
    result = nyto.particle(model) + 1  # one buffer (the model travels with it too)
    unread = len(pickle.dumps(result))
    values = {name: value.clone() for name, value in result.params.items()}
    assert len(pickle.dumps(result)) <= unread * 1.02
    copied = pickle.loads(pickle.dumps(result))
    for name, value in copied.params.items():
        assert torch.equal(value, values[name]), name


@pytest.mark.parametrize("way", list(DEEP))
def test_a_copied_particle_of_a_model_views_the_copied_model(way: str) -> None:
    torch.manual_seed(0)
    model = _plain()
    particle = nyto.particle(model)
    particle += 0  # its flat buffers found (their addresses recorded)
    values = _values(model)
    copied = DEEP[way](particle)
    copied += 1
    twice = copied * 2
    inner = copied._layout.modules[0]  # the copy of the model that travelled with it
    for name, value in copied.params.items():
        assert torch.equal(value, values[name] + 1), name
        assert torch.equal(inner.get_parameter(name), values[name] + 1), name
        assert torch.equal(twice.params[name], (values[name] + 1) * 2), name
    assert all(torch.equal(value, values[name]) for name, value in model.state_dict().items())


@pytest.mark.parametrize("way", list(DEEP))
def test_copies_of_pending_factors_keep_their_values(way: str) -> None:
    torch.manual_seed(0)
    model = _plain()
    base = {name: value.detach() + 1 for name, value in model.named_parameters()}
    summed = nyto.particle(model) + 1
    half = 0.5 * summed  # shares summed's buffers, the factor not applied yet
    summed2, half2 = DEEP[way]((summed, half))
    summed2 += 1
    alone = DEEP[way](0.5 * (nyto.particle(model) + 1))
    mixed = alone + summed
    for name in base:
        assert torch.equal(summed2.params[name], base[name] + 1), name
        assert torch.equal(half2.params[name], 0.5 * base[name]), name
        assert torch.equal(mixed.params[name], 0.5 * base[name] + base[name]), name
        assert torch.equal(half.params[name], 0.5 * base[name]), name


# -- Swarms --------------------------------------------------------------------------------------
@pytest.mark.parametrize("way", list(DEEP))
def test_a_copied_swarm_whose_params_were_read_keeps_views_of_its_buffers(way: str) -> None:
    """``pickle`` copied the cached leaf views on their own: ``+=`` and writes through ``params`` were lost."""
    torch.manual_seed(0)
    swarm = nyto.Swarm.stack([_plain() for _ in range(3)])
    values = {name: value.clone() for name, value in swarm.params.items()}  # the views are cached now
    copied = DEEP[way](swarm)
    copied += 1
    for name, value in copied.params.items():
        assert torch.equal(value, values[name] + 1), name
    copied.params["0.weight"].mul_(2)  # a write through a view reaches the buffers arithmetic reads
    assert torch.equal((copied * 1).params["0.weight"], (values["0.weight"] + 1) * 2)
    assert torch.equal(copied[1].params["2.bias"], values["2.bias"][1] + 1)
    for name, value in swarm.params.items():
        assert torch.equal(value, values[name]), name


@pytest.mark.parametrize("way", list(DEEP))
def test_a_copied_swarm_in_training_keeps_requires_grad_and_gradients(way: str) -> None:
    """A copy's ``params`` views keep ``requires_grad`` (and ``.grad``) and still view its buffers: an optimizer trains it."""
    torch.manual_seed(0)
    swarm = nyto.Swarm.stack([nn.Linear(3, 2) for _ in range(3)])
    params = [view.requires_grad_() for view in swarm.params.values()]
    x = torch.randn(4, 3)
    swarm(x).sum().backward()
    grads = [param.grad.clone() for param in params]
    values = {name: value.detach().clone() for name, value in swarm.params.items()}
    copied = DEEP[way](swarm)
    views = list(copied.params.values())
    assert all(view.requires_grad for view in views)
    if way == "deepcopy":  # as torch's deepcopy of a tensor (its pickling leaves ``.grad`` out; ours keeps it)
        assert all(torch.equal(view.grad, grad) for view, grad in zip(views, grads))
    for view, grad in zip(views, grads):
        view.grad = grad.clone()
    torch.optim.SGD(views, lr=0.5).step()  # in place, into the copy's buffers
    for (name, value), grad in zip(values.items(), grads):
        assert torch.equal((copied * 1).params[name], value - 0.5 * grad), name
        assert torch.equal(swarm.params[name].detach(), value), name


def test_a_pickled_swarm_holds_its_buffers_once() -> None:
    swarm = nyto.Swarm.stack([nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)]) for _ in range(4)])
    _ = swarm.params
    payload = sum(flat.numel() * flat.element_size() for flat in swarm._flats)
    assert len(pickle.dumps(swarm)) < 1.2 * payload  # not once more per cached view (8 of them)


# -- merge.EMA -----------------------------------------------------------------------------------
@pytest.mark.parametrize("way", list(DEEP))
@pytest.mark.parametrize("together", [True, False], ids=["with its model", "alone"])
def test_a_copied_ema_updates_its_own_average_from_its_own_model(way: str, together: bool) -> None:
    torch.manual_seed(0)
    model = _plain()
    ema = merge.EMA(model, decay=0.5)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1)
    average = _values(ema.averaged)
    copied = DEEP[way]((model, ema))[1] if together else DEEP[way](ema)
    online = _values(copied._model)
    copied.update()
    for name, value in copied.averaged.state_dict().items():
        expected = 0.5 * average[name] + 0.5 * online[name] if value.is_floating_point() else online[name]
        assert torch.allclose(value, expected, rtol=0, atol=1e-7), name
    assert all(torch.equal(value, average[name]) for name, value in ema.averaged.state_dict().items())
    # and it updates as the original does, one buffer (deepcopy and pickle gave each tensor its own storage)
    assert len({param.untyped_storage().data_ptr() for param in copied.averaged.parameters()}) == 1
    assert len({param.untyped_storage().data_ptr() for param in copied._model.parameters()}) == 1


@pytest.mark.parametrize("way", list(DEEP))
@pytest.mark.parametrize("schedule", ["warmup_decay", "power_decay"])
def test_an_ema_with_a_decay_schedule_copies_and_pickles(way: str, schedule: str) -> None:
    """The schedules were closures: ``pickle`` / ``torch.save`` of such an EMA raised "Can't pickle local object"."""
    torch.manual_seed(0)
    model = _plain()
    decay = getattr(merge, schedule)(0.9)
    ema = merge.EMA(model, decay=decay)
    ema.update()  # step 1 next
    copied = DEEP[way](ema)
    expected_decay = {"warmup_decay": min(0.9, 2.0 / 11.0), "power_decay": min(0.9, 1.0 - 2.0 ** (-2 / 3))}[schedule]
    assert copied._schedule(1) == pytest.approx(expected_decay, abs=0) and copied.step == 1
    average = _values(copied.averaged)
    with torch.no_grad():
        for param in copied._model.parameters():
            param.add_(1)
    online = _values(copied._model)
    copied.update()
    for name, value in copied.averaged.state_dict().items():
        if value.is_floating_point():
            reference = torch.lerp(average[name], online[name], 1 - expected_decay)
            assert torch.allclose(value, reference, rtol=0, atol=1e-6), name


# -- state_dict round trips and file sizes --------------------------------------------------------
def test_state_dict_round_trips_between_packed_and_unpacked_models() -> None:
    torch.manual_seed(0)
    packed, other = _plain(), _plain()
    nyto.flatten_(packed)
    weight = packed[0].weight
    packed.load_state_dict(other.state_dict())  # into a packed model: copied into its buffer
    assert packed[0].weight is weight and nyto.particle(packed, pack=False)._flat_form() is not None
    assert all(torch.equal(value, other.state_dict()[name]) for name, value in packed.state_dict().items())
    fresh = _plain()
    fresh.load_state_dict(_torch_save(packed.state_dict()))
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, other.state_dict()[name]), name
    result = nyto.particle(fresh) + nyto.particle(packed)
    for name, value in result.params.items():
        assert torch.equal(value, 2 * other.get_parameter(name).detach()), name


def test_torch_save_of_a_packed_model_writes_its_buffer_once() -> None:
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(5)])
    size = len(_bytes(model))
    nyto.particle(model)
    assert len(_bytes(model)) <= size and len(_bytes(model.state_dict())) <= size
    loaded = _torch_save(model)  # still views of one storage: packed as it was
    assert len({param.untyped_storage().data_ptr() for param in loaded.parameters()}) == 1
    values = _values(model)
    result = nyto.particle(loaded) * 3
    for name, value in result.params.items():
        assert torch.equal(value, values[name] * 3), name


def _bytes(obj: object) -> bytes:
    file = io.BytesIO()
    torch.save(obj, file)
    return file.getvalue()


# -- torch.multiprocessing (spawn pickles the arguments; CPU tensors go through shared memory) -----
def _child(queue: Any, objects: dict[str, Any]) -> None:
    out: dict[str, Any] = {}
    for name, obj in objects.items():
        if isinstance(obj, nyto.NytoModule):
            out[name] = ([p.detach().clone() for p in obj.parameters()], [p.detach().clone() for p in (obj + 1).parameters()])
        elif isinstance(obj, nn.Module):
            particle = nyto.particle(obj)
            particle += 1  # in place: shared memory, the parent sees it (as torch's own writes)
            out[name] = [p.detach().clone() for p in obj.parameters()]
        elif isinstance(obj, merge.EMA):
            obj.update()  # from its model, a copy that travelled with it
            out[name] = (_values(obj._model), _values(obj.averaged))
        elif name == "of a model":
            obj += 1  # views the model that travelled with it, in shared memory
            out[name] = {k: v.clone() for k, v in obj.params.items()}
        else:
            out[name] = ({k: v.clone() for k, v in obj.params.items()}, {k: v.clone() for k, v in (obj * 2).params.items()})
    queue.put(pickle.dumps(out))  # plain bytes: nothing left for the parent to fetch from this process


def test_spawned_processes_get_working_copies() -> None:
    torch.manual_seed(0)
    a, b = Net(), Net()
    pending = a + b
    expected = [p.detach().clone() for p in (a + b).parameters()]
    plain = _plain()
    nyto.particle(plain)
    before = [p.detach().clone() for p in plain.parameters()]
    read = nyto.particle(_plain()) + 1
    _ = read.params
    swarm = nyto.Swarm.stack([_plain(), _plain()])
    _ = swarm.params
    scaled = 0.5 * (nyto.particle(_plain()) + 1)
    online = _plain()
    ema = merge.EMA(online, decay=0.5)
    with torch.no_grad():
        for param in online.parameters():
            param.add_(1)
    average = _values(ema.averaged)
    viewed = _plain()
    of_model = nyto.particle(viewed)
    of_model += 0  # its flat buffers found at this process's addresses
    viewed_before = _values(viewed)
    objects = {"pending": pending, "plain": plain, "read": read, "swarm": swarm, "scaled": scaled, "ema": ema,
               "of a model": of_model}
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, objects))
    process.start()
    try:
        out = pickle.loads(queue.get(timeout=120))
    finally:
        process.join(60)
    assert process.exitcode == 0
    values, plus = out["pending"]
    assert all(torch.equal(x, y) for x, y in zip(values, expected))
    assert all(torch.equal(x, y + 1) for x, y in zip(plus, expected))
    assert all(torch.equal(x, y + 1) for x, y in zip(out["plain"], before))
    assert all(torch.equal(p.detach(), y + 1) for p, y in zip(plain.parameters(), before))
    model_values, averaged = out["ema"]
    for name, value in averaged.items():
        expected = 0.5 * average[name] + 0.5 * model_values[name] if value.is_floating_point() else model_values[name]
        assert torch.allclose(value, expected, rtol=0, atol=1e-7), name
    for name, value in out["of a model"].items():
        assert torch.equal(value, viewed_before[name] + 1), name
        assert torch.equal(viewed.get_parameter(name), viewed_before[name] + 1), name  # shared memory
    for name in ("read", "swarm", "scaled"):
        params, doubled = out[name]
        original = objects[name].params
        assert params.keys() == original.keys()
        for key, value in original.items():
            assert torch.equal(params[key], value) and torch.equal(doubled[key], 2 * value), (name, key)
    assert torch.equal((nyto.particle(plain) + 1).params["0.weight"], plain[0].weight.detach() + 1)


def test_a_pickled_result_carries_its_own_values_and_not_its_sources() -> None:
    import io
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 - registers torch's reductions for ForkingPickler

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(300, 300), nn.BatchNorm1d(300))
    net[1].running_mean.fill_(3.0)
    result = nyto.particle(net) * 2
    saved, own = io.BytesIO(), io.BytesIO()
    torch.save(result, saved)
    torch.save(result.module(), own)
    assert len(saved.getvalue()) < 1.1 * len(own.getvalue())  # not also the source's 360 KB of parameters
    ForkingPickler.dumps(nyto.particle(net) * 2)  # what a multiprocessing Queue does with it
    assert not net[0].weight.is_shared()  # the source's parameters stay where they were
    copied = pickle.loads(pickle.dumps(result))
    x = torch.randn(5, 300)
    torch.testing.assert_close(copied.module().eval()(x), result.module().eval()(x), rtol=0, atol=0)
    assert torch.equal(copied.module()[1].running_mean, torch.full((300,), 3.0))


def test_a_result_whose_template_deepcopy_refuses_pickles_as_before() -> None:
    with pytest.warns(FutureWarning):
        net = torch.nn.utils.weight_norm(nn.Linear(3, 4))  # holds a computed weight deepcopy refuses
    result = nyto.particle(net) * 2
    copied = pickle.loads(pickle.dumps(result))
    torch.testing.assert_close(copied.params["weight_v"], result.params["weight_v"], rtol=0, atol=0)
