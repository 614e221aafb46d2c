"""Simulated users / conversation partners, behind one batched interface.

The problem decides *what* the user wants at each turn (``UserMove``); a partner decides how to say it:
the scripted partner writes the move's text (deterministic, instant on CPU), an LLM partner is any chat
model on vLLM prompted with the persona and the move's goal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ppg.env import dialogue
from ppg.env.personas import Persona
from ppg.env.problems import UserMove


@dataclass(frozen=True)
class PartnerRequest:
    persona: Persona
    move: UserMove
    history: tuple[dict, ...]  # the conversation so far, without the agent's system prompt
    seed: int = 0  # the conversation's seed
    turn: int = 0


def partner_sampling_seed(requests: list[PartnerRequest]) -> int:
    """The seed of a batch of partner replies, from its conversations' seeds and turn: a sampling
    partner answers the same batch the same way every time - a redone call (its actor restarted), a
    resumed run - so training stays exactly reproducible (conversation i samples with seed + i)."""
    h = 0
    for r in requests:
        h = (h * 1_000_003 + r.seed * 7919 + r.turn) % 2**31
    return h


class Partner(Protocol):
    def reply(self, requests: list[PartnerRequest]) -> list[str]: ...


class ScriptedPartner:
    """Answers the agent's question about the move's topic (if it asked one), then says the move's line."""

    def reply(self, requests: list[PartnerRequest]) -> list[str]:
        return [self._reply(r) for r in requests]

    @staticmethod
    def _reply(request: PartnerRequest) -> str:
        parts = []
        last_agent = next((m["content"] for m in reversed(request.history) if m["role"] == "assistant"), None)
        topic = request.move.reveal
        if topic is not None and last_agent is not None and topic in dialogue.parse(last_agent).asks:
            parts.append(dialogue.reveal(request.persona.preferences[topic]))
        parts.append(request.move.say)
        return " ".join(parts)


class LLMPartner:
    """A chat model plays the user: persona and goal in its system prompt, the agent as its 'user'."""

    def __init__(self, llm, max_tokens: int = 32, temperature: float = 0.7) -> None:
        self.llm, self.max_tokens, self.temperature = llm, max_tokens, temperature

    def reply(self, requests: list[PartnerRequest]) -> list[str]:
        return self.llm.chat(
            [self.prompt(r) for r in requests],
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            seed=partner_sampling_seed(requests),
        )

    @staticmethod
    def prompt(request: PartnerRequest) -> list[dict]:
        system = (
            f"you are {request.persona.describe()} you are chatting with an assistant. "
            f"{request.move.goal} reply in one or two short sentences."
        )
        swapped = {"assistant": "user", "user": "assistant"}
        history = [{"role": swapped[m["role"]], "content": m["content"]} for m in request.history]
        return [{"role": "system", "content": system}, *history]
