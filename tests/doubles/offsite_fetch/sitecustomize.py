"""TEST DOUBLE for off-site fetching, loaded only when a test puts this directory on PYTHONPATH.

Provides ``lib.destinations.fetch_latest(spec, dest_name, db_name, workdir) -> Path`` (the
interface the off-site feature provides) by copying the newest backup of ``db_name`` with its
sidecars from $FAKE_REMOTE/<dest_name>/<db_name>/ (any depth) into ``workdir``. Each call is
appended to $FAKE_REMOTE/fetches.log.
"""

import os
import shutil
import sys
import types
from pathlib import Path


def fetch_latest(spec, dest_name, db_name, workdir):
    remote = Path(os.environ["FAKE_REMOTE"])
    with open(remote / "fetches.log", "a") as log:
        log.write(f"{dest_name} {db_name}\n")
    files = sorted(
        p for p in (remote / dest_name / db_name).rglob("backup_*") if not p.name.endswith((".json", ".sha256"))
    )
    newest = files[-1]
    for path in (newest, newest.with_name(newest.name + ".json"), newest.with_name(newest.name + ".sha256")):
        shutil.copy2(path, Path(workdir) / path.name)
    return Path(workdir) / newest.name


module = types.ModuleType("lib.destinations")
module.fetch_latest = fetch_latest
sys.modules["lib.destinations"] = module
