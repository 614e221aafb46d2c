"""The suite's results: a table (CSV + Markdown) and plots (PNG) from the run folders and pilots.

Per (problem, class): the final reward (mean reward per turn over each run's last ``FINAL_WINDOW``
iterations), its mean over seeds with a 95% t-interval; episodes until the reward, averaged over a
``SMOOTH``-iteration window, first reaches the problem's target (mean over the seeds that reached it,
and how many did); the pilot's per-episode gradient variance, bias^2 and MSE at the training batch
size. The selector's row per problem: the class it picked per seed, scored by that seed's run of
the picked class (runs are deterministic given config and seed, so training the pick again would
reproduce that run), with the pilot's episodes added to its episodes-to-target.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from ppg.experiment.suite import Suite, cell_dir, pilot_path
from ppg.files import atomic_save_figure, atomic_write_csv, atomic_write_text

FINAL_WINDOW = 5
SMOOTH = 3
# two-sided 95% Student t quantiles by degrees of freedom (n - 1)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% t-interval (NaN half-width for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    t = T95.get(len(values) - 1, 1.96)
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def curve(run_dir: Path) -> tuple[list[int], list[float]]:
    """(episodes seen after each iteration, reward_mean of that iteration)."""
    from ppg.learner.metrics import read_metrics

    rows = read_metrics(run_dir)
    episodes, rewards, seen = [], [], 0
    for r in rows:
        seen += r["episodes"]
        episodes.append(seen)
        rewards.append(r["reward_mean"])
    return episodes, rewards


def episodes_to_target(episodes: list[int], rewards: list[float], target: float) -> int | None:
    for i in range(len(rewards)):
        window = rewards[max(0, i - SMOOTH + 1) : i + 1]
        if len(window) == SMOOTH and statistics.fmean(window) >= target:
            return episodes[i]
    return None


def target(suite: Suite, problem: str, pilots: dict) -> float:
    """The problem's target reward: given, or the initial policy's pilot reward plus a gain."""
    entry = suite.problems[problem]
    if entry.target_reward is not None:
        return entry.target_reward
    initial = [v["pilot_reward"] for (p, _), v in pilots.items() if p == problem]
    return statistics.fmean(initial) + entry.target_gain if initial else float("nan")


def summarize(suite: Suite, out: Path) -> tuple[list[dict], list[dict], dict]:

    pilots = {
        (p, s): json.loads(pilot_path(out, p, s).read_text())
        for p in suite.problems
        for s in suite.seeds
        if pilot_path(out, p, s).is_file()
    }
    targets = {p: target(suite, p, pilots) for p in suite.problems}
    per_seed: dict[tuple[str, str, int], dict] = {}
    curves: dict[tuple[str, str], list] = {}
    for problem, label, seed in suite.cells():
        run = cell_dir(out, problem, label, seed)
        if not (run / "done.json").is_file():
            continue
        episodes, rewards = curve(run)
        per_seed[problem, label, seed] = {
            "final": statistics.fmean(rewards[-FINAL_WINDOW:]),
            "to_target": episodes_to_target(episodes, rewards, targets[problem]),
        }
        curves.setdefault((problem, label), []).append((episodes, rewards))
    rows = []
    for problem in suite.problems:
        for label in suite.classes_for(problem):
            seeds = [s for s in suite.seeds if (problem, label, s) in per_seed]
            if not seeds:
                continue
            mean, half = interval([per_seed[problem, label, s]["final"] for s in seeds])
            reached = [per_seed[problem, label, s]["to_target"] for s in seeds]
            reached = [x for x in reached if x is not None]
            stats = [pilots[problem, s]["classes"][label] for s in seeds if (problem, s) in pilots]
            rows.append(
                {
                    "problem": problem,
                    "target": targets[problem],
                    "class": label,
                    "seeds": len(seeds),
                    "final_reward": mean,
                    "ci95": half,
                    "episodes_to_target": statistics.fmean(reached) if reached else float("nan"),
                    "reached_target": f"{len(reached)}/{len(seeds)}",
                    "grad_variance": statistics.fmean(x["variance"] for x in stats)
                    if stats
                    else float("nan"),
                    "grad_bias_sq": statistics.fmean(x["bias_sq"] for x in stats) if stats else float("nan"),
                    "grad_mse": statistics.fmean(x["mse"] for x in stats) if stats else float("nan"),
                }
            )
    selector = []
    for problem in suite.problems:
        picks = {s: pilots[problem, s]["selected"] for s in suite.seeds if (problem, s) in pilots}
        scored = {s: per_seed.get((problem, c, s)) for s, c in picks.items()}
        if not picks or any(v is None for v in scored.values()):
            continue
        ours = interval([v["final"] for v in scored.values()])
        problem_rows = [r for r in rows if r["problem"] == problem and r["seeds"] == len(suite.seeds)]
        best = max(problem_rows, key=lambda r: r["final_reward"]) if problem_rows else None
        pilot_eps = statistics.fmean(pilots[problem, s]["episodes"] for s in picks)
        reached = [v["to_target"] + pilot_eps for v in scored.values() if v["to_target"] is not None]
        selector.append(
            {
                "problem": problem,
                "picks": ", ".join(f"seed {s}: {c}" for s, c in picks.items()),
                "selector_final_reward": ours[0],
                "selector_ci95": ours[1],
                "selector_episodes_to_target": statistics.fmean(reached) if reached else float("nan"),
                "best_fixed_class": best["class"] if best else "",
                "best_fixed_final_reward": best["final_reward"] if best else float("nan"),
                "best_fixed_ci95": best["ci95"] if best else float("nan"),
            }
        )
    return rows, selector, curves, targets


def fmt(x: float, digits: int = 3) -> str:
    return "-" if isinstance(x, float) and math.isnan(x) else f"{x:.{digits}f}"


def markdown(rows: list[dict], selector: list[dict]) -> str:
    lines = [
        "| problem | class | final reward (95% CI) | episodes to target | reached | grad variance | bias² | MSE |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    best = {}
    for r in rows:
        if r["final_reward"] > best.get(r["problem"], (-math.inf,))[0]:
            best[r["problem"]] = (r["final_reward"], r["class"])
    for r in rows:
        name = f"**{r['class']}**" if best[r["problem"]][1] == r["class"] else r["class"]
        lines.append(
            f"| {r['problem']} | {name} | {fmt(r['final_reward'])} ± {fmt(r['ci95'])} | "
            f"{fmt(r['episodes_to_target'], 0)} | {r['reached_target']} | {r['grad_variance']:.3g} | "
            f"{r['grad_bias_sq']:.3g} | {r['grad_mse']:.3g} |"
        )
    if selector:
        lines += [
            "",
            "| problem | selector's picks | selector final reward | best fixed class | its final reward |",
            "|---|---|---|---|---|",
        ]
        for s in selector:
            lines.append(
                f"| {s['problem']} | {s['picks']} | {fmt(s['selector_final_reward'])} ± "
                f"{fmt(s['selector_ci95'])} | {s['best_fixed_class']} | {fmt(s['best_fixed_final_reward'])} ± "
                f"{fmt(s['best_fixed_ci95'])} |"
            )
    return "\n".join(lines) + "\n"


def plot(suite: Suite, rows: list[dict], curves: dict, targets: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(suite.problems)
    fig, axes = plt.subplots(1, len(problems), figsize=(4.5 * len(problems), 3.6), squeeze=False)
    for ax, problem in zip(axes[0], problems, strict=True):
        for label in suite.classes_for(problem):
            runs = curves.get((problem, label))
            if not runs:
                continue
            n = min(len(e) for e, _ in runs)
            x = runs[0][0][:n]
            ys = [[r[i] for _, r in runs] for i in range(n)]
            mean = [statistics.fmean(y) for y in ys]
            ax.plot(x, mean, label=label)
            if len(runs) > 1:
                sd = [statistics.stdev(y) for y in ys]
                ax.fill_between(
                    x,
                    [m - s for m, s in zip(mean, sd, strict=True)],
                    [m + s for m, s in zip(mean, sd, strict=True)],
                    alpha=0.15,
                )
        ax.axhline(targets[problem], color="grey", ls=":", lw=1)
        ax.set_title(problem)
        ax.set_xlabel("episodes")
        ax.set_ylabel("mean reward per turn")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{suite.name}: reward per policy class (mean ± sd over seeds; dotted: target)")
    fig.tight_layout()
    atomic_save_figure(fig, out / "reward_curves.png")
    plt.close(fig)

    with_stats = [r for r in rows if not math.isnan(r["grad_variance"])]
    if not with_stats:
        return
    fig, axes = plt.subplots(1, len(problems), figsize=(4.5 * len(problems), 3.4), squeeze=False)
    for ax, problem in zip(axes[0], problems, strict=True):
        prs = [r for r in with_stats if r["problem"] == problem]
        ax.bar([r["class"] for r in prs], [r["grad_variance"] for r in prs], label="variance (per episode)")
        ax.bar([r["class"] for r in prs], [r["grad_bias_sq"] for r in prs], alpha=0.6, label="bias² vs full")
        ax.set_yscale("log")
        ax.set_title(problem)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("pilot gradient: per-episode variance and bias² per class (log scale)")
    fig.tight_layout()
    atomic_save_figure(fig, out / "gradient_variance.png")
    plt.close(fig)


def write_report(suite: Suite, out: Path) -> str:
    rows, selector, curves, targets = summarize(suite, out)
    if not rows:
        return ""
    atomic_write_csv(out / "results.csv", rows)
    if selector:
        atomic_write_csv(out / "selector.csv", selector)
    text = markdown(rows, selector)
    atomic_write_text(out / "results.md", text)
    plot(suite, rows, curves, targets, out)
    print(text, flush=True)
    return text
