"""lib/exec.py: where commands run and what environment children get (no database needed)."""

from __future__ import annotations

import subprocess

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
