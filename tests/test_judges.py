"""Judges on hand-made replies: the rule judge exactly, the LLM judge's refusal to guess."""

from __future__ import annotations

import pytest

from ppg.env import dialogue
from ppg.env.judges import REWARD_RANGE, JudgeError, JudgeRequest, LLMJudge, RuleJudge
from ppg.env.personas import Persona

ALICE = Persona(
    id="alice",
    name="alice",
    traits=("calm",),
    preferences={"music": "jazz", "food": "sushi"},
    dislikes={"music": "techno", "food": "pizza"},
    facts={"city": "oslo", "job": "nurse", "pet": "cat", "sibling": "none"},
    style={"brevity": "terse", "formality": "formal"},
)


def align(response: str, persona: Persona = ALICE) -> float:
    return RuleJudge().score([JudgeRequest(persona, (), response, "alignment")])[0]


def consistent(response: str, earlier: tuple[str, ...] = ()) -> float:
    history = tuple(
        m
        for line in earlier
        for m in ({"role": "user", "content": "q"}, {"role": "assistant", "content": line})
    )
    return RuleJudge().score([JudgeRequest(ALICE, history, response, "consistency")])[0]


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("hello. you should try jazz.", 0.5 + 0.15 + 0.15),  # liked, short, formal marker
        ("you should try jazz.", 0.5 + 0.15),  # no register marker
        ("hey! you should try jazz.", 0.5 + 0.15 - 0.15),  # casual marker for a formal persona
        ("hello. you should try techno.", -0.5 + 0.15 + 0.15),  # disliked
        ("hello. you should try jazz or techno.", 0.0 + 0.15 + 0.15),  # one liked, one disliked
        ("hello. you should try blues.", 0.15 + 0.15),  # neither
        ("hello. what music do you like?", 0.15 + 0.15),  # a question recommends nothing
        ("hello. you should try jazz. " + "it is good " * 5, 0.5 - 0.15 + 0.15),  # too long for 'terse'
        ("", -0.15),  # empty reply: nothing right, too short to count as a reply
    ],
)
def test_alignment_rules(response, expected):
    assert align(response) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("response", "earlier", "expected"),
    [
        ("i live in oslo.", (), 1.0),
        ("i live in lima.", (), -1.0),
        ("i live in oslo. i work as a baker.", (), 0.0),
        ("i have a cat. i am an only child.", (), 1.0),
        ("i have no pets.", (), -1.0),
        ("i love jazz.", (), 1.0),
        ("i love pizza.", (), -1.0),
        ("i hate pizza.", (), 1.0),
        ("i love blues.", (), 0.0),  # not in the persona either way
        ("that sounds nice.", (), 0.0),  # no claim, nothing to judge
        ("i live in oslo.", ("i live in lima.",), 0.0),  # true now, but drifts from its own line
        ("i live in lima.", ("i live in lima.",), -1.0),  # consistently false
        ("i hate jazz.", ("i love jazz.",), -1.0),  # false and a drift: clipped at -1
    ],
)
def test_consistency_rules(response, earlier, expected):
    assert consistent(response, earlier) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("user", "response", "topic"),
    [
        ("any music ideas?", "you should try jazz.", 1.0),
        ("any music ideas?", "you should try sushi.", -1.0),  # off topic (and neither liked nor disliked)
        ("any music ideas?", "you should try jazz or sushi.", 0.0),
        ("hello.", "you should try jazz.", 0.0),  # the user named no topic
    ],
)
def test_alignment_rewards_staying_on_the_asked_topic(user, response, topic):
    history = ({"role": "user", "content": user},)
    score = RuleJudge().score([JudgeRequest(ALICE, history, response, "alignment")])[0]
    assert score == pytest.approx(
        RuleJudge().score([JudgeRequest(ALICE, (), response, "alignment")])[0] + 0.2 * topic
    )


def test_rule_scores_stay_in_the_documented_range():
    lines = [
        "hello. you should try jazz.",
        "hey! you should try techno and pizza.",
        "i hate jazz. i live in lima.",
    ]
    for line in lines:
        for aspect in ("alignment", "consistency"):
            s = RuleJudge().score(
                [JudgeRequest(ALICE, ({"role": "assistant", "content": "i love jazz."},), line, aspect)]
            )[0]
            assert REWARD_RANGE[0] <= s <= REWARD_RANGE[1]


def test_parser_reads_acts():
    acts = dialogue.parse("Hello! What music do you like? You should try sushi. I live in Oslo.")
    assert (
        acts.asks == {"music"} and acts.items == ["sushi"] and acts.facts == {"city": "oslo"} and acts.formal
    )


class FakeAnswers:
    """Stands in for the LLM engine's *output only*, to test the judge's parsing; the real engine is
    exercised in tests/test_llm_actor.py."""

    def __init__(self, answers):
        self.answers = answers

    def choose(self, conversations, choices):
        return self.answers[: len(conversations)]


def test_llm_judge_maps_0_to_10_onto_the_reward_range():
    judge = LLMJudge(FakeAnswers(["0", "5", "10"]))
    requests = [JudgeRequest(ALICE, (), "hello. you should try jazz.", "alignment")] * 3
    assert judge.score(requests) == [-1.0, 0.0, 1.0]
    prompt = judge.prompt(requests[0])
    assert "jazz" in prompt[-1]["content"] and ALICE.name in prompt[-1]["content"]


@pytest.mark.parametrize("answer", ["", "great reply!", "11", "7 or 8"])
def test_llm_judge_refuses_unusable_answers_instead_of_scoring_zero(answer):
    judge = LLMJudge(FakeAnswers([answer]))
    with pytest.raises(JudgeError, match="no usable score"):
        judge.score([JudgeRequest(ALICE, (), "hi", "alignment")])
