"""Every Python block of the README runs, and the examples CI does not run elsewhere run too.

The README's snippets lean on names a reader has at hand (``model``, ``x``, ``fn``, a PSO
state): ``CONTEXT`` gives them small values, and the blocks run in order in one namespace, as
a reader pasting them would.  The distributed block runs under ``torchrun`` with two processes.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import nytorch
from nytorch import algorithms as alg

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
DISTRIBUTED = [block for block in BLOCKS if "init_process_group" in block]
LOCAL = [block for block in BLOCKS if "init_process_group" not in block]


def _context() -> dict[str, Any]:
    """The names the snippets take as given."""
    model, other = nn.Linear(4, 3), nn.Linear(4, 3)
    swarm = nytorch.Swarm.randn(nn.Linear(4, 3), 4)
    return {
        "nytorch": nytorch, "nyto": nytorch, "torch": torch, "model": model, "other": other, "x": torch.randn(5, 4),
        "fn": lambda param, *rest: param * 2 if len(rest) == 1 else param - rest[0],
        "pso_state": alg.pso_init(swarm, swarm.norm()), "step": 3,
    }


def test_the_readme_has_the_blocks_this_test_knows() -> None:
    assert "class NytoLinear" in LOCAL[0] and len(LOCAL) >= 5 and len(DISTRIBUTED) == 1


def test_the_quickstart_gives_the_values_its_comments_say() -> None:
    namespace: dict[str, Any] = {}
    exec(compile(LOCAL[0], "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    net, net2, net3, x = (namespace[name] for name in ("net", "net2", "net3", "x"))
    assert (net2.weight.item(), net2.bias.item()) == (12.0, 11.0) and (net.weight.item(), net.bias.item()) == (2.0, 1.0)
    assert net(x).tolist() == [1.0, 3.0, 5.0, 7.0] and net2(x).tolist() == [11.0, 23.0, 35.0, 47.0]
    assert (net3.weight.item(), net3.bias.item()) == (14.0, 12.0) and type(net2).__name__ == "NytoLinear"
    clone = namespace["c"]
    assert clone.weight is not net.weight and torch.equal(clone.weight, net.weight)


def test_every_other_local_readme_block_runs_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the checkpoint block writes run.pt
    namespace = _context()
    for block in LOCAL[1:]:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    assert isinstance(namespace["soup"], nytorch.Particle) and isinstance(namespace["model"], nn.Sequential)
    assert namespace["logits"].shape == (64, 128, 3) and len(namespace["swarm"]) == 64
    assert (tmp_path / "run.pt").exists() and namespace["state"]["step"] == 3


@pytest.mark.slow
def test_the_distributed_readme_block_runs_under_torchrun(tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(DISTRIBUTED[0] + "\nopen(f'rank{dist.get_rank()}.txt', 'w').write(str(len(whole)))\n"
                      "dist.destroy_process_group()\n")  # a file per rank: printed lines interleave
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)] == ["16", "16"]  # 8 members each


def _example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_demo_runs_and_draws_its_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo.png"
    result = _example("demo").main(["--steps", "20", "--epochs", "5", "--out", str(out), "--no-bar"])
    printed = capsys.readouterr().out
    assert out.exists() and out.read_bytes()[:4] == b"\x89PNG"
    assert str(out) in printed and 0.0 <= result["accuracy"] <= 1.0


@pytest.mark.slow
def test_the_distributed_example_runs_on_two_processes(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "examples" / "distributed_swarm.py"), "--members", "4", "--steps", "10", "--every", "5",
         "--migrate", "5", "--timeout", "60"],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.findall(r"step\s+(\d+)\s+global best loss", done.stdout) == ["5", "10"]


def test_the_floors_pyproject_declares_are_the_versions_make_floor_tests_and_the_readme_names() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    makefile = (ROOT / "Makefile").read_text()
    declared = dict(re.findall(r'"(torch|optree|numpy)>=([\d.]+)"', pyproject))
    specs = re.search(r"^FLOOR_SPECS \?= (.*)$", makefile, re.M)
    assert specs is not None and set(declared) == {"torch", "optree", "numpy"}
    tested = dict(spec.split("==") for spec in specs.group(1).split())
    for name, floor in declared.items():  # make floor installs the floor's first release (2.10 as 2.10.0)
        assert tested[name].split(".")[:len(floor.split("."))] == floor.split("."), (name, floor, tested[name])
    python = re.search(r'requires-python = ">=([\d.]+)"', pyproject)
    assert python is not None and f"FLOOR_PYTHON ?= python{python.group(1)}" in makefile
    named = re.search(r"Requires Python >= ([\d.]+), torch >= ([\d.]+), optree >= ([\d.]+) and "
                      r"NumPy >= ([\d.]+)", " ".join(README.split()))
    assert named is not None
    assert named.groups() == (python.group(1), declared["torch"], declared["optree"], declared["numpy"])


def test_every_relative_link_of_the_readme_exists() -> None:
    links = [link for link in re.findall(r"\]\(([^)#\s]+)", README) if "://" not in link]
    assert len(links) >= 10
    assert [link for link in links if not (ROOT / link).exists()] == []


# -- The error table of "Inputs that raise": each example message is what nytorch raises -------------------
# Every row's input is built here and its message compared with the README's character for character,
# up to its "..." / "(...)" elisions; the exception's class must be one the row names.
TABLE = re.search(r"### Inputs that raise.*?\n(\|.*?)\n\n", README, re.S)
ROWS = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in TABLE.group(1).splitlines()[2:]] \
    if TABLE else []


class Plain(nn.Module):
    def __init__(self, out: int = 5, bias: bool = True) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, out, bias=bias)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l, self.s = nn.Linear(2, 2), torch.jit.script(nn.Linear(2, 2))


class _Fc1(nn.Module):
    def __init__(self, inputs: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, inputs)


def _with(model: nn.Module, **replaced: nn.Parameter) -> nn.Module:
    for path, value in replaced.items():
        owner, name = path.rsplit(".", 1)
        setattr(model.get_submodule(owner), name, value)
    return model


def _corrupt(path: Path) -> None:
    """Flip one byte inside the first data record of a ``nytorch.save`` archive."""
    import zipfile
    with zipfile.ZipFile(path) as archive:
        info = next(item for item in archive.infolist() if item.filename.endswith("/data/0"))
    data = bytearray(path.read_bytes())
    start = info.header_offset  # the local header's own name and extra lengths (its padding is not the directory's)
    name_length, extra_length = (int.from_bytes(data[start + k:start + k + 2], "little") for k in (26, 28))
    data[start + 30 + name_length + extra_length + 50] ^= 0xFF
    path.write_bytes(bytes(data))


class _Runs:
    """``__reduce__`` runs ``print``: a file holding it must be refused unread."""

    def __reduce__(self) -> Any:
        return (print, ("this must never run",))


def _table_cases() -> dict[str, Any]:
    """README message -> a call raising it (run in a temporary folder)."""
    import nytorch.functional as nf
    from nytorch import merge
    from nytorch.distributed._fingerprint import first_difference
    p = nytorch.particle(Plain())
    other_class = type("Other", (nn.Linear,), {"__module__": "__main__"})

    def corrupt() -> None:
        nytorch.save({"w": torch.randn(1000)}, "run.pt")
        _corrupt(Path("run.pt"))
        nytorch.load("run.pt")

    def malformed() -> None:
        nytorch.save({"g": torch.Generator()}, "g.pt")
        raw = torch.load("g.pt", weights_only=True)
        raw["data"]["g"]["device"] = None
        torch.save(raw, "g.pt")
        nytorch.load("g.pt")

    def swarm_shape() -> None:
        nytorch.save({"swarm": nytorch.Swarm.randn(_Fc1(5), 3)}, "s.pt")
        nytorch.load("s.pt", like={"swarm": nytorch.Swarm.randn(_Fc1(6), 3)})

    def evil() -> None:
        torch.save({"x": _Runs()}, "evil.pt")
        nytorch.load("evil.pt")

    def another_class() -> None:
        nytorch.save({"net": nn.Linear(2, 3)}, "c.pt")
        nytorch.load("c.pt", like={"net": other_class(2, 3)})

    entries = [["fc2.weight", [5, 4], "float32", True, 0, "cpu"], ["fc2.bias", [5], "float32", True, 0, "cpu"]]
    return {
        "add: parameter 'fc2.bias' is missing from the second operand":
            lambda: p + nytorch.particle(Plain(bias=False)),
        "add: the second operand has an extra parameter 'fc2.extra'":
            lambda: p + nytorch.particle(_with(Plain(), **{"fc2.extra": nn.Parameter(torch.ones(1))})),
        "add: parameter 'fc2.weight' differs: shape (5, 4) float32 vs shape (6, 4) float32":
            lambda: p + nytorch.particle(Plain(6)),
        "add: parameter 'fc2.bias' is on cpu in the first operand and on meta in the second; move both to one "
        "device first (e.g. model.to(device))":
            lambda: p + nytorch.particle(_with(Plain(), **{"fc2.bias": nn.Parameter(torch.empty(5, device="meta"))})),
        "mul: the scalar 1j would turn parameter 'fc1.weight' (shape (4, 3) float32) into complex64; ...":
            lambda: p * 1j,
        "mul: torch has no in-place mul for float8_e4m3fn tensors on cpu (...), which parameter '1.weight' (shape "
        "(2, 3) float8_e4m3fn) holds: the update would fail there after writing the tensors before it; nothing was "
        "changed. ...":
            lambda: nytorch.particle(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2).to(torch.float8_e4m3fn))).__imul__(2),
        "add: the scalar operand is on meta but parameter 'fc1.weight' is on cpu":
            lambda: p + torch.tensor(1.0, device="meta"),
        "particle: expected True or False as buffers, got str":
            lambda: nytorch.particle(nn.Linear(2, 2), buffers="copy"),
        "add: expected a number, a 0-dim tensor, a Particle or a Linear, got str":
            lambda: nytorch.particle(nn.Linear(2, 2)) + "str",
        "add: expected a Plain (or a Particle of one), got a Sequential":
            lambda: p + nn.Sequential(),
        "Net: expected Python nn.Modules, but submodule 's' is a TorchScript RecursiveScriptModule "
        "(torch.jit.script / torch.jit.trace), which nytorch cannot read or rebuild; ...":
            lambda: nytorch.particle(Net()),
        "Sequential: expected modules that keep their weights as parameters, but submodule '0' is a quantized "
        "Linear (torch.ao.nn.quantized.dynamic.modules.linear), which keeps its weights packed outside "
        "named_parameters(): ...; quantize the result of the arithmetic, not its operands":
            lambda: merge.average([_quantized(), _quantized()]),
        "DistributedDataParallel: expected a model, got a DistributedDataParallel wrapper, whose copy would "
        "share its reducer (...); build results from ddp.module (...)":
            lambda: merge.average([_unconnected_ddp(), _unconnected_ddp()]),
        "average: models[0] is of class Embedding and models[1] of class EmbeddingBag; merges combine models "
        "of one class (...)":
            lambda: merge.average([nn.Embedding(3, 2), nn.EmbeddingBag(3, 2)]),
        "add: expected a pytree of tensors or a scalar as the second operand, but the leaf at 'x' is a float":
            lambda: nf.add({"x": torch.ones(1)}, {"x": 1.0}),
        "mul: expected one weight per member (a 1-D tensor of length 3), got length 2":
            lambda: nytorch.Swarm.randn(nn.Linear(2, 2), 3) * torch.ones(2),
        "stack: expected at least one module or Particle, got an empty sequence":
            lambda: nytorch.Swarm.stack([]),
        # the collectives raise what ``first_difference`` builds from two ranks' fingerprints
        "all_reduce_mean: the structures differ across ranks (found before any data moved): parameter "
        "'fc2.bias' is missing on rank 1 ...":
            lambda: (_ for _ in ()).throw(first_difference("all_reduce_mean", entries, entries[:1], 0, 1)),
        "load: refused 'evil.pt': it holds Python objects other than tensors and plain containers, which could "
        "run code when unpickled (...)": evil,
        "load: 'run.pt' is not a readable checkpoint (truncated or corrupt?): Bad CRC-32 for file "
        "'archive/data/0'": corrupt,
        "load (at 'net'): expected a checkpoint of a __main__.Other (like's class), got one of a "
        "torch.nn.modules.linear.Linear": another_class,
        "load: malformed 'generator' entry at 'g': expected a device string under 'device', got None": malformed,
        "load (at 'swarm'): parameter 'fc1.weight' differs: like has shape (3, 6, 5) float32, the checkpoint has "
        "shape (3, 5, 5) float32": swarm_shape,
    }


def _quantized() -> nn.Module:
    """A dynamically quantized MLP (its Linear weights are packed outside named_parameters())."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        return torch.ao.quantization.quantize_dynamic(
            nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), {nn.Linear}, dtype=torch.qint8)


def _unconnected_ddp() -> nn.Module:
    """A DistributedDataParallel holding a Linear, made without a process group (nytorch refuses it by type)."""
    ddp = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(ddp)
    ddp.module = nn.Linear(2, 2)
    return ddp


def _agrees(readme: str, actual: str) -> bool:
    """``actual`` is ``readme`` with each "(...)" / "..." elision standing for any text."""
    pieces = readme.split("...")  # "(...)" keeps its parentheses: "(" and ")" must be there
    if not actual.startswith(pieces[0]) or not actual.endswith(pieces[-1]):
        return False
    at = len(pieces[0])
    for piece in pieces[1:]:
        found = actual.find(piece, at)
        if found < 0:
            return False
        at = found + len(piece)
    return True


def test_every_row_of_the_error_table_has_a_case() -> None:
    messages = [row[2].strip("`") for row in ROWS]
    assert len(messages) >= 20 and sorted(messages) == sorted(_table_cases())


@pytest.mark.parametrize("row", range(len(ROWS)))
def test_each_error_table_row_is_what_nytorch_raises(row: int, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _, exceptions, message = ROWS[row]
    message = message.strip("`")
    with pytest.raises(Exception) as caught:  # noqa: B017 - the row says which class
        _table_cases()[message]()
    named = re.findall(r"`(\w+)`", exceptions)
    assert type(caught.value).__name__ in named, (type(caught.value).__name__, exceptions)
    assert _agrees(message, str(caught.value)), str(caught.value)


# -- Fixes found by the README audit: each with an independent reference -----------------------------------
def test_functional_clone_without_a_foreach_clone_kernel_matches_tensor_clone(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch 2.11 has no torch._foreach_clone (benchmarks/RESULTS.md); pyproject allows torch>=2.10
    import nytorch._tree as tree
    import nytorch.functional as nf
    leaves = {"a": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last), "b": torch.randn(3, 4).t(),
              "i": torch.arange(3), "h": torch.randn(4, dtype=torch.float16)}
    for kernel in (tree._FOREACH_CLONE, None):
        monkeypatch.setattr(tree, "_FOREACH_CLONE", kernel)
        out = nf.clone(leaves)
        for name, leaf in leaves.items():
            reference = leaf.clone()  # plain torch
            assert torch.equal(out[name], reference) and out[name].stride() == reference.stride()
            assert out[name].dtype == leaf.dtype and out[name].data_ptr() != leaf.data_ptr()


def test_task_vector_names_its_one_finetuned_argument() -> None:
    from nytorch import StructureError, merge
    with pytest.raises(StructureError, match=r"^task_vector: parameter 'weight' differs: .* in finetuned$"):
        merge.task_vector(nn.Linear(3, 2), nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"^task_vector: base is of class EmbeddingBag and finetuned of class "
                                        r"Embedding; merges combine models of one class"):
        merge.task_vector(nn.Embedding(3, 2), nn.EmbeddingBag(3, 2))
    with pytest.raises(TypeError, match=r"as finetuned, got str$"):
        merge.task_vector("x", nn.Linear(2, 2))


@pytest.mark.parametrize("name", ["neg", "clone", "randn_like", "zeros_like", "norm", "tree_map"])
def test_one_tree_functions_do_not_offer_a_scalar_they_refuse(name: str) -> None:
    import nytorch.functional as nf
    call = (lambda tree: nf.tree_map(torch.neg, tree)) if name == "tree_map" else getattr(nf, name)
    with pytest.raises(TypeError, match=rf"^{name}: expected a pytree of tensors as tree, but the leaf at 'a' is a float$"):
        call({"a": 1.0, "b": torch.ones(1)})
    with pytest.raises(TypeError, match=rf"^{name}: expected a pytree of tensors as tree, got None$"):
        call(None)
    # two-operand functions do take a scalar, and say so
    with pytest.raises(TypeError, match=r"^add: expected a pytree of tensors or a scalar as the second operand, "):
        nf.add({"x": torch.ones(1)}, {"x": 1.0})


def test_merges_do_not_offer_a_scalar_either() -> None:
    from nytorch import merge
    with pytest.raises(TypeError, match=r"^average: expected a pytree of tensors as models\[1\], but the leaf at 'a' "
                                        r"is a float$"):
        merge.average([{"a": torch.ones(1)}, {"a": 1.0}])
