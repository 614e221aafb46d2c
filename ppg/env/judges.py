"""Judges: a per-turn reward for one agent response, in [-1, 1].

Two aspects are judged (``JudgeRequest.aspect``):
  * ``alignment``   - does the reply fit the *user's* persona (tastes, dislikes, style)?
  * ``consistency`` - does the reply stay in the *agent's assigned* persona and agree with its own
                      earlier lines (persona drift lowers it)?

Every judge returns scores in [-1, 1]: -1 clearly wrong (a disliked item, a contradicted fact),
0 neutral or nothing to judge, +1 clearly right. Problems scale and gate them (``ppg.env.problems``).
A judge that cannot score raises ``JudgeError``; it never returns a silent 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from ppg.env import dialogue
from ppg.env.personas import Persona

Aspect = Literal["alignment", "consistency"]
REWARD_RANGE = (-1.0, 1.0)


class JudgeError(RuntimeError):
    """A judge could not produce a score (model failure, unparseable output)."""


@dataclass(frozen=True)
class JudgeRequest:
    persona: Persona  # the user's (alignment) or the agent's own (consistency)
    history: tuple[dict, ...]  # messages before the response, without the system prompt
    response: str
    aspect: Aspect


class Judge(Protocol):
    def score(self, requests: list[JudgeRequest]) -> list[float]: ...


def _topic(request: JudgeRequest, acts: dialogue.Acts) -> float:
    """Is the reply's recommendation about what the user just asked for? (0 if nothing to compare)."""
    last_user = next((m["content"] for m in reversed(request.history) if m["role"] == "user"), "")
    asked = {
        c for c, w in dialogue.TOPIC_WORDS.items() if w in last_user.lower().split() or f"{w}?" in last_user
    }
    if not asked or not acts.items:
        return 0.0
    on_topic = [dialogue.categories_of([i]) <= asked for i in acts.items]
    return 1.0 if all(on_topic) else -1.0 if not any(on_topic) else 0.0


class RuleJudge:
    """Exact rules over the parsed acts of the reply: fast, deterministic, and transparent.

    alignment   = 0.5 * taste + 0.2 * topic + 0.15 * length + 0.15 * formality
      taste     = mean over items put forward of +1 (liked) / -1 (disliked) / 0; 0 if none
      topic     = +1 every item is in the category the user's last line names, -1 none is, else 0
      length    = +1 within the persona's max_words, else -1
      formality = +1 uses a marker of the persona's register, -1 of the other one, else 0
    consistency = mean over the reply's self-claims of (+1 persona-true / -1 persona-false / 0)
                  minus 1 for each claim that contradicts the agent's own earlier lines; clipped.
    """

    def score(self, requests: list[JudgeRequest]) -> list[float]:
        return [self.alignment(r) if r.aspect == "alignment" else self.consistency(r) for r in requests]

    @staticmethod
    def alignment(request: JudgeRequest) -> float:
        persona, acts = request.persona, dialogue.parse(request.response)
        liked, disliked = set(persona.preferences.values()), set(persona.dislikes.values())
        tastes = [(item in liked) - (item in disliked) for item in acts.items]
        taste = sum(tastes) / len(tastes) if tastes else 0.0
        length = 1.0 if 0 < acts.words <= persona.style.max_words else -1.0
        formal = persona.style.formality == "formal"
        matching, other = (acts.formal, acts.casual) if formal else (acts.casual, acts.formal)
        formality = float(matching) - float(other)
        return 0.5 * taste + 0.2 * _topic(request, acts) + 0.15 * length + 0.15 * formality

    @staticmethod
    def consistency(request: JudgeRequest) -> float:
        persona, acts = request.persona, dialogue.parse(request.response)
        earlier = [dialogue.parse(m["content"]) for m in request.history if m["role"] == "assistant"]
        said_facts = {slot: value for past in earlier for slot, value in past.facts.items()}
        said_likes = set().union(*(p.likes for p in earlier)) if earlier else set()
        said_hates = set().union(*(p.hates for p in earlier)) if earlier else set()
        liked, disliked = set(persona.preferences.values()), set(persona.dislikes.values())

        claims = []
        for slot, value in acts.facts.items():
            true = persona.facts.get(slot)
            score = 0.0 if true is None else (1.0 if value == true else -1.0)
            drift = slot in said_facts and said_facts[slot] != value
            claims.append(score - drift)
        for item in acts.likes:
            claims.append((item in liked) - (item in disliked) - (item in said_hates))
        for item in acts.hates:
            claims.append((item in disliked) - (item in liked) - (item in said_likes))
        if not claims:
            return 0.0
        return max(-1.0, min(1.0, sum(claims) / len(claims)))


class EmbeddingJudge:
    """Cosine similarity (all-MiniLM-L6-v2, offline) of the reply to the persona's profile.

    alignment:   cosine to "i like <preferred items>" minus cosine to "i like <disliked items>".
    consistency: cosine to the persona's self-description minus the largest drop against the
                 agent's own earlier lines. Both clipped to [-1, 1]. A smooth signal that also
                 works for free text that the rule parser cannot read.
    """

    def __init__(self, embedder=None) -> None:
        if embedder is None:
            from ppg.env.embedding import SentenceEmbedder

            embedder = SentenceEmbedder()
        self.embedder = embedder

    def score(self, requests: list[JudgeRequest]) -> list[float]:
        if not requests:
            return []
        responses = [r.response for r in requests]
        likes = ["i like " + ", ".join(r.persona.preferences.values()) for r in requests]
        dislikes = ["i like " + ", ".join(r.persona.dislikes.values()) for r in requests]
        profiles = [_self_description(r.persona) for r in requests]
        to_likes = self.embedder.cosine(responses, likes)
        to_dislikes = self.embedder.cosine(responses, dislikes)
        to_profile = self.embedder.cosine(responses, profiles)
        scores = []
        for i, r in enumerate(requests):
            if r.aspect == "alignment":
                s = float(to_likes[i] - to_dislikes[i])
            else:
                s = float(to_profile[i])
                own = [m["content"] for m in r.history if m["role"] == "assistant"]
                if own:
                    agreement = self.embedder.cosine([r.response] * len(own), own)
                    s -= max(0.0, float(to_profile[i]) - float(agreement.min())) * 0.5
            scores.append(max(-1.0, min(1.0, s)))
        return scores


def _self_description(persona: Persona) -> str:
    facts = " ".join(dialogue.state_fact(slot, value) for slot, value in persona.facts.items())
    likes = " ".join(dialogue.state_taste(item, True) for item in persona.preferences.values())
    return f"{facts} {likes}"


class LLMJudge:
    """A model (vLLM) asked for a 0-10 score, mapped linearly to [-1, 1].

    Decoding is constrained to the eleven answers "0".."10" when the engine supports it, and the
    reply is parsed strictly otherwise: an answer that is not a score raises JudgeError.
    """

    SCALE = [str(i) for i in range(11)]

    def __init__(self, llm) -> None:
        self.llm = llm  # ppg.env.llm.ChatLLM or its Ray actor handle wrapper

    def prompt(self, request: JudgeRequest) -> list[dict]:
        who = "the user" if request.aspect == "alignment" else "the assistant's assigned persona"
        transcript = "\n".join(f"{m['role']}: {m['content']}" for m in request.history[-6:])
        return [
            {"role": "system", "content": "you rate replies. answer with one number from 0 to 10."},
            {
                "role": "user",
                "content": (
                    f"persona: {request.persona.describe()}\nconversation:\n{transcript}\n"
                    f"reply: {request.response}\nhow well does the reply fit {who}? score 0-10:"
                ),
            },
        ]

    def score(self, requests: list[JudgeRequest]) -> list[float]:
        from ppg.env.llm import ChatLLMUnavailable, JudgeParseError, parse_score

        try:
            answers = self.llm.choose([self.prompt(r) for r in requests], self.SCALE)
        except ChatLLMUnavailable as e:
            raise JudgeError(f"LLM judge unavailable: {e}") from e
        scores = []
        for answer in answers:
            try:
                value = parse_score(answer, 0, 10)
            except JudgeParseError as e:
                raise JudgeError(f"LLM judge gave no usable score: {e}") from e
            scores.append(value / 5.0 - 1.0)
        return scores


JUDGES = {"rule": RuleJudge, "embedding": EmbeddingJudge, "llm": LLMJudge}
