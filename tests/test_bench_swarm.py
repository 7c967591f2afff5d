"""``benchmarks/bench_swarm.py`` runs and reports ratios to its floors (the numbers are read by people)."""
from benchmarks import bench_swarm


def test_swarm_benchmark_rows() -> None:
    rows = bench_swarm.forward_rows(repeats=2) + bench_swarm.apso_rows(repeats=2)
    assert {row["workload"] for row in rows} == {"swarm forward", "APSO update"}
    for row in rows:
        assert set(row) >= {"workload", "implementation", "median_us", "ratio_to_floor"}
        assert row["median_us"] > 0 and row["ratio_to_floor"] > 0
    names = {row["implementation"] for row in rows}
    assert {"Python loop of 64 modules", "vmap(functional_call)", "per-tensor loop over stacked parameters",
            "foreach by hand over stacked parameters"} <= names
    assert {workload for workload, _ in bench_swarm.NOT_MEASURED} == {"swarm forward", "APSO update"}
    floors = [row for row in rows if row["implementation"].startswith("floor")]
    assert len(floors) == 2 and all(row["ratio_to_floor"] == 1.0 for row in floors)
    assert any("forward" in line for line in bench_swarm.verdicts(rows))


def test_swarm_benchmark_runs_at_the_many_small_size_too() -> None:
    rows = bench_swarm.forward_rows(repeats=1, many_small=True) + bench_swarm.apso_rows(repeats=1, many_small=True)
    assert {row["size"] for row in rows} == {"P=8 many-small (200 x 64x64)", "P=8 n=416000"}
    assert {row["implementation"] for row in rows if row["workload"] == "swarm forward"} >= {
        "Swarm: swarm(x)", "Python loop of 8 modules", "vmap(functional_call)"}
    assert all(row["ratio_to_floor"] > 0 for row in rows)
