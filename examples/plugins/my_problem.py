"""A problem, a judge and a partner of your own, outside the ppg package (README: plug-ins)::

    PYTHONPATH=examples/plugins .venv/bin/ppg train problem.name=my_problem:OneTopic \\
        problem.judge=my_problem:KeywordJudge problem.partner=my_problem:polite_user

Each name is ``module:attribute``. Nothing is registered: every ppg process that plays conversations
(the driver's checks, each rollout worker, evaluation) imports this module itself from its Python
path, which is why it must be on ``PYTHONPATH`` (or installed, or in a Ray job's ``--working-dir``).
"""

from __future__ import annotations

import re

from ppg.env import dialogue
from ppg.env.judges import DODGE, JudgeError, JudgeRequest
from ppg.env.partners import PartnerRequest, ScriptedPartner
from ppg.env.problems import Problem, UserMove
from ppg.env.vocabulary import ITEM_CATEGORY


class OneTopic(Problem):
    """One topic all conversation long; the user states a taste in it once, at the start.

    A problem must set ``aspect`` (what the judge scores) and define ``user_move``; ``family``,
    ``best_class`` and ``why`` are for people reading it. Since the taste stays in the history, each
    reply can be judged on its own: greedy credit should suffice.
    """

    aspect = "alignment"
    family, best_class = "user_alignment", "greedy"
    why = "the stated taste stays in view, so every reply is judged on its own"
    default_turns = 3

    def user_move(self, persona, t, seed):
        category = self.topics(seed, 1)[0]  # seeded: the same conversation seed, the same topic
        if t == 0:
            item = persona.preferences[category]
            say = f"{dialogue.reveal(item)} {dialogue.request_ideas(category)}"
            return UserMove(say=say, goal=f"say you like {item} and ask for {category} ideas.")
        return UserMove(say=f"anything else? {dialogue.request_ideas(category)}", goal="ask for more ideas.")


class KeywordJudge:
    """+1 when the reply names an item the user likes (and none they dislike), -1 when it names one
    they dislike, 0 for other items, DODGE (-0.5) when it names none: saying nothing must never pay.

    A judge is a class or a zero-argument factory; ppg builds one per process and calls
    ``score(requests)`` once per turn with every live conversation's reply, expecting one float in
    [-1, 1] per request. A judge that cannot score raises ``JudgeError`` (never a silent 0).
    """

    def score(self, requests: list[JudgeRequest]) -> list[float]:
        return [self._score(r) for r in requests]

    @staticmethod
    def _score(request: JudgeRequest) -> float:
        if request.aspect != "alignment":
            raise JudgeError(f"KeywordJudge scores alignment only, not {request.aspect}")
        words = set(re.findall(r"[a-z]+", request.response.lower()))
        if words & set(request.persona.dislikes.values()):
            return -1.0
        if words & set(request.persona.preferences.values()):
            return 1.0
        return 0.0 if words & ITEM_CATEGORY.keys() else DODGE


class PoliteUser:
    """The scripted user (it also answers the agent's question about the move's topic), politely.

    A partner has ``reply(requests)``: one user line per request, all live conversations at once.
    """

    def __init__(self) -> None:
        self.scripted = ScriptedPartner()

    def reply(self, requests: list[PartnerRequest]) -> list[str]:
        return [f"please, {line}" for line in self.scripted.reply(requests)]


def polite_user() -> PoliteUser:
    """A factory works as well as a class: ppg calls it without arguments."""
    return PoliteUser()
