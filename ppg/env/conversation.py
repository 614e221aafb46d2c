"""Run a batch of conversations for a problem: policy, partner and judge each called once per turn.

The policy is any function from a batch of message lists to a batch of replies (a vLLM engine in a
rollout worker, transformers, or a scripted agent), so the same loop serves training, evaluation and
the warm-start corpus. Rewards stay per turn: they are never summed here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ppg.env import dialogue
from ppg.env.judges import REWARD_RANGE, Judge, JudgeError, JudgeRequest
from ppg.env.partners import Partner, PartnerRequest
from ppg.env.personas import Persona
from ppg.env.problems import Problem

Policy = Callable[[list[list[dict]]], list[str]]


@dataclass
class Conversation:
    persona: Persona
    seed: int
    messages: list[dict]  # system, then user / assistant alternating; one assistant line per turn
    rewards: list[float] = field(default_factory=list)  # one per agent turn
    segment_ids: list[int] = field(default_factory=list)  # one per agent turn

    @property
    def replies(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "assistant"]


def run_conversations(
    problem: Problem,
    personas: Sequence[Persona],
    seeds: Sequence[int],
    policy: Policy,
    partner: Partner,
    judge: Judge,
) -> list[Conversation]:
    """Roll out one conversation per (persona, seed), all turns batched across conversations."""
    if len(personas) != len(seeds):
        raise ValueError(
            f"got {len(personas)} personas but {len(seeds)} seeds; give one seed per conversation"
        )
    conversations = [
        Conversation(p, s, [{"role": "system", "content": problem.system_prompt(p)}])
        for p, s in zip(personas, seeds, strict=True)
    ]
    segment_ids = [problem.segment_ids(c.seed) for c in conversations]
    for t in range(problem.num_turns):
        requests = [
            PartnerRequest(
                c.persona, problem.user_move(c.persona, t, c.seed), tuple(c.messages[1:]), c.seed, t
            )
            for c in conversations
        ]
        for c, text in zip(
            conversations, _checked(partner.reply(requests), len(conversations), "partner"), strict=True
        ):
            c.messages.append({"role": "user", "content": text})

        replies = _checked(policy([list(c.messages) for c in conversations]), len(conversations), "policy")
        gates = []
        for c, reply in zip(conversations, replies, strict=True):
            earlier = [dialogue.parse(r) for r in c.replies]
            gates.append(problem.gate(t, dialogue.parse(reply), earlier))
            c.messages.append({"role": "assistant", "content": reply})

        judged = [i for i, g in enumerate(gates) if g]  # a withheld reward needs no judgement
        scores = (
            judge.score(
                [
                    JudgeRequest(
                        conversations[i].persona,
                        tuple(conversations[i].messages[1:-1]),
                        replies[i],
                        problem.aspect,
                    )
                    for i in judged
                ]
            )
            if judged
            else []
        )
        _check_scores(scores, len(judged))
        score_of = dict(zip(judged, scores, strict=True))
        for i, c in enumerate(conversations):
            c.rewards.append(problem.reward_scale * gates[i] * score_of.get(i, 0.0))
            c.segment_ids.append(segment_ids[i][t])
    return conversations


def _checked(texts: list[str], n: int, who: str) -> list[str]:
    if len(texts) != n or not all(isinstance(t, str) for t in texts):
        raise RuntimeError(
            f"the {who} returned {len(texts)} items for {n} conversations; expected one string each"
        )
    return texts


def _check_scores(scores: list[float], n: int) -> None:
    low, high = REWARD_RANGE
    if len(scores) != n:
        raise JudgeError(f"the judge returned {len(scores)} scores for {n} replies")
    for s in scores:
        if not (isinstance(s, (int, float)) and math.isfinite(s) and low - 1e-9 <= s <= high + 1e-9):
            raise JudgeError(f"the judge returned {s!r}; scores must be finite and in [{low}, {high}]")
