"""SIGTERM and SIGHUP stop a run like Ctrl-C (lib/interrupt.py): cleanup, 'interrupted' in hooks,
last_run.json and metrics, exit 143/129; children die with the tool even when it is SIGKILLed
(lib/exec.dying_with_tool). Real processes and signals against the real PostgreSQL server; a
table lock and a slow CHECK constraint hold the run where the signal is sent."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PGHOST, PGPORT, PGUSER, ROOT, databases_like, psql, with_fixed_tier


def start(workspace, *args: str) -> subprocess.Popen:
    """The real task in the background, as Workspace.invoke runs it."""
    argv = [sys.executable, "-m", "invoke", "-r", str(ROOT), *with_fixed_tier(args), "--config", str(workspace.config)]
    return subprocess.Popen(
        argv,
        cwd=workspace.path,
        env=workspace.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the run ended first: {proc.communicate()}")
        time.sleep(0.05)
    pytest.fail("timed out waiting")


def sessions(where: str) -> int:
    return int(psql(f"SELECT count(*) FROM pg_stat_activity WHERE {where};"))


def hold_table_lock(dbname: str, table: str) -> subprocess.Popen:
    """A session holding an ACCESS EXCLUSIVE lock on ``table`` until its stdin closes."""
    argv = ["psql", "-X", "-q", "-h", PGHOST, "-p", PGPORT, "-U", PGUSER, "-d", dbname]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    proc.stdin.write(f"BEGIN;\nLOCK TABLE {table} IN ACCESS EXCLUSIVE MODE;\n")
    proc.stdin.flush()
    wait_for(lambda: sessions(f"datname = '{dbname}' AND state = 'idle in transaction'") == 1)
    return proc


HOOK = "import json, os; json.dump({k: v for k, v in os.environ.items() if k.startswith('BACKUP_')}, open('hook.json', 'w'))"


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_signal_stops_a_backup_cleanly_and_it_is_reported_interrupted(workspace, sample_db, sig, code):
    config = workspace.postgres_config(sample_db.name)
    config["notify"] = {"on_failure": [sys.executable, "-c", HOOK]}
    config["monitoring"] = {"prometheus_textfile": "metrics.prom"}
    workspace.write_config(config)
    locker = hold_table_lock(sample_db.name, "users")
    try:
        proc = start(workspace, "backup", "--all")
        dumping = f"datname = '{sample_db.name}' AND application_name = 'pg_dump' AND wait_event_type = 'Lock'"
        wait_for(lambda: sessions(dumping) == 1, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        locker.stdin.close()
        locker.wait()
    assert proc.returncode == code, err
    assert f"interrupted ({sig.name}); see the log" in err and "Traceback" not in err
    assert list(workspace.backup_dir.rglob(".tmp-*")) == []
    assert workspace.backups() == []
    last = json.loads((workspace.backup_dir / "pg" / "last_run.json").read_text())
    assert last["status"] == "interrupted" and last["stage"] == "interrupted"
    assert last["runs"] == {"success": 0, "failure": 0, "interrupted": 1}
    hook = json.loads((workspace.path / "hook.json").read_text())
    assert hook["BACKUP_STATUS"] == "interrupted" and hook["BACKUP_STAGE"] == "interrupted"
    assert sig.name in hook["BACKUP_ERROR"]
    metrics = (workspace.path / "metrics.prom").read_text()
    assert 'lemon_backup_runs_total{database="pg",status="interrupted"} 1' in metrics
    assert 'lemon_backup_last_run_success{database="pg"} 0' in metrics
    wait_for(lambda: sessions(f"datname = '{sample_db.name}' AND application_name = 'pg_dump'") == 0, timeout=10)


def test_children_die_with_a_sigkilled_backup(workspace, sample_db):
    """pg_dump waiting for a lock writes nothing, so no broken pipe would ever stop it: it must
    die with the tool, not go on outside the run lock (its server session ends when it gets the
    lock and finds its client gone)."""
    workspace.write_config(workspace.postgres_config(sample_db.name))
    locker = hold_table_lock(sample_db.name, "users")
    try:
        proc = start(workspace, "backup", "--all")
        dumping = f"datname = '{sample_db.name}' AND application_name = 'pg_dump'"
        wait_for(lambda: sessions(dumping + " AND wait_event_type = 'Lock'") == 1, proc)
        children = descendants(proc.pid)
        assert "pg_dump" in children.values(), children
        proc.kill()
        proc.communicate(timeout=30)
        wait_for(lambda: not any(alive(pid) for pid in children), timeout=10)  # the lock is still held
    finally:
        locker.stdin.close()
        locker.wait()
    assert workspace.invoke("backup", "--all").returncode == 0  # its temp file is removed first
    assert list(workspace.backup_dir.rglob(".tmp-*")) == []


# A table whose CHECK constraint sleeps per row: its data loads slowly enough to signal mid-load.
# The constraint is validated by a fast function; the slow one replaces it afterwards (and is
# what the dump holds).
SLOW_TABLE = """
CREATE FUNCTION slow_ok(int) RETURNS boolean LANGUAGE sql AS $$ SELECT true $$;
CREATE TABLE slow (id int CHECK (slow_ok(id)));
INSERT INTO slow SELECT generate_series(1, 200);
CREATE OR REPLACE FUNCTION slow_ok(int) RETURNS boolean LANGUAGE sql AS $$ SELECT pg_sleep(0.05) IS NOT NULL $$;
"""


@pytest.fixture(params=[1])
def slow_restore(request, workspace, sample_db):
    """A backup whose restore takes ~10 s in its load; custom format, so every process of the
    load is started by lib/stream.py: with one job a pipeline reading the file (the tool is its
    sink), with more pg_restore --jobs reading the file itself (its stdout alone goes to the tool)."""
    sample_db.sql(SLOW_TABLE)
    workspace.write_config(workspace.postgres_config(sample_db.name, format="custom", restore_jobs=request.param))
    result = workspace.invoke("backup", "--all")
    assert result.returncode == 0, result.stderr
    return sample_db


def loading(db) -> str:
    return f"datname LIKE '{db.name}_restoring_%' AND query LIKE 'COPY%'"


def test_sigterm_stops_a_restore_and_drops_its_scratch_database(workspace, slow_restore):
    db = slow_restore
    before = db.checksums()
    proc = start(workspace, "restore", "--engine", "postgres", "--file", "latest", "--yes")
    wait_for(lambda: sessions(loading(db)) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "interrupted (SIGTERM); see the log" in err and "Traceback" not in err
    assert databases_like(db.name) == [db.name]
    assert db.checksums() == before


def descendants(pid: int, depth: int = 99) -> dict[int, str]:
    """Live (not zombie) descendants of ``pid`` (``depth`` 1: its children): pid -> command name."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        state, ppid = text[text.rindex(")") + 2 :].split()[:2]
        if state != "Z":
            children.setdefault(int(ppid), []).append(int(stat.parent.name))
            names[int(stat.parent.name)] = name
    found: dict[int, str] = {}
    todo = [(pid, 0)]
    while todo:
        parent, level = todo.pop()
        for child in children.get(parent, []) if level < depth else []:
            found[child] = names[child]
            todo.append((child, level + 1))
    return found


def alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] != "Z"


@pytest.mark.parametrize("slow_restore", [2], indirect=True)
def test_children_die_with_a_sigkilled_restore_and_the_next_run_drops_its_scratch(workspace, slow_restore):
    db = slow_restore
    proc = start(workspace, "restore", "--engine", "postgres", "--file", "latest", "--yes")
    wait_for(lambda: sessions(loading(db)) >= 1, proc)
    # its own children: pg_restore --jobs's workers end once their COPY (~10 s) finds the leader gone
    children = descendants(proc.pid, depth=1)
    assert "pg_restore" in children.values(), children
    proc.kill()
    proc.communicate(timeout=30)
    wait_for(lambda: not any(alive(pid) for pid in children), timeout=5)
    # the load's session ends with its client; the next run removes the scratch database
    wait_for(lambda: sessions(f"datname LIKE '{db.name}_restoring_%'") == 0, timeout=30)
    assert len(databases_like(db.name)) == 2
    doctor = workspace.invoke("doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "dropped scratch database" in doctor.stdout
    assert databases_like(db.name) == [db.name]


def test_sigterm_stops_a_drill_drops_its_throwaway_and_runs_the_hook(workspace, slow_restore):
    db = slow_restore
    config = workspace.postgres_config(db.name, format="custom", restore_jobs=1)
    config["notify"] = {"on_failure": [sys.executable, "-c", HOOK]}
    workspace.write_config(config)
    proc = start(workspace, "drill")
    wait_for(lambda: sessions(f"datname LIKE '{db.name}_drill_%' AND query LIKE 'COPY%'") >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert databases_like(db.name) == [db.name]
    hook = json.loads((workspace.path / "hook.json").read_text())
    assert hook["BACKUP_RUN"] == "drill" and hook["BACKUP_STATUS"] == "interrupted"
    assert hook["BACKUP_STAGE"] == "interrupted"


def test_a_sighup_ignored_by_nohup_stays_ignored(workspace, sample_db):
    """nohup starts the tool with SIGHUP ignored: closing the terminal must not stop the backup."""
    workspace.write_config(workspace.postgres_config(sample_db.name))
    locker = hold_table_lock(sample_db.name, "users")
    try:
        argv = ["nohup", sys.executable, "-m", "invoke", "-r", str(ROOT), "backup", "--all", "--tier", "daily"]
        proc = subprocess.Popen(
            [*argv, "--config", str(workspace.config)],
            cwd=workspace.path,
            env=workspace.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        dumping = f"datname = '{sample_db.name}' AND application_name = 'pg_dump' AND wait_event_type = 'Lock'"
        wait_for(lambda: sessions(dumping) == 1, proc)
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert proc.poll() is None
    finally:
        locker.stdin.close()
        locker.wait()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert len(workspace.backups()) == 1
