"""Model arithmetic inside training loops: optimizers, autograd, inference mode, autocast.

Every case runs the same loop with plain per-tensor torch and compares values (or errors).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nytorch as nyto
from nytorch import Swarm, merge

X = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(1))


class Net(nyto.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def seq() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def net() -> Net:
    torch.manual_seed(0)
    return Net()


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


# -- inference mode: packing must not turn a model's parameters into inference tensors --------------

def _plain_add_(model: nn.Module) -> None:
    for p in model.parameters():
        p.add_(1)


@pytest.mark.parametrize("update", [
    lambda m: nyto.particle(m).__iadd__(1),
    lambda m: nyto.particle(m),
    lambda m: nyto.flatten_(m),
    lambda m: merge.ema_(m, seq(), decay=0.5),
    lambda m: merge.ema_(seq(), m, decay=0.5),
    lambda m: merge.EMA(m, decay=0.5),
    lambda m: nyto.particle(seq()).copy_to(m),
], ids=["particle+=", "particle", "flatten_", "ema_-target", "ema_-online", "EMA", "copy_to"])
def test_model_touched_under_inference_mode_still_trains(update):
    reference, model = seq(), seq()
    with torch.inference_mode():
        _plain_add_(reference)      # plain torch: in-place writes keep the tensors normal
        update(model)
    assert not any(p.is_inference() for p in model.parameters())
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(reference.parameters(), lr=0.1)
    for m, o in ((model, opt), (reference, ref_opt)):
        m(X[0]).pow(2).sum().backward()      # raised "Inference tensors cannot be saved for backward"
        o.step()
    assert all(p.grad is not None for p in model.parameters())


def test_nytomodule_inplace_under_inference_mode_matches_torch():
    model, reference = net(), net()
    with torch.inference_mode():
        model += 1
        _plain_add_(reference)
    assert same(model, reference)
    model(X[0]).sum().backward()
    reference(X[0]).sum().backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), reference.parameters()))


def test_ema_made_under_inference_mode_averages_outside_it():
    model = seq()
    average = [p.detach().clone() for p in model.parameters()]
    with torch.inference_mode():
        ema = merge.EMA(model, decay=0.5)   # raised "Inference tensors do not track version counter"
    assert not any(p.is_inference() for p in ema.averaged.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x in X:
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
        ema.update()
        with torch.no_grad():
            for a, p in zip(average, model.parameters()):
                a.lerp_(p, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(ema.averaged.parameters(), average))


# -- autocast: a weighted mix of a swarm keeps the swarm's dtype and values ---------------------------

def test_weighted_mix_of_swarm_under_autocast_keeps_float32():
    members = [seq() for _ in range(3)]
    for i, m in enumerate(members):
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(i + 1).add_(0.1 * i)
    swarm = Swarm.stack(members)
    weights = torch.tensor([0.2, 0.3, 0.5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = weights @ swarm
        rows = torch.stack([weights, weights.flip(0)]) @ swarm
    for name, value in mixed.params.items():
        reference = sum(w * dict(m.named_parameters())[name].detach() for w, m in zip(weights, members))
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, reference, rtol=1e-6, atol=1e-6)
    assert all(v.dtype == torch.float32 for v in rows.params.values())
    torch.testing.assert_close(rows[0].params["0.weight"], mixed.params["0.weight"], rtol=0, atol=0)


# -- the result pool must not hand an inference tensor's buffer to a result made outside -------------

class Big(nyto.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(512, 256)   # 512 KiB: large enough for the result pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.mark.parametrize("style", ["nytomodule", "particle"])
def test_result_after_dead_inference_result_trains(style):
    from nytorch import _pool
    _pool.clear()
    torch.manual_seed(0)
    model, x = Big(), torch.randn(2, 512)
    for _ in range(2):
        with torch.inference_mode():      # e.g. evaluating a soup, then dropping it
            dead = model + 1 if style == "nytomodule" else nyto.particle(model) + 1
            del dead
        result = model + 1 if style == "nytomodule" else (nyto.particle(model) + 1).module()
        assert not any(p.is_inference() for p in result.parameters())
        opt = torch.optim.SGD(result.parameters(), lr=0.1)
        result(x).sum().backward()    # raised "Inplace update to inference tensor outside InferenceMode"
        opt.step()
        reference = [p.detach() + 1 for p in model.parameters()]
        grads = [torch.ones(256, 2) @ x, torch.full((256,), 2.0)]
        for p, r, g in zip(result.parameters(), reference, grads):
            torch.testing.assert_close(p, r - 0.1 * g)


# -- a learned / computed decay that requires grad (e.g. sigmoid of a parameter) ----------------------

@pytest.mark.parametrize("kind", ["module", "particle", "dict", "swarm"])
@pytest.mark.parametrize("keyword", ["decay", "tau"])
def test_ema_with_weight_that_requires_grad(kind, keyword, recwarn):
    logit = torch.tensor(2.0, requires_grad=True)
    weight = torch.sigmoid(logit)                 # a 0-dim floating tensor that requires grad
    tau = 1 - weight.detach().item() if keyword == "decay" else weight.detach().item()
    target, online = seq(), seq()
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1)
    expected = [torch.lerp(t.detach(), o.detach(), tau) for t, o in zip(target.parameters(), online.parameters())]
    if kind == "module":
        tgt, onl = target, online
    elif kind == "particle":
        tgt, onl = nyto.particle(target), nyto.particle(online)
    elif kind == "dict":
        tgt, onl = dict(target.named_parameters()), dict(online.named_parameters())
    else:
        tgt, onl = Swarm.stack([target, target]), Swarm.stack([online, online])
    # raised "TypeError: _foreach_lerp_() received an invalid combination of arguments"
    merge.ema_(tgt, onl, **{keyword: weight})
    got = [tgt.params[n][1] for n in tgt.params] if kind == "swarm" else list(target.parameters())
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)
    assert not [w for w in recwarn if "requires_grad" in str(w.message)]


# -- behaviour checked correct: the same loops against plain per-tensor torch -------------------------

def _lerp_ones_(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.lerp_(torch.ones_like(p), 0.1)


def _affine_(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9).add_(0.1)


@pytest.mark.parametrize("update, plain", [
    (lambda m: m.product_(m.product() * 0.9 + 0.1), _affine_),
    (lambda m: m.__imul__(0.9).__iadd__(0.1), _affine_),
    (lambda m: (nyto.particle(m) * 0.9 + 0.1).copy_to(m), _affine_),
    (lambda m: merge.ema_(m, m * 0 + 1, tau=0.1), _lerp_ones_),
], ids=["product_", "inplace-operators", "copy_to", "ema_"])
def test_hybrid_adam_steplr_loop_matches_torch(update, plain):
    model, reference = net(), net()
    opt, ref_opt = (torch.optim.Adam(m.parameters(), lr=0.05) for m in (model, reference))
    sched, ref_sched = (torch.optim.lr_scheduler.StepLR(o, 2, 0.5) for o in (opt, ref_opt))
    for i, x in enumerate(X):
        for m, o, s in ((model, opt, sched), (reference, ref_opt, ref_sched)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
            s.step()
        if i % 2:
            update(model)                       # the evolutionary / averaging move, in place
            plain(reference)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # the optimizer state still belongs to the model's parameters and round-trips
    assert all(opt.state[p]["exp_avg"].shape == p.shape for p in model.parameters())
    fresh = net()
    again = torch.optim.Adam(fresh.parameters(), lr=0.05)
    again.load_state_dict(opt.state_dict())
    for p, q in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(again.state[p]["exp_avg"], opt.state[q]["exp_avg"])


@pytest.mark.parametrize("first_use", [
    lambda m: merge.EMA(m), lambda m: nyto.particle(m), lambda m: merge.ema_(copy.deepcopy(m), m, decay=0.9),
], ids=["EMA", "particle", "ema_-online"])
def test_packing_between_forward_and_backward_keeps_the_graph(first_use):
    # MoCo's order: forward the online encoder, then the momentum update (nytorch's first use packs it)
    model, reference = seq(), seq()
    loss = model(X[0]).pow(2).sum()
    first_use(model)
    loss.backward()
    reference(X[0]).pow(2).sum().backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), reference.parameters()))


@pytest.mark.parametrize("prepare", ["plain", "packed", "result"])
@pytest.mark.parametrize("update", [
    lambda m: m.__iadd__(1), lambda m: m.product_(m.product() * 2),
    lambda m: merge.ema_(m, m * 2, decay=0.5), lambda m: (nyto.particle(m) * 2).copy_to(m),
    lambda m: nyto.particle(m).lerp_(nyto.particle(m) * 0, 0.5),
], ids=["+=", "product_", "ema_", "copy_to", "lerp_"])
@pytest.mark.parametrize("frozen", [False, True])
def test_inplace_update_between_forward_and_backward_raises_like_torch(prepare, update, frozen):
    model = net()
    model.requires_grad_(not frozen)
    if prepare == "packed":
        nyto.particle(model)
    elif prepare == "result":
        model = model + 0
    x = X[0].clone().requires_grad_()       # so that the weights are saved for backward
    loss = model(x).pow(2).sum()
    update(model)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("prepare", ["plain", "packed", "result"])
def test_step_on_some_parameters_keeps_the_graph_of_the_others(prepare):
    # a GAN's two optimizers over one packed model: a step on `a` must not mark `b` as modified
    model = net()
    if prepare == "packed":
        merge.EMA(model)
    elif prepare == "result":
        model = model + 0
    out = model(X[0]).pow(2).sum()        # saves b.weight (not a.weight: the input needs no grad)
    opt_a = torch.optim.SGD(model.a.parameters(), lr=0.1)
    grads = torch.autograd.grad(out, list(model.a.parameters()), retain_graph=True)
    for p, g in zip(model.a.parameters(), grads):
        p.grad = g
    opt_a.step()
    out.backward()        # plain torch: fine, b's saved weight was not written
    assert model.b.weight.grad is not None


def test_optimizer_in_backward_on_packed_model_matches_torch():
    def train(model: nn.Module) -> list[torch.Tensor]:
        opts = {p: torch.optim.SGD([p], lr=0.1) for p in model.parameters()}
        def step(q: torch.Tensor) -> None:
            opts[q].step()
            opts[q].zero_grad()
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(step)
        x = X[0].clone().requires_grad_()
        for _ in range(3):
            model(x).pow(2).sum().backward()
        return [p.detach() for p in model.parameters()]
    packed = seq()
    merge.EMA(packed)
    assert all(torch.equal(p, q) for p, q in zip(train(packed), train(seq())))


def test_autocast_gradscaler_ema_loop_matches_torch():
    model, reference = seq(), seq()
    ema = merge.EMA(model, decay=0.9)
    average = [p.detach().clone() for p in reference.parameters()]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, reference)]
    scalers = [torch.amp.GradScaler("cpu") for _ in range(2)]
    for x in X:
        for m, o, s in zip((model, reference), opts, scalers):
            o.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = m(x).float().pow(2).sum()
            s.scale(loss).backward()
            s.step(o)
            s.update()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ema.update()
        with torch.no_grad():
            for a, p in zip(average, reference.parameters()):
                a.lerp_(p, 0.1)
    assert same(model, reference)
    for a, b in zip(ema.averaged.parameters(), average):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_moco_and_dqn_loops_match_torch():
    # MoCo: key encoder follows the query encoder by EMA between the query forward and the backward
    query, key = net(), net()
    key.requires_grad_(False)
    ref_query, ref_key = net(), net()
    ref_key.requires_grad_(False)
    # DQN: the target network is replaced by a soft update every step
    online, ref_online = net(), net()
    target, ref_target = online.clone(), net()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (query, ref_query)]
    dqn_opts = [torch.optim.Adam(m.parameters(), lr=0.01) for m in (online, ref_online)]
    for x in X:
        for q, k, o, ours in ((query, key, opts[0], True), (ref_query, ref_key, opts[1], False)):
            out_q = q(x)
            with torch.no_grad():
                if ours:
                    merge.ema_(k, q, decay=0.99)
                else:
                    for a, b in zip(k.parameters(), q.parameters()):
                        a.lerp_(b, 1 - 0.99)
                out_k = k(x)
            o.zero_grad()
            (out_q - out_k).pow(2).sum().backward()
            o.step()
        for m, t, o in ((online, target, dqn_opts[0]), (ref_online, ref_target, dqn_opts[1])):
            with torch.no_grad():
                goal = t(x).max(1).values
            o.zero_grad()
            F.mse_loss(m(x)[:, 0], goal).backward()
            o.step()
        target = 0.995 * target + 0.005 * online
        with torch.no_grad():
            for a, b in zip(ref_target.parameters(), ref_online.parameters()):
                a.copy_(0.995 * a + 0.005 * b)
    assert same(query, ref_query) and same(online, ref_online)
    for a, b in zip(key.parameters(), ref_key.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert same(target, ref_target)
    assert all(p.requires_grad and p.is_leaf and p.grad is None for p in target.parameters())


def test_grads_after_arithmetic_clone_detach_like_nytorch_11():
    model = net()
    model(X[0]).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    weight = model.a.weight
    model += 1                                  # in place: same Parameters, gradients kept
    assert model.a.weight is weight
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    for result in (model + 1, model.clone(), model.randn()):  # fresh leaves without gradients (1.1 too)
        assert all(p.is_leaf and p.grad is None and p.requires_grad for p in result.parameters())
    assert model.detach().a.weight.grad is model.a.weight.grad   # the very same Parameters


# -- a target holding inference tensors: refused before anything is written --------------------------

def _half_inference() -> nn.Sequential:
    torch.manual_seed(0)
    first = nn.Linear(3, 2)
    with torch.inference_mode():
        second = nn.Linear(3, 2)      # e.g. a head built while evaluating
    return nn.Sequential(first, second)


@pytest.mark.parametrize("call", [
    lambda m, o: merge.ema_(m, o, decay=0.5),
    lambda m, o: merge.ema_(dict(m.named_parameters()), dict(o.named_parameters()), decay=0.5),
    lambda m, o: merge.EMA(o).copy_to(m),
    lambda m, o: merge.EMA(o).swap(m).__enter__(),
], ids=["ema_", "ema_-dict", "EMA.copy_to", "EMA.swap"])
def test_inference_tensor_target_is_refused_before_any_write(call):
    model = _half_inference()
    online = nn.Sequential(nn.Linear(3, 2), nn.Linear(3, 2))
    before = [p.detach().clone() for p in model.parameters()]
    # torch refuses such a write too ("Inplace update to inference tensor outside InferenceMode"), but
    # part-way: the first layer had been written already
    with pytest.raises(RuntimeError, match=r"parameter '1\.(weight|bias)' is an inference tensor and cannot be "
                                           r"updated in place outside torch.inference_mode\(\)"):
        call(model, online)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with torch.inference_mode():      # inside inference mode the same update is allowed, as in torch
        call(model, online)


def test_es_step_and_weighted_average_under_autocast_match_outside():
    from nytorch import algorithms as alg
    center = seq()
    noise = alg.es_noise(center, 6, generator=torch.Generator().manual_seed(0))
    losses = torch.rand(6, generator=torch.Generator().manual_seed(1))
    swarm = Swarm.stack([seq() for _ in range(6)]) + noise
    expected = (alg.es_step(center, noise, losses, sigma=0.1, lr=0.01), merge.average(swarm, weights=losses))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # the ES step raised StructureError ("rsub: ... bfloat16 vs ... float32") from a bfloat16 gradient
        got = (alg.es_step(center, noise, losses, sigma=0.1, lr=0.01), merge.average(swarm, weights=losses))
    for g, e in zip(got, expected):
        for a, b in zip(g.parameters() if isinstance(g, nn.Module) else g.params.values(),
                        e.parameters() if isinstance(e, nn.Module) else e.params.values()):
            assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
