"""The serve-latency and serve-vs-vLLM benchmarks run end to end at their smallest settings and write
their tables and plots (numbers: BENCHMARKS.md). No timing is asserted: only that every measurement
exists and is sane, and that ratios are value / baseline."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_latency.py"


def load(name: str):
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location(name, BENCH.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


@pytest.mark.slow
def test_serve_vs_vllm_benchmark_streams_to_both_servers(ray_cluster, tmp_path):
    """Both loads, all four non-streamed paths and the two streamed servers, at the smallest settings."""
    bench = load("serve_vs_vllm")
    bench.main(
        ["--requests", "4", "--sequential-requests", "2", "--concurrency", "2", "--max-tokens", "4"]
        + ["--stream-max-tokens", "8", "--rounds", "1", "--out", str(tmp_path)]
    )
    assert ray_cluster.is_initialized(), "the benchmark must not shut down a Ray it did not start"
    result = json.loads((tmp_path / "serve_vs_vllm.json").read_text())
    assert {(r["clients"], r["path"]) for r in result["rows"]} == {
        (c, p) for c in (1, 2) for p in ("ppg", "vllm", "echo", "direct")
    }
    streamed = result["stream_rows"]
    assert [(r["clients"], r["path"]) for r in streamed] == [(1, "ppg"), (1, "vllm"), (2, "ppg"), (2, "vllm")]
    for r in streamed:
        assert r["requests"] == (2 if r["clients"] == 1 else 4)
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"]
        assert 0 < r["ttft_p50_ms"] <= r["reply_p50_ms"]
        assert 0 < r["reply_tokens"] <= 8
        vllm = next(d for d in streamed if d["clients"] == r["clients"] and d["path"] == "vllm")
        for key in ("ttft_p50", "ttft_p99", "reply_p50"):
            assert r[f"{key}_vs_vllm"] == pytest.approx(r[f"{key}_ms"] / vllm[f"{key}_ms"])
    text = (tmp_path / "serve_vs_vllm.md").read_text()
    assert text.count("| 2 | ppg | 4 |") == 2 and "TTFT p50 vs vLLM server" in text  # both tables
    assert (tmp_path / "serve_vs_vllm.png").stat().st_size > 0


def test_serve_vs_vllm_stream_rows_are_ratios_to_the_vllm_server_of_the_same_load():
    stream = load("serve_vs_vllm_stream")
    samples = {  # (seconds to the first token, seconds to the end, reply tokens) per request
        ("ppg", 32): [(0.2, 0.5, 30), (0.4, 0.9, 32), (0.3, 0.7, 31)],
        ("vllm", 32): [(0.1, 0.4, 30), (0.2, 0.6, 32), (0.1, 0.5, 31)],
        ("ppg", 1): [(0.03, 0.1, 32)],
        ("vllm", 1): [(0.02, 0.08, 32)],
    }
    rows = stream.stream_rows(samples)
    assert [(r["clients"], r["path"]) for r in rows] == [(1, "ppg"), (1, "vllm"), (32, "ppg"), (32, "vllm")]
    ppg = rows[2]
    assert ppg["ttft_p50_ms"] == pytest.approx(300) and ppg["ttft_p99_ms"] == pytest.approx(400)
    assert ppg["reply_p50_ms"] == pytest.approx(700) and ppg["reply_tokens"] == 31
    assert ppg["ttft_p50_vs_vllm"] == pytest.approx(3.0) and ppg["ttft_p99_vs_vllm"] == pytest.approx(2.0)
    assert ppg["reply_p50_vs_vllm"] == pytest.approx(1.4) and rows[3]["ttft_p50_vs_vllm"] == 1.0
    text = stream.stream_markdown(rows, 32)
    assert "| 32 | ppg | 3 | 300 | 400 | 700 | 31.0 | 3.00x | 2.00x | 1.40x |" in text
    assert "`max_tokens` 32" in text


def test_serve_profile_charges_each_sample_to_its_innermost_library():
    """py-spy's collapsed stacks (outermost first, a count per line): a sample goes to the innermost
    frame that names a known library, or to "other"; leaf functions are counted as they are."""
    profile = load("serve_profile")
    collapsed = "\n".join(
        [
            "<module> (ray/_private/workers/default_worker.py:1);run (asyncio/base_events.py:600);"
            "chat_completions (ppg/serve/app.py:170);validate (pydantic/main.py:5) 6",
            "_run (threading.py:1);step (ppg/serve/engine_loop.py:80);execute_model (vllm/v1/core.py:9) 3",
            "_run (threading.py:1);sleep (time.py:1) 1",
            "garbage line without a count",
        ]
    )
    groups, leaves, ray_callers = profile.charge(collapsed)
    assert groups == {
        "pydantic (validation, serialization)": 6,
        "vLLM engine (scheduler, model step, sampling)": 3,
        profile.OTHER: 1,
    }
    assert leaves["validate (pydantic/main.py:5)"] == 6 and sum(leaves.values()) == 10
    _, _, callers = profile.charge(
        "poll (ppg/serve/app.py:9);remote (ray/actor.py:1) 4\nmain_loop (ray/_private/worker.py:1) 2"
    )
    assert callers == {"poll (ppg/serve/app.py:9)": 4, "(Ray's own threads)": 2}
