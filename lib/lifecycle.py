"""What killed runs leave behind, found and repaired by the next run (and ``invoke doctor``).

A run killed by SIGKILL (or a power cut) runs no cleanup. What it can leave:

- a database closed to connections by an interrupted restore swap (``ALLOW_CONNECTIONS false``
  committed, the renames not): reopened; the applications can connect again;
- the scratch bucket of a killed bucket drill (named by ``SCRATCH_MARKER``): deleted;
- scratch databases ``<db>_restoring_<time>`` (full copies) and drill throwaways
  ``<db>_drill_<time>``: dropped, unless a session is connected to one (then named);
- ``.tmp-*`` files, ``.fetch-*`` download directories, and sidecars (``.json``/``.sha256``)
  whose backup file is gone: removed.

Everything here runs only while this process holds the run lock of backup_dir (lib/lock.py): no
live run of this backup_dir can own what is removed. Databases are matched by name to the
configured ones (``derived_name`` forms of ``<database>``), so other databases on the server are
never touched. Each repair is logged; what could not be done is returned as a ``Leftover`` with
the command that does it by hand (``invoke status`` shows those).
"""

from __future__ import annotations

import logging
import re
import shlex
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lib import store
from lib.config import DatabaseSpec, Spec
from lib.engines import get_engine
from lib.errors import ToolError

log = logging.getLogger("backup")

SCRATCH_RE = re.compile(r"^(?P<head>.*)_(?P<kind>restoring|pre_restore|drill)_\d{8}_\d{6}$")
FETCH_PREFIX = ".fetch-"
#: libpq's connect timeout for these checks: an unreachable server never stalls a run
CONNECT_TIMEOUT = "10"
#: the lock holder name of status's short check (lib/lock.py lets a run wait that out)
STATUS_HOLDER = "status"
#: ``<backup_dir>/<name>/`` file naming the scratch bucket of a drill while it runs: a drill
#: killed outright (SIGKILL, reboot) leaves a bucket full of media copies that no name pattern on
#: the server can find without s3:ListAllMyBuckets; this file finds it
SCRATCH_MARKER = "drill-scratch.json"


def remember_scratch(spec: Spec, db: DatabaseSpec, target: str) -> Path:
    """Write the marker of ``target`` (0600) before a drill creates it."""
    import json
    import os

    path = spec.backup_dir / db.name / SCRATCH_MARKER
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump({"target": target, "started": store.iso(store.utcnow())}, handle)
    return path


def _tidy_scratch_bucket(spec: Spec, db: DatabaseSpec, remove: bool, report: Report) -> None:
    import json

    marker = spec.backup_dir / db.name / SCRATCH_MARKER
    if not marker.is_file() or marker.is_symlink():
        return
    try:
        target = str(json.loads(marker.read_text(encoding="utf-8"))["target"])
    except (OSError, ValueError, KeyError, TypeError):
        marker.unlink(missing_ok=True)
        return
    command = f"invoke doctor (or by hand: mc rb --force ALIAS/{target})"
    if not remove:
        report.left.append(Leftover(db.name, f"scratch bucket {target} of an interrupted drill", command))
        return
    engine = get_engine(db.engine)
    try:
        dropped = engine.drop_database(db, engine.place(db, spec.env), target)
    except ToolError as exc:
        log.warning("%s: could not delete scratch bucket %s: %s", db.name, target, exc)
        dropped = False
    if dropped:
        marker.unlink(missing_ok=True)
        _did(report, f"{db.name}: deleted scratch bucket {target}, left by an interrupted drill")
    else:
        report.left.append(Leftover(db.name, f"scratch bucket {target} (could not delete it)", command))


@dataclass
class Leftover:
    """Something a killed run left that is still there, with the command that removes it."""

    database: str  # the configured database it belongs to ('' for backup_dir itself)
    what: str  # e.g. 'scratch database x_restoring_20261201_101010 (in use by 1 session)'
    command: str

    def text(self) -> str:
        return f"leftover {self.what}; remove it with: {self.command}"

    def as_dict(self) -> dict[str, str]:
        return {"what": self.what, "command": self.command}


@dataclass
class Report:
    """What a tidy-up did (``done``, one line each) and what is still there (``left``)."""

    done: list[str] = field(default_factory=list)
    left: list[Leftover] = field(default_factory=list)

    def extend(self, other: Report) -> None:
        self.done += other.done
        self.left += other.left


def _did(report: Report, message: str) -> None:
    log.warning("%s", message)
    report.done.append(message)


# -- files ---------------------------------------------------------------------------------------
def _removable_files(spec: Spec, db: DatabaseSpec) -> list[Path]:
    """Temp files and orphan sidecars under ``<backup_dir>/<name>`` (its tiers and pre-restore)."""
    base = spec.backup_dir / db.name
    found: list[Path] = []
    directories = [base, *(store.tier_dir(spec.backup_dir, db.name, t) for t in store.TIERS)]
    directories.append(store.safety_dir(spec.backup_dir, db.name))
    for directory in directories:
        if not directory.is_dir() or directory.is_symlink():
            continue
        for entry in sorted(directory.iterdir()):
            if entry.is_symlink() or not entry.is_file():
                continue
            if entry.name.startswith(store.TEMP_PREFIX) or (directory != base and _orphan_sidecar(entry)):
                found.append(entry)
    return found


def _orphan_sidecar(path: Path) -> bool:
    """A ``backup_*.json``/``.sha256`` whose backup file is missing (a killed backup or delete)."""
    for suffix in (".manifest.json", ".json", ".sha256"):
        if path.name.endswith(suffix):
            stem = path.name[: -len(suffix)]
            return bool(store.NAME_RE.match(stem)) and not path.with_name(stem).exists()
    return False


def _removable_dirs(spec: Spec) -> list[Path]:
    """Download directories (``.fetch-*``) and temp files directly in backup_dir."""
    if not spec.backup_dir.is_dir():
        return []
    found = []
    for entry in sorted(spec.backup_dir.iterdir()):
        if entry.is_symlink():
            continue
        if (entry.name.startswith(FETCH_PREFIX) and entry.is_dir()) or (
            entry.name.startswith(store.TEMP_PREFIX) and entry.is_file()
        ):
            found.append(entry)
    return found


def _remove_paths(paths: Iterable[Path], owner: str, remove: bool, report: Report) -> None:
    for path in paths:
        command = shlex.join(["rm", "-rf" if path.is_dir() else "-f", "--", str(path)])
        kind = "download directory" if path.is_dir() else "file"
        if not remove:
            report.left.append(Leftover(owner, f"{kind} {path}", command))
            continue
        try:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("could not remove leftover %s: %s", path, exc.strerror or exc)
            report.left.append(Leftover(owner, f"{kind} {path} ({exc.strerror or exc})", command))
            continue
        _did(report, f"removed leftover of an interrupted run: {path}")


# -- databases -----------------------------------------------------------------------------------
def _owned(name: str, database: str) -> re.Match | None:
    """The SCRATCH_RE match when ``name`` is a scratch, previous or drill database that a restore
    or a drill of ``database`` creates (restores ``--into`` another name are not matched: their
    names say nothing about which configured database they came from)."""
    match = SCRATCH_RE.match(name)
    if match is None:
        return None
    head, kind = match["head"], match["kind"]
    suffix = name[len(head) :]
    if kind == "drill":
        return match if head == database[:24] else None
    from lib.engines.postgres import Postgres

    own = Postgres.derived_name(database, suffix)[: -len(suffix)]
    drill_head = database[:24] + "_drill_"
    return match if head == own or head.startswith(drill_head) else None


def _server_key(db: DatabaseSpec) -> tuple[Any, ...]:
    return (db.container, db.host, db.port, db.user, db.options.get("maintenance_database", "postgres"))


def _tidy_server(spec: Spec, databases: list[DatabaseSpec], remove: bool, report: Report) -> None:
    """Reopen databases left closed by a swap and drop unused scratch databases on one server."""
    first = databases[0]
    engine = get_engine("postgres")
    place = engine.place(first, spec.env)
    place = replace(place, secrets={**place.secrets, "PGCONNECT_TIMEOUT": CONNECT_TIMEOUT})
    rows = engine.server_databases(first, place)
    state = {name: (allow, sessions) for name, allow, sessions in rows}
    for db in databases:
        closed: set[str] = set()
        if db.database in state and not state[db.database][0]:
            closed.add(db.database)
        scratch: list[tuple[str, int]] = []
        for name, (allow, sessions) in state.items():
            match = _owned(name, db.database)
            if match is None:
                continue
            if match["kind"] == "pre_restore":
                if not allow:
                    closed.add(name)  # an older swap closed it and died before reopening it
                continue
            scratch.append((name, sessions))
            head = match["head"]
            if head in state and not state[head][0]:
                closed.add(head)  # the restore into HEAD (a drill's throwaway, say) died inside its swap
        for name in sorted(closed):
            sql = f"ALTER DATABASE {_quote(name)} WITH ALLOW_CONNECTIONS true;"
            try:
                engine.reopen(db, place, name)
            except ToolError as exc:
                command = engine.manual_command(db, place, sql)
                log.warning(
                    "%s: database %s is closed to connections and could not be reopened: %s", db.name, name, exc
                )
                report.left.append(Leftover(db.name, f"closed database {name} (ALLOW_CONNECTIONS false)", command))
                continue
            _did(
                report,
                f"{db.name}: reopened database {name}: an interrupted restore swap had left it closed to connections",
            )
        for name, sessions in sorted(scratch):
            sql = f"DROP DATABASE IF EXISTS {_quote(name)} WITH (FORCE);"
            command = engine.manual_command(db, place, sql)
            if sessions:
                report.left.append(
                    Leftover(db.name, f"scratch database {name} (in use by {sessions} session(s))", command)
                )
                continue
            if not remove:
                report.left.append(Leftover(db.name, f"scratch database {name}", command))
                continue
            if engine.drop_database(db, place, name):
                _did(report, f"{db.name}: dropped scratch database {name}, left by an interrupted restore or drill")
            else:
                report.left.append(Leftover(db.name, f"scratch database {name} (could not drop it)", command))


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def tidy(spec: Spec, names: list[str] | None = None, remove: bool = True) -> Report:
    """Repair and remove what killed runs left, for the databases ``names`` (all when None) and
    backup_dir itself. The caller holds the run lock. With ``remove`` False only databases left
    closed are reopened; the rest is reported (``invoke status``). Never raises for what it finds
    or cannot do: a server that cannot be asked is a warning."""
    report = Report()
    databases = spec.select(names)
    _remove_paths(_removable_dirs(spec), "", remove, report)
    for db in databases:
        _remove_paths(_removable_files(spec, db), db.name, remove, report)
        if db.engine == "s3":
            _tidy_scratch_bucket(spec, db, remove, report)
    servers: dict[tuple[Any, ...], list[DatabaseSpec]] = {}
    for db in databases:
        if db.engine == "postgres":
            servers.setdefault(_server_key(db), []).append(db)
    for group in servers.values():
        try:
            _tidy_server(spec, group, remove, report)
        except ToolError as exc:
            log.warning(
                "could not check %s for leftovers of interrupted runs: %s", ", ".join(d.name for d in group), exc
            )
    return report


def tidy_quietly(spec: Spec) -> Report:
    """tidy() for every configured database at the start of a locked run; any unexpected
    problem is a warning, never the reason a run fails."""
    try:
        return tidy(spec)
    except Exception as exc:  # noqa: BLE001 - housekeeping must never stop a backup or restore
        log.warning("could not look for leftovers of interrupted runs: %s", exc)
        return Report()


def for_status(spec: Spec, names: list[str] | None = None) -> Report | None:
    """For ``invoke status``: when no run holds the lock, reopen databases left closed by an
    interrupted swap and report (without removing) every other leftover; None while a run holds
    the lock (its own scratch database and temp files are not leftovers). Before backup_dir
    exists no run ever held its lock, so there is none to take (status creates nothing)."""
    from lib.lock import run_lock

    try:
        if not spec.backup_dir.is_dir():
            return tidy(spec, names, remove=False)
        with run_lock(spec.backup_dir, STATUS_HOLDER):
            return tidy(spec, names, remove=False)
    except (ToolError, OSError) as exc:  # LockHeld: a run is live; OSError: e.g. a read-only backup_dir
        if not isinstance(exc, ToolError):
            log.warning("could not look for leftovers of interrupted runs: %s", exc)
        return None
