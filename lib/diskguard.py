"""Disk guard: before a dump, make sure backup_dir has room for a backup about as big as the last
one (times ``monitoring.disk_margin``, default 1.5), instead of filling the disk halfway through."""

from __future__ import annotations

import os
from pathlib import Path

from lib import store
from lib.config import DatabaseSpec, Spec
from lib.errors import RunFailed

DEFAULT_MARGIN = 1.5


def margin(spec: Spec) -> float:
    """monitoring.disk_margin (0 disables the guard)."""
    return float(spec.monitoring.get("disk_margin", DEFAULT_MARGIN))


def free_bytes(path: Path) -> int:
    """Bytes available to us (not root's reserve) on the filesystem holding ``path``."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def last_size(spec: Spec, db: DatabaseSpec) -> int | None:
    """Recorded size of the newest backup of ``db`` (any tier), or None when there is none."""
    backups = store.list_backups(spec.backup_dir, db.name)
    return int(backups[0].record.get("size") or 0) if backups else None


def check_free_space(spec: Spec, db: DatabaseSpec) -> None:
    """Raise RunFailed when backup_dir has less free space than last size x margin."""
    factor = margin(spec)
    size = last_size(spec, db)
    if not factor or not size:
        return
    store.ensure_dir(spec.backup_dir)
    need = int(size * factor)
    free = free_bytes(spec.backup_dir)
    if free < need:
        raise RunFailed(
            f"not enough free space in {spec.backup_dir}: {store.human_size(free)} free, "
            f"need {store.human_size(need)} (last backup {store.human_size(size)} x disk_margin {factor:g}); "
            "free some space, or lower monitoring.disk_margin"
        )
