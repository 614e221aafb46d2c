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

from dataclasses import KW_ONLY, dataclass
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


DODGE = -0.5
"""The score of a reply that does not do what the turn asks (empty, a greeting, small talk, a question
back with nothing new, an answer to a question nobody asked): clearly below any honest attempt, so
saying nothing is never a way to collect reward."""

UNANSWERED = -1.0
"""A persona question left unanswered scores as low as a false answer: playing the persona means
answering. At -0.5 a model that could not yet recall its persona learned to dodge instead of lying
(persona_chitchat, 60 iterations: dodges 0.12 -> 0.47, truthful answers unchanged)."""


@dataclass(frozen=True)
class Verdict:
    """What a judge read in one reply, and its score. ``kind`` names the behaviour:

    alignment:   "recommend" (puts items forward), "needed_question" (asks the user's taste in the
                 topic being discussed, not yet stated), "off_topic" (items, none in the topic),
                 "dodge" (anything else)
    consistency: "answer" (a claim answers the persona question asked), "dodge" (a persona question
                 went unanswered), "statement" (claims, no question asked), "nothing" (neither)
    """

    score: float
    kind: str
    _: KW_ONLY  # several fields share a type: name them
    taste: float = 0.0  # alignment: mean +1 liked / -1 disliked over the items put forward
    truthful: bool | None = None  # consistency: the answer agrees with the persona
    false_claims: int = 0  # consistency: claims the persona contradicts
    contradictions: int = 0  # consistency: claims that contradict the agent's own earlier lines


class RuleJudge:
    """Exact rules over the parsed acts of the reply: fast, deterministic, and transparent.

    alignment (the user asked for ideas about a topic, or told a taste):
      recommend       0.5 * taste + 0.2 * topic + 0.15 * length + 0.15 * formality
        taste         mean over items put forward of +1 (the user's liked item) / -1 (disliked) / 0
        topic         +1 every item is in the topic being discussed, else 0
      off_topic       DODGE: items, but none in the topic being discussed (changing the subject)
        length        +1 within the persona's max_words, else -1
        formality     +1 a marker of the persona's register, -1 of the other one, else 0
      needed_question 0: asks the user's taste in the topic being discussed, not stated yet. Pays
                      nothing now; pays later through the recommendation it makes possible.
      dodge           -0.5: no recommendation and no needed question.
      Style terms count only with a recommendation, so a short polite non-answer earns nothing.
    consistency (the agent plays its persona; the user asks about it):
      the answer      +1 true to the persona, -1 false, UNANSWERED (-1) if the question goes unanswered
      other claims    add -1 each if false (true ones add nothing: no padding a dodge with trivia)
      drift           -1 for each claim that contradicts the agent's own earlier lines
      no question     mean of the claims' +1 / -1, 0 with no claims; the whole clipped to [-1, 1].
    """

    def score(self, requests: list[JudgeRequest]) -> list[float]:
        return [self.read(r).score for r in requests]

    def read(self, request: JudgeRequest) -> Verdict:
        return self.alignment(request) if request.aspect == "alignment" else self.consistency(request)

    @staticmethod
    def alignment(request: JudgeRequest) -> Verdict:
        persona, acts = request.persona, dialogue.parse(request.response)
        focus = dialogue.focus_topic(request.history)
        if not acts.items:
            needed = focus is not None and acts.asks == {focus}
            if needed and focus not in dialogue.revealed_tastes(request.history):
                return Verdict(0.0, "needed_question")
            return Verdict(DODGE, "dodge")
        on_topic = [dialogue.ITEM_CATEGORY[i] == focus for i in acts.items]
        if focus is not None and not any(on_topic):
            return Verdict(DODGE, "off_topic")
        liked, disliked = set(persona.preferences.values()), set(persona.dislikes.values())
        taste = sum((i in liked) - (i in disliked) for i in acts.items) / len(acts.items)
        topic = 1.0 if focus is not None and all(on_topic) else 0.0
        length = 1.0 if acts.words <= persona.style.max_words else -1.0
        formal = persona.style.formality == "formal"
        matching, other = (acts.formal, acts.casual) if formal else (acts.casual, acts.formal)
        formality = float(matching) - float(other)
        score = 0.5 * taste + 0.2 * topic + 0.15 * length + 0.15 * formality
        return Verdict(score, "recommend", taste=taste)

    @staticmethod
    def consistency(request: JudgeRequest) -> Verdict:
        persona, acts = request.persona, dialogue.parse(request.response)
        earlier = [dialogue.parse(m["content"]) for m in request.history if m["role"] == "assistant"]
        said_facts = {slot: value for past in earlier for slot, value in past.facts.items()}
        said_likes = set().union(*(p.likes for p in earlier)) if earlier else set()
        said_hates = set().union(*(p.hates for p in earlier)) if earlier else set()
        liked, disliked = set(persona.preferences.values()), set(persona.dislikes.values())

        claims: list[tuple[str, float, bool]] = []  # (what it is about, +1/-1/0 vs persona, drift)
        for slot, value in acts.facts.items():
            true = persona.facts.get(slot)
            truth = 0.0 if true is None else (1.0 if value == true else -1.0)
            claims.append((slot, truth, slot in said_facts and said_facts[slot] != value))
        question = dialogue.persona_question(dialogue.last_user_line(request.history))
        for item in acts.likes:
            about = f"taste:{dialogue.ITEM_CATEGORY[item]}"
            # Asked what it likes, any item but the persona's own is a wrong answer.
            unknown = -1.0 if about == question else 0.0
            truth = 1.0 if item in liked else -1.0 if item in disliked else unknown
            claims.append((about, truth, item in said_hates))
        for item in acts.hates:
            truth = float((item in disliked) - (item in liked))
            claims.append((f"hate:{dialogue.ITEM_CATEGORY[item]}", truth, item in said_likes))
        false_claims = sum(truth < 0 for _, truth, _ in claims)
        contradictions = sum(drift for _, _, drift in claims)

        if question is None:
            if not claims:
                return Verdict(0.0, "nothing")
            mean = sum(truth - drift for _, truth, drift in claims) / len(claims)
            return Verdict(_clip(mean), "statement", false_claims=false_claims, contradictions=contradictions)
        answers = [c for c in claims if question == "open" or c[0] == question]
        if not answers:
            return Verdict(UNANSWERED, "dodge", false_claims=false_claims, contradictions=contradictions)
        answer = max(answers, key=lambda c: c[1])  # the best-supported answer to the question
        rest = sum(min(0.0, c[1]) for c in claims if c is not answer)
        score = answer[1] + rest - contradictions
        return Verdict(
            _clip(score),
            "answer",
            truthful=answer[1] > 0,
            false_claims=false_claims,
            contradictions=contradictions,
        )


def _clip(x: float) -> float:
    return max(-1.0, min(1.0, x))


class EmbeddingJudge:
    """The rule judge's reading, done by meaning (all-MiniLM-L6-v2, offline), so free text counts too.

    A reply is read as the *nearest reference line* by cosine similarity: "you should try <item>" for
    every item (alignment), or every possible self-claim, "i live in <city>" for every city, "i love
    <item>" for every item (consistency). A reply closer than ``relevant`` to none of them says
    nothing that counts:

      alignment   recommend        0.7 * taste(nearest item) + 0.3 * closeness, closeness =
                                   (cos - relevant) / (1 - relevant) in [0, 1]
                  needed_question  0: within ``question`` of "what <topic> do you like?", not yet told
                  off_topic        DODGE: the nearest item is not in the topic being discussed
                  dodge            DODGE
      consistency answer           +1 the nearest claim is the persona's, else -1; -1 more for each
                                   earlier line of the agent's read as a different answer to it
                  dodge            UNANSWERED: a persona question and no claim about what it asked
      Scores clipped to [-1, 1]. Thresholds were set on the reference lines' own similarities (one
      item's line vs another's 0.5-0.7, so items are told apart by the nearest line, not by a
      threshold; greetings and small talk vs any line < 0.35).
    """

    def __init__(self, embedder=None, relevant: float = 0.5, question: float = 0.8) -> None:
        if embedder is None:
            from ppg.env.embedding import SentenceEmbedder

            embedder = SentenceEmbedder()
        self.embedder, self.relevant, self.question = embedder, relevant, question
        self._references: dict[str, list[tuple[str, str]]] | None = None  # target -> (value, line)
        self._vectors = None
        self._cache: dict = {}

    def score(self, requests: list[JudgeRequest]) -> list[float]:
        return [v.score for v in self.read(requests)]

    def read(self, requests: list[JudgeRequest]) -> list[Verdict]:
        if not requests:
            return []
        replies = self._embed([r.response for r in requests])
        out = []
        for i, r in enumerate(requests):
            if r.aspect == "alignment":
                out.append(self._alignment(r, replies[i]))
            else:
                out.append(self._consistency(r, replies[i]))
        return out

    def _alignment(self, request: JudgeRequest, reply) -> Verdict:
        focus = dialogue.focus_topic(request.history)
        target, value, cos = self._nearest(reply, [f"recommend:{c}" for c in dialogue.TOPIC_WORDS])
        if cos < self.relevant:
            if focus and focus not in dialogue.revealed_tastes(request.history):
                *_, asks = self._nearest(reply, [f"ask:{focus}"])
                if asks >= self.question:
                    return Verdict(0.0, "needed_question")
            return Verdict(DODGE, "dodge")
        if focus and target != f"recommend:{focus}":
            return Verdict(DODGE, "off_topic")
        persona = request.persona
        taste = float((value in persona.preferences.values()) - (value in persona.dislikes.values()))
        closeness = (cos - self.relevant) / (1 - self.relevant)
        return Verdict(_clip(0.7 * taste + 0.3 * closeness), "recommend", taste=taste)

    def _consistency(self, request: JudgeRequest, reply) -> Verdict:
        question = dialogue.persona_question(dialogue.last_user_line(request.history))
        answers = self._answer_targets()
        target, value, cos = self._nearest(reply, answers)
        if cos < self.relevant or question not in (None, "open", target):
            return Verdict(UNANSWERED if question else 0.0, "dodge" if question else "nothing")
        truth = 1.0 if _persona_answers(request.persona).get(target) == value else -1.0
        earlier = [m["content"] for m in request.history if m["role"] == "assistant"]
        contradictions = 0
        if earlier:
            for vector in self._embed(earlier):
                said_target, said, said_cos = self._nearest(vector, answers)
                contradictions += said_cos >= self.relevant and said_target == target and said != value
        kind = "answer" if question else "statement"
        return Verdict(
            _clip(truth - contradictions),
            kind,
            truthful=truth > 0,
            false_claims=int(truth < 0),
            contradictions=contradictions,
        )

    def _embed(self, texts: list[str]):
        """Embeddings, each text computed once: a conversation's earlier lines come back every turn."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            if len(self._cache) > 50_000:
                self._cache.clear()
            self._cache.update(zip(missing, self.embedder.embed(missing), strict=True))
        return [self._cache[t] for t in texts]

    def _answer_targets(self) -> list[str]:
        return [t for t in self._refs() if not t.startswith(("recommend:", "ask:"))]

    def _nearest(self, vector, targets: list[str]) -> tuple[str, str, float]:
        """(target, value, cosine) of the reference line nearest to ``vector`` among ``targets``'."""
        refs = self._refs()
        best = ("", "", -2.0)
        for target in targets:
            sims = self._vectors[target] @ vector
            k = int(sims.argmax())
            if float(sims[k]) > best[2]:
                best = (target, refs[target][k][0], float(sims[k]))
        return best

    def _refs(self) -> dict[str, list[tuple[str, str]]]:
        if self._references is None:
            refs: dict[str, list[tuple[str, str]]] = {}
            for category, items in dialogue.CATEGORIES.items():
                refs[f"recommend:{category}"] = [(i, dialogue.recommend(i)) for i in items]
                refs[f"ask:{category}"] = [("?", dialogue.ask(category))]
                refs[f"taste:{category}"] = [(i, dialogue.state_taste(i, True)) for i in items]
            for slot, values in dialogue.FACT_SLOTS.items():
                refs[slot] = [(v, dialogue.state_fact(slot, v)) for v in values]
            self._vectors = {t: self.embedder.embed([line for _, line in rows]) for t, rows in refs.items()}
            self._references = refs
        return self._references


def _persona_answers(persona: Persona) -> dict[str, str]:
    """target -> the persona's true answer ("city" -> "oslo", "taste:music" -> "jazz")."""
    return {**persona.facts, **{f"taste:{c}": i for c, i in persona.preferences.items()}}


class LLMJudge:
    """A model (vLLM) asked for a 0-10 score against a written rubric, mapped linearly to [-1, 1].

    The rubric says what the rule judge's terms say, dodging included, so a larger judge model
    grades the same behaviours in free text.

    Decoding is constrained to the eleven answers "0".."10" when the engine supports it, and the
    reply is parsed strictly otherwise: an answer that is not a score raises JudgeError.
    """

    SCALE = [str(i) for i in range(11)]

    def __init__(self, llm) -> None:
        self.llm = llm  # ppg.env.llm.ChatLLM or its Ray actor handle wrapper

    RUBRICS = {
        "alignment": (
            "the persona is the user's. 10: recommends what the user said they like, on the topic asked, "
            "in their style. 5: a relevant question the user has not answered yet. 2-4: a recommendation "
            "the user would not care about. 0-2: dodges (says nothing, greets, chats, asks again, changes "
            "the subject) or recommends what the user dislikes."
        ),
        "consistency": (
            "the persona is the assistant's own. 10: answers the question truthfully for the persona and "
            "agrees with its earlier lines. 2: does not answer the question asked (dodges, changes the "
            "subject, says nothing). 0: says something false about the persona or contradicts itself."
        ),
    }

    def prompt(self, request: JudgeRequest) -> list[dict]:
        transcript = "\n".join(f"{m['role']}: {m['content']}" for m in request.history[-6:])
        return [
            {"role": "system", "content": "you rate replies. answer with one number from 0 to 10."},
            {
                "role": "user",
                "content": (
                    f"persona: {request.persona.describe()}\nconversation:\n{transcript}\n"
                    f"reply: {request.response}\nrubric: {self.RUBRICS[request.aspect]}\nscore 0-10:"
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
