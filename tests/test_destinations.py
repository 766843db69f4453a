"""Off-site copies against a real OpenSSH server on a loopback port (sftp via paramiko, rsync over
ssh) and a local rsync target: verified pushes, catch-up, remote retention, host key refusal,
a server dying mid-upload, and the real tasks end to end with PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from conftest import databases_like
from sshd import SshServer, free_port, keygen

from lib import offsite, store
from lib.config import load_spec, validation_errors
from lib.destinations import configured
from lib.destinations.base import DestinationFailed, DestinationRefused, retrying
from lib.destinations.rsync import RsyncDestination

KINDS = ["sftp", "sftp-reread", "sftp-no-shell", "rsync", "rsync-rrsync", "local"]


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    server = SshServer(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sshd_sftp_only(tmp_path_factory):
    """A server whose account may only speak SFTP (no shell, so no sha256sum there)."""
    server = SshServer(tmp_path_factory.mktemp("sshd-sftp"), extra_config="ForceCommand internal-sftp").start()
    yield server
    server.stop()


def block(kind: str, server: SshServer, root: Path, name: str | None = None, **extra) -> dict:
    """A destination block of backup.yml for ``kind``, writing into ``root``."""
    common = {"retries": 0, "backoff_seconds": 0, "timeout": 10}
    if kind.startswith("sftp"):
        result = {
            "name": name or "vault",
            "type": "sftp",
            "host": "127.0.0.1",
            "port": server.port,
            "user": server.user,
            "path": str(root),
            "identity_file": str(server.user_key),
            "known_hosts": str(server.known_hosts),
        }
        if kind == "sftp-reread":
            result["verify"] = "reread"
    elif kind.startswith("rsync"):
        result = {
            "name": name or "server",
            "type": "rsync",
            # rrsync confines the account to its directory; paths are relative to it
            "target": f"{server.user}@127.0.0.1:{'/' if kind == 'rsync-rrsync' else root}",
            "ssh": {"port": server.port, "identity_file": str(server.user_key), "known_hosts": str(server.known_hosts)},
        }
    else:
        result = {"name": name or "nas", "type": "rsync", "target": str(root)}
    result.update(common)
    result.update(extra)
    return result


def write_spec(path: Path, destinations: list[dict], **db_extra):
    config = {
        "version": 1,
        "backup_dir": "./backups",
        "databases": {"pg": {"engine": "postgres", "database": "x", "host": "127.0.0.1", **db_extra}},
        "destinations": destinations,
    }
    (path / "backup.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    return load_spec(path / "backup.yml", environ={})


def make_backup(backup_dir: Path, age: timedelta, tier: str = "daily", size: int = 200_000) -> store.Backup:
    """A stored backup as run_backup leaves it (random bytes: the push does not read dumps)."""
    created = store.utcnow() - age
    path = store.ensure_dir(backup_dir / "pg" / tier) / store.backup_filename(created, ".sql.gz")
    data = os.urandom(size)
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    store.sha256_path(path).write_text(store.sha256_line(digest, path.name))
    record = {
        "format": 1,
        "tool": "lemon-backup",
        "name": "pg",
        "engine": "postgres",
        "tier": tier,
        "created": store.iso(created),
        "file": path.name,
        "size": size,
        "sha256": digest,
        "verified": {"ok": True, "at": store.iso(created), "checks": ["sha256"]},
        "destinations": {},
    }
    backup = store.Backup(path, record)
    backup.save()
    return backup


def server_for(kind, sshd, sshd_sftp_only):
    return sshd_sftp_only if kind == "sftp-no-shell" else sshd


def remote_names(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- configuration -----------------------------------------------------------------------------


def test_schema_accepts_both_types_and_names_mistakes(tmp_path):
    base = {"version": 1, "databases": {"pg": {"engine": "postgres", "database": "x"}}}
    good = [
        {"name": "a", "type": "rsync", "target": "/mnt/nas/x", "retention": {"daily": {"keep_days": 3}}},
        {
            "name": "b",
            "type": "rsync",
            "target": "u@h:/x",
            "ssh": {"port": 2222, "identity_file": "~/.ssh/k", "known_hosts": "~/.ssh/kh"},
        },
        {"name": "c", "type": "sftp", "host": "h", "user": "u", "path": "/x", "identity_file": "k", "retries": 1},
    ]
    assert validation_errors({**base, "destinations": good}) == []
    bad = [
        {"name": "a", "type": "rsync", "target": "u@h:/x"},
        {"name": "b", "type": "sftp", "host": "h", "user": "u", "path": "/x", "identity_file": "k", "password": "pw"},
        {"name": "c", "type": "ftp"},
    ]
    errors = validation_errors({**base, "destinations": bad})
    assert any(e.startswith("At 'destinations[0]'") and "'ssh' is a required property" in e for e in errors)
    assert any(e.startswith("At 'destinations[1]'") and "'password'" in e for e in errors)
    assert any(e.startswith("At 'destinations[2].type'") for e in errors)


def test_rsync_runs_ssh_with_strict_host_key_checking(tmp_path):
    spec = write_spec(
        tmp_path,
        [
            {
                "name": "s",
                "type": "rsync",
                "target": "backup@example.org:/b",
                "ssh": {"port": 2200, "identity_file": "/k/id key", "known_hosts": "/k/kh"},
            }
        ],
    )
    [dest] = configured(spec)
    assert isinstance(dest, RsyncDestination)
    ssh = dest.ssh_argv()
    for option in ("StrictHostKeyChecking=yes", "UserKnownHostsFile=/k/kh", "BatchMode=yes", "ConnectTimeout=30"):
        assert option in ssh
    assert ssh[:3] == ["ssh", "-p", "2200"] and ssh[ssh.index("-i") + 1] == "/k/id key"
    argv = dest.base_argv()
    import shlex

    assert shlex.split(argv[argv.index("-e") + 1]) == ssh  # rsync splits -e like a shell
    assert dest.location("pg/daily") == "backup@example.org:/b/pg/daily"


def test_retrying_backs_off_and_does_not_retry_refusals(tmp_path):
    spec = write_spec(
        tmp_path, [{"name": "n", "type": "rsync", "target": str(tmp_path), "retries": 2, "backoff_seconds": 5}]
    )
    [dest] = configured(spec)
    waits, calls = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise DestinationFailed("connection reset")
        return "ok"

    assert retrying(dest, flaky, "upload", sleep=waits.append) == "ok"
    assert waits == [5, 10]

    def refused():
        calls.append(1)
        raise DestinationRefused("host key changed")

    calls.clear()
    with pytest.raises(DestinationRefused):
        retrying(dest, refused, "upload", sleep=waits.append)
    assert len(calls) == 1

    def always():
        raise DestinationFailed("no route to host")

    with pytest.raises(DestinationFailed, match="failed after 3 attempt"):
        retrying(dest, always, "upload", sleep=lambda s: None)


# -- push, list, fetch, catch-up, retention ---------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_push_verifies_records_and_catches_up(kind, tmp_path, sshd, sshd_sftp_only, request):
    server = server_for(kind, sshd, sshd_sftp_only)
    root = tmp_path / "remote"
    root.mkdir()
    if kind == "rsync-rrsync":  # a restricted account: only rsync, only inside root
        server = SshServer(tmp_path / "sshd", key_options=f'command="rrsync {root}",restrict ').start()
        request.addfinalizer(server.stop)
    spec = write_spec(tmp_path, [block(kind, server, root)])
    first = make_backup(spec.backup_dir, timedelta(hours=30))
    second = make_backup(spec.backup_dir, timedelta(hours=2))

    assert offsite.push_all(spec, second) == []
    names = remote_names(root)
    for backup in (first, second):
        for suffix in ("", ".sha256", ".json"):
            assert f"pg/daily/{backup.path.name}{suffix}" in names
        assert sha(root / "pg/daily" / backup.path.name) == backup.record["sha256"]
    assert not [n for n in names if "/." in n], names  # no temporary or partial names left
    [dest] = configured(spec)
    for backup in (first, second):
        info = store.load(backup.path).record["destinations"][dest.name]
        assert info["verified_at"] and info["sha256"] == backup.record["sha256"]
    methods = {"sftp": "sha256sum", "sftp-reread": "re-read", "sftp-no-shell": "re-read"}
    assert info["method"] == methods.get(kind, "rsync --checksum")

    with dest:
        listing = dest.list("pg")
        assert [r.file for r in listing.backups] == [second.path.name, first.path.name]
        assert all(r.verified for r in listing.backups)
        fetch_dir = tmp_path / "fetched"
        fetch_dir.mkdir()
        fetched = dest.fetch(listing.backups[0], fetch_dir)
    assert sha(fetched) == second.record["sha256"] and store.sha256_path(fetched).exists()

    # nothing missing: nothing copied; a copy lost on the remote is copied again (catch-up)
    with dest:
        assert offsite.sync_database(dest, spec, spec.databases["pg"]).pushed == []
    (root / "pg/daily" / first.path.name).unlink()
    with dest:
        assert offsite.sync_database(dest, spec, spec.databases["pg"]).pushed == [f"daily/{first.path.name}"]
    assert sha(root / "pg/daily" / first.path.name) == first.record["sha256"]


@pytest.mark.parametrize("kind", ["sftp", "rsync", "local"])
def test_remote_retention_keeps_foreign_files_and_the_newest_copy(kind, tmp_path, sshd, sshd_sftp_only):
    root = tmp_path / "remote"
    foreign_dir = store.ensure_dir(root / "pg" / "daily")
    foreign = {
        "notes.txt": b"operator notes",
        "backup_20200101_000000.sql.gz": b"made by the old scripts",  # no record: not ours
        "backup_20200102_000000.sql.gz": b"x",
        "backup_20200102_000000.sql.gz.json": b'{"hello": "not a record of ours"}',
    }
    for name, data in foreign.items():
        (foreign_dir / name).write_bytes(data)
    spec = write_spec(tmp_path, [block(kind, sshd, root, retention={"daily": {"keep_days": 5}})])
    newest = make_backup(spec.backup_dir, timedelta(days=1))
    middle = make_backup(spec.backup_dir, timedelta(days=3))
    expired = make_backup(spec.backup_dir, timedelta(days=10))
    db = spec.databases["pg"]
    [dest] = configured(spec)

    with dest:
        result = offsite.sync_database(dest, spec, db)
    assert sorted(result.pushed) == sorted(f"daily/{b.path.name}" for b in (newest, middle))
    assert result.skipped == [f"daily/{expired.path.name}"]  # past the destination's retention: not copied

    with dest:
        result = offsite.sync_database(dest, spec, db, now=store.utcnow() + timedelta(days=30))
    assert result.deleted == [f"daily/{middle.path.name}"]
    left = {p.name for p in foreign_dir.iterdir()}
    assert set(foreign) <= left  # files that are not our backups survive
    assert {
        newest.path.name,
        newest.path.name + ".json",
        newest.path.name + ".sha256",
    } <= left  # newest verified copy kept
    assert not [n for n in left if n.startswith(middle.path.name)]
    assert dest.name not in store.load(middle.path).record["destinations"]  # the local record follows
    assert middle.path.exists() and expired.path.exists()  # local backups untouched


# -- host keys ------------------------------------------------------------------------------------


def _other_host_key(tmp_path: Path) -> str:
    pub = Path(str(keygen(tmp_path / "other_host_key", "other")) + ".pub").read_text().split()
    return f"{pub[0]} {pub[1]}"


@pytest.mark.parametrize("kind", ["sftp", "rsync"])
@pytest.mark.parametrize("case", ["unknown", "changed"])
def test_unknown_or_changed_host_key_is_refused(kind, case, workspace, sshd):
    known_hosts = workspace.path / "known_hosts"
    other = _other_host_key(workspace.path)
    if case == "unknown":
        known_hosts.write_text(f"[127.0.0.1]:{free_port()} {other}\n")
    else:
        known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {other}\n")
    dest = block(kind, sshd, workspace.path / "remote")
    (dest["ssh"] if kind == "rsync" else dest)["known_hosts"] = str(known_hosts)
    config = workspace.postgres_config("unused")
    config["destinations"] = [dest]
    workspace.write_config(config)

    result = workspace.invoke("list", "--dest", dest["name"])
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in message
    if case == "unknown":
        assert "is not in" in message and f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {known_hosts}" in message
    else:
        assert "CHANGED" in message and "ssh-keygen -R" in message
    assert not (workspace.path / "remote").exists()


# -- a server dying mid-upload ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sftp", "rsync"])
def test_server_killed_mid_upload_leaves_no_final_file_and_catch_up_works(kind, tmp_path):
    server = SshServer(tmp_path / "sshd").start()
    try:
        root = tmp_path / "remote"
        root.mkdir()
        extra = {"retries": 1} if kind == "sftp" else {"bwlimit": 4000}
        spec = write_spec(tmp_path, [block(kind, server, root, **extra)])
        backup = make_backup(spec.backup_dir, timedelta(hours=1), size=24 << 20)
        db = spec.databases["pg"]
        [dest] = configured(spec)
        tier_dir = root / "pg" / "daily"

        if kind == "sftp":

            def kill_after_a_few_chunks(sent: int) -> None:
                if sent >= 4 << 20 and server.proc is not None:
                    server.kill()

            with dest, pytest.raises(DestinationFailed, match="after 2 attempt"):
                offsite.sync_database(dest, spec, db, progress=kill_after_a_few_chunks)
        else:
            errors = []

            def run() -> None:
                try:
                    with dest:
                        offsite.sync_database(dest, spec, db)
                except DestinationFailed as exc:
                    errors.append(exc)

            worker = threading.Thread(target=run)
            worker.start()
            while worker.is_alive():  # kill once a part of the file has arrived under rsync's temp name
                if any(p.stat().st_size > 1 << 20 for p in tier_dir.glob(".backup_*")):
                    server.kill()
                    break
            worker.join()
            assert errors, "the upload should have failed"

        assert not (tier_dir / backup.path.name).exists()  # never a partial file under the final name
        assert not (tier_dir / (backup.path.name + ".json")).exists()
        assert "server" not in store.load(backup.path).record["destinations"]
        assert sha(backup.path) == backup.record["sha256"]  # the local backup stays

        server.start()
        spec = write_spec(tmp_path, [block(kind, server, root)])
        [dest] = configured(spec)
        with dest:
            assert offsite.sync_database(dest, spec, db).pushed == [f"daily/{backup.path.name}"]
        assert sha(tier_dir / backup.path.name) == backup.record["sha256"]
        assert {p.name for p in tier_dir.rglob("*") if p.is_file()} == {
            backup.path.name,
            backup.path.name + ".sha256",
            backup.path.name + ".json",
        }
        assert dest.name in store.load(backup.path).record["destinations"]
    finally:
        server.stop()


# -- the real tasks with PostgreSQL ------------------------------------------------------------


def test_backup_copies_to_both_types_and_restores_from_each(workspace, sample_db, sshd):
    config = workspace.postgres_config(sample_db.name)
    vault_root, server_root = workspace.path / "vault", workspace.path / "server"
    config["destinations"] = [block("sftp", sshd, vault_root), block("rsync", sshd, server_root)]
    workspace.write_config(config)
    before = sample_db.checksums()

    result = workspace.invoke("backup", "--all")
    assert result.returncode == 0, result.stderr
    [backup] = workspace.backups()
    record = json.loads(Path(str(backup) + ".json").read_text())
    assert set(record["destinations"]) == {"vault", "server"}
    for root in (vault_root, server_root):
        assert sha(root / "pg/daily" / backup.name) == record["sha256"]

    listed = workspace.invoke("list", "--dest", "vault")
    assert listed.returncode == 0, listed.stderr
    assert backup.name in listed.stdout and "verified copy" in listed.stdout

    shutil.rmtree(workspace.backup_dir / "pg")  # the machine's disk is gone; the copies are not
    sample_db.sql("DELETE FROM messages; UPDATE users SET name = 'changed';")
    result = workspace.invoke("restore", "--engine", "postgres", "--from", "vault", "--file", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert "restored vault:" in result.stdout
    assert sample_db.checksums() == before

    sample_db.sql("TRUNCATE lessons;")
    result = workspace.invoke(
        "restore", "--engine", "postgres", "--from", "server", "--file", backup.name, "--yes", "--drop-previous"
    )
    assert result.returncode == 0, result.stderr
    assert sample_db.checksums() == before
    assert not list(workspace.backup_dir.glob(".fetch-*"))  # the download area is removed

    # a damaged remote copy is refused before any database is touched
    copy = vault_root / "pg/daily" / backup.name
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    sample_db.sql("TRUNCATE lessons;")
    result = workspace.invoke("restore", "--engine", "postgres", "--from", "vault", "--file", "latest", "--yes")
    assert result.returncode == 1 and "damaged" in result.stderr
    assert sample_db.sql("SELECT count(*) FROM lessons;") == "0"
    assert len(databases_like(sample_db.name)) == 2  # the database and the one kept from the first restore


def test_failing_destination_does_not_stop_the_other_and_exits_1(workspace, sample_db, sshd):
    config = workspace.postgres_config(sample_db.name)
    vault_root, server_root = workspace.path / "vault", workspace.path / "server"
    broken = block("rsync", sshd, server_root, retries=1)
    broken["ssh"]["port"] = free_port()  # nothing listens there: the server is down
    config["destinations"] = [broken, block("sftp", sshd, vault_root)]
    workspace.write_config(config)

    result = workspace.invoke("backup", "--all")
    assert result.returncode == 1
    assert "off-site copies FAILED" in result.stderr and "server:" in result.stderr
    assert "retry 1 of 1" in result.stderr
    [backup] = workspace.backups()  # the local backup stays, verified
    record = json.loads(Path(str(backup) + ".json").read_text())
    assert record["verified"]["ok"] and list(record["destinations"]) == ["vault"]
    assert (vault_root / "pg/daily" / backup.name).is_file()
    assert not server_root.exists()

    assert workspace.invoke("offsite", "--dest", "nope").returncode == 2
    config["destinations"][0]["ssh"]["port"] = sshd.port  # the server is back
    workspace.write_config(config)
    result = workspace.invoke("offsite")
    assert result.returncode == 0, result.stderr
    assert sha(server_root / "pg/daily" / backup.name) == record["sha256"]
    record = json.loads(Path(str(backup) + ".json").read_text())
    assert set(record["destinations"]) == {"vault", "server"}


# -- rsync: a fresh server, permanent and transient errors ------------------------------------------


@pytest.mark.parametrize("how", ["mkpath", "ssh-mkdir"])
def test_rsync_creates_missing_remote_folders(how, tmp_path, sshd, monkeypatch):
    """A fresh server: the target's folders do not exist yet. rsync creates them (--mkpath; with an
    rsync older than 3.2.3, mkdir -p over ssh with the path quoted for the remote shell)."""
    from lib.destinations import rsync

    if how == "ssh-mkdir":
        monkeypatch.setattr(rsync, "rsync_version", lambda: (3, 1, 3))
    root = tmp_path / "fresh server" / "it's $(touch pwned)" / "backups"
    spec = write_spec(tmp_path, [block("rsync", sshd, root, retries=0)])
    backup = make_backup(spec.backup_dir, timedelta(hours=1))
    assert offsite.push_all(spec, backup) == []
    assert sha(root / "pg" / "daily" / backup.path.name) == backup.record["sha256"]
    assert (root / "pg" / "daily" / (backup.path.name + ".json")).is_file()
    assert not list(tmp_path.rglob("pwned")) and not Path("pwned").exists()  # the path was quoted, never run


def test_rsync_permanent_errors_fail_at_once_and_transient_ones_are_retried(tmp_path, sshd):
    (tmp_path / "a-file").write_text("not a directory")
    spec = write_spec(tmp_path, [block("rsync", sshd, tmp_path / "a-file" / "backups", retries=3)])
    backup = make_backup(spec.backup_dir, timedelta(hours=1))
    [dest] = configured(spec)
    waits: list[float] = []
    with dest, pytest.raises(DestinationRefused, match="Not a directory") as refused:
        retrying(dest, lambda: dest.push(backup), "upload", sleep=waits.append)
    assert waits == []  # not retried
    assert "\n" not in str(refused.value) and "not retried" in str(refused.value)

    down = block("rsync", sshd, tmp_path / "remote", retries=2, backoff_seconds=0.5)
    down["ssh"]["port"] = free_port()  # nothing listens: connection refused, retried
    spec = write_spec(tmp_path, [down])
    [dest] = configured(spec)
    with dest, pytest.raises(DestinationFailed, match="after 3 attempt"):
        retrying(dest, lambda: dest.push(backup), "upload", sleep=waits.append)
    assert waits == [0.5, 1.0]


def test_rsync_classifies_errors(tmp_path):
    spec = write_spec(
        tmp_path,
        [{"name": "s", "type": "rsync", "target": "u@h:/b", "ssh": {"identity_file": "/k", "known_hosts": "/kh"}}],
    )
    [dest] = configured(spec)
    transient = [
        ("ssh: connect to host h port 22: Connection refused\nrsync: connection unexpectedly closed", 255),
        ("Connection reset by 10.0.0.1 port 22", 255),
        ("ssh: connect to host h port 22: Connection timed out", 255),
        ("rsync error: timeout in data send/receive (code 30)", 30),
    ]
    for stderr, code in transient:
        assert type(dest.classify(stderr, "upload", code)) is DestinationFailed, stderr
    permanent = [
        ('rsync: [Receiver] mkdir "/b/pg" failed: No such file or directory (2)', 11),
        ('rsync: [Receiver] mkstemp "/b/x" failed: Permission denied (13)', 23),
        ("u@h: Permission denied (publickey).", 255),
        ("Host key verification failed.", 255),
        ('rsync: [Receiver] write failed on "/b/x": No space left on device (28)', 11),
    ]
    for stderr, code in permanent:
        assert isinstance(dest.classify(stderr, "upload", code), DestinationRefused), stderr
    assert not isinstance(dest.classify("something odd", "upload", 2), DestinationFailed)  # unknown: not retried


def test_dest_check_lists_each_database_once_and_names_the_problem(tmp_path):
    """The default check (rsync, sftp): one listing per database, no retries, the problem in one line."""
    spec = write_spec(
        tmp_path,
        [
            {"name": "nas", "type": "rsync", "target": str(tmp_path), "retries": 3, "backoff_seconds": 60},
            {
                "name": "gone",
                "type": "rsync",
                "target": str(tmp_path / "unmounted"),
                "retries": 3,
                "backoff_seconds": 60,
            },
        ],
    )
    make_backup(spec.backup_dir, timedelta(hours=1))
    nas, gone = configured(spec)
    lines, problems = nas.check()
    assert problems == [] and "  pg: 0 backup(s) listed" in lines
    lines, problems = gone.check()  # would wait 60 s and more if it retried
    assert len(problems) == 1 and "does not exist" in problems[0] and "\n" not in problems[0]
