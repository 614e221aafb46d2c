"""The terminal gets ppg's lines only (``ppg/console.py``, ``ppg/progress.py``), the log file the rest;
and the run folder reads back as the training page shows it (``ppg/serve/run_view.py``).

Fast: no Ray. The real ``ppg train`` console (line counts, Ray's worker output in the log) is checked
end to end in ``tests/test_ui_browser.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib import resources
from pathlib import Path

from ppg import console
from ppg.learner.metrics import samples_markdown
from ppg.progress import IterationPrinter, iteration_line, reward_trend, train_summary
from ppg.serve.run_view import parse_samples, run_status

ROOT = Path(__file__).resolve().parents[1]

NOISY = """
import logging, os, subprocess, sys
from ppg import console
console.configure(verbose={verbose})
print("before capture")
log = console.capture(sys.argv[1])
print("library print")
print("library warning", file=sys.stderr)
logging.getLogger("vllm").warning("RotaryEmbedding: Failed to load weights")
os.write(2, b"C++ log line\\n")
subprocess.run([sys.executable, "-c", "print('a child process')"], check=True)
console.say("[ppg] iter 1/2  reward +0.100")
console.error("ppg: something the person must see")
console.release()
print("after release")
"""


def run_noisy(tmp_path: Path, verbose: bool) -> tuple[subprocess.CompletedProcess, Path]:
    log = tmp_path / "logs" / "console.log"
    script = tmp_path / "noisy.py"
    script.write_text(textwrap.dedent(NOISY.format(verbose=verbose)))
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, str(script), str(log)], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    return done, log


def test_capture_sends_library_output_to_the_log_and_ppg_lines_to_the_terminal(tmp_path):
    done, log = run_noisy(tmp_path, verbose=False)
    assert done.stdout.splitlines() == ["before capture", "[ppg] iter 1/2  reward +0.100", "after release"]
    assert done.stderr.strip() == "ppg: something the person must see", "errors still reach the terminal"
    text = log.read_text()
    for line in ["library print", "library warning", "RotaryEmbedding", "C++ log line", "a child process"]:
        assert line in text, f"{line!r} is lost: it must be in the log"
    assert "[ppg] iter 1/2" in text and "something the person must see" in text, "the log tells it all"


def test_verbose_keeps_everything_on_the_terminal(tmp_path):
    done, log = run_noisy(tmp_path, verbose=True)
    assert (
        "library print" in done.stdout and "C++ log line" in done.stderr and "RotaryEmbedding" in done.stderr
    )
    assert not log.exists()


def test_outside_the_cli_nothing_is_captured(tmp_path, capsys):
    assert console.capture(tmp_path / "x.log") is None and not (tmp_path / "x.log").exists()
    console.say("[ppg] hello")
    assert capsys.readouterr().out == "[ppg] hello\n"


def write_rows(path: Path, rows: list[dict]) -> None:
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def test_iteration_printer_says_each_new_row_once(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    write_rows(metrics, [{"iteration": 0, "reward_mean": 0.1, "episodes_per_s": 9.0, "time_iteration": 1.0}])
    printer = IterationPrinter(tmp_path, total=4)  # a resumed run: rows already there are not said again
    write_rows(
        metrics, [{"iteration": 1, "reward_mean": 0.25, "episodes_per_s": 10.0, "time_iteration": 1.0}]
    )
    with metrics.open("a") as f:
        f.write('{"iteration": 2, "reward_mea')  # being written: waits for its newline
    printer.poll()
    with metrics.open("a") as f:
        f.write('n": -0.5, "heldout_reward_mean": 0.4}\n')
    printer.poll()
    printer.poll()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[ppg] iter 2/4  reward +0.250  10.0 episodes/s  ETA ")
    assert lines[1].startswith("[ppg] iter 3/4  reward -0.500  held-out +0.400  ETA ")


def test_iteration_line_and_eta_format():
    line = iteration_line({"iteration": 4, "reward_mean": 0.4123, "episodes_per_s": 17.94}, 60, 75)
    assert line == "[ppg] iter 5/60  reward +0.412  17.9 episodes/s  ETA 1m15s"
    assert console.duration(3 * 3600 + 120) == "3h02m" and console.duration(float("nan")) == "?"


def test_summary_says_what_was_learned_where_it_is_and_what_next(tmp_path):
    rows = [{"iteration": i, "reward_mean": 0.1 + 0.01 * i} for i in range(20)]
    (tmp_path / "checkpoints" / "iter_000020").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text("")
    lines = train_summary(tmp_path, rows, ["held-out evaluation: 8 episodes"], "/x/console.log")
    text = "\n".join(lines)
    assert reward_trend(rows) == (0.1 + 0.005, 0.1 + 0.185)
    assert "training reward per turn +0.105 -> +0.285 (mean of the first and last 2 iterations)" in text
    assert "[ppg] held-out evaluation: 8 episodes" in text
    assert f"ppg eval --checkpoint {tmp_path / 'checkpoints' / 'iter_000020'}" in text
    assert f"ppg train --resume {tmp_path} run.iterations=40" in text and "/x/console.log" in text


def test_samples_read_back_as_the_training_page_shows_them(tmp_path):
    from conftest import scripted_episodes

    episodes = scripted_episodes("myopic", num_personas=3, per_persona=2)
    episodes[0].messages[2]["content"] = "a | pipe"  # an agent line with Markdown's cell separator
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "samples" / "iter_000010.md").write_text(samples_markdown(9, episodes))
    (run / "config.yaml").write_text("run:\n  iterations: 30\nproblem:\n  name: myopic\n")
    write_rows(run / "metrics.jsonl", [{"iteration": 0, "reward_mean": 0.2, "batch_fingerprint": "x"}])
    status = run_status(str(run))
    assert status["iterations"] == 30 and status["problem"] == "myopic"
    assert status["metrics"] == [{"iteration": 0, "reward_mean": 0.2}]
    dialogues = status["samples"]["dialogues"]
    assert status["samples"]["iteration"] == 10 and len(dialogues) == 3
    first = dialogues[0]
    assert first["persona"] == episodes[0].persona_id and len(first["turns"]) == episodes[0].num_turns
    assert first["turns"][0]["agent"] == "a | pipe"
    assert [t["reward"] for t in first["turns"]] == [round(r, 2) for r in episodes[0].rewards]
    assert parse_samples("no samples here") == []
    assert run_status(None)["run"] is None


def test_the_pages_ship_with_the_package():
    static = resources.files("ppg.serve") / "static"
    for name in ("chat.html", "live.html"):
        assert "<script>" in (static / name).read_text()
    assert '"serve/static/*.html"' in (ROOT / "pyproject.toml").read_text()


def test_ppg_serve_finds_the_checkpoints_run_its_problem_and_where_to_log(tmp_path):
    from ppg.cli import serve_log
    from ppg.config import load_config
    from ppg.serve.cli import run_of, with_checkpoint_problem

    run = tmp_path / "default-20261201-000000"
    checkpoint = run / "checkpoints" / "iter_000010"
    checkpoint.mkdir(parents=True)
    trained = load_config(None, ["problem.name=persona_chitchat"])
    (checkpoint / "config.yaml").write_text(trained.to_yaml())
    (run / "config.yaml").write_text(trained.to_yaml())
    assert run_of(checkpoint) is None, "no metrics yet: no training page"
    (run / "metrics.jsonl").write_text("")
    assert run_of(checkpoint) == str(run) and run_of(tmp_path) is None
    assert serve_log(checkpoint).parent == run / "logs" and serve_log(tmp_path).parent != tmp_path / "logs"

    default = load_config(None, [])
    assert with_checkpoint_problem(default, checkpoint, None, []).problem.name == "persona_chitchat"
    mine = load_config(None, ["problem.name=elicitation"])
    assert (
        with_checkpoint_problem(mine, checkpoint, None, ["problem.name=elicitation"]).problem.name
        == "elicitation"
    )
    assert with_checkpoint_problem(default, tmp_path, None, []).problem.name == "myopic"


def test_in_process_cli_callers_still_read_ppg_lines_from_sys_stdout(tmp_path, capsys):
    """``cli.main([...])`` inside pytest (capsys) or a notebook: ppg's lines go to the sys.stdout and
    sys.stderr they replaced; output written to the file descriptors goes to the log."""
    import os

    console.configure(verbose=False)
    try:
        log = console.capture(tmp_path / "console.log")
        os.write(1, b"fd-level library line\n")
        console.say("[ppg] a line for the person")
        console.error("ppg: an error")
    finally:
        console.release()
    captured = capsys.readouterr()
    assert captured.out == "[ppg] a line for the person\n" and captured.err == "ppg: an error\n"
    assert "fd-level library line" in log.read_text() and "a line for the person" in log.read_text()
    assert console.capture(tmp_path / "again.log") is None, "released: off until the CLI turns it on"
