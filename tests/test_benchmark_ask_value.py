"""benchmarks/ask_value.py plays the same held-out conversations with and without a forced taste
question and writes its table, CSV and plot (numbers: EXPERIMENTS.md)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "ask_value.py"


def test_the_forced_question_is_judged_and_paired_with_the_plain_conversation(tmp_path):
    spec = importlib.util.spec_from_file_location("ask_value", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--runs", str(tmp_path / "no-runs"), "--episodes", "8", "--out", str(tmp_path)])
    rows = list(csv.DictReader((tmp_path / "ask_value_segmented.csv").open()))
    assert {r["policy"] for r in rows} == {"initial"} and rows
    for r in rows:
        assert float(r["value_of_asking"]) == pytest.approx(
            float(r["return_forced_question"]) - float(r["return_plain"])
        )
        if r["segment_length"] == "1":  # the question earns 0 and the segment ends with it
            assert float(r["return_forced_question"]) == 0.0
    assert sum(int(r["segments"]) for r in rows) >= 8 * 2, "every segment of every conversation"
    assert (tmp_path / "ask_value_segmented.png").read_bytes()[:4] == b"\x89PNG"
    assert "| initial | 1 |" in (tmp_path / "ask_value_segmented.md").read_text()
