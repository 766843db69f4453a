"""The on-disk layout and the backup records.

Layout: ``<backup_dir>/<database name>/<tier>/backup_YYYYMMDD_HHMMSS<suffix>`` with two sidecars:
``<file>.sha256`` (accepted by ``sha256sum -c``) and ``<file>.json``, the record: everything later
steps need (engine, tier, creation time in UTC, size, checksum, verification, row counts,
destinations) so nothing is parsed back out of file names. A file without a record is not
this tool's backup and is never deleted.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from lib.errors import RunFailed

RECORD_FORMAT = 1
NAME_RE = re.compile(r"^backup_(\d{8})_(\d{6})(\.[A-Za-z0-9.]+)$")
TEMP_PREFIX = ".tmp-"
TIERS = ("daily", "weekly", "monthly")
#: the 'tier' in the record of a safety copy taken before an in-place restore (see safety_dir)
SAFETY_TIER = "pre-restore"
#: a record is a few KiB; anything much larger is not one of ours (and is not read into memory)
MAX_RECORD_BYTES = 4 << 20
MAX_SIZE = 2**63 - 1
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
log = logging.getLogger("backup")
#: record files already warned about in this process (one warning per file and run)
_warned: set[str] = set()


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


class SymlinkRefused(OSError):
    """A file this tool writes or reads as its own state is a symbolic link (never followed)."""


def symlink_message(path: Path) -> str:
    """The one-line refusal for a symbolic link where one of our files belongs."""
    return (
        f"{path} is a symbolic link; this tool never follows links for its own files "
        f"(lock, log, records, state); remove it (rm '{path}') and run again"
    )


def open_nofollow(path: Path, flags: int, mode: int = 0o600) -> int:
    """os.open with O_NOFOLLOW (and close-on-exec). Raises SymlinkRefused when ``path`` is a
    symbolic link, else the OSError of os.open."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.EEXIST and os.path.islink(path)):
            raise SymlinkRefused(errno.ELOOP, symlink_message(path), str(path)) from None
        raise


def read_nofollow(path: Path, limit: int = MAX_RECORD_BYTES) -> bytes:
    """The first ``limit`` bytes of the regular file ``path``, never through a symbolic link.
    Raises OSError (SymlinkRefused for a link, FileNotFoundError when missing, EINVAL for a
    directory, FIFO or device)."""
    fd = open_nofollow(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO planted there cannot block us
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return handle.read(limit)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file, fsync and rename; mode 0600. The temp file is
    created new (a link or leftover at its name is removed first, never followed) and removed
    again when writing fails (e.g. ENOSPC). Raises OSError."""
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)  # removes a link itself, never its target
    fd = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    #: why its record failed validation (None: valid). ``record`` then holds only what the
    #: layout says (file, name, tier, a creation time from the file name): the backup counts as
    #: unverified, is never 'latest', never pruned, and its record is never rewritten.
    problem: str | None = None

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
        return self.problem is None and bool((self.record.get("verified") or {}).get("ok"))

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
        if self.problem is not None:
            return f"INVALID record ({self.problem}); never pruned, never 'latest'"
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
        """Persist the (changed) record atomically. Raises InvalidRecord for a backup whose
        record failed validation (the operator's file is never overwritten)."""
        if self.problem is not None:
            raise InvalidRecord(f"{self.record_path}: not rewritten, the record is invalid: {self.problem}")
        write_atomic(self.record_path, (json.dumps(self.record, indent=2, sort_keys=True) + "\n").encode())


def record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def sha256_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def manifest_path(path: Path) -> Path:
    """The plain copy of a bucket backup's manifest kept beside it (local only; lib/engines/s3.py)."""
    return path.with_name(path.name + ".manifest.json")


def sha256_of(path: Path) -> str:
    """sha256 of a (small) file's content."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def depends_on(record: dict[str, Any]) -> tuple[str, str] | None:
    """(tier, file) of the backup an incremental backup's record says it builds on, else None."""
    chain = record.get("chain")
    if not isinstance(chain, dict) or chain.get("kind") != "incremental":
        return None
    parent = chain.get("parent")
    if (
        not isinstance(parent, dict)
        or not isinstance(parent.get("tier"), str)
        or not isinstance(parent.get("file"), str)
    ):
        return None
    return parent["tier"], parent["file"]


def chain_of(backup: Any, backups: Iterable[Any]) -> list[Any] | None:
    """The backups ``backup`` needs to be restored, the full one first and ``backup`` last
    (just ``[backup]`` for a backup that is no incremental); None when one is missing among
    ``backups`` (local Backups or a destination's RemoteBackups)."""
    index = {(b.record.get("tier"), b.record.get("file")): b for b in backups}
    chain = [backup]
    while (parent := depends_on(chain[-1].record)) is not None:
        found = index.get(parent)
        if found is None or found in chain:
            return None
        chain.append(found)
    return list(reversed(chain))


def chain_text(record: dict[str, Any]) -> str:
    """For listings: '' for a backup outside chains, '; full' or '; incremental on <tier>/<file>'."""
    chain = record.get("chain")
    if not isinstance(chain, dict):
        return ""
    parent = depends_on(record)
    return f"; incremental on {parent[0]}/{parent[1]}" if parent else f"; {chain.get('kind', 'full')}"


def backup_filename(moment: datetime, suffix: str) -> str:
    """File name in the old scripts' format (local time): backup_YYYYMMDD_HHMMSS<suffix>."""
    return f"backup_{moment.astimezone().strftime('%Y%m%d_%H%M%S')}{suffix}"


def tier_dir(backup_dir: Path, name: str, tier: str) -> Path:
    return backup_dir / name / tier


def safety_dir(backup_dir: Path, name: str) -> Path:
    """Where safety copies taken before an in-place restore of database ``name`` are kept.
    Not a tier: never listed as a backup, never pruned."""
    return backup_dir / name / SAFETY_TIER


def _show(value: Any) -> str:
    """A value from a record, short enough for a one-line message."""
    text = repr(value) if isinstance(value, str) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value: Any, low: int = 0, high: int = MAX_SIZE) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _typed(record: dict[str, Any], key: str, check, want: str) -> str | None:
    if key in record and record[key] is not None and not check(record[key]):
        return f"'{key}' is {_show(record[key])}, expected {want}"
    return None


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _counts(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and _is_int(v) for k, v in value.items())


def _valid_verified(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    return (
        isinstance(value.get("ok", False), bool)
        and all(_str_list(value[k]) for k in ("checks", "reverify_checks") if k in value)
        and all(isinstance(value[k], str) for k in ("at", "reverified_at", "error") if value.get(k) is not None)
    )


def _valid_meta(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    return (
        all(_counts(value[k]) for k in ("tables", "collections") if k in value)
        and ("databases" not in value or _str_list(value["databases"]))
        and (value.get("database") is None or isinstance(value["database"], str))
    )


def _valid_destinations(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str)
        and isinstance(v, dict)
        and all(isinstance(v.get(f), str) for f in ("verified_at", "path", "method") if v.get(f) is not None)
        and (v.get("size") is None or _is_int(v["size"]))
        for k, v in value.items()
    )


def validate_record(record: Any, filename: str) -> str | None:
    """Why ``record`` (parsed JSON) is not a usable record of backup file ``filename``, or None when
    it is: the fields every step reads must be there with the right types (name, tier, created,
    file) and the optional ones, when present, must have theirs. Pure function."""
    if not isinstance(record, dict):
        return f"not a JSON object but a {type(record).__name__}"
    if record.get("file") != filename:
        return f"'file' is {_show(record.get('file'))}, not '{filename}'"
    if not isinstance(record.get("name"), str) or not record["name"]:
        return f"'name' is {_show(record.get('name'))}, expected the database name"
    if record.get("tier") not in (*TIERS, SAFETY_TIER):
        return f"'tier' is {_show(record.get('tier'))}, expected one of {', '.join(TIERS)}"
    try:
        parse_iso(record.get("created"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return f"'created' is {_show(record.get('created'))}, expected a UTC time like 2026-11-26T02:00:03Z"
    checks = [
        _typed(record, "size", _is_int, "a number of bytes"),
        _typed(record, "sha256", lambda v: isinstance(v, str) and bool(SHA256_RE.match(v)), "64 hex digits"),
        _typed(record, "format", lambda v: _is_int(v, 0, 1000), "a small integer"),
        *(
            _typed(record, key, lambda v: isinstance(v, str), "a string")
            for key in ("engine", "database", "tool", "compression")
        ),
        _typed(record, "verified", _valid_verified, "an object {ok, at, checks}"),
        _typed(record, "encryption", lambda v: isinstance(v, dict), "an object"),
        _typed(record, "engine_meta", _valid_meta, "an object of counts"),
        _typed(record, "destinations", _valid_destinations, "an object per destination"),
        _typed(record, "seconds", lambda v: isinstance(v, dict), "an object"),
    ]
    return next((problem for problem in checks if problem), None)


class InvalidRecord(RunFailed):
    """Raised by Backup.save for a backup whose record failed validation."""


def _fallback_created(path: Path) -> datetime:
    """Creation time of a backup whose record cannot say: from its file name (local time), else
    the file's mtime, else the epoch (so it sorts last)."""
    match = NAME_RE.match(path.name)
    try:
        if match:
            return datetime.strptime(match[1] + match[2], "%Y%m%d%H%M%S").astimezone().astimezone(UTC)
        return datetime.fromtimestamp(path.stat().st_mtime, UTC)
    except (OSError, ValueError, OverflowError):
        return datetime.fromtimestamp(0, UTC)


def _invalid(path: Path, problem: str, name: str | None, tier: str | None) -> Backup:
    """A Backup for ``path`` whose record failed validation: one warning per file and run."""
    shown = str(record_path(path))
    if shown not in _warned:
        _warned.add(shown)
        log.warning(
            "%s: invalid record (%s); the backup counts as unverified and is kept (never pruned, never "
            "'latest'); fix the record or move the backup away",
            shown,
            problem,
        )
    record = {
        "file": path.name,
        "name": name or path.parent.parent.name,
        "tier": tier or path.parent.name,
        "created": iso(_fallback_created(path)),
        "verified": {"ok": False, "error": f"invalid record: {problem}"},
    }
    return Backup(path, record, problem=problem)


def load(path: Path, name: str | None = None, tier: str | None = None) -> Backup | None:
    """The Backup for ``path``: None when it has no record (not this tool's backup); with
    ``problem`` set when the record cannot be read or fails validation (validate_record), or when
    it names another database or tier than ``name``/``tier`` (where list_backups found it).
    Never raises for the content of a record."""
    try:
        data = read_nofollow(record_path(path), MAX_RECORD_BYTES + 1)
    except FileNotFoundError:
        return None
    except SymlinkRefused:
        return _invalid(path, "the record is a symbolic link", name, tier)
    except OSError as exc:
        return _invalid(path, f"cannot read it: {exc.strerror or exc}", name, tier)
    if len(data) > MAX_RECORD_BYTES:
        return _invalid(path, f"larger than {MAX_RECORD_BYTES} bytes", name, tier)
    try:
        record = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        return _invalid(path, f"not valid JSON ({str(exc)[:80]})", name, tier)
    problem = validate_record(record, path.name)
    if problem is None and name is not None and record["name"] != name:
        problem = f"'name' is {_show(record['name'])} but the file lies under {name}/"
    if problem is None and tier is not None and record["tier"] != tier:
        problem = f"'tier' is {_show(record['tier'])} but the file lies under {tier}/"
    if problem is not None:
        return _invalid(path, problem, name, tier)
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
                backup = load(entry, name, tier)
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
    """The newest verified backup (never one whose record failed validation), or None."""
    for backup in sorted(backups, key=lambda b: b.created, reverse=True):
        if backup.verified:
            return backup
    return None


def plan_retention(backups: Iterable[Backup], keep_days: dict[str, int], now: datetime) -> list[Backup]:
    """Backups to delete: older than their tier's keep_days by recorded creation time, never the
    newest verified backup of a tier, never a backup whose record failed validation (its age is
    not known). Pure function; used for local and remote copies alike.
    """
    by_tier: dict[str, list[Backup]] = {}
    for backup in backups:
        if getattr(backup, "problem", None) is not None:
            continue
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
    # chains: a backup that a kept incremental builds on (directly or further down) is kept
    everything = [b for items in by_tier.values() for b in items]
    index = {(b.record.get("tier"), b.record.get("file")): b for b in everything}
    doomed_ids = {id(b) for b in doomed}
    for backup in everything:
        if id(backup) in doomed_ids:
            continue
        parent = depends_on(backup.record)
        while parent is not None and parent in index:
            needed = index[parent]
            doomed_ids.discard(id(needed))
            parent = depends_on(needed.record)
    return sorted((b for b in doomed if id(b) in doomed_ids), key=lambda b: b.created)


def delete(backup: Backup) -> None:
    """Remove a backup and its sidecars (the record last, so a crash leaves it findable)."""
    for path in (backup.path, manifest_path(backup.path), backup.sha256_path, backup.record_path):
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
