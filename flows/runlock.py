"""One pipeline run per project at a time: an OS file lock taken when the flow starts.

DVC locks its repository only while one ``dvc repro`` runs, so a second flow started
beside a first would fail mid-way ("Unable to acquire lock") between two stages. The
flow instead takes this lock first: a second run refuses at once (or waits, if asked)
naming the holder. ``flock`` is released by the kernel when the holder dies, so a
killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

LOCK_FILE = Path(".dvc") / "tmp" / "distill-pipeline.lock"
POLL_S = 0.1
# Even "refuse at once" retries this long: ``is_locked`` probes by taking the lock for a
# moment, and a run starting in that moment must not be refused.
GRACE_S = 1.0


class PipelineBusyError(RuntimeError):
    """Another pipeline run holds the project's lock."""


def lock_path(root: Path) -> Path:
    """The lock file of the project at ``root`` (inside DVC's own, git-ignored, tmp folder)."""
    if not (root / ".dvc").is_dir():
        raise FileNotFoundError(f"{root} is not a DVC project (no .dvc folder): run `dvc init` there")
    return root / LOCK_FILE


@contextlib.contextmanager
def pipeline_lock(root: Path, wait_s: float = 0.0, run_label: str = "") -> Iterator[dict]:
    """Hold the project's pipeline lock for the block; yields the holder record written into it.

    ``wait_s`` = 0 refuses at once when another run holds it; > 0 polls that long first.
    """
    path = lock_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by the stages' processes
    try:
        _acquire(fd, path, wait_s)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "run": run_label}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        try:
            yield holder
        finally:
            os.ftruncate(fd, 0)  # still held: nobody reads a finished run as the holder
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _acquire(fd: int, path: Path, wait_s: float) -> None:
    deadline = time.monotonic() + max(wait_s, GRACE_S)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise PipelineBusyError(busy_message(path, wait_s)) from None
            time.sleep(POLL_S)


def read_holder(path: Path) -> dict:
    """The record the current holder wrote ({} if it has not written it yet)."""
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def busy_message(path: Path, wait_s: float = 0.0) -> str:
    """Who holds the lock and what to do about it."""
    holder = read_holder(path)
    who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
           + (f", {holder['run']}" if holder.get("run") else "")) if holder else "a process that is starting"
    waited = f" after waiting {wait_s:.0f} s" if wait_s else ""
    return (f"another pipeline run is using this project ({who}; lock {path}){waited}. Nothing was "
            f"run. Wait for it to finish, or pass --wait-for-lock SECONDS to queue behind it.")


def is_locked(root: Path) -> str | None:
    """The busy message if another run holds the lock now, else None (takes and drops it)."""
    try:
        with pipeline_lock(root):
            return None
    except PipelineBusyError as exc:
        return str(exc)
