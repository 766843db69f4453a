"""Errors a user can cause or meet. Each carries a one-line message and an exit code.

Exit codes: 0 success, 1 a backup/restore/verify failed, 2 bad input (config, arguments, files).
Anything that is not a ``ToolError`` is a bug and may show a traceback.
"""

from __future__ import annotations


class ToolError(Exception):
    """Base class: ``str(err)`` is the one-line message shown to the operator."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # noqa: D105
        return self.message


class InputError(ToolError):
    """Bad input: config, flags, files, keys. Nothing was touched. Exit 2."""

    exit_code = 2


class ConfigError(InputError):
    """backup.yml (or .env, or environment overrides) is invalid."""


class EnvironmentProblem(InputError):
    """Something the run needs is missing: a binary, a running container, a key."""


class RunFailed(ToolError):
    """A backup, restore, verification or transfer failed. Exit 1."""


class StageFailed(RunFailed):
    """A process in a pipeline exited badly. ``stage`` names it, ``detail`` holds its stderr tail."""

    def __init__(self, stage: str, message: str, detail: str = ""):
        self.stage = stage
        self.detail = detail
        text = f"{stage} failed: {message}"
        if detail:
            text += f": {detail}"
        super().__init__(text)


class VerificationFailed(RunFailed):
    """A stored or produced backup did not pass its checks."""


class LockHeld(RunFailed):
    """Another run holds the lock."""


class RunInterrupted(RunFailed):
    """A run stopped by Ctrl-C, SIGTERM or SIGHUP, as hooks, last_run.json and metrics see it
    (stage 'interrupted'). The interrupt itself (a KeyboardInterrupt) is raised again after the
    run was reported, so the process still exits 130/143/129."""
