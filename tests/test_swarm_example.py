"""``examples/swarm_iris.py``: the hybrid PSO + SGD run reaches the promised accuracy and writes its plot."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "swarm_iris.py"


def _load() -> object:
    spec = importlib.util.spec_from_file_location("swarm_iris", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["swarm_iris"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_swarm_iris_reaches_090_and_saves_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = _load()
    out = tmp_path / "loss.png"
    result = example.main(["--out", str(out)])  # type: ignore[attr-defined]
    printed = capsys.readouterr().out
    assert result["accuracy"] >= 0.9
    assert out.exists() and out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"
    assert f"saved loss plot to {os.path.abspath(out)}" in printed
    assert "step  300/300" in printed
    state = result["state"]
    assert state.step == 300 and len(state.best_loss) == 300 and len(state.swarm) == 32
    assert state.best_loss[-1] < state.best_loss[0]


def test_swarm_iris_rejects_bad_steps() -> None:
    example = _load()
    with pytest.raises(SystemExit):
        example.main(["--steps", "0"])  # type: ignore[attr-defined]
