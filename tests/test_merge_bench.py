"""The merging benchmark runs and reports ratios to its floors (its numbers are read by people)."""
from __future__ import annotations

from benchmarks import bench_merge


def test_ema_and_soup_rows_have_floors_and_ratios():
    rows = bench_merge.ema_rows("tiny", lambda: bench_merge.stack(3, 8), repeats=1)
    rows += bench_merge.soup_rows("tiny", lambda: bench_merge.stack(3, 8), repeats=1)
    assert {row["workload"] for row in rows} == {"EMA update", "uniform soup of 8"}
    names = {row["implementation"] for row in rows}
    assert {bench_merge.FLOOR_EMA, bench_merge.FLOOR_SOUP, *bench_merge.EMA_ROWS, "per-tensor loop",
            "timm-style _foreach_lerp_", "AveragedModel + get_ema_multi_avg_fn"} <= names
    for row in rows:
        assert set(row) >= {"workload", "implementation", "median_us", "ratio_to_floor"}
        assert row["median_us"] > 0 and row["ratio_to_floor"] > 0
    assert len(bench_merge.summary(rows)) == 2


def test_swarm_soup_rows_have_a_floor_and_ratios():
    rows = bench_merge.swarm_soup_rows(4, repeats=1)
    assert {row["workload"] for row in rows} == {"weighted soup of a swarm"}
    assert {bench_merge.FLOOR_SWARM_SOUP, "nytorch average(swarm, weights=w)"} <= {row["implementation"] for row in rows}
    assert all(row["median_us"] > 0 and row["ratio_to_floor"] > 0 for row in rows)
