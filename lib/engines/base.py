"""The small interface every engine implements. Compression, encryption and file placement are
not the engine's business: it produces a dump stream, says how to inspect one, and restores one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib.config import DatabaseSpec
from lib.exec import Place
from lib.stream import Stage


@dataclass
class RestoreRequest:
    """What an engine needs to restore one backup.

    ``decode`` are the stages that turn the stored file (read from ``source``) into the engine's raw
    dump stream (decryption and/or decompression); ``source_is_raw`` is True when there are none,
    so the engine may read ``source`` itself (e.g. pg_restore --jobs needs a seekable file).
    """

    db: DatabaseSpec
    place: Place
    source: Path
    decode: list[Stage]
    record: Mapping[str, Any]
    target: str
    drop_previous: bool = False
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("backup"))
    #: where an engine that replaces the target in place keeps a safety copy of it first
    #: (``<backup_dir>/<name>/pre-restore``); engines that swap databases ignore it
    safety_dir: Path | None = None
    #: the backup.yml in use, for commands suggested to the operator in messages
    config_path: Path | None = None
    #: Set for engines with ``loads_into_scratch``: the file is verified from the load's own read.
    #: The engine taps its decoded stream (after ``decode``) with ``verify_stages`` (stream.Tap)
    #: and, before touching the target, calls ``gate(result, branch, load_ok)`` with the merged
    #: run, the branch's run and whether the load itself succeeded; ``gate(None, None, ok)``
    #: when it could not tap (e.g. pg_restore --jobs reads the file itself). The gate raises
    #: VerificationFailed/EnvironmentProblem for a bad file, else returns (and keeps) its checks.
    verify_stages: list[Stage] = field(default_factory=list)
    gate: Callable[..., list[str]] | None = None
    verified: list[str] | None = None
    #: For engines that keep a safety copy: ``write_safety(stages, inspect, tmp, final_name)``
    #: stores the output of ``stages`` at ``tmp`` encrypted as backup.yml says and verified in the
    #: same pass (backup.write_verified), returning (result, checks, engine_meta); with
    #: ``safety_encryption``, the record's encryption block ({"mode": "none"}: not encrypted).
    write_safety: Callable[..., tuple[Any, list[str], dict[str, Any]]] | None = None
    safety_encryption: Mapping[str, Any] = field(default_factory=lambda: {"mode": "none"})
    #: leave out ownership / privileges the backup holds (restore onto a server without its roles)
    no_owner: bool = False
    no_privileges: bool = False
    #: create the roles the backup needs that the server lacks (NOLOGIN), instead of refusing:
    #: for drills into a throwaway cluster, which has no roles of its own
    create_roles: bool = False
    #: buckets (engine s3): delete objects of the target that the backup does not hold
    delete_extra: bool = False
    #: for engines whose backups form chains (s3 incrementals): ``verify_file(path, record)``
    #: verifies another file of the chain (decrypting it; returns the checks), ``decode_file``
    #: returns its decode stages; ``backup_dir`` is where the chain's files are looked for
    verify_file: Callable[..., list[str]] | None = None
    decode_file: Callable[..., list[Stage]] | None = None
    backup_dir: Path | None = None
    #: what ``Engine.prepare_restore`` found and decided, for ``Engine.restore``
    plan: Any = None

    @property
    def source_is_raw(self) -> bool:
        return not self.decode


class Engine:
    """Base class. Subclasses set ``name`` and implement the methods below."""

    name = ""
    #: binaries this engine needs on the host in host mode
    host_binaries: tuple[str, ...] = ()
    #: what the engine counts, for log lines: (containers, items), e.g. ("tables", "rows")
    units: tuple[str, str] = ("tables", "rows")
    #: what a restore writes into, for messages: "database" (a bucket source: "bucket")
    target_kind = "database"
    #: True when a restore loads into a scratch database and touches the target only in a final
    #: step after calling ``RestoreRequest.gate``: the file is then verified alongside the load
    #: instead of before it (one pass less). False: verified first, then restored.
    loads_into_scratch: bool = False
    #: True when `invoke drill --local-server` can restore into a throwaway cluster of this
    #: engine started on this host (lib/localpg.py)
    local_server_drills: bool = False
    #: parts of a backup file name (without .gpg) that mark it as this engine's, e.g. ".sql";
    #: used for files without a record (made by the old scripts)
    file_markers: tuple[str, ...] = ()

    def reserved_databases(self, db: DatabaseSpec) -> tuple[set[str], set[str]]:
        """(databases a restore never replaces, databases it replaces only with --force-target):
        the server's own maintenance and template databases."""
        return set(), set()

    def place(self, db: DatabaseSpec, env: Mapping[str, str]) -> Place:
        """Where this database's tools run, with the secrets they need (env var name -> value)."""
        raise NotImplementedError

    def preflight(self, db: DatabaseSpec, place: Place) -> None:
        """Cheap checks before a dump: binaries, container running. Raises EnvironmentProblem."""
        place.check(self.host_binaries)

    def suffix(self, db: DatabaseSpec) -> str:
        """File suffix of the raw dump (before the tool's compression), e.g. '.sql' or '.dump'."""
        raise NotImplementedError

    def compression(self, db: DatabaseSpec) -> str | None:
        """Compression the tool applies to the dump stream ('gzip', 'zstd'), None when the dump
        format compresses itself."""
        raise NotImplementedError

    def capture(self, db: DatabaseSpec, place: Place) -> dict[str, Any]:
        """Facts about the database taken in the backup run, before the dump, that the dump itself
        does not hold (e.g. PostgreSQL's database-level properties); merged into the record.
        Default: none."""
        return {}

    def begin_backup(
        self, spec: Any, db: DatabaseSpec, tier: str, path: Path, tmp: Path
    ) -> tuple[DatabaseSpec, dict[str, Any]]:
        """Called by the backup road before the dump of ``path`` (written at ``tmp``): the
        database spec to dump with (e.g. options saying full or incremental) and fields for the
        record (e.g. ``chain``). Default: unchanged, none."""
        return db, {}

    def finish_backup(self, db: DatabaseSpec, path: Path) -> None:
        """Called once the backup is stored under ``path`` (db as begin_backup returned it)."""

    def abort_backup(self, db: DatabaseSpec) -> None:
        """Called when the backup failed or was interrupted: remove what begin_backup prepared."""

    def dump_stages(self, db: DatabaseSpec, place: Place) -> list[Stage]:
        """Stages producing the raw dump on stdout."""
        raise NotImplementedError

    def explain_dump_failure(self, db: DatabaseSpec, cause: Any) -> None:
        """Given the stage result that broke a backup's pipeline (stream.StageResult, or None),
        raise a clearer ToolError when the engine recognises the cause (e.g. a lock wait that
        timed out); else return and let the generic error stand."""

    def inspect_stages(self, db: DatabaseSpec, place: Place | None) -> list[Stage]:
        """Stages reading a raw dump on stdin and writing a short summary to stdout."""
        raise NotImplementedError

    def check_summary(self, db: DatabaseSpec, summary: bytes) -> dict[str, Any]:
        """Judge the summary: raise VerificationFailed if the dump is incomplete; else return the
        metadata to record (e.g. per-table row counts)."""
        raise NotImplementedError

    def check_record(self, meta: Mapping[str, Any], record: Mapping[str, Any]) -> None:
        """Compare what a re-read found (``meta`` from check_summary) with the backup's record;
        raise VerificationFailed on a difference. Default: nothing to compare."""

    def record_fields(self, db: DatabaseSpec) -> dict[str, Any]:
        """Engine-specific fields of a backup's record (merged into it by the backup road), e.g.
        ``dump_format``. Default: the engine's one native format."""
        return {"dump_format": "native"}

    def verify_checks(self, db: DatabaseSpec, meta: Mapping[str, Any] | None = None) -> list[str]:
        """Names of the checks ``check_summary`` performed (it returned ``meta``), for records and
        listings."""
        return ["dump-complete"]

    def counts(self, meta: Mapping[str, Any]) -> Mapping[str, int]:
        """Per-container item counts (rows per table, documents per collection) from the metadata
        ``check_summary`` returned."""
        return meta.get("tables", {})

    def plan_note(self, spec: Any, db: DatabaseSpec, tier: str) -> str:
        """Appended to the --dry-run line of a backup, e.g. ' (incremental on daily/backup_...)'."""
        return ""

    def describe(self, meta: Mapping[str, Any]) -> str:
        """What a verified backup holds, for its log line: e.g. '12 tables'."""
        return f"{len(self.counts(meta))} {self.units[0]}"

    def warnings(self, db: DatabaseSpec, meta: Mapping[str, Any]) -> list[str]:
        """Things worth a warning in what a verified backup holds (e.g. an empty prefix)."""
        return []

    def replace_note(self, drop_previous: bool) -> str:
        """What happens to the current target database, appended to the restore confirmation
        question, e.g. ' (the current one is kept as a *_pre_restore_* copy)'."""
        return ""

    def prepare_restore(self, request: RestoreRequest) -> str | None:
        """For engines that restore in place (not ``loads_into_scratch``): called after the file
        verified and before the confirmation; may verify more (a chain), look at the target and
        return the question saying what the restore will do (None: the generic question)."""
        return None

    def throwaway_name(self, db: DatabaseSpec, stamp: str) -> str:
        """The drill's throwaway target for a UTC ``stamp`` (YYYYmmdd_HHMMSS)."""
        return f"{db.database[:24]}_drill_{stamp}"

    def restore(self, request: RestoreRequest) -> dict[str, Any]:
        """Restore safely (never leaving the target destroyed on failure). Returns a summary with
        at least ``target``, ``previous`` (what was kept of the old target, or None), ``tables``
        and ``rows`` (number of containers and items restored, in this engine's ``units``) and
        ``seconds``."""
        raise NotImplementedError

    def drop_database(self, db: DatabaseSpec, place: Place, name: str) -> bool:
        """Drop database ``name`` if it exists (restore drills' throwaways). Returns True when it is
        gone (or never existed); False when the drop failed, after logging a warning with the
        command to run by hand. Optional: engines without it cannot run drills."""
        raise NotImplementedError
