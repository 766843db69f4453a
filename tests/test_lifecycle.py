"""What killed runs leave behind is repaired by the next run (lib/lifecycle.py): a database left
closed by a restore swap killed half-way, scratch databases, temp and download files, orphan
sidecars. Real PostgreSQL, a real SIGKILL of the tool (a psql fault injector kills it right after
the swap's close step), real locks."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from conftest import DOUBLES, PGHOST, PGPORT, PGUSER, ROOT, databases_like, psql

KILL_AT_SWAP = DOUBLES / "kill-at-swap"


def allows_connections(name: str) -> bool:
    return psql(f"SELECT datallowconn FROM pg_database WHERE datname = '{name}';") == "t"


def backup_ok(workspace) -> None:
    result = workspace.invoke("backup", "--all")
    assert result.returncode == 0, result.stderr


def kill_restore_after_close(workspace, db) -> subprocess.CompletedProcess:
    """A restore whose tool is SIGKILLed right after it closed the live database."""
    env = {"PATH": f"{KILL_AT_SWAP}{os.pathsep}{workspace.env['PATH']}", "PSQL_FAULT": "kill-tool-after-close"}
    result = workspace.invoke("restore", "--engine", "postgres", "--file", "latest", "--yes", env=env)
    assert result.returncode == -9, (result.returncode, result.stderr)
    assert not allows_connections(db.name)  # the fault really left it closed
    assert [d for d in databases_like(db.name) if "_restoring_" in d]
    return result


@pytest.mark.parametrize("task", [["backup", "--all"], ["doctor"], ["status"]])
def test_a_swap_killed_after_closing_the_database_is_repaired_by_the_next_run(workspace, sample_db, task):
    workspace.write_config(workspace.postgres_config(sample_db.name))
    backup_ok(workspace)
    before = sample_db.checksums()
    kill_restore_after_close(workspace, sample_db)

    result = workspace.invoke(*task)
    assert "Traceback" not in result.stderr
    assert f"reopened database {sample_db.name}" in result.stdout + result.stderr
    assert allows_connections(sample_db.name)
    assert sample_db.checksums() == before  # usable, and the data the application had
    if task[0] == "status":
        # status reopens (the applications need it now) but leaves removal to a run: it names
        # the scratch database with the command that drops it
        assert result.returncode == 1
        assert "_restoring_" in result.stdout and "DROP DATABASE" in result.stdout
    else:
        assert result.returncode == 0, result.stderr
        assert databases_like(sample_db.name) == [sample_db.name]
    if task[0] == "backup":
        assert len(workspace.backups()) == 2


def test_leftover_files_are_removed_by_the_next_run_and_logged(workspace, sample_db):
    workspace.write_config(workspace.postgres_config(sample_db.name))
    backup_ok(workspace)
    [kept] = workspace.backups()
    daily = kept.parent
    leftovers = [
        daily / ".tmp-backup_20200101_000000.sql.gz",
        daily / "backup_20200101_000000.sql.gz.json",  # sidecars whose backup is gone
        daily / "backup_20200101_000000.sql.gz.sha256",
        workspace.backup_dir / "pg" / ".tmp-last_run.json.4242",
        workspace.backup_dir / ".fetch-abc123",
    ]
    for path in leftovers[:-1]:
        path.write_text("x")
    leftovers[-1].mkdir()
    (leftovers[-1] / "backup_20200101_000000.sql.gz").write_text("half a download")
    legacy = daily / "backup_20190101_000000.sql.gz"  # not ours (no record): never touched
    legacy.write_text("old script's backup")
    (daily / (legacy.name + ".sha256")).write_text("abc  " + legacy.name)

    result = workspace.invoke("backup", "--all")
    assert result.returncode == 0, result.stderr
    log = (workspace.backup_dir / "backup.log").read_text()
    for path in leftovers:
        assert not path.exists(), path
        assert f"removed leftover of an interrupted run: {path}" in log
    assert kept.exists() and kept.with_name(kept.name + ".json").exists()
    assert kept.with_name(kept.name + ".sha256").exists()
    assert legacy.exists() and (daily / (legacy.name + ".sha256")).exists()
    assert len([p for p in workspace.backups() if p != legacy]) == 2


def hold_session(dbname: str) -> subprocess.Popen:
    """A psql session connected to ``dbname`` until its stdin closes."""
    argv = ["psql", "-X", "-q", "-h", PGHOST, "-p", PGPORT, "-U", PGUSER, "-d", dbname]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    proc.stdin.write("SELECT 1;\n")
    proc.stdin.flush()
    for _ in range(100):
        if psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{dbname}';") != "0":
            return proc
        time.sleep(0.05)
    raise AssertionError("the session never connected")


def test_scratch_databases_are_dropped_unless_in_use_and_status_names_what_is_left(workspace, sample_db):
    workspace.write_config(workspace.postgres_config(sample_db.name))
    base = sample_db.name
    unused = [f"{base}_restoring_20200101_000000", f"{base}_drill_20200101_000000"]
    busy = f"{base}_restoring_20200101_000001"
    foreign = f"{base}x_restoring_20200101_000000"  # another database's scratch: not ours
    for name in [*unused, busy, foreign]:
        psql(f'CREATE DATABASE "{name}";')
    holder = hold_session(busy)
    try:
        status = workspace.invoke("status")
        assert status.returncode == 1
        for name in [*unused, busy]:
            assert name in status.stdout
        assert f"{busy} (in use by 1 session(s)); remove it with: psql" in status.stdout
        assert f'DROP DATABASE IF EXISTS "{busy}" WITH (FORCE);' in status.stdout
        assert foreign not in status.stdout
        assert set(databases_like(base)) == {base, *unused, busy, foreign}  # status removes nothing

        doctor = workspace.invoke("doctor")
        assert doctor.returncode == 1
        assert "Traceback" not in doctor.stderr
        for name in unused:
            assert f"dropped scratch database {name}" in doctor.stdout
        assert busy in doctor.stdout and "DROP DATABASE" in doctor.stdout
        assert set(databases_like(base)) == {base, busy, foreign}
    finally:
        holder.stdin.close()
        holder.wait()
    doctor = workspace.invoke("doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert set(databases_like(base)) == {base, foreign}
    assert workspace.invoke("doctor").stdout.strip() == "doctor: nothing to repair"


HOLDER = """
import sys
from pathlib import Path
from lib.lock import run_lock
with run_lock(Path(sys.argv[1]), sys.argv[2]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def hold_lock(workspace, command: str = "test holder") -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(workspace.backup_dir), command],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout.readline().strip() == b"locked"
    return proc


def test_a_run_waits_out_the_moment_status_holds_the_lock(workspace, sample_db):
    """status takes the lock for its leftover check; a nightly backup starting then must not fail."""
    workspace.write_config(workspace.postgres_config(sample_db.name))
    workspace.backup_dir.mkdir()
    holder = hold_lock(workspace, "status")
    releaser = threading.Timer(1.5, holder.stdin.close)
    releaser.start()
    try:
        result = workspace.invoke("backup", "--all")
    finally:
        releaser.join()
        holder.wait()
    assert result.returncode == 0, result.stderr
    other = hold_lock(workspace)  # any other holder: refused at once, as before
    try:
        started = time.monotonic()
        result = workspace.invoke("backup", "--all")
        assert result.returncode == 1 and "another run holds the lock" in result.stderr
        assert time.monotonic() - started < 8
    finally:
        other.stdin.close()
        other.wait()


def test_a_live_runs_files_and_scratch_database_are_never_touched(workspace, sample_db):
    """Leftovers are only removed by a run that holds the lock: while another run holds it, its
    temp file and scratch database are its own."""
    workspace.write_config(workspace.postgres_config(sample_db.name))
    backup_ok(workspace)
    [kept] = workspace.backups()
    live = kept.parent / ".tmp-backup_20300101_000000.sql.gz"
    live.write_text("being written")
    scratch = f"{sample_db.name}_restoring_20300101_000000"
    psql(f'CREATE DATABASE "{scratch}";')
    holder = hold_lock(workspace)
    try:
        doctor = workspace.invoke("doctor")
        assert doctor.returncode == 1 and "another run holds the lock" in doctor.stderr
        status = workspace.invoke("status")
        assert status.returncode == 0, status.stdout
        assert live.exists() and scratch in databases_like(sample_db.name)
    finally:
        holder.stdin.close()
        holder.wait()
    backup_ok(workspace)  # the lock is free: the next run removes them
    assert not live.exists() and scratch not in databases_like(sample_db.name)
