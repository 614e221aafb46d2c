"""Chaos: one ``ppg train`` run in which every kind of process a run owns is killed at a random
iteration - the Ray Train learner worker (SIGKILL), a rollout worker, the rollout pool actor and the
LLM partner actor (SIGKILL) - ends with exactly the parameters of the same run without a fault.

How each one recovers, by itself: Ray Train restarts the learner, which continues from the newest
checkpoint (``run.max_failures``); the pool replaces a dead worker and redoes its request; Ray
restarts the pool actor (its workers die with it and come back), the learner fails on the lost call
and restarts, putting every worker on the run's config, weights and version; Ray restarts the
partner actor and the worker redoes its call, whose sampling seed comes from the conversations, so
the partner says what it said before. The partner samples (``temperature`` 0.7) and the policy
samples with per-request seeds: every redone piece of work is the same work.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from ppg.config import load_config
from ppg.learner.checkpoint import latest_checkpoint
from ppg.learner.metrics import read_metrics
from ppg.ray_session import CHAT_LLM_ACTOR, POOL_ACTOR

pytestmark = pytest.mark.slow

ITERATIONS = 5
RUN = [
    "problem.name=myopic",
    "problem.partner=llm",  # a partner actor to kill
    "rollout.episodes_per_iteration=8",
    "rollout.group_size=4",
    "rollout.num_workers=1",
    "rollout.requests_per_worker=2",
    "rollout.max_tokens_per_turn=8",
    f"run.iterations={ITERATIONS}",
    "run.checkpoint_every=1",
    "run.keep_last=2",
    "run.final_eval_episodes=0",
    "run.max_failures=5",  # two faults fail the learner; headroom for faults that coincide
]


def _train_in_thread(root, name: str) -> tuple[threading.Thread, dict]:
    from ppg.driver import train

    config = load_config(None, [*RUN, f"run.output_dir={root}", f"run.name={name}"])
    outcome: dict = {}

    def target():
        try:
            outcome["run"] = train(config, run_dir=root / name)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def _iterations_done(run) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def kill_learner_worker(ray) -> None:
    deadline = time.monotonic() + 300
    while True:  # exactly one: not between a restart's old and new worker
        learners = [
            p
            for p in psutil.process_iter(["cmdline"])
            if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or [])
        ]
        if len(learners) == 1:
            return learners[0].kill()
        assert time.monotonic() < deadline, f"no single learner worker to kill: {learners}"
        time.sleep(0.2)


def kill_rollout_worker(ray) -> None:
    pool = ray.get_actor(POOL_ACTOR)
    name = next(iter(ray.get(pool.versions.remote())))
    ray.kill(ray.get_actor(name))  # for good: the pool must replace it


def kill_pool_actor(ray) -> None:
    ray.kill(ray.get_actor(POOL_ACTOR), no_restart=False)  # the process dies; Ray may restart it


def kill_partner_actor(ray) -> None:
    actor = ray.get_actor(CHAT_LLM_ACTOR)
    os.kill(ray.get(actor.__ray_call__.remote(lambda self: os.getpid())), signal.SIGKILL)


FAULTS = {
    "learner worker": kill_learner_worker,
    "rollout worker": kill_rollout_worker,
    "pool actor": kill_pool_actor,
    "partner actor": kill_partner_actor,
}


def test_a_run_that_loses_every_kind_of_process_ends_exactly_like_one_that_lost_none(ray_cluster, tmp_path):
    ray = ray_cluster
    thread, outcome = _train_in_thread(tmp_path, "clean")
    thread.join(timeout=900)
    assert "run" in outcome, f"the clean run failed: {outcome.get('error')!r}"
    clean = outcome["run"]

    rng = random.Random(int(os.environ.get("PPG_CHAOS_SEED", "0")))
    # after iteration k has finished, k < ITERATIONS - 1: the run is still going when a fault lands
    when = {fault: rng.randrange(1, ITERATIONS - 1) for fault in FAULTS}
    print(f"\nchaos schedule (kill after iteration): {when}")
    thread, outcome = _train_in_thread(tmp_path, "chaos")
    run = tmp_path / "chaos"
    done_faults: list[tuple[str, int]] = []
    deadline = time.monotonic() + 1200
    while thread.is_alive() and time.monotonic() < deadline:
        reached = _iterations_done(run)
        for fault, k in when.items():
            if fault not in dict(done_faults) and reached >= k and reached < ITERATIONS:
                FAULTS[fault](ray)
                done_faults.append((fault, reached))
                time.sleep(1.0)  # one fault at a time: let the last one be noticed
        time.sleep(0.1)
    thread.join(timeout=60)
    print(f"faults injected (fault, iterations done): {done_faults}")
    assert "run" in outcome, f"the run did not survive the faults: {outcome.get('error')!r}"
    assert len(done_faults) == len(FAULTS), f"some faults came after the last iteration: {done_faults}"

    a, b = read_metrics(clean), read_metrics(run)
    assert [r["iteration"] for r in b] == list(range(ITERATIONS))
    assert [r["batch_fingerprint"] for r in a] == [r["batch_fingerprint"] for r in b], "same batches"
    assert [r["reward_mean"] for r in a] == [r["reward_mean"] for r in b]
    wa = load_file(latest_checkpoint(clean) / "policy" / "model.safetensors")
    wb = load_file(latest_checkpoint(run) / "policy" / "model.safetensors")
    differing = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differing, f"parameters differ from the run without faults: {differing[:5]}"
