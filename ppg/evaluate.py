"""``ppg eval``: score a checkpoint on a problem's held-out personas, with the same rollout machinery."""

from __future__ import annotations

from pathlib import Path

from ppg.config import PPGConfig, load_config


def evaluate(
    checkpoint: str | Path,
    problem: str | None = None,
    episodes: int = 32,
    config_path: str | None = None,
    overrides: list[str] | None = None,
) -> dict:
    from ppg.driver import connect_ray
    from ppg.env.personas import load_personas, split_personas
    from ppg.learner.checkpoint import CONFIG, validate_checkpoint
    from ppg.rollout.pool import RolloutPool, plan_requests

    checkpoint = Path(checkpoint)
    policy = validate_checkpoint(checkpoint, require_trainer_state=False)
    saved = checkpoint / CONFIG
    base = config_path or (saved if saved.is_file() else None)
    extra = list(overrides or []) + ([f"problem.name={problem}"] if problem else [])
    config: PPGConfig = load_config(base, extra + ["rollout.num_workers=1"])
    group = config.rollout.group_size
    episodes = max(group, episodes - episodes % group)
    connect_ray()
    pool = RolloutPool(config, str(policy), name_prefix="ppg-eval")
    try:
        _, held_out = split_personas(load_personas(config.problem.personas_file))
        requests = plan_requests(held_out, episodes, group, 2, seed=config.run.seed + 99991, split="eval")
        rollouts = pool.episodes(requests)
    finally:
        pool.shutdown()
    turns = len(rollouts[0].rewards)
    per_turn = [sum(e.rewards[t] for e in rollouts) / len(rollouts) for t in range(turns)]
    return {
        "checkpoint": str(checkpoint),
        "problem": config.problem.name,
        "episodes": len(rollouts),
        "held_out_personas": len(held_out),
        "reward_mean": sum(per_turn) / turns,
        "reward_per_turn": per_turn,
        "episode_return_mean": sum(sum(e.rewards) for e in rollouts) / len(rollouts),
    }
