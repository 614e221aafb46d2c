"""The partial policy gradient as a token-level loss.

    grad = E[ sum_t grad log pi(a_t | s_t) * advantage[t] ]

log pi(a_t | s_t) is the sum of the log-probs of the agent's own tokens in turn t; system, persona and
user tokens are context, not actions, and are masked out. Minimising the loss below ascends the
estimate above. Shapes: B sequences of L tokens, T turns per episode.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ppg.objectives import ObjectiveInputError

# sequence_mean: sum over an episode's agent tokens, mean over episodes. Exactly the estimator
#   above, unbiased; long answers weigh more (as the math says they should).
# token_mean: sum over all agent tokens / number of agent tokens in the batch. A positive rescaling
#   of the same direction when the token count is fixed; when lengths vary it is what DAPO-style
#   trainers use, and it is no longer exactly unbiased.
LossReduction = Literal["sequence_mean", "token_mean"]
# sequence: one weight per episode, pi(all its agent tokens) / mu(all its agent tokens): the exact
#   importance correction of every term of the estimator (for any policy class, any number of turns),
#   unbiased until truncated. token: each token's own pi / mu: lower variance, but it ignores how the
#   other tokens (earlier ones: the state; later ones: the return) moved, so it is biased as soon as
#   an episode has more than one agent token (tests/test_loss.py shows both, by enumeration).
ImportanceRatio = Literal["sequence", "token"]


def token_logprobs(logits: Tensor, input_ids: Tensor) -> Tensor:
    """log pi(x_i | x_<i) for each token -> [B, L]; the first token has no prediction and gets 0."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, L-1, V]
    picked = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # [B, L-1]
    return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)  # [B, L]


def turn_logprobs(logprobs: Tensor, agent_mask: Tensor, token_turn: Tensor, num_turns: int) -> Tensor:
    """Sum of the agent's token log-probs per turn: log pi(a_t | s_t) -> [B, T]."""
    check_token_batch(logprobs, agent_mask, token_turn, num_turns)
    per_turn = torch.zeros(logprobs.shape[0], num_turns, dtype=logprobs.dtype, device=logprobs.device)
    own = torch.where(agent_mask, logprobs, torch.zeros_like(logprobs))  # [B, L]
    return per_turn.scatter_add(1, token_turn.clamp(0, num_turns - 1), own)


def policy_gradient_loss(
    logprobs: Tensor,  # [B, L] log-prob of each sampled token under the current policy
    agent_mask: Tensor,  # [B, L] bool: True on the agent's own response tokens
    token_turn: Tensor,  # [B, L] long: the turn t each token belongs to (any value off the agent mask)
    advantages: Tensor,  # [B, T] G - b from Objective.advantages (detached)
    reduction: LossReduction = "sequence_mean",
    token_weights: Tensor | None = None,  # [B, L] e.g. importance weights for stale episodes (detached)
) -> Tensor:
    """-(1/N) sum_tokens w * log pi(token) * advantage[turn of token], over the agent's tokens only."""
    B, T = advantages.shape
    check_token_batch(logprobs, agent_mask, token_turn, T)
    token_advantage = advantages.detach().gather(1, token_turn.clamp(0, T - 1))  # [B, L]
    if token_weights is not None:
        token_advantage = token_advantage * token_weights.detach()
    weighted = torch.where(agent_mask, logprobs * token_advantage, torch.zeros_like(logprobs))  # [B, L]
    return -reduce_tokens(weighted, agent_mask, reduction)


def clipped_surrogate_loss(
    logprobs: Tensor,  # [B, L] under the policy being updated
    old_logprobs: Tensor,  # [B, L] under the policy that sampled (before this batch's first step)
    agent_mask: Tensor,
    token_turn: Tensor,
    advantages: Tensor,  # [B, T]
    clip: float,
    reduction: LossReduction = "sequence_mean",
) -> tuple[Tensor, Tensor]:
    """PPO's clipped objective, the paper's baseline: (loss, fraction of agent tokens clipped).

    Per token, min(r * A, clip(r, 1 - eps, 1 + eps) * A) with r = pi / pi_old: a step that moved a
    token's probability past the trust region in the advantage's direction earns nothing more. At
    r = 1 (the first step on a batch) its gradient is exactly the policy gradient above.
    """
    B, T = advantages.shape
    check_token_batch(logprobs, agent_mask, token_turn, T)
    token_advantage = advantages.detach().gather(1, token_turn.clamp(0, T - 1))  # [B, L]
    ratio = torch.exp((logprobs - old_logprobs.detach()).clamp(-20, 20))
    surrogate = torch.minimum(ratio * token_advantage, ratio.clamp(1 - clip, 1 + clip) * token_advantage)
    weighted = torch.where(agent_mask, surrogate, torch.zeros_like(surrogate))
    # where the clip is active (no gradient): past the region in the advantage's direction
    active = ((ratio > 1 + clip) & (token_advantage > 0)) | ((ratio < 1 - clip) & (token_advantage < 0))
    clipped = (active & agent_mask).sum() / agent_mask.sum().clamp(min=1)
    return -reduce_tokens(weighted, agent_mask, reduction), clipped.detach()


def importance_weights(
    logprobs: Tensor,  # [B, L] under the policy being updated (pi)
    behaviour_logprobs: Tensor,  # [B, L] under the policy that sampled (mu)
    agent_mask: Tensor,  # [B, L] bool
    stale: Tensor,  # [B] bool: episodes sampled by another policy version than pi
    clip: float,
    ratio: ImportanceRatio = "sequence",
) -> Tensor:
    """Truncated importance weights [B, L] for off-policy episodes (1 on the others' tokens).

    E_mu[(pi(tau) / mu(tau)) X(tau)] = E_pi[X(tau)] for any X: weighting every agent token of an
    episode by its whole trajectory's ratio makes the policy-gradient estimator on mu's samples
    exactly pi's (the partner and the judge do not depend on the policy, so their factors cancel).
    Truncation at ``clip`` bounds the variance at the price of a bias where the ratio exceeds it."""
    log_ratio = torch.where(
        agent_mask, logprobs.detach() - behaviour_logprobs.detach(), torch.zeros_like(logprobs)
    )
    if ratio == "sequence":
        log_ratio = log_ratio.sum(1, keepdim=True).expand_as(log_ratio)
    elif ratio != "token":
        raise ObjectiveInputError(f"learner.importance_ratio must be 'sequence' or 'token', got {ratio!r}")
    weights = torch.exp(log_ratio.clamp(max=math.log(clip)))
    return torch.where(agent_mask & stale[:, None], weights, torch.ones_like(weights))


def reduce_tokens(weighted: Tensor, agent_mask: Tensor, reduction: LossReduction) -> Tensor:
    """Sum over the agent's tokens, per episode (sequence_mean) or per token (token_mean)."""
    if reduction == "sequence_mean":
        return weighted.sum() / weighted.shape[0]
    if reduction == "token_mean":
        return weighted.sum() / agent_mask.sum().clamp(min=1)
    raise ObjectiveInputError(
        f"learner.loss_reduction must be 'sequence_mean' or 'token_mean', got {reduction!r}"
    )


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(loss term, estimate) of KL(pi || ref) per agent token, averaged over the masked tokens.

    The estimate is k3 = exp(d) - d - 1 with d = log ref - log pi: unbiased and non-negative, so it
    is what gets reported. It is not the loss: differentiated as a loss, k3's gradient is that of
    KL(ref || pi), the other direction. The loss is k2 = d^2 / 2, whose gradient on samples from pi,
    d * grad log pi, is exactly the gradient of KL(pi || ref) (tests/test_loss.py, by enumeration).
    """
    d = (ref_logprobs.detach() - logprobs).clamp(-20, 20)
    count = mask.sum().clamp(min=1)
    loss = (0.5 * d**2 * mask).sum() / count
    estimate = ((torch.exp(d) - d - 1).detach() * mask).sum() / count
    return loss, estimate


def check_token_batch(logprobs: Tensor, agent_mask: Tensor, token_turn: Tensor, num_turns: int) -> None:
    if logprobs.ndim != 2:
        raise ObjectiveInputError(f"logprobs must be [B, L], got shape {tuple(logprobs.shape)}")
    for name, x in (("agent_mask", agent_mask), ("token_turn", token_turn)):
        if x.shape != logprobs.shape:
            raise ObjectiveInputError(
                f"{name} has shape {tuple(x.shape)}, expected the logprobs' shape {tuple(logprobs.shape)}"
            )
    if agent_mask.dtype != torch.bool:
        raise ObjectiveInputError(f"agent_mask must be bool, got {agent_mask.dtype}")
    turns = token_turn[agent_mask]
    if turns.numel() and (turns.min() < 0 or turns.max() >= num_turns):
        raise ObjectiveInputError(
            f"token_turn on agent tokens must lie in 0..{num_turns - 1} (the advantages have "
            f"{num_turns} turns), got {int(turns.min())}..{int(turns.max())}"
        )
    bad = agent_mask & ~torch.isfinite(logprobs)
    if bad.any():
        b, i = bad.nonzero()[0].tolist()
        raise ObjectiveInputError(f"logprob of agent token {i} in sequence {b} is {logprobs[b, i].item()}")
