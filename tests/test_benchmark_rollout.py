"""The rollout benchmark runs every section end to end, at its smallest settings, and writes its table,
CSV and plot (numbers: BENCHMARKS.md). No timing is asserted: only that each measurement exists."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "rollout.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("rollout_benchmark", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_rollout_benchmark_writes_csv_markdown_and_png(ray_cluster, tmp_path):
    bench = load_benchmark()
    bench.main(
        [
            "--batch-sizes", "1", "4",
            "--max-tokens", "4",
            "--repeats", "1",
            "--episodes", "8",
            "--requests", "2",
            "--episode-repeats", "1",
            "--weight-repeats", "1",
            "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert ray_cluster.is_initialized(), "the benchmark must not shut down a Ray it did not start"
    rows = list(csv.DictReader((tmp_path / "rollout.csv").open()))
    assert rows and set(rows[0]) == set(bench.FIELDS)
    cases = {r["case"]: r for r in rows}
    expected = {
        "transformers batch=1", "transformers batch=4", "vllm batch=1", "vllm batch=4",
        "pool 1 worker", "pool 2 workers",
        "state dict clone (in memory)", "transformers load_state_dict (in memory)",
        "transformers update_weights (folder)", "vllm update_weights (state dict)", "vllm update_weights (folder)",
        "pool broadcast to 1 worker (state dict)", "pool broadcast to 1 worker (folder)",
        "pool broadcast to 2 workers (state dict)",
        "pool broadcast to 2 workers (folder)",
    }  # fmt: skip
    assert set(cases) == expected
    for r in rows:
        assert float(r["value"]) > 0 and float(r["min"]) <= float(r["value"]) <= float(r["max"]), r
    for case in (
        "vllm batch=4",
        "pool 2 workers",
        "vllm update_weights (state dict)",
        "vllm update_weights (folder)",
    ):
        assert float(cases[case]["ratio"]) > 0 and cases[case]["baseline"], cases[case]
    assert 0 < float(cases["pool 2 workers"]["generate_share"]) < 1
    assert float(cases["transformers batch=4"]["torch_threads"]) >= 1
    md = (tmp_path / "rollout.md").read_text()
    assert md.startswith("Command: `python benchmarks/rollout.py") and "| vllm batch=4 |" in md
    assert (tmp_path / "rollout.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*")), "temporary files left behind"
