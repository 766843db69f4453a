"""Adopting the old shell scripts' backups: verify each record-less backup_YYYYMMDD_HHMMSS file in
<backup_dir>/<name>/<tier>/ and write the .sha256 and .json sidecars, so it is listed, restorable
as 'latest' and pruned by retention like the tool's own. A file that fails verification is left
alone (and reported), never deleted."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

from lib import compress, store
from lib.backup import TOOL, check_stream, engine_of_file
from lib.config import DatabaseSpec, Spec
from lib.engines import get_engine
from lib.errors import VerificationFailed
from lib.stream import sha256_file


def created_from_name(path: Path) -> datetime:
    """The old scripts named files with local time: backup_YYYYMMDD_HHMMSS."""
    match = store.NAME_RE.match(path.name)
    return datetime.strptime(match.group(1) + match.group(2), "%Y%m%d%H%M%S").astimezone()


def adopt(spec: Spec, db: DatabaseSpec, log: logging.Logger, dry_run: bool = False) -> tuple[int, int]:
    """Verify and record every legacy file of ``db``. Returns (adopted, refused)."""
    adopted = refused = 0
    for path in store.legacy_files(spec.backup_dir, db.name):
        if engine_of_file(path, None) != db.engine or path.name.endswith(".gpg"):
            log.warning("%s: %s is not a plain %s backup; left alone", db.name, path.name, db.engine)
            refused += 1
            continue
        kind = compress.kind_from_name(path.name)
        try:
            checks, meta = check_stream(spec, db, path, {"compression": kind}, None)
        except VerificationFailed as exc:
            log.error("%s: not adopted: %s", db.name, exc)
            refused += 1
            continue
        if dry_run:
            log.info("%s: would adopt %s/%s (%s)", db.name, path.parent.name, path.name, ", ".join(checks))
            adopted += 1
            continue
        digest = sha256_file(path)
        record = {
            "format": store.RECORD_FORMAT,
            "tool": TOOL,
            "adopted": True,
            "name": db.name,
            "engine": db.engine,
            "database": db.database,
            **get_engine(db.engine).record_fields(db),
            "tier": path.parent.name,
            "created": store.iso(created_from_name(path)),
            "file": path.name,
            "size": path.stat().st_size,
            "sha256": digest,
            "compression": kind,
            "encryption": {"mode": "none"},
            "verified": {"ok": True, "at": store.iso(store.utcnow()), "checks": checks},
            "engine_meta": meta,
            "destinations": {},
        }
        backup = store.Backup(path, record)
        store.write_atomic(backup.sha256_path, store.sha256_line(digest, path.name).encode())
        backup.save()
        path.chmod(0o600)
        log.info("%s: adopted %s/%s (%s)", db.name, path.parent.name, path.name, ", ".join(checks))
        adopted += 1
    return adopted, refused
