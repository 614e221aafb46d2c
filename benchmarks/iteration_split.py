"""Per-iteration time split of a training run: generate, judge/partner, learner, broadcast, other.

Reads RUN_DIR/metrics.jsonl (written by ``ppg train``) and writes a table and a stacked-bar PNG.
"other" is everything the framework adds: Ray calls, batch transfer through the object store, the
collective, checkpoint writes, and waiting for the slowest rollout worker.

    python benchmarks/iteration_split.py runs/main-20261125-120000
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ppg.files import atomic_save_figure, atomic_write_text
from ppg.learner.metrics import read_metrics

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("generate", "environment", "learner", "broadcast", "other")


def split(rows: list[dict], skip_first: int = 1) -> dict[str, float]:
    """Mean seconds per iteration of each part (the first iterations include warm-up; skipped)."""
    rows = rows[skip_first:] or rows
    out = {part: 0.0 for part in PARTS}
    for r in rows:
        out["generate"] += r["time_generate"]
        out["environment"] += r["time_environment"]
        out["learner"] += r["time_learner"]
        out["broadcast"] += r["time_broadcast"]
        out["other"] += (
            r["time_iteration"]
            - r["time_generate"]
            - r["time_environment"]
            - r["time_learner"]
            - r["time_broadcast"]
        )
    return {k: v / len(rows) for k, v in out.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = read_metrics(args.run_dir)
    if not rows:
        parser.error(f"{args.run_dir} has no metrics.jsonl rows; pass the folder of a ppg train run")
    parts = split(rows)
    total = sum(parts.values())
    lines = [
        f"Run: `{args.run_dir.name}`, {len(rows)} iterations (first skipped as warm-up)",
        "",
        "| part | seconds / iteration | share |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {k} | {v:.3f} | {v / total:.0%} |" for k, v in parts.items()]
    lines.append(f"| total | {total:.3f} | 100% |")
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "iteration_split.md", text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.2))
    left = 0.0
    for k, v in parts.items():
        ax.barh([0], [v], left=left, label=f"{k} {v:.2f}s")
        left += v
    ax.set_yticks([])
    ax.set_xlabel("seconds per iteration")
    ax.legend(ncol=3, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.45))
    fig.tight_layout()
    atomic_save_figure(fig, args.out / "iteration_split.png")
    print(text)
    return parts


if __name__ == "__main__":
    main()
