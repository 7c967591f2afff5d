"""The seed's momentum example on iris equals the same update written with plain tensors.

    W_new = sgd_step(W1) + BETA * (W1 - W0)
"""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch.nn import functional as F

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "momentum_iris.py"
Tensor = torch.Tensor


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("momentum_iris_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# -- the plain-tensor reference ---------------------------------------------------------------------------
def _forward(w: dict[str, Tensor], x: Tensor) -> Tensor:
    hidden = torch.relu(x @ w["layer1.weight"].T + w["layer1.bias"])
    return hidden @ w["layer2.weight"].T + w["layer2.bias"]


def _sgd_step(w: dict[str, Tensor], x: Tensor, y: Tensor, lr: float) -> dict[str, Tensor]:
    leaves = {k: v.detach().clone().requires_grad_() for k, v in w.items()}
    loss = F.cross_entropy(_forward(leaves, x), y)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {k: (v - lr * g).detach() for (k, v), g in zip(leaves.items(), grads)}


def _plain_momentum(w0: dict[str, Tensor], epochs: int, ex: ModuleType) -> list[dict[str, Tensor]]:
    """Every epoch's W1, written with plain tensors."""
    w1 = _sgd_step(w0, ex.x_train, ex.y_train, ex.LR)
    history = []
    for _ in range(epochs):
        w_new = {k: v + ex.BETA * (w1[k] - w0[k])
                 for k, v in _sgd_step(w1, ex.x_train, ex.y_train, ex.LR).items()}
        w0, w1 = w1, w_new
        history.append(w1)
    return history


def _accuracy(w: dict[str, Tensor], ex: ModuleType) -> float:
    predicted = _forward(w, ex.x_test).argmax(1)
    return float((predicted == ex.y_test).float().mean())


# -- tests --------------------------------------------------------------------------------------------------
def test_momentum_loop_as_written_equals_plain_tensors(example: ModuleType) -> None:
    ex = example
    torch.manual_seed(0)
    net0 = ex.MyModel(4, 12, 3)
    w0 = {k: v.detach().clone() for k, v in net0.named_parameters()}
    plain = _plain_momentum(w0, 30, ex)
    # the seed loop, verbatim
    net1 = ex.train_module(net0, ex.LR)
    for epoch in range(30):
        momentum = ex.BETA * (net1 - net0)
        net1, net0 = ex.train_module(net1, ex.LR) + momentum, net1
        assert type(net1) is ex.MyModel and type(momentum) is ex.MyModel
        got = {k: v.detach() for k, v in net1.named_parameters()}
        assert list(got) == list(plain[epoch])
        for key, value in plain[epoch].items():
            assert torch.allclose(got[key], value, rtol=1e-5, atol=1e-6), (epoch, key)
    assert all(p.is_leaf and p.requires_grad for p in net1.parameters())


def test_train_module_leaves_its_input_untouched(example: ModuleType) -> None:
    torch.manual_seed(1)
    net = example.MyModel(4, 12, 3)
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    trained = example.train_module(net, example.LR)
    assert type(trained) is example.MyModel and trained is not net
    for key, value in net.named_parameters():
        assert torch.equal(value.detach(), before[key])
        assert value.grad is None
    expected = _sgd_step(before, example.x_train, example.y_train, example.LR)
    for key, value in trained.named_parameters():
        assert torch.allclose(value.detach(), expected[key], rtol=1e-6, atol=1e-7)


def test_main_runs_and_reports_accuracy_like_the_plain_version(example: ModuleType,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    accuracy = example.main(epochs=20, seed=0)
    out = capsys.readouterr().out
    lines = re.findall(r"epoch=(\d+) acc=(\d\.\d\d)", out)
    assert [int(e) for e, _ in lines] == [9, 19]
    assert re.search(r"time taken: \d+\.\d+ s for 20 epochs", out)
    torch.manual_seed(0)
    net0 = example.MyModel(4, 12, 3)
    plain = _plain_momentum({k: v.detach().clone() for k, v in net0.named_parameters()}, 20, example)
    assert accuracy == pytest.approx(_accuracy(plain[-1], example))
    assert float(lines[-1][1]) == pytest.approx(round(accuracy, 2))
