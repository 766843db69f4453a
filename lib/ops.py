"""Operations around the roads: one run at a time (lock), pings and hooks (notify), history and
metrics after every run. Task bodies call these instead of lib.backup directly, so the roads
themselves stay unaware of monitoring.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from lib import history
from lib.backup import RunOutcome, backup_many
from lib.config import DatabaseSpec, Spec
from lib.errors import LockHeld, RunFailed
from lib.lifecycle import tidy_quietly
from lib.lock import parse_wait, run_lock
from lib.metrics import write_metrics
from lib.notify import Notifier, RunReport

log = logging.getLogger("backup")


@contextlib.contextmanager
def locked(spec: Spec, command: str, wait: str | float | None = None, tidy: bool = True) -> Iterator[Path]:
    """Hold the run lock of spec.backup_dir for the block (``wait``: --wait SECONDS as given),
    first (with ``tidy``) repairing what killed runs left (lib/lifecycle.py). Raises InputError
    for a bad --wait, LockHeld when another run holds the lock."""
    with run_lock(spec.backup_dir, command, parse_wait(wait)) as path:
        if tidy:
            tidy_quietly(spec)
        yield path


def record_outcome(spec: Spec, outcome: RunOutcome) -> None:
    """Remember every attempted database's result in its last_run.json."""
    for name, backup in outcome.made.items():
        history.record_run(spec.backup_dir, name, True, outcome.seconds.get(name, 0.0), backup=backup)
    for name, exc in outcome.failed.items():
        history.record_run(spec.backup_dir, name, False, outcome.seconds.get(name, 0.0), error=exc)


def run_backups(
    spec: Spec, databases: list[DatabaseSpec], tier: str | None = None, wait: str | float | None = None
) -> RunOutcome:
    """The scheduled road: ping start, lock, back up each database (lib.backup.backup_many),
    record history, write metrics, then ping and run the success/failure hook.

    Raises InputError for a bad --wait and LockHeld when another run holds the lock (after
    notifying: a skipped scheduled backup is a failure worth an alert).
    """
    names = [db.name for db in databases]
    wait_seconds = parse_wait(wait)
    notifier = Notifier(spec, "backup")
    started = time.monotonic()
    notifier.start()
    try:
        with run_lock(spec.backup_dir, "backup " + " ".join(names), wait_seconds):
            tidy_quietly(spec)
            outcome = backup_many(spec, databases, tier)
    except LockHeld as exc:
        log.error("backup not run: %s", exc)
        failed = {name: exc for name in names}
        notifier.finish(
            RunReport("backup", names, failed, f"summary: backup not run: {exc}", time.monotonic() - started)
        )
        raise
    record_outcome(spec, outcome)
    write_metrics(spec)
    failed: dict = dict(outcome.failed)
    if outcome.offsite_failed:  # a missing off-site copy is a failure worth an alert too
        failed["offsite"] = RunFailed("; ".join(outcome.offsite_failed))
    notifier.finish(RunReport("backup", names, failed, outcome.summary(), time.monotonic() - started))
    if outcome.interrupted is not None:
        raise outcome.interrupted  # reported above; the task exits 130/143/129
    return outcome


def after_prune(spec: Spec) -> None:
    """Metrics change when backups are deleted; rewrite them."""
    write_metrics(spec)
