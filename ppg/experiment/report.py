"""The suite's results: tables (CSV + Markdown) and plots (PNG) from the run folders and pilots.

The score of a run is its **held-out evaluation**: mean reward per turn of its final policy on
``suite.eval_episodes`` conversations with held-out personas, the same conversations for every row
of a seed. Per (problem, row): the mean over seeds with a 95% t-interval over seeds; a **paired test
over seeds** against the problem's best row (the best row against its runner-up): mean difference,
its 95% interval, the two-sided p-value of the paired t-test; also the training-batch reward over
the last ``FINAL_WINDOW`` iterations (training personas), episodes until the training reward,
averaged over ``SMOOTH`` iterations, first reaches the problem's target, and the pilot's gradient
statistics (expected cosine with the full-return gradient at the batch size: the selector's score).

The selector's row is its own runs (its picks per seed, trained with an independent seed; with
``selector.reselect_every`` it re-picks at its own policy), compared in pairs with full planning and
with the best fixed class chosen on the *other* seeds (leave one seed out), so that neither side is
picked by the noise of the seed it is compared on. Its pilot episodes are listed: they are its cost.

A **pooled comparison** pairs every row with full planning over all (problem, seed) pairs: a
summary across problems (does a smaller reward subset beat the whole return?), read after the
per-problem tests, not instead of them.

Beside every score, **what the agents do** (``behaviour.csv`` and a table per problem;
``behaviour_table.py``): the held-out
behaviour rates of ``ppg.env.behaviour`` (recommends the stated taste, asks first, answers its persona
truthfully, dodges, words per reply), mean over seeds. A reward is read with what earned it: a row
that wins by saying less or by dodging shows it here.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from ppg.console import say
from ppg.experiment.behaviour_table import behaviour_markdown, behaviour_summary
from ppg.experiment.selector_table import reported_cosine, selector_markdown, selector_summary
from ppg.experiment.stats import (  # noqa: F401 - interval and paired_test are part of this module's API
    NAN,
    bootstrap_interval,
    fmt,
    fmt_g,
    interval,
    mean_of,
    paired_test,
    signed,
    with_interval,
)
from ppg.experiment.suite import HELDOUT, INITIAL, SELECTOR, Suite, cell_dir, pilot_path
from ppg.files import atomic_save_figure, atomic_write_csv, atomic_write_text
from ppg.learner.metrics import read_metrics

FINAL_WINDOW = 5
SMOOTH = 3


def curve(run_dir: Path) -> tuple[list[int], list[float]]:
    """(episodes seen after each iteration, reward_mean of that iteration)."""
    episodes, rewards, seen = [], [], 0
    for r in read_metrics(run_dir):
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
    return statistics.fmean(initial) + entry.target_gain if initial else NAN


def summarize(suite: Suite, out: Path) -> tuple[list[dict], list[dict], dict, dict, dict]:
    pilots = {
        (p, s): json.loads(pilot_path(out, p, s).read_text())
        for p in suite.problems
        for s in suite.seeds
        if pilot_path(out, p, s).is_file()
    }
    targets = {p: target(suite, p, pilots) for p in suite.problems}
    heldout: dict[tuple[str, str], dict[int, float]] = {}  # (problem, row) -> seed -> score
    training: dict[tuple[str, str, int], dict] = {}
    curves: dict[tuple[str, str], list] = {}
    for problem in suite.problems:
        for row in suite.rows_for(problem):
            for seed in suite.seeds:
                run = cell_dir(out, problem, row, seed)
                if not (run / "done.json").is_file():
                    continue
                heldout.setdefault((problem, row), {})[seed] = json.loads((run / HELDOUT).read_text())[
                    "reward_mean"
                ]
                if row == INITIAL:
                    continue
                episodes, rewards = curve(run)
                training[problem, row, seed] = {
                    "final": statistics.fmean(rewards[-FINAL_WINDOW:]),
                    "to_target": episodes_to_target(episodes, rewards, targets[problem]),
                }
                curves.setdefault((problem, row), []).append((episodes, rewards))

    rows = []
    for problem in suite.problems:
        scored = {r: heldout[problem, r] for r in suite.rows_for(problem) if (problem, r) in heldout}
        ranked = sorted(
            (r for r in scored if r != SELECTOR and len(scored[r]) == len(suite.seeds)),
            key=lambda r: statistics.fmean(scored[r].values()),
            reverse=True,
        )
        for row, by_seed in scored.items():
            other = (
                (ranked[1] if len(ranked) > 1 else None)
                if ranked and row == ranked[0]
                else (ranked[0] if ranked else None)
            )
            test = paired_test(by_seed, scored[other]) if other else paired_test({}, {})
            mean, half = interval(list(by_seed.values()))
            runs = [training[problem, row, s] for s in by_seed if (problem, row, s) in training]
            reached = [r["to_target"] for r in runs if r["to_target"] is not None]
            stats = [
                {**entry, "expected_cosine": reported_cosine(entry, pilots[problem, s]["batch_size"])}
                for s in by_seed
                if (problem, s) in pilots and (entry := pilots[problem, s]["classes"].get(row))
            ]  # cosines recomputed: clipped to [-1, 1], NaN where the full norm estimates <= 0
            train_mean, train_half = interval([r["final"] for r in runs]) if runs else (NAN, NAN)
            rows.append(
                {
                    "problem": problem,
                    "target": targets[problem],
                    "class": row,
                    "seeds": len(by_seed),
                    "heldout_reward": mean,
                    "heldout_ci95": half,
                    "best": bool(ranked) and row == ranked[0],
                    "compared_with": other or "",
                    "paired_diff": test["diff"],
                    "paired_ci95": test["ci95"],
                    "paired_p": test["p"],
                    "final_reward": train_mean,
                    "ci95": train_half,
                    "episodes_to_target": mean_of(reached),
                    "reached_target": f"{len(reached)}/{len(runs)}" if runs else "-",
                    "grad_mse": mean_of([x["mse"] for x in stats]),
                }
            )
            for name, key in (
                ("grad_expected_cosine", "expected_cosine"),
                ("grad_variance", "variance"),
                ("grad_bias_sq", "bias_sq"),
            ):
                values = [x[key] for x in stats if not math.isnan(x[key])]
                low, high = bootstrap_interval(values)
                rows[-1] |= {name: mean_of(values), f"{name}_lo": low, f"{name}_hi": high}

    selector = selector_summary(suite, out, heldout, pilots)
    return rows, selector, curves, targets, heldout


def pooled_vs_full(suite: Suite, heldout: dict) -> list[dict]:
    """Each row against full planning over every (problem, seed) pair both have: does a smaller
    reward subset beat the whole return across problems? A summary pooled over unlike problems
    (a paired t-test over the pairs, and how many pairs it wins); the per-problem tests stay the
    primary ones."""
    full = next(
        (
            k
            for k, m in suite.methods.items()
            if m.policy_class.type == "full" and not (m.offline or m.overrides)
        ),
        None,
    )
    if full is None:
        return []
    summary = []
    for label in [*(m for m in suite.methods if m != full), SELECTOR]:
        mine, theirs = {}, {}
        for problem in suite.problems:
            a, b = heldout.get((problem, label), {}), heldout.get((problem, full), {})
            for seed in a.keys() & b.keys():
                mine[problem, seed], theirs[problem, seed] = a[seed], b[seed]
        if len(mine) >= 2:
            test = paired_test(mine, theirs)
            summary.append(
                {
                    "class": label,
                    "versus": full,
                    "problems": len({p for p, _ in mine}),
                    "pairs": test["n"],
                    "diff": test["diff"],
                    "ci95": test["ci95"],
                    "p": test["p"],
                    "wins": sum(mine[k] > theirs[k] for k in mine),
                }
            )
    return summary


def pooled_markdown(summary: list[dict]) -> str:
    if not summary:
        return ""
    lines = [
        "| pooled over problems | vs | problems | (problem, seed) pairs | held-out difference (95% CI, paired) | pairs won |",
        "|---|---|---:|---:|---|---:|",
    ]
    for r in summary:
        lines.append(
            f"| {r['class']} | {r['versus']} | {r['problems']} | {r['pairs']} | "
            f"{signed(r['diff'], r['ci95'], r['p'])} | {r['wins']}/{r['pairs']} |"
        )
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| problem | row | held-out reward (95% CI, seeds) | paired difference vs | training reward | "
        "episodes to target | reached | grad cosine | grad variance | bias² |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = f"**{r['class']}**" if r["best"] else r["class"]
        versus = (
            f"{r['compared_with']}: {signed(r['paired_diff'], r['paired_ci95'], r['paired_p'])}"
            if r["compared_with"]
            else "-"
        )
        lines.append(
            f"| {r['problem']} | {name} | {fmt(r['heldout_reward'])} ± {fmt(r['heldout_ci95'])} (n={r['seeds']}) | "
            f"{versus} | {fmt(r['final_reward'])} ± {fmt(r['ci95'])} | {fmt(r['episodes_to_target'], 0)} | "
            f"{r['reached_target']} | {with_interval(r, 'grad_expected_cosine', fmt)} | "
            f"{with_interval(r, 'grad_variance', fmt_g)} | {with_interval(r, 'grad_bias_sq', fmt_g)} |"
        )
    return "\n".join(lines) + "\n"


def plot(suite: Suite, rows: list[dict], curves: dict, targets: dict, heldout: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(suite.problems)
    fig, axes = plt.subplots(1, len(problems), figsize=(4.5 * len(problems), 3.6), squeeze=False)
    for ax, problem in zip(axes[0], problems, strict=True):
        for label in suite.rows_for(problem):
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
        ax.set_ylabel("training reward per turn")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{suite.name}: training reward (mean ± sd over seeds; dotted: target)")
    fig.tight_layout()
    atomic_save_figure(fig, out / "reward_curves.png")
    plt.close(fig)

    fig, axes = plt.subplots(1, len(problems), figsize=(4.5 * len(problems), 3.8), squeeze=False)
    for ax, problem in zip(axes[0], problems, strict=True):
        prs = [r for r in rows if r["problem"] == problem]
        for i, r in enumerate(prs):
            color = "tab:green" if r["best"] else ("tab:grey" if r["class"] == INITIAL else "tab:blue")
            half = 0 if math.isnan(r["heldout_ci95"]) else r["heldout_ci95"]
            ax.bar(i, r["heldout_reward"], yerr=half, color=color, alpha=0.7, capsize=3)
            seeds = list(heldout.get((problem, r["class"]), {}).values())
            ax.plot([i] * len(seeds), seeds, "k.", ms=3)
        ax.set_xticks(range(len(prs)), [r["class"] for r in prs], rotation=45, ha="right", fontsize=8)
        ax.set_title(problem)
        ax.set_ylabel("held-out reward per turn")
    fig.suptitle("held-out reward per row: mean over seeds, 95% CI, one dot per seed (green: best)")
    fig.tight_layout()
    atomic_save_figure(fig, out / "heldout.png")
    plt.close(fig)

    with_stats = [r for r in rows if not math.isnan(r["grad_variance"])]
    if not with_stats:
        return
    panels = (
        ("grad_expected_cosine", "expected cosine with full gradient", False),
        ("grad_variance", "gradient variance per episode", True),
        ("grad_bias_sq", "bias² vs full-return gradient", True),
    )
    fig, axes = plt.subplots(len(panels), len(problems), figsize=(4.5 * len(problems), 9), squeeze=False)
    for column, problem in enumerate(problems):
        prs = [r for r in with_stats if r["problem"] == problem]
        for ax, (name, label, log) in zip(axes[:, column], panels, strict=True):
            values = [r[name] for r in prs]
            errors = [
                [
                    max(0.0, v - r[f"{name}_lo"]) if not math.isnan(r[f"{name}_lo"]) else 0.0
                    for v, r in zip(values, prs, strict=True)
                ],
                [
                    max(0.0, r[f"{name}_hi"] - v) if not math.isnan(r[f"{name}_hi"]) else 0.0
                    for v, r in zip(values, prs, strict=True)
                ],
            ]
            ax.bar([r["class"] for r in prs], values, yerr=errors, capsize=3, alpha=0.8)
            if log and any(v > 0 for v in values):
                ax.set_yscale("symlog", linthresh=max(1e-3, min([v for v in values if v > 0])))
            ax.set_ylabel(label, fontsize=8)
            ax.tick_params(axis="x", labelsize=8)
        axes[0, column].set_title(problem)
    fig.suptitle(
        "pilot batches at the initial policy: direction, variance and bias of each class's gradient\n"
        "(mean over seeds; bars: 95% bootstrap interval over the seeds' pilots)"
    )
    fig.tight_layout()
    atomic_save_figure(fig, out / "gradient_variance.png")
    plt.close(fig)


def code_line(suite: Suite, out: Path) -> str:
    """Which code made the table: the commit of each finished cell (``done.json``), counted."""
    versions: dict[str, int] = {}
    for problem in suite.problems:
        for row in suite.rows_for(problem):
            for seed in suite.seeds:
                done = cell_dir(out, problem, row, seed) / "done.json"
                if done.is_file():
                    code = json.loads(done.read_text()).get("code", "not recorded (before 2026-12-01)")
                    versions[code] = versions.get(code, 0) + 1
    listed = ", ".join(f"{v} ({n} cells)" for v, n in sorted(versions.items(), key=lambda x: -x[1]))
    return f"Code of the cells: {listed}."


def write_report(suite: Suite, out: Path) -> str:
    rows, selector, curves, targets, heldout = summarize(suite, out)
    if not rows:
        return ""
    atomic_write_csv(out / "results.csv", rows)
    if selector:
        atomic_write_csv(out / "selector.csv", selector)
    behaviour = behaviour_summary(suite, out)
    if behaviour:
        atomic_write_csv(
            out / "behaviour.csv", behaviour, list(dict.fromkeys(k for r in behaviour for k in r))
        )
    pooled = pooled_vs_full(suite, heldout)
    text = "\n".join(
        [
            markdown(rows),
            selector_markdown(selector),
            pooled_markdown(pooled),
            behaviour_markdown(behaviour),
            code_line(suite, out),
            "",
        ]
    )
    atomic_write_text(out / "results.md", text)
    plot(suite, rows, curves, targets, heldout, out)
    say(text)
    return text
