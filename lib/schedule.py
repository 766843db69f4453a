"""Scheduling: a crontab entry (invoke setup-cron) or a systemd service + timer pair (--systemd).

The crontab entry is found again by its marker comment (which names the config file), so running
setup-cron twice updates it in place and never duplicates it; every other line is kept as it was.
``crontab`` is the real binary unless $BACKUP_CRONTAB names another command (the tests' double).
"""

from __future__ import annotations

import getpass
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from lib.config import Spec
from lib.errors import EnvironmentProblem, InputError
from lib.exec import require_binary, tail_text

DEFAULT_CRON = "0 2 * * *"
MARKER = "# lemon-backup: managed by 'invoke setup-cron' for "
UNIT = "lemon-backup"
SYSTEMD_DIR = "/etc/systemd/system"
PROJECT = Path(__file__).resolve().parent.parent
CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")


def cron_expression(spec: Spec) -> str:
    """schedule.cron (five fields) or the default daily 02:00. Raises ConfigError-like InputError."""
    expr = " ".join(str(spec.schedule.get("cron", DEFAULT_CRON)).split())
    fields = expr.split(" ")
    if len(fields) != 5 or not all(CRON_FIELD.match(f) for f in fields):
        raise InputError(f"schedule.cron '{expr}': expected five numeric cron fields like '0 2 * * *'")
    return expr


def invoke_path() -> Path:
    """The project's invoke: .venv/bin/invoke next to tasks.py, else the one beside this Python."""
    venv = PROJECT / ".venv" / "bin" / "invoke"
    return venv if venv.exists() else Path(sys.executable).parent / "invoke"


def cron_line(spec: Spec) -> str:
    """The crontab line: cd into the project, run backup --all, append output to backup.log.
    '%' is special in crontab (a newline) and is escaped."""
    command = (
        f"cd {shlex.quote(str(PROJECT))} && {shlex.quote(str(invoke_path()))} backup --all "
        f"--config {shlex.quote(str(spec.config_path))} >> {shlex.quote(str(spec.backup_dir / 'backup.log'))} 2>&1"
    )
    escaped = command.replace("%", "\\%")
    return f"{cron_expression(spec)} {escaped}"


def marker(spec: Spec) -> str:
    return f"{MARKER}{spec.config_path}"


def merge_crontab(current: str, spec: Spec, remove: bool = False) -> str:
    """``current`` with our entry (marker line + command line) replaced or added exactly once,
    or removed. Every other line is kept in order."""
    mark = marker(spec)
    kept: list[str] = []
    lines = current.splitlines()
    skip_next = False
    for line in lines:
        if skip_next:
            skip_next = False
            continue
        if line.strip() == mark:
            skip_next = True  # the entry line that belongs to this marker
            continue
        kept.append(line)
    if not remove:
        kept += [mark, cron_line(spec)]
    return "\n".join(kept) + "\n" if kept else ""


def crontab_command() -> str:
    """$BACKUP_CRONTAB, else the real crontab (EnvironmentProblem when it is missing)."""
    override = os.environ.get("BACKUP_CRONTAB")
    return override if override else require_binary("crontab")


def read_crontab() -> str:
    """The current user's crontab ('' when there is none)."""
    proc = subprocess.run([crontab_command(), "-l"], capture_output=True, stdin=subprocess.DEVNULL, timeout=30)
    if proc.returncode != 0:
        if b"no crontab" in proc.stderr.lower():
            return ""
        raise EnvironmentProblem(f"crontab -l failed: {tail_text(proc.stderr) or proc.returncode}")
    return proc.stdout.decode()


def write_crontab(text: str) -> None:
    """Install ``text`` as the current user's crontab (crontab -)."""
    proc = subprocess.run([crontab_command(), "-"], input=text.encode(), capture_output=True, timeout=30)
    if proc.returncode != 0:
        raise EnvironmentProblem(f"crontab - failed: {tail_text(proc.stderr) or proc.returncode}")


def setup_cron(spec: Spec, remove: bool = False, dry_run: bool = False) -> tuple[str, bool]:
    """Install, update or remove our crontab entry. Returns (new crontab, changed)."""
    current = read_crontab()
    new = merge_crontab(current, spec, remove=remove)
    changed = new != current
    if changed and not dry_run:
        write_crontab(new)
    return new, changed


# -- systemd ---------------------------------------------------------------------------------
DOW = {"0": "Sun", "1": "Mon", "2": "Tue", "3": "Wed", "4": "Thu", "5": "Fri", "6": "Sat", "7": "Sun"}


def _calendar_field(value: str, width: int = 0) -> str:
    """A cron field in OnCalendar syntax: ranges a-b -> a..b, steps */n -> 0/n, lists kept."""
    parts = []
    for part in value.split(","):
        base, _, step = part.partition("/")
        if base == "*":
            base = "*" if not step else f"{0:0{width}d}"
        elif "-" in base:
            low, high = base.split("-")
            base = f"{int(low):0{width}d}..{int(high):0{width}d}"
        else:
            base = f"{int(base):0{width}d}"
        parts.append(base + (f"/{step}" if step else ""))
    return ",".join(parts)


def on_calendar(expr: str) -> str:
    """systemd OnCalendar= for a five-field cron expression. Raises InputError for what systemd
    cannot say the same way (day-of-month and weekday both set: cron ORs them, systemd ANDs)."""
    minute, hour, dom, month, dow = expr.split()
    if dom != "*" and dow != "*":
        raise InputError(f"schedule.cron '{expr}': day of month and weekday together cannot be a systemd timer")
    weekdays = ""
    if dow != "*":
        names = []
        for part in dow.split(","):
            if "/" in part:
                raise InputError(f"schedule.cron '{expr}': weekday steps cannot be a systemd timer")
            low, _, high = part.partition("-")
            names.append(f"{DOW[low]}..{DOW[high]}" if high else DOW[low])
        weekdays = ",".join(names) + " "
    date = f"*-{_calendar_field(month, 2)}-{_calendar_field(dom, 2)}"
    return f"{weekdays}{date} {_calendar_field(hour, 2)}:{_calendar_field(minute, 2)}:00"


def _systemd_quote(arg: str) -> str:
    return (
        arg if re.fullmatch(r"[A-Za-z0-9_./:=@+-]+", arg) else '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    )


def systemd_units(spec: Spec) -> dict[str, str]:
    """{'lemon-backup.service': ..., 'lemon-backup.timer': ...} for the schedule in backup.yml.
    The tool writes backup.log itself; stdout/stderr go to the journal."""
    exec_start = " ".join(
        _systemd_quote(a) for a in [str(invoke_path()), "backup", "--all", "--config", str(spec.config_path)]
    )
    service = f"""[Unit]
Description=lemon-backup: back up every database in {spec.config_path}
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
User={getpass.getuser()}
WorkingDirectory={PROJECT}
ExecStart={exec_start}
Nice=10
IOSchedulingClass=best-effort
IOSchedulingPriority=7
"""
    timer = f"""[Unit]
Description=lemon-backup schedule (cron '{cron_expression(spec)}')

[Timer]
OnCalendar={on_calendar(cron_expression(spec))}
Persistent=true
Unit={UNIT}.service

[Install]
WantedBy=timers.target
"""
    units = {f"{UNIT}.service": service, f"{UNIT}.timer": timer}
    units.update(wal_units(spec))
    return units


def wal_units(spec: Spec) -> dict[str, str]:
    """For each database with ``wal: {enabled: true}``: a long-running service for invoke
    wal-receive (restarted when it stops; SIGTERM stops it cleanly) and a weekly base backup
    (service + timer)."""
    from lib import wal

    units: dict[str, str] = {}
    for db in spec.databases.values():
        if not wal.enabled(db):
            continue
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", db.name)

        def start(task: str, name: str = db.name) -> str:
            argv = [str(invoke_path()), task, "--db", name, "--config", str(spec.config_path)]
            return " ".join(_systemd_quote(a) for a in argv)

        units[f"{UNIT}-wal-{name}.service"] = f"""[Unit]
Description=lemon-backup: stream the WAL of {db.name} (pg_receivewal, slot {wal.settings(db)["slot"]})
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User={getpass.getuser()}
WorkingDirectory={PROJECT}
ExecStart={start("wal-receive")}
Restart=always
RestartSec=10
KillSignal=SIGTERM
TimeoutStopSec=120

[Install]
WantedBy=multi-user.target
"""
        units[f"{UNIT}-wal-base-{name}.service"] = f"""[Unit]
Description=lemon-backup: base backup of {db.name} for point-in-time recovery

[Service]
Type=oneshot
User={getpass.getuser()}
WorkingDirectory={PROJECT}
ExecStart={start("wal-base")}
Nice=10
IOSchedulingClass=best-effort
IOSchedulingPriority=7
"""
        units[f"{UNIT}-wal-base-{name}.timer"] = f"""[Unit]
Description=lemon-backup: weekly base backup of {db.name}

[Timer]
OnCalendar=weekly
Persistent=true
Unit={UNIT}-wal-base-{name}.service

[Install]
WantedBy=timers.target
"""
    return units


def install_systemd(spec: Spec) -> list[Path]:
    """Write the unit pair into $BACKUP_SYSTEMD_DIR (default /etc/systemd/system). Returns the paths.
    Raises EnvironmentProblem when the directory is not writable (run as root)."""
    directory = Path(os.environ.get("BACKUP_SYSTEMD_DIR") or SYSTEMD_DIR)
    written = []
    for name, text in systemd_units(spec).items():
        path = directory / name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                os.fchmod(handle.fileno(), 0o644)
                handle.write(text)
        except OSError as exc:
            raise EnvironmentProblem(
                f"cannot write {path}: {exc.strerror}; run with sudo or print the units instead"
            ) from None
        written.append(path)
    return written
