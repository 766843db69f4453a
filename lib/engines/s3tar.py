"""The bucket engine's helper process: ``python3 -I s3tar.py MODE`` (a pipeline stage, see
lib/engines/s3.py). Modes:

- ``dump``: list the bucket (the configured prefixes), fetch the objects several at a time and
  write a pax tar on stdout: a header member, one member per object, the manifest last;
- ``inspect``: read such a tar on stdin, re-hash every object, compare with the manifest and
  print a one-line JSON summary (``complete`` false with ``error`` when anything is wrong);
- ``manifest``: read such a tar on stdin and write its manifest to the job's ``manifest_out``;
- ``upload``: read such a tar on stdin and upload the objects the job's ``wanted`` file names
  (key -> sha256) into the target bucket; write a JSON summary (key -> ETag uploaded) to the
  job's ``result_out``.

The job (what to do, where; never a secret) comes as JSON in ``$LEMON_S3_JOB``; the credentials
in ``$LEMON_S3_ACCESS_KEY``/``$LEMON_S3_SECRET_KEY``/``$LEMON_S3_SESSION_TOKEN`` (or boto3's
standard chain). Errors end the process with status 1 and one line on stderr.

The archive. Member ``lemon-s3-backup.json`` first (format, bucket, prefixes, kind); then
``objects/<key>`` for every object stored, its pax header holding the exact key
(``LEMON.key``), ETag, last-modified time, content type, user metadata and the other HTTP
headers S3 keeps (JSON); the content as it was read. Last, ``manifest.json``: the complete listing
at the time of the backup, one entry per object (key, size, ETag, last_modified, sha256, md5,
content_type, metadata, headers, ``in``: the backup file that holds this version, ``stored``:
whether this archive holds it). ``tar -xf`` unpacks the objects by hand.

Memory: objects up to SMALL bytes are fetched whole by WORKERS threads, at most WINDOW of them
ahead of the writer; larger ones are streamed through in chunks by the writer itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import tarfile
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # -I leaves the project off the path

from lib.errors import RunFailed  # noqa: E402

# boto3 (via lib.s3client) is imported when the helper needs it: lib/engines/s3.py imports the
# constants below in every process that loads the engines.

JOB_ENV = "LEMON_S3_JOB"
SECRET_ENV = {
    "access_key_env": "LEMON_S3_ACCESS_KEY",
    "secret_key_env": "LEMON_S3_SECRET_KEY",
    "session_token_env": "LEMON_S3_SESSION_TOKEN",
}
POLICY_HINT = "the rights in docs/buckets.md (read-only for backups; PutObject and more to restore)"
HEADER_NAME = "lemon-s3-backup.json"
MANIFEST_NAME = "manifest.json"
OBJECT_DIR = "objects/"
FORMAT = 1
SMALL = 8 << 20
CHUNK = 1 << 20
PART = 8 << 20
#: HTTP headers S3 keeps with an object (besides Content-Type and user metadata): get_object's
#: response field -> put_object's parameter
KEPT_HEADERS = ("CacheControl", "ContentDisposition", "ContentEncoding", "ContentLanguage")


class Failed(Exception):
    """One line for stderr; exit status 1."""


def connection(job: dict[str, Any], bucket: str | None = None) -> Any:
    """The S3 connection the job describes (credentials from our environment)."""
    from lib.s3client import S3Connection

    block = dict(job["connection"])
    if bucket:
        block["bucket"] = bucket
    shim = SimpleNamespace(env=os.environ, resolve=lambda p: Path(p))
    workers = int(job.get("workers", 8))
    return S3Connection(
        block, shim, job.get("owner", "source"), RunFailed, RunFailed, pool_size=workers + 2, policy=POLICY_HINT
    )  # type: ignore[arg-type]


def iso_time(moment: Any) -> str:
    """UTC time to the second (listings have milliseconds, GetObject's Last-Modified header not)."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ") if hasattr(moment, "strftime") else str(moment)


def quoted(etag: str) -> str:
    return etag if etag.startswith('"') else f'"{etag}"'


# -- dump ---------------------------------------------------------------------------------------


def list_objects(conn: Any, prefixes: list[str]) -> list[dict[str, Any]]:
    """Every object under ``prefixes`` (all of the bucket for ['']), sorted by key, without duplicates."""
    client = conn.client()
    found: dict[str, dict[str, Any]] = {}
    for prefix in prefixes:
        with conn.mapped("list objects"):
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=conn.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    found[item["Key"]] = {
                        "key": item["Key"],
                        "size": int(item["Size"]),
                        "etag": item.get("ETag", ""),
                        "last_modified": iso_time(item["LastModified"]),
                    }
    return [found[key] for key in sorted(found)]


class Hashing:
    """A reader over ``body`` returning exactly what is asked (fewer only at its end), hashing
    (sha256, md5) what passes."""

    def __init__(self, body: Any) -> None:
        self.body = body
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5()  # noqa: S324 - ETag comparison, not security
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            data = self.body.read()
        else:
            parts, want = [], n
            while want > 0:
                chunk = self.body.read(min(want, CHUNK))
                if not chunk:
                    break
                parts.append(chunk)
                want -= len(chunk)
            data = b"".join(parts)
        self.sha256.update(data)
        self.md5.update(data)
        self.size += len(data)
        return data


def described(key: str, response: dict[str, Any]) -> dict[str, Any]:
    """Manifest entry (without checksums) from a GetObject response."""
    return {
        "key": key,
        "size": int(response["ContentLength"]),
        "etag": response.get("ETag", ""),
        "last_modified": iso_time(response.get("LastModified", "")),
        "content_type": response.get("ContentType") or "",
        "metadata": dict(response.get("Metadata") or {}),
        "headers": {name: response[name] for name in KEPT_HEADERS if response.get(name)},
    }


def get_object(conn: Any, key: str) -> dict[str, Any] | None:
    """GetObject, or None when the object was deleted since the listing."""
    import botocore.exceptions as bx

    with conn.mapped(f"read {key}"):  # any other error is re-raised into mapped(): one line
        try:
            return conn.client().get_object(Bucket=conn.bucket, Key=key)
        except bx.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise


def fetch_small(conn: Any, key: str) -> tuple[dict[str, Any], bytes] | None:
    """(entry with checksums, content) of a small object; None when it is gone."""
    for attempt in range(3):
        response = get_object(conn, key)
        if response is None:
            return None
        entry = described(key, response)
        with conn.mapped(f"read {key}"):
            data = response["Body"].read()
        if len(data) == entry["size"]:
            entry["sha256"] = hashlib.sha256(data).hexdigest()
            entry["md5"] = hashlib.md5(data).hexdigest()  # noqa: S324
            return entry, data
        if attempt == 2:
            raise Failed(f"{key}: read {len(data)} bytes of {entry['size']} three times; is the server healthy?")
    return None  # pragma: no cover


def object_member(entry: dict[str, Any]) -> tarfile.TarInfo:
    info = tarfile.TarInfo(OBJECT_DIR + entry["key"].lstrip("/"))
    info.size = entry["size"]
    info.mode = 0o600
    info.type = tarfile.REGTYPE
    try:
        info.mtime = time.mktime(time.strptime(entry["last_modified"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    except ValueError:
        info.mtime = 0
    info.pax_headers = {
        "LEMON.key": entry["key"],
        "LEMON.etag": entry["etag"],
        "LEMON.last_modified": entry["last_modified"],
        "LEMON.content_type": entry["content_type"],
        "LEMON.metadata": json.dumps(entry["metadata"], ensure_ascii=False, sort_keys=True),
        "LEMON.headers": json.dumps(entry["headers"], ensure_ascii=False, sort_keys=True),
    }
    return info


def json_member(tar: tarfile.TarFile, name: str, data: dict[str, Any]) -> bytes:
    raw = (json.dumps(data, ensure_ascii=False, sort_keys=True) + "\n").encode()
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(raw), 0o600, int(time.time())
    tar.addfile(info, _Bytes(raw))
    return raw


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.at + n
        chunk = self.data[self.at : end]
        self.at += len(chunk)
        return chunk


def unchanged(item: dict[str, Any], before: dict[str, Any] | None) -> bool:
    return (
        before is not None
        and before.get("sha256")
        and (before["size"], before["etag"], before["last_modified"])
        == (item["size"], item["etag"], item["last_modified"])
    )


def dump(job: dict[str, Any]) -> None:
    conn = connection(job)
    prefixes = job.get("prefixes") or [""]
    listing = list_objects(conn, prefixes)
    previous: dict[str, dict[str, Any]] = {}
    if job.get("previous_manifest"):
        with open(job["previous_manifest"], encoding="utf-8") as handle:
            previous = {entry["key"]: entry for entry in json.load(handle)["objects"]}
    file_name = job.get("file", "")
    manifest: list[dict[str, Any]] = []
    todo: list[dict[str, Any]] = []
    for item in listing:
        before = previous.get(item["key"])
        if unchanged(item, before):
            manifest.append({**before, "stored": False})  # type: ignore[dict-item]
        else:
            todo.append(item)
    workers = max(1, int(job.get("workers", 8)))
    window = 2 * workers
    out = sys.stdout.buffer
    tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8")  # noqa: SIM115
    json_member(
        tar,
        HEADER_NAME,
        {"format": FORMAT, "bucket": conn.bucket, "prefixes": prefixes, "kind": job.get("kind", "full")},
    )
    gone = 0
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[tuple[dict[str, Any], Future | None]] = deque()
        position = 0
        while position < len(todo) or pending:
            while position < len(todo) and len(pending) < window:
                item = todo[position]
                position += 1
                small = item["size"] <= SMALL
                pending.append((item, pool.submit(fetch_small, conn, item["key"]) if small else None))
            item, future = pending.popleft()
            if future is not None:
                fetched = future.result()
                if fetched is None:
                    gone += 1
                    continue
                entry, data = fetched
                tar.addfile(object_member(entry), _Bytes(data))
            else:
                response = get_object(conn, item["key"])
                if response is None:
                    gone += 1
                    continue
                entry = described(item["key"], response)
                reader = Hashing(response["Body"])
                with conn.mapped(f"read {item['key']}"):
                    tar.addfile(object_member(entry), reader)
                if reader.size != entry["size"]:
                    raise Failed(f"{item['key']}: the server sent {reader.size} of {entry['size']} bytes")
                entry["sha256"], entry["md5"] = reader.sha256.hexdigest(), reader.md5.hexdigest()
            manifest.append({**entry, "in": file_name, "stored": True})
    manifest.sort(key=lambda e: e["key"])
    document = {
        "format": FORMAT,
        "bucket": conn.bucket,
        "prefixes": prefixes,
        "kind": job.get("kind", "full"),
        "file": file_name,
        "objects": manifest,
    }
    raw = json_member(tar, MANIFEST_NAME, document)
    tar.close()
    out.flush()
    if job.get("manifest_out"):
        fd = os.open(job["manifest_out"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(raw)
            handle.flush()
            os.fsync(handle.fileno())
    if gone:
        print(f"{gone} object(s) were deleted while the backup ran (left out)", file=sys.stderr)


# -- reading an archive ---------------------------------------------------------------------------


def members(stream: Any):
    """(TarInfo, file object) of each member of the archive on ``stream``; then the rest of the
    stream is drained and must be zeros (tar's padding)."""
    tar = tarfile.open(fileobj=stream, mode="r|", encoding="utf-8")  # noqa: SIM115
    for info in tar:
        yield info, tar.extractfile(info) if info.isfile() else None
    while True:
        rest = stream.read(CHUNK)
        if not rest:
            break
        if rest.strip(b"\0"):
            raise Failed("data after the end of the archive")


def read_manifest(member: Any) -> dict[str, Any]:
    try:
        data = json.loads(member.read().decode("utf-8"))
        assert isinstance(data.get("objects"), list)
        return data
    except (ValueError, AssertionError, AttributeError) as exc:
        raise Failed(f"the manifest is unreadable ({exc})") from None


def inspect(job: dict[str, Any]) -> dict[str, Any]:
    """Check the archive on stdin; the summary (``complete`` and counts, or ``error``)."""
    stored: dict[str, tuple[int, str]] = {}
    header: dict[str, Any] | None = None
    manifest: dict[str, Any] | None = None
    manifest_sha = ""
    for index, (info, member) in enumerate(members(sys.stdin.buffer)):
        if manifest is not None:
            raise Failed(f"member {info.name} after the manifest")
        if index == 0:
            if info.name != HEADER_NAME or member is None:
                raise Failed(f"not a bucket backup (first member {info.name})")
            header = json.loads(member.read().decode("utf-8"))
            continue
        if info.name == MANIFEST_NAME and member is not None:
            raw = member.read()
            manifest_sha = hashlib.sha256(raw).hexdigest()
            manifest = read_manifest(_Bytes(raw))
            continue
        key = info.pax_headers.get("LEMON.key")
        if member is None or key is None:
            raise Failed(f"unexpected member {info.name}")
        if key in stored:
            raise Failed(f"object {key} stored twice")
        digest = hashlib.sha256()
        size = 0
        while chunk := member.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
        stored[key] = (size, digest.hexdigest())
    if header is None:
        raise Failed("empty archive")
    if manifest is None:
        raise Failed("the archive ends before its manifest (truncated)")
    entries = {entry["key"]: entry for entry in manifest["objects"]}
    for key, (size, sha) in stored.items():
        entry = entries.get(key)
        if entry is None or not entry.get("stored"):
            raise Failed(f"object {key} is not in the manifest")
        if entry["size"] != size or entry["sha256"] != sha:
            raise Failed(f"object {key}: sha256 {sha} ({size} bytes) differs from the manifest's {entry['sha256']}")
    missing = [key for key, entry in entries.items() if entry.get("stored") and key not in stored]
    if missing:
        raise Failed(f"{len(missing)} object(s) of the manifest are missing, e.g. {missing[0]}")
    if manifest.get("kind") == "full" and len(stored) != len(entries):
        raise Failed("a full backup that does not hold every object of its manifest")
    prefixes = {(p or "(bucket)"): 0 for p in manifest.get("prefixes", [])}  # an empty one shows as 0
    for key in entries:
        top = next((p for p in manifest.get("prefixes", []) if p and key.startswith(p)), "")
        prefixes[top or "(bucket)"] = prefixes.get(top or "(bucket)", 0) + 1
    return {
        "complete": True,
        "kind": manifest.get("kind"),
        "bucket": manifest.get("bucket"),
        "objects": len(entries),
        "bytes": sum(int(e["size"]) for e in entries.values()),
        "stored_objects": len(stored),
        "stored_bytes": sum(size for size, _ in stored.values()),
        "prefixes": prefixes,
        "manifest_sha256": manifest_sha,
    }


def extract_manifest(job: dict[str, Any]) -> None:
    raw = b""
    for info, member in members(sys.stdin.buffer):
        if info.name == MANIFEST_NAME and member is not None:
            raw = member.read()
    if not raw:
        raise Failed("the archive has no manifest")
    fd = os.open(job["manifest_out"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(raw)


# -- upload ---------------------------------------------------------------------------------------


def put_args(pax: dict[str, str]) -> dict[str, Any]:
    """ContentType, Metadata and the kept headers of a member, as put_object parameters."""
    args: dict[str, Any] = {"Metadata": json.loads(pax.get("LEMON.metadata") or "{}")}
    if pax.get("LEMON.content_type"):
        args["ContentType"] = pax["LEMON.content_type"]
    args.update(json.loads(pax.get("LEMON.headers") or "{}"))
    return args


def upload(job: dict[str, Any]) -> dict[str, Any]:
    """Upload the wanted objects of the archive on stdin; key -> ETag written."""
    conn = connection(job, job["target_bucket"])
    client = conn.client()
    prefix = job.get("target_prefix", "")
    with open(job["wanted"], encoding="utf-8") as handle:
        wanted: dict[str, str] = json.load(handle)
    workers = max(1, int(job.get("workers", 8)))
    slots = threading.BoundedSemaphore(2 * workers)
    done: dict[str, str] = {}
    futures: list[Future] = []

    def put(key: str, data: bytes, args: dict[str, Any]) -> None:
        try:
            md5 = hashlib.md5(data)  # noqa: S324
            with conn.mapped(f"upload {key}"):
                client.put_object(
                    Bucket=conn.bucket,
                    Key=prefix + key,
                    Body=data,
                    ContentMD5=base64.b64encode(md5.digest()).decode(),
                    **args,
                )
            done[key] = quoted(md5.hexdigest())
        finally:
            slots.release()

    with ThreadPoolExecutor(workers) as pool:
        for info, member in members(sys.stdin.buffer):
            key = info.pax_headers.get("LEMON.key")
            if member is None or key is None or key not in wanted:
                continue
            args = put_args(info.pax_headers)
            if info.size <= SMALL:
                data = member.read()
                if hashlib.sha256(data).hexdigest() != wanted[key]:
                    raise Failed(f"object {key} in the archive differs from its manifest entry")
                slots.acquire()
                futures.append(pool.submit(put, key, data, args))
                for future in [f for f in futures if f.done()]:
                    future.result()
                    futures.remove(future)
            else:
                done[key] = upload_large(conn, prefix + key, member, wanted[key], args, pool, slots)
        for future in futures:
            future.result()
    return {"uploaded": done}


def upload_large(conn: Any, key: str, member: Any, sha256: str, args: dict, pool, slots) -> str:
    """A multipart upload of ``member`` in PART-sized parts (a few in flight); aborted when the
    content does not hash to ``sha256``. The resulting ETag."""
    client = conn.client()
    with conn.mapped(f"upload {key}"):
        upload_id = client.create_multipart_upload(Bucket=conn.bucket, Key=key, **args)["UploadId"]
    digest = hashlib.sha256()
    md5s: list[bytes] = []
    parts: list[Future] = []

    def part(number: int, data: bytes) -> dict[str, Any]:
        try:
            with conn.mapped(f"upload {key} part {number}"):
                response = client.upload_part(
                    Bucket=conn.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
                )
            return {"PartNumber": number, "ETag": response["ETag"]}
        finally:
            slots.release()

    try:
        number = 0
        while data := member.read(PART):
            number += 1
            digest.update(data)
            md5s.append(hashlib.md5(data).digest())  # noqa: S324
            slots.acquire()
            parts.append(pool.submit(part, number, data))
        done = [future.result() for future in parts]
        if digest.hexdigest() != sha256:
            raise Failed(f"object {key} in the archive differs from its manifest entry")
        with conn.mapped(f"complete {key}"):
            client.complete_multipart_upload(
                Bucket=conn.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": done}
            )
    except BaseException:
        try:
            client.abort_multipart_upload(Bucket=conn.bucket, Key=key, UploadId=upload_id)
        except Exception:  # noqa: BLE001, S110 - the first error is the one to report
            pass
        raise
    return quoted(hashlib.md5(b"".join(md5s)).hexdigest() + f"-{len(md5s)}")  # noqa: S324


def main(argv: list[str]) -> int:
    mode = argv[1] if len(argv) > 1 else ""
    try:
        job = json.loads(os.environ.get(JOB_ENV) or "{}")
        if mode == "dump":
            dump(job)
        elif mode == "inspect":
            try:
                summary = inspect(job)
            except (Failed, tarfile.TarError, ValueError, KeyError, EOFError) as exc:
                summary = {"complete": False, "error": str(exc) or type(exc).__name__}
                while sys.stdin.buffer.read(CHUNK):  # let the stages before us finish
                    pass
            print(json.dumps(summary, sort_keys=True))
        elif mode == "manifest":
            extract_manifest(job)
        elif mode == "upload":  # the result may be large: to a file, not through the pipeline's tail
            with open(job["result_out"], "w", encoding="utf-8") as handle:
                json.dump(upload(job), handle, sort_keys=True)
        else:
            raise Failed(f"unknown mode {mode!r}; use dump, inspect, manifest or upload")
    except (Failed, RunFailed, tarfile.TarError, OSError, EOFError) as exc:
        print(f"{mode}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - a dropped connection mid-body (urllib3), a server's oddity
        print(f"{mode}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
