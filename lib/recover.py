"""Disaster recovery (invoke restore --all --file latest): restore every configured database from
its newest verified backup, one after another, locally or fetched from a destination (``--from``)
when the machine was rebuilt. Carries on past a failed database and ends with a summary."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from lib.config import DatabaseSpec, Spec
from lib.drill import fetcher, locate, workdir
from lib.errors import ToolError
from lib.restore import restore

log = logging.getLogger("backup")


@dataclass
class RecoveryOutcome:
    """What restore --all did: per database the restore summary or the error."""

    restored: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, ToolError] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0 all restored; 2 when every failure was bad input (nothing touched); else 1."""
        if not self.failed:
            return 0
        return 2 if all(exc.exit_code == 2 for exc in self.failed.values()) else 1

    def summary(self) -> str:
        total = len(self.restored) + len(self.failed)
        lines = [f"restore summary: {len(self.restored)} of {total} database(s) restored"]
        for name, result in self.restored.items():
            lines.append(f"  {name}: restored {result['file']} into {result['target']}")
        for name, exc in self.failed.items():
            lines.append(f"  {name}: FAILED: {exc}")
        return "\n".join(lines)


def restore_all(
    spec: Spec, databases: list[DatabaseSpec], source: str | None = None, drop_previous: bool = False
) -> RecoveryOutcome:
    """Restore each database from its newest verified backup (from ``source`` when given).
    Raises InputError up front for an unavailable or unknown --from."""
    if source is not None:
        fetcher(spec, source)
    outcome = RecoveryOutcome()
    for db in databases:
        try:
            with workdir(spec, needed=source is not None) as work:
                file_arg = locate(spec, db, source, work)
                outcome.restored[db.name] = restore(
                    spec, db.engine, file_arg, db_name=db.name, drop_previous=drop_previous, confirm=None
                )
        except ToolError as exc:
            outcome.failed[db.name] = exc
            log.error("%s: restore FAILED: %s", db.name, exc)
    return outcome
