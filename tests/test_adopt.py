"""Switching from the old scripts: their backups are adopted after verification, then retention applies."""

from __future__ import annotations

import json
import subprocess

from conftest import PGHOST, PGPORT, PGUSER


def old_script_backup(workspace, dbname, tier, stamp, truncate=False):
    """Make a backup exactly as the old script did: pg_dump | gzip > backups/postgres/<tier>/backup_<stamp>.sql.gz"""
    directory = workspace.backup_dir / "pg" / tier
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"backup_{stamp}.sql.gz"
    dump = subprocess.run(
        ["pg_dump", "-h", PGHOST, "-p", PGPORT, "-U", PGUSER, dbname], capture_output=True, check=True
    ).stdout
    if truncate:
        dump = dump[: len(dump) // 2]
    path.write_bytes(subprocess.run(["gzip", "-c"], input=dump, capture_output=True, check=True).stdout)
    return path


def test_adopt_verifies_records_and_hands_over_to_retention(workspace, sample_db):
    workspace.write_config(workspace.postgres_config(sample_db.name))
    old = old_script_backup(workspace, sample_db.name, "daily", "20200105_020000")
    recent = old_script_backup(workspace, sample_db.name, "daily", "20991231_020000")
    broken = old_script_backup(workspace, sample_db.name, "weekly", "20991230_020000", truncate=True)

    listing = workspace.invoke("list")
    assert listing.stdout.count("no record") == 3

    result = workspace.invoke("adopt")
    assert result.returncode == 1, result.stderr  # one file refused
    assert "adopted 2 file(s); 1 left alone" in result.stdout
    record = json.loads((recent.parent / (recent.name + ".json")).read_text())
    assert record["adopted"] is True and record["verified"]["ok"] is True
    assert record["engine_meta"]["tables"]["public.users"] == 300
    assert not (broken.parent / (broken.name + ".json")).exists()
    assert broken.exists()

    pruned = workspace.invoke("prune")
    assert pruned.returncode == 0 and "deleted 1" in pruned.stdout
    assert not old.exists() and recent.exists() and broken.exists()

    sample_db.sql("DELETE FROM users WHERE id > 10 AND id NOT IN (SELECT sender FROM messages);")
    restored = workspace.invoke("restore", "--engine", "postgres", "--file", "latest", "--yes", "--drop-previous")
    assert restored.returncode == 0, restored.stderr
    assert sample_db.sql("SELECT count(*) FROM users") == "300"
