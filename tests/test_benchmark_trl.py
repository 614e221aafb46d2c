"""The ppg vs TRL benchmark runs both sides end to end at its smallest settings and writes its table, CSV
and plot (numbers: BENCHMARKS.md). No timing is asserted: only that each measurement exists and is sane."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "trl_compare.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("trl_compare_benchmark", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_trl_compare_writes_csv_markdown_and_png(ray_cluster, tmp_path):
    bench = load_benchmark()
    bench.main(
        [
            "--budget-s", "2",
            "--ppg-iterations", "2",
            "--episodes-per-update", "8",
            "--group-size", "4",
            "--max-tokens", "8",
            "--eval-episodes", "8",
            "--window", "8",
            "--target", "-1",
            "--poll-variant-s", "0",  # the variant is a second ppg run with one env var: skipped for time
            "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert ray_cluster.is_initialized(), "the benchmark must not shut down a Ray it did not start"
    rows = list(csv.DictReader((tmp_path / "trl_compare.csv").open()))
    assert rows and set(rows[0]) == set(bench.FIELDS)
    summary = {r["side"]: r for r in rows if r["kind"] == "summary"}
    assert set(summary) == {"ppg", "trl", "initial"}
    for side in ("ppg", "trl"):
        s = summary[side]
        batches = [r for r in rows if r["kind"] == "batch" and r["side"] == side]
        assert int(s["updates"]) == len(batches) >= 1
        assert int(s["episodes"]) == 8 * len(batches) == int(batches[-1]["episodes"])
        times = [float(b["train_s"]) for b in batches]
        assert times == sorted(times) and times[-1] == pytest.approx(float(s["train_s"]))
        assert float(s["episodes_per_s"]) > 0 and float(s["setup_s"]) >= 0 and float(s["ratio_vs_trl"]) > 0
        for b in batches:
            assert -1 <= float(b["reward_mean"]) <= 1 and float(b["load_1min"]) >= 0
        assert float(s["load_mean"]) >= 0 and -1 <= float(s["reward_last"]) <= 1
        # target -1: reached at the first batch (a window of 8 episodes = one update)
        assert s["target_s"] == batches[0]["train_s"] and int(s["target_episodes"]) == 8
        assert float(s["generate_s"]) > 0 and float(s["learner_s"]) > 0
    assert int(summary["ppg"]["updates"]) == 2
    assert float(summary["trl"]["train_s"]) >= float(summary["ppg"]["train_s"]), "TRL stops at ppg's time"
    for side in ("ppg", "trl", "initial"):
        for mode in ("greedy", "sampled"):
            value, se = float(summary[side][f"eval_{mode}"]), float(summary[side][f"eval_{mode}_se"])
            assert -1 <= value <= 1 and se >= 0 and not math.isnan(value)
            assert float(summary[side][f"eval_{mode}_tokens"]) >= 1
    md = (tmp_path / "trl_compare.md").read_text()
    assert md.startswith("Command: `python benchmarks/trl_compare.py") and "| TRL GRPOTrainer" in md
    assert (tmp_path / "trl_compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


def test_shared_reward_replays_the_prompt_through_the_problem():
    """TRL's reward is ppg's: the same conversation code scores the completion, and a prompt that is not
    the one ppg's agent sees is refused."""
    from types import SimpleNamespace

    bench = load_benchmark()
    args = SimpleNamespace(
        model="embedded:tiny",
        problem="myopic",
        episodes_per_update=8,
        group_size=4,
        max_tokens=8,
        temperature=1.0,
        lr=5e-4,
        seed=0,
    )
    config = bench.ppg_config(args, 2, Path("unused"))
    assert config.problem.num_turns == 1
    env = bench.Environment(config)
    groups = bench.planned_groups(config, 2)
    assert len(groups) == 2 * 8 // 4
    ids, seeds = [p for p, _ in groups], [s for _, s in groups]
    prompts = env.prompts(ids, seeds)
    assert [m["role"] for m in prompts[0]] == ["system", "user"]
    liked = env.personas[ids[0]].preferences
    reply = f"you should try {next(iter(liked.values()))}."
    reward = bench.SharedReward(env)
    got = reward(prompts[:1], [[{"role": "assistant", "content": reply}]], ids[:1], seeds[:1])
    direct = env.play(ids[:1], seeds[:1], lambda conversations: [reply])[0].rewards[0]
    assert got == [direct] and reward.pending == [direct]
    wrong = [[prompts[0][0], {"role": "user", "content": "something else"}]]
    with pytest.raises(RuntimeError, match="not what ppg's agent sees"):
        reward(wrong, [[{"role": "assistant", "content": reply}]], ids[:1], seeds[:1])
