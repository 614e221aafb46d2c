"""Partial policy gradient objectives: which future rewards each turn is credited with.

An episode is a conversation of T agent turns with per-turn rewards r[t]. The agent at turn t is
credited with a *subset* S_t of the turns at or after t (DESIGN.md):

    G[t] = sum_{u in S_t} gamma^(u - t) * r[u]          advantage[t] = G[t] - b[t]

Every policy class is one upper-triangular 0/1 matrix M[t, u] = (u in S_t), so all of them share one
line of arithmetic, ``G = (M * discount) @ r``. Smaller subsets are simpler policies whose estimates
have lower variance; which class wins depends on the problem's reward structure.

Shapes: B episodes, padded to T turns. ``valid[b, t]`` is True for real turns (ragged lengths),
``segment_ids[b, t]`` numbers the segments of an episode, ``group_ids[b]`` names samples that share a
persona/prompt. Padded turns never contribute to, or receive, credit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import Tensor


class ObjectiveInputError(ValueError):
    """Bad tensors handed to the objective (shape, range, NaN): raised at the boundary, before any math."""


def future_turns(valid: Tensor) -> Tensor:
    """M[b, t, u] = u >= t, both real turns: the full-planning mask, which every class narrows."""
    T = valid.shape[1]
    upper = torch.ones(T, T, dtype=torch.bool, device=valid.device).triu()  # [T, T]
    return upper & valid[:, :, None] & valid[:, None, :]  # [B, T, T]


def turn_offsets(T: int, device: torch.device | None = None) -> Tensor:
    """offset[t, u] = u - t: how many turns ahead u lies from t."""
    t = torch.arange(T, device=device)
    return t[None, :] - t[:, None]  # [T, T]


# --- Policy classes: each is the subset S_t, as a mask ------------------------------------------


class _PolicyClass(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def mask(self, valid: Tensor, segment_ids: Tensor | None = None) -> Tensor:  # [B, T, T] bool
        raise NotImplementedError


class FullPlanning(_PolicyClass):
    """S_t = {t, ..., T-1}: the classic reward-to-go; plans for everything still to come."""

    type: Literal["full"] = "full"

    def mask(self, valid: Tensor, segment_ids: Tensor | None = None) -> Tensor:
        return future_turns(valid)


class Greedy(_PolicyClass):
    """S_t = {t}: each response is judged on its own reward only. Lowest variance; right when
    rewards are myopic."""

    type: Literal["greedy"] = "greedy"

    def mask(self, valid: Tensor, segment_ids: Tensor | None = None) -> Tensor:
        return future_turns(valid) & (turn_offsets(valid.shape[1], valid.device) == 0)


class KStep(_PolicyClass):
    """S_t = {t, ..., t+K-1}: plan K turns ahead. K=1 is greedy; K >= T is full planning."""

    type: Literal["k_step"] = "k_step"
    k: PositiveInt = Field(description="lookahead in turns, including the current one (K >= 1)")

    def mask(self, valid: Tensor, segment_ids: Tensor | None = None) -> Tensor:
        return future_turns(valid) & (turn_offsets(valid.shape[1], valid.device) < self.k)


class Segment(_PolicyClass):
    """S_t = {t, ..., last turn of t's segment}: plan to the end of the current topic, no further."""

    type: Literal["segment"] = "segment"

    def mask(self, valid: Tensor, segment_ids: Tensor | None = None) -> Tensor:
        if segment_ids is None:
            raise ObjectiveInputError(
                "the 'segment' policy class needs segment_ids [B, T] (or boundaries per episode, "
                "see segment_ids_from_boundaries); the problem must provide segment boundaries"
            )
        check_segment_ids(segment_ids, valid)
        same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, T]
        return future_turns(valid) & same_segment


class Custom(_PolicyClass):
    """Any user-chosen S_t, given as a T x T 0/1 matrix with nothing before the diagonal."""

    type: Literal["custom"] = "custom"
    matrix: list[list[int]] = Field(description="M[t][u] = 1 if turn t is credited with r[u]; u >= t only")

    def mask(self, valid: Tensor, segment_ids: Tensor | None = None) -> Tensor:
        M = torch.tensor(self.matrix, dtype=torch.long, device=valid.device)
        T = valid.shape[1]
        if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] < T:
            raise ObjectiveInputError(
                f"objective.policy_class.matrix must be square and at least T x T = {T} x {T}, "
                f"got shape {tuple(M.shape)}"
            )
        M = M[:T, :T]
        if not ((M == 0) | (M == 1)).all():
            raise ObjectiveInputError("objective.policy_class.matrix entries must be 0 or 1")
        before = M.bool() & (turn_offsets(T, valid.device) < 0)
        if before.any():
            t, u = before.nonzero()[0].tolist()
            raise ObjectiveInputError(
                f"objective.policy_class.matrix[{t}][{u}] = 1 credits turn {t} with an earlier turn's "
                f"reward; a policy can only be credited with turns at or after its own (set entries "
                f"below the diagonal to 0)"
            )
        return future_turns(valid) & M.bool()


PolicyClass = Annotated[FullPlanning | Greedy | KStep | Segment | Custom, Field(discriminator="type")]


# --- Partial returns --------------------------------------------------------------------------


def partial_returns(rewards: Tensor, subset_mask: Tensor, gamma: float = 1.0) -> Tensor:
    """G[b, t] = sum_u M[b, t, u] * gamma^(u - t) * r[b, u]   ->   [B, T]."""
    T = rewards.shape[1]
    offsets = turn_offsets(T, rewards.device).clamp(min=0)  # [T, T]
    discount = torch.as_tensor(gamma, dtype=rewards.dtype, device=rewards.device) ** offsets  # [T, T]
    weights = subset_mask.to(rewards.dtype) * discount  # [B, T, T]
    return torch.einsum("btu,bu->bt", weights, rewards)


# --- Baselines: b[b, t] may use anything except this episode's own action at t and after ---------
#
# Why leave-one-out: E[grad log pi(a_t|s_t) * b_t] = 0 only if b_t is independent of a_t given s_t.
# A mean that includes the episode's own G_t contains a_t, and shrinks the gradient by (n-1)/n.
# Using only the *other* episodes (independent samples) keeps the estimator exactly unbiased - also
# when the policy decides the episode length: which other episodes reach turn t depends on their
# own actions, never on this episode's. With no other episode at turn t, b_t = 0.


class _Baseline(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def advantages(self, returns: Tensor, valid: Tensor, group_ids: Tensor | None = None) -> Tensor:
        raise NotImplementedError


class NoBaseline(_Baseline):
    """advantage = G. Unbiased, highest variance."""

    type: Literal["none"] = "none"

    def advantages(self, returns: Tensor, valid: Tensor, group_ids: Tensor | None = None) -> Tensor:
        return returns * valid


class TurnMean(_Baseline):
    """b[t] = mean of G[t] over the *other* episodes of the batch that reach turn t."""

    type: Literal["turn_mean"] = "turn_mean"

    def advantages(self, returns: Tensor, valid: Tensor, group_ids: Tensor | None = None) -> Tensor:
        one_group = torch.zeros(returns.shape[0], dtype=torch.long, device=returns.device)
        return (returns - leave_one_out_mean(returns, valid, one_group)) * valid


class GroupMean(_Baseline):
    """b[t] = mean of G[t] over the other samples of the same persona/prompt (GRPO/RLOO style).

    ``normalize_std`` divides by the group's std as GRPO does: lower variance, but the std depends
    on this episode's own action, so the estimate is no longer unbiased (a scaled, biased direction).
    Where a group has a single sample at a turn there is no spread to divide by: that advantage is
    left unscaled (dividing by eps would blow it up a millionfold).
    """

    type: Literal["group_mean"] = "group_mean"
    normalize_std: bool = False
    eps: float = Field(default=1e-6, gt=0)

    def advantages(self, returns: Tensor, valid: Tensor, group_ids: Tensor | None = None) -> Tensor:
        if group_ids is None:
            raise ObjectiveInputError(
                "the 'group_mean' baseline needs group_ids [B] naming which samples share a "
                "persona/prompt (set rollout.group_size > 1)"
            )
        adv = returns - leave_one_out_mean(returns, valid, group_ids)  # [B, T]
        if self.normalize_std:
            alone = _group_sums(valid.to(returns.dtype), group_ids) < 2  # [B, T]
            std = group_std(returns, valid, group_ids)
            adv = adv / torch.where(alone, torch.ones_like(std), std + self.eps)
        return adv * valid


Baseline = Annotated[NoBaseline | TurnMean | GroupMean, Field(discriminator="type")]


def _group_sums(x: Tensor, group_ids: Tensor) -> Tensor:
    """Per (group, turn) sums of x [B, T], gathered back to each episode's row -> [B, T]."""
    _, inverse = torch.unique(group_ids, return_inverse=True)  # [B]
    sums = torch.zeros(int(inverse.max()) + 1, x.shape[1], dtype=x.dtype, device=x.device)
    sums.index_add_(0, inverse, x)  # [n_groups, T]
    return sums[inverse]  # [B, T]


def leave_one_out_mean(returns: Tensor, valid: Tensor, group_ids: Tensor) -> Tensor:
    """Mean of G[t] over the other real episodes in the same group; 0 where there is none."""
    v = valid.to(returns.dtype)
    others_sum = _group_sums(returns * v, group_ids) - returns * v  # [B, T]
    others_count = _group_sums(v, group_ids) - v  # [B, T]
    return torch.where(others_count > 0, others_sum / others_count.clamp(min=1), torch.zeros_like(returns))


def group_std(returns: Tensor, valid: Tensor, group_ids: Tensor) -> Tensor:
    """Population std of G[t] within each group (all members), per turn -> [B, T]."""
    v = valid.to(returns.dtype)
    count = _group_sums(v, group_ids).clamp(min=1)
    mean = _group_sums(returns * v, group_ids) / count
    var = _group_sums(((returns - mean) * v) ** 2, group_ids) / count
    return var.sqrt()


# --- Segments ---------------------------------------------------------------------------------


def segment_ids_from_boundaries(boundaries: Sequence[Sequence[int]], lengths: Sequence[int]) -> Tensor:
    """Per-episode segment starts -> segment_ids [B, max(lengths)].

    ``boundaries[b]`` lists the turns at which a new segment begins (turn 0 always begins one and is
    not listed): T=6 with boundaries [2, 4] gives segments {0,1} {2,3} {4,5}.
    """
    if len(boundaries) != len(lengths):
        raise ObjectiveInputError(
            f"segment boundaries are given for {len(boundaries)} episodes but the batch has {len(lengths)}"
        )
    T = max(lengths, default=0)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, (starts, length) in enumerate(zip(boundaries, lengths, strict=True)):
        starts = list(starts)
        if any(not 0 < s < length for s in starts):
            raise ObjectiveInputError(
                f"episode {b}: segment boundaries {starts} must lie in 1..{length - 1} "
                f"(turn indices where a new segment starts, for an episode of {length} turns)"
            )
        if any(a >= c for a, c in zip(starts, starts[1:], strict=False)):
            raise ObjectiveInputError(f"episode {b}: segment boundaries {starts} must be strictly increasing")
        for s in starts:
            ids[b, s:length] += 1  # padding keeps id 0; it is never credited
    return ids


def check_segment_ids(segment_ids: Tensor, valid: Tensor) -> None:
    """Segments must be contiguous runs: ids non-decreasing over each episode's real turns."""
    if segment_ids.shape != valid.shape:
        raise ObjectiveInputError(
            f"segment_ids has shape {tuple(segment_ids.shape)}, expected [B, T] = {tuple(valid.shape)}"
        )
    both_real = valid[:, 1:] & valid[:, :-1]
    if (both_real & (segment_ids[:, 1:] < segment_ids[:, :-1])).any():
        b = int((both_real & (segment_ids[:, 1:] < segment_ids[:, :-1])).any(1).nonzero()[0])
        raise ObjectiveInputError(
            f"episode {b}: segment_ids {segment_ids[b].tolist()} decrease; segments must be "
            "contiguous runs of turns numbered in order (build them with segment_ids_from_boundaries)"
        )


# --- The objective: config + the one call the learner makes -----------------------------------


class Objective(BaseModel):
    """Which rewards each turn is credited with (policy class), discounted by gamma, minus a baseline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy_class: PolicyClass = Field(default_factory=FullPlanning)
    gamma: float = Field(default=1.0, gt=0.0, le=1.0, description="discount per turn, in (0, 1]")
    baseline: Baseline = Field(default_factory=TurnMean)

    def returns(self, rewards: Tensor, valid: Tensor, segment_ids: Tensor | None = None) -> Tensor:
        """Partial returns G [B, T] (0 on padded turns)."""
        check_turn_batch(rewards, valid)
        rewards = rewards.masked_fill(~valid, 0.0)  # padding may hold NaN; it must not leak
        return partial_returns(rewards, self.policy_class.mask(valid, segment_ids), self.gamma)

    def advantages(
        self,
        rewards: Tensor,
        valid: Tensor,
        segment_ids: Tensor | None = None,
        group_ids: Tensor | None = None,
    ) -> Tensor:
        """Advantages G - b [B, T], detached: they weight log-probs, they are not differentiated."""
        returns = self.returns(rewards, valid, segment_ids)
        if group_ids is not None and group_ids.shape != (rewards.shape[0],):
            raise ObjectiveInputError(
                f"group_ids has shape {tuple(group_ids.shape)}, expected [B] = ({rewards.shape[0]},)"
            )
        return self.baseline.advantages(returns, valid, group_ids).detach()


def check_turn_batch(rewards: Tensor, valid: Tensor) -> None:
    if rewards.ndim != 2:
        raise ObjectiveInputError(
            f"rewards must be [B, T] (episodes x turns), got shape {tuple(rewards.shape)}"
        )
    if valid.shape != rewards.shape or valid.dtype != torch.bool:
        raise ObjectiveInputError(
            f"valid must be a bool tensor of the rewards' shape {tuple(rewards.shape)}, "
            f"got {valid.dtype} {tuple(valid.shape)}"
        )
    if not torch.is_floating_point(rewards):
        raise ObjectiveInputError(f"rewards must be floating point, got {rewards.dtype}")
    bad = valid & ~torch.isfinite(rewards)
    if bad.any():
        b, t = bad.nonzero()[0].tolist()
        raise ObjectiveInputError(
            f"reward of episode {b}, turn {t} is {rewards[b, t].item()}; every real turn needs a finite "
            "reward (check the judge: a failed judgement must raise, not return NaN)"
        )
    # A real turn after a padded one would be a hole in the conversation.
    if (valid[:, 1:] & ~valid[:, :-1]).any():
        b = int((valid[:, 1:] & ~valid[:, :-1]).any(1).nonzero()[0])
        raise ObjectiveInputError(
            f"episode {b}: valid {valid[b].int().tolist()} has a gap; real turns must come first, "
            "then padding (build valid from lengths with valid_from_lengths)"
        )


def valid_from_lengths(lengths: Tensor | Sequence[int], T: int | None = None) -> Tensor:
    """lengths [B] -> valid [B, T]: the padding mask of a ragged batch."""
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    if (lengths < 0).any():
        raise ObjectiveInputError(f"episode lengths must be >= 0, got {lengths.tolist()}")
    T = int(lengths.max()) if T is None else T
    if (lengths > T).any():
        raise ObjectiveInputError(f"episode lengths {lengths.tolist()} exceed the padded length T={T}")
    return torch.arange(T)[None, :] < lengths[:, None]
