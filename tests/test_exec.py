"""lib/exec.py: where commands run and what environment children get (no database needed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lib.config import load_spec
from lib.engines import get_engine
from lib.exec import child_env

CONFIG = """version: 1
encryption: {mode: symmetric, passphrase_env: BACKUP_PASSPHRASE}
databases:
  pg: {engine: postgres, database: d, user: u, host: 127.0.0.1, password_env: PGPASS_LEMON}
  mongo: {engine: mongodb, database: m, user: u, host: 127.0.0.1, password_env: DB_PASSWORD}
"""


def test_configured_secret_variables_are_scrubbed_from_every_child_environment(tmp_path, monkeypatch):
    for name, value in (("PGPASS_LEMON", "pg-secret"), ("DB_PASSWORD", "mongo-secret"), ("BACKUP_PASSPHRASE", "pp")):
        monkeypatch.setenv(name, value)
    (tmp_path / "backup.yml").write_text(CONFIG)
    spec = load_spec(tmp_path / "backup.yml")
    assert spec.secret_env_names == {"PGPASS_LEMON", "DB_PASSWORD", "BACKUP_PASSPHRASE"}
    assert spec.env["PGPASS_LEMON"] == "pg-secret"  # the values stay with the spec

    pg = spec.databases["pg"]
    env = get_engine("postgres").place(pg, spec.env).env()
    assert env["PGPASSWORD"] == "pg-secret"
    assert not {"PGPASS_LEMON", "DB_PASSWORD", "BACKUP_PASSPHRASE"} & set(env)

    mongo = spec.databases["mongo"]
    engine = get_engine("mongodb")
    env = engine.tool_env(mongo, engine.place(mongo, spec.env))
    assert "mongo-secret" in env["LEMON_MONGO_CONFIG"]
    assert not {"PGPASS_LEMON", "DB_PASSWORD", "BACKUP_PASSPHRASE"} & set(env)

    # children started without an explicit environment (compressors, gpg, hooks) too
    assert not {"PGPASS_LEMON", "DB_PASSWORD", "BACKUP_PASSPHRASE"} & set(child_env())
    inherited = subprocess.run(["env"], capture_output=True, text=True).stdout
    assert "pg-secret" not in inherited and "mongo-secret" not in inherited and "BACKUP_PASSPHRASE" not in inherited


PARENT = """
import subprocess, sys, threading, time
from lib.exec import dying_with_tool
# started from a second thread too: the signal follows the thread, which waits for its child
procs = [subprocess.Popen(dying_with_tool(["sleep", "60"]))]
thread = threading.Thread(target=lambda: procs.append(subprocess.Popen(dying_with_tool(["sleep", "60"]))) or procs[-1].wait())
thread.start()
while len(procs) < 2:
    time.sleep(0.01)
print(" ".join(str(p.pid) for p in procs), flush=True)
procs[0].wait()
"""


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def test_children_started_dying_with_tool_die_when_the_parent_is_sigkilled():
    root = Path(__file__).resolve().parent.parent
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=root, stdout=subprocess.PIPE, text=True)
    pids = [int(pid) for pid in parent.stdout.readline().split()]
    assert len(pids) == 2
    # setpriv sets the signal, then becomes sleep: wait for that (a parent killed in the first
    # milliseconds of a child's start, before setpriv ran, is the one case not covered)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(comm(pid) == "sleep" for pid in pids):
        time.sleep(0.01)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids)
