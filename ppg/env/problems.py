"""Persona-alignment problems: same conversation machinery, different reward structures.

A problem says what the user does each turn (``UserMove``), what the agent is told (system prompt),
which judge aspect scores a reply, and which replies can earn reward at all (``gate``). The reward
structure decides which policy class should win; each problem documents why (``best_class``, ``why``).

Register a new problem with a few lines::

    @register_problem
    class SmallTalk(Problem):
        name, family, aspect, best_class = "small_talk", "user_alignment", "alignment", "greedy"
        why = "each reply is judged on its own"
        def user_move(self, persona, t, seed): return UserMove(say="how are you?", goal="chat")
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from ppg.config import ProblemConfig
from ppg.env import dialogue
from ppg.env.dialogue import Acts
from ppg.env.judges import Aspect
from ppg.env.personas import Persona
from ppg.env.vocabulary import CATEGORIES


class ProblemError(ValueError):
    """An unknown problem or settings a problem cannot run with."""


@dataclass(frozen=True)
class UserMove:
    """What the simulated user does at a turn, for a scripted partner (``say``) or an LLM one (``goal``)."""

    say: str
    goal: str
    reveal_on_ask: bool = False  # first answer the agent's question about a preference, if it asked


# The user's reply after the opening in the elicitation-style problems: answer, then ask for more.
FOLLOW_UP = UserMove(
    say="anything else?", goal="answer any question, then ask for more ideas.", reveal_on_ask=True
)


def recommends_what_was_asked(reply: Acts, earlier_replies: list[Acts]) -> float:
    """1 if the reply recommends something in a category that one of ``earlier_replies`` asked about."""
    asked = set().union(*(a.asks for a in earlier_replies))
    return 1.0 if dialogue.categories_of(reply.items) & asked else 0.0


PROBLEMS: dict[str, type[Problem]] = {}


def register_problem(cls: type[Problem]) -> type[Problem]:
    PROBLEMS[cls.name] = cls
    return cls


def make_problem(config: ProblemConfig) -> Problem:
    if config.name not in PROBLEMS:
        raise ProblemError(
            f"problem.name: unknown problem {config.name!r}; known problems: {sorted(PROBLEMS)}"
        )
    return PROBLEMS[config.name](config)


class Problem:
    name: ClassVar[str]
    family: ClassVar[str]  # "user_alignment" or "persona_consistency"
    aspect: ClassVar[Aspect]
    best_class: ClassVar[str]
    why: ClassVar[str]
    default_turns: ClassVar[int] = 4
    default_boundaries: ClassVar[tuple[int, ...]] = ()

    def __init__(self, config: ProblemConfig | None = None) -> None:
        config = config or ProblemConfig(name=self.name)
        self.num_turns = config.num_turns or self.default_turns
        if config.segment_boundaries is None:  # the problem's own, as far as the horizon reaches
            self.segment_boundaries = tuple(b for b in self.default_boundaries if b < self.num_turns)
        else:
            self.segment_boundaries = tuple(config.segment_boundaries)
        if any(not 0 < b < self.num_turns for b in self.segment_boundaries):
            raise ProblemError(
                f"problem.segment_boundaries {list(self.segment_boundaries)} must lie in 1..{self.num_turns - 1} "
                f"for {self.num_turns} turns (problem.num_turns)"
            )
        if list(self.segment_boundaries) != sorted(set(self.segment_boundaries)):
            raise ProblemError(
                f"problem.segment_boundaries {list(self.segment_boundaries)} must be strictly increasing"
            )
        self.reward_scale = config.reward_scale

    # --- what the problem defines ---

    def system_prompt(self, persona: Persona) -> str:
        return "you are a helpful assistant. suggest things the user will enjoy."

    def user_move(self, persona: Persona, t: int, seed: int) -> UserMove:
        """The user's move at turn t of the conversation seeded ``seed`` (same seed, same plan)."""
        raise NotImplementedError

    def gate(self, t: int, reply: Acts, earlier_replies: list[Acts]) -> float:
        """1 if this reply can earn reward at turn t, else 0 (delayed problems withhold it)."""
        return 1.0

    # --- shared ---

    def segment_ids(self) -> list[int]:
        return [sum(b <= t for b in self.segment_boundaries) for t in range(self.num_turns)]

    def segment_start(self, t: int) -> int:
        return max([0] + [b for b in self.segment_boundaries if b <= t])

    def topics(self, seed: int, n: int) -> list[str]:
        """n categories for a conversation, without repeats while there are fresh ones."""
        order = list(CATEGORIES)
        random.Random(seed).shuffle(order)
        return [order[i % len(order)] for i in range(n)]


@register_problem
class Myopic(Problem):
    name, family, aspect, best_class = "myopic", "user_alignment", "alignment", "greedy"
    why = (
        "the user states a taste and asks for ideas every turn, whatever the agent said before: each "
        "reward depends only on the current reply, so later rewards add noise and no signal, and greedy "
        "has the same expected gradient as full planning with the least variance"
    )

    def user_move(self, persona, t, seed):
        category = self.topics(seed, self.num_turns)[t]
        item = persona.preferences[category]
        return UserMove(
            say=f"{dialogue.reveal(item)} {dialogue.request_ideas(category)}",
            goal=f"say you like {item} and ask for {category} ideas.",
        )


@register_problem
class Elicitation(Problem):
    name, family, aspect, best_class = (
        "elicitation",
        "user_alignment",
        "alignment",
        "full (or k_step, K >= 2)",
    )
    why = (
        "the user asks for ideas but reveals a taste only when asked; a recommendation earns reward only "
        "in a category the agent asked about earlier. Asking pays nothing now, so greedy never learns to "
        "ask; full planning or K-step lookahead credits the question with the later reward"
    )

    def user_move(self, persona, t, seed):
        category = self.topics(seed, 1)[0]
        if t == 0:
            return UserMove(say=f"hi. {dialogue.request_ideas(category)}", goal=f"ask for {category} ideas.")
        return FOLLOW_UP

    def gate(self, t, reply, earlier_replies):
        return recommends_what_was_asked(reply, earlier_replies)


@register_problem
class Segmented(Problem):
    name, family, aspect, best_class = "segmented", "user_alignment", "alignment", "segment"
    why = (
        "the conversation moves through topics at known turns; within a topic the agent must ask before "
        "recommending, and nothing carries over a boundary. Rewards inside a segment depend only on "
        "actions inside it, so the segment class keeps all the signal and drops later segments' noise"
    )
    default_turns = 6
    default_boundaries = (2, 4)

    def user_move(self, persona, t, seed):
        topics = self.topics(seed, len(self.segment_boundaries) + 1)
        category = topics[self.segment_ids()[t]]
        if t == self.segment_start(t):
            return UserMove(
                say=f"let us talk about {category}. {dialogue.request_ideas(category)}",
                goal=f"change the topic to {category} and ask for ideas.",
            )
        return FOLLOW_UP

    def gate(self, t, reply, earlier_replies):
        return recommends_what_was_asked(reply, earlier_replies[self.segment_start(t) : t])


@register_problem
class PersonaConsistency(Problem):
    name, family, aspect, best_class = (
        "persona_consistency",
        "persona_consistency",
        "consistency",
        "greedy or k_step",
    )
    why = (
        "the agent plays an assigned persona (chit-chat partner, therapy patient or student) through a long "
        "dialogue; each reply is scored for agreeing with the persona and with its own earlier lines. "
        "Telling the truth now is also what keeps later lines consistent, so the immediate reward carries "
        "most of the signal, while 10+ turns make full planning's estimate noisy: short K-step or greedy"
    )
    default_turns = 10
    OPENERS = {"chitchat": "", "patient": "in this session, ", "student": "for our class, "}

    def system_prompt(self, persona):
        facts = " ".join(dialogue.state_fact(s, v) for s, v in persona.facts.items())
        tastes = " ".join(dialogue.state_taste(i, True) for i in persona.preferences.values())
        hates = " ".join(dialogue.state_taste(i, False) for i in persona.dislikes.values())
        return f"you are {persona.name}, a {persona.setting}. stay in character. {facts} {tastes} {hates}"

    def user_move(self, persona, t, seed):
        prompts = [dialogue.SLOT_QUESTIONS[s] for s in persona.facts] + [
            dialogue.taste_question(c) for c in CATEGORIES
        ]
        random.Random(seed).shuffle(prompts)
        question = prompts[t % len(prompts)]
        return UserMove(
            say=self.OPENERS[persona.setting] + question, goal=f"ask the other person: {question}"
        )
