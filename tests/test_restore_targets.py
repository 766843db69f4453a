"""restore refuses targets that are not the operator's to replace (lib/restore.py check_target,
check_owner): the maintenance and template databases, names PostgreSQL would cut, a database
backup.yml configures under another name, and another configured database's backup; exit 2,
one line naming it, nothing touched. --force-target says the operator means it."""

from __future__ import annotations

import pytest
from conftest import ScratchDB, databases_like


@pytest.fixture
def two_databases(workspace, sample_db):
    """'pg' (sample data, one backup) and 'other' (one table of its own) in one backup.yml."""
    other = ScratchDB()
    other.sql("CREATE TABLE mine (id int); INSERT INTO mine VALUES (1), (2);")
    config = workspace.postgres_config(sample_db.name)
    config["databases"]["other"] = dict(config["databases"]["pg"], database=other.name)
    workspace.write_config(config)
    result = workspace.invoke("backup", "--db", "pg")
    assert result.returncode == 0, result.stderr
    yield sample_db, other
    other.drop_all()


def ours(*prefixes: str) -> list[str]:
    """Databases whose names start with one of ``prefixes`` (other tests share the server)."""
    return sorted(d for p in prefixes for d in databases_like(p[:20]))


@pytest.mark.parametrize(
    "into,needle",
    [
        ("template1", "maintenance or template database"),
        ("postgres", "maintenance or template database"),
        ("template0", "template database is never a restore target"),
        ("x" * 64, "the name is 64 bytes"),
        ("é" * 32, "the name is 64 bytes"),
    ],
)
def test_reserved_and_overlong_targets_are_refused(workspace, two_databases, into, needle):
    sample, other = two_databases
    before = ours(sample.name, other.name, into)
    result = workspace.invoke(
        "restore", "--engine", "postgres", "--db", "pg", "--file", "latest", "--into", into, "--yes"
    )
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert ours(sample.name, other.name, into) == before


def test_the_configured_maintenance_database_is_refused(workspace, two_databases):
    sample, _ = two_databases
    config = workspace.postgres_config(sample.name, maintenance_database="bt_maint_db")
    workspace.write_config(config)
    result = workspace.invoke("restore", "--engine", "postgres", "--file", "latest", "--into", "bt_maint_db", "--yes")
    assert result.returncode == 2 and "maintenance or template database" in result.stderr, result.stderr


def test_a_database_configured_under_another_name_is_refused_unless_forced(workspace, two_databases):
    sample, other = two_databases
    before = other.checksums()
    args = ["restore", "--engine", "postgres", "--db", "pg", "--file", "latest", "--into", other.name, "--yes"]
    result = workspace.invoke(*args)
    assert result.returncode == 2, result.stderr
    assert "the database backup.yml configures as 'other'" in result.stderr
    assert "--force-target" in result.stderr
    assert other.checksums() == before
    assert databases_like(other.name) == [other.name]

    forced = workspace.invoke(*args, "--force-target")
    assert forced.returncode == 0, forced.stderr
    assert other.checksums() == sample.checksums()


def test_another_databases_backup_is_refused_unless_forced(workspace, two_databases):
    sample, other = two_databases
    [backup] = workspace.backups("pg")
    before = other.checksums()
    args = ["restore", "--engine", "postgres", "--db", "other", "--file", str(backup), "--yes", "--drop-previous"]
    result = workspace.invoke(*args)
    assert result.returncode == 2, result.stderr
    assert f"{backup.name} is a backup of 'pg', not of 'other'" in result.stderr
    assert other.checksums() == before and databases_like(other.name) == [other.name]

    # into a database of its own it is fine: nothing configured is replaced
    copy = f"{other.name}_copy"
    into = workspace.invoke(
        "restore", "--engine", "postgres", "--db", "other", "--file", str(backup), "--yes", "--into", copy
    )
    assert into.returncode == 0, into.stderr
    assert other.checksums(copy) == sample.checksums()

    forced = workspace.invoke(*args, "--force-target")
    assert forced.returncode == 0, forced.stderr
    assert other.checksums() == sample.checksums()
