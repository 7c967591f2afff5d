"""Yes/no keyword arguments are refused by name unless they are bools (or ints), at every entry point."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from torch import nn

import nytorch as nyto
from nytorch import Swarm, distributed, merge
from nytorch._flags import flag


class Net(nyto.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.norm = nn.BatchNorm1d(2)


CALLS: dict[str, tuple[Callable[[Any], object], str]] = {
    "particle buffers": (lambda value: nyto.particle(Net(), buffers=value), r"^particle: .* as buffers, got "),
    "particle pack": (lambda value: nyto.particle(Net(), pack=value), r"^particle: .* as pack, got "),
    "product buffers": (lambda value: Net().product(buffers=value), r"^product: .* as buffers, got "),
    "Swarm.stack buffers": (lambda value: Swarm.stack([Net(), Net()], buffers=value), r"^stack: .* as buffers, got "),
    "Swarm.zeros buffers": (lambda value: Swarm.zeros(Net(), 2, buffers=value), r"^zeros: .* as buffers, got "),
    "Swarm.normal buffers": (lambda value: Swarm.normal(Net(), 2, buffers=value), r"^normal: .* as buffers, got "),
    "EMA pack": (lambda value: merge.EMA(Net(), pack=value), r"^EMA: .* as pack, got "),
    "broadcast pack": (lambda value: distributed.broadcast(Net(), pack=value), r"^broadcast: .* as pack, got "),
    "all_reduce_mean pack": (lambda value: distributed.all_reduce_mean(Net(), pack=value),
                             r"^all_reduce_mean: .* as pack, got "),
}


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("value", ["copy", "", 0.5, [True]])
def test_anything_but_a_bool_or_an_int_is_refused_by_name(call: str, value: object) -> None:
    function, message = CALLS[call]
    with pytest.raises(TypeError, match=message + type(value).__name__ + "$"):
        function(value)


def test_a_refused_flag_leaves_the_model_unpacked() -> None:
    net = Net()
    address = net.fc.weight.data_ptr()
    with pytest.raises(TypeError, match="as pack"):
        nyto.particle(net, pack="yes")
    assert net.fc.weight.data_ptr() == address


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), (1, True), (0, False),
                                             (np.True_, True), (np.int64(0), False)])
def test_bools_and_ints_are_bools(value: object, expected: bool) -> None:
    assert flag("demo", "buffers", value) is expected
    assert nyto.particle(Net(), buffers=value)._with_buffers is expected


def test_none_only_where_it_means_something() -> None:
    assert flag("demo", "show_progress", None, none=True) is None
    with pytest.raises(TypeError, match=r"^demo: expected True or False as pack, got NoneType$"):
        flag("demo", "pack", None)
    assert Swarm.zeros(Net(), 2, buffers=None).params["fc.weight"].shape == (2, 2, 2)


@pytest.mark.parametrize("loader", [5, "batches", None])
def test_update_bn_refuses_what_is_not_batches_even_without_norm_layers(loader: object) -> None:
    for model in (nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))):
        with pytest.raises(TypeError, match=r"^update_bn: expected an iterable of batches as loader"):
            merge.update_bn(model, loader)
