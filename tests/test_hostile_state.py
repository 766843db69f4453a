"""Hostile state and a hostile machine, through the real Invoke tasks and the real PostgreSQL
server: edited records, a full disk (a real small tmpfs), read-only directories (real read-only
mounts, since root ignores permission bits), a table locked by another session, symbolic links
where the tool keeps its own files, and checksums that disagree with the record."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import PGHOST, PGPORT, PGUSER, databases_like

HOOK = "import json, os; json.dump({k: v for k, v in os.environ.items() if k.startswith('BACKUP_')}, open('hook.json', 'w'))"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def two_databases(workspace, dbname: str, **top) -> dict:
    """backup.yml with databases 'pg' and 'pg2' (both dumping ``dbname``), a failure hook writing
    hook.json, and a Prometheus textfile."""
    config = workspace.postgres_config(dbname)
    config["databases"]["pg2"] = dict(config["databases"]["pg"])
    config["notify"] = {"on_failure": [sys.executable, "-c", HOOK]}
    config["monitoring"] = {"prometheus_textfile": "lemon.prom"}
    config.update(top)
    workspace.write_config(config)
    return config


def hook_env(workspace) -> dict:
    return json.loads((workspace.path / "hook.json").read_text())


def last_run(workspace, name: str) -> dict:
    return json.loads((workspace.backup_dir / name / "last_run.json").read_text())


def one_line(result: subprocess.CompletedProcess) -> str:
    """The last stderr line, after checking that no traceback was shown."""
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr
    return result.stderr.strip().splitlines()[-1]


# -- item 5: malformed records ----------------------------------------------------------------------

BAD_RECORDS = {
    "created-yesterday": lambda r: r.update(created="yesterday"),
    "no-tier": lambda r: r.pop("tier"),
    "tier-wrong-type": lambda r: r.update(tier=["daily"]),
    "huge-size": lambda r: r.update(size=10**400),
    "size-infinite": lambda r: r.update(size=float("inf")),
    "verified-string": lambda r: r.update(verified="yes"),
    "destinations-list": lambda r: r.update(destinations=[1, 2]),
    "tables-wrong-type": lambda r: r.update(engine_meta={"tables": {"public.users": "many"}}),
    "sha256-number": lambda r: r.update(sha256=12345),
    "json-list": None,
    "invalid-json": None,
    "deeply-nested": None,
}


def write_bad_copies(good: Path) -> dict[str, Path]:
    """Copies of ``good``, each with one kind of broken record. Their names are old (a retention
    that trusted the name would delete them); where the record's time is readable it says 2099
    (a 'latest' that trusted the record would pick them). Returns kind -> backup path."""
    record = json.loads(good.with_name(good.name + ".json").read_text())
    record["created"] = "2099-12-31T23:00:00Z"
    made = {}
    for index, (kind, change) in enumerate(BAD_RECORDS.items()):
        path = good.with_name(f"backup_20200101_0000{index:02d}{good.name[len('backup_20260101_000000') :]}")
        shutil.copyfile(good, path)
        shutil.copyfile(good.with_name(good.name + ".sha256"), path.with_name(path.name + ".sha256"))
        target = path.with_name(path.name + ".json")
        if kind == "json-list":
            target.write_text("[1, 2, 3]")
        elif kind == "invalid-json":
            target.write_text('{"file": "' + path.name + '", "created": ')
        elif kind == "deeply-nested":
            target.write_text("[" * 100_000 + "]" * 100_000)
        else:
            edited = dict(record, file=path.name)
            change(edited)
            target.write_text(json.dumps(edited))
        made[kind] = path
    return made


def test_malformed_records_are_one_warning_each_and_every_task_goes_on(workspace, sample_db):
    two_databases(workspace, sample_db.name)
    first = workspace.invoke("backup", "--db", "pg")
    assert first.returncode == 0, first.stderr
    [good] = workspace.backups()
    bad = write_bad_copies(good)
    link = good.with_name("backup_20200101_005959" + good.name[len("backup_20260101_000000") :])
    shutil.copyfile(good, link)
    victim = workspace.path / "victim.json"
    victim.write_text(good.with_name(good.name + ".json").read_text().replace(good.name, link.name))
    link.with_name(link.name + ".json").symlink_to(victim)  # a record that is a link is not followed
    bad["symlink"] = link
    before = {path: sha(path.with_name(path.name + ".json")) for path in bad.values()}

    result = workspace.invoke("backup", "--all")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    for kind, path in bad.items():  # one warning per file, though several steps list the backups
        warnings = [line for line in result.stderr.splitlines() if f"{path.name}.json: invalid record" in line]
        assert len(warnings) == 1, (kind, result.stderr)
    assert len(workspace.backups("pg2")) == 1 and last_run(workspace, "pg2")["status"] == "success"
    assert last_run(workspace, "pg")["status"] == "success"

    listed = workspace.invoke("list")
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    assert all(f"{path.name}" in listed.stdout for path in bad.values())
    assert listed.stdout.count("INVALID record") == len(bad)

    status = workspace.invoke("status", "--json")
    assert status.returncode == 1 and "Traceback" not in status.stderr, status.stderr  # a problem worth a look
    report = json.loads(status.stdout)
    assert report["databases"]["pg"]["newest_verified"]["file"] not in {p.name for p in bad.values()}
    assert report["problems"] == [
        p for p in report["databases"]["pg"]["problems"] if f"{len(bad)} backup(s) with an invalid record" in p
    ]
    assert report["databases"]["pg2"]["ok"]

    config = two_databases(workspace, sample_db.name)
    config["databases"]["pg"]["retention"] = {"daily": {"keep_days": 1}}
    workspace.write_config(config)
    pruned = workspace.invoke("prune")  # by their names the bad ones are years old: still kept
    assert pruned.returncode == 0 and "Traceback" not in pruned.stderr, pruned.stderr
    assert "deleted 0 backup(s)" in pruned.stdout
    assert all(path.exists() and path.with_name(path.name + ".json").exists() for path in bad.values())

    verified = workspace.invoke("verify")
    assert verified.returncode == 1 and "Traceback" not in verified.stderr
    assert f"FAILED: {len(bad)} backup(s) failed verification" in verified.stderr
    assert f"{good.name} OK" in verified.stderr  # the good ones are verified all the same
    after = {path: sha(path.with_name(path.name + ".json")) for path in bad.values()}
    assert after == before  # invalid records are never rewritten
    assert victim.read_text().count(link.name) == 1 and "reverified_at" not in victim.read_text()

    goods = [p for p in workspace.backups() if p not in bad.values()]
    assert len(goods) == 2
    restored = workspace.invoke("restore", "--engine", "postgres", "--db", "pg", "--file", "latest", "--yes")
    assert restored.returncode == 0 and "Traceback" not in restored.stderr, restored.stderr
    assert f"restored {max(goods)} into" in restored.stdout


def test_a_record_alone_cannot_stop_backup_all_before_any_dump(workspace, sample_db):
    """The issue's case: the only backup of 'pg' has "created": "yesterday"; backup --all still
    backs up both databases, the hook and last_run.json say success, metrics are written."""
    two_databases(workspace, sample_db.name)
    assert workspace.invoke("backup", "--db", "pg").returncode == 0
    [good] = workspace.backups()
    record = good.with_name(good.name + ".json")
    record.write_text(record.read_text().replace('"created": "', '"created": "yesterday", "x": "'))
    result = workspace.invoke("backup", "--all")
    assert result.returncode == 0, result.stderr
    assert len(workspace.backups("pg")) == 2 and len(workspace.backups("pg2")) == 1
    assert (workspace.path / "lemon.prom").read_text().count('lemon_backup_last_run_success{database="pg"} 1') == 1


# -- item 6: a full disk, read-only and unwritable directories -----------------------------------------


@contextlib.contextmanager
def mounted(target: Path, *options: str):
    """``mount OPTIONS target``, unmounted afterwards; skips the test when mounting is not permitted."""
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", *options, str(target)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(
            f"cannot mount here ({proc.stderr.strip() or 'mount failed'}); needs root in a VM or a privileged container"
        )
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


@contextlib.contextmanager
def read_only(directory: Path):
    """``directory`` bind-mounted onto itself read-only (EROFS for every writer, root included)."""
    with mounted(directory, "--bind", str(directory)):
        proc = subprocess.run(["mount", "-o", "remount,ro,bind", str(directory)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot remount read-only: {proc.stderr.strip()}")
        yield directory


def fill(directory: Path) -> None:
    """Write into ``directory`` until its filesystem is full."""
    with open(directory / "filler", "wb") as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 65536)
            handle.flush()


def test_full_disk_fails_that_database_and_the_next_goes_on(workspace, sample_db):
    two_databases(workspace, sample_db.name)
    tier = workspace.backup_dir / "pg" / "daily"
    with mounted(tier, "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs"):
        assert workspace.invoke("backup", "--db", "pg").returncode == 0  # fits
        [earlier] = workspace.backups()
        digest = sha(earlier)
        fill(tier)

        result = workspace.invoke("backup", "--all")
        assert result.returncode == 1
        line = one_line(result)
        assert f"pg: backup FAILED: cannot write {tier}: No space left on device" in result.stderr
        assert "free space on the filesystem" in result.stderr
        assert "failed: pg" in line and "1 of 2" in line
        assert len(workspace.backups("pg2")) == 1  # the next database was backed up
        assert workspace.backups("pg") == [earlier] and sha(earlier) == digest
        assert {p.name for p in tier.iterdir()} == {
            "filler",
            earlier.name,
            earlier.name + ".json",
            earlier.name + ".sha256",
        }  # no temp file, no sidecar of a backup that never was
        env = hook_env(workspace)
        assert env["BACKUP_FAILED"] == "pg" and "No space left on device" in env["BACKUP_ERROR"]
        run = last_run(workspace, "pg")
        assert run["status"] == "failure" and "No space left on device" in run["error"]
        assert 'lemon_backup_last_run_success{database="pg"} 0' in (workspace.path / "lemon.prom").read_text()


def test_read_only_tier_dir_and_read_only_backup_dir(workspace, sample_db):
    two_databases(workspace, sample_db.name)
    assert workspace.invoke("backup", "--all").returncode == 0
    earlier = {p: sha(p) for p in workspace.backups("pg") + workspace.backups("pg2")}

    with read_only(workspace.backup_dir / "pg" / "daily"):
        result = workspace.invoke("backup", "--all")
        assert result.returncode == 1
        one_line(result)
        assert "pg: backup FAILED: cannot write" in result.stderr and "Read-only file system" in result.stderr
        assert len(workspace.backups("pg2")) == 2
        assert hook_env(workspace)["BACKUP_FAILED"] == "pg"
        assert last_run(workspace, "pg")["status"] == "failure"

    (workspace.path / "hook.json").unlink()
    with read_only(workspace.backup_dir):
        result = workspace.invoke("backup", "--all")
        assert result.returncode == 1
        line = one_line(result)
        assert "lock file" in line and "Read-only file system" in line and str(workspace.backup_dir) in line
        assert hook_env(workspace)["BACKUP_STATUS"] == "failure"  # the failure hook ran
    for path, digest in earlier.items():
        assert sha(path) == digest


# -- item 7: a table locked by another session ----------------------------------------------------------


@contextlib.contextmanager
def table_locked(dbname: str, table: str):
    """An idle transaction holding ACCESS EXCLUSIVE on ``table`` until the block ends."""
    tag = f"locker_{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        ["psql", "-X", "-q", "-h", PGHOST, "-p", PGPORT, "-U", PGUSER, "-d", dbname],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PGAPPNAME": tag},
    )
    assert proc.stdin is not None
    proc.stdin.write(f"BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE;\n")
    proc.stdin.flush()
    from conftest import psql

    deadline = time.monotonic() + 20
    query = (
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        f"WHERE a.application_name = '{tag}' AND l.mode = 'AccessExclusiveLock' AND l.granted;"
    )
    while psql(query) == "0":
        assert time.monotonic() < deadline, "the lock was never taken"
        time.sleep(0.05)
    try:
        yield
    finally:
        proc.stdin.close()
        proc.terminate()
        proc.wait(timeout=10)


def test_a_locked_table_fails_the_backup_by_itself(workspace, sample_db):
    config = two_databases(workspace, sample_db.name)
    del config["databases"]["pg2"]
    config["databases"]["pg"]["lock_wait_timeout"] = 1
    workspace.write_config(config)
    with table_locked(sample_db.name, "lessons"):
        result = workspace.invoke("backup", "--all", timeout=120)  # without the timeout this hangs
    assert result.returncode == 1
    line = one_line(result)
    assert "table public.lessons stayed locked by another session for lock_wait_timeout (1s)" in result.stderr
    assert "pg_locks" in result.stderr and "failed: pg" in line
    env = hook_env(workspace)
    assert env["BACKUP_FAILED"] == "pg" and "public.lessons" in env["BACKUP_ERROR"] and env["BACKUP_STAGE"] == "pg_dump"
    assert workspace.backups() == []
    assert workspace.invoke("backup", "--all").returncode == 0  # the lock is gone: the backup works


def test_lock_wait_timeout_in_the_schema_and_the_dump_command(tmp_path):
    from lib.config import load_spec, validation_errors
    from lib.engines import get_engine
    from lib.exec import Place

    base = {"version": 1, "databases": {"pg": {"engine": "postgres", "database": "x"}}}
    assert validation_errors(base) == []
    base["databases"]["pg"]["lock_wait_timeout"] = 2.5
    assert validation_errors(base) == []
    for wrong in (0, -1, "60s"):
        base["databases"]["pg"]["lock_wait_timeout"] = wrong
        assert any("lock_wait_timeout" in e for e in validation_errors(base)), wrong

    def argv(options: dict) -> list[str]:
        config = {"version": 1, "databases": {"pg": {"engine": "postgres", "database": "x", **options}}}
        (tmp_path / "backup.yml").write_text(json.dumps(config))  # JSON is YAML
        db = load_spec(tmp_path / "backup.yml", environ={}).databases["pg"]
        return get_engine("postgres").dump_stages(db, Place()).pop().argv

    assert "--lock-wait-timeout=60000" in argv({})
    assert "--lock-wait-timeout=2500" in argv({"lock_wait_timeout": 2.5})


# -- item 8: symbolic links where the tool keeps its own files -------------------------------------------


@pytest.mark.parametrize("name", [".lock", "backup.log"])
def test_lock_and_log_symlinks_are_refused_and_their_target_untouched(name, workspace, sample_db):
    two_databases(workspace, sample_db.name)
    workspace.backup_dir.mkdir(mode=0o700)
    victim = workspace.path / "victim.txt"
    victim.write_text("precious\n")
    (workspace.backup_dir / name).symlink_to(victim)

    result = workspace.invoke("backup", "--all")
    assert result.returncode in (1, 2)
    line = one_line(result)
    assert f"{workspace.backup_dir / name} is a symbolic link" in line and "rm " in line
    assert victim.read_text() == "precious\n"
    assert workspace.backups() == []
    if name == ".lock":  # the run was refused like a held lock: the failure hook ran
        assert hook_env(workspace)["BACKUP_STATUS"] == "failure"


# -- item 9: the record's sha256 and the sidecar --------------------------------------------------------


def test_record_sha256_is_checked_by_verify_and_restore(workspace, sample_db):
    two_databases(workspace, sample_db.name)
    assert workspace.invoke("backup", "--db", "pg").returncode == 0
    [backup] = workspace.backups()
    record_path = backup.with_name(backup.name + ".json")
    sidecar = backup.with_name(backup.name + ".sha256")
    good = json.loads(record_path.read_text())

    sidecar.unlink()  # no sidecar: the record's sha256 is still checked
    result = workspace.invoke("verify")
    assert result.returncode == 0, result.stderr
    assert f"{backup.name} OK (sha256," in result.stderr

    record_path.write_text(json.dumps(dict(good, sha256="0" * 64)))
    result = workspace.invoke("verify")
    assert result.returncode == 1
    assert f"sha256 does not match the sha256 in its record {record_path.name}" in result.stderr

    sidecar.write_text(f"{good['sha256']}  {backup.name}\n")
    record_path.write_text(json.dumps(dict(good, sha256="f" * 64)))
    before = sample_db.checksums()
    sample_db.sql("UPDATE users SET name = 'changed after the backup';")
    changed = sample_db.checksums()
    result = workspace.invoke("restore", "--engine", "postgres", "--db", "pg", "--file", str(backup), "--yes")
    assert result.returncode == 1
    assert f"sha256 does not match the sha256 in its record {record_path.name}" in one_line(result)
    assert sample_db.checksums() == changed != before  # the database was not touched
    assert databases_like(sample_db.name) == [sample_db.name]  # no scratch database left

    record_path.write_text(json.dumps(good))  # all three agree again: restore works
    result = workspace.invoke("restore", "--engine", "postgres", "--db", "pg", "--file", str(backup), "--yes")
    assert result.returncode == 0, result.stderr
    assert sample_db.checksums() == before
