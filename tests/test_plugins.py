"""Plug-ins by import path: problem.name / problem.judge / problem.partner = pkg.module:attr.

The end-to-end test runs the real ``ppg train`` in a subprocess whose plug-in lives in a folder
outside the package, reachable only through PYTHONPATH: the rollout workers (other processes) must
import it themselves, and the run's rewards are the plug-in judge's, which no built-in judge gives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ppg
from ppg.cli import main
from ppg.config import ConfigError, load_config
from ppg.env.conversation import run_conversations
from ppg.env.factory import check_environment, make_environment
from ppg.env.judges import DODGE
from ppg.env.plugins import PluginError
from ppg.env.problems import ProblemError
from ppg.experiment.suite import SuiteError, load_suite
from ppg.learner.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]

FIXTURES = '''
from ppg.env.partners import ScriptedPartner
from ppg.env.problems import Problem, UserMove

MARK = "plugged in:"


class Plain(Problem):
    aspect = "alignment"
    default_turns = 2

    def user_move(self, persona, t, seed):
        return UserMove(say="any music ideas?", goal="ask for music ideas.")


class MarkerJudge:
    """0.125 when the user's last line is the plug-in partner's, else -0.75: the rewards show that
    both plug-ins ran (no built-in judge scores every reply 0.125)."""

    def score(self, requests):
        return [0.125 if r.history[-1]["content"].startswith(MARK) else -0.75 for r in requests]


class MarkedPartner:
    def __init__(self):
        self.scripted = ScriptedPartner()

    def reply(self, requests):
        return [f"{MARK} {line}" for line in self.scripted.reply(requests)]


def marked_partner():
    return MarkedPartner()


# --- broken on purpose -------------------------------------------------------------------------
def needs_an_argument(llm):
    return MarkerJudge()


def returns_nothing_useful():
    return object()


class NoScore:
    def judge(self, requests):
        return []


class NotAProblem:
    aspect = "alignment"


class NoUserMove(Problem):
    aspect = "alignment"


class BadAspect(Plain):
    aspect = "style"


CONSTANT = 0.5
'''


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    """A folder outside the package with the plug-ins above (and two modules that fail to import),
    on this process's sys.path."""
    folder = tmp_path_factory.mktemp("plugins")
    (folder / "ppg_test_plugins.py").write_text(FIXTURES)
    (folder / "ppg_test_broken_dep.py").write_text("import no_such_dependency_xyz\n")
    (folder / "ppg_test_raises.py").write_text("raise RuntimeError('boom at import')\n")
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))


def config(**problem):
    return load_config(None, [f"problem.{k}={v}" for k, v in problem.items()])


# --- plug-ins, resolved and checked without Ray -----------------------------------------------------


def test_the_shipped_example_plays_with_its_own_judge_and_partner(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "plugins"))
    c = config(name="my_problem:OneTopic", judge="my_problem:KeywordJudge", partner="my_problem:polite_user")
    assert not c.problem.uses_llm
    assert check_environment(c).num_turns == 3
    env = make_environment(c)
    persona = env.train_personas[0]

    def recommend_the_stated_taste(conversations):
        return [f"you should try {persona.preferences[env.problem.topics(7, 1)[0]]}." for _ in conversations]

    [good] = run_conversations(
        env.problem, [persona], [7], recommend_the_stated_taste, env.partner, env.judge
    )
    [silent] = run_conversations(
        env.problem, [persona], [7], lambda cs: ["ok."] * len(cs), env.partner, env.judge
    )
    assert good.rewards == [1.0, 1.0, 1.0] and silent.rewards == [DODGE] * 3
    assert all(m["content"].startswith("please, ") for m in good.messages if m["role"] == "user")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"judge": "nope"}, "problem.judge: unknown judge 'nope': use rule, embedding, llm, or your own"),
        ({"partner": "robot"}, "problem.partner: unknown partner 'robot': use scripted, llm"),
        ({"judge": "my mod:X"}, "problem.judge: 'my mod:X' is not an import path: write pkg.module:Name"),
        ({"name": "pkg.:X"}, "problem.name: 'pkg.:X' is not an import path"),
        ({"partner": "pkg:1x"}, "problem.partner: 'pkg:1x' is not an import path"),
    ],
)
def test_config_refuses_unknown_names_and_malformed_paths(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config(**overrides)


M = "ppg_test_plugins"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"name": "ppg_no_such_module:P"},
            "problem.name=ppg_no_such_module:P: no module named 'ppg_no_such_module'",
        ),
        (
            {"judge": "ppg_test_broken_dep:J"},
            "module 'ppg_test_broken_dep' was found but importing it failed",
        ),
        ({"partner": "ppg_test_raises:P"}, "importing module 'ppg_test_raises' raised RuntimeError: boom"),
        ({"name": f"{M}:Nope"}, f"problem.name={M}:Nope: '{M}' has no attribute 'Nope'"),
        ({"judge": f"{M}:MarkerJudge.nested"}, f"'{M}:MarkerJudge' has no attribute 'nested'"),
        ({"name": f"{M}:NotAProblem"}, "class NotAProblem is not a subclass of ppg.env.problems.Problem"),
        ({"name": f"{M}:CONSTANT"}, "a float is not a subclass of ppg.env.problems.Problem"),
        ({"name": f"{M}:NoUserMove"}, "NoUserMove does not define user_move"),
        (
            {"name": f"{M}:BadAspect"},
            "BadAspect.aspect is 'style'; set it to one of ['alignment', 'consistency']",
        ),
        ({"judge": f"{M}:NoScore"}, f"problem.judge={M}:NoScore: class NoScore has no method score()"),
        ({"partner": f"{M}:MarkerJudge"}, "class MarkerJudge has no method reply()"),
        (
            {"judge": f"{M}:needs_an_argument"},
            "ppg calls it without arguments, but missing a required argument",
        ),
        ({"judge": f"{M}:CONSTANT"}, "a float is not callable; give a class or a function"),
    ],
)
def test_bad_plugins_fail_naming_the_field_the_part_and_the_fix(plugin_dir, overrides, message):
    with pytest.raises(PluginError) as info:
        check_environment(config(**overrides))
    assert message in str(info.value), str(info.value)
    assert isinstance(info.value, ConfigError)  # the CLI exits 2 with the message


def test_missing_module_says_how_to_put_it_on_the_path(plugin_dir):
    with pytest.raises(PluginError, match="PYTHONPATH=my_plugins ppg train"):
        check_environment(config(judge="ppg_no_such_module:J"))
    with pytest.raises(ProblemError, match="known problems: .*or your own as pkg.module:Class"):
        check_environment(config(name="chess"))


def test_a_factory_whose_result_lacks_the_method_fails_when_built(plugin_dir):
    c = config(judge=f"{M}:returns_nothing_useful")
    check_environment(c)  # a function's result is only known once it is called
    with pytest.raises(
        PluginError,
        match=f"problem.judge={M}:returns_nothing_useful: what it returned \\(object\\) has no score",
    ):
        make_environment(c)


def test_ppg_train_refuses_a_bad_plugin_before_anything_starts(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["train", "problem.judge=ppg_no_such_module:J", f"run.output_dir={runs}"]) == 2
    assert "problem.judge=ppg_no_such_module:J: no module named" in capsys.readouterr().err
    assert not runs.exists(), "no run folder, no cluster: it failed first"


def test_suites_take_plugin_problems(plugin_dir, tmp_path):
    base = "name: t\nmethods: {greedy: {type: greedy}}\nseeds: [0]\n"
    path = tmp_path / "suite.yaml"
    path.write_text(
        base
        + f'problems: {{"{M}:Plain": {{target_reward: 0.1}}}}\nbase: {{problem.judge: "{M}:MarkerJudge"}}\n'
    )
    suite = load_suite(path)
    assert suite.config(f"{M}:Plain", "greedy", 0).problem.name == f"{M}:Plain"
    path.write_text(base + f'problems: {{"{M}:Nope": {{target_reward: 0.1}}}}\n')
    with pytest.raises(SuiteError, match=f"problems.{M}:Nope: problem.name={M}:Nope: '{M}' has no attribute"):
        load_suite(path)
    path.write_text(
        base + 'problems: {myopic: {target_reward: 0.1}}\nbase: {problem.partner: "ppg_no_such_module:P"}\n'
    )
    with pytest.raises(
        SuiteError, match="problem 'myopic' x method 'greedy': problem.partner=ppg_no_such_module:P"
    ):
        load_suite(path)


def test_ppg_problems_says_how_to_plug_in_your_own(capsys):
    assert main(["problems"]) == 0
    assert "your own: problem.name=pkg.module:Class" in capsys.readouterr().out


# --- end to end: the real command, the plug-in reachable only through PYTHONPATH --------------------

TINY = [
    "rollout.episodes_per_iteration=8",
    "rollout.group_size=4",
    "rollout.num_workers=1",
    "rollout.requests_per_worker=1",
    "rollout.max_tokens_per_turn=8",
    "run.iterations=2",
    "run.checkpoint_every=2",
    "run.sample_every=1",
    "run.final_eval_episodes=4",
]


@pytest.mark.slow
def test_ppg_train_plays_a_problem_judge_and_partner_from_outside_the_package(tmp_path):
    plugins, elsewhere = tmp_path / "plugins", tmp_path / "elsewhere"
    plugins.mkdir()
    elsewhere.mkdir()  # the command's folder, which Ray also puts on its workers' path: not the plug-in's
    (plugins / "outside_plugin.py").write_text(FIXTURES)
    package_root = str(Path(ppg.__file__).resolve().parents[1])  # the code under test, whatever is installed
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local cluster of its own
    env["PYTHONPATH"] = os.pathsep.join([str(plugins), package_root])
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("ppg")),
            "train",
            *TINY,
            f"run.output_dir={tmp_path / 'runs'}",
            "problem.name=outside_plugin:Plain",
            "problem.judge=outside_plugin:MarkerJudge",
            "problem.partner=outside_plugin:marked_partner",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    [run] = (tmp_path / "runs").iterdir()
    rows = read_metrics(run)
    assert [r["iteration"] for r in rows] == [0, 1]
    assert all(r["reward_mean"] == pytest.approx(0.125) for r in rows), rows  # the plug-in judge's
    assert all(r["episode_return_mean"] == pytest.approx(0.25) for r in rows)  # the plug-in problem's 2 turns
    assert "plugged in: any music ideas?" in (run / "samples" / "iter_000001.md").read_text()
    report = json.loads((run / "eval" / "report.json").read_text())  # evaluation's workers too
    played = report["problems"]["outside_plugin:Plain"]
    assert (
        played["checkpoint"]["reward_mean"] == pytest.approx(0.125)
        and played["judge"] == "outside_plugin:MarkerJudge"
    )
