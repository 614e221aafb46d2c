"""Atomic file writes (write a temporary sibling, then rename): a crash never leaves half a file.
Folders are published the same way, after ``fsync_tree``."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_csv(path: str | Path, rows: list[dict], fieldnames: list[str] | None = None) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames or list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def atomic_save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)
    return path


def fsync_tree(folder: str | Path) -> None:
    """Flush every file and folder under ``folder`` to disk, so that the rename which publishes the
    folder never reveals empty or missing files after a crash."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*"), reverse=True):  # files before the folders that hold them
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
        else:
            fsync_dir(path)
    fsync_dir(folder)


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a rename inside it is durable only after this)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
