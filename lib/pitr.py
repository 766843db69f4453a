"""Restore a PostgreSQL database to a point in time: check the WAL archive covers the target
without a gap (before anything is touched), build a throwaway cluster on this host from the newest
base backup before the target, replay the archived WAL up to the target (recovery_target_time,
then promote), report the recovery point reached, pg_dump the configured database out of it as a
verified backup file, and restore that through the existing safe road (lib/restore.py: scratch
database, checks, swap, previous kept). The production server's data directory is never touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from lib import store, wal
from lib.backup import decode_stages, run_backup
from lib.config import DatabaseSpec, Spec
from lib.engines import get_engine
from lib.errors import InputError, RunFailed, VerificationFailed
from lib.localpg import _free_port, _pg_bin
from lib.stream import HashSink, Stage, run_pipeline, sha256_file

log = logging.getLogger("backup")


def parse_target(text: str, now: datetime | None = None) -> datetime:
    """``--to-time`` as an aware datetime (no offset: this host's local time). Raises InputError."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InputError(
            f"--to-time {text!r}: not a time; use e.g. '2026-12-01 10:42:00+09:00' (ISO 8601, offset optional)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()
    if moment > (now or store.utcnow()):
        raise InputError(f"--to-time {text}: that is in the future; pick a past time or use --to-latest")
    return moment


@dataclass
class Plan:
    """What a point-in-time restore will use: the base backup and the segments to replay."""

    db: DatabaseSpec
    target: datetime | None  # None: as far as the archive goes (--to-latest)
    base: Path
    base_record: dict[str, Any]
    segments: list[wal.Segment]
    partial: wal.Segment | None

    def describe(self) -> str:
        end = self.partial.name + " (partial)" if self.partial else (self.segments[-1].name if self.segments else "-")
        return f"base backup {self.base.name} + {len(self.segments)} WAL segment(s) up to {end}" + (
            f", recovery target {self.target.isoformat()}" if self.target else ", to the end of the archive"
        )


def plan(spec: Spec, db: DatabaseSpec, target: datetime | None) -> Plan:
    """Pick the newest base backup finished before ``target`` and check the archive holds every
    segment from its start up to the target (or to its end, for None). Raises InputError naming
    the first missing segment, or saying the target lies beyond the archive's end."""
    bases = wal.list_bases(spec, db)
    if not bases:
        raise InputError(
            f"{db.name}: no verified base backup under {wal.base_dir(spec, db)}; run invoke wal-base --db {db.name}"
        )
    if target is not None:
        usable = [b for b in bases if store.parse_iso(b[1]["finished"]) <= target]
        if not usable:
            oldest = bases[-1][1]
            raise InputError(
                f"{db.name}: no base backup finished before {target.isoformat()}; the oldest finished at "
                f"{store.parse_iso(oldest['finished']).astimezone(target.tzinfo).isoformat()}: pick a later time"
            )
        base, record = usable[0]
    else:
        base, record = bases[0]
    run, partial, gap = wal.chain(spec, db, record["start_segment"], record["segment_size"])
    ends = [s.received for s in run] + ([partial.received] if partial else [])
    if target is None:
        if gap:
            whole = f"; the archive is whole up to {max(ends).isoformat()}" if run else ""
            raise InputError(
                f"{db.name}: WAL segment {gap} is missing from the archive (a gap after {run[-1].name if run else record['start_segment']}); "
                f"restoring to the latest point would cross it: restore with --to-time before the gap{whole}, or put the "
                "segment back"
            )
    else:
        # records keep whole seconds: a file received at 10:42:07 may hold WAL up to 10:42:07.999; whether
        # the archive really holds everything up to the target is proven after the replay (build)
        covered = [moment for moment in ends if moment + timedelta(seconds=1) > target]
        if not covered:
            end = max(ends).isoformat() if ends else "nothing archived after the base backup"
            if gap:
                raise InputError(
                    f"{db.name}: WAL segment {gap} is missing from the archive; a restore to {target.isoformat()} "
                    f"would cross that gap (the archive is whole only up to {end})"
                )
            raise InputError(
                f"{db.name}: {target.isoformat()} is beyond the archive's end ({end}); {_behind(spec, db)}"
            )
    if not run and partial is None:
        raise InputError(
            f"{db.name}: the archive holds no WAL from {record['start_segment']} on; run invoke wal-receive"
        )
    return Plan(db=db, target=target, base=base, base_record=record, segments=run, partial=partial)


def _behind(spec: Spec, db: DatabaseSpec) -> str:
    """What to do about a target past the archive's end: wait for the running receiver's next partial
    snapshot, or start the receiver."""
    import json

    try:
        state = json.loads(wal.heartbeat_path(spec, db).read_bytes())
    except (OSError, ValueError):
        state = {}
    every = wal.settings(db).get("partial_snapshot_seconds") or 0
    if state.get("mode") == "continuous" and "stopped" not in state and every:
        return (
            f"the running receiver stores the unfinished segment every {every:g}s (wal.partial_snapshot_seconds): "
            "retry after the next one, pick an earlier time, or use --to-latest"
        )
    return (
        f"is the receiver running? (invoke wal-receive --db {db.name}; --once catches up) pick an earlier time "
        "or use --to-latest"
    )


# -- the throwaway cluster ----------------------------------------------------------------------------
class RecoveryCluster:
    """A cluster on this host built from a base backup, replaying staged WAL."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "pgdata"
        self.sock = root / "sock"
        self.walstage = root / "wal"
        self.port = _free_port()
        self.prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.log = root / "server.log"

    def chown(self) -> None:
        if self.prefix:
            subprocess.run(["chown", "-R", "postgres:postgres", str(self.root)], check=True)
        os.chmod(self.data, 0o700)

    def configure(self, target: datetime | None) -> None:
        """Our own configuration file (the source's settings and extensions are not needed to
        replay WAL); signal recovery; no hot standby (so no parameter checks against the source)."""
        lines = {
            "port": str(self.port),
            "listen_addresses": "''",
            "unix_socket_directories": f"'{self.sock}'",
            "hba_file": f"'{self.root / 'pg_hba.conf'}'",
            "ident_file": f"'{self.root / 'pg_ident.conf'}'",
            "restore_command": f'\'cp "{self.walstage}/%f" "%p"\'',
            "hot_standby": "off",
            "fsync": "off",
            "archive_mode": "off",
            "shared_buffers": "64MB",
            "max_connections": "20",
            "logging_collector": "off",
            "shared_preload_libraries": "''",
            "max_wal_senders": "0",
            "wal_level": "replica",
        }
        if target is not None:
            lines["recovery_target_time"] = f"'{target.isoformat(sep=' ')}'"
            lines["recovery_target_action"] = "'promote'"
        text = "".join(f"{key} = {value}\n" for key, value in lines.items())
        (self.root / "postgresql.conf").write_text(text)
        (self.root / "pg_hba.conf").write_text("local all all trust\n")
        (self.root / "pg_ident.conf").write_text("")
        (self.data / "postgresql.auto.conf").write_text("")  # ALTER SYSTEM settings of the source: not here
        for name in ("standby.signal", "postmaster.pid", "postmaster.opts"):
            (self.data / name).unlink(missing_ok=True)
        (self.data / "recovery.signal").write_text("")
        self.chown()

    def start(self, timeout: int = 3600) -> tuple[bool, str]:
        """Start and wait until recovery ends and the server accepts connections. Returns (ok, log)."""
        argv = [_pg_bin("pg_ctl"), "-D", str(self.data), "-o", f"-c config_file={self.root / 'postgresql.conf'}"]
        argv += ["-w", "-t", str(timeout), "-l", str(self.log), "start"]
        proc = subprocess.run(self.prefix + argv, capture_output=True, text=True)
        ok = proc.returncode == 0 and self._wait_ready(timeout)
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return ok, text

    def _wait_ready(self, timeout: float) -> bool:
        """pg_ctl -w returns once the server is consistent ('standby' in postmaster.pid, hot standby
        off); replay goes on until promotion writes 'ready'. False when the server stopped."""
        pidfile = self.data / "postmaster.pid"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                lines = pidfile.read_text().splitlines()
            except FileNotFoundError:
                return False
            if len(lines) >= 8 and lines[7].strip() == "ready":
                return True
            if len(lines) >= 8 and lines[7].strip() == "stopping":
                return False
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        subprocess.run(
            self.prefix + [_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
        )


LAST_COMMIT = re.compile(r"last completed transaction was at log time (.+)$", re.M)
STOPPED = re.compile(r"recovery stopping (?:before|after) (?:commit|abort) of transaction \d+, time (.+)$", re.M)
NOT_REACHED = "recovery ended before configured recovery target was reached"


def _decode_into(spec: Spec, path: Path, record: dict[str, Any], stage: Stage | None, sink_file: Path | None) -> None:
    """Decrypt + decompress ``path`` into ``stage`` (e.g. tar -x) or into ``sink_file``; checks the
    stored sha256 first. Raises VerificationFailed."""
    if sha256_file(path) != record["sha256"]:
        raise VerificationFailed(f"{path.name}: sha256 does not match its record; the file was changed or damaged")
    stages = decode_stages(spec, path, record) + ([stage] if stage else [])
    if sink_file is not None:
        from lib.stream import FileSink

        sink = FileSink(sink_file)
    else:
        sink = HashSink()
    result = run_pipeline(stages, sink, source=path)
    cause = result.cause()
    if cause is not None:
        from lib import crypto

        crypto.explain_failure(spec, cause, path)
        raise VerificationFailed(f"{path.name}: {cause.name} exited with status {cause.returncode}: {cause.stderr}")
    if sink_file is not None and record.get("raw_sha256") and sink.hash.hexdigest() != record["raw_sha256"]:
        raise VerificationFailed(f"{path.name}: decoded segment differs from the one received")


def proven_until(p: Plan, cover: dict[str, Any] | None) -> str | None:
    """The server time up to which the planned WAL provably holds every commit: the receiver's
    last coverage note, when the planned segments reach its WAL position. None: unknown."""
    if not cover:
        return None
    size = p.base_record["segment_size"]
    needed = max(wal.lsn_value(cover["lsn"]) - 1, 0) // size  # the segment holding the byte before it
    if p.partial is not None and p.partial.number == needed:
        return cover["covers_until"] if p.partial.received >= store.parse_iso(cover["recorded"]) else None
    last = p.partial.number if p.partial is not None else (p.segments[-1].number if p.segments else -1)
    return cover["covers_until"] if last >= needed else None


def staged_first(p: Plan) -> tuple[list[wal.Segment], list[wal.Segment]]:
    """The segments to stage before the replay starts, and the rest (staged only when the replay
    needs them): for a target time, those received before it plus the first received after it
    (it holds the target; the next commit after it stops the replay), so that a restore to early
    in a long archive does not decode the whole archive first. Everything for --to-latest."""
    every = [*p.segments, *([p.partial] if p.partial else [])]
    if p.target is None:
        return every, []
    after = [i for i, s in enumerate(every) if s.received + timedelta(seconds=1) > p.target]
    cut = after[0] + 2 if after else len(every)
    return every[:cut], every[cut:]


def build(spec: Spec, p: Plan, cluster: RecoveryCluster, archive_spec: Spec | None = None) -> dict[str, Any]:
    """Extract the base backup, stage the WAL, replay to the target and promote. Returns
    {'recovery_point': text or None, 'reached_target': bool, 'seconds': float}."""
    started = time.monotonic()
    cluster.data.mkdir(mode=0o700)
    cluster.sock.mkdir()
    cluster.walstage.mkdir()
    _decode_into(spec, p.base, p.base_record, Stage("tar -x", ["tar", "-x", "-f", "-", "-C", str(cluster.data)]), None)
    first, rest = staged_first(p)

    def stage(segments: list[wal.Segment]) -> None:
        for segment in segments:  # a partial segment is full-size, zero-padded: replay stops at its end
            _decode_into(spec, segment.path, segment.record, None, cluster.walstage / segment.name)

    stage(first)
    log.info("%s: replaying %s", p.db.name, p.describe())
    cluster.configure(p.target)
    ok, text = cluster.start()
    if not ok and rest and NOT_REACHED in text:
        # no commit after the target in the segments received up to it: the rest of the archive
        # decides (recovery continues where it stopped)
        log.info(
            "%s: the target lies beyond the first %d segment(s); staging the other %d", p.db.name, len(first), len(rest)
        )
        stage(rest)
        cluster.stop()
        cluster.configure(p.target)
        ok, text = cluster.start()
    reached = p.target is not None
    if not ok and p.target is not None and NOT_REACHED in text:
        # no commit after the target anywhere in the archive: the state at the target is the end
        # of the archive, but only if the archive provably holds everything written up to the target
        covers = proven_until(p, wal.coverage(archive_spec or spec, p.db))
        if not covers or datetime.fromisoformat(covers) < p.target:
            raise RunFailed(
                f"{p.db.name}: the archive holds no commit after {p.target.isoformat()} and is known to be complete "
                f"only up to {covers or 'an unknown time'} (nothing was touched); {_behind(spec, p.db)}"
            )
        log.info("%s: no transaction after %s in the archive; replaying to its end", p.db.name, p.target.isoformat())
        cluster.stop()
        cluster.configure(None)
        ok, text = cluster.start()
        reached = False
    if not ok:
        lines = [line for line in text.splitlines() if "FATAL" in line or "PANIC" in line]
        raise RunFailed(f"{p.db.name}: replaying the WAL failed: {(lines or text.splitlines() or ['no log'])[-1]}")
    stopped = STOPPED.findall(text)
    last = LAST_COMMIT.findall(text)
    return {
        "recovery_point": (last or [None])[-1],
        "stopped_before": (stopped or [None])[-1],
        "reached_target": reached,
        "seconds": round(time.monotonic() - started, 3),
    }


@contextlib.contextmanager
def workdir(db: DatabaseSpec) -> Iterator[Path]:
    where = wal.settings(db).get("work_dir")
    root = Path(tempfile.mkdtemp(prefix="lemon-backup-pitr-", dir=where or None))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def recovered(
    spec: Spec, p: Plan, root: Path, archive: Spec | None = None
) -> tuple[RecoveryCluster, dict[str, Any], DatabaseSpec]:
    """Build the recovered cluster in ``root``; returns (cluster, build report, a DatabaseSpec
    pointing at the configured database inside it)."""
    cluster = RecoveryCluster(root)
    report = build(spec, p, cluster, archive)
    inside = replace(
        p.db, container=None, host=str(cluster.sock), port=cluster.port, password_env=None, user=p.db.user or "postgres"
    )
    return cluster, report, inside


def restore_to_point(
    spec: Spec,
    db: DatabaseSpec,
    target: datetime | None,
    into: str | None = None,
    drop_previous: bool = False,
    confirm: Callable[[str], bool] | None = None,
    no_owner: bool = False,
    no_privileges: bool = False,
    force_target: bool = False,
    source: str | None = None,
) -> dict[str, Any]:
    """The whole road (see the module docstring). ``source``: read the WAL archive and base
    backups from this off-site destination (downloaded first into a private directory). Returns the safe road's summary plus
    'recovery_point' and 'plan'. Raises InputError before anything is touched when the archive
    does not cover the target."""
    from lib.restore import check_target

    check_target(spec, db, into, force_target)
    if source:
        with workdir(db) as fetched:
            archive = wal.fetch_archive(spec, db, source, fetched)
            summary = _restore_from(
                spec, archive, db, target, into, drop_previous, confirm, no_owner, no_privileges, force_target
            )
            summary["source"] = source
            return summary
    return _restore_from(spec, spec, db, target, into, drop_previous, confirm, no_owner, no_privileges, force_target)


def _restore_from(
    spec: Spec,
    archive: Spec,
    db: DatabaseSpec,
    target: datetime | None,
    into: str | None,
    drop_previous: bool,
    confirm: Callable[[str], bool] | None,
    no_owner: bool,
    no_privileges: bool,
    force_target: bool,
) -> dict[str, Any]:
    """restore_to_point reading the archive through ``archive`` (a Spec whose backup_dir holds it)."""
    from lib.restore import restore

    # a receiver running here stores what it has received now, so a restore to the latest point or
    # a recent time is not up to partial_snapshot_seconds short (or refused as beyond the archive)
    if archive is spec and wal.request_snapshot(spec, db):
        log.info("%s: the running receiver stored its unfinished segment for this restore", db.name)
    p = plan(archive, db, target)
    decode_stages(spec, p.base, p.base_record)  # a missing passphrase is refused here, before any work
    # the restore's last step creates a scratch database: a role that may not is refused now, not
    # after the whole replay
    engine = get_engine("postgres")
    place = engine.place(db, spec.env)
    engine.preflight(db, place)
    engine.check_can_restore(db, place)
    where = into or db.database
    if confirm is not None and not confirm(
        f"Restore '{where}' to {target.isoformat() if target else 'the latest point'} ({p.describe()})?"
    ):
        raise InputError("restore cancelled; nothing was touched")
    with workdir(db) as root:
        cluster, report, inside = recovered(spec, p, root, archive)
        try:
            dump_spec = replace(spec, backup_dir=root / "dump", encryption={"mode": "none"}, destinations=[])
            backup = run_backup(dump_spec, inside, tier="daily")
        finally:
            cluster.stop()
        log.info(
            "%s: recovered to %s; restoring it through the safe road",
            db.name,
            report["recovery_point"] or "the base backup (no transaction replayed)",
        )
        summary = restore(
            spec,
            "postgres",
            str(backup.path),
            db_name=db.name,
            into=into,
            drop_previous=drop_previous,
            no_owner=no_owner,
            no_privileges=no_privileges,
            force_target=force_target,
        )
    summary.update(report)
    summary["plan"] = p.describe()
    return summary


def drill_to_latest(spec: Spec, db: DatabaseSpec) -> dict[str, Any]:
    """Prove the newest base backup plus the archived WAL replay: recover to the end of the
    archive in a throwaway cluster, dump the configured database and verify the dump. Touches no
    server. Recorded with the drills (status shows it). Returns the result ('ok', 'recovery_point',
    'tables', 'rows', 'seconds', or 'error' and 'stage')."""
    from lib import history
    from lib.errors import ToolError

    started = time.monotonic()
    result: dict[str, Any] = {
        "ok": False,
        "source": "wal (to latest)",
        "target": "throwaway cluster",
        "server": "local",
    }
    try:
        if wal.request_snapshot(spec, db):  # the newest WAL a running receiver holds, too
            log.info("%s: the running receiver stored its unfinished segment for this drill", db.name)
        p = plan(spec, db, None)
        result["file"] = p.base.name
        with workdir(db) as root:
            cluster, report, inside = recovered(spec, p, root)
            try:
                dump_spec = replace(spec, backup_dir=root / "dump", encryption={"mode": "none"}, destinations=[])
                backup = run_backup(dump_spec, inside, tier="daily")
            finally:
                cluster.stop()
        counts = backup.record.get("engine_meta", {}).get("tables", {}) or {}
        result.update(
            ok=True,
            recovery_point=report["recovery_point"],
            plan=p.describe(),
            backup_created=p.base_record.get("created"),
            restore_seconds=report["seconds"],
            tables=len(counts),
            rows=sum(v for v in counts.values() if isinstance(v, int)),
        )
    except ToolError as exc:
        result.update(error=str(exc), stage=history.stage_of(exc, "restore"))
    result["seconds"] = round(time.monotonic() - started, 1)
    result["at"] = store.iso(store.utcnow())
    history.record_drill(spec.backup_dir, db.name, result)
    return result
