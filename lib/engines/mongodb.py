"""MongoDB: ``mongodump --archive --gzip`` streamed to the store, verified by walking the archive
structure (lib/engines/mongo_archive.py), and a restore with ``mongorestore --drop`` preceded by a
verified safety archive of the current database and followed by a per-collection count check.

Passwords. The database tools read one from ``--config FILE`` (YAML ``password: ...``, tools >=
100.3); mongosh and the legacy mongo shell have no such flag. Neither a file nor argv is used:
the YAML line travels in the environment variable ``LEMON_MONGO_CONFIG`` (``docker exec -e NAME``
without a value in container mode) to a fixed ``sh`` wrapper that pipes it into file
descriptor 3 of the tool, unsets the variable and execs the tool with ``--config=/dev/fd/3``
(the shells read the same descriptor). The tool's argv and environment never hold the secret,
nothing is written to disk on the host or in the container, and the wrapper's text is constant
(the tool's arguments reach it as ``"$@"``, never interpolated).
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lib import compress, store
from lib.config import DatabaseSpec
from lib.engines import register
from lib.engines.base import Engine, RestoreRequest
from lib.errors import EnvironmentProblem, InputError, RunFailed, StageFailed, ToolError, VerificationFailed
from lib.exec import Place, require_binary
from lib.stream import FileSink, Stage, TailSink, run_pipeline

CONFIG_ENV = "LEMON_MONGO_CONFIG"
SECRET_FD = 3
WALKER = Path(__file__).resolve().with_name("mongo_archive.py")

# Runs "$@" with the YAML in $LEMON_MONGO_CONFIG readable on fd 3 (a pipe), stdin untouched
# (saved on fd 4 around the pipe), and the variable removed from the tool's environment.
FD3_WRAPPER = r"""exec 4<&0
printf '%s\n' "$LEMON_MONGO_CONFIG" | { unset LEMON_MONGO_CONFIG; exec "$@" 3<&0 0<&4 4<&-; }
"""

FIND_SHELL = "command -v mongosh || command -v mongo || exit 127"

# Authenticates as P.user in mongosh or the legacy mongo shell; the password is read from fd 3
# (see FD3_WRAPPER), never from argv. Every shell script below starts with it.
AUTH_JS = r"""
function lemonPassword() {
  var raw = typeof require === 'function' ? require('fs').readFileSync('/dev/fd/3', 'utf8') : cat('/dev/fd/3');
  return JSON.parse(raw.replace(/^\s*password:\s*/, '').trim());
}
if (P.user) {
  var ok = db.getSiblingDB(P.authdb).auth(P.user, lemonPassword());
  if (!ok) { throw new Error('authentication failed for user ' + P.user); }
}
"""

# Counts documents per collection of P.db.
COUNT_JS = r"""
var target = db.getSiblingDB(P.db);
var infos = target.getCollectionInfos({type: 'collection'});
for (var i = 0; i < infos.length; i++) {
  var name = infos[i].name;
  if (name.indexOf('system.') === 0) { continue; }
  var coll = target.getCollection(name);
  var n = typeof coll.countDocuments === 'function' ? coll.countDocuments({}) : coll.count();
  print('LEMON-COUNT\t' + JSON.stringify(name) + '\t' + n);
}
print('LEMON-COUNT-END');
"""

# Drops database P.db (a no-op when it does not exist); prints LEMON-DROP-END only when the
# server said ok.
DROP_JS = r"""
var res = db.getSiblingDB(P.db).dropDatabase();
if (!res || !(res.ok === 1 || res.ok === true)) { throw new Error('dropDatabase failed: ' + JSON.stringify(res)); }
print('LEMON-DROP-END');
"""

log = logging.getLogger("backup")


def config_yaml(password: str) -> str:
    """The database tools' --config content for ``password`` (a JSON string is a valid YAML
    double-quoted scalar)."""
    return "password: " + json.dumps(password, ensure_ascii=False)


def ns_escape(name: str) -> str:
    """Escape a database name for mongorestore's namespace patterns (``*`` and ``\\`` are special)."""
    return name.replace("\\", "\\\\").replace("*", "\\*")


@register
class MongoDB(Engine):
    name = "mongodb"
    host_binaries = ("sh", "mongodump", "mongorestore")
    file_markers = (".archive",)
    units = ("collections", "documents")

    # -- where and how to connect -------------------------------------------------------------
    def reserved_databases(self, db: DatabaseSpec) -> tuple[set[str], set[str]]:
        return set(), {"admin", "config", "local"}

    def place(self, db: DatabaseSpec, env: Mapping[str, str]) -> Place:
        password = db.password(env)
        secrets = {CONFIG_ENV: config_yaml(password)} if password else {}
        return Place(container=db.container, secrets=secrets)

    def conn_args(self, db: DatabaseSpec) -> list[str]:
        """Connection flags (never a password)."""
        args = []
        if db.host and not db.container:
            args.append(f"--host={db.host}")
        if db.port:
            args.append(f"--port={db.port}")
        if db.user:
            args += [f"--username={db.user}", f"--authenticationDatabase={db.options.get('auth_database', 'admin')}"]
        return args

    def command(self, place: Place, argv: list[str], config_flag: bool = True) -> list[str]:
        """``argv`` wrapped so the password (when there is one) reaches it on fd 3; not yet
        prefixed with docker exec (see Place.argv / Place.run)."""
        if CONFIG_ENV not in place.secrets:
            return list(argv)
        flag = [f"--config=/dev/fd/{SECRET_FD}"] if config_flag else []
        return ["sh", "-c", FD3_WRAPPER, "sh", *argv, *flag]

    def tool_env(self, db: DatabaseSpec, place: Place) -> dict[str, str]:
        """Environment for the tools' processes: ``place.env()``, i.e. without any configured
        secret variable (password_env included; see lib.exec.child_env) plus the wrapper's
        secret, which the wrapper unsets before the tool starts."""
        return place.env()

    def tool_stage(self, db: DatabaseSpec, place: Place, name: str, argv: list[str], config_flag: bool = True) -> Stage:
        """A pipeline stage running ``argv`` where the tools run, with the password on fd 3."""
        return Stage(name, place.argv(self.command(place, argv, config_flag)), env=self.tool_env(db, place))

    def run_short(self, db: DatabaseSpec, place: Place, name: str, argv: list[str]) -> bytes:
        """Run a short command (no stdin, no --config flag) where the tools run, with the password
        on fd 3 when ``place`` carries one; its stdout. Raises StageFailed."""
        command = place.argv(self.command(place, argv, config_flag=False), interactive=False)
        result = run_pipeline([Stage(name, command, env=self.tool_env(db, place))], TailSink(4 << 20))
        result.raise_for_status()
        return result.tail

    def dump_stage(self, db: DatabaseSpec, place: Place, database: str, name: str = "mongodump") -> Stage:
        argv = ["mongodump", "--archive", "--gzip", f"--db={database}", *self.conn_args(db)]
        return self.tool_stage(db, place, name, argv)

    # -- backup ------------------------------------------------------------------------------
    def suffix(self, db: DatabaseSpec) -> str:
        return ".archive"

    def compression(self, db: DatabaseSpec) -> str | None:
        return None  # the archive's own gzip (mongodump --gzip)

    def preflight(self, db: DatabaseSpec, place: Place) -> None:
        place.check(self.host_binaries)
        require_binary(compress.decompressor("gzip").argv[0])  # verification runs on this host

    def dump_stages(self, db: DatabaseSpec, place: Place) -> list[Stage]:
        return [self.dump_stage(db, place, db.database)]

    # -- verification ------------------------------------------------------------------------
    def inspect_stages(self, db: DatabaseSpec, place: Place | None) -> list[Stage]:
        return [
            compress.decompressor("gzip"),
            Stage("archive check", [sys.executable, "-I", str(WALKER)]),
        ]

    def verify_checks(self, db: DatabaseSpec, meta: Mapping[str, Any] | None = None) -> list[str]:
        return ["gzip-integrity", "archive-magic", "archive-structure", "collections-complete", "document-counts"]

    def check_summary(self, db: DatabaseSpec, summary: bytes) -> dict[str, Any]:
        return self.parse_summary(summary)

    def parse_summary(self, summary: bytes) -> dict[str, Any]:
        """The archive walker's JSON summary as record metadata. Raises VerificationFailed when the
        archive is incomplete or the summary unreadable."""
        try:
            data = json.loads(summary.decode("utf-8", "replace").strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise VerificationFailed("archive check produced no readable result") from None
        if not data.get("complete"):
            raise VerificationFailed(data.get("error") or "archive is incomplete")
        databases = data.get("databases", [])
        single = len(databases) == 1
        collections = {
            (c["collection"] if single else f"{c['db']}.{c['collection']}"): int(c["documents"])
            for c in data.get("collections", [])
        }
        return {
            "database": databases[0] if single else None,
            "databases": databases,
            "collections": collections,
            "views": data.get("views", []),
            "server_version": data.get("server_version"),
            "tool_version": data.get("tool_version"),
            "archive_version": data.get("version"),
        }

    def counts(self, meta: Mapping[str, Any]) -> Mapping[str, int]:
        return meta.get("collections", {})

    # -- restore -----------------------------------------------------------------------------
    def replace_note(self, drop_previous: bool) -> str:
        kept = "deleted after a verified restore" if drop_previous else "kept"
        return (
            ": mongorestore --drop replaces its collections in place; a safety archive of it is "
            f"taken first under <name>/pre-restore/ ({kept})"
        )

    def restore(self, request: RestoreRequest) -> dict[str, Any]:
        db, place, target = request.db, request.place, request.target
        shell = self.find_shell(db, place)
        meta = self.expected(request)
        source = self.source_database(request, meta)
        expected: dict[str, int] = dict(meta.get("collections", {}))
        safety = self.take_safety_archive(request)
        request.log.info("%s: safety archive of '%s' kept at %s", db.name, target, safety)
        undo = f"The safety archive of '{target}' is {safety}; put it back with: {self.undo_hint(request, safety)}"
        started = time.monotonic()
        try:
            self.run_mongorestore(request, source)
        except ToolError as exc:
            raise RunFailed(f"{exc}; database '{target}' may be partly restored. {undo}") from None
        except KeyboardInterrupt:
            request.log.error(
                "%s: interrupted during mongorestore; '%s' may be partly restored. %s", db.name, target, undo
            )
            raise
        try:
            found = self.count_documents(db, place, shell, target)
        except ToolError as exc:
            raise RunFailed(f"{exc}; the restore of '{target}' is unchecked. {undo}") from None
        wrong = [
            f"{c}: {found.get(c)} documents, expected {n}" for c, n in sorted(expected.items()) if found.get(c) != n
        ]
        if wrong:
            raise RunFailed(
                "restored collections differ from the backup's record: " + "; ".join(wrong[:5]) + f". {undo}"
            )
        extra = sorted(set(found) - set(expected))
        if extra:
            request.log.warning(
                "%s: '%s' also holds collections the backup does not have (mongorestore leaves them): %s",
                db.name,
                target,
                ", ".join(extra[:10]),
            )
        previous: str | None = f"safety archive {safety}"
        if request.drop_previous:
            store.delete(store.Backup(safety, {}))
            request.log.info("%s: deleted the safety archive %s (--drop-previous)", db.name, safety.name)
            previous = None
        return {
            "target": target,
            "previous": previous,
            "safety_archive": None if request.drop_previous else str(safety),
            "tables": len(expected),
            "rows": sum(expected.values()),
            "collections": found,
            "seconds": round(time.monotonic() - started, 3),
        }

    def find_shell(self, db: DatabaseSpec, place: Place) -> str:
        """'mongosh', else 'mongo' (the legacy shell), where the tools run. Raises EnvironmentProblem."""
        try:
            bare = Place(container=place.container)  # no secret needed to look
            out = self.run_short(db, bare, "look for mongosh/mongo", ["sh", "-c", FIND_SHELL])
        except StageFailed:
            raise EnvironmentProblem(
                f"neither mongosh nor the legacy mongo shell is installed on {place.label} (needed to "
                "check the restored collections); install mongodb-mongosh there; nothing was touched"
            ) from None
        return Path(out.decode().strip().splitlines()[-1]).name

    def expected(self, request: RestoreRequest) -> dict[str, Any]:
        """The archive's metadata: from the backup's record, else by walking the file again."""
        meta = request.record.get("engine_meta") or {}
        if "collections" in meta:
            return dict(meta)
        stages = [*request.decode, *self.inspect_stages(request.db, None)]
        result = run_pipeline(stages, TailSink(256 * 1024), source=request.source)
        result.raise_for_status()
        return self.check_summary(request.db, result.tail)

    def source_database(self, request: RestoreRequest, meta: Mapping[str, Any]) -> str:
        """The database the archive holds. Raises InputError for an archive of several databases."""
        databases = meta.get("databases") or []
        if len(databases) > 1:
            raise InputError(
                f"{request.source.name} holds several databases ({', '.join(databases)}); this tool restores "
                "archives of one database (as it makes them); nothing was touched"
            )
        return meta.get("database") or request.record.get("database") or request.db.database

    def take_safety_archive(self, request: RestoreRequest) -> Path:
        """Dump the current target to a verified archive (0600, with sidecars) in the safety
        directory. Returns its path. Raises RunFailed (nothing touched) when that fails."""
        db, target = request.db, request.target
        if request.safety_dir is None:
            raise RunFailed("no place for a safety archive was given; refusing to restore in place")
        directory = store.ensure_dir(request.safety_dir)
        stamp = store.utcnow().strftime("%Y%m%d_%H%M%S")
        base = f"pre_restore_{re.sub(r'[^A-Za-z0-9_.-]', '_', target)}_{stamp}"
        encrypted = request.safety_encryption.get("mode", "none") != "none"
        suffix = ".archive.gpg" if encrypted else ".archive"
        path = directory / f"{base}{suffix}"
        counter = 1
        while path.exists():  # never overwrite an older safety archive (it may be the restore's source)
            counter += 1
            path = directory / f"{base}_{counter}{suffix}"
        tmp = directory / f"{store.TEMP_PREFIX}{path.name}"
        created = store.utcnow()
        dump = [self.dump_stage(db, request.place, target, "mongodump (safety archive)")]
        try:
            if request.write_safety is not None:  # encrypted as backups are, verified in flight
                result, checks, meta = request.write_safety(dump, self.inspect_stages(db, None), tmp, path.name)
            else:
                result = run_pipeline(dump, FileSink(tmp))
                result.raise_for_status()
                check = run_pipeline(self.inspect_stages(db, None), TailSink(256 * 1024), source=tmp)
                check.raise_for_status()
                meta = self.parse_summary(check.tail)
                checks = self.verify_checks(db)
            record = {
                "format": store.RECORD_FORMAT,
                "tool": "lemon-backup",
                "name": db.name,
                "engine": self.name,
                "database": target,
                **self.record_fields(db),
                "tier": "pre-restore",
                "created": store.iso(created),
                "file": path.name,
                "size": result.size,
                "sha256": result.sha256,
                "compression": None,
                "encryption": dict(request.safety_encryption),
                "verified": {"ok": True, "at": store.iso(store.utcnow()), "checks": ["sha256", *checks]},
                "engine_meta": meta,
                "destinations": {},
            }
            store.write_atomic(store.sha256_path(path), store.sha256_line(result.sha256, path.name).encode())
            store.Backup(path, record).save()
            tmp.rename(path)
            store.fsync_dir(directory)
        except ToolError as exc:
            tmp.unlink(missing_ok=True)
            raise RunFailed(
                f"could not take a safety archive of '{target}' before restoring ({exc}); nothing was touched"
            ) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    def undo_hint(self, request: RestoreRequest, safety: Path) -> str:
        """The command that restores the safety archive (this tool, same config)."""
        parts = ["invoke", "restore", "--engine", "mongodb", "--db", request.db.name, "--file", str(safety)]
        if request.target != request.db.database:
            parts += ["--into", request.target]
        parts.append("--yes")
        if request.config_path is not None:
            parts += ["--config", str(request.config_path)]
        return shlex.join(parts)

    def run_mongorestore(self, request: RestoreRequest, source: str) -> None:
        """Stream the archive into mongorestore --drop (renaming the namespaces for --into)."""
        db, place, target = request.db, request.place, request.target
        argv = ["mongorestore", "--archive", "--gzip", "--drop", "--stopOnError", f"--nsInclude={ns_escape(source)}.*"]
        if source != target:
            argv += [f"--nsFrom={ns_escape(source)}.*", f"--nsTo={ns_escape(target)}.*"]
        argv += self.conn_args(db)
        stage = self.tool_stage(db, place, "mongorestore", argv)
        result = run_pipeline([*request.decode, stage], TailSink(4096), source=request.source)
        result.raise_for_status()

    def shell_argv(self, db: DatabaseSpec, shell: str, script: str) -> list[str]:
        """``shell`` (mongosh or mongo) evaluating ``script``, connected like the tools."""
        argv = [shell, "--quiet", "--norc"]
        if db.host and not db.container:
            argv += ["--host", db.host]
        if db.port:
            argv += ["--port", str(db.port)]
        return argv + ["--eval", script]

    def run_script(self, db: DatabaseSpec, place: Place, shell: str, database: str, body: str, what: str) -> str:
        """Run ``body`` (after AUTH_JS, with ``P`` = database, user, auth database) in ``shell``
        where the tools run, the password on fd 3. Its stdout. Raises StageFailed."""
        params = {"db": database, "user": db.user, "authdb": db.options.get("auth_database", "admin")}
        script = "var P = " + json.dumps(params) + ";\n" + AUTH_JS + body
        out = self.run_short(db, place, f"{shell} ({what})", self.shell_argv(db, shell, script))
        return out.decode("utf-8", "replace")

    def drop_database(self, db: DatabaseSpec, place: Place, name: str) -> bool:
        """Drop database ``name`` (if it exists) with mongosh or mongo, authenticated like the
        count check. Returns False, after a warning with the command to run by hand, on failure."""
        shell = "mongosh"
        try:
            shell = self.find_shell(db, place)
            out = self.run_script(db, place, shell, name, DROP_JS, "drop database")
            if not any(line.strip() == "LEMON-DROP-END" for line in out.splitlines()):
                raise RunFailed(f"{shell} did not confirm the drop")
        except ToolError as exc:
            by_hand = self.shell_argv(db, shell, f"db.getSiblingDB({json.dumps(name)}).dropDatabase()")
            if db.user:
                auth = db.options.get("auth_database", "admin")
                by_hand[1:1] = ["--username", db.user, "--authenticationDatabase", auth, "--password"]
            where = f" in container {db.container}" if db.container else ""
            log.warning(
                "%s: could not drop database %s (%s); it is left behind: drop it by hand%s: %s",
                db.name,
                name,
                exc,
                where,
                shlex.join(by_hand),
            )
            return False
        return True

    def count_documents(self, db: DatabaseSpec, place: Place, shell: str, database: str) -> dict[str, int]:
        """Documents per collection of ``database``, counted by mongosh or mongo."""
        try:
            out = self.run_script(db, place, shell, database, COUNT_JS, "count documents")
        except StageFailed as exc:
            raise RunFailed(f"could not count the restored documents: {exc}") from None
        found: dict[str, int] = {}
        ended = False
        for line in out.splitlines():
            if line.startswith("LEMON-COUNT\t"):
                _, name, count = line.split("\t")
                found[json.loads(name)] = int(count)
            elif line.strip() == "LEMON-COUNT-END":
                ended = True
        if not ended:
            raise RunFailed(f"{shell} did not finish counting the restored documents")
        return found
