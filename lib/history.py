"""What happened in past runs, for status and metrics: ``<backup_dir>/<name>/last_run.json``
(the last backup attempt, successful or not, and run counters) and ``<backup_dir>/<name>/drills.json``
(the last drills). Failed runs leave no backup record, so this is where they are remembered.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lib import store
from lib.errors import InputError, LockHeld, RunInterrupted, StageFailed, ToolError, VerificationFailed

LAST_RUN = "last_run.json"
DRILLS = "drills.json"
DRILLS_KEPT = 20


def _read(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path`` (never through a symbolic link), or None."""
    try:
        data = json.loads(store.read_nofollow(path).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _write(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically. A refused write (a full disk, a read-only or unwritable
    directory) is a logged warning: remembering a run never fails it."""
    try:
        store.ensure_dir(path.parent)
        store.write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    except OSError as exc:
        logging.getLogger("backup").warning("could not write %s: %s", path, exc.strerror or exc)


def stage_of(exc: ToolError, default: str = "backup") -> str:
    """Which step failed, for hooks and state: the pipeline stage, 'verify', 'lock', 'preflight',
    'interrupted'."""
    if isinstance(exc, RunInterrupted):
        return "interrupted"
    if isinstance(exc, StageFailed):
        return exc.stage
    if isinstance(exc, VerificationFailed):
        return "verify"
    if isinstance(exc, LockHeld):
        return "lock"
    if isinstance(exc, InputError):
        return "preflight"
    return default


def last_run(backup_dir: Path, name: str) -> dict[str, Any] | None:
    """The last backup attempt of database ``name``, or None (also when the file is damaged)."""
    data = _read(backup_dir / name / LAST_RUN)
    if data is None or not isinstance(data.get("status"), str) or not _is_time(data.get("finished")):
        return None
    if not isinstance(data.get("seconds"), int | float) or isinstance(data["seconds"], bool):
        return None
    return data


def _is_time(value: Any) -> bool:
    try:
        store.parse_iso(value)
    except (TypeError, ValueError):
        return False
    return True


def record_run(
    backup_dir: Path,
    name: str,
    ok: bool,
    seconds: float,
    backup: store.Backup | None = None,
    error: ToolError | None = None,
) -> dict[str, Any]:
    """Remember one backup attempt of ``name`` (and count it). Returns the stored entry.
    Its status is 'success', 'failure', or 'interrupted' (``error`` a RunInterrupted)."""
    previous = last_run(backup_dir, name) or {}
    runs = previous.get("runs") if isinstance(previous.get("runs"), dict) else {}
    counts = {k: v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**53 else 0 for k, v in runs.items()}
    status = "success" if ok else ("interrupted" if isinstance(error, RunInterrupted) else "failure")
    counts[status] = counts.get(status, 0) + 1
    entry: dict[str, Any] = {
        "status": status,
        "finished": store.iso(store.utcnow()),
        "seconds": round(seconds, 3),
        "runs": {key: counts.get(key, 0) for key in ("success", "failure", "interrupted")},
    }
    if backup is not None:
        entry.update({"file": backup.path.name, "size": backup.record.get("size")})
    if error is not None:
        entry.update({"error": str(error)[:500], "stage": stage_of(error)})
    _write(backup_dir / name / LAST_RUN, entry)
    return entry


def drills(backup_dir: Path, name: str) -> list[dict[str, Any]]:
    """Past drills of ``name``, newest first."""
    data = _read(backup_dir / name / DRILLS) or {}
    items = data.get("drills")
    if not isinstance(items, list):
        return []
    return [d for d in items if isinstance(d, dict) and isinstance(d.get("ok"), bool) and _is_time(d.get("at"))]


def record_drill(backup_dir: Path, name: str, result: dict[str, Any]) -> None:
    """Prepend one drill result to ``drills.json`` (keeping the last DRILLS_KEPT)."""
    items = [result, *drills(backup_dir, name)][:DRILLS_KEPT]
    _write(backup_dir / name / DRILLS, {"drills": items})


def last_drill(backup_dir: Path, name: str, ok: bool | None = None) -> dict[str, Any] | None:
    """The newest drill (or the newest with the given outcome), or None."""
    for item in drills(backup_dir, name):
        if ok is None or bool(item.get("ok")) == ok:
            return item
    return None
