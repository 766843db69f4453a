"""The backup road: plan -> dump stream -> compress -> encrypt -> temp file -> verify -> record ->
rename, then retention. Also re-verification of stored files, used by verify and restore."""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from lib import compress, crypto, interrupt, store
from lib.config import DatabaseSpec, Spec
from lib.diskguard import check_free_space
from lib.engines import engine_for_file, get_engine
from lib.errors import InputError, RunFailed, RunInterrupted, ToolError, VerificationFailed
from lib.exec import Place, require_binary
from lib.progress import progress as progress_line
from lib.stream import (
    FileSink,
    PipelineResult,
    Stage,
    TailSink,
    Tap,
    run_pipeline,
    run_tapped,
    sha256_file,
)

TOOL = "lemon-backup"
#: what is kept of an inspection's output: the engine's summary (a line per table) must fit
SUMMARY_TAIL = 8 << 20
log = logging.getLogger("backup")


@dataclass
class Plan:
    """What one backup of one database will do (printed by --dry-run)."""

    db: DatabaseSpec
    tier: str
    path: Path
    stages: list[str]
    note: str = ""

    def describe(self) -> str:
        return f"{self.db.name}: {self.tier} backup{self.note} -> {self.path} via {' | '.join(self.stages)}"


def dry_run_plan(spec: Spec, db: DatabaseSpec, tier: str | None = None) -> Plan:
    """The plan with what the engine can tell before it starts (full or incremental on what)."""
    p = plan(spec, db, tier)
    return replace(p, note=get_engine(db.engine).plan_note(spec, db, p.tier))


def stored_suffix(spec: Spec, db: DatabaseSpec) -> str:
    engine = get_engine(db.engine)
    kind = engine.compression(db)
    return engine.suffix(db) + (compress.SUFFIX[kind] if kind else "") + crypto.suffix(spec)


def plan(spec: Spec, db: DatabaseSpec, tier: str | None = None, now: datetime | None = None) -> Plan:
    """Decide tier and file name for a backup of ``db`` at ``now`` (local time)."""
    now = (now or datetime.now()).astimezone()
    tier = tier or store.tier_for(now, spec.weekly_on, spec.monthly_on)
    directory = store.tier_dir(spec.backup_dir, db.name, tier)
    path = directory / store.backup_filename(now, stored_suffix(spec, db))
    while path.exists():  # two runs in one second: take the next free second
        now += timedelta(seconds=1)
        path = directory / store.backup_filename(now, stored_suffix(spec, db))
    engine = get_engine(db.engine)
    names = [s.name for s in engine.dump_stages(db, Place(container=db.container))]
    kind = engine.compression(db)
    if kind:
        names.append(compress.compressor(kind).name)
    if crypto.mode(spec) == "public-key":
        names += ["tee (verify before encryption)", *crypto.stage_names(spec)]
    else:
        names += [*crypto.stage_names(spec), "tee (verify in flight)"]
    return Plan(db=db, tier=tier, path=path, stages=names)


def decode_stages(spec: Spec, path: Path, record: dict[str, Any] | None) -> list[Stage]:
    """Stages turning a stored file into the engine's raw dump: decrypt, then decompress."""
    stages = crypto.decrypt_stages(spec, path) if path.name.endswith(".gpg") else []
    kind = (record or {}).get("compression") or compress.kind_from_name(path.name)
    if kind:
        stages.append(compress.decompressor(kind))
    return stages


def check_stream(
    spec: Spec,
    db: DatabaseSpec,
    path: Path,
    record: dict[str, Any] | None,
    place: Place | None,
    decrypt: bool = False,
    name: str | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """Read the stored file back through decode + engine inspection. Returns (checks, engine_meta).
    Raises VerificationFailed (with the failing stage) when anything is wrong. Messages call the
    file ``name`` (default ``path.name``).

    A public-key encrypted file is decrypted only with ``decrypt`` (restore; needs the secret key);
    otherwise only its packet structure can be checked here (its plaintext was checked in flight
    when it was made). A wrong passphrase or missing secret key raises EnvironmentProblem."""
    engine = get_engine(db.engine)
    if crypto.is_encrypted(path) and crypto.file_mode(path) == "public-key" and not decrypt:
        return crypto.check_structure(spec, path, name=name or path.name), {}
    decode = decode_stages(spec, path, record)
    stages = decode + engine.inspect_stages(db, place)
    result = run_pipeline(stages, TailSink(SUMMARY_TAIL), source=path)
    return judge_stream(spec, db, path, record, result, result.tail, name=name)


def judge_stream(
    spec: Spec,
    db: DatabaseSpec,
    path: Path,
    record: dict[str, Any] | None,
    result: PipelineResult,
    tail: bytes | None,
    name: str | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """The verdict on a decode + inspection run over ``path`` (its own pipeline, or the branch of
    a restore's load): a failed stage (a wrong passphrase or missing key raises EnvironmentProblem),
    then the engine's judgement of the inspection's output ``tail`` (None: not judged, e.g. when
    the load that fed it failed first). Returns (checks, engine_meta); raises VerificationFailed."""
    engine = get_engine(db.engine)
    label = name or path.name
    kind = (record or {}).get("compression") or compress.kind_from_name(path.name)
    cause = result.cause()
    if cause is not None:
        crypto.explain_failure(spec, cause, path, name=label)
        raise VerificationFailed(
            f"{label} failed verification: {cause.name} exited with status {cause.returncode}: "
            f"{cause.stderr or 'no message'}"
        )
    checks = ["gpg-decrypt"] if crypto.is_encrypted(path) else []
    checks += [f"{kind}-integrity"] if kind else []
    if tail is None:
        return checks, {}
    try:
        meta = engine.check_summary(db, tail)
        if record:
            engine.check_record(meta, record)
    except VerificationFailed as exc:
        raise VerificationFailed(f"{label} failed verification: {exc}") from None
    return checks + engine.verify_checks(db, meta), meta


def verify_file(
    spec: Spec,
    db: DatabaseSpec,
    path: Path,
    record: dict[str, Any] | None,
    place: Place | None = None,
    decrypt: bool = False,
    stream: Callable[[], tuple[list[str], dict[str, Any]]] | None = None,
    hashed: Callable[[], str] | None = None,
) -> list[str]:
    """Full verification of a stored file: sha256 against its sidecar (hashed in parallel with the
    stream check) and the stream check (``decrypt``: see check_stream). Returns the checks done.
    Raises VerificationFailed. A restore that read the file once already passes ``stream`` (the
    verdict on that read, see judge_stream) and ``hashed`` (its sha256, taken alongside)."""
    sidecar = store.sha256_path(path)
    expected = {sidecar.name: sidecar_sha256(path)}
    recorded = (record or {}).get("sha256")
    if recorded:
        expected[f"the sha256 in its record {store.record_path(path).name}"] = str(recorded)
    expected = {source: value for source, value in expected.items() if value}
    stream_error: VerificationFailed | None = None
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        digest = pool.submit(hashed or (lambda: sha256_file(path))) if expected else None
        try:
            checks, _ = (stream or (lambda: check_stream(spec, db, path, record, place, decrypt=decrypt)))()
        except VerificationFailed as exc:
            stream_error = exc
        actual = digest.result() if digest else None
    for source, value in expected.items():
        if actual != value:
            raise VerificationFailed(
                f"{path.name}: sha256 does not match {source}; the file (or that checksum) was changed or damaged"
            )
    if stream_error is not None:
        raise stream_error
    checks = (["sha256"] if expected else []) + list(checks)
    if record and record.get("size") is not None and path.stat().st_size != record["size"]:
        raise VerificationFailed(f"{path.name}: size {path.stat().st_size} differs from the recorded {record['size']}")
    return checks


def sidecar_sha256(path: Path) -> str | None:
    """The checksum in ``path``'s ``.sha256`` sidecar (None when it is missing or empty). The
    sidecar is read without following a symbolic link. Raises VerificationFailed when it is one."""
    try:
        text = store.read_nofollow(store.sha256_path(path), 4096).decode("utf-8", "replace")
    except FileNotFoundError:
        return None
    except store.SymlinkRefused as exc:
        raise VerificationFailed(str(exc.strerror)) from None
    except OSError as exc:
        raise VerificationFailed(f"{store.sha256_path(path)}: cannot read it ({exc.strerror})") from None
    return (text.split() or [None])[0]


def store_failure(exc: OSError, directory: Path) -> RunFailed:
    """One line for a write into the backup store (``directory``, unless the error names a file)
    that the system refused: a full disk, no permission, a read-only filesystem. Earlier backups
    are never touched by such a failure."""
    where = exc.filename or directory
    folder = Path(exc.filename).parent if exc.filename else directory
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free space on the filesystem holding {folder} (earlier backups are untouched)"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"make {folder} writable for this user (or remount it read-write)"
    else:
        fix = f"check {folder} (under backup_dir in backup.yml)"
    return RunFailed(f"cannot write {where}: {reason}; {fix}")


def write_verified(
    spec: Spec,
    db: DatabaseSpec,
    stages: list[Stage],
    inspect: list[Stage],
    tmp: Path,
    final_name: str,
    progress: Callable[[int], None] | None = None,
) -> tuple[PipelineResult, list[str], dict[str, Any]]:
    """Run dump -> compress -> encrypt -> ``tmp`` and verify the stream in the same pass: a tee
    feeds the bytes being stored (decrypted again in symmetric mode) to decompress -> engine
    inspection; in public-key mode (no secret key here) it feeds the stream before encryption,
    and the stored file's OpenPGP structure is checked afterwards. The sha256 is taken of the
    exact bytes written. Returns (result, checks, engine_meta); raises StageFailed or
    VerificationFailed naming the final file."""
    engine = get_engine(db.engine)
    encrypt = crypto.encrypt_stages(spec)
    public_key = crypto.mode(spec) == "public-key"
    if public_key:
        branch, at, label = inspect, len(stages), " (before encryption)"
    else:
        decrypt = crypto.decrypt_stages(spec, None, "symmetric") if encrypt else []
        branch, at, label = decrypt + inspect, len(stages) + len(encrypt), " (in flight)"
    tap = Tap(branch, name="tee" + label, suffix=label, keep=SUMMARY_TAIL)
    result, checked = run_tapped([*stages, *encrypt], at, tap, FileSink(tmp), progress=progress)
    cause = result.cause()
    when = "before encryption" if public_key else "while it was written"
    if cause is not None and cause.name.endswith(label):  # the dump worked; its check did not
        if cause.name.startswith(crypto.DECRYPT_NAME):
            crypto.explain_failure(spec, replace(cause, name=crypto.DECRYPT_NAME), tmp, name=final_name)
        raise VerificationFailed(
            f"{final_name} failed verification {when}: {cause.name} exited with status {cause.returncode}: "
            f"{cause.stderr or 'no message'}"
        )
    engine.explain_dump_failure(db, cause)
    result.raise_for_status()
    if result.size == 0:
        raise VerificationFailed(f"{db.name}: the dump produced no bytes")
    try:
        meta = engine.check_summary(db, checked.tail)
    except VerificationFailed as exc:
        raise VerificationFailed(f"{final_name} failed verification {when}: {exc}") from None
    kind = engine.compression(db)
    stream_checks = ([f"{kind}-integrity"] if kind else []) + engine.verify_checks(db, meta)
    if public_key:
        try:
            structure = crypto.check_structure(spec, tmp, name=final_name)
        except VerificationFailed as exc:
            raise VerificationFailed(str(exc)) from None
        return result, structure + [f"pre-encryption:{c}" for c in stream_checks], meta
    return result, (["gpg-decrypt"] if encrypt else []) + stream_checks, meta


def run_backup(
    spec: Spec,
    db: DatabaseSpec,
    tier: str | None = None,
    now: datetime | None = None,
    progress: Callable[[int], None] | None = None,
) -> store.Backup:
    """Make one verified backup of ``db``. Nothing appears under a final name unless every stage
    succeeded and the written file verified. Raises a ToolError on failure (temp file removed).
    Callers run crypto.preflight(spec) first (backup_many does, once for all databases)."""
    engine = get_engine(db.engine)
    place = engine.place(db, spec.env)
    engine.preflight(db, place)  # encryption is preflighted once per run, by backup_many
    kind = engine.compression(db)
    if kind:
        require_binary(compress.compressor(kind).argv[0])
    p = plan(spec, db, tier, now)
    directory = store.ensure_dir(p.path.parent)
    for leftover in store.clean_temp(directory):
        log.warning("removed leftover of an interrupted run: %s", leftover.name)
    tmp = directory / f"{store.TEMP_PREFIX}{p.path.name}"
    db, extra_fields = engine.begin_backup(spec, db, p.tier, p.path, tmp)
    stages = engine.dump_stages(db, place)
    if kind:
        stages.append(compress.compressor(kind, db.options.get("compression_level")))
    inspect = ([compress.decompressor(kind)] if kind else []) + engine.inspect_stages(db, place)
    created = store.utcnow()
    captured = engine.capture(db, place)  # before the dump: what the dump itself does not hold
    log.info("%s: %s backup started (%s)", db.name, p.tier, " | ".join(p.stages))
    started = time.monotonic()
    try:
        result, checks, meta = write_verified(spec, db, stages, inspect, tmp, p.path.name, progress)
        dumped = time.monotonic()
        if not engine.counts(meta):
            log.warning(
                "%s: the backup holds no %s; is database '%s' the right one?", db.name, engine.units[0], db.database
            )
        for warning in engine.warnings(db, meta):
            log.warning("%s: %s", db.name, warning)
        record = {
            "format": store.RECORD_FORMAT,
            "tool": TOOL,
            "name": db.name,
            "engine": db.engine,
            "database": db.database,
            **engine.record_fields(db),
            "tier": p.tier,
            "created": store.iso(created),
            "file": p.path.name,
            "size": result.size,
            "sha256": result.sha256,
            "compression": kind,
            "encryption": crypto.record(spec),
            "verified": {"ok": True, "at": store.iso(store.utcnow()), "checks": ["sha256"] + checks},
            "engine_meta": meta,
            **captured,
            **extra_fields,
            "seconds": {"dump_and_verify": round(dumped - started, 3)},
            "destinations": {},
        }
        backup = store.Backup(p.path, record, fresh=True)
        store.write_atomic(backup.sha256_path, store.sha256_line(result.sha256, p.path.name).encode())
        backup.save()
        tmp.rename(p.path)
        engine.finish_backup(db, p.path)
        store.fsync_dir(directory)
    except OSError as exc:  # a full disk, a read-only tier directory: this database fails in one line
        tmp.unlink(missing_ok=True)
        engine.abort_backup(db)
        if not p.path.exists():  # sidecars written before the disk filled up belong to no backup
            store.sha256_path(p.path).unlink(missing_ok=True)
            store.record_path(p.path).unlink(missing_ok=True)
        raise store_failure(exc, directory) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        engine.abort_backup(db)
        raise
    log.info(
        "%s: verified backup %s (%s, %s, %.1fs)",
        db.name,
        p.path,
        store.human_size(result.size),
        engine.describe(meta),
        time.monotonic() - started,
    )
    return backup


def prune(spec: Spec, db: DatabaseSpec, dry_run: bool = False, now: datetime | None = None) -> list[store.Backup]:
    """Apply retention to ``db``'s local backups. Returns what was (or would be) deleted."""
    now = now or store.utcnow()
    # a backup whose record is invalid is kept (store.load warned about it once)
    doomed = store.plan_retention(store.list_backups(spec.backup_dir, db.name), dict(db.retention), now)
    for backup in doomed:
        age = store.human_age(now - backup.created)
        if dry_run:
            log.info("%s: would delete %s/%s (%s old)", db.name, backup.tier, backup.path.name, age)
        else:
            store.delete(backup)
            log.info(
                "%s: deleted %s/%s (%s old, keep_days %s)",
                db.name,
                backup.tier,
                backup.path.name,
                age,
                db.retention[backup.tier],
            )
    return doomed


def find_file(spec: Spec, db: DatabaseSpec, file_arg: str) -> Path:
    """Resolve --file: 'latest' (newest verified backup of db) or an existing readable path.
    Raises InputError."""
    if file_arg == "latest":
        latest = store.latest_verified(store.list_backups(spec.backup_dir, db.name))
        if latest is None:
            raise InputError(
                f"no verified backup of '{db.name}' under {spec.backup_dir / db.name}; run invoke backup --db {db.name} first or pass --file PATH"
            )
        return latest.path
    path = Path(file_arg).expanduser()
    if not path.is_file():
        raise InputError(f"--file {file_arg}: no such file; pass an existing backup file or 'latest'")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise InputError(f"--file {file_arg}: cannot read it ({exc.strerror}); fix its permissions") from None
    return path.resolve()


def engine_of_file(path: Path, record: dict[str, Any] | None) -> str | None:
    """Engine a backup file belongs to: from its record, else guessed from its name."""
    if record and record.get("engine"):
        return record["engine"]
    return engine_for_file(path.name)


@dataclass
class RunOutcome:
    """Result of backing up several databases: what was made, what failed and why."""

    made: dict[str, store.Backup] = field(default_factory=dict)
    failed: dict[str, ToolError] = field(default_factory=dict)
    offsite_failed: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    #: Ctrl-C, SIGTERM or SIGHUP stopped the run (the databases after it were not attempted);
    #: the caller reports the run, then raises this again
    interrupted: KeyboardInterrupt | None = None

    @property
    def exit_code(self) -> int:
        """0 all good; 2 when every failure was bad input (nothing attempted); else 1."""
        if not self.failed:
            return 1 if self.offsite_failed else 0
        return 2 if all(exc.exit_code == 2 for exc in self.failed.values()) else 1

    def summary(self) -> str:
        total = len(self.made) + len(self.failed)
        text = f"summary: {len(self.made)} of {total} database(s) backed up"
        text += f"; failed: {', '.join(self.failed)}" if self.failed else ""
        if self.offsite_failed:
            text += f"; off-site copies FAILED (local backups kept): {'; '.join(self.offsite_failed)}"
        return text


def backup_many(spec: Spec, databases: list[DatabaseSpec], tier: str | None = None) -> RunOutcome:
    """Back up each database, apply its retention, copy it off-site; carry on past failures."""
    from lib.offsite import push_all

    crypto.preflight(spec)  # a key or passphrase problem stops the run before any dump (exit 2)
    outcome = RunOutcome()
    for db in databases:
        started = time.monotonic()
        try:
            check_free_space(spec, db)
            with progress_line(f"{db.name}: dump") as show:
                outcome.made[db.name] = run_backup(spec, db, tier, progress=show)
            prune(spec, db)
            outcome.offsite_failed += push_all(spec, outcome.made[db.name])
        except OSError as exc:  # a full disk, an unwritable or read-only backup_dir: this database fails
            outcome.failed[db.name] = store_failure(exc, spec.backup_dir / db.name)
            log.error("%s: backup FAILED: %s", db.name, outcome.failed[db.name])
        except ToolError as exc:
            outcome.failed[db.name] = exc
            log.error("%s: backup FAILED: %s", db.name, exc)
        except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP (lib/interrupt.py): cleaned up by now
            outcome.failed[db.name] = RunInterrupted(f"interrupted by {interrupt.signal_name(exc)}")
            outcome.interrupted = exc
            kept = "its verified backup is stored" if db.name in outcome.made else "nothing of it was kept"
            log.error("%s: backup INTERRUPTED by %s; %s", db.name, interrupt.signal_name(exc), kept)
        outcome.seconds[db.name] = time.monotonic() - started
        if outcome.interrupted is not None:
            break
    return outcome
