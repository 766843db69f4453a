"""Continuous WAL archiving for a PostgreSQL database (``wal: {enabled: true}`` in backup.yml):
preflight of the server, the replication slot, ``pg_receivewal`` into a staging directory, each
completed segment compressed, encrypted, verified and stored under ``<backup_dir>/<name>/wal/``,
base backups (``pg_basebackup`` tar stream, same pipeline) and their retention, and the archive's
coverage (gaps) for a restore to a point in time (lib/pitr.py).

Layout under ``<backup_dir>/<name>/wal/``:
  staging/                    pg_receivewal's directory (completed segments leave it at once;
                              the ``.partial`` segment stays until it completes)
  archive/<SEGMENT><sfx>      a completed segment, compressed (and encrypted), with <...>.json
  archive/<SEGMENT>.partial<sfx>  the newest snapshot of the unfinished segment (for --to-latest)
  base/base_<time>.tar<sfx>   a verified base backup, with its .json record and .sha256 sidecar
  receiver.json               the running receiver's heartbeat (status alerts when it is stale)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from lib import compress, crypto, store
from lib.config import DatabaseSpec, Spec
from lib.engines.postgres import quote_ident, quote_literal
from lib.errors import EnvironmentProblem, InputError, LockHeld, RunFailed, VerificationFailed
from lib.exec import child_env, dying_with_tool, require_binary, tail_text
from lib.stream import FileSink, HashSink, Stage, Tap, run_pipeline, run_tapped, sha256_file

log = logging.getLogger("backup")

SEGMENT_RE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
RECORD_FORMAT = 1
ONCE_TIMEOUT = 300
SHIP_RETRY = 60  # seconds before a failed off-site copy of the archive is tried again
HEARTBEAT = 10  # seconds between the receiver's heartbeat writes (status: is it running?)
METRICS_EVERY = 60  # seconds between the running receiver's rewrites of the metrics textfile
DEFAULTS = {
    "synchronous": False,
    "base_keep_days": 14,
    "alert_after_seconds": 900,
    "alert_lag_mb": 1024,
    "partial_snapshot_seconds": 60,
}


# -- configuration ----------------------------------------------------------------------------------
def settings(db: DatabaseSpec) -> dict[str, Any]:
    """The database's ``wal`` block with defaults filled in (empty dict when not configured)."""
    block = db.options.get("wal") or {}
    if not block:
        return {}
    merged = {**DEFAULTS, **block}
    merged.setdefault("slot", default_slot(db.name))
    return merged


def enabled(db: DatabaseSpec) -> bool:
    return db.engine == "postgres" and bool(settings(db).get("enabled"))


def default_slot(name: str) -> str:
    """lemon_backup_<name>, lowercased, other characters as '_' (slot names allow [a-z0-9_])."""
    return ("lemon_backup_" + re.sub(r"[^a-z0-9_]", "_", name.lower()))[:63]


def require_enabled(spec: Spec, name: str | None) -> DatabaseSpec:
    """The configured postgres database ``name`` (or the only one with wal enabled). Raises InputError."""
    if name:
        db = spec.select([name])[0]
    else:
        candidates = [d for d in spec.databases.values() if enabled(d)]
        if not candidates:
            raise InputError(
                f"no database in {spec.config_path} has 'wal: {{enabled: true}}'; add it to a postgres database "
                "(see docs/pitr.md)"
            )
        if len(candidates) != 1:
            which = ", ".join(d.name for d in candidates) or "none"
            raise InputError(f"say which database with --db NAME (databases with wal enabled: {which})")
        db = candidates[0]
    if db.engine != "postgres":
        raise InputError(f"database '{db.name}' uses engine {db.engine}; WAL archiving is for postgres only")
    if not enabled(db):
        raise InputError(
            f"database '{db.name}' has no 'wal: {{enabled: true}}' in {spec.config_path}; add it (see docs/pitr.md)"
        )
    return db


def wal_dir(spec: Spec, db: DatabaseSpec) -> Path:
    return spec.backup_dir / db.name / "wal"


def archive_dir(spec: Spec, db: DatabaseSpec) -> Path:
    return wal_dir(spec, db) / "archive"


def base_dir(spec: Spec, db: DatabaseSpec) -> Path:
    return wal_dir(spec, db) / "base"


def heartbeat_path(spec: Spec, db: DatabaseSpec) -> Path:
    return wal_dir(spec, db) / "receiver.json"


def compression_kind(db: DatabaseSpec) -> str:
    return db.options.get("compression", "gzip")


def stored_suffix(spec: Spec, db: DatabaseSpec) -> str:
    return compress.SUFFIX[compression_kind(db)] + crypto.suffix(spec)


# -- connections (from this host: pg_receivewal and pg_basebackup write files here) --------------
@dataclass(frozen=True)
class Conn:
    """How the host reaches the server for replication: wal.host/wal.port, else the database's
    host/port (container mode: the container's published port on 127.0.0.1)."""

    host: str
    port: int
    user: str | None
    dbname: str
    password: str | None

    def conninfo(self, replication: bool = False, application: str | None = None) -> str:
        parts = [f"host={self.host}", f"port={self.port}", f"dbname={self.dbname}"]
        parts += [f"application_name={application}"] if application else []
        parts += [f"user={self.user}"] if self.user else []
        parts += ["replication=true"] if replication else []  # physical: what pg_hba "replication" matches
        return " ".join(parts)

    def env(self) -> dict[str, str]:
        extra = {"PGPASSWORD": self.password} if self.password else {}
        extra["PGCONNECT_TIMEOUT"] = "10"
        return child_env(extra)

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


def connection(spec: Spec, db: DatabaseSpec) -> Conn:
    """Raises ConfigError when password_env names an unset variable."""
    wal = settings(db)
    host = wal.get("host") or (None if db.container else db.host) or "127.0.0.1"
    port = int(wal.get("port") or db.port or 5432)
    return Conn(
        host=host,
        port=port,
        user=wal.get("user") or db.user,
        dbname=db.options.get("maintenance_database", "postgres"),
        password=db.password(spec.env),
    )


def _pg_tool(name: str) -> str:
    from lib.localpg import _pg_bin

    return _pg_bin(name)


def query(conn: Conn, sql: str, replication: bool = False) -> str:
    """Run ``sql`` through psql on this host; returns unaligned tuples-only output.
    Raises EnvironmentProblem carrying the server's message."""
    argv = ["psql", "-X", "-q", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1", "-d", conn.conninfo(replication)]
    require_binary("psql")
    proc = subprocess.run(dying_with_tool(argv), input=sql.encode(), capture_output=True, env=conn.env(), timeout=60)
    if proc.returncode != 0:
        raise EnvironmentProblem(tail_text(proc.stderr) or f"psql exited with status {proc.returncode}")
    return proc.stdout.decode().strip()


PREFLIGHT_SQL = """
SELECT (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user),
       current_user, current_setting('wal_level'), current_setting('max_wal_senders'),
       current_setting('max_replication_slots'),
       (SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'),
       current_setting('server_version_num'),
       (SELECT count(*) FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global')),
       pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')
"""


@dataclass
class ServerInfo:
    user: str
    segment_size: int
    version_num: int
    tablespaces: int
    read_stats: bool = True  # can see pg_stat_replication's positions (superuser or pg_read_all_stats)


def sql_role(name: str) -> str:
    """The role name as an operator types it in SQL: bare when that is safe, else double-quoted."""
    return name if re.fullmatch(r"[a-z_][a-z0-9_]*", name) else quote_ident(name)


def hba_line(user: str, address: str) -> str:
    return f"host replication {user} {address}/{128 if ':' in address else 32} scram-sha-256"


def preflight(conn: Conn, db: DatabaseSpec) -> ServerInfo:
    """Check what streaming WAL needs of the server, all at once, before anything starts: the
    REPLICATION attribute, wal_level, max_wal_senders, max_replication_slots, and a pg_hba.conf line
    for replication connections from this host. Raises InputError naming each missing piece and
    how to add it."""
    try:
        row = query(conn, PREFLIGHT_SQL).split("|")
    except EnvironmentProblem as exc:
        raise EnvironmentProblem(
            f"{db.name}: cannot connect to {conn.where} for WAL archiving: {exc}; set wal.host/wal.port "
            "(container mode: the container's published port) and check the server is up"
        ) from None
    can_replicate, user, wal_level, senders, slots, segsize, version, spaces, read_stats = row
    problems = []
    if can_replicate != "t":
        problems.append(
            f"role {user} lacks the REPLICATION attribute (as a superuser: ALTER ROLE {sql_role(user)} REPLICATION;)"
        )
    if wal_level not in ("replica", "logical"):
        problems.append(f"wal_level is {wal_level} (ALTER SYSTEM SET wal_level = 'replica'; then restart the server)")
    if int(senders) < 2:
        problems.append(
            f"max_wal_senders is {senders}; the receiver and a base backup need 2 (ALTER SYSTEM SET max_wal_senders = 10; then restart)"
        )
    if int(slots) < 1:
        problems.append(f"max_replication_slots is {slots} (ALTER SYSTEM SET max_replication_slots = 10; then restart)")
    try:  # pg_hba.conf is consulted before anything else: its answer holds whatever else is missing
        query(conn, "IDENTIFY_SYSTEM", replication=True)
    except EnvironmentProblem as exc:
        text = str(exc)
        found = re.search(r'no pg_hba\.conf entry for replication connection from host "([^"]+)"', text)
        if found:
            problems.append(
                f"pg_hba.conf has no replication line for user {user} from {found.group(1)} (add "
                f"'{hba_line(user, found.group(1))}' and SELECT pg_reload_conf();)"
            )
        elif not problems:
            problems.append(f"a replication connection to {conn.where} fails: {text}")
    if problems:
        raise InputError(f"{db.name}: the server is not ready for WAL streaming: " + "; ".join(problems))
    return ServerInfo(
        user=user,
        segment_size=int(segsize),
        version_num=int(version),
        tablespaces=int(spaces),
        read_stats=read_stats == "t",
    )


def ensure_slot(conn: Conn, slot: str) -> bool:
    """Create the physical replication slot (reserving WAL from now) when absent. Returns True when
    it was created."""
    if not re.fullmatch(r"[a-z0-9_]{1,63}", slot):
        raise InputError(f"wal.slot {slot!r}: slot names are 1-63 characters of a-z, 0-9 and _")
    exists = query(conn, f"SELECT count(*) FROM pg_replication_slots WHERE slot_name = {quote_literal(slot)}")  # noqa: S608
    if exists != "0":
        return False
    query(conn, f"SELECT pg_create_physical_replication_slot({quote_literal(slot)}, true)")
    log.info("created replication slot %s (it keeps WAL on the server until the receiver has it)", slot)
    return True


def slot_lag_bytes(conn: Conn, slot: str) -> int | None:
    """WAL the server keeps for the slot: pg_current_wal_lsn() - restart_lsn (None: no slot)."""
    lag = "coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint"
    sql = f"SELECT {lag} FROM pg_replication_slots WHERE slot_name = {quote_literal(slot)}"  # noqa: S608
    out = query(conn, sql)
    return int(out) if out else None


# -- segment names --------------------------------------------------------------------------------
def segment_number(name: str, segment_size: int) -> tuple[int, int]:
    """(timeline, sequence number) of a segment file name."""
    match = SEGMENT_RE.match(name)
    if not match:
        raise ValueError(name)
    per_id = 0x100000000 // segment_size
    return int(match.group(1), 16), int(match.group(2), 16) * per_id + int(match.group(3), 16)


def segment_name(timeline: int, number: int, segment_size: int) -> str:
    per_id = 0x100000000 // segment_size
    return f"{timeline:08X}{number // per_id:08X}{number % per_id:08X}"


# -- archiving one segment ---------------------------------------------------------------------------
@dataclass
class Segment:
    """An archived segment (or the partial snapshot): its stored file and record."""

    path: Path
    record: dict[str, Any]

    @property
    def name(self) -> str:
        return self.record["segment"]

    @property
    def number(self) -> int:
        return self.record["number"]

    @property
    def received(self) -> datetime:
        return store.parse_iso(self.record["received"])

    @property
    def partial(self) -> bool:
        return bool(self.record.get("partial"))


def _verify_written(spec: Spec, path: Path, raw_sha256: str, record: Mapping[str, Any], label: str) -> list[str]:
    """Decode the written file again and compare with the raw segment's sha256 (public-key mode,
    where no secret key is here: its OpenPGP structure). Raises VerificationFailed."""
    from lib.backup import decode_stages

    if crypto.mode(spec) == "public-key":
        return crypto.check_structure(spec, path, name=label)
    sink = HashSink()
    result = run_pipeline(decode_stages(spec, path, dict(record)), sink, source=path)
    cause = result.cause()
    if cause is not None:
        crypto.explain_failure(spec, cause, path, name=label)
        raise VerificationFailed(f"{label} failed verification: {cause.name}: {cause.stderr or 'no message'}")
    if sink.hash.hexdigest() != raw_sha256:
        raise VerificationFailed(f"{label} failed verification: decoded bytes differ from the segment received")
    return (["gpg-decrypt"] if crypto.is_encrypted(path) else []) + [f"{record['compression']}-integrity", "sha256"]


def store_segment(spec: Spec, db: DatabaseSpec, source: Path, segment_size: int, partial: bool = False) -> Segment:
    """Compress, encrypt, verify and store the WAL file ``source`` (a completed segment, or a
    ``.partial`` one as the partial snapshot). Nothing appears under a final name unless verified."""
    name = source.name.removesuffix(".partial")
    timeline, number = segment_number(name, segment_size)
    directory = store.ensure_dir(archive_dir(spec, db))
    final = directory / (name + (".partial" if partial else "") + stored_suffix(spec, db))
    tmp = directory / f"{store.TEMP_PREFIX}{final.name}"
    tmp.unlink(missing_ok=True)
    kind = compression_kind(db)
    raw_sha256 = sha256_file(source)
    raw_size = source.stat().st_size
    received = store.utcnow()
    try:
        result = run_pipeline(
            [compress.compressor(kind, db.options.get("compression_level")), *crypto.encrypt_stages(spec)],
            FileSink(tmp),
            source=source,
        )
        result.raise_for_status(f"{db.name}: WAL segment {name}: ")
        record = {
            "format": RECORD_FORMAT,
            "segment": name,
            "timeline": timeline,
            "number": number,
            "segment_size": segment_size,
            "partial": partial,
            "received": store.iso(received),
            "raw_size": raw_size,
            "raw_sha256": raw_sha256,
            "file": final.name,
            "size": result.size,
            "sha256": result.sha256,
            "compression": kind,
            "encryption": crypto.record(spec),
        }
        record["checks"] = _verify_written(spec, tmp, raw_sha256, record, final.name)
        store.write_atomic(store.record_path(final), json.dumps(record, indent=1).encode())
        tmp.rename(final)
        store.fsync_dir(directory)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Segment(final, record)


def list_segments(spec: Spec, db: DatabaseSpec) -> tuple[list[Segment], Segment | None]:
    """(completed segments sorted by number, the partial snapshot or None). Records that cannot be
    read are skipped with a warning (restore then names the gap)."""
    directory = archive_dir(spec, db)
    done: list[Segment] = []
    partial: Segment | None = None
    if not directory.is_dir():
        return done, partial
    for entry in directory.iterdir():
        if not entry.name.endswith(".json") or entry.name.startswith(store.TEMP_PREFIX):
            continue
        data_file = entry.with_name(entry.name[: -len(".json")])
        try:
            record = json.loads(entry.read_bytes())
        except (OSError, ValueError):
            log.warning("%s: unreadable WAL record %s; ignored", db.name, entry.name)
            continue
        if not data_file.is_file():
            continue
        segment = Segment(data_file, record)
        if segment.partial:
            if partial is None or segment.number > partial.number:
                partial = segment
        else:
            done.append(segment)
    done.sort(key=lambda s: (s.record["timeline"], s.number))
    return done, partial


def delete_segment(segment: Segment) -> None:
    segment.path.unlink(missing_ok=True)
    store.record_path(segment.path).unlink(missing_ok=True)


# -- the receiver ------------------------------------------------------------------------------------
def _completed(staging: Path) -> list[Path]:
    return sorted(p for p in staging.iterdir() if SEGMENT_RE.match(p.name) and p.is_file())


def archive_completed(spec: Spec, db: DatabaseSpec, staging: Path, segment_size: int) -> list[Segment]:
    """Store every completed segment waiting in ``staging`` (oldest first) and remove it there;
    a stale partial snapshot (its segment now complete) is removed."""
    stored = []
    done, partial = list_segments(spec, db)
    have = {(s.record["timeline"], s.number) for s in done}
    for path in _completed(staging):
        key = segment_number(path.name, segment_size)
        if key in have:
            log.info("%s: WAL segment %s is already archived; dropping the received copy", db.name, path.name)
        else:
            stored.append(store_segment(spec, db, path, segment_size))
            log.info("%s: archived WAL segment %s", db.name, path.name)
        path.unlink()
        if partial is not None and partial.number <= key[1]:
            delete_segment(partial)
            partial = None
    return stored


def snapshot_partial(spec: Spec, db: DatabaseSpec, staging: Path, segment_size: int) -> Segment | None:
    """Store the unfinished segment (``.partial``) as the archive's partial snapshot, replacing an
    older one. Returns it, or None when there is no partial segment."""
    partials = sorted(p for p in staging.glob("*.partial") if SEGMENT_RE.match(p.name.removesuffix(".partial")))
    if not partials:
        return None
    _, old = list_segments(spec, db)
    with tempfile.TemporaryDirectory(dir=staging.parent) as work:  # a stable copy: the receiver writes on
        copy = Path(work) / partials[-1].name
        shutil.copyfile(partials[-1], copy)
        snap = store_segment(spec, db, copy, segment_size, partial=True)
    if old is not None and old.path != snap.path:
        delete_segment(old)
    return snap


def _flushed(conn: Conn, slot: str, lsn: str) -> bool:
    """True when the receiver has reported WAL up to ``lsn`` flushed (the slot's restart_lsn)."""
    sql = f"SELECT restart_lsn >= {quote_literal(lsn)}::pg_lsn FROM pg_replication_slots WHERE slot_name = {quote_literal(slot)}"  # noqa: S608
    return query(conn, sql) == "t"


def server_position(conn: Conn) -> tuple[str, str] | None:
    """(pg_current_wal_lsn(), clock_timestamp()) on the server; None when it cannot be read."""
    try:
        lsn, moment = query(conn, "SELECT pg_current_wal_lsn(), clock_timestamp()").split("|")
    except (EnvironmentProblem, ValueError):
        return None
    return lsn, moment


def caught_up(conn: Conn, slot: str, lsn: str, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds until the receiver has written WAL up to ``lsn``: its
    write_lsn in pg_stat_replication, which PostgreSQL shows only to superusers and members of
    pg_read_all_stats; for any other role (a plain REPLICATION role) the slot's restart_lsn, what
    the receiver reported flushed (every write with synchronous: true, else at segment ends)."""
    sql = (
        "SELECT count(*) FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid "  # noqa: S608
        f"WHERE s.slot_name = {quote_literal(slot)} "
        f"AND coalesce(r.write_lsn, s.restart_lsn) >= {quote_literal(lsn)}::pg_lsn"
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            if query(conn, sql) != "0":
                return True
        except EnvironmentProblem:
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def covered_snapshot(spec: Spec, db: DatabaseSpec, conn: Conn, slot: str, staging: Path, segment_size: int) -> None:
    """A partial snapshot, taken once the receiver was seen to have everything the server had
    written when asked: then the archive covers every commit up to that moment (record_coverage)."""
    position = server_position(conn)
    proven = position is not None and caught_up(conn, slot, position[0], 3.0)
    snapshot_partial(spec, db, staging, segment_size)
    if proven:
        record_coverage(spec, db, position)


def snapshot_request_path(spec: Spec, db: DatabaseSpec) -> Path:
    return wal_dir(spec, db) / "snapshot.request"


def request_snapshot(spec: Spec, db: DatabaseSpec, timeout: float = 30.0) -> bool:
    """Ask the receiver running on this host for a snapshot of its unfinished segment now (a
    restore to the latest point or to a recent time), and wait up to ``timeout`` seconds until it
    is stored. False (and no request left behind) when no receiver runs here or it did not answer
    in time: the restore then uses what the archive holds, as before."""
    try:
        state = json.loads(heartbeat_path(spec, db).read_bytes())
    except (OSError, ValueError):
        return False
    if state.get("mode") != "continuous" or "stopped" in state or _alive(state) is not True:
        return False
    request = snapshot_request_path(spec, db)
    store.write_atomic(request, store.iso(store.utcnow()).encode())
    deadline = time.monotonic() + timeout
    while request.exists():
        if time.monotonic() >= deadline:
            request.unlink(missing_ok=True)
            return False
        time.sleep(0.1)
    return True


def coverage_path(spec: Spec, db: DatabaseSpec) -> Path:
    return archive_dir(spec, db) / "coverage.json"  # in the archive: it goes off-site with it


def record_coverage(spec: Spec, db: DatabaseSpec, position: tuple[str, str]) -> None:
    """Note that the archive (completed segments plus the partial snapshot stored after this call's
    proof) holds all WAL up to ``position`` = (lsn, the server's time then)."""
    data = {"lsn": position[0], "covers_until": position[1], "recorded": store.iso(store.utcnow())}
    store.ensure_dir(archive_dir(spec, db))
    store.write_atomic(coverage_path(spec, db), json.dumps(data).encode())


def coverage(spec: Spec, db: DatabaseSpec) -> dict[str, Any] | None:
    try:
        data = json.loads(coverage_path(spec, db).read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and {"lsn", "covers_until", "recorded"} <= set(data) else None


def lsn_value(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def _write_metrics(spec: Spec) -> None:
    """Rewrite the metrics textfile (when configured) so the WAL gauges stay fresh between backup
    runs. Never stops the receiver: a failure is a warning."""
    from lib.metrics import write_metrics

    try:
        write_metrics(spec)
    except Exception as exc:  # noqa: BLE001 - the receiver must keep receiving
        log.warning("could not rewrite the metrics file: %s", exc)


def write_heartbeat(spec: Spec, db: DatabaseSpec, state: dict[str, Any]) -> None:
    store.write_atomic(heartbeat_path(spec, db), json.dumps(state, indent=1).encode())


def receive(spec: Spec, db: DatabaseSpec, once: bool = False, poll: float = 1.0) -> dict[str, Any]:
    """Run pg_receivewal for ``db`` and archive each completed segment as it appears. ``once``:
    receive up to the server's current WAL position, archive, store the partial snapshot and
    return (for tests and cron). Otherwise run until SIGTERM/SIGINT (or pg_receivewal ends),
    then do the same. Returns a summary; raises InputError from the preflight, RunFailed when
    pg_receivewal fails."""
    wal = settings(db)
    crypto.preflight(spec)
    require_binary(compress.compressor(compression_kind(db)).argv[0])
    conn = connection(spec, db)
    info = preflight(conn, db)
    with receiver_lock(spec, db):
        return _receive(spec, db, conn, info, wal, once, poll)


@contextlib.contextmanager
def receiver_lock(spec: Spec, db: DatabaseSpec) -> Iterator[None]:
    """One receiver per database: an flock on wal/receiver.lock (released when the holder dies).
    Raises LockHeld naming the running one."""
    path = store.ensure_dir(wal_dir(spec, db)) / "receiver.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            raise LockHeld(f"{db.name}: another wal-receive already runs for it ({holder}); stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)


def _receive(
    spec: Spec, db: DatabaseSpec, conn: Conn, info: ServerInfo, wal: dict[str, Any], once: bool, poll: float
) -> dict[str, Any]:
    slot = wal["slot"]
    ensure_slot(conn, slot)
    if not info.read_stats and not (wal.get("synchronous") or once):
        log.warning(
            "%s: role %s cannot see the receiver's write position (pg_stat_replication) and the receiver is not "
            "synchronous: the archive is proven complete only at segment ends, so restores to a time after the last "
            "commit wait for one; set wal.synchronous: true or GRANT pg_read_all_stats TO %s",
            db.name,
            info.user,
            sql_role(info.user),
        )
    staging = store.ensure_dir(wal_dir(spec, db) / "staging")
    argv = [_pg_tool("pg_receivewal"), "-D", str(staging), "--slot", slot, "-d", conn.conninfo(application=slot)]
    argv += ["-n", "-w"]
    argv += ["-s", "1"]
    if wal.get("synchronous") or once:  # --once: flushed WAL is reported at once (the slot moves)
        argv.append("--synchronous")
    start = server_position(conn) if once else None
    if once and start is None:
        raise RunFailed(f"{db.name}: cannot read the server's WAL position")
    end = start[0] if start else None
    err = tempfile.TemporaryFile()  # noqa: SIM115
    proc = subprocess.Popen(dying_with_tool(argv), stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=conn.env())
    log.info(
        "%s: receiving WAL from %s (slot %s%s)",
        db.name,
        conn.where,
        slot,
        ", synchronous" if wal.get("synchronous") else "",
    )
    state = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": store.iso(store.utcnow()),
        "slot": slot,
        "segment_size": info.segment_size,
        "mode": "once" if once else "continuous",
    }
    stored: list[Segment] = []
    begun = last_snapshot = time.monotonic()
    metrics_at = begun - METRICS_EVERY + HEARTBEAT  # first rewrite once the first heartbeat is written
    beat = -HEARTBEAT
    snapshot_every = float(wal.get("partial_snapshot_seconds") or 0)
    stopped_by: str | None = None
    covers: tuple[str, str] | None = start  # --once: flushed up to the position at its start
    shipped_at, unshipped = -SHIP_RETRY, bool(spec.destinations)  # catch up what an earlier run left
    try:
        while True:
            new = archive_completed(spec, db, staging, info.segment_size)
            stored += new
            unshipped = unshipped or (bool(new) and bool(spec.destinations))
            if unshipped and (new or time.monotonic() - shipped_at >= SHIP_RETRY):
                unshipped = bool(ship(spec, db))
                shipped_at = time.monotonic()
            if stored and state.get("last_segment") != stored[-1].name or time.monotonic() - beat >= HEARTBEAT:
                state["updated"] = store.iso(store.utcnow())
                state["last_segment"] = stored[-1].name if stored else state.get("last_segment")
                write_heartbeat(spec, db, state)
                beat = time.monotonic()
            if proc.poll() is not None:
                break
            if end is not None and _flushed(conn, slot, end):
                break  # --once: the receiver has everything written before it started
            if end is not None and time.monotonic() - begun > ONCE_TIMEOUT:
                raise RunFailed(f"{db.name}: --once: the receiver did not reach {end} in {ONCE_TIMEOUT}s")
            if not once and time.monotonic() - metrics_at >= METRICS_EVERY:
                _write_metrics(spec)
                metrics_at = time.monotonic()
            asked = snapshot_request_path(spec, db)
            if not once and asked.exists():  # a restore wants the newest WAL now (request_snapshot)
                covered_snapshot(spec, db, conn, slot, staging, info.segment_size)
                last_snapshot = time.monotonic()
                asked.unlink(missing_ok=True)  # after the snapshot: the waiter reads it as done
            elif snapshot_every and not once and time.monotonic() - last_snapshot >= snapshot_every:
                covered_snapshot(spec, db, conn, slot, staging, info.segment_size)
                last_snapshot = time.monotonic()
            time.sleep(min(poll, 0.2) if once else poll)
    except KeyboardInterrupt as exc:
        from lib import interrupt

        stopped_by = interrupt.signal_name(exc)
        log.info("%s: %s: stopping pg_receivewal and archiving what it has", db.name, stopped_by)
        if proc.poll() is None:  # what the server has written so far, before the receiver stops
            position = server_position(conn)
            if position and caught_up(conn, slot, position[0], 5.0):
                covers = position
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # pg_receivewal's clean stop: flushes and closes its file
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    err.seek(0)
    message = tail_text(err.read())
    err.close()
    stored += archive_completed(spec, db, staging, info.segment_size)
    if end is not None and not _flushed(conn, slot, end):
        covers = None  # --once stopped early (an error, a signal): no proof
    snap = snapshot_partial(spec, db, staging, info.segment_size)
    if covers is not None:
        record_coverage(spec, db, covers)
    state["updated"] = store.iso(store.utcnow())
    state["stopped"] = state["updated"]
    write_heartbeat(spec, db, state)
    _write_metrics(spec)
    if spec.destinations:
        ship(spec, db)
    if proc.returncode not in (0, -signal.SIGINT) and stopped_by is None:
        removed = re.search(r"requested WAL segment ([0-9A-F]{24}) has already been removed", message)
        if removed:  # restarting cannot help: the server recycled WAL the archive continues from
            stale = staging / f"{removed.group(1)}.partial"
            raise RunFailed(
                f"{db.name}: the server no longer has WAL segment {removed.group(1)}, where the archive continues (the "
                f"slot {slot} was dropped, or invalidated by max_slot_wal_keep_size): those changes are lost and the "
                f"archive gets a gap there. To go on: rm {stale} (its last snapshot is archived), start the receiver "
                f"again, then take a base backup (invoke wal-base --db {db.name}): restores after the gap need one"
            )
        raise RunFailed(f"{db.name}: pg_receivewal exited with status {proc.returncode}: {message or 'no message'}")
    return {"stored": [s.name for s in stored], "partial": snap.name if snap else None, "stopped_by": stopped_by}


# -- base backups ------------------------------------------------------------------------------------
#: reads a tar stream on stdin: every member's header and data (a truncated stream fails), requires
#: what a base backup holds, and prints a JSON summary with backup_label's text
TAR_CHECK = r"""
import json, sys, tarfile
names, label = set(), None
with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as tar:
    for member in tar:
        names.add(member.name)
        if member.isfile():
            handle = tar.extractfile(member)
            data = handle.read()
            if len(data) != member.size:
                sys.exit("truncated member " + member.name)
            if member.name == "backup_label":
                label = data.decode("utf-8", "replace")
sys.stdin.buffer.read()
missing = [n for n in ("backup_label", "PG_VERSION", "global/pg_control") if n not in names]
if missing:
    sys.exit("not a complete base backup: missing " + ", ".join(missing))
start = [l.split("(file ")[1].rstrip(")") for l in label.splitlines() if l.startswith("START WAL LOCATION")]
if not start or "pg_wal/" + start[0] not in names:
    sys.exit("the base backup lacks the WAL segment it starts in (pg_wal/%s)" % (start or ["?"])[0])
print(json.dumps({"files": len(names), "backup_label": label}))
"""


def parse_label(text: str) -> dict[str, str]:
    """The fields of backup_label that matter: start_lsn, start_segment, start_time, timeline."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key == "START WAL LOCATION":
            lsn, _, rest = value.partition(" (file ")
            fields["start_lsn"], fields["start_segment"] = lsn, rest.rstrip(")")
        elif key == "START TIME":
            fields["start_time"] = value
        elif key == "START TIMELINE":
            fields["timeline"] = value
    return fields


def base_backup(spec: Spec, db: DatabaseSpec) -> dict[str, Any]:
    """Take a base backup with pg_basebackup (tar to stdout, WAL fetched) through compress ->
    encrypt -> file, verified in the same pass (tar structure, backup_label, its start segment),
    stored under wal/base/ with a record; then apply base retention and prune WAL no kept base
    needs. Returns the record. Raises InputError (preflight) or RunFailed/VerificationFailed."""
    crypto.preflight(spec)
    conn = connection(spec, db)
    info = preflight(conn, db)
    slot = settings(db)["slot"]
    if slot_lag_bytes(conn, slot) is None:
        raise InputError(
            f"{db.name}: replication slot {slot} does not exist: start invoke wal-receive --db {db.name} first "
            "(a base backup without the WAL after it cannot be restored to a point in time)"
        )
    if info.tablespaces:
        raise InputError(
            f"{db.name}: the server has {info.tablespaces} tablespace(s) besides pg_default; base backups here "
            "stream one tar file and support only the default tablespace"
        )
    local = local_major()
    if info.version_num // 10000 != local:
        raise EnvironmentProblem(
            f"{db.name}: the server runs PostgreSQL {info.version_num // 10000} but this host has {local}; a "
            f"restore to a point in time replays on this host: install postgresql-{info.version_num // 10000}"
        )
    kind = compression_kind(db)
    started = store.utcnow()
    directory = store.ensure_dir(base_dir(spec, db))
    final = directory / f"base_{started.astimezone():%Y%m%d_%H%M%S}.tar{stored_suffix(spec, db)}"
    tmp = directory / f"{store.TEMP_PREFIX}{final.name}"
    tmp.unlink(missing_ok=True)
    argv = [_pg_tool("pg_basebackup"), "-D", "-", "-Ft", "-X", "fetch", "--checkpoint=fast", "-w"]
    argv += ["-d", conn.conninfo(), "-l", f"lemon-backup {db.name}"]
    stages = [
        Stage("pg_basebackup", argv, env=conn.env()),
        compress.compressor(kind, db.options.get("compression_level")),
    ]
    check = [compress.decompressor(kind), Stage("tar check", [sys.executable, "-c", TAR_CHECK])]
    encrypt = crypto.encrypt_stages(spec)
    if crypto.mode(spec) == "public-key":
        branch, at = check, len(stages)
    else:
        branch = (crypto.decrypt_stages(spec, None, "symmetric") if encrypt else []) + check
        at = len(stages) + len(encrypt)
    tap = Tap(branch, name="tee (verify)", suffix=" (verify)", keep=1 << 20)
    log.info("%s: base backup started (pg_basebackup from %s)", db.name, conn.where)
    try:
        result, checked = run_tapped([*stages, *encrypt], at, tap, FileSink(tmp))
        result.raise_for_status(f"{db.name}: base backup: ")
        summary = json.loads(checked.tail.decode())
        label = parse_label(summary["backup_label"])
        checks = ["pg_basebackup", "tar-structure", "backup_label", "start-segment-included"]
        if crypto.mode(spec) == "public-key":
            checks = crypto.check_structure(spec, tmp, name=final.name) + checks
        record = {
            "format": RECORD_FORMAT,
            "kind": "base",
            "name": db.name,
            "database": db.database,
            "created": store.iso(started),
            "finished": store.iso(store.utcnow()),
            "file": final.name,
            "size": result.size,
            "sha256": result.sha256,
            "compression": kind,
            "encryption": crypto.record(spec),
            "segment_size": info.segment_size,
            "server_version_num": info.version_num,
            "files": summary["files"],
            **label,
            "verified": {"ok": True, "at": store.iso(store.utcnow()), "checks": checks},
        }
        store.write_atomic(store.sha256_path(final), store.sha256_line(result.sha256, final.name).encode())
        store.write_atomic(store.record_path(final), json.dumps(record, indent=1).encode())
        tmp.rename(final)
        store.fsync_dir(directory)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("%s: verified base backup %s (%s)", db.name, final.name, store.human_size(result.size))
    prune(spec, db)
    record["offsite_failed"] = ship(spec, db) if spec.destinations else []
    return record


def local_major() -> int:
    out = subprocess.run([_pg_tool("postgres"), "--version"], capture_output=True, text=True).stdout
    found = re.search(r"(\d+)(?:\.\d+)?", out)
    return int(found.group(1)) if found else 0


def list_bases(spec: Spec, db: DatabaseSpec) -> list[tuple[Path, dict[str, Any]]]:
    """Verified base backups (path, record), newest first."""
    directory = base_dir(spec, db)
    found = []
    if directory.is_dir():
        for entry in directory.glob("base_*.json"):
            data_file = entry.with_name(entry.name[: -len(".json")])
            try:
                record = json.loads(entry.read_bytes())
            except (OSError, ValueError):
                continue
            if data_file.is_file() and (record.get("verified") or {}).get("ok"):
                found.append((data_file, record))
    found.sort(key=lambda item: item[1]["created"], reverse=True)
    return found


def prune(spec: Spec, db: DatabaseSpec, now: datetime | None = None) -> dict[str, list[str]]:
    """Delete base backups older than wal.base_keep_days (never the newest verified one), then WAL
    segments older than the oldest kept base's start segment: never a segment a kept base needs.
    Without any base backup nothing is pruned. Returns what was deleted."""
    now = now or store.utcnow()
    keep = timedelta(days=float(settings(db)["base_keep_days"]))
    bases = list_bases(spec, db)
    gone: dict[str, list[str]] = {"bases": [], "segments": []}
    kept = bases[:1] + [b for b in bases[1:] if now - store.parse_iso(b[1]["created"]) <= keep]
    for path, _record in bases:
        if all(path != k[0] for k in kept):
            for victim in (path, store.sha256_path(path), store.record_path(path)):
                victim.unlink(missing_ok=True)
            gone["bases"].append(path.name)
            log.info("%s: deleted base backup %s (older than base_keep_days)", db.name, path.name)
    if not kept:
        return gone
    oldest = min(kept, key=lambda b: b[1]["created"])[1]
    timeline, first = segment_number(oldest["start_segment"], oldest["segment_size"])
    done, _ = list_segments(spec, db)
    for segment in done:
        if segment.record["timeline"] <= timeline and segment.number < first:
            delete_segment(segment)
            gone["segments"].append(segment.name)
    if gone["segments"]:
        log.info(
            "%s: pruned %d WAL segment(s) older than %s (the oldest kept base backup starts there)",
            db.name,
            len(gone["segments"]),
            oldest["start_segment"],
        )
    return gone


# -- coverage ------------------------------------------------------------------------------------------
def chain(
    spec: Spec, db: DatabaseSpec, start_segment: str, segment_size: int
) -> tuple[list[Segment], Segment | None, str | None]:
    """The contiguous run of archived segments from ``start_segment``: (segments, the partial
    snapshot when it continues the run, the name of the first missing segment when a later
    segment exists past a hole, else None)."""
    timeline, first = segment_number(start_segment, segment_size)
    done, partial = list_segments(spec, db)
    by_number = {s.number: s for s in done if s.record["timeline"] == timeline and s.number >= first}
    run: list[Segment] = []
    number = first
    while number in by_number:
        run.append(by_number.pop(number))
        number += 1
    later = sorted(by_number) + ([partial.number] if partial and partial.number > number else [])
    gap = segment_name(timeline, number, segment_size) if later else None
    tail = partial if partial is not None and partial.number == number else None
    return run, tail, gap


def archive_gap(spec: Spec, db: DatabaseSpec, bases: list[tuple[Path, dict[str, Any]]]) -> tuple[str | None, bool]:
    """(the first segment missing after the oldest kept base backup's start or None, whether the
    newest base backup starts after that gap with a whole archive from there on: then only
    restores to a time inside the gap are impossible, and the gap leaves with retention)."""
    if not bases:
        return None, False
    oldest = min(bases, key=lambda b: b[1]["created"])[1]
    gap = chain(spec, db, oldest["start_segment"], oldest["segment_size"])[2]
    if gap is None:
        return None, False
    newest = max(bases, key=lambda b: b[1]["created"])[1]
    size = newest["segment_size"]
    later = segment_number(newest["start_segment"], size)[1] > segment_number(gap, size)[1]
    return gap, later and chain(spec, db, newest["start_segment"], size)[2] is None


# -- monitoring ------------------------------------------------------------------------------------------
def _alive(state: Mapping[str, Any]) -> bool | None:
    """Whether the heartbeat's process still runs (None: another host, cannot tell)."""
    if state.get("host") != socket.gethostname() or not isinstance(state.get("pid"), int):
        return None
    try:
        os.kill(state["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status(spec: Spec, db: DatabaseSpec, now: datetime) -> tuple[dict[str, Any], list[str]]:
    """The ``wal`` block of ``invoke status`` for ``db`` and its problems: seconds since the last
    archived segment, whether the receiver runs (its heartbeat), the slot's lag in bytes (read
    from the server; None when it cannot be read), the newest base backup."""
    wal = settings(db)
    problems: list[str] = []
    done, partial = list_segments(spec, db)
    last = max(done, key=lambda s: (s.received, s.record["timeline"], s.number)) if done else None
    try:
        state = json.loads(heartbeat_path(spec, db).read_bytes())
    except (OSError, ValueError):
        state = {}
    beat_age = int((now - store.parse_iso(state["updated"])).total_seconds()) if state.get("updated") else None
    alive = _alive(state) if state else None
    # a continuous receiver runs while its process lives; --once from cron counts while its runs are recent
    once = state.get("mode") == "once"
    running = bool(state) and (once or ("stopped" not in state and alive is not False))
    running = running and beat_age is not None and beat_age <= float(wal["alert_after_seconds"])
    if not running:
        why = (
            "never started"
            if not state
            else ("stopped" if not once and ("stopped" in state or alive is False) else "no recent heartbeat")
        )
        problems.append(
            f"{db.name}: the WAL receiver is not running ({why}); start it: invoke wal-receive --db {db.name}"
        )
    lag = None
    try:
        lag = slot_lag_bytes(connection(spec, db), wal["slot"])
    except (InputError, EnvironmentProblem) as exc:
        problems.append(f"{db.name}: cannot read the replication slot's lag: {exc}")
    if lag is not None and lag > float(wal["alert_lag_mb"]) * (1 << 20):
        problems.append(
            f"{db.name}: the server keeps {store.human_size(lag)} of WAL for slot {wal['slot']} (alert_lag_mb "
            f"{wal['alert_lag_mb']:g}); is the receiver keeping up? see max_slot_wal_keep_size in docs/pitr.md"
        )
    bases = list_bases(spec, db)
    gap = None
    if not bases:
        problems.append(f"{db.name}: no base backup for point-in-time recovery; run invoke wal-base --db {db.name}")
    else:  # a hole in the archive after the oldest kept base: restores across it are refused
        gap, covered = archive_gap(spec, db, bases)
        if gap and not covered:
            problems.append(
                f"{db.name}: WAL segment {gap} is missing from the archive; restores to a time after it are refused: "
                f"take a new base backup (invoke wal-base --db {db.name})"
            )
    block = {
        "gap": gap,
        "gap_before_newest_base": bool(gap) and covered,
        "slot": wal["slot"],
        "segments": len(done),
        "last_segment": last.name if last else None,
        "last_archived": last.record["received"] if last else None,
        "seconds_since_last_segment": int((now - last.received).total_seconds()) if last else None,
        "partial_snapshot": partial.record["received"] if partial else None,
        "receiver_running": running,
        "receiver_heartbeat": state.get("updated"),
        "receiver_heartbeat_age_seconds": beat_age,
        "slot_lag_bytes": lag,
        "base_backups": len(bases),
        "newest_base": bases[0][0].name if bases else None,
        "newest_base_age_seconds": int((now - store.parse_iso(bases[0][1]["created"])).total_seconds())
        if bases
        else None,
    }
    return block, problems


# -- off-site copies -------------------------------------------------------------------------------------
AREAS = ("wal/archive", "wal/base")
OURS = re.compile(r"^(?:(?:[0-9A-F]{24}(?:\.partial)?|base_\d{8}_\d{6}\.tar)\.[a-z0-9.]+|coverage\.json)$")


def mutable(name: str) -> bool:
    return name == "coverage.json" or ".partial." in name


def _local_files(spec: Spec, db: DatabaseSpec, area: str) -> dict[str, int]:
    directory = spec.backup_dir / db.name / area
    if not directory.is_dir():
        return {}
    return {
        p.name: p.stat().st_size
        for p in directory.iterdir()
        if p.is_file() and OURS.match(p.name) and not p.name.startswith(store.TEMP_PREFIX)
    }


def ship(spec: Spec, db: DatabaseSpec, dest_names: list[str] | None = None) -> list[str]:
    """Bring every destination (rsync, sftp, S3: those with put_files) up to date with the WAL archive and
    base backups: upload what it lacks (each data file before its record), delete what was pruned
    here (only files named like ours). Never raises for a destination; returns the failures."""
    from lib import destinations
    from lib.errors import ToolError

    failures = []
    for dest in destinations.configured(spec, dest_names):
        if not hasattr(dest, "put_files"):
            log.warning("%s: %s destinations do not take WAL archives yet; not copied there", dest.name, dest.type)
            continue
        with dest:
            try:
                for area in AREAS:
                    relative = f"{db.name}/{area}"
                    local = _local_files(spec, db, area)
                    remote = dest.list_files(relative)
                    # the partial snapshot and the coverage note change in place: always sent (rsync sends the delta)
                    missing = [n for n, size in sorted(local.items()) if remote.get(n) != size or mutable(n)]
                    data = [n for n in missing if not n.endswith((".json", ".sha256"))]
                    records = [n for n in missing if n.endswith((".json", ".sha256"))]
                    for batch in (data, records):  # a record never arrives before its file
                        if batch:
                            dest.put_files(spec.backup_dir, relative, batch)
                    stale = [n for n in remote if OURS.match(n) and n not in local]
                    dest.delete_files(relative, sorted(stale, key=lambda n: n.endswith(".json")))
                    if missing or stale:
                        log.info(
                            "%s: %s/%s: copied %d, deleted %d file(s)",
                            dest.name,
                            db.name,
                            area,
                            len(missing),
                            len(stale),
                        )
            except ToolError as exc:
                log.error("%s: off-site copy of %s's WAL archive FAILED: %s", dest.name, db.name, exc)
                failures.append(f"{dest.name}: {exc}")
    return failures


def fetch_archive(spec: Spec, db: DatabaseSpec, dest_name: str, work: Path) -> Spec:
    """Download ``db``'s WAL archive and base backups from ``dest_name`` into ``work`` (laid out as
    a backup_dir); returns a Spec reading from there. Raises InputError when that destination
    cannot hold them."""
    from dataclasses import replace

    from lib import destinations

    dest = destinations.get(spec, dest_name)
    if not hasattr(dest, "get_files"):
        raise InputError(f"--from {dest_name}: {dest.type} destinations do not hold WAL archives")
    with dest:
        for area in AREAS:
            target = store.ensure_dir(work / db.name / area)
            if dest.list_files(f"{db.name}/{area}"):
                dest.get_files(f"{db.name}/{area}", target)
    return replace(spec, backup_dir=work)


# -- re-verification (invoke verify) ------------------------------------------------------------------------
def _check_base(spec: Spec, path: Path, record: Mapping[str, Any]) -> list[str]:
    """Decode a stored base backup again and check the tar (the same checks as when it was taken).
    Raises VerificationFailed."""
    from lib.backup import decode_stages

    if crypto.mode(spec) == "public-key":
        return crypto.check_structure(spec, path)
    stages = [*decode_stages(spec, path, dict(record)), Stage("tar check", [sys.executable, "-c", TAR_CHECK])]
    result = run_pipeline(stages, HashSink(), source=path)
    cause = result.cause()
    if cause is not None:
        crypto.explain_failure(spec, cause, path)
        raise VerificationFailed(f"{path.name} failed verification: {cause.name}: {cause.stderr or 'no message'}")
    return (["gpg-decrypt"] if crypto.is_encrypted(path) else []) + [
        f"{record['compression']}-integrity",
        "tar-structure",
    ]


def check_stored(spec: Spec, db: DatabaseSpec, path: Path, record: Mapping[str, Any], report: logging.Logger) -> bool:
    """Re-verify one stored base backup or WAL segment: its sha256, then decoded again (a segment
    must match the sha256 recorded when it was received; a base backup's tar is read through).
    Logs a problem as an error; returns False then. A file the running receiver or retention
    removed meanwhile passes (it is not damage)."""
    label = f"wal/{path.parent.name}/{path.name}"
    try:
        if sha256_file(path) != record.get("sha256"):
            raise VerificationFailed(f"{label}: sha256 does not match its record; the file was changed or damaged")
        if path.parent.name == "base":
            checks = _check_base(spec, path, record)
        else:
            checks = _verify_written(spec, path, record.get("raw_sha256", ""), record, path.name)
    except FileNotFoundError as exc:
        if not path.exists():
            return True  # replaced (partial snapshot) or pruned while we read it: not damage
        report.error("%s: %s: %s", db.name, label, exc)
        return False
    except VerificationFailed as exc:
        if not path.exists():
            return True  # gone while we read it (a newer partial snapshot replaced it): not damage
        text = str(exc).removeprefix(label).removeprefix(path.name).lstrip(": ")
        report.error("%s: %s: %s", db.name, label, text)
        return False
    report.debug("%s: %s OK (sha256, %s)", db.name, label, ", ".join(checks))
    return True


def verify_file(spec: Spec, db: DatabaseSpec, path: Path, report: logging.Logger) -> int:
    """invoke verify --file on a base backup or segment of the archive. Returns 1 when it failed."""
    try:
        record = json.loads(store.record_path(path).read_bytes())
    except (OSError, ValueError):
        raise InputError(
            f"--file {path.name}: no readable record ({store.record_path(path).name}) next to it; restores skip it"
        ) from None
    if not check_stored(spec, db, path, record, report):
        return 1
    report.info("%s: wal/%s/%s OK", db.name, path.parent.name, path.name)
    return 0


def archive_of(spec: Spec, path: Path) -> DatabaseSpec | None:
    """The database with wal enabled whose archive or base backups ``path`` lies in, else None."""
    for db in spec.databases.values():
        if enabled(db) and path.parent in (archive_dir(spec, db).resolve(), base_dir(spec, db).resolve()):
            return db
    return None


def verify_archive(spec: Spec, db: DatabaseSpec, report: logging.Logger) -> int:
    """Re-verify ``db``'s point-in-time archive for invoke verify: every base backup and stored WAL
    segment (check_stored), and that the segments run without a gap from the oldest kept base
    backup's start. Logs each problem as an error and a summary; returns the number of problems."""
    failed = 0

    bases = list_bases(spec, db)
    for path, record in bases:
        failed += 0 if check_stored(spec, db, path, record, report) else 1
    done, partial = list_segments(spec, db)
    for segment in [*done, *([partial] if partial else [])]:
        failed += 0 if check_stored(spec, db, segment.path, segment.record, report) else 1
    if not bases:
        report.error("%s: no base backup for point-in-time recovery; run invoke wal-base --db %s", db.name, db.name)
        return failed + 1
    oldest = min(bases, key=lambda b: b[1]["created"])[1]
    run, tail, gap = chain(spec, db, oldest["start_segment"], oldest["segment_size"])
    if gap and archive_gap(spec, db, bases)[1]:
        report.warning(
            "%s: WAL segment %s is missing from the archive (%s): restores to a time between it and the newest "
            "base backup are impossible; the newest base backup starts after it with a whole archive from there",
            db.name,
            gap,
            f"a gap after {run[-1].name}" if run else "the oldest base backup starts in it",
        )
        oldest = max(bases, key=lambda b: b[1]["created"])[1]  # whole from the newest base on
        run, tail, gap = chain(spec, db, oldest["start_segment"], oldest["segment_size"])
    elif gap:
        report.error(
            "%s: WAL segment %s is missing from the archive (%s): restores to a time after it are refused; "
            "take a new base backup (invoke wal-base --db %s) so that restores after it work again",
            db.name,
            gap,
            f"a gap after {run[-1].name}" if run else "the oldest base backup starts in it",
            db.name,
        )
        failed += 1
    if not gap and not run and tail is None:  # not damage: the receiver has not stored it yet (status says why)
        report.warning(
            "%s: the archive holds no WAL from %s (where a base backup starts) on yet; is invoke wal-receive running?",
            db.name,
            oldest["start_segment"],
        )
    elif not failed:
        end = (tail.name + " (partial)") if tail else run[-1].name
        report.info(
            "%s: WAL archive OK: %d base backup(s) and %d stored segment(s) verified (sha256, decoded again); "
            "no gap from %s to %s",
            db.name,
            len(bases),
            len(done) + (1 if partial else 0),
            oldest["start_segment"],
            end,
        )
    return failed


def listing_lines(spec: Spec, db: DatabaseSpec, now: datetime) -> list[str]:
    """invoke list: the base backups (newest first) and a summary of the stored WAL."""
    lines = []
    for path, record in list_bases(spec, db):
        age = store.human_age(now - store.parse_iso(record["created"]))
        checks = ",".join((record.get("verified") or {}).get("checks", []))
        lines.append(
            f"  {'wal base':<8} {path.name:<40} {store.human_size(record.get('size', 0)):>10} {age:>5} old  "
            f"verified [{checks}]; starts at WAL segment {record.get('start_segment')}"
        )
    done, partial = list_segments(spec, db)
    if done or partial:
        size = sum(s.record.get("size", 0) for s in done) + (partial.record.get("size", 0) if partial else 0)
        newest = max([s.received for s in done] + ([partial.received] if partial else []))
        span = f"{done[0].name} .. {done[-1].name}" if done else "none completed"
        lines.append(
            f"  {'wal':<8} {len(done)} segment(s) {span}"
            + (f" + partial snapshot {partial.name}" if partial else "")
            + f", {store.human_size(size)}, newest {store.human_age(now - newest)} old"
        )
    elif enabled(db):
        lines.append(f"  {'wal':<8} no WAL archived yet (invoke wal-receive --db {db.name})")
    return lines


def remote_listing_lines(dest: Any, db: DatabaseSpec) -> list[str]:
    """invoke list --dest: the base backups and WAL segments a destination holds for ``db``."""
    if not hasattr(dest, "list_files"):
        return [f"  {'wal':<8} {dest.type} destinations do not hold WAL archives"]
    bases = dest.list_files(f"{db.name}/wal/base")
    segments = dest.list_files(f"{db.name}/wal/archive")
    lines = [
        f"  {'wal base':<8} {name:<40} {store.human_size(size):>10}"
        for name, size in sorted(bases.items(), reverse=True)
        if OURS.match(name) and not name.endswith((".json", ".sha256"))
    ]
    data = sorted(n for n in segments if OURS.match(n) and n[:24].isalnum() and not n.endswith(".json"))
    done = [n for n in data if ".partial" not in n]
    partial = [n for n in data if ".partial" in n]
    if data:
        size = sum(segments[n] for n in data)
        lines.append(
            f"  {'wal':<8} {len(done)} segment(s)"
            + (f" {done[0][:24]} .. {done[-1][:24]}" if done else "")
            + (f" + partial snapshot {partial[-1][:24]}" if partial else "")
            + f", {store.human_size(size)}"
        )
    elif not bases:
        lines.append(f"  {'wal':<8} no WAL archive here (invoke offsite copies it)")
    return lines
