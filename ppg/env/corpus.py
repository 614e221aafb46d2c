"""The warm-start corpus: scripted persona dialogues that teach the tiny model the conversation language.

The scripted agent here is deliberately *mediocre*: it asks, recommends (the revealed item or a random
one), states true or made-up facts, and varies register and length at random. Warm-started on it, the
tiny model talks on topic but has everything left to learn from rewards: which acts pay, when, and
for whom. The same dialogues train the tokenizer, so every word the problems use is in its vocabulary.
"""

from __future__ import annotations

import random

from ppg.env import dialogue
from ppg.env.conversation import Policy, run_conversations
from ppg.env.judges import RuleJudge
from ppg.env.partners import ScriptedPartner
from ppg.env.personas import load_personas
from ppg.env.problems import PROBLEMS, ProblemConfig
from ppg.env.vocabulary import CATEGORIES, FACT_SLOTS, ITEM_CATEGORY

_OPENERS = ("", "", "hey! ", "hello. ", "cool. ", "certainly. ")
_FILLERS = ("", "", "", " it is great fun on a quiet weekend with friends and family.", " i think so.")
_CHAT = ("i see.", "tell me more.", "that sounds nice.", "great!")


def scripted_agent(seed: int, truthful: float = 0.6) -> Policy:
    """A random but on-topic agent; ``truthful`` is how often it states its persona's real facts."""
    rng = random.Random(seed)

    def reply(conversations: list[list[dict]]) -> list[str]:
        return [
            _reply(rng, messages[0]["content"], messages[-1]["content"], truthful)
            for messages in conversations
        ]

    return reply


def _reply(rng: random.Random, system: str, user: str, truthful: float) -> str:
    me, heard = dialogue.parse(system), dialogue.parse(user)
    words = set(user.lower().replace("?", " ").replace(".", " ").split())
    body = _answer_about_self(rng, me, user, truthful) if heard.asks or "you" in words else None
    if body is None:
        topic = next((c for c, w in dialogue.TOPIC_WORDS.items() if w in words), rng.choice(list(CATEGORIES)))
        revealed = [i for i in heard.items if ITEM_CATEGORY[i] == topic] or heard.items
        roll = rng.random()
        if roll < 0.3:
            body = dialogue.ask(topic)
        elif roll < 0.6 and revealed:  # often enough to learn copying a revealed taste, not always
            body = dialogue.recommend(rng.choice(revealed))
        elif roll < 0.9:
            body = dialogue.recommend(rng.choice(CATEGORIES[topic]))
        else:
            body = rng.choice(_CHAT)
    return rng.choice(_OPENERS) + body + rng.choice(_FILLERS)


def _answer_about_self(rng: random.Random, me: dialogue.Acts, user: str, truthful: float) -> str | None:
    for slot, question in dialogue.SLOT_QUESTIONS.items():
        if question in user:
            true = me.facts.get(slot)
            value = true if true and rng.random() < truthful else rng.choice(FACT_SLOTS[slot])
            return dialogue.state_fact(slot, value)
    for category in CATEGORIES:
        if dialogue.taste_question(category) in user:
            mine = [i for i in me.likes if ITEM_CATEGORY[i] == category]
            if mine and rng.random() < truthful:
                return dialogue.state_taste(mine[0], True)
            return dialogue.state_taste(rng.choice(CATEGORIES[category]), rng.random() < 0.7)
    return None


def sft_conversations(num_conversations: int = 800, seed: int = 0) -> list[list[dict]]:
    """Scripted dialogues over every registered problem and the shipped personas (deterministic)."""
    rng = random.Random(seed)
    personas = load_personas()
    names = sorted(PROBLEMS)
    out: list[list[dict]] = []
    per_problem = -(-num_conversations // len(names))
    for k, name in enumerate(names):
        problem = PROBLEMS[name](ProblemConfig(name=name))
        chosen = [rng.choice(personas) for _ in range(per_problem)]
        seeds = [rng.randrange(2**31) for _ in range(per_problem)]
        convs = run_conversations(
            problem, chosen, seeds, scripted_agent(seed * 1000 + k), ScriptedPartner(), RuleJudge()
        )
        out += [c.messages for c in convs]
    rng.shuffle(out)
    return out[:num_conversations]
