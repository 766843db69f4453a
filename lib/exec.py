"""Where commands run: on this host, or inside a Docker container via ``docker exec``.

Commands are argument lists. Secrets travel only in the child's environment: in container mode
``docker exec -e NAME`` (no value) copies NAME from the docker client's environment, so no
secret ever appears in any argv.

Every child process starts from ``child_env()``: this process's environment minus the variables
backup.yml names as holding secrets (each database's ``password_env``, ``encryption.passphrase_env``;
registered by ``protect_secrets`` when the config is loaded). A child that needs a secret gets it
under the name it expects (``PGPASSWORD``, ``LEMON_MONGO_CONFIG``) through ``Place.secrets``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from lib.errors import EnvironmentProblem, StageFailed

# Which Debian package provides a binary, for "missing binary" messages.
PACKAGES = {
    "pg_dump": "postgresql-client",
    "pg_restore": "postgresql-client",
    "psql": "postgresql-client",
    "gzip": "gzip",
    "pigz": "pigz",
    "zstd": "zstd",
    "gpg": "gnupg",
    "rsync": "rsync",
    "ssh": "openssh-client",
    "sha256sum": "coreutils",
    "tail": "coreutils",
    "awk": "mawk",
    "docker": "docker.io (or docker-ce-cli)",
    "mongodump": "mongodb-database-tools",
    "mongorestore": "mongodb-database-tools",
    "mongosh": "mongodb-mongosh",
    "crontab": "cron",
}


# Names of environment variables that hold secrets (values are never kept here).
_SECRET_NAMES: set[str] = set()


def protect_secrets(names: Iterable[str]) -> None:
    """Keep the variables ``names`` away from every child process: remember them for
    ``child_env`` and remove them from this process's environment (so even a child started
    without ``child_env``, e.g. by a library, cannot inherit them). Their values must already
    have been read (``Spec.env`` keeps them)."""
    for name in names:
        if name:
            _SECRET_NAMES.add(name)
            os.environ.pop(name, None)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process: ours without the protected secret variables, plus
    ``extra`` (which may deliberately carry a secret under the name the child needs)."""
    env = {key: value for key, value in os.environ.items() if key not in _SECRET_NAMES}
    if extra:
        env.update(extra)
    return env


def dying_with_tool(argv: Sequence[str]) -> list[str]:
    """``argv`` started through ``setpriv --pdeathsig KILL`` (util-linux) where it exists: the
    kernel then sends the child SIGKILL when the thread that started it ends, even when this
    process is killed by SIGKILL (PR_SET_PDEATHSIG survives the exec into the real program).
    A parent killed within the first milliseconds of a child's start (before setpriv set the
    signal) is not covered. Unchanged where setpriv is missing (children are then only stopped by the cleanup of a clean
    exit or a signal the tool handles).

    Not a ``preexec_fn``: Python code between fork and exec is unsafe in a process with threads
    (the restore starts children from several), and a lock left taken there turned up as
    ``RuntimeError: release unlocked lock``. The thread that starts the child must wait for it
    (as every caller in lib/ does): the signal follows the thread. A child's own children are not
    covered: tools that fork workers (pg_restore --jobs) end them when their input or connection
    goes away. Callers check that argv[0] exists first (setpriv would only exit 127)."""
    global _setpriv
    if _setpriv is None:
        _setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else ""
    return [_setpriv, "--pdeathsig", "KILL", "--", *argv] if _setpriv else list(argv)


_setpriv: str | None = None


def require_binary(name: str) -> str:
    """Absolute path of ``name`` on PATH. Raises EnvironmentProblem naming the package to install."""
    found = shutil.which(name)
    if not found:
        package = PACKAGES.get(name, name)
        raise EnvironmentProblem(f"'{name}' is not installed or not on PATH; install the {package} package")
    return found


def tail_text(data: bytes, limit: int = 600) -> str:
    """The last meaningful stderr line(s) of a process as one short line."""
    text = data.decode("utf-8", "replace").strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    joined = " | ".join(lines[-3:])
    return joined[-limit:]


@dataclass(frozen=True)
class Place:
    """Where a database's tools run. ``container`` None means this host."""

    container: str | None = None
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return f"container {self.container}" if self.container else "this host"

    def argv(self, command: Sequence[str], interactive: bool = True) -> list[str]:
        """The argv that runs ``command`` here. Secret names (never values) go to docker exec -e."""
        if not self.container:
            return list(command)
        prefix = ["docker", "exec"]
        if interactive:
            prefix.append("-i")
        for name in sorted(self.secrets):
            prefix += ["-e", name]
        return prefix + [self.container] + list(command)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for the child process: ``child_env()`` (ours without any configured secret
        variable), plus this place's secrets under the names the tools need, plus ``extra``."""
        env = child_env(self.secrets)
        if extra:
            env.update(extra)
        return env

    def check(self, binaries: Sequence[str] = ()) -> None:
        """Preflight: host binaries exist, or the container is running. Raises EnvironmentProblem."""
        if not self.container:
            for name in binaries:
                require_binary(name)
            return
        docker = require_binary("docker")
        try:
            proc = subprocess.run(
                dying_with_tool([docker, "inspect", "--format", "{{.State.Running}}", self.container]),
                capture_output=True,
                timeout=30,
                env=child_env(),
            )
        except subprocess.TimeoutExpired:
            raise EnvironmentProblem("docker inspect timed out; is the Docker daemon responsive?") from None
        if proc.returncode != 0 or proc.stdout.strip() != b"true":
            why = tail_text(proc.stderr) or "not running"
            raise EnvironmentProblem(
                f"container '{self.container}' is not running ({why}); start it (docker start "
                f"{self.container}) or set the container name in backup.yml or its environment variable"
            )

    def run(
        self, command: Sequence[str], stage: str, input: bytes | None = None, timeout: float | None = None
    ) -> bytes:
        """Run a short command here, return its stdout. Raises StageFailed with stderr on failure."""
        argv = self.argv(command, interactive=input is not None)
        require_binary(argv[0])
        try:
            proc = subprocess.run(
                dying_with_tool(argv),
                input=input,
                capture_output=True,
                env=self.env(),
                timeout=timeout,
                stdin=None if input is not None else subprocess.DEVNULL,
            )
        except FileNotFoundError:
            require_binary(argv[0])
            raise
        except subprocess.TimeoutExpired:
            raise StageFailed(stage, f"timed out after {timeout:.0f}s") from None
        if proc.returncode != 0:
            raise StageFailed(stage, f"exit status {proc.returncode}", tail_text(proc.stderr))
        return proc.stdout
