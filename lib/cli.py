"""Glue between tasks.py and lib: loading the spec, logging, mapping errors to exit codes,
confirmation prompts. Task bodies stay one screen long."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

from invoke.exceptions import Exit

from lib import interrupt
from lib import log as logsetup
from lib.config import Spec, load_spec
from lib.errors import InputError, ToolError

INTERRUPTED = "interrupted ({how}); see the log for what was completed"
#: exit status when stdout's reader went away (e.g. ``invoke list | head -1``), as for SIGPIPE
BROKEN_PIPE_EXIT = 128 + 13


def guarded(func: Callable) -> Callable:
    """Run a task body with umask 077; turn ToolError into a one-line message and its exit code,
    Ctrl-C, SIGTERM and SIGHUP (lib/interrupt.py) into one truthful line (exit 130, 143, 129)
    and a closed stdout pipe into a quiet exit 141. Never a traceback for any of them."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        os.umask(0o077)
        interrupt.install()
        try:
            try:
                return func(*args, **kwargs)
            finally:
                sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        except BrokenPipeError:
            _silence_stdout()
            raise Exit(code=BROKEN_PIPE_EXIT) from None
        except ToolError as exc:
            message = str(exc)
            prefix = "error: " if exc.exit_code == 2 else "FAILED: "
            raise Exit(prefix + message, code=exc.exit_code) from None
        except KeyboardInterrupt as exc:
            raise Exit(INTERRUPTED.format(how=interrupt.signal_name(exc)), code=interrupt.exit_code(exc)) from None

    return wrapper


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of what is still buffered
    does not raise BrokenPipeError again on the way out."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def spec_and_log(config: str | None, with_file_log: bool = True) -> Spec:
    """Load the spec (raises ConfigError) and set up logging into its backup_dir."""
    spec = load_spec(config)
    logsetup.setup(spec.backup_dir if with_file_log else None)
    return spec


def confirm_on_terminal(yes: bool) -> Callable[[str], bool] | None:
    """None when --yes; a terminal prompt when there is a terminal; else refuse (cron-safe)."""
    if yes:
        return None
    if not sys.stdin.isatty():
        raise InputError("restore needs confirmation and there is no terminal; pass --yes to confirm")

    def ask(question: str) -> bool:
        answer = input(f"{question} Type 'yes' to go on: ")
        return answer.strip().lower() == "yes"

    return ask


def parse_tier(tier: str | None) -> str | None:
    if tier is None or tier in ("daily", "weekly", "monthly"):
        return tier
    raise InputError(f"--tier {tier}: not a tier; use daily, weekly or monthly")
