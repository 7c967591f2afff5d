"""The merging examples run and report what they claim (examples/cma_iris.py, examples/soups_digits.py)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cma_trains_the_iris_mlp_through_ravel():
    pytest.importorskip("cma")
    accuracy = load("cma_iris").main(iterations=40, verbose=False)
    assert accuracy is not None and accuracy >= 0.9


def test_cma_example_exits_cleanly_without_cma(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cma", None)  # makes `import cma` raise ImportError
    assert load("cma_iris").main() is None
    assert "pip install cma" in capsys.readouterr().out


@pytest.mark.slow
def test_soups_example_prints_and_returns_the_table(capsys):
    rows = load("soups_digits").main(seed=0)
    methods = [str(row["method"]) for row in rows]
    assert methods[0] == "pre-trained base" and sum(m.startswith("fine-tuned") for m in methods) == 5
    for prefix in ("uniform soup", "greedy soup", "task arithmetic", "TIES"):
        assert any(m.startswith(prefix) for m in methods), prefix
    assert all(0.0 <= float(row["val"]) <= 1.0 and 0.0 <= float(row["test"]) <= 1.0 for row in rows)
    individual = [float(row["test"]) for row in rows if str(row["method"]).startswith("fine-tuned")]
    soup = next(float(row["test"]) for row in rows if row["method"] == "uniform soup")
    assert soup > sum(individual) / len(individual)
    printed = capsys.readouterr().out
    assert "uniform soup" in printed and "TIES" in printed and "test acc" in printed
