"""lib/schedule.py: crontab merging and cron -> systemd OnCalendar."""

from __future__ import annotations

import pytest

from lib.config import load_spec
from lib.errors import InputError
from lib.schedule import cron_line, marker, merge_crontab, on_calendar


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "50% full" / "backup.yml"
    path.parent.mkdir()
    path.write_text("version: 1\ndatabases:\n  pg: {engine: postgres, database: app}\nschedule: {cron: '5 4 * * 0'}\n")
    return load_spec(path, environ={})


def test_merge_adds_once_and_replaces_in_place(spec):
    current = "# mine\n0 * * * * /bin/true\n"
    once = merge_crontab(current, spec)
    assert once.startswith(current) and once.count(marker(spec)) == 1
    assert merge_crontab(once, spec) == once
    assert merge_crontab(once, spec, remove=True) == current


def test_cron_line_escapes_percent_and_quotes_paths(spec):
    line = cron_line(spec)
    assert line.startswith("5 4 * * 0 cd ")
    assert "'" in line  # shlex-quoted: the path contains a space
    assert "50\\% full" in line and "50%" not in line.replace("50\\%", "")


@pytest.mark.parametrize(
    "expr,calendar",
    [
        ("0 2 * * *", "*-*-* 02:00:00"),
        ("30 1 * * 1-5", "Mon..Fri *-*-* 01:30:00"),
        ("0 3 1 * *", "*-*-01 03:00:00"),
        ("*/15 * * * *", "*-*-* *:00/15:00"),
        ("0 2,14 * 1,7 0", "Sun *-01,07-* 02,14:00:00"),
    ],
)
def test_on_calendar(expr, calendar):
    assert on_calendar(expr) == calendar


def test_on_calendar_refuses_what_systemd_cannot_say():
    with pytest.raises(InputError, match="day of month and weekday"):
        on_calendar("0 2 1 * 1")
