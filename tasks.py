"""Invoke tasks: flags, help text and exit codes only. The work is done in lib/."""

from __future__ import annotations

from invoke import task
from invoke.exceptions import Exit

from lib import store
from lib.backup import backup_many, plan
from lib.backup import prune as prune_db
from lib.cli import confirm_on_terminal, guarded, parse_tier, spec_and_log
from lib.config import load_spec
from lib.errors import InputError
from lib.log import get as get_log
from lib.restore import restore as restore_db

CONFIG_HELP = "Path to backup.yml (default: $BACKUP_CONFIG, then ./backup.yml)."


@task(
    iterable=["db"],
    help={
        "all": "Back up every database in backup.yml.",
        "db": "Back up this database (the name under 'databases:'); repeatable.",
        "tier": "Force the tier: daily, weekly or monthly (default: from today's date and schedule).",
        "dry_run": "Print the plan (files, stages) without dumping anything.",
        "config": CONFIG_HELP,
    },
)
@guarded
def backup(c, all=False, db=None, tier=None, dry_run=False, config=None):
    """Dump, compress, verify, encrypt and store backups, then apply retention. Exit 1 if any failed."""
    if not all and not db:
        raise InputError("say what to back up: --all or --db NAME")
    tier = parse_tier(tier)
    spec = spec_and_log(config, with_file_log=not dry_run)
    databases = spec.select(None if all else db)
    if dry_run:
        for item in databases:
            print(plan(spec, item, tier).describe())
        return
    outcome = backup_many(spec, databases, tier)
    if outcome.exit_code:
        raise Exit(outcome.summary(), code=outcome.exit_code)
    print(outcome.summary())


@task(
    help={
        "engine": "Engine of the backup: postgres or mongodb.",
        "file": "Backup file to restore, or 'latest' for the newest verified backup.",
        "db": "Which configured database (needed when several use the engine).",
        "into": "Restore into this database instead, leaving the configured one alone.",
        "yes": "Do not ask for confirmation (required without a terminal, e.g. from cron).",
        "drop_previous": "postgres: drop the replaced database instead of keeping it as <db>_pre_restore_<time>; "
        "mongodb: delete the safety archive after a verified restore.",
        "from": "Download the backup from this destination (see invoke list --dest NAME) and verify it first.",
        "config": CONFIG_HELP,
    },
)
@guarded
def restore(c, engine=None, file=None, db=None, into=None, yes=False, drop_previous=False, config=None, from_=None):
    """Verify a backup, then restore it safely: into a new database, checked, then swapped in."""
    if not engine or not file:
        raise InputError("restore needs --engine postgres|mongodb and --file PATH|latest")
    spec = spec_and_log(config)
    ask = confirm_on_terminal(yes)
    summary = restore_db(
        spec, engine, file, db_name=db, into=into, drop_previous=drop_previous, confirm=ask, from_dest=from_
    )
    print(
        f"restored {summary['file']} into {summary['target']}"
        + (f"; previous database kept as {summary['previous']}" if summary.get("previous") else "")
    )


@task(help={"config": CONFIG_HELP})
@guarded
def validate(c, config=None):
    """Check backup.yml (and .env, environment overrides) against the schema; all problems at once."""
    spec = load_spec(config)
    print(
        f"{spec.config_path}: valid ({len(spec.databases)} database(s): {', '.join(spec.databases)}; backups in {spec.backup_dir})"
    )


@task(
    name="list",
    iterable=["db"],
    help={
        "db": "Only this database; repeatable.",
        "dest": "List what this off-site destination holds instead of the local backups.",
        "config": CONFIG_HELP,
    },
)
@guarded
def list_(c, db=None, dest=None, config=None):
    """List stored backups per database and tier, newest first, with size, age and verified state."""
    spec = spec_and_log(config, with_file_log=False)
    if dest:
        from lib.offsite import listing_lines

        print("\n".join(listing_lines(spec, dest, spec.select(db))))
        return
    now = store.utcnow()
    for item in spec.select(db):
        backups = store.list_backups(spec.backup_dir, item.name)
        print(f"{item.name} ({item.engine}, {item.database}): {len(backups)} backup(s)")
        for tier in store.TIERS:
            for b in (b for b in backups if b.tier == tier):
                checks = ",".join(b.record.get("verified", {}).get("checks", []))
                state = f"verified [{checks}]" if b.verified else "NOT verified"
                print(
                    f"  {tier:<8} {b.path.name:<40} {store.human_size(b.record.get('size', 0)):>10} {store.human_age(now - b.created):>5} old  {state}"
                )
        for legacy in store.legacy_files(spec.backup_dir, item.name):
            print(
                f"  {legacy.parent.name:<8} {legacy.name:<40} {store.human_size(legacy.stat().st_size):>10}  no record (not made by this tool; never pruned)"
            )


@task(
    iterable=["db"],
    help={
        "file": "Verify only this file (default: every stored backup).",
        "db": "Only this database; repeatable.",
        "config": CONFIG_HELP,
    },
)
@guarded
def verify(c, file=None, db=None, config=None):
    """Re-verify stored backups: checksum, compression integrity, dump completeness. Exit 1 on any failure."""
    from lib.verify import verify_stored

    spec = spec_and_log(config)
    bad = verify_stored(spec, file=file, names=db, log=get_log())
    if bad:
        raise Exit(f"FAILED: {bad} backup(s) failed verification", code=1)


@task(
    iterable=["db"],
    help={
        "dry_run": "Only print what would be deleted.",
        "db": "Only this database; repeatable.",
        "config": CONFIG_HELP,
    },
)
@guarded
def prune(c, dry_run=False, db=None, config=None):
    """Apply retention now: delete backups older than their tier's keep_days (never the newest verified one)."""
    spec = spec_and_log(config, with_file_log=not dry_run)
    total = sum(len(prune_db(spec, item, dry_run=dry_run)) for item in spec.select(db))
    print(f"{'would delete' if dry_run else 'deleted'} {total} backup(s)")


@task(help={"keep": "Keep the demo directory (backups, config) and print where it is."})
@guarded
def demo(c, keep=False):
    """Run the whole road on a throwaway PostgreSQL with sample data: backup, verify, restore, compare."""
    from lib.demo import run_demo

    run_demo(keep=keep)


@task(
    iterable=["db"],
    help={
        "db": "Only this database; repeatable.",
        "dry_run": "Only verify and report; write nothing.",
        "config": CONFIG_HELP,
    },
)
@guarded
def adopt(c, db=None, dry_run=False, config=None):
    """Take over the old scripts' backups: verify each and write its record, so retention and restore see it."""
    from lib.adopt import adopt as adopt_db

    spec = spec_and_log(config, with_file_log=not dry_run)
    adopted = refused = 0
    for item in spec.select(db):
        a, r = adopt_db(spec, item, get_log(), dry_run=dry_run)
        adopted, refused = adopted + a, refused + r
    print(f"{'would adopt' if dry_run else 'adopted'} {adopted} file(s); {refused} left alone")
    if refused:
        raise Exit(f"{refused} file(s) failed verification or are not backups of that engine; see the log", code=1)


@task(
    help={
        "size_mb": "Size of the benchmark database to build (MB on disk; default 500).",
        "runs": "Alternating runs of each variant (default 3).",
        "compression": "The tool's compression for the run: gzip or zstd.",
        "format": "The tool's dump format: plain or custom.",
        "no_encrypt": "Leave encryption out of both the old sequence and the tool.",
        "no_copy": "Leave the off-site copy out of both.",
        "no_restore": "Skip the restore comparison.",
        "json": "Also write the results to this JSON file.",
        "drop": "Drop the benchmark database afterwards (default: keep it for the next run).",
    },
)
def bench(
    c,
    size_mb=500,
    runs=3,
    compression="gzip",
    format="plain",
    no_encrypt=False,
    no_copy=False,
    no_restore=False,
    json=None,
    drop=False,
):
    """Benchmark old scripts vs this tool vs the pg_dump floor; prints medians and ratios (see README)."""
    import subprocess
    import sys
    from pathlib import Path

    argv = [
        sys.executable,
        str(Path(__file__).parent / "benchmarks" / "bench.py"),
        "--size-mb",
        str(size_mb),
        "--runs",
        str(runs),
    ]
    argv += ["--compression", compression, "--format", format]
    argv += [
        flag
        for flag, on in (
            ("--no-encrypt", no_encrypt),
            ("--no-copy", no_copy),
            ("--no-restore", no_restore),
            ("--drop", drop),
        )
        if on
    ]
    argv += ["--json", json] if json else []
    raise Exit(code=subprocess.call(argv))


@task(help={"config": CONFIG_HELP})
@guarded
def keys(c, config=None):
    """Show the encryption setup: each recipient's key, fingerprint, expiry and usability. Exit 2 on a problem."""
    from lib.crypto import key_report

    spec = spec_and_log(config, with_file_log=False)
    lines, problems = key_report(spec)
    print("\n".join(lines))
    if problems:
        more = f" (and {len(problems) - 1} more problem(s) above)" if len(problems) > 1 else ""
        raise InputError(problems[0] + more)


@task(
    iterable=["dest", "db"],
    help={
        "dest": "Only this destination (a name under 'destinations:'); repeatable.",
        "db": "Only this database; repeatable.",
        "dry_run": "Only print what would be copied and deleted.",
        "config": CONFIG_HELP,
    },
)
@guarded
def offsite(c, dest=None, db=None, dry_run=False, config=None):
    """Copy to each destination whatever verified backups it is missing, then apply its retention. Exit 1 on failure."""
    from lib.offsite import sync

    spec = spec_and_log(config, with_file_log=not dry_run)
    if not spec.destinations:
        raise InputError(f"{spec.config_path} has no destinations; add one under 'destinations:' (see README)")
    failures = sync(spec, spec.select(db), dest or None, dry_run=dry_run)
    if failures:
        raise Exit("FAILED: off-site copy: " + "; ".join(failures), code=1)
    print("off-site copies are up to date" if not dry_run else "dry run: nothing was copied or deleted")
