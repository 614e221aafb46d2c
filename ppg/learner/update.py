"""One partial-policy-gradient update on a batch of episodes: the learner's whole job, in plain torch.

Runs the same inside a Ray Train worker (DDP) and in a plain process (tests, debugging). Advantages
are computed on the *global* batch (baselines look across episodes) before it is sharded; each rank's
loss is rescaled so that DDP's gradient averaging yields exactly the global-batch estimator.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ppg.config import LearnerConfig
from ppg.episode import Episode, EpisodeBatch, collate
from ppg.loss import (
    clipped_surrogate_loss,
    importance_weights,
    kl_penalty,
    policy_gradient_loss,
    token_logprobs,
)
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
        # Where the batch must go: collate builds it on the CPU; with learner.use_gpu the model
        # (and the reference, built on the CPU by the learner worker) are on the GPU.
        self.device = next(model.parameters()).device
        self.reference = reference.to(self.device) if reference is not None else None  # KL anchor
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
        shard, advantages = shard.to(self.device), advantages.to(self.device)
        lr = self.scheduler.get_last_lr()[0]
        counts = (global_episodes, global_agent_tokens)
        if self.config.algorithm == "ppo":
            with torch.no_grad():
                old = torch.cat([token_logprobs(self._logits(m), m.token_ids) for m, _ in self._micro(shard)])
            for _ in range(self.config.ppo_epochs):
                stats = self._optimizer_step(shard, advantages, counts, version, old)
        else:
            stats = self._optimizer_step(shard, advantages, counts, version)
        self.scheduler.step()
        stats.lr = lr
        return stats

    def _micro(self, shard: EpisodeBatch) -> list[tuple[EpisodeBatch, slice]]:
        """The shard in micro-batches of ``learner.micro_batch_size`` episodes (one when unset):
        memory for one micro-batch's activations, gradients accumulated over all of them."""
        size = self.config.micro_batch_size or shard.token_ids.shape[0]
        rows = [slice(i, i + size) for i in range(0, shard.token_ids.shape[0], size)]
        return [(select_rows(shard, r), r) for r in rows]

    def _logits(self, shard: EpisodeBatch, model: torch.nn.Module | None = None) -> Tensor:
        attention = shard.attention_mask.long()
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        enabled = self.config.precision == "bf16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled):
            return (model or self.model)(
                input_ids=shard.token_ids, attention_mask=attention, position_ids=positions
            ).logits

    def _optimizer_step(
        self,
        shard: EpisodeBatch,
        advantages: Tensor,
        counts: tuple[int, int],
        version: int | None,
        old_logprobs: Tensor | None = None,
    ) -> UpdateStats:
        """One optimizer step: forward and backward per micro-batch (gradients accumulate), then
        clip and step. The policy gradient, or PPO's clipped objective when ``old_logprobs`` are
        given. Each micro-batch's loss is scaled to the global normaliser (episodes or agent tokens
        of the whole batch, all ranks), times the world size that DDP's all-reduce averages over,
        so any split - ranks, micro-batches - yields the gradient of the global batch."""
        global_episodes, global_agent_tokens = counts
        reduction = self.config.loss_reduction
        self.optimizer.zero_grad(set_to_none=True)
        total = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "weight": 0.0, "clipped": 0.0, "tokens": 0}
        for micro, rows in self._micro(shard):
            logprobs = token_logprobs(self._logits(micro), micro.token_ids)  # [b, L], float32
            agent = micro.agent_mask & micro.attention_mask
            tokens = int(agent.sum())

            weights = None
            if self.config.off_policy == "importance" and micro.behaviour_logprobs is not None:
                # Truncated importance weights pi_now / pi_behaviour for stale episodes only.
                stale = (
                    torch.ones_like(micro.policy_versions, dtype=torch.bool)
                    if version is None
                    else micro.policy_versions < version
                )
                weights = importance_weights(
                    logprobs, micro.behaviour_logprobs, agent, stale,
                    self.config.importance_clip, self.config.importance_ratio,
                )  # fmt: skip

            local = micro.token_ids.shape[0] if reduction == "sequence_mean" else tokens
            glob = global_episodes if reduction == "sequence_mean" else global_agent_tokens
            scale = self.world_size * local / max(1, glob)
            clipped = torch.zeros(())
            if old_logprobs is not None:
                pg_loss, clipped = clipped_surrogate_loss(
                    logprobs, old_logprobs[rows], agent, micro.token_turn, advantages[rows],
                    self.config.ppo_clip, reduction,
                )  # fmt: skip
            else:
                pg_loss = policy_gradient_loss(
                    logprobs, agent, micro.token_turn, advantages[rows], reduction, token_weights=weights
                )
            loss = pg_loss * scale
            kl = torch.zeros(())
            if self.reference is not None and self.config.kl_coef > 0:
                with torch.no_grad():
                    ref = token_logprobs(self._logits(micro, self.reference), micro.token_ids)
                kl_loss, kl = kl_penalty(logprobs, ref, agent)  # means over this micro-batch's tokens
                loss = loss + self.config.kl_coef * kl_loss * self.world_size * tokens / max(
                    1, global_agent_tokens
                )
            loss.backward()

            total["loss"] += float(loss.detach())
            total["pg_loss"] += float(pg_loss.detach()) * scale
            total["kl"] += float(kl) * tokens
            total["weight"] += float(weights[agent].sum()) if weights is not None else tokens
            total["clipped"] += float(clipped) * tokens
            total["tokens"] += tokens

        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        n = max(1, total["tokens"])
        return UpdateStats(
            loss=total["loss"],
            pg_loss=total["pg_loss"],
            kl=total["kl"] / n,
            grad_norm=float(grad_norm),
            lr=0.0,
            importance_weight=total["weight"] / n,
            agent_tokens=total["tokens"],
            clip_fraction=total["clipped"] / n,
        )


def select_rows(batch: EpisodeBatch, rows: slice) -> EpisodeBatch:
    """The episodes ``rows`` of a padded batch, every tensor alike."""
    return dataclasses.replace(
        batch,
        **{
            f.name: getattr(batch, f.name)[rows]
            for f in dataclasses.fields(batch)
            if getattr(batch, f.name) is not None
        },
    )
