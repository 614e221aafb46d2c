"""The driver's view of a training run: one line per iteration while it runs, a summary at the end.

Why the driver and not the learner: the learner runs in a Ray Train worker, whose stdout reaches the
terminal only through Ray's log forwarding (with an actor prefix, among every library's noise). The
learner writes each iteration to ``<run>/metrics.jsonl`` (fsynced) anyway, so the driver tails that
file and prints the line itself - the same way under ``ppg train``, ``ray job submit`` and ``ppg
experiment``, and it is what the live training page (``/live``) reads too.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from ppg.console import duration, say

HELDOUT_KEYS = ("heldout_reward_mean", "eval_reward_mean")  # shown when a run measures them


def iteration_line(row: dict, total: int, eta_s: float) -> str:
    """``[ppg] iter 5/60  reward +0.412  held-out +0.50  17.9 episodes/s  ETA 1m10s``."""
    parts = [f"[ppg] iter {row['iteration'] + 1}/{total}", f"reward {row['reward_mean']:+.3f}"]
    for key in HELDOUT_KEYS:
        if isinstance(row.get(key), (int, float)):
            parts.append(f"held-out {row[key]:+.3f}")
            break
    if isinstance(row.get("episodes_per_s"), (int, float)):
        parts.append(f"{row['episodes_per_s']:.1f} episodes/s")
    parts.append(f"ETA {duration(eta_s)}")
    return "  ".join(parts)


class IterationPrinter:
    """Tails ``metrics.jsonl`` on a thread and says one line per new iteration (``every``: only every
    n-th and the last, for ``ppg experiment``'s many runs). The ETA is the wall time per iteration
    seen so far (rollouts, update, broadcast, Ray Train's report), times the iterations left."""

    def __init__(self, run_dir: Path, total: int, every: int = 1, poll_s: float = 0.5) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.total, self.every, self.poll_s = total, max(1, every), poll_s
        self._offset = self.path.stat().st_size if self.path.is_file() else 0  # a resume: only new rows
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ppg-progress", daemon=True)
        self._first: tuple[float, int] | None = None  # (time, iteration) of the first row seen

    def __enter__(self) -> IterationPrinter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()  # the last rows, if the run ended between two polls

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def poll(self) -> None:
        for row in self._new_rows():
            now = time.monotonic()
            if self._first is None:
                self._first = (now - row.get("time_iteration", 0.0), row["iteration"] - 1)
            start, before = self._first
            per_iteration = (now - start) / max(1, row["iteration"] - before)
            left = self.total - row["iteration"] - 1
            if (row["iteration"] + 1) % self.every == 0 or left == 0:
                say(iteration_line(row, self.total, per_iteration * left))

    def _new_rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self._offset += len(complete)
        rows = []
        for line in complete.decode("utf-8", "replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row.get("iteration"), int) and isinstance(row.get("reward_mean"), (int, float)):
                rows.append(row)
        return rows


def reward_trend(rows: list[dict]) -> tuple[float, float] | None:
    """Mean training reward of the first and the last tenth of the run (at least one iteration each)."""
    if not rows:
        return None
    k = max(1, len(rows) // 10)
    first = [r["reward_mean"] for r in rows[:k]]
    last = [r["reward_mean"] for r in rows[-k:]]
    return sum(first) / len(first), sum(last) / len(last)


def train_summary(
    run_dir: Path,
    rows: list[dict],
    eval_lines: list[str],
    log: str | None,
    page: str = "http://127.0.0.1:8000/",
) -> list[str]:
    """What a person needs when ``ppg train`` ends: what was learned, where it is, what to run next."""
    from ppg.learner.checkpoint import list_checkpoints

    run_dir = Path(run_dir)
    out = ["", f"[ppg] done: {len(rows)} iterations in {run_dir}"]
    trend = reward_trend(rows)
    if trend:
        k = max(1, len(rows) // 10)
        out.append(
            f"[ppg]   training reward per turn {trend[0]:+.3f} -> {trend[1]:+.3f} "
            f"(mean of the first and last {k} iteration{'s' if k > 1 else ''})"
        )
    out += [f"[ppg] {line}" for line in eval_lines]
    checkpoints = list_checkpoints(run_dir)
    files = ["metrics.jsonl", "reward.png", "samples/", "eval/report.md"]
    out.append(
        "[ppg]   in the run folder: " + ", ".join(f for f in files if (run_dir / f.rstrip("/")).exists())
    )
    if log:
        out.append(f"[ppg]   library output (Ray, vLLM, workers): {log}")
    if checkpoints:
        last, done = checkpoints[-1], (rows[-1]["iteration"] + 1 if rows else 1)
        out += [
            "[ppg] next:",
            f"  ppg eval --checkpoint {last}",
            f"  ppg serve --checkpoint {last}   # the chat page: {page}",
            f"  ppg train --resume {run_dir} run.iterations={2 * done}   # train on",
        ]
    return out
