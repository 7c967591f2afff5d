"""Device-agnostic code, checked on a machine without a GPU.

Three stand-ins for the devices CI lacks: ``torch.set_default_device("meta")`` (where any tensor
made without ``device=`` lands, as ``set_default_device("cuda")`` with CPU models would put it on
the GPU), models whose parameters sit partly on ``meta`` (a model spread over devices), and
``FakeTensorMode`` tensors on ``cuda:0`` and ``cuda:1`` (model parallelism: torch refuses to mix two
CUDA devices, where a CPU 0-dim tensor would still mix with anything).
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode

import nytorch.functional as nf
from nytorch import DeviceMismatchError, Swarm, merge
from nytorch import algorithms as alg
from nytorch import distributed as nd
from nytorch.merge._ties import trim


@pytest.fixture
def meta_default_device() -> Iterator[None]:
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def _mixed(first: str, last: str) -> nn.Sequential:
    """Two Linear layers, the first on ``first`` and the second on ``last``."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4).to(first), nn.ReLU(), nn.Linear(4, 2).to(last))


def _fake_model_parallel() -> nn.Sequential:
    """A Sequential whose first layer is on (fake) cuda:0 and last on cuda:1; call inside FakeTensorMode."""
    net = nn.Sequential(nn.Linear(3, 4, device="meta"), nn.ReLU(), nn.Linear(4, 2, device="meta"))
    for index, device in ((0, "cuda:0"), (2, "cuda:1")):
        for name, param in list(net[index].named_parameters(recurse=False)):
            setattr(net[index], name, nn.Parameter(torch.zeros(param.shape, device=device) + 0.5))
    return net


# -- nothing lands on the default device ----------------------------------------------------------
def test_distributed_world_of_one_ignores_the_default_device(meta_default_device: None, tmp_path: str) -> None:
    """The handshake header, a number loss and the returned loss were made on the default device, so every
    collective raised "Cannot copy out of meta tensor" under set_default_device("meta") with CPU models."""
    torch.set_default_device(None)
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group of this process's own")
    net = nn.Linear(3, 2, device="cpu")
    expected = {name: value.detach().clone() for name, value in net.named_parameters()}
    swarm = Swarm.stack([nn.Linear(3, 2, device="cpu") for _ in range(3)])
    losses = torch.tensor([3.0, 1.0, 2.0], device="cpu")
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(str(tmp_path), 'store')}",
                            rank=0, world_size=1)
    try:
        torch.set_default_device("meta")
        nd.broadcast(net, 0, timeout=30)
        nd.all_reduce_mean(net, timeout=30)
        member, loss, rank = nd.best(net, 1.5, timeout=30)
        best_member, best_loss, _ = nd.best(swarm, losses, timeout=30)
        gathered = nd.all_gather(swarm, timeout=30)
        _, history = nd.hybrid(swarm, lambda m, x, y: F.mse_loss(m(x), y), [], lr=0.1, every=1, timeout=30,
                               show_progress=False)
    finally:
        torch.set_default_device(None)
        dist.destroy_process_group()
    for name, value in net.named_parameters():
        assert value.device.type == "cpu" and torch.equal(value, expected[name]), name
    assert rank == 0 and loss.device.type == "cpu" and loss.dtype == torch.float64 and float(loss) == 1.5
    assert best_loss.device.type == "cpu" and float(best_loss) == 1.0
    assert torch.equal(best_member.params["weight"], swarm.params["weight"][1])
    assert torch.equal(gathered.params["weight"], swarm.params["weight"])
    assert history.shape == (0, 3) and history.device.type == "cpu"


def test_hybrid_without_steps_gives_a_history_where_losses_live(meta_default_device: None) -> None:
    """``hybrid(swarm, loss, [])`` returned ``torch.zeros(0, P)``: on the default device and dtype, not the swarm's."""
    torch.set_default_device(None)
    swarm = Swarm.stack([nn.Linear(2, 1, device="cpu").double() for _ in range(2)])
    on_meta = Swarm.stack([nn.Linear(2, 1, device="meta") for _ in range(2)])
    torch.set_default_device("meta")
    _, history = alg.hybrid(swarm, lambda m, x, y: F.mse_loss(m(x), y), [], lr=0.1, show_progress=False)
    torch.set_default_device(None)
    assert history.shape == (0, 2) and history.device.type == "cpu" and history.dtype == torch.float64
    _, history = alg.hybrid(on_meta, lambda m, x, y: F.mse_loss(m(x), y), [], lr=0.1, show_progress=False)
    assert history.shape == (0, 2) and history.device.type == "meta" and history.dtype == torch.float32


# -- losses on another device than the swarm ------------------------------------------------------
def test_es_gradient_takes_losses_on_any_device() -> None:
    """Like pso, apso, pull_toward_best and truncation_selection, es_gradient takes losses anywhere (a CPU
    tensor of a GPU swarm's losses); it raised ``matmul: the weights are on cpu but parameter ...``."""
    center = nn.Linear(3, 2)
    noise = alg.es_noise(center, 4, generator=torch.Generator().manual_seed(0))
    losses = torch.tensor([3.0, 1.0, 2.0, 0.5])
    gradient = alg.es_gradient(noise, losses, sigma=0.1)
    weights = (losses - losses.mean()) / (4 * 0.1)
    for name, value in gradient.params.items():  # the reference: a per-member loop
        reference = sum(float(weights[i]) * noise.params[name][i] for i in range(4))
        torch.testing.assert_close(value, reference)
    on_meta = noise.to("meta")
    assert alg.es_gradient(on_meta, losses, sigma=0.1).params["weight"].device.type == "meta"
    stepped = alg.es_step(nn.Linear(3, 2, device="meta"), on_meta, losses, sigma=0.1, lr=0.1)
    assert {value.device.type for value in stepped.params.values()} == {"meta"}


# -- a model spread over devices ------------------------------------------------------------------
def test_swarm_norm_of_a_swarm_spread_over_devices() -> None:
    """``Swarm.norm`` stacked per-group norms from two devices (torch.stack refuses); now on the first group's."""
    swarm = Swarm.stack([_mixed("meta", "cpu"), _mixed("meta", "cpu")])
    norms = swarm.norm()
    assert norms.shape == (2,) and norms.device.type == "meta"
    plain = Swarm.stack([_mixed("cpu", "cpu"), _mixed("cpu", "cpu")])
    reference = torch.stack([torch.cat([v[i].reshape(-1) for v in plain.params.values()]).norm() for i in range(2)])
    torch.testing.assert_close(plain.norm(), reference)


def test_swarm_norm_without_floating_values_ignores_the_default_device(meta_default_device: None) -> None:
    torch.set_default_device(None)
    module = nn.Module()
    module.register_buffer("count", torch.tensor([1], device="cpu"))
    swarm = Swarm.stack([module, module], buffers=True)
    torch.set_default_device("meta")
    norms = swarm.norm()
    torch.set_default_device(None)
    assert norms.device.type == "cpu" and torch.equal(norms, torch.zeros(2))


@pytest.mark.filterwarnings("error::UserWarning")  # nytorch reads no FakeTensor's data_ptr()
def test_dot_of_a_model_spread_over_two_gpus() -> None:
    """``nf.dot`` added per-leaf 0-dim sums from cuda:0 and cuda:1, which torch refuses (only CPU 0-dim tensors
    mix); it now sums on the first leaf's device, as ``nf.norm`` does."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        params = nf.params(_fake_model_parallel())
        result = nf.dot(params, params)
        assert result.device == torch.device("cuda:0") and result.shape == ()
        assert nf.norm(params).device == torch.device("cuda:0")
    a, b = nf.params(_mixed("cpu", "cpu")), nf.randn_like(nf.params(_mixed("cpu", "cpu")))
    torch.testing.assert_close(nf.dot(a, b), sum((a[k] * b[k]).sum() for k in a))


def test_dot_of_cpu_and_meta_leaves_still_gives_meta() -> None:
    params = nf.params(_mixed("cpu", "meta"))
    assert nf.dot(params, params).device.type == "meta"


@pytest.mark.filterwarnings("error::UserWarning")  # nytorch reads no FakeTensor's data_ptr()
def test_ties_trims_a_model_spread_over_two_gpus() -> None:
    """TIES' global threshold concatenated magnitudes from cuda:0 and cuda:1; it is now found on the first
    leaf's device and compared on each leaf's own."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        vector = [torch.ones(4, device="cuda:0"), torch.ones(3, device="cuda:1")]
        assert [leaf.device for leaf in trim(vector, 0.5)] == [torch.device("cuda:0"), torch.device("cuda:1")]
        base, tuned = _fake_model_parallel(), _fake_model_parallel()
        merged = merge.ties(base, [tuned, tuned], density=0.5)
        assert [p.device for p in merged.parameters()] == [p.device for p in base.parameters()]
    vector = [torch.tensor([1.0, -4.0]), torch.tensor([3.0, 2.0])]
    kept: list[Tensor] = trim(vector, 0.5)
    assert torch.equal(kept[0], torch.tensor([0.0, -4.0])) and torch.equal(kept[1], torch.tensor([3.0, 0.0]))


# -- generators on the wrong device ---------------------------------------------------------------
def test_dare_names_a_generator_on_another_device() -> None:
    """``dare`` drew masks with ``torch.rand(device=leaf.device, generator=...)``: a CPU generator for a GPU model
    failed inside torch ("Expected a 'cuda' device type for generator"), unlike every swarm draw; now it is
    refused first, naming ``dare`` and the parameter, as ``Swarm.randn`` and the algorithms do."""
    with FakeTensorMode(allow_non_fake_inputs=True):  # a (fake) GPU model: no CUDA needed
        on_gpu = nn.Linear(3, 2, device="meta")
        for name, param in list(on_gpu.named_parameters()):
            setattr(on_gpu, name, nn.Parameter(torch.zeros(param.shape, device="cuda")))
        with pytest.raises(ValueError, match=r"^dare: expected a generator on cuda \(where base's 'weight' lives\), "
                                             r"got one on cpu"):
            merge.dare(on_gpu, [on_gpu], drop=0.5, generator=torch.Generator())
    on_meta = nn.Linear(3, 2, device="meta")  # meta holds no values: any generator, as torch.rand takes
    assert merge.dare(on_meta, [on_meta], drop=0.5, generator=torch.Generator()).weight.device.type == "meta"
    base, tuned = nn.Linear(3, 2), nn.Linear(3, 2)
    merged = merge.dare(base, [tuned], drop=0.5, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    for (name, b), t, m in zip(base.named_parameters(), tuned.parameters(), merged.parameters()):
        keep = torch.rand(b.shape, generator=generator) >= 0.5  # the reference: plain torch, in parameter order
        torch.testing.assert_close(m, b + keep * (t - b) / 0.5, msg=name)


def test_swarm_normal_checks_where_std_lives() -> None:
    """``noise.mul_(std)`` with a 0-dim ``std`` on another device: torch's in-place kernel on the CPU silently
    skipped a meta ``std`` (members came out with std 1); now a DeviceMismatchError, as for ``swarm * std``."""
    net = nn.Linear(3, 2)
    with pytest.raises(DeviceMismatchError, match=r"^normal: std is on meta but the members' float32 values are on cpu"):
        Swarm.normal(net, 2, std=torch.tensor(0.3, device="meta"))
    swarm = Swarm.normal(net, 2, std=torch.tensor(0.3), generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)  # the reference: one randn per dtype group, rows in member order
    noise = torch.randn(2, 8, generator=generator)
    torch.testing.assert_close(swarm.params["weight"], net.weight.detach() + 0.3 * noise[:, :6].view(2, 2, 3))
    torch.testing.assert_close(swarm.params["bias"], net.bias.detach() + 0.3 * noise[:, 6:])
    assert Swarm.normal(nn.Linear(3, 2, device="meta"), 2, std=torch.tensor(0.3)).params["weight"].is_meta


def test_ema_update_names_a_decay_tensor_on_another_device() -> None:
    """``merge.ema_`` refuses a 0-dim ``decay`` on another device with DeviceMismatchError; ``EMA.update`` failed
    inside torch's lerp ("Tensor on device meta is not on the expected device cpu!") instead."""
    net = nn.Linear(3, 2)
    for pack in (True, False):
        ema = merge.EMA(net, decay=torch.tensor(0.3, device="meta"), pack=pack)
        before = [p.detach().clone() for p in ema.averaged.parameters()]
        with pytest.raises(DeviceMismatchError, match=r"^EMA.update: the scalar operand is on meta but "
                                                      r"parameter 'weight' is on cpu"):
            ema.update()
        assert ema.step == 0 and all(torch.equal(a, b) for a, b in zip(ema.averaged.parameters(), before))
    ema = merge.EMA(net, decay=torch.tensor(0.25))  # a CPU 0-dim decay, as torch's scalars: still works
    start = [p.detach().clone() for p in ema.averaged.parameters()]
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update()
    for averaged, old, new in zip(ema.averaged.parameters(), start, net.parameters()):
        torch.testing.assert_close(averaged, 0.25 * old + 0.75 * new)


def test_norm_without_floating_leaves_ignores_the_default_device(meta_default_device: None) -> None:
    """``nf.norm`` of a tree of integer leaves returned ``torch.zeros(())`` on the default device, where ``nf.dot``
    of the same tree gave its zero on the leaves' device."""
    torch.set_default_device(None)
    counts = {"steps": torch.tensor([3], device="cpu")}
    torch.set_default_device("meta")
    norm, dot = nf.norm(counts), nf.dot(counts, counts)
    torch.set_default_device(None)
    assert norm.device.type == "cpu" and dot.device.type == "cpu"
    assert torch.equal(norm, torch.tensor(0.0)) and torch.equal(dot, torch.tensor(0.0))


def test_per_member_weights_serve_a_swarm_spread_over_devices() -> None:
    """A swarm whose groups live on two devices (model parallel) has no one device for its weights: they
    are moved to each group's when they sit on one of the swarm's devices, and refused elsewhere."""
    net = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2, device="meta"))
    members = [net, nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2, device="meta"))]
    swarm = Swarm.stack(members)
    weights = torch.tensor([2.0, -0.5])
    for result in (swarm * weights, swarm.lerp(swarm.clone().add(1.0), weights)):
        for name, value in result.params.items():
            assert value.device == swarm.params[name].device, name
    product = swarm * weights
    for i, member in enumerate(members):  # the CPU layer's values, against plain torch per member
        torch.testing.assert_close(product.params["0.weight"][i], member[0].weight.detach() * weights[i])
    mixture = weights @ swarm  # one Particle: each group on its own device
    torch.testing.assert_close(mixture.params["0.bias"],
                               sum(w * m[0].bias.detach() for w, m in zip(weights, members)))
    assert mixture.params["2.weight"].device.type == "meta"
    cpu_only = Swarm.stack([nn.Linear(3, 2), nn.Linear(3, 2)])
    with pytest.raises(DeviceMismatchError, match=r"^mul: the weights are on meta but parameter 'weight' is on cpu; "
                                                  r"move them to a device of the swarm"):
        cpu_only * torch.ones(2, device="meta")
