#!/usr/bin/env python3
"""Benchmark: point-in-time recovery (docs/pitr.md) on a throwaway source cluster of its own.

    .venv/bin/invoke bench --pitr-mb 200          # ~200 MB database, 20 s of steady writes per mode

For each receiver mode (synchronous: true, then false), on a fresh database of --pitr-mb MB:
  1. a dump backup (invoke backup) and a base backup (invoke wal-base), the receiver running;
  2. steady writes (autocommit INSERTs of 500 rows, ~170 KB of table, every 20 ms) for --seconds seconds, T noted halfway;
  3. the source server crashes (pg_ctl stop -m immediate) under the load; the receiver notices, archives
     what it has and stops; the server is started again (its crash recovery keeps every commit);
  4. restore --to-latest: RPO = newest commit on the source - newest commit restored (seconds lost);
  5. restore --to-time T vs restore --file latest (the dump) into new databases: wall time and ratio;
  6. WAL archive bytes per GB of WAL written and per GB of table data written.
A third run kills the receiver with SIGKILL (no clean stop) with partial_snapshot_seconds 5, then
crashes the server: the loss is bounded by the snapshot interval.
Nothing is asserted: numbers are for people.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lib.localpg import Cluster, _pg_bin  # noqa: E402

#: 256 random hex characters per row (compresses about as well as text data: ~2x)
PAD = " || ".join(["md5(random()::text)"] * 8)


def invoke(ws: Path, *args: str, check: bool = True) -> tuple[float, str]:
    started = time.monotonic()
    argv = [sys.executable, "-m", "invoke", "-r", str(ROOT), *args, "--config", str(ws / "backup.yml")]
    proc = subprocess.run(argv, cwd=ws, capture_output=True, text=True)
    if check and proc.returncode:
        sys.exit(f"bench: invoke {' '.join(args)} failed: {proc.stderr.strip()[-800:]}")
    return time.monotonic() - started, proc.stdout


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def scenario(cluster: Cluster, work: Path, name: str, size_mb: int, seconds: float, sync: bool, kill: bool) -> dict:
    db = f"pitr_bench_{name}"
    cluster.sql(f"DROP DATABASE IF EXISTS {db};")
    cluster.sql(f"CREATE DATABASE {db};")
    cluster.sql(
        "CREATE TABLE t (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp(), pad text);"
        f"INSERT INTO t (pad) SELECT {PAD} FROM generate_series(1, {size_mb * 2500}) g;",
        db,
    )
    ws = work / name
    ws.mkdir()
    wal = {"enabled": True, "synchronous": sync, "slot": f"bench_{name}", "partial_snapshot_seconds": 5 if kill else 0}
    config = {
        "version": 1,
        "backup_dir": "./backups",
        "databases": {
            "pg": {"engine": "postgres", "database": db, "user": "postgres", "host": "127.0.0.1", "port": cluster.port}
        },
    }
    config["databases"]["pg"]["wal"] = wal
    (ws / "backup.yml").write_text(yaml.safe_dump(config))
    invoke(ws, "backup", "--all", "--tier", "daily")
    invoke(ws, "wal-receive", "--once")
    argv = [sys.executable, "-m", "invoke", "-r", str(ROOT), "wal-receive", "--config", str(ws / "backup.yml")]
    receiver = subprocess.Popen(argv, cwd=ws, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    invoke(ws, "wal-base")
    size_before = int(cluster.sql(f"SELECT pg_database_size('{db}');"))
    lsn_before = cluster.sql("SELECT pg_current_wal_lsn();")
    rounds = int(seconds / 0.02)
    script = "".join(
        f"INSERT INTO t (pad) SELECT {PAD} FROM generate_series(1, 500);\nSELECT pg_sleep(0.02);\n"
        for _ in range(rounds)
    )
    psql = [
        "psql", "-X", "-q", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres", "-d", db, "-o", "/dev/null",
    ]  # fmt: skip
    load = subprocess.Popen(psql, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    load.stdin.write(script)
    load.stdin.close()
    time.sleep(seconds / 2)
    target = cluster.sql("SELECT clock_timestamp();")
    time.sleep(seconds / 2 - 1)
    lsn_after = cluster.sql("SELECT pg_current_wal_lsn();")
    size_after = int(cluster.sql(f"SELECT pg_database_size('{db}');"))
    if kill:
        receiver.send_signal(signal.SIGKILL)
    subprocess.run(
        cluster.prefix + [_pg_bin("pg_ctl"), "-D", str(cluster.data), "-m", "immediate", "-w", "stop"],
        capture_output=True,
    )
    crashed = time.monotonic()
    receiver.communicate(timeout=120)
    load.wait()
    options = f"-p {cluster.port} -k {cluster.sock} -c listen_addresses='127.0.0.1' -c fsync=off"
    subprocess.run(
        cluster.prefix
        + [_pg_bin("pg_ctl"), "-D", str(cluster.data), "-o", options, "-w", "-l", str(cluster.root / "log"), "start"],
        check=True,
        capture_output=True,
    )
    # killed: the receiver died with the server (no catch-up): what came after its last snapshot is lost
    wal_bytes = int(cluster.sql(f"SELECT pg_wal_lsn_diff('{lsn_after}', '{lsn_before}');"))
    archive = du(ws / "backups" / "pg" / "wal" / "archive")
    newest_source = cluster.sql("SELECT max(at) FROM t;", db)
    t_latest, _ = invoke(ws, "restore", "--to-latest", "--into", f"{db}_latest", "--yes")
    newest_restored = cluster.sql("SELECT max(at) FROM t;", f"{db}_latest")
    lost = float(cluster.sql(f"SELECT extract(epoch FROM '{newest_source}'::timestamptz - '{newest_restored}');"))
    t_point, _ = invoke(ws, "restore", "--to-time", target, "--into", f"{db}_point", "--yes")
    t_dump, _ = invoke(ws, "restore", "--engine", "postgres", "--file", "latest", "--into", f"{db}_dump", "--yes")
    for suffix in ("_latest", "_point", "_dump"):
        cluster.sql(f"DROP DATABASE IF EXISTS {db}{suffix};")
    cluster.sql(f"SELECT pg_drop_replication_slot('bench_{name}');")
    return {
        "name": name,
        "rpo_seconds": lost,
        "wal_mb": wal_bytes / 1e6,
        "data_mb": (size_after - size_before) / 1e6,
        "archive_mb": archive / 1e6,
        "restore_to_latest_s": t_latest,
        "restore_to_time_s": t_point,
        "restore_dump_s": t_dump,
        "after_crash_s": time.monotonic() - crashed,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lemon-bench-pitr-", dir="/tmp"))
    cluster = Cluster(root / "src", listen="127.0.0.1")
    (root / "src").mkdir()
    root.chmod(0o711)  # the server runs as postgres
    cluster.start()
    results = []
    try:
        for name, sync, kill in (("sync", True, False), ("async", False, False), ("killed", True, True)):
            result = scenario(cluster, root, name, args.size_mb, args.seconds, sync, kill)
            results.append(result)
            print(f"{name}: {result}", flush=True)
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    print()
    print(f"PITR benchmark: {args.size_mb} MB database, {args.seconds:g} s of steady writes, then a server crash")
    print(
        "scenario  RPO(s lost)  WAL MB  data MB  archive MB  archive/GB WAL  archive/GB data  to-latest s  to-time s  dump s  to-time/dump"
    )
    for r in results:
        print(
            f"{r['name']:<9} {r['rpo_seconds']:>11.3f} {r['wal_mb']:>7.0f} {r['data_mb']:>8.0f} {r['archive_mb']:>11.1f} "
            f"{r['archive_mb'] / r['wal_mb'] * 1000:>12.0f} MB {r['archive_mb'] / max(r['data_mb'], 1e-9) * 1000:>13.0f} MB "
            f"{r['restore_to_latest_s']:>11.1f} {r['restore_to_time_s']:>10.1f} {r['restore_dump_s']:>7.1f} "
            f"{r['restore_to_time_s'] / r['restore_dump_s']:>12.2f}x"
        )


if __name__ == "__main__":
    main()
