"""nytorch 1.1 compatibility: the documented 1.1 API gives the same numbers here as in the real 1.1.

One scenario script (``SCENARIOS`` below, written against the 1.1 API only) runs
twice: in this process against this nytorch, and in a subprocess against the
reference nytorch 1.1 installed at ``/tmp/nyto11``.  Both print parameter values
and identity facts as JSON, compared key by key.  Without the reference
installation the comparisons are skipped; the 1.1-API checks on this nytorch run anyway.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_dicts, json_close, named

import nytorch as nyto

NYTO11 = Path(os.environ.get("NYTORCH11_PATH", "/tmp/nyto11"))
ROOT = Path(__file__).resolve().parents[1]

SCENARIOS = r'''
import json, torch
from torch import nn
import nytorch
from nytorch import NytoModule


def values(module):
    return {name: p.detach().reshape(-1).tolist() for name, p in module.named_parameters()}


class NytoLinear(NytoModule):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.Tensor([2.]))
        self.bias = nn.Parameter(torch.Tensor([1.]))

    def forward(self, x):
        return self.weight * x + self.bias


class MLP(NytoModule):
    def __init__(self):
        super().__init__()
        self.layer0 = nn.Linear(3, 4)
        self.layer1 = nn.Linear(4, 2)

    def forward(self, x):
        return self.layer1(torch.relu(self.layer0(x)))


class Sub(NytoModule):
    def __init__(self, value):
        super().__init__()
        self.param = nn.Parameter(torch.Tensor([value]))


class Root(NytoModule):
    def __init__(self):
        super().__init__()
        self.param = nn.Parameter(torch.Tensor([1.]))
        self.sub_module1 = Sub(2.)
        self.sub_module2 = Sub(3.)


def run():
    out = {}
    # 1.1's own import paths for its documented names
    from nytorch.mtype import ParamConfig as Config, ParamID
    from nytorch.module import NytoModule as Module, ParamProduct
    out["type.imports"] = [Module is NytoModule, Config(operational=False).operational, ParamID.__name__,
                           ParamProduct.__name__ in ("ParamProduct", "Particle")]
    net = NytoLinear()
    net2 = net + 10
    x = torch.arange(4)
    out["seed.net2"] = values(net2)
    out["seed.net"] = values(net)
    out["seed.net(x)"] = net(x).tolist()
    out["seed.net2(x)"] = net2(x).tolist()
    out["seed.net3"] = values(net + net2)
    exprs = {"2 - net": lambda: 2 - net, "2 / net": lambda: 2 / net, "2 ** net": lambda: 2 ** net,
             "-net": lambda: -net, "+net": lambda: +net, "net * net2": lambda: net * net2,
             "net / net2": lambda: net / net2, "net ** 2": lambda: net ** 2, "net - net2": lambda: net - net2,
             "3 * net": lambda: 3 * net, "net / 4": lambda: net / 4, "net ** net2": lambda: net ** net2,
             "net.clone()": lambda: net.clone(), "1 + net": lambda: 1 + net}
    for key, fn in exprs.items():
        result = fn()
        out["op." + key] = values(result)
        out["type." + key] = type(result).__name__
    for op in ["+=", "-=", "*=", "/=", "**="]:
        target = net.clone()
        weight = target.weight
        scope = {"target": target, "net2": net2}
        exec("target " + op + " 2", scope)
        out["iop." + op] = values(scope["target"])
        out["iop.same." + op] = scope["target"].weight is weight
        target = net.clone()
        exec("target " + op + " net2", scope | {"target": target})
    torch.manual_seed(0)
    a = MLP()
    b = a.clone_from(MLP())  # 1.1 combines only models of one "species"
    out["mlp.a"] = values(a)
    out["mlp.avg"] = values((a + b) / 2)
    out["mlp.momentum"] = values(a + 0.9 * (a - b))
    out["mlp.lerp_by_hand"] = values(a + 0.25 * (b - a))
    c = a.clone()
    out["mlp.clone.same_values"] = values(c) == values(a)
    out["mlp.clone.fresh"] = all(p is not q for p, q in zip(c.parameters(), a.parameters()))
    d = a.detach()
    out["mlp.detach.shared"] = all(p is q for p, q in zip(d.parameters(), a.parameters()))
    out["mlp.clone_from"] = values(a.clone_from(b))
    out["mlp.ids"] = [a.get_param_id(p) for p in a.parameters()]
    product = (a.product() + b.product()) * 0.5
    out["mlp.product"] = values(product.module())
    out["mlp.product.particle"] = values(product.particle())
    target = a.clone()
    ids = [id(p) for p in target.parameters()]
    target.product_(product)
    out["mlp.product_"] = values(target)
    out["mlp.product_.same"] = [id(p) for p in target.parameters()] == ids
    doubled = a.product().unary_operator(
        lambda p, conf: nn.Parameter(p * 2) if conf.operational else p).module()
    out["mlp.unary"] = values(doubled)
    diff = a.product().binary_operator(
        b.product(), lambda p, q, conf: nn.Parameter(p - q) if conf.operational else p).module()
    out["mlp.binary"] = values(diff)
    for operational in (True, False):
        for clone in (True, False):
            root = Root()
            p1 = root.sub_module1.param
            root.sub_module1.set_param_config(operational=operational, clone=clone)
            result = root * 3 + 1
            key = "config.%s.%s" % (operational, clone)
            out[key] = values(result)
            out[key + ".same"] = result.sub_module1.param is p1
            root = Root()
            root.set_param_config(operational=operational, clone=clone, name="sub_module2")
            out[key + ".byname"] = values(root * 3 + 1)
    root = Root()
    derived = root + 1
    root.set_param_config(operational=False, name="sub_module1")
    out["config.shared"] = values(derived * 10)
    root = Root()
    seen = []
    def tag(pid, conf):
        conf.is_weight = True
        seen.append(pid)
    root.apply_param_config(tag)
    flags = []
    root.product().unary_operator(lambda p, conf: flags.append(conf.is_weight) or p)
    out["config.apply.ids"] = seen
    out["config.apply.flags"] = flags
    out["config.apply.ids_match"] = seen == [root.get_param_id(p) for p in root.parameters()]
    torch.manual_seed(5)
    out["mlp.randn"] = values(a.randn())
    out["momentum.net1"] = momentum(epochs=15)
    out["_file"] = nytorch.__file__
    return out


def momentum(epochs):
    """The 1.1 introduction example (momentum as particle arithmetic) on iris-shaped synthetic data."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(60, 4, generator=generator)
    y = torch.randint(0, 3, (60,), generator=generator)
    BETA, LR = 0.9, 0.005
    criterion = nn.CrossEntropyLoss()

    class MyModel(NytoModule):
        def __init__(self):
            super().__init__()
            self.layer1 = nn.Linear(4, 12)
            self.layer2 = nn.Linear(12, 3)

        def forward(self, inputs):
            return self.layer2(torch.relu(self.layer1(inputs)))

    def train_module(net, lr):
        new_net = net.clone()
        optimizer = torch.optim.SGD(new_net.parameters(), lr=lr)
        optimizer.zero_grad()
        criterion(new_net(x), y).backward()
        optimizer.step()
        return new_net

    torch.manual_seed(0)
    net0 = MyModel()
    net1 = train_module(net0, LR)
    for _ in range(epochs):
        momentum = BETA * (net1 - net0)
        net1, net0 = train_module(net1, LR) + momentum, net1
    return values(net1)


if __name__ == "__main__":
    print(json.dumps(run()))
'''


def _ours() -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "nyto_compat_scenarios"}
    exec(compile(SCENARIOS, "<compat-scenarios>", "exec"), namespace)
    result: dict[str, Any] = json.loads(json.dumps(namespace["run"]()))
    assert Path(result.pop("_file")).resolve().is_relative_to(ROOT)
    return result


@pytest.fixture(scope="module")
def ours() -> dict[str, Any]:
    return _ours()


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    if not (NYTO11 / "nytorch" / "module.py").exists():
        pytest.skip(f"reference nytorch 1.1 not installed at {NYTO11}")
    env = {**os.environ, "PYTHONPATH": str(NYTO11)}
    done = subprocess.run([sys.executable, "-c", SCENARIOS], capture_output=True, text=True, env=env,
                          cwd="/", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(result.pop("_file")).resolve().is_relative_to(NYTO11.resolve())  # really the 1.1 reference
    return result


def _close(a: Any, b: Any) -> bool:
    return json_close(a, b, rtol=1e-6)


# Keys where this nytorch deliberately differs from 1.1 (see the README migration notes).
KNOWN_DIFFERENCES: set[str] = set()


def test_same_scenarios_ran(ours: dict[str, Any], reference: dict[str, Any]) -> None:
    assert set(ours) == set(reference)


@pytest.mark.parametrize("prefix", ["seed.", "op.", "type.", "iop.", "mlp.", "config.", "momentum."])
def test_matches_nytorch_11(ours: dict[str, Any], reference: dict[str, Any], prefix: str) -> None:
    keys = [k for k in reference if k.startswith(prefix) and k not in KNOWN_DIFFERENCES]
    assert keys
    mismatched = {k: (ours.get(k), reference[k]) for k in keys if not _close(ours.get(k), reference[k])}
    assert not mismatched, mismatched


def test_scenarios_hold_on_this_nytorch(ours: dict[str, Any]) -> None:
    # the 1.1 documented facts, independently of the reference run
    assert ours["seed.net2"] == {"weight": [12.0], "bias": [11.0]}
    assert ours["seed.net3"] == {"weight": [14.0], "bias": [12.0]}
    assert ours["seed.net2(x)"] == [11.0, 23.0, 35.0, 47.0]
    assert all(ours[f"iop.same.{op}"] for op in ["+=", "-=", "*=", "/=", "**="])
    assert ours["mlp.clone.same_values"] and ours["mlp.clone.fresh"] and ours["mlp.detach.shared"]
    assert ours["mlp.product_.same"]
    assert ours["config.False.False.same"] and not ours["config.False.True.same"]
    assert ours["config.apply.ids_match"] and all(ours["config.apply.flags"])


# -- the 1.1 API surface on this nytorch -------------------------------------------------------------------
def test_11_names_exist() -> None:
    assert nyto.ParamProduct is nyto.Particle
    for name in ("clone", "detach", "clone_from", "randn", "rand", "product", "product_", "set_param_config",
                 "apply_param_config", "get_param_id"):
        assert callable(getattr(nyto.NytoModule, name)), name
    for name in ("unary_operator", "binary_operator", "particle", "module", "clone", "randn", "rand"):
        assert callable(getattr(nyto.Particle, name)), name
    config = nyto.ParamConfig()
    assert (config.operational, config.clone) == (True, True)


def test_rand_is_uniform_and_reproducible() -> None:
    class Wide(nyto.NytoModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(10_000))

    net = Wide()
    torch.manual_seed(4)
    first = net.rand()
    torch.manual_seed(4)
    assert_dicts(named(first), named(net.rand()))
    values = first.w.detach()
    assert values.min() >= 0 and values.max() < 1 and abs(values.mean().item() - 0.5) < 0.02


def test_particle_spelling_of_module() -> None:
    class Net(nyto.NytoModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

    out = (Net().product() * 2).particle()
    assert type(out) is Net and torch.equal(out.w, torch.full((2,), 2.0))


def test_get_param_id_numbering_is_named_parameters_order() -> None:
    # 1.1 numbered parameters in registration order (its docstring example gives 2 for `my_param`);
    # this nytorch numbers them in named_parameters() order, own parameters first.  Both are stable
    # across derived models and agree with the ids apply_param_config passes.
    class Net(nyto.NytoModule):
        def __init__(self) -> None:
            super().__init__()
            self.my_module = torch.nn.Linear(3, 2)
            self.my_param = torch.nn.Parameter(torch.randn(2, 2))

    net = Net()
    assert [net.get_param_id(p) for p in net.parameters()] == [0, 1, 2]
    assert [n for n, _ in net.named_parameters()][net.get_param_id(net.my_param)] == "my_param"


@pytest.mark.parametrize("name, says", [("touch", r"touch\(\) is gone.*delete the call"),
                                        ("is_root", r"is_root is gone.*no species roots")])
def test_members_11_had_and_the_design_dropped_say_so(name: str, says: str) -> None:
    """``net.touch()`` in a 1.1 program: an AttributeError that says what became of it, built or pending."""
    class Net(nyto.NytoModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(2, 2)

    net = Net()
    for model in (net, net + 1.0):
        with pytest.raises(AttributeError, match=rf"'Net' object has no attribute '{name}': nytorch 1.1's {says}"):
            getattr(model, name)
    assert not hasattr(net, "touch")
    with pytest.raises(AttributeError, match=r"^'Net' object has no attribute 'missing'$"):
        net.missing
