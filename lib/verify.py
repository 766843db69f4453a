"""Re-verification of stored backups (invoke verify): results are added to the records (next to
the checks made when the backup was made, which stay), so a backup that no longer verifies is
never picked as 'latest' for a restore."""

from __future__ import annotations

import logging
from pathlib import Path

from lib import store
from lib.backup import engine_of_file, verify_file
from lib.config import DatabaseSpec, Spec
from lib.errors import InputError, VerificationFailed


def database_for_file(spec: Spec, path: Path, record: dict | None) -> DatabaseSpec:
    """The configured database a file belongs to (its record's name, else its engine if unique)."""
    if record and record.get("name") in spec.databases:
        return spec.databases[record["name"]]
    engine = engine_of_file(path, record)
    matches = [db for db in spec.databases.values() if db.engine == engine]
    if len(matches) == 1:
        return matches[0]
    raise InputError(
        f"cannot tell which configured database {path.name} belongs to; keep it under <backup_dir>/<name>/<tier>/ with its .json record"
    )


def verify_one(spec: Spec, db: DatabaseSpec, path: Path, backup: store.Backup | None, log: logging.Logger) -> bool:
    """Verify one file, record the outcome when it has a record. Returns True when it passed.
    A backup whose record is invalid fails (it counts as unverified) and its record is left as is."""
    if backup is not None and backup.problem is not None:
        log.error(
            "%s: %s: invalid record (%s); fix the record or move the backup away", db.name, path.name, backup.problem
        )
        return False
    try:
        checks = verify_file(spec, db, path, backup.record if backup else None)
    except VerificationFailed as exc:
        log.error("%s: %s", db.name, exc)
        if backup:
            backup.note_reverification(error=str(exc))
            backup.save()
        return False
    if backup:
        backup.note_reverification(checks)
        backup.save()
    log.info("%s: %s OK (%s)", db.name, path.name, ", ".join(checks))
    return True


def verify_stored(spec: Spec, file: str | None, names: list[str] | None, log: logging.Logger) -> int:
    """Verify one file or every stored backup of the selected databases. Returns the number that failed."""
    if file:
        path = Path(file).expanduser()
        if not path.is_file():
            raise InputError(f"--file {file}: no such file; pass an existing backup file")
        from lib import wal

        owner = wal.archive_of(spec, path.resolve())
        if owner is not None:  # a base backup or WAL segment of the point-in-time archive
            return wal.verify_file(spec, owner, path.resolve(), log)
        backup = store.load(path.resolve())
        db = database_for_file(spec, path, backup.record if backup else None)
        failed = 0 if verify_one(spec, db, path.resolve(), backup, log) else 1
        if backup is not None and store.depends_on(backup.record):  # an incremental: its whole chain
            stored = store.list_backups(spec.backup_dir, db.name)
            mine = next((b for b in stored if b.path == path.resolve()), backup)
            chain = store.chain_of(mine, [*stored, mine])
            if chain is None:
                return failed + _broken_chain(db, backup, log)
            for other in chain[:-1]:
                failed += 0 if verify_one(spec, db, other.path, other, log) else 1
        return failed
    from lib import wal

    failed = 0
    for db in spec.select(names):
        backups = store.list_backups(spec.backup_dir, db.name)
        if wal.enabled(db):  # the point-in-time archive: base backups, WAL segments, no gap
            failed += wal.verify_archive(spec, db, log)
        if not backups:
            log.warning("%s: no backups to verify", db.name)
        for backup in backups:
            failed += 0 if verify_one(spec, db, backup.path, backup, log) else 1
            if store.depends_on(backup.record) and store.chain_of(backup, backups) is None:
                failed += _broken_chain(db, backup, log)
    return failed


def _broken_chain(db: DatabaseSpec, backup: store.Backup, log: logging.Logger) -> int:
    """Log that an incremental's chain misses a backup; 1 (a failure)."""
    tier, name = store.depends_on(backup.record) or ("?", "?")
    log.error(
        "%s: %s builds on a chain that misses a backup (%s/%s or one before it); it cannot be restored: "
        "restore an older backup, and make a full one (invoke backup --tier monthly)",
        db.name,
        backup.path.name,
        tier,
        name,
    )
    return 1
