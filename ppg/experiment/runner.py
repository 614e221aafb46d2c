"""``ppg experiment --suite FILE``: run a suite's grid on one Ray cluster and one rollout pool, resumably.

Layout of the output folder (``--out``, default ``experiments/results/<suite name>``)::

    suite.json                               the suite as run (a later suite may only add to it)
    pilots/<problem>-seed<s>.json            per-class gradient statistics, the selector's pick
    pilots/<problem>-seed<s>-selector.json   the selector run's picks (one per reselect_every iterations)
    offline/<problem>-seed<s>.jsonl          the initial policy's logged conversations (offline methods)
    runs/<problem>/<row>/seed<s>/            an ordinary ppg run folder (metrics, checkpoints) ...
    runs/<problem>/<row>/seed<s>/heldout.json  ... its held-out evaluation: the score of the run
    runs/<problem>/<row>/seed<s>/done.json   written last: the cell is complete
    results.csv  results.md  selector.csv  reward_curves.png  heldout.png  gradient_variance.png

Rows: ``initial`` (the warm start, evaluated only), every method, ``selector`` (its pick, its own
run). Every run of a seed is evaluated on the same held-out personas, conversation and sampling seeds
(``suite.eval_episodes``), so methods are compared in pairs per seed.

Resuming: completed pilots and cells (``done.json``) are skipped; a cell with a checkpoint continues
from it (``ppg train --resume``, exact), one without starts over. The rollout pool's vLLM engines are
started once and reconfigured per cell (problem, seed, weights back to the initial policy).
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import shutil
import subprocess
import time
from pathlib import Path

import ray
import torch
from transformers import AutoModelForCausalLM

from ppg.collect import collect_on_pool
from ppg.config import PPGConfig, load_config
from ppg.console import say
from ppg.driver import start_pool, train
from ppg.env.personas import load_personas, split_personas
from ppg.evaluate import evaluate_on_pool
from ppg.experiment.report import write_report
from ppg.experiment.selector import gradient_moments, select_class
from ppg.experiment.suite import (
    HELDOUT,
    INITIAL,
    SELECTOR,
    Suite,
    SuiteError,
    cell_dir,
    config_defaults,
    offline_data_path,
    pilot_path,
    selector_path,
)
from ppg.files import atomic_write_text
from ppg.learner.checkpoint import STATE, latest_checkpoint, list_checkpoints
from ppg.models import resolve_model
from ppg.objectives import FullPlanning
from ppg.offline import write_episodes
from ppg.ray_session import connect
from ppg.rollout.pool import plan_requests

PILOT_ITERATION = 99_999  # the pilot batch's request seed: disjoint from every training iteration's


class GridProgress:
    """One line per finished step of the grid, with the rate so far and an ETA for the rest."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.skipped, self.start = total, 0, 0, time.perf_counter()

    def step(self, what: str, skipped: bool = False) -> None:
        self.done += 1
        self.skipped += skipped
        elapsed = time.perf_counter() - self.start
        ran = self.done - self.skipped
        eta = elapsed / ran * (self.total - self.done) if ran else float("nan")
        state = "already done" if skipped else f"{elapsed / 60:.1f} min so far"
        say(f"[ppg experiment] {self.done}/{self.total} {what} ({state}; ETA {eta / 60:.1f} min)")


def _record_suite(suite: Suite, out: Path) -> None:
    recorded = out / "suite.json"
    if recorded.is_file():
        old = json.loads(recorded.read_text())
        clashes = suite.extends(old, config_defaults())
        if clashes:
            raise SuiteError(
                f"{out} holds results of a different suite ({recorded}: {', '.join(clashes)} differ); a "
                "suite may only add methods, problems or seeds to a folder (where a default of the code "
                "changed since, pin its old value in the suite's base): use another --out, or delete the "
                "folder to start over"
            )
        merged = suite.model_dump(mode="json")
        if "defaults" in old:  # the first cells' code defaults (a folder older than this record has none)
            merged["defaults"] = old["defaults"]
        for section in ("methods", "problems"):
            merged[section] = {**old.get(section, {}), **merged[section]}
        merged["seeds"] = sorted(set(old.get("seeds", [])) | set(merged["seeds"]))
    else:
        merged = {**suite.model_dump(mode="json"), "defaults": config_defaults()}
    atomic_write_text(recorded, json.dumps(merged, indent=1, sort_keys=True))


def run_pilot(
    suite: Suite, problem: str, seed: int, pool, policy_path: str, phase: int = 0, version: int = 0
) -> dict:
    """Sample a pilot batch at ``policy_path`` (phase 0: the initial policy; phase k: the selector's
    policy after k * ``selector.reselect_every`` iterations, on fresh conversations) and measure every
    candidate class's gradient on it. With ``selector.max_pilot_episodes`` the pilot grows by
    ``pilot_episodes`` at a time while the full-return gradient is lost in its noise (round 0 is the
    fixed pilot, so a grown pilot starts with the same episodes)."""
    config = suite.config(problem, None, seed)
    r, spec = config.rollout, suite.selector
    ray.get(pool.reconfigure.remote(config, version, policy_path))
    personas, _ = split_personas(load_personas(config.problem.personas_file))
    n = spec.pilot_episodes
    n -= n % r.group_size
    model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
    candidates = suite.selector_candidates(problem)
    classes = {k: suite.methods[k].policy_class for k in candidates}
    if not any(c.type == "full" for c in classes.values()):
        classes["full"] = FullPlanning()  # the reference every class is measured against
    episodes, moments, rounds = [], None, 0
    while True:
        requests = plan_requests(
            personas,
            n,
            r.group_size,
            num_requests=r.num_workers * r.requests_per_worker,
            seed=seed * 1_000_003 + PILOT_ITERATION + phase + 1000 * rounds,
            first_request_id=(PILOT_ITERATION + phase) * 10_000 + 1000 * rounds,
        )
        sampled = ray.get(pool.episodes.remote(requests))
        # advantages within the round's own groups (group ids restart each round), moments merged
        part = gradient_moments(model, sampled, classes, config.objective)
        moments = part if moments is None else moments.extended(part)
        episodes, rounds = episodes + sampled, rounds + 1
        snr = moments.stats()[moments.reference].full_signal_to_noise()
        if not snr < spec.min_signal_to_noise or len(episodes) + n > (spec.max_pilot_episodes or n):
            break
    stats, batch = moments.stats(), r.episodes_per_iteration
    return {
        "problem": problem,
        "seed": seed,
        "phase": phase,
        "episodes": len(episodes),
        "rounds": rounds,
        "batch_size": batch,
        "pilot_reward": sum(x for e in episodes for x in e.rewards) / sum(e.num_turns for e in episodes),
        "classes": {
            k: {**v.as_dict(), "mse": v.mse(batch), "expected_cosine": v.expected_cosine(batch)}
            for k, v in stats.items()
        },
        "selected": select_class({k: stats[k] for k in candidates}, batch),
        # how far to trust the pick (see ppg.experiment.selector)
        "full_signal_to_noise": snr,
        "pick_agreement": moments.pick_agreement(candidates, batch),
        "folds": len(moments.folds),
    }


def heldout_evaluation(
    pool, config: PPGConfig, seed: int, version: int, weights: str, episodes: int, loaded: bool
) -> dict:
    """The score of a run: its policy on the seed's held-out conversations (the same for every row
    of that seed: personas, conversation and sampling seeds), with a few dialogues to read."""
    eval_config = config.model_copy(update={"run": config.run.model_copy(update={"seed": seed})})
    label = "checkpoint"
    problems, samples = evaluate_on_pool(
        pool,
        [eval_config],
        {label: (version, weights)},
        episodes,
        loaded=(config.problem.name, label) if loaded else None,
    )
    report = problems[config.problem.name][label]
    played, _ = samples[config.problem.name]
    per_episode = [sum(e.rewards) / len(e.rewards) for e in played[label]]
    return {
        "reward_mean": report["reward_mean"],
        "reward_ci95": report["reward_ci95"],
        "per_episode": per_episode,
        "episodes": len(per_episode),
        "eval_seed": seed,
        "policy_version": version,
        "behaviour": report["behaviour"],
        "reward_per_turn": report["reward_per_turn"],
        "samples": [
            {"persona_id": e.persona_id, "messages": e.messages, "rewards": e.rewards}
            for e in played[label][:4]
        ],
    }


def run_initial(suite: Suite, problem: str, seed: int, out: Path, pool, policy_path: str) -> None:
    """The initial policy's row: no training, the same held-out evaluation as every run."""
    run_dir = cell_dir(out, problem, INITIAL, seed)
    config = suite.config(problem, None, seed)
    ray.get(pool.reconfigure.remote(config, 0, policy_path))
    result = heldout_evaluation(pool, config, seed, 0, policy_path, suite.eval_episodes, loaded=True)
    atomic_write_text(run_dir / HELDOUT, json.dumps(result, indent=1))
    atomic_write_text(run_dir / "done.json", json.dumps(done_record(problem, INITIAL, seed)))


def offline_data(suite: Suite, problem: str, seed: int, out: Path, pool, policy_path: str) -> Path:
    """The initial policy's logged, judged conversations for a seed's offline methods: as many as an
    online run samples (iterations x episodes per iteration), on the training personas."""
    path = offline_data_path(out, problem, seed)
    if not path.is_file():
        config = suite.config(problem, None, seed)
        n = config.run.iterations * config.rollout.episodes_per_iteration
        episodes = collect_on_pool(pool, config, policy_path, 0, n, seed)
        header = {"problem": problem, "model": config.model.name_or_path, "policy": "initial", "seed": seed}
        write_episodes(path, episodes, header)
    return path


def run_cell(
    suite: Suite,
    problem: str,
    label: str,
    seed: int,
    out: Path,
    pool,
    config: PPGConfig | None = None,
) -> None:
    """Train one cell (or finish it from its checkpoint), then its held-out evaluation."""
    run_dir = cell_dir(out, problem, label, seed)
    train_cell(run_dir, pool, config or suite.config(problem, label, seed))
    evaluate_cell(suite, problem, label, seed, run_dir, pool)


def train_cell(run_dir: Path, pool, config: PPGConfig, resume_overrides: list[str] | None = None) -> None:
    """``config``'s run into ``run_dir``, or the rest of it from its newest checkpoint (exact)."""
    if run_dir.exists() and list_checkpoints(run_dir):
        train(resume=run_dir, pool=pool, overrides=resume_overrides)
        return
    if run_dir.exists():  # interrupted before its first checkpoint: start the cell over
        shutil.rmtree(run_dir)
    config = config.model_copy(update={"run": config.run.model_copy(update={"output_dir": run_dir.parent})})
    train(config, run_dir=run_dir, pool=pool, final_eval=False)


def run_selector(suite: Suite, problem: str, seed: int, out: Path, pool) -> None:
    """The selector's own run. It trains the pick of the initial policy's pilot; with
    ``selector.reselect_every`` = N it samples a fresh pilot batch at its own policy every N
    iterations and continues (``--resume``: exact, the learner's state carried over) with that
    pilot's pick, so the class can follow the policy. The pilots' episodes are its cost: recorded
    with the picks in ``pilots/<problem>-seed<s>-selector.json`` and shown in the table. (A
    ``cosine`` lr schedule would restart its horizon per phase: the suites use a constant one.)"""
    run_dir = cell_dir(out, problem, SELECTOR, seed)
    record = selector_path(out, problem, seed)
    phases = json.loads(record.read_text())["phases"] if record.is_file() else []
    total = suite.config(problem, None, seed).run.iterations
    every = suite.selector.reselect_every or total
    while True:
        latest = latest_checkpoint(run_dir) if run_dir.exists() and list_checkpoints(run_dir) else None
        state = json.loads((latest / STATE).read_text()) if latest else {"iteration": 0, "policy_version": 0}
        if state["iteration"] >= total:
            break
        k = state["iteration"] // every
        if k >= len(phases):  # phase 0's pilot is the one every class's statistics come from
            pilot = (
                run_pilot(suite, problem, seed, pool, str(latest / "policy"), k, state["policy_version"])
                if k
                else json.loads(pilot_path(out, problem, seed).read_text())
            )
            scores = {c: v["expected_cosine"] for c, v in pilot["classes"].items()}
            phases.append(
                {
                    "from_iteration": k * every,
                    "selected": pilot["selected"],
                    "episodes": pilot["episodes"],
                    "scores": scores,
                }
            )
            atomic_write_text(
                record, json.dumps({"problem": problem, "seed": seed, "phases": phases}, indent=1)
            )
        pick, target = phases[k]["selected"], min((k + 1) * every, total)
        config = suite.selector_config(problem, pick, seed)
        config = config.model_copy(update={"run": config.run.model_copy(update={"iterations": target})})
        policy_class = json.dumps(config.objective.policy_class.model_dump(mode="json"))
        train_cell(
            run_dir, pool, config, [f"run.iterations={target}", f"objective.policy_class={policy_class}"]
        )
    evaluate_cell(suite, problem, SELECTOR, seed, run_dir, pool)


def evaluate_cell(suite: Suite, problem: str, label: str, seed: int, run_dir: Path, pool) -> None:
    """The held-out evaluation of a trained cell's final policy; ``done.json`` last."""
    final = latest_checkpoint(run_dir)
    version = json.loads((final / STATE).read_text())["policy_version"]
    config = load_config(run_dir / "config.yaml")
    result = heldout_evaluation(pool, config, seed, version, str(final / "policy"), suite.eval_episodes, True)
    atomic_write_text(run_dir / HELDOUT, json.dumps(result, indent=1))
    atomic_write_text(run_dir / "done.json", json.dumps(done_record(problem, label, seed)))


def done_record(problem: str, row: str, seed: int) -> dict:
    """What ``done.json`` says: the cell, and the code that made it (the table lists the versions)."""
    return {"problem": problem, "row": row, "seed": seed, "code": code_version()}


@functools.cache
def code_version() -> str:
    """The commit of the source tree this process runs, ``+dirty`` when ``ppg/`` has uncommitted
    changes; outside a git checkout, the installed package's version."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no", "--", "ppg") else "")
    except (OSError, subprocess.SubprocessError):
        return f"ppg {importlib.metadata.version('ppg')}"


def run_suite(suite: Suite, out: Path) -> Path:
    """Run (or finish) every pilot and cell of ``suite`` into ``out``; then write the report."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _record_suite(suite, out)
    first = suite.config(*suite.cells()[0])
    policy_path = resolve_model(first.model.name_or_path)
    steps: list[tuple[str, tuple]] = []
    for problem in suite.problems:  # problem-major: a problem's table completes early
        for seed in suite.seeds:
            steps.append(("initial", (problem, seed)))
            if suite.selector:
                steps.append(("pilot", (problem, seed)))
        steps += [("cell", c) for c in suite.cells() if c[0] == problem]
        if suite.selector:
            steps += [("selector", (problem, seed)) for seed in suite.seeds]
    progress = GridProgress(len(steps))
    connect(dashboard=first.run.dashboard)
    pool = start_pool(first, policy_path)
    try:
        for kind, key in steps:
            problem, seed = key[0], key[-1]
            label = {"initial": INITIAL, "selector": SELECTOR, "cell": key[1], "pilot": None}[kind]
            what = f"{problem} / {label or 'pilot'} / seed {seed}"
            done = (
                pilot_path(out, problem, seed)
                if kind == "pilot"
                else cell_dir(out, problem, label, seed) / "done.json"
            )
            if done.is_file():
                progress.step(what, skipped=True)
                continue
            if kind == "pilot":
                atomic_write_text(
                    done, json.dumps(run_pilot(suite, problem, seed, pool, policy_path), indent=1)
                )
            elif kind == "initial":
                run_initial(suite, problem, seed, out, pool, policy_path)
            elif kind == "selector":
                run_selector(suite, problem, seed, out, pool)
            else:
                config = suite.config(problem, label, seed)
                if suite.methods[label].offline:
                    data = offline_data(suite, problem, seed, out, pool, policy_path)
                    config = config.model_copy(
                        update={"run": config.run.model_copy(update={"offline_data": data})}
                    )
                run_cell(suite, problem, label, seed, out, pool, config)
            progress.step(what)
    finally:
        ray.get(pool.shutdown.remote())
        ray.kill(pool)
    write_report(suite, out)
    return out
