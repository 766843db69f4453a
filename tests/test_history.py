"""Run history files: damaged content is ignored, never a crash; a refused write is a warning."""

from __future__ import annotations

import json
import logging

from lib import history


def test_damaged_last_run_is_ignored_and_replaced(tmp_path):
    (tmp_path / "pg").mkdir()
    path = tmp_path / "pg" / history.LAST_RUN
    for text in ('{"status": 1}', "[1]", '{"status": "success", "finished": "now", "seconds": 1}', "{"):
        path.write_text(text)
        assert history.last_run(tmp_path, "pg") is None
    path.write_text(json.dumps({"status": "success", "finished": "2026-11-26T02:00:03Z", "seconds": 2, "runs": "x"}))
    entry = history.record_run(tmp_path, "pg", False, 1.0)
    assert entry["runs"] == {"success": 0, "failure": 1, "interrupted": 0}
    (tmp_path / "pg" / history.DRILLS).write_text(
        '{"drills": [{"ok": "yes"}, 5, {"ok": true, "at": "2026-11-26T02:00:03Z"}]}'
    )
    assert history.drills(tmp_path, "pg") == [{"ok": True, "at": "2026-11-26T02:00:03Z"}]


def test_last_run_that_is_a_link_is_neither_read_nor_written_through(tmp_path, caplog):
    (tmp_path / "pg").mkdir()
    victim = tmp_path / "victim.json"
    victim.write_text(json.dumps({"status": "success", "finished": "2026-11-26T02:00:03Z", "seconds": 2}))
    (tmp_path / "pg" / history.LAST_RUN).symlink_to(victim)
    assert history.last_run(tmp_path, "pg") is None
    history.record_run(tmp_path, "pg", True, 1.0)
    assert json.loads(victim.read_text())["finished"] == "2026-11-26T02:00:03Z"  # the target is untouched
    assert not (tmp_path / "pg" / history.LAST_RUN).is_symlink()  # the link itself was replaced


def test_a_refused_write_is_a_warning(tmp_path, caplog):
    (tmp_path / "pg").write_text("a file where the database's folder belongs")
    logger = logging.getLogger("backup")  # lib.log.setup stops propagation: listen on the logger itself
    logger.addHandler(caplog.handler)
    try:
        entry = history.record_run(tmp_path, "pg", True, 1.0)
    finally:
        logger.removeHandler(caplog.handler)
    assert entry["status"] == "success"
    assert any("could not write" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
