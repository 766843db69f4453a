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
        from lib.store import ensure_dir

        ensure_dir(backup_dir)
        path = backup_dir / "backup.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.close(fd)
        if _is_stderr(path):
            return logger  # cron's ">> backup.log 2>&1": the console line already lands there
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        logger.addHandler(handler)
    return logger


def _is_stderr(path: Path) -> bool:
    """True when stderr is the file at ``path`` (so writing both would log every line twice)."""
    try:
        ours, theirs = os.fstat(sys.stderr.fileno()), os.stat(path)
    except (OSError, ValueError, AttributeError):
        return False
    return (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino)
