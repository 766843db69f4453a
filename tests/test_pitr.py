"""Point-in-time recovery end to end (lib/wal.py, lib/pitr.py) against a real PostgreSQL source
cluster of our own (wal_level replica, 1 MB segments, replication allowed on 127.0.0.1), real
pg_receivewal/pg_basebackup, real gpg; container mode through the docker double only.

One source cluster and one archive (two base backups, commits at known times) serve the module;
tests that damage an archive work on a copy of it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from lib.localpg import Cluster
from tests.conftest import ROOT, Workspace

PASSPHRASE = "correct horse battery staple pitr"


@pytest.fixture(scope="module")
def source():
    """A source cluster on 127.0.0.1 (initdb's default pg_hba.conf allows replication there)."""
    root = Path(tempfile.mkdtemp(prefix="lemon-pitr-src-", dir="/tmp"))
    cluster = Cluster(root, listen="127.0.0.1", initdb_args=("--wal-segsize=1",))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def make_workspace(path: Path, cluster: Cluster, dbname: str, **wal) -> Workspace:
    path.mkdir(parents=True, exist_ok=True)
    ws = Workspace(path)
    db = {"engine": "postgres", "database": dbname, "user": "postgres", "host": "127.0.0.1", "port": cluster.port}
    db["wal"] = {"enabled": True, "partial_snapshot_seconds": 0, **wal}
    ws.write_config({"version": 1, "backup_dir": "./backups", "databases": {"pg": db}})
    return ws


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def count(cluster: Cluster, dbname: str, table: str = "t") -> int:
    return int(cluster.sql(f"SELECT count(*) FROM {table};", dbname))


def insert(cluster: Cluster, dbname: str, first: int, last: int) -> None:
    """Commit rows first..last in one transaction."""
    cluster.sql(f"INSERT INTO t (id) SELECT generate_series({first}, {last});", dbname)


@pytest.fixture(scope="module")
def archive(source, tmp_path_factory):
    """Encrypted (symmetric) WAL archive of database pitr_app: base1, rows 1-10, base2, rows
    11-20, then T (a time between two commits), rows 21-30. Returns (workspace, T, env)."""
    from tests.gpgkeys import Keyring

    keyring = Keyring()
    source.sql("CREATE DATABASE pitr_app;")
    source.sql("CREATE TABLE t (id int PRIMARY KEY, note text DEFAULT 'x');", "pitr_app")
    ws = make_workspace(tmp_path_factory.mktemp("pitr-archive"), source, "pitr_app", base_keep_days=14)
    config = yaml.safe_load(ws.config.read_text())
    config["encryption"] = {"mode": "symmetric", "passphrase_env": "PITR_PASSPHRASE", "gnupghome": str(keyring.home)}
    ws.write_config(config)
    ws.env["PITR_PASSPHRASE"] = PASSPHRASE
    ok(ws.invoke("wal-receive", "--once"))
    ok(ws.invoke("wal-base"))
    insert(source, "pitr_app", 1, 10)
    ok(ws.invoke("wal-receive", "--once"))
    ok(ws.invoke("wal-base"))
    insert(source, "pitr_app", 11, 20)
    time.sleep(0.3)
    target = source.sql("SELECT clock_timestamp();")
    time.sleep(0.3)
    insert(source, "pitr_app", 21, 30)
    time.sleep(0.3)
    quiet = source.sql("SELECT clock_timestamp();")  # after the last commit, before the last --once
    source.sql("SELECT pg_switch_wal();")
    ok(ws.invoke("wal-receive", "--once"))
    ws.quiet = quiet
    yield ws, target
    keyring.close()


def test_preflight_names_what_the_server_lacks(source, tmp_path):
    source.sql('CREATE ROLE "Pitr_NoRepl" LOGIN;')  # a name that needs quoting in SQL, like 3chan
    ws = make_workspace(tmp_path / "ws", source, "postgres")
    config = yaml.safe_load(ws.config.read_text())
    config["databases"]["pg"]["user"] = "Pitr_NoRepl"
    ws.write_config(config)
    hba = source.data / "pg_hba.conf"
    original = hba.read_text()
    try:  # no REPLICATION attribute and no replication line: both named at once, each with its fix
        hba.write_text("".join(line for line in original.splitlines(True) if "replication" not in line))
        source.sql("SELECT pg_reload_conf();")
        result = ws.invoke("wal-receive", "--once")
    finally:
        hba.write_text(original)
        source.sql("SELECT pg_reload_conf();")
    assert result.returncode == 2, result.stderr
    assert "role Pitr_NoRepl lacks the REPLICATION attribute" in result.stderr
    assert 'ALTER ROLE "Pitr_NoRepl" REPLICATION;' in result.stderr
    assert "pg_hba.conf has no replication line for user Pitr_NoRepl from 127.0.0.1" in result.stderr
    assert "'host replication Pitr_NoRepl 127.0.0.1/32 scram-sha-256'" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    slots = source.sql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'lemon_backup_pg';")
    assert slots == "0"  # nothing started
    config["databases"]["pg"]["user"] = "postgres"
    ws.write_config(config)
    result = ws.invoke("wal-base")
    assert result.returncode == 2 and "slot lemon_backup_pg does not exist: start invoke wal-receive" in result.stderr
    assert not list((ws.backup_dir / "pg" / "wal" / "base").glob("base_*"))
    config["databases"]["pg"].pop("wal")
    ws.write_config(config)
    result = ws.invoke("wal-receive")
    assert result.returncode == 2 and "has 'wal: {enabled: true}'; add it" in result.stderr


def test_preflight_names_the_settings_that_need_a_server_restart(tmp_path):
    """A server as initdb leaves it with WAL for itself only: each setting named with its fix, at once."""
    root = Path(tempfile.mkdtemp(prefix="lemon-pitr-minimal-", dir="/tmp"))
    settings = ("wal_level=minimal", "max_wal_senders=0", "max_replication_slots=0")
    cluster = Cluster(root, listen="127.0.0.1", settings=settings)
    try:
        cluster.start()
        ws = make_workspace(tmp_path / "ws", cluster, "postgres")
        result = ws.invoke("wal-receive", "--once")
        slots = cluster.sql("SELECT count(*) FROM pg_replication_slots;")
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert result.returncode == 2, result.stdout + result.stderr
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "the server is not ready for WAL streaming" in err
    assert "wal_level is minimal (ALTER SYSTEM SET wal_level = 'replica'; then restart the server)" in err
    assert "max_wal_senders is 0; the receiver and a base backup need 2" in err
    assert "max_replication_slots is 0 (ALTER SYSTEM SET max_replication_slots = 10; then restart)" in err
    assert "REPLICATION attribute" not in err and "pg_hba.conf" not in err  # only what is missing
    assert slots == "0"  # nothing was started


def test_a_lost_slot_is_one_line_with_the_way_back(tmp_path):
    """The slot dropped and the server's WAL recycled: the receiver cannot continue the archive;
    it says so in one line with the steps, instead of pg_receivewal's raw error."""
    root = Path(tempfile.mkdtemp(prefix="lemon-pitr-lost-", dir="/tmp"))
    cluster = Cluster(root, listen="127.0.0.1", initdb_args=("--wal-segsize=1",), settings=("min_wal_size=2MB",))
    try:
        cluster.start()
        ws = make_workspace(tmp_path / "ws", cluster, "postgres")
        ok(ws.invoke("wal-receive", "--once"))
        cluster.sql("SELECT pg_drop_replication_slot('lemon_backup_pg');")
        cluster.sql("CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 30000) g;")
        for _ in range(3):
            cluster.sql("SELECT pg_switch_wal(); CHECKPOINT;")
        result = ws.invoke("wal-receive", "--once")
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    failed = [line for line in result.stderr.splitlines() if "FAILED" in line or "ERROR" in line]
    assert len(failed) == 1, result.stderr  # the log's INFO lines, then one line of failure
    err = failed[0]
    assert "the server no longer has WAL segment" in err and "(the slot lemon_backup_pg was dropped" in err
    assert "start the receiver again, then take a base backup (invoke wal-base --db pg)" in err


def test_restore_to_a_time_between_commits_brings_back_exactly_what_was_committed(source, archive):
    ws, target = archive
    stored = sorted((ws.backup_dir / "pg" / "wal" / "archive").iterdir())
    assert stored and all(p.name.endswith((".gz.gpg", ".json")) for p in stored)
    segment = next(p for p in stored if p.name.endswith(".gpg"))
    assert json.loads(Path(f"{segment}.json").read_text())["encryption"]["mode"] == "symmetric"
    result = ok(ws.invoke("restore", "--to-time", target, "--into", "pitr_at_t", "--yes"))
    assert count(source, "pitr_at_t") == 20  # rows 1-20 committed before T, none of 21-30
    assert "recovery point reached: " in result.stdout
    reached = result.stdout.split("recovery point reached: ")[1].split(" (")[0]
    assert source.sql(f"SELECT '{reached}'::timestamptz <= '{target}'::timestamptz;") == "t"
    newest_base = sorted((ws.backup_dir / "pg" / "wal" / "base").glob("base_*.gpg"))[-1]
    assert f"base backup {newest_base.name}" in result.stdout  # the newest base before the target
    latest = ok(ws.invoke("restore", "--to-latest", "--into", "pitr_latest", "--yes"))
    assert count(source, "pitr_latest") == 30
    assert "previous database kept" not in latest.stdout
    # no commit after this time in the archive, which provably holds everything up to it: all 30
    quiet = ok(ws.invoke("restore", "--to-time", ws.quiet, "--into", "pitr_quiet", "--yes"))
    assert count(source, "pitr_quiet") == 30, quiet.stderr
    listed = ok(ws.invoke("list")).stdout  # invoke list shows the base backups and the archive's extent
    assert listed.count("  wal base base_") == 2 and "  wal      4 segment(s) " in listed
    verified = ok(ws.invoke("verify"))  # invoke verify decodes every base backup and segment again
    assert "pg: WAL archive OK: 2 base backup(s) and " in verified.stderr and "no gap from " in verified.stderr
    drill = ok(ws.invoke("drill", "--to-latest"))
    assert "pg: OK" in drill.stdout and "30 row(s)" in drill.stdout
    last = json.loads(ws.invoke("status", "--json").stdout)["databases"]["pg"]["last_drill"]
    assert last["ok"] is True and last["source"] == "wal (to latest)" and last["rows"] == 30


def test_a_role_that_may_not_create_databases_is_refused_before_the_replay(source, archive):
    """The restore's last step creates a scratch database: a role without CREATEDB is told the fix
    at once, not after decoding and replaying the archive."""
    ws, target = archive
    source.sql('CREATE ROLE "Pitr_NoCreatedb" LOGIN REPLICATION;')
    config = yaml.safe_load(ws.config.read_text())
    try:
        config["databases"]["pg"]["user"] = "Pitr_NoCreatedb"
        ws.write_config(config)
        started = time.monotonic()
        result = ws.invoke("restore", "--to-time", target, "--into", "pitr_nocreatedb", "--yes")
        took = time.monotonic() - started
    finally:
        config["databases"]["pg"]["user"] = "postgres"
        ws.write_config(config)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "role Pitr_NoCreatedb may not create databases" in result.stderr
    assert 'ALTER ROLE "Pitr_NoCreatedb" CREATEDB;' in result.stderr
    assert "replaying" not in result.stdout + result.stderr, took  # refused before any replay
    assert source.sql("SELECT count(*) FROM pg_database WHERE datname LIKE 'pitr_nocreatedb%';") == "0"


def test_a_missing_segment_is_a_gap_restore_names_before_touching_anything(source, archive, tmp_path):
    ws, target = archive
    copy = make_workspace(tmp_path / "ws", source, "pitr_app")
    copy.write_config(ws.config.read_text())
    copy.env["PITR_PASSPHRASE"] = PASSPHRASE
    shutil.copytree(ws.backup_dir, copy.backup_dir)
    segments = sorted(
        p for p in (copy.backup_dir / "pg" / "wal" / "archive").glob("*.gz.gpg") if ".partial" not in p.name
    )
    victim = segments[len(segments) // 2]
    victim.unlink()
    missing = victim.name.split(".")[0]
    before = source.sql("SELECT count(*) FROM pg_database;")
    result = copy.invoke("restore", "--to-latest", "--into", "pitr_gap", "--yes")
    assert result.returncode == 2, result.stderr
    assert f"WAL segment {missing} is missing from the archive" in result.stderr
    assert source.sql("SELECT count(*) FROM pg_database;") == before  # nothing created or touched
    # invoke verify and status see the hole too; a damaged segment fails verify
    other = next(p for p in segments if p != victim)
    data = bytearray(other.read_bytes())
    data[len(data) // 2] ^= 1
    other.write_bytes(bytes(data))
    verified = copy.invoke("verify")
    assert verified.returncode == 1, verified.stderr
    assert f"pg: WAL segment {missing} is missing from the archive (a gap after " in verified.stderr
    assert f"pg: wal/archive/{other.name}: sha256 does not match its record" in verified.stderr
    one = copy.invoke("verify", "--file", str(other))  # one file of the archive, as an operator would
    assert one.returncode == 1 and "sha256 does not match its record" in one.stderr
    assert "invalid record" not in one.stderr and "move the backup away" not in one.stderr
    status = json.loads(copy.invoke("status", "--json").stdout)
    assert status["databases"]["pg"]["wal"]["gap"] == missing
    assert any(f"WAL segment {missing} is missing from the archive" in p for p in status["problems"])
    assert f", GAP: segment {missing} missing" in copy.invoke("status").stdout
    shutil.copy2(ws.backup_dir / "pg" / "wal" / "archive" / other.name, other)
    future = copy.invoke("restore", "--to-time", "2999-01-01 00:00:00+00", "--into", "pitr_gap", "--yes")
    assert future.returncode == 2 and "in the future" in future.stderr
    early = copy.invoke("restore", "--to-time", "2000-01-01 00:00:00+09:00", "--into", "pitr_gap", "--yes")
    assert early.returncode == 2 and "no base backup finished before 2000-01-01T00:00:00+09:00" in early.stderr
    assert "+09:00: pick a later time" in early.stderr  # the oldest base's end, in the offset asked in
    empty = copy.invoke("restore", "--to-time", "", "--into", "pitr_gap", "--yes")
    assert empty.returncode == 2 and "--to-time '': not a time; use e.g. " in empty.stderr
    time.sleep(1.1)
    beyond = source.sql("SELECT clock_timestamp() - interval '1 second';")  # after the last --once
    shutil.copy2(ws.backup_dir / "pg" / "wal" / "archive" / victim.name, victim)  # whole again
    shutil.copy2(ws.backup_dir / "pg" / "wal" / "archive" / f"{victim.name}.json", f"{victim}.json")
    result = copy.invoke("restore", "--to-time", beyond, "--into", "pitr_gap", "--yes")
    assert result.returncode == 2 and "is beyond the archive's end" in result.stderr
    # no commit after the target in the archive, and no proof it holds everything up to it: refused
    (copy.backup_dir / "pg" / "wal" / "archive" / "coverage.json").unlink()
    result = copy.invoke("restore", "--to-time", ws.quiet, "--into", "pitr_gap", "--yes")
    assert result.returncode == 1 and "known to be complete only up to an unknown time" in result.stderr
    assert source.sql("SELECT count(*) FROM pg_database;") == before
    result = copy.invoke("restore", "--to-latest", "--into", "pitr_gap", "--yes", env={"PITR_PASSPHRASE": ""})
    assert result.returncode == 2 and "PITR_PASSPHRASE" in result.stderr  # encrypted WAL needs it: said first
    assert source.sql("SELECT count(*) FROM pg_database;") == before


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    from tests.sshd import SshServer

    server = SshServer(tmp_path_factory.mktemp("pitr-sshd")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from tests.s3server import S3Server

    server = S3Server().start()
    yield server
    server.stop()


@pytest.mark.parametrize("kind", ["rsync", "sftp", "s3"])
def test_the_archive_goes_off_site_and_a_restore_reads_it_from_there(source, archive, tmp_path, kind, request):
    from datetime import timedelta

    from lib import store, wal
    from lib.config import load_spec

    ws, _ = archive
    copy = make_workspace(tmp_path / "ws", source, "pitr_app")
    nas = tmp_path / "nas"
    nas.mkdir()
    config = yaml.safe_load(ws.config.read_text())
    server = None
    if kind == "rsync":  # a local directory (a NAS mount)
        config["destinations"] = [{"name": "nas", "type": "rsync", "target": str(nas)}]
    elif kind == "s3":
        server = request.getfixturevalue("s3")
        server.client().create_bucket(Bucket="pitr-archive")
        copy.env.update({"S3_KEY_ID": "AKIAPITRTEST", "S3_SECRET": "pitr-secret"})
        config["destinations"] = [
            {
                "name": "nas",
                "type": "s3",
                "bucket": "pitr-archive",
                "prefix": "lemon",
                "endpoint_url": server.url,
                "region": "us-east-1",
                "access_key_env": "S3_KEY_ID",
                "secret_key_env": "S3_SECRET",
                "part_size_mib": 5,
                "retries": 0,
            }
        ]
    else:
        server = request.getfixturevalue("sshd")
        config["destinations"] = [
            {
                "name": "nas",
                "type": "sftp",
                "host": "127.0.0.1",
                "port": server.port,
                "user": server.user,
                "path": str(nas),
                "identity_file": str(server.user_key),
                "known_hosts": str(server.known_hosts),
            }
        ]
    copy.write_config(config)
    copy.env["PITR_PASSPHRASE"] = PASSPHRASE
    shutil.copytree(ws.backup_dir, copy.backup_dir)

    def names(directory: Path) -> list[str]:
        return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))

    def remote(area: str) -> list[str]:
        if kind != "s3":
            return names(nas / "pg" / "wal" / area)
        listing = server.client().list_objects_v2(Bucket="pitr-archive", Prefix=f"lemon/pg/wal/{area}/")
        return sorted(item["Key"].rsplit("/", 1)[1] for item in listing.get("Contents", []))

    ok(copy.invoke("offsite"))
    for area in ("archive", "base"):
        assert remote(area) == names(copy.backup_dir / "pg" / "wal" / area)
    spec = load_spec(copy.config, environ={"PITR_PASSPHRASE": PASSPHRASE})
    gone = wal.prune(spec, spec.databases["pg"], now=store.utcnow() + timedelta(days=30))
    assert gone["bases"] and gone["segments"]
    ok(copy.invoke("offsite"))  # what was pruned here goes there too
    for area in ("archive", "base"):
        assert remote(area) == names(copy.backup_dir / "pg" / "wal" / area)
    listed = ok(copy.invoke("list", "--dest", "nas")).stdout  # list --dest shows what it holds of the archive
    stored = [
        n for n in names(copy.backup_dir / "pg" / "wal" / "archive") if n.endswith(".gpg") and ".partial" not in n
    ]
    assert listed.count("  wal base base_") == 1 and f"  wal      {len(stored)} segment(s) " in listed, listed
    shutil.rmtree(copy.backup_dir / "pg" / "wal")  # the backup host lost its archive
    result = ok(copy.invoke("restore", "--to-latest", "--from", "nas", "--into", f"pitr_from_{kind}", "--yes"))
    assert "from off-site destination nas" in result.stdout
    assert count(source, f"pitr_from_{kind}") == 30


def test_a_restore_to_early_in_a_long_archive_stages_only_the_wal_up_to_the_target(tmp_path):
    from datetime import UTC, datetime

    from lib import pitr, wal

    def segment(number: int, minute: int, partial: bool = False) -> wal.Segment:
        received = f"2026-12-01T10:{minute:02d}:00Z"
        return wal.Segment(tmp_path / str(number), {"number": number, "received": received, "partial": partial})

    segments = [segment(n, n) for n in range(10)]  # one segment a minute, 10:00 .. 10:09
    plan = pitr.Plan(None, datetime(2026, 12, 1, 10, 2, 30, tzinfo=UTC), tmp_path, {}, segments, segment(10, 10, True))
    first, rest = pitr.staged_first(plan)
    # up to 10:02 received before the target, 10:03 holds it, 10:04 in case the next commit is there
    assert [s.number for s in first] == [0, 1, 2, 3, 4] and [s.number for s in rest] == [5, 6, 7, 8, 9, 10]
    plan.target = datetime(2026, 12, 1, 10, 30, tzinfo=UTC)  # past everything: all of it
    assert len(pitr.staged_first(plan)[0]) == 11
    plan.target = None  # --to-latest: all of it
    assert pitr.staged_first(plan) == ([*segments, plan.partial], [])


def test_a_gap_before_the_newest_base_backup_is_a_warning_not_a_failure(source, archive, tmp_path):
    from lib import wal
    from lib.config import load_spec

    ws, _ = archive
    copy = make_workspace(tmp_path / "ws", source, "pitr_app")
    copy.write_config(ws.config.read_text())
    copy.env["PITR_PASSPHRASE"] = PASSPHRASE
    shutil.copytree(ws.backup_dir, copy.backup_dir)
    spec = load_spec(copy.config, environ={"PITR_PASSPHRASE": PASSPHRASE})
    db = spec.databases["pg"]
    newest = wal.list_bases(spec, db)[0][1]
    size = newest["segment_size"]
    done, _ = wal.list_segments(spec, db)
    start = wal.segment_number(newest["start_segment"], size)[1]
    victim = [s for s in done if s.number < start][-1]  # lost before the newest base backup starts
    wal.delete_segment(victim)
    verified = copy.invoke("verify")
    assert verified.returncode == 0, verified.stderr  # restores after the newest base still work
    assert f"WAL segment {victim.name} is missing from the archive" in verified.stderr
    assert "restores to a time between it and the newest base backup are impossible" in verified.stderr
    status = json.loads(copy.invoke("status", "--json").stdout)
    block = status["databases"]["pg"]["wal"]
    assert block["gap"] == victim.name and block["gap_before_newest_base"] is True
    assert not any("is missing from the archive" in p for p in status["problems"])


def test_retention_keeps_every_segment_a_kept_base_needs(source, archive, tmp_path):
    from datetime import timedelta

    from lib import store, wal
    from lib.config import load_spec

    ws, _ = archive
    copy = Path(tmp_path / "ws")
    copy.mkdir()
    (copy / "backup.yml").write_text(ws.config.read_text())
    shutil.copytree(ws.backup_dir, copy / "backups")
    spec = load_spec(copy / "backup.yml", environ={"PITR_PASSPHRASE": PASSPHRASE})
    db = spec.databases["pg"]
    bases = wal.list_bases(spec, db)
    assert len(bases) == 2
    newest = bases[0][1]
    segments_before, _ = wal.list_segments(spec, db)
    # today: both bases are young, the oldest kept base still needs its WAL: nothing goes
    assert wal.prune(spec, db) == {"bases": [], "segments": []}
    gone = wal.prune(spec, db, now=store.utcnow() + timedelta(days=30))
    assert gone["bases"] == [bases[1][0].name]  # the old base; the newest verified one always stays
    left, _ = wal.list_segments(spec, db)
    _, first = wal.segment_number(newest["start_segment"], newest["segment_size"])
    assert left and min(s.number for s in left) == first  # from the kept base's start segment on
    assert {s.name for s in segments_before} - {s.name for s in left} == set(gone["segments"])
    run, _, gap = wal.chain(spec, db, newest["start_segment"], newest["segment_size"])
    assert gap is None and len(run) == len(left)


def test_receiver_killed_and_restarted_continues_without_a_gap_and_loses_no_commit(source, tmp_path):
    source.sql("CREATE DATABASE pitr_live;")
    source.sql("CREATE TABLE t (id int PRIMARY KEY, note text DEFAULT 'x');", "pitr_live")
    # the receiver streams as a plain REPLICATION role (as docs/pitr.md sets up), not a superuser:
    # PostgreSQL hides pg_stat_replication's positions from it
    source.sql("CREATE ROLE pitr_streamer LOGIN REPLICATION;")
    ws = make_workspace(
        tmp_path / "ws", source, "pitr_live", synchronous=True, slot="lemon_backup_live", user="pitr_streamer"
    )
    config = yaml.safe_load(ws.config.read_text())
    config["monitoring"] = {"prometheus_textfile": str(tmp_path / "lemon.prom")}
    ws.write_config(config)
    ok(ws.invoke("wal-receive", "--once"))
    ok(ws.invoke("wal-base"))

    def start() -> subprocess.Popen:
        argv = [sys.executable, "-m", "invoke", "-r", str(ROOT), "wal-receive", "--config", str(ws.config)]
        return subprocess.Popen(
            argv, cwd=ws.path, env=ws.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def streaming() -> None:
        for _ in range(100):
            if (
                source.sql("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'lemon_backup_live';")
                == "1"
            ):
                return
            time.sleep(0.1)
        raise AssertionError("the receiver never connected")

    receiver = start()
    streaming()
    insert(source, "pitr_live", 1, 10)
    source.sql("SELECT pg_switch_wal();")
    time.sleep(1.5)
    receiver.send_signal(signal.SIGKILL)  # no clean stop: the slot keeps what it had not confirmed
    receiver.wait()
    insert(source, "pitr_live", 11, 20)
    source.sql("SELECT pg_switch_wal();")
    receiver = start()
    streaming()
    second = ws.invoke("wal-receive", "--once")
    assert second.returncode == 1 and "another wal-receive already runs for it (pid " in second.stderr
    assert json.loads(ws.invoke("status", "--json").stdout)["databases"]["pg"]["wal"]["receiver_running"] is True
    # synchronous commit: each commit waits until the receiver has flushed it
    source.sql("ALTER SYSTEM SET synchronous_standby_names = 'lemon_backup_live'; SELECT pg_reload_conf();")
    try:
        time.sleep(0.5)
        insert(source, "pitr_live", 21, 25)
    finally:
        source.sql("ALTER SYSTEM RESET synchronous_standby_names; SELECT pg_reload_conf();")
    # while it runs (no periodic snapshots here): a restore to the latest point asks it to store its
    # unfinished segment first, so it is not short of the commits since the last completed segment
    result = ok(ws.invoke("restore", "--to-latest", "--into", "pitr_live_running", "--yes"))
    assert count(source, "pitr_live_running") == 25, result.stdout
    assert "stored its unfinished segment for this restore" in result.stdout + result.stderr
    assert not (ws.backup_dir / "pg" / "wal" / "snapshot.request").exists()
    time.sleep(0.2)
    quiet = source.sql("SELECT clock_timestamp();")  # after the last commit, before the receiver stops
    time.sleep(0.2)
    receiver.send_signal(signal.SIGTERM)
    out, err = receiver.communicate(timeout=60)
    assert receiver.returncode == 0, err
    assert "stopped by SIGTERM" in out and "partial segment" in out
    prom = (tmp_path / "lemon.prom").read_text()  # the receiver keeps the metrics fresh, and on its stop
    assert 'lemon_backup_wal_receiver_up{database="pg"} 0' in prom
    stopped = json.loads(ws.invoke("status", "--json").stdout)
    assert stopped["databases"]["pg"]["wal"]["receiver_running"] is False
    assert any("WAL receiver is not running (stopped)" in p for p in stopped["problems"])
    result = ok(ws.invoke("restore", "--to-latest", "--into", "pitr_live_back", "--yes"))
    assert count(source, "pitr_live_back") == 25, result.stdout
    # the clean stop proved the archive holds everything up to it: a time after the last commit restores
    result = ok(ws.invoke("restore", "--to-time", quiet, "--into", "pitr_live_quiet", "--yes"))
    assert count(source, "pitr_live_quiet") == 25, result.stdout


def test_container_mode_through_the_docker_double(source, tmp_path):
    source.sql("CREATE DATABASE pitr_box;")
    source.sql("CREATE TABLE t (id int PRIMARY KEY, note text DEFAULT 'x');", "pitr_box")
    ws = make_workspace(
        tmp_path / "ws", source, "pitr_box", slot="lemon_backup_box", host="127.0.0.1", port=source.port
    )
    config = yaml.safe_load(ws.config.read_text())
    db = config["databases"]["pg"]
    db.pop("host")
    db["container"] = "lemon-postgres"
    ws.write_config(config)
    env = {"DOCKER_DOUBLE_RUNNING": "lemon-postgres", "DOCKER_DOUBLE_PASS": "PGHOST", "PGHOST": "127.0.0.1"}
    ok(ws.invoke("wal-receive", "--once", env=env))
    ok(ws.invoke("wal-base", env=env))
    insert(source, "pitr_box", 1, 7)
    source.sql("SELECT pg_switch_wal();")
    ok(ws.invoke("wal-receive", "--once", env=env))
    insert(source, "pitr_box", 8, 9)  # after the archive's end: not restored
    result = ok(ws.invoke("restore", "--to-latest", "--yes", env=env))
    assert count(source, "pitr_box") == 7  # the configured database itself, swapped in
    previous = result.stdout.split("previous database kept as ")[1].strip()
    assert count(source, previous) == 9  # the one it replaced is kept
    calls = [json.loads(line) for line in (ws.path / "docker-calls.log").read_text().splitlines()]
    assert any(c[0] == "exec" and "lemon-postgres" in c for c in calls)  # the restore went through the container
    assert not any("pg_receivewal" in " ".join(c) or "pg_basebackup" in " ".join(c) for c in calls)
    source.sql(f'DROP DATABASE "{previous}";')
    assert os.path.isdir(ws.backup_dir / "pg" / "wal" / "base")


def test_status_and_metrics_show_the_archive_the_receiver_and_the_slot_lag(source, archive, tmp_path):
    ws, _ = archive
    config = yaml.safe_load(ws.config.read_text())
    config["monitoring"] = {"prometheus_textfile": str(tmp_path / "lemon.prom")}
    config["databases"]["pg"]["wal"]["alert_lag_mb"] = 0.001
    config["databases"]["pg"]["wal"]["alert_after_seconds"] = 0.5  # the last --once is older than that
    ws.write_config(config)
    time.sleep(0.6)
    source.sql("SELECT pg_switch_wal(); CHECKPOINT;")  # WAL the slot keeps until a receiver takes it
    source.sql("CREATE TABLE IF NOT EXISTS lag (x int); INSERT INTO lag SELECT generate_series(1, 5000);", "pitr_app")
    result = ws.invoke("status", "--json")
    assert result.returncode == 1  # problems: the receiver is stopped, the slot lags
    block = json.loads(result.stdout)["databases"]["pg"]["wal"]
    assert block["receiver_running"] is False and block["segments"] > 0 and block["base_backups"] == 2
    assert block["slot"] == "lemon_backup_pg" and block["slot_lag_bytes"] > 1024
    assert 0 <= block["seconds_since_last_segment"] < 600
    problems = json.loads(result.stdout)["problems"]
    assert any("WAL receiver is not running (no recent heartbeat)" in p for p in problems)
    assert any("of WAL for slot lemon_backup_pg" in p for p in problems)
    text = ws.invoke("status").stdout
    assert "wal: receiver NOT running" in text
    from lib.config import load_spec
    from lib.metrics import write_metrics

    write_metrics(load_spec(ws.config, environ={"PITR_PASSPHRASE": PASSPHRASE}))
    prom = (tmp_path / "lemon.prom").read_text()
    assert 'lemon_backup_wal_receiver_up{database="pg"} 0' in prom
    assert 'lemon_backup_wal_slot_lag_bytes{database="pg"}' in prom
    assert 'lemon_backup_wal_receiver_heartbeat_timestamp_seconds{database="pg"} 1' in prom
    assert 'lemon_backup_wal_last_segment_timestamp_seconds{database="pg"} 1' in prom
    ok(ws.invoke("wal-receive", "--once"))  # the archive catches up; the slot moves on
    config["databases"]["pg"]["wal"].update(alert_lag_mb=1024, alert_after_seconds=900)
    ws.write_config(config)
    after = json.loads(ws.invoke("status", "--json").stdout)["databases"]["pg"]["wal"]
    assert after["slot_lag_bytes"] < block["slot_lag_bytes"]
    assert after["receiver_running"] is True  # a recent --once run counts (cron users)


def test_setup_cron_systemd_installs_the_receiver_and_a_weekly_base_backup(tmp_path):
    ws = Workspace(tmp_path)
    db = {"engine": "postgres", "database": "app", "host": "127.0.0.1", "port": 1, "wal": {"enabled": True}}
    ws.write_config({"version": 1, "backup_dir": "./backups", "databases": {"main.db": db}})
    units = tmp_path / "units"
    units.mkdir()
    result = ok(ws.invoke("setup-cron", "--systemd", "--install", env={"BACKUP_SYSTEMD_DIR": str(units)}))
    names = sorted(p.name for p in units.iterdir())
    assert names == [
        "lemon-backup-wal-base-main.db.service",
        "lemon-backup-wal-base-main.db.timer",
        "lemon-backup-wal-main.db.service",
        "lemon-backup.service",
        "lemon-backup.timer",
    ]
    receiver = (units / "lemon-backup-wal-main.db.service").read_text()
    assert "Restart=always" in receiver and "KillSignal=SIGTERM" in receiver
    assert f"wal-receive --db main.db --config {ws.config}" in receiver
    assert "slot lemon_backup_main_db" in receiver
    assert "lemon-backup-wal-main.db.service lemon-backup-wal-base-main.db.timer" in result.stdout


def test_s3_plain_files_multipart_and_never_over_a_foreign_object(s3, tmp_path):
    """The S3 side of the WAL archive's copies on its own: a file above the part size goes up in
    parts and comes back identical; an object there not written by the tool is never replaced."""
    from lib.config import load_spec
    from lib.destinations import configured
    from lib.destinations.base import DestinationRefused

    s3.client().create_bucket(Bucket="pitr-parts")
    block = {"name": "cloud", "type": "s3", "bucket": "pitr-parts", "endpoint_url": s3.url, "region": "us-east-1"}
    block.update(access_key_env="S3_KEY_ID", secret_key_env="S3_SECRET", part_size_mib=5, retries=0)
    db = {"engine": "postgres", "database": "x", "host": "127.0.0.1"}
    (tmp_path / "backup.yml").write_text(
        yaml.safe_dump({"version": 1, "databases": {"pg": db}, "destinations": [block]})
    )
    spec = load_spec(tmp_path / "backup.yml", environ={"S3_KEY_ID": "AKIAPITR", "S3_SECRET": "s"})
    area = tmp_path / "pg" / "wal" / "base"
    area.mkdir(parents=True)
    big = os.urandom(11 << 20)
    (area / "base_20261201_000000.tar.gz").write_bytes(big)
    (dest,) = configured(spec)
    with dest:
        dest.put_files(tmp_path, "pg/wal/base", ["base_20261201_000000.tar.gz"])
        assert dest.list_files("pg/wal/base") == {"base_20261201_000000.tar.gz": len(big)}
        back = tmp_path / "back"
        back.mkdir()
        dest.get_files("pg/wal/base", back)
        assert (back / "base_20261201_000000.tar.gz").read_bytes() == big
        s3.client().put_object(Bucket="pitr-parts", Key="pg/wal/base/coverage.json", Body=b"theirs")
        (area / "coverage.json").write_text("{}")
        with pytest.raises(DestinationRefused, match="not written by this tool"):
            dest.put_files(tmp_path, "pg/wal/base", ["coverage.json"])
    body = s3.client().get_object(Bucket="pitr-parts", Key="pg/wal/base/coverage.json")["Body"].read()
    assert body == b"theirs"
