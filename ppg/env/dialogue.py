"""The conversation language: what agents and users say, and how a line is read back into acts.

One small, closed language shared by the scripted partner (which writes it), the rule judge (which
reads it), and the tiny model's warm-start corpus (which teaches it). Real models speak freely; the
parser then simply finds fewer acts, and the embedding or LLM judges take over.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ppg.env.vocabulary import CATEGORIES, FACT_SLOTS, ITEM_CATEGORY

TOPIC_WORDS = {"music": "music", "food": "food", "hobby": "hobby", "books": "books", "travel": "travel"}

FORMAL_MARKERS = frozenset({"hello", "certainly", "kindly", "please", "would"})
CASUAL_MARKERS = frozenset({"hey", "cool", "yeah", "awesome"})

# --- Writing: agent lines -----------------------------------------------------------------------


def ask(category: str) -> str:
    return f"what {TOPIC_WORDS[category]} do you like?"


def recommend(item: str) -> str:
    return f"you should try {item}."


def state_fact(slot: str, value: str) -> str:
    if slot == "city":
        return f"i live in {value}."
    if slot == "job":
        return f"i work as a {value}."
    if slot == "pet":
        return "i have no pets." if value == "none" else f"i have a {value}."
    if slot == "sibling":
        return "i am an only child." if value == "none" else f"i have a {value}."
    raise KeyError(slot)


def state_taste(item: str, liked: bool) -> str:
    return f"i love {item}." if liked else f"i hate {item}."


# --- Writing: user lines ------------------------------------------------------------------------

SLOT_QUESTIONS = {
    "city": "where do you live?",
    "job": "what do you do for work?",
    "pet": "do you have any pets?",
    "sibling": "do you have siblings?",
}


def taste_question(category: str) -> str:
    return f"what {TOPIC_WORDS[category]} do you like?"


def request_ideas(category: str) -> str:
    return f"any {TOPIC_WORDS[category]} ideas?"


NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")


def new_topic(category: str, turns: int) -> str:
    """A segment's opening: the topic and how many turns it lasts (so an agent can plan inside it)."""
    unit = "turn" if turns == 1 else "turns"
    return f"let us talk about {TOPIC_WORDS[category]} for {NUMBER_WORDS[turns]} {unit}. {request_ideas(category)}"


OPEN_QUESTION = "tell me about yourself."
RECALL_PREFIX = "remind me, "


def reveal(item: str) -> str:
    return f"i like {item}."


# --- Reading: a line back into acts ------------------------------------------------------------

_WORD = re.compile(r"[a-z]+")
_SENTENCE = re.compile(r"[^.!?]*[.!?]?")
_TOPIC_TO_CATEGORY = {word: cat for cat, word in TOPIC_WORDS.items()}
_FACT_PATTERNS = {
    "city": re.compile(r"\bi live in (\w+)"),
    "job": re.compile(r"\bi (?:work as|am) an? (\w+)"),
    "pet": re.compile(r"\bi have (?:an? )?(\w+)"),
    "sibling": re.compile(r"\bi have (?:an? )?(\w+)"),
}
_LIKE = re.compile(r"\bi (?:love|like|enjoy) (\w+)")
_HATE = re.compile(r"\bi (?:hate|dislike) (\w+)")


@dataclass
class Acts:
    """What a line does: which topics it asks about, which items it puts forward, what it claims."""

    asks: set[str] = field(default_factory=set)  # categories asked about
    items: list[str] = field(default_factory=list)  # items mentioned outside questions
    facts: dict[str, str] = field(default_factory=dict)  # slot -> value claimed about oneself
    likes: set[str] = field(default_factory=set)
    hates: set[str] = field(default_factory=set)
    words: int = 0
    formal: bool = False
    casual: bool = False


def parse(text: str) -> Acts:
    text = text.lower()
    words = _WORD.findall(text)
    acts = Acts(
        words=len(words), formal=bool(FORMAL_MARKERS & set(words)), casual=bool(CASUAL_MARKERS & set(words))
    )
    for sentence in _SENTENCE.findall(text):
        tokens = _WORD.findall(sentence)
        if sentence.strip().endswith("?") and {"what", "which"} & set(tokens):
            acts.asks |= {_TOPIC_TO_CATEGORY[w] for w in tokens if w in _TOPIC_TO_CATEGORY}
            continue
        acts.items += [w for w in tokens if w in ITEM_CATEGORY]
    for slot, pattern in _FACT_PATTERNS.items():
        for value in pattern.findall(text):
            if value in FACT_SLOTS[slot] or (value == "no" and slot == "pet"):
                acts.facts[slot] = "none" if value == "no" else value
    if "only child" in text:
        acts.facts["sibling"] = "none"
    acts.likes = {w for w in _LIKE.findall(text) if w in ITEM_CATEGORY}
    acts.hates = {w for w in _HATE.findall(text) if w in ITEM_CATEGORY}
    return acts


def categories_of(items: list[str]) -> set[str]:
    return {ITEM_CATEGORY[i] for i in items}


# --- Reading the user's side: what is being talked about, what the user asked of the agent ------


def user_lines(history: tuple[dict, ...] | list[dict]) -> list[str]:
    return [m["content"].lower() for m in history if m["role"] == "user"]


def focus_topic(history: tuple[dict, ...] | list[dict]) -> str | None:
    """The category the user is talking about: the latest user line that names one (a topic word or a
    revealed taste), or None when the user never named one."""
    for line in reversed(user_lines(history)):
        words = set(_WORD.findall(line))
        named = [c for c, w in TOPIC_WORDS.items() if w in words]
        named += [ITEM_CATEGORY[i] for i in _LIKE.findall(line) if i in ITEM_CATEGORY]
        if named:
            return named[-1]
    return None


def revealed_tastes(history: tuple[dict, ...] | list[dict]) -> dict[str, str]:
    """category -> item for every taste the user has stated so far ("i like jazz.")."""
    return {
        ITEM_CATEGORY[i]: i for line in user_lines(history) for i in _LIKE.findall(line) if i in ITEM_CATEGORY
    }


def persona_question(line: str) -> str | None:
    """What a user line asks about the agent's persona: a fact slot ("city"), a taste ("taste:music"),
    "open" (tell me about yourself), or None (not a persona question)."""
    line = line.lower()
    for slot, question in SLOT_QUESTIONS.items():
        if question in line:
            return slot
    for category in CATEGORIES:
        if taste_question(category) in line:
            return f"taste:{category}"
    return "open" if OPEN_QUESTION in line else None


def last_user_line(history: tuple[dict, ...] | list[dict]) -> str:
    lines = user_lines(history)
    return lines[-1] if lines else ""


assert set(TOPIC_WORDS) == set(CATEGORIES)
