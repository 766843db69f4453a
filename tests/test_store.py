"""Layout, records and retention: ages come from records, foreign files are never touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lib import store

NOW = datetime(2026, 11, 26, 2, 0, tzinfo=UTC)


def fake(tmp_path, name, tier, days_old, verified=True, suffix=".sql.gz"):
    created = NOW - timedelta(days=days_old)
    directory = store.ensure_dir(tmp_path / name / tier)
    path = directory / f"backup_{created.strftime('%Y%m%d_%H%M%S')}{suffix}"
    path.write_bytes(b"data")
    # mtime says "new" on purpose: retention must use the record, not mtime
    os.utime(path, (NOW.timestamp(), NOW.timestamp()))
    backup = store.Backup(
        path,
        {"name": name, "tier": tier, "created": store.iso(created), "file": path.name, "verified": {"ok": verified}},
    )
    backup.save()
    store.write_atomic(backup.sha256_path, b"x  " + path.name.encode() + b"\n")
    return backup


def test_tier_from_date():
    assert store.tier_for(datetime(2026, 11, 1), weekly_on=6, monthly_on=1) == "monthly"  # a Sunday, monthly wins
    assert store.tier_for(datetime(2026, 11, 8), weekly_on=6, monthly_on=1) == "weekly"
    assert store.tier_for(datetime(2026, 11, 9), weekly_on=6, monthly_on=1) == "daily"


def test_tier_over_a_whole_year():
    """Every day of 2026 (a year starting on a Thursday): the 1st is monthly (even on a Sunday),
    other Sundays weekly, the rest daily; other weekly/monthly settings move the days with them."""
    day = datetime(2026, 1, 1, 2, 0)
    seen = {"daily": 0, "weekly": 0, "monthly": 0}
    while day.year == 2026:
        tier = store.tier_for(day, weekly_on=6, monthly_on=1)
        expected = "monthly" if day.day == 1 else "weekly" if day.weekday() == 6 else "daily"
        assert tier == expected, day
        assert store.tier_for(day, weekly_on=0, monthly_on=15) == (
            "monthly" if day.day == 15 else "weekly" if day.weekday() == 0 else "daily"
        ), day
        seen[tier] += 1
        day += timedelta(days=1)
    # 52 Sundays in 2026, one of them (Feb 1, Mar 1, Nov 1) on the 1st: 49 weekly
    assert seen == {"monthly": 12, "weekly": 49, "daily": 365 - 12 - 49}


def test_retention_deletes_by_recorded_age_per_tier(tmp_path):
    keep = {"daily": 7, "weekly": 30, "monthly": 90}
    backups = [fake(tmp_path, "pg", "daily", d) for d in (1, 6, 8, 20)]
    backups += [fake(tmp_path, "pg", "weekly", d) for d in (10, 29, 31)]
    backups += [fake(tmp_path, "pg", "monthly", d) for d in (60, 95)]
    doomed = store.plan_retention(store.list_backups(tmp_path, "pg"), keep, NOW)
    ages = sorted(((NOW - b.created).days, b.tier) for b in doomed)
    assert ages == [(8, "daily"), (20, "daily"), (31, "weekly"), (95, "monthly")]


def test_newest_verified_of_a_tier_survives_even_when_old(tmp_path):
    old_verified = fake(tmp_path, "pg", "daily", 40)
    fake(tmp_path, "pg", "daily", 30, verified=False)
    doomed = store.plan_retention(store.list_backups(tmp_path, "pg"), {"daily": 7}, NOW)
    assert old_verified.path not in [b.path for b in doomed]
    assert len(doomed) == 1


def test_files_without_our_record_are_invisible_to_retention(tmp_path):
    fake(tmp_path, "pg", "daily", 100)
    fake(tmp_path, "pg", "daily", 1)
    legacy = tmp_path / "pg" / "daily" / "backup_20200101_020000.sql.gz"
    legacy.write_bytes(b"old script backup")
    notes = tmp_path / "pg" / "daily" / "README.txt"
    notes.write_text("operator notes")
    backups = store.list_backups(tmp_path, "pg")
    assert legacy not in [b.path for b in backups]
    assert store.legacy_files(tmp_path, "pg") == [legacy]
    for backup in store.plan_retention(backups, {"daily": 7}, NOW):
        store.delete(backup)
    left = sorted(p.name for p in (tmp_path / "pg" / "daily").iterdir())
    assert "README.txt" in left and legacy.name in left
    assert len([n for n in left if n.endswith(".json")]) == 1


def test_delete_removes_sidecars(tmp_path):
    backup = fake(tmp_path, "pg", "daily", 3)
    store.delete(backup)
    assert list((tmp_path / "pg" / "daily").iterdir()) == []


def test_record_must_name_its_own_file(tmp_path):
    backup = fake(tmp_path, "pg", "daily", 3)
    record = json.loads(backup.record_path.read_text())
    record["file"] = "something_else.sql.gz"
    backup.record_path.write_text(json.dumps(record))
    [listed] = store.list_backups(tmp_path, "pg")  # shown, but as a backup with an invalid record
    assert "'file' is 'something_else.sql.gz'" in listed.problem and not listed.verified
    assert store.latest_verified([listed]) is None
    assert store.plan_retention([listed], {"daily": 1}, NOW + timedelta(days=365)) == []


def test_prune_task_end_to_end(workspace, sample_db):
    config = workspace.postgres_config(sample_db.name)
    workspace.write_config(config)
    assert workspace.invoke("backup", "--all", "--tier", "daily").returncode == 0
    old = fake(workspace.backup_dir, "pg", "daily", 9)
    foreign = workspace.backup_dir / "pg" / "daily" / "backup_20190101_000000.sql.gz"
    foreign.write_bytes(b"made by the old scripts")
    dry = workspace.invoke("prune", "--dry-run")
    assert dry.returncode == 0 and "would delete 1" in dry.stdout
    assert old.path.exists()
    result = workspace.invoke("prune")
    assert result.returncode == 0 and "deleted 1" in result.stdout
    assert not old.path.exists() and not old.record_path.exists() and not old.sha256_path.exists()
    assert foreign.exists()
    assert len(workspace.backups()) == 2  # the new backup and the foreign file
    listing = workspace.invoke("list")
    assert "no record" in listing.stdout and "verified [sha256" in listing.stdout


def test_permissions_log_and_dry_run(workspace, sample_db):
    workspace.write_config(workspace.postgres_config(sample_db.name))
    dry = workspace.invoke("backup", "--all", "--dry-run")
    assert dry.returncode == 0 and "pg: " in dry.stdout and "pg_dump | " in dry.stdout
    assert not workspace.backup_dir.exists()
    assert workspace.invoke("backup", "--all").returncode == 0
    for path in workspace.backup_dir.rglob("*"):
        mode = path.stat().st_mode & 0o777
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
    assert oct(workspace.backup_dir.stat().st_mode & 0o777) == "0o700"
    log = (workspace.backup_dir / "backup.log").read_text().splitlines()
    assert any(" INFO pg: verified backup " in line for line in log)
    assert all(line[:4].isdigit() and line[4] == "-" for line in log)


GOOD = {
    "name": "pg",
    "tier": "daily",
    "created": "2026-11-26T02:00:03Z",
    "file": "backup_20261126_020003.sql.gz",
    "size": 10,
    "sha256": "a" * 64,
    "verified": {"ok": True, "checks": ["sha256"]},
    "engine_meta": {"tables": {"public.t": 3}},
    "destinations": {"nas": {"verified_at": "2026-11-26T02:01:00Z", "size": 10}},
}


def test_validate_record_names_what_is_wrong():
    assert store.validate_record(GOOD, GOOD["file"]) is None
    cases = {
        "created": ("yesterday", "'created' is 'yesterday'"),
        "tier": ("hourly", "'tier' is 'hourly'"),
        "size": (10**400, "'size' is int"),
        "sha256": (12, "'sha256' is int"),
        "verified": ({"ok": "yes"}, "'verified' is dict"),
        "engine_meta": ({"tables": {"t": "3"}}, "'engine_meta'"),
        "destinations": ({"nas": [1]}, "'destinations'"),
        "name": (None, "'name' is NoneType"),
    }
    for key, (value, needle) in cases.items():
        problem = store.validate_record({**GOOD, key: value}, GOOD["file"])
        assert problem is not None and needle in problem, (key, problem)
    assert "'tier'" in store.validate_record({k: v for k, v in GOOD.items() if k != "tier"}, GOOD["file"])
    assert store.validate_record([GOOD], GOOD["file"]) == "not a JSON object but a list"
    assert "'created' is" in store.validate_record({**GOOD, "created": "x" * 10_000}, GOOD["file"])
    assert len(store.validate_record({**GOOD, "created": "x" * 10_000}, GOOD["file"])) < 200  # one short line
    assert store.validate_record({**GOOD, "size": True}, GOOD["file"]) is not None  # a bool is not a size


def test_write_atomic_never_follows_a_link_at_its_temp_name(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "record.json"
    (tmp_path / f"{store.TEMP_PREFIX}record.json.{os.getpid()}").symlink_to(victim)
    store.write_atomic(target, b"new")
    assert victim.read_text() == "precious" and target.read_bytes() == b"new"
    assert not target.is_symlink() and target.stat().st_mode & 0o777 == 0o600


def test_a_record_that_is_a_link_is_not_followed(tmp_path):
    backup = fake(tmp_path, "pg", "daily", 1)
    outside = tmp_path / "outside.json"
    outside.write_text(backup.record_path.read_text())
    backup.record_path.unlink()
    backup.record_path.symlink_to(outside)
    loaded = store.load(backup.path)
    assert loaded is not None and loaded.problem == "the record is a symbolic link" and not loaded.verified


def test_a_record_that_is_a_fifo_or_a_directory_cannot_block_or_crash(tmp_path):
    fifo = fake(tmp_path, "pg", "daily", 1)
    fifo.record_path.unlink()
    os.mkfifo(fifo.record_path)
    folder = fake(tmp_path, "pg", "daily", 2)
    folder.record_path.unlink()
    folder.record_path.mkdir()
    problems = sorted(b.problem for b in store.list_backups(tmp_path, "pg"))
    assert problems == ["cannot read it: Is a directory", "cannot read it: not a regular file"]


@pytest.mark.skipif(
    not Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1").exists(), reason="needs libfaketime (faketime)"
)
def test_backup_without_tier_follows_the_tools_date(workspace, sample_db):
    """The tool's own clock (faked for the tool only) picks the tier: the 1st is monthly even on a
    Sunday, another Sunday weekly, a Monday daily. Whatever today is."""
    from conftest import ROOT, tool_faketime

    workspace.write_config(workspace.postgres_config(sample_db.name))
    for moment, tier in (
        ("2026-11-01 03:00:00", "monthly"),
        ("2026-11-08 03:00:00", "weekly"),
        ("2026-11-09 03:00:00", "daily"),
    ):
        argv = [sys.executable, "-m", "invoke", "-r", str(ROOT), "backup", "--all", "--config", str(workspace.config)]
        env = {**workspace.env, **tool_faketime(moment)}
        result = subprocess.run(argv, cwd=workspace.path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        day = moment[:10].replace("-", "")
        assert [p.name for p in (workspace.backup_dir / "pg" / tier).glob(f"backup_{day}_*.sql.gz")], (
            tier,
            result.stderr,
        )
