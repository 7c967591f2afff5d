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


def test_every_relative_link_of_the_readme_exists() -> None:
    links = [link for link in re.findall(r"\]\(([^)#\s]+)", README) if "://" not in link]
    assert len(links) >= 10
    assert [link for link in links if not (ROOT / link).exists()] == []
