"""The benchmark suite runs (its numbers are judged by people reading ratios, not by tests)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import _harness as harness
from benchmarks import bench_core
from benchmarks.models import SeedLinear


def test_compare_returns_a_median_per_implementation():
    medians = harness.compare({"a": lambda: 1 + 1, "b": lambda: sum(range(10))}, repeats=3, target_s=0.0001)
    assert set(medians) == {"a", "b"} and all(value > 0 for value in medians.values())


def test_compare_frees_reference_cycles_between_samples_and_restores_gc():
    import gc
    import weakref

    class Node:
        pass

    alive: "weakref.WeakSet[Node]" = weakref.WeakSet()

    def cycle() -> None:  # what nytorch 1.1's results do: dead, yet alive until a collection
        node = Node()
        node.self = node  # type: ignore[attr-defined]
        alive.add(node)

    was_enabled = gc.isenabled()
    harness.compare({"cycle": cycle}, repeats=5, warmup=0, target_s=0.0)
    assert len(alive) == 0
    assert gc.isenabled() == was_enabled and gc.get_freeze_count() == 0  # CPython 3.12's own frozen ones too
    # end to end: collections run inside the samples too, and the caller's setting comes back
    gc.disable()
    try:
        seen: list[bool] = []
        harness.compare({"on": lambda: seen.append(gc.isenabled())}, repeats=2, warmup=0, target_s=0.0,
                        end_to_end=True)
        assert seen[-2:] == [True, True] and not gc.isenabled()  # the two samples (after calibration)
    finally:
        (gc.enable if was_enabled else gc.disable)()
    # objects the caller froze stay frozen
    keep = [Node() for _ in range(3)]
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        harness.compare({"cycle": cycle}, repeats=2, warmup=0, target_s=0.0)
        assert gc.get_freeze_count() >= frozen and len(alive) == 0
    finally:
        gc.unfreeze()
    del keep


def test_core_rows_have_ratios_to_their_floor():
    rows = bench_core.bench_size("tiny", SeedLinear, repeats=2)
    floors = [row for row in rows if row["implementation"].startswith("floor")]
    assert floors and all(row["ratio_to_floor"] > 0 for row in rows)
    assert {row["workload"] for row in rows} == {"a + b", "0.9 * (a - b) + a", "lerp_ (EMA, in place)",
                                                 "randn", "clone", "structural check of two models"}
    checks = {row["implementation"] for row in rows if row["workload"] == "structural check of two models"}
    assert {"NytoModule same_structure(a, b)", "Particle same_structure(p, q)",
            "functional same_structure(params, params)", "per-tensor loop over named_parameters()"} <= checks


def test_every_core_workload_has_every_implementation_or_says_why_not():
    from benchmarks.plot import family

    rows = bench_core.bench_size("tiny", SeedLinear, repeats=1) + bench_core.bench_momentum(repeats=1)
    families = ["functional", "Particle", "NytoModule", "per-tensor", "foreach", "tensordict"]
    if importlib.util.find_spec("tensordict") is None:
        families.remove("tensordict")  # optional: measured when installed
    for workload in {row["workload"] for row in rows}:
        present = {family(row["implementation"])[0] for row in rows if row["workload"] == workload}
        absent = {implementation for (named, implementation) in bench_core.NOT_MEASURED if named == workload}
        assert [name for name in families if name not in present and name not in absent] == [], workload
        assert not present & absent, workload  # a reason given for a row that exists would be stale
        floors = [row for row in rows if row["workload"] == workload and row["ratio_to_floor"] == 1.0]
        assert floors and "floor" in floors[0]["implementation"], workload


def test_not_measured_lines_name_the_workloads_of_the_run():
    from benchmarks.results import not_measured

    row = {"suite": "bench_core", "workload": "randn", "size": "tiny", "median_us": 1.0, "ratio_to_floor": 1.0}
    table = [{**row, "implementation": name} for name in ("floor: torch.randn(n)", "tensordict x", "nytorch 1.1 y")]
    assert not_measured(table) == ["randn: no foreach row: torch has no foreach random kernel"]
    # a run where tensordict and nytorch 1.1 were missing says so
    lines = not_measured(table[:1])
    assert lines[0] == "randn: no foreach row: torch has no foreach random kernel"
    assert lines[1].startswith("every workload: no tensordict row: tensordict could not be imported")
    assert lines[2].startswith("every workload: no nytorch 1.1 row")
    assert not_measured([{**row, "suite": "bench_merge", "workload": "EMA update", "implementation": "floor"}]) == []


def test_plot_draws_one_panel_per_workload_present(tmp_path):
    from benchmarks.plot import family, plot

    rows = [{"workload": workload, "size": size, "implementation": name, "ratio_to_floor": ratio}
            for workload in ("a + b", "lerp_ (EMA, in place)")
            for size in ("many-small", "deep-narrow")
            for name, ratio in [("floor: flat + flat", 1.0), ("Particle p + q", 1.4), ("foreach by hand", 4.5)]]
    rows.append({"workload": "a + b", "size": "many-small", "implementation": "x", "ratio_to_floor": 2.0,
                 "suite": "bench_swarm"})  # other suites are not drawn
    path = tmp_path / "ratios.png"
    assert plot(rows, str(path)) == ["a + b", "lerp_ (EMA, in place)"]
    assert path.read_bytes().startswith(b"\x89PNG")
    assert family("NytoModule a + b, then read")[0] == "NytoModule" and family("mystery")[0] == "other"


def test_plot_without_core_rows_raises(tmp_path):
    import pytest

    from benchmarks.plot import plot

    with pytest.raises(ValueError, match=r"plot: expected rows of at least one of"):
        plot([{"workload": "swarm forward", "size": "P=64", "implementation": "a", "ratio_to_floor": 1.0}],
             str(tmp_path / "none.png"))


def test_verdicts_judge_ratios_and_speedups_of_one_run():
    from benchmarks.targets import verdicts

    def row(implementation, median, ratio, size="iris MLP"):
        return {"suite": "bench_core", "workload": "a + b", "size": size, "implementation": implementation,
                "median_us": median, "ratio_to_floor": ratio}

    table = [row("NytoModule a + b", 10.0, 8.0), row("nytorch 1.1 NytoModule", 60.0, 48.0),
             row("tensordict td + td", 15.0, 12.0), row("NytoModule a + b", 1.0, 1.6, "deep-narrow")]
    lines = [verdict.line() for verdict in verdicts(table)]
    assert lines == ["MISS  NytoModule a + b, deep-narrow: 1.60 (target <= 1.5)",
                     "met   iris NytoModule net + net vs nytorch 1.1: 6.00x faster (target >= 5x faster)",
                     "MISS  iris NytoModule net + net vs tensordict td + td: 1.50x faster (target >= 2x faster)"]


def test_nytorch_11_rows_cover_every_workload_it_can_spell():
    import os

    import pytest

    if not os.path.isdir(os.path.join(os.environ.get("NYTORCH11_PATH", "/tmp/nyto11"), "nytorch")):
        pytest.skip("nytorch 1.1 is not installed (see DEVELOPERS.md)")
    rows = bench_core.nytorch_11(["tiny (seed)"], True, 1)
    workloads = {row["workload"] for row in bench_core.bench_size("tiny (seed)", SeedLinear, repeats=1)}
    spelt = {workload for (workload, implementation) in bench_core.NOT_MEASURED if implementation == "nytorch 1.1"}
    assert {row["workload"] for row in rows} == workloads - spelt
    assert all(row["size"] == "tiny (seed)" and row["ratio_to_floor"] > 0 for row in rows)


def test_profile_splits_time_into_kernel_allocation_and_the_rest():
    from benchmarks.bench_core import Workload
    from benchmarks.profile import split

    medians = {"floor: flat + flat": 10.0, "kernel only: torch.add(out=reused)": 8.0, "Particle p + q": 15.0}
    assert split(Workload("a + b", "floor: flat + flat", {}), medians, "Particle p + q") == {
        "kernel": 8.0, "allocation": 2.0, "rest": 5.0}
    # no kernel-only row: the floor's allocation is not timed apart
    medians = {"floor: flat.clone()": 10.0, "Particle clone": 12.0}
    assert split(Workload("clone", "floor: flat.clone()", {}), medians, "Particle clone") == {
        "kernel": 10.0, "allocation": None, "rest": 2.0}
    # in place: the floor is the kernel, nothing is allocated
    medians = {"floor: flat.lerp_": 10.0, "Particle ema.lerp_": 12.0}
    assert split(Workload("lerp_ (EMA, in place)", "floor: flat.lerp_", {}), medians, "Particle ema.lerp_") == {
        "kernel": 10.0, "allocation": 0.0, "rest": 2.0}


def test_profile_names_where_the_time_goes(capsys):
    from benchmarks.profile import hot_spots, report

    spots = hot_spots(lambda: sorted(range(100_000), reverse=True), calls=3, top=3)
    assert any(label.endswith("builtins.sorted>") for label, _, _ in spots)
    assert all(per_call >= 0 and 0 <= share <= 1 for _, per_call, share in spots)
    report("tiny (seed)", SeedLinear, ["a + b"], ["Particle"], calls=5, repeats=1, top=3)
    printed = capsys.readouterr().out
    assert "a + b | tiny (seed) | Particle p + q:" in printed and "kernel" in printed and "rest" in printed


def test_overheads_name_what_the_harness_costs():
    found = harness.overheads()
    assert set(found) == {"timer", "synchronize", "full collection", "collection after a freeze"}
    assert all(value >= 0 for value in found.values())
    import gc
    assert gc.get_freeze_count() == 0  # what it froze to measure is unfrozen


def test_use_allocator_names_its_regime_and_rejects_others():
    import subprocess
    import sys

    import pytest

    with pytest.raises(ValueError, match=r"use_allocator: expected one of \['warm', 'system'\] as regime, got 'hot'"):
        harness.use_allocator("hot")
    assert harness.use_allocator("system") and harness.machine()["allocator"].startswith("system defaults")
    # "warm" changes malloc for the whole process: tried in a child, which reports what it got
    script = ("from benchmarks import _harness as h; ok = h.use_allocator('warm'); "
              "print(ok, h.ALLOCATOR if ok else 'system', h.machine()['allocator'])\n"
              "try:\n    h.use_allocator('system')\nexcept ValueError as error:\n    print(error)")
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert shown.startswith("True warm glibc keeping freed memory") or shown.startswith("False system system")
    if shown.startswith("True"):  # glibc's moving thresholds cannot be given back: refused, not faked
        assert "use_allocator: the 'warm' regime is in force and lasts as long as this process" in shown


def test_use_device_moves_the_suites_or_says_why_not():
    import pytest
    import torch

    assert harness.use_device("cpu") == torch.device("cpu") and harness.machine()["device"] == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"use_device: device 'cuda' is not available here"):
            harness.use_device("cuda")
    with pytest.raises(ValueError, match=r"use_device: device 'abacus' is not available here"):
        harness.use_device("abacus")
    for other in ("meta", "mps"):  # no synchronize() taking a device, no memory measure: refused
        with pytest.raises(ValueError, match=rf"use_device: the suites time and measure memory on cpu and cuda "
                                             rf"only, got '{other}'"):
            harness.use_device(other)
    assert harness.DEVICE == torch.device("cpu")  # a refused device changes nothing
    harness.synchronize()  # nothing to wait for on the CPU


def test_memory_counts_what_one_operation_allocates():
    import torch

    from benchmarks.memory import allocated_bytes

    a = torch.zeros(1000)
    assert allocated_bytes(lambda: a + a, torch.device("cpu")) == 4000
    assert allocated_bytes(lambda: a.add_(a)) == 0


def test_memory_rows_give_each_style_one_output_of_parameter_bytes():
    from benchmarks import bench_memory
    from benchmarks.models import Stack

    rows = {row["implementation"]: row for row in bench_memory._ours("small", lambda: Stack(3, 32))}
    floor = rows["parameter bytes (floor)"]["bytes"]
    assert floor == 3 * (32 * 32 + 32) * 4
    for name in ("NytoModule a + b", "Particle p + q", "functional nf.add", "per-tensor loop"):
        assert rows[name]["bytes"] == floor, name
    assert rows["NytoModule 0.9*(a-b)+a"]["bytes"] == 2 * floor  # the difference, then the sum
    assert rows["Particle ema.lerp_ (in place)"]["bytes"] == 0


def _rows(implementation: str, median: float) -> list[dict]:
    return [{"suite": "bench_core", "workload": "a + b", "size": "wide", "implementation": name,
             "median_us": value, "ratio_to_floor": value / 2.0}
            for name, value in (("floor: flat + flat", 2.0), (implementation, median))]


def test_results_keep_each_device_section_until_that_device_runs_again(tmp_path):
    from benchmarks import results

    path = str(tmp_path / "RESULTS.md")
    cpu, cuda = {"device": "cpu", "date": "d1"}, {"device": "cuda:0: NVIDIA H200", "date": "d2"}
    assert results.write(_rows("Particle p + q", 3.0), cpu, path) == "cpu"
    assert results.write(_rows("Particle p + q", 5.0), cuda, path, failures=["bench_swarm: RuntimeError: boom"]) == "cuda"
    text = open(path).read()
    assert text.index("## On the CPU") < text.index("## On CUDA: NVIDIA H200")
    assert "| 3.0 µs | 1.50 |" in text and "| 5.0 µs | 2.50 |" in text
    assert "- bench_swarm: RuntimeError: boom" in text and "for comparison" in text
    results.write(_rows("Particle p + q", 4.0), cpu, path)  # the CPU again: its section only
    text = open(path).read()
    assert "| 3.0 µs |" not in text and "| 4.0 µs | 2.00 |" in text and "| 5.0 µs | 2.50 |" in text
    assert text.count("<!-- run: cpu -->") == 1 and text.count("<!-- run: cuda -->") == 1
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "RESULTS.png").exists() and (tmp_path / "RESULTS-cuda.png").exists()
        assert "(RESULTS-cuda.png)" in text


def test_collect_keeps_going_past_a_failing_suite_and_saves_after_each(tmp_path, monkeypatch):
    import json
    import sys
    import types

    import pytest

    from benchmarks import __main__ as suite

    def failing(quick: bool) -> list:
        raise RuntimeError("no such kernel")

    for name, run in (("fake_fails", failing), ("fake_works", lambda quick: _rows("Particle p + q", 3.0))):
        monkeypatch.setitem(sys.modules, f"benchmarks.{name}", types.SimpleNamespace(run=run))
    monkeypatch.setattr(suite, "SUITES", ["fake_fails", "fake_works"])
    path = str(tmp_path / "run.json")
    table, failures = suite.collect(True, [], keep_going=True, json_path=path)
    assert failures == ["fake_fails: RuntimeError: no such kernel"]
    assert [row["implementation"] for row in table] == ["floor: flat + flat", "Particle p + q"]
    saved = json.load(open(path))
    assert saved["failures"] == failures and saved["rows"] == table and "device" in saved["machine"]
    with pytest.raises(RuntimeError, match="no such kernel"):
        suite.collect(True, [], json_path=path)

    def parts(quick: bool):  # a suite handing over its rows a part at a time, cut short after the first
        yield _rows("NytoModule a + b", 4.0)
        raise RuntimeError("out of memory")

    monkeypatch.setitem(sys.modules, "benchmarks.fake_parts", types.SimpleNamespace(parts=parts))
    monkeypatch.setattr(suite, "SUITES", ["fake_parts"])
    table, failures = suite.collect(True, [], keep_going=True, json_path=path)
    assert [row["implementation"] for row in table] == ["floor: flat + flat", "NytoModule a + b"]
    assert failures == ["fake_parts: RuntimeError: out of memory"] and json.load(open(path))["rows"] == table


def test_sizes_keeps_the_sizes_asked_for(monkeypatch):
    from benchmarks import bench_memory, models

    monkeypatch.setattr(models, "ONLY", ["iris MLP", "many-small"])
    assert list(models.sizes(quick=True)) == ["iris MLP", "many-small"]
    monkeypatch.setattr(bench_memory, "_nytorch_11", lambda names, quick: [])
    assert {row["size"] for row in bench_memory.run(quick=True)} == {"many-small"}
    monkeypatch.setattr(models, "ONLY", [])
    assert len(models.sizes(quick=False)) == 6


def test_on_gpu_script_runs_its_steps_on_the_cpu_too(tmp_path):
    """``benchmarks/on_gpu.sh`` is run once per lent GPU: it must not rot in between (DEVICE=cpu here)."""
    import json
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, DEVICE="cpu", QUICK="1", SUITES="bench_memory", SIZES="many-small",
               CUDA_TESTS_S="0", TESTS_S="0", SUITE_S="120")
    done = subprocess.run(["bash", "benchmarks/on_gpu.sh", str(tmp_path), str(tmp_path / "no deps")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "suite exit status 0" in done.stdout
    assert "torch" in (tmp_path / "versions.txt").read_text()
    saved = json.loads((tmp_path / "cpu.json").read_text())
    assert saved["failures"] == [] and {row["size"] for row in saved["rows"]} == {"many-small"}


@pytest.mark.parametrize("command, message", [
    (["benchmarks.profile", "--workload", "a+b"], "--workload: unknown ['a+b']; expected some of ['a + b'"),
    (["benchmarks.profile", "--implementation", "zzz"], "--implementation: no implementation starts with ['zzz']"),
    (["benchmarks", "--quick", "--results"], "--results writes the full table of benchmarks/RESULTS.md"),
])
def test_commands_refuse_what_they_would_silently_get_wrong(command, message):
    done = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_a_partial_results_section_says_so():
    from benchmarks.results import partial_note

    assert partial_note([], []) == []
    assert partial_note(["bench_swarm"], ["many-small", "wide"]) == [
        "A partial run (`--only bench_swarm --sizes many-small wide`): this section holds only what it measured; "
        "the full table is `python -m benchmarks --threads 1 --results`."]


# Every command refuses a bad value before measuring anything, in argparse's words (exit status 2, no traceback).
@pytest.mark.parametrize("module, argv, message", [
    ("benchmarks.__main__", ["--threads", "0"], "argument --threads: expected a whole number of at least 1, got '0'"),
    ("benchmarks.__main__", ["--threads", "-1"], "argument --threads: expected a whole number of at least 1, got '-1'"),
    ("benchmarks.__main__", ["--only"], "argument --only: expected at least one argument"),
    ("benchmarks.__main__", ["--quick", "--sizes", "resnet18"], "--sizes: --quick leaves out ['resnet18']"),
    ("benchmarks.__main__", ["--json", "/nonexistent-a17/run.json"],
     "--json: expected a file in a folder that exists, got '/nonexistent-a17/run.json'"),
    ("benchmarks.__main__", ["--plot", "/nonexistent-a17/run.png"],
     "--plot: expected a file in a folder that exists, got '/nonexistent-a17/run.png'"),
    ("benchmarks.profile", ["--calls", "0"], "argument --calls: expected a whole number of at least 1, got '0'"),
    ("benchmarks.profile", ["--repeats", "-2"], "argument --repeats: expected a whole number of at least 1, got '-2'"),
    ("benchmarks.profile", ["--threads", "0"], "argument --threads: expected a whole number of at least 1, got '0'"),
    ("benchmarks.profile", ["--size"], "argument --size: expected at least one argument"),
])
def test_bad_option_values_are_usage_errors_before_anything_runs(module, argv, message, monkeypatch, capsys):
    import importlib

    import torch

    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", [module, *argv])
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main()
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert torch.get_num_threads() == threads and harness.DEVICE == torch.device("cpu")


def _dump(path, *, quick=False, only=(), sizes=(), rows=None):
    import json

    rows = _rows("Particle p + q", 3.0) if rows is None else rows
    path.write_text(json.dumps({"machine": {"device": "cpu", "date": "d"}, "rows": rows, "failures": [],
                                "options": {"quick": quick, "only": list(only), "sizes": list(sizes)}}))
    return str(path)


def test_dump_json_records_the_options_of_the_run(tmp_path):
    import json

    path = str(tmp_path / "run.json")
    harness.dump_json(_rows("Particle p + q", 3.0), path, [], {"quick": True, "only": ["bench_core"], "sizes": []})
    saved = json.load(open(path))
    assert saved["options"] == {"quick": True, "only": ["bench_core"], "sizes": []}
    assert saved["rows"] == _rows("Particle p + q", 3.0) and set(saved["machine"]) >= {"date", "cpu", "device"}


def test_results_command_refuses_quick_runs_and_notes_partial_ones(tmp_path, monkeypatch, capsys):
    from benchmarks import results

    out = str(tmp_path / "RESULTS.md")
    monkeypatch.setattr(sys, "argv", ["results", _dump(tmp_path / "quick.json", quick=True), "--out", out])
    with pytest.raises(SystemExit) as exit_info:
        results.main()
    assert exit_info.value.code == 2 and "a --quick run (small sizes, few repeats)" in capsys.readouterr().err
    assert not (tmp_path / "RESULTS.md").exists()
    monkeypatch.setattr(sys, "argv", ["results", _dump(tmp_path / "some.json", only=["bench_core"],
                                                       sizes=["tiny (seed)", "wide"]), "--out", out])
    results.main()
    text = open(out).read()
    assert "A partial run (`--only bench_core --sizes 'tiny (seed)' wide`)" in text
    assert "| bench_core | a + b | wide | Particle p + q | 3.0 µs | 1.50 |" in text


@pytest.mark.parametrize("content, message", [
    (None, "read_dump: cannot read"),
    ("not json", "read_dump: cannot read"),
    ("{}", "read_dump: expected a dump of python -m benchmarks --json (keys 'machine' and 'rows')"),
    ("[1, 2]", "got list"),
])
def test_results_and_plot_commands_name_a_bad_dump(content, message, tmp_path, monkeypatch, capsys):
    from benchmarks import plot, results

    path = tmp_path / "run.json"
    if content is not None:
        path.write_text(content)
    for main, argv in ((results.main, [str(path), "--out", str(tmp_path / "R.md")]),
                       (plot.main, [str(path), str(tmp_path / "out.png")])):
        monkeypatch.setattr(sys, "argv", ["command", *argv])
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "R.md").exists() and not (tmp_path / "out.png").exists()


def test_plot_command_names_a_dump_without_core_rows(tmp_path, monkeypatch, capsys):
    from benchmarks import plot

    rows = [{"suite": "bench_swarm", "workload": "swarm forward", "size": "P=64", "implementation": "a",
             "median_us": 1.0, "ratio_to_floor": 1.0}]
    monkeypatch.setattr(sys, "argv", ["plot", _dump(tmp_path / "run.json", rows=rows), str(tmp_path / "out.png")])
    with pytest.raises(SystemExit) as exit_info:
        plot.main()
    assert exit_info.value.code == 2 and "plot: expected rows of at least one of" in capsys.readouterr().err


def test_results_file_is_found_beside_the_suite_wherever_it_runs_from():
    import inspect

    from benchmarks import results

    here = Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.md"
    assert Path(results.RESULTS_MD) == here
    assert inspect.signature(results.write).parameters["path"].default == results.RESULTS_MD


def test_verdict_lines_never_show_a_miss_as_the_target_itself():
    from benchmarks.targets import Target, Verdict, verdicts

    ratio, speedup = Target("r", "s", "w", "z", "i", at_most=1.5), Target("x", "s", "w", "z", "i", at_least=5.0, than="o")
    assert Verdict(ratio, 1.503, False).line() == "MISS  r: 1.503 (target <= 1.5)"
    assert Verdict(ratio, 1.497, True).line() == "met   r: 1.497 (target <= 1.5)"
    assert Verdict(ratio, 1.5, True).line() == "met   r: 1.50 (target <= 1.5)"
    assert Verdict(ratio, 1.31, False).line() == "MISS  r: 1.31 (target <= 1.5)"
    assert Verdict(speedup, 4.9996, False).line() == "MISS  x: 4.9996x faster (target >= 5x faster)"
    # issue 4's 3-op target holds for every API of ours, the functional one too
    table = [{"suite": "bench_core", "workload": "0.9 * (a - b) + a", "size": "deep-narrow", "implementation": name,
              "median_us": 1.0, "ratio_to_floor": ratio} for name, ratio in
             (("Particle", 1.9), ("NytoModule", 2.0), ("functional", 4.18))]
    assert [verdict.line() for verdict in verdicts(table)] == [
        "met   Particle 0.9 * (a - b) + a, deep-narrow: 1.90 (target <= 2)",
        "met   NytoModule 0.9 * (a - b) + a, deep-narrow: 2.00 (target <= 2)",
        "MISS  functional 0.9 * (a - b) + a, deep-narrow: 4.18 (target <= 2)"]


def test_memory_at_the_tiny_sizes_is_what_the_no_row_line_says():
    from benchmarks import bench_memory
    from benchmarks.models import IrisMLP
    from benchmarks.results import not_measured

    for size, factory, output in (("tiny", SeedLinear, 8), ("iris", IrisMLP, 396)):
        model = factory()
        assert sum(p.numel() * p.element_size() for p in model.parameters()) == output  # independent count
        rows = {row["implementation"]: row for row in bench_memory._ours(size, factory)}
        for name in ("NytoModule a + b", "Particle p + q", "functional nf.add", "per-tensor loop"):
            assert rows[name]["bytes"] == output and rows[name]["ratio_to_floor"] == 1.0, (size, name)
    lines = not_measured([{"suite": "bench_memory", "workload": "memory of a + b", "size": "many-small",
                           "implementation": name, "median_us": 0.0, "ratio_to_floor": 1.0}
                          for name in ("tensordict td + td", "nytorch 1.1 NytoModule")])
    assert lines == ["memory of a + b: " + bench_memory.NOT_MEASURED[("memory of a + b", "sizes")]]
    assert "8 or 396 bytes" in lines[0]


def test_machine_names_the_cpu_model_where_the_system_says_it():
    import platform

    cpu = harness.machine()["cpu"]
    assert cpu == platform.machine() or cpu.endswith(f"({platform.machine()})")
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "") if Path("/proc/cpuinfo").exists() else ""
    if model and model != platform.machine():
        assert cpu == f"{model} ({platform.machine()})"


def test_every_swarm_workload_has_every_implementation_or_says_why_not(monkeypatch):
    """Issue 4's implementations (ours, per-tensor, foreach, tensordict, 1.1) at both swarm sizes; nothing timed."""
    from benchmarks import bench_swarm
    from benchmarks.plot import family

    monkeypatch.setattr(harness, "compare", lambda impls, **options: dict.fromkeys(impls, 1.0))
    # the P = 64 size (P = 8 many-small makes the same rows, from the same code, more slowly)
    rows = bench_swarm.forward_rows(1) + bench_swarm.apso_rows(1)
    # nytorch 1.1's APSO rows come from a subprocess (bench_swarm.nytorch_11); its forward has none, and says why
    assert ("swarm forward", "nytorch 1.1") in bench_swarm.NOT_MEASURED
    families = ["functional", "Particle", "NytoModule", "per-tensor", "foreach", "tensordict"]
    if importlib.util.find_spec("tensordict") is None:
        families.remove("tensordict")
    for workload in ("swarm forward", "APSO update"):
        present = {family(row["implementation"])[0] for row in rows if row["workload"] == workload}
        absent = {implementation for (named, implementation) in bench_swarm.NOT_MEASURED if named == workload}
        assert [name for name in families if name not in present and name not in absent] == [], workload
        assert not present & absent, workload
        assert any(row["implementation"].startswith(("Swarm", "nytorch algorithms")) for row in rows
                   if row["workload"] == workload), workload  # ours


def test_first_use_measures_new_structures_against_deepcopy() -> None:
    from benchmarks import first_use

    times = first_use.measure(first_use.Stack, 3, 2)
    assert set(times) == {"first 3", "steady", "deepcopy"} and all(value > 0 for value in times.values())
