"""Checkpoints: safe format, round trips, structure errors, refusal of code, atomic writes, exact resume."""
from __future__ import annotations

import dataclasses
import enum
import errno
import io
import os
import pickle
import random
import re
import signal
import sys
import threading
import time
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from conftest import keeps_old_file
from torch import nn

import nytorch
from nytorch import StructureError
from nytorch._atomic import atomic_write
from nytorch._checkpoint import CheckpointError, load, save
from nytorch._rng import get_rng_state, set_rng_state

try:
    from nytorch._swarm import Swarm
except ImportError:  # the swarm issue may not have landed in this checkout
    Swarm = None  # type: ignore[assignment,misc]

needs_swarm = pytest.mark.skipif(Swarm is None, reason="nytorch.Swarm is not available in this checkout")
ROOT = Path(__file__).resolve().parents[1]


class Net(nytorch.NytoModule):
    """A NytoModule with a BatchNorm (float and integer buffers)."""

    def __init__(self, hidden: int = 5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def _randomized(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
            else:
                tensor.fill_(seed + 3)
    return module


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach() for name, t in list(module.named_parameters()) + list(module.named_buffers())}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


# -- round trips ---------------------------------------------------------------------------------
def test_particle_round_trip_values_and_structure(tmp_path: Path) -> None:
    net = _randomized(Net(), 1)
    p = nytorch.particle(net) * 3
    save(p, tmp_path / "p.pt")
    loaded = load(tmp_path / "p.pt", like=nytorch.particle(Net()))
    assert isinstance(loaded, nytorch.Particle) and loaded.model_class is Net
    expected = {name: param.detach() * 3 for name, param in net.named_parameters()}
    _assert_same(loaded.params, expected)
    # fresh storage, not shared with the like
    like = nytorch.particle(Net())
    again = load(tmp_path / "p.pt", like=like)
    for name in like.params:
        assert again.params[name].data_ptr() != like.params[name].data_ptr()


def test_particle_with_buffers_round_trip(tmp_path: Path) -> None:
    net = _randomized(Net(), 2)
    p = nytorch.particle(net, buffers=True)
    save(p, tmp_path / "p.pt")
    loaded = load(tmp_path / "p.pt", like=nytorch.particle(Net(), buffers=True))
    _assert_same(loaded.params, _state(net))
    assert loaded.params["bn.num_batches_tracked"].dtype == torch.int64
    # a particle without buffers refuses the extra entries, naming the first one
    with pytest.raises(StructureError, match=r"load: the checkpoint has an extra parameter 'bn.running_mean'"):
        load(tmp_path / "p.pt", like=nytorch.particle(Net()))


def test_nytomodule_round_trip_keeps_class_buffers_requires_grad_and_mode(tmp_path: Path) -> None:
    net = _randomized(Net(), 3)
    net.fc2.bias.requires_grad_(False)
    save(net, tmp_path / "net.pt")
    like = Net()
    like.fc2.bias.requires_grad_(False)
    like.eval()
    before = {name: t.clone() for name, t in _state(like).items()}
    loaded = load(tmp_path / "net.pt", like=like)
    assert type(loaded) is Net and loaded is not like
    _assert_same(_state(loaded), _state(net))
    _assert_same(_state(like), before)  # like untouched
    assert not loaded.fc2.bias.requires_grad and loaded.fc1.weight.requires_grad
    assert all(isinstance(p, nn.Parameter) and p.is_leaf for p in loaded.parameters())
    assert not loaded.training  # mode comes from like
    x = torch.randn(4, 3)
    net.eval()
    assert torch.equal(loaded(x), net(x))


def test_plain_module_and_tensor_and_nested_containers(tmp_path: Path) -> None:
    seq = _randomized(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)), 4)
    obj = {
        "model": seq,
        "list": [torch.arange(3), 1.5, "text", None, (1, 2)],
        "tuple": (torch.ones(2, dtype=torch.float64), True),
        "ordered": OrderedDict(b=1, a=2),
        "dtype": torch.bfloat16, "device": torch.device("cpu"), "size": torch.Size([2, 3]),
        "complex": 1 + 2j, "bytes": b"\x00\x01", 3: "int key",
    }
    save(obj, tmp_path / "c.pt")
    raw = load(tmp_path / "c.pt")
    _assert_same(raw["model"], _state(seq))
    assert torch.equal(raw["list"][0], torch.arange(3)) and raw["list"][1:4] == [1.5, "text", None]
    assert raw["list"][4] == (1, 2) and type(raw["list"][4]) is tuple
    assert type(raw["tuple"]) is tuple and raw["tuple"][1] is True
    assert type(raw["ordered"]) is OrderedDict and list(raw["ordered"]) == ["b", "a"]
    assert raw["dtype"] is torch.bfloat16 and raw["size"] == torch.Size([2, 3])
    assert raw["complex"] == 1 + 2j and raw["bytes"] == b"\x00\x01" and raw[3] == "int key"
    like = dict(obj, model=nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)))
    rebuilt = load(tmp_path / "c.pt", like=like)
    assert type(rebuilt["model"]) is nn.Sequential
    _assert_same(_state(rebuilt["model"]), _state(seq))


def test_file_loads_with_torch_weights_only(tmp_path: Path) -> None:
    net = _randomized(Net(), 5)
    state = {"net": net, "p": nytorch.particle(net), "rng": get_rng_state(),
             "gen": torch.Generator().manual_seed(3), "np": np.arange(4, dtype=np.int16)}
    save(state, tmp_path / "s.pt")
    raw = torch.load(tmp_path / "s.pt", weights_only=True)
    assert raw["format"] == "nytorch.checkpoint" and raw["version"] == 1
    assert torch.equal(raw["data"]["net"]["params"]["fc1.weight"], net.fc1.weight)
    assert torch.equal(raw["data"]["p"]["tensors"]["fc2.bias"], net.fc2.bias)
    assert zipfile.is_zipfile(tmp_path / "s.pt")  # the ordinary torch.save archive


def test_algorithm_state_round_trip_rng_generators_numpy(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(11)
    np_rng = np.random.default_rng(5)
    torch.manual_seed(123)
    random.seed(7)
    np.random.seed(9)
    velocity = [torch.randn(3), torch.randn(2)]
    state = {"rng": get_rng_state(), "gen": generator, "py": random.getstate(),
             "np_bitgen": np_rng.bit_generator.state, "velocity": velocity,
             "step": 41, "array": np.linspace(0, 1, 5, dtype=np.float32), "scalar": np.float64(2.5)}
    save(state, tmp_path / "a.pt")
    expected_torch = torch.rand(4)
    expected_py = [random.random() for _ in range(3)]
    expected_np = np.random.rand(3)
    expected_gen = torch.rand(3, generator=generator)
    expected_bitgen = np_rng.random(2)

    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    loaded = load(tmp_path / "a.pt", like={key: None for key in state})
    set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(4), expected_torch)
    assert [random.random() for _ in range(3)] == expected_py
    assert np.array_equal(np.random.rand(3), expected_np)
    assert torch.equal(torch.rand(3, generator=loaded["gen"]), expected_gen)
    random.setstate(loaded["py"])
    rng2 = np.random.default_rng()
    rng2.bit_generator.state = loaded["np_bitgen"]
    assert np.array_equal(rng2.random(2), expected_bitgen)
    assert loaded["step"] == 41 and torch.equal(loaded["velocity"][1], state["velocity"][1])
    assert loaded["array"].dtype == np.float32 and np.array_equal(loaded["array"], state["array"])
    assert isinstance(loaded["scalar"], np.float64) and loaded["scalar"] == 2.5


def test_like_moves_tensors_to_like_device_meta(tmp_path: Path) -> None:
    net = Net()
    save(net, tmp_path / "n.pt")
    meta_like = Net().to("meta")
    loaded = load(tmp_path / "n.pt", like=meta_like)
    assert all(t.device.type == "meta" for t in _state(loaded).values())
    save(meta_like, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"parameter 'fc1.weight' was saved on the meta device"):
        load(tmp_path / "m.pt", like=Net())


# -- structure errors -----------------------------------------------------------------------------
class Renamed(nn.Module):
    def __init__(self, width: int = 5, second: str = "fc2", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.mid = nn.Linear(5, width, dtype=dtype)
        setattr(self, second, nn.Linear(width, 2, dtype=dtype))


@pytest.mark.parametrize("kind", ["module", "particle"])
@pytest.mark.parametrize(("like_kwargs", "message"), [
    ({"width": 6}, r"load: parameter 'mid.weight' differs: like has shape \(6, 5\) float32, "
                   r"the checkpoint has shape \(5, 5\) float32"),
    ({"dtype": torch.float64}, r"load: parameter 'mid.weight' differs: like has shape \(5, 5\) float64"),
    ({"second": "out"}, r"load: parameter 'out.weight' is missing from the checkpoint"),
])
def test_structure_mismatch_names_first_parameter(tmp_path: Path, kind: str, like_kwargs: dict[str, Any],
                                                  message: str) -> None:
    source = Renamed()
    save(source if kind == "module" else nytorch.particle(source), tmp_path / "x.pt")
    like = Renamed(**like_kwargs)
    like_obj = like if kind == "module" else nytorch.particle(like)
    before = {name: t.clone() for name, t in _state(like).items()}
    with pytest.raises(StructureError, match=message):
        load(tmp_path / "x.pt", like=like_obj)
    _assert_same(_state(like), before)


def test_extra_parameter_in_checkpoint_is_named(tmp_path: Path) -> None:
    save(nytorch.particle(Renamed()), tmp_path / "x.pt")
    smaller = Renamed()
    del smaller.fc2  # same class, one layer fewer
    with pytest.raises(StructureError, match=r"load: the checkpoint has an extra parameter 'fc2.weight'"):
        load(tmp_path / "x.pt", like=nytorch.particle(smaller))


def test_nested_mismatch_names_key_and_parameter(tmp_path: Path) -> None:
    save({"swarm": [nytorch.particle(Renamed())], "step": 3}, tmp_path / "x.pt")
    with pytest.raises(StructureError, match=r"load \(at 'swarm\.0'\): parameter 'mid.weight' differs"):
        load(tmp_path / "x.pt", like={"swarm": [nytorch.particle(Renamed(width=4))], "step": 0})
    with pytest.raises(StructureError, match=r"load: parameter 'velocity' is missing from the checkpoint"):
        load(tmp_path / "x.pt", like={"swarm": None, "step": 0, "velocity": None})
    with pytest.raises(StructureError, match=r"load: the checkpoint has an extra parameter 'step'"):
        load(tmp_path / "x.pt", like={"swarm": None})
    with pytest.raises(StructureError, match=r"load \(at 'swarm'\): like is a list of 2 items but the "
                                             r"checkpoint holds 1 items"):
        load(tmp_path / "x.pt", like={"swarm": [None, None], "step": 0})
    with pytest.raises(StructureError, match=r"load \(at 'step'\): like is a str but the checkpoint holds a int"):
        load(tmp_path / "x.pt", like={"swarm": None, "step": "x"})
    with pytest.raises(StructureError, match=r"load: like is a Linear but the checkpoint holds a dict"):
        load(tmp_path / "x.pt", like=nn.Linear(1, 1))
    with pytest.raises(StructureError, match=r"load \(at 'swarm\.0'\): like is a Tensor but the checkpoint "
                                             r"holds a particle"):
        load(tmp_path / "x.pt", like={"swarm": [torch.zeros(1)], "step": 0})


def test_tensor_like_checks_shape_and_dtype(tmp_path: Path) -> None:
    save({"v": torch.zeros(3)}, tmp_path / "t.pt")
    assert torch.equal(load(tmp_path / "t.pt", like={"v": torch.ones(3)})["v"], torch.zeros(3))
    with pytest.raises(StructureError, match=r"load \(at 'v'\): parameter 'v' differs: like has shape \(4,\)"):
        load(tmp_path / "t.pt", like={"v": torch.ones(4)})
    with pytest.raises(StructureError, match=r"parameter 'v' differs: like has shape \(3,\) float64"):
        load(tmp_path / "t.pt", like={"v": torch.ones(3, dtype=torch.float64)})


class _Mode(enum.IntEnum):
    FAST = 1


# -- unsupported objects on save ---------------------------------------------------------------------
@pytest.mark.parametrize(("obj", "message"), [
    ({"fn": lambda x: x}, r"save: cannot store a function at 'fn'"),
    ({"a": [1, object()]}, r"save: cannot store a object at 'a\.1'"),
    ({"opt": torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)}, r"save: cannot store a SGD at 'opt'"),
    ({"s": {1, 2}}, r"save: cannot store a set at 's'"),
    ({"mode": _Mode.FAST}, r"save: cannot store a _Mode at 'mode'"),
    ({(1, 2): 3}, r"^save: expected dict keys that are exactly str, int, float, bool or None, got the key "
                  r"\(1, 2\) of type tuple; convert it first"),
    (np.array([object()]), r"save: cannot store a NumPy array of Python objects"),
])
def test_save_refuses_what_it_cannot_store_and_keeps_old_file(tmp_path: Path, obj: Any, message: str) -> None:
    keeps_old_file(tmp_path, obj, TypeError, message)


class _Str(str):
    pass


class _StrMode(str, enum.Enum):
    X = "x"


_EXACT_KEYS = r"^save: expected dict keys that are exactly str, int, float, bool or None, got the key "


@pytest.mark.parametrize(("key", "shown"), [
    (_Mode.FAST, r"<_Mode\.FAST: 1> of type _Mode"),
    (_Str("a"), r"'a' of type _Str"),
    (_StrMode.X, r"<_StrMode\.X: 'x'> of type _StrMode"),
    (np.float64(0.5), r"(np\.float64\()?0\.5\)? of type float64"),
    (np.int64(2), r"(np\.int64\()?2\)? of type int64"),
    (np.bool_(True), r"(np\.)?True_? of type bool_?"),
])
def test_dict_keys_of_subclasses_are_refused_at_save_naming_path_and_type(tmp_path: Path, key: Any,
                                                                         shown: str) -> None:
    """Subclass keys passed ``isinstance`` and pickled their class: files that neither loader reads."""
    path = tmp_path / "keep.pt"
    save({"old": torch.ones(2)}, path)
    with pytest.raises(TypeError, match=_EXACT_KEYS + shown + r" at 'opt\.state'; convert it first \(subclasses "
                                        r"such as IntEnum or np\.float64 would pickle their class\)$"):
        save({"opt": {"state": {key: torch.ones(1)}}}, path)
    assert torch.equal(load(path)["old"], torch.ones(2))
    assert os.listdir(tmp_path) == ["keep.pt"]


def test_exact_builtin_keys_load_with_torch_weights_only_and_like(tmp_path: Path) -> None:
    state = {None: 0, True: 1, 2: 2, 2.5: 3, "s": 4, float("inf"): 5, -0.0: 6}
    save({"d": state}, tmp_path / "k.pt")
    raw = torch.load(tmp_path / "k.pt", weights_only=True)["data"]["d"]
    assert raw == state and [type(key) for key in raw] == [type(key) for key in state]
    assert load(tmp_path / "k.pt", like={"d": dict.fromkeys(state, 0)}) == {"d": state}


def test_nan_float_key_is_refused_at_save(tmp_path: Path) -> None:
    """``nan != nan``: such a key would save but never match ``like`` on load."""
    path = tmp_path / "keep.pt"
    save({"old": torch.ones(2)}, path)
    with pytest.raises(ValueError, match=r"^save: expected dict keys equal to themselves, got the float key nan "
                                         r"at 'a'; load\(like=\.\.\.\) could never match it \(nan != nan\)$"):
        save({"a": {1.0: 1, float("nan"): 2}}, path)
    assert torch.equal(load(path)["old"], torch.ones(2))
    assert os.listdir(tmp_path) == ["keep.pt"]


def test_reserved_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"save: the key '__nytorch__' is reserved by nytorch at 'a'"):
        save({"a": {"__nytorch__": "particle"}}, tmp_path / "r.pt")


class _BytesPath:
    def __fspath__(self) -> bytes:
        return b"x.pt"


def test_save_rejects_non_path(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"^save: expected a str or os\.PathLike as path, got BytesIO$"):
        save(torch.ones(1), io.BytesIO())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^save: expected a str or os\.PathLike as path, got bytes$"):
        save(torch.ones(1), os.fsencode(tmp_path / "b.pt"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^save: expected a str or os\.PathLike as path, got _BytesPath of bytes$"):
        save(torch.ones(1), _BytesPath())  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []
    with pytest.raises(TypeError, match=r"load: expected a str or os.PathLike as path, got int"):
        load(3)  # type: ignore[arg-type]


# -- refusing code --------------------------------------------------------------------------------------
class _Exploit:
    """Unpickling this runs ``exec``: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _prove_exploit_is_real(path: Path, marker: Path) -> None:
    """Loading ``path`` with an unrestricted unpickler does create the marker (the test is meaningful)."""
    if zipfile.is_zipfile(path):
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as file:
            pickle.load(file)  # noqa: S301 - deliberately unsafe: proves the crafted file runs code
    assert marker.exists(), "the crafted file should run code under an unrestricted unpickler"
    marker.unlink()


@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle", "inside_valid_checkpoint"])
def test_malicious_file_is_refused_without_running_code(tmp_path: Path, container: str) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    if container == "torch_zip":
        torch.save({"weights": torch.ones(2), "payload": _Exploit(marker)}, path)
    elif container == "raw_pickle":
        path.write_bytes(pickle.dumps(_Exploit(marker), protocol=2))
    else:
        payload = {"format": "nytorch.checkpoint", "version": 1,
                   "data": {"model": {"__nytorch__": "particle", "tensors": {"w": torch.ones(1)}},
                            "evil": _Exploit(marker)}}
        torch.save(payload, path)
    _prove_exploit_is_real(path, marker)
    with pytest.raises(CheckpointError, match=r"load: refused .*evil\.pt.*could run code"):
        load(path)
    with pytest.raises(CheckpointError, match=r"refused"):
        load(path, like={"model": nytorch.particle(nn.Linear(1, 1))})
    assert not marker.exists()


def test_corrupt_truncated_and_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save({"w": torch.randn(1000)}, path)
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"is not a readable checkpoint \(truncated or corrupt\?\)"):
        load(tmp_path / "trunc.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"not a readable checkpoint"):
        load(tmp_path / "empty.pt")
    torch.save(nn.Linear(1, 1).state_dict(), tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match=r"expected a file written by nytorch.save, got .* holding a "
                                              r"OrderedDict without the 'nytorch.checkpoint' marker"):
        load(tmp_path / "foreign.pt")
    torch.save({"format": "nytorch.checkpoint", "version": 99, "data": 1}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match=r"has format version 99; this nytorch reads versions up to 1"):
        load(tmp_path / "future.pt")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.pt")


def _small_state() -> dict[str, Any]:
    """A module, numbers, a string and a NumPy array in a ~2.6 kB file (each byte of it gets tested)."""
    torch.manual_seed(0)
    return {"net": nn.Linear(3, 2), "step": 12345, "arr": np.arange(4.0), "name": "run"}


def _same_small_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (all(torch.equal(x, y) for x, y in zip(a["net"].parameters(), b["net"].parameters()))
            and a["step"] == b["step"] and a["name"] == b["name"] and np.array_equal(a["arr"], b["arr"]))


def test_every_truncation_is_a_checkpoint_error_naming_the_file(tmp_path: Path) -> None:
    state = _small_state()
    save(state, tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    for size in range(len(data)):  # torch's reader alone raised OSError (EINVAL) for most of these
        cut.write_bytes(data[:size])
        with pytest.raises(CheckpointError, match=r"load: '.*cut\.pt' is not a readable checkpoint "
                                                  r"\(truncated or corrupt\?\): "):
            load(cut, like=state)
    cut.write_bytes(data)
    assert _same_small_state(load(cut, like=state), state)


def test_files_that_cannot_be_opened_stay_os_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.pt")
    with pytest.raises(IsADirectoryError):
        load(tmp_path)
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root reads any file
        save(1, tmp_path / "locked.pt")
        os.chmod(tmp_path / "locked.pt", 0)
        with pytest.raises(PermissionError):
            load(tmp_path / "locked.pt")


def test_every_bit_flip_raises_or_loads_the_saved_values(tmp_path: Path) -> None:
    """A flipped bit anywhere gives CheckpointError or the saved values, never other values."""
    state = _small_state()
    save(state, tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    flipped = tmp_path / "flipped.pt"
    refused = 0
    for position in range(len(data)):
        corrupt = bytearray(data)
        corrupt[position] ^= 1 << (position * 5 % 8)  # each byte gets one bit, all eight bits get hit
        flipped.write_bytes(bytes(corrupt))
        try:
            loaded = load(flipped, like=state)
        except CheckpointError as error:
            assert "flipped.pt" in str(error)
            refused += 1
        else:  # e.g. a timestamp or padding byte of the zip headers
            assert _same_small_state(loaded, state), f"bit flip at byte {position} loaded other values"
    assert refused > len(data) // 2


def test_bit_flip_in_tensor_data_fails_the_crc(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    weights = torch.arange(1000, dtype=torch.float32)
    save({"w": weights}, path)
    data = bytearray(path.read_bytes())
    offset = bytes(data).index(weights.numpy().tobytes())
    data[offset + 2001] ^= 0x04
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, weights_only=True)["data"]["w"], weights)  # torch alone: silent
    with pytest.raises(CheckpointError, match=r"load: '.*w\.pt' is not a readable checkpoint \(truncated or "
                                              r"corrupt\?\): Bad CRC-32 for file 'archive/data/0'"):
        load(path)


def test_record_marked_as_folder_is_refused(tmp_path: Path) -> None:
    """torch reads no bytes for a record whose zip attributes say "folder"; the CRC check alone misses it."""
    path = tmp_path / "f.pt"
    save({"w": torch.ones(4)}, path)
    data = bytearray(path.read_bytes())
    entry = bytes(data).rindex(b"PK\x01\x02", 0, bytes(data).rindex(b"archive/data/0"))
    data[entry + 38] |= 0x10  # external attributes of the central directory entry: MS-DOS folder bit
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, weights_only=True)["data"]["w"], torch.ones(4))  # uninitialised
    with pytest.raises(CheckpointError, match=r"record 'archive/data/0' is marked as a folder"):
        load(path)


def _crcs(path: Path) -> set[int]:
    with zipfile.ZipFile(path) as archive:
        return {info.CRC for info in archive.infolist()}


def test_files_written_without_crc_by_other_tools_still_load(tmp_path: Path) -> None:
    """Files with CRC 0 (e.g. ``torch.save`` under ``set_crc32_options(False)``) load, unchecked."""
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"format": "nytorch.checkpoint", "version": 1, "data": {"w": torch.arange(3.0)}},
                   tmp_path / "nocrc.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert _crcs(tmp_path / "nocrc.pt") == {0}
    assert torch.equal(load(tmp_path / "nocrc.pt")["w"], torch.arange(3.0))


def test_save_writes_crcs_even_when_the_user_turned_them_off(tmp_path: Path) -> None:
    """A flipped bit must fail the CRC whatever ``set_crc32_options`` says; the user's setting is kept."""
    weights = torch.arange(1000, dtype=torch.float32)
    torch.serialization.set_crc32_options(False)
    try:
        save({"w": weights}, tmp_path / "w.pt")
        assert torch.serialization.get_crc32_options() is False  # restored after the write
        errors: list[BaseException] = []

        def saver(index: int) -> None:
            try:
                for _ in range(5):
                    save({"w": weights + index}, tmp_path / f"t{index}.pt")
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=saver, args=(index,)) for index in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == [] and torch.serialization.get_crc32_options() is False
    finally:
        torch.serialization.set_crc32_options(True)
    for name in ["w.pt", "t0.pt", "t1.pt", "t2.pt", "t3.pt"]:
        assert 0 not in _crcs(tmp_path / name), name
    save({"w": weights}, tmp_path / "on.pt")
    assert torch.serialization.get_crc32_options() is True
    data = bytearray((tmp_path / "w.pt").read_bytes())
    data[bytes(data).index(weights.numpy().tobytes()) + 2001] ^= 0x04
    (tmp_path / "w.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"Bad CRC-32 for file 'archive/data/0'"):
        load(tmp_path / "w.pt")


def test_unparsable_bytes_are_unreadable_not_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError, match=r"load: '.*junk\.pt' is not a readable checkpoint \(truncated or "
                                              r"corrupt\?\): Unsupported operand"):
        load(tmp_path / "junk.pt")


# -- malformed entries in a file that unpickles safely ---------------------------------------------------
_U8 = torch.zeros(8, dtype=torch.uint8)
_ND = r"malformed 'ndarray' entry at 'x': "


def _ndarray(**fields: Any) -> dict[str, Any]:
    return {"__nytorch__": "ndarray", **{"dtype": "<f8", "shape": [1], "scalar": False, "data": _U8, **fields}}


@pytest.mark.parametrize(("data", "message"), [
    ({"__nytorch__": "generator"}, r"malformed 'generator' entry at 'x': expected a device string under "
                                   r"'device', got None"),
    ({"__nytorch__": "generator", "device": "nowhere", "state": _U8},
     r"malformed 'generator' entry at 'x': expected a device string under 'device', got 'nowhere'"),
    ({"__nytorch__": "generator", "device": "cpu", "state": torch.ones(3)},
     r"malformed 'generator' entry at 'x': expected the generator state \(a 1-D uint8 tensor\) under 'state', "
     r"got a tensor of shape \(3,\) float32$"),
    ({"__nytorch__": "generator", "device": "cpu", "state": _U8},
     r"malformed 'generator' entry at 'x': the state does not fit a cpu generator \(Expected .* size 5056"),
    (_ndarray(dtype="O"), r"malformed 'ndarray' entry at 'x': expected a NumPy dtype description \(a str, or a "
                          r"list for structured dtypes\) without Python objects under 'dtype', got 'O'"),
    (_ndarray(dtype="|O"), _ND + r"expected a NumPy dtype description .* without Python objects under 'dtype', "
                                 r"got '\|O'"),
    (_ndarray(dtype="no such dtype"), _ND + r".* under 'dtype', got 'no such dtype'"),
    (_ndarray(dtype=8), _ND + r".* under 'dtype', got 8"),
    (_ndarray(shape=[5]), r"malformed 'ndarray' entry at 'x': expected 40 bytes under 'data' for shape \[5\] "
                          r"float64, got 8"),
    (_ndarray(shape=[-1]), _ND + r"expected a list of non-negative ints under 'shape', got \[-1\]"),
    (_ndarray(shape=[True]), _ND + r"expected a list of non-negative ints under 'shape', got \[True\]"),
    (_ndarray(shape="1"), _ND + r"expected a list of non-negative ints under 'shape', got '1'"),
    (_ndarray(scalar=1), _ND + r"expected True or False under 'scalar' \(True only with shape \[\]\), got 1"),
    (_ndarray(scalar=True), _ND + r"expected True or False under 'scalar' \(True only with shape \[\]\), got True "
                            r"with shape \[1\]"),
    (_ndarray(data=torch.zeros(1, dtype=torch.float64)), _ND + r"expected the array's bytes \(a 1-D uint8 tensor\) "
                                                         r"under 'data', got a tensor of shape \(1,\) float64"),
    (_ndarray(data=None), _ND + r".* under 'data', got a NoneType"),
    ({"__nytorch__": "module", "params": {}, "buffers": {}},
     r"malformed 'module' entry at 'x': expected the class name \(a str\) under 'class', got NoneType"),
    ({"__nytorch__": "particle", "class": 3, "tensors": {}}, r"malformed 'particle' entry at 'x': expected the "
                                                             r"class name \(a str\) under 'class', got int"),
    ({"__nytorch__": "module", "class": "torch.nn.modules.linear.Linear", "params": {"weight": 1}, "buffers": {}},
     r"malformed 'module' entry at 'x': expected a dict of named tensors under 'params'"),
    ({"__nytorch__": "namedtuple", "fields": 3}, r"malformed 'namedtuple' entry at 'x': expected a dict under "
                                                 r"'fields', got int"),
    ({"__nytorch__": 7}, r"malformed entry at 'x': expected an entry kind \(a str\) under '__nytorch__', got int"),
])
def test_malformed_entries_are_checkpoint_errors_naming_the_entry(tmp_path: Path, data: dict[str, Any],
                                                                 message: str) -> None:
    path = tmp_path / "m.pt"
    torch.save({"format": "nytorch.checkpoint", "version": 1, "data": {"x": data}}, path)
    tag = data["__nytorch__"]
    like = {"generator": torch.Generator(), "ndarray": np.zeros(1), "module": nn.Linear(1, 1),
            "particle": nytorch.particle(nn.Linear(1, 1)), "namedtuple": Pair(0, torch.zeros(1))}.get(tag, {})
    with pytest.raises(CheckpointError, match=r"load: " + message):
        load(path)
    with pytest.raises(CheckpointError, match=r"load: " + message):
        load(path, like={"x": like})


@pytest.mark.parametrize("version", [True, 0, -1, "1", 1.0, None, 2])
def test_version_must_be_a_known_int(tmp_path: Path, version: Any) -> None:
    torch.save({"format": "nytorch.checkpoint", "version": version, "data": 1}, tmp_path / "v.pt")
    with pytest.raises(CheckpointError, match=rf"load: '.*v\.pt' has format version {re.escape(repr(version))}; "
                                              r"this nytorch reads versions up to 1"):
        load(tmp_path / "v.pt")


# -- keys, classes and the order of differences -----------------------------------------------------------
def test_dict_keys_must_match_exactly_in_any_order(tmp_path: Path) -> None:
    save({1: torch.ones(1), "b": 2, "a": 3}, tmp_path / "k.pt")
    with pytest.raises(StructureError, match=r"load: parameter '1' is missing from the checkpoint "
                                             r"\(it has the key 1 of type int\)"):
        load(tmp_path / "k.pt", like={"1": torch.ones(1), "b": 0, "a": 0})
    with pytest.raises(StructureError, match=r"load: the checkpoint has an extra parameter 1"):
        load(tmp_path / "k.pt", like={"b": 0, "a": 0})
    loaded = load(tmp_path / "k.pt", like={"a": 0, 1: torch.zeros(1), "b": 0})  # matched by key
    assert list(loaded.items())[0] == ("a", 3) and loaded["b"] == 2 and torch.equal(loaded[1], torch.ones(1))


class _Other(nn.Module):
    """Same parameter names and shapes as ``nn.Linear(2, 2)``, another class."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2, 2))
        self.bias = nn.Parameter(torch.zeros(2))


class _NytoA(nytorch.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)


class _NytoB(_NytoA):
    pass


_LINEAR = r"torch\.nn\.modules\.linear\.Linear"


@pytest.mark.parametrize(("saved", "like", "message"), [
    (lambda: nn.Linear(2, 2), lambda: _Other(),
     rf"load: expected a checkpoint of a test_checkpoint\._Other \(like's class\), got one of a {_LINEAR}"),
    (lambda: _NytoA(), lambda: _NytoB(), r"load: expected a checkpoint of a test_checkpoint\._NytoB \(like's "
                                         r"class\), got one of a test_checkpoint\._NytoA"),
    (lambda: nytorch.particle(nn.Linear(2, 2)), lambda: nytorch.particle(_Other()),
     rf"load: expected a checkpoint of a Particle of test_checkpoint\._Other \(like's class\), got one of a {_LINEAR}"),
    (lambda: nn.Linear(2, 2), lambda: nytorch.particle(_Other()), r"Particle of test_checkpoint\._Other"),
    (lambda: {"m": [nytorch.particle(_Other())]}, lambda: {"m": [nn.Linear(2, 2)]},
     rf"load \(at 'm\.0'\): expected a checkpoint of a {_LINEAR} \(like's class\), got one of a "
     r"test_checkpoint\._Other"),
])
def test_class_must_be_the_same(tmp_path: Path, saved: Any, like: Any, message: str) -> None:
    save(saved(), tmp_path / "c.pt")
    template = like()
    with pytest.raises(TypeError, match=message):
        load(tmp_path / "c.pt", like=template)


@needs_swarm
def test_swarm_class_must_be_the_same(tmp_path: Path) -> None:
    assert Swarm is not None
    save(Swarm.stack([nn.Linear(2, 2)] * 2), tmp_path / "s.pt")
    with pytest.raises(TypeError, match=rf"load: expected a checkpoint of a Swarm of test_checkpoint\._Other "
                                        rf"\(like's class\), got one of a {_LINEAR}"):
        load(tmp_path / "s.pt", like=Swarm.stack([_Other()] * 2))


def test_class_matches_through_parametrize_and_main(tmp_path: Path) -> None:
    from torch.nn.utils import parametrize
    def parametrized() -> nn.Linear:
        layer = nn.Linear(2, 2)
        parametrize.register_parametrization(layer, "weight", nn.Identity())
        return layer

    layer = parametrized()
    save(layer, tmp_path / "p.pt")
    loaded = load(tmp_path / "p.pt", like=nytorch.particle(parametrized()))
    original = dict(layer.named_parameters())["parametrizations.weight.original"]
    assert torch.equal(loaded.params["parametrizations.weight.original"], original)
    raw = torch.load(tmp_path / "p.pt", weights_only=True)
    assert raw["data"]["class"] == "torch.nn.modules.linear.Linear"  # the class under the parametrization
    for name in ("torch.nn.utils.parametrize.ParametrizedLinear", "__main__.Linear"):  # older files, scripts
        raw["data"]["class"] = name
        torch.save(raw, tmp_path / "q.pt")
        assert torch.equal(load(tmp_path / "q.pt", like=parametrized()).bias, layer.bias)
    raw["data"]["class"] = "__main__.Conv1d"
    torch.save(raw, tmp_path / "q.pt")
    with pytest.raises(TypeError, match=r"got one of a __main__\.Conv1d"):
        load(tmp_path / "q.pt", like=parametrized())


class _Two(nn.Module):
    def __init__(self, size: int = 2, with_b: bool = True) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(size))
        if with_b:
            self.b = nn.Parameter(torch.zeros(2))


@pytest.mark.parametrize("wrap", ["module", "particle", "dict"])
def test_first_difference_in_named_parameters_order_is_named(tmp_path: Path, wrap: str) -> None:
    """like has a (2,) and b; the file has a (3,) only: 'a' differs comes before 'b' is missing."""
    saved: Any
    like: Any
    if wrap == "dict":
        saved, like = {"a": torch.zeros(3)}, {"a": torch.zeros(2), "b": torch.zeros(2)}
        message = (r"load \(at 'a'\): parameter 'a' differs: like has shape \(2,\) float32, "
                   r"the checkpoint has shape \(3,\)")
    else:
        saved, like = _Two(3, with_b=False), _Two()
        if wrap == "particle":
            saved, like = nytorch.particle(saved), nytorch.particle(like)
        message = r"load: parameter 'a' differs: like has shape \(2,\) float32, the checkpoint has shape \(3,\)"
    save(saved, tmp_path / "d.pt")
    with pytest.raises(StructureError, match=message):
        load(tmp_path / "d.pt", like=like)


@needs_swarm
def test_swarm_first_difference_in_named_parameters_order_is_named(tmp_path: Path) -> None:
    assert Swarm is not None
    save(Swarm.stack([_Two(3, with_b=False)] * 2), tmp_path / "s.pt")
    with pytest.raises(StructureError, match=r"load: parameter 'a' differs: like has shape \(2, 2\) float32, "
                                             r"the checkpoint has shape \(2, 3\) float32"):
        load(tmp_path / "s.pt", like=Swarm.stack([_Two()] * 2))


# -- atomic writes ------------------------------------------------------------------------------------
def test_atomic_write_uses_temp_in_same_folder_fsyncs_file_and_folder(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", "dir" if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")) else "file"))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append(("replace", os.path.dirname(src)))
        assert os.path.basename(src).startswith(".x.pt.") and src.endswith(".tmp")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save(torch.ones(3), tmp_path / "x.pt")
    assert events == [("fsync", "file"), ("replace", str(tmp_path.resolve())), ("fsync", "dir")]
    assert sorted(os.listdir(tmp_path)) == ["x.pt"]


def test_atomic_write_failure_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def half(file: Any) -> None:
        file.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


class _FullDisk(io.FileIO):
    """A file on a disk with ``room`` bytes left: a write past them fails with ENOSPC."""

    room = 0

    def write(self, data: Any) -> int:
        if self.tell() + memoryview(data).nbytes > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


@pytest.mark.parametrize("room", [0, 100, 1000, 9000])
def test_full_disk_is_an_os_error_naming_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  room: int) -> None:
    """torch's zip writer turned ENOSPC into ``RuntimeError: [enforce fail ...] unexpected pos``."""
    path = tmp_path / "run.pt"
    save({"w": torch.zeros(10)}, path)
    real_fdopen = os.fdopen

    def fdopen(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if mode != "wb":
            return real_fdopen(fd, mode, *args, **kwargs)
        raw = _FullDisk(fd, "wb")
        raw.room = room
        return io.BufferedWriter(raw)

    monkeypatch.setattr(os, "fdopen", fdopen)
    with pytest.raises(OSError, match=r"^\[Errno 28\] save: cannot write '.*run\.pt': No space left on "
                                      r"device$") as caught:
        save({"w": torch.ones(10_000)}, path)
    assert caught.value.errno == errno.ENOSPC
    assert isinstance(caught.value.__cause__, OSError) and caught.value.__cause__.errno == errno.ENOSPC
    monkeypatch.undo()
    assert torch.equal(load(path, like={"w": torch.ones(10)})["w"], torch.zeros(10))
    assert os.listdir(tmp_path) == ["run.pt"]


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file size limits")
def test_file_size_limit_is_an_os_error_naming_the_path(tmp_path: Path) -> None:
    """A real kernel refusal (RLIMIT_FSIZE: EFBIG), not a simulated one."""
    import resource

    path = tmp_path / "run.pt"
    save({"w": torch.zeros(10)}, path)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, limits[1]))
        with pytest.raises(OSError, match=r"^\[Errno 27\] save: cannot write '.*run\.pt': File too large$"):
            save({"w": torch.ones(1_000_000)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert torch.equal(load(path, like={"w": torch.ones(10)})["w"], torch.zeros(10))
    assert os.listdir(tmp_path) == ["run.pt"]


def test_missing_folder_stays_file_not_found_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"^\[Errno 2\] save: cannot write '.*nowhere/x\.pt': No such "
                                                r"file or directory$"):
        save(1, tmp_path / "nowhere" / "x.pt")


def test_atomic_write_keeps_mode_and_writes_through_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real.bin"
    real.write_bytes(b"a")
    os.chmod(real, 0o640)
    link = tmp_path / "link.bin"
    link.symlink_to(real)
    atomic_write(link, lambda file: file.write(b"b"))
    assert link.is_symlink() and real.read_bytes() == b"b"
    assert os.stat(real).st_mode & 0o777 == 0o640
    fresh = tmp_path / "fresh.bin"
    atomic_write(fresh, lambda file: file.write(b"c"))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(fresh).st_mode & 0o777 == 0o666 & ~umask


def _writer_loop(path: str, start: int) -> None:
    """Child process: save checkpoints whose every value equals the step, forever."""
    torch.set_num_threads(1)
    model = nn.Linear(500, 400)  # ~0.8 MB of float32 per checkpoint
    particle = nytorch.particle(model)
    step = start
    while True:
        step += 1
        for leaf in particle._leaves:
            leaf.detach().fill_(float(step))
        save({"model": particle, "step": step, "rng": torch.get_rng_state()}, path)


def test_sigkill_during_saves_never_leaves_a_torn_checkpoint(tmp_path: Path) -> None:
    """Kill a writer at random moments, 25 times; the file always loads old-or-new and whole."""
    path = tmp_path / "ckpt.pt"
    like = {"model": nytorch.particle(nn.Linear(500, 400)), "step": 0, "rng": torch.get_rng_state()}
    chooser = random.Random(1234)
    last = 0
    mid_write = 0
    started = time.monotonic()
    for _ in range(25):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                _writer_loop(str(path), last)
            finally:
                os._exit(0)
        time.sleep(chooser.uniform(0.05, 0.35) if last == 0 else chooser.uniform(0.0, 0.12))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        temps = [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
        mid_write += bool(temps)
        for name in temps:
            os.unlink(tmp_path / name)
        if not path.exists():
            assert last == 0
            continue
        state = load(path, like=like)
        step = state["step"]
        assert step >= last
        for name, value in state["model"].params.items():
            assert torch.equal(value, torch.full_like(value, float(step))), name
        last = step
    assert last > 0, "the writer never completed a save"
    assert mid_write > 0, "no kill landed during a write; the test did not exercise torn writes"
    assert time.monotonic() - started < 30


# -- exact resume ----------------------------------------------------------------------------------------
def _pso_state(seed: int, size: int = 6) -> dict[str, Any]:
    torch.manual_seed(seed)
    random.seed(seed)
    template = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    members = [nytorch.particle(template).randn() for _ in range(size)]
    return {"members": members, "velocity": [m * 0 for m in members], "best": [m.clone() for m in members],
            "best_loss": torch.full((size,), float("inf")), "step": 0, "rng": get_rng_state()}


def _pso_step(state: dict[str, Any], x: torch.Tensor, y: torch.Tensor) -> None:
    set_rng_state(state["rng"])
    members, velocity, best = state["members"], state["velocity"], state["best"]
    losses = torch.stack([((m.module()(x) - y) ** 2).mean().detach() for m in members])
    better = losses < state["best_loss"]
    for i in torch.nonzero(better).flatten().tolist():
        best[i] = members[i].clone()
    state["best_loss"] = torch.where(better, losses, state["best_loss"])
    leader = best[int(torch.argmin(state["best_loss"]))]
    for i, member in enumerate(members):
        r1, r2 = torch.rand(()), torch.rand(())
        velocity[i] = 0.7 * velocity[i] + 1.5 * r1 * (best[i] - member) + 1.5 * r2 * (leader - member)
        members[i] = member + velocity[i]
    mutant = random.randrange(len(members))
    members[mutant] = members[mutant] + 0.01 * members[mutant].randn()
    state["step"] += 1
    state["rng"] = get_rng_state()


def test_resume_is_bitwise_exact(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, generator=generator), torch.randn(16, 1, generator=generator)
    straight = _pso_state(seed=5)
    for _ in range(10):
        _pso_step(straight, x, y)

    first = _pso_state(seed=5)
    for _ in range(4):
        _pso_step(first, x, y)
    save(first, tmp_path / "run.pt")
    del first
    torch.manual_seed(999)  # disturb every generator: the checkpoint must carry them
    random.seed(999)
    np.random.seed(999)
    resumed = load(tmp_path / "run.pt", like=_pso_state(seed=77))
    assert resumed["step"] == 4
    for _ in range(6):
        _pso_step(resumed, x, y)

    assert resumed["step"] == straight["step"] == 10
    for key in ("members", "velocity", "best"):
        for a, b in zip(resumed[key], straight[key]):
            _assert_same(a.params, b.params)
    assert torch.equal(resumed["best_loss"], straight["best_loss"])


@needs_swarm
def test_swarm_round_trip(tmp_path: Path) -> None:
    assert Swarm is not None
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    swarm = Swarm.randn(model, 5)
    velocity = swarm * 0.5
    save({"swarm": swarm, "velocity": velocity, "step": 2}, tmp_path / "s.pt")
    like = {"swarm": Swarm.randn(model, 5), "velocity": Swarm.randn(model, 5), "step": 0}
    loaded = load(tmp_path / "s.pt", like=like)
    assert isinstance(loaded["swarm"], Swarm) and len(loaded["swarm"]) == 5
    _assert_same(dict(loaded["swarm"].params), dict(swarm.params))
    _assert_same(dict(loaded["velocity"].params), dict(velocity.params))
    for i in range(5):
        _assert_same(loaded["swarm"][i].params, swarm[i].params)
    with pytest.raises(StructureError, match=r"load \(at 'swarm'\): parameter '0.weight' differs"):
        load(tmp_path / "s.pt", like={"swarm": Swarm.randn(model, 4), "velocity": None, "step": 0})


@needs_swarm
@pytest.mark.parametrize("buffers", [False, True])
def test_swarm_with_buffers_round_trip(tmp_path: Path, buffers: bool) -> None:
    assert Swarm is not None
    members = [_randomized(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), seed) for seed in range(3)]
    swarm = Swarm.stack(members, buffers=buffers)
    save(swarm, tmp_path / "s.pt")
    loaded = load(tmp_path / "s.pt", like=Swarm.zeros(members[0], 3, buffers=buffers))
    for i, member in enumerate(members):
        expected = _state(member)
        got = {**loaded[i].params, **{name: t[i] for name, t in loaded.buffers.items()}}
        _assert_same({name: got[name] for name in expected}, expected)
    raw = load(tmp_path / "s.pt")
    assert torch.equal(raw["1.num_batches_tracked"], torch.stack([m[1].num_batches_tracked for m in members]))


@needs_swarm
def test_saving_one_member_does_not_write_the_whole_swarm(tmp_path: Path) -> None:
    assert Swarm is not None
    swarm = Swarm.randn(nn.Linear(100, 100), 50)
    save(swarm, tmp_path / "all.pt")
    save(swarm[3], tmp_path / "one.pt")
    save({"w": swarm.params["weight"][3]}, tmp_path / "tensor.pt")
    full, one = os.path.getsize(tmp_path / "all.pt"), os.path.getsize(tmp_path / "one.pt")
    assert full > 50 * 100 * 101 * 4 and full < 1.05 * 50 * 100 * 101 * 4 + 20_000  # the flat storage once
    assert one < 100 * 101 * 4 + 20_000
    assert os.path.getsize(tmp_path / "tensor.pt") < 100 * 100 * 4 + 20_000
    loaded = load(tmp_path / "one.pt", like=swarm[0])
    _assert_same(loaded.params, swarm[3].params)
    again = load(tmp_path / "all.pt", like=swarm)
    _assert_same(again.params, swarm.params)


class Pair(NamedTuple):
    velocity: Any
    best_loss: torch.Tensor


def test_namedtuples_are_stored_by_field(tmp_path: Path) -> None:
    net = _randomized(Net(), 8)
    state = Pair(nytorch.particle(net), torch.tensor([1.0, 2.0]))
    save({"pso": state}, tmp_path / "n.pt")
    raw = torch.load(tmp_path / "n.pt", weights_only=True)  # no class was pickled
    assert raw["data"]["pso"]["__nytorch__"] == "namedtuple"
    loaded = load(tmp_path / "n.pt", like={"pso": Pair(nytorch.particle(Net()), torch.zeros(2))})["pso"]
    assert type(loaded) is Pair and torch.equal(loaded.best_loss, state.best_loss)
    _assert_same(loaded.velocity.params, state.velocity.params)
    plain = load(tmp_path / "n.pt")["pso"]
    assert list(plain) == ["velocity", "best_loss"] and torch.equal(plain["best_loss"], state.best_loss)


@dataclasses.dataclass
class RunState:
    model: Any
    history: list[float] = dataclasses.field(default_factory=list)
    step: int = 0
    cache: Any = dataclasses.field(default=None, init=False)


def test_dataclasses_are_stored_by_field_and_empty_lists_accept_any_length(tmp_path: Path) -> None:
    state = RunState(nytorch.particle(_randomized(Net(), 9)), [0.5, 0.25, 0.125], 3)
    state.cache = torch.arange(3)
    save(state, tmp_path / "d.pt")
    like = RunState(nytorch.particle(Net()))
    loaded = load(tmp_path / "d.pt", like=like)
    assert type(loaded) is RunState and loaded is not like and like.history == [] and like.step == 0
    assert loaded.history == [0.5, 0.25, 0.125] and loaded.step == 3 and torch.equal(loaded.cache, torch.arange(3))
    _assert_same(loaded.model.params, state.model.params)
    assert load(tmp_path / "d.pt")["history"] == [0.5, 0.25, 0.125]
    with pytest.raises(StructureError, match=r"load \(at 'history'\): like is a list of 1 items but the checkpoint "
                                             r"holds 3 items"):
        load(tmp_path / "d.pt", like=RunState(nytorch.particle(Net()), [0.0]))
    with pytest.raises(StructureError, match=r"load: like is a Pair but the checkpoint holds a dataclass"):
        load(tmp_path / "d.pt", like=Pair(None, torch.zeros(1)))


def test_rng_state_survives_a_file(tmp_path: Path) -> None:
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    save(get_rng_state(), tmp_path / "rng.pt")
    expected = (torch.randn(3), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    set_rng_state(load(tmp_path / "rng.pt"))
    assert torch.equal(torch.randn(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]
    with pytest.raises(ValueError, match=r"set_rng_state: expected keys among .* got unknown key 'cpu'"):
        set_rng_state({"cpu": torch.get_rng_state()})
    with pytest.raises(TypeError, match=r"set_rng_state: expected the dict from get_rng_state\(\) as state, got list"):
        set_rng_state([])  # type: ignore[arg-type]


try:
    from nytorch import algorithms as alg
except ImportError:  # the swarm issue may not have landed in this checkout
    alg = None  # type: ignore[assignment]


def _swarm_run(state: dict[str, Any], steps: int, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """PSO on a swarm with a random mutation per step: global torch RNG, a Generator and Python's random."""
    assert alg is not None
    for _ in range(steps):
        swarm = state["swarm"]
        losses = ((swarm(x) - y) ** 2).mean(dim=(1, 2))
        if state["pso"] is None:
            state["pso"] = alg.pso_init(swarm, losses)
        swarm, state["pso"] = alg.pso_step(swarm, losses, state["pso"], generator=state["generator"])
        mutant = random.randrange(len(swarm))
        swarm[mutant] += swarm[mutant].randn() * 0.01
        state["swarm"] = swarm
        state["step"] += 1
    return state


@needs_swarm
@pytest.mark.skipif(alg is None, reason="nytorch.algorithms is not available in this checkout")
def test_swarm_resume_is_bitwise_exact(tmp_path: Path) -> None:
    assert Swarm is not None and alg is not None
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    data = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, generator=data), torch.randn(32, 1, generator=data)

    def fresh(seed: int) -> dict[str, Any]:
        torch.manual_seed(seed)
        random.seed(seed)
        return {"swarm": Swarm.randn(model, 6), "pso": None, "step": 0,
                "generator": torch.Generator().manual_seed(seed)}

    straight = _swarm_run(fresh(1), 12, x, y)

    first = _swarm_run(fresh(1), 5, x, y)
    save({**first, "rng": get_rng_state()}, tmp_path / "run.pt")
    template = _swarm_run(fresh(2), 1, x, y)  # same structure, other values (a new process would build this)
    template["step"] = 0
    torch.manual_seed(123)
    random.seed(123)
    state = load(tmp_path / "run.pt", like={**template, "rng": None})
    set_rng_state(state.pop("rng"))
    assert state["step"] == 5 and isinstance(state["pso"], alg.PSOState)
    resumed = _swarm_run(state, 7, x, y)

    assert resumed["step"] == straight["step"] == 12
    _assert_same(resumed["swarm"].params, straight["swarm"].params)
    for a, b in zip(resumed["pso"], straight["pso"]):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            _assert_same(a.params, b.params)
    assert torch.equal(resumed["generator"].get_state(), straight["generator"].get_state())


EXAMPLE = ROOT / "examples" / "swarm_iris.py"


def _example() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("swarm_iris_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses with string annotations look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(not EXAMPLE.exists() or "--resume" not in (EXAMPLE.read_text() if EXAMPLE.exists() else ""),
                    reason="examples/swarm_iris.py with --resume is not in this checkout")
def test_example_swarm_iris_resume_is_bitwise_exact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = _example()
    plot = str(tmp_path / "loss.png")
    straight = example.main(["--steps", "50", "--out", plot])["state"]
    checkpoint = str(tmp_path / "run.pt")
    example.main(["--steps", "20", "--out", plot, "--resume", checkpoint])  # stopped after 20 steps
    assert load(checkpoint)["step"] == 20
    resumed = example.main(["--steps", "50", "--out", plot, "--resume", checkpoint])["state"]
    assert "resumed from" in capsys.readouterr().out
    assert resumed.step == straight.step == 50
    _assert_same(resumed.swarm.params, straight.swarm.params)
    for a, b in zip(resumed.pso, straight.pso):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            _assert_same(a.params, b.params)
    assert torch.equal(resumed.generator.get_state(), straight.generator.get_state())
    assert resumed.best_loss == straight.best_loss and resumed.mean_loss == straight.mean_loss
