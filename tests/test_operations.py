"""Operations end to end through the real Invoke tasks and the real PostgreSQL server: status,
metrics, notifications, locking, scheduling, drills, disaster recovery, disk guard, progress."""

from __future__ import annotations

import glob
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import DOUBLES, ROOT, ScratchDB, databases_like, psql, with_fixed_tier


def backup_ok(workspace, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    result = workspace.invoke("backup", "--all", "--tier", "daily", *extra, env=env)
    assert result.returncode == 0, result.stderr
    return result


def record_of(backup: Path) -> tuple[Path, dict]:
    path = backup.with_name(backup.name + ".json")
    return path, json.loads(path.read_text())


def edit_record(backup: Path, change) -> None:
    path, record = record_of(backup)
    change(record)
    path.write_text(json.dumps(record))


def iso_ago(hours: float) -> str:
    return (datetime.now(UTC) - timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%SZ")


def missing_db_config(workspace, **top) -> dict:
    """A config whose database does not exist: pg_dump fails quickly, nothing else is needed."""
    config = workspace.postgres_config("bt_missing_database_xyz")
    config.update(top)
    return config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- status ------------------------------------------------------------------------------------
DB_KEYS = {
    "name",
    "engine",
    "database",
    "ok",
    "stale",
    "age_seconds",
    "newest_verified",
    "tiers",
    "counts",
    "destinations",
    "last_run",
    "last_drill",
    "last_successful_drill",
    "leftovers",
    "wal",  # null unless wal.enabled (point-in-time recovery; tests/test_pitr.py)
    "problems",
}
BACKUP_KEYS = {"file", "path", "tier", "created", "age_seconds", "size", "verified", "encryption", "destinations"}


def status_json(workspace) -> tuple[int, dict]:
    result = workspace.invoke("status", "--json")
    return result.returncode, json.loads(result.stdout)


def test_status_exit_codes_and_json_shape_fresh_and_stale(workspace, sample_db):
    workspace.write_config(workspace.postgres_config(sample_db.name))
    code, report = status_json(workspace)
    assert code == 1 and report["databases"]["pg"]["problems"] == ["pg: no verified backup"]

    result = backup_ok(workspace)
    # not a terminal: only timestamped log lines, no carriage returns or escape sequences
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
    assert all(line[:4].isdigit() for line in result.stderr.splitlines()), result.stderr

    code, report = status_json(workspace)
    assert code == 0, report
    assert set(report) == {
        "format",
        "generated",
        "ok",
        "max_age_hours",
        "backup_dir",
        "destinations",
        "leftovers",
        "problems",
        "databases",
    }
    assert report["format"] == 1 and report["ok"] is True and report["max_age_hours"] == 26
    entry = report["databases"]["pg"]
    assert set(entry) == DB_KEYS and entry["wal"] is None
    assert set(entry["newest_verified"]) == BACKUP_KEYS
    assert entry["newest_verified"]["verified"] is True and entry["newest_verified"]["encryption"] == "none"
    assert entry["tiers"]["weekly"] is None and entry["tiers"]["daily"]["file"] == entry["newest_verified"]["file"]
    assert entry["counts"] == {"daily": 1, "weekly": 0, "monthly": 0}
    assert entry["last_run"]["status"] == "success" and entry["last_drill"] is None
    assert entry["leftovers"] == [] and report["leftovers"] == []
    assert workspace.invoke("status").returncode == 0

    [backup] = workspace.backups()
    edit_record(backup, lambda r: r.update(created=iso_ago(27)))
    code, report = status_json(workspace)
    assert code == 1
    assert report["databases"]["pg"]["stale"] is True
    assert "27h old (limit 26h)" in report["problems"][0]
    text = workspace.invoke("status")
    assert text.returncode == 1 and "PROBLEM" in text.stdout

    config = workspace.postgres_config(sample_db.name)
    config["monitoring"] = {"max_age_hours": 48}
    workspace.write_config(config)
    assert workspace.invoke("status").returncode == 0


def test_status_reports_destination_lag_from_records(workspace, sample_db):
    workspace.write_config(workspace.postgres_config(sample_db.name))
    backup_ok(workspace)
    config = workspace.postgres_config(sample_db.name)
    config["destinations"] = [
        {"name": "nas", "type": "rsync", "target": str(workspace.path / "nas")},
        {"name": "cloud", "type": "rsync", "target": str(workspace.path / "cloud")},
    ]
    workspace.write_config(config)
    [backup] = workspace.backups()
    edit_record(
        backup, lambda r: r.update(destinations={"nas": {"verified_at": iso_ago(0)}, "cloud": {"pushed": True}})
    )

    code, report = status_json(workspace)
    assert code == 1
    dests = report["databases"]["pg"]["destinations"]
    assert dests["nas"]["lag"] is False and dests["nas"]["verified"] is True
    assert dests["cloud"] == {"verified": False, "verified_at": None, "lag": True}
    assert report["databases"]["pg"]["newest_verified"]["destinations"] == ["nas"]
    assert any("destination cloud" in p for p in report["problems"])

    edit_record(backup, lambda r: r["destinations"].update(cloud={"verified_at": iso_ago(0)}))
    assert status_json(workspace)[0] == 0


# -- metrics -----------------------------------------------------------------------------------
def parse_textfile(text: str) -> dict[str, dict]:
    """{metric: {"type":..., "help":..., "samples": {labels-text: value}}}; asserts HELP/TYPE come first."""
    metrics: dict[str, dict] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, help_text = line[7:].split(" ", 1)
            metrics[name] = {"help": help_text, "samples": {}}
        elif line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            metrics[name]["type"] = kind
        else:
            name, _, rest = line.partition("{")
            labels, _, value = rest.partition("} ")
            assert "type" in metrics[name], f"sample before HELP/TYPE: {line}"
            metrics[name]["samples"][labels] = float(value)
    return metrics


def test_prometheus_textfile_after_success_and_failure(workspace, sample_db):
    (workspace.path / "textfiles").mkdir()
    config = workspace.postgres_config(sample_db.name)
    config["monitoring"] = {"prometheus_textfile": "textfiles/lemon.prom"}
    workspace.write_config(config)
    backup_ok(workspace)
    prom = workspace.path / "textfiles" / "lemon.prom"
    assert prom.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in prom.parent.iterdir()] == ["lemon.prom"]  # no temp file left behind
    metrics = parse_textfile(prom.read_text())
    [backup] = workspace.backups()
    _, record = record_of(backup)
    created = datetime.strptime(record["created"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    db = 'database="pg"'
    assert metrics["lemon_backup_last_success_timestamp_seconds"]["samples"][db] == created
    assert metrics["lemon_backup_last_success_timestamp_seconds"]["type"] == "gauge"
    assert metrics["lemon_backup_last_size_bytes"]["samples"][db] == record["size"]
    assert metrics["lemon_backup_last_run_success"]["samples"][db] == 1
    assert metrics["lemon_backup_last_run_duration_seconds"]["samples"][db] > 0
    assert metrics["lemon_backup_kept_backups"]["samples"]['database="pg",tier="daily"'] == 1
    assert metrics["lemon_backup_runs_total"]["type"] == "counter"
    assert metrics["lemon_backup_runs_total"]["samples"]['database="pg",status="success"'] == 1
    for name in metrics:
        assert name.startswith("lemon_backup_")

    config["databases"]["pg"]["database"] = "bt_missing_database_xyz"
    workspace.write_config(config)
    assert workspace.invoke("backup", "--all").returncode == 1
    metrics = parse_textfile(prom.read_text())
    assert metrics["lemon_backup_last_run_success"]["samples"][db] == 0
    assert metrics["lemon_backup_runs_total"]["samples"]['database="pg",status="failure"'] == 1
    assert metrics["lemon_backup_last_success_timestamp_seconds"]["samples"][db] == created  # the old one still counts


def test_destination_lag_metric(workspace, sample_db):
    config = workspace.postgres_config(sample_db.name)
    workspace.write_config(config)
    backup_ok(workspace)
    config["destinations"] = [{"name": "nas", "type": "rsync", "target": str(workspace.path / "nas")}]
    config["monitoring"] = {"prometheus_textfile": "lemon.prom"}
    workspace.write_config(config)
    assert workspace.invoke("prune").returncode == 0  # prune rewrites the metrics too
    metrics = parse_textfile((workspace.path / "lemon.prom").read_text())
    assert metrics["lemon_backup_destination_lag"]["samples"]['database="pg",destination="nas"'] == 1


# -- notifications -----------------------------------------------------------------------------
def test_failing_and_hanging_hooks_and_unreachable_ping_do_not_fail_the_backup(workspace, sample_db):
    config = workspace.postgres_config(sample_db.name)
    config["notify"] = {
        "on_success": {"command": 'echo "$BACKUP_STATUS $BACKUP_DATABASE" > hook.out; exit 3', "shell": True},
        "ping_url": f"http://127.0.0.1:{free_port()}/ping/secret-uuid",
        "ping_timeout": 2,
    }
    workspace.write_config(config)
    result = backup_ok(workspace)
    assert (workspace.path / "hook.out").read_text().strip() == "success pg"
    assert "on_success hook (/bin/sh) exited with status 3" in result.stderr
    assert "start ping to http://127.0.0.1" in result.stderr and "success ping" in result.stderr
    assert "secret-uuid" not in result.stderr  # the ping URL's path is its secret

    config["notify"] = {"on_success": {"command": "sleep 60", "shell": True, "timeout": 0.5}}
    workspace.write_config(config)
    result = backup_ok(workspace)
    assert "did not finish within 0.5s; killed it" in result.stderr


def test_failure_hook_gets_the_outcome_in_its_environment(workspace):
    script = "import json, os; json.dump({k: v for k, v in os.environ.items() if k.startswith('BACKUP_')}, open('env.json', 'w'))"
    workspace.write_config(missing_db_config(workspace, notify={"on_failure": [sys.executable, "-c", script]}))
    result = workspace.invoke("backup", "--all")
    assert result.returncode == 1
    env = json.loads((workspace.path / "env.json").read_text())
    assert env["BACKUP_STATUS"] == "failure" and env["BACKUP_RUN"] == "backup"
    assert env["BACKUP_DATABASE"] == "pg" and env["BACKUP_FAILED"] == "pg"
    assert env["BACKUP_STAGE"] == "pg_dump"
    assert "pg_dump failed" in env["BACKUP_ERROR"] and "bt_missing_database_xyz" in env["BACKUP_ERROR"]
    assert env["BACKUP_LOG"] == str(workspace.backup_dir / "backup.log")


class PingRecorder(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, str, str]] = []

    def do_POST(self):  # noqa: N802 - http.server API
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        self.received.append((self.command, self.path, body))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"OK")

    do_GET = do_POST  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.fixture
def ping_server():
    PingRecorder.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PingRecorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/ping/abc", PingRecorder.received
    server.shutdown()
    server.server_close()


def test_pings_start_success_and_fail_with_log_tail(workspace, sample_db, ping_server):
    url, received = ping_server
    config = workspace.postgres_config(sample_db.name)
    config["notify"] = {"ping_url": url}
    workspace.write_config(config)
    backup_ok(workspace)
    assert [(m, p) for m, p, _ in received] == [("POST", "/ping/abc/start"), ("POST", "/ping/abc")]

    received.clear()
    config["databases"]["pg"]["database"] = "bt_missing_database_xyz"
    workspace.write_config(config)
    assert workspace.invoke("backup", "--all").returncode == 1
    assert [p for _, p, _ in received] == ["/ping/abc/start", "/ping/abc/fail"]
    body = received[1][2]
    assert "backup FAILED" in body and "bt_missing_database_xyz" in body


# -- locking -----------------------------------------------------------------------------------
HOLDER = """
import sys
from pathlib import Path
from lib.lock import run_lock
with run_lock(Path(sys.argv[1]), "test holder"):
    print("locked", flush=True)
    sys.stdin.read()
"""


def hold_lock(workspace) -> subprocess.Popen:
    """A process holding the run lock until its stdin closes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(workspace.backup_dir)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_run_exits_at_once_naming_the_holder(workspace):
    workspace.write_config(missing_db_config(workspace))
    holder = hold_lock(workspace)
    try:
        for args in (["backup", "--all"], ["prune"], ["restore", "--engine", "postgres", "--file", "latest", "--yes"]):
            result = workspace.invoke(*args)
            assert result.returncode == 1, result.stderr
            assert "another run holds the lock" in result.stderr
            assert f"pid {holder.pid} (test holder) since " in result.stderr
            assert "--wait SECONDS" in result.stderr and "Traceback" not in result.stderr
            assert "pg_dump" not in result.stderr  # nothing ran
    finally:
        holder.stdin.close()
        holder.wait()
    assert workspace.invoke("prune").returncode == 0


def test_wait_for_the_lock_then_run(workspace, sample_db):
    workspace.write_config(workspace.postgres_config(sample_db.name))
    holder = hold_lock(workspace)
    log = workspace.backup_dir / "backup.log"
    waiter = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "invoke",
            "-r",
            str(ROOT),
            "backup",
            "--all",
            "--wait",
            "120",
            "--config",
            str(workspace.config),
        ],
        cwd=workspace.path,
        env=workspace.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(600):
            if log.exists() and "waiting up to 120s for the lock held by pid" in log.read_text():
                break
            assert waiter.poll() is None, waiter.communicate()
            time.sleep(0.05)
        else:
            pytest.fail("the second run never reported waiting")
        assert workspace.backups() == []
    finally:
        holder.stdin.close()
        holder.wait()
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, err
    assert len(workspace.backups()) == 1


def test_ctrl_c_is_one_truthful_line_and_exit_130(workspace, sample_db):
    """Ctrl-C during a restore (here: while it waits for the lock) must not claim that 'nothing
    was renamed': the message is true for every task, without a traceback."""
    workspace.write_config(workspace.postgres_config(sample_db.name))
    holder = hold_lock(workspace)
    log = workspace.backup_dir / "backup.log"
    argv = [sys.executable, "-m", "invoke", "-r", str(ROOT), "restore", "--engine", "postgres"]
    argv += ["--file", "latest", "--yes", "--wait", "120", "--config", str(workspace.config)]
    waiter = subprocess.Popen(
        argv, cwd=workspace.path, env=workspace.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        for _ in range(600):
            if log.exists() and "waiting up to 120s" in log.read_text():
                break
            assert waiter.poll() is None, waiter.communicate()
            time.sleep(0.05)
        else:
            pytest.fail("the restore never reported waiting")
        waiter.send_signal(signal.SIGINT)
        _, err = waiter.communicate(timeout=60)
    finally:
        holder.stdin.close()
        holder.wait()
    assert waiter.returncode == 130, err
    assert "interrupted (Ctrl-C); see the log for what was completed" in err
    assert "nothing was renamed" not in err and "Traceback" not in err


def test_output_cut_by_a_closed_pipe_exits_quietly(workspace, sample_db):
    """invoke list | head -1: the reader is gone; exit 141 like any tool killed by SIGPIPE, no traceback."""
    workspace.write_config(workspace.postgres_config(sample_db.name))
    for task in (["list"], ["status"], ["status", "--json"]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader has already gone, as after head -1
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "invoke", "-r", str(ROOT), *task, "--config", str(workspace.config)],
                cwd=workspace.path,
                env=workspace.env,
                stdin=subprocess.DEVNULL,
                stdout=write_end,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
            )
        finally:
            os.close(write_end)
        assert proc.returncode == 141, (task, proc.returncode, proc.stderr)
        assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_killed_run_never_blocks_the_next(workspace, sample_db):
    workspace.write_config(workspace.postgres_config(sample_db.name))
    holder = hold_lock(workspace)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert str(holder.pid) in (workspace.backup_dir / ".lock").read_text()  # stale info stays behind
    backup_ok(workspace)
    assert len(workspace.backups()) == 1


# -- scheduling --------------------------------------------------------------------------------
def test_setup_cron_is_idempotent_and_keeps_other_entries(workspace):
    table = workspace.path / "crontab.txt"
    other = "MAILTO=ops@example.org\n*/5 * * * * /usr/local/bin/other-job\n"
    table.write_text(other)
    env = {"BACKUP_CRONTAB": str(DOUBLES / "fake-crontab"), "FAKE_CRONTAB_FILE": str(table)}
    config = missing_db_config(workspace)
    workspace.write_config(config)

    first = workspace.invoke("setup-cron", env=env)
    assert first.returncode == 0, first.stderr
    assert "installed" in first.stdout
    second = workspace.invoke("setup-cron", env=env)
    assert second.returncode == 0 and "already up to date" in second.stdout
    lines = table.read_text().splitlines()
    assert table.read_text().startswith(other)
    ours = [line for line in lines if "backup --all" in line]
    assert len(ours) == 1 and sum("lemon-backup: managed" in line for line in lines) == 1
    venv_invoke = ROOT / ".venv" / "bin" / "invoke"
    assert ours[0] == (
        f"0 2 * * * cd {ROOT} && {venv_invoke} backup --all --config {workspace.config} "
        f">> {workspace.backup_dir / 'backup.log'} 2>&1"
    )

    config["schedule"] = {"cron": "30 1 * * 1-6"}
    workspace.write_config(config)
    assert workspace.invoke("setup-cron", env=env).returncode == 0
    lines = table.read_text().splitlines()
    assert [line[:14] for line in lines if "backup --all" in line] == ["30 1 * * 1-6 c"]
    assert table.read_text().startswith(other)

    assert workspace.invoke("setup-cron", "--remove", env=env).returncode == 0
    assert table.read_text() == other


def test_setup_cron_without_any_crontab_yet(workspace):
    table = workspace.path / "none-yet.txt"
    env = {"BACKUP_CRONTAB": str(DOUBLES / "fake-crontab"), "FAKE_CRONTAB_FILE": str(table)}
    workspace.write_config(missing_db_config(workspace))
    assert workspace.invoke("setup-cron", env=env).returncode == 0
    assert sum("backup --all" in line for line in table.read_text().splitlines()) == 1


def test_systemd_units_printed_and_installed(workspace, tmp_path):
    workspace.write_config(missing_db_config(workspace, schedule={"cron": "15 3 * * *"}))
    result = workspace.invoke("setup-cron", "--systemd")
    assert result.returncode == 0, result.stderr
    assert "Persistent=true" in result.stdout
    assert "OnCalendar=*-*-* 03:15:00" in result.stdout
    assert f"backup --all --config {workspace.config}" in result.stdout
    units = tmp_path / "units"
    units.mkdir()
    result = workspace.invoke("setup-cron", "--systemd", "--install", env={"BACKUP_SYSTEMD_DIR": str(units)})
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in units.iterdir()) == ["lemon-backup.service", "lemon-backup.timer"]
    assert "Type=oneshot" in (units / "lemon-backup.service").read_text()


# -- drills ------------------------------------------------------------------------------------
def test_drill_passes_and_is_recorded(workspace, sample_db):
    workspace.write_config(workspace.postgres_config(sample_db.name))
    backup_ok(workspace)
    result = workspace.invoke("drill")
    assert result.returncode == 0, result.stderr
    assert "1 of 1 database(s) proven restorable" in result.stdout
    assert "3 tables / 920 rows match the record" in result.stderr
    assert databases_like(f"{sample_db.name}_drill") == []
    drills = json.loads((workspace.backup_dir / "pg" / "drills.json").read_text())["drills"]
    assert drills[0]["ok"] is True and drills[0]["rows"] == 920 and drills[0]["restore_seconds"] > 0
    code, report = status_json(workspace)
    assert code == 0 and report["databases"]["pg"]["last_successful_drill"]["at"] == drills[0]["at"]


@pytest.mark.skipif(not glob.glob("/usr/lib/postgresql/*/bin/initdb"), reason="needs the PostgreSQL server package")
def test_drill_on_a_throwaway_local_server_never_touches_the_live_one(workspace, sample_db):
    config = workspace.postgres_config(sample_db.name, password_env="LIVE_ONLY_PASSWORD")
    workspace.write_config(config)
    # a table owned by a role the throwaway cluster does not have: the drill creates it there
    psql("DO $$BEGIN CREATE ROLE lemon_drill_owner; EXCEPTION WHEN duplicate_object THEN NULL; END$$;")
    sample_db.sql("ALTER TABLE lessons OWNER TO lemon_drill_owner;")
    backup_ok(workspace, env={"LIVE_ONLY_PASSWORD": "x"})
    sample_db.sql("ALTER TABLE lessons OWNER TO postgres;")  # the live role can then go when it likes
    before = set(psql("SELECT datname FROM pg_database;").split())
    result = workspace.invoke("drill", "--local-server")  # no live password needed: the live server is not used
    assert result.returncode == 0, result.stderr
    assert "throwaway PostgreSQL started" in result.stderr
    assert "created the role(s) the backup needs on this throwaway server: lemon_drill_owner" in result.stderr
    assert "3 tables / 920 rows match the record" in result.stderr
    # nothing of this drill's on the live server (other databases may come and go meanwhile)
    new = set(psql("SELECT datname FROM pg_database;").split()) - before
    assert [name for name in new if name.startswith(sample_db.name) or "_drill_" in name] == []
    assert databases_like(f"{sample_db.name}_drill") == []
    drills = json.loads((workspace.backup_dir / "pg" / "drills.json").read_text())["drills"]
    assert drills[0]["ok"] is True and drills[0]["server"] == "throwaway local cluster"
    assert not list(Path("/tmp").glob("lemon-backup-pg-*"))


def test_drill_catches_a_row_count_mismatch(workspace, sample_db):
    workspace.write_config(workspace.postgres_config(sample_db.name))
    backup_ok(workspace)
    [backup] = workspace.backups()
    edit_record(backup, lambda r: r["engine_meta"]["tables"].update({"public.users": 301}))
    result = workspace.invoke("drill", "--db", "pg")
    assert result.returncode == 1
    assert "public.users: 300 rows, expected 301" in result.stderr
    assert "0 of 1 database(s) proven restorable; failed: pg" in result.stderr
    assert databases_like(f"{sample_db.name}_drill") == []
    code, report = status_json(workspace)
    assert code == 1 and report["databases"]["pg"]["last_drill"]["ok"] is False
    assert "last restore drill failed" in report["problems"][0]


def test_drill_fails_when_its_throwaway_database_cannot_be_dropped(workspace, sample_db, tmp_path):
    """A psql that refuses DROP DATABASE: the drill restores fine but reports the leftover
    throwaway database by name (exit 1), and the log gives the exact command to drop it."""
    workspace.write_config(workspace.postgres_config(sample_db.name))
    backup_ok(workspace)
    wrap = tmp_path / "wrap"
    wrap.mkdir()
    real = shutil.which("psql")
    (wrap / "psql").write_text(
        "#!/usr/bin/env python3\n"
        "import subprocess, sys\n"
        f"psql = subprocess.Popen([{real!r}, *sys.argv[1:]], stdin=subprocess.PIPE)\n"
        "for line in sys.stdin.buffer:  # line by line: sessions wait for each statement's result\n"
        "    if b'DROP DATABASE' in line:\n"
        "        psql.kill()\n"
        "        sys.exit('ERROR:  must be owner of database (psql double refusing DROP DATABASE)')\n"
        "    psql.stdin.write(line)\n"
        "    psql.stdin.flush()\n"
        "psql.stdin.close()\n"
        "sys.exit(psql.wait())\n"
    )
    (wrap / "psql").chmod(0o755)
    result = workspace.invoke("drill", env={"PATH": f"{wrap}:{workspace.env['PATH']}"})
    assert result.returncode == 1, result.stderr
    [leftover] = databases_like(f"{sample_db.name}_drill")
    assert "Traceback" not in result.stderr
    assert f"throwaway database {leftover} was left behind" in result.stderr
    assert f"left behind, drop by hand: {leftover}" in result.stderr  # the summary line
    assert f'DROP DATABASE IF EXISTS "{leftover}" WITH (FORCE);' in result.stderr
    drills = json.loads((workspace.backup_dir / "pg" / "drills.json").read_text())["drills"]
    assert drills[0]["ok"] is False and drills[0]["leftover"] == leftover


# -- disaster recovery -------------------------------------------------------------------------
def test_restore_all_rebuilds_every_database(workspace, sample_db):
    second = ScratchDB()
    try:
        second.sql(
            "CREATE TABLE notes (id int, body text); INSERT INTO notes SELECT g, 'n' || g FROM generate_series(1, 50) g;"
        )
        config = workspace.postgres_config(sample_db.name)
        config["databases"]["notes"] = dict(config["databases"]["pg"], database=second.name)
        workspace.write_config(config)
        before = (sample_db.checksums(), second.checksums())
        backup_ok(workspace)

        refused = workspace.invoke("restore", "--all", "--file", "latest")
        assert refused.returncode == 2 and "--yes" in refused.stderr

        sample_db.sql("DROP TABLE messages;")
        second.sql("TRUNCATE notes;")
        result = workspace.invoke("restore", "--all", "--file", "latest", "--yes", "--drop-previous")
        assert result.returncode == 0, result.stderr
        assert "restore summary: 2 of 2 database(s) restored" in result.stdout
        assert (sample_db.checksums(), second.checksums()) == before
    finally:
        second.drop_all()


def test_restore_all_carries_on_and_reports_failures(workspace, sample_db):
    config = workspace.postgres_config(sample_db.name)
    config["databases"]["nobackup"] = dict(config["databases"]["pg"], database="bt_missing_database_xyz")
    workspace.write_config(config)
    assert workspace.invoke("backup", "--db", "pg").returncode == 0
    result = workspace.invoke("restore", "--all", "--yes", "--drop-previous")
    assert result.returncode == 2, result.stderr  # the only failure was "no backup": bad input
    assert "restore summary: 1 of 2 database(s) restored" in result.stderr
    assert "nobackup: FAILED: no verified backup of 'nobackup'" in result.stderr


# -- disk guard --------------------------------------------------------------------------------
def test_disk_guard_fails_early_with_a_huge_last_backup(workspace):
    workspace.write_config(missing_db_config(workspace))
    daily = workspace.backup_dir / "pg" / "daily"
    daily.mkdir(parents=True)
    name = "backup_20260101_020000.sql.gz"
    (daily / name).write_bytes(b"")
    record = {
        "file": name,
        "name": "pg",
        "tier": "daily",
        "created": iso_ago(24),
        "size": 10**18,
        "verified": {"ok": True},
    }
    (daily / (name + ".json")).write_text(json.dumps(record))
    result = workspace.invoke("backup", "--all")
    assert result.returncode == 1
    assert "not enough free space in" in result.stderr and "disk_margin 1.5" in result.stderr
    assert "pg_dump" not in result.stderr  # failed before dumping

    config = missing_db_config(workspace, monitoring={"disk_margin": 0})
    workspace.write_config(config)
    result = workspace.invoke("backup", "--all")
    assert "not enough free space" not in result.stderr and "pg_dump failed" in result.stderr


def test_config_errors_in_operations_blocks_are_reported(workspace):
    config = missing_db_config(
        workspace,
        monitoring={"max_age_hours": 0, "prometheus_textfile": "x.txt"},
        notify={"on_failure": "echo not-a-list", "colour": "red"},
    )
    workspace.write_config(config)
    result = workspace.invoke("validate")
    assert result.returncode == 2
    for needle in ("monitoring.max_age_hours", "monitoring.prometheus_textfile", "notify.on_failure", "notify"):
        assert f"At '{needle}'" in result.stderr, result.stderr


def test_cron_output_is_logged_once(workspace, sample_db):
    """Under cron stderr is appended to backup.log; the log file handler must not write it twice."""
    workspace.write_config(workspace.postgres_config(sample_db.name))
    workspace.backup_dir.mkdir(mode=0o700)
    log = workspace.backup_dir / "backup.log"
    with open(log, "a") as handle:
        argv = [sys.executable, "-m", "invoke", "-r", str(ROOT), *with_fixed_tier(["backup", "--all"])]
        argv += ["--config", str(workspace.config)]
        proc = subprocess.run(argv, cwd=workspace.path, env=workspace.env, stdout=handle, stderr=subprocess.STDOUT)
    assert proc.returncode == 0
    lines = [line for line in log.read_text().splitlines() if "backup started" in line]
    assert len(lines) == 1, log.read_text()


def test_drill_and_restore_all_from_a_destination(workspace, sample_db):
    """The machine lost its local backups: --from fetches from a real rsync destination (a local path)."""
    remote = workspace.path / "remote"
    remote.mkdir()
    config = workspace.postgres_config(sample_db.name)
    config["destinations"] = [{"name": "nas", "type": "rsync", "target": str(remote)}]
    workspace.write_config(config)
    backup_ok(workspace)
    assert list((remote / "pg").rglob("backup_*.sql.gz"))
    shutil.rmtree(workspace.backup_dir / "pg")

    unknown = workspace.invoke("drill", "--from", "cloud")
    assert unknown.returncode == 2 and "no such destination" in unknown.stderr

    result = workspace.invoke("drill", "--from", "nas")
    assert result.returncode == 0, result.stderr
    assert "nas: downloading pg/" in result.stderr
    drills = json.loads((workspace.backup_dir / "pg" / "drills.json").read_text())["drills"]
    assert drills[0]["ok"] is True and drills[0]["source"] == "nas" and drills[0]["rows"] == 920

    before = sample_db.checksums()
    sample_db.sql("DROP TABLE users CASCADE;")
    result = workspace.invoke("restore", "--all", "--from", "nas", "--yes", "--drop-previous")
    assert result.returncode == 0, result.stderr
    assert "nas: downloading pg/" in result.stderr
    assert sample_db.checksums() == before
    assert not list(workspace.backup_dir.glob(".fetch-*"))  # downloads are cleaned up
