"""``ppg experiment``: suite validation, the gradient statistics behind the selector (against exact
autograd answers and closed-form moments), the report's statistics, and a real resumable grid run."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest

from ppg.config import PPGConfig, load_config
from ppg.experiment.behaviour_table import behaviour_markdown, behaviour_summary
from ppg.experiment.report import episodes_to_target, interval, paired_test, pooled_markdown, pooled_vs_full
from ppg.experiment.suite import ProblemEntry, Suite, SuiteError, cell_dir, config_defaults, load_suite
from ppg.objectives import FullPlanning, Greedy, KStep

ROOT = Path(__file__).resolve().parents[1]


# ---- suites -------------------------------------------------------------------------------------
def write(tmp_path, text: str) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return path


BASE = """
name: t
methods: {full: {type: full}, greedy: {type: greedy}}
seeds: [0]
"""


def test_shipped_suites_load_and_every_cell_is_a_valid_config():
    for path in sorted((ROOT / "experiments").glob("*.yaml")):
        suite = load_suite(path)
        assert suite.cells(), path
    paper = load_suite(ROOT / "experiments" / "paper.yaml")
    assert ("segmented", "segment", 0) in paper.cells() and ("myopic", "segment", 0) not in paper.cells()
    assert len(paper.problems) >= 5 and len(paper.seeds) >= 5
    config = paper.config("segmented", "k2", 2)
    assert (config.objective.policy_class, config.run.seed, config.problem.name) == (
        KStep(k=2),
        2,
        "segmented",
    )
    ppo = paper.config("myopic", "ppo", 0)
    assert ppo.learner.algorithm == "ppo" and ppo.objective.policy_class == FullPlanning()
    assert paper.methods["offline"].offline and "offline" not in paper.selector_candidates("myopic")
    assert paper.rows_for("myopic")[0] == "initial" and paper.rows_for("myopic")[-1] == "selector"
    selector = paper.selector_config("myopic", "greedy", 3)
    assert selector.run.seed != 3 and selector.objective.policy_class == Greedy()


def test_a_suite_may_add_to_a_folder_but_not_change_what_ran(tmp_path):
    suite = load_suite(write(tmp_path, BASE + "problems: {myopic: {target_reward: 0.1}}\n"))
    recorded = suite.model_dump(mode="json")
    more = suite.model_copy(update={"seeds": [0, 1]})
    assert more.extends(recorded) == []
    changed = Suite.model_validate({**recorded, "base": {"run.iterations": 3}})
    assert changed.extends(recorded) == ["base"]
    other = Suite.model_validate({**recorded, "methods": {**recorded["methods"], "greedy": {"type": "full"}}})
    assert other.extends(recorded) == ["methods.greedy"]
    # a problem's method list may gain methods (new rows), not lose them or change anything else
    listed = Suite.model_validate(
        {**recorded, "problems": {"myopic": {"target_reward": 0.1, "methods": ["full"]}}}
    )
    grown = listed.model_copy(
        update={"problems": {"myopic": ProblemEntry(target_reward=0.1, methods=["full", "greedy"])}}
    )
    assert grown.extends(listed.model_dump(mode="json")) == []
    assert listed.extends(grown.model_dump(mode="json")) == ["problems.myopic"]
    retargeted = grown.model_copy(
        update={"problems": {"myopic": ProblemEntry(target_reward=0.2, methods=["full", "greedy"])}}
    )
    assert retargeted.extends(grown.model_dump(mode="json")) == ["problems.myopic"]
    assert listed.extends(recorded) == ["problems.myopic"]  # all methods -> a subset
    # a selector field added to the code since is its default in an older record; a changed one clashes
    picky = Suite.model_validate({**recorded, "selector": {"pilot_episodes": 16}})
    older = {**picky.model_dump(mode="json"), "selector": {"pilot_episodes": 16, "reselect_every": None}}
    assert picky.extends(older) == []
    grows = Suite.model_validate({**recorded, "selector": {"pilot_episodes": 16, "max_pilot_episodes": 64}})
    assert grows.extends(older) == ["selector"]


def test_a_changed_code_default_is_a_clash_until_the_suite_pins_the_old_value(tmp_path):
    """Cells of one table must not mix two code versions' settings: the folder records the code's
    defaults when its first cells ran; a later default change needs the old value in ``base``."""
    suite = load_suite(write(tmp_path, BASE + "problems: {myopic: {target_reward: 0.1}}\n"))
    then = config_defaults()
    recorded = {**suite.model_dump(mode="json"), "defaults": then}
    assert suite.extends(recorded, then) == []
    was = then["learner.max_staleness"]
    now = {**then, "learner.max_staleness": was + 1, "run.new_setting": True}  # a changed and a new default
    assert suite.extends(recorded, now) == ["base.learner.max_staleness"]
    pinned = Suite.model_validate(
        {**suite.model_dump(mode="json"), "base": {**suite.base, "learner.max_staleness": was}}
    )
    assert pinned.extends(recorded, now) == []
    assert was == PPGConfig().learner.max_staleness and then["objective.gamma"] == PPGConfig().objective.gamma


@pytest.mark.parametrize(
    "text, message",
    [
        (BASE + "problems: {myopic: {}}\n", "exactly one of target_reward and target_gain"),
        (BASE + "problems: {myopic: {target_reward: 0.1, methods: [k9]}}\n", "unknown methods ['k9']"),
        (
            BASE.replace("greedy: {type", "initial: {type") + "problems: {myopic: {target_reward: 0.1}}\n",
            "initial",
        ),
        (
            BASE.replace(
                "greedy: {type: greedy}", "p: {policy_class: {type: full}, overrides: {learner.algorithm: x}}"
            )
            + "problems: {myopic: {target_reward: 0.1}}\n",
            "learner.algorithm",
        ),
        (BASE + "problems: {myopic: {target_gain: 0.1}}\n", "needs the selector"),
        (BASE + "problems: {myopic: {target_reward: 0.1}}\nextra: 1\n", "extra"),
        (
            BASE.replace("seeds: [0]", "seeds: [1, 1]") + "problems: {myopic: {target_reward: 0.1}}\n",
            "distinct",
        ),
        (
            BASE
            + "problems: {myopic: {target_reward: 0.1}}\n".replace(
                "0.1}", "0.1, overrides: {rollout.group_size: 0}}"
            ),
            "rollout.group_size",
        ),
        (BASE + "problems: {nosuch: {target_reward: 0.1}}\n", "unknown problem"),
        (
            BASE
            + "problems: {myopic: {target_reward: 0.1}}\nselector: {pilot_episodes: 64, max_pilot_episodes: 32}\n",
            "selector.max_pilot_episodes .32. must be between pilot_episodes .64.",
        ),
        ("name: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_suites_name_the_field(tmp_path, text, message):
    with pytest.raises(SuiteError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_suite(write(tmp_path, text))


def test_missing_suite_file(tmp_path):
    with pytest.raises(SuiteError, match="does not exist"):
        load_suite(tmp_path / "nope.yaml")


# ---- report statistics ----------------------------------------------------------------------------
def test_interval_and_episodes_to_target():
    mean, half = interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-6)
    assert math.isnan(interval([5.0])[1])
    # the smoothed (3-iteration) reward first reaches 0.5 at the 4th iteration
    assert episodes_to_target([8, 16, 24, 32, 40], [0.0, 0.9, 0.0, 0.6, 0.9], 0.5) == 32
    assert episodes_to_target([8, 16, 24], [0.0, 0.1, 0.2], 0.5) is None


def test_paired_test_over_seeds():
    """Differences 1, 2, 3 over three seeds: mean 2, sd 1, t = 2 sqrt(3) with 2 degrees of freedom,
    whose two-sided p-value is 1 - t / sqrt(2 + t^2) (closed form for df = 2)."""
    a, b = {0: 1.0, 1: 3.0, 2: 5.0, 9: 7.0}, {0: 0.0, 1: 1.0, 2: 2.0}
    test = paired_test(a, b)
    t = 2 * math.sqrt(3)
    assert test["n"] == 3 and test["diff"] == 2.0
    assert test["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
    assert test["ci95"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert paired_test({0: 1.0, 1: 2.0}, {0: 0.0, 1: 1.0})["p"] == 0.0  # identical gains: certain
    assert math.isnan(paired_test({0: 1.0}, {0: 0.0})["p"])  # one seed: no test


def test_pooled_comparison_pairs_every_problem_and_seed_with_full_planning():
    """Each row against full planning over the (problem, seed) pairs both finished: differences
    +1, +2, +3 (two problems) give mean 2 with the t-interval of three values; PPO, full returns
    but a different optimiser, is a row of its own; a row with one pair has no test."""
    suite = Suite.model_validate(
        {
            "name": "t",
            "methods": {
                "full": {"type": "full"},
                "greedy": {"type": "greedy"},
                "ppo": {"policy_class": {"type": "full"}, "overrides": {"learner.algorithm": "ppo"}},
            },
            "problems": {"myopic": {"target_reward": 0.5}, "elicitation": {"target_reward": 0.5}},
            "seeds": [0, 1],
        }
    )
    heldout = {
        ("myopic", "full"): {0: 0.0, 1: 0.0},
        ("myopic", "greedy"): {0: 1.0, 1: 2.0},
        ("elicitation", "full"): {0: 1.0, 1: 5.0},  # seed 1 has no greedy run: not paired
        ("elicitation", "greedy"): {0: 4.0},
        ("myopic", "ppo"): {0: -1.0},
    }
    (greedy,) = pooled_vs_full(suite, heldout)
    assert greedy["class"] == "greedy" and greedy["versus"] == "full"
    assert (greedy["problems"], greedy["pairs"], greedy["wins"]) == (2, 3, 3)
    assert greedy["diff"] == 2.0 and greedy["ci95"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert "| greedy | full | 2 | 3 | +2.000 [" in pooled_markdown([greedy]) and "| 3/3 |" in pooled_markdown(
        [greedy]
    )


def test_behaviour_table_averages_each_rate_over_the_seeds_that_have_it(tmp_path):
    """What the agents do, read from the cells' held-out evaluations: a rate one seed lacks (nothing
    to count there) is averaged over the others; an unfinished cell (no done.json) is not read."""
    suite = Suite.model_validate(
        {
            "name": "t",
            "methods": {"greedy": {"type": "greedy"}},
            "problems": {"myopic": {"target_reward": 0.5}},
            "seeds": [0, 1, 2],
        }
    )
    cells = {
        ("initial", 0): {"evasive": 0.4, "asks_before_recommending": 0.5, "reply_words": 7.0},
        ("initial", 1): {"evasive": 0.2, "reply_words": 9.0},
        ("greedy", 0): {"evasive": 0.0, "asks_before_recommending": 0.0, "reply_words": 4.0},
        ("greedy", 1): {"evasive": 0.1, "asks_before_recommending": 0.25, "reply_words": 5.0},
        ("greedy", 2): {"evasive": 0.9, "reply_words": 50.0},  # unfinished: not read
    }
    for (row, seed), behaviour in cells.items():
        run = cell_dir(tmp_path, "myopic", row, seed)
        run.mkdir(parents=True)
        (run / "heldout.json").write_text(json.dumps({"reward_mean": 0.0, "behaviour": behaviour}))
        if seed < 2:
            (run / "done.json").write_text("{}")
    summary = {r["class"]: r for r in behaviour_summary(suite, tmp_path)}
    assert summary["initial"]["seeds"] == 2 and summary["greedy"]["seeds"] == 2
    assert summary["initial"]["evasive"] == pytest.approx(0.3)
    assert summary["initial"]["asks_before_recommending"] == pytest.approx(0.5)  # one seed had it
    assert summary["greedy"]["asks_before_recommending"] == pytest.approx(0.125)
    assert summary["greedy"]["reply_words"] == pytest.approx(4.5)
    table = behaviour_markdown(list(summary.values()))
    assert (
        "| myopic: what the agents do (held-out) | evasive | asks before recommending | reply words |"
        in table
    )
    assert (
        "| initial (n=2) | 0.30 | 0.50 | 8.0 |" in table and "| greedy (n=2) | 0.05 | 0.12 | 4.5 |" in table
    )


# ---- a real grid, interrupted and resumed -----------------------------------------------------------
@pytest.mark.slow
def test_grid_runs_reports_and_resumes_exactly(ray_cluster, tmp_path):
    """Every row of a small grid: the initial policy, two classes, the PPO and offline baselines and
    the selector's own run, each scored on the same held-out conversations; then an interrupted cell
    resumes exactly, a finished one is not run again, and a suite may add seeds but not change base."""
    from ppg.experiment.runner import run_suite
    from ppg.experiment.suite import cell_dir, offline_data_path
    from ppg.learner.metrics import read_metrics

    suite = Suite.model_validate(
        {
            "name": "t",
            "base": {
                "run.iterations": 2,
                "run.checkpoint_every": 1,
                "run.keep_last": 2,
                "rollout.episodes_per_iteration": 8,
                "rollout.max_tokens_per_turn": 8,
                "problem.num_turns": 2,
            },
            "methods": {
                "full": {"type": "full"},
                "greedy": {"type": "greedy"},
                "ppo": {"policy_class": {"type": "full"}, "overrides": {"learner.algorithm": "ppo"}},
                "offline": {"policy_class": {"type": "full"}, "offline": True},
            },
            "problems": {"myopic": {"target_gain": 0.01}},
            "seeds": [0],
            "eval_episodes": 8,
            # every pilot grows once (no pilot of 8 reaches a signal to noise of 1e9): 8 + 8 episodes
            "selector": {
                "pilot_episodes": 8,
                "reselect_every": 1,
                "max_pilot_episodes": 16,
                "min_signal_to_noise": 1e9,
            },
        }
    )
    out = run_suite(suite, tmp_path / "grid")
    pilot = json.loads((out / "pilots" / "myopic-seed0.json").read_text())
    assert pilot["selected"] in ("full", "greedy") and pilot["episodes"] == 16 and pilot["rounds"] == 2
    assert set(pilot["classes"]) == {"full", "greedy"} and pilot["classes"]["full"]["bias_sq"] == 0.0
    assert pilot["folds"] == 8 and 0.0 <= pilot["pick_agreement"] <= 1.0, "how far to trust the pick"
    assert "full_signal_to_noise" in pilot
    for name in (
        "results.csv",
        "results.md",
        "selector.csv",
        "behaviour.csv",
        "reward_curves.png",
        "heldout.png",
    ):
        assert (out / name).stat().st_size > 0, name
    scores = {}
    for row in ("initial", "full", "greedy", "ppo", "offline", "selector"):
        heldout = json.loads((cell_dir(out, "myopic", row, 0) / "heldout.json").read_text())
        assert heldout["episodes"] == 8 and len(heldout["per_episode"]) == 8, row
        scores[row] = heldout
    # the same held-out conversations for every row: same personas, in the same order
    personas = {r: [x["persona_id"] for x in h["samples"]] for r, h in scores.items()}
    assert len({tuple(p) for p in personas.values()}) == 1
    assert scores["initial"]["policy_version"] == 0 and scores["full"]["policy_version"] == 2
    assert read_metrics(cell_dir(out, "myopic", "ppo", 0))[-1]["ppo_clip_fraction"] >= 0
    assert offline_data_path(out, "myopic", 0).is_file()  # 2 x 8 logged episodes of the initial policy
    # the selector re-picked at its own policy after iteration 1, on fresh pilot conversations, and
    # trained iteration 2 with that pick: one run, continued exactly (versions 0 -> 1 -> 2)
    phases = json.loads((out / "pilots" / "myopic-seed0-selector.json").read_text())["phases"]
    assert [p["from_iteration"] for p in phases] == [0, 1] and phases[0]["selected"] == pilot["selected"]
    assert all(p["episodes"] == 16 and set(p["scores"]) == {"full", "greedy"} for p in phases)
    chosen = cell_dir(out, "myopic", "selector", 0)
    assert [r["policy_version"] for r in read_metrics(chosen)] == [1, 2]
    assert load_config(chosen / "config.yaml").objective.policy_class.type == phases[1]["selected"]
    assert scores["selector"]["policy_version"] == 2
    table = (out / "results.md").read_text()
    assert "| myopic | " in table and "initial" in table and "selector" in table
    trust = f"{pilot['full_signal_to_noise']:.2f}; {round(pilot['pick_agreement'] * 8)}/8"
    shown = f"| {phases[0]['selected']}>{phases[1]['selected']} | {trust} | 32 |"
    assert shown in table, "picks, the first pick's signal to noise and fold agreement, pilot cost"
    from ppg.experiment.runner import code_version

    assert json.loads((chosen / "done.json").read_text())["code"] == code_version()
    assert f"Code of the cells: {code_version()} (6 cells)." in table  # initial, 4 methods, selector
    assert "| myopic: what the agents do (held-out) |" in table and "| selector (n=1) |" in table
    rows = {r["class"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert {"heldout_reward", "heldout_ci95", "paired_diff", "paired_p", "compared_with"} <= set(rows["full"])
    assert float(rows["full"]["heldout_reward"]) == pytest.approx(scores["full"]["reward_mean"])

    # interrupt the greedy cell after its first iteration: drop done.json, the last checkpoint, its metrics
    cell = cell_dir(out, "myopic", "greedy", 0)
    before = read_metrics(cell)
    (cell / "done.json").unlink()
    shutil.rmtree(cell / "checkpoints" / "iter_000002")
    lines = (cell / "metrics.jsonl").read_text().splitlines()
    (cell / "metrics.jsonl").write_text(lines[0] + "\n")
    finished = cell_dir(out, "myopic", "full", 0) / "done.json"
    stamp = finished.stat().st_mtime_ns
    run_suite(suite, out)
    assert finished.stat().st_mtime_ns == stamp, "a finished cell was run again"
    after = read_metrics(cell)
    assert [r["batch_fingerprint"] for r in after] == [r["batch_fingerprint"] for r in before]
    assert after[-1]["reward_mean"] == before[-1]["reward_mean"]

    changed = suite.model_copy(update={"base": {**suite.base, "run.iterations": 3}})
    with pytest.raises(SuiteError, match="different suite"):
        run_suite(changed, out)
