"""The whole-conversation renderer that the rollout's incremental token trace is tested against.

Production never renders a finished conversation: ``ppg/rollout/trace.py`` builds each episode's tokens
turn by turn from what the engine sampled. Tests render the same conversation in one go through the
chat template (each assistant message = the rendering through it minus the prompt before it) and
check that both agree, and build episodes of scripted conversations without an engine.
"""

from __future__ import annotations

from ppg.env.conversation import Conversation
from ppg.episode import Episode, RenderError


def render_tokens(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool], list[int]]:
    """Token ids of the whole conversation, the agent mask, and each token's turn index.

    Each assistant message's tokens are the difference between the conversation rendered through
    that message and the prompt rendered up to it (with the generation header), so the header is
    context and the reply plus its end marker are the agent's.
    """
    ids: list[int] = []
    agent: list[bool] = []
    turn: list[int] = []
    t = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _template(tokenizer, messages[:i], add_generation_prompt=True)
        through = _template(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if prompt[: len(ids)] != ids or through[: len(prompt)] != prompt:
            raise RenderError(
                "the chat template is not prefix-stable (rendering a later turn changed earlier tokens); "
                "per-turn credit needs a template where each message appends tokens"
            )
        context = prompt[len(ids) :]
        reply = through[len(prompt) :]
        ids += context + reply
        agent += [False] * len(context) + [True] * len(reply)
        turn += [t] * (len(context) + len(reply))
        t += 1
    tail = _template(tokenizer, messages, add_generation_prompt=False)[len(ids) :]
    ids += tail
    agent += [False] * len(tail)
    turn += [max(t - 1, 0)] * len(tail)
    return ids, agent, turn


def _template(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    return list(out)


def episode_from_conversation(
    conversation: Conversation, tokenizer, problem: str, group_id: int, policy_version: int
) -> Episode:
    ids, agent, turn = render_tokens(tokenizer, conversation.messages)
    return Episode(
        problem,
        conversation.persona.id,
        group_id,
        policy_version,
        conversation.messages,
        list(conversation.rewards),
        list(conversation.segment_ids),
        ids,
        agent,
        turn,
    )
