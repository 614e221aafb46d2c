"""``ppg eval``: what training changed, measured on held-out personas.

The trained policy (a checkpoint) and the initial policy (``model.name_or_path`` of the checkpoint's
config: the warm-started weights before RL) play the *same* held-out conversations on one rollout
pool: the same persona, conversation seed and sampling seed per episode (paired), only the weights
are swapped between them (the vLLM engines stay). Per problem the report gives each policy's mean
reward per turn with its 95% t-interval, the paired difference checkpoint - initial with its 95%
t-interval, and behaviour rates (``ppg.env.behaviour``): what the policy learned to *do*.

Statistics: the unit is the episode. Each evaluation episode is an independent draw of a held-out
persona (uniform, with replacement), a conversation seed and a sampling seed (``plan_requests`` with
groups of one), so episodes' mean rewards per turn are i.i.d.; the difference of an episode pairs
the two policies on that same draw. The episodes are split into ``EVAL_REQUESTS`` requests whatever
the pool's size, so ``ppg eval`` on a run's final checkpoint replays the run's final evaluation.

Outputs (atomic): ``report.json`` (what ``evaluate`` returns), ``report.md`` and ``samples.md``
(dialogues of the checkpoint beside the initial policy's on the same persona and seeds).
``ppg train`` runs the same evaluation on its own pool at the end (``final_evaluation``).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import ray

from ppg.config import PPGConfig, load_config
from ppg.env.behaviour import behaviour_rates, describe
from ppg.env.conversation import Conversation
from ppg.env.factory import check_environment
from ppg.env.personas import load_personas, split_personas
from ppg.env.problems import make_problem
from ppg.files import atomic_write_text
from ppg.learner.checkpoint import CONFIG, STATE, latest_checkpoint, validate_checkpoint
from ppg.learner.metrics import md_cell
from ppg.models import resolve_model
from ppg.ray_session import connect
from ppg.rollout.pool import RolloutPool, plan_requests

EVAL_SEED_OFFSET = 99991  # eval conversations: run.seed + this (disjoint from training's streams)
EVAL_REQUESTS = 4  # fixed split: the same episodes on any number of rollout workers
SAMPLES_PER_PROBLEM = 4
POLICIES = ("checkpoint", "initial")
STATISTICS = (
    "95% Student t-intervals over episodes: each episode is an independent draw of a held-out persona, "
    "a conversation seed and a sampling seed; the difference is paired (both policies play the same "
    "persona, conversation seed and sampling seed)"
)


# --- statistics ------------------------------------------------------------------------------------


def t_quantile(df: int, confidence: float = 0.95) -> float:
    """The two-sided Student t critical value: P(|T_df| <= t) = confidence (exact, by bisection on
    the closed-form integer-df distribution, Abramowitz & Stegun 26.7.3-4)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    lo, hi = 0.0, 1.0
    while _t_central(hi, df) < confidence:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_central(mid, df) < confidence else (lo, mid)
    return (lo + hi) / 2


def _t_central(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df`` degrees of freedom."""
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2:  # odd
        total, term = 0.0, c
        for k in range(1, (df - 1) // 2 + 1):  # c, 2/3 c^3, 2*4/(3*5) c^5, ...
            total += term
            term *= c * c * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + s * total)
    total, term = 0.0, 1.0
    for k in range(1, df // 2 + 1):  # 1, 1/2 c^2, 1*3/(2*4) c^4, ...
        total += term
        term *= c * c * (2 * k - 1) / (2 * k)
    return s * total


def t_test_p(t: float, df: int) -> float:
    """Two-sided p-value of Student's t statistic ``t`` with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return max(0.0, 1.0 - _t_central(abs(t), df))


def mean_interval(values: list[float], confidence: float = 0.95) -> dict:
    """``{"mean", "low", "high", "half_width", "n"}``; the interval is None for fewer than 2 values."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values to average")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "low": None, "high": None, "half_width": None, "n": len(values)}
    half = t_quantile(len(values) - 1, confidence) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "low": mean - half, "high": mean + half, "half_width": half, "n": len(values)}


def paired_difference(after: list[float], before: list[float], confidence: float = 0.95) -> dict:
    """Mean of ``after[i] - before[i]`` with its t-interval (the pairs are the units)."""
    if len(after) != len(before):
        raise ValueError(f"paired values differ in length: {len(after)} and {len(before)}")
    return mean_interval([a - b for a, b in zip(after, before, strict=True)], confidence)


# --- rollouts on a pool ------------------------------------------------------------------------------


def eval_requests(config: PPGConfig, held_out: list, episodes: int) -> list:

    return plan_requests(
        held_out, episodes, 1, EVAL_REQUESTS, seed=config.run.seed + EVAL_SEED_OFFSET, split="eval"
    )


def call_pool(pool: Any, method: str, *args: Any) -> Any:
    """Call a RolloutPool method on a local pool or on the named pool actor alike."""
    fn = getattr(pool, method)
    if hasattr(fn, "remote"):
        return ray.get(fn.remote(*args))
    return fn(*args)


def evaluate_on_pool(
    pool: Any,
    configs: list[PPGConfig],
    weights: dict[str, tuple[int, str]],
    episodes: int,
    loaded: tuple[str, str] | None = None,
) -> tuple[dict, dict]:
    """Play the same held-out episodes with each policy in ``weights`` (label -> (version, weights
    path)) for each config's problem. ``loaded``: (problem, label) the pool already runs (config and
    weights), so nothing is reloaded for it. Returns (per-problem report, per-problem samples)."""

    problems, samples = {}, {}
    for config in configs:
        _, held_out = split_personas(load_personas(config.problem.personas_file))
        by_id = {p.id: p for p in held_out}
        requests = eval_requests(config, held_out, episodes)
        seeds = [s for r in requests for s in r.seeds]
        name = config.problem.name
        order = sorted(weights, key=lambda label: (loaded != (name, label), POLICIES.index(label)))
        played: dict[str, list] = {}
        for label in order:
            version, path = weights[label]
            if loaded is None or loaded[0] != name:
                call_pool(pool, "reconfigure", config, version, path)
            elif loaded[1] != label:
                call_pool(pool, "update_weights", version, path)
            loaded = (name, label)
            played[label] = call_pool(pool, "episodes", requests)
            ids = [p for r in requests for p in r.persona_ids]
            if [e.persona_id for e in played[label]] != ids:
                raise RuntimeError(f"the pool returned other episodes than requested for {label}")
        conversations = {
            label: [Conversation(by_id[e.persona_id], s, e.messages) for e, s in zip(eps, seeds, strict=True)]
            for label, eps in played.items()
        }
        problems[name] = problem_report(config, played, conversations, seeds)
        samples[name] = (played, conversations)
    return problems, samples


def problem_report(config: PPGConfig, played: dict, conversations: dict, seeds: list[int]) -> dict:

    problem = make_problem(config.problem)
    per_episode = {label: [sum(e.rewards) / len(e.rewards) for e in eps] for label, eps in played.items()}
    out: dict = {"turns": problem.num_turns, "judge": config.problem.judge, "partner": config.problem.partner}
    for label, eps in played.items():
        turns = max(len(e.rewards) for e in eps)
        reward = mean_interval(per_episode[label])
        out[label] = {
            "reward_mean": reward["mean"],
            "reward_ci95": [reward["low"], reward["high"]],
            "reward_per_turn": [
                statistics.fmean(e.rewards[t] for e in eps if len(e.rewards) > t) for t in range(turns)
            ],
            "episode_return_mean": statistics.fmean(sum(e.rewards) for e in eps),
            "behaviour": behaviour_rates(problem, conversations[label], seeds),
        }
    if {"checkpoint", "initial"} <= set(played):
        diff = paired_difference(per_episode["checkpoint"], per_episode["initial"])
        out["difference"] = {"mean": diff["mean"], "ci95": [diff["low"], diff["high"]], "n": diff["n"]}
    return out


# --- the command -------------------------------------------------------------------------------------


def problem_names(problem: str | list[str] | None) -> list[str]:
    """``--problem a --problem b,c`` -> [a, b, c] (order kept, repeats dropped)."""
    if problem is None:
        return []
    items = [problem] if isinstance(problem, str) else list(problem)
    names = [n.strip() for item in items for n in item.split(",") if n.strip()]
    return list(dict.fromkeys(names))


def evaluate(
    checkpoint: str | Path,
    problem: str | list[str] | None = None,
    episodes: int = 32,
    config_path: str | None = None,
    overrides: list[str] | None = None,
    out: str | Path | None = None,
) -> dict:
    """Score ``checkpoint`` and its initial policy on held-out personas (paired); write report.json,
    report.md and samples.md into ``out`` (default ``<checkpoint>/eval``) and return the report."""

    if episodes < 2:
        raise ValueError(f"--episodes must be at least 2 (an interval needs two), got {episodes}")
    checkpoint = Path(checkpoint)
    policy = validate_checkpoint(checkpoint, require_trainer_state=False)
    saved = checkpoint / CONFIG
    base = config_path or (saved if saved.is_file() else None)
    extra = list(overrides or []) + ["rollout.num_workers=1"]
    names = problem_names(problem) or [load_config(base, extra).problem.name]
    configs = [load_config(base, extra + [f"problem.name={n}"]) for n in names]
    for c in configs:
        check_environment(c)  # an unknown problem or a bad plug-in fails before any engine starts
    initial = resolve_model(configs[0].model.name_or_path)
    state = checkpoint / STATE
    version = json.loads(state.read_text())["policy_version"] if state.is_file() else 1
    start = time.perf_counter()
    connect(dashboard=configs[0].run.dashboard)
    pool = RolloutPool(configs[0], str(policy), name_prefix="ppg-eval")
    try:
        problems, samples = evaluate_on_pool(
            pool,
            configs,
            {"checkpoint": (version, str(policy)), "initial": (0, initial)},
            episodes,
            loaded=(names[0], "checkpoint"),
        )
    finally:
        pool.shutdown()
    report = build_report(configs[0], str(checkpoint), initial, episodes, problems)
    report["seconds"] = time.perf_counter() - start
    out = Path(out) if out else checkpoint / "eval"
    report["output_dir"] = str(out)
    write_outputs(out, report, samples)
    return report


def final_evaluation(pool: Any, config: PPGConfig, run_dir: Path, initial_path: str) -> dict | None:
    """``ppg train``'s closing evaluation, on the run's own pool (which already runs the final
    policy): final vs initial policy, ``run.final_eval_episodes`` held-out episodes, into
    ``<run_dir>/eval``. Returns the report (None when switched off); ``summary_lines`` says it
    (``ppg train``'s closing summary)."""

    episodes = config.run.final_eval_episodes
    if not episodes:
        return None
    start = time.perf_counter()
    final = latest_checkpoint(run_dir)
    version = json.loads((final / STATE).read_text())["policy_version"]
    problems, samples = evaluate_on_pool(
        pool,
        [config],
        {"checkpoint": (version, str(final / "policy")), "initial": (0, initial_path)},
        episodes,
        loaded=(config.problem.name, "checkpoint"),
    )
    report = build_report(config, str(final), config.model.name_or_path, episodes, problems)
    report["seconds"] = time.perf_counter() - start
    report["output_dir"] = str(Path(run_dir) / "eval")
    write_outputs(Path(run_dir) / "eval", report, samples)
    return report


def build_report(config: PPGConfig, checkpoint: str, initial: str, episodes: int, problems: dict) -> dict:

    _, held_out = split_personas(load_personas(config.problem.personas_file))
    first = next(iter(problems))
    return {
        "checkpoint": checkpoint,
        "initial_policy": config.model.name_or_path,
        "initial_policy_path": str(initial),
        "episodes": episodes,
        "held_out_personas": len(held_out),
        "seed": config.run.seed + EVAL_SEED_OFFSET,
        "temperature": config.rollout.temperature,
        "statistics": STATISTICS,
        "problems": problems,
        # the first problem's checkpoint figures at the top level, as ppg eval always returned them
        "problem": first,
        "reward_mean": problems[first]["checkpoint"]["reward_mean"],
        "reward_per_turn": problems[first]["checkpoint"]["reward_per_turn"],
        "episode_return_mean": problems[first]["checkpoint"]["episode_return_mean"],
    }


# --- output ------------------------------------------------------------------------------------------


def _pm(mean: float, ci: list) -> str:
    if ci[0] is None:
        return f"{mean:+.3f}"
    return f"{mean:+.3f} ± {(ci[1] - ci[0]) / 2:.3f}"


def main_rates(entry: dict) -> list[str]:
    """The behaviour rates either policy has (a rate with nothing to count is absent), reply length last."""
    names = dict.fromkeys([*entry["initial"]["behaviour"], *entry["checkpoint"]["behaviour"]])
    return [k for k in names if k != "reply_words"] + ["reply_words"] * ("reply_words" in names)


def _rate(behaviour: dict, name: str, digits: int = 2) -> str:
    """A rate for the table; "n/a" where the behaviour never had a chance (nothing to count)."""
    if name not in behaviour:
        return "n/a"
    return f"{behaviour[name]:.1f}" if name == "reply_words" else f"{behaviour[name]:.{digits}f}"


def summary_lines(report: dict, after: str = "checkpoint") -> list[str]:
    """A few lines: reward initial -> trained with intervals, the paired difference, behaviour rates."""
    lines = [
        f"held-out evaluation: {report['episodes']} episodes per policy, "
        f"{report['held_out_personas']} held-out personas, 95% t-intervals over episodes (paired)"
        + (f", {report['seconds']:.1f} s" if "seconds" in report else "")
    ]
    width = max(len(p) for p in report["problems"])
    for name, entry in report["problems"].items():
        a, b, d = entry["initial"], entry["checkpoint"], entry["difference"]
        lines.append(
            f"  {name:<{width}}  reward per turn: initial {_pm(a['reward_mean'], a['reward_ci95'])} -> "
            f"{after} {_pm(b['reward_mean'], b['reward_ci95'])}   difference {_pm(d['mean'], d['ci95'])}"
        )
        rates = ", ".join(
            f"{k} {_rate(a['behaviour'], k)}->{_rate(b['behaviour'], k)}" for k in main_rates(entry)
        )
        lines.append(f"  {'':<{width}}  {rates}")
    return lines


def report_markdown(report: dict) -> str:

    out = [
        "# Held-out evaluation",
        "",
        f"- checkpoint: `{report['checkpoint']}`",
        f"- initial policy: `{report['initial_policy']}` (the weights before RL)",
        f"- {report['episodes']} episodes per policy and problem on {report['held_out_personas']} "
        f"held-out personas, temperature {report['temperature']}",
        f"- {report['statistics']}",
        "",
        "| problem | initial | checkpoint | difference (checkpoint - initial) |",
        "| --- | --- | --- | --- |",
    ]
    for name, e in report["problems"].items():
        out.append(
            f"| {name} | {_pm(e['initial']['reward_mean'], e['initial']['reward_ci95'])} | "
            f"{_pm(e['checkpoint']['reward_mean'], e['checkpoint']['reward_ci95'])} | "
            f"{_pm(e['difference']['mean'], e['difference']['ci95'])} |"
        )
    out.append("")
    out.append("Mean reward per turn, ± the 95% interval's half-width.")
    for name, e in report["problems"].items():
        out += ["", f"## {name}: behaviour", "", "| rate | initial | checkpoint | what it counts |"]
        out.append("| --- | --- | --- | --- |")
        for k in main_rates(e):
            a, b = _rate(e["initial"]["behaviour"], k, 3), _rate(e["checkpoint"]["behaviour"], k, 3)
            out.append(f"| {k} | {a} | {b} | {describe(k)} |")
        per_turn = " / ".join(
            f"{x:+.2f}->{y:+.2f}"
            for x, y in zip(e["initial"]["reward_per_turn"], e["checkpoint"]["reward_per_turn"], strict=False)
        )
        out += ["", f"Reward per turn (initial->checkpoint): {per_turn}"]
    return "\n".join(out) + "\n"


def samples_markdown(samples: dict, per_problem: int = SAMPLES_PER_PROBLEM) -> str:
    """Each problem's first few episodes (distinct personas first): checkpoint beside initial."""
    out = ["# Sample dialogues: checkpoint beside the initial policy", ""]
    out.append(
        "Same held-out persona, conversation seed and sampling seed; reward of each reply in brackets."
    )
    for name, (played, conversations) in samples.items():
        out += ["", f"## {name}"]
        ckpt, init = played["checkpoint"], played["initial"]
        chosen, seen = [], set()
        for i, e in enumerate(ckpt):
            if e.persona_id not in seen:
                chosen.append(i)
                seen.add(e.persona_id)
        chosen = (chosen + [i for i in range(len(ckpt)) if i not in chosen])[:per_problem]
        for i in chosen:
            conv = conversations["checkpoint"][i]
            out += [
                "",
                f"### persona {conv.persona.id} ({conv.persona.name}), conversation seed {conv.seed}: "
                f"return {sum(ckpt[i].rewards):+.2f} (checkpoint) vs {sum(init[i].rewards):+.2f} (initial)",
                "",
                f"> system: {md_cell(ckpt[i].messages[0]['content'])}",
                "",
            ]
            out += dialogue_table(ckpt[i], init[i])
    return "\n".join(out) + "\n"


def dialogue_table(a, b) -> list[str]:
    """Turn by turn: the user's line(s) and each policy's reply with its reward."""

    def turns(e):
        users = [m["content"] for m in e.messages if m["role"] == "user"]
        agents = [m["content"] for m in e.messages if m["role"] == "assistant"]
        return users, agents

    (ua, ra), (ub, rb) = turns(a), turns(b)
    same_user = ua == ub
    head = (
        "| turn | user | checkpoint | initial |"
        if same_user
        else ("| turn | user (checkpoint's) | checkpoint | user (initial's) | initial |")
    )
    rows = [head, "|" + " --- |" * (head.count("|") - 1)]
    for t in range(max(len(ra), len(rb))):
        reply_a = f"{md_cell(ra[t])} [{a.rewards[t]:+.2f}]" if t < len(ra) else " "
        reply_b = f"{md_cell(rb[t])} [{b.rewards[t]:+.2f}]" if t < len(rb) else " "
        user_a = md_cell(ua[t]) if t < len(ua) else " "
        if same_user:
            rows.append(f"| {t + 1} | {user_a} | {reply_a} | {reply_b} |")
        else:
            user_b = md_cell(ub[t]) if t < len(ub) else " "
            rows.append(f"| {t + 1} | {user_a} | {reply_a} | {user_b} | {reply_b} |")
    return rows


def write_outputs(out: Path, report: dict, samples: dict) -> Path:
    out = Path(out)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    atomic_write_text(out / "report.md", report_markdown(report))
    atomic_write_text(out / "samples.md", samples_markdown(samples))
    return out
