"""What the agents do: the held-out behaviour rates of a suite's rows, beside their scores.

A reward is read with what earned it. Each cell's held-out evaluation (``heldout.json``) carries the
rates of ``ppg.env.behaviour`` (recommends the stated taste, asks first, answers its persona
truthfully, dodges, words per reply); here they are averaged over seeds per (problem, row), so a row
that wins by saying less or by dodging shows it next to its reward.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ppg.experiment.suite import HELDOUT, Suite, cell_dir


def behaviour_summary(suite: Suite, out: Path) -> list[dict]:
    """Per (problem, row): each behaviour rate of the held-out evaluations, mean over the seeds that
    have it (a rate with nothing to count in a seed's conversations is absent from that seed)."""
    summary = []
    for problem in suite.problems:
        for row in suite.rows_for(problem):
            rates: dict[str, list[float]] = {}
            seeds = 0
            for seed in suite.seeds:
                run = cell_dir(out, problem, row, seed)
                if not (run / "done.json").is_file():
                    continue
                seeds += 1
                for name, rate in json.loads((run / HELDOUT).read_text()).get("behaviour", {}).items():
                    rates.setdefault(name, []).append(rate)
            if seeds:
                means = {name: statistics.fmean(values) for name, values in rates.items()}
                summary.append({"problem": problem, "class": row, "seeds": seeds, **means})
    return summary


def behaviour_markdown(summary: list[dict]) -> str:
    """One table per problem: its rows x the rates its conversations have, reply length last."""
    lines: list[str] = []
    for problem in dict.fromkeys(r["problem"] for r in summary):
        rows = [r for r in summary if r["problem"] == problem]
        names = [
            n for n in dict.fromkeys(k for r in rows for k in r) if n not in ("problem", "class", "seeds")
        ]
        names.sort(key=lambda n: n == "reply_words")
        lines += [
            f"| {problem}: what the agents do (held-out) | "
            + " | ".join(n.replace("_", " ") for n in names)
            + " |",
            "|---|" + "---:|" * len(names),
        ]
        for r in rows:
            cells = [f"{r[n]:.{1 if n == 'reply_words' else 2}f}" if n in r else "n/a" for n in names]
            lines.append(f"| {r['class']} (n={r['seeds']}) | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
