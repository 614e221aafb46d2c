"""Where the CPU of ppg's training loop goes, per process (issue 18 item 1: ppg vs TRL).

trl_compare.py splits an update into phases (generate, learner, weights, ...); this names what runs
inside them. It starts ``ppg train`` on trl_compare.py's configuration (single-turn ``myopic``, 32
episodes per update in groups of 4, replies up to 32 tokens, token-mean loss, the shipped overlap of
rollouts and updates), waits until the loop is warm, then samples the rollout worker, the learner
worker and the rollout pool with py-spy for ``--seconds`` and charges each sample to the library
of its innermost Python frame (vLLM's engine, torch, the tokenizer and chat template, ppg's
conversation loop, ppg's rollout and learner code, Ray, ...), as serve_profile.py does for serving.

    python benchmarks/train_profile.py                  # ~2 min on 2 cores
    python benchmarks/train_profile.py --seconds 40 --rate 50

Writes benchmarks/results/train_profile.{md,json,png}. py-spy takes CPU too on this 2-core machine:
read shares, not absolute times. Samples are of running threads only (idle waits are not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_profile import RAY_CORE, plot, process_ids, record, summary  # noqa: E402

from ppg.files import atomic_write_text  # noqa: E402

# (group, substrings of a frame's file path), first match wins, for the training processes
GROUPS = (
    ("vLLM engine (scheduler, model step, sampling)", ("/vllm/",)),
    ("torch (outside vLLM's frames)", ("/torch/",)),
    ("transformers model code (learner's forward)", ("/transformers/models/", "/transformers/integrations/",
                                                      "/transformers/modeling_", "/transformers/masking_")),
    ("chat template, tokenizer", ("/transformers/", "/tokenizers/", "/jinja2/")),
    ("ppg conversation loop, problems, judge", ("/ppg/env/",)),
    ("ppg rollout (engine wrapper, worker, pool)", ("/ppg/rollout/",)),
    ("ppg learner, loss, objectives, episodes", ("/ppg/learner/", "/ppg/loss.py", "/ppg/objectives.py",
                                                 "/ppg/episode.py", "/ppg/collect.py")),
    ("ppg other", ("/ppg/",)),
    ("Ray Train", ("/ray/train/",)),
    (RAY_CORE, ("/ray/",)),
    ("pydantic", ("/pydantic/", "/pydantic_core/")),
    ("asyncio event loop", ("/asyncio/",)),
)  # fmt: skip
TARGETS = {"rollout worker": "ray::RolloutWorker", "learner worker": "ray::RayTrainWorker",
           "rollout pool": "ray::RolloutPool"}  # fmt: skip


def train_command(args, out: Path) -> list[str]:
    overrides = [
        "problem.name=myopic", "problem.num_turns=1", "rollout.episodes_per_iteration=32",
        "rollout.group_size=4", "rollout.max_tokens_per_turn=32", "learner.loss_reduction=token_mean",
        f"run.iterations={args.iterations}", f"run.checkpoint_every={args.iterations}", "run.keep_last=1",
        "run.final_eval_episodes=0", "run.sample_every=0", f"run.output_dir={out}", "run.name=profile",
        *args.override,
    ]  # fmt: skip
    return [sys.executable, "-m", "ppg.cli", "train", *overrides]


def iterations_done(out: Path) -> int:
    metrics = list(out.glob("profile-*/metrics.jsonl"))
    return sum(1 for _ in metrics[0].open()) if metrics else 0


def run(args) -> dict:
    out = Path(tempfile.mkdtemp(prefix="train-profile-"))
    train = subprocess.Popen(train_command(args, out), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + args.start_timeout_s
        while iterations_done(out) < args.warmup_iterations:
            if train.poll() is not None:
                raise RuntimeError(
                    f"ppg train exited ({train.returncode}) before iteration {args.warmup_iterations}"
                )
            if time.time() > deadline:
                raise TimeoutError(f"ppg train did not reach iteration {args.warmup_iterations}")
            time.sleep(1.0)
        pids = {name: process_ids(marker) for name, marker in TARGETS.items()}
        missing = [name for name, found in pids.items() if len(found) != 1]
        if missing:
            raise RuntimeError(f"expected one process each, found {pids}")
        first, start = iterations_done(out), time.perf_counter()
        recorders = {name: record(found[0], args.seconds, args.rate, out / f"{name}.txt")
                     for name, found in pids.items()}  # fmt: skip
        for name, recorder in recorders.items():
            _, err = recorder.communicate(timeout=args.seconds + 120)
            if recorder.returncode != 0:
                raise RuntimeError(f"py-spy on the {name} failed: {err[-2000:]}")
        iterations, seconds = iterations_done(out) - first, time.perf_counter() - start
    finally:
        train.terminate()
        try:
            train.wait(timeout=120)
        except subprocess.TimeoutExpired:
            train.kill()
    result = {"iterations": iterations, "seconds": seconds, "rate_hz": args.rate, "processes": {}}
    for name in TARGETS:
        result["processes"][name] = summary((out / f"{name}.txt").read_text(), args.top, GROUPS)
    return result


def markdown(result: dict, command: str) -> str:
    lines = [
        f"`{command}`: {result['iterations']} updates in {result['seconds']:.1f} s while sampled "
        f"({result['seconds'] / max(1, result['iterations']):.3f} s per update), at {result['rate_hz']} Hz; "
        f"load average {os.getloadavg()[0]:.1f}",
        "",
    ]
    for name, p in result["processes"].items():
        lines += [f"**{name}** ({p['samples']} samples; {p['samples'] / result['seconds'] / result['rate_hz']:.0%} "
                  "of one core's time): share of its samples by innermost library", "",
                  "| where | share |", "|---|---:|"]  # fmt: skip
        lines += [f"| {g} | {share:.1%} |" for g, share in p["groups"].items()]
        lines += ["", "| innermost function | share |", "|---|---:|"]
        lines += [f"| `{f[:110]}` | {share:.1%} |" for f, share in p["top_functions"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--iterations", type=int, default=400, help="ppg train's run.iterations (stopped earlier)"
    )
    parser.add_argument("--warmup-iterations", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0, help="py-spy recording per process")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=12, help="innermost functions listed per process")
    parser.add_argument("--start-timeout-s", type=float, default=900.0)
    parser.add_argument("--override", action="append", default=[], help="a further ppg config override")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    command = "python benchmarks/train_profile.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(result, command.strip())
    atomic_write_text(args.out / "train_profile.md", text)
    atomic_write_text(args.out / "train_profile.json", json.dumps(result, indent=1))
    plot(result, args.out / "train_profile.png", title="ppg train (trl_compare's config)")
    print(text)
    return result


if __name__ == "__main__":
    main()
