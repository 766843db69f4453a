"""lib/engines: the interface the pipeline talks to (no database needed)."""

from __future__ import annotations

import re

from conftest import ROOT

from lib.engines import engine_for_file

PIPELINE = ("backup", "restore", "verify", "drill", "recover", "status", "adopt")


def test_pipeline_modules_name_no_engine():
    """Engine differences live behind lib/engines/base.py (record_fields, file_markers, ...)."""
    for module in PIPELINE:
        text = (ROOT / "lib" / f"{module}.py").read_text()
        assert not re.search(r"""["'](postgres|mongodb)["']""", text), f"lib/{module}.py names an engine"


def test_files_without_a_record_are_claimed_by_their_engine():
    assert engine_for_file("backup_20260101_020000.sql.gz") == "postgres"
    assert engine_for_file("backup_20260101_020000.sql.zst.gpg") == "postgres"
    assert engine_for_file("backup_20260101_020000.dump") == "postgres"
    assert engine_for_file("backup_20260101_020000.archive") == "mongodb"
    assert engine_for_file("notes.txt") is None
