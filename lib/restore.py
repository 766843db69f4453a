"""The restore road: locate -> verify (before anything is touched) -> confirm -> engine restore."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from lib import crypto, store
from lib.backup import decode_stages, engine_of_file, find_file, judge_stream, verify_file, write_verified
from lib.config import DatabaseSpec, Spec
from lib.engines import get_engine
from lib.engines.base import RestoreRequest
from lib.errors import InputError
from lib.exec import Place
from lib.progress import watch_reads
from lib.stream import Background, PipelineResult, sha256_file

log = logging.getLogger("backup")


def _gate(
    spec: Spec,
    db: DatabaseSpec,
    path: Path,
    record: dict[str, Any] | None,
    place: Place,
    request: RestoreRequest,
    digest: Background,
    result: PipelineResult | None,
    branch: PipelineResult | None,
    load_ok: bool,
) -> list[str]:
    """request.gate for engines that load into scratch: the verdict on the file from the load's own
    read (``result`` with its tapped ``branch``), or from a read of its own when the engine could
    not tap (``result`` None). With ``load_ok`` False only what the load cannot have caused is
    judged (checksum, decryption, decompression): a load that died first cuts the branch short."""
    if result is None or branch is None:
        request.verified = verify_file(spec, db, path, record, place, decrypt=True, hashed=digest.result)
        return request.verified
    decode = {stage.name for stage in request.decode}
    judged = decode | ({stage.name for stage in branch.stages} if load_ok else set())
    run = replace(result, stages=[stage for stage in result.stages if stage.name in judged])
    tail = branch.tail if load_ok else None

    def stream() -> tuple[list[str], dict[str, Any]]:
        return judge_stream(spec, db, path, record, run, tail)

    checks = verify_file(spec, db, path, record, place, decrypt=True, stream=stream, hashed=digest.result)
    request.verified = checks
    return checks


def _write_safety(spec: Spec, db: DatabaseSpec, stages: list, inspect: list, tmp: Path, final_name: str):
    """RestoreRequest.write_safety: a safety copy is stored like a backup, encrypted when backups
    are (a copy of production data is no less sensitive for being taken before a restore)."""
    crypto.preflight(spec)
    return write_verified(spec, db, stages, inspect, tmp, final_name)


def pick_database(spec: Spec, engine: str, name: str | None) -> DatabaseSpec:
    """The configured database to restore: --db NAME, or the only one with this engine. Raises InputError."""
    get_engine(engine)
    if name:
        db = spec.select([name])[0]
        if db.engine != engine:
            raise InputError(f"database '{name}' uses engine {db.engine}, not {engine}; fix --engine or --db")
        return db
    matches = [db for db in spec.databases.values() if db.engine == engine]
    if not matches:
        raise InputError(f"backup.yml has no {engine} database; add one or fix --engine")
    if len(matches) > 1:
        names = ", ".join(db.name for db in matches)
        raise InputError(f"several {engine} databases are configured ({names}); pick one with --db NAME")
    return matches[0]


#: PostgreSQL truncates longer identifiers (two long --into names could hit one database);
#: MongoDB refuses database names of 64 bytes or more
MAX_NAME_BYTES = 63
FORCE_HINT = "pass --force-target if you really mean it"


def check_target(spec: Spec, db: DatabaseSpec, into: str | None, force: bool = False) -> None:
    """Refuse an ``--into`` target that is not a plain database of the operator's: empty or
    longer than 63 bytes (always), a maintenance or template database, or a database backup.yml
    configures under another name (``force`` allows these, except template0). Raises InputError
    naming it; runs before anything is touched."""
    if into is None:
        return
    if not into.strip():
        raise InputError("--into needs a database name")
    if db.engine == "s3":  # BUCKET[/PREFIX]: the engine checks the bucket name before anything is touched
        from lib.engines.s3 import split_target

        bucket, _ = split_target(into)
        for other in spec.databases.values():
            if other.name != db.name and other.engine == "s3" and other.options.get("bucket") == bucket and not force:
                raise InputError(
                    f"--into {into}: bucket '{bucket}' is the one backup.yml configures as '{other.name}'; restore it "
                    f"with --db {other.name}, or {FORCE_HINT}"
                )
        return
    if len(into.encode()) > MAX_NAME_BYTES:
        raise InputError(
            f"--into {into}: the name is {len(into.encode())} bytes; database names have at most "
            f"{MAX_NAME_BYTES} (a longer one is cut, so two names could hit one database)"
        )
    never, reserved = get_engine(db.engine).reserved_databases(db)
    if into in never:
        raise InputError(f"--into {into}: the template database is never a restore target")
    if into in reserved and not force:
        raise InputError(
            f"--into {into}: that is the server's maintenance or template database, not a restore target; {FORCE_HINT}"
        )
    for other in spec.databases.values():
        same_server = (other.engine, other.container, other.host, other.port) == (
            db.engine,
            db.container,
            db.host,
            db.port,
        )
        if other.name != db.name and same_server and other.database == into and not force:
            raise InputError(
                f"--into {into}: that is the database backup.yml configures as '{other.name}'; restore it with "
                f"--db {other.name}, or {FORCE_HINT}"
            )


def check_owner(
    spec: Spec, db: DatabaseSpec, path: Path, record: dict[str, Any] | None, into: str | None, force: bool = False
) -> None:
    """Refuse to replace ``db``'s own database with a backup whose record names another
    configured database (``--db b --file <a's backup>``), unless ``force``. Raises InputError."""
    owner = (record or {}).get("name")
    if into is not None or force or not isinstance(owner, str) or owner == db.name or owner not in spec.databases:
        return
    raise InputError(
        f"{path.name} is a backup of '{owner}', not of '{db.name}'; restoring it would replace "
        f"{db.database} with {owner}'s data: pass --db {owner}, --into another database, or --force-target"
    )


def restore(
    spec: Spec,
    engine: str,
    file_arg: str,
    db_name: str | None = None,
    into: str | None = None,
    drop_previous: bool = False,
    confirm: Callable[[str], bool] | None = None,
    from_dest: str | None = None,
    no_owner: bool = False,
    no_privileges: bool = False,
    create_roles: bool = False,
    force_target: bool = False,
    delete_extra: bool = False,
) -> dict[str, Any]:
    """Restore ``file_arg`` ('latest' or a path) of the chosen database.

    With ``from_dest``, ``file_arg`` ('latest' or a file name) is downloaded from that destination
    into a private temporary directory, its sha256 checked, then restored as below.

    ``confirm(question)`` is asked before anything is touched (after verification for engines that
    restore in place; before the scratch load for engines that load into scratch); returning
    False aborts with InputError. ``no_owner``/``no_privileges`` leave out the ownership and
    privileges the backup holds (a server without its roles), as pg_restore's flags do;
    ``create_roles`` creates the roles it needs instead (drills into a throwaway cluster).
    Raises InputError for bad input (see check_target and check_owner; ``force_target`` allows
    what they refuse), RunFailed/VerificationFailed
    when the restore or its checks fail (the target is then left as it was). ``delete_extra``:
    buckets only, delete the target's objects that the backup does not hold.
    """
    if delete_extra and engine != "s3":
        raise InputError("--delete-extra is for bucket restores (--engine s3); drop it")
    db = pick_database(spec, engine, db_name)
    check_target(spec, db, into, force_target)
    if from_dest:
        from lib.offsite import fetched

        with fetched(spec, db, from_dest, file_arg) as (local, remote):
            summary = restore(
                spec,
                engine,
                str(local),
                db.name,
                into,
                drop_previous,
                confirm,
                None,
                no_owner,
                no_privileges,
                create_roles,
                force_target,
                delete_extra,
            )
        summary["file"] = f"{from_dest}:{remote.path}"
        return summary
    path = find_file(spec, db, file_arg)
    backup = store.load(path)
    if backup is not None and backup.problem is not None:
        log.warning(
            "%s: its record is invalid (%s); restoring it as a file without a record", path.name, backup.problem
        )
    record = backup.record if backup and backup.problem is None else None
    file_engine = engine_of_file(path, record)
    if file_engine is None:
        raise InputError(
            f"{path.name} is not a backup this tool recognises; pass a backup_*.sql.gz, .dump or .archive file"
        )
    if file_engine != engine:
        raise InputError(f"{path.name} is a {file_engine} backup, not {engine}; fix --engine or --file")
    check_owner(spec, db, path, record, into, force_target)
    engine_impl = get_engine(engine)
    place = engine_impl.place(db, spec.env)
    engine_impl.preflight(db, place)
    target = into or db.database
    request = RestoreRequest(
        db=db,
        place=place,
        source=path,
        decode=decode_stages(spec, path, record),
        record=record or {},
        target=target,
        drop_previous=drop_previous,
        log=log,
        safety_dir=store.safety_dir(spec.backup_dir, db.name),
        config_path=spec.config_path,
        write_safety=functools.partial(_write_safety, spec, db),
        safety_encryption=crypto.record(spec) if crypto.mode(spec) != "none" else {"mode": "none"},
        no_owner=no_owner,
        no_privileges=no_privileges,
        create_roles=create_roles,
        delete_extra=delete_extra,
        verify_file=lambda other, other_record: verify_file(spec, db, other, other_record, place, decrypt=True),
        decode_file=lambda other, other_record: decode_stages(spec, other, other_record),
        backup_dir=spec.backup_dir,
    )
    question = f"Restore {path.name} into database '{target}'{engine_impl.replace_note(drop_previous)}?"
    if not store.sha256_path(path).exists():
        if (record or {}).get("sha256"):
            log.warning("%s has no .sha256 sidecar; its checksum is checked against its record", path.name)
        else:
            log.warning("%s has no .sha256 sidecar; its contents are verified, its checksum cannot be", path.name)
    if engine_impl.loads_into_scratch:
        # One read of the file: the engine taps the decoded stream it loads into a scratch
        # database and hands the run to request.gate before it touches the target.
        if confirm is not None and not confirm(question):
            raise InputError("restore cancelled; nothing was touched")
        log.info("%s: verifying %s while loading it into a scratch database", db.name, path)
        digest = Background(lambda: sha256_file(path))
        request.verify_stages = engine_impl.inspect_stages(db, place)
        request.gate = functools.partial(_gate, spec, db, path, record, place, request, digest)
        with watch_reads(path, f"{db.name}: restore"):
            summary = engine_impl.restore(request)
        checks = request.verified or []
        log.info("%s: %s verified (%s)", db.name, path.name, ", ".join(checks))
    else:
        log.info("%s: verifying %s before touching anything", db.name, path)
        with watch_reads(path, f"{db.name}: verify"):
            checks = verify_file(spec, db, path, record, place, decrypt=True)
        log.info("%s: %s verified (%s)", db.name, path.name, ", ".join(checks))
        question = engine_impl.prepare_restore(request) or question
        if confirm is not None and not confirm(question):
            raise InputError("restore cancelled; nothing was touched")
        with watch_reads(path, f"{db.name}: restore"):
            summary = engine_impl.restore(request)
    summary.update({"file": str(path), "checks": checks, "database": db.name})
    log.info(
        "%s: restored %s into %s (%s %s, %s %s, %.1fs)",
        db.name,
        path.name,
        target,
        summary.get("tables"),
        engine_impl.units[0],
        summary.get("rows"),
        engine_impl.units[1],
        summary.get("seconds", 0),
    )
    return summary
