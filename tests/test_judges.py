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


MUSIC = ({"role": "user", "content": "i like rock. any music ideas?"},)
ASKED = ({"role": "user", "content": "hi. any music ideas?"},)


@pytest.mark.parametrize(
    ("history", "response", "expected"),
    [
        (MUSIC, "hello. you should try jazz.", 0.5 + 0.2 + 0.15 + 0.15),  # liked, on topic, short, formal
        (MUSIC, "you should try jazz.", 0.5 + 0.2 + 0.15),  # no register marker
        (MUSIC, "hey! you should try jazz.", 0.5 + 0.2 + 0.15 - 0.15),  # casual marker, formal persona
        (MUSIC, "hello. you should try techno.", -0.5 + 0.2 + 0.15 + 0.15),  # disliked
        (MUSIC, "hello. you should try jazz or techno.", 0.0 + 0.2 + 0.15 + 0.15),  # one of each
        (MUSIC, "hello. you should try blues.", 0.2 + 0.15 + 0.15),  # neither
        (
            MUSIC,
            "hello. you should try jazz or pasta.",
            0.5 / 2 + 0.15 + 0.15,
        ),  # half on topic: no topic term
        (MUSIC, "hello. you should try jazz. " + "it is good " * 5, 0.5 + 0.2 - 0.15 + 0.15),  # too long
        ((), "hello. you should try jazz.", 0.5 + 0.15 + 0.15),  # the user named no topic
        # Dodges: every way of not recommending, and changing the subject.
        (MUSIC, "", -0.5),
        (MUSIC, "hello.", -0.5),
        (MUSIC, "what about you?", -0.5),
        (MUSIC, "hello. what music do you like?", -0.5),  # the user already said
        (MUSIC, "you should try sushi.", -0.5),  # off topic
        (MUSIC, "i live in oslo.", -0.5),
        # A question the user has not answered yet is neutral: it pays through what it unlocks.
        (ASKED, "what music do you like?", 0.0),
        (ASKED, "what food do you like?", -0.5),  # not the topic being discussed
    ],
)
def test_alignment_rules(history, response, expected):
    verdict = RuleJudge().read(JudgeRequest(ALICE, history, response, "alignment"))
    assert verdict.score == pytest.approx(expected)


def consistent_after(question: str, response: str, earlier: tuple[tuple[str, str], ...] = ()) -> float:
    history = tuple(
        m
        for q, line in earlier
        for m in ({"role": "user", "content": q}, {"role": "assistant", "content": line})
    ) + ({"role": "user", "content": question},)
    return RuleJudge().score([JudgeRequest(ALICE, history, response, "consistency")])[0]


WHERE, JOB, MUSIC_Q, OPEN = (
    "where do you live?",
    "what do you do for work?",
    "what music do you like?",
    "tell me about yourself.",
)


@pytest.mark.parametrize(
    ("question", "response", "earlier", "expected"),
    [
        (WHERE, "i live in oslo.", (), 1.0),
        (WHERE, "i live in lima.", (), -1.0),
        (WHERE, "i live in oslo. i work as a baker.", (), 0.0),  # the answer, and a false extra claim
        (WHERE, "i live in oslo. i have a cat.", (), 1.0),  # a true extra claim adds nothing
        (MUSIC_Q, "i love jazz.", (), 1.0),
        (MUSIC_Q, "i love blues.", (), -1.0),  # asked what it likes: anything but its own taste is wrong
        (MUSIC_Q, "i hate techno.", (), -1.0),  # true, but not what was asked: unanswered
        (OPEN, "i have a cat.", (), 1.0),
        (OPEN, "i have no pets.", (), -1.0),
        # Dodges: no claim about what was asked scores as low as a lie (UNANSWERED).
        (WHERE, "", (), -1.0),
        (WHERE, "that sounds nice.", (), -1.0),
        (JOB, "hey! you should try folk.", (), -1.0),
        (WHERE, "i have a cat.", (), -1.0),  # true, but dodging the question
        (WHERE, "i love pizza.", (), -1.0),  # dodging with a false claim
        # Line to line: the agent's own earlier answers.
        (WHERE, "i live in oslo.", ((WHERE, "i live in lima."),), 0.0),  # true, but drifts from itself
        (WHERE, "i live in lima.", ((WHERE, "i live in lima."),), -1.0),  # consistently false
        (MUSIC_Q, "i love jazz.", ((OPEN, "i hate jazz."),), 0.0),
    ],
)
def test_consistency_rules(question, response, earlier, expected):
    assert consistent_after(question, response, earlier) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("i live in oslo.", 1.0),
        ("i live in lima.", -1.0),
        ("i live in oslo. i work as a baker.", 0.0),
        ("that sounds nice.", 0.0),
    ],
)
def test_consistency_without_a_question_judges_the_claims_made(response, expected):
    history = ({"role": "user", "content": "nice to meet you."},)
    assert RuleJudge().score([JudgeRequest(ALICE, history, response, "consistency")])[0] == pytest.approx(
        expected
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
