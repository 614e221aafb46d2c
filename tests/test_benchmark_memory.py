"""The memory and serve-vs-vLLM benchmarks' bookkeeping, on made-up readings (the benchmarks
themselves start a whole ``ppg train`` or three servers: numbers in BENCHMARKS.md). Only what
the code decides is asserted: which process is which kind, and the tables' arithmetic."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kind_of(memory, title: str) -> str | None:
    return next((kind for kind, pattern in memory.KINDS if re.search(pattern, title)), None)


def test_memory_names_every_process_kind_of_the_main_job():
    memory = load("memory")
    assert kind_of(memory, "ray::RolloutWorker.rollout") == "rollout worker"
    assert kind_of(memory, "ray::RolloutPool.collect") == "rollout pool"
    assert kind_of(memory, "ray::RayTrainWorker.run_train_fn") == "learner worker"
    assert kind_of(memory, "ray::ServeReplica:ppg:PolicyServer.handle_request") == "serve replica"
    assert kind_of(memory, "ray::ChatLLM.chat") == "partner (LLM actor)"
    # a worker process before its actor starts carries Ray's command line, which names an agent port
    worker = "python .../ray/_private/workers/default_worker.py --runtime-env-agent-port=1"
    assert kind_of(memory, worker) == "ray idle worker" and "ray idle worker" in memory.VAGUE
    assert (
        kind_of(memory, "/x/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp")
        == "ray system (gcs, raylet, agents)"
    )


def test_memory_table_lists_the_main_kinds_first_and_the_whole_job_last():
    memory = load("memory")
    kind = {"processes": 1, "peak_rss_mib": 100.0, "peak_pss_mib": 80.0, "peak_uss_mib": 70.0}
    result = {
        "kinds": {"serve proxy": kind, "rollout worker": {**kind, "peak_rss_mib": 2000.0}, "driver": kind},
        "whole_job": {
            "peak_rss_sum_mib": 2200.0,
            "peak_pss_sum_mib": 900,
            "peak_uss_sum_mib": 800,
            "processes_seen": 3,
        },
    }
    rows = memory.table(result).splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == [
        "**driver**", "**rollout worker**", "serve proxy", "**whole job** (sum over its 3 processes, at its peak)"
    ]  # fmt: skip
    assert "| 2,000 |" in rows[1] and "| 2,200 | 900 | 800 |" in rows[-1]


def test_serve_vs_vllm_ratios_are_against_the_vllm_server_of_the_same_load():
    bench = load("serve_vs_vllm")
    rows = [
        {"clients": 32, "path": p, "requests": 10, "p50_ms": p50, "p99_ms": p50, "requests_per_s": rps}
        for p, rps, p50 in (
            ("ppg", 50.0, 200.0),
            ("vllm", 100.0, 100.0),
            ("echo", 400.0, 50.0),
            ("direct", 200.0, 80.0),
        )
    ]
    bench.add_ratios(rows)
    text = bench.markdown(rows, {"load_before": (1.0,), "load_after": (2.0,), "cpus": 2}, "cmd")
    assert "| 32 | ppg | 10 | 200 | 200 | 50.0 | 0.50x | 2.00x | 0.25x |" in text
    assert "load average before 1.0, after 2.0" in text
