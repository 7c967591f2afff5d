# mypy: disable-error-code="union-attr, index, operator, arg-type, assignment"
"""Checkpoints from the attacker's and the archivist's seat.

Crafted pickles (code-running opcodes, globals a process allowlisted, torch rebuild functions
with out-of-range storages and sizes, cycles, shared sub-lists, deep nesting), zip tricks
(concatenated or prepended archives, compressed records), seeded corruption at every region of
a valid file, paths of every kind, round trips of every kind ``save`` accepts (values, dtypes,
strides, sharing, RNG states, optimizer and EMA states) against plain torch/NumPy references,
and what ``load`` does with files other tools wrote.

``tests/test_checkpoint.py`` and ``tests/test_checkpoint_edges.py`` hold the core promises.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import pickle
import random
import re
import signal
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from torch import nn

import nytorch
from nytorch import CheckpointError, StructureError, merge

FORMAT = {"format": "nytorch.checkpoint", "version": 1}


# -- helpers: a tiny pickle assembler and an archive re-writer --------------------------------
def _s(text: str) -> bytes:
    """BINUNICODE."""
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _i(number: int) -> bytes:
    """BININT, or LONG1 for numbers beyond 32 bits."""
    if -2**31 <= number < 2**31:
        return b"J" + struct.pack("<i", number)
    return b"\x8a\x08" + number.to_bytes(8, "little", signed=True)


def _g(module: str, name: str) -> bytes:
    """GLOBAL."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _storage(key: str, numel: int, kind: str = "FloatStorage") -> bytes:
    return b"(" + _s("storage") + _g("torch", kind) + _s(key) + _s("cpu") + _i(numel) + b"tQ"


def _tensor(storage: bytes, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    return (_g("torch._utils", "_rebuild_tensor_v2") + b"(" + storage + _i(offset) + _tup(*map(_i, size))
            + _tup(*map(_i, stride)) + b"\x89" + _g("collections", "OrderedDict") + b")R" + b"tR")


def _wrap(body: bytes) -> bytes:
    """A whole data.pkl: ``{"format": ..., "version": 1, "data": <body>}``."""
    return (b"\x80\x02}(" + _s("format") + _s("nytorch.checkpoint") + _s("version") + b"K\x01" + _s("data")
            + body + b"u.")


def _rezip(source: Path, target: Path, replace: dict[str, bytes], *,
           compression: int = zipfile.ZIP_STORED) -> None:
    """Copy ``source``'s records to ``target`` (valid CRC-32s), replacing those whose name ends with a key."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", compression) as new:
        for info in old.infolist():
            data = next((value for key, value in replace.items() if info.filename.endswith(key)), None)
            new.writestr(info.filename, old.read(info) if data is None else data)


def _record(path: Path, suffix: str) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(next(name for name in archive.namelist() if name.endswith(suffix)))


def _crafted(tmp_path: Path, body: bytes, name: str = "crafted.pt") -> Path:
    """A file of nytorch's format (valid CRC-32s) whose data.pkl holds ``body`` under "data"."""
    base = tmp_path / "base.pt"
    nytorch.save({"w": torch.ones(3)}, base)
    path = tmp_path / name
    _rezip(base, path, {"data.pkl": _wrap(body)})
    return path


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Turn a hang into a failure (SIGALRM; the tests run in the main thread)."""
    def expire(*_: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# == (1) files crafted to run code ============================================================
def _code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('pwned')"


_PAYLOADS = {  # body of data.pkl's "data", given the code to run; all are plain protocol-2 opcodes
    "GLOBAL builtins.exec + REDUCE": lambda code: _g("builtins", "exec") + _tup(_s(code)) + b"R",
    "GLOBAL builtins.eval + REDUCE": lambda code: _g("builtins", "eval") + _tup(_s(code)) + b"R",
    "GLOBAL os.system + REDUCE": lambda code: _g("os", "system") + _tup(_s(f"python -c \"{code}\"")) + b"R",
    "INST builtins.exec": lambda code: b"(" + _s(code) + b"ibuiltins\nexec\n",
    "OBJ builtins.exec": lambda code: b"(" + _g("builtins", "exec") + _s(code) + b"o",
    "STACK_GLOBAL builtins.exec": lambda code: _s("builtins") + _s("exec") + b"\x93" + _tup(_s(code)) + b"R",
    "NEWOBJ subprocess.Popen": lambda code: _g("subprocess", "Popen") + _tup(_tup(_s("true"))) + b"\x81",
    "BUILD on an allowed OrderedDict, then exec": lambda code: (_g("collections", "OrderedDict") + b")R}"
                                                                + b"b" + _g("builtins", "exec") + _tup(_s(code))
                                                                + b"R"),
}
_RUNS_UNRESTRICTED = {"GLOBAL builtins.exec + REDUCE", "GLOBAL builtins.eval + REDUCE", "INST builtins.exec",
                      "OBJ builtins.exec", "STACK_GLOBAL builtins.exec"}


@pytest.mark.parametrize("kind", list(_PAYLOADS))
def test_crafted_pickles_are_refused_and_nothing_runs(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "PWNED"
    body = _PAYLOADS[kind](_code(marker))
    if kind in _RUNS_UNRESTRICTED:  # the payload is real: an ordinary unpickler runs it
        pickle.loads(b"\x80\x02" + body + b".")  # noqa: S301 - deliberately unsafe, on our own bytes
        assert marker.exists()
        marker.unlink()
    path = _crafted(tmp_path, body, "evil.pt")
    for like in (None, {"w": torch.zeros(3)}, {"w": None}):
        with pytest.raises(CheckpointError, match=r"^load: (refused '.*evil\.pt': it holds Python objects other "
                                                  r"than tensors|'.*evil\.pt' is not a readable checkpoint)"):
            nytorch.load(path, like=like)
    assert not marker.exists()


def test_globals_refused_name_the_global(tmp_path: Path) -> None:
    path = _crafted(tmp_path, _PAYLOADS["GLOBAL os.system + REDUCE"]("0"), "evil.pt")
    with pytest.raises(CheckpointError, match=r"^load: refused '.*evil\.pt': it holds Python objects other than "
                                              r"tensors and plain containers, which could run code when unpickled "
                                              r"\(GLOBAL os\.system: not one of the globals torch allows by "
                                              r"default\)$"):
        nytorch.load(path)


class _Allowlisted:
    """A class a script allowlisted for its own checkpoints; unpickling it runs ``__setstate__``."""

    marker: Path = Path("unset")

    def __getstate__(self) -> dict[str, Any]:
        return {"a": 1}

    def __setstate__(self, state: dict[str, Any]) -> None:
        _Allowlisted.marker.write_text("ran")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_globals_the_process_allowlisted_are_still_refused(tmp_path: Path, zip_format: bool) -> None:
    """``torch.serialization.add_safe_globals`` widens ``torch.load(weights_only=True)``, never ``nytorch.load``."""
    _Allowlisted.marker = tmp_path / "RAN"
    path = tmp_path / "evil.pt"
    torch.save({**FORMAT, "data": {"w": torch.ones(2), "x": _Allowlisted()}}, path,
               _use_new_zipfile_serialization=zip_format)
    with torch.serialization.safe_globals([_Allowlisted]):
        torch.load(path, weights_only=True)  # torch alone runs the class's code
        assert _Allowlisted.marker.exists()
        _Allowlisted.marker.unlink()
        for like in (None, {"w": torch.zeros(2), "x": None}):
            with pytest.raises(CheckpointError, match=r"^load: refused '.*evil\.pt': .* could run code when "
                                                      r"unpickled \(GLOBAL .*_Allowlisted: not one of the globals "
                                                      r"torch allows by default\)$"):
                nytorch.load(path, like=like)
    assert not _Allowlisted.marker.exists()


def test_exploits_pickled_with_newer_protocols_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (exec, (_code(marker),))

    (tmp_path / "p5.pt").write_bytes(pickle.dumps(Exploit(), protocol=5))
    torch.save({**FORMAT, "data": Exploit()}, tmp_path / "p4.pt", pickle_protocol=4)
    for name in ("p5.pt", "p4.pt"):
        with pytest.raises(CheckpointError, match=rf"^load: '.*{name}' is not a readable checkpoint \(truncated or "
                                                  r"corrupt\?\): Unsupported operand 149$"):  # FRAME
            nytorch.load(tmp_path / name)
    assert not marker.exists()


def test_legitimate_torch_rebuild_functions_load(tmp_path: Path) -> None:
    """Files other tools wrote in nytorch's format may hold Parameters and tensors with attributes."""
    weight = nn.Parameter(torch.arange(3.0))
    tagged = torch.arange(2.0)
    tagged.note = "kept"  # pickled through torch._tensor._rebuild_from_type_v2 with its __dict__
    torch.save({**FORMAT, "data": {"p": weight, "t": tagged, "b": b"\x00\xff", "c": 1 + 2j}}, tmp_path / "ok.pt")
    pickled = _record(tmp_path / "ok.pt", "data.pkl")
    assert b"_rebuild_from_type_v2" in pickled and b"_rebuild_parameter" in pickled and b"_codecs" in pickled
    raw = nytorch.load(tmp_path / "ok.pt")
    assert torch.equal(raw["p"], weight) and torch.equal(raw["t"], tagged) and raw["t"].note == "kept"
    assert raw["b"] == b"\x00\xff" and raw["c"] == 1 + 2j
    loaded = nytorch.load(tmp_path / "ok.pt", like={"p": nn.Parameter(torch.zeros(3)), "t": torch.zeros(2),
                                                    "b": b"", "c": 0j})
    assert isinstance(loaded["p"], nn.Parameter) and torch.equal(loaded["p"], weight)


_BAD_TENSORS = {
    "storage key not in the archive": (_tensor(_storage("7", 3), 0, (3,), (1,)),
                                       r"failed locating file data/7"),
    "storage of 2**60 elements declared": (_tensor(_storage("0", 2**60), 0, (3,), (1,)),
                                           r"record size \(12 bytes\) does not match expected size"),
    "storage of negative size": (_tensor(_storage("0", -5), 0, (3,), (1,)), r"TypeError"),
    "size beyond the storage": (_tensor(_storage("0", 3), 0, (100,), (1,)), r"RuntimeError"),
    "offset beyond the storage": (_tensor(_storage("0", 3), 5, (1,), (1,)), r"RuntimeError"),
    "negative offset": (_tensor(_storage("0", 3), -1, (1,), (1,)), r"invalid storage offset -1"),
    "negative stride": (_tensor(_storage("0", 3), 2, (3,), (-1,)), r"RuntimeError"),
    "negative size": (_tensor(_storage("0", 3), 0, (-3,), (1,)), r"RuntimeError"),
    "storage of another dtype's record size": (_tensor(_storage("0", 3, "DoubleStorage"), 0, (3,), (1,)),
                                               r"does not match expected size"),
    "__class__ set through _rebuild_from_type_v2": (
        _g("torch._tensor", "_rebuild_from_type_v2") + _tup(
            _g("torch._utils", "_rebuild_tensor_v2"), _g("torch", "Tensor"),
            _tup(_storage("0", 3), _i(0), _tup(_i(3)), _tup(_i(1)), b"\x89",
                 _g("collections", "OrderedDict") + b")R"),
            b"}" + _s("__class__") + _i(3) + b"s") + b"R", r"__class__ must be set to a class"),
    "persistent id that is no storage": (_tup(_s("module"), _s("x")) + b"Q", r"unparsable pickle"),
    "memo entry never stored": (b"h\x09", r"KeyError: 9"),
    "sparse tensor of no layout": (_g("torch._utils", "_rebuild_sparse_tensor") + _tup(b"N", b"N") + b"R",
                                   r"rebuilding sparse tensor"),
}


@pytest.mark.parametrize("case", list(_BAD_TENSORS))
def test_tensors_out_of_their_storage_are_checkpoint_errors_naming_the_file(tmp_path: Path, case: str) -> None:
    body, reason = _BAD_TENSORS[case]
    path = _crafted(tmp_path, b"}" + _s("w") + body + b"s", "bad.pt")
    for like in (None, {"w": torch.zeros(3)}):
        with pytest.raises(CheckpointError, match=r"^load: '.*bad\.pt' is not a readable checkpoint \(truncated or "
                                                  rf"corrupt\?\): .*{reason}"):
            nytorch.load(path, like=like)


def test_a_huge_stride_zero_view_is_a_view_and_like_refuses_its_shape(tmp_path: Path) -> None:
    path = _crafted(tmp_path, _tensor(_storage("0", 3), 0, (2**30, 2**30), (0, 0)))
    view = nytorch.load(path)  # 2**60 elements over 12 bytes: nothing allocated
    assert view.shape == (2**30, 2**30) and view.untyped_storage().nbytes() == 12
    with pytest.raises(StructureError, match=r"like has shape \(3,\) float32, the checkpoint has shape "
                                             r"\(1073741824, 1073741824\) float32"):
        nytorch.load(path, like=torch.zeros(3))


_NO_BYTES = torch.zeros(0, dtype=torch.uint8)


@pytest.mark.parametrize(("shape", "dtype", "message"), [
    ([2**40, 2**40], "<f8", r"expected 9671406556917033397649408 bytes under 'data' for shape "
                            r"\[1099511627776, 1099511627776\] float64, got 0$"),
    ([0, 2**62], "<f8", r"cannot build an array of shape \[0, 4611686018427387904\] float64 \(array is too big"),
    ([2**62, 2**62, 0], "<f8", r"cannot build an array of shape \[4611686018427387904, 4611686018427387904, 0\]"),
    ([], "V2147483647", r"expected 2147483647 bytes under 'data' for shape \[\] \|V2147483647, got 0$"),
    ([1], [("a", "<f8", (2**31, 2**31))], r"expected a NumPy dtype description"),
])
def test_numpy_entries_declaring_huge_sizes_allocate_nothing(tmp_path: Path, shape: list[int], dtype: Any,
                                                             message: str) -> None:
    entry = {"__nytorch__": "ndarray", "dtype": dtype, "shape": shape, "scalar": False, "data": _NO_BYTES}
    torch.save({**FORMAT, "data": {"a": entry}}, tmp_path / "nd.pt")
    for like in (None, {"a": np.zeros(1)}):
        with pytest.raises(CheckpointError, match=r"^load: malformed 'ndarray' entry at 'a': " + message):
            nytorch.load(tmp_path / "nd.pt", like=like)


# == (2) zip tricks =============================================================================
def test_concatenated_archives_are_refused(tmp_path: Path) -> None:
    """zipfile reads the last archive's records, torch the first's: the CRC check would vouch for other bytes."""
    nytorch.save({"w": torch.zeros(100)}, tmp_path / "a.pt")
    nytorch.save({"w": torch.ones(100)}, tmp_path / "b.pt")
    both = tmp_path / "both.pt"
    both.write_bytes((tmp_path / "a.pt").read_bytes() + (tmp_path / "b.pt").read_bytes())
    with zipfile.ZipFile(both) as archive:  # zipfile sees (and checks) the second archive
        assert min(info.header_offset for info in archive.infolist()) == (tmp_path / "a.pt").stat().st_size
    assert torch.equal(torch.load(both, weights_only=True)["data"]["w"], torch.zeros(100))  # torch: the first
    with pytest.raises(CheckpointError, match=r"^load: '.*both\.pt' is not a readable checkpoint \(truncated or "
                                              r"corrupt\?\): the archive does not start at the first byte of the "
                                              r"file \(bytes prepended, or archives concatenated\)$"):
        nytorch.load(both)


def test_prepended_bytes_are_refused(tmp_path: Path) -> None:
    nytorch.save({"w": torch.ones(3)}, tmp_path / "a.pt")
    (tmp_path / "pre.pt").write_bytes(b"#!/bin/sh\n" * 10 + (tmp_path / "a.pt").read_bytes())
    with pytest.raises(CheckpointError, match=r"the archive does not start at the first byte"):
        nytorch.load(tmp_path / "pre.pt")


def test_compressed_records_are_refused_before_they_unpack(tmp_path: Path) -> None:
    """A deflated record of zeros is a zip bomb: 1,000 times the file's size once read."""
    numel = 1_000_000
    path = tmp_path / "bomb.pt"
    nytorch.save({"w": torch.ones(1)}, tmp_path / "base.pt")
    _rezip(tmp_path / "base.pt", path, {"data.pkl": _wrap(b"}" + _s("w") + _tensor(_storage("0", numel), 0, (numel,),
                                                                                 (1,)) + b"s"),
                                        "data/0": bytes(4 * numel)}, compression=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 4 * numel / 200
    assert torch.load(path, weights_only=True)["data"]["w"].numel() == numel  # torch alone unpacks it
    with pytest.raises(CheckpointError, match=r"^load: '.*bomb\.pt' is not a readable checkpoint \(truncated or "
                                              r"corrupt\?\): record '.*' is compressed \(torch\.save stores records "
                                              r"as they are\)$"):
        nytorch.load(path)


def test_a_zip_inside_the_pickle_record_is_unreadable(tmp_path: Path) -> None:
    nytorch.save({"w": torch.ones(3)}, tmp_path / "inner.pt")
    path = tmp_path / "nested.pt"
    _rezip(tmp_path / "inner.pt", path, {"data.pkl": (tmp_path / "inner.pt").read_bytes()})
    with pytest.raises(CheckpointError, match=r"^load: '.*nested\.pt' is not a readable checkpoint"):
        nytorch.load(path)


# == (3) shapes of pickles nytorch.save never writes ===========================================
_CYCLES = {
    "list": b"]q\x00h\x00a",  # l = []; l.append(l)
    "dict": b"}q\x00" + _s("k") + b"h\x00s",
    "namedtuple fields": (b"}q\x00(" + _s("__nytorch__") + _s("namedtuple") + _s("class") + _s("m.T") + _s("fields")
                          + b"}" + _s("f") + b"h\x00su"),
}


@pytest.mark.parametrize("kind", list(_CYCLES))
def test_a_container_holding_itself_is_a_checkpoint_error(tmp_path: Path, kind: str) -> None:
    path = _crafted(tmp_path, _CYCLES[kind])
    with _deadline(10), pytest.raises(CheckpointError, match=r"^load: malformed checkpoint at '.+': expected a tree "
                                                             r"of containers, got a (list|dict) that holds itself "
                                                             r"\(nytorch\.save never writes cycles\)$"):
        nytorch.load(path)


def _shared_levels(levels: int) -> bytes:
    """A tuple of lists x0..xN with x(k+1) = [xk, xk]: N * 20 bytes, 2**N paths to the innermost list."""
    body = b"(]" + _i(1) + b"aq\x00"
    for level in range(levels):
        body += b"](h" + bytes([level]) + b"h" + bytes([level]) + b"eq" + bytes([level + 1])
    return body + b"t"


def test_shared_sub_lists_load_once_instead_of_hanging(tmp_path: Path) -> None:
    path = _crafted(tmp_path, _shared_levels(80))
    assert path.stat().st_size < 5000
    for like in (None, []):
        with _deadline(10):
            loaded = nytorch.load(path, like=like)
        top = loaded[80]
        assert len(loaded) == 81 and top[0] is top[1]  # shared, as pickle loads it
        inner = top
        for _ in range(80):
            inner = inner[0]
        assert inner == [1]


def test_nesting_deeper_than_the_recursion_limit_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = _crafted(tmp_path, b"]" * 20000 + b"a" * 19999)
    with pytest.raises(CheckpointError, match=r"^load: '.*crafted\.pt' nests containers deeper than Python's "
                                              r"recursion limit \(\d+\); nytorch\.save never writes such files$"):
        nytorch.load(path)


def test_save_refuses_cycles_and_writes_nothing(tmp_path: Path) -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    for obj in (cycle, {"a": [cycle]}):
        with pytest.raises(ValueError, match=r"^save: expected a tree of values, got containers that hold "
                                             r"themselves or nest deeper than Python's recursion limit"):
            nytorch.save(obj, tmp_path / "c.pt")
    assert os.listdir(tmp_path) == []
    deep: Any = 1
    for _ in range(400):  # as deep as anyone nests: saves and loads
        deep = [deep]
    nytorch.save(deep, tmp_path / "deep.pt")
    assert nytorch.load(tmp_path / "deep.pt") == deep


def test_containers_of_other_allowed_types_load_as_plain_ones(tmp_path: Path) -> None:
    """The restricted unpickler also builds Counter, set and bytearray; nytorch.save never writes them."""
    body = (b"}(" + _s("counter") + _g("collections", "Counter") + b")R" + _s("a") + _i(3) + b"s"
            + _s("set") + b"\x8f" + _s("bytes") + _g("builtins", "bytearray") + _tup(_s("ab"), _s("latin1")) + b"R"
            + b"u")
    loaded = nytorch.load(_crafted(tmp_path, body))
    assert loaded == {"counter": {"a": 3}, "set": set(), "bytes": bytearray(b"ab")}
    assert type(loaded["counter"]) is dict


# == (4) corruption anywhere ===================================================================
def _rich_state() -> dict[str, Any]:
    torch.manual_seed(0)
    return {"net": nn.Linear(3, 2), "swarm": nytorch.Swarm.randn(nn.Linear(2, 2), 3), "step": 5,
            "arr": np.arange(4.0), "gen": torch.Generator().manual_seed(3), "rng": nytorch.get_rng_state(),
            "half": torch.randn(5).half(), "names": ("a", "ü")}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (torch.equal(a["net"].weight, b["net"].weight) and torch.equal(a["net"].bias, b["net"].bias)
            and all(torch.equal(a["swarm"].params[k], b["swarm"].params[k]) for k in b["swarm"].params)
            and a["step"] == b["step"] and np.array_equal(a["arr"], b["arr"]) and torch.equal(a["half"], b["half"])
            and torch.equal(a["gen"].get_state(), b["gen"].get_state()) and a["names"] == b["names"])


def _corrupt(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:  # a few random bytes
        for _ in range(rng.choice([1, 2, 3, 8])):
            out[rng.randrange(len(out))] = rng.randrange(256)
    elif kind == 1:
        del out[rng.randrange(len(out)):]
    elif kind == 2:
        out += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    elif kind == 3:
        start = rng.randrange(len(out))
        del out[start:start + rng.randrange(1, 64)]
    else:
        start = rng.randrange(len(out))
        out[start:start] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    return bytes(out)


def test_random_corruption_anywhere_gives_a_checkpoint_error_or_the_saved_values(tmp_path: Path) -> None:
    state = _rich_state()
    nytorch.save(state, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    rng, bad, refused = random.Random(17), tmp_path / "bad.pt", 0
    for _ in range(250):
        bad.write_bytes(_corrupt(data, rng))
        for like in (state, None):
            try:
                with _deadline(10):
                    loaded = nytorch.load(bad, like=like)
            except CheckpointError as error:
                assert "bad.pt" in str(error)
                refused += 1
            else:  # zip padding, timestamps, appended bytes...
                if like is not None:
                    assert _same(loaded, state)
    assert refused > 300


def test_corrupt_records_with_valid_crcs_raise_only_documented_errors(tmp_path: Path) -> None:
    """Mutations that keep every CRC-32 right (an attacker's, not a disk's): never another exception type."""
    state = _rich_state()
    nytorch.save(state, tmp_path / "good.pt")
    with zipfile.ZipFile(tmp_path / "good.pt") as archive:
        records = {info.filename: archive.read(info) for info in archive.infolist()}
    names = sorted(records)
    rng, bad, outcomes = random.Random(5), tmp_path / "bad.pt", set()
    for step in range(300):
        name = "archive/data.pkl" if step % 2 else rng.choice(names)
        _rezip(tmp_path / "good.pt", bad, {name: _corrupt(records[name], rng) if records[name] else b"x"})
        for like in (None, state):
            try:
                with _deadline(10):
                    nytorch.load(bad, like=like)
                outcomes.add("loaded")
            except (CheckpointError, StructureError) as error:
                outcomes.add(type(error).__name__)
            except TypeError as error:  # a class name changed: like's class differs
                assert re.search(r"^load \(at '.*'\): expected a checkpoint of a ", str(error)), error
    assert "CheckpointError" in outcomes


@pytest.mark.parametrize(("record", "content", "message"), [
    ("/version", b"99", r"Attempted to read a PyTorch file with version"),
    ("/version", b"x", r"Couldn't parse the version"),
    ("byteorder", b"middle", r"Unknown endianness type: middle"),
    (".storage_alignment", b"x", r"invalid literal for int"),
])
def test_bad_metadata_records_name_the_file(tmp_path: Path, record: str, content: bytes, message: str) -> None:
    nytorch.save({"w": torch.ones(3)}, tmp_path / "good.pt")
    _rezip(tmp_path / "good.pt", tmp_path / "bad.pt", {record: content})
    with pytest.raises(CheckpointError, match=rf"^load: '.*bad\.pt' is not a readable checkpoint \(truncated or "
                                              rf"corrupt\?\): .*{message}"):
        nytorch.load(tmp_path / "bad.pt")


# == (5) paths ===================================================================================
def test_paths_of_every_kind(tmp_path: Path) -> None:
    name = tmp_path / "ünï cödé 日本 ✓.pt"
    nytorch.save({"w": torch.arange(3.0)}, name)
    for path in (name, str(name)):
        assert torch.equal(nytorch.load(path)["w"], torch.arange(3.0))
    (tmp_path / "link.pt").symlink_to(name)
    assert torch.equal(nytorch.load(tmp_path / "link.pt")["w"], torch.arange(3.0))
    (tmp_path / "dangling.pt").symlink_to(tmp_path / "nowhere.pt")
    with pytest.raises(FileNotFoundError):
        nytorch.load(tmp_path / "dangling.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"^load: '.*empty\.pt' is not a readable checkpoint \(truncated or "
                                              r"corrupt\?\): EOFError"):
        nytorch.load(tmp_path / "empty.pt")
    with pytest.raises(IsADirectoryError):
        nytorch.load(tmp_path)

    class BytesPath(os.PathLike):  # type: ignore[type-arg]
        def __fspath__(self) -> bytes:
            return os.fsencode(name)

    for path, got in ((os.fsencode(name), r"bytes"), (BytesPath(), r"BytesPath of bytes")):
        with pytest.raises(TypeError, match=rf"^load: expected a str or os\.PathLike as path, got {got}$"):
            nytorch.load(path)
        with pytest.raises(TypeError, match=rf"^save: expected a str or os\.PathLike as path, got {got}$"):
            nytorch.save(1, path)


# == (6) round trips of every kind ===============================================================
def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (NaN-safe, bitwise), or the tensor itself for bool."""
    if tensor.dtype == torch.bool:
        return tensor
    return tensor.contiguous().view(torch.uint8)


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
           torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool, torch.float8_e4m3fn,
           torch.float8_e5m2, torch.uint16, torch.uint32, torch.uint64]


@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
def test_every_dtype_round_trips_bitwise(tmp_path: Path, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    source = torch.randn(3, 4, dtype=torch.complex128 if dtype.is_complex else torch.float64) * 5
    source[0, 0] = math.nan if dtype.is_floating_point or dtype.is_complex else 0
    value = source.to(dtype) if dtype.is_complex or dtype.is_floating_point or dtype == torch.bool else \
        source.abs().to(torch.int64).to(dtype)
    nytorch.save({"t": value}, tmp_path / "d.pt")
    for like in (None, {"t": torch.zeros(3, 4, dtype=dtype)}):
        loaded = nytorch.load(tmp_path / "d.pt", like=like)["t"]
        assert loaded.dtype == dtype and torch.equal(_bits(loaded), _bits(value))


def test_memory_layouts_are_kept_where_torch_keeps_them(tmp_path: Path) -> None:
    torch.manual_seed(0)
    values = {"channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
              "transposed": torch.randn(4, 6).t(), "expanded": torch.randn(3, 1).expand(3, 5),
              "every_other_column": torch.randn(4, 6)[:, ::2], "zero_size": torch.zeros(0, 3)}
    nytorch.save(values, tmp_path / "s.pt")
    for like in (None, {name: torch.zeros(value.shape) for name, value in values.items()}):
        loaded = nytorch.load(tmp_path / "s.pt", like=like)
        for name, value in values.items():
            assert torch.equal(loaded[name], value), name
        for name in ("channels_last", "transposed", "expanded"):  # torch.save writes the storage with the strides
            assert loaded[name].stride() == values[name].stride(), name
        assert loaded["expanded"].untyped_storage().nbytes() == 3 * 4  # not 15 values
        assert loaded["every_other_column"].is_contiguous()  # a view of part of its storage: written as a copy


def test_sharing_and_file_size(tmp_path: Path) -> None:
    """One tensor stored twice is written once and loads shared; a view of part of a storage is written
    alone (a copy), so a file never holds bytes nobody asked for."""
    base = torch.randn(100_000)
    nytorch.save({"a": base, "b": base}, tmp_path / "twice.pt")
    loaded = nytorch.load(tmp_path / "twice.pt")
    assert loaded["a"].data_ptr() == loaded["b"].data_ptr() and torch.equal(loaded["a"], base)
    assert (tmp_path / "twice.pt").stat().st_size < 1.1 * base.numel() * 4
    nytorch.save({"head": base[:10]}, tmp_path / "view.pt")
    assert (tmp_path / "view.pt").stat().st_size < 4000
    assert torch.equal(nytorch.load(tmp_path / "view.pt")["head"], base[:10])


def test_meta_tensors_round_trip_as_meta_and_refuse_real_templates(tmp_path: Path) -> None:
    nytorch.save({"m": torch.empty(2, 3, device="meta")}, tmp_path / "m.pt")
    assert nytorch.load(tmp_path / "m.pt")["m"].is_meta
    assert nytorch.load(tmp_path / "m.pt", like={"m": torch.empty(2, 3, device="meta")})["m"].shape == (2, 3)
    with pytest.raises(CheckpointError, match=r"^load \(at 'm'\): parameter 'm' was saved on the meta device and "
                                              r"has no values to load$"):
        nytorch.load(tmp_path / "m.pt", like={"m": torch.zeros(2, 3)})


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(3, 3)
        self.decoder = nn.Linear(3, 3)
        self.decoder.weight = self.encoder.weight


def test_tied_weights_stay_tied_and_load_once(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Tied()
    nytorch.save(model, tmp_path / "t.pt")
    raw = nytorch.load(tmp_path / "t.pt")
    assert list(raw) == [name for name, _ in model.named_parameters()]  # named_parameters(): tied once
    loaded = nytorch.load(tmp_path / "t.pt", like=_Tied())
    assert loaded.decoder.weight is loaded.encoder.weight
    for (name, value), (_, reference) in zip(loaded.state_dict().items(), model.state_dict().items()):
        assert torch.equal(value, reference), name


class _Net(nytorch.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)


def _configs(model: nytorch.NytoModule) -> list[Any]:
    out: list[Any] = []
    model.apply_param_config(lambda _, config: out.append(config))
    return out


def test_configs_come_from_like_and_stay_shared_with_it(tmp_path: Path) -> None:
    """ParamConfigs are not stored: the loaded NytoModule/Particle uses like's (load's docstring)."""
    torch.manual_seed(0)
    saved = _Net()
    saved.set_param_config(operational=False, name="fc.weight")
    saved.apply_param_config(lambda _, config: setattr(config, "is_weight", True), name="fc.weight")
    saved.bn.running_mean += 1
    nytorch.save({"m": saved, "p": saved.product()}, tmp_path / "c.pt")
    like = _Net()
    like.set_param_config(operational=False, name="bn")
    loaded = nytorch.load(tmp_path / "c.pt", like={"m": like, "p": like.product()})
    for name, reference in saved.state_dict().items():
        assert torch.equal(loaded["m"].state_dict()[name], reference), name
    assert all(a is b for a, b in zip(_configs(loaded["m"]), _configs(like)))
    assert [c.operational for c in _configs(loaded["m"])] == [True, True, False, False]
    assert not hasattr(_configs(loaded["m"])[0], "is_weight")
    result = loaded["m"] + 1  # like's config: bn left out, fc takes part
    assert torch.equal(result.bn.weight, saved.bn.weight) and torch.equal(result.fc.weight, saved.fc.weight + 1)
    assert all(a is b for a, b in zip(loaded["p"]._configs, like.product()._configs))


def test_swarms_particles_and_modules_without_like_are_named_tensors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    swarm = nytorch.Swarm.randn(model, 4)
    nytorch.save({"swarm": swarm, "particle": nytorch.particle(model), "module": model}, tmp_path / "p.pt")
    raw = nytorch.load(tmp_path / "p.pt")
    assert {k: tuple(v.shape) for k, v in raw["swarm"].items()} == {
        **{k: tuple(v.shape) for k, v in swarm.params.items()}, **{k: tuple(v.shape) for k, v in swarm.buffers.items()}}
    assert list(raw["particle"]) == [name for name, _ in model.named_parameters()]
    assert sorted(raw["module"]) == sorted(model.state_dict())
    for name, value in model.state_dict().items():
        assert torch.equal(raw["module"][name], value), name


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 3, generator=generator)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("make", [lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
                                  lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
                                  lambda p: torch.optim.AdamW(p, lr=0.01)], ids=["Adam", "SGD", "AdamW"])
def test_optimizer_state_dicts_resume_bitwise(tmp_path: Path, make: Any) -> None:
    """Reference: the same model trained 6 steps without interruption."""
    torch.manual_seed(0)
    reference = nn.Linear(3, 2)
    resumed = nn.Linear(3, 2)
    resumed.load_state_dict(reference.state_dict())
    optimizer = make(reference.parameters())
    _train(reference, optimizer, 3, seed=1)
    nytorch.save({"model": reference, "optimizer": optimizer.state_dict()}, tmp_path / "o.pt")
    _train(reference, optimizer, 3, seed=2)
    state = nytorch.load(tmp_path / "o.pt", like={"model": resumed, "optimizer": None})
    resumed = state["model"]
    fresh = make(resumed.parameters())
    fresh.load_state_dict(state["optimizer"])
    _train(resumed, fresh, 3, seed=2)
    assert torch.equal(resumed.weight, reference.weight) and torch.equal(resumed.bias, reference.bias)
    # an optimizer built at start-up has no state yet: as a template it names the first missing entry
    with pytest.raises(StructureError, match=r"^load \(at 'optimizer.state'\): the checkpoint has an extra "
                                             r"parameter 0$"):
        nytorch.load(tmp_path / "o.pt", like={"model": nn.Linear(3, 2),
                                              "optimizer": make(nn.Linear(3, 2).parameters()).state_dict()})


def test_ema_state_round_trips_into_a_new_ema(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = merge.EMA(model, decay=0.9)
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(1)
        ema.update()
    nytorch.save({"ema": ema.state_dict()}, tmp_path / "e.pt")
    other = merge.EMA(nn.Linear(3, 2), decay=0.9)
    for like in (None, {"ema": other.state_dict()}):
        restored = merge.EMA(nn.Linear(3, 2), decay=0.9)
        restored.load_state_dict(nytorch.load(tmp_path / "e.pt", like=like)["ema"])
        assert restored.step == ema.step == 3
        for a, b in zip(restored.averaged.parameters(), ema.averaged.parameters()):
            assert torch.equal(a, b)


def _draws() -> tuple[float, float, float, float]:
    return random.random(), float(np.random.rand()), float(np.random.randn()), float(torch.rand(1))


def test_rng_states_through_a_file_replay_the_same_numbers(tmp_path: Path) -> None:
    np.random.randn()  # numpy holds a cached gaussian: the state has has_gauss=1
    state = nytorch.get_rng_state()
    expected = _draws()
    nytorch.save({"rng": state}, tmp_path / "r.pt")
    for like in (None, {"rng": nytorch.get_rng_state()}):
        _draws()
        loaded = nytorch.load(tmp_path / "r.pt", like=like)["rng"]
        assert isinstance(loaded["python"], tuple) and isinstance(loaded["numpy"], tuple)
        nytorch.set_rng_state(loaded)
        assert _draws() == expected


_STRUCTURED = np.dtype([("id", "<i4"), ("xy", "<f8", (2,)), ("ok", "?")])


@pytest.mark.parametrize("value", [
    np.arange(5, dtype=np.float16), np.array([True, False]), np.array([1 + 2j, 3j], dtype=np.complex64),
    np.zeros(2, dtype=_STRUCTURED), np.arange(6, dtype=">i8").reshape(2, 3), np.array(2.5), np.float32(1.5),
    np.int8(-3), np.bool_(True), np.arange(12.0).reshape(3, 4).T, np.array(["ab", "c"]), np.zeros((0, 4)),
], ids=lambda value: f"{type(value).__name__}-{value.dtype}-{value.shape}")
def test_numpy_values_round_trip_with_dtype_shape_and_kind(tmp_path: Path, value: Any) -> None:
    nytorch.save({"v": value}, tmp_path / "n.pt")
    for like in (None, {"v": value.copy()}):
        loaded = nytorch.load(tmp_path / "n.pt", like=like)["v"]
        assert type(loaded) is type(value) and loaded.dtype == value.dtype and loaded.shape == value.shape
        assert loaded.tobytes() == value.tobytes()


class _Pair(NamedTuple):
    step: int
    weights: torch.Tensor


@dataclasses.dataclass
class _Run:
    name: str
    best: float


@pytest.mark.parametrize("value", [0, -2**70, 10**30, 2.5, math.inf, -0.0, 1 + 2j, True, None, "ünï ✓", b"\x00\xff",
                                   torch.bfloat16, torch.device("cpu"), torch.Size([2, 3]), (), [], {},
                                   OrderedDict(b=1, a=2), {1: "int key", "1": "str key", None: 0, 2.5: 1}],
                         ids=repr)
def test_python_values_round_trip_with_and_without_like(tmp_path: Path, value: Any) -> None:
    nytorch.save({"v": value}, tmp_path / "v.pt")
    for like in (None, {"v": value}):
        loaded = nytorch.load(tmp_path / "v.pt", like=like)["v"]
        assert type(loaded) is type(value) and loaded == value
        if isinstance(value, float):
            assert math.copysign(1, loaded) == math.copysign(1, value)
        if isinstance(value, dict):
            assert list(loaded) == list(value)


def test_nan_round_trips(tmp_path: Path) -> None:
    nytorch.save({"v": math.nan}, tmp_path / "v.pt")
    assert math.isnan(nytorch.load(tmp_path / "v.pt")["v"])
    assert math.isnan(nytorch.load(tmp_path / "v.pt", like={"v": 0.0})["v"])


def test_namedtuples_and_dataclasses_without_like_are_dicts_of_their_fields(tmp_path: Path) -> None:
    nytorch.save({"pair": _Pair(3, torch.ones(2)), "run": _Run("a", 0.5)}, tmp_path / "f.pt")
    raw = nytorch.load(tmp_path / "f.pt")
    assert raw["pair"]["step"] == 3 and torch.equal(raw["pair"]["weights"], torch.ones(2))
    assert raw["run"] == {"name": "a", "best": 0.5}
    loaded = nytorch.load(tmp_path / "f.pt", like={"pair": _Pair(0, torch.zeros(2)), "run": _Run("", 0.0)})
    assert type(loaded["pair"]) is _Pair and loaded["run"] == _Run("a", 0.5)


# == (7) files other tools wrote ===============================================================
@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_files_of_other_tools_are_checkpoint_errors_naming_the_file(tmp_path: Path) -> None:
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "state_dict.pt")
    torch.save(torch.ones(2), tmp_path / "tensor.pt")
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), tmp_path / "script.pt")
    np.save(tmp_path / "array.npy", np.ones(3))
    np.savez(tmp_path / "arrays.npz", x=np.ones(3))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes/data.pkl", pickle.dumps({"format": "nytorch.checkpoint"}, protocol=2))
    (tmp_path / "zip.pt").write_bytes(buffer.getvalue())
    expected = {
        "state_dict.pt": r"expected a file written by nytorch\.save, got '.*state_dict\.pt' holding a OrderedDict "
                         r"without the 'nytorch\.checkpoint' marker",
        "tensor.pt": r"expected a file written by nytorch\.save, got '.*tensor\.pt' holding a Tensor without",
        "module.pt": r"refused '.*module\.pt': .*\(GLOBAL torch\.nn\.modules\.linear\.Linear: not one of the globals",
        "script.pt": r"'.*script\.pt' is not a readable checkpoint \(truncated or corrupt\?\): ",
        "array.npy": r"'.*array\.npy' is not a readable checkpoint \(truncated or corrupt\?\): ",
        "arrays.npz": r"'.*arrays\.npz' is not a readable checkpoint \(truncated or corrupt\?\): ",
        "zip.pt": r"'.*zip\.pt' is not a readable checkpoint \(truncated or corrupt\?\): ",
    }
    for name, message in expected.items():
        with pytest.raises(CheckpointError, match=r"^load: " + message):
            nytorch.load(tmp_path / name)


def test_a_state_dict_saved_by_torch_loads_once_wrapped_in_the_format(tmp_path: Path) -> None:
    """The documented way in: nytorch reads only its own marker, whichever writer wrote the archive."""
    model = nn.Linear(2, 2)
    torch.save({**FORMAT, "data": {"model": model.state_dict()}}, tmp_path / "wrapped.pt")
    loaded = nytorch.load(tmp_path / "wrapped.pt", like={"model": None})["model"]
    assert type(loaded) is OrderedDict and all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
