"""``ppg train`` and ``ppg eval``: the system's main job, from a config to a trained, checkpointed policy.

The driver connects to Ray (a local loopback cluster, or the cluster of ``ray job submit`` /
``RAY_ADDRESS``), starts the rollout pool as a named actor (so it can be scaled from outside while
the run goes), and runs the learner as a Ray Train ``TorchTrainer``.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from ppg import console
from ppg.config import PPGConfig, check_trainable, load_config
from ppg.env.factory import check_environment
from ppg.env.llm import start_chat_llm_actor
from ppg.evaluate import final_evaluation, summary_lines
from ppg.files import atomic_write_text
from ppg.learner.checkpoint import latest_checkpoint, load_state, validate_checkpoint
from ppg.learner.loop import train_loop_per_worker
from ppg.learner.metrics import plot_rewards, read_metrics
from ppg.models import resolve_model
from ppg.offline import check_offline_data
from ppg.progress import IterationPrinter, train_summary
from ppg.ray_session import CHAT_LLM_ACTOR, POOL_ACTOR, connect
from ppg.rollout.pool import RolloutPool
from ppg.serve.service import PolicyService

log = logging.getLogger(__name__)


def new_run_dir(config: PPGConfig) -> Path:
    # the entrypoint of `ray job submit` gets RAY_JOB_CONFIG_JSON_ENV_VAR (its runtime env)
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and not Path(config.run.output_dir).is_absolute():
        log.warning(
            "run.output_dir=%s is relative inside a Ray job: it lands in the job's temporary copy of "
            "--working-dir, which Ray deletes afterwards; set an absolute (shared) path",
            config.run.output_dir,
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.run.output_dir).resolve() / f"{config.run.name}-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


def train(
    config: PPGConfig | None = None,
    resume: Path | None = None,
    overrides: list[str] | None = None,
    run_dir: Path | None = None,
    pool=None,
    final_eval: bool | None = None,
    progress_every: int | None = None,
) -> Path:
    """Train; returns the run folder. ``resume`` continues a run folder from its latest checkpoint.
    ``pool``: a running rollout pool actor to reuse (``ppg experiment``); it is reconfigured for this
    run and left running. ``final_eval``: end with the held-out evaluation of the final vs the initial
    policy (``run.final_eval_episodes``, into ``<run_dir>/eval``); by default only when the run owns
    its pool (``ppg train``), not for a pool passed in (``ppg experiment`` measures its own way).
    ``progress_every``: say every n-th iteration's line (default: every one for ``ppg train``, a fifth
    of the run for a pool passed in, which runs many). Under the CLI, library output goes to
    ``<run_dir>/logs/console.log`` (``ppg.console``); the terminal gets ppg's own lines."""
    resume_from = None
    if resume is not None:
        run_dir = Path(resume).resolve()
        config = check_offline_data(check_trainable(load_config(run_dir / "config.yaml", overrides)))
        check_environment(config)  # problem, judge, partner (plug-ins imported here) before anything starts
        resume_from = latest_checkpoint(run_dir)
        policy_path = str(validate_checkpoint(resume_from))
    else:
        assert config is not None
        # run.offline_data: checked before the run folder exists, and absolute from here on
        config = check_offline_data(check_trainable(config))
        check_environment(config)  # problem, judge, partner (plug-ins imported here) before anything starts
        run_dir = Path(run_dir).resolve() if run_dir else new_run_dir(config)
        run_dir.mkdir(parents=True, exist_ok=True)
        policy_path = None
    atomic_write_text(run_dir / "config.yaml", config.to_yaml())
    log = console.capture(run_dir / "logs" / "console.log")
    # Said first, so that it is on the screen whatever ends this process (even SIGKILL): the
    # learner survives its own failures (run.max_failures), the driver's need this command.
    console.say(
        f"[ppg] run folder {run_dir}; if this process dies, continue with: ppg train --resume {run_dir}"
    )
    if config.run.offline_data:
        console.say(f"[ppg] offline PPG: every batch comes from {config.run.offline_data}")

    reference_path = resolve_model(config.model.name_or_path)  # the initial policy (KL anchor, tokenizer)
    policy_path = policy_path or reference_path
    connect(dashboard=config.run.dashboard, serve_ingress=config.serve.ingress)
    version = 0
    if resume_from is not None:  # the workers serve the checkpoint's weights, as its version
        version = load_state(resume_from)[0]["policy_version"]
    chat_llm = start_workers_chat_llm(config)  # the LLM partner/judge the rollout workers look up by name
    own_pool = pool is None
    if own_pool:
        pool = start_pool(config, policy_path)  # the learner sets a resumed run's version on it
    else:
        ray.get(pool.reconfigure.remote(config, version, policy_path))
    service, report = None, None
    every = progress_every or (1 if own_pool else max(1, config.run.iterations // 5))
    try:
        if config.serve.enabled:  # the live policy over HTTP; the learner publishes every update to it
            service = PolicyService(config, policy_path, policy_version=version, run_dir=str(run_dir))
            console.say(
                f"[ppg] watch it learn: {service.url}/live   talk to it: {service.url}/   API: {service.url}/v1"
            )
        console.say(
            f"[ppg] starting the rollout workers and the learner ({config.run.iterations} iterations)"
        )
        with IterationPrinter(run_dir, config.run.iterations, every=every):
            fit(config, run_dir, policy_path, reference_path, resume_from)
        if (own_pool if final_eval is None else final_eval) and config.run.final_eval_episodes:
            # the pool still runs the final policy: no new engines, only the initial weights swapped in
            console.say("[ppg] held-out evaluation of the final vs the initial policy ...")
            report = final_evaluation(pool, config, run_dir, reference_path)
    finally:
        if own_pool:
            ray.get(pool.shutdown.remote())
            ray.kill(pool)
        if chat_llm is not None:
            ray.kill(chat_llm)
        if service is not None and config.serve.after_training == "stop":
            service.close()
    rows = read_metrics(run_dir)
    if rows:
        plot_rewards(run_dir, f"{config.problem.name} / {config.objective.policy_class.type}")
    if own_pool:
        eval_lines = summary_lines(report, after="final") if report else []
        page = f"http://{config.serve.host}:{config.serve.port}/"
        for line in train_summary(run_dir, rows, eval_lines, str(log) if log else None, page):
            console.say(line)
    if service is not None and config.serve.after_training == "keep":
        try:
            service.wait_for_interrupt("the trained policy")
        finally:
            service.close()
    return run_dir


def start_workers_chat_llm(config: PPGConfig):
    """With ``problem.partner`` or ``problem.judge`` = llm: start (or reuse) the named vLLM actor that
    rollout workers share, and wait for its engine. None when the config needs no LLM."""
    if not config.problem.uses_llm:
        return None
    try:
        ray.get_actor(CHAT_LLM_ACTOR)
        return None  # someone else's (e.g. a test's or an experiment's): not ours to stop
    except ValueError:
        pass
    path = resolve_model(config.problem.partner_model or config.model.name_or_path)
    actor = start_chat_llm_actor(
        path,
        name=CHAT_LLM_ACTOR,
        num_cpus=1,
        num_gpus=config.rollout.gpus_per_worker,
        kv_cache_gib=config.rollout.kv_cache_gib,
        trust_remote_code=config.model.trust_remote_code,
    )
    ray.get(actor.ready.remote())
    return actor


def start_pool(config: PPGConfig, policy_path: str):
    actor = (
        ray.remote(RolloutPool)
        # A pool whose process dies is started again by Ray (its workers die with it and are
        # started anew); the learner's own restart then puts them on the run's config and weights.
        .options(name=POOL_ACTOR, num_cpus=0, max_concurrency=8, max_restarts=config.run.max_failures)
        .remote(config, policy_path)
    )
    ray.get(actor.versions.remote())  # wait until the workers are up
    return actor


def learner_scaling(config: PPGConfig) -> ScalingConfig:
    """The learner's Ray Train workers. A GPU share below 1 (``learner.gpus_per_worker``) lets one
    GPU hold the learner and a rollout worker (``rollout.gpus_per_worker``; vLLM then takes only
    ``rollout.engine.gpu_memory_utilization`` of its memory)."""
    learner = config.learner
    resources = {"CPU": learner.cpus_per_worker, **learner.resources}
    if learner.use_gpu:
        resources["GPU"] = learner.gpus_per_worker
    return ScalingConfig(
        num_workers=learner.num_workers, use_gpu=learner.use_gpu, resources_per_worker=resources
    )


def fit(
    config: PPGConfig, run_dir: Path, policy_path: str, reference_path: str, resume_from: Path | None
) -> None:
    # Ray Train's controller collects each ray.train.report on a poll (2 s by default), and a worker's
    # next report waits for it: at ppg's ~0.5 s iterations that wait dominated (BENCHMARKS.md, TRL).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    learner = config.learner
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "run_dir": str(run_dir),
            "policy_path": policy_path,
            "reference_path": reference_path,
            "tokenizer_dir": reference_path,
            "resume_from": str(resume_from) if resume_from else None,
            "attempt_token": uuid.uuid4().hex,  # tells a restarted learner from the first one
        },
        scaling_config=learner_scaling(config),
        torch_config=TorchConfig(backend="nccl" if learner.use_gpu else "gloo"),
        run_config=RunConfig(
            name="learner",
            storage_path=str(run_dir / "ray_train"),
            failure_config=FailureConfig(max_failures=config.run.max_failures),
        ),
    )
    trainer.fit()
