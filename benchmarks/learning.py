"""Does every problem learn? Train each problem's expected-best policy class, evaluate held-out.

    .venv/bin/python benchmarks/learning.py                        # all problems, ~30-40 min on 2 cores
    .venv/bin/python benchmarks/learning.py --problems myopic,elicitation --iterations 40

One Ray cluster and one rollout pool for every run (the vLLM engine starts once). Each run is an
ordinary ``ppg train`` run folder under ``--out`` ending with the paired held-out evaluation of the
final vs the initial (warm-started) policy: same held-out personas, conversation and sampling seeds.
Writes ``learning.json``, ``learning.md`` (reward per turn with 95% intervals, the paired difference,
the behaviour rates before -> after) and ``learning.png`` (initial vs trained per problem).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ppg.config import load_config
from ppg.files import atomic_save_figure, atomic_write_text

BEST_CLASS = {  # the class each problem is built to favour (ppg problems), as config overrides
    "myopic": ["objective.policy_class.type=greedy"],
    "elicitation": ["objective.policy_class.type=full"],
    "segmented": ["objective.policy_class.type=segment"],
    "persona_chitchat": ["objective.policy_class.type=k_step", "objective.policy_class.k=3"],
    "persona_therapy": ["objective.policy_class.type=k_step", "objective.policy_class.k=3"],
    "persona_education": ["objective.policy_class.type=k_step", "objective.policy_class.k=2"],
    "persona_consistency": ["objective.policy_class.type=k_step", "objective.policy_class.k=3"],
}
RATES = {  # the behaviour rates shown per family (ppg/env/behaviour.py)
    "user_alignment": ("recommends_stated_taste", "asks_before_recommending", "evasive"),
    "persona_consistency": ("answers_truthfully", "contradicts_itself", "dodges_question"),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--problems", default=",".join(BEST_CLASS))
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--eval-episodes", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/learning")
    parser.add_argument("--report-only", action="store_true", help="tables and plot from finished runs")
    args = parser.parse_args()
    if args.report_only:
        return write_results(
            collect(Path(args.out).resolve(), args.problems.split(",")), Path(args.out), args
        )

    import ray

    from ppg.driver import start_pool, train
    from ppg.models import resolve_model
    from ppg.ray_session import connect

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.problems.split(",") if n]
    configs = {
        n: load_config(
            None,
            [
                f"problem.name={n}",
                *BEST_CLASS[n],
                f"run.iterations={args.iterations}",
                f"run.seed={args.seed}",
                f"run.final_eval_episodes={args.eval_episodes}",
                f"run.output_dir={out}",
                f"run.name={n}",
                "run.keep_last=1",
            ],
        )
        for n in names
    }
    connect()
    policy = resolve_model(configs[names[0]].model.name_or_path)
    pool = start_pool(configs[names[0]], policy)
    results = {}
    try:
        for k, name in enumerate(names, start=1):
            start = time.perf_counter()
            print(f"[learning] {k}/{len(names)} {name} ({' '.join(BEST_CLASS[name])})", flush=True)
            run_dir = out / name
            train(configs[name], run_dir=run_dir, pool=pool, final_eval=True)
            results.update(collect(out, [name]))
            results[name]["seconds"] = time.perf_counter() - start
    finally:
        ray.get(pool.shutdown.remote())
        ray.kill(pool)
    write_results(results, out, args)


def collect(out: Path, names: list[str]) -> dict:
    """Each finished run's held-out report (``<out>/<problem>/eval/report.json``)."""
    results = {}
    for name in names:
        path = out / name / "eval" / "report.json"
        if path.is_file():
            report = json.loads(path.read_text())
            config = load_config(out / name / "config.yaml")
            results[name] = {
                "class": " ".join(BEST_CLASS[name]),
                "iterations": config.run.iterations,
                "episodes_per_iteration": config.rollout.episodes_per_iteration,
                "eval_episodes": report["episodes"],
                **report["problems"][name],
            }
    return results


def best_evasive(name: str, episodes: int = 96) -> dict:
    """The best-scoring scripted evasive agent (``EVASIONS``) on held-out personas, rule judge and
    scripted partner as in training: what a policy that games the reward would get. A trained policy
    must beat it, or it learned nothing an evasion would not."""
    import statistics

    from ppg.env.conversation import run_conversations
    from ppg.env.judges import RuleJudge
    from ppg.env.partners import ScriptedPartner
    from ppg.env.personas import load_personas, split_personas
    from ppg.env.problems import make_problem
    from ppg.env.scripted_agents import EVASIONS, evasive_agent

    problem = make_problem(load_config(None, [f"problem.name={name}"]).problem)
    _, held_out = split_personas(load_personas())
    personas = [held_out[i % len(held_out)] for i in range(episodes)]
    scores = {}
    for kind in EVASIONS:
        convs = run_conversations(
            problem, personas, list(range(episodes)), evasive_agent(kind), ScriptedPartner(), RuleJudge()
        )
        scores[kind] = statistics.mean(r for c in convs for r in c.rewards)
    kind = max(scores, key=scores.get)
    return {"kind": kind, "reward_mean": scores[kind]}


def write_results(results: dict, out: Path, args) -> None:
    for name, r in results.items():
        r["best_evasive"] = best_evasive(name)
    atomic_write_text(out / "learning.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out / "learning.md", table(results, args))
    plot(results, out / "learning.png")
    print((out / "learning.md").read_text())


def table(results: dict, args) -> str:
    from ppg.env.problems import PROBLEMS

    lines = [
        f"Seed {args.seed}; training iterations x episodes per iteration, and the held-out evaluation's "
        "episodes per policy (paired: same personas and seeds), per row; 95% t-intervals. Best evasive "
        "agent: the best of the scripted evasions on the same held-out personas.",
        "",
        "| problem | class | iterations x episodes | eval episodes | initial | trained | difference "
        "| best evasive agent | behaviour: initial -> trained |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        a, b, d = r["initial"], r["checkpoint"], r["difference"]
        rates = ", ".join(
            f"{k} {a['behaviour'].get(k, 0):.2f} -> {b['behaviour'].get(k, 0):.2f}"
            for k in RATES[PROBLEMS[name].family]
        )
        label = r["class"].split("type=")[1].split()[0] + (
            f" k={r['class'][-1]}" if "k=" in r["class"] else ""
        )
        lines.append(
            f"| {name} | {label} | {r['iterations']} x {r['episodes_per_iteration']} | {r['eval_episodes']} "
            f"| {pm(a)} | {pm(b)} | "
            f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | "
            f"{r['best_evasive']['reward_mean']:+.3f} ({r['best_evasive']['kind']}) | {rates} |"
        )
    return "\n".join(lines) + "\n"


def pm(entry: dict) -> str:
    low, high = entry["reward_ci95"]
    return f"{entry['reward_mean']:+.3f} ± {(high - low) / 2:.3f}"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4))
    for shift, who, color in [(-0.2, "initial", "tab:gray"), (0.2, "checkpoint", "tab:blue")]:
        means = [results[n][who]["reward_mean"] for n in names]
        errs = [(results[n][who]["reward_ci95"][1] - results[n][who]["reward_ci95"][0]) / 2 for n in names]
        label = "warm start (initial)" if who == "initial" else "trained (expected-best class)"
        ax.bar(
            [i + shift for i in range(len(names))], means, 0.4, yerr=errs, capsize=3, color=color, label=label
        )
    for i, n in enumerate(names):  # what the best scripted evasion scores on this problem
        ax.hlines(
            results[n]["best_evasive"]["reward_mean"],
            i - 0.45,
            i + 0.45,
            colors="tab:red",
            linestyles=":",
            label="best evasive agent" if i == 0 else None,
        )
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("held-out reward per turn (95% CI)")
    ax.set_title("Held-out reward before and after RL, per problem")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
