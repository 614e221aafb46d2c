"""The training loop that runs on every Ray Train worker (``TorchTrainer``, DDP: gloo on CPU, NCCL on GPU).

Rank 0 drives: it asks the rollout pool for the iteration's episodes, computes advantages on the
whole batch, and shares them; every rank updates on its shard; rank 0 then broadcasts the new
weights (version v+1) to the rollout workers, writes metrics and checkpoints. By default
(``run.async_rollouts`` unset, ``learner.max_staleness=1``) the next iteration's rollouts run during
this update: its episodes are one version behind and importance-weighted (``learner.off_policy``);
``learner.max_staleness=0`` or ``run.async_rollouts=false`` makes every batch on-policy. Offline
(``run.offline_data``) the batches come from a file of logged, judged episodes instead
(``OfflineCollector``); everything after the batch is the same.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import random
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from ray.train.collective import broadcast_from_rank_zero
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from ppg.config import PPGConfig
from ppg.env.personas import load_personas, split_personas
from ppg.episode import Episode, collate
from ppg.files import atomic_write_text
from ppg.learner.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_state,
    prune_checkpoints,
    save_checkpoint,
)
from ppg.learner.lora import ADAPTER, apply_lora, load_lora, policy_state_dict, trainable_share
from ppg.learner.metrics import MetricsWriter
from ppg.learner.update import PolicyLearner, UpdateStats, check_staleness, global_advantages
from ppg.offline import episode_groups, read_episodes
from ppg.policy_registry import publish_policy
from ppg.ray_session import POOL_ACTOR
from ppg.rollout.pool import plan_requests
from ppg.rollout.worker import RolloutResult
from ppg.weights import SharedWeights

ATTEMPT_MARKER = ".learner-attempt"  # the run's attempt token: present = this learner is a restart


def batch_fingerprint(episodes: list[Episode]) -> str:
    """A short hash of an iteration's batch: equal batches, equal fingerprints (resume checks)."""
    h = hashlib.sha256()
    for e in episodes:
        h.update(repr((e.persona_id, e.group_id, e.token_ids, e.rewards)).encode())
    return h.hexdigest()[:16]


def iteration_requests(config: PPGConfig, personas, iteration: int):
    r = config.rollout
    return plan_requests(
        personas,
        r.episodes_per_iteration,
        r.group_size,
        num_requests=r.num_workers * r.requests_per_worker,
        seed=config.run.seed * 1_000_003 + iteration,
        first_request_id=iteration * 10_000,
    )


@dataclass
class Batch:
    """One iteration's training batch, as rank 0 shares it with every rank."""

    episodes: list[Episode]
    advantages: Tensor  # [B, T], computed on the whole batch
    dropped: int  # episodes older than the staleness bound
    fingerprint: str
    seconds: dict[str, float]  # rollout (wall), generate, environment


class PoolWeights:
    """Rank 0's line to the rollout pool's weights: every update goes to the rollout workers (and
    the live HTTP policy), online or offline, so the final evaluation and serving see the new policy."""

    def __init__(self, config: PPGConfig) -> None:
        self.config = config

    @functools.cached_property
    def pool(self):
        return ray.get_actor(POOL_ACTOR)

    def start_at(self, version: int, policy: Path | str) -> None:
        """Every rollout worker on this run's config and on the weights and version the learner
        starts from. Usually they are there already; not after a failure: a restarted learner
        finds workers ahead of its checkpoint, a restarted pool (its process died) workers on the
        config it was first started with, at version 0."""
        ray.get(self.pool.reconfigure.remote(self.config, version, str(policy), keep_size=True))

    def publish(self, version: int, model: torch.nn.Module) -> int:
        """The new weights to every rollout worker (and the live HTTP policy); returns how many acked.

        ``ray.put`` serializes the tensors (in the engines' dtype, so a bf16 model sends half the
        bytes; with LoRA the adapters merged in) straight into the object store, and the pool passes
        that same object on to every worker at once (``SharedWeights``: not fetched by the pool
        before its workers start loading)."""
        state = policy_state_dict(model, dtype=getattr(torch, self.config.model.dtype))
        ref = ray.put(state)
        if self.config.serve.enabled:  # the HTTP replicas follow within serve.reload_poll_s
            publish_policy(self.config.serve.app_name, version, ref)
        shared = SharedWeights(ref, {k: tuple(v.shape) for k, v in state.items()})
        acks = ray.get(self.pool.update_weights.remote(version, shared))
        if set(acks.values()) != {version}:
            raise RuntimeError(
                f"weight broadcast incomplete: workers report versions {acks}, expected {version}"
            )
        return len(acks)


class BatchCollector(PoolWeights):
    """Rank 0's side of the rollout pool: asks for an iteration's episodes (the next iteration's
    already in flight with ``run.async_rollouts``), keeps those the learner may use, and scores them."""

    def __init__(self, config: PPGConfig) -> None:
        super().__init__(config)
        self.personas, _ = split_personas(load_personas(config.problem.personas_file))
        self.prefetch = None

    def collect(self, iteration: int, version: int) -> Batch:
        start = time.perf_counter()
        if isinstance(self.prefetch, list):  # in hand already (waited for at a checkpoint, or restored)
            results = self.prefetch
        else:
            ref = self.prefetch or self.pool.collect.remote(
                iteration_requests(self.config, self.personas, iteration)
            )
            results = ray.get(ref)
        self.prefetch = None
        # Also after the last iteration: its checkpoint then carries the next batch, so a run
        # extended with ``--resume run.iterations=<more>`` repeats a longer straight run exactly.
        if self.config.overlaps_rollouts:
            requests = iteration_requests(self.config, self.personas, iteration + 1)
            self.prefetch = self.pool.collect.remote(requests)
        episodes = [e for r in results for e in r.episodes]
        learner = self.config.learner
        usable = check_staleness(episodes, version, learner.max_staleness, learner.off_policy)
        if not usable:
            raise RuntimeError(f"iteration {iteration}: every episode was older than learner.max_staleness")
        return Batch(
            usable,
            global_advantages(usable, self.config.objective),
            len(episodes) - len(usable),
            batch_fingerprint(usable),
            {"rollout": time.perf_counter() - start, **busiest_worker(results)},
        )

    def publish(self, version: int, model: torch.nn.Module) -> int:
        """As ``PoolWeights.publish``, once the next batch's rollouts (if under way) are done. A
        worker runs its requests one by one and the pool hands out the next when it is free, so new
        weights arriving meanwhile would reach the batch's later requests only: the batch's versions
        and samples, hence the run, would depend on timing. Waiting keeps every batch one version
        old and every run repeatable; it costs nothing, as the next iteration needs that batch first."""
        if self.prefetch is not None and not isinstance(self.prefetch, list):
            ray.wait([self.prefetch])
        return super().publish(version, model)

    def prefetched_state(self) -> list[dict] | None:
        """The next iteration's rollouts when they are already under way (``run.async_rollouts``),
        waited for and as plain data for the checkpoint: they were sampled by the version before
        the checkpoint's, which a resumed run no longer has, so a resumed run must train on these
        very episodes to repeat its killed twin exactly. None when nothing is prefetched."""
        if self.prefetch is None:
            return None
        if not isinstance(self.prefetch, list):
            self.prefetch = ray.get(self.prefetch)  # the next collect would wait for it anyway
        return [dataclasses.asdict(r) for r in self.prefetch]

    def restore_prefetched(self, data: list[dict] | None) -> None:
        if data:
            self.prefetch = [
                RolloutResult(**{**r, "episodes": [Episode(**e) for e in r["episodes"]]}) for r in data
            ]


def busiest_worker(results: list[RolloutResult]) -> dict[str, float]:
    """Generate and environment seconds of the worker that spent the most on this batch. A worker
    runs its requests one after another (``rollout.requests_per_worker``), so its times add up; the
    per-request maximum used before counted one request of the two a lone worker runs by default."""
    per_worker: dict[str, list[float]] = {}
    for r in results:
        spent = per_worker.setdefault(r.worker, [0.0, 0.0])
        spent[0] += r.seconds["generate"]
        spent[1] += r.seconds["environment"]
    generate, environment = max(per_worker.values())
    return {"generate": generate, "environment": environment}


class OfflineCollector(PoolWeights):
    """Offline PPG: each iteration's batch is ``rollout.episodes_per_iteration`` logged episodes of
    ``run.offline_data``, as whole groups (so group baselines compare episodes of one prompt).

    Epoch e visits the file's groups in a permutation seeded by (run.seed, e), a batch per slice of
    it; iteration i is batch i mod (groups // batch groups) of epoch i div that, so its batch depends
    only on (seed, i) and a resumed run sees exactly its killed twin's batches. Each episode is
    stamped with the learner's version and no log-probs: the update is the reward-weighted
    log-likelihood sum_t w[t] * log pi(a_t|s_t), without importance weights, where w is the advantage
    clipped at 0 (``run.offline_weighting=positive``; off-policy data gives no licence to push a turn
    down, only to prefer the better ones) or the advantage itself."""

    def __init__(self, config: PPGConfig) -> None:
        super().__init__(config)
        _, episodes = read_episodes(config.run.offline_data)
        self.groups = episode_groups(episodes)
        self.per_batch = config.rollout.episodes_per_iteration // config.rollout.group_size
        if not 0 < self.per_batch <= len(self.groups):
            raise ValueError(
                f"run.offline_data holds {len(self.groups)} groups; a batch needs {self.per_batch}"
            )

    def groups_for(self, iteration: int) -> list[int]:
        """Indices of the file's groups in iteration ``iteration``'s batch."""
        per_epoch = len(self.groups) // self.per_batch
        epoch, slot = divmod(iteration, per_epoch)
        rng = random.Random(self.config.run.seed * 1_000_003 + epoch)
        order = rng.sample(range(len(self.groups)), k=len(self.groups))
        return order[slot * self.per_batch : (slot + 1) * self.per_batch]

    def collect(self, iteration: int, version: int) -> Batch:
        start = time.perf_counter()
        episodes = [
            dataclasses.replace(e, group_id=g, policy_version=version, logprobs=None)
            for g, index in enumerate(self.groups_for(iteration))
            for e in self.groups[index]
        ]
        advantages = global_advantages(episodes, self.config.objective)
        if self.config.run.offline_weighting == "positive":
            advantages = advantages.clamp(min=0.0)
        return Batch(
            episodes,
            advantages,
            0,
            batch_fingerprint(episodes),
            {"rollout": time.perf_counter() - start, "generate": 0.0, "environment": 0.0},
        )


def starting_checkpoint(loop_config: dict) -> str | None:
    """Where this attempt of the learner starts (rank 0 decides). The first attempt starts where the
    driver said: a new run, or ``--resume``'s checkpoint. A later attempt is Ray Train restarting the
    learner after a worker died (``run.max_failures``): it continues from the run's newest
    checkpoint, exactly as ``--resume`` would."""
    run_dir = Path(loop_config["run_dir"])
    marker = run_dir / ATTEMPT_MARKER
    restarted = marker.is_file() and marker.read_text() == loop_config["attempt_token"]
    atomic_write_text(marker, loop_config["attempt_token"])
    if restarted and list_checkpoints(run_dir):
        latest = latest_checkpoint(run_dir)
        print(f"[ppg] the learner restarted after a failure; continuing from {latest}", flush=True)
        return str(latest)
    return loop_config.get("resume_from")


def load_policy_model(config: PPGConfig, loop_config: dict, checkpoint: str | None) -> torch.nn.Module:
    """The model the learner trains, where this attempt starts. With ``learner.lora``: the initial
    policy plus adapters (fresh, or the checkpoint's own), never adapters on merged weights."""
    if config.learner.lora is None:
        start = Path(checkpoint) / "policy" if checkpoint else loop_config["policy_path"]
        return AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(loop_config["reference_path"], dtype=torch.float32)
    if checkpoint:
        return load_lora(base, Path(checkpoint) / ADAPTER)
    return apply_lora(base, config.learner.lora)


def build_learner(config: PPGConfig, loop_config: dict, world: int, checkpoint: str | None) -> PolicyLearner:
    model = load_policy_model(config, loop_config, checkpoint)
    if config.learner.lora is not None:
        print(f"[ppg] LoRA: {trainable_share(model):.2%} of the parameters train", flush=True)
    if config.learner.gradient_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = None
    if config.learner.kl_coef > 0:
        reference = AutoModelForCausalLM.from_pretrained(loop_config["reference_path"], dtype=torch.float32)
        reference.eval().requires_grad_(False)
    model = ray.train.torch.prepare_model(model)
    return PolicyLearner(model, config.objective, config.learner, config.run.iterations, reference, world)


def restore(learner: PolicyLearner, checkpoint: str | None, rank: int) -> dict:
    """The optimizer, schedule and RNG streams of a checkpoint, so a resumed run repeats its killed
    twin exactly; returns ``{"iteration", "policy_version"}`` (zeros for a new run)."""
    if not checkpoint:
        return {"iteration": 0, "policy_version": 0}
    state, trainer_state = load_state(checkpoint)
    state["prefetched"] = trainer_state.get("prefetched")  # async rollouts in flight at the save
    learner.optimizer.load_state_dict(trainer_state["optimizer"])
    learner.scheduler.load_state_dict(trainer_state["scheduler"])
    rng = trainer_state["torch_rng"]
    torch.set_rng_state(rng[rank] if rank < len(rng) else torch.get_rng_state())
    random.setstate(trainer_state["python_rng"])
    return state


def update(learner: PolicyLearner, batch: Batch, rank: int, world: int, version: int) -> UpdateStats:
    """This rank's shard of the batch, one optimizer step (DDP averages the gradients)."""
    mine = list(range(rank, len(batch.episodes), world))
    shard = collate([batch.episodes[i] for i in mine])
    agent_tokens = sum(sum(e.agent_mask) for e in batch.episodes)
    return learner.step(shard, batch.advantages[mine], len(batch.episodes), agent_tokens, version)


def iteration_report(batch: Batch, stats: UpdateStats, version: int, acked: int, seconds: dict) -> dict:
    rewards = [r for e in batch.episodes for r in e.rewards]
    episodes = len(batch.episodes)
    return {
        "reward_mean": sum(rewards) / len(rewards),
        "episode_return_mean": sum(sum(e.rewards) for e in batch.episodes) / episodes,
        "episodes": episodes,
        "dropped_stale": batch.dropped,
        "weights_acked_by": acked,
        "policy_version": version,
        "loss": stats.loss,
        "pg_loss": stats.pg_loss,
        "kl": stats.kl,
        "grad_norm": stats.grad_norm,
        "lr": stats.lr,
        "importance_weight": stats.importance_weight,
        "ppo_clip_fraction": stats.clip_fraction,
        "episodes_per_s": episodes / (seconds["rollout"] + seconds["learner"]),
        "time_rollout": batch.seconds["rollout"],
        "time_generate": batch.seconds["generate"],
        "time_environment": batch.seconds["environment"],
        "time_learner": seconds["learner"],
        "time_broadcast": seconds["broadcast"],
        "time_iteration": sum(seconds.values()),
        "batch_fingerprint": batch.fingerprint,
    }


@functools.cache
def saved_tokenizer(name_or_path: str):
    """The tokenizer every checkpoint carries, loaded once per learner process (a hub name or a folder)."""
    return AutoTokenizer.from_pretrained(name_or_path)


def save(
    config: PPGConfig,
    loop_config: dict,
    learner: PolicyLearner,
    model,
    iteration: int,
    version: int,
    prefetched: list[dict] | None = None,
):
    trainer_state = {
        "prefetched": prefetched,
        "optimizer": learner.optimizer.state_dict(),
        "scheduler": learner.scheduler.state_dict(),
        "torch_rng": [torch.get_rng_state()],
        "python_rng": random.getstate(),
    }
    state = {"iteration": iteration + 1, "policy_version": version}
    run_dir = loop_config["run_dir"]
    tokenizer = saved_tokenizer(loop_config["tokenizer_dir"])
    save_checkpoint(run_dir, iteration + 1, model, tokenizer, trainer_state, state, config)
    prune_checkpoints(run_dir, config.run.keep_last)


def train_loop_per_worker(loop_config: dict) -> None:
    config = PPGConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.run.seed + rank)
    # The float sums of an update depend on how many threads split them; fix the count from the
    # reserved CPUs, not the inherited environment, so a resumed run repeats its killed twin exactly.
    if not config.learner.use_gpu:
        torch.set_num_threads(max(1, int(config.learner.cpus_per_worker)))
    checkpoint = broadcast_from_rank_zero(starting_checkpoint(loop_config) if rank == 0 else None)
    learner = build_learner(config, loop_config, world, checkpoint)
    model = learner.model.module if hasattr(learner.model, "module") else learner.model
    state = restore(learner, checkpoint, rank)
    version, first, last = state["policy_version"], state["iteration"], config.run.iterations
    if rank == 0:
        collector = (OfflineCollector if config.run.offline_data else BatchCollector)(config)
        metrics = MetricsWriter(loop_config["run_dir"], config.run.loggers, loop_config["config"])
        collector.start_at(version, Path(checkpoint) / "policy" if checkpoint else loop_config["policy_path"])
        if isinstance(collector, BatchCollector):
            collector.restore_prefetched(state.get("prefetched"))
    # No per-iteration print here: metrics.jsonl is the record, and the driver says each iteration
    # from it (ppg/progress.py), without Ray's actor prefix.
    for iteration in range(first, last):
        t0 = time.perf_counter()
        if world == 1:  # nobody to share it with: no object store, no collective
            batch = collector.collect(iteration, version)
        else:  # the batch travels through the object store; the collective only carries its reference
            shared = [ray.put(collector.collect(iteration, version))] if rank == 0 else None
            batch = ray.get(broadcast_from_rank_zero(shared)[0])
        t_learn = time.perf_counter()
        stats = update(learner, batch, rank, world, version)
        version += 1
        t_update = time.perf_counter()

        report = {}
        if rank == 0:
            acked = collector.publish(version, model)
            seconds = {
                "rollout": t_learn - t0,
                "learner": t_update - t_learn,
                "broadcast": time.perf_counter() - t_update,
            }
            report = iteration_report(batch, stats, version, acked, seconds)
            metrics.write(iteration, report)
            if config.run.sample_every and (iteration + 1) % config.run.sample_every == 0:
                metrics.write_samples(iteration, batch.episodes)  # what the policy says, not just its reward
            if (iteration + 1) % config.run.checkpoint_every == 0 or iteration + 1 == last:
                prefetched = collector.prefetched_state() if isinstance(collector, BatchCollector) else None
                save(config, loop_config, learner, model, iteration, version, prefetched)
        ray.train.report({k: v for k, v in report.items() if isinstance(v, (int, float))})

    if rank == 0:
        metrics.close()
