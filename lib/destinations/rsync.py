"""rsync destinations: ``target`` is ``[user@]host:/path`` (rsync over ssh) or a plain local path
(e.g. a NAS mount). Only rsync runs on the far side, so a restricted account (rrsync) is enough.

rsync writes every file under a temporary name and renames it only when complete and its
whole-file checksum matched; an interrupted transfer is kept in ``.rsync-partial/`` and resumed by
the next attempt, never left under a final name. After the upload a second ``rsync --checksum
--dry-run`` compares size and checksum of the copy with the local file; only then is the
record uploaded. ssh always checks the host key against the configured known_hosts file.
"""

from __future__ import annotations

import functools
import posixpath
import re
import shlex
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lib import store
from lib.destinations.base import (
    LEFTOVER_RE,
    Destination,
    DestinationFailed,
    DestinationRefused,
    Listing,
    Progress,
    RemoteBackup,
    check_arrival,
    parse_record,
    remote_record,
    require_file,
)
from lib.errors import RunFailed
from lib.exec import dying_with_tool, require_binary, tail_text
from lib.stream import sha256_file

REMOTE_RE = re.compile(r"^(?P<host>[^/:]+):(?P<path>.*)$")  # rsync's rule: a colon before any slash
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
PARTIAL_DIR = ".rsync-partial"
#: rsync 3.2.3 brought --mkpath (create the destination's missing folders)
MKPATH_VERSION = (3, 2, 3)
#: failures retrying cannot fix, with the fix to name (checked before the transient ones)
PERMANENT = (
    ("No such file or directory", "check that target {root} is the right path on the server"),
    ("Not a directory", "a part of target {root} is a file on the server; fix target"),
    ("Permission denied", "the account cannot write to {root} on the server; fix its permissions"),
    ("Operation not permitted", "the account cannot write to {root} on the server; fix its permissions"),
    ("Read-only file system", "{root} is on a read-only filesystem on the server"),
    ("No space left on device", "the server's disk holding {root} is full; free space there"),
    ("Disk quota exceeded", "the account's quota on the server is used up; free space there"),
)
#: signs of transient trouble (lower case): the connection was refused, reset, closed or timed out
TRANSIENT = (
    "connection refused",
    "connection reset",
    "connection timed out",
    "timed out",
    "timeout",
    "connection closed",
    "closed by remote host",
    "connection unexpectedly closed",
    "broken pipe",
    "no route to host",
    "network is unreachable",
    "kex_exchange_identification",
)
#: rsync exit codes of transient trouble: socket I/O (10), stream cut (12), timeouts (30, 35)
TRANSIENT_CODES = (10, 12, 30, 35)


@functools.cache
def rsync_version() -> tuple[int, ...]:
    """The local rsync's version, e.g. (3, 2, 7); (0,) when it cannot be told."""
    try:
        out = subprocess.run(["rsync", "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return (0,)
    match = re.search(r"version\s+(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(part) for part in match.groups()) if match else (0,)


class RsyncDestination(Destination):
    """``type: rsync``: target, ssh {port, identity_file, known_hosts}, bwlimit."""

    type = "rsync"

    def __init__(self, block, spec) -> None:
        super().__init__(block, spec)
        target: str = block["target"]
        match = REMOTE_RE.match(target)
        ssh = block.get("ssh") or {}
        if match:
            self.host_spec: str | None = match["host"]
            self.root = match["path"].rstrip("/") or "."
            self.port = int(ssh.get("port", 22))
            self.identity: Path | None = spec.resolve(ssh["identity_file"]) if ssh.get("identity_file") else None
            self.known_hosts = spec.resolve(ssh.get("known_hosts", "~/.ssh/known_hosts"))
        else:
            self.host_spec = None
            self.root = str(spec.resolve(target))
            self.port, self.identity, self.known_hosts = 0, None, None
        self.bwlimit = block.get("bwlimit")
        self._control: tempfile.TemporaryDirectory | None = None

    # -- command building ----------------------------------------------------------------------

    @property
    def host(self) -> str:
        return (self.host_spec or "").rsplit("@", 1)[-1]

    @property
    def host_id(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def label(self) -> str:
        return f"rsync {self.block['target']}"

    def location(self, relative: str = "") -> str:
        """rsync's name for ``<root>/<relative>`` (host:path or a local path)."""
        path = posixpath.join(self.root, relative) if relative else self.root
        return f"{self.host_spec}:{path}" if self.host_spec else path

    def ssh_argv(self) -> list[str]:
        """The ssh command rsync runs: host key checked against known_hosts only, keys only, timeouts."""
        argv = ["ssh", "-p", str(self.port)]
        if self.identity is not None:
            argv += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        for option in (
            "StrictHostKeyChecking=yes",
            f"UserKnownHostsFile={self.known_hosts}",
            "GlobalKnownHostsFile=/dev/null",
            "UpdateHostKeys=no",
            "BatchMode=yes",
            "PasswordAuthentication=no",
            "KbdInteractiveAuthentication=no",
            f"ConnectTimeout={int(self.timeout)}",
            "ServerAliveInterval=15",
            "ServerAliveCountMax=3",
        ):
            argv += ["-o", option]
        if self._control is not None:  # one authenticated connection for all calls of this run
            argv += [
                "-o",
                "ControlMaster=auto",
                "-o",
                f"ControlPath={self._control.name}/%C",
                "-o",
                "ControlPersist=60",
            ]
        return argv

    def __enter__(self) -> RsyncDestination:
        if self.host_spec and self._control is None:
            self._control = tempfile.TemporaryDirectory(prefix="lemon-ssh-")
        return self

    def __exit__(self, *exc: object) -> None:
        self.reset()
        if self._control is not None:
            self._control.cleanup()
            self._control = None

    def reset(self) -> None:
        """Stop the shared ssh connection, if one runs (the next call opens a new one)."""
        if self._control is None or not any(Path(self._control.name).iterdir()):
            return
        argv = [*self.ssh_argv(), "-O", "exit", str(self.host_spec)]
        try:
            subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, timeout=30, check=False)
        except subprocess.TimeoutExpired:
            pass

    def base_argv(self) -> list[str]:
        """rsync plus the options every call shares."""
        argv = ["rsync", f"--timeout={max(int(self.timeout), 1) * 4}"]
        if self.host_spec:
            argv += ["-e", shlex.join(self.ssh_argv())]
        if self.bwlimit:
            argv.append(f"--bwlimit={int(self.bwlimit)}")
        return argv

    def preflight(self) -> None:
        """Refuse early when rsync, the key or known_hosts is missing, or a local target is absent."""
        require_binary("rsync")
        if not self.host_spec:
            if not Path(self.root).is_dir():
                raise DestinationFailed(
                    f"target directory {self.root} does not exist (is the disk mounted?); create it once to use it"
                )
            return
        require_binary("ssh")
        if self.identity is not None:
            require_file(
                self.identity,
                self.name,
                "ssh.identity_file",
                f"create a key pair (ssh-keygen -t ed25519 -N '' -f {self.identity}) and authorize its .pub on the server",
            )
        assert self.known_hosts is not None
        require_file(
            self.known_hosts,
            self.name,
            "ssh.known_hosts",
            f"add the server's host key after checking its fingerprint: {self._keyscan_fix()}",
        )

    def _keyscan_fix(self) -> str:
        return f"ssh-keyscan -p {self.port} {self.host} >> {self.known_hosts}"

    def classify(self, stderr: str, what: str, code: int) -> Exception:
        """Our error for a failed rsync/ssh. Only transient trouble (connection refused, reset or
        closed, timeouts) is a DestinationFailed, which ``retrying`` retries; refusals (host key,
        key, no such file, permission denied, read-only, disk full) are DestinationRefused and
        anything else a RunFailed: both fail at once."""
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
            return DestinationRefused(
                f"destination '{self.name}': host key of {self.host_id} CHANGED; ssh refused to connect (possible man-in-the-middle). "
                f"Only if the server was really re-keyed (confirm the new fingerprint with its admin): "
                f"ssh-keygen -R '{self.host_id}' -f {self.known_hosts} && {self._keyscan_fix()}"
            )
        if "Host key verification failed" in stderr or "host key is known" in stderr:
            return DestinationRefused(
                f"destination '{self.name}': host key of {self.host_id} is not in {self.known_hosts}; refusing to connect. "
                f"Check its fingerprint (ssh-keyscan -p {self.port} {self.host} | ssh-keygen -lf -) with the server's admin, then: {self._keyscan_fix()}"
            )
        if "Permission denied" in stderr and "publickey" in stderr:
            return DestinationRefused(
                f"destination '{self.name}': {self.host_id} refused key {self.identity} for '{self.host_spec}'; "
                f"add {self.identity}.pub to that account's authorized_keys"
            )
        if "UNPROTECTED PRIVATE KEY" in stderr or "Load key" in stderr:
            return DestinationRefused(
                f"destination '{self.name}': ssh cannot use {self.identity} ({tail_text(stderr.encode(), 200)}); chmod 600 it"
            )
        said = tail_text(stderr.encode()) or "no message"
        for pattern, fix in PERMANENT:
            if pattern in stderr:
                return DestinationRefused(
                    f"destination '{self.name}': {what} failed (not retried): {said}; {fix.format(root=self.root)}"
                )
        if code in TRANSIENT_CODES or any(pattern in stderr.lower() for pattern in TRANSIENT):
            return DestinationFailed(f"{what}: rsync exit status {code}: {said}")
        return RunFailed(f"destination '{self.name}': {what} failed (rsync exit status {code}, not retried): {said}")

    def run(self, args: list[str], what: str, missing_ok: bool = False) -> str | None:
        """Run rsync with ``args``; its stdout, or None when ``missing_ok`` and the source is missing."""
        argv = [*self.base_argv(), *args]
        try:
            # dies with this tool even by SIGKILL: no upload goes on outside the run lock
            proc = subprocess.run(dying_with_tool(argv), capture_output=True, text=True, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            require_binary("rsync")
            raise
        if proc.returncode == 0:
            return proc.stdout
        if missing_ok and proc.returncode in (12, 23) and "No such file or directory" in proc.stderr:  # 12: rrsync
            return None
        raise self.classify(proc.stderr, what, proc.returncode)

    def upload_creating_root(self, args: list[str], what: str) -> None:
        """rsync ``args`` (sources) into the root, creating the root's missing folders on a remote
        server first (as SFTP does): with --mkpath when both rsyncs know it, else ``mkdir -p``
        over ssh (the path quoted for the remote shell). A local target is never created: a
        missing one is usually an unmounted disk."""
        if not self.host_spec:
            self.run([*args, self.location() + "/"], what)
            return
        if rsync_version() >= MKPATH_VERSION:
            try:
                self.run(["--mkpath", *args, self.location() + "/"], what)
                return
            except DestinationRefused as exc:
                if "mkpath" not in str(exc):  # not an old rsync on the server refusing the option
                    raise
        self.make_root()
        self.run([*args, self.location() + "/"], what)

    def make_root(self) -> None:
        """``mkdir -p`` the root on the server over ssh (a restricted rsync-only account refuses
        it: then the root must exist)."""
        argv = [*self.ssh_argv(), str(self.host_spec), "mkdir -p -- " + shlex.quote(self.root)]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
        except subprocess.TimeoutExpired:
            raise DestinationFailed(f"creating {self.root} on {self.host}: ssh timed out") from None
        if proc.returncode != 0:
            raise self.classify(proc.stderr, f"creating {self.root}", proc.returncode)

    def _delete_in(self, relative_dir: str, names: list[str]) -> None:
        """Delete exactly ``names`` in ``<root>/<relative_dir>``: an empty directory synced with --delete,
        every other name excluded (so protected), and --max-delete as a second guard."""
        names = [n for n in names if SAFE_NAME.match(n)]
        if not names:
            return
        with tempfile.TemporaryDirectory(prefix="lemon-rsync-") as empty:
            rules = [f"--include=/{n}" for n in names] + ["--exclude=*"]
            self.run(
                [
                    "-r",
                    "--delete",
                    f"--max-delete={len(names)}",
                    *rules,
                    f"{empty}/",
                    self.location(relative_dir) + "/",
                ],
                "delete",
                missing_ok=True,
            )

    # -- the interface ---------------------------------------------------------------------------

    def push(self, backup: store.Backup, progress: Progress | None = None) -> dict[str, Any]:
        """Data and .sha256 (temp name + rename by rsync, resumable), checksum comparison, record last."""
        self.preflight()
        relative = f"{backup.name}/{backup.tier}"
        # a backup made in this run was hashed as it was written; older ones are read again
        local_sha = backup.record["sha256"] if backup.fresh else sha256_file(backup.path)
        check_arrival(backup, local_sha, backup.record.get("size", 0), None)
        base = backup.path.parent.parent.parent
        sources = [f"{base}/./{relative}/{p.name}" for p in (backup.path, backup.sha256_path)]
        started = time.monotonic()
        upload = ["-R", "-t", "--perms", "--chmod=D0700,F0600", f"--partial-dir={PARTIAL_DIR}", *sources]
        self.upload_creating_root(upload, f"upload of {backup.path.name}")
        seconds = time.monotonic() - started
        diff = self.run(
            ["--checksum", "--dry-run", "--itemize-changes", str(backup.path), self.location(relative) + "/"],
            f"checksum comparison of {backup.path.name}",
        )
        if diff and diff.strip():
            raise DestinationFailed(f"{backup.path.name}: the copy differs from the local file ({diff.strip()[:80]})")
        info = {
            "path": self.location(f"{relative}/{backup.path.name}"),
            "verified_at": store.iso(store.utcnow()),
            "size": backup.record.get("size"),
            "sha256": local_sha,
            "method": "rsync --checksum",
            "seconds": round(seconds, 3),
        }
        with tempfile.TemporaryDirectory(prefix="lemon-rsync-") as tmp:
            record = Path(tmp, relative, backup.record_path.name)
            store.ensure_dir(record.parent)
            store.write_atomic(record, remote_record(backup, self.name, info))
            self.run(
                ["-R", "--perms", "--chmod=D0700,F0600", f"{tmp}/./{relative}/{record.name}", self.location() + "/"],
                f"upload of {record.name}",
            )
        return info

    def _entries(self, name: str) -> list[tuple[str, str, int]]:
        """(kind, relative path, size) of everything under ``<root>/<name>/``; [] when it does not exist."""
        out = self.run(["-r", "--list-only", "--no-human-readable", self.location(name) + "/"], "listing", True)
        entries = []
        for line in (out or "").splitlines():
            parts = line.split(None, 4)
            if len(parts) == 5 and parts[1].isdigit():
                entries.append((parts[0][0], parts[4], int(parts[1])))
        return entries

    def list(self, name: str) -> Listing:
        """Our backups of ``name`` (file plus record of ours) and leftovers of interrupted uploads."""
        self.preflight()
        listing = Listing()
        files = {path: size for kind, path, size in self._entries(name) if kind == "-"}
        if not files:
            return listing
        with tempfile.TemporaryDirectory(prefix="lemon-rsync-") as tmp:
            rules = ["--include=/*/", "--include=/*/backup_*.json", "--exclude=*"]
            self.run(["-r", *rules, self.location(name) + "/", f"{tmp}/"], "reading records", True)
            for path, size in sorted(files.items()):
                tier, _, filename = path.partition("/")
                if tier not in store.TIERS:
                    continue
                if LEFTOVER_RE.match(filename) or (
                    filename.startswith(PARTIAL_DIR + "/") and store.is_backup_name(filename.split("/", 1)[1])
                ):
                    listing.leftovers.append(f"{name}/{path}")
                elif store.is_backup_name(filename) and f"{path}.json" in files:
                    try:
                        text = Path(tmp, path + ".json").read_bytes()
                    except OSError:
                        continue
                    record = parse_record(text, filename)
                    if record and record["name"] == name and record["tier"] == tier:
                        listing.backups.append(RemoteBackup(self.name, self.location(f"{name}/{path}"), size, record))
        listing.backups.sort(key=lambda r: (r.created, r.file), reverse=True)
        return listing

    def fetch(self, remote: RemoteBackup, local_dir: Path) -> Path:
        """Download the file and its sidecars into ``local_dir``."""
        self.preflight()
        rules = [f"--include=/{remote.file}{s}" for s in ("", ".sha256", ".json")] + ["--exclude=*"]
        self.run(
            ["-r", "-t", "--chmod=F0600", *rules, self.location(f"{remote.name}/{remote.tier}") + "/", f"{local_dir}/"],
            f"download of {remote.file}",
        )
        path = local_dir / remote.file
        if not path.is_file():
            raise DestinationRefused(f"download of {remote.file}: the file is gone from {self.label()}")
        return path

    def delete(self, remote: RemoteBackup) -> None:
        """Delete the file, then .sha256, then the record (separate calls, so the record goes last)."""
        self.preflight()
        relative = f"{remote.name}/{remote.tier}"
        self._delete_in(relative, [remote.file, remote.file + ".sha256"])
        self._delete_in(relative, [remote.file + ".json"])

    # -- plain files under <root>/<relative> (the WAL archive and base backups, lib/wal.py) ------

    def put_files(self, base: Path, relative: str, names: list[str]) -> None:
        """Upload ``base/relative/<name>`` for each name to ``<root>/relative/`` (rsync writes each
        under a temporary name and renames it), then compare checksums. Raises DestinationFailed."""
        self.preflight()
        sources = [f"{base}/./{relative}/{name}" for name in names]
        upload = ["-R", "-t", "--perms", "--chmod=D0700,F0600", f"--partial-dir={PARTIAL_DIR}", *sources]
        self.upload_creating_root(upload, f"upload of {len(names)} file(s) to {relative}")
        local = [str(base / relative / name) for name in names]
        diff = self.run(
            ["--checksum", "--dry-run", "--itemize-changes", *local, self.location(relative) + "/"],
            f"checksum comparison in {relative}",
        )
        if diff and diff.strip():
            raise DestinationFailed(f"{relative}: a copy differs from the local file ({diff.strip()[:80]})")

    def list_files(self, relative: str) -> dict[str, int]:
        """Plain files directly in ``<root>/relative/`` with their sizes ({} when it does not exist)."""
        self.preflight()
        out = self.run(["--list-only", "--no-human-readable", self.location(relative) + "/"], "listing", True)
        files = {}
        for line in (out or "").splitlines():
            parts = line.split(None, 4)
            if len(parts) == 5 and parts[0].startswith("-") and parts[1].isdigit():
                files[parts[4]] = int(parts[1])
        return files

    def get_files(self, relative: str, local_dir: Path) -> None:
        """Download every file of ``<root>/relative/`` into ``local_dir``."""
        self.preflight()
        self.run(
            ["-r", "-t", "--chmod=F0600", self.location(relative) + "/", f"{local_dir}/"], f"download of {relative}"
        )

    def delete_files(self, relative: str, names: list[str]) -> None:
        self.preflight()
        if names:
            self._delete_in(relative, names)

    def remove_leftovers(self, paths: Iterable[str]) -> None:
        self.preflight()
        by_dir: dict[str, list[str]] = {}
        for path in paths:
            by_dir.setdefault(posixpath.dirname(path), []).append(posixpath.basename(path))
        for directory, names in by_dir.items():
            self._delete_in(directory, names)
