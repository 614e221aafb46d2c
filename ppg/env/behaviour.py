"""Behaviour rates a person understands, read off finished conversations with the rule judge's eyes.

A reward curve says *that* a policy improved; these rates say *what* it learned to do: how often it
recommends the taste the user stated, asks before recommending, answers a persona question
truthfully, dodges, or contradicts its own earlier lines. Each rate is a share in [0, 1] over the
turns (or segments) where the behaviour could happen; a rate with nothing to count is left out.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from ppg.env.judges import JudgeRequest, RuleJudge, Verdict
from ppg.env.personas import Persona
from ppg.env.problems import Problem

ALIGNMENT_RATES = {
    "recommends_stated_taste": "recommendations that name the user's own taste",
    "asks_before_recommending": "topics (segments) that open with a question about the user's taste",
    "evasive": "replies that dodge: no recommendation and no needed question, or off topic",
}
CONSISTENCY_RATES = {
    "answers_truthfully": "persona questions answered true to the persona",
    "answers_falsely": "persona questions answered with a false claim",
    "dodges_question": "persona questions left unanswered",
    "contradicts_itself": "replies that contradict the agent's own earlier lines",
}


class Dialogue(Protocol):
    persona: Persona
    messages: list[dict]  # system, then user / assistant alternating


def verdicts(problem: Problem, dialogue: Dialogue) -> list[Verdict]:
    """The rule judge's reading of every agent line of one conversation."""
    judge, history = RuleJudge(), dialogue.messages[1:]
    return [
        judge.read(JudgeRequest(dialogue.persona, tuple(history[:i]), m["content"], problem.aspect))
        for i, m in enumerate(history)
        if m["role"] == "assistant"
    ]


def behaviour_rates(
    problem: Problem, dialogues: Iterable[Dialogue], seeds: Iterable[int] | None = None
) -> dict:
    """Rates over ``dialogues`` (see ``ALIGNMENT_RATES`` / ``CONSISTENCY_RATES``) and the mean reply
    length in words. ``seeds`` (each conversation's) place segment starts where they vary per seed."""
    dialogues = list(dialogues)
    seeds = list(seeds) if seeds is not None else [getattr(d, "seed", 0) for d in dialogues]
    counts: dict[str, list[int]] = {}

    def count(name: str, hit: bool) -> None:
        counts.setdefault(name, [0, 0])
        counts[name][0] += int(hit)
        counts[name][1] += 1

    words = []
    for dialogue, seed in zip(dialogues, seeds, strict=True):
        read = verdicts(problem, dialogue)
        words += [len(m["content"].split()) for m in dialogue.messages if m["role"] == "assistant"]
        if problem.aspect == "alignment":
            starts = {problem.segment_start(t, seed) for t in range(len(read))}
            for t, v in enumerate(read):
                count("evasive", v.kind in ("dodge", "off_topic"))
                if v.kind == "recommend":
                    count("recommends_stated_taste", v.taste > 0)
                if t in starts:
                    count("asks_before_recommending", v.kind == "needed_question")
        else:
            for v in read:
                count("contradicts_itself", v.contradictions > 0)
                if v.kind in ("answer", "dodge"):
                    count("answers_truthfully", bool(v.truthful))
                    count("answers_falsely", v.kind == "answer" and not v.truthful)
                    count("dodges_question", v.kind == "dodge")
    rates = {name: hits / total for name, (hits, total) in counts.items() if total}
    rates["reply_words"] = sum(words) / len(words) if words else 0.0
    return rates


def describe(name: str) -> str:
    return {**ALIGNMENT_RATES, **CONSISTENCY_RATES, "reply_words": "mean words per reply"}[name]
