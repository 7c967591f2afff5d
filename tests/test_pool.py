"""The pool of dead results' buffers: reused only when nobody can see them."""
from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

import nytorch
from nytorch import _pool


class Net(nytorch.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Linear(3, 4)
        self.layer2 = nn.Linear(4, 2)


@pytest.fixture(autouse=True)
def empty_pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(_pool, "MIN_BYTES", 0)  # these models are small: pool them anyway
    _pool.clear()
    yield
    _pool.clear()


def _pair() -> tuple[Net, Net]:
    torch.manual_seed(0)
    a, b = Net(), Net()
    _ = a + b  # packs both
    _pool.clear()
    return a, b


def _address(result: object) -> int:
    flat = result.__dict__["_nyto_pending"].flat if isinstance(result, nn.Module) else result._flat  # type: ignore[attr-defined]
    return int(flat.buffers[0].data_ptr())


def test_a_result_that_died_unseen_lends_its_buffers_to_the_next_one() -> None:
    a, b = _pair()
    first = a + b
    address = _address(first)
    del first
    assert _pool.held_bytes() > 0
    second = a - b
    assert _address(second) == address and _pool.held_bytes() == 0
    for name, value in second.named_parameters():  # written over, not added to
        assert torch.equal(value, a.get_parameter(name) - b.get_parameter(name)), name


def test_particle_results_lend_their_buffers_too_and_compute_the_same() -> None:
    p, q = nytorch.particle(nn.Linear(5, 5)), nytorch.particle(nn.Linear(5, 5))
    expected = {name: 2 * x + y for (name, x), y in zip(p.params.items(), q.params.values())}
    for _ in range(3):
        result = p * 2 + q
    for name, value in result.params.items():
        torch.testing.assert_close(value, expected[name])


@pytest.mark.parametrize("keep", ["view", "reference", "autograd", "numpy"])
def test_buffers_anyone_else_can_see_are_never_reused(keep: str) -> None:
    p, q = nytorch.particle(nn.Linear(5, 5)), nytorch.particle(nn.Linear(5, 5))
    result = p + q
    buffer = result._flat.buffers[0]
    held: object
    if keep == "view":
        held = buffer[2:5]
    elif keep == "reference":
        held = buffer
    elif keep == "autograd":
        held = (buffer * torch.ones_like(buffer, requires_grad=True)).sum()  # saves the buffer for backward
    else:
        held = buffer.numpy()
    before = buffer.clone()
    del buffer, result
    assert _pool.held_bytes() == 0
    for _ in range(3):
        _ = p - q
    if keep == "view":
        assert torch.equal(held, before[2:5])  # type: ignore[arg-type]
    elif keep == "numpy":
        assert np.array_equal(held, before.numpy())  # type: ignore[arg-type]


def test_a_result_built_into_a_module_is_never_reused() -> None:
    a, b = _pair()
    result = a + b
    weight = result.layer1.weight  # built: its parameters are views of the buffers
    expected = weight.detach().clone()
    del result
    for _ in range(3):
        _ = a * 7
    assert torch.equal(weight.detach(), expected) and _pool.held_bytes() == 0


def test_the_pool_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _pair()
    results = [a + b for _ in range(10)]
    del results
    size = sum(p.numel() * 4 for p in a.parameters())
    assert _pool.held_bytes() == _pool.PER_PLAN * size
    old = nytorch.set_result_pool(0)  # off: frees what it holds
    assert _pool.held_bytes() == 0
    results = [a + b for _ in range(3)]
    del results
    assert _pool.held_bytes() == 0
    assert nytorch.set_result_pool(old) == 0


def test_small_results_are_left_to_the_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_pool, "MIN_BYTES", 256 << 10)
    a, b = _pair()
    results = [a + b for _ in range(3)]
    del results
    assert _pool.held_bytes() == 0


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("64", TypeError)])
def test_set_result_pool_rejects_what_is_not_a_byte_count(bad: object, error: type) -> None:
    before = _pool.POOL_BYTES
    with pytest.raises(error, match="max_bytes"):
        nytorch.set_result_pool(bad)  # type: ignore[arg-type]
    assert _pool.POOL_BYTES == before


def test_dropping_the_plan_cache_drops_the_buffers_filed_under_its_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past 256 structures ``plan_for`` forgets its plans: buffers kept for them would never be asked for."""
    from nytorch import _flat
    monkeypatch.setattr(_flat, "_PLANS", {})
    a, b = _pair()
    _ = a + b  # dies unseen: its buffers are kept for the next result of its plan
    del _
    assert _pool.held_bytes() > 0
    for width in range(1, 257):  # 256 other structures fill the plan cache, which is then dropped
        _flat.plan_for([(torch.Size([width]), torch.float32, torch.device("cpu"))], [True])
    assert _pool.held_bytes() == 0 and len(_flat._PLANS) == 1
    assert torch.equal((a + b).layer1.weight, a.layer1.weight + b.layer1.weight)  # a new plan, computed right


def test_a_full_pool_makes_room_for_the_structure_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full pool refused every new structure: in an architecture search it filled with the buffers of
    structures that never came back, and the one in use got fresh memory every time."""
    models = [nn.Sequential(nn.Linear(8, width)) for width in (4, 5, 6)]
    particles = [nytorch.particle(model) for model in models]
    sizes = [sum(p.numel() * 4 for p in model.parameters()) for model in models]
    monkeypatch.setattr(_pool, "POOL_BYTES", 2 * sizes[0] + 2 * sizes[1])  # room for the first two
    for p in particles[:2]:
        results = [p + p for _ in range(2)]  # two results die unseen: their buffers are kept
        del results
    assert [plan.nbytes for plan in _pool._FREE] == [sizes[0], sizes[1]]
    before = _address(particles[0] + particles[0])  # the first structure in use again: it goes last
    new = particles[2] + particles[2]  # a new structure: fresh memory, which dies unseen below
    del new
    # the structure given to longest ago (the second) made room, not the one just used
    assert [plan.nbytes for plan in _pool._FREE] == [sizes[0], sizes[2]]
    assert _pool.held_bytes() == 2 * sizes[0] + sizes[2] <= _pool.POOL_BYTES
    assert _address(particles[0] + particles[0]) == before  # still served from the pool
    again = particles[2] + particles[2]
    torch.testing.assert_close(again.params["0.weight"], 2 * models[2][0].weight.detach())


class _Perturbed(torch.utils.data.Dataset):
    """Item i is the base model + i: a Particle result big enough for the pool, sent to the main process."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.base = nytorch.particle(nn.Linear(256, 256))

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> nytorch.Particle:
        return self.base + float(index)


def test_a_result_sent_to_another_process_is_never_written_again() -> None:
    """A DataLoader worker's results travel in shared memory: the worker's pool must not reuse them."""
    data = _Perturbed()
    bias = data.base.params["bias"]
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=1,
                                         multiprocessing_context="fork" if hasattr(os, "fork") else None)
    items = list(loader)  # every item received before the next ones were computed
    for index, item in enumerate(items):
        torch.testing.assert_close(item.params["bias"], bias + float(index), rtol=0, atol=0)

