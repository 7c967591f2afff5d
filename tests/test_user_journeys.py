"""End-to-end user journeys written from the README, the docstrings and the notebooks only.

Each journey is a short realistic program (MoCo momentum encoder, DQN target network, soups of a
small transformer, hybrid PSO + SGD, a nytorch 1.1 program) checked against a plain-torch program
written independently; values must match where the math is the same.
"""
import contextlib
import copy
import functools
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nytorch as nyto
from nytorch import Swarm, merge
from nytorch import algorithms as alg


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_states_equal(got, expected):
    assert list(got) == list(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


# --------------------------------------------------------------------------------------------
# 1. MoCo: key encoder = EMA of the query encoder (conv net with BatchNorm)
# --------------------------------------------------------------------------------------------

def _encoder():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16))


def _info_nce(q, k, temperature=0.2):
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    return F.cross_entropy(q @ k.T / temperature, torch.arange(len(q)))


def _moco(momentum_update, steps=3, m=0.99):
    """MoCo v1's loop: the key encoder runs in train mode (its own BN statistics), never backpropagates."""
    torch.manual_seed(0)
    query = _encoder()
    key = copy.deepcopy(query)
    for p in key.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.SGD(query.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 3, 8, 8, generator=gen)
        xq, xk = (x + 0.1 * torch.randn(x.shape, generator=gen) for _ in range(2))
        q = query(xq)
        with torch.no_grad():
            momentum_update(key, query, m)
            k = key(xk)
        loss = _info_nce(q, k)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return _state(query), _state(key), losses


def _moco_reference(key, query, m):  # MoCo's code: parameters only, k = m·k + (1 − m)·q
    for pk, pq in zip(key.parameters(), query.parameters()):
        pk.data = pk.data * m + pq.data * (1.0 - m)


def _lerp_reference(key, query, m):  # torch.lerp(k, q, 1 − m), the same math rounded as lerp
    for pk, pq in zip(key.parameters(), query.parameters()):
        pk.copy_(torch.lerp(pk, pq, 1 - m))


@functools.lru_cache(maxsize=None)
def _moco_references():
    return _moco(_lerp_reference), _moco(_moco_reference)


def test_moco_momentum_encoder_matches_plain_torch():
    by_lerp, by_formula = _moco_references()
    for update, expected in [
        (lambda k, q, m: merge.ema_(k, q, decay=m, buffers="keep"), by_lerp),
        (lambda k, q, m: nyto.particle(k).lerp_(q, 1 - m), by_lerp),
        (lambda k, q, m: (m * nyto.particle(k) + (1 - m) * nyto.particle(q)).copy_to(k), by_formula),
    ]:
        query, key, losses = _moco(update)
        assert losses == expected[2]
        _assert_states_equal(query, expected[0])
        _assert_states_equal(key, expected[1])


class _NytoEncoder(nyto.NytoModule):
    def __init__(self):
        super().__init__()
        self.net = _encoder()

    def forward(self, x):
        return self.net(x)


def test_moco_written_with_nytomodule_operators():
    """``key = m * key + (1 - m) * query``: a new key each step, with the key's own BN statistics and flags."""
    def run(by_operators, steps=3, m=0.99):
        torch.manual_seed(0)
        query = _NytoEncoder()
        key = query.clone() if by_operators else copy.deepcopy(query)
        for p in key.parameters():
            p.requires_grad_(False)
        optimizer = torch.optim.SGD(query.parameters(), lr=0.1, momentum=0.9)
        gen = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(steps):
            x = torch.randn(8, 3, 8, 8, generator=gen)
            xq, xk = (x + 0.1 * torch.randn(x.shape, generator=gen) for _ in range(2))
            q = query(xq)
            with torch.no_grad():
                if by_operators:
                    key = m * key + (1 - m) * query
                else:
                    _moco_reference(key, query, m)
                k = key(xk)
            loss = _info_nce(q, k)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return key, losses

    key, losses = run(True)
    expected_key, expected_losses = run(False)
    assert losses == expected_losses
    _assert_states_equal(_state(key), _state(expected_key))
    assert type(key) is _NytoEncoder and key.training
    assert not any(p.requires_grad for p in key.parameters())


def test_moco_default_buffers_average_batchnorm_statistics():
    """``merge.ema_``'s default also averages BN statistics (timm's EMA), which MoCo's update does not."""
    torch.manual_seed(0)
    query, key = _encoder(), _encoder()
    query(torch.randn(4, 3, 8, 8))  # the statistics now differ
    before_key, before_query = _state(key), _state(query)
    merge.ema_(key, query, decay=0.9)
    after = _state(key)
    for name, value in before_key.items():
        if value.is_floating_point():
            assert torch.equal(after[name], torch.lerp(value, before_query[name], 0.1)), name
        else:  # num_batches_tracked: copied
            assert torch.equal(after[name], before_query[name]), name


# --------------------------------------------------------------------------------------------
# 2. DQN: soft target update (tau = 0.005) plus a hard copy every N steps
# --------------------------------------------------------------------------------------------

def _dqn(soft, hard, steps=12, tau=0.005, every=5, gamma=0.99, target_of=copy.deepcopy):
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))
    target = target_of(online)
    optimizer = torch.optim.Adam(online.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    s, a = torch.randn(256, 4, generator=gen), torch.randint(0, 2, (256,), generator=gen)
    r, s2 = torch.randn(256, generator=gen), torch.randn(256, 4, generator=gen)
    done = (torch.rand(256, generator=gen) < 0.1).float()
    losses = []
    for step in range(steps):
        i = torch.randint(0, 256, (32,), generator=gen)
        q = online(s[i]).gather(1, a[i, None]).squeeze(1)
        with torch.no_grad():
            y = r[i] + gamma * (1 - done[i]) * target(s2[i]).max(1).values
        loss = F.smooth_l1_loss(q, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        soft(target, online, tau)
        if (step + 1) % every == 0:
            hard(target, online)
        losses.append(loss.item())
    return _state(online), _state(target), losses


@torch.no_grad()
def _soft_lerp(target, online, tau):
    for pt, po in zip(target.parameters(), online.parameters()):
        pt.lerp_(po, tau)


@torch.no_grad()
def _soft_two_ops(target, online, tau):
    for pt, po in zip(target.parameters(), online.parameters()):
        pt.mul_(1 - tau).add_(tau * po)


def _hard_reference(target, online):
    target.load_state_dict(online.state_dict())


def _soft_in_place_operators(target, online, tau):
    p = nyto.particle(target)
    p *= 1 - tau
    p += tau * nyto.particle(online)


@functools.lru_cache(maxsize=None)
def _dqn_references():
    return _dqn(_soft_lerp, _hard_reference), _dqn(_soft_two_ops, _hard_reference)


@pytest.mark.parametrize("hard", [
    lambda t, o: nyto.particle(o).copy_to(t),
    lambda t, o: merge.ema_(t, o, tau=1.0),
    lambda t, o: merge.ema_(t, o, decay=0.0),
], ids=["copy_to", "tau1", "decay0"])
def test_dqn_soft_and_hard_target_updates_match_plain_torch(hard):
    by_lerp, by_two_ops = _dqn_references()
    for soft, expected in [
        (lambda t, o, tau: merge.ema_(t, o, tau=tau), by_lerp),
        (lambda t, o, tau: nyto.particle(t).lerp_(o, tau), by_lerp),
        (_soft_in_place_operators, by_two_ops),
    ]:
        online, target, losses = _dqn(soft, hard)
        assert losses == expected[2]
        _assert_states_equal(online, expected[0])
        _assert_states_equal(target, expected[1])


def test_dqn_with_merge_ema_as_the_target_network():
    """``merge.EMA(online, decay=1 - tau).averaged`` is the target; ``update()`` is the soft update."""
    held = {}

    def target_of(online):
        held["ema"] = merge.EMA(online, decay=1 - 0.005)
        return held["ema"].averaged

    online, target, losses = _dqn(lambda t, o, tau: held["ema"].update(),
                                  lambda t, o: nyto.particle(o, buffers=True).copy_to(t), target_of=target_of)
    expected = _dqn_references()[0]
    assert losses == expected[2]
    _assert_states_equal(online, expected[0])
    _assert_states_equal(target, expected[1])


def test_hard_copy_with_batchnorm_copies_buffers_only_with_buffers_true():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    online(torch.randn(5, 2))
    plain, with_buffers = (nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)) for _ in range(2))
    fresh = _state(plain)
    nyto.particle(online).copy_to(plain)
    nyto.particle(online, buffers=True).copy_to(with_buffers)
    for name, value in online.state_dict().items():
        assert torch.equal(with_buffers.state_dict()[name], value), name
        is_param = name.endswith(("weight", "bias"))
        assert torch.equal(plain.state_dict()[name], value if is_param else fresh[name]), name


def test_hard_copy_by_tau_one_is_lerp_where_the_target_diverged():
    online, target = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        target.weight.fill_(float("inf"))
    merge.ema_(target, online, tau=1.0)
    assert torch.equal(target.bias, online.bias)
    assert torch.isnan(target.weight).all()  # as torch.lerp(inf, x, 1.0)
    assert torch.isnan(torch.lerp(torch.tensor(float("inf")), torch.tensor(1.0), 1.0))


# --------------------------------------------------------------------------------------------
# 3. Soups and task arithmetic of three fine-tuned copies of a small transformer
# --------------------------------------------------------------------------------------------

class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.encoder = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


@pytest.fixture(scope="module")
def finetuned():
    torch.manual_seed(0)
    base = _Tiny()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 5, 4, generator=gen)
    y = (x.sum((1, 2)) > 0).long() + (x[:, 0, 0] > 1).long()
    models = []
    for k in range(3):
        model = copy.deepcopy(base)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(6):
            loss = F.cross_entropy(model(x[:64][k::3]), y[:64][k::3])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        models.append(model)
    return base, models, (x[64:], y[64:])


def test_transformer_uniform_and_weighted_soup(finetuned):
    base, models, _ = finetuned
    states = [_state(m) for m in models]
    soup = merge.average(models)
    weighted = merge.average(models, weights=[1, 2, 3])
    by_operators = ((nyto.particle(models[0]) + nyto.particle(models[1]) + nyto.particle(models[2])) / 3).module()
    assert type(soup) is _Tiny and type(by_operators) is _Tiny
    for name in states[0]:
        uniform = (states[0][name] + states[1][name] + states[2][name]) / 3
        torch.testing.assert_close(soup.state_dict()[name], uniform, rtol=0, atol=1e-6)  # a running mean of lerps
        assert torch.equal(by_operators.state_dict()[name], uniform), name
        torch.testing.assert_close(weighted.state_dict()[name],
                                   (states[0][name] + 2 * states[1][name] + 3 * states[2][name]) / 6,
                                   rtol=0, atol=1e-6)
    for m, s in zip(models, states):  # inputs untouched
        _assert_states_equal(_state(m), s)


@pytest.mark.parametrize("scale", [0.5, [0.3, 0.6, 1.0]])
def test_transformer_task_arithmetic(finetuned, scale):
    base, models, (x, _) = finetuned
    scales = scale if isinstance(scale, list) else [scale] * 3
    b = _state(base)
    expected = {name: b[name] + sum(s * (_state(m)[name] - b[name]) for s, m in zip(scales, models)) for name in b}
    merged = merge.task_arithmetic(base, models, scale=scale)
    _assert_states_equal(_state(merged), expected)
    reference = copy.deepcopy(base)
    reference.load_state_dict(expected)
    merged.eval(), reference.eval()
    with torch.no_grad():  # eval mode: TransformerEncoderLayer's fast path on packed views
        assert torch.equal(merged(x), reference(x))


def _plain_greedy_soup(models, evaluate):
    """Wortsman et al. 2022, Algorithm 1, an ingredient kept only if it strictly helps."""
    states = [_state(m) for m in models]

    def soup_of(indices):
        model = copy.deepcopy(models[0])
        model.load_state_dict({k: sum(states[i][k] for i in indices) / len(indices) for k in states[0]})
        return model

    order = sorted(range(len(models)), key=lambda i: evaluate(models[i]), reverse=True)
    ingredients, best = [order[0]], evaluate(models[order[0]])
    for i in order[1:]:
        score = evaluate(soup_of(ingredients + [i]))
        if score > best:
            ingredients, best = ingredients + [i], score
    return ingredients, best, soup_of(ingredients)


def test_transformer_greedy_soup(finetuned):
    base, models, (x, y) = finetuned
    target = _state(base)

    @torch.no_grad()
    def closeness(model):  # an evaluation under which more than one ingredient helps
        return -float(sum((v - target[k]).pow(2).sum() for k, v in model.state_dict().items()))

    @torch.no_grad()
    def neg_loss(model):
        model.eval()
        score = -float(F.cross_entropy(model(x), y))
        model.train()
        return score

    for evaluate in (closeness, neg_loss):
        ingredients, score, expected = _plain_greedy_soup(models, evaluate)
        soup = merge.greedy_soup(models, evaluate)
        assert soup.ingredients == ingredients
        assert soup.score == pytest.approx(score, rel=1e-6)
        for name, value in _state(expected).items():
            torch.testing.assert_close(soup.model.state_dict()[name], value, rtol=0, atol=1e-6)
    assert len(merge.greedy_soup(models, closeness).ingredients) == 3


# --------------------------------------------------------------------------------------------
# 4. Hybrid PSO + SGD on a toy regression with Swarm and nytorch.algorithms
# --------------------------------------------------------------------------------------------

P = 5
_X = torch.linspace(-2, 2, 32)[:, None]
_Y = torch.sin(2 * _X)


def _mlp():
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))


def _mse(member, x, y):
    return F.mse_loss(member(x), y)


def _flat(params):  # [P, n] in named_parameters() order
    return torch.cat([v.detach().reshape(len(v), -1) for v in params.values()], 1)


class _PlainSwarm:
    """P plain modules, gradients by torch.autograd.grad, PSO on one [P, n] matrix."""

    def __init__(self, modules):
        self.modules = [copy.deepcopy(m) for m in modules]
        self.sizes = [p.numel() for p in self.modules[0].parameters()]

    def sgd(self, lr):
        losses = []
        for module in self.modules:
            params = list(module.parameters())
            loss = _mse(module, _X, _Y)
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(lr * g)
            losses.append(loss.detach())
        return torch.stack(losses)

    def matrix(self):
        return torch.stack([torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in self.modules])

    @torch.no_grad()
    def set_matrix(self, x):
        for row, module in zip(x, self.modules):
            for p, part in zip(module.parameters(), row.split(self.sizes)):
                p.copy_(part.reshape(p.shape))

    @torch.no_grad()
    def losses(self):
        return torch.stack([_mse(m, _X, _Y) for m in self.modules])


def test_sgd_step_matches_a_loop_of_modules():
    torch.manual_seed(0)
    members = [_mlp() for _ in range(P)]
    swarm = Swarm.stack(members)
    plain = _PlainSwarm(members)
    for _ in range(5):
        swarm, losses = alg.sgd_step(swarm, _mse, _X, _Y, lr=0.1)
        expected = plain.sgd(0.1)
        torch.testing.assert_close(losses, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(_flat(swarm.params), plain.matrix(), rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(swarm(_X), torch.stack([m(_X) for m in plain.modules]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("c1, c2", [(0.8, 0.8), (0.0, 1.2)])
def test_hybrid_pso_sgd_matches_plain_torch(c1, c2):
    """SGD every step, a PSO step every 3 steps (r₁, r₂ ~ U[0, 1) per value, drawn r₁ then r₂;
    a zero coefficient draws nothing)."""
    torch.manual_seed(0)
    members = [_mlp() for _ in range(P)]
    swarm, plain = Swarm.stack(members), _PlainSwarm(members)
    w = 0.5
    gen, plain_gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)

    state = alg.pso_init(swarm, swarm(_X).sub(_Y).pow(2).mean((1, 2)).detach())
    x = plain.matrix()
    velocity, best, best_loss = torch.zeros_like(x), x.clone(), plain.losses()
    torch.testing.assert_close(state.best_loss, best_loss, rtol=0, atol=1e-6)
    state = alg.PSOState(state.velocity, state.best, best_loss.clone())  # one set of losses for both sides

    for step in range(9):
        swarm, _ = alg.sgd_step(swarm, _mse, _X, _Y, lr=0.05)
        plain.sgd(0.05)
        if (step + 1) % 3 == 0:
            torch.testing.assert_close(_flat(swarm.params), plain.matrix(), rtol=0, atol=1e-6)
            swarm = Swarm.from_params(members[0], {  # both sides go on from the very same positions
                name: part.reshape(v.shape) for (name, v), part in
                zip(swarm.params.items(), plain.matrix().split(plain.sizes, dim=1))})
            losses = plain.losses()
            swarm, state = alg.pso_step(swarm, losses, state, inertia=w, cognitive=c1, social=c2, generator=gen)

            x = plain.matrix()
            improved = losses < best_loss
            best = torch.where(improved[:, None], x, best)
            best_loss = torch.where(improved, losses, best_loss)
            g = best[best_loss.argmin()]
            r1 = torch.rand(x.shape, generator=plain_gen) if c1 else torch.zeros_like(x)
            r2 = torch.rand(x.shape, generator=plain_gen)
            velocity = w * velocity + c1 * r1 * (best - x) + c2 * r2 * (g - x)
            plain.set_matrix(x + velocity)

            assert torch.equal(_flat(swarm.params), plain.matrix())
            assert torch.equal(_flat(state.velocity.params), velocity)
            assert torch.equal(_flat(state.best.params), best)
            assert torch.equal(state.best_loss, best_loss)


def test_hybrid_loop_pulls_toward_the_best_by_the_losses_before_the_step():
    torch.manual_seed(0)
    members = [_mlp() for _ in range(P)]
    final, history = alg.hybrid(Swarm.stack(members), _mse, [(_X, _Y)] * 6, lr=0.05, every=3, alpha=0.5,
                                show_progress=False)
    plain = _PlainSwarm(members)
    expected_history = []
    for step in range(6):
        losses = plain.sgd(0.05)  # the losses of the positions before this SGD step
        expected_history.append(losses)
        if (step + 1) % 3 == 0:  # subset=None: every member, pulled toward the best by those losses
            x = plain.matrix()
            plain.set_matrix(torch.lerp(x, x[losses.argmin()].expand_as(x), 0.5))
    torch.testing.assert_close(history, torch.stack(expected_history), rtol=0, atol=1e-6)
    torch.testing.assert_close(_flat(final.params), plain.matrix(), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# 5. A nytorch 1.1 program, written from the README's migration section, run unchanged
# --------------------------------------------------------------------------------------------

PROGRAM_11 = '''
import json, torch
import torch.nn as nn
import torch.nn.functional as F
from nytorch.module import NytoModule, ParamProduct
from nytorch.mtype import ParamConfig


class Linear(NytoModule):
    def __init__(self, i, o):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i) * 0.5)
        self.bias = nn.Parameter(torch.zeros(o))

    def forward(self, x):
        return x @ self.weight.T + self.bias


class Net(NytoModule):
    def __init__(self):
        super().__init__()
        self.layer0 = Linear(3, 5)
        self.layer1 = Linear(5, 2)

    def forward(self, x):
        return self.layer1(torch.tanh(self.layer0(x)))


def flat(net):
    return [p.detach().flatten().tolist() for p in net.parameters()]


out = {}
torch.manual_seed(0)
net = Net()
x, y = torch.randn(16, 3), torch.randn(16, 2)
out["start"] = flat(net)


def train(net, lr):
    new = net.clone()
    optimizer = torch.optim.SGD(new.parameters(), lr=lr)
    loss = F.mse_loss(new(x), y)
    optimizer.zero_grad(); loss.backward(); optimizer.step()
    return new, loss.item()


net0 = net                                           # 1.1's momentum example
net1, _ = train(net0, 0.1)
losses = []
for _ in range(5):
    stepped, loss = train(net1, 0.1)
    net1, net0 = stepped + 0.9 * (net1 - net0), net1
    losses.append(loss)
out["momentum_losses"], out["momentum"] = losses, flat(net1)

net.set_param_config(operational=False, name="layer0")
out["doubled"] = flat(2 * net)
net.set_param_config(operational=True)

weights = {net.get_param_id(p) for n, p in net.named_parameters() if n.endswith("weight")}
def mark(param_id, config):
    config.is_weight = param_id in weights
net.apply_param_config(mark)
out["half_weights"] = flat(net.product().unary_operator(
    lambda p, config: p * 0.5 if config.is_weight else p.clone()).module())
other = net + 1
out["maximum"] = flat(net.product().binary_operator(other.product(), lambda a, b, config: torch.maximum(a, b)).module())

product: ParamProduct = net.product()
net.product_(product * 3)
out["product_"] = flat(net)
out["clone_from"] = flat(net.clone_from(other))
out["detach_shares"] = all(a is b for a, b in zip(net.detach().parameters(), net.parameters()))
out["config"] = [ParamConfig().operational, ParamConfig().clone]
print("JSON" + json.dumps(out))
'''


def _run_here():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(PROGRAM_11, "program_11", "exec"), {"__name__": "program_11"})
    return json.loads(out.getvalue().split("JSON", 1)[1])


def _run_program(pythonpath):
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    done = subprocess.run([sys.executable, "-c", PROGRAM_11], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.split("JSON", 1)[1])


def _plain_11_reference(start):
    """The same program in plain torch: momentum SGD, and each operator per tensor."""
    torch.manual_seed(0)
    shapes = [(5, 3), (5,), (2, 5), (2,)]
    params = [torch.tensor(v).reshape(s) for v, s in zip(start, shapes)]
    torch.randn(5, 3), torch.randn(2, 5)  # the model's draws
    x, y = torch.randn(16, 3), torch.randn(16, 2)

    def forward(ps, x):
        return torch.tanh(x @ ps[0].T + ps[1]) @ ps[2].T + ps[3]

    model = [p.clone().requires_grad_() for p in params]
    optimizer = torch.optim.SGD(model, lr=0.1, momentum=0.9)  # the first step has no momentum, like 1.1's loop
    losses = []
    for _ in range(6):
        loss = F.mse_loss(forward(model, x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        losses.append(loss.item())
    out = {"momentum_losses": losses[1:], "momentum": [p.detach().flatten().tolist() for p in model]}
    flat = lambda ts: [t.flatten().tolist() for t in ts]  # noqa: E731
    out["doubled"] = flat(params[:2] + [2 * p for p in params[2:]])
    out["half_weights"] = flat([p * 0.5 if i % 2 == 0 else p for i, p in enumerate(params)])
    out["maximum"] = flat([torch.maximum(p, p + 1) for p in params])
    tripled = [p * 3 for p in params]
    out["product_"] = flat(tripled)
    out["clone_from"] = flat([p + 1 for p in params])
    return out


def test_port_of_a_nytorch_11_program():
    ours = _run_here()
    expected = _plain_11_reference(ours["start"])
    assert ours["momentum_losses"] == pytest.approx(expected["momentum_losses"], rel=1e-6)
    for key in ("momentum",):
        for a, b in zip(ours[key], expected[key]):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    for key in ("doubled", "half_weights", "maximum", "product_", "clone_from"):
        assert ours[key] == expected[key], key
    assert ours["detach_shares"] is True and ours["config"] == [True, True]


@pytest.mark.slow
def test_port_of_a_nytorch_11_program_prints_what_11_prints():
    nyto11 = Path(os.environ.get("NYTORCH11_PATH", "/tmp/nyto11"))
    if not (nyto11 / "nytorch").is_dir():
        pytest.skip(f"nytorch 1.1 is not installed in {nyto11}")
    assert _run_program(nyto11) == _run_here()


# --------------------------------------------------------------------------------------------
# Found on the way: soups of one Swarm's members left out their BatchNorm statistics
# --------------------------------------------------------------------------------------------

def _bn_members():
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)) for _ in range(3)]
    for k, member in enumerate(members):
        for _ in range(k + 1):
            member(torch.randn(6, 3))
    return members


def test_average_of_a_swarm_averages_its_members_buffers():
    members = _bn_members()
    swarm = Swarm.stack(members)  # buffers stacked, not taken into arithmetic (the default)
    weights = [0.2, 0.3, 0.5]
    soup = merge.average(swarm, weights=torch.tensor(weights))
    assert type(soup) is nyto.Particle
    got = soup.module().state_dict()
    for name, value in members[0].state_dict().items():
        if value.is_floating_point():
            expected = sum(w * m.state_dict()[name] for w, m in zip(weights, members))
            torch.testing.assert_close(got[name], expected, rtol=0, atol=1e-6, msg=name)
        else:  # num_batches_tracked: the first member's, as for a list of models
            assert torch.equal(got[name], value), name
    models = merge.average(members, weights=weights).state_dict()
    for name in models:
        torch.testing.assert_close(got[name], models[name], rtol=0, atol=1e-6, msg=name)
    assert type(swarm + soup) is Swarm  # still a Particle of the swarm's kind
    kept = merge.average(swarm, buffers="keep").module().state_dict()
    for name, value in members[0].state_dict().items():
        if not name.startswith(("0.", "3.")) and not name.endswith(("weight", "bias")):
            assert torch.equal(kept[name], value), name


def test_greedy_soup_of_a_swarm_averages_its_ingredients_buffers():
    members = _bn_members()
    swarm = Swarm.stack(members)
    soup = merge.greedy_soup(swarm, lambda p: -float(p.params["0.bias"].abs().sum()))
    got = soup.model.module().state_dict()
    chosen = [members[i] for i in soup.ingredients]
    assert len(chosen) > 1
    for name, value in members[soup.ingredients[0]].state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(got[name], sum(m.state_dict()[name] for m in chosen) / len(chosen),
                                       rtol=0, atol=1e-6, msg=name)


def test_a_loss_that_asks_a_member_for_parameters_is_told_what_a_member_offers():
    """A plain-PyTorch regulariser (``member.parameters()``) inside ``sgd_step``; ``member.params`` works."""
    torch.manual_seed(0)
    members = [_mlp() for _ in range(P)]

    def ported(member, x, y):
        return _mse(member, x, y) + 1e-2 * sum(p.pow(2).sum() for p in member.parameters())

    with pytest.raises(AttributeError, match=r"swarm member: expected member\(\*inputs\), member.params or "
                                             r"member.buffers .* got member.parameters \(member.params.values\(\)"):
        alg.sgd_step(Swarm.stack(members), ported, _X, _Y, lr=0.1)

    def regularised(member, x, y):
        return _mse(member, x, y) + 1e-2 * sum(p.pow(2).sum() for p in member.params.values())

    swarm, losses = alg.sgd_step(Swarm.stack(members), regularised, _X, _Y, lr=0.1)
    for k, module in enumerate(copy.deepcopy(members)):
        params = list(module.parameters())
        loss = _mse(module, _X, _Y) + 1e-2 * sum(p.pow(2).sum() for p in params)
        grads = torch.autograd.grad(loss, params)
        torch.testing.assert_close(losses[k], loss.detach(), rtol=0, atol=1e-6)
        for (name, value), p, g in zip(swarm.params.items(), params, grads):
            torch.testing.assert_close(value[k], (p - 0.1 * g).detach(), rtol=0, atol=1e-6, msg=name)


def test_merges_of_particles_average_buffers_only_when_the_particles_carry_them():
    members = _bn_members()
    first = _state(members[0])
    plain = merge.average([nyto.particle(m) for m in members]).module().state_dict()
    carried = merge.average([nyto.particle(m, buffers=True) for m in members]).module().state_dict()
    for name, value in first.items():
        if name.startswith("1.running"):
            assert torch.equal(plain[name], value), name
            torch.testing.assert_close(carried[name], sum(m.state_dict()[name] for m in members) / 3,
                                       rtol=0, atol=1e-6, msg=name)
    target, online = members[0], members[1]
    before = _state(target)
    merge.ema_(nyto.particle(target), nyto.particle(online), tau=0.5)
    assert torch.equal(target[1].running_mean, before["1.running_mean"])
    merge.ema_(nyto.particle(target, buffers=True), nyto.particle(online, buffers=True), tau=0.5)
    assert torch.equal(target[1].running_mean, torch.lerp(before["1.running_mean"], online[1].running_mean, 0.5))
