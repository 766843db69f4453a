"""The off-site road: bring each destination up to date with the local verified backups (push what
it is missing, newest first), record arrivals in the local records, apply the destination's
retention, clean leftovers of interrupted uploads; list a destination; fetch a copy for restore.

A failing destination never stops another one and never touches the local backups.
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from lib import destinations, store
from lib.config import DatabaseSpec, Spec
from lib.destinations.base import (
    DeleteDeclined,
    Destination,
    Progress,
    RemoteBackup,
    StillLocked,
    check_fetched,
    parse_record,
    remote_record,
    retrying,
)
from lib.errors import InputError, ToolError

log = logging.getLogger("backup")


@dataclass
class SyncResult:
    """What one destination got for one database."""

    destination: str
    database: str
    pushed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    #: past retention but not deleted: still locked on the server, or not written by this tool
    kept: list[str] = field(default_factory=list)


def _reconcile(dest: Destination, local: list[store.Backup], held: dict[tuple[str, str], RemoteBackup]) -> None:
    """Make the local records say where copies are: add arrivals we find, drop copies that are gone."""
    for backup in local:
        entries = backup.record.setdefault("destinations", {})
        remote = held.get((backup.tier, backup.path.name))
        if remote is not None and remote.verified and dest.name not in entries:
            entries[dest.name] = next(iter(remote.record["destinations"].values()))
            backup.save()
        elif (remote is None or remote.damage) and dest.name in entries:
            del entries[dest.name]  # gone, or changed on the server: not a copy any more
            backup.save()


def sync_database(
    dest: Destination,
    spec: Spec,
    db: DatabaseSpec,
    now: datetime | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> SyncResult:
    """Push what ``dest`` is missing of ``db`` (skipping what its retention would delete at once),
    then apply its retention and clean leftovers. Raises ToolError when the destination fails."""
    now = now or store.utcnow()
    result = SyncResult(dest.name, db.name)
    listing = retrying(dest, functools.partial(dest.list, db.name), "listing")
    held = {remote.key: remote for remote in listing.backups}
    for remote in listing.backups:
        if remote.damage:
            log.warning(
                "%s: %s/%s/%s is DAMAGED on the destination (%s); it is not replaced (copies are never "
                "overwritten): remove it there and the next run copies it again",
                dest.name,
                db.name,
                remote.tier,
                remote.file,
                remote.damage,
            )
    local = [b for b in store.list_backups(spec.backup_dir, db.name) if b.verified]
    keep = dest.retention(db.retention)
    if not dry_run:
        _reconcile(dest, local, held)
    missing = [b for b in local if (b.tier, b.path.name) not in held]
    expired = {id(b) for b in store.plan_retention([*listing.backups, *missing], keep, now)}
    for backup in missing:
        label = f"{backup.tier}/{backup.path.name}"
        if id(backup) in expired:
            result.skipped.append(label)
            continue
        if dry_run:
            log.info("%s: would copy %s/%s", dest.name, db.name, label)
            result.pushed.append(label)
            continue
        info = retrying(dest, functools.partial(dest.push, backup, progress), f"upload of {backup.path.name}")
        backup.record.setdefault("destinations", {})[dest.name] = info
        backup.save()
        record = parse_record(remote_record(backup, dest.name, info), backup.path.name) or {}
        held[(backup.tier, backup.path.name)] = RemoteBackup(dest.name, info["path"], info["size"], record)
        result.pushed.append(label)
        rate = info["size"] / 1e6 / info["seconds"] if info.get("seconds") else 0
        log.info(
            "%s: copied %s/%s (%s, %.1f MB/s, verified by %s)",
            dest.name,
            db.name,
            label,
            store.human_size(info["size"]),
            rate,
            info["method"],
        )
    local_by_key = {(b.tier, b.path.name): b for b in local}
    for remote in store.plan_retention(list(held.values()), keep, now):
        label = f"{remote.tier}/{remote.file}"
        if dry_run:
            result.deleted.append(label)
            log.info("%s: would delete %s/%s", dest.name, db.name, label)
            continue
        try:
            retrying(dest, functools.partial(dest.delete, remote), f"deleting {remote.file}")
        except StillLocked as exc:
            result.kept.append(label)
            log.info("%s: kept %s/%s: %s", dest.name, db.name, label, exc)
            continue
        except DeleteDeclined as exc:
            result.kept.append(label)
            log.warning("%s: kept %s/%s: %s", dest.name, db.name, label, exc)
            continue
        result.deleted.append(label)
        log.info("%s: deleted %s/%s (keep_days %s)", dest.name, db.name, label, keep.get(remote.tier))
        owner = local_by_key.get(remote.key)
        if owner is not None and owner.record.get("destinations", {}).pop(dest.name, None) is not None:
            owner.save()
    if listing.leftovers and not dry_run:
        retrying(dest, functools.partial(dest.remove_leftovers, listing.leftovers), "cleaning leftovers")
        log.info("%s: removed %d leftover(s) of interrupted uploads", dest.name, len(listing.leftovers))
    return result


def sync(
    spec: Spec,
    dbs: list[DatabaseSpec],
    dest_names: list[str] | None = None,
    now: datetime | None = None,
    dry_run: bool = False,
) -> list[str]:
    """Bring every chosen destination up to date for ``dbs``. Each destination on its own: one
    failing does not stop the others. Returns the failures as 'destination: message' lines."""
    failures = []
    for dest in destinations.configured(spec, dest_names):
        with dest:
            for db in dbs:
                try:
                    sync_database(dest, spec, db, now=now, dry_run=dry_run)
                except ToolError as exc:
                    log.error("%s: off-site copy of %s FAILED: %s", dest.name, db.name, exc)
                    failures.append(f"{dest.name}: {exc}")
                    break  # the next run or invoke offsite catches up
    return failures


def push_all(spec: Spec, backup: store.Backup) -> list[str]:
    """After a verified backup: copy it (and whatever else of its database is missing) to every
    destination. Never raises for a destination's failure; returns the failures."""
    if not spec.destinations:
        return []
    return sync(spec, [spec.databases[backup.name]])


def listing_lines(spec: Spec, dest_name: str, dbs: list[DatabaseSpec]) -> list[str]:
    """What ``invoke list --dest NAME`` prints: the destination's backups per database, newest first."""
    now = store.utcnow()
    with destinations.get(spec, dest_name) as dest:
        lines = [f"{dest.name} ({dest.label()})"]
        for db in dbs:
            listing = retrying(dest, functools.partial(dest.list, db.name), "listing")
            lines.append(f"{db.name}: {len(listing.backups)} backup(s)")
            for tier in store.TIERS:
                for remote in (r for r in listing.backups if r.tier == tier):
                    info = next(iter(remote.record.get("destinations", {}).values()), {})
                    state = f"verified copy ({info.get('method', '?')})" if remote.verified else "NOT verified"
                    if remote.damage:
                        state = f"DAMAGED: {remote.damage}"
                    state += store.chain_text(remote.record)
                    if store.depends_on(remote.record) and store.chain_of(remote, listing.backups) is None:
                        state += " (CHAIN BROKEN: a backup it builds on is missing here)"
                    lines.append(
                        f"  {tier:<8} {remote.file:<40} {store.human_size(remote.size):>10} "
                        f"{store.human_age(now - remote.created):>5} old  {state}"
                    )
            from lib import wal

            if wal.enabled(db):
                lines += wal.remote_listing_lines(dest, db)
            if listing.leftovers:
                lines.append(
                    f"  {len(listing.leftovers)} leftover(s) of interrupted uploads (removed by the next push)"
                )
    return lines


def choose(backups: list[RemoteBackup], file_arg: str, dest: str) -> RemoteBackup:
    """--file for a remote restore: 'latest' (newest verified copy) or a backup file name. Raises InputError."""
    if file_arg == "latest":
        verified = [r for r in backups if r.verified]
        if not verified:
            raise InputError(
                f"destination '{dest}' holds no verified backup of that database; see invoke list --dest {dest}"
            )
        return max(verified, key=lambda r: (r.created, r.file))
    wanted = Path(file_arg).name
    for remote in backups:
        if remote.file == wanted:
            return remote
    raise InputError(
        f"destination '{dest}' holds no backup named {wanted}; invoke list --dest {dest} shows what it holds"
    )


@contextmanager
def fetched(spec: Spec, db: DatabaseSpec, dest_name: str, file_arg: str) -> Iterator[tuple[Path, RemoteBackup]]:
    """Download a copy into a private temporary directory under backup_dir (0700) and check its
    size and sha256; yields (local path, remote backup). The directory is removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=store.ensure_dir(spec.backup_dir)))
    try:
        yield fetch_into(spec, db, dest_name, file_arg, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fetch_into(spec: Spec, db: DatabaseSpec, dest_name: str, file_arg: str, work: Path) -> tuple[Path, RemoteBackup]:
    """Download ``file_arg`` ('latest' or a file name) of ``db`` from ``dest_name`` with its sidecars
    into ``work`` and check size and sha256. Returns (local path, remote backup). An incremental
    backup (a bucket's) comes with every backup of its chain, into the same directory."""
    with destinations.get(spec, dest_name) as dest:
        listing = retrying(dest, functools.partial(dest.list, db.name), "listing")
        first = remote = choose(listing.backups, file_arg, dest.name)
        first_path: Path | None = None
        while True:
            log.info("%s: downloading %s/%s/%s", dest.name, db.name, remote.tier, remote.file)
            path = retrying(dest, functools.partial(dest.fetch, remote, work), f"download of {remote.file}")
            check_fetched(remote, path)
            log.info("%s: downloaded %s (%s), sha256 matches", dest.name, remote.file, store.human_size(remote.size))
            first_path = first_path or path
            parent = store.depends_on(remote.record)
            if parent is None:
                break
            remote = choose(listing.backups, parent[1], dest.name)
            if (work / remote.file).exists():
                raise InputError(f"destination '{dest.name}': the chain of {first.file} loops at {remote.file}")
    assert first_path is not None
    return first_path, first


def fetch_latest(spec: Spec, dest_name: str, db_name: str, workdir: Path) -> Path:
    """The newest verified copy of database ``db_name`` on ``dest_name``, downloaded and checked into
    ``workdir`` (used by drills and restore --all --from)."""
    return fetch_into(spec, spec.select([db_name])[0], dest_name, "latest", workdir)[0]
