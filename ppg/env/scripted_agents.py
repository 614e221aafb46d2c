"""Scripted agents: the warm-start corpus' agent, a good agent, and the evasive ones a reward must beat.

They read a conversation the way the rule judge does (``ppg.env.dialogue``) and play the agent's side
of any problem, so every problem can be checked without a model: an evasive agent must score below
the warm start, and the warm start below the good agent (``tests/test_rewards.py``).

The warm-start agent is deliberately mediocre: each rewarded behaviour (recommend the stated taste,
ask before recommending, answer a persona question truthfully, stay on topic) happens at a low but
non-zero rate, so the tiny model SFT'd on its lines has something for RL to find and sharpen.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from ppg.env import dialogue
from ppg.env.vocabulary import CATEGORIES, FACT_SLOTS

Policy = Callable[[list[list[dict]]], list[str]]

OPENERS = ("", "", "hey! ", "hello. ", "cool. ", "certainly. ")
FILLERS = ("", "", "", " it is great fun on a quiet weekend with friends and family.", " i think so.")
SMALL_TALK = ("i see.", "tell me more.", "that sounds nice.", "great!", "hello.", "what about you?")


class WarmStartRates:
    """How often the warm-start agent does each thing (the rest of the time it dodges).

    Copying the user's stated taste, or the persona's fact from the system prompt, needs a copy
    circuit the ~1M-parameter model forms only if copies are frequent enough in its SFT data
    (measured, BENCHMARKS.md "Learning the job": copy_taste 0.25 left P(stated item) at chance,
    0.6 gave 0.51), so these two are the lowest rates at which the copy forms at all.
    """

    copy_taste = 0.5  # recommend the taste the user stated
    ask_first = 0.3  # ask the user's taste in the topic, when not stated yet
    guess_on_topic = 0.5  # otherwise: recommend a random item of the topic
    off_topic = 0.1  # otherwise: recommend a random item of any topic
    echo = 0.5  # otherwise: of the dodges, echo the stated taste without recommending it
    truthful = 0.5  # answer a persona question with the persona's own fact or taste
    repeat_self = 0.4  # asked again, repeat its own earlier answer (true or not)
    false_answer = 0.4  # answer a persona question with a random value


def warm_start_agent(seed: int, rates: WarmStartRates | None = None) -> Policy:
    rng, rates = random.Random(seed), rates or WarmStartRates()

    def reply(conversations: list[list[dict]]) -> list[str]:
        return [
            rng.choice(OPENERS) + _warm_body(rng, rates, messages) + rng.choice(FILLERS)
            for messages in conversations
        ]

    return reply


def good_agent() -> Policy:
    """Does what every judge term asks: recommends the stated taste, asks first when the topic lasts
    long enough for the answer to pay, answers persona questions truthfully and consistently."""

    def reply(conversations: list[list[dict]]) -> list[str]:
        return [_good_body(messages) for messages in conversations]

    return reply


EVASIONS: dict[str, Callable[[list[dict]], str]] = {
    "empty": lambda messages: "",
    "greeting": lambda messages: "hello.",
    "question_back": lambda messages: "what about you?",
    "repeat_the_question": lambda messages: _ask_focus_or(messages, "what do you like?"),
    "no_self_claims": lambda messages: "you should try folk.",
    "off_topic": lambda messages: dialogue.recommend(_off_topic_item(messages)),
}


def evasive_agent(kind: str) -> Policy:
    """Always evades the same way (``EVASIONS``): the degenerate optima a reward must not have."""
    say = EVASIONS[kind]

    def reply(conversations: list[list[dict]]) -> list[str]:
        return [say(messages) for messages in conversations]

    return reply


# --- what each agent says ------------------------------------------------------------------------


def _warm_body(rng: random.Random, rates: WarmStartRates, messages: list[dict]) -> str:
    history = messages[1:]
    question = dialogue.persona_question(dialogue.last_user_line(history))
    roll = rng.random()
    if question is not None:
        me = _persona_of(messages)
        earlier = _own_answer(history, question)
        if earlier is not None and roll < rates.repeat_self:
            return earlier
        roll = rng.random()
        if roll < rates.truthful:
            return _answer(question, me, rng)
        if roll < rates.truthful + rates.false_answer:
            return _answer(question, None, rng)
        return rng.choice([*SMALL_TALK, dialogue.recommend(rng.choice(_all_items()))])
    focus = dialogue.focus_topic(history)
    told = dialogue.revealed_tastes(history)
    topic = focus or rng.choice(list(CATEGORIES))
    if focus in told and roll < rates.copy_taste:
        return dialogue.recommend(told[focus])
    if focus not in told and roll < rates.ask_first:
        return dialogue.ask(topic)
    roll = rng.random()
    if roll < rates.guess_on_topic:
        return dialogue.recommend(rng.choice(CATEGORIES[topic]))
    if roll < rates.guess_on_topic + rates.off_topic:
        return dialogue.recommend(rng.choice(_all_items()))
    if focus in told and rng.random() < rates.echo:
        # A dodge, but one that copies the user's word: the model learns to copy here and RL can
        # find the copy that pays (recommending it).
        return f"oh, you like {told[focus]}."
    return rng.choice(SMALL_TALK)


def _good_body(messages: list[dict]) -> str:
    history = messages[1:]
    question = dialogue.persona_question(dialogue.last_user_line(history))
    if question is not None:
        return _answer(question, _persona_of(messages), random.Random(0))
    focus = dialogue.focus_topic(history)
    told = dialogue.revealed_tastes(history)
    if focus in told:
        return dialogue.recommend(told[focus])
    last = dialogue.last_user_line(history)
    one_turn_left = f"for {dialogue.NUMBER_WORDS[1]} turn." in last
    if focus is not None and not one_turn_left:
        return dialogue.ask(focus)
    return dialogue.recommend(CATEGORIES[focus or "music"][0])


def _answer(question: str, me: dialogue.Acts | None, rng: random.Random) -> str:
    """A claim answering ``question``: the persona's own (``me``) or, with ``me=None``, a random one."""
    if question == "open":
        question = rng.choice([*FACT_SLOTS, *(f"taste:{c}" for c in CATEGORIES)])
    if question.startswith("taste:"):
        category = question.removeprefix("taste:")
        mine = [i for i in (me.likes if me else ()) if dialogue.ITEM_CATEGORY[i] == category]
        return dialogue.state_taste(mine[0] if mine else rng.choice(CATEGORIES[category]), True)
    value = me.facts.get(question) if me else None
    return dialogue.state_fact(question, value or rng.choice(FACT_SLOTS[question]))


def _persona_of(messages: list[dict]) -> dialogue.Acts:
    """The agent's persona as its system prompt states it (facts and tastes)."""
    return dialogue.parse(messages[0]["content"] if messages and messages[0]["role"] == "system" else "")


def _own_answer(history: list[dict], question: str) -> str | None:
    """The claim the agent made when this question was asked before, restated; None if it made none."""
    for i, m in enumerate(history[:-1]):
        if m["role"] == "user" and dialogue.persona_question(m["content"]) == question != "open":
            said = dialogue.parse(history[i + 1]["content"])
            if question in said.facts:
                return dialogue.state_fact(question, said.facts[question])
            category = question.removeprefix("taste:")
            liked = [x for x in said.likes if dialogue.ITEM_CATEGORY[x] == category]
            if liked:
                return dialogue.state_taste(liked[0], True)
    return None


def _ask_focus_or(messages: list[dict], fallback: str) -> str:
    focus = dialogue.focus_topic(messages[1:])
    return dialogue.ask(focus) if focus else fallback


def _off_topic_item(messages: list[dict]) -> str:
    focus = dialogue.focus_topic(messages[1:])
    other = next(c for c in CATEGORIES if c != focus)
    return CATEGORIES[other][0]


def _all_items() -> list[str]:
    return [i for items in CATEGORIES.values() for i in items]
