"""Restore drills (invoke drill): prove that the newest verified backup of each database restores.

For each database: take the newest verified backup (local, or fetched from a destination with
``--from``), verify it, restore it with the normal restore road into a throwaway database
``<database>_drill_<time>``, which checks every table's row count against the backup's record,
then always drop the throwaway. Each result is appended to ``<backup_dir>/<name>/drills.json``
so status and metrics show when a database was last proven restorable.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from lib import history, interrupt, store
from lib.config import DatabaseSpec, Spec
from lib.engines import get_engine
from lib.engines.base import Engine
from lib.errors import EnvironmentProblem, InputError, RunInterrupted, ToolError
from lib.lifecycle import remember_scratch
from lib.localpg import throwaway_cluster
from lib.metrics import write_metrics
from lib.notify import Notifier, RunReport
from lib.restore import restore
from lib.status import destination_names

log = logging.getLogger("backup")


def fetcher(spec: Spec, dest: str) -> Callable[..., Path]:
    """lib.destinations.fetch_latest(spec, dest_name, db_name, workdir) -> Path, when this build
    has it. Raises InputError when off-site fetch is unavailable or ``dest`` is not configured."""
    from lib.offsite import fetch_latest

    if dest not in destination_names(spec):
        known = ", ".join(destination_names(spec)) or "none"
        raise InputError(f"--from {dest}: no such destination in backup.yml; configured: {known}")
    return fetch_latest


@contextlib.contextmanager
def workdir(spec: Spec, needed: bool = True) -> Iterator[Path | None]:
    """A private temp directory inside backup_dir (same filesystem, same protection), removed
    after; None when not ``needed`` (local backups need no download space)."""
    if not needed:
        yield None
        return
    store.ensure_dir(spec.backup_dir)
    path = Path(tempfile.mkdtemp(prefix=".fetch-", dir=spec.backup_dir))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def locate(spec: Spec, db: DatabaseSpec, source: str | None, work: Path | None) -> str:
    """The --file argument for restore: 'latest' locally, or the path fetched from ``source``."""
    if source is None:
        return "latest"
    return str(fetcher(spec, source)(spec, source, db.name, work))


def throwaway_name(db: DatabaseSpec) -> str:
    """'<database>_drill_<UTC time>', short enough for the engine's own temp suffixes (the
    engine decides: a bucket name has no '_')."""
    return get_engine(db.engine).throwaway_name(db, store.utcnow().strftime("%Y%m%d_%H%M%S"))


def supports_drills(engine: Engine) -> bool:
    return type(engine).drop_database is not Engine.drop_database


def drill_one(
    spec: Spec, db: DatabaseSpec, source: str | None = None, local_server: bool = False, server: str = "live"
) -> dict[str, Any]:
    """Drill one database; returns the recorded result (``ok`` False with ``error`` on failure).
    With ``local_server`` (PostgreSQL only) the restore goes to a throwaway cluster started on this
    host instead of the database's own server, which is not touched at all.
    Raises EnvironmentProblem when the engine cannot drill, InputError for a bad --from."""
    if local_server:
        if not get_engine(db.engine).local_server_drills:
            raise InputError(f"{db.name}: --local-server drills are not available for {db.engine}; drop the flag")
        with throwaway_cluster() as cluster:
            log.info("%s: throwaway PostgreSQL started in %s (port %s)", db.name, cluster.root, cluster.port)
            local = replace(
                db, host=str(cluster.sock), port=cluster.port, user=cluster.superuser, container=None, password_env=None
            )
            local = replace(
                local, options={**db.options, "host": local.host, "port": local.port, "user": cluster.superuser}
            )
            local_spec = replace(spec, databases={**spec.databases, db.name: local})
            return drill_one(local_spec, local, source, server="throwaway local cluster")
    engine = get_engine(db.engine)
    if not supports_drills(engine):
        raise EnvironmentProblem(f"{db.name}: the {db.engine} engine cannot run restore drills yet")
    target = throwaway_name(db)
    place = engine.place(db, spec.env)
    result: dict[str, Any] = {"ok": False, "source": source or "local", "target": target, "server": server}
    started = time.monotonic()
    log.info("%s: restore drill into throwaway %s %s", db.name, engine.target_kind, target)
    marker = remember_scratch(spec, db, target) if engine.target_kind == "bucket" else None
    try:
        with workdir(spec, needed=source is not None) as work:
            file_arg = locate(spec, db, source, work)
            # drop_previous: the throwaway did not exist before, so there is nothing to keep (no
            # safety archive of it left under pre-restore/ by engines that take one)
            # a throwaway cluster has none of the server's roles: the drill creates what the backup needs
            summary = restore(
                spec,
                db.engine,
                file_arg,
                db_name=db.name,
                into=target,
                drop_previous=True,
                confirm=None,
                create_roles=server != "live",
            )
            backup = store.load(Path(summary["file"]))
            result.update(
                ok=True,
                file=Path(summary["file"]).name,
                backup_created=backup.record.get("created") if backup else None,
                restore_seconds=summary.get("seconds"),
                tables=summary.get("tables"),
                rows=summary.get("rows"),
            )
    except ToolError as exc:
        result.update(error=str(exc), stage=history.stage_of(exc, "restore"))
    finally:
        dropped = engine.drop_database(db, place, target)
        if dropped and marker is not None:
            marker.unlink(missing_ok=True)
    if not dropped:
        leftover = f"throwaway {engine.target_kind} {target} was left behind (could not drop it; see the warning above)"
        result.update(ok=False, leftover=target)
        if result.get("error"):
            result["error"] += f"; {leftover}"
        else:
            result.update(error=leftover, stage="cleanup")
    result["seconds"] = round(time.monotonic() - started, 3)
    result["at"] = store.iso(store.utcnow())
    history.record_drill(spec.backup_dir, db.name, result)
    if result["ok"]:
        log.info(
            "%s: drill PASSED: %s restored in %.1fs, %s %s / %s %s match the record; dropped %s",
            db.name,
            result["file"],
            result["restore_seconds"] or 0,
            result["tables"],
            engine.units[0],
            result["rows"],
            engine.units[1],
            target,
        )
    elif dropped:
        log.error("%s: drill FAILED: %s (throwaway %s dropped)", db.name, result["error"], target)
    else:
        log.error("%s: drill FAILED: %s", db.name, result["error"])
    return result


def run_drills(
    spec: Spec, databases: list[DatabaseSpec], source: str | None = None, local_server: bool = False
) -> dict[str, dict[str, Any]]:
    """Drill each database in turn; write metrics and run the notify hooks (no pings: the ping
    URL watches the backup schedule). Returns name -> result."""
    if source is not None:
        fetcher(spec, source)  # refuse a bad --from before anything runs
    notifier = Notifier(spec, "drill", pings=False)
    started = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    for db in databases:
        try:
            results[db.name] = drill_one(spec, db, source, local_server)
        except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP: the throwaway is dropped by now
            stopped = RunInterrupted(f"interrupted by {interrupt.signal_name(exc)}")
            failed = {name: _DrillFailed(r["error"]) for name, r in results.items() if not r["ok"]}
            failed[db.name] = stopped
            write_metrics(spec)
            notifier.finish(
                RunReport("drill", [*results, db.name], failed, f"drill {stopped}", time.monotonic() - started)
            )
            raise
    write_metrics(spec)
    failed = {name: _DrillFailed(r["error"]) for name, r in results.items() if not r["ok"]}
    notifier.finish(RunReport("drill", list(results), failed, summary(results), time.monotonic() - started))
    return results


class _DrillFailed(ToolError):
    """A drill's failure as hooks see it (stage 'drill')."""


def summary(results: dict[str, dict[str, Any]]) -> str:
    """'drill summary: 1 of 2 database(s) proven restorable; failed: x', plus the throwaway
    databases that could not be dropped."""
    passed = [n for n, r in results.items() if r["ok"]]
    failed = [n for n, r in results.items() if not r["ok"]]
    leftovers = [r["leftover"] for r in results.values() if r.get("leftover")]
    text = f"drill summary: {len(passed)} of {len(results)} database(s) proven restorable"
    text += f"; failed: {', '.join(failed)}" if failed else ""
    return text + (f"; throwaway database(s) left behind, drop by hand: {', '.join(leftovers)}" if leftovers else "")
