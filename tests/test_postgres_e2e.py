"""End to end through the real Invoke tasks against the real PostgreSQL server."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import databases_like


def test_round_trip_host_mode_same_rows(workspace, sample_db):
    workspace.write_config(workspace.postgres_config(sample_db.name))
    before = sample_db.checksums()

    result = workspace.invoke("backup", "--all")
    assert result.returncode == 0, result.stderr
    [backup] = workspace.backups()
    assert backup.name.endswith(".sql.gz")
    # the sidecar is accepted by sha256sum -c
    check = subprocess.run(["sha256sum", "-c", backup.name + ".sha256"], cwd=backup.parent, capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr
    record = json.loads((backup.parent / (backup.name + ".json")).read_text())
    assert record["verified"]["ok"] is True
    assert record["engine_meta"]["tables"] == {"public.lessons": 120, "public.messages": 500, "public.users": 300}
    assert record["dump_format"] == "plain"  # from the engine (format: plain is the default)

    sample_db.sql("DELETE FROM messages WHERE id > 10; UPDATE users SET name = 'changed';")
    result = workspace.invoke("restore", "--engine", "postgres", "--file", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert sample_db.checksums() == before
    kept = [d for d in databases_like(sample_db.name) if "_pre_restore_" in d]
    assert len(kept) == 1
    assert sample_db.checksums(kept[0])["public.messages"].startswith("10:")


def test_round_trip_container_mode_through_docker_double(workspace, sample_db):
    workspace.write_config(workspace.postgres_config(sample_db.name, container="lemon-postgres"))
    env = {"DOCKER_DOUBLE_RUNNING": "lemon-postgres"}
    before = sample_db.checksums()

    result = workspace.invoke("backup", "--db", "pg", env=env)
    assert result.returncode == 0, result.stderr
    calls = [json.loads(line) for line in (workspace.path / "docker-calls.log").read_text().splitlines()]
    assert any(call[0] == "exec" and "pg_dump" in call for call in calls)

    sample_db.sql("TRUNCATE messages;")
    result = workspace.invoke(
        "restore", "--engine", "postgres", "--file", "latest", "--yes", "--drop-previous", env=env
    )
    assert result.returncode == 0, result.stderr
    assert sample_db.checksums() == before
    assert [d for d in databases_like(sample_db.name) if d != sample_db.name] == []


@pytest.mark.parametrize(
    "options,suffix",
    [({"format": "custom"}, ".dump"), ({"compression": "zstd"}, ".sql.zst"), ({"compression_level": 1}, ".sql.gz")],
)
def test_formats_and_compressors_round_trip(workspace, sample_db, options, suffix):
    workspace.write_config(workspace.postgres_config(sample_db.name, **options))
    before = sample_db.checksums()
    assert workspace.invoke("backup", "--all").returncode == 0
    [backup] = workspace.backups()
    assert backup.name.endswith(suffix)
    record = json.loads(backup.with_name(backup.name + ".json").read_text())
    assert record["dump_format"] == options.get("format", "plain")
    verify = workspace.invoke("verify", "--file", str(backup))
    assert verify.returncode == 0, verify.stderr
    sample_db.sql("DROP TABLE messages;")
    result = workspace.invoke("restore", "--engine", "postgres", "--file", str(backup), "--yes", "--drop-previous")
    assert result.returncode == 0, result.stderr
    assert sample_db.checksums() == before
