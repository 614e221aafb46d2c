"""One partial-policy-gradient update on a batch of episodes: the learner's whole job, in plain torch.

Runs the same inside a Ray Train worker (DDP) and in a plain process (tests, debugging). Advantages
are computed on the *global* batch (baselines look across episodes) before it is sharded; each rank's
loss is rescaled so that DDP's gradient averaging yields exactly the global-batch estimator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ppg.config import LearnerConfig
from ppg.episode import Episode, EpisodeBatch, collate
from ppg.loss import clipped_surrogate_loss, kl_penalty, policy_gradient_loss, token_logprobs
from ppg.objectives import Objective


class StaleEpisodeError(ValueError):
    """Episodes from a policy version older than learner.max_staleness allows."""


def global_advantages(episodes: list[Episode], objective: Objective) -> Tensor:
    """Advantages [B, T] over the whole batch (group ids are per batch, so baselines see every sample)."""
    batch = collate(episodes)
    return objective.advantages(batch.rewards, batch.valid, batch.segment_ids, batch.group_ids)


def check_staleness(
    episodes: list[Episode], version: int, max_staleness: int, off_policy: str = "importance"
) -> list[Episode]:
    """The episodes the learner may use at ``version``: within the staleness bound, and only
    on-policy ones when ``off_policy`` is "reject". Nothing older is ever mixed in silently."""
    if any(e.policy_version > version for e in episodes):
        raise StaleEpisodeError(
            f"episodes from a future policy version (> {version}): the version bookkeeping is broken"
        )
    bound = 0 if off_policy == "reject" else max_staleness
    return [e for e in episodes if version - e.policy_version <= bound]


def lr_lambda(config: LearnerConfig, total_steps: int):
    """Linear warm-up, then constant or cosine decay to 10%."""

    def factor(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@dataclass
class UpdateStats:
    loss: float
    pg_loss: float
    kl: float
    grad_norm: float
    lr: float
    importance_weight: float  # mean per-token weight (1.0 when on-policy)
    agent_tokens: int
    clip_fraction: float = 0.0  # PPO: share of agent tokens whose ratio left [1 - eps, 1 + eps]


class PolicyLearner:
    def __init__(
        self,
        model: torch.nn.Module,
        objective: Objective,
        config: LearnerConfig,
        total_steps: int,
        reference: torch.nn.Module | None = None,
        world_size: int = 1,
    ) -> None:
        self.model, self.objective, self.config = model, objective, config
        self.reference = reference  # frozen initial policy, for the KL penalty
        self.world_size = world_size
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config, total_steps))

    def step(
        self,
        shard: EpisodeBatch,
        advantages: Tensor,
        global_episodes: int,
        global_agent_tokens: int,
        version: int | None = None,
    ) -> UpdateStats:
        """Update on this rank's shard; ``global_*`` are counts over the whole batch (all ranks).
        ``version``: the learner's policy version; episodes sampled by it are on-policy and get no
        importance weight (the sampler's and the learner's log-probs differ by numerical noise only,
        which must not enter the update). None: every episode with log-probs is weighted.
        ``learner.algorithm=ppo``: ``ppo_epochs`` clipped steps against the weights before the first."""
        self.model.train()
        lr = self.scheduler.get_last_lr()[0]
        if self.config.algorithm == "ppo":
            with torch.no_grad():
                old = token_logprobs(self._logits(shard), shard.token_ids)
            for _ in range(self.config.ppo_epochs):
                stats = self._optimizer_step(
                    shard, advantages, global_episodes, global_agent_tokens, version, old
                )
        else:
            stats = self._optimizer_step(shard, advantages, global_episodes, global_agent_tokens, version)
        self.scheduler.step()
        stats.lr = lr
        return stats

    def _logits(self, shard: EpisodeBatch, model: torch.nn.Module | None = None) -> Tensor:
        attention = shard.attention_mask.long()
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        return (model or self.model)(
            input_ids=shard.token_ids, attention_mask=attention, position_ids=positions
        ).logits

    def _optimizer_step(
        self,
        shard: EpisodeBatch,
        advantages: Tensor,
        global_episodes: int,
        global_agent_tokens: int,
        version: int | None,
        old_logprobs: Tensor | None = None,
    ) -> UpdateStats:
        """One forward, backward and optimizer step: the policy gradient, or PPO's clipped
        objective when ``old_logprobs`` are given."""
        ids = shard.token_ids
        logprobs = token_logprobs(self._logits(shard), ids)  # [B, L]
        agent = shard.agent_mask & shard.attention_mask

        weights = None
        if self.config.off_policy == "importance" and shard.behaviour_logprobs is not None:
            # Truncated per-token importance weights pi_now / pi_behaviour for stale episodes.
            ratio = torch.exp((logprobs.detach() - shard.behaviour_logprobs).clamp(max=20.0))
            stale = agent if version is None else agent & (shard.policy_versions < version)[:, None]
            weights = torch.where(stale, ratio.clamp(max=self.config.importance_clip), torch.ones_like(ratio))

        # The losses normalise by this shard; rescale to the global normaliser, times the world size
        # that DDP's all-reduce averages over.
        reduction = self.config.loss_reduction
        local = ids.shape[0] if reduction == "sequence_mean" else int(agent.sum())
        glob = global_episodes if reduction == "sequence_mean" else global_agent_tokens
        scale = self.world_size * local / max(1, glob)
        clipped = torch.zeros(())
        if old_logprobs is not None:
            pg_loss, clipped = clipped_surrogate_loss(
                logprobs, old_logprobs, agent, shard.token_turn, advantages, self.config.ppo_clip, reduction
            )
        else:
            pg_loss = policy_gradient_loss(
                logprobs, agent, shard.token_turn, advantages, reduction, token_weights=weights
            )
        pg_loss = pg_loss * scale

        kl = torch.zeros(())
        if self.reference is not None and self.config.kl_coef > 0:
            with torch.no_grad():
                ref_logits = self._logits(shard, self.reference)
            kl_loss, kl = kl_penalty(logprobs, token_logprobs(ref_logits, ids), agent)
            loss = pg_loss + self.config.kl_coef * kl_loss * scale
        else:
            loss = pg_loss

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        return UpdateStats(
            loss=float(loss.detach()),
            pg_loss=float(pg_loss.detach()),
            kl=float(kl.detach()),
            grad_norm=float(grad_norm),
            lr=0.0,
            importance_weight=float(weights[agent].mean()) if weights is not None and agent.any() else 1.0,
            agent_tokens=int(agent.sum()),
            clip_fraction=float(clipped),
        )
