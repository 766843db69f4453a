"""Encrypted backups end to end: the real Invoke tasks, real PostgreSQL, real gpg with keyrings made
in the test."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import DOUBLES, ROOT, databases_like, with_fixed_tier
from gpgkeys import GPG, keyring_factory

PASSPHRASE = "two words 'single' \"double\" 한국어 비밀 ü $HOME \\n"
MARKER = b"-- PostgreSQL database dump complete"


@pytest.fixture
def keyrings():
    yield from keyring_factory()


def gpg_wrapper(directory: Path, path: str) -> tuple[dict, Path]:
    """A 'gpg' earlier on PATH that appends its argv and environment to a log, then runs the real gpg."""
    directory.mkdir()
    log = directory / "gpg-calls.log"
    script = directory / "gpg"
    script.write_text(
        f"#!/bin/sh\n{{ printf 'ARGV'; printf ' %s' \"$@\"; printf '\\n'; env; }} >> '{log}'\nexec '{GPG}' \"$@\"\n"
    )
    script.chmod(0o755)
    return {"PATH": f"{directory}:{path}"}, log


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith(("error:", "FAILED:"))]
    assert len(lines) == 1, stderr
    return lines[0]


def untouched(sample_db, expected: dict) -> None:
    """The database still has ``expected`` content and no temporary/renamed copies exist."""
    assert sample_db.checksums() == expected
    assert databases_like(sample_db.name) == [sample_db.name]


def run_watching(workspace, args: list[str], env: dict, secret: bytes) -> tuple[subprocess.CompletedProcess, list]:
    """Run an invoke task while a thread reads every process's command line (and every process's
    environment except the task's own, which was handed the variable) looking for ``secret``."""
    argv = [sys.executable, "-m", "invoke", "-r", str(ROOT), *with_fixed_tier(args), "--config", str(workspace.config)]
    full_env = {**workspace.env, **env}
    proc = subprocess.Popen(
        argv, cwd=workspace.path, env=full_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    seen: list[str] = []
    scans = [0]
    stop = threading.Event()

    own_cmdline = b"\0".join(arg.encode() for arg in argv) + b"\0"

    def watch() -> None:
        while not stop.is_set():
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    cmdline = (entry / "cmdline").read_bytes()
                    environ = (entry / "environ").read_bytes()
                except OSError:
                    continue
                if secret in cmdline:
                    seen.append(f"pid {entry.name} command line: {cmdline[:300]!r}")
                # The task process was given the variable; so is a fork of it until it execs.
                if secret in environ and int(entry.name) != proc.pid and cmdline != own_cmdline:
                    seen.append(f"pid {entry.name} environment: {cmdline[:300]!r}")
            scans[0] += 1
            stop.wait(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        stop.set()
        watcher.join()
    assert scans[0] > 0
    return subprocess.CompletedProcess(argv, proc.returncode, out.decode(), err.decode()), seen


def encrypted_config(workspace, dbname: str, encryption: dict) -> None:
    config = workspace.postgres_config(dbname)
    config["encryption"] = encryption
    workspace.write_config(config)


def test_symmetric_round_trip_secret_never_in_argv_or_child_environment(workspace, sample_db, keyrings, tmp_path):
    keyring = keyrings()
    encrypted_config(
        workspace,
        sample_db.name,
        {"mode": "symmetric", "passphrase_env": "BACKUP_PASSPHRASE", "gnupghome": str(keyring.home)},
    )
    wrapper_env, calls = gpg_wrapper(tmp_path / "wrap", workspace.env["PATH"])
    env = {**wrapper_env, "BACKUP_PASSPHRASE": PASSPHRASE}
    before = sample_db.checksums()

    result, seen = run_watching(workspace, ["backup", "--all"], env, PASSPHRASE.encode())
    assert result.returncode == 0, result.stderr
    assert seen == []
    log = calls.read_bytes()
    assert b" --symmetric " in log and b"--passphrase-fd" in log  # the wrapper saw the real gpg calls
    assert PASSPHRASE.encode() not in log
    assert PASSPHRASE not in (workspace.backup_dir / "backup.log").read_text()

    [backup] = workspace.backups()
    assert backup.name.endswith(".sql.gz.gpg")
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    check = subprocess.run(["sha256sum", "-c", backup.name + ".sha256"], cwd=backup.parent, capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr
    record = json.loads(backup.with_name(backup.name + ".json").read_text())
    assert record["encryption"] == {"mode": "symmetric", "tool": "gpg", "cipher": "AES256"}
    assert record["verified"]["checks"][:3] == ["sha256", "gpg-decrypt", "gzip-integrity"]
    assert "row-counts" in record["verified"]["checks"]
    listing = workspace.invoke("list")
    assert "verified [sha256,gpg-decrypt,gzip-integrity" in listing.stdout

    # docs/encryption.md's manual recovery: plain gpg (passphrase typed; here from a file) | gunzip.
    typed = tmp_path / "typed"
    typed.write_bytes(PASSPHRASE.encode())
    manual = subprocess.run(
        f"{GPG} --homedir {keyring.home} --batch --pinentry-mode loopback --passphrase-file {typed} -d {backup} | gunzip",
        shell=True,
        capture_output=True,
    )
    assert MARKER in manual.stdout, manual.stderr

    sample_db.sql("DELETE FROM messages WHERE id > 10;")
    damaged = sample_db.checksums()
    wrong = workspace.invoke(
        "restore", "--engine", "postgres", "--file", "latest", "--yes", env={**env, "BACKUP_PASSPHRASE": "nope"}
    )
    assert wrong.returncode == 2
    assert "wrong passphrase" in one_error_line(wrong.stderr)
    untouched(sample_db, damaged)

    result = workspace.invoke(
        "restore", "--engine", "postgres", "--file", "latest", "--yes", "--drop-previous", env=env
    )
    assert result.returncode == 0, result.stderr
    untouched(sample_db, before)

    # A damaged (truncated) file is refused by verify and by restore; the database is not touched.
    backup.write_bytes(backup.read_bytes()[: backup.stat().st_size // 2])
    sample_db.sql("DELETE FROM lessons;")
    changed = sample_db.checksums()
    verify = workspace.invoke("verify", env=env)
    assert verify.returncode == 1, verify.stderr
    restore = workspace.invoke("restore", "--engine", "postgres", "--file", str(backup), "--yes", env=env)
    assert restore.returncode == 1
    assert "sha256 does not match" in one_error_line(restore.stderr)
    untouched(sample_db, changed)


def test_failure_before_encryption_names_the_final_backup(workspace, sample_db, keyrings):
    """The check before encryption fails on a truncated dump: the message names the backup's final
    name (what the operator knows), never the temporary .tmp-backup_... file."""
    owner, host = keyrings(), keyrings()
    fpr = owner.new_key("ops@example.com")
    host.import_keys(owner.export(fpr))
    encrypted_config(
        workspace,
        sample_db.name,
        {"mode": "public-key", "recipients": ["ops@example.com"], "gnupghome": str(host.home)},
    )
    env = {"PATH": f"{DOUBLES / 'faulty'}:{workspace.env['PATH']}", "PG_DUMP_FAULT": "truncate-exit0"}
    result = workspace.invoke("backup", "--all", env=env)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    pattern = r"backup FAILED: backup_\d{8}_\d{6}\.sql\.gz\.gpg failed verification before encryption: "
    assert re.search(pattern, result.stderr), result.stderr
    assert ".tmp-" not in result.stderr
    assert workspace.backups() == []


def test_public_key_round_trip_backup_host_without_secret_key(workspace, sample_db, keyrings):
    owner, host = keyrings(), keyrings()
    fpr = owner.new_key("ops@example.com")
    host.import_keys(owner.export(fpr))  # the backup host gets the public key only
    encrypted_config(
        workspace,
        sample_db.name,
        {"mode": "public-key", "recipients": ["ops@example.com"], "gnupghome": str(host.home)},
    )
    before = sample_db.checksums()

    keys = workspace.invoke("keys")
    assert keys.returncode == 0, keys.stderr
    assert fpr in keys.stdout and "no secret key here" in keys.stdout and "usable" in keys.stdout

    result = workspace.invoke("backup", "--all")
    assert result.returncode == 0, result.stderr
    assert "tee (verify before encryption) | gpg --encrypt" in result.stderr
    [backup] = workspace.backups()
    assert backup.name.endswith(".sql.gz.gpg")
    record = json.loads(backup.with_name(backup.name + ".json").read_text())
    assert record["encryption"]["recipients"] == [fpr]
    checks = record["verified"]["checks"]
    assert checks[:3] == ["sha256", "gpg-packets", "openpgp-framing"]
    assert {"pre-encryption:gzip-integrity", "pre-encryption:dump-complete", "pre-encryption:row-counts"} <= set(checks)
    assert record["engine_meta"]["tables"] == {"public.lessons": 120, "public.messages": 500, "public.users": 300}
    assert "pre-encryption:dump-complete" in workspace.invoke("list").stdout

    verify = workspace.invoke("verify")
    assert verify.returncode == 0, verify.stderr
    assert "OK (sha256, gpg-packets, openpgp-framing)" in verify.stderr
    # re-verification is added to the record; the checks made before encryption stay
    record = json.loads(backup.with_name(backup.name + ".json").read_text())
    assert record["verified"]["checks"] == checks
    assert record["verified"]["reverify_checks"] == ["sha256", "gpg-packets", "openpgp-framing"]
    assert record["verified"]["ok"] is True and record["verified"]["reverified_at"]
    listing = workspace.invoke("list").stdout
    assert "pre-encryption:dump-complete" in listing and "re-verified " in listing

    sample_db.sql("UPDATE users SET name = 'changed';")
    changed = sample_db.checksums()
    no_key = workspace.invoke("restore", "--engine", "postgres", "--file", "latest", "--yes")
    assert no_key.returncode == 2
    assert "no usable secret key" in one_error_line(no_key.stderr)
    untouched(sample_db, changed)

    host.import_keys(owner.export(fpr, secret=True))  # now this host can restore
    result = workspace.invoke("restore", "--engine", "postgres", "--file", "latest", "--yes", "--drop-previous")
    assert result.returncode == 0, result.stderr
    assert "verified (sha256, gpg-decrypt, gzip-integrity" in result.stderr
    untouched(sample_db, before)

    backup.write_bytes(backup.read_bytes()[:-100])
    # refresh the sidecar so the checksum cannot be what catches it: the OpenPGP framing check must
    digest = subprocess.run(["sha256sum", backup.name], cwd=backup.parent, capture_output=True, text=True).stdout
    (backup.parent / (backup.name + ".sha256")).write_text(digest)
    record = backup.parent / (backup.name + ".json")  # and the record's: verify also checks that one
    record.write_text(record.read_text().replace(json.loads(record.read_text())["sha256"], digest.split()[0]))
    sample_db.sql("DELETE FROM messages;")
    changed = sample_db.checksums()
    verify = workspace.invoke("verify")
    assert verify.returncode == 1
    assert "truncated" in verify.stderr
    record = json.loads(backup.with_name(backup.name + ".json").read_text())
    assert record["verified"]["ok"] is False and "truncated" in record["verified"]["error"]
    assert record["verified"]["checks"] == checks  # what the backup run proved is kept, marked not ok
    assert "NOT verified (re-verification failed" in workspace.invoke("list").stdout
    latest = workspace.invoke("restore", "--engine", "postgres", "--file", "latest", "--yes")
    assert latest.returncode == 2 and "no verified backup" in latest.stderr  # latest skips it
    restore = workspace.invoke("restore", "--engine", "postgres", "--file", str(backup), "--yes")
    assert restore.returncode == 1
    one_error_line(restore.stderr)
    untouched(sample_db, changed)


@pytest.mark.parametrize("problem", ["expired", "unknown"])
def test_unusable_recipient_stops_the_run_before_any_dump(workspace, keyrings, problem):
    keyring = keyrings()
    if problem == "expired":
        keyring.new_key("ops@example.com", expire="1d", faked_time="20200101T000000")
    encrypted_config(
        workspace,
        "no_such_db",
        {"mode": "public-key", "recipients": ["ops@example.com"], "gnupghome": str(keyring.home)},
    )
    result = workspace.invoke("backup", "--all")
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert "recipient 'ops@example.com'" in line
    assert ("expired on 2020-01-02" if problem == "expired" else "has no public key in keyring") in line
    assert "started" not in result.stderr
    assert workspace.backups() == []


def test_symmetric_with_gpgs_default_home_that_does_not_exist_yet(workspace, sample_db):
    """No gnupghome configured and no ~/.gnupg (a fresh root or service account): gpg in batch mode
    would fail with 'No agent running' after the whole dump; the tool creates the home (0700) first."""
    home = Path(workspace.env["HOME"]) / ".gnupg"
    assert not home.exists()
    encrypted_config(workspace, sample_db.name, {"mode": "symmetric", "passphrase_env": "BACKUP_PASSPHRASE"})
    env = {"BACKUP_PASSPHRASE": "correct horse"}
    try:
        result = workspace.invoke("backup", "--all", env=env)
        assert result.returncode == 0, result.stderr
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        [backup] = workspace.backups()
        assert backup.name.endswith(".sql.gz.gpg")
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)
