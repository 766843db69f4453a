#!/usr/bin/env python3
"""Benchmark: the old shell-script sequence vs `invoke backup` vs the pg_dump floor, on the same data.

    .venv/bin/invoke bench                      # ~500 MB database, 3 alternating runs
    .venv/bin/invoke bench --size-mb 4000 --runs 2 --json bench.json

Builds (once, reused when the size matches) a database shaped like the application's on the local
PostgreSQL server, then runs, alternately and --runs times:
  (a) old:   pg_dump --no-owner --no-acl | gzip > f; gzip -t f; gpg --symmetric --cipher-algo AES256 f; cp f.gpg offsite/
  (b) tool:  invoke backup (dump, compress, verify, encrypt, copy to a local rsync destination)
  (c) floor: pg_dump > /dev/null
and for restore: (a) createdb; gunzip -c f | psql   vs   (b) invoke restore --into.
Before every timed run: CHECKPOINT and sync, so no run pays for the previous one's writeback.
Prints wall time, CPU time (user+sys of the process tree), peak RSS of the tool's Python process
(VmHWM) and of the whole process tree (sampled), throughput, and the ratios, as medians with min
and max. Nothing here is asserted: numbers are for people.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "benchmarks" / "schema.sql"
PG = [
    "-h",
    os.environ.get("BENCH_PGHOST", "127.0.0.1"),
    "-p",
    os.environ.get("BENCH_PGPORT", "5432"),
    "-U",
    os.environ.get("BENCH_PGUSER", "postgres"),
]
DB = os.environ.get("BENCH_DB", "lemon_bench")


def psql(sql: str, dbname: str = "postgres", *extra: str) -> str:
    proc = subprocess.run(
        ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", *PG, "-d", dbname, *extra],
        input=sql,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        sys.exit(f"bench: psql failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def db_size(dbname: str) -> int:
    out = psql(f"SELECT pg_database_size('{dbname}');")
    return int(out or 0)


def build(size_mb: int) -> int:
    """Create (or reuse) the benchmark database of about size_mb MB; returns its size in bytes."""
    exists = psql(f"SELECT 1 FROM pg_database WHERE datname = '{DB}';") == "1"
    if exists:
        size = db_size(DB)
        if abs(size / 2**20 - size_mb) <= max(0.15 * size_mb, 10):
            print(f"reusing database {DB} ({size / 2**20:.0f} MB)")
            return size
        psql(f'DROP DATABASE "{DB}" WITH (FORCE);')
    psql(f'CREATE DATABASE "{DB}";')
    scale = max(20, int((size_mb - 8) * 23.8))
    print(f"building {DB}: ~{size_mb} MB (scale {scale}) ...", flush=True)
    started = time.monotonic()
    proc = subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-v", f"scale={scale}", *PG, "-d", DB, "-f", str(SCHEMA)],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        sys.exit(f"bench: building the database failed: {proc.stderr.strip()}")
    size = db_size(DB)
    print(f"built {size / 2**20:.0f} MB in {time.monotonic() - started:.0f}s")
    return size


class Sampler(threading.Thread):
    """Samples the process tree under ``pid``: peak summed RSS, and the root's own VmHWM."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.tree_peak = 0
        self.root_hwm = 0
        self.done = threading.Event()

    @staticmethod
    def _status(pid: int) -> dict[str, str]:
        try:
            with open(f"/proc/{pid}/status") as handle:
                return dict(line.split(":", 1) for line in handle if ":" in line)
        except OSError:
            return {}

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as handle:
                        ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
        tree, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children.get(pid, []))
        return tree

    def run(self) -> None:
        while not self.done.is_set():
            total = 0
            for pid in self._tree():
                status = self._status(pid)
                total += int(status.get("VmRSS", "0 kB").split()[0]) * 1024
                if pid == self.pid and "VmHWM" in status:
                    self.root_hwm = max(self.root_hwm, int(status["VmHWM"].split()[0]) * 1024)
            self.tree_peak = max(self.tree_peak, total)
            self.done.wait(self.interval)


def settle() -> None:
    """Start every timed run from the same state: the previous run's dirty pages written out
    (a CHECKPOINT and a sync), so no run pays for the writeback of the one before it."""
    # CHECKPOINT needs superuser or pg_checkpoint; without it only the sync is done
    subprocess.run(["psql", "-X", "-q", *PG, "-d", "postgres", "-c", "CHECKPOINT"], capture_output=True)
    os.sync()


def measure(argv: list[str], env: dict | None = None, cwd: Path | None = None, python_root: bool = False) -> dict:
    """Run argv to completion; wall, CPU of the whole tree, peak RSS. Exits on failure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = Sampler(proc.pid)
    sampler.start()
    _, err = proc.communicate()
    wall = time.monotonic() - started
    sampler.done.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"bench: {' '.join(argv[:4])}... failed ({proc.returncode}): {err.decode()[-800:]}")
    return {
        "wall": wall,
        "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "tree_peak_rss": sampler.tree_peak,
        "python_peak_rss": sampler.root_hwm if python_root else None,
    }


def summarize(samples: list[dict], size: int) -> dict:
    out = {}
    for key in ("wall", "cpu", "tree_peak_rss", "python_peak_rss"):
        values = [s[key] for s in samples if s.get(key) is not None]
        if values:
            out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    out["throughput_mb_s"] = size / 2**20 / out["wall"]["median"]
    return out


def fmt_range(item: dict, scale: float = 1.0, unit: str = "s", digits: int = 2) -> str:
    return (
        f"{item['median'] / scale:.{digits}f}{unit} ({item['min'] / scale:.{digits}f}-{item['max'] / scale:.{digits}f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=500, help="database size to build (MB on disk)")
    parser.add_argument("--runs", type=int, default=3, help="alternating runs of each variant")
    parser.add_argument("--compression", choices=["gzip", "zstd"], default="gzip", help="the tool's compression")
    parser.add_argument("--format", choices=["plain", "custom"], default="plain", help="the tool's dump format")
    parser.add_argument("--no-encrypt", action="store_true", help="leave encryption out of both (a) and (b)")
    parser.add_argument("--no-copy", action="store_true", help="leave the off-site copy out of both (a) and (b)")
    parser.add_argument("--no-restore", action="store_true", help="skip the restore comparison")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--drop", action="store_true", help="drop the benchmark database afterwards")
    args = parser.parse_args()

    size = build(args.size_mb)
    work = Path(tempfile.mkdtemp(prefix="lemon-bench-", dir=os.environ.get("BENCH_TMP", "/tmp")))
    try:
        results = run(args, size, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for name in psql(f"SELECT datname FROM pg_database WHERE datname LIKE '{DB}_r%';").splitlines():
            psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE);')
        if args.drop:
            psql(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE);')
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


def run(args, size: int, work: Path) -> dict:
    gnupg = work / "gnupg"
    gnupg.mkdir(mode=0o700)
    passfile = work / "passphrase"
    passfile.write_text("bench passphrase, not a secret\n")
    passfile.chmod(0o600)
    offsite_old, offsite_new = work / "offsite-old", work / "offsite-new"
    offsite_old.mkdir()
    offsite_new.mkdir()
    config = {
        "version": 1,
        "backup_dir": str(work / "backups"),
        "databases": {
            "bench": {
                "engine": "postgres",
                "database": DB,
                "user": PG[5],
                "host": PG[1],
                "port": int(PG[3]),
                "format": args.format,
                "compression": args.compression,
            }
        },
    }
    if not args.no_encrypt:
        config["encryption"] = {"mode": "symmetric", "passphrase_file": str(passfile), "gnupghome": str(gnupg)}
    if not args.no_copy:
        config["destinations"] = [{"name": "local", "type": "rsync", "target": str(offsite_new)}]
    cfg = work / "backup.yml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    env = dict(os.environ, GNUPGHOME=str(gnupg), LC_ALL="C")
    old_script = work / "old.sh"
    gpg = f'gpg --batch --yes --pinentry-mode loopback --passphrase-file "{passfile}" --symmetric --cipher-algo AES256 "$F"'
    old_script.write_text(
        "set -e\n"
        f'F="{work}/old/backup_$(date +%Y%m%d_%H%M%S).sql.gz"\nmkdir -p "{work}/old"\n'
        f'pg_dump --no-owner --no-acl {" ".join(PG)} {DB} | gzip > "$F"\n'
        'gzip -t "$F"\n'
        + ("" if args.no_encrypt else gpg + "\n")
        + ("" if args.no_copy else f'cp "$F"{"" if args.no_encrypt else ".gpg"} "{offsite_old}/"\n')
        + f'echo "$F" > "{work}/old-last"\n'
    )
    tool = [sys.executable, "-m", "invoke", "-r", str(ROOT)]
    variants = {
        "a_old": lambda: measure(["bash", str(old_script)], env=env),
        "b_tool": lambda: measure(
            [*tool, "backup", "--db", "bench", "--tier", "daily", "--config", str(cfg)], env=env, python_root=True
        ),
        "c_floor": lambda: measure(
            ["bash", "-c", f"pg_dump --no-owner --no-acl {' '.join(PG)} {DB} > /dev/null"], env=env
        ),
    }
    samples: dict[str, list] = {k: [] for k in variants}
    order = list(variants)
    for i in range(args.runs):
        for name in order[i % 3 :] + order[: i % 3]:  # rotate the order each run
            settle()
            samples[name].append(variants[name]())
            print(f"  run {i + 1} {name}: {samples[name][-1]['wall']:.2f}s", flush=True)
            if name == "b_tool" and i < args.runs - 1:
                shutil.rmtree(work / "backups" / "bench", ignore_errors=True)
                for f in offsite_new.rglob("*"):
                    if f.is_file():
                        f.unlink()
    backup_files = sorted((work / "backups" / "bench").rglob("backup_*"))
    stored = [f for f in backup_files if not f.name.endswith((".json", ".sha256"))]
    old_file = Path((work / "old-last").read_text().strip())
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "pg_dump": subprocess.run(["pg_dump", "--version"], capture_output=True, text=True).stdout.strip(),
        },
        "database_bytes": size,
        "settings": vars(args),
        "files": {"old": old_file.stat().st_size, "tool": stored[-1].stat().st_size if stored else None},
        "backup": {k: summarize(v, size) for k, v in samples.items()},
    }
    if not args.no_restore:
        results["restore"] = restore_bench(args, env, tool, cfg, old_file, stored[-1], size, passfile)
    return results


def restore_bench(args, env, tool, cfg, old_file: Path, tool_file: Path, size: int, passfile: Path) -> dict:
    # a_old: the issue's baseline, the old scripts' local plain .gz. a_old_gpg: the same from the
    # old scripts' encrypted copy (the only one off-site), the work the tool's restore does too.
    names = ["a_old", "b_tool"] + ([] if args.no_encrypt else ["a_old_gpg"])
    samples: dict[str, list] = {name: [] for name in names}
    for i in range(args.runs):
        for name in names[i % len(names) :] + names[: i % len(names)]:  # rotate the order each run
            target = f"{DB}_r{name[0]}{i}"
            psql(f'DROP DATABASE IF EXISTS "{target}" WITH (FORCE);')
            settle()
            if name.startswith("a_old"):
                # The old restore needs its database created too (the tool's time includes it).
                create = f"psql -X -q {' '.join(PG)} -d postgres -c 'CREATE DATABASE \"{target}\"'"
                source = f'gunzip -c "{old_file}"'
                if name == "a_old_gpg":
                    gpg = f'gpg --batch --quiet --pinentry-mode loopback --passphrase-file "{passfile}" -d "{old_file}.gpg"'
                    source = f"{gpg} | gunzip -c"
                load = f"{source} | psql -X -q -o /dev/null {' '.join(PG)} -d {target}"
                samples[name].append(measure(["bash", "-c", f"set -o pipefail; {create} && {load}"], env=env))
            else:
                argv = [
                    *tool,
                    "restore",
                    "--engine",
                    "postgres",
                    "--file",
                    str(tool_file),
                    "--into",
                    target,
                    "--yes",
                    "--config",
                    str(cfg),
                ]
                samples[name].append(measure(argv, env=env, python_root=True))
            print(f"  restore run {i + 1} {name}: {samples[name][-1]['wall']:.2f}s", flush=True)
            psql(f'DROP DATABASE IF EXISTS "{target}" WITH (FORCE);')
    return {k: summarize(v, size) for k, v in samples.items()}


def report(results: dict) -> None:
    size = results["database_bytes"] / 2**20
    print(f"\ndatabase {size:.0f} MB on disk; machine {results['machine']}")
    print(
        f"stored file: old {results['files']['old'] / 2**20:.1f} MB, tool {(results['files']['tool'] or 0) / 2**20:.1f} MB"
    )
    for section in ("backup", "restore"):
        if section not in results:
            continue
        print(f"\n{section}: median (min-max)")
        print(f"  {'variant':<10} {'wall':<24} {'cpu':<24} {'python peak RSS':<22} {'tree peak RSS':<22} MB/s")
        for name, r in results[section].items():
            py = fmt_range(r["python_peak_rss"], 2**20, " MB", 0) if "python_peak_rss" in r else "-"
            print(
                f"  {name:<10} {fmt_range(r['wall']):<24} {fmt_range(r['cpu']):<24} {py:<22} {fmt_range(r['tree_peak_rss'], 2**20, ' MB', 0):<22} {r['throughput_mb_s']:.0f}"
            )
    b = results["backup"]
    ratios = {
        "backup tool/old (target <= 0.5)": b["b_tool"]["wall"]["median"] / b["a_old"]["wall"]["median"],
        "backup tool/floor (target <= 2.0 with zstd)": b["b_tool"]["wall"]["median"] / b["c_floor"]["wall"]["median"],
    }
    if "restore" in results:
        r = results["restore"]
        ratios["restore tool/old (target <= 1.0)"] = r["b_tool"]["wall"]["median"] / r["a_old"]["wall"]["median"]
        if "a_old_gpg" in r:
            ratios["restore tool/old from its encrypted copy"] = (
                r["b_tool"]["wall"]["median"] / r["a_old_gpg"]["wall"]["median"]
            )
    results["ratios"] = ratios
    print("\nratios (wall-time medians):")
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}x")


if __name__ == "__main__":
    main()
