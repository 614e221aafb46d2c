"""``ppg experiment --suite FILE``: run a suite's grid on one Ray cluster and one rollout pool, resumably.

Layout of the output folder (``--out``, default ``experiments/results/<suite name>``)::

    suite.yaml                               the suite as run (a resume must use the same one)
    pilots/<problem>-seed<s>.json            per-class gradient variance/bias, the selector's pick
    runs/<problem>/<class>/seed<s>/          an ordinary ppg run folder (metrics, checkpoints)
    runs/<problem>/<class>/seed<s>/done.json written last: the cell is complete
    results.csv  results.md  selector.csv  reward_curves.png  gradient_variance.png

Resuming: completed pilots and cells (``done.json``) are skipped; a cell with a checkpoint continues
from it (``ppg train --resume``, exact), one without starts over. The rollout pool's vLLM engines are
started once and reconfigured per cell (problem, seed, weights back to the initial policy).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import ray
import torch
from transformers import AutoModelForCausalLM

from ppg.driver import start_pool, train
from ppg.env.personas import load_personas, split_personas
from ppg.experiment.report import write_report
from ppg.experiment.selector import gradient_stats, select_class
from ppg.experiment.suite import Suite, SuiteError, cell_dir, pilot_path
from ppg.files import atomic_write_text
from ppg.learner.checkpoint import list_checkpoints
from ppg.models import resolve_model
from ppg.objectives import FullPlanning
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
        print(
            f"[ppg experiment] {self.done}/{self.total} {what} ({state}; ETA {eta / 60:.1f} min)", flush=True
        )


def _record_suite(suite: Suite, out: Path) -> None:
    recorded = out / "suite.yaml"
    text = json.dumps(suite.model_dump(mode="json"), indent=1, sort_keys=True)
    if recorded.is_file() and recorded.read_text() != text:
        raise SuiteError(
            f"{out} holds results of a different suite ({recorded}); use another --out, or delete the "
            "folder to start over"
        )
    atomic_write_text(recorded, text)


def run_pilot(suite: Suite, problem: str, seed: int, pool, policy_path: str) -> dict:
    """Sample the pilot batch at the initial policy and measure every class's gradient on it."""
    config = suite.config(problem, None, seed)
    r = config.rollout
    ray.get(pool.reconfigure.remote(config, 0, policy_path))
    personas, _ = split_personas(load_personas(config.problem.personas_file))
    n = suite.selector.pilot_episodes
    n -= n % r.group_size
    requests = plan_requests(
        personas,
        n,
        r.group_size,
        num_requests=r.num_workers * r.requests_per_worker,
        seed=seed * 1_000_003 + PILOT_ITERATION,
        first_request_id=PILOT_ITERATION * 10_000,
    )
    episodes = ray.get(pool.episodes.remote(requests))
    model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
    classes = {k: suite.classes[k] for k in suite.classes_for(problem)}
    if not any(c.type == "full" for c in classes.values()):
        classes["full"] = suite.classes.get("full") or FullPlanning()  # the bias reference
    stats = gradient_stats(model, episodes, classes, config.objective)
    batch = r.episodes_per_iteration
    return {
        "problem": problem,
        "seed": seed,
        "episodes": len(episodes),
        "batch_size": batch,
        "pilot_reward": sum(x for e in episodes for x in e.rewards) / sum(e.num_turns for e in episodes),
        "classes": {k: {**v.as_dict(), "mse": v.mse(batch)} for k, v in stats.items()},
        "selected": select_class({k: stats[k] for k in suite.classes_for(problem)}, batch),
    }


def run_cell(suite: Suite, problem: str, label: str, seed: int, out: Path, pool) -> None:

    run_dir = cell_dir(out, problem, label, seed)
    if run_dir.exists() and list_checkpoints(run_dir):
        train(resume=run_dir, pool=pool)
    else:
        if run_dir.exists():  # interrupted before its first checkpoint: start the cell over
            shutil.rmtree(run_dir)
        config = suite.config(problem, label, seed)
        config = config.model_copy(
            update={"run": config.run.model_copy(update={"output_dir": run_dir.parent})}
        )
        train(config, run_dir=run_dir, pool=pool)
    atomic_write_text(run_dir / "done.json", json.dumps({"problem": problem, "class": label, "seed": seed}))


def run_suite(suite: Suite, out: Path) -> Path:
    """Run (or finish) every pilot and cell of ``suite`` into ``out``; then write the report."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _record_suite(suite, out)
    first = suite.config(*suite.cells()[0])
    policy_path = resolve_model(first.model.name_or_path)
    pilots = [(p, s) for p in suite.problems for s in suite.seeds] if suite.selector else []
    cells = suite.cells()
    progress = GridProgress(len(pilots) + len(cells))
    connect()
    pool = start_pool(first, policy_path)
    try:
        for problem, seed in pilots:
            path = pilot_path(out, problem, seed)
            if path.is_file():
                progress.step(f"pilot {problem} seed {seed}", skipped=True)
                continue
            atomic_write_text(path, json.dumps(run_pilot(suite, problem, seed, pool, policy_path), indent=1))
            progress.step(f"pilot {problem} seed {seed}")
        for problem, label, seed in cells:
            done = cell_dir(out, problem, label, seed) / "done.json"
            if done.is_file():
                progress.step(f"{problem} / {label} / seed {seed}", skipped=True)
                continue
            run_cell(suite, problem, label, seed, out, pool)
            progress.step(f"{problem} / {label} / seed {seed}")
    finally:
        ray.get(pool.shutdown.remote())
        ray.kill(pool)
    write_report(suite, out)
    return out
