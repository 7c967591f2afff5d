"""Global state: threads sharing models and results, torch's global defaults, RNG streams, class-keyed caches.

Every test restores what it changes (torch's default dtype and device, grad mode, the thread
switch interval, patched class attributes) in a fixture or a ``finally``.  References are plain
torch: per-tensor loops over ``named_parameters()``, plain tensor indexing, module forwards.
"""
# mypy: disable-error-code="union-attr, index, operator, arg-type, assignment"
from __future__ import annotations

import random
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import nytorch as nyto
from nytorch import Swarm, merge
from nytorch import _kernels, _packed, _pending
from nytorch import _swarm_fused as fused
from nytorch import algorithms as alg
from nytorch._checkpoint import load, save
from nytorch._walk import PENDING

from conftest import assert_like_loop

Tensor = torch.Tensor


class Net(nyto.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class Traced(nn.Module):
    """A class (not an ``nn.Sequential``) whose forward the swarm traces into its fused path."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _values(model: Any) -> Tensor:
    """Every parameter in ``named_parameters()`` order, flattened (the reference reads torch only)."""
    if isinstance(model, nn.Module):
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return torch.cat([t.reshape(-1) for t in model.params.values()])


def _shifted(model: nn.Module, by: float) -> nn.Module:
    """A plain copy of ``model`` with every parameter plus ``by``, made by ``load_state_dict``."""
    copy = type(model)()
    copy.load_state_dict({name: value + by for name, value in model.state_dict().items()})
    return copy


@pytest.fixture
def racy() -> Iterator[None]:
    """Threads switch as often as CPython allows, so races show within a few hundred rounds."""
    interval = sys.getswitchinterval()
    threads = torch.get_num_threads()
    sys.setswitchinterval(1e-6)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)
        torch.set_num_threads(threads)


@pytest.fixture
def meta_default_device() -> Iterator[None]:
    """``torch.set_default_device("meta")``: what any factory call without a device would land on.

    It stands for ``set_default_device("cuda")`` with models kept on the CPU, on a machine without CUDA.
    """
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def _run_threads(work: Callable[[int], None], count: int) -> list[str]:
    """Run ``work(i)`` in ``count`` threads started together; the tracebacks of those that raised."""
    errors: list[str] = []
    barrier = threading.Barrier(count)

    def run(i: int) -> None:
        try:
            barrier.wait()
            work(i)
        except BaseException:  # surfaced by the caller with its traceback
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return errors


# -- a result shared by threads -------------------------------------------------------------------
def test_arithmetic_on_a_result_another_thread_built_meanwhile() -> None:
    """The interleaving two threads hit: one reads a pending result's layout, the other builds it.

    ``_snapshot`` was then given the pending result's bare layout (no modules) for a model
    no longer pending and raised ``IndexError`` from the compiled capture.
    """
    torch.manual_seed(0)
    base = Net()
    result = base + 1.0
    found = _packed._current(result)  # the first thread: the pending layout and buffers
    assert found is not None and not found[0].modules
    result.fc1  # the second thread touches it: the tree is built
    assert PENDING not in result.__dict__
    layout, flat, configs = found
    out = _pending.pending_result(_pending.snapshot_of(result, layout), configs,
                          _kernels.compute(nyto._leafwise.MUL, flat, [2.0], {}))
    assert torch.equal(_values(out), (_values(base) + 1.0) * 2.0)
    assert type(out) is Net and out(torch.ones(1, 6)).shape == (1, 3)


def test_attribute_lookup_that_raced_with_the_build_finds_the_attribute() -> None:
    """A lookup that failed on the pending result reaches ``__getattr__`` after another thread built it."""
    torch.manual_seed(0)
    result = Net() + 1.0
    result.fc1  # built by "the other thread"
    assert NytoModule_getattr(result, "_parameters") is result.__dict__["_parameters"]
    with pytest.raises(AttributeError, match="'Net' object has no attribute 'nothing'"):
        NytoModule_getattr(result, "nothing")


def NytoModule_getattr(module: nn.Module, name: str) -> Any:  # noqa: N802 - names the method it calls
    return type(module).__getattr__(module, name)


def test_threads_touching_and_combining_one_shared_result(racy: None) -> None:
    """Four threads touch, read and combine one pending result at once: no error, exact values."""
    torch.manual_seed(0)
    base = Net()
    _ = base + 0.0  # packed
    x = torch.linspace(-1, 1, 12).reshape(2, 6)
    ops: list[tuple[str, Callable[[Net, float], Tensor], Callable[[Net, float], Tensor]]] = [
        ("mul", lambda r, c: _values(r * 2.0), lambda ref, c: _values(ref) * 2.0),
        ("add_self", lambda r, c: _values(r + r), lambda ref, c: _values(ref) + _values(ref)),
        ("touch", lambda r, c: _values(r), lambda ref, c: _values(ref)),
        ("particle", lambda r, c: _values(nyto.particle(r) * 3.0), lambda ref, c: _values(ref) * 3.0),
        # merge.average rounds as its own weighted sum: compared with the same call on an unshared copy
        ("average", lambda r, c: _values(merge.average([r, base])),
         lambda ref, c: _values(merge.average([base + c, base]))),
        ("forward", lambda r, c: r(x).detach(), lambda ref, c: ref(x).detach()),
        ("expr", lambda r, c: _values(0.9 * (r - base) + r),
         lambda ref, c: 0.9 * (_values(ref) - _values(base)) + _values(ref)),
    ]
    chooser = random.Random(0)
    for round_ in range(150):
        shift = float(round_ % 5)
        result = base + shift
        reference = _shifted(base, shift)
        chosen = [ops[chooser.randrange(len(ops))] for _ in range(4)]
        outs: list[Any] = [None] * 4

        def work(i: int) -> None:
            outs[i] = chosen[i][1](result, shift)

        errors = _run_threads(work, 4)
        assert not errors, errors[0]
        for (name, _, expected), out in zip(chosen, outs):
            assert torch.equal(out, expected(reference, shift)), (round_, name)


def test_threads_on_shared_read_only_models_match_one_thread(racy: None, tmp_path: Path) -> None:
    """Threads reading shared models (first use packs them) while updating their own: as run one by one."""
    def shared() -> tuple[Net, nn.Sequential, Swarm]:
        torch.manual_seed(100)
        seq = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        swarm = Swarm.stack([nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)) for _ in range(3)])
        return Net(), seq, swarm

    def own(seed: int) -> tuple[Net, nn.Sequential, nn.Sequential]:  # in the main thread: one global RNG stream
        torch.manual_seed(seed)
        return (Net(), nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)),
                nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)))

    def work(models: tuple[Net, nn.Sequential, Swarm], mine: tuple[Net, nn.Sequential, nn.Sequential],
             path: Path) -> list[Tensor]:
        base, seq, swarm = models
        net, target, moving = mine
        particle = nyto.particle(moving)
        x = torch.linspace(-1, 1, 8).reshape(2, 4)
        out: list[Tensor] = []
        for step in range(12):
            r = net * 0.9 + base * 0.1
            net.lerp_(0.5 * (r - base) + net, 0.1)
            merge.ema_(target, seq, decay=0.9)
            particle.lerp_(seq, 0.3)
            if step % 6 == 0:
                save({"net": net, "base": base}, path)
                assert torch.equal(_values(load(path, like={"net": net, "base": base})["base"]), _values(base))
            out += [_values(r), _values(net), _values(target), _values(merge.average([base, net])),
                    swarm(x), (swarm * 0.5 + particle)(x)]
        return out

    seeds = range(4)
    with torch.random.fork_rng():
        reference = {seed: work(shared(), own(seed), tmp_path / f"ref{seed}.pt") for seed in seeds}
        models = shared()
        mine = {seed: own(seed) for seed in seeds}
    got: dict[int, list[Tensor]] = {}
    errors = _run_threads(lambda seed: got.__setitem__(seed, work(models, mine[seed], tmp_path / f"t{seed}.pt")),
                          len(seeds))
    assert not errors, errors[0]
    for seed in seeds:
        for index, (a, b) in enumerate(zip(reference[seed], got[seed])):
            assert torch.equal(a, b), (seed, index)


# -- torch's global defaults ----------------------------------------------------------------------
def test_swarm_forward_first_run_under_inference_mode_on_a_traced_class() -> None:
    """The fused plan of a custom class is traced on first use: inside inference_mode that raised
    "Inference tensors do not track version counter"."""
    torch.manual_seed(0)
    modules = [Traced() for _ in range(3)]
    x = torch.randn(5, 3)
    expected = torch.stack([module(x) for module in modules]).detach()
    for made_inside in (False, True):
        swarm = None if made_inside else Swarm.stack(modules)
        with torch.inference_mode():
            swarm = Swarm.stack(modules) if made_inside else swarm
            out = swarm(x)
        assert_like_loop(out, expected)
        assert swarm._spec.plan is not fused.NO_PLAN and swarm._spec.plan[0][0] == "linear"
        assert_like_loop(swarm(x), expected)  # and outside it afterwards


def test_swarm_index_tensors_ignore_the_default_device(meta_default_device: None) -> None:
    """``swarm[[1, 0]]`` made its index on the default device, as if torch indexed that way; torch reads a
    list index where the tensor is (here the CPU), and so does a swarm now."""
    members = [nn.Linear(2, 1, device="cpu") for _ in range(3)]
    for i, member in enumerate(members):
        nn.init.constant_(member.weight, float(i))
    swarm = Swarm.stack(members)
    stacked = swarm.params["weight"].clone()
    for key in ([2, 0], [], [True, False, True], np.array([1, 2]), range(1, 3)):
        selected = swarm[key]
        assert selected.params["weight"].device.type == "cpu"
        reference = stacked[torch.as_tensor(np.asarray(list(key) if isinstance(key, range) else key), device="cpu")
                            if not isinstance(key, list) or key else torch.zeros(0, dtype=torch.long, device="cpu")]
        assert torch.equal(selected.params["weight"], reference), key
    swarm[[0, 2]] = 5.0
    stacked[torch.tensor([0, 2], device="cpu")] = 5.0
    assert torch.equal(swarm.params["weight"], stacked)


def test_unravel_ignores_the_default_device(meta_default_device: None) -> None:
    net = nn.Linear(3, 2, device="cpu")
    vector, unravel = merge.ravel(net)
    assert vector.device.type == "cpu"
    for given in (vector, vector.numpy(), vector.tolist()):
        back = unravel(given)
        assert back.weight.device.type == "cpu"
        assert torch.equal(back.weight, net.weight) and torch.equal(back.bias, net.bias)


def test_default_dtype_float64_changes_no_value_or_dtype() -> None:
    """Operations on float32 models give bit for bit the same results under ``set_default_dtype(float64)``."""
    def models() -> tuple[Net, Net, Tensor, Tensor]:
        torch.manual_seed(0)
        return Net(), Net(), torch.randn(4, 6), torch.tensor([3.0, 1.0, 2.0])

    def run(a: Net, b: Net, x: Tensor, losses: Tensor) -> list[Tensor]:
        swarm = Swarm.stack([a, b, a])
        generator = torch.Generator().manual_seed(1)
        results = [0.9 * (a - b) + a, a / 3 + b ** 2, merge.average([a, b], weights=[0.25, 0.75]),
                   merge.slerp(a, b, 0.3), merge.ties(a, [b], density=0.5), swarm * torch.tensor([0.1, 0.2, 0.3]),
                   swarm.mean(), torch.softmax(-losses, 0) @ swarm,
                   alg.apso(swarm, 0, alpha=0.1, beta=0.3, generator=generator)]
        return [_values(r) for r in results] + [swarm(x)]

    a, b, x, losses = models()
    expected = run(a, b, x, losses)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = run(a, b, x, losses)
    finally:
        torch.set_default_dtype(previous)
    for index, (e, g) in enumerate(zip(expected, got)):
        assert g.dtype == e.dtype == torch.float32 and torch.equal(g, e), index


# -- random numbers -------------------------------------------------------------------------------
class Mixed(nyto.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 7).half()
        self.s = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
        self.c = nn.Parameter(torch.randn(20, dtype=torch.complex64))
        self.i = nn.Parameter(torch.arange(3), requires_grad=False)
        self.b = nn.Linear(7, 33)
        self.register_buffer("running", torch.ones(17))


@pytest.mark.parametrize("how", ["module", "pending", "flattened", "particle", "particle_unpacked", "buffers"])
def test_seeded_randn_is_the_per_tensor_stream(how: str) -> None:
    """``torch.manual_seed(s)`` then ``randn()``: ``torch.randn_like`` of each tensor in ``named_parameters()``
    order (then buffers), packed or not, whatever the caches hold."""
    torch.manual_seed(0)
    model = Mixed()
    with_buffers = how == "buffers"
    named = list(model.named_parameters()) + (list(model.named_buffers()) if with_buffers else [])
    torch.manual_seed(1)
    expected = [torch.randn_like(t) if t.is_floating_point() or t.is_complex() else t.detach() for _, t in named]
    for _ in range(2):  # a second time: compiled builders and cached layouts in use
        source: Any = {"module": model, "pending": model + 0.0, "flattened": nyto.flatten_(model),
                       "particle": nyto.particle(model), "particle_unpacked": nyto.particle(model, pack=False),
                       "buffers": nyto.particle(model, buffers=True)}[how]
        torch.manual_seed(1)
        out = source.randn()
        got = [p.detach() for p in out.parameters()] if isinstance(out, nn.Module) else list(out.params.values())
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g.dtype == e.dtype and torch.equal(g, e)


def test_generators_leave_the_global_generators_alone() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    swarm = Swarm.stack([nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)) for _ in range(4)])
    losses = torch.tensor([3.0, 1.0, 2.0, 4.0])
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    tuned = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    calls: dict[str, Callable[[torch.Generator], Any]] = {
        "Swarm.randn": lambda g: Swarm.randn(net, 3, generator=g),
        "Swarm.normal": lambda g: Swarm.normal(net, 3, std=0.1, generator=g),
        "pso_step": lambda g: alg.pso_step(swarm, losses, alg.pso_init(swarm, losses), generator=g)[0],
        "apso": lambda g: alg.apso(swarm, 0, alpha=0.1, beta=0.3, generator=g),
        "es_noise": lambda g: alg.es_noise(net, 4, generator=g),
        "truncation_selection": lambda g: alg.truncation_selection(swarm, losses, survivors=2, sigma=0.1, generator=g),
        "hybrid": lambda g: alg.hybrid(swarm, lambda m, x, y: (m(x) - y).pow(2).mean(), [(x, y)] * 4, lr=0.1,
                                       every=2, subset=2, generator=g, show_progress=False)[0],
        "dare": lambda g: nyto.particle(merge.dare(net, [tuned], drop=0.5, generator=g)),
    }
    for name, call in calls.items():
        torch_state, python_state, numpy_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
        first = _values(call(torch.Generator().manual_seed(7)))
        assert torch.equal(torch.get_rng_state(), torch_state), name
        assert random.getstate() == python_state, name
        assert np.random.get_state()[1].tolist() == numpy_state[1].tolist(), name
        assert torch.equal(_values(call(torch.Generator().manual_seed(7))), first), name


# -- caches keyed on structure, class or identity -------------------------------------------------
def test_swarm_forward_follows_a_class_forward_patched_after_its_first_call() -> None:
    """The fused plan was cached per swarm: ``Traced.forward = ...`` afterwards still ran the old forward
    (in that swarm and every swarm derived from it), unlike the modules themselves."""
    torch.manual_seed(0)
    modules = [Traced() for _ in range(3)]
    swarm = Swarm.stack(modules)
    x = torch.randn(5, 3)
    assert torch.allclose(swarm(x), torch.stack([m(x) for m in modules]))
    original = Traced.forward
    Traced.forward = lambda self, x: self.fc2(torch.tanh(self.fc1(x))) * 2  # type: ignore[method-assign]
    try:
        expected = torch.stack([m(x) for m in modules]).detach()
        torch.testing.assert_close(swarm(x), expected)
        torch.testing.assert_close((swarm * 1.0)(x), expected)
    finally:
        Traced.forward = original  # type: ignore[method-assign]
    torch.testing.assert_close(swarm(x), torch.stack([m(x) for m in modules]).detach())


def test_compiled_capture_is_not_shared_by_classes_with_other_container_types() -> None:
    """Compiled per structure, a capture stood a shared empty container of the first class's type in: a
    class whose ``self._keys = {}`` came after one whose ``self._keys = []`` got lists in its results."""
    class WithList(nyto.NytoModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self._keys: Any = []

    class WithDict(nyto.NytoModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self._keys = {}

    listed, mapped = WithList(), WithDict()
    for _ in range(3):
        assert type((listed + 1.0)._keys) is list
    for _ in range(3):
        result = mapped + 1.0
        assert type(result._keys) is dict and result._keys == {}
        assert torch.equal(result.fc.weight, mapped.fc.weight + 1.0)


def test_class_redefined_with_the_same_name_keeps_its_own_forward() -> None:
    """A notebook cell run twice makes a new class of the same name: results and swarms use each one's own."""
    def define(factor: float) -> type:
        class Cell(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.fc = nn.Linear(3, 2)

            def forward(self, x: Tensor) -> Tensor:
                return torch.relu(self.fc(x)) * factor
        return Cell

    first, second = define(1.0), define(3.0)
    torch.manual_seed(0)
    old, new = first(), second()
    x = torch.randn(4, 3)
    for _ in range(2):
        for model in (old, new):
            swarm = Swarm.stack([model, model])
            torch.testing.assert_close(swarm(x), torch.stack([model(x), model(x)]).detach())
            result = (nyto.particle(model) + 1.0).module()
            assert type(result) is type(model)
            expected = torch.relu(nn.functional.linear(x, model.fc.weight + 1, model.fc.bias + 1))
            torch.testing.assert_close(result(x), expected * (1.0 if model is old else 3.0))
    with pytest.raises(TypeError, match="expected a Cell"):
        nyto.particle(old) + nyto.particle(new)


class _Sine(nn.Module):
    """A forward the swarm cannot fuse: it runs under vmap, inside the structure's lock."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.a(x))


class _Chain(nyto.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(8, 8) for _ in range(20)))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork on this platform")
def test_a_process_forked_while_another_thread_runs_nytorch_can_run_it_too() -> None:
    """fork copies only the calling thread: locks another thread held (a swarm call, a result being built)
    must not stay held in the child, nor the skeleton keep that call's tensors (a DataLoader's fork workers)."""
    import os
    import time

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a forked child of a multi-threaded OpenMP parent can hang in libgomp itself
    swarm, x, stop = Swarm.normal(_Sine(), 8, std=0.1), torch.randn(512, 16), threading.Event()
    a, b = _Chain(), _Chain()
    expected = torch.stack([member.module()(x) for member in swarm]).detach()

    def swarm_calls() -> None:
        while not stop.is_set():
            swarm(x)

    def results() -> None:
        while not stop.is_set():
            _ = (a + b).layers

    workers = [threading.Thread(target=swarm_calls), threading.Thread(target=results)]
    for worker in workers:
        worker.start()
    try:
        for _ in range(5):
            time.sleep(0.02)
            pid = os.fork()
            if pid == 0:  # the child: exit code 0 only if both work and the values are right
                try:
                    ok = torch.allclose(swarm(x), expected, atol=1e-6) and (a + b).layers is not None
                    os._exit(0 if ok else 1)
                except BaseException:  # noqa: BLE001 - any failure is the exit code
                    os._exit(2)
            deadline = time.monotonic() + 30
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    pytest.fail("the forked child hung on a lock another thread of the parent held")
                time.sleep(0.01)
            assert os.waitstatus_to_exitcode(status) == 0
    finally:
        stop.set()
        for worker in workers:
            worker.join()
        torch.set_num_threads(threads)
