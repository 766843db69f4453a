"""PostgreSQL: pg_dump (plain SQL or custom format), verification by reading the whole dump back
(end marker, every COPY block closed, rows counted per table), and a restore that never leaves
the target destroyed: restore into a new database, check it, then swap names in one transaction.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from lib.config import DatabaseSpec
from lib.engines import pgdatabase, register
from lib.engines.base import Engine, RestoreRequest
from lib.engines.pgdump import unfield
from lib.engines.pgload import LoadWatch
from lib.engines.pgsplit import Router, Session, SqlRouter
from lib.errors import EnvironmentProblem, InputError, RunFailed, StageFailed, ToolError, VerificationFailed
from lib.exec import Place
from lib.store import utcnow
from lib.stream import Background, PipelineResult, Stage, TailSink, Tap, run_pipeline, run_tapped

END_MARKER = "-- PostgreSQL database dump complete"
log = logging.getLogger("backup")
# The dump check stage: lib/engines/pgdump.py run isolated (-I: no site packages, no environment
# variables, no current directory on the path), reading the dump on stdin.
READER = Path(__file__).resolve().parent / "pgdump.py"
LOCK_QUERY_RE = re.compile(r"LOCK TABLE (\S+) IN ")

# The restored database's regular and partitioned tables and materialized views, one line each: hex-encoded (so no
# character in a name can confuse the parsing) quote_ident form, every-part-quoted form, and the
# bare name for tables in schema public (empty otherwise), separated by '|'; then 'x' when the
# table has an expression index (whose statistics only an ANALYZE after the index build gathers).
LIST_TABLES_SQL = r"""
SELECT encode(convert_to(quote_ident(n.nspname) || '.' || quote_ident(c.relname), 'UTF8'), 'hex')
    || '|' || encode(convert_to('"' || replace(n.nspname, '"', '""') || '"."'
                                || replace(c.relname, '"', '""') || '"', 'UTF8'), 'hex')
    || '|' || CASE WHEN n.nspname = 'public' THEN encode(convert_to(quote_ident(c.relname), 'UTF8'), 'hex') ELSE '' END
    || '|' || CASE WHEN EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indexprs IS NOT NULL)
                   THEN 'x' ELSE '' END
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'm')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname !~ '^pg_(toast|temp_)';
"""


def quote_ident(name: str) -> str:
    """SQL identifier quoting."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _cat() -> Stage:
    """A first stage for a stream with no decoding to do (an unencrypted, uncompressed file)."""
    return Stage("cat", ["cat"])


@register
class Postgres(Engine):
    name = "postgres"
    host_binaries = ("pg_dump", "psql")
    loads_into_scratch = True  # restore -> scratch database -> checks -> swap
    local_server_drills = True
    file_markers = (".sql", ".dump")

    def reserved_databases(self, db: DatabaseSpec) -> tuple[set[str], set[str]]:
        maint = db.options.get("maintenance_database", "postgres")
        return {"template0"}, {"postgres", "template0", "template1", maint}

    # -- where and how to connect -------------------------------------------------------------
    def place(self, db: DatabaseSpec, env: Mapping[str, str]) -> Place:
        password = db.password(env)
        secrets = {"PGPASSWORD": password} if password else {}
        return Place(container=db.container, secrets=secrets)

    def conn_args(self, db: DatabaseSpec, dbname: str) -> list[str]:
        """Connection flags (never a password) for dbname."""
        args = []
        if db.host and not db.container:
            args += ["-h", db.host]
        if db.port:
            args += ["-p", str(db.port)]
        if db.user:
            args += ["-U", db.user]
        args.append(f"--dbname={dbname}")
        return args

    def psql(self, db: DatabaseSpec, place: Place, dbname: str, sql: str, stage: str = "psql") -> str:
        """Run one SQL script (stdin, stops at the first error) and return unaligned tuples-only output."""
        command = ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", *self.conn_args(db, dbname)]
        return place.run(command, stage, input=sql.encode()).decode()

    # -- backup ------------------------------------------------------------------------------
    def fmt(self, db: DatabaseSpec) -> str:
        return db.options.get("format", "plain")

    def suffix(self, db: DatabaseSpec) -> str:
        return ".dump" if self.fmt(db) == "custom" else ".sql"

    def record_fields(self, db: DatabaseSpec) -> dict[str, Any]:
        return {"dump_format": self.fmt(db)}

    def compression(self, db: DatabaseSpec) -> str | None:
        return None if self.fmt(db) == "custom" else db.options.get("compression", "gzip")

    def preflight(self, db: DatabaseSpec, place: Place) -> None:
        place.check(self.host_binaries)

    def capture(self, db: DatabaseSpec, place: Place) -> dict[str, Any]:
        """The database's own properties (pgdatabase.CAPTURE_SQL), read in the backup run and
        stored in the record as ``database_properties``."""
        maint = db.options.get("maintenance_database", "postgres")
        out = self.psql(db, place, maint, pgdatabase.capture_sql(db.database), "psql (read database properties)")
        props = pgdatabase.parse(out)
        return {"database_properties": props} if props else {}

    def dump_stages(self, db: DatabaseSpec, place: Place) -> list[Stage]:
        # Owners and privileges are kept (as the old scripts' dumps did); a restore onto a server
        # without the roles leaves them out with --no-owner / --no-privileges. A table locked by
        # another session fails the dump after lock_wait_timeout seconds, never hangs it.
        timeout_ms = max(1, round(float(db.options.get("lock_wait_timeout", 60)) * 1000))
        command = ["pg_dump", f"--lock-wait-timeout={timeout_ms}"]
        if self.fmt(db) == "custom":
            command += ["-Fc"]
            if db.options.get("compression_level"):
                command += [f"-Z{min(db.options['compression_level'], 9)}"]
        command += list(db.options.get("dump_args", [])) + self.conn_args(db, db.database)
        return [Stage("pg_dump", place.argv(command), env=place.env())]

    def explain_dump_failure(self, db: DatabaseSpec, cause: Any) -> None:
        """pg_dump gave up waiting for a table lock (--lock-wait-timeout): name the table and the
        setting (StageFailed); else nothing."""
        if cause is None or "statement timeout" not in cause.stderr:
            return
        match = LOCK_QUERY_RE.search(cause.stderr)
        if match is None:
            return
        seconds = float(db.options.get("lock_wait_timeout", 60))
        raise StageFailed(
            cause.name,
            f"table {match[1]} stayed locked by another session for lock_wait_timeout ({seconds:g}s)",
            "find the holder in pg_locks/pg_stat_activity and end it, or raise lock_wait_timeout in backup.yml",
        )

    # -- verification ------------------------------------------------------------------------
    def inspect_stages(self, db: DatabaseSpec, place: Place | None) -> list[Stage]:
        stages = []
        if self.fmt(db) == "custom":
            # Prefer the host's pg_restore; else the one next to the server.
            if shutil.which("pg_restore") or place is None or not place.container:
                stages.append(Stage("pg_restore (read back)", ["pg_restore", "-f", "-"]))
            else:
                stages.append(Stage("pg_restore (read back)", place.argv(["pg_restore", "-f", "-"]), env=place.env()))
        stages.append(Stage("dump check", [sys.executable, "-I", str(READER)]))
        return stages

    def verify_checks(self, db: DatabaseSpec, meta: Mapping[str, Any] | None = None) -> list[str]:
        """The checks done; ``row-counts`` only when the dump held table data that was counted
        (COPY blocks or INSERT statements), else ``no-table-data``: a check that counted nothing
        is not reported as passed."""
        counted = (meta or {}).get("row_counts", "copy")
        checks = ["dump-complete", "copy-blocks-closed", "psql-meta-commands"]
        checks.append("no-table-data" if counted == "none" else "row-counts")
        return (["pg_restore-readable"] + checks) if self.fmt(db) == "custom" else checks

    def check_summary(self, db: DatabaseSpec, summary: bytes) -> dict[str, Any]:
        """Judge the dump reader's summary (pgdump.DumpReader.summary). Raises VerificationFailed
        for a truncated or unfinished dump, or one holding what pg_dump never writes."""
        tables: dict[str, int] = {}
        inserted: dict[str, int] = {}
        roles: dict[str, list[str]] = {}
        version = None
        end = None
        expected = None
        for line in summary.decode("utf-8", "replace").splitlines():
            kind, _, rest = line.partition("\t")
            if kind in ("T", "I"):
                table, _, rows = rest.rpartition("\t")
                counts = tables if kind == "T" else inserted
                counts[unfield(table)] = counts.get(unfield(table), 0) + int(rows)
            elif kind == "R":
                category, _, role = rest.partition("\t")
                roles.setdefault(category, []).append(unfield(role))
            elif kind == "V":
                version = unfield(rest)
            elif kind == "N":
                expected = int(rest.split("\t")[0])
            elif kind == "BAD":
                raise VerificationFailed(f"not a pg_dump file: {unfield(rest)}")
            elif kind == "OPEN":
                raise VerificationFailed(f"dump is truncated: the data of table {unfield(rest)} never ends")
            elif kind == "END":
                end = rest
        if end is None:
            raise VerificationFailed("dump check produced no result; the dump stream was empty")
        if end != "1":
            raise VerificationFailed(f"dump is incomplete: the '{END_MARKER}' marker is missing at its end")
        if expected is not None and expected != len(tables) + len(inserted):
            raise VerificationFailed("the dump check's summary was cut short; its tables cannot all be checked")
        kinds = [name for name, found in (("copy", tables), ("insert", inserted)) if found]
        for table, rows in inserted.items():
            tables[table] = tables.get(table, 0) + rows
        meta: dict[str, Any] = {"tables": tables, "server_version": version, "row_counts": "+".join(kinds) or "none"}
        if inserted:
            meta["inserted_tables"] = sorted(inserted)
        if roles:
            meta["roles"] = {category: sorted(names) for category, names in roles.items()}
        return meta

    # -- restore -----------------------------------------------------------------------------
    def replace_note(self, drop_previous: bool) -> str:
        if drop_previous:
            return " (the current one is DROPPED afterwards)"
        return " (the current one is kept as a *_pre_restore_* copy)"

    def restore(self, request: RestoreRequest) -> dict[str, Any]:
        db, place, log = request.db, request.place, request.log
        maint = db.options.get("maintenance_database", "postgres")
        stamp = utcnow().strftime("%Y%m%d_%H%M%S")
        target = request.target
        temp = self.derived_name(target, f"_restoring_{stamp}")
        previous = self.derived_name(target, f"_pre_restore_{stamp}")
        current = pgdatabase.parse(self.psql(db, place, maint, pgdatabase.capture_sql(target), "psql (look up target)"))
        exists = current is not None
        # The backed-up database's own properties (owner, locale, settings, privileges...); a
        # backup without them (older records, the old scripts' files) keeps the target's.
        props = pgdatabase.checked(request.record.get("database_properties")) or current
        self._check_roles(request, props)  # before anything is touched
        options = f" {pgdatabase.create_options(props, request.no_owner)}" if props else ""
        log.info("restoring into temporary database %s", temp)
        try:
            self.psql(
                db,
                place,
                maint,
                f"CREATE DATABASE {quote_ident(temp)} TEMPLATE template0{options};",
                "psql (create database)",
            )
        except StageFailed as exc:
            if "permission denied to create database" not in str(exc):
                raise
            raise self._no_createdb(db) from None
        started = time.monotonic()
        try:
            watch = self._load(request, temp)
            counts = self._check_restored(request, temp, watch)
            if props:  # settings, limits and privileges last: they could get in the load's way
                sql = pgdatabase.apply_sql(props, temp, request.no_owner, request.no_privileges)
                if sql:
                    self.psql(db, place, maint, sql, "psql (database properties)")
        except BaseException:
            log.error("restore failed; dropping temporary database %s, %s is untouched", temp, target)
            self._drop(db, place, maint, temp)
            raise
        seconds = time.monotonic() - started
        if exists:
            self._swap(db, place, maint, target, temp, previous, log)
            if request.drop_previous:
                self._drop(db, place, maint, previous)
                log.info("dropped previous database %s (--drop-previous)", previous)
            else:
                log.info("previous database kept as %s (drop it when satisfied, or use --drop-previous)", previous)
        else:
            self.psql(
                db,
                place,
                maint,
                f"ALTER DATABASE {quote_ident(temp)} RENAME TO {quote_ident(target)};",
                "psql (rename)",
            )
        return {
            "target": target,
            "previous": previous if exists and not request.drop_previous else None,
            "tables": len(counts),
            "rows": sum(counts.values()),
            "seconds": round(seconds, 3),
        }

    @staticmethod
    def _no_createdb(db: DatabaseSpec) -> EnvironmentProblem:
        who = db.user or "the connecting role"
        return EnvironmentProblem(
            f"role {who} may not create databases, and a restore loads into a new scratch database first: "
            f"as a superuser, ALTER ROLE {quote_ident(who) if db.user else who} CREATEDB; (nothing was touched)"
        )

    def check_can_restore(self, db: DatabaseSpec, place: Place) -> None:
        """Before work that comes ahead of a restore (a point-in-time replay): the connecting role
        may create databases (the scratch database), else the EnvironmentProblem the restore would
        end in. Raises StageFailed when the server cannot be asked."""
        maint = db.options.get("maintenance_database", "postgres")
        sql = "SELECT rolcreatedb OR rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user;"
        if self.psql(db, place, maint, sql, "psql (look up the role)").strip() != "t":
            raise self._no_createdb(db)

    def _check_roles(self, request: RestoreRequest, props: Mapping[str, Any] | None) -> None:
        """Roles the backup needs (object owners, grantees, the database's owner and settings) that
        this server lacks: one InputError naming them and the flag that leaves them out."""
        needed: dict[str, set[str]] = {"owner": set(), "acl": set(), "other": set()}
        recorded = request.record.get("engine_meta", {}).get("roles", {})
        for category, names in recorded.items():
            needed.setdefault(category, set()).update(str(n) for n in names)
        for category, names in (pgdatabase.roles(props) if props else {}).items():
            needed[category].update(names)
        if request.no_owner:
            needed["owner"] = set()
        if request.no_privileges:
            needed["acl"] = set()
        wanted = sorted(set().union(*needed.values()))
        if not wanted:
            return
        listed = ", ".join(quote_literal(name) for name in wanted)
        maint = request.db.options.get("maintenance_database", "postgres")
        out = self.psql(
            request.db,
            request.place,
            maint,
            f"SELECT encode(convert_to(rolname, 'UTF8'), 'hex') FROM pg_catalog.pg_roles WHERE rolname IN ({listed});",
            "psql (look up roles)",
        )
        present = {bytes.fromhex(line).decode() for line in out.split()}
        missing = {category: sorted(names - present) for category, names in needed.items() if names - present}
        if not missing:
            return
        if request.create_roles:
            names = sorted(set().union(*missing.values()))
            sql = "".join(f"CREATE ROLE {quote_ident(name)} NOLOGIN;\n" for name in names)
            self.psql(request.db, request.place, maint, sql, "psql (create roles)")
            request.log.info("created the role(s) the backup needs on this throwaway server: %s", ", ".join(names))
            return
        parts, flags = [], []
        for category, label, flag in (
            ("owner", "owners", "--no-owner"),
            ("acl", "privileges", "--no-privileges"),
            ("other", "policies or settings", None),
        ):
            if missing.get(category):
                parts.append(f"{label}: {', '.join(missing[category])}")
                if flag:
                    flags.append(flag)
        how = "create them first" + (f", or restore with {' '.join(flags)}" if flags else "")
        raise InputError(f"the backup needs roles this server lacks ({'; '.join(parts)}); {how}; nothing was touched")

    @staticmethod
    def derived_name(target: str, suffix: str) -> str:
        """target + suffix within PostgreSQL's 63-byte identifier limit, cutting the target, never the suffix."""
        room = 63 - len(suffix.encode())
        head = target.encode()[:room].decode("utf-8", "ignore")
        return head + suffix

    def _load(self, request: RestoreRequest, temp: str) -> LoadWatch | None:
        """Load the dump into ``temp``. With ``request.gate`` the decoded stream is also tapped into
        ``request.verify_stages`` and the gate judges the file before any load error is raised (a
        damaged file explains a failed load best). A plain-SQL load is followed as it runs
        (lib/engines/pgload.py): returns its LoadWatch, or None. Raises StageFailed or the gate's
        error."""
        db = request.db
        # Index builds dominate a restore's tail; more memory for them (this session only) is the
        # cheapest speed-up there is (measured: docs/benchmarks.md). The load commits table by
        # table without waiting for the WAL flush: the scratch database is dropped if anything
        # fails, and the swap's own (synchronous) commit flushes everything before it.
        memory = db.options.get("restore_maintenance_work_mem", "256MB")
        settings = f"-c maintenance_work_mem={memory} -c synchronous_commit=off"
        options = " ".join(filter(None, [os.environ.get("PGOPTIONS", ""), settings]))
        place = replace(request.place, secrets={**request.place.secrets, "PGOPTIONS": options})
        conn = self.conn_args(db, temp)
        fmt = request.record.get("dump_format") or ("custom" if ".dump" in request.source.name else "plain")
        if fmt == "custom":
            jobs = int(db.options.get("restore_jobs", 2))
            base = ["pg_restore", "--exit-on-error", *conn]
            base += ["--no-owner"] if request.no_owner else []
            base += ["--no-privileges"] if request.no_privileges else []
            if request.source_is_raw and not place.container and jobs > 1:
                # pg_restore --jobs reads the file itself: verify it alongside with a read of its own
                verification = Background(lambda: request.gate(None, None, True)) if request.gate else None
                loader = Stage("pg_restore", [*base, f"--jobs={jobs}", str(request.source)], env=place.env())
                result = run_pipeline([loader], TailSink(4096))
                if verification is not None:
                    verification.result()
                result.raise_for_status()
                return None
            loader = Stage("pg_restore", place.argv(base), env=place.env())
            stages = [*request.decode, loader]
            if request.gate is None or not request.verify_stages:
                run_pipeline(stages, TailSink(4096), source=request.source).raise_for_status()
                return None
            tap = Tap(request.verify_stages, name="tee (verify)", suffix=" (verify)")
            result, branch = run_tapped(stages, len(request.decode), tap, TailSink(4096), source=request.source)
            watch = None
        else:
            # Not one transaction: each table's COPY commits, so a second session can ANALYZE it
            # while the next one loads (pgload.LoadWatch), and the index builds and foreign-key
            # checks run in parallel sessions (pgsplit.SqlRouter, restore_jobs of them).
            analyzer = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-o", "/dev/null", *conn]
            watch = LoadWatch(lambda: Session(place.argv(analyzer), place.env()))
            router = SqlRouter(
                Router(
                    psql=lambda flags: place.argv(["psql", "-X", *flags, "-v", "ON_ERROR_STOP=1", *conn]),
                    env=place.env(),
                    jobs=int(db.options.get("restore_jobs", 2)),
                    on_loaded=watch.on_loaded,
                    on_block=watch.on_block,
                    rows=watch.rows_by_table,
                    no_owner=request.no_owner,
                    no_privileges=request.no_privileges,
                )
            )
            # The router reads the stream with the dump reader (pgdump.DumpReader): it does the dump
            # check itself, so no second reader is needed.
            try:
                result = run_pipeline(request.decode or [_cat()], router, source=request.source)
            finally:
                analyzed = watch.finish()
            if request.gate is None:
                result.raise_for_status()
                router.raise_failure()
                return None
            if not analyzed:
                log.info("%s: the ANALYZE session during the load failed; analyzing after the load", db.name)
                watch.analyzed.clear()
            if router.skipped:
                log.info(
                    "%s: left out %d ownership/privilege statement(s) (--no-owner/--no-privileges)",
                    db.name,
                    router.skipped,
                )
            if router.split_blocks:
                log.info("%s: %d large table(s) loaded by two sessions at once", db.name, len(router.split_blocks))
            if router.parallel_items:
                log.info(
                    "%s: %d index builds and foreign-key checks ran in parallel sessions",
                    db.name,
                    router.parallel_items,
                )
            # The router reads the whole stream even after a failed load, so the file is always
            # judged in full: a damaged file explains a failed load best.
            request.gate(result, PipelineResult(stages=[], tail=router.summary()), True)
            result.raise_for_status()
            router.raise_failure()
            return watch
        loaded = next(s for s in result.stages if s.name == loader.name)
        request.gate(result, branch, loaded.returncode == 0)
        result.raise_for_status()
        return watch

    def _check_restored(self, request: RestoreRequest, temp: str, watch: LoadWatch | None) -> dict[str, int]:
        """Compare per-table row counts with those recorded at backup time, and ANALYZE what the
        load did not already analyze (every table, without a ``watch``; else tables it missed
        and those with expression indexes).

        Row counts come from the load's own COPY results when it was followed (``watch``: the
        server's count of the rows it took, block by block, against the rows in the file), else
        from count(*) queries. The record's table names are only compared with the restored
        database's own list of tables, never put into SQL: queries are built from names that
        came from the database itself (so a tampered record cannot inject SQL). Raises RunFailed
        naming recorded tables that are missing and tables whose counts differ."""
        db, place = request.db, request.place
        expected: dict[str, int] = dict(request.record.get("engine_meta", {}).get("tables", {}))
        present, with_expressions = self._tables(db, place, temp)
        missing = sorted(t for t in expected if t not in present)
        if missing:
            raise RunFailed(
                "restored database lacks tables the backup recorded: "
                + ", ".join(missing[:10])
                + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
            )
        loaded: dict[str, int] = {}
        if watch is not None:
            problems = watch.mismatches()
            if problems:
                raise RunFailed("the server loaded other row counts than the file holds: " + "; ".join(problems[:5]))
            loaded = {t: n for t, n in watch.rows_by_table().items() if t in expected}
            done = {present[t] for t in watch.analyzed if t in present}
            todo = [t for t in sorted(set(present.values())) if t not in done or t in with_expressions]
        else:
            todo = sorted(set(present.values()))
        # tables whose rows the load did not report (INSERT dumps, pg_restore): count them
        names = sorted(t for t in expected if t not in loaded)
        # ONLY: a table's own rows, not those of tables that inherit from it
        counting = [f"SELECT {i}, count(*) FROM ONLY {present[t]}" for i, t in enumerate(names)]
        count_sql = "\nUNION ALL\n".join(counting) + ";\n" if counting else ""
        sizes = {present[t]: n for t, n in expected.items()}
        out = self._analyze(db, place, temp, todo, sizes, count_sql)
        found = dict(loaded)
        for line in out.splitlines():
            index, _, rows = line.partition("|")
            if rows:
                found[names[int(index)]] = int(rows)
        wrong = [f"{t}: {found.get(t)} rows, expected {n}" for t, n in expected.items() if found.get(t) != n]
        if wrong:
            raise RunFailed("restored row counts differ from the backup's record: " + "; ".join(wrong[:5]))
        return found

    def _analyze(
        self, db: DatabaseSpec, place: Place, dbname: str, tables: list[str], sizes: dict[str, int], extra: str = ""
    ) -> str:
        """ANALYZE ``tables`` (quote_ident forms read from the database) in two sessions at once,
        split by size, the second also running ``extra``; returns the second session's output."""
        halves: list[list[str]] = [[], []]
        loads = [0, 0]
        for table in sorted(tables, key=lambda t: -sizes.get(t, 0)):
            side = loads.index(min(loads))
            halves[side].append(table)
            loads[side] += sizes.get(table, 0) + 1
        scripts = ["".join(f"ANALYZE {t};\n" for t in half) for half in halves]
        scripts[1] += extra
        if not scripts[0]:
            scripts.reverse()
        runs = [script for script in scripts if script]
        if not runs:
            return ""
        with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
            futures = [
                pool.submit(self.psql, db, place, dbname, script, "psql (analyze, count rows)") for script in runs
            ]
            outputs = [future.result() for future in futures]
        return outputs[-1] if extra else ""

    def _tables(self, db: DatabaseSpec, place: Place, dbname: str) -> tuple[dict[str, str], set[str]]:
        """The regular and partitioned tables of ``dbname``, read from the database itself: every
        way a dump may name one ('schema.table' quoted as pg_dump does, every part quoted as with
        --quote-all-identifiers, and a bare name for tables in public, as old pg_dump versions
        wrote) -> its quote_ident form ``schema.table``; and the tables (quote_ident forms) that
        have an expression index."""
        tables: dict[str, str] = {}
        with_expressions: set[str] = set()
        for line in self.psql(db, place, dbname, LIST_TABLES_SQL, "psql (list tables)").split():
            *parts, flag = line.split("|")
            forms = [bytes.fromhex(part).decode("utf-8") for part in parts]
            for form in forms:
                if form:
                    tables.setdefault(form, forms[0])
            if flag == "x":
                with_expressions.add(forms[0])
        return tables, with_expressions

    def _swap(self, db: DatabaseSpec, place: Place, maint: str, target: str, temp: str, previous: str, log) -> None:
        """Close target to new sessions, terminate its sessions, then in one transaction rename
        target->previous, reopen it and rename temp->target. A crash (even SIGKILL) can leave one
        state only: target closed beside a loaded ``temp``; every later run reopens it
        (lib/lifecycle.py, ``invoke doctor``)."""
        t, p, n = quote_ident(target), quote_ident(previous), quote_ident(temp)
        self.psql(db, place, maint, f"ALTER DATABASE {t} WITH ALLOW_CONNECTIONS false;", "psql (block connections)")
        try:
            for attempt in range(20):
                self.psql(
                    db,
                    place,
                    maint,
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    f"WHERE datname = {quote_literal(target)} AND pid <> pg_backend_pid();",
                    "psql (terminate sessions)",
                )
                try:
                    self.psql(
                        db,
                        place,
                        maint,
                        f"BEGIN; ALTER DATABASE {t} RENAME TO {p}; ALTER DATABASE {p} WITH ALLOW_CONNECTIONS true; "
                        f"ALTER DATABASE {n} RENAME TO {t}; COMMIT;",
                        "psql (swap databases)",
                    )
                    break
                except StageFailed as exc:
                    if "being accessed by other users" not in exc.detail or attempt == 19:
                        raise
                    time.sleep(0.25)
        except BaseException:
            self.psql(db, place, maint, f"ALTER DATABASE {t} WITH ALLOW_CONNECTIONS true;", "psql (unblock)")
            self._drop(db, place, maint, temp)
            raise

    def drop_database(self, db: DatabaseSpec, place: Place, name: str) -> bool:
        """Drop ``name`` (if it exists) via the maintenance database. Returns False (after a
        warning with the command to run by hand) when that failed."""
        return self._drop(db, place, db.options.get("maintenance_database", "postgres"), name)

    def _drop(self, db: DatabaseSpec, place: Place, maint: str, name: str) -> bool:
        """DROP DATABASE IF EXISTS ``name``. Never raises: returns False and logs a warning naming
        the exact command for the operator when the drop failed (the database is left behind)."""
        sql = f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE);"
        try:
            self.psql(db, place, maint, sql, "psql (drop)")
        except ToolError as exc:
            log.warning(
                "%s: could not drop database %s (%s); it is left behind: drop it by hand, connected to database %s: %s",
                db.name,
                name,
                exc,
                maint,
                sql,
            )
            return False
        return True

    # -- leftovers of killed runs (lib/lifecycle.py) -------------------------------------------
    def maintenance_database(self, db: DatabaseSpec) -> str:
        return db.options.get("maintenance_database", "postgres")

    def server_databases(self, db: DatabaseSpec, place: Place) -> list[tuple[str, bool, int]]:
        """Every non-template database on ``db``'s server: (name, accepts connections, sessions
        connected other than ours). Raises StageFailed when the server cannot be asked."""
        sql = (
            "SELECT encode(convert_to(d.datname, 'UTF8'), 'hex') || '|' || d.datallowconn::int || '|' || "
            "(SELECT count(*) FROM pg_stat_activity a WHERE a.datname = d.datname AND a.pid <> pg_backend_pid()) "
            "FROM pg_database d WHERE NOT d.datistemplate;"
        )
        rows = []
        for line in self.psql(db, place, self.maintenance_database(db), sql, "psql (list databases)").split():
            name, allow, sessions = line.split("|")
            rows.append((bytes.fromhex(name).decode("utf-8"), allow == "1", int(sessions)))
        return rows

    def reopen(self, db: DatabaseSpec, place: Place, name: str) -> None:
        """ALTER DATABASE ``name`` WITH ALLOW_CONNECTIONS true. Raises StageFailed."""
        sql = f"ALTER DATABASE {quote_ident(name)} WITH ALLOW_CONNECTIONS true;"
        self.psql(db, place, self.maintenance_database(db), sql, "psql (reopen database)")

    def manual_command(self, db: DatabaseSpec, place: Place, sql: str) -> str:
        """The shell command an operator runs to execute ``sql`` on the maintenance database."""
        argv = ["psql", "-X", *self.conn_args(db, self.maintenance_database(db)), "-c", sql]
        return shlex.join(place.argv(argv, interactive=False))
