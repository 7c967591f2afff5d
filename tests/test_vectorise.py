"""A swarm's forward is a loop of its members' forwards: on every call, for what it returns, and when it raises.

Cases where the vectorised call once differed from that loop: a traced forward whose Python
branched on state outside the module, outputs torch's pytree cannot look into, buffers written by
a call that raised, and torch's process-wide switches (``parametrize.cached()``, the nested-tensor
fast path of ``nn.TransformerEncoder``).
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from torch import nn

from nytorch import Swarm
from nytorch._swarm_fused import NO_PLAN, _follows_trace, plan_of

from conftest import assert_like_loop

Tensor = torch.Tensor
SETTINGS = {"act": "relu"}
SLOPE = 0.2
FLAG = [True]


def loop(models: list[nn.Module], *args: Any, **kwargs: Any) -> Tensor:
    """The members' forwards one by one, in the caller's grad mode (a forward may branch on it)."""
    return torch.stack([model(*args, **kwargs) for model in models]).detach()


class Configured(nn.Module):
    """Branches on a settings dict it shares with its copies (plain attributes are shared, as copy.copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.settings = SETTINGS
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        return self.b(torch.relu(h) if self.settings["act"] == "relu" else torch.tanh(h))


class GradModeBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        return self.b(torch.relu(h) if torch.is_grad_enabled() else torch.tanh(h))


class GlobalFlag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        if FLAG[0]:
            h = torch.relu(h)
        return self.b(h)


class SlopeAttribute(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.slope = 0.1

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(self.a(x), self.slope)


class Chain(nn.Module):
    """Straight-line code over submodules and torch's activations: one trace holds for every call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class Looped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(3, 3) for _ in range(3)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


class ConstantSlope(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(self.a(x), 0.3)


class GlobalSlope(ConstantSlope):
    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(self.a(x), SLOPE)


def test_a_forward_branching_on_shared_settings_follows_them_on_every_call() -> None:
    models = [Configured() for _ in range(3)]
    swarm, x = Swarm.stack(models), torch.randn(5, 3)
    try:
        assert_like_loop(swarm(x), loop(models, x))
        SETTINGS["act"] = "tanh"
        assert_like_loop(swarm(x), loop(models, x))
        assert_like_loop((swarm + 0)(x), loop(models, x))  # a derived swarm shares the structure
    finally:
        SETTINGS["act"] = "relu"


def test_a_forward_branching_on_grad_mode_or_a_global_follows_it() -> None:
    models = [GradModeBranch() for _ in range(2)]
    swarm, x = Swarm.stack(models), torch.randn(4, 3)
    assert_like_loop(swarm(x).detach(), loop(models, x))  # relu
    with torch.no_grad():
        assert_like_loop(swarm(x), loop(models, x))  # tanh now, as each member would
    flagged = [GlobalFlag() for _ in range(2)]
    swarm = Swarm.stack(flagged)
    assert_like_loop(swarm(x), loop(flagged, x))
    FLAG[0] = False
    try:
        assert_like_loop(swarm(x), loop(flagged, x))
    finally:
        FLAG[0] = True


def test_an_argument_read_from_an_attribute_is_read_on_every_call() -> None:
    models = [SlopeAttribute() for _ in range(2)]
    swarm, x = Swarm.stack(models), -torch.ones(4, 3) * 5
    assert_like_loop(swarm(x), loop(models, x))
    for model in [*models, swarm._spec.layout.modules[0]]:
        model.slope = 0.5
    assert_like_loop(swarm(x), loop(models, x))


@pytest.mark.parametrize("model, fused", [
    (Chain, True), (Looped, True), (ConstantSlope, True),
    (Configured, False), (GradModeBranch, False), (GlobalFlag, False), (SlopeAttribute, False), (GlobalSlope, False),
])
def test_only_straight_line_forwards_take_the_fused_path(model: type[nn.Module], fused: bool) -> None:
    models = [model() for _ in range(2)]
    swarm, x = Swarm.stack(models), torch.randn(4, 3)
    assert_like_loop(swarm(x), loop(models, x))
    assert _follows_trace([models[0], *models[0].modules()]) is fused
    assert (plan_of(swarm._spec) is not NO_PLAN) is fused


@dataclasses.dataclass
class Output:
    logits: Tensor


class ReturnsDataclass(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Output:
        return Output(self.a(x))


def test_an_output_pytree_cannot_look_into_is_refused_by_name() -> None:
    swarm = Swarm.stack([ReturnsDataclass() for _ in range(2)])
    with pytest.raises(TypeError, match=r"^Swarm.__call__: the forward returned an object of class Output, which "
                                        r"torch.utils._pytree cannot look into.*register_dataclass"):
        swarm(torch.randn(5, 3))


class Kept(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, None, int, float, str, torch.dtype]:
        return self.a(x), None, 3, 0.5, "label", torch.float32


def test_outputs_that_cannot_hide_a_tensor_come_back_once_as_they_are() -> None:
    models = [Kept() for _ in range(2)]
    out = Swarm.stack(models)(torch.randn(5, 3))
    assert out[1:] == (None, 3, 0.5, "label", torch.float32)
    assert out[0].shape == (2, 5, 2)


class FailsAfter(nn.Module):
    """Updates its buffers, then raises when the input says so (after the updates)."""

    def __init__(self, extra_buffer: bool) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(3)
        self.register_buffer("total", torch.zeros(3))
        if extra_buffer:
            self.register_buffer("other", torch.zeros(2))

    def forward(self, x: Tensor, fail: bool = False) -> Tensor:
        out = self.norm(x)
        self.total.add_(x.sum(0))
        if fail:
            raise ValueError("late failure")
        return out


@pytest.mark.parametrize("size", [1, 3])
@pytest.mark.parametrize("extra_buffer", [False, True])
def test_a_call_that_raises_changes_no_buffer(size: int, extra_buffer: bool) -> None:
    swarm = Swarm.stack([FailsAfter(extra_buffer) for _ in range(size)])
    before = {name: value.clone() for name, value in swarm.buffers.items()}
    for _ in range(2):
        with pytest.raises(ValueError, match="late failure"):
            swarm(torch.randn(6, 3), fail=True)
    for name, value in swarm.buffers.items():
        assert torch.equal(value, before[name]), name
    x = torch.randn(6, 3)
    swarm(x)  # and the next call updates every buffer, as a loop would
    assert swarm.buffers["norm.num_batches_tracked"].tolist() == [1] * size
    torch.testing.assert_close(swarm.buffers["total"], x.sum(0).expand(size, 3))
    torch.testing.assert_close(swarm.buffers["norm.running_mean"], (0.1 * x.mean(0)).expand(size, 3))


def test_a_loss_that_raises_changes_no_buffer() -> None:
    swarm = Swarm.stack([nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)) for _ in range(3)])
    before = {name: value.clone() for name, value in swarm.buffers.items()}

    def loss(member: Any, x: Tensor) -> Tensor:
        return member(x).pow(2).mean() + torch.zeros(2)  # not 0-dim: refused after the forward ran

    with pytest.raises(ValueError, match="0-dim"):
        swarm.grad_and_value(loss, torch.randn(8, 2))
    for name, value in swarm.buffers.items():
        assert torch.equal(value, before[name]), name


def test_a_cumulative_batchnorm_names_its_momentum_and_a_branch_names_torch_where() -> None:
    norms = Swarm.stack([nn.BatchNorm1d(3, momentum=None) for _ in range(2)])
    with pytest.raises(RuntimeError, match=r"Hint: BatchNorm with momentum=None reads its batch count"):
        norms(torch.randn(5, 3))
    assert norms.buffers["num_batches_tracked"].tolist() == [0, 0]

    class Branch(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x if x.sum() > 0 else -x

    swarm = Swarm.stack([nn.Sequential(nn.BatchNorm1d(3), Branch()) for _ in range(2)])
    with pytest.raises(RuntimeError, match=r"Hint: the forward branches on tensor values; rewrite it with torch.where"):
        swarm(torch.randn(5, 3))


def test_transformer_encoder_with_a_padding_mask_in_eval_matches_a_loop() -> None:
    def encoder() -> nn.TransformerEncoder:
        return nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2,
                                     enable_nested_tensor=True).eval()

    models = [encoder() for _ in range(2)]
    x, mask = torch.randn(2, 5, 8), torch.tensor([[False] * 3 + [True] * 2] * 2)
    with torch.no_grad():
        out = Swarm.stack(models)(x, src_key_padding_mask=mask)
    expected = loop(models, x, src_key_padding_mask=mask)
    assert_like_loop(out[:, :, :3], expected[:, :, :3])  # padded positions: the fast path leaves zeros there
    assert torch.backends.mha.get_fastpath_enabled()  # put back


class Symmetric(nn.Module):
    def forward(self, weight: Tensor) -> Tensor:
        return weight.triu() + weight.triu(1).mT


def symmetric_linear() -> nn.Linear:
    model = nn.Linear(4, 4)
    parametrize.register_parametrization(model, "weight", Symmetric())
    return model


class Normalised(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.norm = symmetric_linear(), nn.LayerNorm(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.linear(x))


@pytest.mark.parametrize("model", [symmetric_linear, Normalised])
def test_parametrize_cached_neither_leaks_into_nor_reads_from_the_sources(model: Any) -> None:
    models = [model() for _ in range(2)]
    swarm, x = Swarm.stack(models), torch.randn(3, 4)
    with parametrize.cached():
        first = models[0](x)  # the source's weight is now cached under the source's key
        out = swarm(x)
        assert type(out) is Tensor
        assert_like_loop(out.detach(), loop(models, x))
        torch.testing.assert_close(models[0](x), first, rtol=0, atol=0)  # its cache holds its own weight still


def test_two_threads_share_the_switches_until_the_last_call_ends() -> None:
    """Thread A's call ends while thread B's runs: the fast path stays off until B's ends, then is put back."""
    a_inside, b_inside, a_done = threading.Event(), threading.Event(), threading.Event()

    class Encoder(nn.Module):
        def __init__(self, role: str) -> None:
            super().__init__()
            layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=True)
            self.role = role

        def forward(self, x: Tensor, mask: Tensor) -> Tensor:
            if self.role == "a":
                a_inside.set()
                b_inside.wait(10)
            else:
                b_inside.set()
                a_done.wait(10)
            return self.encoder(x, src_key_padding_mask=mask)

    class Other(Encoder):  # another class: another structure, another lock
        pass

    x, mask = torch.randn(2, 5, 8), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    swarms = {"a": Swarm.stack([Encoder("a") for _ in range(2)]).eval(),
              "b": Swarm.stack([Other("b") for _ in range(2)]).eval()}
    errors: dict[str, BaseException] = {}

    def run(role: str) -> None:
        try:
            with torch.no_grad():
                swarms[role](x, mask)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors[role] = error
        finally:
            if role == "a":
                a_done.set()

    first = threading.Thread(target=run, args=("a",))
    first.start()
    a_inside.wait(10)
    second = threading.Thread(target=run, args=("b",))
    second.start()
    first.join()
    second.join()
    assert errors == {}
    assert torch.backends.mha.get_fastpath_enabled()


def test_a_fast_path_the_user_turned_off_stays_off() -> None:
    models = [nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1).eval()
              for _ in range(2)]
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            Swarm.stack(models)(torch.randn(2, 5, 8), src_key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
        assert not torch.backends.mha.get_fastpath_enabled()
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


class Labelled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Any, Any, Any]:
        return self.a(x), slice(1, 2), torch.float64.__class__, Normal


class Normal:
    """A class (not an instance) and enum-like values hold no tensor: they come back as they are."""


def test_objects_without_tensors_come_back_as_they_are() -> None:
    out = Swarm.stack([Labelled() for _ in range(2)])(torch.randn(4, 3))
    assert out[1:] == (slice(1, 2), torch.dtype, Normal)


class HoldsTensor:
    def __init__(self, value: Tensor) -> None:
        self.value = value


class ReturnsHolder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> HoldsTensor:
        return HoldsTensor(self.a(x))


def test_an_object_with_tensor_attributes_is_refused() -> None:
    with pytest.raises(TypeError, match=r"object of class HoldsTensor, which torch.utils._pytree cannot look into"):
        Swarm.stack([ReturnsHolder() for _ in range(2)])(torch.randn(4, 3))
