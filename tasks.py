"""Invoke tasks: flags, help text and exit codes only. The work is done in lib/."""

from __future__ import annotations

from invoke import task
from invoke.exceptions import Exit

from lib import store
from lib.backup import dry_run_plan
from lib.backup import prune as prune_db
from lib.cli import confirm_on_terminal, guarded, parse_tier, spec_and_log
from lib.config import load_spec
from lib.errors import InputError
from lib.log import get as get_log
from lib.ops import after_prune, locked, run_backups
from lib.restore import restore as restore_db

CONFIG_HELP = "Path to backup.yml (default: $BACKUP_CONFIG, then ./backup.yml)."
WAIT_HELP = "When another run holds the lock in backup_dir, wait up to SECONDS for it (default: exit 1 at once)."


@task(
    iterable=["db"],
    help={
        "all": "Back up every database in backup.yml.",
        "db": "Back up this database (the name under 'databases:'); repeatable.",
        "tier": "Force the tier: daily, weekly or monthly (default: from today's date and schedule).",
        "dry_run": "Print the plan (files, stages) without dumping anything.",
        "wait": WAIT_HELP,
        "config": CONFIG_HELP,
    },
)
@guarded
def backup(c, all=False, db=None, tier=None, dry_run=False, wait=None, config=None):
    """Dump, compress, verify, encrypt and store backups, then apply retention. Exit 1 if any failed."""
    if not all and not db:
        raise InputError("say what to back up: --all or --db NAME")
    tier = parse_tier(tier)
    spec = spec_and_log(config, with_file_log=not dry_run)
    databases = spec.select(None if all else db)
    if dry_run:
        for item in databases:
            print(dry_run_plan(spec, item, tier).describe())
        return
    outcome = run_backups(spec, databases, tier, wait=wait)
    if outcome.exit_code:
        raise Exit(outcome.summary(), code=outcome.exit_code)
    print(outcome.summary())


@task(
    help={
        "engine": "Engine of the backup: postgres, mongodb or s3 (a bucket).",
        "file": "Backup file to restore, or 'latest' for the newest verified backup.",
        "db": "Which configured database (needed when several use the engine).",
        "into": "Restore into this database instead, leaving the configured one alone "
        "(s3: BUCKET or BUCKET/PREFIX, created when missing).",
        "delete_extra": "s3: delete the target's objects (under the backup's prefixes) that the backup does not "
        "hold; by default they are left alone.",
        "yes": "Do not ask for confirmation (required without a terminal, e.g. from cron).",
        "drop_previous": "postgres: drop the replaced database instead of keeping it as <db>_pre_restore_<time>; "
        "mongodb: delete the safety archive after a verified restore.",
        "all": "Disaster recovery: restore every configured database from its newest verified backup (--file latest).",
        "from_": "Download the backup (--file latest or a file name from invoke list --dest NAME) from this "
        "off-site destination and verify it first; with --all, every database's newest verified copy.",
        "force_target": "Allow --into a maintenance/template database or one configured under another name, "
        "and a backup of another configured database (refused by default).",
        "wait": WAIT_HELP,
        "config": CONFIG_HELP,
        "no_owner": "Leave out who owns what (objects and the database are owned by the restoring user), "
        "for a server that lacks the backup's roles; as pg_restore --no-owner.",
        "no_privileges": "Leave out GRANT/REVOKE and default privileges (and the database's own), for a server "
        "that lacks the roles they name; as pg_restore --no-privileges.",
        "to_time": "postgres with wal enabled: restore the database as it was at this time, e.g. "
        "'2026-12-01 10:42:00+09:00' (no offset: this host's time), from the newest base backup before it plus "
        "the archived WAL, replayed in a throwaway cluster (docs/pitr.md).",
        "to_latest": "postgres with wal enabled: as --to-time, to the newest point the WAL archive holds. With "
        "--from DEST, the WAL archive and base backups are read from that destination (rsync, sftp or S3).",
    },
)
@guarded
def restore(
    c,
    engine=None,
    file=None,
    db=None,
    into=None,
    yes=False,
    drop_previous=False,
    all=False,
    from_=None,
    force_target=False,
    wait=None,
    config=None,
    no_owner=False,
    no_privileges=False,
    delete_extra=False,
    to_time=None,
    to_latest=False,
):
    """Verify a backup, then restore it safely: into a new database, checked, then swapped in."""
    if (to_time is not None or to_latest) and delete_extra:
        raise InputError("--delete-extra is for bucket restores (--engine s3); drop it with --to-time/--to-latest")
    if to_time is not None or to_latest:  # --to-time "" is a bad time, not a plain restore
        return restore_point(
            engine,
            file,
            db,
            into,
            yes,
            drop_previous,
            all,
            from_,
            wait,
            config,
            to_time,
            to_latest,
            no_owner,
            no_privileges,
            force_target,
        )
    if all:
        return restore_latest(engine, file, db, into, yes, drop_previous, all, from_, wait, config)
    if not engine or not file:
        raise InputError("restore needs --engine postgres|mongodb|s3 and --file PATH|latest")
    spec = spec_and_log(config)
    ask = confirm_on_terminal(yes)
    with locked(spec, f"restore {db or engine}", wait):
        summary = restore_db(
            spec,
            engine,
            file,
            db_name=db,
            into=into,
            drop_previous=drop_previous,
            confirm=ask,
            from_dest=from_,
            no_owner=no_owner,
            no_privileges=no_privileges,
            force_target=force_target,
            delete_extra=delete_extra,
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
    """List stored backups per database and tier, newest first, with size, age and verified state (and the point-in-time archive)."""
    from lib import wal

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
                state = b.verification_text() + store.chain_text(b.record)
                if store.depends_on(b.record) and store.chain_of(b, backups) is None:
                    state += " (CHAIN BROKEN: a backup it builds on is missing; cannot be restored)"
                print(
                    f"  {tier:<8} {b.path.name:<40} {store.human_size(b.record.get('size', 0)):>10} {store.human_age(now - b.created):>5} old  {state}"
                )
        props = next((b.record["database_properties"] for b in backups if b.record.get("database_properties")), None)
        if isinstance(props, dict):
            from lib.engines.pgdatabase import describe

            print(f"  database properties (newest backup): {describe(props)}")
        if wal.enabled(item):
            print("\n".join(wal.listing_lines(spec, item, now)))
        for legacy in store.legacy_files(spec.backup_dir, item.name):
            print(
                f"  {legacy.parent.name:<8} {legacy.name:<40} {store.human_size(legacy.stat().st_size):>10}  no record (not made by this tool; never pruned)"
            )


@task(
    iterable=["db"],
    help={
        "file": "Verify only this file (default: every stored backup).",
        "db": "Only this database; repeatable.",
        "wait": WAIT_HELP,
        "config": CONFIG_HELP,
    },
)
@guarded
def verify(c, file=None, db=None, wait=None, config=None):
    """Re-verify stored backups: checksum, compression integrity, dump completeness. Exit 1 on any failure."""
    from lib.verify import verify_stored

    spec = spec_and_log(config)
    with locked(spec, "verify", wait):
        bad = verify_stored(spec, file=file, names=db, log=get_log())
    if bad:
        raise Exit(f"FAILED: {bad} backup(s) failed verification", code=1)


@task(
    iterable=["db"],
    help={
        "dry_run": "Only print what would be deleted.",
        "db": "Only this database; repeatable.",
        "wait": WAIT_HELP,
        "config": CONFIG_HELP,
    },
)
@guarded
def prune(c, dry_run=False, db=None, wait=None, config=None):
    """Apply retention now: delete backups older than their tier's keep_days (never the newest verified one)."""
    spec = spec_and_log(config, with_file_log=not dry_run)
    if dry_run:
        total = sum(len(prune_db(spec, item, dry_run=True)) for item in spec.select(db))
    else:
        with locked(spec, "prune", wait):
            total = sum(len(prune_db(spec, item)) for item in spec.select(db))
        after_prune(spec)
    print(f"{'would delete' if dry_run else 'deleted'} {total} backup(s)")


@task(help={"keep": "Keep the demo directory (backups, config) and print where it is."})
@guarded
def demo(c, keep=False):
    """Run the whole road on a throwaway PostgreSQL with sample data: backup, verify, restore, compare."""
    from lib.demo import run_demo

    run_demo(keep=keep)


# -- operations: status, drills, disaster recovery, scheduling ---------------------------------


def restore_point(
    engine,
    file,
    db,
    into,
    yes,
    drop_previous,
    all,
    from_,
    wait,
    config,
    to_time,
    to_latest,
    no_owner,
    no_privileges,
    force_target,
):
    """restore --to-time / --to-latest: a point in time from base backups + archived WAL (lib/pitr.py)."""
    from lib import pitr, wal

    if to_time is not None and to_latest:
        raise InputError("pass --to-time TIME or --to-latest, not both")
    if file or all:
        raise InputError("--to-time/--to-latest restore from the WAL archive; drop --file and --all")
    if engine not in (None, "postgres"):
        raise InputError("--to-time/--to-latest are for --engine postgres")
    target = pitr.parse_target(to_time) if to_time is not None else None
    spec = spec_and_log(config)
    item = wal.require_enabled(spec, db)
    ask = confirm_on_terminal(yes)
    with locked(spec, f"restore {item.name} to a point in time", wait):
        summary = pitr.restore_to_point(
            spec,
            item,
            target,
            into=into,
            drop_previous=drop_previous,
            confirm=ask,
            no_owner=no_owner,
            no_privileges=no_privileges,
            force_target=force_target,
            source=from_,
        )
    print(f"replayed {summary['plan']}" + (f" (from off-site destination {from_})" if from_ else ""))
    point = summary["recovery_point"] or "the base backup itself (no transaction after it)"
    print(f"recovery point reached: {point} (last replayed commit)")
    print(
        f"restored {item.name} into {summary['target']}"
        + (f"; previous database kept as {summary['previous']}" if summary.get("previous") else "")
    )


def drill_wal(db, from_, local_server, config):
    """drill --to-latest: base backup + WAL replayed in a throwaway cluster (lib/pitr.py)."""
    from lib import pitr, wal

    if from_ or local_server:
        raise InputError("--to-latest replays the local WAL archive in a throwaway cluster; drop --from/--local-server")
    spec = spec_and_log(config)
    names = db or [d.name for d in spec.databases.values() if wal.enabled(d)]
    if not names:
        raise InputError("no database has 'wal: {enabled: true}'; nothing to drill with --to-latest")
    failed = []
    for name in names:
        item = wal.require_enabled(spec, name)
        report = pitr.drill_to_latest(spec, item)
        if not report["ok"]:
            error = report["error"]
            failed.append(error if error.startswith(f"{name}: ") else f"{name}: {error}")
            continue
        print(
            f"{name}: OK: {report['plan']}; recovered to {report['recovery_point'] or 'the base backup'}; "
            f"{report['tables']} table(s), {report['rows']} row(s) ({report['seconds']}s)"
        )
    if failed:
        raise Exit("FAILED: " + "; ".join(failed), code=1)


@task(
    name="wal-receive",
    help={
        "db": "The database (name under 'databases:') whose WAL to archive; default: the only one with wal enabled.",
        "once": "Receive up to the server's current WAL position, archive it, store the partial segment and exit "
        "(for tests, cron, or a catch-up); without it the receiver runs until SIGTERM.",
        "config": CONFIG_HELP,
    },
)
@guarded
def wal_receive(c, db=None, once=False, config=None):
    """Stream WAL with pg_receivewal (its own replication slot) and archive each completed segment: compressed, encrypted, verified."""
    from lib import wal

    spec = spec_and_log(config)
    item = wal.require_enabled(spec, db)
    result = wal.receive(spec, item, once=once)
    stored = result["stored"]
    print(
        f"{item.name}: archived {len(stored)} WAL segment(s)"
        + (f" ({stored[0]} .. {stored[-1]})" if stored else "")
        + (f"; partial segment {result['partial']} stored" if result["partial"] else "")
        + (f"; stopped by {result['stopped_by']}" if result["stopped_by"] else "")
    )


@task(
    name="wal-base",
    help={
        "db": "The database (name under 'databases:'); default: the only one with wal enabled.",
        "wait": WAIT_HELP,
        "config": CONFIG_HELP,
    },
)
@guarded
def wal_base(c, db=None, wait=None, config=None):
    """Take a verified base backup (pg_basebackup) for point-in-time recovery, then prune old base backups and the WAL only they needed."""
    from lib import wal

    spec = spec_and_log(config)
    item = wal.require_enabled(spec, db)
    with locked(spec, f"wal-base {item.name}", wait):
        record = wal.base_backup(spec, item)
    print(f"{item.name}: base backup {record['file']} verified (starts at WAL segment {record['start_segment']})")


def restore_latest(engine, file, db, into, yes, drop_previous, all, from_, wait, config):
    """restore --all (every database) or --from DEST (one database): the newest verified backup."""
    from lib.drill import fetcher
    from lib.recover import restore_all

    if (file or "latest") != "latest":
        raise InputError("--all and --from restore the newest verified backup; pass --file latest (or leave it out)")
    if all and (engine or db or into):
        raise InputError("--all restores every configured database; drop --engine, --db and --into")
    if into:
        raise InputError("--into cannot be combined with --all or --from; restore, then rename")
    spec = spec_and_log(config)
    if from_:
        fetcher(spec, from_)  # refuse early when off-site fetch is unavailable
    if all:
        databases = spec.select(None)
    else:
        if not engine:
            raise InputError("restore needs --engine postgres|mongodb (or --all)")
        from lib.restore import pick_database

        databases = [pick_database(spec, engine, db)]
    ask = confirm_on_terminal(yes)
    names = ", ".join(d.name for d in databases)
    where = f"off-site destination {from_}" if from_ else "local backups"
    if ask is not None and not ask(f"Restore {names} from the newest verified backups ({where})?"):
        raise InputError("restore cancelled; nothing was touched")
    with locked(spec, f"restore {'--all' if all else names}", wait):
        outcome = restore_all(spec, databases, source=from_, drop_previous=drop_previous)
    if outcome.failed:
        raise Exit(outcome.summary(), code=outcome.exit_code)
    print(outcome.summary())


@task(
    iterable=["db"],
    help={
        "json": "Print the documented JSON report instead of text.",
        "db": "Only this database; repeatable.",
        "config": CONFIG_HELP,
    },
)
@guarded
def status(c, json=False, db=None, config=None):
    """Newest backups, age, size, verified state, off-site copies, last run and drill. Exit 1 on a problem."""
    import json as jsonlib

    from lib.lifecycle import for_status
    from lib.status import collect, render_text

    spec = spec_and_log(config, with_file_log=False)
    report = collect(spec, db, leftovers=for_status(spec, db))
    print(jsonlib.dumps(report, indent=2, sort_keys=True) if json else render_text(report))
    if not report["ok"]:
        raise Exit(code=1)


@task(
    iterable=["db"],
    help={
        "db": "Only this database; repeatable (backup_dir's own download and temp files are always checked).",
        "wait": WAIT_HELP,
        "config": CONFIG_HELP,
    },
)
@guarded
def doctor(c, db=None, wait=None, config=None):
    """Repair what killed runs left: reopen a database an interrupted restore left closed, drop scratch databases, remove temp/download files and orphan sidecars. Exit 1 if any is left."""
    from lib.lifecycle import tidy
    from lib.lock import parse_wait, run_lock

    spec = spec_and_log(config)
    with run_lock(spec.backup_dir, "doctor", parse_wait(wait)):
        report = tidy(spec, db or None)
    for line in report.done:
        print(line)
    if report.left:
        for item in report.left:
            print(f"{item.database or 'backup_dir'}: {item.text()}")
        raise Exit(f"FAILED: {len(report.left)} leftover(s) could not be removed; run the command(s) above", code=1)
    print(f"doctor: repaired {len(report.done)} leftover(s)" if report.done else "doctor: nothing to repair")


@task(
    iterable=["db"],
    help={
        "db": "Drill only this database; repeatable (default: every database).",
        "from_": "Fetch the newest verified backup from this off-site destination instead of using the local one.",
        "local_server": "PostgreSQL: restore into a throwaway cluster started on this host (initdb), not the live server.",
        "to_latest": "PostgreSQL with wal enabled: prove the newest base backup plus the archived WAL replay to the "
        "archive's end in a throwaway cluster and dump the database from it (no server is touched).",
        "wait": WAIT_HELP,
        "config": CONFIG_HELP,
    },
)
@guarded
def drill(c, db=None, from_=None, local_server=False, to_latest=False, wait=None, config=None):
    """Prove restorability: restore the newest verified backup into a throwaway database, compare row counts, drop it."""
    from lib.drill import run_drills, summary

    if to_latest:
        return drill_wal(db, from_, local_server, config)
    spec = spec_and_log(config)
    databases = spec.select(db)
    with locked(spec, "drill", wait, tidy=not local_server):  # --local-server: the live server is not used
        results = run_drills(spec, databases, source=from_, local_server=local_server)
    if any(not r["ok"] for r in results.values()):
        raise Exit("FAILED: " + summary(results), code=1)
    print(summary(results))


@task(
    name="setup-cron",
    help={
        "systemd": "Print a systemd service + timer pair (Persistent=true) instead of touching the crontab.",
        "install": "With --systemd: write the units to /etc/systemd/system (needs root).",
        "remove": "Remove this config's crontab entry instead of installing it.",
        "dry_run": "Print the crontab that would be installed without installing it.",
        "config": CONFIG_HELP,
    },
)
@guarded
def setup_cron(c, systemd=False, install=False, remove=False, dry_run=False, config=None):
    """Install or update (idempotently) the crontab entry running 'backup --all' on schedule.cron (default 0 2 * * *)."""
    from lib import schedule

    spec = load_spec(config)
    if install and not systemd:
        raise InputError("--install goes with --systemd; the crontab is installed without it")
    if systemd:
        if install:
            for path in schedule.install_systemd(spec):
                print(f"wrote {path}")
            extra = [
                n
                for n in schedule.wal_units(spec)
                if not n.startswith(f"{schedule.UNIT}-wal-base-") or n.endswith(".timer")
            ]
            print(
                f"now run: systemctl daemon-reload && systemctl enable --now {' '.join([f'{schedule.UNIT}.timer', *extra])}"
            )
            return
        for name, text in schedule.systemd_units(spec).items():
            print(f"# /etc/systemd/system/{name}\n{text}")
        return
    table, changed = schedule.setup_cron(spec, remove=remove, dry_run=dry_run)
    if dry_run:
        print(table, end="")
        return
    verb = "removed" if remove else "installed"
    print(f"crontab entry {verb}" if changed else "crontab already up to date")
    if not remove:
        print(schedule.cron_line(spec))


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
        "destinations_mb": "Instead, measure off-site copies with a file of this many MiB: upload and download "
        "throughput to a loopback sshd (sftp, rsync) and a local S3 server (moto), and the tool's peak memory "
        "while uploading 2, 10 and 30 times the S3 part size (tests/bench_destinations.py).",
        "bucket_mb": "Instead, measure bucket backups (engine s3) of this many MiB of mixed media on a local S3 server: "
        "full backup and restore against aws s3 sync, an incremental after 1% changed (benchmarks/bench_buckets.py).",
        "pitr_mb": "Instead, measure point-in-time recovery on a throwaway cluster with a database of this many MB "
        "(benchmarks/bench_pitr.py): seconds of commits lost at --to-latest after a server crash (synchronous "
        "receiver or not, and a killed receiver), WAL archive size per GB written, restore to a time vs a dump restore.",
        "pitr_seconds": "With --pitr-mb: seconds of steady writes per scenario (default 20).",
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
    destinations_mb=0,
    bucket_mb=0,
    pitr_mb=0,
    pitr_seconds=20,
):
    """Benchmark old scripts vs this tool vs the pg_dump floor; prints medians and ratios (see docs/benchmarks.md)."""
    import subprocess
    import sys
    from pathlib import Path

    if int(bucket_mb):
        script = Path(__file__).parent / "benchmarks" / "bench_buckets.py"
        raise Exit(code=subprocess.call([sys.executable, str(script), str(int(bucket_mb))]))
    if int(pitr_mb):
        script = Path(__file__).parent / "benchmarks" / "bench_pitr.py"
        argv = [sys.executable, str(script), "--size-mb", str(int(pitr_mb)), "--seconds", str(float(pitr_seconds))]
        raise Exit(code=subprocess.call(argv))
    if int(destinations_mb):
        script = Path(__file__).parent / "tests" / "bench_destinations.py"
        raise Exit(code=subprocess.call([sys.executable, str(script), str(int(destinations_mb))]))

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
        "wait": WAIT_HELP,
        "config": CONFIG_HELP,
    },
)
@guarded
def offsite(c, dest=None, db=None, dry_run=False, wait=None, config=None):
    """Copy to each destination whatever verified backups it is missing, then apply its retention. Exit 1 on failure."""
    from lib.offsite import sync

    spec = spec_and_log(config, with_file_log=not dry_run)
    if not spec.destinations:
        raise InputError(f"{spec.config_path} has no destinations; add one under 'destinations:' (see docs/offsite.md)")
    with locked(spec, "offsite", wait):
        failures = sync(spec, spec.select(db), dest or None, dry_run=dry_run)
        if not dry_run:  # point-in-time recovery: the WAL archive and base backups too (catch-up)
            from lib import wal

            for item in (d for d in spec.select(db) if wal.enabled(d)):
                failures += wal.ship(spec, item, dest or None)
        if not dry_run:
            after_prune(spec)  # copies and remote deletions change the destination-lag metrics
    if failures:
        raise Exit("FAILED: off-site copy: " + "; ".join(failures), code=1)
    print("off-site copies are up to date" if not dry_run else "dry run: nothing was copied or deleted")


@task(
    help={
        "check": "Only check: exit 1 when a generated page is out of date with its source (tests/test_docs.py checks the same)."
    }
)
def docs(c, check=False):
    """Regenerate docs/config-reference.md (from schema/backup.schema.json) and docs/tasks-reference.md (from these tasks' help texts)."""
    import subprocess
    import sys
    from pathlib import Path

    # a fresh process: Invoke has consumed this module's help texts while parsing the command line
    argv = [sys.executable, "-m", "lib.docs"] + (["--check"] if check else [])
    raise Exit(code=subprocess.call(argv, cwd=Path(__file__).parent))


@task(
    name="dest-check",
    iterable=["dest"],
    help={
        "dest": "Check this destination (a name under 'destinations:'); repeatable; default: all.",
        "config": CONFIG_HELP,
    },
)
@guarded
def dest_check(c, dest=None, config=None):
    """Check destinations: credentials, access, lock configuration and a small round trip (S3); listing (others). Exit 2 on a problem."""
    from lib import destinations

    spec = spec_and_log(config, with_file_log=False)
    if not spec.destinations:
        raise InputError(f"{spec.config_path} has no destinations; add one under 'destinations:' (see README)")
    problems: list[str] = []
    for item in destinations.configured(spec, dest or None):
        with item:
            lines, found = item.check()
        print("\n".join(lines))
        problems += found
    if problems:
        more = f" (and {len(problems) - 1} more problem(s) above)" if len(problems) > 1 else ""
        raise InputError(problems[0] + more)
    print("destinations: ok")
