"""Each problem's reward structure, checked on scripted conversations with the rule judge."""

from __future__ import annotations

import pytest

from ppg.config import ProblemConfig
from ppg.env import dialogue
from ppg.env.conversation import run_conversations
from ppg.env.corpus import sft_conversations
from ppg.env.judges import JudgeError, RuleJudge
from ppg.env.partners import ScriptedPartner
from ppg.env.personas import load_personas
from ppg.env.problems import PROBLEMS, Problem, ProblemError, UserMove, make_problem, register_problem
from ppg.env.scripted_agents import warm_start_agent

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


def test_elicitation_pays_a_question_through_the_recommendations_it_makes_possible():
    problem, _ = run("elicitation", lambda t, user: "")
    topic = problem.topics(7, 1)[0]
    liked = PERSONA.preferences[topic]
    guess = next(i for i in dialogue.CATEGORIES[topic] if i not in (liked, PERSONA.dislikes[topic]))
    # A blind guess on topic earns the on-topic and style terms only.
    _, blind = run("elicitation", lambda t, user: dialogue.recommend(guess))
    assert blind.rewards == pytest.approx([0.35] * 4)
    # Ask, then recommend: the question earns 0 now, every recommendation after it the user's taste.
    _, asked = run(
        "elicitation", lambda t, user: dialogue.ask(topic) if t == 0 else dialogue.recommend(liked)
    )
    assert asked.messages[3]["content"].startswith(f"i like {liked}.")  # the user revealed it when asked
    assert asked.rewards == pytest.approx([0.0, 0.85, 0.85, 0.85])
    assert sum(asked.rewards) > sum(blind.rewards) + 0.8  # planning beats greedy guessing
    # Asking about another topic is changing the subject: not answered, and a dodge.
    other = next(c for c in PERSONA.preferences if c != topic)
    _, wrong = run(
        "elicitation", lambda t, user: dialogue.ask(other) if t == 0 else dialogue.recommend(liked)
    )
    assert not wrong.messages[3]["content"].startswith("i like")
    assert wrong.rewards[0] == -0.5
    # Asking again once told is a dodge too.
    _, again = run("elicitation", lambda t, user: dialogue.ask(topic))
    assert again.rewards == [0.0, -0.5, -0.5, -0.5]


def test_segmented_segments_vary_per_conversation_and_credit_stays_inside_each():
    problem = make_problem(ProblemConfig(name="segmented"))
    layouts = {tuple(problem.segment_ids(seed)) for seed in range(40)}
    assert len(layouts) > 10  # unequal segments, different per conversation
    for seed in range(40):
        starts = problem.boundaries(seed)
        lengths = [b - a for a, b in zip((0, *starts), (*starts, problem.num_turns), strict=True)]
        assert all(1 <= n <= 4 for n in lengths) and len(lengths) <= len(dialogue.CATEGORIES)
    assert any(
        1 in [b - a for a, b in zip((0, *problem.boundaries(s)), (*problem.boundaries(s), 8), strict=True)]
        for s in range(40)
    )

    seed = 7
    ids = problem.segment_ids(seed)
    topics = problem.topics(seed, max(ids) + 1)

    def ask_then_recommend(t, user):
        topic = topics[ids[t]]
        if t == problem.segment_start(t, seed):
            return dialogue.ask(topic)
        return dialogue.recommend(PERSONA.preferences[topic])

    _, conv = run("segmented", ask_then_recommend)
    assert conv.segment_ids == ids
    starts = {problem.segment_start(t, seed) for t in range(problem.num_turns)}
    assert [r for t, r in enumerate(conv.rewards) if t in starts] == [0.0] * len(starts)
    assert all(r == pytest.approx(0.85) for t, r in enumerate(conv.rewards) if t not in starts)
    # The opening line announces the segment's topic and length.
    first = problem.user_move(PERSONA, 0, seed).say
    assert first.startswith(f"let us talk about {topics[0]} for ")

    # A question about the next segment's topic is off topic now, and not answered there either.
    def ask_ahead(t, user):
        topic = topics[min(ids[t] + 1, max(ids))]
        return dialogue.ask(topic) if t == 0 else dialogue.recommend(PERSONA.preferences[topic])

    _, ahead = run("segmented", ask_ahead)
    assert ahead.rewards[0] == -0.5 and "i like" not in ahead.messages[3]["content"]


def test_segment_boundaries_and_horizon_are_config_values():
    problem, conv = run("segmented", lambda t, user: "ok.", num_turns=5, segment_boundaries=[3])
    assert problem.segment_ids(0) == problem.segment_ids(1) == [0, 0, 0, 1, 1] and len(conv.rewards) == 5
    with pytest.raises(ProblemError, match="problem.segment_boundaries \\[8\\] must lie in 1..7"):
        make_problem(ProblemConfig(name="segmented", segment_boundaries=[8]))


def test_reward_scale_multiplies_rewards():
    _, one = run("myopic", lambda t, user: dialogue.recommend(dialogue.parse(user).items[0]))
    _, ten = run(
        "myopic", lambda t, user: dialogue.recommend(dialogue.parse(user).items[0]), reward_scale=10.0
    )
    assert ten.rewards == pytest.approx([10 * r for r in one.rewards])


def truthful(t, user):
    question = dialogue.persona_question(user)
    if question in dialogue.SLOT_QUESTIONS:
        return dialogue.state_fact(question, PERSONA.facts[question])
    category = question.removeprefix("taste:") if question != "open" else "music"
    return dialogue.state_taste(PERSONA.preferences[category], True)


@pytest.mark.parametrize(
    "name", ["persona_chitchat", "persona_therapy", "persona_education", "persona_consistency"]
)
def test_persona_domains_ask_about_the_persona_and_reward_truth(name):
    problem = make_problem(ProblemConfig(name=name))
    assert problem.num_turns >= 10
    assert all(v in problem.system_prompt(PERSONA) for v in PERSONA.facts.values() if v != "none")
    _, good = run(name, truthful)
    questions = [dialogue.persona_question(m["content"]) for m in good.messages if m["role"] == "user"]
    assert None not in questions  # every turn asks about the persona
    recalls = [
        m["content"] for m in good.messages if m["role"] == "user" and m["content"].startswith("remind me")
    ]
    assert recalls  # some questions come back: line-to-line consistency is tested in every domain
    assert len(good.rewards) == problem.num_turns and all(r == 1.0 for r in good.rewards)
    # Dodging every question is punished, not neutral.
    _, dodge = run(name, lambda t, user: "you should try folk.")
    assert all(r == -1.0 for r in dodge.rewards)


def test_the_domains_differ_in_role_questions_and_recall_rate():
    domains = [
        make_problem(ProblemConfig(name=n))
        for n in ("persona_chitchat", "persona_therapy", "persona_education")
    ]
    assert len({p.system_prompt(PERSONA) for p in domains}) == 3
    recall_share = [sum(recall for _, recall in p.plan(PERSONA, 3)) / p.num_turns for p in domains]
    assert recall_share[1] > recall_share[0] > recall_share[2]  # therapy comes back most, education least
    assert "in this session" in domains[1].user_move(PERSONA, 0, 3).say
    assert "for our class" in domains[2].user_move(PERSONA, 0, 3).say


def test_persona_consistency_punishes_drift_and_lies():
    problem = make_problem(ProblemConfig(name="persona_chitchat"))
    # A conversation where the city is asked, then asked again ("remind me, ...").
    seed = next(
        s for s in range(100) if [t for t, r in problem.plan(PERSONA, s) if t == "city"] == ["city"] * 2
    )
    [first, again] = [t for t, (target, _) in enumerate(problem.plan(PERSONA, seed)) if target == "city"]
    wrong_city = next(c for c in ("lisbon", "oslo") if c != PERSONA.facts["city"])

    def lie_then_truth(t, user):
        if t == first:
            return dialogue.state_fact("city", wrong_city)
        return truthful(t, user)

    conv = run_conversations(
        problem, [PERSONA], [seed], scripted_policy(lie_then_truth), ScriptedPartner(), RuleJudge()
    )[0]
    assert conv.rewards[first] == -1.0  # false to the persona
    assert conv.rewards[again] == 0.0  # true to the persona (+1) but contradicts its own line (-1)
    assert all(r == 1.0 for t, r in enumerate(conv.rewards) if t not in (first, again))


def test_same_seed_same_conversation_and_corpus_is_deterministic():
    problem = make_problem(ProblemConfig(name="elicitation"))
    personas = load_personas()[:8]
    a = run_conversations(
        problem, personas, list(range(8)), warm_start_agent(3), ScriptedPartner(), RuleJudge()
    )
    b = run_conversations(
        problem, personas, list(range(8)), warm_start_agent(3), ScriptedPartner(), RuleJudge()
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
        run_conversations(problem, [PERSONA], [0], warm_start_agent(0), ScriptedPartner(), NaNJudge())
