"""Object storage buckets (S3, MinIO) as a source: ``engine: s3`` under ``databases:``.

A backup is one file, like a database backup: the helper process lib/engines/s3tar.py lists the
bucket (the configured ``prefixes``), fetches the objects several at a time and writes a pax tar
(each object's key, ETag, last-modified time, content type and user metadata in its header; the
manifest of the complete listing with each object's sha256 last), which the usual pipeline
compresses (zstd by default), encrypts, stores and verifies in flight (the same helper re-hashes
every object against the manifest).

Incremental (``incremental: true``): a full backup on the monthly tier (or when the chain's full
is older than ``full_every_days``), else one holding only the objects new or changed (key, size,
ETag, last-modified) since the previous backup, with the full manifest, so deletions are known.
The previous manifest comes from a plain copy kept beside each backup (``<file>.manifest.json``,
0600, local only); without it the next backup is a full one. The record's ``chain`` names the
backup each incremental depends on; retention never deletes one a kept backup depends on.

A restore verifies every file of the chain first, lists the target, says what it will do, uploads
the missing and changed objects (content type, metadata and headers kept), leaves other objects
alone unless ``--delete-extra``, then lists the target again and checks every object's size and
checksum (ETag = MD5 of what was uploaded). Credentials: as for the S3 destination
(lib/s3client.py), handed to the helper in its environment under fixed names.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import tempfile
import time
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lib import store
from lib.config import DatabaseSpec, Spec
from lib.engines import register
from lib.engines.base import Engine, RestoreRequest
from lib.engines.s3tar import JOB_ENV, POLICY_HINT, SECRET_ENV
from lib.errors import ConfigError, EnvironmentProblem, InputError, RunFailed, ToolError, VerificationFailed
from lib.exec import Place
from lib.stream import Stage, TailSink, run_pipeline

HELPER = Path(__file__).resolve().with_name("s3tar.py")
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
CONNECTION_KEYS = ("bucket", "endpoint_url", "region", "addressing", "ca_bundle", "request_checksums", "profile")
#: the backup being made (set by begin_backup in a copy of the database's options)
BACKUP_KEY = "_s3_backup"
log = logging.getLogger("backup")


def human(size: int) -> str:
    return store.human_size(size)


def split_target(target: str) -> tuple[str, str]:
    """'bucket' or 'bucket/prefix' -> (bucket, prefix ending in '/' or ''). Raises InputError."""
    bucket, _, prefix = target.partition("/")
    if not BUCKET_RE.match(bucket) or ".." in bucket:
        raise InputError(
            f"--into {target}: '{bucket}' is not a valid bucket name (3-63 lowercase letters, digits, '.', '-'); "
            "pass --into BUCKET or BUCKET/PREFIX"
        )
    prefix = prefix.strip("/")
    return bucket, (prefix + "/" if prefix else "")


@register
class S3Bucket(Engine):
    name = "s3"
    units = ("prefixes", "objects")
    target_kind = "bucket"
    file_markers = (".tar",)

    # -- where and how to connect -------------------------------------------------------------
    def place(self, db: DatabaseSpec, env: Mapping[str, str]) -> Place:
        """This host, with the configured credentials under the helper's fixed names."""
        secrets = {}
        for key, fixed in SECRET_ENV.items():
            name = db.options.get(key)
            if not name:
                continue
            value = env.get(name)
            if not value:
                raise ConfigError(
                    f"database '{db.name}': {key} names ${name}, which is not set; "
                    "export it or add it to the .env file next to backup.yml"
                )
            secrets[fixed] = value
        return Place(secrets=secrets)

    def preflight(self, db: DatabaseSpec, place: Place) -> None:
        return None

    def job(self, db: DatabaseSpec, **extra: Any) -> dict[str, Any]:
        """The helper's job (never a secret: credentials go by the fixed names in SECRET_ENV)."""
        block = {key: db.options[key] for key in CONNECTION_KEYS if db.options.get(key) is not None}
        for key, fixed in SECRET_ENV.items():
            if db.options.get(key):
                block[key] = fixed
        # the configured variable names, for messages (the helper reads the fixed names)
        block["env_names"] = {key: db.options[key] for key in SECRET_ENV if db.options.get(key)}
        return {
            "connection": block,
            "owner": f"database '{db.name}'",
            "prefixes": list(db.options.get("prefixes") or [""]),
            "workers": int(db.options.get("concurrency", 8)),
            **extra,
        }

    def helper(self, name: str, mode: str, place: Place | None, job: Mapping[str, Any]) -> Stage:
        env = (place or Place()).env({JOB_ENV: json.dumps(job)})
        return Stage(name, [sys.executable, "-I", str(HELPER), mode], env=env)

    def connection(self, db: DatabaseSpec, place: Place, bucket: str | None = None) -> Any:
        """An S3Connection for this process (listing, checking, creating the target)."""
        from lib.s3client import S3Connection

        block = dict(self.job(db)["connection"])
        if bucket:
            block["bucket"] = bucket
        shim = SimpleNamespace(env=place.secrets, resolve=Path)
        return S3Connection(block, shim, f"database '{db.name}'", RunFailed, RunFailed, policy=POLICY_HINT)  # type: ignore[arg-type]

    # -- backup ------------------------------------------------------------------------------
    def suffix(self, db: DatabaseSpec) -> str:
        return ".tar"

    def compression(self, db: DatabaseSpec) -> str | None:
        return db.options.get("compression", "zstd")

    def record_fields(self, db: DatabaseSpec) -> dict[str, Any]:
        return {
            "dump_format": "tar",
            "bucket": db.options["bucket"],
            "prefixes": list(db.options.get("prefixes") or []),
        }

    def chain_plan(
        self, spec: Spec, db: DatabaseSpec, tier: str
    ) -> tuple[str, store.Backup | None, list[store.Backup], str, str | None]:
        """(kind, parent, its chain, why full, previous manifest) of a backup made now."""
        kind, parent, reason = "full", None, "incremental is off"
        previous_manifest = None
        chain: list[store.Backup] = []
        if db.options.get("incremental"):
            backups = store.list_backups(spec.backup_dir, db.name)
            parent = store.latest_verified(backups)
            reason = ""
            if tier == "monthly":
                reason = "monthly tier"
            elif parent is None:
                reason = "no earlier verified backup"
            elif parent.record.get("engine") != self.name or (
                parent.record.get("bucket"),
                parent.record.get("prefixes"),
            ) != (db.options["bucket"], list(db.options.get("prefixes") or [])):
                reason = "the earlier backup is of another bucket or prefixes"
            else:
                chain = store.chain_of(parent, backups) or []
                manifest = store.manifest_path(parent.path)
                recorded = (parent.record.get("engine_meta") or {}).get("manifest_sha256")
                every = db.options.get("full_every_days")
                if not chain:
                    reason = f"the chain of {parent.path.name} is incomplete"
                elif every and store.utcnow() - chain[0].created >= timedelta(days=int(every)):
                    reason = f"the full backup is {every} or more days old"
                elif not manifest.is_file() or not recorded or store.sha256_of(manifest) != recorded:
                    reason = f"no intact manifest copy of {parent.path.name} ({manifest.name})"
                else:
                    kind, previous_manifest = "incremental", str(manifest)
        return kind, parent, chain, reason, previous_manifest

    def plan_note(self, spec: Spec, db: DatabaseSpec, tier: str) -> str:
        """For --dry-run: ' (full: monthly tier)' or ' (incremental on daily/backup_...)'."""
        kind, parent, _, reason, _ = self.chain_plan(spec, db, tier)
        if kind == "incremental" and parent is not None:
            return f" (incremental on {parent.tier}/{parent.path.name})"
        return f" (full: {reason})"

    def begin_backup(
        self, spec: Spec, db: DatabaseSpec, tier: str, path: Path, tmp: Path
    ) -> tuple[DatabaseSpec, dict[str, Any]]:
        """Full or incremental (see the module docstring); the options of the dump and the
        record's ``chain``."""
        from dataclasses import replace

        kind, parent, chain, reason, previous_manifest = self.chain_plan(spec, db, tier)
        if kind == "full" and db.options.get("incremental"):
            log.info("%s: full backup (%s)", db.name, reason)
        record: dict[str, Any] = {"kind": kind}
        if kind == "incremental" and parent is not None:
            record.update(
                parent={"tier": parent.tier, "file": parent.path.name},
                full={"tier": chain[0].tier, "file": chain[0].path.name},
                length=len(chain) + 1,
            )
            log.info("%s: incremental backup on top of %s/%s", db.name, parent.tier, parent.path.name)
        manifest_out = tmp.with_name(tmp.name + ".manifest.json")
        manifest_out.unlink(missing_ok=True)
        options = {
            **db.options,
            BACKUP_KEY: {
                "kind": kind,
                "previous_manifest": previous_manifest,
                "manifest_out": str(manifest_out),
                "file": path.name,
            },
        }
        return replace(db, options=options), {"chain": record}

    def finish_backup(self, db: DatabaseSpec, path: Path) -> None:
        """Keep the manifest copy beside the stored backup (for the next incremental)."""
        made = Path(db.options.get(BACKUP_KEY, {}).get("manifest_out", ""))
        if made.name and made.is_file():
            made.rename(store.manifest_path(path))

    def abort_backup(self, db: DatabaseSpec) -> None:
        made = db.options.get(BACKUP_KEY, {}).get("manifest_out")
        if made:
            Path(made).unlink(missing_ok=True)

    def dump_stages(self, db: DatabaseSpec, place: Place) -> list[Stage]:
        extra = dict(db.options.get(BACKUP_KEY) or {"kind": "full"})
        return [self.helper("bucket listing and fetch (tar)", "dump", place, self.job(db, **extra))]

    # -- verification ------------------------------------------------------------------------
    def inspect_stages(self, db: DatabaseSpec, place: Place | None) -> list[Stage]:
        return [self.helper("bucket archive check", "inspect", None, {})]

    def verify_checks(self, db: DatabaseSpec, meta: Mapping[str, Any] | None = None) -> list[str]:
        return ["tar-structure", "object-sha256", "manifest-complete"]

    def check_summary(self, db: DatabaseSpec, summary: bytes) -> dict[str, Any]:
        try:
            data = json.loads(summary.decode("utf-8", "replace").strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise VerificationFailed("bucket archive check produced no readable result") from None
        if not data.get("complete"):
            raise VerificationFailed(data.get("error") or "the archive is incomplete")
        keys = ("kind", "bucket", "objects", "bytes", "stored_objects", "stored_bytes", "prefixes", "manifest_sha256")
        return {key: data.get(key) for key in keys}

    def check_record(self, meta: Mapping[str, Any], record: Mapping[str, Any]) -> None:
        """The counts read from the file against those its record holds."""
        recorded = record.get("engine_meta") or {}
        for key in ("objects", "bytes", "stored_objects", "stored_bytes", "manifest_sha256"):
            if key in recorded and recorded[key] != meta.get(key):
                raise VerificationFailed(f"{key} {meta.get(key)} differs from the record's {recorded[key]}")

    def counts(self, meta: Mapping[str, Any]) -> Mapping[str, int]:
        return meta.get("prefixes") or {}

    def describe(self, meta: Mapping[str, Any]) -> str:
        """'240 objects, 1.2 MiB' (a full one), '+ 3 new or changed (4.0 KiB)' (an incremental)."""
        text = f"{meta.get('objects', 0)} objects, {human(int(meta.get('bytes') or 0))}"
        if meta.get("kind") == "incremental":
            text += (
                f"; {meta.get('stored_objects', 0)} new or changed stored ({human(int(meta.get('stored_bytes') or 0))})"
            )
        return text

    def warnings(self, db: DatabaseSpec, meta: Mapping[str, Any]) -> list[str]:
        """A configured prefix that holds nothing is most likely a typo (a backup of nothing)."""
        return [
            f"prefix '{prefix}' of bucket '{db.options['bucket']}' holds no objects; is it right "
            "(keys are case-sensitive and have no leading '/'; compare with mc ls)?"
            for prefix, count in self.counts(meta).items()
            if count == 0
        ]

    # -- restore -----------------------------------------------------------------------------
    def replace_note(self, drop_previous: bool) -> str:
        return ""

    def throwaway_name(self, db: DatabaseSpec, stamp: str) -> str:
        return f"{db.options['bucket'][:30].rstrip('.-')}-drill-{stamp.replace('_', '-')}"

    def chain(self, request: RestoreRequest) -> list[tuple[Path, dict[str, Any]]]:
        """The files to replay, oldest (the full) first, ending with the file to restore. Raises
        VerificationFailed when one is missing."""
        path, record = request.source, dict(request.record)
        files = [(path, record)]
        seen = {path.resolve()}
        while (record.get("chain") or {}).get("kind") == "incremental":
            parent = record["chain"]["parent"]
            places = [path.parent.parent / parent["tier"] / parent["file"], path.parent / parent["file"]]
            if request.backup_dir is not None:
                places.append(store.tier_dir(request.backup_dir, request.db.name, parent["tier"]) / parent["file"])
            found = next((p for p in places if p.is_file()), None)
            loaded = store.load(found) if found else None
            if found is None or loaded is None or loaded.problem is not None or found.resolve() in seen:
                raise VerificationFailed(
                    f"{path.name} is an incremental backup on top of {parent['tier']}/{parent['file']}, which is "
                    f"missing (or has no valid record); restore an older backup whose chain is complete"
                    f"{self.restorable_hint(request)}"
                )
            seen.add(found.resolve())
            path, record = found, loaded.record
            files.append((path, record))
        return list(reversed(files))

    @staticmethod
    def restorable_hint(request: RestoreRequest) -> str:
        """', e.g. --file <the newest local backup whose chain is complete>' (or nothing)."""
        if request.backup_dir is None:
            return ""
        backups = store.list_backups(request.backup_dir, request.db.name)
        whole = [b for b in backups if b.verified and b.problem is None and store.chain_of(b, backups)]
        newest = max(whole, key=lambda b: b.created, default=None)
        return f", e.g. --file {newest.path}" if newest else ""

    @staticmethod
    def decode(request: RestoreRequest, path: Path, record: Mapping[str, Any]) -> list[Stage]:
        """Fresh decode stages for a file of the chain (decryption stages serve one run each)."""
        if request.decode_file is not None:
            return request.decode_file(path, dict(record))
        if path != request.source:
            raise RunFailed("no way to decode the chain's files was given")
        return request.decode

    def target_manifest(self, request: RestoreRequest, work: Path) -> dict[str, Any]:
        """The manifest of the file to restore: the local copy when it is the one its record
        names, else read out of the file."""
        recorded = (request.record.get("engine_meta") or {}).get("manifest_sha256")
        copy = store.manifest_path(request.source)
        if recorded and copy.is_file() and store.sha256_of(copy) == recorded:
            return json.loads(copy.read_text(encoding="utf-8"))
        out = work / "manifest.json"
        decode = self.decode(request, request.source, request.record)
        stages = [*decode, self.helper("read the manifest", "manifest", None, {"manifest_out": str(out)})]
        result = run_pipeline(stages, TailSink(4096), source=request.source)
        result.raise_for_status()
        return json.loads(out.read_text(encoding="utf-8"))

    def listing(self, conn: Any, prefixes: list[str]) -> dict[str, tuple[int, str]] | None:
        """key -> (size, ETag) under ``prefixes`` of the connection's bucket; None when the bucket
        does not exist."""
        import botocore.exceptions as bx

        client = conn.client()
        with conn.mapped("look at the target bucket"):  # other errors re-raised into mapped(): one line
            try:
                client.head_bucket(Bucket=conn.bucket)
            except bx.ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 404:
                    return None
                if status != 403:
                    raise
                # a HEAD answer has no body: 403 is wrong keys or missing rights; the listing says which
        found: dict[str, tuple[int, str]] = {}
        with conn.mapped("list the target bucket"):
            for prefix in sorted(set(prefixes)):
                for page in client.get_paginator("list_objects_v2").paginate(Bucket=conn.bucket, Prefix=prefix):
                    for item in page.get("Contents", []):
                        found[item["Key"]] = (int(item["Size"]), item.get("ETag", ""))
        return found

    @staticmethod
    def same(entry: Mapping[str, Any], there: tuple[int, str] | None) -> bool:
        """The object in the target is this manifest entry's content (size and ETag or MD5)."""
        if there is None or there[0] != entry["size"]:
            return False
        etag = there[1].strip('"')
        return etag in (str(entry.get("etag", "")).strip('"'), entry.get("md5"))

    def prepare_restore(self, request: RestoreRequest) -> str:
        """Verify the rest of the chain, read the manifest, look at the target; the question
        saying what the restore will do. The plan goes to ``request.plan``."""
        bucket, prefix = split_target(request.target)
        files = self.chain(request)
        for path, record in files[:-1]:
            if request.verify_file is None:
                raise RunFailed("no way to verify the chain was given")
            checks = request.verify_file(path, record)
            request.log.info("%s: %s (chain) verified (%s)", request.db.name, path.name, ", ".join(checks))
        work = Path(tempfile.mkdtemp(prefix="lemon-s3-restore-"))  # 0700; key names and checksums only
        try:
            manifest = self.target_manifest(request, work)
        finally:
            for leftover in work.iterdir():
                leftover.unlink()
            work.rmdir()
        entries = {entry["key"]: entry for entry in manifest["objects"]}
        holders = {path.name for path, _ in files}
        for entry in entries.values():
            if entry.get("in") not in holders:
                raise VerificationFailed(
                    f"{entry['key']} is held by {entry.get('in')}, which is not in the chain of {request.source.name}"
                )
        scope = [prefix + p for p in (manifest.get("prefixes") or [""])]
        conn = self.connection(request.db, request.place, bucket)
        there = self.listing(conn, scope)
        upload = [key for key, entry in entries.items() if not self.same(entry, (there or {}).get(prefix + key))]
        extra = sorted(k for k in (there or {}) if not k.startswith(prefix) or k[len(prefix) :] not in entries)
        request.plan = {
            "bucket": bucket,
            "prefix": prefix,
            "files": files,
            "entries": entries,
            "upload": upload,
            "extra": extra,
            "exists": there is not None,
            "scope": scope,
        }
        size = sum(entries[key]["size"] for key in upload)
        where = f"bucket '{bucket}'" + (f" under {prefix}" if prefix else "")
        if there is None:
            what = (
                f"Restore {request.source.name} ({len(entries)} objects) into the new {where}: "
                f"create it and upload {len(upload)} object(s) ({human(size)})"
            )
        else:
            fate = "DELETED (--delete-extra)" if request.delete_extra else "left alone"
            what = (
                f"Restore {request.source.name} into {where}, which holds {len(there)} object(s): upload "
                f"{len(upload)} missing or changed object(s) ({human(size)}), keep {len(entries) - len(upload)} "
                f"unchanged, {len(extra)} not in the backup {fate}"
            )
        request.plan["says"] = what
        return what + "?"

    def restore(self, request: RestoreRequest) -> dict[str, Any]:
        plan = request.plan or {}
        if not plan:
            raise RunFailed("restore was not prepared (prepare_restore)")
        started = time.monotonic()
        db, entries = request.db, plan["entries"]
        conn = self.connection(db, request.place, plan["bucket"])
        request.log.info("%s: %s", db.name, plan["says"])
        if not plan["exists"]:
            with conn.mapped("create the target bucket"):
                conn.client().create_bucket(Bucket=plan["bucket"])
            request.log.info("%s: created bucket %s", db.name, plan["bucket"])
        wanted_all = set(plan["upload"])
        etags: dict[str, str] = {}
        for path, record in plan["files"]:
            wanted = {key: entries[key]["sha256"] for key in wanted_all if entries[key].get("in") == path.name}
            if not wanted:
                continue
            decode = self.decode(request, path, record)
            with tempfile.TemporaryDirectory(prefix="lemon-s3-upload-") as work:
                wanted_file, result_file = Path(work) / "wanted.json", Path(work) / "uploaded.json"
                wanted_file.write_text(json.dumps(wanted), encoding="utf-8")
                job = self.job(
                    db,
                    target_bucket=plan["bucket"],
                    target_prefix=plan["prefix"],
                    wanted=str(wanted_file),
                    result_out=str(result_file),
                )
                stage = self.helper("upload objects", "upload", request.place, job)
                result = run_pipeline([*decode, stage], TailSink(4096), source=path)
                try:
                    result.raise_for_status()
                except ToolError as exc:
                    raise RunFailed(
                        f"restore into bucket '{plan['bucket']}' failed: {exc}; objects uploaded so far stay "
                        "(run the restore again: it uploads what is still missing)"
                    ) from None
                uploaded = json.loads(result_file.read_text(encoding="utf-8"))["uploaded"]
            missing = set(wanted) - set(uploaded)
            if missing:
                raise RunFailed(
                    f"{path.name} does not hold {len(missing)} object(s) it should, e.g. {sorted(missing)[0]}"
                )
            etags.update(uploaded)
            request.log.info("%s: uploaded %s object(s) from %s", db.name, len(uploaded), path.name)
        deleted = 0
        if request.delete_extra and plan["extra"]:
            client = conn.client()
            extra = plan["extra"]
            with conn.mapped("delete objects not in the backup"):
                for start in range(0, len(extra), 1000):
                    batch = [{"Key": key} for key in extra[start : start + 1000]]
                    client.delete_objects(Bucket=plan["bucket"], Delete={"Objects": batch, "Quiet": True})
            deleted = len(extra)
            request.log.info("%s: deleted %s object(s) not in the backup (--delete-extra)", db.name, deleted)
        there = self.listing(conn, plan["scope"]) or {}
        wrong = []
        for key, entry in entries.items():
            seen = there.get(plan["prefix"] + key)
            if key in etags:
                ok = seen is not None and seen[0] == entry["size"] and seen[1] == etags[key]
            else:
                ok = self.same(entry, seen)
            if not ok:
                wrong.append(key)
        if wrong:
            raise RunFailed(
                f"after the restore {len(wrong)} object(s) in bucket '{plan['bucket']}' differ from the backup "
                f"(size or checksum), e.g. {wrong[0]}"
            )
        if request.delete_extra and any(k not in {plan["prefix"] + e for e in entries} for k in there):
            raise RunFailed(f"bucket '{plan['bucket']}' still holds objects that are not in the backup")
        prefixes = {p for p in (request.record.get("engine_meta") or {}).get("prefixes", {})}
        return {
            "target": plan["bucket"] + ("/" + plan["prefix"].rstrip("/") if plan["prefix"] else ""),
            "previous": None,
            "tables": len(prefixes),
            "rows": len(entries),
            "uploaded": len(etags),
            "deleted": deleted,
            "seconds": round(time.monotonic() - started, 3),
        }

    def drop_database(self, db: DatabaseSpec, place: Place, name: str) -> bool:
        """Delete the drill's scratch bucket ``name`` with everything in it."""
        bucket = name.partition("/")[0]
        try:
            conn = self.connection(db, place, bucket)
            client = conn.client()
            if self.listing(conn, [""]) is None:
                return True
            for attempt in range(3):  # uploads of a killed drill still in flight land after a listing
                try:
                    with conn.mapped("delete the scratch bucket"):
                        for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket):
                            batch = [
                                {"Key": v["Key"], "VersionId": v["VersionId"]}
                                for v in page.get("Versions", []) + page.get("DeleteMarkers", [])
                            ]
                            if batch:
                                client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
                        client.delete_bucket(Bucket=bucket)
                    break
                except RunFailed as exc:
                    if "BucketNotEmpty" not in str(exc) or attempt == 2:
                        raise
                    time.sleep(1)
        except (RunFailed, EnvironmentProblem) as exc:
            log.warning("%s: could not delete scratch bucket %s (%s); delete it by hand", db.name, bucket, exc)
            return False
        return True
