"""The training loop that runs on every Ray Train worker (``TorchTrainer``, DDP: gloo on CPU, NCCL on GPU).

Rank 0 drives: it asks the rollout pool for the iteration's episodes, computes advantages on the
whole batch, and shares them; every rank updates on its shard; rank 0 then broadcasts the new
weights (version v+1) to the rollout workers, writes metrics and checkpoints. Synchronous by
default; with ``run.async_rollouts`` the next iteration's rollouts run during this update (episodes
are then one version behind, and ``learner.max_staleness`` / ``learner.off_policy`` apply).
"""

from __future__ import annotations

import hashlib
import random
import time

import torch

from ppg.config import PPGConfig
from ppg.episode import Episode, collate

POOL_ACTOR = "ppg-rollout-pool"


def batch_fingerprint(episodes: list[Episode]) -> str:
    """A short hash of an iteration's batch: equal batches, equal fingerprints (resume checks)."""
    h = hashlib.sha256()
    for e in episodes:
        h.update(repr((e.persona_id, e.group_id, e.token_ids, e.rewards)).encode())
    return h.hexdigest()[:16]


def iteration_requests(config: PPGConfig, personas, iteration: int):
    from ppg.rollout.pool import plan_requests

    r = config.rollout
    return plan_requests(
        personas,
        r.episodes_per_iteration,
        r.group_size,
        num_requests=r.num_workers * r.requests_per_worker,
        seed=config.run.seed * 1_000_003 + iteration,
        first_request_id=iteration * 10_000,
    )


def train_loop_per_worker(loop_config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    from ray.train.collective import broadcast_from_rank_zero
    from transformers import AutoModelForCausalLM

    from ppg.env.personas import load_personas, split_personas
    from ppg.learner.checkpoint import load_state, prune_checkpoints, save_checkpoint
    from ppg.learner.metrics import MetricsWriter
    from ppg.learner.update import PolicyLearner, check_staleness, global_advantages
    from ppg.serve.registry import publish_policy

    config = PPGConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.run.seed + rank)
    # The float sums of an update depend on how many threads split them; fix the count from the
    # reserved CPUs, not the inherited environment, so a resumed run repeats its killed twin exactly.
    if not config.learner.use_gpu:
        torch.set_num_threads(max(1, int(config.learner.cpus_per_worker)))

    model = AutoModelForCausalLM.from_pretrained(loop_config["policy_path"], dtype=torch.float32)
    reference = None
    if config.learner.kl_coef > 0:
        reference = AutoModelForCausalLM.from_pretrained(
            loop_config["reference_path"], dtype=torch.float32
        ).eval()
        reference.requires_grad_(False)
    model = ray.train.torch.prepare_model(model)
    learner = PolicyLearner(model, config.objective, config.learner, config.run.iterations, reference, world)
    state = {"iteration": 0, "policy_version": 0}
    if loop_config.get("resume_from"):
        state, trainer_state = load_state(loop_config["resume_from"])
        learner.optimizer.load_state_dict(trainer_state["optimizer"])
        learner.scheduler.load_state_dict(trainer_state["scheduler"])
        torch.set_rng_state(
            trainer_state["torch_rng"][rank]
            if rank < len(trainer_state["torch_rng"])
            else torch.get_rng_state()
        )
        random.setstate(trainer_state["python_rng"])
    version = state["policy_version"]
    run_dir = loop_config["run_dir"]

    if rank == 0:
        pool = ray.get_actor(POOL_ACTOR)
        personas, _ = split_personas(load_personas(config.problem.personas_file))
        metrics = MetricsWriter(run_dir)
        prefetch = None
    start_time, start_iteration = time.perf_counter(), state["iteration"]

    for iteration in range(state["iteration"], config.run.iterations):
        t0 = time.perf_counter()
        payload = None
        if rank == 0:
            requests = iteration_requests(config, personas, iteration)
            ref = prefetch if prefetch is not None else pool.collect.remote(requests)
            results = ray.get(ref)
            prefetch = None
            if config.run.async_rollouts and iteration + 1 < config.run.iterations:
                prefetch = pool.collect.remote(iteration_requests(config, personas, iteration + 1))
            t_rollout = time.perf_counter()
            episodes = [e for r in results for e in r.episodes]
            fresh = check_staleness(episodes, version, config.learner.max_staleness)
            if config.learner.off_policy == "reject":
                fresh = [e for e in fresh if e.policy_version == version]
            dropped = len(episodes) - len(fresh)
            if not fresh:
                raise RuntimeError(
                    f"iteration {iteration}: every episode was older than learner.max_staleness"
                )
            advantages = global_advantages(fresh, config.objective)
            payload = {
                "episodes": fresh,
                "advantages": advantages,
                "timing": {
                    "rollout": t_rollout - t0,
                    "generate": max(r.seconds["generate"] for r in results),
                    "environment": max(r.seconds["environment"] for r in results),
                },
                "dropped": dropped,
                "fingerprint": batch_fingerprint(fresh),
            }
        # The batch travels through the object store; the collective only carries its reference.
        [payload_ref] = broadcast_from_rank_zero([ray.put(payload)] if rank == 0 else None)
        payload = ray.get(payload_ref)
        episodes, advantages = payload["episodes"], payload["advantages"]

        t_learn = time.perf_counter()
        mine = list(range(rank, len(episodes), world))
        shard = collate([episodes[i] for i in mine])
        all_agent_tokens = sum(sum(e.agent_mask) for e in episodes)
        stats = learner.step(shard, advantages[mine], len(episodes), all_agent_tokens, version)
        version += 1
        t_update = time.perf_counter()

        report = {}
        if rank == 0:
            unwrapped = model.module if hasattr(model, "module") else model
            weights = ray.put({k: v.detach().cpu().clone() for k, v in unwrapped.state_dict().items()})
            if config.serve.enabled:  # the HTTP replicas follow within serve.reload_poll_s
                publish_policy(config.serve.app_name, version, weights)
            acks = ray.get(pool.update_weights.remote(version, weights))
            if set(acks.values()) != {version}:
                raise RuntimeError(
                    f"weight broadcast incomplete: workers report versions {acks}, expected {version}"
                )
            t_broadcast = time.perf_counter()
            rewards = [r for e in episodes for r in e.rewards]
            done = iteration + 1 - start_iteration
            elapsed = time.perf_counter() - start_time
            report = {
                "reward_mean": sum(rewards) / len(rewards),
                "episode_return_mean": sum(sum(e.rewards) for e in episodes) / len(episodes),
                "episodes": len(episodes),
                "dropped_stale": payload["dropped"],
                "weights_acked_by": len(acks),
                "policy_version": version,
                "loss": stats.loss,
                "pg_loss": stats.pg_loss,
                "kl": stats.kl,
                "grad_norm": stats.grad_norm,
                "lr": stats.lr,
                "importance_weight": stats.importance_weight,
                "episodes_per_s": len(episodes) / (t_update - t0),
                "time_rollout": payload["timing"]["rollout"],
                "time_generate": payload["timing"]["generate"],
                "time_environment": payload["timing"]["environment"],
                "time_learner": t_update - t_learn,
                "time_broadcast": t_broadcast - t_update,
                "time_iteration": t_broadcast - t0,
                "batch_fingerprint": payload["fingerprint"],
            }
            metrics.write(iteration, report)
            if config.run.sample_every and (iteration + 1) % config.run.sample_every == 0:
                metrics.write_samples(iteration, episodes)  # what the policy says, not just its reward
            last = iteration + 1 == config.run.iterations
            if (iteration + 1) % config.run.checkpoint_every == 0 or last:
                trainer_state = {
                    "optimizer": learner.optimizer.state_dict(),
                    "scheduler": learner.scheduler.state_dict(),
                    "torch_rng": [torch.get_rng_state()],
                    "python_rng": random.getstate(),
                }
                save_checkpoint(
                    run_dir,
                    iteration + 1,
                    unwrapped,
                    loop_config["tokenizer_dir"],
                    trainer_state,
                    {"iteration": iteration + 1, "policy_version": version},
                    config,
                )
                prune_checkpoints(run_dir, config.run.keep_last)
            eta = elapsed / done * (config.run.iterations - iteration - 1)
            print(
                f"[ppg] iter {iteration + 1}/{config.run.iterations}  reward {report['reward_mean']:+.3f}  "
                f"loss {stats.loss:+.3f}  {report['episodes_per_s']:.1f} episodes/s  "
                f"elapsed {elapsed:.0f}s  ETA {eta:.0f}s",
                flush=True,
            )
        ray.train.report({k: v for k, v in report.items() if isinstance(v, (int, float))})

    if rank == 0:
        metrics.close()
