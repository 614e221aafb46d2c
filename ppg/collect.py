"""``ppg collect``: play a policy on the training personas, judged as in training, into a
logged-conversation file (``ppg.offline``) for offline PPG (``ppg train run.offline_data=FILE``).

The episodes are what a training iteration would sample - the config's problem, judge, partner,
group size and sampling - only from a fixed policy (a checkpoint, or the initial model) and with a
request plan seeded apart from every training iteration's and the experiment pilot's, so a file and
the run trained on it never share a conversation by accident. The plan is split into requests of a
fixed size, not per rollout worker, and every conversation samples from its own seeded stream: the
same seed gives the same file on any number of workers.

``collect_on_pool`` does the playing on a running pool (a local ``RolloutPool`` or the named pool
actor, as ``ppg experiment`` holds one); ``collect`` is the command: its own pool, then the file.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import ray

from ppg.config import PPGConfig, load_config
from ppg.driver import start_workers_chat_llm
from ppg.env.factory import check_environment
from ppg.env.personas import load_personas, split_personas
from ppg.episode import Episode
from ppg.evaluate import call_pool
from ppg.learner.checkpoint import CONFIG, STATE, validate_checkpoint
from ppg.models import resolve_model
from ppg.offline import write_episodes
from ppg.ray_session import connect
from ppg.rollout.pool import RolloutPool, plan_requests

COLLECT_ITERATION = 99_998  # the request seed's "iteration": disjoint from training's and the pilot's
REQUEST_EPISODES = 32  # episodes per request: the plan (hence the file) does not depend on the pool size


def collect_requests(config: PPGConfig, episodes: int, seed: int) -> list:
    """The plan: ``episodes`` training-persona conversations in groups of ``rollout.group_size``."""
    group = config.rollout.group_size
    if episodes < 1 or episodes % group:
        raise ValueError(
            f"--episodes ({episodes}) must be a positive multiple of rollout.group_size ({group})"
        )
    personas, _ = split_personas(load_personas(config.problem.personas_file))
    return plan_requests(
        personas,
        episodes,
        group,
        num_requests=math.ceil(episodes / REQUEST_EPISODES),
        seed=seed * 1_000_003 + COLLECT_ITERATION,
        first_request_id=COLLECT_ITERATION * 10_000,
    )


def collect_on_pool(
    pool: Any, config: PPGConfig, weights_path: str, version: int, episodes: int, seed: int
) -> list[Episode]:
    """Play ``episodes`` training episodes of ``config`` with the policy at ``weights_path`` (stamped
    ``version``) on ``pool``, judged per turn as in training. ``pool``: a local ``RolloutPool`` or
    the pool actor's handle; it is reconfigured to ``config`` and these weights and left so.
    Deterministic in (config, seed, episodes); prints progress with episodes/s."""
    requests = collect_requests(config, episodes, seed)
    call_pool(pool, "reconfigure", config, version, str(weights_path))
    wave = max(1, config.rollout.num_workers * config.rollout.requests_per_worker)
    played: list[Episode] = []
    start = time.perf_counter()
    for first in range(0, len(requests), wave):
        chunk = requests[first : first + wave]
        got = call_pool(pool, "episodes", chunk)
        if [e.persona_id for e in got] != [p for r in chunk for p in r.persona_ids]:
            raise RuntimeError("the pool returned other episodes than requested")
        played += got
        elapsed = time.perf_counter() - start
        rate = len(played) / elapsed if elapsed > 0 else float("inf")
        eta = (episodes - len(played)) / rate if rate > 0 else float("nan")
        print(
            f"[ppg collect] {len(played)}/{episodes} episodes  {rate:.1f} episodes/s  ETA {eta:.0f}s",
            flush=True,
        )
    return played


def collect(
    out: str | Path,
    episodes: int = 256,
    checkpoint: str | Path | None = None,
    config_path: str | None = None,
    overrides: list[str] | None = None,
) -> Path:
    """``ppg collect``: ``episodes`` training episodes of ``checkpoint`` (default: the config's
    initial model) on a pool of its own, written to ``out``. With a checkpoint and no ``--config``
    its saved config is the base, as ``ppg eval`` does. Returns the file's path."""
    base: str | Path | None = config_path
    policy, version = None, 0
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        policy = validate_checkpoint(checkpoint, require_trainer_state=False)
        saved = checkpoint / CONFIG
        base = config_path or (saved if saved.is_file() else None)
        state = checkpoint / STATE
        version = json.loads(state.read_text())["policy_version"] if state.is_file() else 1
    config = load_config(base, overrides)
    check_environment(config)  # an unknown problem or a bad plug-in fails before any engine starts
    collect_requests(config, episodes, config.run.seed)  # and so does a bad --episodes
    initial = resolve_model(config.model.name_or_path)
    weights = str(policy) if policy is not None else initial
    connect(dashboard=config.run.dashboard)
    chat_llm = start_workers_chat_llm(config)  # an LLM partner/judge, when the problem has one
    pool = RolloutPool(config, weights, name_prefix="ppg-collect")
    try:
        played = collect_on_pool(pool, config, weights, version, episodes, config.run.seed)
    finally:
        pool.shutdown()
        if chat_llm is not None:
            ray.kill(chat_llm)
    r = config.rollout
    header = {
        "problem": config.problem.name,
        "model": config.model.name_or_path,
        "policy": str(checkpoint) if checkpoint is not None else f"initial ({config.model.name_or_path})",
        "policy_version": version,
        "seed": config.run.seed,
        "group_size": r.group_size,
        "judge": config.problem.judge,
        "partner": config.problem.partner,
        "temperature": r.temperature,
        "top_p": r.top_p,
        "max_tokens_per_turn": r.max_tokens_per_turn,
    }
    return write_episodes(out, played, header)
