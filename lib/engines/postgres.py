"""PostgreSQL: pg_dump (plain SQL or custom format), verification by reading the whole dump back
(end marker, every COPY block closed, rows counted per table), and a restore that never leaves
the target destroyed: restore into a new database, check it, then swap names in one transaction.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from lib.config import DatabaseSpec
from lib.engines import register
from lib.engines.base import Engine, RestoreRequest
from lib.errors import RunFailed, StageFailed, ToolError, VerificationFailed
from lib.exec import Place, child_env, require_binary
from lib.store import utcnow
from lib.stream import Background, Stage, TailSink, Tap, run_pipeline, run_tapped

END_MARKER = "-- PostgreSQL database dump complete"
log = logging.getLogger("backup")

# Reads a plain SQL dump on stdin; prints the server version, one "T<tab>table<tab>rows" line
# per COPY block, and a closing line saying whether the dump ended properly. COPY text format
# escapes newlines, so one line is one row.
INSPECT_AWK = r"""
BEGIN { incopy = 0; complete = 0 }
incopy { if ($0 == "\\.") { print "T\t" tbl "\t" n; incopy = 0 } else n++; next }
/^COPY .* FROM stdin;$/ {
  tbl = $0; sub(/^COPY /, "", tbl); sub(/ \(.*\) FROM stdin;$/, "", tbl); sub(/ FROM stdin;$/, "", tbl)
  n = 0; incopy = 1; complete = 0; next
}
/^-- Dumped from database version / { v = $0; sub(/^-- Dumped from database version /, "", v); print "V\t" v }
$0 == "-- PostgreSQL database dump complete" { complete = 1; next }
complete && ($0 == "" || $0 == "--" || $0 ~ /^\\unrestrict /) { next }
{ complete = 0 }
END { if (incopy) print "OPEN\t" tbl; else print "END\t" complete }
"""


# The restored database's regular and partitioned tables, one line each: hex-encoded (so no
# character in a name can confuse the parsing) quote_ident form, every-part-quoted form, and the
# bare name for tables in schema public (empty otherwise), separated by '|'.
LIST_TABLES_SQL = r"""
SELECT encode(convert_to(quote_ident(n.nspname) || '.' || quote_ident(c.relname), 'UTF8'), 'hex')
    || '|' || encode(convert_to('"' || replace(n.nspname, '"', '""') || '"."'
                                || replace(c.relname, '"', '""') || '"', 'UTF8'), 'hex')
    || '|' || CASE WHEN n.nspname = 'public' THEN encode(convert_to(quote_ident(c.relname), 'UTF8'), 'hex') ELSE '' END
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname !~ '^pg_(toast|temp_)';
"""


def quote_ident(name: str) -> str:
    """SQL identifier quoting."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@register
class Postgres(Engine):
    name = "postgres"
    host_binaries = ("pg_dump", "psql")
    loads_into_scratch = True  # restore -> scratch database -> checks -> swap
    local_server_drills = True
    file_markers = (".sql", ".dump")

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
        require_binary("awk")  # verification always runs on this host

    def dump_stages(self, db: DatabaseSpec, place: Place) -> list[Stage]:
        command = ["pg_dump", "--no-owner", "--no-acl"]
        if self.fmt(db) == "custom":
            command += ["-Fc"]
            if db.options.get("compression_level"):
                command += [f"-Z{min(db.options['compression_level'], 9)}"]
        command += list(db.options.get("dump_args", [])) + self.conn_args(db, db.database)
        return [Stage("pg_dump", place.argv(command), env=place.env())]

    # -- verification ------------------------------------------------------------------------
    def inspect_stages(self, db: DatabaseSpec, place: Place | None) -> list[Stage]:
        stages = []
        if self.fmt(db) == "custom":
            # Prefer the host's pg_restore; else the one next to the server.
            if shutil.which("pg_restore") or place is None or not place.container:
                stages.append(Stage("pg_restore (read back)", ["pg_restore", "-f", "-"]))
            else:
                stages.append(Stage("pg_restore (read back)", place.argv(["pg_restore", "-f", "-"]), env=place.env()))
        # mawk in the C locale reads ~4x faster than gawk in a UTF-8 one; the script is byte-safe.
        awk = "mawk" if shutil.which("mawk") else "awk"
        stages.append(Stage("dump check (awk)", [awk, INSPECT_AWK], env=child_env({"LC_ALL": "C"})))
        return stages

    def verify_checks(self, db: DatabaseSpec) -> list[str]:
        checks = ["dump-complete", "copy-blocks-closed", "row-counts"]
        return (["pg_restore-readable"] + checks) if self.fmt(db) == "custom" else checks

    def check_summary(self, db: DatabaseSpec, summary: bytes) -> dict[str, Any]:
        tables: dict[str, int] = {}
        version = None
        end = None
        for line in summary.decode("utf-8", "replace").splitlines():
            kind, _, rest = line.partition("\t")
            if kind == "T":
                table, _, rows = rest.rpartition("\t")
                tables[table] = tables.get(table, 0) + int(rows)
            elif kind == "V":
                version = rest
            elif kind == "OPEN":
                raise VerificationFailed(f"dump is truncated: the data of table {rest} never ends")
            elif kind == "END":
                end = rest
        if end is None:
            raise VerificationFailed("dump check produced no result; the dump stream was empty")
        if end != "1":
            raise VerificationFailed(f"dump is incomplete: the '{END_MARKER}' marker is missing at its end")
        return {"tables": tables, "server_version": version}

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
        exists = (
            self.psql(
                db,
                place,
                maint,
                f"SELECT 1 FROM pg_database WHERE datname = {quote_literal(target)};",
                "psql (look up target)",
            ).strip()
            == "1"
        )
        template = ""
        if exists:
            row = self.psql(
                db,
                place,
                maint,
                "SELECT pg_encoding_to_char(encoding) || '|' || datcollate || '|' || datctype "
                f"FROM pg_database WHERE datname = {quote_literal(target)};",
                "psql (read target settings)",
            ).strip()
            encoding, collate, ctype = row.split("|")
            template = f" ENCODING {quote_literal(encoding)} LC_COLLATE {quote_literal(collate)} LC_CTYPE {quote_literal(ctype)}"
        log.info("restoring into temporary database %s", temp)
        self.psql(
            db,
            place,
            maint,
            f"CREATE DATABASE {quote_ident(temp)} TEMPLATE template0{template};",
            "psql (create database)",
        )
        started = time.monotonic()
        try:
            self._load(request, temp)
            counts = self._check_restored(request, temp)
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
    def derived_name(target: str, suffix: str) -> str:
        """target + suffix within PostgreSQL's 63-byte identifier limit, cutting the target, never the suffix."""
        room = 63 - len(suffix.encode())
        head = target.encode()[:room].decode("utf-8", "ignore")
        return head + suffix

    def _load(self, request: RestoreRequest, temp: str) -> None:
        """Load the dump into ``temp``. With ``request.gate`` the decoded stream is also tapped into
        ``request.verify_stages`` and the gate judges the file before any load error is raised (a
        damaged file explains a failed load best). Raises StageFailed or the gate's error."""
        db = request.db
        # Index builds dominate a restore's tail; more memory for them (this session only) is the
        # cheapest speed-up there is (measured: README "Benchmarks").
        memory = db.options.get("restore_maintenance_work_mem", "256MB")
        options = " ".join(filter(None, [os.environ.get("PGOPTIONS", ""), f"-c maintenance_work_mem={memory}"]))
        place = replace(request.place, secrets={**request.place.secrets, "PGOPTIONS": options})
        conn = self.conn_args(db, temp)
        if self.fmt(db) == "custom":
            jobs = int(db.options.get("restore_jobs", 2))
            base = ["pg_restore", "--exit-on-error", "--no-owner", "--no-acl", *conn]
            if request.source_is_raw and not place.container and jobs > 1:
                # pg_restore --jobs reads the file itself: verify it alongside with a read of its own
                verification = Background(lambda: request.gate(None, None, True)) if request.gate else None
                loader = Stage("pg_restore", [*base, f"--jobs={jobs}", str(request.source)], env=place.env())
                result = run_pipeline([loader], TailSink(4096))
                if verification is not None:
                    verification.result()
                result.raise_for_status()
                return
            loader = Stage("pg_restore", place.argv(base), env=place.env())
        else:
            command = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-o", "/dev/null", *conn]
            loader = Stage("psql (load)", place.argv(command), env=place.env())
        stages = [*request.decode, loader]
        if request.gate is None or not request.verify_stages:
            result = run_pipeline(stages, TailSink(4096), source=request.source)
            result.raise_for_status()
            return
        tap = Tap(request.verify_stages, name="tee (verify)", suffix=" (verify)")
        result, branch = run_tapped(stages, len(request.decode), tap, TailSink(4096), source=request.source)
        loaded = next(s for s in result.stages if s.name == loader.name)
        request.gate(result, branch, loaded.returncode == 0)
        result.raise_for_status()

    def _check_restored(self, request: RestoreRequest, temp: str) -> dict[str, int]:
        """ANALYZE, then compare per-table row counts with those recorded at backup time.

        The record's table names are only compared with the restored database's own list of
        tables, never put into SQL: the count query is built from names that came from the
        database itself (so a tampered record cannot inject SQL). Raises RunFailed naming
        recorded tables that are missing and tables whose counts differ."""
        db, place = request.db, request.place
        expected: dict[str, int] = dict(request.record.get("engine_meta", {}).get("tables", {}))
        present = self._tables(db, place, temp)
        missing = sorted(t for t in expected if t not in present)
        if missing:
            raise RunFailed(
                "restored database lacks tables the backup recorded: "
                + ", ".join(missing[:10])
                + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
            )
        # ANALYZE and the row counts in two sessions at once, tables split by recorded size.
        names = sorted(expected)
        sizes = {present[t]: n for t, n in expected.items()}
        halves: list[list[str]] = [[], []]
        loads = [0, 0]
        for table in sorted(set(present.values()), key=lambda t: -sizes.get(t, 0)):
            side = loads.index(min(loads))
            halves[side].append(table)
            loads[side] += sizes.get(table, 0) + 1
        scripts = [("".join(f"ANALYZE {t};\n" for t in half) or "SELECT 1 WHERE false;\n") for half in halves]
        counting = [f"SELECT {i}, count(*) FROM {present[t]}" for i, t in enumerate(names)]
        if counting:
            scripts[1] += "\nUNION ALL\n".join(counting) + ";\n"
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(self.psql, db, place, temp, script, "psql (analyze, count rows)") for script in scripts]
            out = [run.result() for run in runs][1]
        found = {}
        for line in out.splitlines():
            index, _, rows = line.partition("|")
            found[names[int(index)]] = int(rows)
        wrong = [f"{t}: {found.get(t)} rows, expected {n}" for t, n in expected.items() if found.get(t) != n]
        if wrong:
            raise RunFailed("restored row counts differ from the backup's record: " + "; ".join(wrong[:5]))
        return found

    def _tables(self, db: DatabaseSpec, place: Place, dbname: str) -> dict[str, str]:
        """The regular and partitioned tables of ``dbname``, read from the database itself: every
        way a dump may name one ('schema.table' quoted as pg_dump does, every part quoted as with
        --quote-all-identifiers, and a bare name for tables in public, as old pg_dump versions
        wrote) -> its quote_ident form ``schema.table``."""
        tables: dict[str, str] = {}
        for line in self.psql(db, place, dbname, LIST_TABLES_SQL, "psql (list tables)").split():
            forms = [bytes.fromhex(part).decode("utf-8") for part in line.split("|")]
            for form in forms:
                if form:
                    tables.setdefault(form, forms[0])
        return tables

    def _swap(self, db: DatabaseSpec, place: Place, maint: str, target: str, temp: str, previous: str, log) -> None:
        """Terminate sessions on target, then rename target->previous and temp->target atomically."""
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
                        f"BEGIN; ALTER DATABASE {t} RENAME TO {p}; ALTER DATABASE {n} RENAME TO {t}; COMMIT;",
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
        self.psql(db, place, maint, f"ALTER DATABASE {p} WITH ALLOW_CONNECTIONS true;", "psql (unblock previous)")

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
