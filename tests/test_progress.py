"""lib/progress.py: a live line on a terminal only; file offsets of child readers from /proc."""

from __future__ import annotations

import io
import logging
import subprocess
import sys

from lib.progress import Progress, reader_offset


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_terminal_gets_a_throttled_live_line():
    stream, clock = FakeTerminal(), Clock()
    bar = Progress("pg: dump", stream=stream, clock=clock)
    clock.now += 2
    bar(4 * 1024 * 1024)
    bar(5 * 1024 * 1024)  # same instant: throttled, not redrawn
    assert stream.getvalue() == "\rpg: dump 4.0 MiB, 2.0 MiB/s, 00:02\x1b[K"
    clock.now += 1
    bar(6 * 1024 * 1024)
    bar.close()
    assert stream.getvalue().endswith("6.0 MiB, 2.0 MiB/s, 00:03\x1b[K\r\x1b[K")


def test_known_total_shows_percent():
    stream, clock = FakeTerminal(), Clock()
    bar = Progress("pg: restore", total=1000, stream=stream, clock=clock)
    clock.now += 1
    bar(250)
    bar.close()
    assert "250 B of 1000 B (25%)" in stream.getvalue()


def test_a_log_line_erases_the_live_line_first():
    stream, clock = FakeTerminal(), Clock()
    bar = Progress("pg: dump", stream=stream, clock=clock)
    clock.now += 1
    bar(100)
    logging.getLogger("backup").warning("verified")
    assert stream.getvalue().endswith("\x1b[K\r\x1b[K")
    bar.close()
    assert stream.getvalue().count("\r\x1b[K") == 1  # nothing left to erase


def test_no_terminal_no_control_characters(caplog):
    stream, clock = io.StringIO(), Clock()
    bar = Progress("pg: dump", stream=stream, clock=clock)
    clock.now += 1
    bar(1000)
    clock.now += 61
    with caplog.at_level("INFO", logger="backup"):
        bar(2000)
    bar.close()
    assert stream.getvalue() == ""
    assert [r.getMessage() for r in caplog.records] == ["pg: dump 2.0 KiB, 32 B/s, 01:02 so far"]


def test_reader_offset_follows_a_child_reading_stdin(tmp_path):
    source = tmp_path / "backup.bin"
    source.write_bytes(b"x" * 10000)
    with open(source, "rb") as handle:
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import os, sys, time; os.read(0, 1234); print('ready', flush=True); time.sleep(30)",
            ],
            stdin=handle,
            stdout=subprocess.PIPE,
            text=True,
        )
    try:
        assert child.stdout.readline().strip() == "ready"
        assert reader_offset(source) == 1234
        assert reader_offset(tmp_path / "other.bin") is None
    finally:
        child.kill()
        child.wait()
