"""A run folder as the training page (``/live``) shows it: the reward per iteration, the latest sample
dialogues, the held-out evaluation once there is one.

It reads only the files the learner writes anyway (``metrics.jsonl``, ``samples/iter_N.md``,
``eval/report.json``), so the page works the same for a run in progress and a finished one, and adds
no work to the learner. The replica reads the folder itself: on a cluster the run folder must be on
storage the replica's node sees (as ``run.output_dir`` already must be for checkpoints).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

KEYS = ("iteration", "reward_mean", "episodes_per_s", "policy_version", "loss", "time_iteration",
        "heldout_reward_mean", "eval_reward_mean")  # fmt: skip
MAX_ROWS = 5000
_CELL = re.compile(r"(?<!\\)\|")
_HEADER = re.compile(
    r"^## persona (?P<persona>\S+), group (?P<group>\d+), policy version (?P<version>\d+): "
    r"return (?P<ret>[-+0-9.]+), mean reward per turn (?P<mean>[-+0-9.]+)"
)


def run_status(run_dir: str | None) -> dict:
    """Everything ``/live`` draws, as JSON-ready data; ``{"run": None, ...}`` without a run folder."""
    if not run_dir:
        return {
            "run": None,
            "message": "this server was not started by a training run: start one with "
            "`ppg train serve.enabled=true`, or serve a run's checkpoint (ppg serve --checkpoint RUN/checkpoints/iter_N)",
        }
    run = Path(run_dir)
    config = _config(run)
    rows = _metrics(run)
    return {
        "run": str(run),
        "name": run.name,
        "problem": config.get("problem", {}).get("name"),
        "policy_class": config.get("objective", {}).get("policy_class", {}).get("type"),
        "iterations": config.get("run", {}).get("iterations"),
        "metrics": rows,
        "samples": latest_samples(run),
        "eval": _eval(run),
    }


def _config(run: Path) -> dict:
    try:
        return yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    latest: dict[int, dict] = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if isinstance(row, dict) and isinstance(row.get("iteration"), int):
            latest[row["iteration"]] = {k: row[k] for k in KEYS if k in row}  # a resume rewrites rows
    return [latest[i] for i in sorted(latest)][-MAX_ROWS:]


def latest_samples(run: Path) -> dict | None:
    """The newest ``samples/iter_N.md`` as dialogues: ``{"iteration", "dialogues": [{"persona",
    "policy_version", "return", "mean", "system", "turns": [{"user", "agent", "reward"}]}]}``."""
    files = sorted((run / "samples").glob("iter_*.md")) if (run / "samples").is_dir() else []
    if not files:
        return None
    text = files[-1].read_text(errors="replace")
    return {"iteration": int(files[-1].stem.split("_")[1]), "dialogues": parse_samples(text)}


def parse_samples(markdown: str) -> list[dict]:
    """The dialogues of a samples file (``ppg.learner.metrics.samples_markdown``'s format)."""
    dialogues: list[dict] = []
    for line in markdown.splitlines():
        if m := _HEADER.match(line):
            dialogues.append({
                "persona": m["persona"], "policy_version": int(m["version"]), "return": float(m["ret"]),
                "mean": float(m["mean"]), "system": "", "turns": [],
            })  # fmt: skip
        elif dialogues and line.startswith("> system: "):
            dialogues[-1]["system"] = line.removeprefix("> system: ")
        elif dialogues and line.startswith("| ") and not line.startswith(("| turn", "| ---")):
            cells = [c.strip().replace("\\|", "|") for c in _CELL.split(line)[1:-1]]
            if len(cells) == 4:
                reward = _float(cells[3])
                dialogues[-1]["turns"].append({"user": cells[1], "agent": cells[2], "reward": reward})
    return dialogues


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _eval(run: Path) -> dict | None:
    try:
        report = json.loads((run / "eval" / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    out = {}
    for name, entry in report.get("problems", {}).items():
        out[name] = {
            "initial": entry.get("initial", {}).get("reward_mean"),
            "final": entry.get("checkpoint", {}).get("reward_mean"),
            "difference": entry.get("difference", {}).get("mean"),
        }
    return {"episodes": report.get("episodes"), "problems": out}
