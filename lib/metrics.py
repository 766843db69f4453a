"""Prometheus metrics as a node_exporter textfile (``monitoring.prometheus_textfile``).

Rewritten atomically (temp file in the same directory, fsync, rename; mode 0644 so
node_exporter can read it) after every backup, prune and drill run, from the records and history
files, so it always describes the state on disk. Writing it is best effort: a failure is logged
as a warning and never fails the run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from lib import store
from lib.config import Spec
from lib.status import collect

PREFIX = "lemon_backup_"
log = logging.getLogger("backup")

# name (without PREFIX) -> (type, help)
METRICS: dict[str, tuple[str, str]] = {
    "last_success_timestamp_seconds": ("gauge", "Creation time of the newest verified backup (Unix time)."),
    "last_size_bytes": ("gauge", "Size of the newest verified backup in bytes."),
    "age_seconds": ("gauge", "Age of the newest verified backup when this file was written."),
    "max_age_seconds": ("gauge", "Configured staleness limit (monitoring.max_age_hours) in seconds."),
    "stale": ("gauge", "1 when the newest verified backup is missing or older than the limit."),
    "last_run_success": ("gauge", "1 when the last backup run of the database succeeded, 0 when it failed."),
    "last_run_timestamp_seconds": ("gauge", "When the last backup run of the database finished (Unix time)."),
    "last_run_duration_seconds": ("gauge", "Duration of the last backup run of the database."),
    "runs_total": ("counter", "Backup runs of the database by outcome."),
    "kept_backups": ("gauge", "Backups stored locally per tier."),
    "last_objects": ("gauge", "Buckets: objects in the bucket (configured prefixes) at the newest verified backup."),
    "last_source_bytes": ("gauge", "Buckets: bytes of those objects (the bucket's size, not the backup file's)."),
    "destination_lag": ("gauge", "1 when the destination has no verified copy of the newest verified backup."),
    "last_drill_timestamp_seconds": ("gauge", "When the last restore drill finished (Unix time)."),
    "last_drill_success": ("gauge", "1 when the last restore drill passed, 0 when it failed."),
    "last_drill_restore_duration_seconds": ("gauge", "Time the last restore drill took to restore and check."),
    "last_drill_success_timestamp_seconds": ("gauge", "When a restore drill last passed (Unix time)."),
    "wal_seconds_since_last_segment": ("gauge", "Seconds since the newest WAL segment was archived."),
    "wal_receiver_up": ("gauge", "1 when the WAL receiver's heartbeat is fresh (invoke wal-receive runs)."),
    "wal_slot_lag_bytes": ("gauge", "WAL the server keeps for the receiver's replication slot, in bytes."),
    "wal_base_backup_age_seconds": ("gauge", "Age of the newest base backup for point-in-time recovery."),
    "wal_last_segment_timestamp_seconds": ("gauge", "When the newest WAL segment was archived."),
    "wal_receiver_heartbeat_timestamp_seconds": ("gauge", "The WAL receiver's last heartbeat."),
}


def escape(value: str) -> str:
    """A label value escaped for the text exposition format."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _ts(text: str | None) -> float | None:
    return store.parse_iso(text).timestamp() if text else None


def samples(report: dict[str, Any]) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Metric name -> [(labels, value)] from a status report (see lib.status.collect)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {name: [] for name in METRICS}

    def add(name: str, labels: dict[str, str], value: float | None) -> None:
        if value is not None:
            out[name].append((labels, float(value)))

    for name, entry in report["databases"].items():
        db = {"database": name}
        newest = entry["newest_verified"]
        add("last_success_timestamp_seconds", db, _ts(newest["created"]) if newest else None)
        add("last_size_bytes", db, newest["size"] if newest else None)
        add("last_objects", db, newest.get("objects") if newest else None)
        add("last_source_bytes", db, newest.get("bytes") if newest else None)
        add("age_seconds", db, entry["age_seconds"])
        add("max_age_seconds", db, report["max_age_hours"] * 3600)
        add("stale", db, 1 if entry["stale"] else 0)
        run = entry["last_run"]
        if run:
            add("last_run_success", db, 1 if run.get("status") == "success" else 0)
            add("last_run_timestamp_seconds", db, _ts(run.get("finished")))
            add("last_run_duration_seconds", db, run.get("seconds"))
            for status in ("success", "failure", "interrupted"):
                add("runs_total", {**db, "status": status}, (run.get("runs") or {}).get(status, 0))
        for tier, count in entry["counts"].items():
            add("kept_backups", {**db, "tier": tier}, count)
        for dest, state in entry["destinations"].items():
            add("destination_lag", {**db, "destination": dest}, 1 if state["lag"] else 0)
        drill = entry["last_drill"]
        if drill:
            add("last_drill_timestamp_seconds", db, _ts(drill.get("at")))
            add("last_drill_success", db, 1 if drill.get("ok") else 0)
            add("last_drill_restore_duration_seconds", db, drill.get("restore_seconds"))
        passed = entry["last_successful_drill"]
        add("last_drill_success_timestamp_seconds", db, _ts(passed.get("at")) if passed else None)
        block = entry.get("wal")
        if block:
            add("wal_seconds_since_last_segment", db, block["seconds_since_last_segment"])
            add("wal_receiver_up", db, 1 if block["receiver_running"] else 0)
            add("wal_slot_lag_bytes", db, block["slot_lag_bytes"])
            add("wal_base_backup_age_seconds", db, block["newest_base_age_seconds"])
            add("wal_last_segment_timestamp_seconds", db, _ts(block["last_archived"]))
            add("wal_receiver_heartbeat_timestamp_seconds", db, _ts(block.get("receiver_heartbeat")))
    return out


def _value(value: float) -> str:
    return str(int(value)) if value == int(value) and abs(value) < 1e15 else repr(value)


def render(report: dict[str, Any]) -> str:
    """The textfile: HELP and TYPE lines, then samples, for every metric that has samples."""
    lines: list[str] = []
    for name, items in samples(report).items():
        if not items:
            continue
        kind, text = METRICS[name]
        lines += [f"# HELP {PREFIX}{name} {text}", f"# TYPE {PREFIX}{name} {kind}"]
        for labels, value in items:
            label_text = ",".join(f'{k}="{escape(v)}"' for k, v in labels.items())
            lines.append(f"{PREFIX}{name}{{{label_text}}} {_value(value)}")
    return "\n".join(lines) + "\n"


def write_textfile_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a hidden temp file in the same directory; mode 0644."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.unlink(missing_ok=True)  # a link at our temp name is removed, never followed
    fd = store.open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.fchmod(fd, 0o644)  # readable by node_exporter despite our umask 077
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def textfile_path(spec: Spec) -> Path | None:
    configured = spec.monitoring.get("prometheus_textfile")
    return spec.resolve(configured) if configured else None


def write_metrics(spec: Spec) -> Path | None:
    """Rewrite the textfile when configured (always for every configured database). Never raises
    for I/O problems: they are logged as warnings. Returns the path written, or None."""
    path = textfile_path(spec)
    if path is None:
        return None
    try:
        write_textfile_atomic(path, render(collect(spec)))
    except OSError as exc:
        log.warning("could not write metrics to %s: %s", path, exc.strerror or exc)
        return None
    return path
