"""The scaling benchmark runs every section end to end on the smallest model, at its smallest settings,
and writes its table, CSV and plot (numbers: BENCHMARKS.md). No timing is asserted: only that each
measurement exists, is positive, and that every ratio is the value over its baseline's."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("scaling_benchmark", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_scaling_benchmark_writes_csv_markdown_and_png(ray_cluster, tmp_path):
    bench = load_benchmark()
    bench.main(
        [
            "--sizes", "1m",
            "--batch-sizes", "4",
            "--max-tokens", "4",
            "--repeats", "1",
            "--weight-repeats", "1",
            "--learner-episodes", "8",
            "--learner-repeats", "1",
            "--trl-budget-s", "2",
            "--trl-args", "--ppg-iterations 2 --episodes-per-update 8 --eval-episodes 4 --window 8",
            "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert ray_cluster.is_initialized(), "the benchmark must not shut down a Ray it did not start"
    rows = list(csv.DictReader((tmp_path / "scaling.csv").open()))
    assert rows and set(rows[0]) == set(bench.FIELDS)
    cases = {(r["section"], r["case"]): r for r in rows}
    expected = {
        ("generation", "transformers batch=4"), ("generation", "vllm batch=4"),
        ("learner", "plain forward/backward + AdamW"), ("learner", "ppg learner update"),
        ("weights", "state dict clone (in memory)"), ("weights", "transformers load_state_dict (in memory)"),
        ("weights", "vllm update_weights (state dict)"),
        ("episodes", "TRL GRPOTrainer"), ("episodes", "ppg train"),
    }  # fmt: skip
    assert set(cases) == expected and len(rows) == len(expected)
    for r in rows:
        assert r["model"] == "1m" and int(r["parameters"]) > 500_000 and not r["note"].startswith("not"), r
        assert float(r["value"]) > 0 and float(r["load_1min"]) >= 0, r
        if r["min"]:
            assert float(r["min"]) <= float(r["value"]) <= float(r["max"]), r
        if r["baseline"]:
            base = cases[(r["section"], r["baseline"])]
            assert not base["baseline"] and float(r["ratio"]) == pytest.approx(
                float(r["value"]) / float(base["value"])
            )
    baselines = {k for k, r in cases.items() if not r["baseline"]}
    assert len(baselines) == 4, "one baseline per section"
    for engine in ("transformers", "vllm"):  # ignore_eos: every prompt gets exactly --max-tokens
        assert float(cases[("generation", f"{engine} batch=4")]["tokens_per_prompt"]) == 4
    md = (tmp_path / "scaling.md").read_text()
    assert md.startswith("Command: `python benchmarks/scaling.py --sizes 1m") and "| 1m |" in md
    assert "- batch 4: 1m " in md and "load average" in md
    assert (
        (tmp_path / "scaling_trl_1m.md").read_text().startswith("Command: `python benchmarks/trl_compare.py")
    )
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


def test_a_left_out_section_is_written_as_not_measured_and_the_crossing_is_interpolated():
    bench = load_benchmark()
    args = bench.argparse.Namespace(batch_sizes=[8, 32])
    rows = bench.not_measured("50m", 5 * 10**7, "generation", args, "--sections leaves it out")
    rows += [bench.blank("50m", 5 * 10**7, "learner", c, value=v) for c, v in [(bench.PLAIN_STEP, 2.0),
             (bench.PPG_STEP, 3.0)]]  # fmt: skip
    rows = bench.add_ratios(rows)
    assert [r["case"] for r in rows[:4]] == [
        "transformers batch=8", "vllm batch=8", "transformers batch=32", "vllm batch=32"
    ]  # fmt: skip
    assert all(r["note"] == "not measured (--sections leaves it out)" and r["ratio"] == "" for r in rows[:4])
    assert rows[3]["baseline"] == "transformers batch=32" and rows[-1]["ratio"] == 1.5
    # 0.5x at 1M, 2x at 100M: the ratio crosses 1 halfway in log-log, at 10M
    crossing = bench.sibling("scaling_report").crossing
    text = crossing([(10**6, "a", 0.5), (10**8, "b", 2.0)])
    assert "between a and b, near 10M parameters" in text
    assert "every size measured" in crossing([(10**6, "a", 1.2)])
    assert "not ahead" in crossing([(10**6, "a", 1.2), (10**8, "b", 0.9)])
