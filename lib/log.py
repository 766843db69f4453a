"""Timestamped log lines on the console and appended to <backup_dir>/backup.log."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"


def get() -> logging.Logger:
    return logging.getLogger("backup")


def setup(backup_dir: Path | None = None, verbose: bool = False) -> logging.Logger:
    """Configure the 'backup' logger: console (stderr) and, when given, backup_dir/backup.log (0600)."""
    logger = get()
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    logger.addHandler(console)
    if backup_dir is not None:
        from lib.errors import InputError
        from lib.store import SymlinkRefused, ensure_dir, open_nofollow

        path = backup_dir / "backup.log"
        try:
            ensure_dir(backup_dir)
            fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK, 0o600)
        except SymlinkRefused as exc:
            raise InputError(f"log file {exc.strerror}") from None
        except OSError as exc:  # a read-only or full backup_dir: the run goes on and fails there, once
            logger.warning("cannot write %s (%s); logging to the console only", path, exc.strerror or exc)
            return logger
        stream = os.fdopen(fd, "a", encoding="utf-8")
        if _is_stderr(stream):
            stream.close()
            return logger  # cron's ">> backup.log 2>&1": the console line already lands there
        handler = _FileHandler(stream)
        handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        logger.addHandler(handler)
    return logger


class _FileHandler(logging.StreamHandler):
    """A handler appending to a file opened by us (without following a link); closes it."""

    def close(self) -> None:
        try:
            self.acquire()
            try:
                if not self.stream.closed:
                    self.stream.close()
            finally:
                self.release()
        finally:
            super().close()


def _is_stderr(stream) -> bool:
    """True when stderr is the file open as ``stream`` (so writing both would log every line twice)."""
    try:
        ours, theirs = os.fstat(sys.stderr.fileno()), os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino)
