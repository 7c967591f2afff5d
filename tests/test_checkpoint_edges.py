"""Checkpoints at the edges: NumPy templates and structured dtypes, tensors ``save`` cannot write,
``set_rng_state`` on bad input, generators for absent devices, Parameters, parameter order,
and a grid of uncommon values (0-dim arrays, NumPy scalars, bfloat16/complex, empty containers...).

``tests/test_checkpoint.py`` holds the core promises (format, atomic writes, corruption, resume).
"""
from __future__ import annotations

import random
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import keeps_old_file
from torch import nn

import nytorch
from nytorch import StructureError
from nytorch._checkpoint import CheckpointError, load, save
from nytorch._rng import get_rng_state, set_rng_state

_STRUCT = np.dtype([("a", "<i4"), ("b", "<f8")])


# -- NumPy arrays in like are checked like tensors ---------------------------------------------
@pytest.mark.parametrize(("saved", "like", "message"), [
    (np.zeros(3, dtype=np.float32), np.zeros(2),
     r"like has shape \(2,\) float64, the checkpoint has shape \(3,\) float32$"),
    (np.zeros(3, dtype=np.float32), np.zeros(3),
     r"like has shape \(3,\) float64, the checkpoint has shape \(3,\) float32$"),
    (np.arange(3, dtype=">i4"), np.arange(3, dtype="<i4"),
     r"like has shape \(3,\) int32, the checkpoint has shape \(3,\) >i4$"),
    (np.zeros(2, dtype=_STRUCT), np.zeros(2, dtype=[("a", "<i4"), ("c", "<f8")]),
     r"like has shape \(2,\) \[\('a', '<i4'\), \('c', '<f8'\)\], the checkpoint has shape \(2,\) "
     r"\[\('a', '<i4'\), \('b', '<f8'\)\]$"),
    (np.zeros((2, 3)), np.zeros((3, 2)), r"like has shape \(3, 2\) float64, the checkpoint has shape \(2, 3\)"),
    (np.zeros(2), np.float64(0.0), r"like has shape \(\) float64, the checkpoint has shape \(2,\) float64$"),
    (np.float32(1.0), np.float64(0.0), r"like has shape \(\) float64, the checkpoint has shape \(\) float32$"),
])
def test_numpy_like_checks_shape_and_dtype(tmp_path: Path, saved: Any, like: Any, message: str) -> None:
    save({"opt": {"a": saved}}, tmp_path / "n.pt")
    before = np.array(like, copy=True)
    with pytest.raises(StructureError, match=r"^load \(at 'opt\.a'\): parameter 'opt\.a' differs: " + message):
        load(tmp_path / "n.pt", like={"opt": {"a": like}})
    assert np.asarray(like).tobytes() == before.tobytes()  # like is never modified
    save(saved, tmp_path / "top.pt")
    with pytest.raises(StructureError, match=r"^load: parameter '<array>' differs: " + message):
        load(tmp_path / "top.pt", like=like)


def test_numpy_like_gets_values_of_its_own_kind(tmp_path: Path) -> None:
    array = np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3)
    save({"a": array, "zero_dim": np.array(2.5), "scalar": np.int16(-7)}, tmp_path / "n.pt")
    like = {"a": np.zeros((2, 3), dtype=np.float32), "zero_dim": np.float64(0), "scalar": np.array(0, np.int16)}
    loaded = load(tmp_path / "n.pt", like=like)
    assert type(loaded["a"]) is np.ndarray and loaded["a"].dtype == np.float32
    assert np.array_equal(loaded["a"], array) and not np.shares_memory(loaded["a"], like["a"])
    assert type(loaded["zero_dim"]) is np.float64 and loaded["zero_dim"] == 2.5  # a 0-dim array, as a scalar
    assert type(loaded["scalar"]) is np.ndarray and loaded["scalar"].shape == () and loaded["scalar"] == -7
    assert not like["a"].any()


@pytest.mark.parametrize(("saved", "like", "message"), [
    (torch.zeros(2), np.zeros(2), r"^load \(at 'x'\): like is a ndarray but the checkpoint holds a Tensor$"),
    (np.zeros(2), torch.zeros(2), r"^load \(at 'x'\): like is a Tensor but the checkpoint holds a NumPy array$"),
    (np.float32(1), 1.0, r"^load \(at 'x'\): like is a float but the checkpoint holds a NumPy scalar$"),
    (np.zeros(2), [0, 0], r"^load \(at 'x'\): like is a list of 2 items but the checkpoint holds a NumPy array$"),
])
def test_numpy_kind_mismatch_says_what_the_checkpoint_holds(tmp_path: Path, saved: Any, like: Any,
                                                            message: str) -> None:
    save({"x": saved}, tmp_path / "k.pt")
    with pytest.raises(StructureError, match=message):
        load(tmp_path / "k.pt", like={"x": like})


# -- structured dtypes round-trip exactly -----------------------------------------------------------
@pytest.mark.parametrize("dtype", [
    _STRUCT,
    np.dtype([("a", "<i4"), ("b", "<f8")], align=True),  # padding between the fields
    np.dtype([(("Title", "a"), "<i4"), ("b", "|S3")]),  # a field with a title
    np.dtype([("v", "<f4", (2,)), ("inner", [("x", "<f2"), ("y", ">u2")])]),  # sub-array and nested fields
    np.dtype({"names": ["a"], "formats": ["<i4"], "offsets": [2], "itemsize": 8}),  # leading and trailing gaps
    np.dtype("<M8[us]"),
    np.dtype("<U3"),
    np.dtype("V5"),
])
def test_structured_and_flexible_dtypes_round_trip_exactly(tmp_path: Path, dtype: np.dtype[Any]) -> None:
    array = np.frombuffer(bytes(range(3 * dtype.itemsize)), dtype=dtype).copy()
    save({"x": array, "one": array[1]}, tmp_path / "s.pt")
    for loaded in (load(tmp_path / "s.pt"), load(tmp_path / "s.pt", like={"x": np.empty(3, dtype), "one": array[0]})):
        assert loaded["x"].dtype == dtype and loaded["x"].dtype.names == dtype.names
        assert loaded["x"].dtype.fields == dtype.fields and loaded["x"].tobytes() == array.tobytes()
        assert type(loaded["one"]) is type(array[1]) and loaded["one"].tobytes() == array[1].tobytes()
    raw = torch.load(tmp_path / "s.pt", weights_only=True)  # the descr is plain strings, ints, lists, tuples
    assert raw["data"]["x"]["shape"] == [3]


def test_structured_array_fields_are_usable_after_loading(tmp_path: Path) -> None:
    x = np.array([(1, 2.5), (3, -1.0)], dtype=_STRUCT)
    save(x, tmp_path / "s.pt")
    y = load(tmp_path / "s.pt")
    assert y.dtype.names == ("a", "b") and y["a"].tolist() == [1, 3] and y["b"].tolist() == [2.5, -1.0]
    assert load(tmp_path / "s.pt", like=np.zeros(2, dtype=_STRUCT))[1]["a"] == 3


def test_zero_byte_items_round_trip(tmp_path: Path) -> None:
    array = np.zeros((2, 3), dtype=[])
    save(array, tmp_path / "z.pt")
    loaded = load(tmp_path / "z.pt", like=np.zeros((2, 3), dtype=[]))
    assert loaded.shape == (2, 3) and loaded.dtype == np.dtype([])


@pytest.mark.parametrize(("obj", "message"), [
    ({"x": np.zeros(2, dtype={"names": ["a", "b"], "formats": ["<i4", "<i4"], "offsets": [4, 0]})},
     r"^save: cannot store a NumPy array of dtype .* at 'x': dtype\.descr is not defined for types with "
     r"overlapping or out-of-order fields; repack it first \(numpy\.lib\.recfunctions\.repack_fields\)$"),
    ({"m": np.ma.array([1, 2], mask=[False, True])},
     r"^save: cannot store a NumPy masked array at 'm' \(its mask would be lost\); store its \.data and "
     r"\.mask separately$"),
    ({"o": np.zeros(1, dtype=[("a", "<i4"), ("b", "O")])}, r"^save: cannot store a NumPy array of Python objects "
                                                            r"at 'o'$"),
])
def test_numpy_arrays_save_cannot_store_exactly_are_refused(tmp_path: Path, obj: Any, message: str) -> None:
    keeps_old_file(tmp_path, obj, TypeError, message)


@pytest.mark.parametrize(("descr", "shown"), [
    ([("a", "O")], r"\[\('a', 'O'\)\]"),
    ([("a", 5)], r"\[\('a', 5\)\]"),
    ([("a", "<i4", "x")], r"\[\('a', '<i4', 'x'\)\]"),
    ([3], r"\[3\]"),
    (("<i4", [2]), r"\('<i4', \[2\]\)"),
])
def test_malformed_dtype_descr_is_a_checkpoint_error(tmp_path: Path, descr: Any, shown: str) -> None:
    entry = {"__nytorch__": "ndarray", "dtype": descr, "shape": [1], "scalar": False,
             "data": torch.zeros(4, dtype=torch.uint8)}
    torch.save({"format": "nytorch.checkpoint", "version": 1, "data": {"x": entry}}, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"^load: malformed 'ndarray' entry at 'x': expected a NumPy dtype "
                                              r"description \(a str, or a list for structured dtypes\) without "
                                              r"Python objects under 'dtype', got " + shown + "$"):
        load(tmp_path / "m.pt")


# -- tensors save cannot write ----------------------------------------------------------------------
def _sparse_linear() -> nn.Module:
    module = nn.Linear(2, 2)
    module.weight = nn.Parameter(torch.eye(2).to_sparse())
    return module


_LAZY = r"it is not initialised yet \(a lazy module\); run one forward pass first$"
_DENSE = r"expected a dense \(strided\) tensor, got layout torch\.{}; convert it with \.to_dense\(\) first$"


@pytest.mark.parametrize(("make", "message"), [
    (lambda: {"w": torch.eye(3).to_sparse()}, r"^save: cannot store the tensor at 'w': " + _DENSE.format("sparse_coo")),
    (lambda: {"w": [torch.eye(3).to_sparse_csr()]}, r"^save: cannot store the tensor at 'w\.0': "
                                                    + _DENSE.format("sparse_csr")),
    (lambda: torch.eye(3).to_sparse(), r"^save: cannot store the tensor: " + _DENSE.format("sparse_coo")),
    (lambda: {"m": _sparse_linear()}, r"^save: cannot store parameter 'weight' at 'm': "
                                      + _DENSE.format("sparse_coo")),
    (lambda: {"m": nn.LazyLinear(3)}, r"^save: cannot store parameter 'weight' at 'm': " + _LAZY),
    (lambda: {"net": nn.Sequential(nn.Linear(2, 2), nn.LazyBatchNorm1d())},
     r"^save: cannot store parameter '1\.weight' at 'net': " + _LAZY),
    (lambda: {"p": nn.parameter.UninitializedParameter()}, r"^save: cannot store the tensor at 'p': " + _LAZY),
    (lambda: {"b": nn.parameter.UninitializedBuffer()}, r"^save: cannot store the tensor at 'b': " + _LAZY),
    (lambda: {"n": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])},
     r"^save: cannot store the tensor at 'n': it is a nested tensor \(load could not check its shape\); store "
     r"its components \(tensor\.unbind\(\)\) instead$"),
])
@pytest.mark.filterwarnings("ignore::UserWarning")  # nested tensors and lazy modules are prototypes in torch
def test_tensors_save_cannot_write_are_type_errors_naming_the_path(tmp_path: Path, make: Any, message: str) -> None:
    keeps_old_file(tmp_path, make(), TypeError, message)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no MKL-DNN in this torch")
def test_mkldnn_tensor_is_refused(tmp_path: Path) -> None:
    keeps_old_file(tmp_path, {"x": torch.ones(2).to_mkldnn()}, TypeError,
                    r"^save: cannot store the tensor at 'x': " + _DENSE.format("_mkldnn"))


def test_initialised_lazy_module_saves(tmp_path: Path) -> None:
    torch.manual_seed(0)
    lazy = nn.LazyLinear(3)
    lazy(torch.ones(1, 2))
    save({"m": lazy}, tmp_path / "l.pt")
    loaded = load(tmp_path / "l.pt")["m"]
    assert torch.equal(loaded["weight"], lazy.weight.detach()) and loaded["weight"].shape == (3, 2)


# -- set_rng_state checks everything before changing anything ------------------------------------------
def _rng_snapshot() -> tuple[Any, ...]:
    numpy_state: Any = np.random.get_state()
    return random.getstate(), (numpy_state[0], numpy_state[1].tobytes(), *numpy_state[2:]), torch.get_rng_state()


def _same_snapshot(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


_PY = r"a state from random\.getstate\(\)"
_NP = r"a state from numpy\.random\.get_state\(\)"
_TORCH = r"torch's CPU generator state \(a 1-D uint8 tensor\) from torch\.get_rng_state\(\)"
_CUDA = r"a list of CUDA generator states \(1-D uint8 tensors\) from torch\.cuda\.get_rng_state_all\(\)"
_NOTHING = r"; no generator was changed$"


@pytest.mark.parametrize(("key", "value", "error", "message"), [
    ("torch", "garbage", TypeError,
     rf"{_TORCH} under 'torch', got a str \(expected a torch\.ByteTensor, but got str\)"),
    ("torch", torch.zeros(3, dtype=torch.uint8), ValueError,
     rf"{_TORCH} under 'torch', got a tensor of shape \(3,\) uint8 on cpu \(Expected .*CPUGeneratorImplState of "
     r"size 5056 but found the input RNG state size to be 3\)"),  # torch before 2.10 names a legacy size too
    ("torch", torch.zeros(5056), TypeError, rf"{_TORCH} under 'torch', got a tensor of shape \(5056,\) float32"),
    ("python", ("b",), ValueError, rf"{_PY} under 'python', got a tuple \(state with version b passed to "
                                   r"Random\.setstate\(\) of version 3\)"),
    ("python", None, TypeError, rf"{_PY} under 'python', got a NoneType \("),
    ("numpy", "x", TypeError, rf"{_NP} under 'numpy', got a str \(state must be a dict or a tuple\.\)"),
    ("numpy", ("MT19937", np.zeros(3, dtype=np.uint32), 0), ValueError, rf"{_NP} under 'numpy', got a tuple \("),
    ("cuda", "x", TypeError, rf"{_CUDA} under 'cuda', got a str \(not a list\)"),
    ("cuda", [torch.zeros(16)], TypeError,
     rf"{_CUDA} under 'cuda', got a list \(item 0 is a tensor of shape \(16,\) float32 on cpu\)"),
])
def test_set_rng_state_checks_every_entry_before_changing_anything(key: str, value: Any, error: type[Exception],
                                                                   message: str) -> None:
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    good = get_rng_state()
    random.seed(2)
    np.random.seed(2)
    torch.manual_seed(2)
    before = _rng_snapshot()
    state = {name: entry for name, entry in good.items() if name in ("python", "numpy", "torch") and name != key}
    state[key] = value  # last: the old code applied the valid entries before reaching it
    with pytest.raises(error, match=r"^set_rng_state: expected " + message + ".*" + _NOTHING):
        set_rng_state(state)
    assert _same_snapshot(_rng_snapshot(), before)
    set_rng_state({name: entry for name, entry in state.items() if name != key})  # the good part still applies
    assert key == "python" or random.getstate() == good["python"]
    assert key == "torch" or torch.equal(torch.get_rng_state(), good["torch"])


def test_set_rng_state_unknown_keys_of_any_type_are_named() -> None:
    bad: dict[Any, Any] = {"python": random.getstate(), 1: None, "x": None}  # 1 is the first unknown key
    with pytest.raises(ValueError, match=r"^set_rng_state: expected keys among 'python', 'numpy', 'torch', 'cuda', "
                                         r"got unknown key 1$"):
        set_rng_state(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_cuda_rng_entry_is_checked_but_not_applied_without_cuda() -> None:
    before = _rng_snapshot()
    set_rng_state({"cuda": [torch.zeros(16, dtype=torch.uint8)]})  # a GPU machine's state: nothing to set here
    assert _same_snapshot(_rng_snapshot(), before)


@pytest.mark.parametrize("length", [0, 1, 2, 4])
def test_legacy_numpy_states_numpy_reads_past_are_refused_first(length: int) -> None:
    # NumPy before 1.26 reads these items unchecked (the interpreter crashed); later NumPy raises IndexError
    np.random.seed(3)
    good = np.random.get_state()
    state = list(good)[:length]
    before = _rng_snapshot()
    with pytest.raises(ValueError, match=rf"^set_rng_state: expected {_NP} under 'numpy', got a list \(a legacy "
                                         rf"NumPy state has 3 or 5 items .*, got {length}\){_NOTHING}"):
        set_rng_state({"numpy": state})
    assert _same_snapshot(_rng_snapshot(), before)
    for kept in (3, 5):  # what numpy.random.get_state() gives, with or without its cached Gaussian
        np.random.seed(4)
        set_rng_state({"numpy": tuple(good)[:kept]})
        assert np.random.get_state()[1].tolist() == good[1].tolist() and np.random.get_state()[2] == good[2]


def test_rng_state_through_a_file_then_partly_bad_changes_nothing(tmp_path: Path) -> None:
    torch.manual_seed(5)
    save(get_rng_state(), tmp_path / "rng.pt")
    loaded = load(tmp_path / "rng.pt")
    loaded["numpy"] = list(loaded["numpy"])[:2]  # a truncated NumPy state
    torch.manual_seed(6)
    before = _rng_snapshot()
    with pytest.raises(ValueError, match=r"^set_rng_state: expected a state from numpy\.random\.get_state\(\) "
                                         r"under 'numpy', got a list"):
        set_rng_state(loaded)
    assert _same_snapshot(_rng_snapshot(), before)


# -- a generator for a device this machine lacks ------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_cuda_generator_without_cuda_is_a_checkpoint_error_naming_the_entry(tmp_path: Path) -> None:
    entry = {"__nytorch__": "generator", "device": "cuda:0", "state": torch.zeros(16, dtype=torch.uint8)}
    torch.save({"format": "nytorch.checkpoint", "version": 1, "data": {"opt": [entry]}}, tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match=r"^load: cannot restore the generator at 'opt\.0' on cuda:0: CUDA is "
                                              r"not available on this machine; load this checkpoint where that "
                                              r"device exists$"):
        load(tmp_path / "g.pt")
    with pytest.raises(StructureError, match=r"^load \(at 'opt\.0'\): like is a generator on cpu but the "
                                             r"checkpoint holds one on cuda:0$"):
        load(tmp_path / "g.pt", like={"opt": [torch.Generator()]})


# -- Parameters come back as Parameters; tensors keep like's requires_grad -----------------------------
@pytest.mark.parametrize("requires_grad", [True, False])
def test_parameter_like_gives_a_parameter_with_its_requires_grad(tmp_path: Path, requires_grad: bool) -> None:
    saved = nn.Parameter(torch.arange(3.0))
    save({"p": saved, "n": nn.Parameter(torch.arange(2), requires_grad=False)}, tmp_path / "p.pt")
    like_p = nn.Parameter(torch.zeros(3), requires_grad=requires_grad)
    like_n = nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)
    loaded = load(tmp_path / "p.pt", like={"p": like_p, "n": like_n})
    assert type(loaded["p"]) is nn.Parameter and loaded["p"].requires_grad is requires_grad
    assert loaded["p"] is not like_p and torch.equal(loaded["p"].detach(), torch.arange(3.0))
    assert type(loaded["n"]) is nn.Parameter and not loaded["n"].requires_grad
    assert torch.equal(loaded["n"], torch.arange(2)) and not like_p.detach().any()
    top = load(tmp_path / "p.pt", like={"p": torch.zeros(3, requires_grad=requires_grad), "n": torch.zeros(2).long()})
    assert type(top["p"]) is torch.Tensor and top["p"].requires_grad is requires_grad and top["p"].is_leaf
    assert type(load(tmp_path / "p.pt")["p"]) is torch.Tensor  # without like: plain tensors


# -- load matches a model's parameters by name ---------------------------------------------------------
class _Ordered(nn.Module):
    """The same class registering ``a`` and ``b`` in either order."""

    def __init__(self, first: str = "a") -> None:
        super().__init__()
        for name in (first, "b" if first == "a" else "a"):
            setattr(self, name, nn.Linear(2, 2))


@pytest.mark.parametrize("wrap", ["module", "particle"])
def test_load_matches_parameters_by_name_in_any_order(tmp_path: Path, wrap: str) -> None:
    torch.manual_seed(0)
    source = _Ordered("a")
    save(source if wrap == "module" else nytorch.particle(source), tmp_path / "o.pt")
    like_module = _Ordered("b")
    like = like_module if wrap == "module" else nytorch.particle(like_module)
    loaded = load(tmp_path / "o.pt", like=like)
    module = loaded if wrap == "module" else loaded.module()
    assert [name for name, _ in module.named_parameters()] == ["b.weight", "b.bias", "a.weight", "a.bias"]
    for name, value in source.named_parameters():
        assert torch.equal(module.get_parameter(name), value)
    with pytest.raises(StructureError, match=r"^add: the second operand lists the same parameters in another order"):
        nytorch.particle(source) + nytorch.particle(like_module)  # arithmetic still pairs by position (README)


# -- other uncommon values ---------------------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    """Equal values of the same type, recursively (tensors with their dtype, NumPy values with theirs)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (np.ndarray, np.generic)):
        return a.dtype == b.dtype and np.shape(a) == np.shape(b) and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


_UNCOMMON: dict[str, Any] = {
    "zero_dim_array": np.array(3.5),
    "zero_dim_int_array": np.array(7, dtype=np.uint8),
    "np_bool": np.bool_(True),
    "np_uint64_max": np.uint64(2**64 - 1),
    "np_float16": np.float16(0.1),
    "np_complex64": np.complex64(1 - 2j),
    "np_datetime": np.datetime64("2020-01-02T03:04", "m"),
    "np_str": np.str_("héllo"),
    "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    "transposed": np.arange(6).reshape(2, 3).T,
    "empty_array": np.zeros((0, 3), dtype=np.int8),
    "bfloat16": torch.tensor([1.5, -2.25], dtype=torch.bfloat16),
    "float16": torch.tensor([65504.0], dtype=torch.float16),
    "complex64": torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
    "complex128_conj": torch.tensor([1 + 2j], dtype=torch.complex128).conj(),
    "int8": torch.tensor([-128, 127], dtype=torch.int8),
    "bool": torch.tensor([True, False]),
    "zero_dim_tensor": torch.tensor(2.0),
    "empty_tensor": torch.zeros(0, 4),
    "empty_dict": {},
    "empty_list": [],
    "empty_tuple": (),
    "nested_empty": [(), {}, [[]]],
    "ordered": OrderedDict([("z", 1), ("a", (2.5, None))]),
    "tuple_of_lists": ([1, 2], [3.0]),
    "size": torch.Size([2, 3]),
    "dtype": torch.bfloat16,
    "device": torch.device("cpu"),
    "complex": 1 - 1j,
    "bytes": b"\x00\xff",
    "huge_int": 2**100,
}


@pytest.mark.parametrize("key", list(_UNCOMMON))
def test_uncommon_values_round_trip_with_and_without_like(tmp_path: Path, key: str) -> None:
    value = _UNCOMMON[key]
    save({"v": value}, tmp_path / "u.pt")
    assert _same(load(tmp_path / "u.pt")["v"], value)
    assert _same(load(tmp_path / "u.pt", like={"v": value})["v"], value)


@pytest.mark.parametrize(("saved", "like", "expected"), [
    ((1, 2), [], [1, 2]),
    ([1, 2], (), (1, 2)),
    ((1, (2, 3)), [0, [0, 0]], [1, [2, 3]]),
    ([], (), ()),
])
def test_lists_and_tuples_come_back_as_like_is(tmp_path: Path, saved: Any, like: Any, expected: Any) -> None:
    save(saved, tmp_path / "l.pt")
    assert _same(load(tmp_path / "l.pt", like=like), expected)


@pytest.mark.parametrize(("saved", "like", "message"), [
    (torch.ones(2, dtype=torch.bfloat16), torch.ones(2),
     r"^load \(at 'v'\): parameter 'v' differs: like has shape \(2,\) float32, the checkpoint has shape \(2,\) "
     r"bfloat16$"),
    (torch.ones(2, dtype=torch.complex64), torch.ones(2, dtype=torch.complex128),
     r"^load \(at 'v'\): parameter 'v' differs: like has shape \(2,\) complex128, the checkpoint has shape \(2,\) "
     r"complex64$"),
    (torch.tensor(1.0), torch.ones(1), r"^load \(at 'v'\): parameter 'v' differs: like has shape \(1,\) float32, "
                                       r"the checkpoint has shape \(\) float32$"),
    ({}, [], r"^load \(at 'v'\): like is a list of 0 items but the checkpoint holds a dict$"),
    ([], {}, r"^load \(at 'v'\): like is a dict but the checkpoint holds a list$"),
    ((1,), torch.Size([1]), r"^load \(at 'v'\): like is a Size but the checkpoint holds a tuple$"),
    (np.bool_(True), True, r"^load \(at 'v'\): like is a bool but the checkpoint holds a NumPy scalar$"),
])
def test_uncommon_mismatches_name_the_entry(tmp_path: Path, saved: Any, like: Any, message: str) -> None:
    save({"v": saved}, tmp_path / "m.pt")
    with pytest.raises(StructureError, match=message):
        load(tmp_path / "m.pt", like={"v": like})


def test_nested_particles_and_swarms_round_trip_and_name_nested_differences(tmp_path: Path) -> None:
    torch.manual_seed(0)
    nets = [nn.Linear(3, 2) for _ in range(3)]
    state = {"outer": [{"p": nytorch.particle(nets[0]), "s": nytorch.Swarm.stack(nets[1:])}, (nets[0],)]}
    save(state, tmp_path / "n.pt")
    like: Any = {"outer": [{"p": nytorch.particle(nn.Linear(3, 2)), "s": nytorch.Swarm.stack([nn.Linear(3, 2)] * 2)},
                      (nn.Linear(3, 2),)]}
    loaded = load(tmp_path / "n.pt", like=like)
    particle, swarm = loaded["outer"][0]["p"], loaded["outer"][0]["s"]
    assert isinstance(particle, nytorch.Particle) and isinstance(swarm, nytorch.Swarm) and len(swarm) == 2
    assert torch.equal(particle.module().get_parameter("weight"), nets[0].weight)
    for i in range(2):
        assert torch.equal(swarm.params["weight"][i], nets[1 + i].weight.detach())
    assert type(loaded["outer"][1]) is tuple and torch.equal(loaded["outer"][1][0].bias, nets[0].bias)
    like["outer"][0]["s"] = nytorch.Swarm.stack([nn.Linear(4, 2)] * 2)
    with pytest.raises(StructureError, match=re.escape("load (at 'outer.0.s'): parameter 'weight' differs: like "
                                                       "has shape (2, 2, 4) float32, the checkpoint has shape "
                                                       "(2, 2, 3) float32")):
        load(tmp_path / "n.pt", like=like)
