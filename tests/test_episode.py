"""Episodes rendered through the embedded model's chat template: exactly the agent's tokens are actions."""

from __future__ import annotations

import copy

import pytest
from reference_episodes import episode_from_conversation, render_tokens
from transformers import AutoTokenizer

from ppg.config import ProblemConfig
from ppg.env.conversation import run_conversations
from ppg.env.corpus import sft_conversations
from ppg.env.judges import RuleJudge
from ppg.env.partners import ScriptedPartner
from ppg.env.personas import load_personas
from ppg.env.problems import make_problem
from ppg.env.scripted_agents import warm_start_agent
from ppg.episode import RenderError, collate
from ppg.models import encode_conversation, resolve_model
from ppg.rollout.trace import TokenTrace


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("embedded:tiny"))


def test_agent_tokens_are_the_replies_and_their_end_markers(tokenizer):
    messages = [
        {"role": "system", "content": "you are a helpful assistant."},
        {"role": "user", "content": "any music ideas?"},
        {"role": "assistant", "content": "what music do you like?"},
        {"role": "user", "content": "i like jazz."},
        {"role": "assistant", "content": "you should try jazz."},
    ]
    ids, agent, turn = render_tokens(tokenizer, messages)
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    spans = [[i for i in range(len(ids)) if agent[i] and turn[i] == t] for t in (0, 1)]
    assert [tokenizer.decode([ids[i] for i in s]) for s in spans] == [
        "what music do you like?<|end|>",
        "you should try jazz.<|end|>",
    ]
    context = tokenizer.decode([i for i, a in zip(ids, agent, strict=True) if not a])
    assert "<|assistant|>" in context and "i like jazz." in context and "you should try" not in context
    assert all(spans[0][-1] < i for i in spans[1])


def test_generic_renderer_agrees_with_the_tiny_templates_own_encoder(tokenizer):
    for conversation in sft_conversations(30, seed=5):
        ids, agent, _ = render_tokens(tokenizer, conversation)
        want_ids, want_mask = encode_conversation(tokenizer, conversation)
        assert ids == want_ids and [int(a) for a in agent] == want_mask


def test_episodes_from_a_rollout_carry_rewards_segments_and_version(tokenizer):
    problem = make_problem(ProblemConfig(name="segmented"))
    personas = load_personas()[:4]
    conversations = run_conversations(
        problem, personas, [0, 1, 2, 3], warm_start_agent(0), ScriptedPartner(), RuleJudge()
    )
    episodes = [
        episode_from_conversation(c, tokenizer, problem.name, group_id=i // 2, policy_version=7)
        for i, c in enumerate(conversations)
    ]
    for seed, e, c in zip([0, 1, 2, 3], episodes, conversations, strict=True):
        assert e.rewards == c.rewards and e.segment_ids == problem.segment_ids(seed) and e.policy_version == 7
        assert max(e.token_turn) == problem.num_turns - 1 and sum(e.agent_mask) > 0
    assert len({tuple(e.segment_ids) for e in episodes}) > 1  # segments vary per conversation
    batch = collate(episodes, pad_id=tokenizer.pad_token_id)
    L = max(len(e.token_ids) for e in episodes)
    assert batch.token_ids.shape == (4, L) and batch.rewards.shape == (4, problem.num_turns)
    assert batch.segment_ids.tolist() == [problem.segment_ids(s) for s in range(4)]
    assert batch.group_ids.tolist() == [0, 0, 1, 1] and batch.valid.all()
    assert batch.agent_mask.sum() == sum(sum(e.agent_mask) for e in episodes)
    assert (batch.token_ids[~batch.attention_mask] == tokenizer.pad_token_id).all()


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    bad = copy.deepcopy(tokenizer)
    bad.chat_template = "{{ messages|length }}" + tokenizer.chat_template  # the header changes every turn
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello."},
    ]
    trace = TokenTrace()  # the rollout's trace, which builds every episode turn by turn
    trace.add_context(bad, bad.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True))
    with pytest.raises(RenderError, match="prefix-stable"):
        trace.add_context(
            bad, bad.apply_chat_template(messages[:3], tokenize=False, add_generation_prompt=True)
        )
    with pytest.raises(RenderError, match="prefix-stable"):
        render_tokens(bad, messages)  # and the reference renderer the trace is tested against
