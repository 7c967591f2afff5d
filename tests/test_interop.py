"""nytorch results and packed models with the rest of the torch ecosystem.

Each test compares with the same torch operation on an unpacked copy (``copy.deepcopy`` or a
model rebuilt with ``load_state_dict``) and parameters computed by a per-tensor loop.
"""
from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, prune

import nytorch as nyto
from nytorch import Swarm, merge

X = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
Y = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def packed(model: nn.Module) -> bool:
    ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return len(ptrs) == 1


def per_tensor(template: nn.Module, fn, *models: nn.Module) -> nn.Module:
    """``template`` with every parameter set to ``fn`` of the models' same-named parameters (plain loop)."""
    out = template
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.copy_(fn(*[dict(m.named_parameters())[name] for m in models]))
    return out


def results(a: nn.Sequential, b: nn.Sequential) -> dict[str, tuple[nn.Module, nn.Module]]:
    """Each kind of nytorch result (with its plain reference): (a + b) / 2 or a itself."""
    ra, rb = copy.deepcopy(a), copy.deepcopy(b)
    half = per_tensor(copy.deepcopy(ra), lambda u, v: (u + v) / 2, ra, rb)
    ema = merge.EMA(a, decay=0.5)
    b_ = copy.deepcopy(b)
    with torch.no_grad():
        for p, q in zip(a.parameters(), b_.parameters()):
            p.copy_(q)
    ema.update()  # averaged = 0.5 * old a + 0.5 * b
    with torch.no_grad():
        for p, q in zip(a.parameters(), ra.parameters()):
            p.copy_(q)
    return {
        "average": (merge.average([a, b]), half),
        "particle": (((nyto.particle(a) + nyto.particle(b)) / 2).module(), half),
        "swarm member": (Swarm.stack([a, b])[1].module(), rb),
        "ema": (ema.averaged, half),
        "packed source": (a, ra),
    }


@pytest.fixture(scope="module")
def zoo() -> dict[str, tuple[nn.Module, nn.Module]]:
    return results(mlp(0), mlp(1))


KINDS = ["average", "particle", "swarm member", "ema", "packed source"]


@pytest.mark.parametrize("kind", KINDS)
def test_fx_jit_export_of_results(zoo, kind):
    model, ref = zoo[kind]
    expected = ref(X)
    assert torch.allclose(model(X), expected, atol=1e-6)
    assert torch.allclose(torch.fx.symbolic_trace(model)(X), expected, atol=1e-6)
    assert torch.allclose(torch.jit.trace(model, X)(X), expected, atol=1e-6)
    assert torch.allclose(torch.jit.script(model)(X), expected, atol=1e-6)


def test_export_of_a_result():
    a, b = mlp(0), mlp(1)
    ref = per_tensor(copy.deepcopy(a), lambda u, v: 0.25 * u + 0.75 * v, a, b)
    result = merge.average([a, b], weights=[0.25, 0.75])
    exported = torch.export.export(result, (X,)).module()
    assert torch.allclose(exported(X), ref(X), atol=1e-6)


class Net(nyto.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(4, 6)
        self.l2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(x)))


def test_pending_nytomodule_results_under_tracers():
    torch.manual_seed(0)
    a, b = Net(), Net()
    ref = per_tensor(copy.deepcopy(a), lambda u, v: 0.5 * u + 0.5 * v, a, b)
    expected = ref(X)
    for make in (torch.fx.symbolic_trace, lambda m: torch.jit.trace(m, X), torch.jit.script):
        assert torch.allclose(make(0.5 * a + 0.5 * b)(X), expected, atol=1e-6)
    names = dict(torch.func.stack_module_state([0.5 * a + 0.5 * b, ref])[0])
    assert torch.equal(names["l1.weight"][0], names["l1.weight"][1])


def test_quantize_dynamic_of_result_matches_unpacked():
    a, b = mlp(0), mlp(1)
    ref = per_tensor(copy.deepcopy(a), lambda u, v: (u + v) / 2, a, b)
    result = merge.average([a, b])
    unpacked = copy.deepcopy(result)  # one storage per tensor
    assert not packed(unpacked)
    for p, q in zip(result.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(result, {nn.Linear}, dtype=torch.qint8)
        qref = torch.ao.quantization.quantize_dynamic(unpacked, {nn.Linear}, dtype=torch.qint8)
    assert torch.equal(q(X), qref(X))
    assert torch.allclose(q(X), ref(X), atol=0.05)
    for p, q in zip(result.parameters(), ref.parameters()):  # quantize_dynamic copies: the result is untouched
        assert torch.allclose(p, q, atol=1e-7)


def test_grad_utils_on_packed_model():
    a = mlp(0)
    ref = copy.deepcopy(a)
    nyto.particle(a)
    assert packed(a)
    for m in (a, ref):
        nn.functional.mse_loss(m(X), Y).backward()
    assert nn.utils.clip_grad_norm_(a.parameters(), 0.1) == nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
    for p, q in zip(a.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert torch.equal(nn.utils.parameters_to_vector(a.parameters()), nn.utils.parameters_to_vector(ref.parameters()))
    v = torch.randn(sum(p.numel() for p in a.parameters()))
    nn.utils.vector_to_parameters(v, a.parameters())
    nn.utils.vector_to_parameters(v.clone(), ref.parameters())
    assert packed(a)  # vector_to_parameters writes param.data = view of v: nytorch packs again
    p = nyto.particle(a)
    p *= 2  # in place reaches the model
    for u, q in zip(a.parameters(), ref.parameters()):
        assert torch.equal(u, 2 * q)


def test_checkpoint_and_functional_call_on_packed_model():
    a = mlp(0)
    ref = copy.deepcopy(a)
    nyto.particle(a)

    def loss(m):
        h = torch.utils.checkpoint.checkpoint(m[0], X, use_reentrant=False)
        return nn.functional.mse_loss(m[2](m[1](h)), Y)

    loss(a).backward()
    loss(ref).backward()
    for p, q in zip(a.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad)
    other = dict(mlp(3).named_parameters())
    assert torch.equal(torch.func.functional_call(a, other, (X,)), torch.func.functional_call(ref, other, (X,)))


def test_averaged_model_of_packed_model():
    a = mlp(0)
    ref = copy.deepcopy(a)
    nyto.particle(a)
    am, ram = torch.optim.swa_utils.AveragedModel(a), torch.optim.swa_utils.AveragedModel(ref)
    for _ in range(2):
        with torch.no_grad():
            for p, q in zip(a.parameters(), ref.parameters()):
                p.add_(1)
                q.add_(1)
        am.update_parameters(a)
        ram.update_parameters(ref)
    for p, q in zip(am.parameters(), ram.parameters()):
        assert torch.equal(p, q)
    # an AveragedModel is a model like any other: arithmetic on it, and a working result
    doubled = (nyto.particle(am) * 2).module()
    assert type(doubled) is torch.optim.swa_utils.AveragedModel
    assert torch.allclose(doubled(X), per_tensor(copy.deepcopy(ram), lambda u: 2 * u, ram)(X))


def pruned(seed: int) -> nn.Sequential:
    m = mlp(seed)
    prune.l1_unstructured(m[0], "weight", amount=0.5)
    return m


def pruned_copy(m: nn.Sequential) -> nn.Sequential:
    """An unpacked copy (``copy.deepcopy`` refuses pruned models: their ``weight`` is not a leaf)."""
    out = mlp(0)
    prune.identity(out[0], "weight")
    out.load_state_dict(m.state_dict())
    return out


def test_pruned_models_arithmetic_and_remove():
    a, b = pruned(0), pruned(1)
    ra, rb = pruned_copy(a), pruned_copy(b)
    assert [n for n, _ in a.named_parameters()] == ["0.bias", "0.weight_orig", "2.weight", "2.bias"]
    result = (nyto.particle(a) * 0.5 + nyto.particle(b) * 0.5).module()
    ref = per_tensor(pruned_copy(a), lambda u, v: 0.5 * u + 0.5 * v, ra, rb)
    assert torch.equal(result[0].weight_mask, a[0].weight_mask)  # buffers: the left operand's
    assert torch.allclose(result(X), ref(X), atol=1e-6)  # the pruning pre-hook runs on the result
    assert torch.allclose(result[0].weight, ref[0].weight_orig * a[0].weight_mask, atol=1e-6)
    prune.remove(result[0], "weight")
    assert [n for n, _ in result.named_parameters()] == ["0.bias", "0.weight", "2.weight", "2.bias"]
    assert torch.allclose((nyto.particle(result) * 2).module()[0].weight, 2 * ref[0].weight_orig * a[0].weight_mask,
                          atol=1e-6)
    assert torch.equal(a[0].weight_orig, ra[0].weight_orig)  # the source keeps its pruning
    # pruning a packed model: its weight_orig is a new Parameter, packed again on next use
    c = mlp(2)
    nyto.particle(c)
    prune.l1_unstructured(c[0], "weight", amount=0.5)
    rc = pruned_copy(c)
    assert torch.allclose((nyto.particle(c) * 2).module()(X), per_tensor(pruned_copy(c), lambda u: 2 * u, rc)(X))


def test_parametrize_before_and_after_packing():
    a = mlp(0)
    parametrizations.orthogonal(a[0])
    ra = copy.deepcopy(a)
    assert "0.parametrizations.weight.original" in dict(a.named_parameters())
    assert torch.allclose((nyto.particle(a) * 1).module()(X), ra(X), atol=1e-6)
    b = mlp(1)
    nyto.particle(b)  # packed first, then parametrized
    parametrizations.orthogonal(b[0])
    rb = copy.deepcopy(b)
    result = (nyto.particle(b) + 1).module()
    assert torch.allclose(result(X), per_tensor(copy.deepcopy(rb), lambda u: u + 1, rb)(X), atol=1e-6)
    p = nyto.particle(b)
    p += 1
    assert torch.allclose(b(X), per_tensor(copy.deepcopy(rb), lambda u: u + 1, rb)(X), atol=1e-6)
    c = mlp(2)
    parametrizations.weight_norm(c[0])
    rc = copy.deepcopy(c)
    lerped = nyto.particle(c).lerp(nyto.particle(rc) * 3, 0.25).module()
    assert torch.allclose(lerped(X), per_tensor(copy.deepcopy(rc), lambda u: torch.lerp(u, 3 * u, 0.25), rc)(X),
                          atol=1e-6)


def test_old_style_spectral_and_weight_norm():
    a = mlp(0)
    nn.utils.spectral_norm(a[0])
    ra = copy.deepcopy(a)
    nyto.particle(a)
    assert packed(a)
    a(X), ra(X)  # training-mode power iteration writes weight_u in place, into the packed buffer
    assert torch.equal(a[0].weight_u, ra[0].weight_u)
    assert torch.allclose(a(X), ra(X))
    doubled = (nyto.particle(a) * 2).module().eval()
    ref = mlp(0)
    nn.utils.spectral_norm(ref[0])
    ref.load_state_dict(ra.state_dict())  # deepcopy refuses it now: its weight is not a leaf
    assert torch.allclose(doubled(X), per_tensor(ref, lambda u: 2 * u, ra).eval()(X), atol=1e-6)

    def weight_normed(src=None):
        m = mlp(1)
        nn.utils.weight_norm(m[0])
        if src is not None:
            m.load_state_dict(src.state_dict())
        return m

    b = weight_normed()
    rb = weight_normed(b)
    result = (nyto.particle(b) * 2).module()
    ref = per_tensor(weight_normed(b), lambda u: 2 * u, rb)
    assert torch.allclose(result(X), ref(X), atol=1e-6)
    nn.utils.remove_weight_norm(result[0])
    assert torch.allclose(result(X), ref(X), atol=1e-6)


# --- hooks bound to the source module (fixed: nytorch/_rebuild.py:_rebind_hooks)

def test_load_state_dict_pre_hook_gets_the_result_not_the_source():
    seen = []

    def hook(module, state_dict, prefix, *args):
        seen.append(module)

    src = nn.Linear(2, 2)
    src.register_load_state_dict_pre_hook(hook)  # torch keeps a weak reference to src
    for make in (lambda m: nyto.particle(m).module(), lambda m: merge.average([m, m]),
                 lambda m: (nyto.particle(m) * 2).module(), copy.deepcopy):
        result = make(src)
        seen.clear()
        result.load_state_dict(src.state_dict())
        assert len(seen) == 1 and seen[0] is result
    seen.clear()
    src.load_state_dict(src.state_dict())
    assert len(seen) == 1 and seen[0] is src  # the source's own hook is untouched
    result = nyto.particle(src).module()
    del src
    gc.collect()
    result.load_state_dict(result.state_dict())  # used to raise: "the hook of a dead Module"
    assert seen[-1] is result


class Scaled(nn.Linear):
    def __init__(self) -> None:
        super().__init__(2, 2)
        self.scale = 1.0
        self.register_forward_hook(self._scale)

    def _scale(self, module, inputs, output):
        return output * self.scale


class Scaled2(nyto.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Scaled()
        self.seen = []
        self.inner.register_forward_pre_hook(self._record)  # the parent's method on a child

    def _record(self, module, inputs):
        self.seen.append(module)

    def forward(self, x):
        return self.inner(x)


def test_bound_method_hooks_follow_the_copy_like_deepcopy():
    src = Scaled()
    x = torch.ones(1, 2)
    base = nn.functional.linear(x, src.weight, src.bias)
    for result in (nyto.particle(src).module(), merge.average([src, src]), copy.deepcopy(src)):
        result.scale = 10.0
        assert torch.allclose(result(x), base * 10)
    assert torch.allclose(src(x), base)
    net = Scaled2()
    for result in (net * 1, net.clone(), nyto.particle(net).module(), copy.deepcopy(net)):
        result.seen = []
        net.seen = []
        result(x)
        assert result.seen == [result.inner] and net.seen == []


def test_state_dict_hooks_receive_the_result():
    calls = []
    src = mlp(0)
    src._register_state_dict_hook(lambda mod, sd, prefix, meta: calls.append(("sd", mod)))
    src.register_state_dict_pre_hook(lambda mod, prefix, keep: calls.append(("pre", mod)))
    src.register_load_state_dict_post_hook(lambda mod, keys: calls.append(("post", mod)))
    result = merge.average([src, mlp(1)])
    calls.clear()
    result.load_state_dict(result.state_dict())
    assert sorted(k for k, _ in calls) == ["post", "pre", "sd"] and all(m is result for _, m in calls)


# --- DistributedDataParallel (one gloo process)

@pytest.fixture()
def gloo_world(tmp_path):
    import torch.distributed as dist
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist
    dist.destroy_process_group()


def test_ddp_around_a_packed_model(gloo_world):
    for pack_first in (True, False):
        f = mlp(0)
        ref = copy.deepcopy(f)
        if pack_first:
            nyto.particle(f)
        ddp = nn.parallel.DistributedDataParallel(f, gradient_as_bucket_view=True)
        rddp = nn.parallel.DistributedDataParallel(ref, gradient_as_bucket_view=True)
        if not pack_first:
            nyto.particle(f)
        assert packed(f)
        opt, ropt = torch.optim.SGD(ddp.parameters(), lr=0.1), torch.optim.SGD(rddp.parameters(), lr=0.1)
        for _ in range(2):
            for m, o in ((ddp, opt), (rddp, ropt)):
                o.zero_grad()
                nn.functional.mse_loss(m(X), Y).backward()
                o.step()
        for p, q in zip(f.parameters(), ref.parameters()):
            assert torch.allclose(p, q)
        p = nyto.particle(f)
        p *= 0.5  # in place: DDP's module sees it
        assert torch.allclose(ddp(X), per_tensor(copy.deepcopy(ref), lambda u: 0.5 * u, ref)(X), atol=1e-6)


def test_results_of_a_ddp_wrapper_are_refused_and_in_place_updates_are_not(gloo_world):
    """A copy of a DistributedDataParallel would share its reducer: its gradients would never be averaged."""
    model = mlp(0)
    ddp = nn.parallel.DistributedDataParallel(model)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    message = r"^DistributedDataParallel: expected a model, got a DistributedDataParallel wrapper.*ddp\.module"
    for build in (lambda: (nyto.particle(ddp) * 2.0).module(), lambda: merge.average([ddp, ddp]),
                  lambda: merge.EMA(ddp)):
        with pytest.raises(TypeError, match=message):
            build()
    assert all(torch.equal(param.detach(), before[name]) for name, param in model.named_parameters())
    p = nyto.particle(ddp)
    p *= 2.0  # in place on the wrapped model: DDP keeps the same Parameter objects
    assert all(torch.equal(param.detach(), before[name] * 2) for name, param in model.named_parameters())
    merged = merge.average([ddp.module, mlp(1)])  # on the module itself: a plain model
    assert type(merged) is type(model)


class Upgrading(nyto.NytoModule):
    """Renames an old checkpoint key in its own pre-hook (a bound method, and torch's module reference)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.loaded_into = []
        self.register_load_state_dict_pre_hook(self._upgrade)

    def _upgrade(self, module, state_dict, prefix, *args):
        self.loaded_into.append((self, module))
        if prefix + "old.weight" in state_dict:
            state_dict[prefix + "fc.weight"] = state_dict.pop(prefix + "old.weight")

    def forward(self, x):
        return self.fc(x)


def test_pending_results_rebind_hooks_even_after_the_source_died():
    net = Upgrading()
    old = {"old.weight": torch.full((2, 2), 3.0), "fc.bias": torch.zeros(2)}
    results = [net * 2, net.clone(), (net * 2) + net, nyto.particle(net).module(), merge.average([net, net])]
    for result in results[:3]:  # operator results are still pending: built after the source died below
        assert "_nyto_pending" in object.__getattribute__(result, "__dict__")
    source_hooks = list(net._load_state_dict_pre_hooks.values())
    del net
    gc.collect()
    for result in results:
        result.load_state_dict(dict(old))  # used to raise: "the hook of a dead Module"
        # ``loaded_into`` is a plain attribute, shared by the results as ``copy.copy`` would
        assert result.loaded_into[-1][0] is result and result.loaded_into[-1][1] is result
        assert torch.equal(result.fc.weight, old["old.weight"])
    # the source's own table was never rewritten
    assert all(isinstance(h, type(source_hooks[0])) for h in source_hooks)


def test_hooks_bound_outside_the_tree_stay_as_they_are():
    other = nn.Linear(2, 2)
    other.count = 0

    def count(self, module, inputs):
        self.count += 1

    src = nn.Linear(2, 2)
    src.register_forward_pre_hook(count.__get__(other))  # a method of a module outside src's tree
    src.register_load_state_dict_pre_hook(lambda module, *args: setattr(module, "hit", True))
    result = nyto.particle(src).module()
    result(torch.ones(1, 2))
    src(torch.ones(1, 2))
    assert other.count == 2
    result.load_state_dict(src.state_dict())
    assert getattr(result, "hit", False) and not hasattr(src, "hit")
