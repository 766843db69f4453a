"""The demo (README, docs/getting-started.md) runs the whole road on a throwaway PostgreSQL cluster."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.skipif(not shutil.which("pg_ctlcluster"), reason="needs the PostgreSQL server package")
def test_demo_round_trip():
    result = subprocess.run(
        [sys.executable, "-m", "invoke", "-r", str(ROOT), "demo"],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo OK" in result.stdout
    assert "per-table checksums match" in result.stdout
