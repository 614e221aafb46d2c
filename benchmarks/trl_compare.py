"""ppg vs TRL on the same tiny model and a single-turn problem: episodes/s and reward after the same wall clock.

Both sides optimise the same thing: one agent reply to a persona's opening line (``problem.num_turns=1``,
so every policy class is the same), scored by the problem's judge through ppg's own
``run_conversations``. Both see the same prompts in the same order (ppg's iteration plans: TRL's dataset
is built from them, unshuffled), with the same batch shape and hyper-parameters:

  ppg  ``ppg.driver.train``: a vLLM rollout worker (Ray actor, 1 CPU) plays the episodes, a Ray Train
       learner (1 CPU) updates, the weights go back to the worker through the object store
  TRL  ``trl.GRPOTrainer`` in this process, on CPU: transformers ``generate``, then the update, on the same
       model object; the reward function replays each completion through ``run_conversations``

  batch        episodes_per_iteration = per_device_train_batch_size (one update per batch),
               group_size = num_generations, max_tokens_per_turn = max_completion_length
  loss         REINFORCE with a group-mean baseline, no std scaling, token-mean: ppg
               ``learner.loss_reduction=token_mean`` (baseline leave-one-out), TRL ``loss_type=dapo``,
               ``scale_rewards=none``, ``beta=0``, ``num_iterations=1`` (on-policy: the clip never acts)
  optimiser    AdamW, same lr, constant schedule, no weight decay, grad-norm clip 1.0
  threads      one torch thread per process (--torch-threads): what Ray gives each 1-CPU ppg actor

The ppg side runs first (Ray must start before anything imports vLLM, and importing trl does). ppg has
no time limit, so a short calibration run measures its seconds per iteration and the real run gets
``budget / that`` iterations; TRL then trains for exactly the wall clock that ppg's training loop
took (a callback stops it after the step that reaches it). Start-up (Ray Train, vLLM worker; importing
trl and building the trainer) is reported apart and not counted in the budget. A second ppg run
(``--poll-variant-s``, 0 to skip) sets RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: Ray Train's controller
drains each worker's one-slot result queue only at that poll (2 s by default), so a loop that calls
``ray.train.report`` every iteration waits for it; ppg's seeded rollouts make that run's batches
identical to the first one's, so only the speed differs. Afterwards the initial policy and every final
policy are scored on the same held-out personas and seeds with the same engine (transformers, in this
process): greedy, and sampled at the training temperature with fixed seeds.

    python benchmarks/trl_compare.py                    # writes benchmarks/results/trl_compare.{csv,md,png}
    python benchmarks/trl_compare.py --budget-s 20 --eval-episodes 32      # quicker
"""

from __future__ import annotations

import os

# Ray reads this once, at import: a local node then uses 127.0.0.1 and listens on loopback only.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ppg.files import atomic_write_csv  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is no package
from trl_compare_report import machine_line, parse_variants, plot, trl_side, write_markdown  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
POLL_VAR = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # Ray Train's controller poll (2 s by default)
FIELDS = [
    "kind",  # summary (one per side, plus "initial": the untrained policy's held-out scores) or batch
    "side",
    "step",  # batch rows: the update's number
    "train_s",  # batch rows: training-loop seconds when the update finished; summary: the loop's length
    "episodes",  # batch rows: cumulative episodes; summary: all episodes trained on
    "reward_mean",  # batch rows: the batch's mean reward
    "setup_s",
    "total_s",
    "updates",
    "episodes_per_s",
    "ratio_vs_trl",
    "reward_first",
    "reward_last",
    "target_s",  # training-loop seconds until the moving mean reward (over --window episodes) >= --target
    "target_episodes",  # episodes trained on by then
    "eval_greedy",
    "eval_greedy_se",
    "eval_sampled",
    "eval_sampled_se",
    "eval_greedy_tokens",  # mean reply length (tokens, including the end-of-turn token) in the evaluation
    "eval_sampled_tokens",
    "generate_s",
    "environment_s",
    "learner_s",
    "weights_s",
    "other_s",
    "batch_wait_s",  # ppg: the learner waiting for its batch (generation, unless overlapped, + transfer)
    "between_s",  # part of other_s: between updates (ppg: ray.train.report, metrics; TRL: callbacks)
    "torch_threads",
    "load_1min",  # batch rows: the 1-minute load average when the update finished
    "load_before",
    "load_mean",  # summary: mean of the batch rows' load (the load while the side trained)
    "load_after",
]


def record(kind: str, side: str, **values) -> dict:
    r = {f: "" for f in FIELDS}
    r.update(kind=kind, side=side, **values)
    return r


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


# --- the shared problem, prompts and reward ---------------------------------------------------------


def ppg_config(args, iterations: int, output_dir: Path, overrides: tuple[str, ...] = ()):
    from ppg.config import load_config

    return load_config(
        None,
        [
            f"model.name_or_path={args.model}",
            f"problem.name={args.problem}",
            "problem.num_turns=1",
            f"rollout.episodes_per_iteration={args.episodes_per_update}",
            f"rollout.group_size={args.group_size}",
            f"rollout.max_tokens_per_turn={args.max_tokens}",
            f"rollout.temperature={args.temperature}",
            f"learner.lr={args.lr}",
            "learner.loss_reduction=token_mean",
            f"run.iterations={iterations}",
            f"run.checkpoint_every={iterations}",  # one checkpoint, at the end: the final policy
            "run.keep_last=1",
            f"run.seed={args.seed}",
            f"run.output_dir={output_dir}",
            "run.name=trl-compare",
            "run.final_eval_episodes=0",  # the benchmark times training only; it evaluates by itself
            "run.sample_every=0",
            *overrides,  # a --ppg-variant's
        ],
    )


class Environment:
    """The problem's environment, and the one way both sides turn (persona, seed, reply) into a reward."""

    def __init__(self, config) -> None:
        from ppg.env.factory import make_environment

        if config.problem.partner != "scripted":
            raise ValueError("the TRL comparison replays each prompt: it needs problem.partner=scripted")
        self.env = make_environment(config)
        self.personas = {p.id: p for p in self.env.train_personas + self.env.eval_personas}

    def play(self, persona_ids, seeds, policy):
        from ppg.env.conversation import run_conversations

        e = self.env
        personas = [self.personas[p] for p in persona_ids]
        return run_conversations(e.problem, personas, list(seeds), policy, e.partner, e.judge)

    def prompts(self, persona_ids, seeds) -> list[list[dict]]:
        """The messages the agent sees at its (only) turn: system prompt and the persona's opening."""
        seen: list[list[dict]] = []

        def capture(conversations):
            seen.extend(conversations)
            return [""] * len(conversations)

        self.play(persona_ids, seeds, capture)
        return [[{"role": m["role"], "content": m["content"]} for m in c] for c in seen]


class SharedReward:
    """TRL reward function: replays each completion through run_conversations (same partner, judge,
    gate and scale as ppg's rollout workers), after checking that TRL's prompt is the one ppg renders."""

    __name__ = "ppg_judge"  # TRL names the reward's metrics after it

    def __init__(self, env: Environment) -> None:
        self.env = env
        self.pending: list[float] = []  # rewards of the batch being trained on
        self.seconds = 0.0

    def __call__(self, prompts, completions, persona_id, seed, **kwargs) -> list[float]:
        start = time.perf_counter()
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]

        def policy(conversations):
            for have, want in zip(conversations, prompts, strict=True):
                if [(m["role"], m["content"]) for m in have] != [(m["role"], m["content"]) for m in want]:
                    raise RuntimeError(f"TRL's prompt {want} is not what ppg's agent sees: {have}")
            return texts

        rewards = [c.rewards[0] for c in self.env.play(persona_id, seed, policy)]
        self.pending.extend(rewards)
        self.seconds += time.perf_counter() - start
        return rewards


def planned_groups(config, num_iterations: int) -> list[tuple[str, int]]:
    """(persona id, conversation seed) of every group ppg's iterations 0..n-1 train on, in order."""
    from ppg.env.personas import load_personas, split_personas
    from ppg.learner.loop import iteration_requests

    train, _ = split_personas(load_personas(config.problem.personas_file))
    g = config.rollout.group_size
    groups = []
    for i in range(num_iterations):
        for r in iteration_requests(config, train, i):
            groups += [(r.persona_ids[k], r.seeds[k]) for k in range(0, len(r.persona_ids), g)]
    return groups


# --- ppg ---------------------------------------------------------------------------------------------


class MetricsWatcher(threading.Thread):
    """Stamps each line of the run's metrics.jsonl with the time it appeared (ppg writes one per
    iteration, fsynced, after the update): wall clock per iteration, and live progress."""

    def __init__(self, path: Path, progress: tqdm) -> None:
        super().__init__(daemon=True)
        self.path, self.progress = path, progress
        self.rows: list[tuple[float, dict]] = []
        self.loads: list[float] = []
        self._offset, self._done = 0, threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.poll()
            time.sleep(0.05)
        self.poll()

    def stop(self) -> None:
        self._done.set()
        self.join()

    def poll(self) -> None:
        if not self.path.is_file():
            return
        with self.path.open() as f:
            f.seek(self._offset)
            data = f.read()
        done = data[: data.rfind("\n") + 1]  # whole lines only
        self._offset += len(done)
        now = time.perf_counter()
        for line in done.splitlines():
            if line.strip():
                m = json.loads(line)
                self.rows.append((now, m))
                self.loads.append(os.getloadavg()[0])
                self.progress.update()
                self.progress.set_postfix_str(
                    f"reward {m['reward_mean']:+.3f}, {m['episodes_per_s']:.0f} episodes/s"
                )


def run_ppg(
    args, iterations: int, root: Path, side: str, label: str, env_vars: dict[str, str], overrides=()
) -> dict:
    """One ``ppg.driver.train`` run; ``env_vars`` are set in this process while it runs (Ray Train
    passes its own, e.g. the controller's poll interval, from the driver to its controller)."""
    from ppg.driver import train
    from ppg.learner.checkpoint import latest_checkpoint, validate_checkpoint

    run_dir = root / f"{side}-{label}"
    progress = tqdm(total=iterations, desc=f"{side} {label}", unit="iter")
    watcher = MetricsWatcher(run_dir / "metrics.jsonl", progress)
    saved = {k: os.environ.get(k) for k in env_vars}
    os.environ.update(env_vars)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    watcher.start()
    try:
        train(ppg_config(args, iterations, root, overrides), run_dir=run_dir)
    finally:
        watcher.stop()
        progress.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    total = time.perf_counter() - start
    stamped = watcher.rows
    if len(stamped) != iterations:
        raise RuntimeError(f"ppg wrote {len(stamped)} metrics lines for {iterations} iterations")
    loop_start = stamped[0][0] - stamped[0][1]["time_iteration"]
    batches, episodes = [], 0
    for (t, m), load in zip(stamped, watcher.loads, strict=True):
        episodes += m["episodes"]
        batches.append(
            record(
                "batch",
                side,
                step=m["iteration"] + 1,
                train_s=t - loop_start,
                episodes=episodes,
                reward_mean=m["reward_mean"],
                load_1min=load,
            )
        )
    metrics = [m for _, m in stamped]
    train_s = stamped[-1][0] - loop_start
    split = {
        "generate_s": sum(m["time_generate"] for m in metrics),
        "environment_s": sum(m["time_environment"] for m in metrics),
        "learner_s": sum(m["time_learner"] for m in metrics),
        "weights_s": sum(m["time_broadcast"] for m in metrics),
    }
    return {
        "batches": batches,
        "setup_s": loop_start - start,
        "total_s": total,
        "train_s": train_s,
        "split": split,
        "between_s": train_s - sum(m["time_iteration"] for m in metrics),
        "batch_wait_s": sum(m["time_rollout"] for m in metrics),
        "gaps": [b[0] - a[0] for a, b in zip(stamped, stamped[1:], strict=False)],
        "policy": validate_checkpoint(latest_checkpoint(run_dir), require_trainer_state=False),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


# --- TRL ---------------------------------------------------------------------------------------------


def run_trl(
    args, budget_s: float, groups: list[tuple[str, int]], env: Environment, root: Path, side: str = "trl"
) -> dict:
    persona_ids, seeds = [p for p, _ in groups], [s for _, s in groups]
    prompts = env.prompts(persona_ids, seeds)  # the benchmark's input, like ppg's plans: not timed
    load_before = os.getloadavg()[0]
    start = time.perf_counter()  # setup: importing trl (it imports vLLM), the dataset, the trainer
    warnings.filterwarnings("ignore", message=".*TRL currently supports vLLM.*")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from ppg.models import resolve_model

    dataset = Dataset.from_dict({"prompt": prompts, "persona_id": persona_ids, "seed": seeds})
    reward = SharedReward(env)
    timing = {"generate": 0.0, "steps": 0.0}

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate(self, prompts):  # tokenise, transformers generate, decode
            t = time.perf_counter()
            try:
                return super()._generate(prompts)
            finally:
                timing["generate"] += time.perf_counter() - t

    batches: list[dict] = []
    progress = tqdm(total=round(budget_s), desc=side, unit="s")

    class Budget(TrainerCallback):
        loop_start = step_start = 0.0
        episodes = 0

        def on_train_begin(self, a, state, control, **kw):
            self.loop_start = time.perf_counter()

        def on_step_begin(self, a, state, control, **kw):
            self.step_start = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            now = time.perf_counter()
            timing["steps"] += now - self.step_start
            rewards, reward.pending = reward.pending, []
            self.episodes += len(rewards)
            elapsed = now - self.loop_start
            batches.append(
                record(
                    "batch",
                    side,
                    step=state.global_step,
                    train_s=elapsed,
                    episodes=self.episodes,
                    reward_mean=mean(rewards),
                    load_1min=os.getloadavg()[0],
                )
            )
            progress.update(min(round(budget_s), round(elapsed)) - progress.n)
            progress.set_postfix_str(f"reward {mean(rewards):+.3f}, {self.episodes / elapsed:.0f} episodes/s")
            if elapsed >= budget_s:
                control.should_training_stop = True

    model_path = resolve_model(args.model)
    config = GRPOConfig(
        output_dir=str(root / side),
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=args.episodes_per_update,
        gradient_accumulation_steps=1,
        num_generations=args.group_size,
        max_completion_length=args.max_tokens,
        temperature=args.temperature,
        top_p=1.0,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        beta=0.0,
        num_iterations=1,
        scale_rewards="none",
        loss_type="dapo",
        shuffle_dataset=False,
        max_steps=10**7,  # the callback stops it
        logging_steps=50,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=args.seed,
    )
    budget_cb = Budget()
    trainer = TimedGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32),
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_path),
        callbacks=[budget_cb],
    )
    trainer.train()
    progress.close()
    end = time.perf_counter()
    train_s = batches[-1]["train_s"]
    split = {
        "generate_s": timing["generate"],
        "environment_s": reward.seconds,
        "learner_s": timing["steps"] - timing["generate"] - reward.seconds,
        "weights_s": 0.0,  # generation runs on the training model itself
    }
    return {
        "batches": batches,
        "between_s": train_s - timing["steps"],
        "setup_s": budget_cb.loop_start - start,
        "total_s": end - start,
        "train_s": train_s,
        "split": split,
        "weights": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


# --- held-out evaluation -----------------------------------------------------------------------------


def evaluate(args, env: Environment, policy_path, weights=None) -> dict:
    """Mean reward (and its standard error) on the held-out personas: greedy, and sampled with fixed
    per-conversation seeds; same prompts, engine and scorer for every policy."""
    from ppg.rollout.engine import EngineConfig, HFEngine, SamplingSpec
    from ppg.rollout.trace import TokenPolicy

    held_out = env.env.eval_personas
    rng = random.Random(args.seed + 4242)
    persona_ids = [held_out[k % len(held_out)].id for k in range(args.eval_episodes)]
    seeds = [rng.randrange(2**31) for _ in persona_ids]
    sample_seeds = [rng.randrange(2**31) for _ in persona_ids]
    engine = HFEngine(policy_path, EngineConfig(seed=args.seed))
    if weights is not None:
        engine.update_weights(weights)
    out = {}
    for name, temperature, s in (("greedy", 0.0, None), ("sampled", args.temperature, sample_seeds)):
        policy = TokenPolicy(engine, SamplingSpec(args.max_tokens, temperature, 1.0), None, s)
        rewards = [c.rewards[0] for c in env.play(persona_ids, seeds, policy)]
        sd = statistics.stdev(rewards) if len(rewards) > 1 else 0.0
        out[f"eval_{name}"], out[f"eval_{name}_se"] = mean(rewards), sd / math.sqrt(len(rewards))
        out[f"eval_{name}_tokens"] = mean(sum(t.agent_mask) for t in policy.traces)
    return out


# --- the run -----------------------------------------------------------------------------------------


def time_to_target(batches: list[dict], window: int, target: float) -> tuple[float, int] | tuple[str, str]:
    """(training seconds, episodes) when the mean reward of the last ``window`` episodes first reaches
    ``target``; ("", "") if it never does."""
    recent: list[tuple[int, float]] = []  # (episodes, reward sum) of the batches in the window
    previous = 0
    for r in batches:
        count = r["episodes"] - previous
        previous = r["episodes"]
        recent.append((count, count * r["reward_mean"]))
        while sum(c for c, _ in recent) - recent[0][0] >= window:
            recent.pop(0)
        n = sum(c for c, _ in recent)
        if n >= window and sum(x for _, x in recent) / n >= target:
            return r["train_s"], r["episodes"]
    return "", ""


def summarize(side: str, result: dict, evals: dict, args) -> dict:
    window = args.window
    b = result["batches"]
    target_s, target_episodes = time_to_target(b, window, args.target)
    per_batch = [
        (r["episodes"] - (b[i - 1]["episodes"] if i else 0), r["reward_mean"]) for i, r in enumerate(b)
    ]

    def windowed(rows) -> float:
        used, total, n = 0, 0.0, 0
        for count, reward in rows:
            if used >= window:
                break
            total, n, used = total + count * reward, n + count, used + count
        return total / n

    split = result["split"]
    return record(
        "summary",
        side,
        train_s=result["train_s"],
        episodes=b[-1]["episodes"],
        setup_s=result["setup_s"],
        total_s=result["total_s"],
        updates=len(b),
        episodes_per_s=b[-1]["episodes"] / result["train_s"],
        reward_first=windowed(per_batch),
        reward_last=windowed(reversed(per_batch)),
        target_s=target_s,
        target_episodes=target_episodes,
        other_s=result["train_s"] - sum(split.values()),
        between_s=result["between_s"],
        batch_wait_s=result.get("batch_wait_s", ""),
        torch_threads=result.get("torch_threads", 1 if side.startswith("ppg") else torch.get_num_threads()),
        load_before=result["load_before"],
        load_mean=mean(r["load_1min"] for r in b),
        load_after=result["load_after"],
        **split,
        **evals,
    )


def run(args) -> list[dict]:
    from ppg.models import resolve_model
    from ppg.ray_session import connect

    connect()  # before anything imports vLLM (trl does): workers must not inherit its environment
    model_path = resolve_model(args.model)
    variants = [("ppg", {}, ())]
    if args.poll_variant_s > 0:  # the same ppg, with Ray Train's controller polling its workers faster
        variants.append(("ppg-poll", {POLL_VAR: f"{args.poll_variant_s:g}"}, ()))
    for name, overrides in parse_variants(args.ppg_variant):  # the same ppg with config overrides
        variants.append((f"ppg-{name}", {}, overrides))
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="trl-compare-") as tmp:
        root = Path(tmp)
        for side, env_vars, overrides in variants:
            iterations = args.ppg_iterations
            if iterations is None:  # ppg has no wall-clock limit: measure its seconds per iteration first
                calibration = run_ppg(
                    args, args.calibration_iterations, root, side, "calibration", env_vars, overrides
                )
                per_iteration = statistics.median(calibration["gaps"] or [calibration["train_s"]])
                iterations = max(2, round(args.budget_s / per_iteration))
                print(
                    f"[trl_compare] {side}: {per_iteration:.2f} s per iteration in calibration -> "
                    f"{iterations} iterations for a {args.budget_s:g} s budget",
                    flush=True,
                )
            results[side] = run_ppg(args, iterations, root, side, "run", env_vars, overrides)
        ppg_updates = len(results["ppg"]["batches"])
        config = ppg_config(args, ppg_updates, root)
        env = Environment(config)
        budget = args.trl_budget_s or results["ppg"]["train_s"]
        # ppg's plans for far more steps than TRL can take (past them the Trainer starts over).
        groups = planned_groups(config, max(ppg_updates, math.ceil(budget / 0.05)))
        threads = torch.get_num_threads()
        niceness = os.getpriority(os.PRIO_PROCESS, 0)
        # Ray starts every worker process at niceness 15 (RAY_worker_niceness): on a machine that
        # other jobs load, ppg's learner and rollout worker get less CPU than a process at 0 would.
        # TRL, in this process, runs at the same niceness as them (then back, as root may).
        os.setpriority(os.PRIO_PROCESS, 0, args.trl_niceness)
        try:
            for n in args.trl_threads:  # TRL at each thread count: ppg is compared with the faster one
                torch.set_num_threads(n)
                side = trl_side(n, args)
                results[side] = run_trl(args, budget, groups, env, root, side)
                results[side]["torch_threads"] = n
        finally:
            torch.set_num_threads(threads)
            with contextlib.suppress(PermissionError):
                os.setpriority(os.PRIO_PROCESS, 0, niceness)

        policies = [("initial", model_path, None)]
        policies += [(side, results[side]["policy"], None) for side, _, _ in variants]
        policies += [(s, model_path, results[s].pop("weights")) for s in results if s.startswith("trl")]
        evals = {}
        for side, path, weights in tqdm(policies, desc="held-out evaluation", unit="policy"):
            evals[side] = evaluate(args, env, path, weights)

    rows = [summarize(side, result, evals[side], args) for side, result in results.items()]
    rows.append(record("summary", "initial", torch_threads=torch.get_num_threads(), **evals["initial"]))
    trl_rate = max(  # the better TRL
        r["batches"][-1]["episodes"] / r["train_s"] for s, r in results.items() if s.startswith("trl")
    )
    for r in rows[:-1]:
        r["ratio_vs_trl"] = r["episodes_per_s"] / trl_rate
    return rows + [b for result in results.values() for b in result["batches"]]


# --- output ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget-s", type=float, default=300.0, help="training-loop seconds per side")
    parser.add_argument("--model", default="embedded:tiny", help="model name for ppg.models.resolve_model")
    parser.add_argument("--problem", default="myopic", help="problem, played with one agent turn")
    parser.add_argument("--episodes-per-update", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32, help="max new tokens of the agent's reply")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument(
        "--ppg-iterations",
        type=int,
        default=None,
        help="iterations of the ppg run; default: budget / seconds per iteration of a calibration run",
    )
    parser.add_argument("--calibration-iterations", type=int, default=6)
    parser.add_argument(
        "--trl-budget-s",
        type=float,
        default=None,
        help="TRL's training-loop seconds; default: what ppg's training loop actually took",
    )
    parser.add_argument(
        "--poll-variant-s",
        type=float,
        default=0.1,
        help=f"also run ppg with {POLL_VAR} set to this (Ray Train's controller poll; 0: skip)",
    )
    parser.add_argument(
        "--ppg-variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="also run ppg with these config overrides (repeatable), e.g. sync:run.async_rollouts=false",
    )
    parser.add_argument(
        "--trl-threads",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[1],
        help="torch thread counts to run TRL with, e.g. 1,2; ppg's ratio is against the fastest",
    )
    parser.add_argument(
        "--trl-niceness",
        type=int,
        default=int(os.environ.get("RAY_worker_niceness", 15)),  # noqa: SIM112 - Ray spells it so
        help="niceness TRL trains at: that of ppg's Ray worker processes (Ray's default 15)",
    )
    parser.add_argument("--eval-episodes", type=int, default=192, help="held-out conversations per policy")
    parser.add_argument("--window", type=int, default=256, help="episodes in the first/last reward means")
    parser.add_argument(
        "--target", type=float, default=0.14, help="report when the moving mean reward first reaches this"
    )
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="torch threads of TRL and of the evaluation engine"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for trl_compare.{csv,md,png}")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's options, checked (benchmarks/scaling.py runs ``run`` with them per model)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.episodes_per_update % args.group_size or args.group_size < 2:
        parser.error("--episodes-per-update must be a multiple of --group-size, and --group-size >= 2")
    if args.budget_s <= 0 or args.eval_episodes < 2 or args.window < 1:
        parser.error("--budget-s must be > 0, --eval-episodes >= 2 and --window >= 1")
    if args.ppg_iterations is not None and args.ppg_iterations < 1:
        parser.error("--ppg-iterations must be >= 1")
    return args


def command_line(args) -> str:
    """The command that repeats this run, for the report."""
    return "python benchmarks/trl_compare.py " + " ".join(
        [
            f"--budget-s {args.budget_s:g}",
            f"--problem {args.problem}",
            f"--episodes-per-update {args.episodes_per_update}",
            f"--group-size {args.group_size}",
            f"--max-tokens {args.max_tokens}",
            f"--temperature {args.temperature:g}",
            f"--lr {args.lr:g}",
            *([f"--ppg-iterations {args.ppg_iterations}"] if args.ppg_iterations else []),
            *([f"--trl-budget-s {args.trl_budget_s:g}"] if args.trl_budget_s else []),
            f"--poll-variant-s {args.poll_variant_s:g}",
            *[f"--ppg-variant {v}" for v in args.ppg_variant],
            f"--trl-threads {','.join(map(str, args.trl_threads))}",
            f"--trl-niceness {args.trl_niceness}",
            f"--eval-episodes {args.eval_episodes}",
            f"--window {args.window}",
            f"--target {args.target:g}",
            f"--torch-threads {args.torch_threads}",
            f"--seed {args.seed}",
        ]
    )


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.torch_threads)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    command = command_line(args)
    load_before, start = os.getloadavg(), time.perf_counter()
    rows = run(args)
    machine = machine_line(load_before, time.perf_counter() - start)
    atomic_write_csv(args.out / "trl_compare.csv", rows, FIELDS)
    print(write_markdown(rows, args.out / "trl_compare.md", command, machine, args))
    plot(rows, args.out / "trl_compare.png", args)
    print(f"wrote {args.out / 'trl_compare.csv'}, trl_compare.md, trl_compare.png")
    return rows


if __name__ == "__main__":
    main()
