"""The on-disk layout and the backup records.

Layout: ``<backup_dir>/<database name>/<tier>/backup_YYYYMMDD_HHMMSS<suffix>`` with two sidecars:
``<file>.sha256`` (accepted by ``sha256sum -c``) and ``<file>.json``, the record: everything later
steps need (engine, tier, creation time in UTC, size, checksum, verification, row counts,
destinations) so nothing is parsed back out of file names. A file without a record is not
this tool's backup and is never deleted.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

RECORD_FORMAT = 1
NAME_RE = re.compile(r"^backup_(\d{8})_(\d{6})(\.[A-Za-z0-9.]+)$")
TEMP_PREFIX = ".tmp-"
TIERS = ("daily", "weekly", "monthly")


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    """UTC timestamp as text, e.g. 2026-11-26T02:00:03Z."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def tier_for(moment: datetime, weekly_on: int, monthly_on: int) -> str:
    """monthly on day ``monthly_on`` of the month, weekly on weekday ``weekly_on`` (0=Monday), else daily."""
    if moment.day == monthly_on:
        return "monthly"
    if moment.weekday() == weekly_on:
        return "weekly"
    return "daily"


def ensure_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700; tighten an existing one we own."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        if path.stat().st_mode & 0o077:
            path.chmod(0o700)
    except PermissionError:
        pass
    return path


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file, fsync and rename; mode 0600."""
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_line(sha256: str, filename: str) -> str:
    return f"{sha256}  {filename}\n"


@dataclass
class Backup:
    """A stored backup: its file and its record."""

    path: Path
    record: dict[str, Any]
    #: made by this process just now: its sha256 was taken of the bytes as they were written
    fresh: bool = False

    @property
    def created(self) -> datetime:
        return parse_iso(self.record["created"])

    @property
    def tier(self) -> str:
        return self.record["tier"]

    @property
    def name(self) -> str:
        return self.record["name"]

    @property
    def verified(self) -> bool:
        return bool(self.record.get("verified", {}).get("ok"))

    def note_reverification(self, checks: list[str] | None = None, error: str | None = None) -> None:
        """Add a re-verification (invoke verify) to the record without losing what was checked
        when the backup was made: ``verified.checks``/``verified.at`` stay, the outcome goes to
        ``verified.reverified_at`` and ``verified.reverify_checks``. An ``error`` marks the
        backup not verified (``ok`` False, so restore 'latest' and retention's keeper skip it);
        a later success clears it. Call save() afterwards."""
        verified = dict(self.record.get("verified") or {})
        verified["reverified_at"] = iso(utcnow())
        if error is None:
            verified.update(ok=True, reverify_checks=list(checks or []))
            verified.pop("error", None)
        else:
            verified.update(ok=False, error=error[:500])
            verified.pop("reverify_checks", None)
        self.record["verified"] = verified

    def verification_text(self) -> str:
        """'verified [checks]' plus '; re-verified TIME [checks]' after invoke verify, or
        'NOT verified' (with when a re-verification failed), for listings."""
        verified = self.record.get("verified") or {}
        again = verified.get("reverified_at")
        if not verified.get("ok"):
            return f"NOT verified (re-verification failed {again})" if again else "NOT verified"
        text = f"verified [{','.join(verified.get('checks', []))}]"
        if again:
            text += f"; re-verified {again} [{','.join(verified.get('reverify_checks', []))}]"
        return text

    @property
    def record_path(self) -> Path:
        return record_path(self.path)

    @property
    def sha256_path(self) -> Path:
        return sha256_path(self.path)

    def save(self) -> None:
        """Persist the (changed) record atomically."""
        write_atomic(self.record_path, (json.dumps(self.record, indent=2, sort_keys=True) + "\n").encode())


def record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def sha256_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def backup_filename(moment: datetime, suffix: str) -> str:
    """File name in the old scripts' format (local time): backup_YYYYMMDD_HHMMSS<suffix>."""
    return f"backup_{moment.astimezone().strftime('%Y%m%d_%H%M%S')}{suffix}"


def tier_dir(backup_dir: Path, name: str, tier: str) -> Path:
    return backup_dir / name / tier


def safety_dir(backup_dir: Path, name: str) -> Path:
    """Where safety copies taken before an in-place restore of database ``name`` are kept.
    Not a tier: never listed as a backup, never pruned."""
    return backup_dir / name / "pre-restore"


def load(path: Path) -> Backup | None:
    """The Backup for ``path`` when it has a readable record of ours, else None."""
    try:
        record = json.loads(record_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("file") != path.name or "created" not in record:
        return None
    return Backup(path, record)


def is_backup_name(filename: str) -> bool:
    return bool(NAME_RE.match(filename)) and not filename.endswith((".json", ".sha256"))


def list_backups(backup_dir: Path, name: str, tiers: Iterable[str] = TIERS) -> list[Backup]:
    """This tool's backups of database ``name``, newest first. Files without a record are skipped."""
    found: list[Backup] = []
    for tier in tiers:
        directory = tier_dir(backup_dir, name, tier)
        if not directory.is_dir():
            continue
        for entry in directory.iterdir():
            if is_backup_name(entry.name) and entry.is_file():
                backup = load(entry)
                if backup is not None:
                    found.append(backup)
    found.sort(key=lambda b: (b.created, b.path.name), reverse=True)
    return found


def legacy_files(backup_dir: Path, name: str) -> list[Path]:
    """Files named like backups but without a record (e.g. made by the old shell scripts)."""
    result = []
    for tier in TIERS:
        directory = tier_dir(backup_dir, name, tier)
        if directory.is_dir():
            for entry in sorted(directory.iterdir(), reverse=True):
                if is_backup_name(entry.name) and entry.is_file() and load(entry) is None:
                    result.append(entry)
    return result


def latest_verified(backups: Iterable[Backup]) -> Backup | None:
    for backup in sorted(backups, key=lambda b: b.created, reverse=True):
        if backup.verified:
            return backup
    return None


def plan_retention(backups: Iterable[Backup], keep_days: dict[str, int], now: datetime) -> list[Backup]:
    """Backups to delete: older than their tier's keep_days by recorded creation time, never the
    newest verified backup of a tier. Pure function; used for local and remote copies alike.
    """
    by_tier: dict[str, list[Backup]] = {}
    for backup in backups:
        by_tier.setdefault(backup.tier, []).append(backup)
    doomed = []
    for tier, items in by_tier.items():
        if tier not in keep_days:
            continue
        keeper = latest_verified(items)
        cutoff = now - timedelta(days=keep_days[tier])
        for backup in items:
            if backup is not keeper and backup.created < cutoff:
                doomed.append(backup)
    return sorted(doomed, key=lambda b: b.created)


def delete(backup: Backup) -> None:
    """Remove a backup and its sidecars (the record last, so a crash leaves it findable)."""
    for path in (backup.path, backup.sha256_path, backup.record_path):
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def clean_temp(directory: Path) -> list[Path]:
    """Remove leftovers of interrupted runs (``.tmp-*``) in ``directory``. Returns what was removed."""
    removed = []
    if directory.is_dir():
        for entry in directory.iterdir():
            if entry.name.startswith(TEMP_PREFIX) and entry.is_file():
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def human_age(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"
