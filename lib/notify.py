"""Notifications after a run: ``notify.on_failure`` / ``notify.on_success`` command hooks and a
healthchecks.io-style ping URL (``<url>/start``, ``<url>`` on success, ``<url>/fail`` with the
log tail as the POST body).

A notifier is never the reason a run fails and never blocks it: hooks run with a timeout (their
whole process group is killed after it), pings have a short timeout, and every problem is a
logged warning. Hooks get an argv list run without a shell (``shell: true`` runs a string with
/bin/sh -c) and the outcome in BACKUP_* environment variables.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import socket
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lib import log as logsetup
from lib.config import Spec
from lib.errors import RunInterrupted, ToolError
from lib.exec import child_env, tail_text
from lib.history import stage_of

HOOK_TIMEOUT = 30.0
PING_TIMEOUT = 10.0
TAIL_LINES = 100
TAIL_BYTES = 10_000
log = logging.getLogger("backup")


class LogTail(logging.Handler):
    """Keeps the last TAIL_LINES formatted log lines of this run (for the /fail ping body)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.setFormatter(logging.Formatter(logsetup.FORMAT, logsetup.DATEFMT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # noqa: BLE001 - a log handler must never raise
            self.handleError(record)

    def text(self) -> str:
        data = "\n".join(self.lines) + "\n"
        return data[-TAIL_BYTES:]


@dataclass
class RunReport:
    """The outcome of one run, as hooks and pings see it."""

    run: str
    databases: list[str]
    failed: dict[str, ToolError] = field(default_factory=dict)
    summary: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def status(self) -> str:
        """'success', 'failure', or 'interrupted' (Ctrl-C, SIGTERM, SIGHUP stopped the run)."""
        if self.ok:
            return "success"
        return "interrupted" if any(isinstance(e, RunInterrupted) for e in self.failed.values()) else "failure"


def hook_env(report: RunReport, log_path: str) -> dict[str, str]:
    """The BACKUP_* variables a hook receives (documented in docs/operations.md, "Alerts")."""
    first = next(iter(report.failed), None)
    error = report.failed[first] if first else None
    return {
        "BACKUP_STATUS": report.status,
        "BACKUP_RUN": report.run,
        "BACKUP_DATABASES": " ".join(report.databases),
        "BACKUP_FAILED": " ".join(report.failed),
        "BACKUP_DATABASE": first or " ".join(report.databases),
        "BACKUP_STAGE": stage_of(error, report.run) if error else "",
        "BACKUP_ERROR": str(error) if error else "",
        "BACKUP_ERRORS": "\n".join(f"{name}: {exc}" for name, exc in report.failed.items()),
        "BACKUP_SUMMARY": report.summary,
        "BACKUP_DURATION_SECONDS": f"{report.seconds:.1f}",
        "BACKUP_HOST": socket.gethostname(),
        "BACKUP_LOG": log_path,
    }


def hook_argv(hook: Any) -> tuple[list[str], float]:
    """(argv, timeout) of a configured hook: a list of strings, or {command, shell, timeout}."""
    if isinstance(hook, list):
        return [str(a) for a in hook], HOOK_TIMEOUT
    command = hook["command"]
    timeout = float(hook.get("timeout", HOOK_TIMEOUT))
    if hook.get("shell"):
        return ["/bin/sh", "-c", command if isinstance(command, str) else " ".join(command)], timeout
    return [str(a) for a in command], timeout


def run_hook(name: str, hook: Any, env: Mapping[str, str]) -> bool:
    """Run one hook with ``env`` added to ours. Returns True when it exited 0; logs a warning
    (never raises) when it could not start, failed or timed out."""
    argv, timeout = hook_argv(hook)
    with tempfile.TemporaryFile() as output:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=child_env(env),
                start_new_session=True,  # so a timeout can kill everything it started
            )
        except OSError as exc:
            log.warning("notify: %s hook could not start (%s): %s", name, argv[0], exc.strerror or exc)
            return False
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            log.warning("notify: %s hook (%s) did not finish within %gs; killed it", name, argv[0], timeout)
            return False
        output.seek(0)
        said = tail_text(output.read()[-4096:], 300)
    if code != 0:
        log.warning("notify: %s hook (%s) exited with status %s%s", name, argv[0], code, f": {said}" if said else "")
        return False
    log.info("notify: %s hook ran (%s)", name, argv[0])
    return True


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def safe_url(url: str) -> str:
    """Scheme and host of ``url`` only, for log lines (the path of a ping URL is its secret)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{':' + str(parts.port) if parts.port else ''}"


def ping(url: str, kind: str, body: str = "", timeout: float = PING_TIMEOUT) -> bool:
    """POST to ``url`` + '' (success), '/start' or '/fail' with ``body``. Returns True on a 2xx;
    logs a warning and returns False on any error or timeout."""
    target = url if kind == "success" else url.rstrip("/") + "/" + kind
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked by the schema (http/https)
        target, data=body.encode("utf-8", "replace"), method="POST", headers={"User-Agent": "lemon-backup"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            response.read(1024)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        log.warning("notify: %s ping to %s failed: %s", kind, safe_url(url), reason)
        return False
    return True


class Notifier:
    """Pings and hooks around one run. ``pings`` is False for runs that must not touch the
    backup schedule's check (drills, restores)."""

    def __init__(self, spec: Spec, run: str, pings: bool = True) -> None:
        self.spec = spec
        self.run = run
        self.config = spec.notify
        self.url = self.config.get("ping_url") if pings else None
        self.timeout = float(self.config.get("ping_timeout", PING_TIMEOUT))
        self.tail = LogTail()
        logging.getLogger("backup").addHandler(self.tail)

    def start(self) -> None:
        """Ping '/start' (when a ping URL is configured)."""
        if self.url:
            ping(self.url, "start", timeout=self.timeout)

    def finish(self, report: RunReport) -> None:
        """Ping success or '/fail' (with the log tail), then run on_success or on_failure."""
        logging.getLogger("backup").removeHandler(self.tail)
        if self.url:
            ping(self.url, "success" if report.ok else "fail", self.tail.text(), timeout=self.timeout)
        which = "on_success" if report.ok else "on_failure"
        hook = self.config.get(which)
        if hook:
            run_hook(which, hook, hook_env(report, str(self.spec.backup_dir / "backup.log")))
