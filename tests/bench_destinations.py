"""Throughput of off-site copies to a loopback OpenSSH server (a benchmark, not a test).

    .venv/bin/python tests/bench_destinations.py [MiB]

Prints MB/s for the upload part of a push (sftp, rsync over ssh), for the whole push including
verification, and for an sftp download, with the ratio to a plain local `cp` of the same file.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from sshd import SshServer  # noqa: E402
from test_destinations import block, make_backup, write_spec  # noqa: E402

from lib.destinations import configured  # noqa: E402


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    with tempfile.TemporaryDirectory(prefix="bench-offsite-") as tmp:
        base = Path(tmp)
        server = SshServer(base / "sshd").start()
        try:
            spec = write_spec(base, [])
            backup = make_backup(spec.backup_dir, timedelta(hours=1), size=mib << 20)
            mb = backup.record["size"] / 1e6
            started = time.monotonic()
            subprocess.run(["cp", str(backup.path), str(base / "copy")], check=True)
            local = mb / (time.monotonic() - started)
            print(f"file: {mb:.0f} MB; local cp: {local:.0f} MB/s")
            for kind in ("sftp", "sftp-reread", "rsync"):
                root = base / f"remote-{kind}"
                root.mkdir()
                spec = write_spec(base, [block(kind, server, root)])
                [dest] = configured(spec)
                with dest:
                    started = time.monotonic()
                    info = dest.push(backup)
                    total = time.monotonic() - started
                    line = (
                        f"{kind:<12} upload {mb / info['seconds']:6.1f} MB/s; push incl. verify ({info['method']}) "
                        f"{mb / total:6.1f} MB/s; upload vs local cp {mb / info['seconds'] / local:.2f}x"
                    )
                    if kind == "sftp":
                        listing = dest.list("pg")
                        out = base / "fetched"
                        out.mkdir()
                        started = time.monotonic()
                        dest.fetch(listing.backups[0], out)
                        line += f"; download {mb / (time.monotonic() - started):6.1f} MB/s"
                print(line)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
