"""Buckets as a source (engine s3) against a real S3 HTTP server (moto's server mode on a loopback
port): a few hundred small objects with Korean keys, nested prefixes, zero-byte objects, user
metadata and content types; a full backup, then incrementals after adds, changes and deletes;
every point restored into a new bucket and compared object by object; in-place restores (missing
objects back, newer ones left alone or deleted with --delete-extra); a corrupt middle file refused
before anything is uploaded; chain-aware retention; killed backups leaving nothing; a drill."""

from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import ROOT, with_fixed_tier
from s3server import S3Server, moto_process
from sshd import free_port

from lib import store

KEY_ID, SECRET = "AKIAZZSOURCEKEY00042", "source-secret/Zq9+never-to-be-seen"
CREDS = {"MEDIA_KEY": KEY_ID, "MEDIA_SECRET": SECRET, "BACKUP_PASSPHRASE": "correct horse battery"}


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    yield server
    server.stop()


def media_config(server: S3Server, bucket: str, **extra) -> dict:
    db = {
        "engine": "s3",
        "bucket": bucket,
        "endpoint_url": server.url,
        "prefixes": ["dm-images/", "dm-voice/"],
        "access_key_env": "MEDIA_KEY",
        "secret_key_env": "MEDIA_SECRET",
        "incremental": True,
        **extra,
    }
    return {"version": 1, "backup_dir": "./backups", "databases": {"media": db}}


def fill(server: S3Server, bucket: str, count: int = 240, seed: int = 7) -> None:
    """``count`` small objects under dm-images/ and dm-voice/ (Korean names, nested folders,
    zero-byte ones, metadata), plus a few outside the configured prefixes."""
    rng = random.Random(seed)
    client = server.client()
    for i in range(count):
        folder = ["dm-images/대화/사진", "dm-images/2026/12/02", "dm-voice/음성 메시지", "dm-voice"][i % 4]
        size = 0 if i % 17 == 0 else rng.randint(1, 3000)
        kind = "image/jpeg" if folder.startswith("dm-images") else "audio/ogg"
        client.put_object(
            Bucket=bucket,
            Key=f"{folder}/메시지-{i:04d}.bin",
            Body=rng.randbytes(size),
            ContentType=kind,
            Metadata={"sender": f"user-{i % 9}", "room": "room-1"},
        )
    client.put_object(Bucket=bucket, Key="other/not-backed-up.txt", Body=b"outside the prefixes")


def snapshot(server: S3Server, bucket: str, prefix: str = "", under: tuple[str, ...] = ("dm-images/", "dm-voice/")):
    """key (without ``prefix``) -> (sha256, size, content type, metadata) of the objects under the
    backed-up prefixes."""
    client = server.client()
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            key = item["Key"][len(prefix) :]
            if not key.startswith(under):
                continue
            got = client.get_object(Bucket=bucket, Key=item["Key"])
            data = got["Body"].read()
            found[key] = (hashlib.sha256(data).hexdigest(), len(data), got["ContentType"], got["Metadata"])
    return found


def buckets(server: S3Server) -> set[str]:
    return {b["Name"] for b in server.client().list_buckets()["Buckets"]}


def run(workspace, *args, **kwargs):
    return workspace.invoke(*args, env=CREDS, **kwargs)


def stored(workspace, name: str = "media") -> list[store.Backup]:
    """Backups of ``name``, oldest first."""
    return list(reversed(store.list_backups(workspace.backup_dir, name)))


def test_full_then_incrementals_and_every_point_restores_object_by_object(workspace, s3):
    bucket = s3.bucket()
    fill(s3, bucket)
    client = s3.client()
    big = random.Random(1).randbytes(9 << 20)  # larger than the helper's whole-object limit: streamed
    client.put_object(Bucket=bucket, Key="dm-voice/긴 녹음.ogg", Body=big, ContentType="audio/ogg")
    workspace.write_config(media_config(s3, bucket))
    points = []

    dry = run(workspace, "backup", "--all", "--dry-run")
    assert dry.returncode == 0 and "daily backup (full: no earlier verified backup) ->" in dry.stdout, dry.stdout
    first = run(workspace, "backup", "--all")
    assert first.returncode == 0, first.stderr
    points.append(snapshot(s3, bucket))
    assert len(points[0]) == 241 and "other/not-backed-up.txt" not in points[0]
    dry = run(workspace, "backup", "--all", "--dry-run")
    assert f"daily backup (incremental on daily/{stored(workspace)[0].path.name}) ->" in dry.stdout, dry.stdout

    # adds, a changed content, a changed metadata (same content), deletes
    client.put_object(Bucket=bucket, Key="dm-images/새 사진.png", Body=b"\x89PNG new", ContentType="image/png")
    client.put_object(Bucket=bucket, Key="dm-images/빈 파일", Body=b"")
    client.put_object(Bucket=bucket, Key="dm-voice/메시지-0003.bin", Body=b"changed", ContentType="audio/ogg")
    time.sleep(1.1)  # a new Last-Modified second for the copy below
    client.copy_object(
        Bucket=bucket,
        Key="dm-images/대화/사진/메시지-0004.bin",
        CopySource={"Bucket": bucket, "Key": "dm-images/대화/사진/메시지-0004.bin"},
        Metadata={"sender": "someone-else"},
        MetadataDirective="REPLACE",
        ContentType="image/webp",
    )
    for i in (8, 12, 16):
        client.delete_object(Bucket=bucket, Key=f"dm-images/대화/사진/메시지-{i:04d}.bin")
    second = run(workspace, "backup", "--all")
    assert second.returncode == 0, second.stderr
    points.append(snapshot(s3, bucket))

    client.delete_object(Bucket=bucket, Key="dm-voice/긴 녹음.ogg")
    client.put_object(Bucket=bucket, Key="dm-voice/마지막.ogg", Body=b"last", Metadata={"x": "1"})
    third = run(workspace, "backup", "--all")
    assert third.returncode == 0, third.stderr
    points.append(snapshot(s3, bucket))

    full, inc1, inc2 = stored(workspace)
    assert full.record["chain"] == {"kind": "full"}
    assert inc1.record["chain"]["parent"] == {"tier": "daily", "file": full.path.name}
    assert inc2.record["chain"]["parent"] == {"tier": "daily", "file": inc1.path.name}
    assert full.record["engine_meta"]["objects"] == 241 and full.record["engine_meta"]["stored_objects"] == 241
    assert inc1.record["engine_meta"]["objects"] == 240  # +2 new, -3 deleted
    assert inc1.record["engine_meta"]["stored_objects"] == 4  # 2 new, 1 changed, 1 with new metadata
    assert inc2.record["engine_meta"]["stored_objects"] == 1
    assert inc1.path.stat().st_size < full.path.stat().st_size / 100
    assert all(store.manifest_path(b.path).stat().st_mode & 0o777 == 0o600 for b in (full, inc1, inc2))

    listing = run(workspace, "list")
    assert listing.returncode == 0, listing.stderr
    assert f"incremental on daily/{inc1.path.name}" in listing.stdout and "; full" in listing.stdout
    verify = run(workspace, "verify", "--file", str(inc2.path))
    assert verify.returncode == 0, verify.stderr
    assert all(b.path.name in verify.stderr for b in (full, inc1, inc2))  # the whole chain was re-read

    for index, backup in enumerate((full, inc1, inc2)):
        target = f"restored-{index}-{bucket}"
        done = run(workspace, "restore", "--engine", "s3", "--file", str(backup.path), "--into", target, "--yes")
        assert done.returncode == 0, done.stderr
        assert snapshot(s3, target) == points[index], f"point {index}"
    # --into BUCKET/PREFIX puts the objects under the prefix
    done = run(
        workspace, "restore", "--engine", "s3", "--file", "latest", "--into", f"restored-0-{bucket}/복원", "--yes"
    )
    assert done.returncode == 0, done.stderr
    assert snapshot(s3, f"restored-0-{bucket}", prefix="복원/") == points[2]

    everything = "".join(p.read_text(errors="replace") for p in workspace.path.rglob("*") if p.is_file())
    for output in (first, second, third, listing, verify, done):
        everything += output.stdout + output.stderr
    assert SECRET not in everything and KEY_ID not in everything


def test_in_place_restore_brings_back_what_is_missing_and_leaves_newer_objects_unless_asked(workspace, s3):
    bucket = s3.bucket()
    fill(s3, bucket, count=60, seed=3)
    workspace.write_config(media_config(s3, bucket))
    assert run(workspace, "backup", "--all").returncode == 0
    expected = snapshot(s3, bucket)
    client = s3.client()
    client.delete_object(Bucket=bucket, Key="dm-voice/메시지-0003.bin")
    client.put_object(Bucket=bucket, Key="dm-images/대화/사진/메시지-0000.bin", Body=b"overwritten by mistake")
    client.put_object(Bucket=bucket, Key="dm-images/after-the-backup.jpg", Body=b"new")

    refused = workspace.invoke("restore", "--engine", "s3", "--file", "latest", env=CREDS)
    assert refused.returncode == 2 and "--yes" in refused.stderr

    kept = run(workspace, "restore", "--engine", "s3", "--file", "latest", "--yes")
    assert kept.returncode == 0, kept.stderr
    assert (
        "upload 2 missing or changed object(s)" in kept.stderr
        and "keep 58 unchanged, 1 not in the backup left alone" in kept.stderr
    )
    now = snapshot(s3, bucket)
    assert {k: v for k, v in now.items() if k != "dm-images/after-the-backup.jpg"} == expected
    assert "dm-images/after-the-backup.jpg" in now

    wiped = run(workspace, "restore", "--engine", "s3", "--file", "latest", "--yes", "--delete-extra")
    assert wiped.returncode == 0, wiped.stderr
    assert "upload 0 missing" in wiped.stderr and "DELETED (--delete-extra)" in wiped.stderr
    assert snapshot(s3, bucket) == expected
    assert "other/not-backed-up.txt" in s3.keys(bucket)  # outside the backup's prefixes: never touched


def test_a_corrupt_middle_file_is_refused_before_anything_is_uploaded(workspace, s3):
    bucket = s3.bucket()
    fill(s3, bucket, count=40, seed=5)
    workspace.write_config(media_config(s3, bucket))
    client = s3.client()
    for round_ in range(3):
        client.put_object(Bucket=bucket, Key=f"dm-images/round-{round_}", Body=random.randbytes(5000))
        assert run(workspace, "backup", "--all").returncode == 0
    full, middle, last = stored(workspace)
    data = bytearray(middle.path.read_bytes())
    data[len(data) // 2] ^= 0x55
    middle.path.write_bytes(bytes(data))

    target = f"never-{bucket}"
    refused = run(workspace, "restore", "--engine", "s3", "--file", str(last.path), "--into", target, "--yes")
    assert refused.returncode == 1
    assert middle.path.name in refused.stderr and "sha256" in refused.stderr
    assert target not in buckets(s3)  # not even created

    verify = run(workspace, "verify")
    assert verify.returncode == 1 and "1 backup(s) failed" in verify.stderr

    # a chain missing its middle is refused too, and the next backup is a full one
    store.delete(middle)
    missing = run(workspace, "restore", "--engine", "s3", "--file", str(last.path), "--into", target, "--yes")
    assert missing.returncode == 1 and "missing" in missing.stderr and target not in buckets(s3)
    assert "misses a backup" in run(workspace, "verify").stderr
    assert run(workspace, "backup", "--all").returncode == 0
    assert stored(workspace)[-1].record["chain"] == {"kind": "full"}


def fake(tier: str, name: str, age_days: float, parent: tuple[str, str] | None = None) -> store.Backup:
    chain = {"kind": "incremental", "parent": {"tier": parent[0], "file": parent[1]}} if parent else {"kind": "full"}
    created = store.utcnow() - timedelta(days=age_days)
    record = {
        "file": name,
        "name": "media",
        "tier": tier,
        "created": store.iso(created),
        "verified": {"ok": True},
        "chain": chain,
    }
    return store.Backup(Path(f"/nowhere/media/{tier}/{name}"), record)


def test_retention_never_deletes_a_backup_that_a_kept_one_builds_on():
    keep = {"daily": 7, "weekly": 30, "monthly": 90}
    full = fake("monthly", "backup_a.tar.zst", 120)  # past monthly keep_days
    old = fake("daily", "backup_b.tar.zst", 20, ("monthly", "backup_a.tar.zst"))  # past daily keep_days
    weekly = fake("weekly", "backup_c.tar.zst", 10, ("daily", "backup_b.tar.zst"))  # kept: within 30 days
    lone = fake("daily", "backup_d.tar.zst", 15)  # an old full nothing builds on
    newest = fake("daily", "backup_e.tar.zst", 1, ("daily", "backup_d.tar.zst"))
    doomed = store.plan_retention([full, old, weekly, lone, newest], keep, store.utcnow())
    assert doomed == []  # full and old: the weekly builds on them; lone: the newest does

    newer_full = fake("monthly", "backup_f.tar.zst", 2)
    newest2 = fake("daily", "backup_g.tar.zst", 1, ("monthly", "backup_f.tar.zst"))
    expired_weekly = fake("weekly", "backup_c.tar.zst", 40, ("daily", "backup_b.tar.zst"))
    latest_weekly = fake("weekly", "backup_h.tar.zst", 3, ("monthly", "backup_f.tar.zst"))
    doomed = store.plan_retention([full, old, expired_weekly, latest_weekly, newer_full, newest2], keep, store.utcnow())
    assert {b.path.name for b in doomed} == {"backup_a.tar.zst", "backup_b.tar.zst", "backup_c.tar.zst"}
    assert store.chain_of(newest2, [newer_full, newest2]) == [newer_full, newest2]
    assert store.chain_of(weekly, [weekly, full]) is None


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_backup_leaves_no_partial_backup(workspace, s3, how):
    bucket = s3.bucket()
    client = s3.client()
    for i in range(40):
        client.put_object(Bucket=bucket, Key=f"dm-voice/{i:03d}.ogg", Body=random.randbytes(1 << 20))
    workspace.write_config(media_config(s3, bucket, concurrency=1, incremental=False))
    argv = [sys.executable, "-m", "invoke", "-r", str(ROOT), *with_fixed_tier(["backup", "--all"])]
    argv += ["--config", str(workspace.config)]
    proc = subprocess.Popen(
        argv, cwd=workspace.path, env={**workspace.env, **CREDS}, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    tier = workspace.backup_dir / "media" / "daily"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not list(tier.glob(".tmp-*")):
        time.sleep(0.02)
    time.sleep(0.3)  # well into the fetch
    assert proc.poll() is None, "the backup ended before it could be killed"
    proc.send_signal(how)
    proc.communicate(timeout=30)
    assert proc.returncode in (143, -signal.SIGKILL)
    assert store.list_backups(workspace.backup_dir, "media") == []
    assert not [p for p in tier.iterdir() if not p.name.startswith(".tmp-")]
    if how == signal.SIGTERM:
        assert list(tier.iterdir()) == []
    after = run(workspace, "backup", "--all")  # cleans what a SIGKILL left, then works
    assert after.returncode == 0, after.stderr
    assert not list(tier.glob(".tmp-*")) and len(stored(workspace)) == 1


def test_drill_restores_into_a_scratch_bucket_and_deletes_it(workspace, s3):
    bucket = s3.bucket()
    fill(s3, bucket, count=30, seed=9)
    config = media_config(s3, bucket)
    config["monitoring"] = {"prometheus_textfile": str(workspace.path / "media.prom")}
    workspace.write_config(config)
    assert run(workspace, "backup", "--all").returncode == 0
    before = buckets(s3)
    drill = run(workspace, "drill")
    assert drill.returncode == 0, drill.stderr
    assert "drill PASSED" in drill.stderr and "30 objects" in drill.stderr
    assert buckets(s3) == before  # the scratch bucket is gone
    assert not (workspace.backup_dir / "media" / "drill-scratch.json").exists()  # and so is its marker
    result = json.loads((workspace.backup_dir / "media" / "drills.json").read_text())
    last = result[-1] if isinstance(result, list) else result
    assert "-drill-" in json.dumps(last)
    status = run(workspace, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    # a bucket is described by what it holds: objects and bytes, drills in objects (not rows)
    assert "; 30 objects, " in status.stdout and "30 objects)" in status.stdout and "rows" not in status.stdout
    newest = json.loads(run(workspace, "status", "--json").stdout)["databases"]["media"]["newest_verified"]
    assert newest["objects"] == 30 and newest["bytes"] == sum(v[1] for v in snapshot(s3, bucket).values())
    metrics = (workspace.path / "media.prom").read_text()
    assert 'lemon_backup_last_objects{database="media"} 30' in metrics
    assert f'lemon_backup_last_source_bytes{{database="media"}} {newest["bytes"]}' in metrics


def test_config_of_a_bucket_source(workspace, s3):
    workspace.write_config(media_config(s3, "Bad_Bucket"))
    bad = run(workspace, "validate")
    assert bad.returncode == 2 and "databases.media.bucket" in bad.stderr and "Traceback" not in bad.stderr
    good = media_config(s3, "lemon-media")
    good["databases"]["pg"] = {"engine": "postgres", "database": "x", "host": "127.0.0.1"}
    workspace.write_config(good)
    ok = workspace.invoke("validate", env={**CREDS, "DB_NAME": "other", "DB_USER": "someone"})
    assert ok.returncode == 0, ok.stderr  # the old scripts' variables name databases, not buckets
    unset = workspace.invoke("backup", "--db", "media", env={"MEDIA_KEY": KEY_ID})
    assert unset.returncode == 2 and "$MEDIA_SECRET" in unset.stderr
    slash = media_config(s3, "lemon-media", prefixes=["/dm-voice/"])
    workspace.write_config(slash)
    refused = run(workspace, "validate")
    assert refused.returncode == 2 and "'/dm-voice/': a key prefix such as dm-images/" in refused.stderr


def test_a_prefix_that_holds_nothing_is_warned_about_and_counted_as_zero(workspace, s3):
    bucket = s3.bucket()
    fill(s3, bucket, count=4, seed=5)
    workspace.write_config(media_config(s3, bucket, prefixes=["dm-images/", "dm-voic/"]))
    made = run(workspace, "backup", "--all")
    assert made.returncode == 0, made.stderr
    assert "prefix 'dm-voic/' of bucket" in made.stderr and "holds no objects" in made.stderr
    assert "2 objects, " in made.stderr  # the log line counts objects and bytes
    [backup] = stored(workspace)
    assert backup.record["engine_meta"]["prefixes"] == {"dm-images/": 2, "dm-voic/": 0}


def test_an_encrypted_incremental_restores_from_an_off_site_copy_with_its_chain(workspace, s3):
    bucket = s3.bucket()
    fill(s3, bucket, count=30, seed=11)
    config = media_config(s3, bucket)
    (workspace.path / "gnupg").mkdir(mode=0o700)
    config["encryption"] = {
        "mode": "symmetric",
        "passphrase_env": "BACKUP_PASSPHRASE",
        "gnupghome": str(workspace.path / "gnupg"),
    }
    (workspace.path / "nas").mkdir()
    config["destinations"] = [{"name": "nas", "type": "rsync", "target": str(workspace.path / "nas")}]
    workspace.write_config(config)
    assert run(workspace, "backup", "--all").returncode == 0
    s3.client().put_object(Bucket=bucket, Key="dm-images/later.jpg", Body=b"later")
    s3.client().delete_object(Bucket=bucket, Key="dm-voice/메시지-0003.bin")
    second = run(workspace, "backup", "--all")
    assert second.returncode == 0, second.stderr
    expected = snapshot(s3, bucket)
    assert [b.path.name.endswith(".tar.zst.gpg") for b in stored(workspace)] == [True, True]
    assert stored(workspace)[1].record["chain"]["kind"] == "incremental"
    listed = run(workspace, "list", "--dest", "nas").stdout
    assert f"; incremental on daily/{stored(workspace)[0].path.name}" in listed and "; full" in listed, listed
    for backup in stored(workspace):  # the local backups are lost
        store.delete(backup)
    target = f"from-nas-{bucket}"
    done = run(workspace, "restore", "--engine", "s3", "--from", "nas", "--file", "latest", "--into", target, "--yes")
    assert done.returncode == 0, done.stderr
    assert snapshot(s3, target) == expected


def archive(
    objects: dict[str, bytes], manifest_extra: dict | None = None, lie: str | None = None, kind="full"
) -> bytes:
    """A bucket archive as the helper writes it; ``lie``: the key whose manifest sha256 is wrong."""
    import io
    import tarfile

    from lib.engines import s3tar

    out = io.BytesIO()
    tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8")  # noqa: SIM115
    s3tar.json_member(tar, s3tar.HEADER_NAME, {"format": 1, "bucket": "b", "prefixes": [""], "kind": kind})
    entries = []
    for key, data in objects.items():
        entry = {
            "key": key,
            "size": len(data),
            "etag": "x",
            "last_modified": "2026-12-01T00:00:00Z",
            "content_type": "",
            "metadata": {},
            "headers": {},
        }
        tar.addfile(s3tar.object_member(entry), s3tar._Bytes(data))
        sha = hashlib.sha256(b"other" if key == lie else data).hexdigest()
        entries.append({**entry, "sha256": sha, "in": "f", "stored": True})
    s3tar.json_member(
        tar, s3tar.MANIFEST_NAME, {"kind": kind, "prefixes": [""], "objects": entries, **(manifest_extra or {})}
    )
    tar.close()
    return out.getvalue()


def inspect(data: bytes) -> dict:
    helper = ROOT / "lib" / "engines" / "s3tar.py"
    proc = subprocess.run([sys.executable, "-I", str(helper), "inspect"], input=data, capture_output=True, check=True)
    return json.loads(proc.stdout)


def test_the_archive_check_catches_what_a_compressor_cannot():
    objects = {"dm-images/사진.jpg": b"jpeg bytes", "dm-voice/빈": b"", "dm-images/a/b/c/" + "긴" * 60: b"long key"}
    good = inspect(archive(objects))
    assert good["complete"] and good["objects"] == 3 and good["bytes"] == 18
    lied = inspect(archive(objects, lie="dm-images/사진.jpg"))
    assert not lied["complete"] and "dm-images/사진.jpg: sha256" in lied["error"]
    whole = archive(objects)
    cut = inspect(whole[: len(whole) // 2])
    assert not cut["complete"]
    missing = archive(objects, manifest_extra={"objects": []})
    assert "not in the manifest" in inspect(missing)["error"]


def test_restore_refuses_a_bad_or_foreign_target_bucket_before_anything(workspace, s3):
    config = media_config(s3, "lemon-media")
    config["databases"]["archive"] = {**config["databases"]["media"], "bucket": "lemon-archive"}
    workspace.write_config(config)
    base = ("restore", "--engine", "s3", "--db", "media", "--file", "latest", "--yes", "--into")
    foreign = run(workspace, *base, "lemon-archive/copy")
    assert foreign.returncode == 2 and "configures as 'archive'" in foreign.stderr
    bad = run(workspace, *base, "Not_A_Bucket")
    assert bad.returncode == 2 and "not a valid bucket name" in bad.stderr
    postgres_flag = run(workspace, "restore", "--engine", "postgres", "--file", "latest", "--delete-extra", "--yes")
    assert postgres_flag.returncode == 2 and "--delete-extra is for bucket restores" in postgres_flag.stderr


@pytest.fixture(scope="module")
def s3_with_auth():
    """A second moto server that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=0: every key is
    unknown to it), in its own process: the module's server accepts any key."""
    proc, url = moto_process({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def test_wrong_keys_and_an_unreachable_endpoint_are_one_line_naming_the_fix(workspace, s3, s3_with_auth):
    bucket = s3.bucket()
    fill(s3, bucket, count=4, seed=3)
    workspace.write_config(media_config(s3, bucket))
    assert run(workspace, "backup", "--all").returncode == 0
    [made] = [b.path for b in stored(workspace)]
    dead = media_config(s3, bucket)
    dead["databases"]["media"]["endpoint_url"] = f"http://127.0.0.1:{free_port()}"
    cases = [
        (media_config(s3, bucket), s3_with_auth, "the server refused the credentials", "$MEDIA_KEY and $MEDIA_SECRET"),
        (dead, None, "cannot connect to", "check endpoint_url"),
    ]
    for config, url, problem, fix in cases:
        if url:
            config["databases"]["media"]["endpoint_url"] = url
        workspace.write_config(config)
        for args in (
            ("backup", "--all"),
            ("restore", "--engine", "s3", "--file", str(made), "--into", "x-copy", "--yes"),
        ):
            result = run(workspace, *args)
            text = result.stdout + result.stderr
            assert result.returncode == 1, text
            assert problem in text and fix in text, text
            assert "Traceback" not in text and SECRET not in text and KEY_ID not in text, text


def test_the_fast_timestamp_parser_agrees_with_botocores():
    from botocore.parsers import DEFAULT_TIMESTAMP_PARSER

    from lib.s3client import fast_timestamp

    for value in (
        "2026-12-02T03:27:34.000Z",  # ListObjectsV2
        "2026-12-02T03:27:34.123456Z",
        "2026-12-02T03:27:34Z",
        "Wed, 02 Dec 2026 03:27:34 GMT",  # Last-Modified header
        "2026-12-02T03:27:34+09:00",
        "1764645000",  # epoch seconds
    ):
        assert fast_timestamp(value) == DEFAULT_TIMESTAMP_PARSER(value), value
    assert fast_timestamp("2026-12-02T03:27:34.000Z").utcoffset().total_seconds() == 0


def test_a_newest_backup_whose_chain_lost_a_file_is_a_problem_until_a_full_one_is_made(workspace, s3):
    bucket = s3.bucket()
    fill(s3, bucket, count=4, seed=11)
    workspace.write_config(media_config(s3, bucket))
    for _ in range(3):
        assert run(workspace, "backup", "--all").returncode == 0
    full, middle, newest = stored(workspace)
    assert (newest.record["chain"]["kind"], middle.record["chain"]["kind"]) == ("incremental", "incremental")
    store.delete(middle)
    listing = run(workspace, "list").stdout
    assert listing.count("CHAIN BROKEN") == 1 and newest.path.name in listing.split("CHAIN BROKEN")[0].splitlines()[-1]
    status = run(workspace, "status")
    assert status.returncode == 1 and f"{newest.path.name} cannot be restored" in status.stdout, status.stdout
    latest = run(workspace, "restore", "--engine", "s3", "--file", "latest", "--into", "x-broken", "--yes")
    assert latest.returncode == 1 and f"e.g. --file {full.path}" in latest.stderr, latest.stderr
    again = run(workspace, "backup", "--all")
    assert again.returncode == 0 and "full backup (the chain of" in again.stderr, again.stderr
    assert run(workspace, "status").returncode == 0


def test_the_scratch_bucket_of_a_killed_drill_is_reported_and_deleted_by_doctor(workspace, s3):
    bucket = s3.bucket()
    fill(s3, bucket, count=4, seed=13)
    workspace.write_config(media_config(s3, bucket))
    assert run(workspace, "backup", "--all").returncode == 0
    # what a drill killed with SIGKILL halfway leaves: its marker and a half-filled scratch bucket
    scratch = f"{bucket[:30].rstrip('.-')}-drill-20261201-020000"
    s3.client().create_bucket(Bucket=scratch)
    s3.client().put_object(Bucket=scratch, Key="dm-voice/메시지-0002.bin", Body=b"copy of a media file")
    marker = workspace.backup_dir / "media" / "drill-scratch.json"
    marker.write_text(json.dumps({"target": scratch, "started": "2026-12-01T02:00:00Z"}))
    status = run(workspace, "status")
    assert status.returncode == 1 and f"leftover scratch bucket {scratch} of an interrupted drill" in status.stdout
    assert scratch in buckets(s3)  # status only reports
    doctor = run(workspace, "doctor")
    assert doctor.returncode == 0 and f"deleted scratch bucket {scratch}" in doctor.stderr, doctor.stderr
    assert scratch not in buckets(s3) and not marker.exists()
    assert run(workspace, "status").returncode == 0
