"""The variance benchmark runs end to end and writes its table, CSV and plot (numbers: BENCHMARKS.md)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "variance.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("variance_benchmark", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variance_benchmark_writes_csv_markdown_and_png(tmp_path):
    load_benchmark().main(["--sizes", "2", "8", "--repeats", "20", "--out", str(tmp_path)])
    rows = list(csv.DictReader((tmp_path / "variance.csv").open()))
    assert len(rows) == 3 * 4 * 2  # problems x policy classes x sizes
    by = {(r["problem"], r["policy_class"], r["episodes_per_batch"]): r for r in rows}
    # Exact columns do not depend on sampling: myopic rewards give every class the full gradient,
    # delayed rewards leave greedy with a bias that planning does not have.
    assert float(by[("myopic", "greedy", "8")]["bias_full"]) < 1e-9
    assert float(by[("delayed", "greedy", "8")]["bias_full"]) > 0.5
    assert float(by[("delayed", "full", "8")]["bias_full"]) < 1e-9
    assert (tmp_path / "variance.md").read_text().startswith("Command: `python benchmarks/variance.py")
    assert (tmp_path / "variance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*")), "temporary files left behind"
