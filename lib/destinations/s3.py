"""S3 destinations (AWS S3, MinIO and other S3-compatible services) through boto3.

Copies are laid out like on the other destinations: ``<prefix>/<name>/<tier>/backup_...`` with the
``.sha256`` and ``.json`` sidecars as separate objects.

An upload is always a multipart upload (parts of ``part_size``; at most ``concurrency`` parts in
flight, so memory stays bounded whatever the file's size). Each part's SHA256 is computed here and
sent with it (the server refuses a part whose bytes do not match); the completed object's size and
composite checksum (HeadObject with checksum mode) are compared with ours. Nothing is visible under
the final key until CompleteMultipartUpload; a failed or interrupted upload is aborted, and the
next run aborts what an upload that could not be aborted left behind. An existing object is never
overwritten: HeadObject first, then If-None-Match: * on the completion. Our sha256 goes into the
object's metadata and into the record. The sidecars follow, the record last.

With ``object_lock`` each object gets an Object Lock retention until its tier's keep_days (or
``object_lock.days``) after the backup was made. Deleting a version the server refuses to delete
because it is locked is "still locked" (info), and an object whose metadata does not name the
backup's sha256 (not written by this tool) is never deleted.

The client (credentials, endpoint, checksum policy, error mapping) lives in lib/s3client.py, for
every S3 user. boto3 is imported only when a destination of this type is configured (the registry
imports this module lazily). Credentials: ``access_key_env``/``secret_key_env`` naming environment
variables, or boto3's standard chain (environment, shared credentials file and ``profile``,
instance or container metadata). Their values never reach argv, logs, error text or records.
"""

from __future__ import annotations

import base64
import hashlib
import posixpath
import secrets
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import suppress
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import botocore.exceptions as bx

from lib import store
from lib.destinations.base import (
    DeleteDeclined,
    Destination,
    DestinationFailed,
    DestinationRefused,
    HashingReader,
    Listing,
    Progress,
    RemoteBackup,
    StillLocked,
    check_arrival,
    parse_record,
    remote_record,
)
from lib.errors import VerificationFailed
from lib.s3client import TOOL, S3Connection, error_code, real_version
from lib.stream import sha256_file

MIB = 1 << 20
CHUNK = 1 << 20
RECORD_LIMIT = 1 << 20
#: metadata on every object we write (x-amz-meta-*): who wrote it and the backup's sha256
META_TOOL, META_SHA = "written-by", "sha256"
UPLOAD_SEP = "?uploadId="
LOCK_FIX = (
    "create the bucket with Object Lock (aws s3api create-bucket --bucket {bucket} --object-lock-enabled-for-bucket; "
    "MinIO: mc mb --with-lock ALIAS/{bucket}) or enable it on the versioned bucket "
    "(aws s3api put-object-lock-configuration --bucket {bucket} --object-lock-configuration ObjectLockEnabled=Enabled)"
)


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def composite_sha256(part_digests: list[bytes]) -> str:
    """S3's checksum of a multipart object: base64 sha256 of the parts' binary sha256 digests."""
    return b64(hashlib.sha256(b"".join(part_digests)).digest())


class S3Destination(Destination):
    """``type: s3``: bucket, prefix, endpoint_url, region, addressing, storage_class, credentials, object_lock."""

    type = "s3"

    def __init__(self, block, spec) -> None:
        super().__init__(block, spec)
        self.bucket: str = block["bucket"]
        self.prefix: str = (block.get("prefix") or "").strip("/")
        self.endpoint_url: str | None = block.get("endpoint_url")
        self.storage_class: str = block.get("storage_class", "STANDARD")
        self.sse: dict[str, Any] = dict(block.get("server_side_encryption") or {})
        self.part_size: int = int(block.get("part_size_mib", 16)) * MIB
        self.concurrency: int = int(block.get("concurrency", 4))
        self.conditional_put: bool = bool(block.get("conditional_put", True))
        self.object_lock: dict[str, Any] | None = block.get("object_lock")
        self.conn = S3Connection(
            block,
            spec,
            f"destination '{self.name}'",
            DestinationFailed,
            DestinationRefused,
            timeout=self.timeout,
            pool_size=self.concurrency + 2,
        )
        self._lock_checked = False

    # -- connection ---------------------------------------------------------------------------

    def label(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{'/' if self.prefix else ''}{where}"

    def client(self) -> Any:
        """The S3 client, created on first use (lib/s3client.py)."""
        return self.conn.client()

    def reset(self) -> None:
        self.conn.reset()

    def _mapped(self, what: str):
        """botocore errors as DestinationFailed (transient) or DestinationRefused, one line each."""
        return self.conn.mapped(what, passthrough=(StillLocked, DeleteDeclined))

    # -- helpers -------------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return posixpath.join(self.prefix, *parts) if self.prefix else posixpath.join(*parts)

    def _head(self, key: str, version: str | None = None, checksum: bool = False) -> dict[str, Any] | None:
        """HeadObject (of ``version`` when given), or None when there is no such object."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if real_version(version):
            kwargs["VersionId"] = version
        if checksum:
            kwargs["ChecksumMode"] = "ENABLED"
        try:
            return self.client().head_object(**kwargs)
        except bx.ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise

    def _write_args(self, retain: datetime | None) -> dict[str, Any]:
        """Storage class, encryption and lock arguments of a put or multipart upload."""
        args: dict[str, Any] = {"StorageClass": self.storage_class}
        if self.sse:
            args["ServerSideEncryption"] = self.sse["algorithm"]
            if self.sse.get("kms_key_id"):
                args["SSEKMSKeyId"] = self.sse["kms_key_id"]
        if retain is not None and self.object_lock:
            args["ObjectLockMode"] = self.object_lock["mode"].upper()
            args["ObjectLockRetainUntilDate"] = retain
        return args

    def retain_until(self, backup_name: str, tier: str, created: datetime) -> datetime | None:
        """When the lock on a copy ends: created + object_lock.days (or the tier's keep_days here);
        None without object_lock or when that moment has passed already."""
        if not self.object_lock:
            return None
        days = self.object_lock.get("days")
        if days is None:
            db = self.spec.databases.get(backup_name)
            base = db.retention if db is not None else self.spec.retention
            days = self.retention(dict(base)).get(tier, 0)
        until = created + timedelta(days=int(days))
        return until if until > store.utcnow() + timedelta(minutes=1) else None

    def check_lock_configuration(self) -> None:
        """With object_lock: the bucket must have Object Lock enabled. Raises DestinationRefused."""
        if not self.object_lock or self._lock_checked:
            return
        try:
            config = self.client().get_object_lock_configuration(Bucket=self.bucket)
            enabled = config.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"
        except bx.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ObjectLockConfigurationNotFoundError":
                raise
            enabled = False
        if not enabled:
            raise DestinationRefused(
                f"destination '{self.name}': object_lock is set but bucket '{self.bucket}' has no Object Lock; "
                + LOCK_FIX.format(bucket=self.bucket)
            )
        self._lock_checked = True

    def _put_small(
        self, key: str, data: bytes, retain: datetime | None, sha256: str, same_ok: bool = False
    ) -> str | None:
        """Put a sidecar (never over an object that is not ours). Returns its version id."""
        client = self.client()
        args = self._write_args(retain)
        args["Metadata"] = {META_TOOL: TOOL, META_SHA: sha256}
        existing = self._head(key)
        if existing is not None:
            if (
                existing.get("Metadata", {}).get(META_TOOL) != TOOL
                or existing.get("Metadata", {}).get(META_SHA) != sha256
            ):
                raise DestinationRefused(
                    f"destination '{self.name}': {key} already exists and was not written for this backup; "
                    f"not overwriting it; move it away or use another prefix"
                )
            if same_ok and existing.get("ContentLength") == len(data):
                return existing.get("VersionId")
            self._delete_version(key, existing.get("VersionId"))  # our own earlier sidecar
        kwargs: dict[str, Any] = {}
        if self.conditional_put:
            kwargs["IfNoneMatch"] = "*"
        response = client.put_object(
            Bucket=self.bucket,
            Key=key,
            Body=data,
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=b64(hashlib.sha256(data).digest()),
            **args,
            **kwargs,
        )
        return response.get("VersionId")

    def _delete_version(self, key: str, version: str | None) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if real_version(version):
            kwargs["VersionId"] = version
        self.client().delete_object(**kwargs)

    def _abort(self, key: str, upload_id: str) -> None:
        """Abort a multipart upload; best effort (the next run aborts what is left)."""
        with suppress(Exception):  # the server may be gone; the next run's listing finds it
            self.client().abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)

    def _upload_part(self, key: str, upload_id: str, number: int, data: bytes, digest: bytes) -> dict[str, Any]:
        checksum = b64(digest)
        response = self.client().upload_part(
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=data,
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=checksum,
        )
        returned = response.get("ChecksumSHA256")
        if returned and returned != checksum:
            raise DestinationFailed(
                f"part {number} of {posixpath.basename(key)}: the server's checksum differs from ours"
            )
        return {"PartNumber": number, "ETag": response["ETag"], "ChecksumSHA256": checksum}

    def _multipart(
        self, source: Path, key: str, expected_sha256: str, retain: datetime | None, progress: Progress | None
    ) -> tuple[HashingReader, dict[str, Any], str, int]:
        """Upload ``source`` to ``key`` in parts; returns (reader, CompleteMultipartUpload response,
        our composite checksum, number of parts). Aborts the upload on any failure or interrupt."""
        client = self.client()
        args = self._write_args(retain)
        args["Metadata"] = {META_TOOL: TOOL, META_SHA: expected_sha256}
        upload_id = client.create_multipart_upload(
            Bucket=self.bucket, Key=key, ChecksumAlgorithm="SHA256", ContentType="application/octet-stream", **args
        )["UploadId"]
        try:
            parts: list[dict[str, Any]] = []
            digests: dict[int, bytes] = {}
            with open(source, "rb") as handle:
                reader = HashingReader(handle, progress)
                pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="s3-part")
                try:
                    pending: set[Future] = set()
                    number = 0
                    while True:
                        data = reader.read(self.part_size)
                        if not data and number:
                            break
                        number += 1
                        digests[number] = hashlib.sha256(data).digest()
                        pending.add(pool.submit(self._upload_part, key, upload_id, number, data, digests[number]))
                        last = len(data) < self.part_size  # a short read: the end of the file
                        del data
                        if len(pending) >= self.concurrency:  # bounded: at most this many parts in memory
                            done, pending = wait(pending, return_when=FIRST_COMPLETED)
                            parts.extend(f.result() for f in done)
                        if last:
                            break
                    parts.extend(f.result() for f in pending)
                finally:
                    pool.shutdown(wait=True, cancel_futures=True)
            parts.sort(key=lambda p: p["PartNumber"])
            kwargs: dict[str, Any] = {"IfNoneMatch": "*"} if self.conditional_put else {}
            try:
                done_response = client.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}, **kwargs
                )
            except bx.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "PreconditionFailed":
                    raise DestinationRefused(
                        f"destination '{self.name}': {key} appeared on the server during the upload; not overwriting it"
                    ) from None
                raise
        except BaseException:
            self._abort(key, upload_id)
            raise
        return reader, done_response, composite_sha256([digests[n] for n in sorted(digests)]), len(parts)

    def _reread_sha256(self, key: str, version: str | None) -> str:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if real_version(version):
            kwargs["VersionId"] = version
        body = self.client().get_object(**kwargs)["Body"]
        digest = hashlib.sha256()
        try:
            while chunk := body.read(CHUNK):
                digest.update(chunk)
        finally:
            body.close()
        return digest.hexdigest()

    def _ensure_lock(self, key: str, version: str | None, head: dict[str, Any], retain: datetime | None) -> None:
        """Servers that ignore the lock headers of a multipart upload get PutObjectRetention after it."""
        if retain is None or not self.object_lock or head.get("ObjectLockRetainUntilDate"):
            return
        kwargs: dict[str, Any] = {"VersionId": version} if real_version(version) else {}
        self.client().put_object_retention(
            Bucket=self.bucket,
            Key=key,
            Retention={"Mode": self.object_lock["mode"].upper(), "RetainUntilDate": retain},
            **kwargs,
        )

    # -- the interface -------------------------------------------------------------------------

    def push(self, backup: store.Backup, progress: Progress | None = None) -> dict[str, Any]:
        """Multipart upload with our part checksums, compare size + checksum of what arrived; sidecars; record last."""
        name = backup.path.name
        with self._mapped(f"upload of {name}"):
            self.client()
            self.check_lock_configuration()
            key = self._key(backup.name, backup.tier, name)
            expected = backup.record.get("sha256") or ""
            retain = self.retain_until(backup.name, backup.tier, backup.created)
            started = time.monotonic()
            existing = self._head(key)
            if existing is not None:
                # An earlier run stored the object but not its record: keep it if it is this backup.
                meta = existing.get("Metadata", {})
                if meta.get(META_TOOL) != TOOL or meta.get(META_SHA) != expected:
                    raise DestinationRefused(
                        f"destination '{self.name}': {key} already exists and is not this backup; "
                        f"not overwriting it; move it away or use another prefix"
                    )
                version = real_version(existing.get("VersionId"))
                local = HashingReader(open(backup.path, "rb"))  # noqa: SIM115 - closed below
                try:
                    while local.read(CHUNK):
                        pass
                finally:
                    local.fileobj.close()
                digest = self._reread_sha256(key, version)
                check_arrival(backup, local.hash.hexdigest(), existing.get("ContentLength", -1), digest)
                head, checksum, parts, method = existing, existing.get("ChecksumSHA256"), None, "re-read"
            else:
                reader, done, ours, parts = self._multipart(backup.path, key, expected, retain, progress)
                version = real_version(done.get("VersionId"))
                head = self._head(key, version, checksum=True) or {}
                size = int(head.get("ContentLength", -1))
                try:
                    check_arrival(backup, reader.hash.hexdigest(), size, None)
                    checksum = head.get("ChecksumSHA256")
                    if checksum:
                        if checksum.split("-")[0] != ours:
                            raise DestinationFailed(f"{name}: the stored object's checksum differs from the parts sent")
                        digest, method = reader.hash.hexdigest(), "S3 SHA256 part checksums"
                    else:  # a server without checksums: read it back
                        digest, method = self._reread_sha256(key, version), "re-read"
                    check_arrival(backup, reader.hash.hexdigest(), size, digest)
                except (DestinationFailed, VerificationFailed):
                    with suppress(bx.BotoCoreError, bx.ClientError):  # we just wrote it: not a copy to keep
                        self._delete_version(key, version)
                    raise
                self._ensure_lock(key, version, head, retain)
            seconds = time.monotonic() - started
            info: dict[str, Any] = {
                "path": key,
                "bucket": self.bucket,
                "verified_at": store.iso(store.utcnow()),
                "size": int(head.get("ContentLength", 0)),
                "sha256": digest,
                "method": method,
                "seconds": round(seconds, 3),
                "etag": head.get("ETag"),
                "storage_class": self.storage_class,
            }
            if checksum:
                info["checksum_sha256"] = checksum
            if parts:
                info["parts"] = parts
            if version:
                info["version_id"] = version
            if retain is not None:
                info["locked_until"] = store.iso(retain)
                info["lock_mode"] = self.object_lock["mode"] if self.object_lock else None
            self._put_small(key + ".sha256", store.sha256_line(digest, name).encode(), retain, digest, same_ok=True)
            self._put_small(key + ".json", remote_record(backup, self.name, info), retain, digest)
            return info

    # -- plain files under <prefix>/<relative> (the WAL archive and base backups, lib/wal.py) ---

    def put_files(self, base: Path, relative: str, names: list[str]) -> None:
        """Upload each ``base/relative/<name>`` to ``<prefix>/relative/<name>`` with our SHA256
        checksums (multipart above the part size) and compare what arrived. An object already there
        is replaced only when we wrote it (the partial segment and the coverage note change in
        place); never a foreign one. No Object Lock on these: retention deletes old WAL."""
        with self._mapped(f"upload to {relative}"):
            client = self.client()
            for name in names:
                source = base / relative / name
                key = self._key(relative, name)
                local_sha = sha256_file(source)
                existing = self._head(key)
                if existing is not None:
                    meta = existing.get("Metadata", {})
                    if meta.get(META_TOOL) != TOOL:
                        raise DestinationRefused(
                            f"destination '{self.name}': {key} already exists and was not written by this tool; "
                            "not overwriting it; move it away or use another prefix"
                        )
                    if meta.get(META_SHA) == local_sha and existing.get("ContentLength") == source.stat().st_size:
                        continue
                    self._delete_version(key, existing.get("VersionId"))
                if source.stat().st_size > self.part_size:
                    reader, done, ours, _ = self._multipart(source, key, local_sha, None, None)
                    head = self._head(key, real_version(done.get("VersionId")), checksum=True) or {}
                    checksum = (head.get("ChecksumSHA256") or "").split("-")[0]
                    if checksum and checksum != ours or reader.hash.hexdigest() != local_sha:
                        raise DestinationFailed(f"{name}: the stored object's checksum differs from the parts sent")
                else:
                    data = source.read_bytes()
                    args = self._write_args(None)
                    args["Metadata"] = {META_TOOL: TOOL, META_SHA: local_sha}
                    client.put_object(
                        Bucket=self.bucket,
                        Key=key,
                        Body=data,
                        ChecksumAlgorithm="SHA256",
                        ChecksumSHA256=b64(hashlib.sha256(data).digest()),
                        **args,
                    )
                    head = self._head(key) or {}
                if int(head.get("ContentLength", -1)) != source.stat().st_size:
                    raise DestinationFailed(
                        f"{name}: {head.get('ContentLength')} bytes arrived, expected {source.stat().st_size}"
                    )

    def list_files(self, relative: str) -> dict[str, int]:
        """Objects directly under ``<prefix>/relative/`` with their sizes."""
        with self._mapped("listing"):
            prefix = self._key(relative) + "/"
            return {
                key[len(prefix) :]: int(item.get("Size", 0))
                for key, item in self._list_objects(prefix).items()
                if "/" not in key[len(prefix) :]
            }

    def get_files(self, relative: str, local_dir: Path) -> None:
        """Download every object directly under ``<prefix>/relative/`` into ``local_dir``."""
        names = self.list_files(relative)
        with self._mapped(f"download of {relative}"):
            for name in names:
                body = self.client().get_object(Bucket=self.bucket, Key=self._key(relative, name))["Body"]
                try:
                    with open(local_dir / name, "wb") as handle:
                        while chunk := body.read(CHUNK):
                            handle.write(chunk)
                finally:
                    body.close()

    def delete_files(self, relative: str, names: list[str]) -> None:
        with self._mapped(f"deleting in {relative}"):
            for name in names:
                self._delete_version(self._key(relative, name), None)

    def _list_objects(self, prefix: str) -> dict[str, dict[str, Any]]:
        objects: dict[str, dict[str, Any]] = {}
        paginator = self.client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                objects[item["Key"]] = item
        return objects

    def _get_record(self, key: str) -> bytes:
        body = self.client().get_object(Bucket=self.bucket, Key=key, Range=f"bytes=0-{RECORD_LIMIT - 1}")["Body"]
        try:
            return body.read(RECORD_LIMIT)
        finally:
            body.close()

    @staticmethod
    def damage(size: int, etag: str | None, record: dict[str, Any]) -> str | None:
        """Why a listed object is not the copy its record describes, or None."""
        info = next(iter(record.get("destinations", {}).values()), {})
        if size != record.get("size"):
            return f"{size} bytes on the server, the record says {record.get('size')}"
        if isinstance(info, dict) and info.get("etag") and etag and info["etag"] != etag:
            return "changed on the server since it was written (ETag differs from the record)"
        return None

    def list(self, name: str) -> Listing:
        """Our backups of ``name`` (an object with a record of ours) and multipart uploads we left behind."""
        listing = Listing()
        with self._mapped("listing"):
            base = self._key(name) + "/"
            objects = self._list_objects(base)
            for key in sorted(objects):
                tier, _, filename = key[len(base) :].partition("/")
                if tier not in store.TIERS or "/" in filename or not store.is_backup_name(filename):
                    continue
                if key + ".json" not in objects:
                    continue
                record = parse_record(self._get_record(key + ".json"), filename)
                if not record or record["name"] != name or record["tier"] != tier:
                    continue
                item = objects[key]
                size = int(item.get("Size", 0))
                remote = RemoteBackup(self.name, key, size, record)
                remote.damage = self.damage(size, item.get("ETag"), record)
                listing.backups.append(remote)
            paginator = self.client().get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
                for upload in page.get("Uploads", []):
                    tier, _, filename = upload["Key"][len(base) :].partition("/")
                    stem = filename.removesuffix(".json").removesuffix(".sha256")
                    if tier in store.TIERS and "/" not in filename and store.is_backup_name(stem):
                        listing.leftovers.append(upload["Key"] + UPLOAD_SEP + upload["UploadId"])
        listing.backups.sort(key=lambda r: (r.created, r.file), reverse=True)
        return listing

    def fetch(self, remote: RemoteBackup, local_dir: Path) -> Path:
        """Download the record, the .sha256 and the data (the version we wrote, where recorded)."""
        info = next(iter(remote.record.get("destinations", {}).values()), {})
        version = info.get("version_id") if isinstance(info, dict) else None
        with self._mapped(f"download of {remote.file}"):
            client = self.client()
            for suffix in (".json", ".sha256", ""):
                target = local_dir / (remote.file + suffix)
                target.unlink(missing_ok=True)
                kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": remote.path + suffix}
                if not suffix and real_version(version):
                    kwargs["VersionId"] = version
                try:
                    body = client.get_object(**kwargs)["Body"]
                except bx.ClientError as exc:
                    if suffix and exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                        continue
                    raise
                try:
                    with open(target, "xb") as handle:
                        while chunk := body.read(CHUNK):
                            handle.write(chunk)
                finally:
                    body.close()
        return local_dir / remote.file

    def delete(self, remote: RemoteBackup) -> None:
        """Delete the version we wrote, then the sidecars. Raises StillLocked when the server refuses
        because of Object Lock, DeleteDeclined when the object is not ours."""
        info = next(iter(remote.record.get("destinations", {}).values()), {})
        version = info.get("version_id") if isinstance(info, dict) else None
        with self._mapped(f"deleting {remote.file}"):
            head = self._head(remote.path, version)
            if head is not None:
                meta = head.get("Metadata", {})
                if meta.get(META_TOOL) != TOOL or meta.get(META_SHA) != remote.record.get("sha256"):
                    raise DeleteDeclined(
                        f"{remote.file}: the object on the server was not written by this tool for this backup "
                        f"(its metadata does not name the record's sha256); left in place"
                    )
                self._delete_locked(remote.path, head)
            for suffix in (".sha256", ".json"):
                side = self._head(remote.path + suffix)
                if side is not None:
                    self._delete_locked(remote.path + suffix, side)

    def _delete_locked(self, key: str, head: dict[str, Any]) -> None:
        """Delete the version ``head`` describes; a refusal of a locked version is StillLocked."""
        try:
            self._delete_version(key, head.get("VersionId"))
        except bx.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            until = head.get("ObjectLockRetainUntilDate")
            hold = head.get("ObjectLockLegalHoldStatus") == "ON"
            if code == "AccessDenied" and (hold or (until and until > store.utcnow())):
                reason = "a legal hold" if hold else f"Object Lock until {store.iso(until)}"
                raise StillLocked(f"{posixpath.basename(key)}: still locked ({reason})") from None
            raise

    def remove_leftovers(self, paths: Iterable[str]) -> None:
        """Abort multipart uploads an interrupted run could not abort."""
        with self._mapped("cleaning leftovers"):
            for path in paths:
                key, _, upload_id = path.partition(UPLOAD_SEP)
                try:
                    self.client().abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                except bx.ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                        raise

    # -- invoke dest-check ---------------------------------------------------------------------

    def check(self) -> tuple[list[str], list[str]]:
        """Credentials, bucket access, lock configuration and a small round trip.
        Returns (lines to print, problems)."""
        lines = [f"{self.name} ({self.label()})"]
        problems: list[str] = []

        def step(what: str, action) -> Any:
            try:
                with self._mapped(what):
                    return action()
            except (DestinationRefused, DestinationFailed) as exc:
                problems.append(str(exc))
                lines.append(f"  {what}: FAILED: {exc}")
                return None

        def credentials() -> str:
            found = self.conn.session().get_credentials()
            if found is None:
                raise bx.NoCredentialsError()
            return "access_key_env/secret_key_env" if self.block.get("access_key_env") else found.method

        source = step("credentials", credentials)
        if source is None:
            return lines, problems
        lines.append(f"  credentials: found ({source}; values never shown)")
        if step("bucket access", lambda: self.client().head_bucket(Bucket=self.bucket)) is None:
            return lines, problems
        lines.append(f"  bucket access: ok ({self.bucket}, {self.conn.addressing}-style addressing)")

        def lock() -> str:
            try:
                config = self.client().get_object_lock_configuration(Bucket=self.bucket)
            except bx.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "ObjectLockConfigurationNotFoundError":
                    raise
                config = {}
            enabled = config.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"
            if self.object_lock and not enabled:
                raise DestinationRefused(
                    f"destination '{self.name}': object_lock is set but bucket '{self.bucket}' has no Object Lock; "
                    + LOCK_FIX.format(bucket=self.bucket)
                )
            if self.object_lock:
                return f"enabled; copies locked in {self.object_lock['mode']} mode"
            return "enabled on the bucket (object_lock not set: copies are not locked)" if enabled else "not used"

        state = step("object lock", lock)
        if state is not None:
            lines.append(f"  object lock: {state}")

        def round_trip() -> str:
            key = self._key(f".dest-check-{secrets.token_hex(8)}")
            data = secrets.token_bytes(4096)
            checksum = b64(hashlib.sha256(data).digest())
            put = self.client().put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=checksum,
                **({"IfNoneMatch": "*"} if self.conditional_put else {}),
                **self._write_args(None),
            )
            head = self._head(key, put.get("VersionId"), checksum=True) or {}
            got = self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()
            deleted = "deleted"
            try:
                self._delete_version(key, put.get("VersionId"))
            except bx.ClientError as exc:
                if error_code(exc) != "AccessDenied":
                    raise
                deleted = f"NOT deleted ({key}: a default retention on the bucket, or no s3:DeleteObjectVersion)"
            if got != data or head.get("ContentLength") != len(data):
                raise DestinationFailed("the object read back differs from what was written")
            if head.get("ChecksumSHA256") not in (None, checksum):
                raise DestinationFailed("the server's checksum differs from ours")
            note = (
                "checksum confirmed"
                if head.get("ChecksumSHA256")
                else "server returns no checksum: uploads are read back"
            )
            return f"ok (4 KiB written, read back, {deleted}; {note})"

        result = step("round trip", round_trip)
        if result is not None:
            lines.append(f"  round trip: {result}")

        def stale() -> int:
            paginator = self.client().get_paginator("list_multipart_uploads")
            base = self._key("") if self.prefix else ""
            return sum(len(p.get("Uploads", [])) for p in paginator.paginate(Bucket=self.bucket, Prefix=base))

        count = step("multipart uploads", stale)
        if count:
            lines.append(
                f"  {count} unfinished multipart upload(s) under the prefix (ours are aborted by the next push)"
            )
        return lines, problems
