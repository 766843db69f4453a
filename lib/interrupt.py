"""SIGTERM and SIGHUP are handled like Ctrl-C: the signal raises ``Interrupted`` (a
KeyboardInterrupt) in the main thread, so every ``except BaseException``/``finally`` cleanup runs
(temp files removed, scratch databases dropped, child processes killed) and the run is reported
as interrupted to hooks, last_run.json and metrics. The exit status is 128 + the signal number
(130 Ctrl-C, 143 SIGTERM, 129 SIGHUP), as for a process killed by it.

systemd stop, ``timeout`` and ``docker stop`` send SIGTERM; a closed terminal sends SIGHUP.
A repeated SIGTERM/SIGHUP during the cleanup is ignored (logged), so the cleanup completes;
SIGKILL cannot be caught: what it leaves is repaired by the next run (lib/lifecycle.py).
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("backup")

HANDLED = (signal.SIGTERM, signal.SIGHUP)
_state = {"raised": False}


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGTERM or SIGHUP; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_name(exc: BaseException) -> str:
    """'SIGTERM', 'SIGHUP' or 'Ctrl-C' (a plain KeyboardInterrupt) for messages."""
    return signal.Signals(exc.signum).name if isinstance(exc, Interrupted) else "Ctrl-C"


def exit_code(exc: BaseException) -> int:
    """128 + the signal number: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""
    return 128 + (exc.signum if isinstance(exc, Interrupted) else signal.SIGINT)


def _handler(signum: int, _frame) -> None:
    if _state["raised"]:
        log.warning("%s received again; still cleaning up after the first", signal.Signals(signum).name)
        return
    _state["raised"] = True
    log.warning("%s received: stopping and cleaning up", signal.Signals(signum).name)
    raise Interrupted(signum)


def install() -> None:
    """Route SIGTERM and SIGHUP to ``Interrupted`` (only possible in the main thread; a no-op
    elsewhere). A signal this process was started with ignored stays ignored (``nohup invoke
    backup --all`` must survive the terminal closing)."""
    if threading.current_thread() is not threading.main_thread():
        return
    _state["raised"] = False
    for signum in HANDLED:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _handler)
