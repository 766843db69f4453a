"""invoke status: per database the newest backup of each tier, its age, size, verified state,
encryption and off-site copies; the last run and the last drill; and whether anything needs
attention. Read-only: it only reads records and history files.

A database is a problem when its newest verified backup is older than
``monitoring.max_age_hours`` (default 26) or missing, when a configured destination lacks a
verified copy of that backup ("lag"), or when its last restore drill failed.
The JSON shape (``FORMAT`` 1) is documented in docs/operations.md and only ever extended.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from lib import history, store, wal
from lib.config import DatabaseSpec, Spec
from lib.errors import ToolError

FORMAT = 1
DEFAULT_MAX_AGE_HOURS = 26.0


def max_age_hours(spec: Spec) -> float:
    return float(spec.monitoring.get("max_age_hours", DEFAULT_MAX_AGE_HOURS))


def destination_names(spec: Spec) -> list[str]:
    """Names of the configured off-site destinations, in config order."""
    return [str(d["name"]) for d in spec.destinations if isinstance(d, Mapping) and d.get("name")]


def verified_at(backup: store.Backup, destination: str) -> str | None:
    """When ``destination`` last verified its copy of ``backup`` (None: no verified copy)."""
    entry = (backup.record.get("destinations") or {}).get(destination)
    return entry.get("verified_at") if isinstance(entry, Mapping) and entry.get("verified_at") else None


def backup_entry(backup: store.Backup, now: datetime) -> dict[str, Any]:
    """One backup as shown by status."""
    record = backup.record
    return {
        "file": backup.path.name,
        "path": str(backup.path),
        "tier": backup.tier,
        "created": record["created"],
        "age_seconds": int((now - backup.created).total_seconds()),
        "size": record.get("size"),
        "verified": backup.verified,
        "encryption": (record.get("encryption") or {}).get("mode", "none"),
        "destinations": sorted(name for name in (record.get("destinations") or {}) if verified_at(backup, name)),
        **_source_counts(record),
    }


def _source_counts(record: Mapping[str, Any]) -> dict[str, int]:
    """A bucket backup's ``objects`` and ``bytes`` (of the bucket, not of the file); nothing for
    databases."""
    meta = record.get("engine_meta") or {}
    if record.get("engine") != "s3" or not isinstance(meta.get("objects"), int):
        return {}
    return {"objects": meta["objects"], "bytes": int(meta.get("bytes") or 0)}


def database_status(
    spec: Spec, db: DatabaseSpec, now: datetime, leftovers: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    """Status of one database (see docs/operations.md for every field). ``leftovers``: what killed runs
    left of it (lib/lifecycle.py), each a problem naming the command that removes it; None when
    not checked."""
    limit = max_age_hours(spec)
    backups = store.list_backups(spec.backup_dir, db.name)
    newest = store.latest_verified(backups)
    problems: list[str] = []
    age = int((now - newest.created).total_seconds()) if newest else None
    stale = newest is None or age > limit * 3600
    if newest is None:
        problems.append(f"{db.name}: no verified backup")
    elif stale:
        problems.append(
            f"{db.name}: newest verified backup is {store.human_age(now - newest.created)} old (limit {limit:g}h)"
        )
    invalid = [b for b in backups if b.problem is not None]
    if invalid:
        problems.append(
            f"{db.name}: {len(invalid)} backup(s) with an invalid record, e.g. {invalid[0].record_path} "
            f"({invalid[0].problem}); fix the record or move the backup away"
        )
    if newest is not None and store.chain_of(newest, backups) is None:
        parent = store.depends_on(newest.record) or ("?", "?")
        problems.append(
            f"{db.name}: newest verified backup {newest.tier}/{newest.path.name} cannot be restored: it builds "
            f"on {parent[0]}/{parent[1]}, which (or one before it) is missing; back up now "
            f"(invoke backup --db {db.name}: with the chain broken it makes a full one)"
        )
    destinations = {}
    for name in destination_names(spec):
        when = verified_at(newest, name) if newest else None
        lag = newest is not None and when is None
        destinations[name] = {"verified": when is not None, "verified_at": when, "lag": lag}
        if lag:
            problems.append(f"{db.name}: destination {name} has no verified copy of {newest.path.name}")
    drill = history.last_drill(spec.backup_dir, db.name)
    passed = history.last_drill(spec.backup_dir, db.name, ok=True)
    if drill is not None and not drill.get("ok"):
        problems.append(f"{db.name}: last restore drill failed: {drill.get('error', 'unknown error')}")
    for item in leftovers or []:
        problems.append(f"{db.name}: leftover {item['what']}; remove it with: {item['command']}")
    wal_block = None
    if wal.enabled(db):
        wal_block, wal_problems = wal.status(spec, db, now)
        problems += wal_problems
    return {
        "name": db.name,
        "engine": db.engine,
        "database": db.database,
        "ok": not problems,
        "stale": stale,
        "age_seconds": age,
        "newest_verified": backup_entry(newest, now) if newest else None,
        "tiers": {tier: next((backup_entry(b, now) for b in backups if b.tier == tier), None) for tier in store.TIERS},
        "counts": {tier: sum(1 for b in backups if b.tier == tier) for tier in store.TIERS},
        "destinations": destinations,
        "last_run": history.last_run(spec.backup_dir, db.name),
        "last_drill": drill,
        "last_successful_drill": passed,
        "leftovers": leftovers,
        "wal": wal_block,
        "problems": problems,
    }


def collect(
    spec: Spec, names: list[str] | None = None, now: datetime | None = None, leftovers: Any = None
) -> dict[str, Any]:
    """The whole status report (the JSON printed by ``invoke status --json``). ``leftovers``: a
    lib.lifecycle.Report of what killed runs left (None: not checked)."""
    now = now or store.utcnow()
    found: dict[str, list[dict[str, str]]] = {}
    for item in leftovers.left if leftovers is not None else []:
        found.setdefault(item.database, []).append(item.as_dict())
    databases = {
        db.name: database_status(spec, db, now, found.get(db.name, []) if leftovers is not None else None)
        for db in spec.select(names)
    }
    problems = [f"leftover {item['what']}; remove it with: {item['command']}" for item in found.get("", [])]
    problems += [p for entry in databases.values() for p in entry["problems"]]
    return {
        "format": FORMAT,
        "generated": store.iso(now),
        "ok": not problems,
        "max_age_hours": max_age_hours(spec),
        "backup_dir": str(spec.backup_dir),
        "destinations": destination_names(spec),
        "leftovers": found.get("", []) if leftovers is not None else None,
        "problems": problems,
        "databases": databases,
    }


def _backup_line(label: str, entry: dict[str, Any] | None) -> str:
    if entry is None:
        return f"  {label:<8} -"
    age = store.human_age(timedelta(seconds=entry["age_seconds"]))
    state = "verified" if entry["verified"] else "NOT verified"
    where = ", ".join(entry["destinations"]) or "none"
    if "objects" in entry:
        where += f"; {entry['objects']} objects, {store.human_size(entry['bytes'])}"
    return (
        f"  {label:<8} {entry['file']:<40} {store.human_size(entry['size'] or 0):>10} {age:>5} old  {state}, "
        f"encryption {entry['encryption']}, off-site: {where}"
    )


def _wal_line(block: dict[str, Any]) -> str:
    since = block["seconds_since_last_segment"]
    last = f"{block['last_segment']} {store.human_age(timedelta(seconds=since))} ago" if since is not None else "none"
    lag = store.human_size(block["slot_lag_bytes"]) if block["slot_lag_bytes"] is not None else "unknown"
    return (
        f"  wal: receiver {'running' if block['receiver_running'] else 'NOT running'}, last segment {last}, "
        f"slot {block['slot']} lag {lag}, {block['base_backups']} base backup(s)"
        + (f", GAP: segment {block['gap']} missing" if block.get("gap") else "")
        + (" (before the newest base backup)" if block.get("gap_before_newest_base") else "")
    )


def _units(engine: str) -> tuple[str, str]:
    from lib.engines import get_engine

    try:
        return get_engine(engine).units
    except ToolError:
        return ("tables", "rows")


def render_text(report: dict[str, Any]) -> str:
    """Human-readable status, one block per database."""
    lines = []
    for entry in report["databases"].values():
        state = "OK" if entry["ok"] else "PROBLEM"
        lines.append(f"{entry['name']} ({entry['engine']}, {entry['database']}): {state}")
        for tier in store.TIERS:
            lines.append(_backup_line(tier, entry["tiers"][tier]))
        for name, dest in entry["destinations"].items():
            lines.append(
                f"  off-site {name}: "
                + (
                    f"verified copy ({dest['verified_at']})"
                    if dest["verified"]
                    else "no verified copy of the newest backup"
                )
            )
        run = entry["last_run"]
        lines.append(
            "  last run: "
            + (f"{run['status']} at {run['finished']} ({run['seconds']}s)" if run else "none recorded")
            + (f": {run['error']}" if run and run.get("error") else "")
        )
        drill = entry["last_drill"]
        passed = entry["last_successful_drill"]
        text = f"{'passed' if drill['ok'] else 'FAILED'} at {drill['at']}" if drill else "never"
        if drill and not drill["ok"] and passed:
            text += f"; last proven restorable {passed['at']}"
        elif drill and drill["ok"]:
            units = _units(entry["engine"])
            text += f" (restore {drill.get('restore_seconds')}s, {drill.get('rows')} {units[1]})"
        lines.append(f"  last drill: {text}")
        if entry.get("wal"):
            lines.append(_wal_line(entry["wal"]))
        lines += [f"  ! {problem}" for problem in entry["problems"]]
    lines += [f"! {problem}" for problem in report["problems"] if problem.startswith("leftover ")]
    lines.append(
        "status: OK"
        if report["ok"]
        else f"status: {len(report['problems'])} problem(s) (limit {report['max_age_hours']:g}h)"
    )
    return "\n".join(lines)
