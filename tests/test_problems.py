"""Each problem's reward structure, checked on scripted conversations with the rule judge."""

from __future__ import annotations

import pytest

from ppg.config import ProblemConfig
from ppg.env import dialogue
from ppg.env.conversation import run_conversations
from ppg.env.corpus import scripted_agent, sft_conversations
from ppg.env.judges import JudgeError, RuleJudge
from ppg.env.partners import ScriptedPartner
from ppg.env.personas import load_personas
from ppg.env.problems import PROBLEMS, Problem, ProblemError, UserMove, make_problem, register_problem

PERSONA = load_personas()[0]


def scripted_policy(lines_by_turn):
    """An agent that says the given line at each turn (a function of the user's last message)."""
    turn = {"t": 0}

    def policy(conversations):
        t = turn["t"]
        turn["t"] += 1
        return [lines_by_turn(t, messages[-1]["content"]) for messages in conversations]

    return policy


def run(name, lines_by_turn, **config):
    problem = make_problem(ProblemConfig(name=name, **config))
    [conv] = run_conversations(
        problem, [PERSONA], [7], scripted_policy(lines_by_turn), ScriptedPartner(), RuleJudge()
    )
    return problem, conv


def topic_of(user_line):
    return next(c for c, w in dialogue.TOPIC_WORDS.items() if w in user_line)


def test_registry_lists_both_families_and_documents_each_problem():
    assert {"myopic", "elicitation", "segmented", "persona_consistency"} <= set(PROBLEMS)
    assert {cls.family for cls in PROBLEMS.values()} == {"user_alignment", "persona_consistency"}
    for cls in PROBLEMS.values():
        assert cls.best_class and len(cls.why) > 40


def test_unknown_problem_names_the_known_ones():
    with pytest.raises(ProblemError, match="problem.name: unknown problem 'chess'; known problems: \\["):
        make_problem(ProblemConfig(name="chess"))


def test_myopic_rewards_the_revealed_taste_now_and_only_now():
    liked = set(PERSONA.preferences.values())
    # Recommend whatever the user just said they like: full taste reward every turn.
    _, good = run("myopic", lambda t, user: dialogue.recommend(dialogue.parse(user).items[0]))
    # Recommend the persona's dislike in the turn's topic.
    _, bad = run("myopic", lambda t, user: dialogue.recommend(PERSONA.dislikes[topic_of(user)]))
    assert all(dialogue.parse(m["content"]).items[0] in liked for m in good.messages if m["role"] == "user")
    assert all(r > 0.5 for r in good.rewards) and all(r < 0 for r in bad.rewards)
    # The user's lines do not depend on the agent's: the next turn's reward cannot either.
    assert [m for m in good.messages if m["role"] == "user"] == [
        m for m in bad.messages if m["role"] == "user"
    ]


def test_elicitation_rewards_a_recommendation_only_after_the_right_question():
    problem, _ = run("elicitation", lambda t, user: "")
    topic = problem.topics(7, 1)[0]
    liked = PERSONA.preferences[topic]
    other = next(c for c in PERSONA.preferences if c != topic)
    # Blind recommendation of the right item: nothing.
    _, blind = run("elicitation", lambda t, user: dialogue.recommend(liked))
    assert blind.rewards == [0.0, 0.0, 0.0, 0.0]
    # Ask, then recommend: the question earns 0, the recommendations after it earn reward.
    _, asked = run(
        "elicitation", lambda t, user: dialogue.ask(topic) if t == 0 else dialogue.recommend(liked)
    )
    assert asked.messages[3]["content"].startswith(f"i like {liked}.")  # the user revealed it when asked
    assert asked.rewards[0] == 0.0 and all(r > 0.5 for r in asked.rewards[1:])
    # Asking about the wrong topic does not unlock this one.
    _, wrong = run(
        "elicitation", lambda t, user: dialogue.ask(other) if t == 0 else dialogue.recommend(liked)
    )
    assert wrong.rewards == [0.0, 0.0, 0.0, 0.0]


def test_segmented_credit_stays_inside_each_segment():
    problem, _ = run("segmented", lambda t, user: "")
    assert problem.segment_ids() == [0, 0, 1, 1, 2, 2]
    topics = problem.topics(7, 3)

    def ask_then_recommend(t, user):
        topic = topics[problem.segment_ids()[t]]
        return (
            dialogue.ask(topic)
            if t == problem.segment_start(t)
            else dialogue.recommend(PERSONA.preferences[topic])
        )

    _, conv = run("segmented", ask_then_recommend)
    assert conv.segment_ids == [0, 0, 1, 1, 2, 2]
    assert [r > 0.5 for r in conv.rewards] == [False, True] * 3

    # An ask in segment 0 about segment 1's topic does not carry over the boundary.
    def ask_early(t, user):
        return dialogue.ask(topics[1]) if t == 1 else dialogue.recommend(PERSONA.preferences[topics[1]])

    _, early = run("segmented", ask_early)
    assert early.rewards[2] == 0.0 and early.rewards[3] == 0.0


def test_segment_boundaries_and_horizon_are_config_values():
    problem, conv = run("segmented", lambda t, user: "ok.", num_turns=5, segment_boundaries=[3])
    assert problem.segment_ids() == [0, 0, 0, 1, 1] and len(conv.rewards) == 5
    # With the problem's own horizon (6 turns), the problem checks the boundaries itself.
    with pytest.raises(ProblemError, match="problem.segment_boundaries \\[6\\] must lie in 1..5"):
        make_problem(ProblemConfig(name="segmented", segment_boundaries=[6]))


def test_reward_scale_multiplies_rewards():
    _, one = run("myopic", lambda t, user: dialogue.recommend(dialogue.parse(user).items[0]))
    _, ten = run(
        "myopic", lambda t, user: dialogue.recommend(dialogue.parse(user).items[0]), reward_scale=10.0
    )
    assert ten.rewards == pytest.approx([10 * r for r in one.rewards])


def test_persona_consistency_rewards_truth_and_punishes_drift():
    problem = make_problem(ProblemConfig(name="persona_consistency"))
    assert problem.num_turns >= 10
    assert all(v in problem.system_prompt(PERSONA) for v in PERSONA.facts.values() if v != "none")

    def truthful(t, user):
        for slot, q in dialogue.SLOT_QUESTIONS.items():
            if q in user:
                return dialogue.state_fact(slot, PERSONA.facts[slot])
        category = next(c for c in dialogue.TOPIC_WORDS if dialogue.taste_question(c) in user)
        return dialogue.state_taste(PERSONA.preferences[category], True)

    _, good = run("persona_consistency", truthful)
    assert len(good.rewards) == 10 and all(r == 1.0 for r in good.rewards)

    wrong_city = next(c for c in ("lisbon", "oslo") if c != PERSONA.facts["city"])
    script = iter(
        [dialogue.state_fact("city", wrong_city)] + [dialogue.state_fact("city", PERSONA.facts["city"])] * 9
    )
    _, drift = run("persona_consistency", lambda t, user: next(script))
    assert drift.rewards[0] == -1.0  # false to the persona
    assert drift.rewards[1] == 0.0  # true to the persona (+1) but contradicts its own first line (-1)


def test_same_seed_same_conversation_and_corpus_is_deterministic():
    problem = make_problem(ProblemConfig(name="elicitation"))
    personas = load_personas()[:8]
    a = run_conversations(
        problem, personas, list(range(8)), scripted_agent(3), ScriptedPartner(), RuleJudge()
    )
    b = run_conversations(
        problem, personas, list(range(8)), scripted_agent(3), ScriptedPartner(), RuleJudge()
    )
    assert [c.messages for c in a] == [c.messages for c in b] and [c.rewards for c in a] == [
        c.rewards for c in b
    ]
    assert sft_conversations(40, seed=1) == sft_conversations(40, seed=1)
    assert sft_conversations(40, seed=1) != sft_conversations(40, seed=2)


def test_a_new_problem_registers_in_a_few_lines():
    @register_problem
    class Echo(Problem):
        name, family, aspect, best_class, why = "echo_test", "user_alignment", "alignment", "greedy", "x" * 50

        def user_move(self, persona, t, seed):
            return UserMove(say="any music ideas?", goal="ask for music")

    try:
        _, conv = run("echo_test", lambda t, user: dialogue.recommend(PERSONA.preferences["music"]))
        assert len(conv.rewards) == Echo.default_turns and all(r > 0.5 for r in conv.rewards)
    finally:
        PROBLEMS.pop("echo_test")


def test_a_judge_that_returns_garbage_is_refused_not_zeroed():
    class NaNJudge:
        def score(self, requests):
            return [float("nan")] * len(requests)

    problem = make_problem(ProblemConfig(name="myopic"))
    with pytest.raises(JudgeError, match="finite"):
        run_conversations(problem, [PERSONA], [0], scripted_agent(0), ScriptedPartner(), NaNJudge())
