"""Issue 6 re-checked from the outside: no leaks, nothing mutated on error, crash-safe checkpoints.

Complements ``test_long_runs.py``, ``test_bad_input.py`` and ``test_checkpoint*.py`` with cases
they do not cover: objects freed by reference counting alone (``gc.disable()`` and weak references
to objects *and to storages*) after transforms, failures and packing; failures that only the LAST
parameter of a mixed-dtype model triggers; the EMA, ``update_bn`` and ``load(like=...)`` on bad
input; and saves interrupted at each stage of the write (SIGKILL, Ctrl-C, a full disk).
Values are compared with plain per-tensor torch, bit for bit.
"""
from __future__ import annotations

import errno
import gc
import gzip
import io
import os
import pickle
import signal
import weakref
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nytorch
import nytorch.functional as nf
from nytorch import CheckpointError, DeviceMismatchError, NytoModule, Particle, StructureError, Swarm
from nytorch import algorithms as alg
from nytorch import merge

Tensor = torch.Tensor


# -- sample models: three dtypes, the float16 group last ---------------------------------------------
def _layers(module: nn.Module) -> None:
    module.a = nn.Linear(3, 4)
    module.bn = nn.BatchNorm1d(4)
    module.b = nn.Linear(4, 4).double()
    module.c = nn.Linear(4, 2).half()


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        _layers(self)


class NMixed(NytoModule):
    def __init__(self) -> None:
        super().__init__()
        _layers(self)


class Net(NytoModule):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, width)
        self.bn = nn.BatchNorm1d(width)
        self.fc2 = nn.Linear(width, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def _last_differs(make: Callable[[], nn.Module], how: str) -> nn.Module:
    """A model of ``make``'s structure except its last parameter ``c.bias``."""
    model = make()
    bias = model.c.bias.detach()
    model.c.bias = nn.Parameter({"dtype": bias.float(), "shape": torch.zeros(3, dtype=bias.dtype),
                                 "device": bias.to("meta")}[how])
    return model


# -- snapshots --------------------------------------------------------------------------------------
def _named(obj: Any) -> list[tuple[str, Tensor]]:
    if isinstance(obj, nn.Module):
        return list(obj.named_parameters()) + list(obj.named_buffers())
    if isinstance(obj, Particle):
        return list(zip(obj._names, obj._leaves))
    if isinstance(obj, Swarm):
        return list(obj.params.items()) + list(obj.buffers.items())
    if isinstance(obj, dict):
        return [(str(k), v) for k, v in obj.items() if isinstance(v, Tensor)]
    return [("tensor", obj)]


def _snapshot(*objs: Any, versions: bool = True) -> list[Any]:
    return [[(name, id(t), t._version if versions else None, t.dtype, tuple(t.shape),
              None if t.is_meta else t.detach().clone()) for name, t in _named(obj)] for obj in objs]


def _assert_unchanged(before: list[Any], *objs: Any, versions: bool = True) -> None:
    after = _snapshot(*objs, versions=versions)
    for old, new in zip(before, after, strict=True):
        assert [row[:5] for row in new] == [row[:5] for row in old], "tensors replaced, written or reshaped"
        for row_old, row_new in zip(old, new):
            if row_old[5] is not None:
                assert torch.equal(row_old[5], row_new[5]), row_old[0]


@contextmanager
def _no_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _storage(t: Tensor) -> "weakref.ref[Any]":
    return weakref.ref(t.untyped_storage())


# == (1) leaks: freed by reference counting alone ======================================================
def _scenario_results() -> list[Any]:
    a, b = Net(), Net()
    built = a + b
    refs = [weakref.ref(a), weakref.ref(b), weakref.ref(built), _storage(built.fc1.weight), _storage(a.fc1.weight)]
    pending = 0.9 * (a - b) + a  # never touched: its buffer may go to the result pool, the object must die
    refs.append(weakref.ref(pending))
    return refs


def _scenario_particles() -> list[Any]:
    model = _mlp()
    p = nytorch.particle(model)
    q = (p + 1) * 0.5
    module = q.module()
    bound = nf.bind(model, nf.clone(nf.params(model)))
    p.lerp_(q, 0.25)
    q.copy_to(model)
    return [weakref.ref(x) for x in (model, p, q, module, bound)] + [_storage(module[0].weight),
                                                                     _storage(bound[0].weight)]


def _scenario_product() -> list[Any]:
    net = Net()
    net.set_param_config(operational=False, name="fc1")
    product = net.product(buffers=True)
    net.product_(net.product() * 2)
    clone = net.clone_from(net + 1)
    return [weakref.ref(x) for x in (net, product, clone)] + [_storage(net.fc2.weight), _storage(clone.fc2.weight)]


def _scenario_swarm() -> list[Any]:
    swarm = Swarm.normal(Net(), 4, std=0.1)
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    out = swarm(x)
    stepped, losses = alg.sgd_step(swarm, lambda member, x, y: F.cross_entropy(member(x), y), x, y, lr=0.1)
    state = alg.pso_init(stepped, losses)
    moved, state = alg.pso_step(stepped, losses, state)
    swarm[0] = moved[1]
    swarm += 1
    return [weakref.ref(x) for x in (swarm, stepped, moved, state.velocity)] + [
        _storage(out), _storage(losses)] + [_storage(t) for t in swarm.params.values()]


def _scenario_ema() -> list[Any]:
    model = Net()
    ema = merge.EMA(model, decay=merge.warmup_decay(0.9))
    ema.update()
    with ema.swap():
        pass
    refs = [weakref.ref(model), weakref.ref(ema), weakref.ref(ema.averaged), _storage(model.fc1.weight),
            _storage(ema.averaged.fc1.weight)]
    del model  # the EMA keeps its model (like an optimizer its parameters) ...
    ema.update()
    ema.load_state_dict(ema.state_dict())
    return refs  # ... and both die with it


def _scenario_transforms() -> list[Any]:
    model = _mlp()
    params, x = nf.params(model), torch.randn(5, 3)
    noise = nf.randn_like(params)

    def loss(w: Tensor) -> Tensor:
        return nf.call(model, nf.lerp(params, noise, w), x).sum()

    grad = torch.func.grad(loss)(torch.tensor(0.3))
    grads = torch.func.vmap(torch.func.grad(loss))(torch.tensor([0.1, 0.2]))
    jac = torch.func.jacrev(lambda q: nf.norm(nf.mul(q, 2.0)))(params)
    _, tangent = torch.func.jvp(lambda w: nf.dot(nf.mul(params, w), noise), (torch.tensor(1.0),), (torch.tensor(1.0),))
    return [weakref.ref(model), _storage(grad), _storage(grads), _storage(tangent)] + [
        _storage(t) for t in (*params.values(), *noise.values(), *jac.values())]


SCENARIOS = {"results": _scenario_results, "particles": _scenario_particles, "product": _scenario_product,
             "swarm": _scenario_swarm, "ema": _scenario_ema, "transforms": _scenario_transforms}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_dead_objects_and_their_storage_are_freed_without_the_collector(name: str) -> None:
    SCENARIOS[name]()  # warm up: torch imports and caches on first use (its own one-off cycles)
    with _no_collector():
        for _ in range(3):
            refs = SCENARIOS[name]()
            alive = [i for i, ref in enumerate(refs) if ref() is not None]
            assert not alive, f"{name}: objects {alive} outlived their last reference"


def _failing_operations() -> dict[str, Callable[[Any], Any]]:
    """Operations that raise part way (the last parameter differs); each gets the operands dict."""
    return {
        "particle +=": lambda o: o["p"].__iadd__(o["wrong_p"]),
        "particle lerp_": lambda o: o["p"].lerp_(o["wrong_p"], 0.5),
        "copy_to": lambda o: nytorch.particle(Mixed()).copy_to(o["wrong"]),
        "nyto +": lambda o: o["net"] + o["wrong_net"],
        "nyto +=": lambda o: o["net"].__iadd__(o["wrong_net"]),
        "clone_from": lambda o: o["net"].clone_from(o["wrong_net"]),
        "product_": lambda o: o["net"].product_(o["wrong_net"].product()),
        "swarm +=": lambda o: o["swarm"].__iadd__(o["wrong"]),
        "swarm[i] =": lambda o: o["swarm"].__setitem__(1, o["wrong"]),
        "stack": lambda o: Swarm.stack([o["model"], o["wrong"]]),
        "ema_": lambda o: merge.ema_(o["model"], o["wrong"], decay=0.5),
        "EMA.update": lambda o: o["ema"].update(o["wrong"]),
        "nf.add": lambda o: nf.add(nf.params(o["model"]), nf.params(o["wrong"])),
        "scalar": lambda o: o["p"] * 10 ** 400,
        "load": lambda o: nytorch.load(o["path"], like={"model": o["wrong"]}),
        "save": lambda o: nytorch.save({"model": o["model"], "bad": object()}, o["path"]),
    }


def test_exceptions_raised_part_way_leave_nothing_alive(tmp_path: Path) -> None:
    """After the exception is handled, its traceback's frames hold no operand in a cycle."""
    path = tmp_path / "m.pt"
    nytorch.save({"model": Mixed()}, path)

    def operands() -> dict[str, Any]:
        model, net = Mixed(), NMixed()
        wrong, wrong_net = _last_differs(Mixed, "dtype"), _last_differs(NMixed, "shape")
        return {"model": model, "wrong": wrong, "net": net, "wrong_net": wrong_net, "p": nytorch.particle(model),
                "wrong_p": nytorch.particle(wrong), "swarm": Swarm.stack([Mixed(), Mixed()]),
                "ema": merge.EMA(Mixed()), "path": path}

    for name, operation in _failing_operations().items():
        with _no_collector():
            given = operands()
            refs = {key: weakref.ref(value) for key, value in given.items() if key != "path"}
            refs.update({f"{key} storage": _storage(value.c.weight) for key, value in given.items()
                         if isinstance(value, nn.Module)})
            try:
                operation(given)
            except (TypeError, ValueError, OverflowError):  # StructureError and CheckpointError included
                pass
            else:  # pragma: no cover - every operation above must raise
                raise AssertionError(f"{name} did not raise")
            del given
            alive = sorted(key for key, ref in refs.items() if ref() is not None)
            assert not alive, f"{name}: {alive} kept alive after the exception was handled"


class _FullDisk(io.FileIO):
    """A file with 100 bytes of room: the next write fails with ENOSPC."""

    def write(self, data: Any) -> int:
        if self.tell() + memoryview(data).nbytes > 100:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


class _DiesWriting(io.FileIO):
    """A file whose writer is SIGKILLed in the middle of a write."""

    def write(self, data: Any) -> int:
        super().write(bytes(memoryview(data)[: max(1, memoryview(data).nbytes // 2)]))
        os.kill(os.getpid(), signal.SIGKILL)
        return 0  # pragma: no cover - never reached


class _Interrupted(io.FileIO):
    """A file whose third write is interrupted by Ctrl-C (SIGINT lands inside ``write``)."""

    writes = 0

    def write(self, data: Any) -> int:
        self.writes += 1
        if self.writes == 3:
            raise KeyboardInterrupt
        return super().write(data)


def _writes_into(monkeypatch: pytest.MonkeyPatch, kind: type[io.FileIO]) -> None:
    real = os.fdopen

    def fdopen(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if mode != "wb":
            return real(fd, mode, *args, **kwargs)
        return io.BufferedWriter(kind(fd, "wb"), buffer_size=64)

    monkeypatch.setattr(os, "fdopen", fdopen)


def test_a_failed_save_keeps_no_cycle_holding_what_was_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's writer raised inside its ``__exit__`` and the recorded error kept the frames: a cycle holding ``obj``."""
    _writes_into(monkeypatch, _FullDisk)

    def attempt() -> "weakref.ref[Any]":
        big = torch.randn(50_000)
        ref = _storage(big)
        with pytest.raises(OSError, match=r"^\[Errno 28\] save: cannot write"):
            nytorch.save({"w": big}, tmp_path / "full.pt")
        return ref

    attempt()
    with _no_collector():
        assert attempt()() is None, "the saved tensors outlived a failed save"


def test_packed_buffer_lives_exactly_as_long_as_a_view_of_it() -> None:
    with _no_collector():
        model = nn.Sequential(nn.Linear(300, 300), nn.Linear(300, 300))  # > the result pool's minimum
        particle = nytorch.particle(model)
        buffer = _storage(model[0].weight)
        address = model[0].weight.untyped_storage().data_ptr()
        assert all(t.untyped_storage().data_ptr() == address for t in model.parameters()), "not packed"
        view = particle.params["1.bias"]
        expected = view.clone()
        del model, particle
        junk = [nytorch.particle(nn.Sequential(nn.Linear(300, 300), nn.Linear(300, 300))) + 1 for _ in range(3)]
        assert buffer() is not None and torch.equal(view, expected)  # the view keeps it, values intact
        del view, junk
        assert buffer() is None  # and nothing else does
        net = Net(300)
        result = net + 1
        kept = _storage(result.fc1.weight)
        del net, result
        assert kept() is None


def test_bounded_caches_stay_bounded_over_many_structures() -> None:
    from nytorch import _builder, _flat, _pool, _walk

    with _no_collector():
        for width in range(1, 300):
            p = nytorch.particle(nn.Linear(width, 2))
            (p + 1).module()
            p.lerp_(p * 0.5, 0.5)
            net = Net(width)
            (net + net).fc1.weight  # builds (and, the second time round, compiles) a structure
            (net * 2).fc1.weight
    assert len(_flat._PLANS) <= 256 and len(_builder._COMPILED) <= 512 and len(_walk._INTERNED) <= 1024
    assert _pool.held_bytes() <= _pool.POOL_BYTES


# == (2) nothing mutated on error ======================================================================
@pytest.mark.parametrize("how, error, message", [
    # (a Swarm's leaves have the member count in front: shape (3, 2))
    ("dtype", StructureError, r"parameter 'c.bias' differs: shape \((3, 2|2,)\) float16 vs shape \((3, 2|2,)\) float32"),
    ("shape", StructureError, r"parameter 'c.bias' differs: shape \((3, 2|2,)\) float16 vs shape \((3, 3|3,)\) float16"),
    ("device", DeviceMismatchError, r"parameter 'c.bias' is on cpu in the first operand and on meta"),
])
@pytest.mark.parametrize("form", ["particle", "particle pack=False", "NytoModule", "Swarm"])
def test_a_difference_in_the_last_parameter_changes_nothing(form: str, how: str, error: type[Exception],
                                                            message: str) -> None:
    make: Callable[[], nn.Module] = NMixed if form == "NytoModule" else Mixed
    model = make()
    target: Any = {"particle": lambda: nytorch.particle(model), "NytoModule": lambda: model,
                   "particle pack=False": lambda: nytorch.particle(model, pack=False),
                   "Swarm": lambda: Swarm.stack([model, make(), make()])}[form]()
    other = _last_differs(make, how)
    operands: list[Any] = [other] if form == "Swarm" else [other, nytorch.particle(other, pack=False)]
    actions: list[Callable[[Any], Any]] = [lambda o: target.__iadd__(o), lambda o: target.__imul__(o),
                                           lambda o: target.lerp_(o, 0.5), lambda o: target.__ipow__(o)]
    if form == "Swarm":
        actions += [lambda o: target.__setitem__(2, o), lambda o: target.__setitem__([0, 2], o),
                    lambda o: merge.ema_(target, Swarm.stack([o, o, o]), decay=0.5)]
    elif form == "NytoModule":
        actions += [lambda o: model.clone_from(o if isinstance(o, nn.Module) else o.module()),
                    lambda o: model.product_(o if isinstance(o, Particle) else o.product())]
    else:
        actions += [lambda o: nytorch.particle(o).copy_to(model) if isinstance(o, nn.Module) else o.copy_to(model),
                    lambda o: merge.ema_(target, nytorch.particle(o, pack=False) if isinstance(o, nn.Module) else o,
                                         decay=0.5)]
    before = _snapshot(model, target, other)
    for operand in operands:
        for action in actions:
            with pytest.raises(error, match=message if how != "device" else r"'c\.(bias|weight)' .*meta"):
                action(operand)
            _assert_unchanged(before, model, target, other)


def test_swarm_item_assignment_checks_every_index_and_member_first() -> None:
    swarm = Swarm.stack([Mixed() for _ in range(3)])
    before = _snapshot(swarm)
    cases: list[tuple[Any, Any, type[Exception], str]] = [
        ([0, 3], Mixed(), IndexError, r"index 3 is out of range for a swarm of 3 members"),
        ([0, 1, 2], Swarm.stack([Mixed(), Mixed()]), StructureError, r"expected a swarm of 3 members \(or 1\)"),
        ([0, 1, 2], Swarm.stack([Mixed() for _ in range(3)]).to("meta"), DeviceMismatchError, r"on meta"),
        (0, _last_differs(Mixed, "dtype"), StructureError, r"'c\.bias' differs"),
        (0, [Mixed()], TypeError, r"expected a Mixed, a Particle or a Swarm of one, or a number, got list"),
        (0, 10 ** 400, OverflowError, r"does not fit in 64 bits"),
        (0, torch.tensor(1.0, device="meta"), DeviceMismatchError, r"the scalar operand is on meta"),
    ]
    for key, value, error, message in cases:
        with pytest.raises(error, match=message):
            swarm[key] = value
        _assert_unchanged(before, swarm)
    odd = Mixed()
    odd.bn.running_var = torch.ones(4, dtype=torch.float64)  # a buffer differs (buffers are assigned too)
    with pytest.raises(StructureError, match=r"'bn\.running_var' differs: shape \(4,\) float32 vs shape \(4,\) "
                                             r"float64"):
        swarm[1] = odd
    _assert_unchanged(before, swarm)


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("bad", ["meta", "sparse"])
def test_ema_load_state_dict_refuses_values_it_cannot_copy_before_writing(pack: bool, bad: str) -> None:
    """A meta or sparse value in the last entry failed inside ``copy_`` after the others were written."""
    torch.manual_seed(0)
    ema = merge.EMA(Net(), decay=0.5, pack=pack)
    ema.update()
    saved = {name: value + 1 for name, value in ema.state_dict()["averaged"].items()}
    saved["fc2.bias"] = {"meta": torch.zeros(2, device="meta"), "sparse": torch.zeros(2).to_sparse()}[bad]
    before = _snapshot(ema.averaged)
    shown = "a meta tensor" if bad == "meta" else "a torch.sparse_coo tensor"
    with pytest.raises(ValueError, match=rf"^EMA\.load_state_dict: expected a dense tensor with values for parameter "
                                         rf"'fc2\.bias' \(shape \(2,\) float32 on cpu\), got {shown}"):
        ema.load_state_dict({"step": 7, "averaged": saved})
    _assert_unchanged(before, ema.averaged)
    assert ema.step == 1


@pytest.mark.parametrize("pack", [True, False])
def test_ema_update_notices_a_copied_buffer_given_storage_of_another_shape(pack: bool) -> None:
    """Integer buffers are copied after the lerp: one swapped via ``.data`` failed half-way through."""
    torch.manual_seed(0)
    model = Net()
    ema = merge.EMA(model, decay=0.5, pack=pack)
    model.bn.num_batches_tracked.data = torch.tensor([1, 2])
    before = _snapshot(ema.averaged)
    with pytest.raises(StructureError, match=r"^EMA\.update: parameter 'bn\.num_batches_tracked' differs: shape \(\) "
                                             r"int64 vs shape \(2,\) int64 in model"):
        ema.update()
    _assert_unchanged(before, ema.averaged)
    assert ema.step == 0
    model.bn.num_batches_tracked.data = torch.tensor(5)  # same shape again: updates as usual
    expected = {name: torch.lerp(avg, live, 0.5) if avg.is_floating_point() else live.clone()
                for (name, avg), live in zip(ema.averaged.state_dict().items(), model.state_dict().values())}
    ema.update()
    for name, value in ema.averaged.state_dict().items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.parametrize("pack", [True, False])
def test_ema_update_notices_a_middle_parameter_given_storage_of_another_shape(pack: bool) -> None:
    """With ``pack=False`` only the ends were watched: a middle ``.data`` swap failed inside the kernel."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    ema = merge.EMA(model, decay=0.5, pack=pack)
    model[1].bias.data = torch.zeros(5)
    before = _snapshot(ema.averaged)
    with pytest.raises(StructureError, match=r"^EMA\.update: parameter '1\.bias' differs: shape \(4,\) float32 "
                                             r"vs shape \(5,\) float32 in model"):
        ema.update()
    _assert_unchanged(before, ema.averaged)
    assert ema.step == 0


def test_update_bn_puts_the_statistics_back_when_the_loader_or_model_raises() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 4),
                          nn.InstanceNorm1d(4, affine=True, track_running_stats=True))
    model.train()
    for _ in range(3):
        model[1](torch.randn(8, 4))
    model.eval()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    objects = [id(buffer) for buffer in model.buffers()]

    def failing_loader() -> Iterator[Tensor]:
        yield torch.randn(8, 3)
        yield torch.randn(8, 3)
        raise RuntimeError("disk error")

    first_two = nn.Sequential(model[0], model[1])
    for loader, error, message in ((failing_loader(), RuntimeError, "disk error"),
                                   ([torch.randn(8, 3), torch.randn(8, 5)], RuntimeError, "shapes cannot be multiplied"),
                                   ([{"x": torch.randn(8, 3)}, {"y": 1}], TypeError, r"^update_bn: a dict batch")):
        with pytest.raises(error, match=message):
            merge.update_bn(first_two, loader)
        for name, value in model.state_dict().items():
            assert torch.equal(value, before[name]), name
        assert [id(buffer) for buffer in model.buffers()] == objects
        assert not model.training and model[1].momentum == 0.1
    data = [torch.randn(8, 3) for _ in range(3)]
    merge.update_bn(first_two, data)  # and a pass that succeeds gives the exact statistics
    hidden = torch.cat([model[0](x) for x in data]).detach()
    assert torch.allclose(model[1].running_mean, hidden.mean(0), atol=1e-6)
    assert int(model[1].num_batches_tracked) == 3


def test_load_never_modifies_or_aliases_like(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "s.pt"
    net = Net()
    state = {"net": net, "swarm": Swarm.normal(net, 3, std=0.1), "p": nytorch.particle(nn.Linear(2, 2)),
             "t": torch.randn(3), "list": [torch.ones(2)], "g": torch.Generator().manual_seed(1), "step": 1}
    nytorch.save(state, path)
    like = {"net": Net(), "swarm": Swarm.normal(Net(), 3, std=0.1), "p": nytorch.particle(nn.Linear(2, 2)),
            "t": torch.zeros(3), "list": [torch.zeros(2)], "g": torch.Generator().manual_seed(5), "step": 0}
    tensors = [like["net"], like["swarm"], like["p"], like["t"], like["list"][0]]
    generator = like["g"].get_state().clone()
    before = _snapshot(*tensors)
    bad = dict(like, step="x")  # the last entry differs: everything before it was already restored
    with pytest.raises(StructureError, match=r"^load \(at 'step'\): like is a str"):
        nytorch.load(path, like=bad)
    _assert_unchanged(before, *tensors)
    loaded = nytorch.load(path, like=like)
    _assert_unchanged(before, *tensors)
    assert torch.equal(like["g"].get_state(), generator) and loaded["g"] is not like["g"]
    assert torch.equal(loaded["g"].get_state(), state["g"].get_state())
    mine = {t.untyped_storage().data_ptr() for obj in tensors for _, t in _named(obj)}
    for key in ("net", "swarm", "p", "t"):
        for name, value in _named(loaded[key]):
            assert value.untyped_storage().data_ptr() not in mine, f"{key}/{name} aliases like"
            assert torch.equal(value, dict(_named(state[key]))[name]), f"{key}/{name}"


def test_algorithms_refuse_bad_input_before_drawing_random_numbers() -> None:
    torch.manual_seed(0)
    swarm = Swarm.normal(_mlp(), 4, std=0.1)
    state = alg.pso_init(swarm, torch.arange(4.0))
    other = alg.pso_init(Swarm.normal(_mlp(), 3, std=0.1), torch.arange(3.0))
    generator = torch.Generator().manual_seed(0)
    rng, drawn = torch.get_rng_state(), generator.get_state()
    before = _snapshot(swarm, state.velocity, state.best, state.best_loss)
    for call, error, message in (
            (lambda: alg.pso_step(swarm, torch.arange(3.0), state, generator=generator), ValueError,
             r"^pso_step: expected losses of shape \(4,\)"),
            (lambda: alg.pso_step(swarm, torch.arange(4.0), other, generator=generator), ValueError,
             r"^pso_step: the state tracks 3 members but the swarm has 4"),
            (lambda: alg.apso(swarm, 9, alpha=0.1, beta=0.1, generator=generator), IndexError, r"^apso: best=9"),
            (lambda: alg.truncation_selection(swarm, torch.arange(4.0), survivors=9, sigma=0.1, generator=generator),
             ValueError, r"^truncation_selection: expected survivors in \[1, 4\]"),
            (lambda: alg.pull_toward_best(swarm, torch.arange(4.0), subset=0, alpha=0.5, generator=generator),
             ValueError, r"^pull_toward_best: expected subset in \[1, 4\]")):
        with pytest.raises(error, match=message):
            call()
        _assert_unchanged(before, swarm, state.velocity, state.best, state.best_loss)
        assert torch.equal(torch.get_rng_state(), rng) and torch.equal(generator.get_state(), drawn)


# == (3) crash-safe checkpoints ========================================================================
def test_ctrl_c_inside_a_write_comes_out_as_keyboard_interrupt(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's zip writer turned it into ``RuntimeError: [enforce fail ...] unexpected pos``."""
    path = tmp_path / "run.pt"
    nytorch.save({"w": torch.zeros(1000), "step": 1}, path)
    crc = torch.serialization.get_crc32_options()
    _writes_into(monkeypatch, _Interrupted)
    with pytest.raises(KeyboardInterrupt):
        nytorch.save({"w": torch.ones(1000), "step": 2}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["run.pt"]
    state = nytorch.load(path, like={"w": torch.ones(1000), "step": 0})
    assert state["step"] == 1 and torch.equal(state["w"], torch.zeros(1000))
    assert torch.serialization.get_crc32_options() == crc


@pytest.mark.parametrize("stage", ["write", "fsync", "replace", "after replace"])
def test_sigkill_at_each_stage_of_a_save_leaves_old_or_new_whole(tmp_path: Path, stage: str) -> None:
    """A child process kills itself at one stage of ``save``: the file is the old one or the new one."""
    path = tmp_path / "run.pt"
    like = {"model": nytorch.particle(nn.Linear(50, 40)), "step": 0}
    old = nn.Linear(50, 40)
    nytorch.save({"model": nytorch.particle(old), "step": 1}, path)
    new = nn.Linear(50, 40)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            die = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
            real_replace, real_fdopen = os.replace, os.fdopen
            if stage == "write":
                os.fdopen = lambda fd, mode="r", *args, **kwargs: (  # type: ignore[assignment]
                    io.BufferedWriter(_DiesWriting(fd, "wb")) if mode == "wb" else real_fdopen(fd, mode, *args))
            elif stage == "fsync":
                os.fsync = die
            elif stage == "replace":
                os.replace = die
            else:
                os.replace = lambda src, dst: (real_replace(src, dst), die())  # type: ignore[assignment]
            nytorch.save({"model": nytorch.particle(new), "step": 2}, path)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    state = nytorch.load(path, like=like)
    expected = {1: old, 2: new}[state["step"]]
    assert state["step"] == (2 if stage == "after replace" else 1)
    for name, value in state["model"].params.items():
        assert torch.equal(value, dict(expected.named_parameters())[name]), name
    temps = [name for name in os.listdir(tmp_path) if name != "run.pt"]
    assert all(name.startswith(".run.pt.") and name.endswith(".tmp") for name in temps), temps
    nytorch.save({"model": nytorch.particle(new), "step": 3}, path)  # the next save replaces it as usual
    assert nytorch.load(path, like=like)["step"] == 3


@pytest.mark.parametrize("location, error, message", [
    ("bogus", ValueError, r"^load: expected a device of this machine as map_location, got 'bogus'"),
    (5, TypeError, r"^load: expected a device \(a str or torch\.device\) as map_location, got int"),
    pytest.param("cuda", ValueError, r"^load: expected a device of this machine as map_location, got 'cuda'",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_a_bad_map_location_is_named_not_blamed_on_the_file(tmp_path: Path, location: Any,
                                                              error: type[Exception], message: str) -> None:
    path = tmp_path / "run.pt"
    nytorch.save({"w": torch.ones(3)}, path)
    with pytest.raises(error, match=message):
        nytorch.load(path, map_location=location)
    assert torch.equal(nytorch.load(path, map_location="cpu:0")["w"], torch.ones(3))  # the file is fine
    assert nytorch.load(path, map_location=torch.device("meta"))["w"].is_meta


def _zip_of_other_things() -> bytes:
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as archive:
        archive.writestr("notes.txt", "hello")
    return data.getvalue()


@pytest.mark.parametrize("content", [b"\0" * 1000, b"hello world\n", gzip.compress(b"abc"), b"PK\x03\x04",
                                     _zip_of_other_things(), pickle.dumps({"format": "nytorch.checkpoint"})],
                         ids=["zeros", "text", "gzip", "zip header only", "zip of other files", "raw pickle"])
def test_files_of_other_kinds_are_checkpoint_errors_naming_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "other.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"^load: '.*other\.pt' is not a readable checkpoint "
                                              r"\(truncated or corrupt\?\): "):
        nytorch.load(path, like={"w": torch.ones(3)})


def _hybrid_state(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    swarm = Swarm.normal(nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)), 6, std=0.5)
    ema = merge.EMA(swarm, decay=merge.warmup_decay(0.9))
    return {"swarm": swarm, "ema": ema, "generator": torch.Generator().manual_seed(seed), "step": 0}


def _hybrid_steps(state: dict[str, Any], until: int) -> None:
    loss = lambda member, x, y: F.cross_entropy(member(x), y)  # noqa: E731
    while state["step"] < until:
        x = torch.randn(16, 3)  # the global generator: its state must travel in the checkpoint
        y = (x.sum(1) > 0).long()
        swarm, _ = alg.hybrid_step(state["swarm"], loss, x, y, step=state["step"], lr=0.2, every=2, subset=2,
                                   alpha=0.5, generator=state["generator"])
        state["ema"].update(swarm)
        state["swarm"] = swarm
        state["step"] += 1


def test_resume_of_a_hybrid_run_with_an_ema_and_generators_is_bitwise(tmp_path: Path) -> None:
    straight = _hybrid_state(3)
    _hybrid_steps(straight, 9)

    first = _hybrid_state(3)
    _hybrid_steps(first, 4)
    nytorch.save({"swarm": first["swarm"], "ema": first["ema"].state_dict(), "generator": first["generator"],
                  "step": first["step"], "rng": nytorch.get_rng_state()}, tmp_path / "run.pt")
    del first
    torch.manual_seed(999)  # disturb: the checkpoint must carry every generator
    resumed = _hybrid_state(77)
    template = {"swarm": resumed["swarm"], "ema": resumed["ema"].state_dict(), "generator": resumed["generator"],
                "step": 0, "rng": nytorch.get_rng_state()}
    loaded = nytorch.load(tmp_path / "run.pt", like=template)
    resumed["ema"].load_state_dict(loaded["ema"])
    resumed.update(swarm=loaded["swarm"], generator=loaded["generator"], step=loaded["step"])
    nytorch.set_rng_state(loaded["rng"])
    _hybrid_steps(resumed, 9)

    for name, value in straight["swarm"].params.items():
        assert torch.equal(resumed["swarm"].params[name], value), name
    for name, value in straight["ema"].averaged.params.items():
        assert torch.equal(resumed["ema"].averaged.params[name], value), name
    assert resumed["ema"].step == straight["ema"].step == 9
    assert torch.equal(resumed["generator"].get_state(), straight["generator"].get_state())
