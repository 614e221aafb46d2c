"""Episodes: a conversation as the learner sees it - tokens, which of them are the agent's, per-turn
rewards, segments, and the policy version that produced it.

Tokens come from the model's own chat template, so what the learner scores is exactly what the model
read and wrote. Only the agent's reply tokens (and the end-of-turn marker it emitted) are actions;
system, persona and user tokens, and the template's role headers, are context.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


class RenderError(ValueError):
    """The chat template cannot be split into per-message spans (it rewrites earlier turns)."""


@dataclass
class Episode:
    problem: str
    persona_id: str
    group_id: int  # episodes that share a persona/prompt (group baseline)
    policy_version: int
    messages: list[dict]
    rewards: list[float]  # [T] one per agent turn, never summed
    segment_ids: list[int]  # [T]
    token_ids: list[int]  # [L]
    agent_mask: list[bool]  # [L] True on the agent's own tokens
    token_turn: list[int]  # [L] the agent turn each token belongs to (or precedes)
    logprobs: list[float] | None = None  # [L] behaviour log-probs of sampled tokens (0.0 on context)

    @property
    def num_turns(self) -> int:
        return len(self.rewards)


@dataclass
class EpisodeBatch:
    """Padded tensors for the objective and the loss."""

    token_ids: torch.Tensor  # [B, L] long, pad 0
    attention_mask: torch.Tensor  # [B, L] bool
    agent_mask: torch.Tensor  # [B, L] bool
    token_turn: torch.Tensor  # [B, L] long
    rewards: torch.Tensor  # [B, T] float
    valid: torch.Tensor  # [B, T] bool
    segment_ids: torch.Tensor  # [B, T] long
    group_ids: torch.Tensor  # [B] long
    policy_versions: torch.Tensor  # [B] long
    behaviour_logprobs: torch.Tensor | None = None  # [B, L] log-probs the sampler reported, if all have them

    def to(self, device: torch.device | str) -> EpisodeBatch:
        """The batch with every tensor on ``device``: collate builds it on the CPU, the learner's
        model may live on a GPU."""
        tensors = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: v.to(device) for k, v in tensors.items() if v is not None})


def collate(episodes: list[Episode], pad_id: int = 0) -> EpisodeBatch:
    if not episodes:
        raise ValueError("cannot collate an empty list of episodes")
    B = len(episodes)
    L = max(len(e.token_ids) for e in episodes)
    T = max(e.num_turns for e in episodes)
    batch = EpisodeBatch(
        token_ids=torch.full((B, L), pad_id, dtype=torch.long),
        attention_mask=torch.zeros(B, L, dtype=torch.bool),
        agent_mask=torch.zeros(B, L, dtype=torch.bool),
        token_turn=torch.zeros(B, L, dtype=torch.long),
        rewards=torch.zeros(B, T, dtype=torch.float32),
        valid=torch.zeros(B, T, dtype=torch.bool),
        segment_ids=torch.zeros(B, T, dtype=torch.long),
        group_ids=torch.tensor([e.group_id for e in episodes], dtype=torch.long),
        policy_versions=torch.tensor([e.policy_version for e in episodes], dtype=torch.long),
    )
    if all(e.logprobs is not None for e in episodes):
        batch.behaviour_logprobs = torch.zeros(B, L, dtype=torch.float32)
    for b, e in enumerate(episodes):
        n, t = len(e.token_ids), e.num_turns
        if batch.behaviour_logprobs is not None:
            batch.behaviour_logprobs[b, :n] = torch.tensor(e.logprobs)
        batch.token_ids[b, :n] = torch.tensor(e.token_ids)
        batch.attention_mask[b, :n] = True
        batch.agent_mask[b, :n] = torch.tensor(e.agent_mask)
        batch.token_turn[b, :n] = torch.tensor(e.token_turn)
        batch.rewards[b, :t] = torch.tensor(e.rewards)
        batch.valid[b, :t] = True
        batch.segment_ids[b, :t] = torch.tensor(e.segment_ids)
    return batch
