"""A throwaway PostgreSQL cluster on this host (initdb + pg_ctl, socket in a private directory, no
TCP): used by `invoke demo` and by `invoke drill --local-server`, which proves a backup restores on
a clean server of this host's PostgreSQL version without touching the production server."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lib.errors import EnvironmentProblem, RunFailed


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    if shutil.which(name):
        return shutil.which(name)
    raise EnvironmentProblem(
        f"'{name}' not found; install the postgresql package (the server) for a throwaway local cluster"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A private PostgreSQL cluster in ``root``; as root, the server runs as the 'postgres' user."""

    superuser = "postgres"  # the role initdb creates (-U) and the tool connects as

    def __init__(
        self, root: Path, listen: str = "", initdb_args: tuple[str, ...] = (), settings: tuple[str, ...] = ()
    ) -> None:
        """``listen``: listen_addresses (default none: the socket only); ``initdb_args``: extra
        initdb flags (e.g. --wal-segsize=1 for a test source of WAL); ``settings``: server settings
        as 'name=value' (e.g. wal_level=minimal)."""
        self.root = root
        self.listen = listen
        self.initdb_args = initdb_args
        self.settings = settings
        self.data = root / "pgdata"
        self.sock = root / "sock"
        self.port = _free_port()
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            self.prefix = ["runuser", "-u", "postgres", "--"]

    def _run(self, argv: list[str]) -> None:
        proc = subprocess.run(self.prefix + argv, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RunFailed(f"{Path(argv[0]).name} failed: {proc.stderr.strip()[-300:]}")

    def start(self) -> None:
        self.sock.mkdir()
        if self.prefix:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.sock, "postgres")
            os.chmod(self.root, 0o700)
        self._run(
            [
                _pg_bin("initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
                *self.initdb_args,
            ]
        )
        options = f"-p {self.port} -k {self.sock} -c listen_addresses='{self.listen}' -c fsync=off"
        options += "".join(f" -c {setting}" for setting in self.settings)
        self._run(
            [_pg_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-w", "-l", str(self.root / "server.log"), "start"]
        )

    def stop(self) -> None:
        subprocess.run(
            self.prefix + [_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"], capture_output=True
        )

    def sql(self, sql: str, dbname: str = "postgres") -> str:
        argv = ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", str(self.sock), "-p", str(self.port)]
        proc = subprocess.run(argv + ["-U", "postgres", "-d", dbname], input=sql, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RunFailed(f"SQL on the throwaway cluster failed: {proc.stderr.strip()[-300:]}")
        return proc.stdout.strip()


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[Cluster]:
    """A started cluster in a new private directory under /tmp; stopped and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="lemon-backup-pg-", dir="/tmp"))
    cluster = Cluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
