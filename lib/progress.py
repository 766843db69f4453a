"""Progress of long dumps, uploads and restores.

On a terminal (stderr is a tty) a live line is redrawn at most every 0.5 s: bytes, rate, elapsed
(and percent when the total is known). Without a terminal (cron, systemd, pipes) nothing but
ordinary timestamped log lines are written, one per minute of a long transfer, with no control
characters.

Restores read the stored file through a pipeline whose first process has the file as its stdin;
``watch_reads`` follows that process's file offset in /proc/<pid>/fdinfo/0, so no engine code
needs to report progress.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from lib.store import human_size

REDRAW_SECONDS = 0.5
LOG_SECONDS = 60.0
log = logging.getLogger("backup")


def elapsed_text(seconds: float) -> str:
    """'1:02:03' or '02:03'."""
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
    """Callable taking the number of bytes done so far; draws or logs as described above.

    ``stream`` defaults to stderr; ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.clock = clock
        self.started = clock()
        self.tty = _isatty(self.stream)
        self.done = 0
        self.last_draw = -1e9
        self.last_log = self.started
        self.drawn = False
        self.closed = False
        if self.tty:  # a log line erases the live line first; the next update redraws it
            log.addFilter(self._erase_for_log)

    def _erase_for_log(self, record: logging.LogRecord) -> bool:
        self.erase()
        self.last_draw = -1e9
        return True

    def text(self, now: float) -> str:
        """'pg: dump 12.0 MiB, 4.0 MiB/s, 00:03' (plus ' 40%' with a known total)."""
        elapsed = max(now - self.started, 1e-6)
        text = f"{self.label} {human_size(self.done)}"
        if self.total:
            text += f" of {human_size(self.total)} ({min(100, self.done * 100 // max(self.total, 1))}%)"
        return text + f", {human_size(self.done / elapsed)}/s, {elapsed_text(elapsed)}"

    def __call__(self, done: int) -> None:
        self.done = done
        if self.closed:
            return
        now = self.clock()
        if self.tty:
            if now - self.last_draw >= REDRAW_SECONDS:
                self.last_draw = now
                self.stream.write("\r" + self.text(now) + "\x1b[K")
                self.stream.flush()
                self.drawn = True
        elif now - self.last_log >= LOG_SECONDS:
            self.last_log = now
            log.info("%s so far", self.text(now))

    def erase(self) -> None:
        """Erase the live line (terminal only) so the text that follows starts clean."""
        if self.tty and self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False

    def close(self) -> None:
        """Erase the live line and stop following log lines; updates after this draw nothing."""
        self.erase()
        self.closed = True
        log.removeFilter(self._erase_for_log)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def progress(label: str, total: int | None = None) -> Iterator[Progress]:
    """A Progress on stderr for the ``with`` block, closed at its end."""
    bar = Progress(label, total)
    try:
        yield bar
    finally:
        bar.close()


def reader_offset(path: Path, parent: int | None = None) -> int | None:
    """Offset in ``path`` of a child of ``parent`` (default: this process) reading it on stdin,
    from /proc/<pid>/fdinfo/0. None when no such process runs (or /proc is unavailable)."""
    parent = os.getpid() if parent is None else parent
    target = str(path.resolve())
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent or os.readlink(f"/proc/{pid}/fd/0") != target:
                continue
            with open(f"/proc/{pid}/fdinfo/0", encoding="ascii") as handle:
                for line in handle:
                    if line.startswith("pos:"):
                        return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return None


@contextlib.contextmanager
def watch_reads(path: Path, label: str) -> Iterator[None]:
    """Show progress of child processes reading ``path`` on stdin during the ``with`` block."""
    bar = Progress(label, total=path.stat().st_size)
    stop = threading.Event()

    def follow() -> None:
        while not stop.wait(REDRAW_SECONDS):
            offset = reader_offset(path)
            if offset is not None:
                bar(offset)

    thread = threading.Thread(target=follow, name="progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()
