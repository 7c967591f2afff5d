"""nytorch 1.1 programs, run unchanged here and on the reference 1.1: same numbers, same facts.

Where ``tests/test_compat_11.py`` checks the 1.1 README and docstring examples, these are whole
programs written in 1.1's documented style (its README, docstrings and ReadTheDocs chapters):
nested ``NytoModule``s with operators against numbers, NumPy numbers and 0-dim tensors (reflected,
in place, ``pow``, ``neg``/``pos``, ``==`` and hashing as ``nn.Module`` defines them), ``product()``
arithmetic and ``product_()``, custom ``unary_operator`` / ``binary_operator`` functions reading
custom ``ParamConfig`` attributes, configs set on submodules, parameters and after a product was
taken, training with optimizers between operations, ``state_dict`` round trips, ``.to(dtype)``,
``detach``, ``clone_from``, seeded ``randn`` / ``rand``, and the chapters' LSTM, CNN and swarm
examples.  ``PROGRAMS`` runs in this process against this nytorch and in a subprocess against
``/tmp/nyto11`` (skipped where it is missing); the printed values are compared key by key:
bit for bit under ``exact.`` (elementwise arithmetic in four dtypes), within 1e-6 elsewhere.

Every program here avoids what the README's migration section lists as different (param ids,
``touch()``, models of two species) and what its Semantics section changes on purpose (buffers
are cloned into results, integer parameters are carried, tied weights stay tied).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import nytorch as nyto
import nytorch.functional as nf

NYTO11 = Path(os.environ.get("NYTORCH11_PATH", "/tmp/nyto11"))
ROOT = Path(__file__).resolve().parents[1]

PROGRAMS = r'''
import json, random, torch
import numpy as np
from torch import nn
import torch.nn.functional as F
import nytorch
import nytorch as nyto
from nytorch import NytoModule
from nytorch.mtype import ParamConfig


def values(module, digits=None):
    rnd = (lambda x: x) if digits is None else (lambda x: round(x, digits))
    return {n: [rnd(float(x)) for x in p.detach().reshape(-1).tolist()] for n, p in module.named_parameters()}


def outcome(fn):
    try:
        result = fn()
    except Exception as error:  # both sides must fail alike (1.1 asserts, this nytorch raises TypeError...)
        return "raises"
    return [type(result).__name__, values(result) if isinstance(result, nn.Module) else repr(result)]


class Sub(NytoModule):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.scale = nn.Parameter(torch.tensor([0.5, 1.5]))

    def forward(self, x):
        return self.lin(x) * self.scale


class Net(NytoModule):
    def __init__(self):
        super().__init__()
        self.first = Sub()
        self.second = Sub()
        self.head = nn.Linear(2, 1)

    def forward(self, x):
        return self.head(self.second(torch.tanh(self.first(x))))


def operators(out):
    torch.manual_seed(0)
    net = Net()
    net2 = net.clone_from(Net())
    x = torch.randn(3, 2)
    exprs = {
        "net+1": lambda: net + 1, "1+net": lambda: 1 + net, "net-1.5": lambda: net - 1.5,
        "1.5-net": lambda: 1.5 - net, "3*net": lambda: 3 * net, "net/4": lambda: net / 4,
        "3.7/net": lambda: 3.7 / net, "-0.3/net": lambda: -0.3 / net, "net**2": lambda: net ** 2,
        "net**3": lambda: net ** 3, "2**net": lambda: 2 ** net, "-net": lambda: -net, "+net": lambda: +net,
        "net+net2": lambda: net + net2, "net-net2": lambda: net - net2, "net*net2": lambda: net * net2,
        "net/net2": lambda: net / net2, "c**net2": lambda: (net * 0 + 1.5) ** net2,
        "net*t": lambda: net * torch.tensor(2.5), "t*net": lambda: torch.tensor(2.5) * net,
        "t-net": lambda: torch.tensor(2.5) - net, "t/net": lambda: torch.tensor(3.7) / net,
        "t**net": lambda: torch.tensor(1.5) ** net, "net*t64": lambda: net * torch.tensor(2.5, dtype=torch.float64),
        "net*np": lambda: net * np.float64(0.5), "np*net": lambda: np.float64(0.5) * net,
        "np32+net": lambda: np.float32(0.5) + net, "np/net": lambda: np.float64(3.7) / net,
        "net*npint": lambda: net * np.int64(3), "net*True": lambda: net * True,
        "sub*2": lambda: net.first * 2, "2*sub": lambda: 2 * net.second, "sub+sub2": lambda: net.first + net2.first,
        "net+str": lambda: net + "a", "net+None": lambda: net + None,
    }
    for key, fn in exprs.items():
        out["op." + key] = outcome(fn)
    result = 0.5 * (net + net2) - 0.1 * net / 3
    out["op.types"] = [type(result).__name__, type(result.first).__name__, type(result.head).__name__]
    out["op.fresh"] = [p.requires_grad and p.is_leaf and p.grad is None for p in result.parameters()]
    out["op.forward"] = result(x).reshape(-1).tolist()
    out["op.net unchanged"] = values(net)
    out["op.eq hash"] = [net == net, net == net.clone(), net != net2, len({net, net2, net}), hash(net) == hash(net)]
    net.eval()
    evaluated = net * 2
    out["op.eval kept"] = [evaluated.training, evaluated.first.training]
    net.train()
    for op in ["+=", "-=", "*=", "/=", "**="]:
        for operand in ("1.5", "net2", "torch.tensor(0.5)"):
            target = net.clone()
            objects = [id(p) for p in target.parameters()]
            scope = {"target": target, "net2": net2, "torch": torch}
            exec("target " + op + " " + operand, scope)
            key = "op.inplace " + op + " " + operand
            out[key] = values(scope["target"])
            out[key + " same"] = [id(p) for p in scope["target"].parameters()] == objects
    population = [net.clone_from(Net()) for _ in range(3)]
    out["op.sum/3"] = values(sum(population) / 3)


def exact(out):
    class Wide(NytoModule):
        def __init__(self, dtype):
            super().__init__()
            self.a = nn.Parameter(torch.randn(300, dtype=dtype))
            self.b = nn.Parameter(torch.randn(7, 5, dtype=dtype) * 7)

    for dtype in [torch.float32, torch.float16, torch.bfloat16, torch.float64]:
        torch.manual_seed(0)
        a = Wide(dtype)
        b, c = a.clone_from(Wide(dtype)), a.clone_from(Wide(dtype))
        key = "exact." + str(dtype) + " "
        out[key + "momentum"] = values(a + 0.9 * (a - b))
        out[key + "momentum2"] = values(0.9 * (a - b) + a)
        out[key + "soup"] = values((a + b + c) / 3)
        out[key + "ema"] = values(0.99 * a + 0.01 * b)
        out[key + "chain"] = values(((a * 1.7 - b / 3) * 2 + 1 / (c + 10)) * 0.3 - 1.5)
        out[key + "rsub"] = values(1.5 - 0.3 * (a - 0.7 * b))
        for s in (3.7, 0.1, -2.3, 7):
            out[key + str(s) + "/a"] = values(s / a)
            out[key + str(s) + "/a product"] = values((s / a.product()).module())
            out[key + "t" + str(s) + "/a"] = values(torch.tensor(s) / a)
            out[key + "a/" + str(s)] = values(a / s)
        out[key + "a/b"] = values(a / b)
        target = a.clone()
        target *= 0.99
        target += 0.01 * b
        out[key + "ema inplace"] = values(target)
        target = a.clone()
        target -= 0.1 * (b - c)
        out[key + "isub"] = values(target)
        torch.manual_seed(3)
        out[key + "randn"] = values(a.randn())
        torch.manual_seed(3)
        out[key + "rand"] = values(a.rand())
        torch.manual_seed(3)
        out[key + "product randn"] = values(a.product().randn().module())


class Block(NytoModule):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.gain = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.lin(x) * self.gain


class Frozen(NytoModule):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.head = nn.Linear(2, 1)
        self.frozen = nn.Parameter(torch.tensor([3.0, 4.0]), requires_grad=False)

    def forward(self, x):
        return self.head(self.block(x)) + self.frozen.sum()


def products(out):
    torch.manual_seed(1)
    a = Frozen()
    b = a.clone_from(Frozen())
    pa, pb = a.product(), b.product()
    exprs = {
        "pa+pb": lambda: pa + pb, "pa-pb": lambda: pa - pb, "pa*pb": lambda: pa * pb, "pa/pb": lambda: pa / pb,
        "pa*2": lambda: pa * 2, "2*pa": lambda: 2 * pa, "2-pa": lambda: 2 - pa, "3.7/pa": lambda: 3.7 / pa,
        "pa**2": lambda: pa ** 2, "2**pa": lambda: 2 ** pa, "-pa": lambda: -pa, "+pa": lambda: +pa,
        "1+pa": lambda: 1 + pa, "clone": lambda: pa.clone(), "mix": lambda: 0.5 * (pa + pb) - 0.1 * pa / 2,
    }
    for key, fn in exprs.items():
        out["prod." + key] = values(fn().module())
    out["prod.particle"] = values((pa * 3).particle())
    out["prod.requires_grad"] = [(pa * 2).module().frozen.requires_grad, (a * 2).frozen.requires_grad,
                                 a.clone().frozen.requires_grad, a.randn().frozen.requires_grad]
    target = a.clone()
    objects = [id(p) for p in target.parameters()]
    returned = target.product_((pa + pb) / 2)
    out["prod.product_"] = values(target)
    out["prod.product_ keeps"] = [[id(p) for p in target.parameters()] == objects, returned is target]
    out["prod.unary"] = values(pa.unary_operator(lambda p, c: nn.Parameter(p * 2 + 1)).module())
    out["prod.binary"] = values(pa.binary_operator(pb, lambda p, q, c: nn.Parameter(torch.maximum(p, q))).module())
    seen = []
    pa.unary_operator(lambda p, c: seen.append([c.operational, c.clone, torch.is_grad_enabled(),
                                                type(p).__name__]) or p)
    out["prod.unary sees"] = seen
    # a product views its model: an in-place step on the model shows in it
    prod = b.product()
    b += 1
    out["prod.after iadd"] = values(prod.module())
    # configs
    a.set_param_config(operational=False, name="frozen")
    a.block.set_param_config(operational=False, clone=False, name="gain")
    result = a * 10
    out["cfg.result"] = values(result)
    out["cfg.shares"] = [result.block.gain is a.block.gain, result.frozen is a.frozen]
    result = (a.product() * 10).module()
    out["cfg.product"] = values(result)
    out["cfg.product shares"] = result.block.gain is a.block.gain
    out["cfg.clone_from source shares configs"] = values(b * 10)
    seen = []
    a.apply_param_config(lambda pid, c: seen.append([c.operational, c.clone]))
    out["cfg.apply all"] = sorted(seen)
    for name in ("block", "frozen", "head"):
        seen = []
        a.apply_param_config(lambda pid, c: seen.append([c.operational, c.clone]), name)
        out["cfg.apply " + name] = sorted(seen)
    seen = []
    a.block.apply_param_config(lambda pid, c: seen.append([c.operational, c.clone]))
    out["cfg.apply on submodule"] = sorted(seen)
    target = a.clone()
    gain = target.block.gain
    target += 1
    out["cfg.iadd"] = values(target)
    out["cfg.iadd keeps"] = target.block.gain is gain
    target = a.clone()
    target += a
    out["cfg.iadd model"] = values(target)
    out["cfg.bad name"] = outcome(lambda: a.set_param_config(operational=False, name="nope"))
    out["cfg.ids agree"] = sorted(a.get_param_id(p) for p in a.parameters()) == list(range(6))
    c = Frozen()
    c.set_param_config(operational=False, name="head")
    out["cfg.randn keeps head"] = values(c.randn())["head.weight"] == values(c)["head.weight"]
    out["cfg.clone objects"] = [p is q for p, q in zip(c.clone().parameters(), c.parameters())]
    c.set_param_config(clone=False, name="head")
    out["cfg.clone objects clone=False"] = [p is q for p, q in zip(c.clone().parameters(), c.parameters())]
    out["cfg.randn objects clone=False"] = [p is q for p, q in zip(c.randn().parameters(), c.parameters())]
    out["cfg.detach objects"] = [p is q for p, q in zip(c.detach().parameters(), c.parameters())]
    source = Frozen()
    derived = source + 0
    source.set_param_config(operational=False, name="block")
    out["cfg.derived follows"] = values(derived * 0)
    detached = source.detach()
    detached.set_param_config(operational=True)
    out["cfg.detach is own species"] = [values(source * 0), values(detached * 0)]
    marked = Frozen()
    weights = {marked.get_param_id(p) for name, p in marked.named_parameters() if name.endswith("weight")}
    marked.apply_param_config(lambda pid, c: setattr(c, "lr", 2.0 if pid in weights else 0.5))
    later = marked + 0
    out["cfg.custom attribute"] = sorted(
        sum(values(later.product().unary_operator(lambda p, c: nn.Parameter(p * c.lr)).module()).values(), []))


class Trained(NytoModule):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(4, 8)
        self.l2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


def training(out):
    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 4, generator=generator), torch.randint(0, 3, (32,), generator=generator)
    torch.manual_seed(0)
    net = Trained()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    ema = net.clone()
    for step in range(6):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
        ema *= 0.8
        ema += 0.2 * net
        if step == 2:
            grads = [p.grad.clone() for p in net.parameters()]
            net += 0.01  # between steps: the optimizer keeps its Parameters, .grad is kept
            out["train.grad kept"] = all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads))
    out["train.net"] = values(net)
    out["train.ema"] = values(ema)
    child = (net + ema) / 2
    adam = torch.optim.Adam(child.parameters(), lr=0.01)
    for _ in range(3):
        adam.zero_grad()
        F.cross_entropy(child(x), y).backward()
        adam.step()
    out["train.child"] = values(child)
    out["train.net after child"] = values(net)
    state = child.state_dict()
    out["train.keys"] = list(state)
    fresh = Trained()
    fresh.load_state_dict(state)
    out["train.loaded"] = values(fresh)
    result = net * 0
    result.load_state_dict(state)
    out["train.loaded into result"] = values(result - child)
    net.load_state_dict(ema.state_dict())
    optimizer.zero_grad()
    F.cross_entropy(net(x), y).backward()
    optimizer.step()
    out["train.stepped after load"] = values(net - 1)
    double = net.double()
    out["train.double"] = [double is net, [str(p.dtype) for p in (double * 2).parameters()],
                           values(double * 2 + double)]
    other = Trained().to(torch.float64)
    out["train.to dtypes"] = [str(p.dtype) for p in (other + other.clone_from(Trained().double())).parameters()]
    out["train.float"] = values(double.float() / 3)
    detached = net.detach()
    detached += 1
    out["train.detach writes through"] = values(net)
    clone_source = Trained()
    copied = net.clone_from(clone_source)
    out["train.clone_from"] = [values(copied) == values(clone_source),
                               [p is q for p, q in zip(copied.parameters(), clone_source.parameters())]]
    torch.manual_seed(7)
    out["train.randn"] = values(net.randn())
    torch.manual_seed(7)
    out["train.rand"] = values(net.rand())
    with torch.no_grad():
        made = net + 1
    out["train.no_grad result trains"] = [p.requires_grad for p in made.parameters()]


def docs(out):
    # ReadTheDocs "Version manager": a frozen, shared embedding in an LSTM tagger
    class LSTMTagger(nyto.NytoModule):
        def __init__(self, word_embeddings, embedding_dim, hidden_dim, tagset_size):
            super().__init__()
            self.word_embeddings = word_embeddings
            self.lstm = nn.LSTM(embedding_dim, hidden_dim)
            self.hidden2tag = nn.Linear(hidden_dim, tagset_size)
            self.set_param_config(operational=False, clone=False, name="word_embeddings")

        def forward(self, sentence):
            embeds = self.word_embeddings(sentence)
            lstm_out, _ = self.lstm(embeds.view(len(sentence), 1, -1))
            return F.softmax(self.hidden2tag(lstm_out.view(len(sentence), -1)), dim=1)

    torch.manual_seed(0)
    embedding = nn.Embedding(32, 6).requires_grad_(False)
    net1 = LSTMTagger(embedding, 6, 6, 3)
    torch.manual_seed(1)
    net2, net3 = net1.randn(), net1.randn()
    mix = 0.5 * net1 + 0.25 * (net2 + net3)
    out["docs.lstm shared"] = [net2.word_embeddings.weight is embedding.weight,
                               mix.word_embeddings.weight is embedding.weight]
    out["docs.lstm mix"] = values(mix)
    out["docs.lstm forward"] = mix(torch.tensor([1, 5, 7, 2])).reshape(-1).tolist()

    # "Customized operation": weights marked by id, random weights and zero biases
    class CNN(nyto.NytoModule):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Sequential(nn.Conv2d(1, 4, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2))
            self.conv2 = nn.Sequential(nn.Conv2d(4, 8, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2))
            self.output_layer = nn.Linear(8 * 2 * 2, 10)

        def forward(self, x):
            x = self.conv2(self.conv1(x))
            x = x.view(x.size(0), -1)
            return self.output_layer(x), x

    net = CNN()
    weight_set = {net.get_param_id(p) for name, p in net.named_parameters() if name.split(".")[-1] == "weight"}

    def making_weight_and_bias(pid, config):
        config.is_weight = pid in weight_set

    net.apply_param_config(making_weight_and_bias)
    printed = []
    net.apply_param_config(lambda pid, config: printed.append(f"{pid=} {config=}"))
    out["docs.printed configs"] = printed

    def randn_weight(param, config):
        if config.is_weight:
            return nn.Parameter(torch.randn_like(param))
        return nn.Parameter(torch.zeros_like(param))

    torch.manual_seed(3)
    out["docs.randn_weight"] = values(net.product().unary_operator(randn_weight).module())

    # a config set after the product was taken still counts
    class Linear(nyto.NytoModule):
        def __init__(self, w, b):
            super().__init__()
            self.weight = nn.Parameter(torch.Tensor([w]))
            self.bias = nn.Parameter(torch.Tensor([b]))

    def my_unary_operation(param, config):
        if config.operational:
            return nn.Parameter(2 * param + 5)
        elif config.clone:
            return nn.Parameter(param.clone())
        return param

    lin = Linear(2.0, 1.0)
    product = lin.product()
    lin.set_param_config(operational=False, name="bias")
    out["docs.late config"] = [values(product.unary_operator(my_unary_operation).module()),
                               values((product * 2 + 5).module())]
    net1, net2 = Linear(1.0, 2.0), Linear(3.0, 4.0)
    net3 = net1.clone()
    net3.load_state_dict(net2.state_dict())
    out["docs.clone_from equivalents"] = [values(net1 + net3), values(net1 + net1.clone_from(net2))]

    # "Example code": gradient descent with a periodic swarm step on products (without ParticleModule)
    class Model:
        @classmethod
        def from_product(cls, product):
            return cls(product.module())

        def __init__(self, particle):
            self.particle = particle
            self.optimizer = torch.optim.SGD(self.particle.parameters(), lr=0.05)

        def product(self):
            return self.particle.product()

        def train(self, data, target):
            self.particle.train()
            self.optimizer.zero_grad()
            loss = F.nll_loss(F.log_softmax(self.particle(data), dim=1), target)
            loss.backward()
            self.optimizer.step()
            return loss.item()

    torch.manual_seed(4)
    random.seed(4)
    pool = [Trained() for _ in range(5)]
    first = pool[0]
    pool = [Model(first.clone_from(p)) for p in pool[1:]] + [Model(first)]
    generator = torch.Generator().manual_seed(5)
    x, y = torch.randn(64, 4, generator=generator), torch.randint(0, 3, (64,), generator=generator)
    for step in range(12):
        batch = slice((step % 4) * 16, (step % 4 + 1) * 16)
        losses = [model.train(x[batch], y[batch]) for model in pool]
        if (step + 1) % 4 == 0:
            chosen = sorted(random.choices(range(len(pool)), k=3), key=lambda i: losses[i])
            best = chosen[0]
            for i in chosen:
                if i != best:
                    pool[i] = Model.from_product(0.5 * pool[best].product() + (1 - 0.5) * pool[i].product())
    out["docs.pool"] = [values(model.particle) for model in pool]
    out["docs.pool losses"] = losses


def run():
    out = {}
    operators(out)
    exact(out)
    products(out)
    training(out)
    docs(out)
    out["_file"] = nytorch.__file__
    return out


if __name__ == "__main__":
    print(json.dumps(run()))
'''


@pytest.fixture(scope="module")
def ours() -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "nyto_compat_programs"}
    exec(compile(PROGRAMS, "<compat-programs>", "exec"), namespace)
    result: dict[str, Any] = json.loads(json.dumps(namespace["run"]()))
    assert Path(result.pop("_file")).resolve().is_relative_to(ROOT)
    return result


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    if not (NYTO11 / "nytorch" / "module.py").exists():
        pytest.skip(f"reference nytorch 1.1 not installed at {NYTO11}")
    env = {**os.environ, "PYTHONPATH": str(NYTO11)}
    done = subprocess.run([sys.executable, "-c", PROGRAMS], capture_output=True, text=True, env=env,
                          cwd="/", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(result.pop("_file")).resolve().is_relative_to(NYTO11.resolve())  # really the 1.1 reference
    return result


def _same(a: Any, b: Any, *, exact: bool) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k], exact=exact) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y, exact=exact) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        if exact or math.isinf(a) or math.isinf(b):
            return a == b
        return abs(a - b) <= 1e-6 * max(1.0, abs(a))
    return type(a) is type(b) and bool(a == b)


def test_same_programs_ran(ours: dict[str, Any], reference: dict[str, Any]) -> None:
    assert list(ours) == list(reference)


@pytest.mark.parametrize("prefix", ["op.", "exact.", "prod.", "cfg.", "train.", "docs."])
def test_programs_match_nytorch_11(ours: dict[str, Any], reference: dict[str, Any], prefix: str) -> None:
    keys = [k for k in reference if k.startswith(prefix)]
    assert keys
    exact = prefix == "exact."
    mismatched = {k: (ours.get(k), reference[k]) for k in keys if not _same(ours.get(k), reference[k], exact=exact)}
    assert not mismatched, list(mismatched)[:10]


def test_programs_hold_on_this_nytorch(ours: dict[str, Any]) -> None:
    # the facts 1.1's documentation states, independently of the reference run
    assert ours["op.net+str"] == "raises" and ours["op.net+None"] == "raises"
    assert ours["op.eq hash"] == [True, False, True, 2, True]
    assert all(ours[k] for k in ours if k.startswith("op.inplace") and k.endswith(" same"))
    assert all(ours["op.fresh"]) and ours["op.eval kept"] == [False, False]
    assert ours["cfg.shares"] == [True, False] and ours["cfg.product shares"]
    assert ours["cfg.clone objects clone=False"] == [False, False, False, False, True, True]
    assert all(ours["cfg.detach objects"]) and ours["prod.product_ keeps"] == [True, True]
    assert ours["docs.lstm shared"] == [True, True] and ours["train.grad kept"]
    assert ours["docs.late config"][0] == {"weight": [9.0], "bias": [1.0]}


# -- `number / model` rounds as `number / tensor` does ---------------------------------------------------
# torch's `Tensor.__rtruediv__` is `reciprocal() * number` (two roundings); nytorch 1.1 wrote `other / p`
# and got exactly that.  `torch.div(number, tensor)` rounds once and differs in the last bit.
class _Wide(nyto.NytoModule):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(257, dtype=dtype))
        self.b = nn.Parameter(torch.randn(6, 5, dtype=dtype) * 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64],
                         ids=str)
@pytest.mark.parametrize("number", [3.7, -0.3, 7, 1e-3])
def test_number_over_model_rounds_like_number_over_tensor(dtype: torch.dtype, number: float) -> None:
    torch.manual_seed(0)
    net = _Wide(dtype)
    expected = {name: number / p.detach() for name, p in net.named_parameters()}  # plain per-tensor torch
    swarm = nyto.Swarm.stack([net, net * 2])
    results = {
        "NytoModule": dict((number / net).named_parameters()),
        "product": (number / net.product()).params,
        "Particle": (number / nyto.particle(net)).params,
        "Particle, unpacked": (number / nyto.particle(net, pack=False)).params,
    }
    for kind, got in results.items():
        for name, value in expected.items():
            assert torch.equal(got[name].detach(), value), (kind, name)
    for name, value in swarm.params.items():
        assert torch.equal((number / swarm).params[name], number / value), name
    # a 0-dim tensor on the left divides, as `tensor(3.7) / tensor` does
    scalar = torch.tensor(number)
    got = dict((scalar / net).named_parameters())
    for name, p in net.named_parameters():
        assert torch.equal(got[name].detach(), (scalar / p.detach()).to(dtype)), name


def test_functional_div_of_a_number_stays_torch_div() -> None:
    # nf.div(2, tree) mirrors torch.div (one rounding), as its docstring and tests say
    torch.manual_seed(1)
    tree = {"w": torch.randn(300), "h": torch.randn(40).half()}
    for number in (3.7, -0.3):
        out = nf.div(number, tree)
        for name, leaf in tree.items():
            assert torch.equal(out[name], torch.div(number, leaf)), name


# -- ParamConfig is a dataclass, as 1.1's documentation shows its source --------------------------------
def test_param_config_is_the_documented_dataclass() -> None:
    config = nyto.ParamConfig(False)
    config.is_weight = True
    assert dataclasses.is_dataclass(config)
    assert [field.name for field in dataclasses.fields(nyto.ParamConfig)] == ["operational", "clone"]
    assert dataclasses.asdict(config) == {"operational": False, "clone": True}
    replaced = dataclasses.replace(config, clone=False)
    assert (replaced.operational, replaced.clone) == (False, False) and not hasattr(replaced, "is_weight")
    assert repr(config) == "ParamConfig(operational=False, clone=True, is_weight=True)"
    assert config.copy().is_weight  # custom attributes survive copy()
    with pytest.raises(TypeError, match="unhashable"):
        hash(config)
