"""Long runs stay flat: no reference cycles, bounded memory, thread safety."""
from __future__ import annotations

import gc
import os
import threading
import time
import types
import weakref
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import nytorch
import nytorch.functional as nf
from nytorch import NytoModule, StructureError, merge
from nytorch._checkpoint import load, save

try:
    from nytorch._swarm import Swarm
except ImportError:  # the swarm issue may not have landed in this checkout
    Swarm = None  # type: ignore[assignment,misc]

Tensor = torch.Tensor


class Net(NytoModule):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, width)
        self.norm = nn.BatchNorm1d(width)
        self.fc2 = nn.Linear(width, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def _plain(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def _nyto(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net()


def _mixed_operations(seed: int, tmp: Path | None = None) -> dict[str, Callable[[], Any]]:
    """A mix of every kind of operation (out of place, in place, errors), each a zero-argument call."""
    plain, other = _plain(seed), _plain(seed + 1)
    net, net2 = _nyto(seed), _nyto(seed + 1)
    p, q = nytorch.particle(plain), nytorch.particle(other)
    tree, tree2 = nf.params(plain), nf.params(other)
    x = torch.randn(5, 3)
    wrong = nytorch.particle(nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Linear(5, 2)))

    def failing(action: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> None:
            try:
                action()
            except (StructureError, TypeError):
                pass
            else:  # pragma: no cover - the catalogue guarantees these raise
                raise AssertionError("expected an error")
        return run

    def inplace_particle() -> None:
        nonlocal p
        p += 0.0
        p *= 1.0
        p.lerp_(q, 0.0)

    def inplace_module() -> None:
        nonlocal net
        net += 0.0
        net.product_(net.product())

    ops: dict[str, Callable[[], Any]] = {
        "nf.add": lambda: nf.add(tree, tree2), "nf.lerp": lambda: nf.lerp(tree, tree2, 0.3),
        "nf.neg": lambda: nf.neg(tree), "nf.clone": lambda: nf.clone(tree), "nf.dot": lambda: nf.dot(tree, tree2),
        "nf.norm": lambda: nf.norm(tree), "nf.params": lambda: nf.params(plain), "nf.state": lambda: nf.state(net),
        "nf.bind": lambda: nf.bind(plain, tree2), "nf.call": lambda: nf.call(plain, tree2, x),
        "nf.tree_map": lambda: nf.tree_map(torch.mul, tree, tree2), "nf.randn_like": lambda: nf.randn_like(tree),
        "p+q": lambda: p + q, "p-1": lambda: p - 1, "2*p": lambda: 2 * p, "p/3": lambda: p / 3,
        "p**2": lambda: p ** 2, "1-p": lambda: 1 - p, "-p": lambda: -p, "p.clone": lambda: p.clone(),
        "p.randn": lambda: p.randn(), "p.lerp": lambda: p.lerp(q, 0.5), "p.module": lambda: (p + q).module(),
        "p.copy_to": lambda: p.copy_to(other) and None,
        "Particle.from_params": lambda: nytorch.Particle.from_params(plain, tree2),
        "particle": lambda: nytorch.particle(plain),
        "p.unary_operator": lambda: p.unary_operator(lambda t, config: t * 2), "p+=": inplace_particle,
        "net+net2": lambda: net + net2, "net*0.5": lambda: net * 0.5, "1/net": lambda: 1 / net,
        "net.clone": lambda: net.clone(), "net.randn": lambda: net.randn(), "net.detach": lambda: net.detach(),
        "net.clone_from": lambda: net.clone_from(net2), "net.product": lambda: net.product(),
        "net.forward": lambda: (net - net2)(x), "net+=": inplace_module,
        "net.set_param_config": lambda: net.set_param_config(operational=True, name="fc1"),
        "error:p+wrong": failing(lambda: p + wrong), "error:p+str": failing(lambda: p + "x"),
        "error:net+plain": failing(lambda: net + plain),
        "error:nf.add": failing(lambda: nf.add(tree, {"0.weight": tree["0.weight"]})),
        "error:p*1j": failing(lambda: p * 1j),
    }
    if Swarm is not None:
        swarm = Swarm.stack([_plain(seed + i) for i in range(3)])
        weights = torch.tensor([0.5, 1.0, 2.0])

        def inplace_swarm() -> None:
            nonlocal swarm
            swarm *= 1.0
            swarm += swarm * 0.0

        ops.update({
            "swarm+p": lambda: swarm + p, "swarm*weights": lambda: swarm * weights, "swarm[1]": lambda: swarm[1],
            "swarm[[0,2]]": lambda: swarm[[0, 2]], "swarm.mean": lambda: swarm.mean(),
            "swarm.forward": lambda: swarm(x), "Swarm.from_params": lambda: Swarm.from_params(plain, swarm.params),
            "swarm*=": inplace_swarm, "error:swarm+wrong": failing(lambda: swarm + wrong),
        })
    if tmp is not None:
        path = tmp / f"ops{seed}.pt"
        ops.update({"save": lambda: save({"p": p, "net": net, "step": 1}, path),
                    "load": lambda: load(path, like={"p": p, "net": net, "step": 0})})
    return ops


def _describe_garbage(garbage: list[Any]) -> str:
    kinds = Counter(f"{type(obj).__module__}.{type(obj).__qualname__}" for obj in garbage)
    return ", ".join(f"{name} x{count}" for name, count in kinds.most_common(15))


def _torch_defined(obj: Any) -> bool:
    return isinstance(obj, (types.FunctionType, type)) and (obj.__module__ or "").startswith("torch.")


def _not_torchs_own(garbage: list[Any]) -> list[Any]:
    """Garbage outside the cycles torch creates itself on every call.

    ``torch.save`` / ``torch.load`` define a pickler class per call and ``torch.func.vmap``
    flattens pytrees with a self-referencing closure: both leave cyclic garbage that the
    collector frees.  Objects in a connected component (through ``gc.get_referents``) that
    holds such a torch-defined function or class are attributed to torch; the rest is ours.
    """
    index = {id(obj): i for i, obj in enumerate(garbage)}
    parent = list(range(len(garbage)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, obj in enumerate(garbage):
        for referent in gc.get_referents(obj):
            j = index.get(id(referent))
            if j is not None:
                parent[find(i)] = find(j)
    torchs = {find(i) for i, obj in enumerate(garbage) if _torch_defined(obj)}
    return [obj for i, obj in enumerate(garbage) if find(i) not in torchs]


def _cyclic_garbage(ops: dict[str, Callable[[], Any]], total: int) -> list[Any]:
    """Run ``ops`` round-robin ``total`` times with the collector off; what only the collector can free."""
    for op in ops.values():  # warm caches (torch lazy initialisation, class-level tables) before counting
        op()
    gc.collect()
    flags = gc.get_debug()
    gc.disable()
    try:
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        gc.garbage.clear()
        count = 0
        while count < total:
            for op in ops.values():
                op()
                count += 1
        gc.collect()
        return list(gc.garbage)
    finally:
        gc.garbage.clear()
        gc.set_debug(flags)
        gc.enable()


@pytest.mark.parametrize("mix", ["operations", "checkpoints"])
def test_no_reference_cycles_in_10000_mixed_operations(tmp_path: Path, mix: str) -> None:
    ops = _mixed_operations(0, tmp_path)
    if mix == "checkpoints":  # fsync-bound: fewer rounds
        garbage = _cyclic_garbage({name: ops[name] for name in ("save", "load")}, 300)
    else:
        garbage = _cyclic_garbage({name: op for name, op in ops.items() if name not in ("save", "load")}, 10_000)
    heavy = [obj for obj in garbage if isinstance(obj, (Tensor, nn.Module, nytorch.Particle))
             or (Swarm is not None and isinstance(obj, Swarm))]
    assert not heavy, f"tensors/modules kept until a collection: {_describe_garbage(heavy)}"
    ours = _not_torchs_own(garbage)
    assert not ours, f"{len(ours)} objects only freed by the cycle collector: {_describe_garbage(ours)}"
    # and torch's own cycles come only from where they are expected: vmap (swarm forward) or torch.save/load
    expected = ("torch.serialization",) if mix == "checkpoints" else ("torch.utils._pytree",)
    sources = {obj.__module__ for obj in garbage if _torch_defined(obj)}
    assert sources <= set(expected), sources


def test_results_are_freed_by_reference_counting_alone() -> None:
    import weakref

    gc.disable()
    try:
        for name, make in _mixed_operations(3).items():
            result = make()
            if result is None or isinstance(result, (bool, int, float, str, dict, Tensor)):
                continue
            ref = weakref.ref(result)
            del result
            assert ref() is None, f"{name} produced an object kept alive after its last reference went away"
    finally:
        gc.enable()


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc (Linux)")
def test_rss_is_flat_over_100000_operations() -> None:
    """RSS after 100,000 operations on a small model stays within a few MB of RSS after 1,000."""
    slow = ("nf.call", "net.forward", "swarm.forward", "Swarm.from_params")
    ops = [op for name, op in _mixed_operations(5).items() if not name.startswith("error:") and name not in slow]
    started = time.monotonic()
    done = 0
    baseline = 0
    while done < 100_000:
        for op in ops:
            op()
        done += len(ops)
        if not baseline and done >= 1_000:
            baseline = _rss()
    grown = _rss() - baseline
    assert grown < 4 * 2**20, f"RSS grew by {grown / 2**20:.1f} MB between 1,000 and {done:,} operations"
    assert time.monotonic() - started < 120


# -- thread safety ----------------------------------------------------------------------------------
def _workload(seed: int, tmp: Path, rounds: int) -> list[dict[str, Tensor]]:
    """Deterministic (no global RNG) operations on models that belong to this worker only."""
    torch.manual_seed(seed)  # only construction uses the global RNG; callers serialise it
    return _run_workload(_build_workload_models(seed), tmp / f"thread{seed}.pt", rounds)


def _build_workload_models(seed: int) -> dict[str, Any]:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        models: dict[str, Any] = {"plain": _plain(seed), "other": _plain(seed + 100), "net": Net(), "net2": Net()}
        if Swarm is not None:
            models["swarm"] = Swarm.stack([_plain(seed + i) for i in range(4)])
    return models


def _run_workload(models: dict[str, Any], path: Path, rounds: int) -> list[dict[str, Tensor]]:
    p, q = nytorch.particle(models["plain"]), nytorch.particle(models["other"])
    net, net2 = models["net"], models["net2"]
    swarm = models.get("swarm")
    x = torch.linspace(-1, 1, 15).reshape(5, 3)
    results: list[dict[str, Tensor]] = []
    for step in range(rounds):
        r = (p * 0.9 + q * 0.1).lerp(q, 0.05) - p / 7
        p.lerp_(r, 0.5)
        p += 0.001 * step
        tree = nf.lerp(nf.params(models["plain"]), nf.params(models["other"]), 0.25)
        net.set_param_config(operational=step % 2 == 0, name="fc2")
        mixed = net * 0.5 + net2 * 0.5
        net += 0.01
        net2.clone_from(mixed)
        out = nf.call(models["plain"], tree, x)
        if swarm is not None:
            swarm = swarm * torch.tensor([1.0, 0.9, 0.8, 0.7]) + p
            swarm += 0.001
        if step % 10 == 0:
            save({"p": p, "net": net}, path)
            loaded = load(path, like={"p": p, "net": net})
            assert torch.equal(loaded["net"].fc1.weight, net.fc1.weight)
        results.append({"p": torch.cat([t.reshape(-1) for t in p.params.values()]),
                        "net": torch.cat([t.detach().reshape(-1) for t in net.parameters()]),
                        "mixed": torch.cat([t.detach().reshape(-1) for t in mixed.parameters()]),
                        "out": out.detach(),
                        "swarm": torch.zeros(0) if swarm is None else
                        torch.cat([t.reshape(-1) for t in swarm.params.values()])})
    return results


def test_threads_on_independent_models_match_sequential(tmp_path: Path) -> None:
    seeds, rounds = [11, 12, 13, 14], 40
    sequential = {seed: _run_workload(_build_workload_models(seed), tmp_path / f"seq{seed}.pt", rounds)
                  for seed in seeds}
    models = {seed: _build_workload_models(seed) for seed in seeds}
    threaded: dict[int, list[dict[str, Tensor]]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(seeds))

    def work(seed: int) -> None:
        try:
            barrier.wait()
            threaded[seed] = _run_workload(models[seed], tmp_path / f"thr{seed}.pt", rounds)
        except BaseException as error:  # surfaced below with the thread's traceback
            errors.append(error)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors[0]
    for seed in seeds:
        for step, (a, b) in enumerate(zip(sequential[seed], threaded[seed])):
            for key in a:
                assert torch.equal(a[key], b[key]), (seed, step, key)


def test_threads_saving_one_path_leave_one_whole_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "shared.pt"
    tensors = {i: torch.full((20_000,), float(i)) for i in range(4)}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(15):
                save({"writer": i, "values": tensors[i]}, path)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors[0]
    state = load(path)
    assert torch.equal(state["values"], tensors[state["writer"]])
    assert sorted(os.listdir(tmp_path)) == ["shared.pt"]


# -- models whose own tree leads back to the root --------------------------------------------------
class Recording(NytoModule):
    """Feature extraction: a forward hook that is a bound method of the root (child -> root)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)
        self.body.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        self.features = output

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def _plain_with_back_reference() -> nn.Module:
    """A plain model whose child stores the root, and whose other child's hook and weight's hook close over it."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    object.__setattr__(model[0], "owner", model)  # not a submodule: a plain attribute
    model[1].register_forward_pre_hook(lambda module, inputs: None if model.training else None)
    model[1].weight.register_hook(lambda grad: grad if model.training else grad)
    return model


def test_models_whose_tree_leads_back_to_the_root_are_collected() -> None:
    """nytorch remembered each model's tree in a module-level table keyed weakly by the root but holding
    the children strongly: through the back reference that kept every such model alive for good, even
    after ``gc.collect()`` (about 1 MB a generation in an evolution loop of these)."""
    torch.manual_seed(0)
    parent, dropped = Recording(), []
    for _ in range(20):  # an evolution loop: each generation replaces the last
        child = parent + 0.01 * parent.randn()
        child(torch.randn(2, 8))  # builds the result, whose hook is bound to it
        assert child.features.shape == (2, 8)
        dropped.append(weakref.ref(parent))
        parent = child
    gc.collect()
    assert [ref() for ref in dropped].count(None) == len(dropped)  # the live one holds none of its forebears
    plain = _plain_with_back_reference()
    held = weakref.ref(plain)
    particle = nytorch.particle(plain)
    nf.params(plain), merge.EMA(plain).update(), nytorch.particle(plain) + particle
    del plain, particle
    gc.collect()
    assert held() is None
    last = weakref.ref(parent)
    del parent, child
    gc.collect()
    assert last() is None


def test_a_replaced_layer_is_freed_at_once() -> None:
    """The remembered tree kept a replaced layer (surgery, a new head, ``load_state_dict(assign=True)``)
    alive until the model was read again."""
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2))
    nytorch.merge.average([model, model])
    old_head, old_weight = weakref.ref(model[1]), weakref.ref(model[0].weight)
    was = gc.isenabled()
    gc.disable()  # reference counting alone
    try:
        model[1] = nn.Linear(64, 3)
        model.load_state_dict({k: torch.zeros_like(v) for k, v in model.state_dict().items()}, assign=True)
        assert old_head() is None and old_weight() is None
    finally:
        if was:
            gc.enable()
    assert nf.params(model)["1.weight"].shape == (3, 64)


def test_a_chain_of_unbuilt_results_keeps_none_of_its_forebears() -> None:
    """A pending result kept its operand's bound-method hooks as they were (the method and so the model):
    in ``net = net + noise`` without a forward in between, every generation held the first model."""
    torch.manual_seed(0)
    parent, dropped = Recording(), []
    for _ in range(10):
        child = parent + 0.01 * parent.randn()  # never built: its module tree waits for a first touch
        dropped.append(weakref.ref(parent))
        parent = child
    gc.collect()
    assert [ref() is None for ref in dropped] == [True] * 10
    parent(torch.randn(2, 8))
    assert parent.features.shape == (2, 8)  # the hook, bound to the result, records into it
