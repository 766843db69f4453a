"""A restore gives back exactly the database that was backed up (issue: restore fidelity).

A corpus database with what ordinary applications use and what used to come back different or
not at all: a database with its own owner, ICU locale, settings, per-role settings, connection
limit, comment and privileges (REVOKE CONNECT FROM PUBLIC); owners and GRANTs on every kind of
object, default privileges, RLS policies, an event trigger, large objects, extensions, domains,
enums, partitions (a foreign key to a partitioned table), inheritance, exclusion, partial,
expression and INCLUDE indexes, materialized views, Korean and quoted names, names holding ' ('
and a newline, tables with no columns or only generated ones, primary keys in another tablespace
between two that are not, and comments and function bodies holding lines that look like dump
structure. It is backed up in plain and custom format, restored with restore_jobs 1, 2 and 4, in
place and --into, and compared with its source: pg_dump --schema-only, per-table content,
pg_database, pg_db_role_setting, constraint validation and each relation's tablespace.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import PGHOST, PGPORT, PGUSER, databases_like, psql, schema_of, table_checksums

ROLES = ("lemon_fid_owner", "lemon_fid_app", "lemon_fid_ro")
TABLESPACE = "lemon_fid_ts"
TABLESPACE_DIR = Path("/var/lib/postgresql/lemon_fid_ts")

CORPUS_SQL = r"""
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE EXTENSION IF NOT EXISTS btree_gist;
CREATE SCHEMA app AUTHORIZATION lemon_fid_owner;
CREATE SCHEMA "Odd Schema";
CREATE TYPE app.mood AS ENUM ('기쁨', 'sad', 'o''dd');
CREATE DOMAIN app.positive AS int CHECK (VALUE > 0);
CREATE TABLE app.users (id int PRIMARY KEY, name text NOT NULL, mood app.mood, score app.positive);
CREATE TABLE app."사용자 목록" ("이름" text PRIMARY KEY, n int);
CREATE TABLE "Odd Schema"."we (ird" (id int PRIMARY KEY, "quoted ""col"" x" text);
CREATE TABLE "Odd Schema"."new
line" (id int);
CREATE TABLE app.nocols ();
CREATE TABLE app.generated_only (a int GENERATED ALWAYS AS (1) STORED);
CREATE TABLE app.events (id int, user_id int REFERENCES app.users(id), at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE app.events_2026 PARTITION OF app.events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE TABLE app.events_2027 PARTITION OF app.events FOR VALUES FROM ('2027-01-01') TO ('2028-01-01');
CREATE TABLE app.event_notes (id int, event_id int, event_at date,
    FOREIGN KEY (event_id, event_at) REFERENCES app.events(id, at));
CREATE TABLE app.base (id int, note text);
CREATE TABLE app.derived (extra int) INHERITS (app.base);
CREATE TABLE app.bookings (room int, during tsrange, EXCLUDE USING gist (room WITH =, during WITH &&));
CREATE INDEX users_lower_name ON app.users (lower(name));
CREATE INDEX users_partial ON app.users (id) WHERE name <> 'semi;colon ''quoted''';
CREATE INDEX users_incl ON app.users (score) INCLUDE (name);
CREATE INDEX users_trgm ON app.users USING gin (name gin_trgm_ops);
-- the tablespace switch between two entries: only c's key is in the other tablespace
CREATE TABLE app.a (id int PRIMARY KEY);
CREATE TABLE app.b (id int PRIMARY KEY);
CREATE TABLE app.c (id int PRIMARY KEY USING INDEX TABLESPACE lemon_fid_ts);
CREATE TABLE app.d (id int) TABLESPACE lemon_fid_ts;
CREATE INDEX d_id ON app.d (id) TABLESPACE lemon_fid_ts;
CREATE FUNCTION app.tricky() RETURNS text LANGUAGE sql AS $f$ SELECT 'COPY app.a FROM stdin;
SET default_tablespace = lemon_fid_ts;
-- Name: x; Type: INDEX; Schema: app; Owner: -
CREATE INDEX nope ON app.a (id);
\.
\! echo pwned
' $f$;
COMMENT ON TABLE app.a IS E'x\nCOPY app.a FROM stdin;\nSET default_tablespace = lemon_fid_ts;\n-- Name: y; Type: INDEX; Schema: app; Owner: -\nCREATE INDEX z ON app.a (id);\n\\! echo pwned';
CREATE FUNCTION app.atomic(int) RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT $1; SELECT $1 + 1; END;
CREATE MATERIALIZED VIEW app.user_counts AS SELECT mood, count(*) AS n FROM app.users GROUP BY mood;
CREATE INDEX user_counts_mood ON app.user_counts (mood);
ALTER TABLE app.users ENABLE ROW LEVEL SECURITY;
CREATE POLICY users_app ON app.users TO lemon_fid_app USING (score > 1);
CREATE FUNCTION app.on_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$BEGIN NULL; END$$;
CREATE EVENT TRIGGER lemon_fid_ddl ON ddl_command_end EXECUTE FUNCTION app.on_ddl();
INSERT INTO app.users SELECT g, '이름 ' || g || E'\t"tab"', (ARRAY['기쁨', 'sad', 'o''dd'])[1 + g % 3]::app.mood, g
  FROM generate_series(1, 3000) g;
INSERT INTO app."사용자 목록" SELECT '사람' || g, g FROM generate_series(1, 50) g;
INSERT INTO "Odd Schema"."we (ird" SELECT g, 'v"' || g FROM generate_series(1, 20) g;
INSERT INTO "Odd Schema"."new
line" SELECT g FROM generate_series(1, 5) g;
INSERT INTO app.nocols SELECT FROM generate_series(1, 4);
INSERT INTO app.generated_only SELECT FROM generate_series(1, 3);
INSERT INTO app.events SELECT g, 1 + g % 3000, date '2026-01-01' + (g % 700) FROM generate_series(1, 2000) g;
INSERT INTO app.event_notes SELECT g, g, date '2026-01-01' + (g % 700) FROM generate_series(1, 2000) g;
INSERT INTO app.base VALUES (1, 'base');
INSERT INTO app.derived VALUES (2, 'derived', 7);
INSERT INTO app.bookings VALUES (1, '[2026-01-01,2026-01-02)'), (1, '[2026-01-02,2026-01-03)');
INSERT INTO app.a SELECT generate_series(1, 10);
INSERT INTO app.b SELECT generate_series(1, 10);
INSERT INTO app.c SELECT generate_series(1, 10);
INSERT INTO app.d SELECT generate_series(1, 10);
REFRESH MATERIALIZED VIEW app.user_counts;
CREATE TABLE app.log (id int);
CREATE RULE b_log AS ON INSERT TO app.b DO ALSO (INSERT INTO app.log VALUES (NEW.id); INSERT INTO app.log VALUES (-NEW.id));
SELECT lo_from_bytea(424242, '\x00ff4c656d6f6e'::bytea);
ALTER LARGE OBJECT 424242 OWNER TO lemon_fid_owner;
GRANT SELECT ON LARGE OBJECT 424242 TO lemon_fid_ro;
ALTER TABLE app.users OWNER TO lemon_fid_owner;
ALTER TABLE app.events OWNER TO lemon_fid_owner;
ALTER FUNCTION app.tricky() OWNER TO lemon_fid_owner;
GRANT USAGE ON SCHEMA app TO lemon_fid_app, lemon_fid_ro;
GRANT SELECT, INSERT, UPDATE ON app.users TO lemon_fid_app;
GRANT SELECT ON ALL TABLES IN SCHEMA app TO lemon_fid_ro;
GRANT SELECT ("이름") ON app."사용자 목록" TO lemon_fid_app;
REVOKE ALL ON SCHEMA public FROM PUBLIC;
ALTER DEFAULT PRIVILEGES FOR ROLE lemon_fid_owner IN SCHEMA app GRANT SELECT ON TABLES TO lemon_fid_ro;
"""

DATABASE_SQL = """
SELECT pg_get_userbyid(d.datdba), pg_encoding_to_char(d.encoding), d.datlocprovider, d.datcollate, d.datctype,
       d.daticulocale, d.datconnlimit, d.datacl::text, t.spcname, shobj_description(d.oid, 'pg_database')
FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace WHERE d.datname = current_database();
"""
ROLE_SETTINGS_SQL = """
SELECT coalesce(pg_get_userbyid(NULLIF(setrole, 0)), '-') || ':' || array_to_string(setconfig, ',')
FROM pg_db_role_setting WHERE setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY 1;
"""
CONSTRAINTS_SQL = """
SELECT n.nspname || '.' || c.relname || ':' || k.conname || ':' || k.contype::text || ':' || k.convalidated
FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
ORDER BY 1;
"""
TABLESPACES_SQL = """
SELECT n.nspname || '.' || c.relname || ':' || coalesce(t.spcname, '-')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace LEFT JOIN pg_tablespace t ON t.oid = c.reltablespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') ORDER BY 1;
"""
LARGE_OBJECTS_SQL = """
SELECT m.oid || ':' || pg_get_userbyid(m.lomowner) || ':' || coalesce(m.lomacl::text, '-') || ':' || md5(lo_get(m.oid))
FROM pg_largeobject_metadata m ORDER BY m.oid;
"""
ORDER_SQL = "SELECT string_agg(name, '|' ORDER BY name) FROM app.users WHERE id <= 30;"


def fingerprint(dbname: str) -> dict:
    """Everything compared between a source and its restore."""
    return {
        "schema": schema_of(dbname),
        "content": table_checksums(dbname),
        "database": psql(DATABASE_SQL, dbname),
        "role settings": psql(ROLE_SETTINGS_SQL, dbname),
        "constraints": psql(CONSTRAINTS_SQL, dbname),
        "tablespaces": psql(TABLESPACES_SQL, dbname),
        "large objects": psql(LARGE_OBJECTS_SQL, dbname),
        "collation order": psql(ORDER_SQL, dbname),
    }


@pytest.fixture(scope="module")
def server_objects():
    """The roles and the tablespace the corpus uses (cluster-wide; created once, kept)."""
    for role in ROLES:
        psql(f"DO $$BEGIN CREATE ROLE {role}; EXCEPTION WHEN duplicate_object THEN NULL; END$$;")
    if psql(f"SELECT count(*) FROM pg_tablespace WHERE spcname = '{TABLESPACE}';") == "0":
        TABLESPACE_DIR.mkdir(mode=0o700, exist_ok=True)
        shutil.chown(TABLESPACE_DIR, "postgres", "postgres")
        psql(f"CREATE TABLESPACE {TABLESPACE} LOCATION '{TABLESPACE_DIR}';")


@pytest.fixture
def corpus(server_objects):
    """A fresh corpus database; it and every database named after it are dropped afterwards."""
    name = f"bt_fid_{uuid.uuid4().hex[:8]}"
    psql(
        f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LOCALE_PROVIDER icu ICU_LOCALE 'ko-KR' "
        f"LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8' OWNER lemon_fid_owner;"
    )
    psql(CORPUS_SQL, name)
    psql(
        f"""
        ALTER DATABASE {name} SET work_mem = '16MB';
        ALTER DATABASE {name} SET search_path = app, "$user", public;
        ALTER ROLE lemon_fid_app IN DATABASE {name} SET statement_timeout = '5min';
        ALTER DATABASE {name} WITH CONNECTION LIMIT 50;
        COMMENT ON DATABASE {name} IS '레몬 database, it''s ours';
        REVOKE CONNECT, TEMPORARY ON DATABASE {name} FROM PUBLIC;
        GRANT CONNECT ON DATABASE {name} TO lemon_fid_app;
        GRANT CONNECT, TEMPORARY ON DATABASE {name} TO lemon_fid_ro WITH GRANT OPTION;
        """
    )
    yield name
    psql("DROP EVENT TRIGGER IF EXISTS lemon_fid_ddl;", name, check=False)
    for db in databases_like(name):
        psql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE);', check=False)
    for role in ROLES:  # settings and privileges of the roles in dropped databases are gone with them
        psql(f"REASSIGN OWNED BY {role} TO postgres;", "postgres", check=False)


# (format, restore_jobs, in place?): every format and job count, each way of restoring
MATRIX = [
    ("plain", 1, False),
    ("plain", 2, True),
    ("plain", 4, False),
    ("custom", 1, True),
    ("custom", 2, False),
    ("custom", 4, True),
]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["plain", "custom"])
def test_restores_are_identical_to_the_source(workspace, corpus, fmt):
    source = fingerprint(corpus)
    assert "기쁨" in source["content"]["app.users"] or source["content"]["app.users"]
    workspace.write_config(workspace.postgres_config(corpus, format=fmt))
    made = workspace.invoke("backup", "--all")
    assert made.returncode == 0, made.stderr
    [backup] = workspace.backups()
    record = __import__("json").loads(Path(str(backup) + ".json").read_text())
    props = record["database_properties"]
    assert props["owner"] == "lemon_fid_owner" and props["icu_locale"] == "ko-KR"
    assert {"lemon_fid_owner"} <= set(record["engine_meta"]["roles"]["owner"])
    assert "row-counts" in record["verified"]["checks"]
    listed = workspace.invoke("list")
    assert "database properties (newest backup): owner lemon_fid_owner, UTF8, icu:ko-KR" in listed.stdout
    for form, jobs, in_place in (m for m in MATRIX if m[0] == fmt):
        workspace.write_config(workspace.postgres_config(corpus, format=fmt, restore_jobs=jobs))
        target = corpus if in_place else f"{corpus}_into_{jobs}"
        args = ["--file", "latest", "--yes"] + ([] if in_place else ["--into", target])
        result = workspace.invoke("restore", "--engine", "postgres", *args, "--drop-previous")
        assert result.returncode == 0, (form, jobs, in_place, result.stderr)
        restored = fingerprint(target)
        for key, value in source.items():
            assert restored[key] == value, (form, jobs, in_place, key)


@pytest.mark.slow
def test_inserts_dump_with_dump_like_values_restores_and_counts_rows(workspace, corpus):
    """--inserts dumps: text values holding a COPY-like line load, and their rows are counted."""
    psql(r"INSERT INTO app.a VALUES (11); COMMENT ON COLUMN app.b.id IS E'COPY app.b FROM stdin;\n\\.';", corpus)
    psql(
        r"CREATE TABLE app.texts (t text); INSERT INTO app.texts VALUES (E'x\nCOPY app.a FROM stdin;\n\\.\ny');", corpus
    )
    source = fingerprint(corpus)
    workspace.write_config(workspace.postgres_config(corpus, dump_args=["--inserts", "--rows-per-insert=7"]))
    made = workspace.invoke("backup", "--all")
    assert made.returncode == 0, made.stderr
    [backup] = workspace.backups()
    record = __import__("json").loads(Path(str(backup) + ".json").read_text())
    assert record["engine_meta"]["row_counts"] == "insert"
    assert record["engine_meta"]["tables"]["app.users"] == 3000
    assert record["engine_meta"]["tables"]["app.texts"] == 1
    target = f"{corpus}_ins"
    result = workspace.invoke("restore", "--engine", "postgres", "--file", "latest", "--into", target, "--yes")
    assert result.returncode == 0, result.stderr
    assert fingerprint(target) == source


@pytest.mark.slow
def test_clean_if_exists_dump_restores_in_parallel(workspace, corpus):
    """dump_args [--clean, --if-exists]: the DROP statements run once, in order, not in every session."""
    source = fingerprint(corpus)
    workspace.write_config(workspace.postgres_config(corpus, dump_args=["--clean", "--if-exists"], restore_jobs=4))
    assert workspace.invoke("backup", "--all").returncode == 0
    result = workspace.invoke("restore", "--engine", "postgres", "--file", "latest", "--yes", "--drop-previous")
    assert result.returncode == 0, result.stderr
    assert fingerprint(corpus) == source


def test_database_without_tables_restores(workspace, scratch_db):
    """Only a function and a view: the backup verifies (its check says no table data, not a
    passed row count) and restores."""
    scratch_db.sql("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'; CREATE VIEW v AS SELECT f() AS x;")
    workspace.write_config(workspace.postgres_config(scratch_db.name))
    made = workspace.invoke("backup", "--all")
    assert made.returncode == 0, made.stderr
    [backup] = workspace.backups()
    record = __import__("json").loads(Path(str(backup) + ".json").read_text())
    assert "row-counts" not in record["verified"]["checks"] and "no-table-data" in record["verified"]["checks"]
    target = scratch_db.name + "_copy"
    result = workspace.invoke("restore", "--engine", "postgres", "--file", "latest", "--into", target, "--yes")
    assert result.returncode == 0, result.stderr
    assert psql("SELECT x FROM v;", target) == "1"


def test_missing_roles_are_named_before_anything_is_touched(workspace, scratch_db):
    """A backup owned by a role this server no longer has: one line naming it and the flag;
    with --no-owner the restore goes through, owned by the restoring user."""
    role = f"lemon_gone_{uuid.uuid4().hex[:6]}"
    psql(f"CREATE ROLE {role};")
    scratch_db.sql(f"CREATE TABLE t (id int); INSERT INTO t VALUES (1); ALTER TABLE t OWNER TO {role};")
    workspace.write_config(workspace.postgres_config(scratch_db.name))
    assert workspace.invoke("backup", "--all").returncode == 0
    scratch_db.sql(f"ALTER TABLE t OWNER TO {PGUSER};")
    psql(f"DROP ROLE {role};")
    before = databases_like(scratch_db.name)
    result = workspace.invoke("restore", "--engine", "postgres", "--file", "latest", "--yes")
    assert result.returncode == 2, result.stderr
    assert role in result.stderr and "--no-owner" in result.stderr and "Traceback" not in result.stderr
    assert databases_like(scratch_db.name) == before
    result = workspace.invoke("restore", "--engine", "postgres", "--file", "latest", "--yes", "--no-owner")
    assert result.returncode == 0, result.stderr
    assert "left out 1 ownership/privilege statement(s)" in result.stderr
    assert scratch_db.sql("SELECT tableowner FROM pg_tables WHERE tablename = 't';") == PGUSER


@pytest.mark.parametrize(
    "meta",
    [b"\\! touch {marker}", b"\\o {marker}", b"\\set x 1", b"\\copy t from '/etc/hostname'", b"SELECT 1 \\gexec"],
    ids=["shell", "output", "set", "copy", "gexec"],
)
def test_edited_backup_with_a_meta_command_is_refused_and_never_runs(workspace, scratch_db, tmp_path, meta):
    """Someone with write access to backup_dir adds a psql meta-command: verify fails, restore
    refuses, the command never runs and nothing is touched."""
    scratch_db.sql("CREATE TABLE t (id int); INSERT INTO t VALUES (1);")
    workspace.write_config(workspace.postgres_config(scratch_db.name))
    assert workspace.invoke("backup", "--all").returncode == 0
    [backup] = workspace.backups()
    marker = tmp_path / "pwned"
    text = gzip.decompress(backup.read_bytes())
    line = meta.replace(b"{marker}", str(marker).encode()) + b"\n"
    text = text.replace(b"CREATE TABLE public.t", line + b"CREATE TABLE public.t", 1)
    edited = tmp_path / "backup_20260101_000000.sql.gz"
    edited.write_bytes(gzip.compress(text))
    verify = workspace.invoke("verify", "--file", str(edited), "--db", "pg")
    assert verify.returncode == 1 and "meta-command" in verify.stderr, verify.stderr
    before = scratch_db.checksums()
    result = workspace.invoke("restore", "--engine", "postgres", "--file", str(edited), "--yes")
    assert result.returncode == 1 and "meta-command" in result.stderr, result.stderr
    assert not marker.exists()
    assert scratch_db.checksums() == before and databases_like(scratch_db.name) == [scratch_db.name]


def test_reader_boundaries_match_psql(tmp_path):
    """The reader splits a dump where psql does: a script of statements whose quoted parts hold
    ';', quotes, dollar signs, comments and backslashes, run by psql one statement per result."""
    from lib.engines.pgdump import DumpReader

    script = (
        b"SELECT 'a;b''c' AS x;\n"
        b'SELECT 1 AS "we;ird""";\n'
        b"SELECT E'it\\'s;\\\\' AS y;\n"
        b"SELECT $q$ ; $x$ ; $q$ AS z;\n"
        b"SELECT /* ; /* nested ; */ still ; */ 2;\n"
        b"SELECT 3 -- ; a comment\n;\n"
        b"SELECT (SELECT 4) ;\n"
        b"SELECT U&'d\\0061t;a' AS u;\n"
        b"SET standard_conforming_strings = off;\n"
        b"SELECT 'x\\';y' AS z;\n"
        b"SET standard_conforming_strings = on;\n"
        b"SELECT 'x\\';\n"
    )
    seen = []

    class Collect(DumpReader):
        def statement(self, stmt):
            seen.append(stmt.raw[stmt.lead :])

    for size in (1, 2, 5, 1 << 20):
        seen.clear()
        reader = Collect()
        for i in range(0, len(script), size):
            reader.feed(script[i : i + size])
        reader.close()
        assert len(seen) == 12, (size, seen)
    env = {**os.environ, "PGOPTIONS": "-c client_min_messages=error"}
    out = subprocess.run(
        ["psql", "-X", "-A", "-t", "-h", PGHOST, "-p", PGPORT, "-U", PGUSER, "-d", "postgres"],
        input=script,
        capture_output=True,
        env=env,
    )
    results = [line for line in out.stdout.decode().splitlines() if line]
    assert len(results) == 12, (results, out.stderr)  # one line a statement: a row, or SET's tag
