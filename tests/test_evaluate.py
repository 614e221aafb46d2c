"""``ppg eval`` and the training-time samples: the interval math on exact inputs, the paired report
and its files from real (scripted) conversations, and the samples a training run writes. The end to
end checks (``ppg eval`` on a trained checkpoint, ``ppg train``'s final evaluation and samples folder)
ride on the short training of ``tests/test_learner.py::test_async_rollouts_with_two_ddp_learners_and_eval``."""

from __future__ import annotations

import json
import math

import pytest
from reference_episodes import episode_from_conversation
from transformers import AutoTokenizer

from ppg.config import load_config
from ppg.env.conversation import run_conversations
from ppg.env.judges import RuleJudge
from ppg.env.partners import ScriptedPartner
from ppg.env.personas import load_personas, split_personas
from ppg.env.problems import make_problem
from ppg.env.scripted_agents import good_agent, warm_start_agent
from ppg.evaluate import (
    build_report,
    mean_interval,
    paired_difference,
    problem_names,
    problem_report,
    summary_lines,
    t_quantile,
    write_outputs,
)
from ppg.learner.metrics import MetricsWriter
from ppg.models import resolve_model


# ---- statistics -------------------------------------------------------------------------------------
def test_t_quantiles_match_the_table():
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 7: 2.365, 9: 2.262, 30: 2.042, 120: 1.980}
    for df, t in table.items():
        assert t_quantile(df) == pytest.approx(t, abs=5e-4), df
    assert t_quantile(100_000) == pytest.approx(1.95998, abs=1e-4)  # the normal limit
    assert t_quantile(5, 0.99) == pytest.approx(4.032, abs=5e-4)
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 15, 63, 511):
        assert t_quantile(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-12)


def test_paired_interval_on_exact_inputs():
    # differences 1, 2, 2, 3: mean 2, sample sd sqrt(2/3), 3 degrees of freedom
    d = paired_difference([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0])
    half = 3.182446305283708 * math.sqrt(2 / 3) / math.sqrt(4)
    assert d["mean"] == 2.0 and d["n"] == 4
    assert d["half_width"] == pytest.approx(half, rel=1e-12)
    assert (d["low"], d["high"]) == pytest.approx((2.0 - half, 2.0 + half), rel=1e-12)
    # pairing removes the shared spread: unpaired, the same numbers give a far wider interval
    spread = (
        mean_interval([1.0, 2.0, 3.0, 4.0])["half_width"] + mean_interval([0.0, 0.0, 1.0, 1.0])["half_width"]
    )
    assert d["half_width"] < spread
    same = paired_difference([0.5, -0.5, 0.25], [0.5, -0.5, 0.25])
    assert (same["mean"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    one = mean_interval([0.3])
    assert one["mean"] == 0.3 and one["low"] is None and one["half_width"] is None
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference([1.0], [1.0, 2.0])


def test_problem_names_from_repeats_and_comma_lists():
    assert problem_names(None) == [] and problem_names("myopic") == ["myopic"]
    assert problem_names(["myopic,segmented", "myopic", " elicitation "]) == [
        "myopic",
        "segmented",
        "elicitation",
    ]


# ---- the report from real conversations --------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("embedded:tiny"))


def play(problem, personas, seeds, agent, tokenizer):
    conversations = run_conversations(problem, personas, seeds, agent, ScriptedPartner(), RuleJudge())
    episodes = [
        episode_from_conversation(c, tokenizer, problem.name, i, 0) for i, c in enumerate(conversations)
    ]
    return episodes, conversations


def test_paired_report_behaviour_and_files(tmp_path, tokenizer):
    """The good scripted agent as 'checkpoint', the warm-start agent as 'initial', on the same held-out
    personas and seeds: the report pairs them, and the files say what changed."""
    config = load_config(None, ["problem.name=myopic"])
    problem = make_problem(config.problem)
    _, held_out = split_personas(load_personas())
    personas = [held_out[i % len(held_out)] for i in range(16)]
    seeds = list(range(100, 116))
    played, conversations = {}, {}
    played["checkpoint"], conversations["checkpoint"] = play(
        problem, personas, seeds, good_agent(), tokenizer
    )
    played["initial"], conversations["initial"] = play(
        problem, personas, seeds, warm_start_agent(3), tokenizer
    )

    entry = problem_report(config, played, conversations, seeds)
    per_episode = {k: [sum(e.rewards) / len(e.rewards) for e in v] for k, v in played.items()}
    diff = paired_difference(per_episode["checkpoint"], per_episode["initial"])
    assert entry["difference"] == {"mean": diff["mean"], "ci95": [diff["low"], diff["high"]], "n": 16}
    assert entry["checkpoint"]["reward_mean"] == pytest.approx(sum(per_episode["checkpoint"]) / 16)
    assert entry["difference"]["ci95"][0] > 0, "the good agent beats the warm start, significantly"
    good, warm = entry["checkpoint"]["behaviour"], entry["initial"]["behaviour"]
    assert good["recommends_stated_taste"] == 1.0 > warm["recommends_stated_taste"]
    assert good["evasive"] < warm["evasive"]
    assert len(entry["initial"]["reward_per_turn"]) == problem.num_turns

    report = build_report(config, "ckpt", resolve_model("embedded:tiny"), 16, {"myopic": entry})
    assert report["problem"] == "myopic" and report["reward_mean"] == entry["checkpoint"]["reward_mean"]
    write_outputs(tmp_path, report, {"myopic": (played, conversations)})
    assert json.loads((tmp_path / "report.json").read_text())["problems"]["myopic"]["difference"]["n"] == 16
    md = (tmp_path / "report.md").read_text()
    assert "| myopic | " in md and "| recommends_stated_taste | " in md and "| evasive | " in md
    samples = (tmp_path / "samples.md").read_text()
    assert samples.count("### persona ") == 4 and samples.count("| turn | user | checkpoint | initial |") == 4
    assert "[+" in samples or "[-" in samples, "each reply shows its reward"
    assert not list(tmp_path.glob(".*")), "no temporary files left behind"
    lines = summary_lines(report, after="final")
    assert len(lines) == 3 and "initial" in lines[1] and "-> final" in lines[1] and "difference" in lines[1]
    assert "recommends_stated_taste" in lines[2]


def test_training_samples_one_per_group_with_rewards(tmp_path, tokenizer):
    problem = make_problem(load_config().problem)
    train, _ = split_personas(load_personas())
    personas = [p for p in train[:4] for _ in range(2)]
    episodes, _ = play(problem, personas, list(range(8)), warm_start_agent(0), tokenizer)
    for i, e in enumerate(episodes):
        e.group_id = i // 2
    writer = MetricsWriter(tmp_path)
    path = writer.write_samples(9, episodes)
    writer.close()
    assert path == tmp_path / "samples" / "iter_000010.md"
    text = path.read_text()
    assert text.startswith("# Iteration 10: 3 of the batch's 8 conversations")
    assert [f"group {g}," in text for g in range(4)] == [True, True, True, False]
    assert text.count("| turn | user | agent | reward |") == 3
    assert f"| {episodes[0].rewards[0]:+.2f} |" in text
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))  # the default logger
