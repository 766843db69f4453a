"""One run at a time per backup_dir: an exclusive flock on ``<backup_dir>/.lock``.

The kernel releases a flock when its holder dies (even by SIGKILL), so a killed run never blocks
the next one. The pid, start time and command written into the file are for the message a second
run shows; they are never used to decide whether the lock is held. The descriptor is not
inherited by child processes (Python opens it close-on-exec), so a stray child cannot keep it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from lib import store
from lib.errors import InputError, LockHeld

LOCK_NAME = ".lock"
POLL_SECONDS = 0.2
#: holders that keep the lock for a moment only (``invoke status`` checking for leftovers of
#: killed runs): a run without --wait waits this long for them instead of failing
BRIEF_HOLDERS = {"status": 10.0}
#: a holder that has not written its details yet has just taken the lock
JUST_TAKEN_SECONDS = 1.0
log = logging.getLogger("backup")


def lock_path(backup_dir: Path) -> Path:
    return backup_dir / LOCK_NAME


def parse_wait(wait: str | float | None) -> float | None:
    """--wait SECONDS as a number (None when not given). Raises InputError for non-numbers."""
    if wait is None or wait == "":
        return None
    try:
        seconds = float(wait)
    except (TypeError, ValueError):
        raise InputError(f"--wait {wait}: not a number of seconds") from None
    if seconds < 0:
        raise InputError(f"--wait {wait}: must be 0 or more seconds")
    return seconds


class LockUnavailable(LockHeld):
    """The lock file cannot be opened: backup_dir is unwritable or read-only, or ``.lock`` is a
    symbolic link (never followed). The run does not start; hooks report it like a held lock."""


def read_holder(path: Path) -> dict[str, Any]:
    """The informational holder record in the lock file ({} when empty or unreadable)."""
    try:
        data = json.loads(store.read_nofollow(path, 64 * 1024).decode("utf-8") or "{}")
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def describe_holder(holder: dict[str, Any]) -> str:
    """'pid 123 (backup --all) since 2026-11-26 02:00:03 (4m ago)', or a fallback."""
    if not holder.get("pid"):
        return "a process that left no details (pid unknown)"
    text = f"pid {holder['pid']}"
    if holder.get("command"):
        text += f" ({holder['command']})"
    if holder.get("started"):
        try:
            started = store.parse_iso(holder["started"])
            local = started.astimezone().strftime("%Y-%m-%d %H:%M:%S")
            text += f" since {local} ({store.human_age(store.utcnow() - started)} ago)"
        except ValueError:
            text += f" since {holder['started']}"
    if holder.get("host") and holder["host"] != socket.gethostname():
        text += f" on host {holder['host']}"
    return text


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _write_holder(fd: int, command: str) -> None:
    info = {
        "pid": os.getpid(),
        "started": store.iso(store.utcnow()),
        "started_local": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "host": socket.gethostname(),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)


@contextlib.contextmanager
def run_lock(backup_dir: Path, command: str, wait: float | None = None) -> Iterator[Path]:
    """Hold the exclusive run lock of ``backup_dir`` for the ``with`` block.

    ``command`` (e.g. 'backup --all') is shown to a second run. Without ``wait`` a held lock
    raises LockHeld at once (after a few seconds' grace when the holder is a BRIEF_HOLDERS
    check); with ``wait`` seconds it polls until then. Yields the lock path.
    """
    path = lock_path(backup_dir)
    try:
        store.ensure_dir(backup_dir)
        fd = store.open_nofollow(path, os.O_RDWR | os.O_CREAT, 0o600)
    except store.SymlinkRefused as exc:
        raise LockUnavailable(f"lock file {exc.strerror}") from None
    except OSError as exc:
        raise LockUnavailable(
            f"cannot open the lock file {path}: {exc.strerror or exc}; make {backup_dir} writable for this user"
        ) from None
    try:
        deadline = time.monotonic() + wait if wait else None
        announced = False
        while not _try_lock(fd):
            info = read_holder(path)
            holder = describe_holder(info)
            brief = BRIEF_HOLDERS.get(str(info.get("command"))) or (0 if info.get("pid") else JUST_TAKEN_SECONDS)
            if deadline is None and brief:
                deadline = time.monotonic() + brief
            if deadline is None or time.monotonic() >= deadline:
                hint = "pass --wait SECONDS to wait for it" if wait is None else f"gave up after waiting {wait:g}s"
                raise LockHeld(f"another run holds the lock {path}: {holder}; {hint}")
            if not announced and wait:
                log.info("waiting up to %gs for the lock held by %s", wait, holder)
                announced = True
            time.sleep(POLL_SECONDS)
        _write_holder(fd, command)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
