"""What a person sees in the terminal: ppg's own lines only; everything else goes to a log file.

Why: a default ``ppg train`` printed ~500 lines for 60 iterations - Ray Train's "Reporting training
result" dict per iteration, a vLLM loader warning per weight update, Ray's actor prefixes, a progress
bar redrawn into the log - and the reward, the rate and the ETA were buried in them.

How: ``capture(log_path)`` points the process's stdout and stderr *file descriptors* at the log file
(so Python loggers, ``print``, C++ logs of Ray core and vLLM, and the worker output that Ray forwards
to the driver all land there, in real time, nothing lost), and keeps a duplicate of the original
terminal for ``say``. Lines that ppg's workers print with the ``[ppg]`` marker (say, the learner
restarting after a failure) are echoed to the terminal too. ``--verbose`` (``configure(verbose=True)``)
turns all of it off: the terminal gets everything, as before. Errors still reach the terminal in
full: ``error`` writes to both, and ``ppg.cli.main`` restores the terminal before an uncaught
exception prints its traceback (after writing it to the log).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import TextIO

MARKER = "[ppg]"  # a worker line that starts with it (after Ray's prefix) is meant for a person
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _State:
    enabled = False  # only the CLI captures: a library caller (a test, a notebook) keeps its streams
    log_path: Path | None = None
    log: TextIO | None = None  # the log file (also fd 1 and 2 while capturing)
    terminal: TextIO | None = None  # the original stdout, while capturing
    terminal_err: TextIO | None = None  # the original stderr, while capturing
    saved_fds: tuple[int, int] | None = None


_state = _State()


def configure(verbose: bool = False) -> None:
    """Called once by the CLI: library output goes to the command's log file from the moment it is
    known (``capture``), unless ``verbose`` keeps every library line on the terminal."""
    _state.enabled = not verbose


def capturing() -> bool:
    return _state.saved_fds is not None


def log_path() -> Path | None:
    """The file library output goes to (None when nothing is captured)."""
    return _state.log_path


def capture(path: Path | str) -> Path | None:
    """From now on stdout and stderr (the file descriptors: this process and the processes it starts)
    go to ``path``; ``say`` still reaches the terminal. No-op with ``--verbose`` or when capturing
    already (``ppg experiment`` keeps one log for all its runs), and outside the CLI (``configure``).
    Returns the log path, if any."""
    if not _state.enabled or capturing():
        return _state.log_path
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    _state.terminal = _original(sys.stdout, 1)
    _state.terminal_err = _original(sys.stderr, 2)
    _state.saved_fds = (os.dup(1), os.dup(2))
    _state.log = open(path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
    os.dup2(_state.log.fileno(), 1)
    os.dup2(_state.log.fileno(), 2)
    _state.log_path = path.resolve()
    _echo_worker_markers()
    return _state.log_path


def release() -> None:
    """Give the terminal its stdout and stderr back (at the end of a command, before a traceback);
    capturing stays off until the next ``configure``."""
    _state.enabled = False
    _state.log_path = None
    if not capturing():
        return
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    out, err = _state.saved_fds
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.close(out)
    os.close(err)
    _state.saved_fds = None
    _forget_worker_markers()
    for stream in (_state.terminal, _state.terminal_err, _state.log):
        if stream not in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.close()
    _state.terminal = _state.terminal_err = _state.log = None


def say(text: str = "") -> None:
    """A line for the person at the terminal (and for the log, so it tells the whole story)."""
    if _state.terminal is None:
        print(text, flush=True)
        return
    _state.terminal.write(text + "\n")
    _state.terminal.flush()
    _write_log(text)


def error(text: str) -> None:
    """An error: to the terminal's stderr in full, and to the log."""
    if _state.terminal_err is None:
        print(text, file=sys.stderr, flush=True)
        return
    _state.terminal_err.write(text + "\n")
    _state.terminal_err.flush()
    _write_log(text)


def log_exception(exc: BaseException) -> None:
    """An uncaught exception's traceback into the log (the terminal gets it once released)."""
    if _state.log is not None:
        _state.log.write("".join(traceback.format_exception(exc)))
        _state.log.flush()


def where_logs_are() -> str:
    """A line saying where the captured output is (empty with --verbose)."""
    return f"library output (Ray, vLLM, workers): {_state.log_path}" if _state.log_path else ""


def _original(stream: TextIO, fd: int) -> TextIO:
    """Where ppg's own lines go while fd ``fd`` points at the log: a copy of that fd when ``stream``
    writes to it (a terminal, a pipe), else ``stream`` itself (Python-level capture: pytest's
    capsys, a notebook), which the fd redirection does not touch."""
    try:
        on_fd = stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        on_fd = False
    if not on_fd:
        return stream
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")


def _write_log(text: str) -> None:
    if _state.log is not None:
        _state.log.write(f"{time.strftime('%H:%M:%S')} {text}\n")
        _state.log.flush()


# ---- worker lines meant for a person -------------------------------------------------------------
# Ray forwards worker stdout/stderr to the driver through a dispatcher (ray 2.60: a private API; if it
# moves, ppg loses only the echo, never the log: the lines still reach the log through fd 1).


def _dispatcher():
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher

        return global_worker_stdstream_dispatcher
    except Exception:  # another Ray: no echo
        return None


def _echo(data: dict) -> None:
    for line in data.get("lines", ()):
        text = _ANSI.sub("", line).strip()
        if text.startswith(MARKER) and _state.terminal is not None:
            _state.terminal.write(text + "\n")
            _state.terminal.flush()


def _echo_worker_markers() -> None:
    dispatcher = _dispatcher()
    if dispatcher is not None:
        dispatcher.remove_handler("ppg_console")
        dispatcher.add_handler("ppg_console", _echo)


def _forget_worker_markers() -> None:
    dispatcher = _dispatcher()
    if dispatcher is not None:
        dispatcher.remove_handler("ppg_console")


def duration(seconds: float) -> str:
    """``75`` -> ``1m15s``: short, for ETAs."""
    if seconds != seconds or seconds < 0:  # nan
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
