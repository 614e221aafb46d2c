"""The selector's row of the report: its runs in pairs against the best fixed class and full
planning, its picks, what they cost, and how far each first pick could be trusted.

A pilot's pick is only as good as its estimate of the full-return gradient. Beside each pick: the
full gradient's signal to noise on the pilot (||mu_full||^2 against tr Cov / n; below ~1 the pilot
cannot resolve its direction) and, for pilots from 2026-12-01 on, the share of delete-one-fold
jackknife replicates that pick the same class (``ppg.experiment.selector``). The reported cosines are
recomputed from the stored moments, so older pilots are clipped to [-1, 1] too.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from ppg.experiment.selector import ClassGradientStats
from ppg.experiment.stats import fmt, interval, paired_test, signed
from ppg.experiment.suite import SELECTOR, Suite, selector_path

STAT_FIELDS = ("label", "variance", "bias_sq", "mean_norm_sq", "alignment", "full_norm_sq", "episodes")


def class_stats(entry: dict) -> ClassGradientStats:
    """A pilot JSON's class entry as statistics (older pilots lack ``full_variance``)."""
    return ClassGradientStats(
        **{k: entry[k] for k in STAT_FIELDS}, full_variance=entry.get("full_variance", math.nan)
    )


def reported_cosine(entry: dict, batch_size: int) -> float:
    return class_stats(entry).expected_cosine(batch_size)


def pick_trust(pilot: dict) -> str:
    """'SNR; agreement' of a pilot's pick: the full gradient's signal to noise (recorded since
    2026-12-01; for older pilots recomputed from the stored "full" entry) and the fold agreement."""
    snr, full = pilot.get("full_signal_to_noise"), pilot["classes"].get("full")
    if snr is None and full is not None:  # the reference's own variance is the full variance
        snr = class_stats({**full, "full_variance": full["variance"]}).full_signal_to_noise()
    agreement, folds = pilot.get("pick_agreement"), pilot.get("folds")
    shown = f"{round(agreement * folds)}/{folds}" if agreement is not None and folds else "-"
    return f"{fmt(math.nan if snr is None else snr, 2)}; {shown}"


def selector_summary(suite: Suite, out: Path, heldout: dict, pilots: dict) -> list[dict]:
    """The selector's runs in pairs against the best fixed class *chosen without the seed compared*
    (leave one seed out: the class a user who had run the other seeds would pick; a choice in
    hindsight would flatter the fixed classes by the noise of the pick) and against full planning.
    Also its picks per seed (phase by phase) and its pilots' episodes, which it pays for."""
    selector = []
    for problem in suite.problems:
        ours = heldout.get((problem, SELECTOR))
        if not ours:
            continue
        complete = [
            c
            for c in suite.selector_candidates(problem)
            if len(heldout.get((problem, c), {})) == len(suite.seeds)
        ]
        chosen: dict[int, str] = {}
        for s in ours:
            others = [t for t in suite.seeds if t != s]
            if complete and others:
                chosen[s] = max(
                    complete, key=lambda c: statistics.fmean(heldout[problem, c][t] for t in others)
                )
        picks, cost = [], 0
        trust = [pick_trust(pilots[problem, s]) for s in suite.seeds if (problem, s) in pilots]
        for s in suite.seeds:
            record = selector_path(out, problem, s)
            if record.is_file():
                phases = json.loads(record.read_text())["phases"]
                picks.append(">".join(p["selected"] for p in phases))
                cost += sum(p["episodes"] for p in phases)
            elif (problem, s) in pilots:
                picks.append(pilots[problem, s]["selected"])
                cost += pilots[problem, s]["episodes"]
        mean, half = interval(list(ours.values()))
        entry = {
            "problem": problem,
            "picks": ", ".join(picks),
            "pilot_episodes": cost / max(len(picks), 1),
            "pick_trust": ", ".join(trust),
            "selector_heldout": mean,
            "selector_ci95": half,
            "best_fixed": ", ".join(chosen[s] for s in sorted(chosen)),
        }
        versus = {"best_fixed": {s: heldout[problem, c][s] for s, c in chosen.items()}}
        versus["full"] = heldout.get((problem, "full"), {})
        for name, theirs in versus.items():
            test = paired_test(ours, theirs)
            entry |= {
                f"vs_{name}_diff": test["diff"],
                f"vs_{name}_ci95": test["ci95"],
                f"vs_{name}_p": test["p"],
            }
        selector.append(entry)
    return selector


def selector_markdown(selector: list[dict]) -> str:
    if not selector:
        return ""
    lines = [
        "",
        "| problem | selector's picks (per seed; > = a re-pick) | first pick's trust: full-gradient SNR; "
        "fold agreement | pilot episodes per run | selector held-out | best fixed class (chosen on the "
        "other seeds) | selector - that class | selector - full |",
        "|---|---|---|---:|---|---|---|---|",
    ]
    for s in selector:
        lines.append(
            f"| {s['problem']} | {s['picks']} | {s['pick_trust']} | {fmt(s['pilot_episodes'], 0)} | "
            f"{fmt(s['selector_heldout'])} ± {fmt(s['selector_ci95'])} | "
            f"{s['best_fixed']} | {signed(s['vs_best_fixed_diff'], s['vs_best_fixed_ci95'], s['vs_best_fixed_p'])} | "
            f"{signed(s['vs_full_diff'], s['vs_full_ci95'], s['vs_full_p'])} |"
        )
    return "\n".join(lines) + "\n"
