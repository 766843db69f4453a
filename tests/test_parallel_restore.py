"""Plain-SQL restores with the post-data section run in parallel sessions (lib/engines/pgsplit.py)
and tables ANALYZEd while the load goes on (lib/engines/pgload.py), against the real server: the
restored database must be exactly what pg_dump saw, whatever the schema throws at the router."""

from __future__ import annotations

import pytest
from conftest import databases_like, psql, schema_of

from lib.engines.pgdump import DumpReader
from lib.engines.pgsplit import classify

# Everything the router must either run in parallel correctly or leave in order: circular and
# self-referencing foreign keys, a deferrable one, one NOT VALID with violating rows, quoted
# names with dots and spaces, expression and partial indexes (a literal holding ';' and quotes),
# a commented index, a NOT VALID CHECK, a partitioned table (its FK has no ONLY; index attach),
# a trigger, a materialized view with an index.
SCHEMA_SQL = r"""
CREATE SCHEMA "Odd Schema";
CREATE TABLE parent (id int PRIMARY KEY, code text UNIQUE, partner int);
CREATE TABLE child (id int, parent_id int, note text, up int, CONSTRAINT child_pk PRIMARY KEY (id));
CREATE TABLE "Odd Schema"."Weird. Table" ("Id" int PRIMARY KEY, ref int);
ALTER TABLE parent ADD CONSTRAINT parent_partner_fk FOREIGN KEY (partner) REFERENCES child(id) DEFERRABLE INITIALLY DEFERRED;
ALTER TABLE child ADD CONSTRAINT child_parent_fk FOREIGN KEY (parent_id) REFERENCES parent(id) ON DELETE CASCADE;
ALTER TABLE child ADD CONSTRAINT child_up_fk FOREIGN KEY (up) REFERENCES child(id);
ALTER TABLE "Odd Schema"."Weird. Table" ADD CONSTRAINT "Weird FK" FOREIGN KEY (ref) REFERENCES parent(id);
CREATE TABLE loose (id int, parent_id int);
INSERT INTO loose VALUES (1, 999999);
ALTER TABLE loose ADD CONSTRAINT loose_fk FOREIGN KEY (parent_id) REFERENCES parent(id) NOT VALID;
CREATE INDEX child_lower_note ON child (lower(note));
CREATE INDEX child_partial ON child (id) WHERE note <> 'semi;colon ''quoted''';
CREATE UNIQUE INDEX parent_code_upper ON parent (upper(code));
COMMENT ON INDEX child_partial IS 'a commented index';
ALTER TABLE child ADD CONSTRAINT child_note_len CHECK (length(note) < 100) NOT VALID;
CREATE TABLE events (id int, parent_id int REFERENCES parent(id), at date) PARTITION BY RANGE (at);
CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE INDEX events_at ON events (at);
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN NEW.note := NEW.note; RETURN NEW; END$$;
CREATE TRIGGER child_touch BEFORE UPDATE ON child FOR EACH ROW EXECUTE FUNCTION touch();
INSERT INTO parent SELECT g, 'code' || g, NULL FROM generate_series(1, 2000) g;
INSERT INTO child SELECT g, 1 + g % 2000, 'note ' || g, NULLIF(g - 1, 0) FROM generate_series(1, 5000) g;
UPDATE parent SET partner = id WHERE id <= 100;
INSERT INTO "Odd Schema"."Weird. Table" SELECT g, g FROM generate_series(1, 300) g;
INSERT INTO events SELECT g, 1 + g % 2000, date '2026-01-01' + (g % 300) FROM generate_series(1, 3000) g;
CREATE MATERIALIZED VIEW parent_counts AS SELECT parent_id, count(*) AS n FROM child GROUP BY parent_id;
CREATE INDEX parent_counts_idx ON parent_counts (parent_id);
"""

CONSTRAINTS_SQL = (
    "SELECT conname || ':' || contype::text || ':' || convalidated FROM pg_constraint WHERE conrelid <> 0 ORDER BY 1;"
)


def backup_and_restore(workspace, db, target: str, **options):
    workspace.write_config(workspace.postgres_config(db.name, **options))
    result = workspace.invoke("backup", "--all")
    assert result.returncode == 0, result.stderr
    return workspace.invoke("restore", "--engine", "postgres", "--file", "latest", "--into", target, "--yes")


@pytest.mark.parametrize("jobs", [2, 1])
def test_restored_database_is_exactly_the_dumped_one(workspace, scratch_db, jobs):
    scratch_db.sql(SCHEMA_SQL)
    target = f"{scratch_db.name}_copy"
    result = backup_and_restore(workspace, scratch_db, target, restore_jobs=jobs)
    assert result.returncode == 0, result.stderr
    assert schema_of(target) == schema_of(scratch_db.name)
    assert scratch_db.checksums(target) == scratch_db.checksums()
    assert psql(CONSTRAINTS_SQL, target) == psql(CONSTRAINTS_SQL, scratch_db.name)
    assert "loose_fk:f:false" in psql(CONSTRAINTS_SQL, target)  # NOT VALID stays so
    ran_parallel = "ran in parallel" in result.stderr
    assert ran_parallel is (jobs > 1), result.stderr
    # every table has statistics, including those ANALYZEd while the load went on
    unanalyzed = psql("SELECT relname FROM pg_stat_user_tables WHERE last_analyze IS NULL ORDER BY 1;", target)
    assert unanalyzed == "", unanalyzed
    # expression-index statistics exist (gathered after the index build)
    assert psql("SELECT count(*) FROM pg_stats WHERE tablename = 'child_lower_note';", target) == "1"


@pytest.mark.parametrize("jobs", [2, 1])
def test_a_big_table_is_loaded_by_two_sessions_row_for_row(workspace, scratch_db, jobs):
    """A table past SPLIT_AFTER bytes is shared by two COPY sessions in pieces of whole rows:
    rows holding escaped tabs, newlines and backslashes, a row as long as a piece, all intact."""
    scratch_db.sql(
        r"""
        CREATE TABLE big (id int PRIMARY KEY, body text, blob bytea);
        INSERT INTO big SELECT g, E'row	' || g || E'
line two \ ' || repeat('가', g % 50), decode(md5(g::text), 'hex')
          FROM generate_series(1, 90000) g;
        INSERT INTO big VALUES (0, repeat('x', 300000), NULL);
        CREATE TABLE after_big (id int REFERENCES big(id));
        INSERT INTO after_big SELECT g FROM generate_series(1, 1000) g;
        """
    )
    target = f"{scratch_db.name}_copy"
    result = backup_and_restore(workspace, scratch_db, target, restore_jobs=jobs)
    assert result.returncode == 0, result.stderr
    assert ("loaded by two sessions at once" in result.stderr) is (jobs > 1), result.stderr
    assert scratch_db.checksums(target) == scratch_db.checksums()
    assert schema_of(target) == schema_of(scratch_db.name)


def test_a_failing_parallel_index_build_leaves_the_target_untouched(workspace, scratch_db):
    """An index whose build fails only at restore time (its function sees pg_dump's empty
    search_path): the failure comes from a parallel session, the scratch database is dropped,
    the target is untouched and the error names the statement's message."""
    scratch_db.sql(
        r"""
        CREATE FUNCTION picky(int) RETURNS int IMMUTABLE LANGUAGE plpgsql AS $$
        BEGIN
          IF current_setting('search_path') = '' THEN RAISE EXCEPTION 'picky index refuses row %', $1; END IF;
          RETURN $1;
        END $$;
        CREATE TABLE items (id int PRIMARY KEY, v int);
        INSERT INTO items SELECT g, g FROM generate_series(1, 100) g;
        CREATE INDEX items_picky ON items (public.picky(v));
        """
    )
    backup_and_restore(workspace, scratch_db, scratch_db.name + "_unused")  # makes the backup
    before = scratch_db.checksums()
    result = workspace.invoke("restore", "--engine", "postgres", "--file", "latest", "--yes")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "psql (load, parallel) failed" in result.stderr and "picky index refuses row" in result.stderr
    assert scratch_db.checksums() == before
    assert databases_like(scratch_db.name) == [scratch_db.name]


def test_a_row_failing_in_a_shared_copy_leaves_the_target_untouched(workspace, scratch_db):
    """Rows near the end of a big table fail a CHECK at restore time (its function sees pg_dump's
    empty search_path) in whichever COPY session got them: both stop, nothing is left behind."""
    scratch_db.sql(
        r"""
        CREATE FUNCTION late_check(int) RETURNS boolean IMMUTABLE LANGUAGE plpgsql AS $$
        BEGIN
          IF current_setting('search_path') = '' AND $1 > 85000 THEN RAISE EXCEPTION 'late row % refused', $1; END IF;
          RETURN true;
        END $$;
        CREATE TABLE big (id int CHECK (public.late_check(id)), body text);
        INSERT INTO big SELECT g, repeat('b', 100) FROM generate_series(1, 90000) g;
        """
    )
    backup_and_restore(workspace, scratch_db, scratch_db.name + "_unused")  # makes the backup
    before = scratch_db.checksums()
    result = workspace.invoke("restore", "--engine", "postgres", "--file", "latest", "--yes")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "late row" in result.stderr and "refused" in result.stderr, result.stderr
    assert scratch_db.checksums() == before
    assert databases_like(scratch_db.name) == [scratch_db.name]


# -- the classifier, on the shapes pg_dump writes ----------------------------------------------
def statements(sql: bytes) -> list:
    """The statements the dump reader finds in ``sql``."""
    found = []

    class Collect(DumpReader):
        def statement(self, stmt):
            found.append(stmt)

    reader = Collect()
    reader.feed(sql)
    reader.close()
    return found


def one(sql: bytes):
    [stmt] = statements(sql)
    return stmt


def test_classify_takes_only_exact_shapes():
    index = b"--\n-- Name: t_v; Type: INDEX; Schema: public; Owner: -\n--\n\nCREATE INDEX t_v ON public.t USING btree (v);\n"
    item = classify(one(index), b"SET x = 1;\n", 1)
    assert item is not None and item.kind == "build" and item.tables == {(b"public", b"t")}
    assert item.sql == b"SET x = 1;\nCREATE INDEX t_v ON public.t USING btree (v);\n"
    fk = (
        b"--\n-- Name: t t_fk; Type: FK CONSTRAINT; Schema: public; Owner: -\n--\n\n"
        b'ALTER TABLE ONLY public.t\n    ADD CONSTRAINT t_fk FOREIGN KEY (r) REFERENCES "S"."U v"(id);\n'
    )
    item = classify(one(fk), b"", 2)
    assert item.sql.endswith(b'REFERENCES "S"."U v"(id) NOT VALID;\n')
    assert item.validate == b'ALTER TABLE "public"."t" VALIDATE CONSTRAINT t_fk;\n'
    assert item.tables == {(b"public", b"t")} and item.referenced == {(b"S", b"U v")}
    # a foreign key to a partitioned table is added as the dump says (VALIDATE would leave its
    # per-partition copies not validated)
    item = classify(one(fk), b"", 2, partitioned={(b"S", b"U v")})
    assert item.validate is None and b"NOT VALID" not in item.sql
    # a dump's own NOT VALID foreign key is added as it is
    assert classify(one(fk.replace(b"(id);", b"(id) NOT VALID;")), b"", 6).validate is None
    # a literal holding ';' and newlines is one statement, still a constraint on public.t
    check = b"-- Name: t c; Type: CONSTRAINT; Schema: public; Owner: -\nALTER TABLE ONLY public.t\n    ADD CONSTRAINT c CHECK ((v <> 'a;\n-- b'));\n"
    assert classify(one(check), b"", 3).tables == {(b"public", b"t")}
    # another statement kind under an INDEX header, or no header at all: not ours
    header = b"-- Name: t_v; Type: INDEX; Schema: public; Owner: -\n"
    assert classify(one(header + b"DROP TABLE public.t;\n"), b"", 4) is None
    assert classify(one(header + b"ALTER TABLE public.t OWNER TO x;\n"), b"", 5) is None
    assert classify(one(b"CREATE INDEX t_v ON public.t USING btree (v);\n"), b"", 6) is None


# -- the router: what it passes on, and its dump check --------------------------------------------
def route(data: bytes, out, sizes=(1, 3, 7, 4096, 65536)):
    """Feed ``data`` to a SqlRouter (one session: ``cat > out``) in chunks of varying sizes."""
    from lib.engines.pgsplit import Router, SqlRouter

    router = SqlRouter(Router(psql=lambda flags: ["sh", "-c", f"cat > '{out}'"], env=None, jobs=1))
    pos, turn = 0, 0
    while pos < len(data):
        size = sizes[turn % len(sizes)]
        router.write(memoryview(data[pos : pos + size]))
        pos, turn = pos + size, turn + 1
    router.close()
    return router


STREAM = (
    b"--\n-- PostgreSQL database dump\n--\n\n\\restrict abc\n\n-- Dumped from database version 15.20 (x)\n"
    b"SET client_encoding = 'UTF8';\n\n--\n-- Name: t; Type: TABLE; Schema: public; Owner: -\n--\n\n"
    b"CREATE TABLE public.t (a int, b text);\n\n"
    b"COPY public.t (a, b) FROM stdin;\n1\tone\\\\.\n2\t\\\\.\n3\tthree\n\\.\n\n"
    b"COPY public.empty  FROM stdin;\n\\.\n\n"
    b'COPY "S"."a (b)" (x) FROM stdin;\n9\n\\.\n\n'
    b"--\n-- PostgreSQL database dump complete\n--\n\n\\unrestrict abc\n\n"
)
# what a psql session gets: every statement and COPY block from after \restrict to the last one
FORWARDED = STREAM[STREAM.index(b"\\restrict abc\n") + 14 : STREAM.index(b"9\n\\.\n") + 5]


@pytest.mark.parametrize(
    ("stream", "verdict"),
    [
        (STREAM, b"END\t1"),
        (STREAM[: STREAM.index(b"3\tthree")], b"OPEN\tpublic.t"),  # cut inside COPY data
        (STREAM.replace(b"-- PostgreSQL database dump complete\n", b""), b"END\t0"),  # no end marker
        (STREAM + b"DROP TABLE public.t;\n", b"END\t0"),  # something after the end marker
        (STREAM[:-1], b"END\t1"),  # no final newline
        (STREAM[: STREAM.index(b"CREATE TABLE") + 20], b"END\t0"),  # cut inside a statement
    ],
    ids=["whole", "cut-in-data", "no-end-marker", "after-end-marker", "no-final-newline", "cut-in-statement"],
)
def test_router_checks_the_dump_and_forwards_its_statements_unchanged(tmp_path, stream, verdict):
    out = tmp_path / "forwarded.sql"
    summaries = set()
    for sizes in [(1, 3, 7, 4096, 65536), (1 << 20,), (2,)]:
        router = route(stream, out, sizes)
        summary = router.summary()
        summaries.add(summary)
        assert summary.endswith(verdict + b"\n"), summary
        forwarded = out.read_bytes() if out.exists() else b""
        # every statement and COPY block, byte for byte, without the meta-commands
        if b"DROP TABLE" in stream:  # run (it is a statement), and the dump is judged incomplete
            assert forwarded == FORWARDED + b"\nDROP TABLE public.t;"
        assert FORWARDED.startswith(forwarded) or b"DROP TABLE" in stream
        if verdict == b"END\t1":
            assert forwarded == FORWARDED
        out.unlink(missing_ok=True)
    assert len(summaries) == 1  # the same verdict whatever the chunk sizes
    if verdict == b"END\t1":
        lines = summaries.pop().splitlines()
        assert b"T\tpublic.t\t3" in lines and b"T\tpublic.empty\t0" in lines and b'T\t"S"."a (b)"\t1' in lines
        assert b"V\t15.20 (x)" in lines and b"N\t3\t3" in lines


def test_sql_without_pg_dump_headers_is_loaded_in_order(workspace, scratch_db):
    """A hand-written SQL file (no pg_dump entry headers) with a big COPY: nothing is reordered or
    shared (a helper session would replay its CREATE TABLE), and it restores."""
    import gzip

    rows = b"".join(b"%d\tsome text for row %d\n" % (i, i) for i in range(300_000))  # ~8 MB
    sql = (
        b"CREATE TABLE public.t (a int, b text);\nCOPY public.t (a, b) FROM stdin;\n"
        + rows
        + b"\\.\n\nCREATE INDEX t_a ON public.t USING btree (a);\n\n--\n-- PostgreSQL database dump complete\n--\n"
    )
    workspace.write_config(workspace.postgres_config(scratch_db.name))
    path = workspace.backup_dir / "pg" / "daily" / "backup_20260101_000000.sql.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(gzip.compress(sql, 1))
    target = f"{scratch_db.name}_copy"
    result = workspace.invoke("restore", "--engine", "postgres", "--file", str(path), "--into", target, "--yes")
    assert result.returncode == 0, result.stderr
    assert "two sessions" not in result.stderr and "parallel" not in result.stderr
    assert psql("SELECT count(*), sum(a) FROM t;", target) == f"300000|{sum(range(300_000))}"
    assert psql("SELECT count(*) FROM pg_indexes WHERE indexname = 't_a';", target) == "1"
