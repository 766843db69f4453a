"""Bucket backups (engine s3) against a local S3 server: a benchmark, not a test.

    .venv/bin/python benchmarks/bench_buckets.py [MiB]      (or: invoke bench --bucket-mb MiB)

Fills a bucket on moto's server (in its own process) with MiB of incompressible "media" (many
small images, some voice messages, a few large files), then measures, once each:

- the tool's full backup (list, fetch, tar, zstd, verify in flight, store) against
  ``aws s3 sync s3://bucket folder`` (awscli), the reference a user would try first;
- an incremental backup after 1% of the objects changed, against the full one;
- the tool's restore of the chain into a new bucket (verify every file, upload, list and check)
  against ``aws s3 sync folder s3://other-bucket``;
- the peak memory (VmHWM) of the dump helper process: it must not grow with the bucket.

Prints MB/s and ratios. moto is slow (Python, in memory), so absolute numbers say more about it
than about a real MinIO; the ratios compare both clients against the same server.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from s3server import moto_process  # noqa: E402

CREDS = {"BENCH_KEY": "bench-key", "BENCH_SECRET": "bench-secret"}
AWS_ENV = {"AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}


def client(url: str):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="bench-key",
        aws_secret_access_key=CREDS["BENCH_SECRET"],
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=16),
    )


def fill(s3, bucket: str, mib: int) -> list[tuple[str, int]]:
    """Mixed objects totalling about ``mib`` MiB: 70% of the bytes in images of 20-300 KiB, 25% in
    voice messages of 0.3-3 MiB, 5% in files of 12 MiB (streamed, multipart on restore)."""
    rng = random.Random(42)
    total = mib << 20
    objects: list[tuple[str, int]] = []
    budget = {"images": 0.70 * total, "voice": 0.25 * total, "large": 0.05 * total}
    for kind, lo, hi in (("images", 20 << 10, 300 << 10), ("voice", 300 << 10, 3 << 20), ("large", 12 << 20, 12 << 20)):
        used = 0
        while used < budget[kind]:
            size = rng.randint(lo, hi)
            objects.append((f"dm-{kind}/{len(objects) // 100:03d}/메시지-{len(objects):06d}.bin", size))
            used += size

    def put(item: tuple[str, int]) -> None:
        key, size = item
        s3.put_object(Bucket=bucket, Key=key, Body=os.urandom(size), ContentType="application/octet-stream")

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, objects))
    return objects


def timed(argv: list[str], cwd: Path, env: dict[str, str], watch: str | None = None) -> tuple[float, int]:
    """Run ``argv``; (seconds, peak VmHWM in KiB of the newest process whose command line holds
    ``watch``, sampled)."""
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    if watch and watch in cmd:
                        hwm = re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
                        if hwm:
                            peak[0] = max(peak[0], int(hwm.group(1)))
                except OSError:
                    continue
            done.wait(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    if watch:
        thread.start()
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - started
    done.set()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:4]} failed: {proc.stderr[-2000:]}")
    return seconds, peak[0]


def main(argv: list[str]) -> int:
    mib = int(argv[1]) if len(argv) > 1 else 256
    proc, url = moto_process()
    work = Path(tempfile.mkdtemp(prefix="lemon-bench-buckets-"))
    try:
        s3 = client(url)
        s3.create_bucket(Bucket="media")
        print(f"filling bucket 'media' with {mib} MiB on {url} ...", flush=True)
        objects = fill(s3, "media", mib)
        size_mb = sum(size for _, size in objects) / 1e6
        print(f"{len(objects)} objects, {size_mb:.0f} MB")
        (work / "backup.yml").write_text(
            "version: 1\nbackup_dir: ./backups\ndatabases:\n  media:\n    engine: s3\n    bucket: media\n"
            f"    endpoint_url: {url}\n    access_key_env: BENCH_KEY\n    secret_key_env: BENCH_SECRET\n"
            "    incremental: true\n",
            encoding="utf-8",
        )
        env = {**os.environ, **CREDS}
        invoke = [sys.executable, "-m", "invoke", "-r", str(ROOT)]
        config = ["--config", str(work / "backup.yml")]
        full_s, helper_kib = timed([*invoke, "backup", "--all", "--tier", "daily", *config], work, env, "s3tar.py dump")
        aws = shutil.which("aws", path=str(Path(sys.executable).parent)) or shutil.which("aws")
        aws_env = {**os.environ, **AWS_ENV}
        sync_s, _ = timed(
            [aws, "s3", "sync", "s3://media", str(work / "synced"), "--endpoint-url", url, "--quiet"], work, aws_env
        )

        rng = random.Random(7)
        changed = rng.sample(objects, max(1, len(objects) // 100))
        for key, size in changed:
            s3.put_object(Bucket="media", Key=key, Body=os.urandom(size))
        changed_mb = sum(size for _, size in changed) / 1e6
        inc_s, _ = timed([*invoke, "backup", "--all", "--tier", "daily", *config], work, env)
        files = sorted((work / "backups" / "media" / "daily").glob("backup_*.tar.zst"))
        full_file, inc_file = files[0].stat().st_size, files[1].stat().st_size

        restore_s, _ = timed(
            [*invoke, "restore", "--engine", "s3", "--file", "latest", "--into", "restored", "--yes", *config],
            work,
            env,
        )
        s3.create_bucket(Bucket="synced-back")
        up_s, _ = timed(
            [aws, "s3", "sync", str(work / "synced"), "s3://synced-back", "--endpoint-url", url, "--quiet"],
            work,
            aws_env,
        )
        print()
        print(f"{'':<44}{'seconds':>8}{'MB/s':>9}   ratio")
        print(f"{'full backup (tool: fetch+tar+zstd+verify)':<44}{full_s:8.1f}{size_mb / full_s:9.1f}")
        print(
            f"{'aws s3 sync bucket -> folder':<44}{sync_s:8.1f}{size_mb / sync_s:9.1f}   tool/aws {full_s / sync_s:.2f}x"
        )
        print(
            f"{'incremental after 1% changed':<44}{inc_s:8.1f}{'':>9}   inc/full time {inc_s / full_s:.3f}x, "
            f"file {inc_file / full_file:.3f}x ({len(changed)} objects, {changed_mb:.1f} MB)"
        )
        print(f"{'restore of the chain (verify+upload+check)':<44}{restore_s:8.1f}{size_mb / restore_s:9.1f}")
        print(
            f"{'aws s3 sync folder -> bucket':<44}{up_s:8.1f}{size_mb / up_s:9.1f}   tool/aws {restore_s / up_s:.2f}x"
        )
        print(f"peak memory of the dump helper: {helper_kib / 1024:.0f} MiB")
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
