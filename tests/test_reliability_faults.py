"""Faults during training, on real components (Ray on loopback, vLLM, Ray Train, real processes killed
with SIGKILL): nothing is lost, nothing is doubled, nothing is silently scored 0.

* The LLM partner/judge actor crashes mid-call: Ray restarts it, the call is redone, and the
  conversations come out exactly as without the crash; once it cannot come back, the judge raises
  ``JudgeError`` and the partner ``ChatLLMUnavailable`` (never a reward of 0).
* A process is killed while it writes checkpoints (a large trainer state, killed as soon as a write
  has started): the newest complete checkpoint is intact and is the one ``latest_checkpoint`` gives.
* ``ppg train`` runs twice (two iterations each): in this process with its rollout worker killed as
  the second iteration starts, and as the ``ppg`` command killed (SIGKILL, whole process group)
  after its first checkpoint and continued with ``ppg train --resume``. Every iteration has exactly ``episodes_per_iteration`` episodes, and
  the two runs have the same batch fingerprints and end with the same parameters: neither fault
  changed a single episode or update.
* A learner worker, the pool actor and the partner actor killed: tests/test_reliability_chaos.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from ppg.config import load_config
from ppg.learner.checkpoint import latest_checkpoint, list_checkpoints, load_state, validate_checkpoint
from ppg.learner.metrics import read_metrics
from ppg.models import resolve_model

pytestmark = pytest.mark.slow

RUN = [
    "problem.name=myopic",
    "rollout.episodes_per_iteration=8",
    "rollout.group_size=4",
    "rollout.num_workers=1",
    "rollout.requests_per_worker=2",
    "rollout.max_tokens_per_turn=8",
    "run.iterations=2",
    "run.checkpoint_every=1",
    "run.keep_last=5",
    "run.final_eval_episodes=0",  # nothing here reads the end-of-run evaluation
]


@pytest.fixture(scope="module")
def model_path() -> str:
    return resolve_model("embedded:tiny")


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        assert proc is None or proc.poll() is None, f"the process ended (rc {proc.returncode}) before {what}"
        time.sleep(0.05)
    return value


# ---- the LLM partner / judge actor ---------------------------------------------------------------


def test_llm_actor_crash_mid_call_is_redone_and_a_lost_actor_is_an_error_not_a_zero(ray_cluster, model_path):
    from ray.exceptions import RayActorError

    from ppg.env.conversation import run_conversations
    from ppg.env.judges import JudgeError, JudgeRequest, LLMJudge
    from ppg.env.llm import ChatLLMUnavailable, RemoteChatLLM, start_chat_llm_actor
    from ppg.env.partners import LLMPartner
    from ppg.env.personas import load_personas
    from ppg.env.problems import make_problem
    from ppg.env.scripted_agents import warm_start_agent

    ray = ray_cluster
    actor = start_chat_llm_actor(model_path, num_cpus=1)  # production options: Ray restarts it
    ray.get(actor.ready.remote())
    llm = RemoteChatLLM(actor)
    problem = make_problem(load_config(None, ["problem.name=myopic"]).problem)
    personas, seeds = load_personas()[:6], list(range(6))

    def play():  # greedy partner and judge: a redone call gives the same answer
        return run_conversations(
            problem, personas, seeds, warm_start_agent(0), LLMPartner(llm, temperature=0.0), LLMJudge(llm)
        )

    reference = play()
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))

    outcome: dict = {}
    player = threading.Thread(target=lambda: outcome.update(result=play()), daemon=True)
    player.start()
    # A long call ahead of the run's next one, so that the run certainly has a call in flight when
    # the process dies (the actor runs one call at a time).
    hog_convs = [[{"role": "user", "content": f"rate reply {i}"}] for i in range(256)]
    hog = actor.choice_logprobs.remote(hog_convs, [str(i) for i in range(11)])
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)  # a crash, not a polite stop
    player.join(timeout=600)
    assert "result" in outcome, "the conversations did not finish after the actor was restarted"
    with pytest.raises(RayActorError):
        ray.get(hog)  # it was running when the process died
    assert llm.redone >= 1, "no call was redone"
    assert ray.get(actor.__ray_call__.remote(lambda self: os.getpid())) != pid, "not a new process"
    for got, want in zip(outcome["result"], reference, strict=True):
        assert got.messages == want.messages and got.rewards == want.rewards

    ray.kill(actor)  # gone for good: no restart
    request = JudgeRequest(
        personas[0], ({"role": "user", "content": "hi"},), "you should try jazz.", "alignment"
    )
    with pytest.raises(JudgeError, match="LLM judge unavailable"):
        LLMJudge(llm).score([request])
    with pytest.raises(ChatLLMUnavailable, match="dead for good"):
        play()


# ---- a checkpoint write killed midway ------------------------------------------------------------

WRITER = r"""
import sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
from ppg.config import load_config
from ppg.learner.checkpoint import CheckpointError, latest_checkpoint, prune_checkpoints, save_checkpoint
run, model_path = Path(sys.argv[1]), sys.argv[2]
model, config = AutoModelForCausalLM.from_pretrained(model_path), load_config()
try:
    start = int(latest_checkpoint(run).name.split("_")[1]) + 1
except CheckpointError:
    start = 1
for i in range(start, start + 1000):
    trainer_state = {"payload": torch.full((16_000_000,), float(i))}  # 64 MB: a wide window to die in
    save_checkpoint(run, i, model, model_path, trainer_state, {"iteration": i, "policy_version": i}, config)
    prune_checkpoints(run, keep_last=2)
    print(f"saved {i}", flush=True)
"""


def test_a_process_killed_while_writing_a_checkpoint_leaves_the_previous_one_intact(tmp_path, model_path):
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    killed_mid_write = []
    for trial, delay in enumerate([0.0, 0.05, 0.15]):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(run), model_path], stdout=subprocess.PIPE, text=True
        )
        saved = [int(proc.stdout.readline().split()[1])]  # one complete checkpoint from this process
        wait_for(lambda p=proc: list(checkpoints.glob(f".iter_*.tmp-{p.pid}")), 120, "a write", proc)
        time.sleep(delay)
        proc.kill()
        rest = proc.communicate(timeout=60)[0]
        saved += [int(line.split()[1]) for line in rest.splitlines() if line.startswith("saved")]
        killed_mid_write.append(bool(list(checkpoints.glob(f".iter_*.tmp-{proc.pid}"))))

        latest = latest_checkpoint(run)
        iteration = int(latest.name.split("_")[1])
        assert iteration >= saved[-1], f"trial {trial}: acknowledged checkpoint {saved[-1]} lost"
        for folder in list_checkpoints(run):  # nothing half-written or half-deleted is visible
            validate_checkpoint(folder)
        state, trainer_state = load_state(latest)
        assert state == {"iteration": iteration, "policy_version": iteration}
        payload = trainer_state["payload"]
        assert payload.shape == (16_000_000,) and payload[0] == payload[-1] == iteration
    assert any(killed_mid_write), "no trial was killed in the middle of a write"
    # the next writer continued from the newest intact checkpoint and cleaned up the leftovers
    assert len(list(checkpoints.glob(".iter_*"))) <= 1


# ---- ppg train: a rollout worker killed, and the driver killed and resumed ---------------------


@pytest.fixture(scope="module")
def run_with_a_killed_worker(ray_cluster, tmp_path_factory):
    """``train()`` in a thread; when the first checkpoint appears, iteration 1 is starting: its
    rollout worker is killed (found by name through the pool, a named actor)."""
    from ppg.driver import train

    ray = ray_cluster
    root = tmp_path_factory.mktemp("worker-kill")
    config = load_config(None, [*RUN, f"run.output_dir={root}", "run.name=a"])
    outcome: dict = {}
    thread = threading.Thread(
        target=lambda: outcome.update(run=train(config, run_dir=root / "a")), daemon=True
    )
    thread.start()
    wait_for(
        lambda: (root / "a" / "checkpoints" / "iter_000001").is_dir() or not thread.is_alive(), 900, "iter 1"
    )
    pool = ray.get_actor("ppg-rollout-pool")
    (victim,) = ray.get(pool.versions.remote())
    ray.kill(ray.get_actor(victim))
    in_iteration = not (root / "a" / "checkpoints" / "iter_000002").exists()  # the last one
    thread.join(timeout=900)
    assert "run" in outcome, "train() did not finish"
    return outcome["run"], victim, in_iteration


def test_training_with_a_killed_rollout_worker_loses_and_doubles_nothing(run_with_a_killed_worker):
    import ray

    run, victim, in_iteration = run_with_a_killed_worker
    assert in_iteration, "the worker was killed after iteration 1 had finished"
    with pytest.raises(ValueError):
        ray.get_actor(victim)  # really dead
    rows = read_metrics(run)
    assert [r["iteration"] for r in rows] == [0, 1]
    assert all(r["episodes"] == 8 and r["dropped_stale"] == 0 for r in rows)
    assert all(r["weights_acked_by"] == 1 for r in rows), "the replacement worker got the weights"
    assert [r["policy_version"] for r in rows] == [1, 2]


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _ppg(args: list[str], log: Path) -> subprocess.Popen:
    """``ppg`` in its own session (so that it and the local Ray cluster it starts can be killed as
    one group), as from a fresh shell: never attached to this session's cluster, and with Ray's auth
    mode left to Ray's default (``ray.init`` in this process set ``RAY_AUTH_MODE``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PYTHONUNBUFFERED"] = "1"
    exe = str(Path(sys.executable).with_name("ppg"))
    with log.open("w") as out:
        return subprocess.Popen(
            [exe, *args], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def test_killed_driver_resumes_exactly_like_the_run_it_was(run_with_a_killed_worker, tmp_path):
    reference, _, _ = run_with_a_killed_worker
    out = tmp_path / "runs"
    driver = _ppg(["train", *RUN, f"run.output_dir={out}", "run.name=b"], tmp_path / "killed.log")
    first = wait_for(
        lambda: list(out.glob("b-*/checkpoints/iter_000001")), 900, "the first checkpoint", driver
    )
    started = _tree(driver.pid)  # the driver, its local Ray cluster, its workers
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and all that shares its process group
    driver.wait(timeout=60)
    _, orphans = psutil.wait_procs(started, timeout=10)  # Ray's daemons die with their driver
    print(f"\nkilled run: {len(started)} processes, {len(orphans)} outlived the driver by 10 s")
    for p in orphans:  # whatever did not: this test started it, this test ends it
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    assert not psutil.wait_procs(orphans, timeout=30)[1], "processes of the killed run survive"
    run = first[0].parents[1]
    assert not (run / "checkpoints" / "iter_000002").exists(), "the run finished before it was killed"

    resumed = _ppg(["train", "--resume", str(run)], tmp_path / "resumed.log")
    try:
        assert resumed.wait(timeout=900) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    finally:
        for p in _tree(resumed.pid):  # only if it had to be stopped (timeout)
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()

    a, b = read_metrics(reference), read_metrics(run)
    assert [r["iteration"] for r in b] == [0, 1] and all(r["episodes"] == 8 for r in b)
    assert [r["batch_fingerprint"] for r in a] == [r["batch_fingerprint"] for r in b], "same batches"
    wa = load_file(latest_checkpoint(reference) / "policy" / "model.safetensors")
    wb = load_file(latest_checkpoint(run) / "policy" / "model.safetensors")
    assert wa.keys() == wb.keys()
    differ = {k: float((wa[k] - wb[k]).abs().max()) for k in wa if not torch.equal(wa[k], wb[k])}
    steps = [[(r["loss"], r["grad_norm"], r["lr"]) for r in rows] for rows in (a, b)]
    assert not differ, (
        f"same parameters: {len(differ)} tensors differ (max {max(differ.values())}); loss, grad_norm, lr per iteration: {steps}"
    )

    killed_log = (tmp_path / "killed.log").read_text()
    assert f"continue with: ppg train --resume {run}" in killed_log, "the killed run said how to go on"
    # Ray's own lines go to the run's console log, not the terminal (ppg/console.py): read both
    log = killed_log + (tmp_path / "resumed.log").read_text() + (run / "logs" / "console.log").read_text()
    assert "Token authentication is enabled" in log, "ppg train must leave Ray's token auth on"
    token = Path.home() / ".ray" / "auth_token"
    if token.is_file() and token.read_text().strip():
        assert token.read_text().strip() not in log, "Ray's auth token in the driver's output"
