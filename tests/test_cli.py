"""The command lines a user meets in the first hour: examples/, benchmarks' commands, notebooks/build.py.

Every bad argument is refused by argparse (exit status 2, a message naming the option, no traceback)
before any training or measuring starts, and every file a command says it wrote is the file it wrote.
"""
from __future__ import annotations

import importlib
import importlib.util
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import nytorch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"cli_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    sys.path.insert(0, str(EXAMPLES))  # demo imports its siblings
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module


def _usage_error(capsys: pytest.CaptureFixture[str], call: Any) -> str:
    """Run ``call``; it must exit with argparse's status 2 before printing anything on stdout."""
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing trained, measured or built first
    return captured.err


# --- examples that had no argument parsing: --help ran the whole experiment -----------------------------

@pytest.mark.parametrize("name, option", [("momentum_iris", "--epochs"), ("cma_iris", "--iterations"),
                                          ("soups_digits", "--seed")])
def test_example_scripts_answer_help_without_running(name: str, option: str) -> None:
    done = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--help"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {name}.py") and option in done.stdout
    for trained in ("epoch=", "time taken", "evaluations in", "val acc  test acc"):  # what each run prints
        assert trained not in done.stdout


@pytest.mark.parametrize("name, argv, message", [
    ("momentum_iris", ["--bogus"], "unrecognized arguments: --bogus"),
    ("momentum_iris", ["--epochs", "0"], "--epochs: expected a positive number of epochs, got 0"),
    ("cma_iris", ["--iterations", "-1"], "--iterations: expected a positive number of iterations, got -1"),
    ("soups_digits", ["--seed", "x"], "argument --seed: invalid int value: 'x'"),
    ("distributed_swarm", ["--migrate", "0"], "--migrate: expected a positive whole number, got 0"),
    ("distributed_swarm", ["--members", "0"], "--members: expected a positive whole number, got 0"),
    ("distributed_swarm", ["--timeout", "0"], "--timeout: expected a positive number of seconds, got 0.0"),
    ("distributed_swarm", [], "expected to be started by torchrun, which sets RANK and WORLD_SIZE"),
])
def test_example_scripts_refuse_bad_arguments(name: str, argv: list[str], message: str,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    monkeypatch.delenv("RANK", raising=False)
    err = _usage_error(capsys, lambda: runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__"))
    assert message in err and "Traceback" not in err


# --- swarm_iris / demo: checked before training, not after minutes of it --------------------------------

def test_swarm_iris_refuses_bad_paths_and_threads_before_training(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    example = _example("swarm_iris")
    threads = torch.get_num_threads()
    folder = str(tmp_path)
    cases = [
        (["--threads", "0"], "--threads: expected a positive number of threads, got 0"),
        (["--out", str(tmp_path / "no" / "x.png")], "--out: expected a file in a folder that exists"),
        (["--out", folder], f"--out: expected an image file name, got the folder {folder!r}"),
        (["--out", str(tmp_path / "loss")], "--out: expected a file name ending in an image format"),
        (["--out", str(tmp_path / "loss.foo")], "--out: expected a file name ending in an image format"),
        (["--resume", str(tmp_path / "no" / "run.pt")], "--resume: expected a file in a folder that exists"),
        (["--resume", folder], f"--resume: expected a checkpoint file name, got the folder {folder!r}"),
    ]
    for argv, message in cases:
        err = _usage_error(capsys, lambda: example.main(["--steps", "2", *argv]))
        assert message in err, (argv, err)
        assert torch.get_num_threads() == threads
    assert list(tmp_path.iterdir()) == []  # no plot (matplotlib adds .png to 'loss'), no checkpoint


def test_swarm_iris_names_a_resume_file_that_is_no_checkpoint_of_the_run(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    example = _example("swarm_iris")
    garbage, other = tmp_path / "garbage.pt", tmp_path / "other.pt"
    garbage.write_bytes(b"hello\n")
    nytorch.save({"net": torch.nn.Linear(2, 2)}, str(other))
    for path, message in ((garbage, "is not a readable checkpoint"),
                          (other, "like is a TrainState but the checkpoint holds a dict")):
        with pytest.raises(SystemExit) as exit_info:
            example.main(["--steps", "2", "--out", str(tmp_path / "loss.png"), "--resume", str(path)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "--resume: load: " in err and message in err and "Traceback" not in err
    assert not (tmp_path / "loss.png").exists()


def test_swarm_iris_writes_the_plot_it_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "loss.svg"
    result = _example("swarm_iris").main(["--steps", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert result["plot"] == str(out) and out.read_text().lstrip().startswith("<?xml")
    assert f"saved loss plot to {out}" in printed


def test_demo_refuses_a_plot_path_before_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    demo = _example("demo")
    for out, message in ((tmp_path / "plot", "--out: expected a file name ending in an image format"),
                         (tmp_path / "no" / "p.png", "--out: expected a file in a folder that exists")):
        err = _usage_error(capsys, lambda: demo.main(["--steps", "1", "--epochs", "1", "--out", str(out)]))
        assert message in err
    assert list(tmp_path.iterdir()) == []


# --- benchmarks' commands ------------------------------------------------------------------------------

def test_plot_path_error_matches_what_matplotlib_writes(tmp_path: Path) -> None:
    from benchmarks.plot import path_error

    assert path_error(str(tmp_path / "ratios.png")) is None and path_error(str(tmp_path / "r.PDF")) is None
    assert path_error(str(tmp_path / "ratios"), "--plot").startswith(
        "--plot: expected a file name ending in an image format (")
    assert path_error(str(tmp_path)) == f"out: expected an image file name, got the folder {str(tmp_path)!r}"
    assert path_error(str(tmp_path / "no" / "r.png")) == (
        f"out: expected a file in a folder that exists, got {str(tmp_path / 'no' / 'r.png')!r}")


@pytest.mark.parametrize("argv, message", [
    (["--plot", "{tmp}/ratios"], "--plot: expected a file name ending in an image format ("),
    (["--plot", "{tmp}/ratios.foo"], "--plot: expected a file name ending in an image format ("),
    (["--plot", "{tmp}"], "--plot: expected a file name, got the folder"),
    (["--json", "{tmp}"], "--json: expected a file name, got the folder"),
])
def test_benchmark_suite_refuses_output_paths_before_measuring(argv: list[str], message: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    suite = importlib.import_module("benchmarks.__main__")

    def measured(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("measured before refusing the option")

    monkeypatch.setattr(suite, "collect", measured)
    monkeypatch.setattr(sys, "argv", ["benchmarks", *[arg.format(tmp=tmp_path) for arg in argv]])
    err = _usage_error(capsys, suite.main)
    assert message in err
    assert list(tmp_path.iterdir()) == []


def _dump(path: Path) -> str:
    import json

    rows = [{"suite": "bench_core", "workload": "a + b", "size": "tiny", "implementation": name,
             "median_us": 2.0 * ratio, "ratio_to_floor": ratio}
            for name, ratio in (("floor: flat + flat", 1.0), ("Particle p + q", 3.0))]
    path.write_text(json.dumps({"machine": {"device": "cpu", "date": "d"}, "rows": rows, "failures": [],
                                "options": {"quick": False, "only": [], "sizes": []}}))
    return str(path)


def test_plot_command_refuses_a_name_matplotlib_would_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import plot

    dump = _dump(tmp_path / "run.json")
    (tmp_path / "folder").mkdir()
    for out, message in (("ratios", "out: expected a file name ending in an image format ("),
                         ("folder", "out: expected an image file name, got the folder")):
        monkeypatch.setattr(sys, "argv", ["plot", dump, str(tmp_path / out)])
        assert message in _usage_error(capsys, plot.main)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["folder", "run.json"]  # no ratios.png, folder.png
    monkeypatch.setattr(sys, "argv", ["plot", dump, str(tmp_path / "ratios.svg")])
    plot.main()
    assert capsys.readouterr().out == f"wrote {tmp_path / 'ratios.svg'}\n" and (tmp_path / "ratios.svg").exists()


def test_results_command_refuses_an_out_file_it_cannot_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import results

    dump = _dump(tmp_path / "run.json")
    for out in (str(tmp_path / "no" / "R.md"), str(tmp_path)):
        monkeypatch.setattr(sys, "argv", ["results", dump, "--out", out])
        err = _usage_error(capsys, results.main)
        assert f"--out: expected a file in a folder that exists, got {out!r}" in err and "Traceback" not in err


# --- notebooks/build.py ----------------------------------------------------------------------------------

def _builder(monkeypatch: pytest.MonkeyPatch) -> Any:
    spec = importlib.util.spec_from_file_location("cli_notebook_build", ROOT / "notebooks" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built: list[str] = []
    monkeypatch.setattr(module, "build", lambda path: built.append(path.stem) or path)
    module.built = built
    return module


def test_notebook_builder_answers_help_and_refuses_unknown_names(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    builder = _builder(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        builder.main(["--help"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("usage: python notebooks/build.py")
    err = _usage_error(capsys, lambda: builder.main(["01_quickstart", "06_nope"]))
    assert "NAME: expected some of ['01_quickstart', '02_momentum_as_particles'" in err and "['06_nope']" in err
    assert builder.built == []  # nothing built when one name is wrong
    builder.main(["notebooks/src/01_quickstart.py", "04_averaging_and_merging.ipynb"])
    assert builder.built == ["01_quickstart", "04_averaging_and_merging"]


# --- progress of the library's long loops: numpy flags as Python's, quiet when asked --------------------

def _hybrid_run(hybrid: Any, flag: Any, **options: Any) -> torch.Tensor:
    import torch.nn.functional as F

    torch.manual_seed(0)
    swarm = nytorch.Swarm.stack([torch.nn.Linear(2, 1) for _ in range(4)])
    data = [(torch.randn(8, 2), torch.randn(8, 1))] * 4
    _, history = hybrid(swarm, lambda net, x, y: F.mse_loss(net(x), y), data, lr=0.1, every=2,
                        generator=torch.Generator().manual_seed(1), show_progress=flag, **options)
    return history


@pytest.mark.parametrize("where", ["algorithms", "distributed"])
def test_hybrid_show_progress_takes_numpy_flags(where: str, request: pytest.FixtureRequest,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    pytest.importorskip("tqdm")
    if where == "distributed":
        request.getfixturevalue("world_of_one")
        from nytorch.distributed import hybrid
        options: dict[str, Any] = {"timeout": 30}
    else:
        from nytorch.algorithms import hybrid
        options = {}
    reference = _hybrid_run(hybrid, False, **options)
    assert capsys.readouterr().err == ""
    for flag, shown in ((np.False_, False), (np.True_, True), (np.int64(0), False), (np.int64(1), True)):
        torch.testing.assert_close(_hybrid_run(hybrid, flag, **options), reference, rtol=0, atol=0)
        err = capsys.readouterr().err
        assert ("hybrid: 100%" in err and "4/4" in err) == shown, (flag, err)
        assert shown or err == ""
    with pytest.raises(TypeError, match=r"hybrid: expected True, False or None as show_progress, got str"):
        _hybrid_run(hybrid, "yes", **options)
