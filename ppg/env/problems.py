"""Persona-alignment problems: same conversation machinery, different reward structures.

A problem says what the user does each turn (``UserMove``), what the agent is told (system prompt),
which judge aspect scores a reply, and which replies can earn reward at all (``gate``). The reward
structure decides which policy class should win; each problem documents why (``best_class``, ``why``).

A problem of your own needs no registration: ``problem.name=pkg.module:Class`` names a ``Problem``
subclass by import path, and every process imports it itself (``ppg.env.plugins``). It must set
``aspect`` ("alignment" or "consistency": what the judge scores) and define ``user_move``; it may
override ``system_prompt``, ``gate``, ``boundaries``, ``default_turns``, ``default_boundaries``, and
set ``family``, ``best_class``, ``why`` for people reading it. Inside the package, register it::

    @register_problem
    class SmallTalk(Problem):
        name, family, aspect, best_class = "small_talk", "user_alignment", "alignment", "greedy"
        why = "each reply is judged on its own"
        def user_move(self, persona, t, seed): return UserMove(say="how are you?", goal="chat")
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar, get_args

from ppg.config import ProblemConfig, is_import_path
from ppg.env import dialogue
from ppg.env.dialogue import Acts
from ppg.env.judges import Aspect
from ppg.env.personas import Persona
from ppg.env.plugins import PluginError, import_object
from ppg.env.vocabulary import CATEGORIES


class ProblemError(ValueError):
    """An unknown problem or settings a problem cannot run with."""


@dataclass(frozen=True)
class UserMove:
    """What the simulated user does at a turn, for a scripted partner (``say``) or an LLM one (``goal``)."""

    say: str
    goal: str
    reveal: str | None = None  # if the agent just asked the user's taste in this category, say it first


def follow_up(category: str) -> UserMove:
    """The user's turn after the opening in ask-first problems: answer a question about this topic's
    taste (only this topic's, so nothing asked here pays in another topic), then ask for more."""
    return UserMove(
        say="anything else?",
        goal=f"if asked what {category} you like, say it; then ask for more ideas.",
        reveal=category,
    )


PROBLEMS: dict[str, type[Problem]] = {}


def register_problem(cls: type[Problem]) -> type[Problem]:
    PROBLEMS[cls.name] = cls
    return cls


def problem_class(name: str) -> type[Problem]:
    """The class ``problem.name`` names: a registered problem, or a plug-in ``pkg.module:Class``
    imported here (in whichever process asks) and checked to be a usable ``Problem``."""
    if not is_import_path(name):
        if name not in PROBLEMS:
            raise ProblemError(
                f"problem.name: unknown problem {name!r}; known problems: {sorted(PROBLEMS)}, "
                "or your own as pkg.module:Class"
            )
        return PROBLEMS[name]
    cls = import_object("problem.name", name)
    if not (isinstance(cls, type) and issubclass(cls, Problem)):
        what = f"class {cls.__name__}" if isinstance(cls, type) else f"a {type(cls).__name__}"
        raise PluginError(
            f"problem.name={name}: {what} is not a subclass of ppg.env.problems.Problem; "
            "name a class that derives from it (see its docstring)"
        )
    aspects = get_args(Aspect)
    if getattr(cls, "aspect", None) not in aspects:
        raise PluginError(
            f"problem.name={name}: {cls.__name__}.aspect is {getattr(cls, 'aspect', None)!r}; set it to "
            f"one of {list(aspects)} (what the judge scores a reply on)"
        )
    if cls.user_move is Problem.user_move:
        raise PluginError(
            f"problem.name={name}: {cls.__name__} does not define user_move(persona, t, seed) -> UserMove, "
            "what the user does at each turn"
        )
    return cls


def make_problem(config: ProblemConfig) -> Problem:
    return problem_class(config.name)(config)


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
        self.fixed_segments = config.segment_boundaries is not None
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
        """1 if this reply can earn reward at turn t, else 0 (a problem may withhold reward)."""
        return 1.0

    def boundaries(self, seed: int) -> tuple[int, ...]:
        """Turns where a new segment starts in the conversation seeded ``seed`` (fixed by default)."""
        return self.segment_boundaries

    # --- shared ---

    def segment_ids(self, seed: int = 0) -> list[int]:
        starts = self.boundaries(seed)
        return [sum(b <= t for b in starts) for t in range(self.num_turns)]

    def segment_start(self, t: int, seed: int = 0) -> int:
        return max([0] + [b for b in self.boundaries(seed) if b <= t])

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
        "the user asks for ideas in one topic but states a taste only when asked. Asking pays 0 now; a "
        "blind guess on topic pays ~0.35; the user's own taste pays ~1 at every later turn. Greedy learns "
        "to guess; full planning or K-step lookahead credits the question with the later rewards"
    )

    def user_move(self, persona, t, seed):
        category = self.topics(seed, 1)[0]
        if t == 0:
            return UserMove(say=f"hi. {dialogue.request_ideas(category)}", goal=f"ask for {category} ideas.")
        return follow_up(category)


@register_problem
class Segmented(Problem):
    name, family, aspect, best_class = "segmented", "user_alignment", "alignment", "segment"
    why = (
        "the conversation moves through topics in segments of 1-4 turns (lengths vary per conversation "
        "and are announced); within a topic asking first pays in the topic's later turns, and nothing "
        "carries over a boundary. The segment class credits exactly the rest of the segment; no fixed K "
        "fits every segment (too short: the question loses its reward; too long: noise from the next topic)"
    )
    default_turns = 8
    segment_lengths: ClassVar[tuple[int, ...]] = (1, 2, 3, 4)

    def boundaries(self, seed):
        if self.fixed_segments:
            return self.segment_boundaries
        rng = random.Random(seed * 7919 + 1)
        while True:  # at most one segment per topic, so no taste asked in one topic pays in another
            starts, t = [], 0
            while True:
                t += rng.choice(self.segment_lengths)
                if t >= self.num_turns:
                    break
                starts.append(t)
            if len(starts) < len(CATEGORIES):
                return tuple(starts)

    def user_move(self, persona, t, seed):
        starts = self.boundaries(seed)
        segment = self.segment_ids(seed)[t]
        category = self.topics(seed, len(starts) + 1)[segment]
        if t == self.segment_start(t, seed):
            ends = [*starts, self.num_turns]
            length = ends[segment] - t
            return UserMove(
                say=dialogue.new_topic(category, length),
                goal=f"change the topic to {category} for {length} turns and ask for ideas.",
            )
        return follow_up(category)


class PersonaDomain(Problem):
    """The agent plays an assigned persona; the partner asks about it (Abdulhai et al. 2025's
    consistency benchmark, in this project's closed language). Each turn is a persona question: a
    fact, a taste, "tell me about yourself", or ``recall_every`` turns a question asked before
    ("remind me, ..."), so lines are judged against the persona (prompt-to-line), against the
    agent's own earlier lines (line-to-line) and as answers (Q&A). Dodging a question is punished.
    """

    family, aspect = "persona_consistency", "consistency"
    best_class = "k_step (K = 2-3)"
    setting: ClassVar[str]  # the role the agent plays
    role: ClassVar[str]  # how the system prompt names it
    opener: ClassVar[str]  # how the partner frames its questions
    targets: ClassVar[tuple[str, ...]]  # what the partner asks about: slots, "taste:<c>", "open"
    recall_every: ClassVar[int] = 3  # >= 2
    default_turns = 10

    def domain_of(self, persona: Persona) -> type[PersonaDomain]:
        """The domain whose role, questions and framing this persona's conversation uses."""
        return type(self)

    def system_prompt(self, persona):
        facts = " ".join(dialogue.state_fact(s, v) for s, v in persona.facts.items())
        tastes = " ".join(dialogue.state_taste(i, True) for i in persona.preferences.values())
        hates = " ".join(dialogue.state_taste(i, False) for i in persona.dislikes.values())
        role = self.domain_of(persona).role
        return f"you are {persona.name}, {role}. stay in character. {facts} {tastes} {hates}"

    def plan(self, persona: Persona, seed: int) -> list[tuple[str, bool]]:
        """(target, is a recall) per turn: fresh questions in a seeded order, every ``recall_every``-th
        turn one asked before again."""
        domain = self.domain_of(persona)
        rng = random.Random(seed)
        fresh = list(domain.targets)
        rng.shuffle(fresh)
        plan: list[tuple[str, bool]] = []
        for t in range(self.num_turns):
            if plan and t % domain.recall_every == domain.recall_every - 1:
                plan.append((rng.choice([target for target, _ in plan]), True))
            else:
                plan.append((fresh[sum(not recall for _, recall in plan) % len(fresh)], False))
        return plan

    def user_move(self, persona, t, seed):
        target, recall = self.plan(persona, seed)[t]
        question = _question(target)
        prefix = dialogue.RECALL_PREFIX if recall else self.domain_of(persona).opener
        return UserMove(say=prefix + question, goal=f"ask the other person: {question}")


def _question(target: str) -> str:
    if target == "open":
        return dialogue.OPEN_QUESTION
    if target.startswith("taste:"):
        return dialogue.taste_question(target.removeprefix("taste:"))
    return dialogue.SLOT_QUESTIONS[target]


_SLOTS = tuple(dialogue.SLOT_QUESTIONS)
_TASTES = tuple(f"taste:{c}" for c in CATEGORIES)


@register_problem
class PersonaChitchat(PersonaDomain):
    name, setting, role, opener = "persona_chitchat", "chitchat", "chatting with a new friend", ""
    why = (
        "open chit-chat: the partner asks about facts, tastes and 'tell me about yourself', and every "
        "third turn asks something again. A false answer now costs the next recall too (repeat the lie "
        "or contradict yourself), a few turns ahead; 10 turns make full planning's estimate noisy"
    )
    targets = (*_SLOTS, *_TASTES, "open")


@register_problem
class PersonaTherapy(PersonaDomain):
    name, setting, role, opener = "persona_therapy", "patient", "a patient in therapy", "in this session, "
    why = (
        "therapy: the therapist asks about the patient's life (home, work, family, pets, what helps "
        "them relax) and comes back to it often (every second turn is a recall), over 12 turns: "
        "consistency with earlier lines matters most here, so lookahead of a few turns pays"
    )
    targets = (*_SLOTS, "taste:music", "taste:hobby", "open")
    recall_every = 2
    default_turns = 12


@register_problem
class PersonaEducation(PersonaDomain):
    name, setting, role, opener = "persona_education", "student", "a student in class", "for our class, "
    why = (
        "education: the teacher asks the student about reading, hobbies, travel and home, rarely "
        "coming back (every fourth turn): mostly independent questions, so short lookahead or greedy"
    )
    targets = ("taste:books", "taste:hobby", "taste:travel", "taste:music", "city", "job", "open")
    recall_every = 4
    best_class = "k_step (K = 2) or greedy"


@register_problem
class PersonaConsistency(PersonaDomain):
    name = "persona_consistency"
    why = (
        "the three domains mixed: each persona's own setting (chitchat, patient, student) picks the "
        "domain's role, questions and framing; see persona_chitchat, persona_therapy, persona_education"
    )
    setting, role, opener, targets = "mixed", "", "", ()
    DOMAINS: ClassVar[dict[str, type[PersonaDomain]]] = {
        "chitchat": PersonaChitchat,
        "patient": PersonaTherapy,
        "student": PersonaEducation,
    }

    def domain_of(self, persona):
        return self.DOMAINS[persona.setting]
