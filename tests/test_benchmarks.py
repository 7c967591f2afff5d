"""The benchmark suite runs (its numbers are judged by people reading ratios, not by tests)."""
from benchmarks import _harness as harness
from benchmarks import bench_core
from benchmarks.models import SeedLinear


def test_compare_returns_a_median_per_implementation():
    medians = harness.compare({"a": lambda: 1 + 1, "b": lambda: sum(range(10))}, repeats=3, target_s=0.0001)
    assert set(medians) == {"a", "b"} and all(value > 0 for value in medians.values())


def test_core_rows_have_ratios_to_their_floor():
    rows = bench_core.bench_size("tiny", SeedLinear, repeats=2)
    floors = [row for row in rows if row["implementation"].startswith("floor")]
    assert floors and all(row["ratio_to_floor"] > 0 for row in rows)
    assert {row["workload"] for row in rows} >= {"a + b", "0.9 * (a - b) + a", "lerp_ (EMA, in place)",
                                                 "randn / clone", "structural check of two models"}
    checks = {row["implementation"] for row in rows if row["workload"] == "structural check of two models"}
    assert {"NytoModule same_structure(a, b)", "Particle same_structure(p, q)",
            "functional same_structure(params, params)", "per-tensor loop over named_parameters()"} <= checks


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
