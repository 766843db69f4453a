"""Failures must be loud, lose nothing and leave no backup under a final name; bad input is
refused with a one-line error and exit 2. Real PostgreSQL throughout."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time

import pytest
from conftest import DOUBLES, PGHOST, PGPORT, PGUSER, databases_like, psql


def assert_one_line_error(result, code, *needles):
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def no_files_left(workspace):
    operational = {"backup.log", ".lock", "last_run.json"}  # log, run lock, run history
    found = [p for p in workspace.backup_dir.rglob("*") if p.is_file() and p.name not in operational]
    return found == []


@pytest.mark.parametrize(
    "fault,needle",
    [("die-midway", "pg_dump failed: exit status 1"), ("truncate-exit0", "failed verification")],
)
def test_broken_dump_never_becomes_a_backup(workspace, sample_db, fault, needle):
    workspace.write_config(workspace.postgres_config(sample_db.name))
    env = {"PATH": f"{DOUBLES / 'faulty'}{os.pathsep}{workspace.env['PATH']}", "PG_DUMP_FAULT": fault}
    result = workspace.invoke("backup", "--all", env=env)
    assert_one_line_error(result, 1, needle, "summary: 0 of 1")
    assert no_files_left(workspace)
    assert ".tmp-" not in result.stderr  # messages name the backup the operator knows
    if fault == "truncate-exit0":
        assert re.search(r"backup_\d{8}_\d{6}\.sql\.gz failed verification (while it was written)?: ", result.stderr), (
            result.stderr
        )


def real_dump(dbname: str) -> bytes:
    """What the real pg_dump writes for ``dbname``, to choose where the fault injector cuts."""
    argv = ["pg_dump", "--no-owner", "--no-acl", "-h", PGHOST, "-p", PGPORT, "-U", PGUSER, dbname]
    return subprocess.run(argv, capture_output=True, check=True).stdout


def backup_cut_at(workspace, cut: int):
    """Run a backup whose pg_dump stops after ``cut`` bytes and exits 0 (the fault injector)."""
    env = {
        "PATH": f"{DOUBLES / 'faulty'}{os.pathsep}{workspace.env['PATH']}",
        "PG_DUMP_FAULT": "truncate-exit0",
        "PG_DUMP_FAULT_BYTES": str(cut),
    }
    return workspace.invoke("backup", "--all", env=env)


def test_dump_cut_before_the_end_marker_is_refused(workspace, sample_db):
    """Cut after all data but before the '-- PostgreSQL database dump complete' trailer."""
    workspace.write_config(workspace.postgres_config(sample_db.name))
    full = real_dump(sample_db.name)
    result = backup_cut_at(workspace, full.rindex(b"-- PostgreSQL database dump complete") - 10)
    assert_one_line_error(result, 1, "marker is missing")
    assert no_files_left(workspace)


def test_all_carries_on_past_a_failed_database(workspace, sample_db):
    config = workspace.postgres_config(sample_db.name)
    config["databases"]["broken"] = dict(config["databases"]["pg"], database=f"{sample_db.name}_missing")
    workspace.write_config(config)
    result = workspace.invoke("backup", "--all")
    assert_one_line_error(result, 1, "summary: 1 of 2", "failed: broken", "pg_dump failed")
    assert len(workspace.backups("pg")) == 1
    assert workspace.backups("broken") == []


def make_backup(workspace, db, **extra):
    workspace.write_config(workspace.postgres_config(db.name, **extra))
    result = workspace.invoke("backup", "--all")
    assert result.returncode == 0, result.stderr
    [backup] = workspace.backups()
    return backup


def test_corrupt_backup_is_refused_before_touching_the_database(workspace, sample_db):
    backup = make_backup(workspace, sample_db)
    data = bytearray(backup.read_bytes())
    data[len(data) // 2] ^= 0xFF
    backup.write_bytes(bytes(data))
    sample_db.sql("UPDATE users SET name = 'current';")
    before = sample_db.checksums()
    result = workspace.invoke("restore", "--engine", "postgres", "--file", "latest", "--yes")
    assert_one_line_error(result, 1, "sha256 does not match")
    assert sample_db.checksums() == before
    assert databases_like(sample_db.name) == [sample_db.name]


def test_truncated_backup_with_matching_checksum_is_still_refused(workspace, sample_db):
    backup = make_backup(workspace, sample_db)
    backup.write_bytes(backup.read_bytes()[:-200])
    # an attacker or a bad copy could refresh the sidecar; the stream check still catches it
    digest = subprocess.run(["sha256sum", backup.name], cwd=backup.parent, capture_output=True, text=True).stdout
    (backup.parent / (backup.name + ".sha256")).write_text(digest)
    record = backup.parent / (backup.name + ".json")  # and the record's, so only the stream check is left
    record.write_text(record.read_text().replace(json.loads(record.read_text())["sha256"], digest.split()[0]))
    result = workspace.invoke("restore", "--engine", "postgres", "--file", str(backup), "--yes")
    assert_one_line_error(result, 1, "failed verification")
    assert databases_like(sample_db.name) == [sample_db.name]
    verify = workspace.invoke("verify")
    assert verify.returncode == 1
    record = json.loads((backup.parent / (backup.name + ".json")).read_text())
    assert record["verified"]["ok"] is False


def test_restore_failing_halfway_leaves_the_original_intact(workspace, scratch_db):
    # A CHECK constraint that looks at another table: valid when inserted, but pg_dump loads
    # 'item' before 'zref', so the restore fails in the middle (a classic real-world failure).
    scratch_db.sql(
        """
        CREATE TABLE zref (id int PRIMARY KEY);
        CREATE FUNCTION zref_exists(int) RETURNS boolean LANGUAGE sql AS 'SELECT EXISTS (SELECT 1 FROM public.zref WHERE id = $1)';
        CREATE TABLE item (id int, ref int CHECK (public.zref_exists(ref)));
        INSERT INTO zref VALUES (1), (2);
        INSERT INTO item VALUES (1, 1), (2, 2);
        """
    )
    make_backup(workspace, scratch_db)
    scratch_db.sql("INSERT INTO zref VALUES (3); INSERT INTO item VALUES (3, 3);")
    before = scratch_db.checksums()
    result = workspace.invoke("restore", "--engine", "postgres", "--file", "latest", "--yes")
    assert_one_line_error(result, 1, "psql (load) failed", "item_ref_check")
    assert scratch_db.checksums() == before
    assert databases_like(scratch_db.name) == [scratch_db.name]


def test_tampered_record_cannot_inject_sql_into_the_row_count_check(workspace, sample_db):
    """Table names in a record are compared with the restored database's own tables, never run
    as SQL; a recorded table that is not there is named."""
    backup = make_backup(workspace, sample_db)
    path = backup.with_name(backup.name + ".json")
    record = json.loads(path.read_text())
    tables = record["engine_meta"]["tables"]
    injected = f"public.lessons; CREATE DATABASE {sample_db.name}_injected; --"
    tables[injected] = tables.pop("public.lessons")
    tables["public.zz_ghost"] = 7  # sorts after the injected name
    path.write_text(json.dumps(record))
    before = sample_db.checksums()
    result = workspace.invoke("restore", "--engine", "postgres", "--file", "latest", "--yes")
    assert_one_line_error(result, 1, "restored database lacks tables the backup recorded: ", "public.zz_ghost")
    assert injected in result.stderr
    assert databases_like(f"{sample_db.name}_injected") == []  # the injected statement never ran
    assert sample_db.checksums() == before
    assert databases_like(sample_db.name) == [sample_db.name]


def test_awkward_table_names_and_partitions_round_trip(workspace, scratch_db):
    """Names that need quoting (schema and table) and a partitioned table: the restored database's
    own names match the record's, and every count is checked."""
    scratch_db.sql(
        """
        CREATE SCHEMA "Odd Schema";
        CREATE TABLE "Odd Schema"."Mixed|Case ""q"" x" (id int);
        INSERT INTO "Odd Schema"."Mixed|Case ""q"" x" SELECT generate_series(1, 7);
        CREATE TABLE "select" (id int);
        INSERT INTO "select" VALUES (1), (2);
        CREATE TABLE events (id int, at date) PARTITION BY RANGE (at);
        CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
        CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
        INSERT INTO events SELECT g, date '2025-06-01' + g FROM generate_series(1, 300) g;
        """
    )
    backup = make_backup(workspace, scratch_db)
    recorded = json.loads(backup.with_name(backup.name + ".json").read_text())["engine_meta"]["tables"]
    assert recorded['"Odd Schema"."Mixed|Case ""q"" x"'] == 7 and recorded['public."select"'] == 2
    other = f"{scratch_db.name}_copy"
    result = workspace.invoke("restore", "--engine", "postgres", "--file", "latest", "--yes", "--into", other)
    assert result.returncode == 0, result.stderr
    assert scratch_db.checksums(other) == scratch_db.checksums()


def test_restore_terminates_sessions_on_the_target(workspace, sample_db):
    make_backup(workspace, sample_db)
    holder = subprocess.Popen(
        ["psql", "-X", "-h", PGHOST, "-p", PGPORT, "-U", PGUSER, "-d", sample_db.name, "-c", "SELECT pg_sleep(60)"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(50):
            if psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{sample_db.name}'") != "0":
                break
            time.sleep(0.1)
        result = workspace.invoke("restore", "--engine", "postgres", "--file", "latest", "--yes")
        assert result.returncode == 0, result.stderr
        assert holder.wait(timeout=30) != 0  # its session was terminated
    finally:
        holder.kill()


def test_into_restores_elsewhere_and_leaves_the_source_alone(workspace, sample_db):
    make_backup(workspace, sample_db)
    sample_db.sql("DELETE FROM lessons;")
    current = sample_db.checksums()
    other = f"{sample_db.name}_copy"
    result = workspace.invoke("restore", "--engine", "postgres", "--file", "latest", "--yes", "--into", other)
    assert result.returncode == 0, result.stderr
    assert sample_db.checksums() == current
    assert sample_db.checksums(other)["public.lessons"].startswith("120:")


def test_restore_without_terminal_or_yes_refuses_and_touches_nothing(workspace, sample_db):
    make_backup(workspace, sample_db)
    result = workspace.invoke("restore", "--engine", "postgres", "--file", "latest")
    assert_one_line_error(result, 2, "pass --yes")
    assert databases_like(sample_db.name) == [sample_db.name]


def test_restore_bad_inputs(workspace, sample_db):
    workspace.write_config(workspace.postgres_config(sample_db.name))
    missing = workspace.invoke("restore", "--engine", "postgres", "--file", "/nonexistent/x.sql.gz", "--yes")
    assert_one_line_error(missing, 2, "no such file")
    archive = workspace.path / "backup_20260101_000000.archive"
    archive.write_bytes(b"\x6d\xe2\x99\x81")
    wrong = workspace.invoke("restore", "--engine", "postgres", "--file", str(archive), "--yes")
    assert_one_line_error(wrong, 2, "is a mongodb backup, not postgres")
    engine = workspace.invoke("restore", "--engine", "mysql", "--file", "latest", "--yes")
    assert_one_line_error(engine, 2, "unknown engine 'mysql'")
    latest = workspace.invoke("restore", "--engine", "postgres", "--file", "latest", "--yes")
    assert_one_line_error(latest, 2, "no verified backup")
    unknown_db = workspace.invoke("backup", "--db", "nope")
    assert_one_line_error(unknown_db, 2, "unknown database 'nope'")
    tier = workspace.invoke("backup", "--all", "--tier", "hourly")
    assert_one_line_error(tier, 2, "--tier hourly")


def test_container_not_running_is_a_clear_input_error(workspace, sample_db):
    workspace.write_config(workspace.postgres_config(sample_db.name, container="lemon-postgres"))
    result = workspace.invoke("backup", "--all", env={"DOCKER_DOUBLE_RUNNING": ""})
    assert_one_line_error(result, 2, "container 'lemon-postgres' is not running")
    single = workspace.invoke(
        "restore", "--engine", "postgres", "--file", "latest", "--yes", env={"DOCKER_DOUBLE_RUNNING": ""}
    )
    assert_one_line_error(single, 2)


def test_missing_binary_names_its_package(workspace, sample_db, tmp_path):
    workspace.write_config(workspace.postgres_config(sample_db.name))
    bare = tmp_path / "bin"
    bare.mkdir()
    for tool in ("python3", "awk", "gzip", "sha256sum"):
        target = subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip()
        if target:
            (bare / tool).symlink_to(target)
    result = workspace.invoke("backup", "--all", env={"PATH": str(bare)})
    assert "'pg_dump' is not installed" in result.stderr
    assert "postgresql-client" in result.stderr
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_password_travels_by_environment_only(workspace, sample_db):
    secret = "s3cr3t-Passw0rd-do-not-leak"
    workspace.write_config(
        workspace.postgres_config(sample_db.name, container="lemon-postgres", password_env="PGPASS_LEMON")
    )
    (workspace.path / ".env").write_text(f"PGPASS_LEMON='{secret}'\n")
    seen: list[str] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        with open(f"/proc/{pid}/cmdline", "rb") as handle:
                            seen.append(handle.read().decode(errors="replace"))
                    except OSError:
                        pass
            time.sleep(0.01)

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        result = workspace.invoke("backup", "--all", env={"DOCKER_DOUBLE_RUNNING": "lemon-postgres"})
    finally:
        stop.set()
        thread.join()
    assert result.returncode == 0, result.stderr
    calls = (workspace.path / "docker-calls.log").read_text()
    assert '"-e", "PGPASSWORD"' in calls
    assert secret not in calls
    assert any("pg_dump" in cmd for cmd in seen)
    assert not any(secret in cmd for cmd in seen)
    assert secret not in result.stderr + (workspace.backup_dir / "backup.log").read_text()


def env_recorders(directory, path: str, names: tuple[str, ...]) -> tuple[dict, object]:
    """Wrappers earlier on PATH for ``names`` that write their environment to
    ``<log dir>/<name>.<pid>.env``, then exec the real binary. Returns (env for the task, log dir)."""
    import shutil

    directory.mkdir()
    logs = directory / "env"
    logs.mkdir()
    for name in names:
        real = shutil.which(name, path=path)
        if real is None:
            continue
        script = directory / name
        script.write_text(f"#!/bin/sh\nenv > '{logs}/{name}.'$$.env\nexec '{real}' \"$@\"\n")
        script.chmod(0o755)
    return {"PATH": f"{directory}{os.pathsep}{path}"}, logs


def test_configured_secret_variables_never_reach_any_child(workspace, sample_db, tmp_path):
    """password_env and encryption.passphrase_env are scrubbed from every child; pg_dump/psql get
    the password only as PGPASSWORD."""
    secret, phrase = "pg-secret-in-DB_PASSWORD", "gpg-secret-in-BACKUP_PASSPHRASE"
    config = workspace.postgres_config(sample_db.name, password_env="DB_PASSWORD")
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    config["encryption"] = {"mode": "symmetric", "passphrase_env": "BACKUP_PASSPHRASE", "gnupghome": str(home)}
    workspace.write_config(config)
    names = ("pg_dump", "psql", "pigz", "gzip", "gpg", "mawk", "awk")
    wrappers, logs = env_recorders(tmp_path / "wrap", workspace.env["PATH"], names)
    env = {**wrappers, "DB_PASSWORD": secret, "BACKUP_PASSPHRASE": phrase}
    result = workspace.invoke("backup", "--all", env=env)
    assert result.returncode == 0, result.stderr
    into = f"{sample_db.name}_envcheck"
    result = workspace.invoke("restore", "--engine", "postgres", "--file", "latest", "--into", into, "--yes", env=env)
    assert result.returncode == 0, result.stderr
    calls = {path: path.read_text() for path in logs.iterdir()}
    seen = {path.name.split(".")[0] for path in calls}
    assert {"pg_dump", "psql", "gpg"} <= seen, seen
    for path, environ in calls.items():
        name = path.name.split(".")[0]
        assert "DB_PASSWORD=" not in environ, f"{name} inherited DB_PASSWORD"
        assert "BACKUP_PASSPHRASE=" not in environ, f"{name} inherited BACKUP_PASSPHRASE"
        assert phrase not in environ, name
        if name in ("pg_dump", "psql"):
            assert f"PGPASSWORD={secret}" in environ, name
        else:
            assert secret not in environ, f"{name} got the database password"


def test_unset_password_variable_is_an_input_error(workspace, sample_db):
    workspace.write_config(workspace.postgres_config(sample_db.name, password_env="NOT_SET_ANYWHERE"))
    result = workspace.invoke("backup", "--db", "pg")
    assert_one_line_error(result, 2, "$NOT_SET_ANYWHERE, which is not set")
    assert no_files_left(workspace)


def test_dump_cut_inside_a_copy_block_is_named(workspace, sample_db):
    workspace.write_config(workspace.postgres_config(sample_db.name))
    result = backup_cut_at(workspace, real_dump(sample_db.name).index(b"COPY public.users") + 3000)
    assert_one_line_error(result, 1, "the data of table public.users never ends")
    assert no_files_left(workspace)


def test_a_role_without_createdb_is_told_the_fix_and_nothing_is_touched(workspace, sample_db):
    make_backup(workspace, sample_db)
    role = f"lemon_nocreatedb_{os.getpid()}"
    psql(f'CREATE ROLE "{role}" LOGIN;')
    try:
        workspace.write_config(workspace.postgres_config(sample_db.name, user=role))
        result = workspace.invoke(
            "restore",
            "--engine",
            "postgres",
            "--file",
            "latest",
            "--into",
            f"{sample_db.name}_x",
            "--yes",
            "--no-owner",
        )
    finally:
        psql(f'DROP ROLE "{role}";')
    assert_one_line_error(result, 2, f"role {role} may not create databases", f'ALTER ROLE "{role}" CREATEDB;')
    assert databases_like(sample_db.name) == [sample_db.name]
