"""Throughput of off-site copies to a loopback OpenSSH server (a benchmark, not a test).

    .venv/bin/python tests/bench_destinations.py [MiB]

Prints MB/s for the upload part of a push (sftp, rsync over ssh, S3 to moto's server in its own
process), for the whole push including verification, and for an sftp and S3 download, with the
ratio to a plain local `cp` of the same file. Then the tool's peak memory (max RSS of a process
doing only the push) for S3 uploads of 2, 10 and 30 times the part size: it must not grow with the file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from s3server import moto_process  # noqa: E402
from sshd import SshServer  # noqa: E402
from test_destinations import block, make_backup, write_spec  # noqa: E402

from lib.destinations import configured  # noqa: E402

S3_CREDS = {"BENCH_S3_KEY": "bench-key", "BENCH_S3_SECRET": "bench-secret"}
PART_MIB = 8
#: run in a child process: one S3 push; prints the peak RSS (VmHWM: this process's own, unlike
#: ru_maxrss, which Linux carries over from the parent across fork+exec) before and after it (KiB)
PUSH_CHILD = """
import json, re, sys
from datetime import timedelta
from pathlib import Path
sys.path[:0] = sys.argv[1:3]
from lib.config import load_spec
from lib.destinations import configured
from lib import store
def hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
spec = load_spec(sys.argv[3])
[dest] = configured(spec)
with dest:
    dest.client().head_bucket(Bucket=dest.bucket)
    before = hwm()
    info = dest.push(store.load(Path(sys.argv[4])))
    after = hwm()
print(json.dumps({"before": before, "after": after, "seconds": info["seconds"], "method": info["method"]}))
"""


def s3_block(url: str, bucket: str) -> dict:
    return {
        "name": "cloud",
        "type": "s3",
        "bucket": bucket,
        "endpoint_url": url,
        "region": "us-east-1",
        "access_key_env": "BENCH_S3_KEY",
        "secret_key_env": "BENCH_S3_SECRET",
        "part_size_mib": PART_MIB,
        "retries": 0,
    }


def s3_bench(base: Path, backup, mb: float, local: float) -> None:
    """S3 throughput, and the peak memory of pushes of 2x, 10x and 30x the part size."""
    import boto3

    from lib.config import load_spec

    proc, url = moto_process()  # its memory is not the tool's
    try:
        client = boto3.client(
            "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s"
        )
        for bucket in ("bench-throughput", "bench-memory-2", "bench-memory-10", "bench-memory-30"):
            client.create_bucket(Bucket=bucket)
        write_spec(base, [s3_block(url, "bench-throughput")])
        os.environ.update(S3_CREDS)  # write_spec's load took them out of the environment
        spec = load_spec(base / "backup.yml")
        [dest] = configured(spec)
        with dest:
            started = time.monotonic()
            info = dest.push(backup)
            total = time.monotonic() - started
            listing = dest.list("pg")
            out = base / "fetched-s3"
            out.mkdir()
            started = time.monotonic()
            dest.fetch(listing.backups[0], out)
            download = mb / (time.monotonic() - started)
        print(
            f"{'s3 (moto)':<12} upload {mb / info['seconds']:6.1f} MB/s; push incl. verify ({info['method']}) "
            f"{mb / total:6.1f} MB/s; upload vs local cp {mb / info['seconds'] / local:.2f}x; download {download:6.1f} MB/s"
        )
        here = Path(__file__).resolve().parent
        peaks = {}
        for times in (2, 10, 30):
            work = base / f"mem-{times}"
            work.mkdir()
            write_spec(work, [s3_block(url, f"bench-memory-{times}")])
            os.environ.update(S3_CREDS)  # for the child
            big = make_backup(work / "backups", timedelta(hours=1), size=times * PART_MIB << 20)
            argv = [
                sys.executable,
                "-c",
                PUSH_CHILD,
                str(here),
                str(here.parent),
                str(work / "backup.yml"),
                str(big.path),
            ]
            result = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
            peaks[times] = result
            big.path.unlink()
        print(
            "s3 peak memory of the push (max RSS, part size "
            f"{PART_MIB} MiB, concurrency 4): "
            + "; ".join(
                f"{t}x part size ({t * PART_MIB} MiB): {r['after'] / 1024:.0f} MiB "
                f"(+{(r['after'] - r['before']) / 1024:.0f} MiB during the push)"
                for t, r in peaks.items()
            )
            + f"; growth 30x vs 10x: {(peaks[30]['after'] - peaks[10]['after']) / 1024:+.0f} MiB"
        )
    finally:
        proc.terminate()
        proc.wait()


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
        s3_bench(base, backup, mb, local)


if __name__ == "__main__":
    main()
