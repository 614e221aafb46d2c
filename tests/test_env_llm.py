"""The LLM partner and LLM judge, and the embedding judge, with real models: the embedded tiny model on
vLLM (CPU) in a Ray actor, and all-MiniLM-L6-v2 from its PyPI wheel."""

from __future__ import annotations

import pytest

from ppg.config import ProblemConfig
from ppg.env.conversation import run_conversations
from ppg.env.judges import REWARD_RANGE, EmbeddingJudge, JudgeRequest, LLMJudge, RuleJudge
from ppg.env.partners import LLMPartner, ScriptedPartner
from ppg.env.personas import load_personas
from ppg.env.problems import make_problem
from ppg.env.scripted_agents import warm_start_agent
from ppg.models import resolve_model

PERSONAS = load_personas()[:3]


@pytest.fixture(scope="module")
def llm_actor(ray_cluster):
    from ppg.env.llm import RemoteChatLLM, start_chat_llm_actor

    actor = start_chat_llm_actor(resolve_model("embedded:tiny"), num_cpus=1)
    ray_cluster.get(actor.ready.remote())
    yield RemoteChatLLM(actor)
    ray_cluster.kill(actor)


@pytest.mark.slow
def test_llm_partner_plays_the_user_in_a_whole_conversation(llm_actor):
    problem = make_problem(ProblemConfig(name="elicitation"))
    conversations = run_conversations(
        problem, PERSONAS, [0, 1, 2], warm_start_agent(0), LLMPartner(llm_actor), RuleJudge()
    )
    for c in conversations:
        users = [m["content"] for m in c.messages if m["role"] == "user"]
        assert len(users) == problem.num_turns and all(isinstance(u, str) for u in users)
        assert len(c.rewards) == problem.num_turns
    assert any(
        u.strip() for c in conversations for u in (m["content"] for m in c.messages if m["role"] == "user")
    )


def test_llm_partner_prompt_carries_persona_and_goal_and_swaps_roles():
    from ppg.env.partners import PartnerRequest
    from ppg.env.problems import UserMove

    request = PartnerRequest(
        PERSONAS[0],
        UserMove(say="x", goal="ask for music ideas."),
        ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello."}),
    )
    prompt = LLMPartner.prompt(request)
    assert (
        PERSONAS[0].preferences["music"] in prompt[0]["content"]
        and "ask for music ideas." in prompt[0]["content"]
    )
    assert [m["role"] for m in prompt[1:]] == ["assistant", "user"]


@pytest.mark.slow
def test_a_sampling_llm_partner_answers_the_same_batch_the_same_way(llm_actor):
    """The partner samples with a seed drawn from its conversations' seeds and turn, so a call
    redone after its actor crashed, or a resumed run, gets exactly the replies it had."""
    import dataclasses

    from ppg.env.partners import PartnerRequest
    from ppg.env.problems import UserMove

    history = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello."})
    move = UserMove(say="x", goal="ask for music ideas.")
    requests = [PartnerRequest(p, move, history, seed=i, turn=1) for i, p in enumerate(PERSONAS[:4])]
    partner = LLMPartner(llm_actor, temperature=1.0)
    first = partner.reply(requests)
    assert partner.reply(requests) == first
    assert partner.reply([dataclasses.replace(r, turn=2) for r in requests]) != first


@pytest.mark.slow
def test_llm_judge_on_a_real_engine_scores_in_range(llm_actor):
    judge = LLMJudge(llm_actor)
    requests = [
        JudgeRequest(
            p, ({"role": "user", "content": "any music ideas?"},), "you should try jazz.", "alignment"
        )
        for p in PERSONAS
    ]
    scores = judge.score(requests)
    assert len(scores) == 3 and all(REWARD_RANGE[0] <= s <= REWARD_RANGE[1] for s in scores)
    assert all((s + 1) * 5 == round((s + 1) * 5) for s in scores)  # one of the 11 grades


def test_embedding_judge_prefers_liked_items_and_punishes_drift():
    persona = PERSONAS[0]
    judge = EmbeddingJudge()
    liked = " and ".join(list(persona.preferences.values())[:2])
    disliked = " and ".join(list(persona.dislikes.values())[:2])
    good, bad = judge.score(
        [
            JudgeRequest(persona, (), f"you should try {liked}.", "alignment"),
            JudgeRequest(persona, (), f"you should try {disliked}.", "alignment"),
        ]
    )
    assert good > bad
    truth = f"i live in {persona.facts['city']}."
    steady, drifted = judge.score(
        [
            JudgeRequest(persona, ({"role": "assistant", "content": truth},), truth, "consistency"),
            JudgeRequest(
                persona,
                ({"role": "assistant", "content": "i live in cairo. i hate everything."},),
                truth,
                "consistency",
            ),
        ]
    )
    assert steady > drifted
    for s in (good, bad, steady, drifted):
        assert REWARD_RANGE[0] <= s <= REWARD_RANGE[1]


def test_embedding_judge_runs_a_whole_problem():
    problem = make_problem(ProblemConfig(name="myopic"))
    conversations = run_conversations(
        problem, PERSONAS, [0, 1, 2], warm_start_agent(0), ScriptedPartner(), EmbeddingJudge()
    )
    assert all(len(c.rewards) == 4 for c in conversations)


@pytest.mark.slow
def test_environment_from_config_wires_llm_partner_and_judge(llm_actor):
    from ppg.config import load_config
    from ppg.env.factory import make_environment

    config = load_config(None, ["problem.name=segmented", "problem.partner=llm", "problem.judge=llm"])
    env = make_environment(config, llm=llm_actor)
    assert isinstance(env.partner, LLMPartner) and isinstance(env.judge, LLMJudge)
    [conversation] = run_conversations(
        env.problem, env.train_personas[:1], [0], warm_start_agent(0), env.partner, env.judge
    )
    assert len(conversation.rewards) == env.problem.num_turns
    assert conversation.segment_ids == env.problem.segment_ids(0)


def test_environment_from_config_defaults_and_held_out_personas():
    from ppg.config import load_config
    from ppg.env.factory import make_environment

    env = make_environment(load_config(None, ["problem.judge=embedding"]))
    assert isinstance(env.partner, ScriptedPartner) and isinstance(env.judge, EmbeddingJudge)
    assert env.train_personas and env.eval_personas
    assert not {p.id for p in env.train_personas} & {p.id for p in env.eval_personas}


def test_embedding_judge_reads_free_text_by_meaning_and_punishes_dodges():
    persona = PERSONAS[0]
    liked, city = persona.preferences["music"], persona.facts["city"]
    food = persona.preferences["food"]
    asked = ({"role": "user", "content": f"i like {liked}. any music ideas?"},)
    judge = EmbeddingJudge()
    free, hello, off = judge.read(
        [
            JudgeRequest(persona, asked, f"I think you would enjoy some {liked} records", "alignment"),
            JudgeRequest(persona, asked, "hello there, how are you today?", "alignment"),
            JudgeRequest(persona, asked, f"you should try {food}.", "alignment"),
        ]
    )
    assert free.kind == "recommend" and free.taste == 1.0 and free.score > 0.5
    assert (hello.kind, hello.score) == ("dodge", -0.5) and (off.kind, off.score) == ("off_topic", -0.5)
    where = ({"role": "user", "content": "where do you live?"},)
    answer, dodge = judge.read(
        [
            JudgeRequest(persona, where, f"I'm based in {city.title()}, actually.", "consistency"),
            JudgeRequest(persona, where, "let us talk about something else.", "consistency"),
        ]
    )
    assert answer.kind == "answer" and answer.truthful and answer.score == 1.0
    assert (dodge.kind, dodge.score) == ("dodge", -1.0)
