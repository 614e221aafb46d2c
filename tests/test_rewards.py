"""No degenerate optimum: in every problem, under the rule and the embedding judge, every scripted way
of evading (saying nothing, greeting, asking back, changing the subject, making no self-claims)
scores clearly below the warm-start agent, and the warm start clearly below a good agent."""

from __future__ import annotations

import statistics

import pytest

from ppg.config import ProblemConfig
from ppg.env.conversation import run_conversations
from ppg.env.judges import EmbeddingJudge, RuleJudge
from ppg.env.partners import ScriptedPartner
from ppg.env.personas import load_personas, split_personas
from ppg.env.problems import PROBLEMS, make_problem
from ppg.env.scripted_agents import EVASIONS, evasive_agent, good_agent, warm_start_agent

TRAIN, HELD_OUT = split_personas(load_personas())
MARGIN = 0.1  # "clearly below": at least this much reward per turn


@pytest.fixture(scope="module")
def judges():
    return {"rule": RuleJudge(), "embedding": EmbeddingJudge()}


def mean_reward(problem, policy, judge, n=24) -> float:
    personas = [HELD_OUT[i % len(HELD_OUT)] for i in range(n)]
    convs = run_conversations(problem, personas, list(range(n)), policy, ScriptedPartner(), judge)
    return statistics.mean(r for c in convs for r in c.rewards)


@pytest.mark.parametrize("judge_name", ["rule", "embedding"])
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_evasive_below_warm_start_below_good(judges, name, judge_name):
    judge, problem = judges[judge_name], make_problem(ProblemConfig(name=name))
    good = mean_reward(problem, good_agent(), judge)
    warm = mean_reward(problem, warm_start_agent(0), judge)
    evasive = {kind: mean_reward(problem, evasive_agent(kind), judge) for kind in EVASIONS}
    assert warm < good - 0.2, (warm, good)
    for kind, score in evasive.items():
        assert score < warm - MARGIN, f"{kind} scores {score:.3f}, warm start {warm:.3f}"


def test_the_warm_start_shows_every_rewarded_behaviour_now_and_then():
    """Non-zero rates with room above them, so RL has something to find and sharpen (the rule
    judge's reading; WarmStartRates says why the copy rates are not lower)."""
    from ppg.env.behaviour import behaviour_rates

    judge = RuleJudge()
    for name, key in [
        ("myopic", "recommends_stated_taste"),
        ("elicitation", "asks_before_recommending"),
        ("persona_chitchat", "answers_truthfully"),
    ]:
        problem = make_problem(ProblemConfig(name=name))
        convs = run_conversations(
            problem, TRAIN[:32], list(range(32)), warm_start_agent(0), ScriptedPartner(), judge
        )
        rate = behaviour_rates(problem, convs)[key]
        assert 0.05 < rate < 0.8, (name, key, rate)  # present, with room to improve
