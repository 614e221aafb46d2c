"""Run outputs: metrics as JSONL (one line per iteration), sample conversations of the training batch
(``samples/iter_N.md``), the same two through each of ``run.loggers`` (TensorBoard by default, W&B,
MLflow: ``ppg/learner/loggers.py``), and the reward plot. The JSONL and the Markdown files are the
record; the loggers are views of it."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ppg.files import atomic_save_figure, atomic_write_text
from ppg.learner.loggers import open_sinks

SAMPLES = "samples"


class MetricsWriter:
    def __init__(
        self, run_dir: Path, loggers: Sequence[str] = ("tensorboard",), config: dict | None = None
    ) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sinks = open_sinks(Path(run_dir), list(loggers), config or {})

    def write(self, iteration: int, metrics: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"iteration": iteration, **metrics}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        for sink in self.sinks:
            sink.scalars(iteration, scalars)

    def write_samples(self, iteration: int, episodes: list, count: int = 3) -> Path:
        """``count`` conversations of an iteration's batch (one per group, the first groups) with their
        per-turn rewards: ``samples/iter_<iteration+1>.md`` and, as text, to every logger
        (TensorBoard's Text tab, a W&B HTML panel, an MLflow artifact ``samples/iter_N.md``)."""
        text = samples_markdown(iteration, episodes, count)
        path = atomic_write_text(self.path.parent / SAMPLES / f"iter_{iteration + 1:06d}.md", text)
        for sink in self.sinks:
            sink.text(iteration, SAMPLES, text)
        return path

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def md_cell(text: str) -> str:
    """Text as one Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ").strip() or " "


def samples_markdown(iteration: int, episodes: list, count: int = 3) -> str:
    chosen, groups = [], set()
    for e in episodes:
        if e.group_id not in groups and len(chosen) < count:
            chosen.append(e)
            groups.add(e.group_id)
    out = [f"# Iteration {iteration + 1}: {len(chosen)} of the batch's {len(episodes)} conversations"]
    for e in chosen:
        users = [m["content"] for m in e.messages if m["role"] == "user"]
        replies = [m["content"] for m in e.messages if m["role"] == "assistant"]
        out += [
            "",
            f"## persona {e.persona_id}, group {e.group_id}, policy version {e.policy_version}: "
            f"return {sum(e.rewards):+.2f}, mean reward per turn {sum(e.rewards) / max(1, len(e.rewards)):+.3f}",
            "",
            f"> system: {md_cell(e.messages[0]['content'])}" if e.messages[0]["role"] == "system" else "",
            "",
            "| turn | user | agent | reward |",
            "| --- | --- | --- | --- |",
        ]
        for t, reply in enumerate(replies):
            user = md_cell(users[t]) if t < len(users) else " "
            reward = f"{e.rewards[t]:+.2f}" if t < len(e.rewards) else " "
            out.append(f"| {t + 1} | {user} | {md_cell(reply)} | {reward} |")
    return "\n".join(out) + "\n"


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest = {r["iteration"]: r for r in rows}  # a resumed run rewrites iterations after its checkpoint
    return [latest[i] for i in sorted(latest)]


def plot_rewards(run_dir: Path, title: str) -> Path:
    """reward.png: mean reward per iteration (and a moving average) for this run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    xs = [r["iteration"] for r in rows]
    ys = [r["reward_mean"] for r in rows]
    window = max(1, len(ys) // 10)
    smooth = [
        sum(ys[max(0, i - window + 1) : i + 1]) / len(ys[max(0, i - window + 1) : i + 1])
        for i in range(len(ys))
    ]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, ys, alpha=0.4, label="mean reward per turn")
    ax.plot(xs, smooth, label=f"moving average ({window})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = atomic_save_figure(fig, Path(run_dir) / "reward.png")
    plt.close(fig)
    return out
