"""What every destination type offers: push, list, fetch, delete, plus retries with backoff.

A destination holds copies laid out like the local store: ``<root>/<name>/<tier>/backup_...`` with
the ``.sha256`` and ``.json`` sidecars. A copy counts as ours only when its ``.json`` record is
there; the record is uploaded last, after the data was verified and moved to its final name, so
a record on the remote means "complete and verified". Files without a record are never deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from lib import store
from lib.config import Spec
from lib.errors import EnvironmentProblem, RunFailed, VerificationFailed
from lib.stream import sha256_file

log = logging.getLogger("backup")
T = TypeVar("T")
Progress = Callable[[int], None]
HASH_CHUNK = 1 << 20
# Our own temporary names: ".tmp-backup_..." (SFTP) and rsync's ".backup_....XXXXXX".
LEFTOVER_RE = re.compile(r"^(\.tmp-backup_\d{8}_\d{6}\..+|\.backup_\d{8}_\d{6}\..+\.[A-Za-z0-9]{6})$")


class DestinationFailed(RunFailed):
    """A transfer failed in a way that may pass (network, remote disk): retried, then exit 1."""


class DestinationRefused(EnvironmentProblem):
    """A problem retrying cannot fix (host key, key refused, missing file): not retried, exit 2."""


class DeleteDeclined(Exception):
    """Remote retention did not delete a copy, for a reason that is not a failure (the message says
    why). Not retried; the copy is listed again next time."""


class StillLocked(DeleteDeclined):
    """The server refused to delete a copy because it is still locked (e.g. S3 Object Lock): info."""


@dataclass
class RemoteBackup:
    """A backup held by a destination: where it is, its size there and the record stored with it."""

    destination: str
    path: str
    size: int
    record: dict[str, Any]
    #: why the copy on the server is not what its record describes (changed, wrong size), or None
    damage: str | None = None

    @property
    def file(self) -> str:
        return self.record["file"]

    @property
    def name(self) -> str:
        return self.record["name"]

    @property
    def tier(self) -> str:
        return self.record["tier"]

    @property
    def created(self) -> datetime:
        return store.parse_iso(self.record["created"])

    @property
    def verified(self) -> bool:
        """Verified when made, and its copy verified on arrival (the record says so)."""
        arrived = any(
            isinstance(v, dict) and v.get("verified_at") for v in self.record.get("destinations", {}).values()
        )
        return bool(self.record.get("verified", {}).get("ok")) and arrived and self.damage is None

    @property
    def key(self) -> tuple[str, str]:
        return (self.tier, self.file)


@dataclass
class Listing:
    """What a destination holds for one database: our backups and our leftover temporary files."""

    backups: list[RemoteBackup] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)


def parse_record(text: bytes | str, filename: str) -> dict[str, Any] | None:
    """A remote ``<file>.json`` as a record of ours, or None when it is not one."""
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if store.validate_record(record, filename) is not None or record["tier"] not in store.TIERS:
        return None  # also wrong types, huge numbers, a safety copy's record
    return record


def remote_record(backup: store.Backup, destination: str, info: Mapping[str, Any]) -> bytes:
    """The record stored next to a remote copy: the local record, with only this copy's arrival info."""
    record = dict(backup.record)
    record["destinations"] = {destination: dict(info)}
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


class HashingReader:
    """File wrapper that hashes and counts what is read (so the local file is read once per upload)."""

    def __init__(self, fileobj, progress: Progress | None = None) -> None:
        self.fileobj = fileobj
        self.hash = hashlib.sha256()
        self.size = 0
        self.progress = progress

    def read(self, size: int = -1) -> bytes:
        data = self.fileobj.read(size)
        self.hash.update(data)
        self.size += len(data)
        if self.progress and data:
            self.progress(self.size)
        return data


def check_arrival(backup: store.Backup, local_sha256: str, remote_size: int, remote_sha256: str | None) -> None:
    """Compare what was sent and what arrived with the record. Raises VerificationFailed."""
    expected = backup.record.get("sha256")
    if expected and local_sha256 != expected:
        raise VerificationFailed(
            f"{backup.path.name}: the local file no longer matches its record (sha256); run invoke verify"
        )
    if remote_size != backup.record.get("size", remote_size):
        raise DestinationFailed(f"{backup.path.name}: {remote_size} bytes arrived, expected {backup.record['size']}")
    if remote_sha256 is not None and remote_sha256 != local_sha256:
        raise DestinationFailed(f"{backup.path.name}: the copy's sha256 differs from the local file")


class Destination(ABC):
    """One configured destination. Methods make a single attempt; ``retrying`` adds the retries.

    Use as a context manager so connections are closed; ``reset()`` drops a broken connection.
    """

    type: str = ""

    def __init__(self, block: Mapping[str, Any], spec: Spec) -> None:
        self.block = block
        self.spec = spec
        self.name: str = block["name"]
        self.retries: int = int(block.get("retries", 3))
        self.backoff: float = float(block.get("backoff_seconds", 10))
        self.timeout: float = float(block.get("timeout", 30))

    def __enter__(self) -> Destination:
        return self

    def __exit__(self, *exc: object) -> None:
        self.reset()

    def reset(self) -> None:  # noqa: B027 - optional hook; connectionless types need nothing
        """Drop any open connection (after a failure, or at the end)."""

    def retention(self, base: Mapping[str, int]) -> dict[str, int]:
        """keep_days per tier here: the database's local rules, overridden by this destination's."""
        result = dict(base)
        for tier, keep in (self.block.get("retention") or {}).items():
            result[tier] = keep["keep_days"]
        return result

    def label(self) -> str:
        """Where this destination is, for messages."""
        return self.name

    @abstractmethod
    def push(self, backup: store.Backup, progress: Progress | None = None) -> dict[str, Any]:
        """Copy ``backup`` with its sidecars; verify size and checksum before its final name; upload
        the record last. Returns the arrival info recorded under ``record['destinations'][name]``."""

    @abstractmethod
    def list(self, name: str) -> Listing:
        """Our backups of database ``name`` held here, and leftovers of interrupted uploads."""

    @abstractmethod
    def fetch(self, remote: RemoteBackup, local_dir: Path) -> Path:
        """Download ``remote`` and its sidecars into ``local_dir``; returns the local data file path."""

    @abstractmethod
    def delete(self, remote: RemoteBackup) -> None:
        """Delete a remote backup and its sidecars (data first, record last)."""

    def check(self) -> tuple[list[str], list[str]]:
        """What ``invoke dest-check`` prints and the problems found: (lines, problems). This default
        lists each configured database; types with more to check (credentials, locks) override it."""
        lines, problems = [f"{self.name} ({self.label()})"], []
        for name in self.spec.databases:
            try:
                listing = self.list(name)  # once: a check reports, it does not wait out retries
            except (DestinationFailed, DestinationRefused) as exc:
                problems.append(str(exc))
                lines.append(f"  listing: FAILED: {exc}")
                break
            lines.append(f"  {name}: {len(listing.backups)} backup(s) listed")
        return lines, problems

    @abstractmethod
    def remove_leftovers(self, paths: Iterable[str]) -> None:
        """Delete leftovers of interrupted uploads (paths as given by ``list``)."""


def retrying(dest: Destination, action: Callable[[], T], what: str, sleep: Callable[[float], None] = time.sleep) -> T:
    """Run ``action``; on DestinationFailed retry up to ``dest.retries`` times, waiting
    ``backoff * 2**n`` seconds and reconnecting in between. Other errors are raised at once."""
    attempt = 0
    while True:
        try:
            return action()
        except DestinationFailed as exc:
            dest.reset()
            if attempt >= dest.retries:
                raise DestinationFailed(
                    f"{dest.name}: {what} failed after {attempt + 1} attempt(s): {exc}; "
                    f"the next backup or invoke offsite catches up"
                ) from None
            wait = dest.backoff * (2**attempt)
            attempt += 1
            log.warning(
                "%s: %s failed (%s); retry %d of %d in %.0fs", dest.name, what, exc, attempt, dest.retries, wait
            )
            sleep(wait)


def require_file(path: Path, dest: str, key: str, fix: str) -> Path:
    """``path`` when it is a readable file, else DestinationRefused naming the key and the fix."""
    if not path.is_file():
        raise DestinationRefused(f"destination '{dest}': {key} {path} not found; {fix}")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise DestinationRefused(f"destination '{dest}': cannot read {key} {path} ({exc.strerror})") from None
    return path


def check_fetched(remote: RemoteBackup, path: Path) -> str:
    """Check a downloaded file against the size and sha256 its record and sidecar promise. Returns the sha256."""
    actual = sha256_file(path)
    sidecar = store.sha256_path(path)
    expected = {remote.record.get("sha256")}
    if sidecar.exists():
        expected.add((sidecar.read_text().split() or [""])[0])
    expected.discard(None)
    if path.stat().st_size != remote.record.get("size") or expected != {actual}:
        raise VerificationFailed(
            f"{remote.file} from '{remote.destination}' does not match its record and .sha256; "
            f"the remote copy is damaged; restore from another destination or another backup"
        )
    return actual
