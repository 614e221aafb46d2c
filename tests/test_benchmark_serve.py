"""The serve-latency benchmark runs end to end at its smallest settings and writes its table, CSV and
plot (numbers: BENCHMARKS.md). No timing is asserted: only that every measurement exists and is sane."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_latency.py"


@pytest.mark.slow
def test_serve_latency_benchmark_writes_csv_markdown_and_png(ray_cluster, tmp_path):
    spec = importlib.util.spec_from_file_location("serve_latency", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(
        [
            "--requests",
            "4",
            "--concurrency",
            "2",
            "--max-tokens",
            "4",
            "--rounds",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert ray_cluster.is_initialized(), "the benchmark must not shut down a Ray it did not start"
    rows = list(csv.DictReader((tmp_path / "serve_latency.csv").open()))
    assert {(r["load"], r["path"]) for r in rows} == {
        (load, path) for load in ("sequential", "2 concurrent") for path in ("direct", "serve")
    }
    for r in rows:
        assert int(r["requests"]) == 4
        assert 0 < float(r["p50_ms"]) <= float(r["p99_ms"])
        assert float(r["requests_per_s"]) > 0
    assert "| sequential | serve |" in (tmp_path / "serve_latency.md").read_text()
    assert (tmp_path / "serve_latency.png").stat().st_size > 0


def test_percentile_is_nearest_rank():
    spec = importlib.util.spec_from_file_location("serve_latency", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    values = list(range(1, 101))
    assert bench.percentile(values, 50) in (50, 51)
    assert bench.percentile(values, 99) == 99
    assert bench.percentile(values, 100) == 100
    assert bench.percentile([7.0], 99) == 7.0
