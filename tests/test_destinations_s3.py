"""S3 destinations against a real S3 HTTP server (moto's server mode on a loopback port): multipart
uploads verified by our own part checksums, a server going away mid-upload, catch-up, remote
retention with foreign and locked objects, validation, dest-check, credentials kept out of
everything, and the real tasks end to end with PostgreSQL (backup, list --dest, restore --from,
drill --from), including a copy changed on the server."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from s3server import S3Server
from test_destinations import make_backup

from lib import offsite, store
from lib.config import load_spec, validation_errors
from lib.destinations import configured
from lib.destinations.base import DestinationFailed, DestinationRefused
from lib.exec import child_env

MIB = 1 << 20
#: the tool's credentials, as its environment holds them (moto accepts any)
KEY_ID, SECRET = "AKIAZZTOOLKEY0000042", "tool-secret/Xq7+never-to-be-seen"
CREDS = {"S3_KEY_ID": KEY_ID, "S3_SECRET": SECRET}


@pytest.fixture(scope="session")
def s3():
    server = S3Server().start()
    yield server
    server.stop()


def s3_block(server: S3Server, bucket: str, **extra) -> dict:
    block = {
        "name": "cloud",
        "type": "s3",
        "bucket": bucket,
        "prefix": "lemon/prod",
        "endpoint_url": server.url,
        "region": "us-east-1",
        "access_key_env": "S3_KEY_ID",
        "secret_key_env": "S3_SECRET",
        "part_size_mib": 5,
        "concurrency": 2,
        "retries": 0,
        "backoff_seconds": 0,
        "timeout": 10,
    }
    block.update(extra)
    return block


def spec_for(path: Path, destinations: list[dict]):
    config = {
        "version": 1,
        "backup_dir": "./backups",
        "databases": {"pg": {"engine": "postgres", "database": "x", "host": "127.0.0.1"}},
        "destinations": destinations,
    }
    (path / "backup.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    return load_spec(path / "backup.yml", environ=CREDS)


def key_of(backup: store.Backup, suffix: str = "") -> str:
    return f"lemon/prod/pg/{backup.tier}/{backup.path.name}{suffix}"


def flip_a_byte(server: S3Server, bucket: str, key: str) -> None:
    """Change an object on the server behind the tool's back (same size, one byte different)."""
    client = server.client()
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))


# -- configuration -----------------------------------------------------------------------------


def test_schema_accepts_s3_and_names_mistakes_without_echoing_secrets():
    base = {"version": 1, "databases": {"pg": {"engine": "postgres", "database": "x"}}}
    good = {
        "name": "s",
        "type": "s3",
        "bucket": "lemon-backups",
        "prefix": "prod",
        "endpoint_url": "https://minio.example.com:9000",
        "addressing": "path",
        "storage_class": "STANDARD_IA",
        "server_side_encryption": {"algorithm": "aws:kms", "kms_key_id": "alias/backups"},
        "ca_bundle": "/etc/ssl/ca.pem",
        "part_size_mib": 8,
        "object_lock": {"mode": "compliance", "days": 10},
        "access_key_env": "S3_KEY_ID",
        "secret_key_env": "S3_SECRET",
    }
    assert validation_errors({**base, "destinations": [good, {"name": "t", "type": "s3", "bucket": "abc"}]}) == []
    bad = [
        {"name": "a", "type": "s3"},
        {"name": "b", "type": "s3", "bucket": "abc", "access_key_env": KEY_ID, "secret_key_env": SECRET},
        {"name": "c", "type": "s3", "bucket": "abc", "access_key_env": "S3_KEY_ID"},
        {"name": "d", "type": "s3", "bucket": "abc", "part_size_mib": 1, "addressing": "dns"},
        {"name": "e", "type": "s3", "bucket": "abc", "object_lock": {"mode": "forever"}, "secret_key": "x"},
    ]
    errors = validation_errors({**base, "destinations": bad})
    text = "\n".join(errors)
    assert "At 'destinations[0]': 'bucket' is a required property" in errors
    assert "At 'destinations[1].secret_key_env': must be the NAME of an environment variable" in text
    assert SECRET not in text and KEY_ID not in text  # a secret pasted in the wrong place is never echoed
    assert any(e.startswith("At 'destinations[2]'") and "secret_key_env" in e for e in errors)
    assert any(e.startswith("At 'destinations[3].part_size_mib'") for e in errors)
    assert any(e.startswith("At 'destinations[3].addressing'") for e in errors)
    assert any(e.startswith("At 'destinations[4].object_lock.mode'") for e in errors)
    assert any(e.startswith("At 'destinations[4]'") and "'secret_key'" in e for e in errors)


def test_credentials_stay_out_of_children_and_boto3_is_imported_only_for_s3(tmp_path, monkeypatch, s3):
    import subprocess
    import sys

    for name, value in CREDS.items():
        monkeypatch.setenv(name, value)
    spec = spec_for(tmp_path, [s3_block(s3, "unused-bucket")])
    assert {"S3_KEY_ID", "S3_SECRET"} <= spec.secret_env_names
    assert not {"S3_KEY_ID", "S3_SECRET"} & set(child_env())  # pg_dump, gpg, ssh never get them
    # a run without S3 destinations does not import boto3 (as paramiko only for sftp)
    code = (
        "import sys; from lib.config import load_spec; from lib import destinations; "
        f"spec = load_spec({str(tmp_path / 'plain.yml')!r}, environ={{}}); destinations.configured(spec); "
        "print('boto3' in sys.modules)"
    )
    (tmp_path / "plain.yml").write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "databases": {"pg": {"engine": "postgres", "database": "x"}},
                "destinations": [{"name": "n", "type": "rsync", "target": str(tmp_path)}],
            }
        )
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- push, list, fetch, catch-up ---------------------------------------------------------------------


def test_multipart_push_is_verified_recorded_and_caught_up(tmp_path, s3):
    bucket = s3.bucket()
    spec = spec_for(tmp_path, [s3_block(s3, bucket)])
    older = make_backup(spec.backup_dir, timedelta(hours=30), size=300_000)
    big = make_backup(spec.backup_dir, timedelta(hours=2), size=17 * MIB + 12345)  # 4 parts of 5 MiB

    [dest] = configured(spec)
    sent = []  # (operation, headers, body) of every request the tool makes

    def capture(request, **kwargs):
        headers = {k: v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()}
        sent.append((kwargs["event_name"].rsplit(".", 1)[-1], headers, request.url))

    dest.client().meta.events.register("before-send.s3", capture)
    with dest:
        assert offsite.sync_database(dest, spec, spec.databases["pg"]).pushed == [
            f"daily/{big.path.name}",
            f"daily/{older.path.name}",
        ]
    checked = []
    for operation, headers, url in sent:
        if operation != "UploadPart":
            continue
        backup = big if big.path.name in url else older
        number = int(parse_qs(urlsplit(url).query)["partNumber"][0])
        part = backup.path.read_bytes()[(number - 1) * 5 * MIB : number * 5 * MIB]
        # each part carries the checksum we computed over its bytes
        assert headers["x-amz-checksum-sha256"] == base64.b64encode(hashlib.sha256(part).digest()).decode()
        checked.append((backup.path.name, number))
    assert sorted(checked) == sorted([(big.path.name, n) for n in (1, 2, 3, 4)] + [(older.path.name, 1)])
    assert not [h for _, h, _ in sent if any(k.lower().startswith("x-amz-checksum-crc") for k in h)]
    assert all(h.get("If-None-Match") == "*" for op, h, _ in sent if op == "CompleteMultipartUpload")
    client = s3.client()
    for backup in (older, big):
        for suffix in ("", ".sha256", ".json"):
            assert key_of(backup, suffix) in s3.keys(bucket)
        head = client.head_object(Bucket=bucket, Key=key_of(backup), ChecksumMode="ENABLED")
        assert head["ContentLength"] == backup.record["size"]
        assert head["Metadata"] == {"written-by": "lemon-backup", "sha256": backup.record["sha256"]}
        body = client.get_object(Bucket=bucket, Key=key_of(backup))["Body"].read()
        assert hashlib.sha256(body).hexdigest() == backup.record["sha256"]
    assert s3.uploads(bucket) == []  # no multipart upload left behind to be billed

    info = store.load(big.path).record["destinations"]["cloud"]
    assert info["parts"] == 4 and info["method"] == "S3 SHA256 part checksums"
    assert info["sha256"] == big.record["sha256"] and info["verified_at"] and info["path"] == key_of(big)
    remote_record = json.loads(client.get_object(Bucket=bucket, Key=key_of(big, ".json"))["Body"].read())
    assert remote_record["destinations"]["cloud"]["sha256"] == big.record["sha256"]

    with dest:
        listing = dest.list("pg")
        assert [r.file for r in listing.backups] == [big.path.name, older.path.name]
        assert all(r.verified for r in listing.backups) and listing.leftovers == []
        fetch_dir = tmp_path / "fetched"
        fetch_dir.mkdir()
        fetched = dest.fetch(listing.backups[0], fetch_dir)
    assert hashlib.sha256(fetched.read_bytes()).hexdigest() == big.record["sha256"]
    assert store.sha256_path(fetched).exists() and Path(str(fetched) + ".json").exists()

    db = spec.databases["pg"]
    with dest:
        assert offsite.sync_database(dest, spec, db).pushed == []
    client.delete_object(Bucket=bucket, Key=key_of(older))  # a copy lost on the server: copied again
    with dest:
        assert offsite.sync_database(dest, spec, db).pushed == [f"daily/{older.path.name}"]
    assert client.head_object(Bucket=bucket, Key=key_of(older))["ContentLength"] == older.record["size"]

    # a copy changed on the server stops counting as a copy (status shows the lag) and is not overwritten
    flip_a_byte(s3, bucket, key_of(older))
    with dest:
        assert offsite.sync_database(dest, spec, db).pushed == []
        assert [r.damage is not None for r in dest.list("pg").backups] == [False, True]
    assert "cloud" not in store.load(older.path).record["destinations"]
    assert "cloud" in store.load(big.path).record["destinations"]


def test_existing_objects_are_never_overwritten(tmp_path, s3):
    bucket = s3.bucket()
    sse = {"algorithm": "AES256"}
    spec = spec_for(tmp_path, [s3_block(s3, bucket, storage_class="STANDARD_IA", server_side_encryption=sse)])
    backup = make_backup(spec.backup_dir, timedelta(hours=1))
    client = s3.client()
    client.put_object(Bucket=bucket, Key=key_of(backup), Body=b"someone else's file")
    [dest] = configured(spec)
    with dest, pytest.raises(DestinationRefused, match="already exists and is not this backup"):
        dest.push(backup)
    assert client.get_object(Bucket=bucket, Key=key_of(backup))["Body"].read() == b"someone else's file"
    assert key_of(backup, ".json") not in s3.keys(bucket)

    # our own object whose record never arrived (an interrupted run): kept, checked, completed
    client.delete_object(Bucket=bucket, Key=key_of(backup))
    with dest:
        dest.push(backup)
    client.delete_object(Bucket=bucket, Key=key_of(backup, ".json"))
    with dest:
        info = dest.push(backup)
    assert info["method"] == "re-read" and info["sha256"] == backup.record["sha256"]
    assert key_of(backup, ".json") in s3.keys(bucket)
    head = client.head_object(Bucket=bucket, Key=key_of(backup))
    assert head["ServerSideEncryption"] == "AES256" and head["StorageClass"] == "STANDARD_IA"


def test_server_gone_mid_upload_leaves_nothing_under_the_final_key_and_catch_up_cleans(tmp_path, s3):
    bucket = s3.bucket()
    spec = spec_for(tmp_path, [s3_block(s3, bucket, concurrency=1)])
    backup = make_backup(spec.backup_dir, timedelta(hours=1), size=22 * MIB)
    db = spec.databases["pg"]
    [dest] = configured(spec)

    def stop_after_two_parts(sent: int) -> None:
        if sent > 11 * MIB and s3.running:
            s3.stop()

    try:
        with dest, pytest.raises(DestinationFailed, match="after 1 attempt"):
            offsite.sync_database(dest, spec, db, progress=stop_after_two_parts)
    finally:
        s3.start()  # same port, same buckets: look at what the upload left
    assert key_of(backup) not in s3.keys(bucket) and s3.keys(bucket) == set()
    assert [u["Key"] for u in s3.uploads(bucket)] == [key_of(backup)]  # the abort could not reach the server
    assert "cloud" not in store.load(backup.path).record["destinations"]

    # an interrupt (Ctrl-C) with the server up: the upload is aborted at once
    def interrupt(sent: int) -> None:
        if sent > 6 * MIB:
            raise KeyboardInterrupt

    with dest, pytest.raises(KeyboardInterrupt):
        dest.push(backup, progress=interrupt)
    assert len(s3.uploads(bucket)) == 1 and s3.keys(bucket) == set()

    with dest:  # the next run aborts the stale upload and catches up
        assert offsite.sync_database(dest, spec, db).pushed == [f"daily/{backup.path.name}"]
    assert s3.uploads(bucket) == []
    assert s3.keys(bucket) == {key_of(backup, s) for s in ("", ".sha256", ".json")}
    assert "cloud" in store.load(backup.path).record["destinations"]


# -- retention, object lock ----------------------------------------------------------------------


def test_remote_retention_keeps_foreign_objects_and_the_newest_copy(tmp_path, s3):
    bucket = s3.bucket()
    spec = spec_for(tmp_path, [s3_block(s3, bucket, retention={"daily": {"keep_days": 5}})])
    newest = make_backup(spec.backup_dir, timedelta(days=1))
    middle = make_backup(spec.backup_dir, timedelta(days=3))
    expired = make_backup(spec.backup_dir, timedelta(days=10))
    old_copy = make_backup(spec.backup_dir, timedelta(days=4))
    client = s3.client()
    foreign = {
        "lemon/prod/pg/daily/notes.txt": b"operator notes",
        "lemon/prod/pg/daily/backup_20200101_000000.sql.gz": b"made by aws s3 sync",  # no record
        "lemon/prod/pg/daily/backup_20200102_000000.sql.gz": b"x",
        "lemon/prod/pg/daily/backup_20200102_000000.sql.gz.json": b'{"not": "a record of ours"}',
    }
    for key, data in foreign.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)
    db = spec.databases["pg"]
    [dest] = configured(spec)
    with dest:
        result = offsite.sync_database(dest, spec, db)
    assert result.skipped == [f"daily/{expired.path.name}"]  # past this destination's retention: not copied
    # someone replaced one of our copies on the server (its record still there): never deleted
    client.put_object(Bucket=bucket, Key=key_of(old_copy), Body=b"replaced")

    with dest:
        result = offsite.sync_database(dest, spec, db, now=store.utcnow() + timedelta(days=30))
    assert result.deleted == [f"daily/{middle.path.name}"]
    assert result.kept == [f"daily/{old_copy.path.name}"]
    keys = s3.keys(bucket)
    assert set(foreign) <= keys
    assert not [k for k in keys if middle.path.name in k]
    assert {key_of(newest, s) for s in ("", ".sha256", ".json")} <= keys  # the newest verified copy stays
    assert key_of(old_copy) in keys and key_of(old_copy, ".json") in keys
    assert "cloud" not in store.load(middle.path).record["destinations"]  # the local record follows
    assert middle.path.exists() and expired.path.exists()  # local backups untouched


def test_locked_copies_are_kept_as_still_locked_and_lock_needs_a_locked_bucket(tmp_path, s3, caplog):
    bucket = s3.bucket(lock=True)
    lock = {"mode": "governance"}
    spec = spec_for(tmp_path, [s3_block(s3, bucket, object_lock=lock, retention={"daily": {"keep_days": 5}})])
    newest = make_backup(spec.backup_dir, timedelta(days=1))
    middle = make_backup(spec.backup_dir, timedelta(days=3), size=6 * MIB)  # multipart: 2 parts
    db = spec.databases["pg"]
    [dest] = configured(spec)
    with dest:
        offsite.sync_database(dest, spec, db)
    info = store.load(middle.path).record["destinations"]["cloud"]
    assert info["version_id"] and info["lock_mode"] == "governance"
    head = s3.client().head_object(Bucket=bucket, Key=key_of(middle), VersionId=info["version_id"])
    assert head["ObjectLockMode"] == "GOVERNANCE"
    assert abs(head["ObjectLockRetainUntilDate"] - (middle.created + timedelta(days=5))) < timedelta(seconds=2)

    caplog.set_level("INFO", logger="backup")
    with dest:  # 30 days later by the tool's clock; the server still holds the lock: info, not failure
        result = offsite.sync_database(dest, spec, db, now=store.utcnow() + timedelta(days=30))
    assert result.deleted == [] and result.kept == [f"daily/{middle.path.name}"]
    assert any("still locked" in r.getMessage() and r.levelname == "INFO" for r in caplog.records)
    assert key_of(middle) in s3.keys(bucket) and "cloud" in store.load(middle.path).record["destinations"]
    assert newest.path.exists()

    plain = s3.bucket()
    spec = spec_for(tmp_path, [s3_block(s3, plain, object_lock=lock)])
    [dest] = configured(spec)
    with dest, pytest.raises(DestinationRefused) as refused:
        dest.push(newest)
    message = str(refused.value)
    assert "has no Object Lock" in message and "put-object-lock-configuration" in message and "\n" not in message
    assert s3.keys(plain) == set()


# -- the real tasks ----------------------------------------------------------------------------------


def test_backup_list_restore_and_drill_from_s3_and_a_changed_copy_is_caught(workspace, sample_db, s3):
    bucket = s3.bucket()
    config = workspace.postgres_config(sample_db.name)
    config["destinations"] = [s3_block(s3, bucket)]
    workspace.write_config(config)
    (workspace.path / ".env").write_text(f"S3_KEY_ID={KEY_ID}\nS3_SECRET='{SECRET}'\n")
    before = sample_db.checksums()
    outputs = []

    result = workspace.invoke("backup", "--all")
    outputs.append(result)
    assert result.returncode == 0, result.stderr
    [backup] = workspace.backups()
    record = json.loads(Path(str(backup) + ".json").read_text())
    assert record["destinations"]["cloud"]["sha256"] == record["sha256"]

    listed = workspace.invoke("list", "--dest", "cloud")
    outputs.append(listed)
    assert listed.returncode == 0, listed.stderr
    assert backup.name in listed.stdout and "verified copy (S3 SHA256 part checksums)" in listed.stdout

    checked = workspace.invoke("dest-check", "--dest", "cloud")
    outputs.append(checked)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "credentials: found" in checked.stdout and "round trip: ok" in checked.stdout

    drill = workspace.invoke("drill", "--from", "cloud")
    outputs.append(drill)
    assert drill.returncode == 0, drill.stderr

    local_copy = backup.read_bytes()
    backup.unlink()  # the machine's disk is gone; the copy is not
    sample_db.sql("DELETE FROM messages; UPDATE users SET name = 'changed';")
    result = workspace.invoke("restore", "--engine", "postgres", "--from", "cloud", "--file", "latest", "--yes")
    outputs.append(result)
    assert result.returncode == 0, result.stderr
    assert sample_db.checksums() == before

    # the copy changed on the server (moto does not check checksums: our own checks must catch it)
    key = f"lemon/prod/pg/daily/{backup.name}"
    flip_a_byte(s3, bucket, key)
    listed = workspace.invoke("list", "--dest", "cloud")
    outputs.append(listed)
    assert listed.returncode == 0 and "DAMAGED: changed on the server" in listed.stdout
    sample_db.sql("TRUNCATE lessons;")
    result = workspace.invoke("restore", "--engine", "postgres", "--from", "cloud", "--file", backup.name, "--yes")
    outputs.append(result)
    assert result.returncode == 1 and "damaged" in result.stderr and "Traceback" not in result.stderr
    result = workspace.invoke("restore", "--engine", "postgres", "--from", "cloud", "--file", "latest", "--yes")
    outputs.append(result)
    assert result.returncode == 2 and "no verified backup" in result.stderr
    assert sample_db.sql("SELECT count(*) FROM lessons;") == "0"  # nothing was touched

    # the credentials appear nowhere: output, log, local and remote records
    client = s3.client()
    texts = [r.stdout + r.stderr for r in outputs]
    texts.append((workspace.backup_dir / "backup.log").read_text())
    texts += [p.read_text() for p in workspace.backup_dir.rglob("*.json")]
    texts += [
        client.get_object(Bucket=bucket, Key=k)["Body"].read().decode() for k in s3.keys(bucket) if k.endswith(".json")
    ]
    assert backup.name in "".join(texts) and local_copy
    for text in texts:
        assert KEY_ID not in text and SECRET not in text


def test_dest_check_and_config_problems_are_one_line_exit_2(workspace, s3):
    plain = s3.bucket()
    config = workspace.postgres_config("unused")
    cases = [
        (s3_block(s3, plain, object_lock={"mode": "compliance"}), "put-object-lock-configuration"),
        (s3_block(s3, "no-such-bucket-here"), "bucket 'no-such-bucket-here' does not exist"),
        (
            s3_block(s3, plain, secret_key_env="S3_UNSET_SECRET"),
            "secret_key_env names $S3_UNSET_SECRET, which is not set",
        ),
    ]
    for block, expected in cases:
        config["destinations"] = [block]
        workspace.write_config(config)
        result = workspace.invoke("dest-check", env=CREDS)
        assert result.returncode == 2, result.stdout + result.stderr
        message = result.stderr.strip()
        assert expected in message and "\n" not in message and "Traceback" not in message
        assert SECRET not in result.stdout + result.stderr

    # the standard AWS chain (here: its environment variables) when no *_env keys are given
    chain = s3_block(s3, plain)
    del chain["access_key_env"], chain["secret_key_env"]
    config["destinations"] = [chain]
    workspace.write_config(config)
    result = workspace.invoke("dest-check", env={"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "credentials: found (env;" in result.stdout and "round trip: ok" in result.stdout
    assert SECRET not in result.stdout + result.stderr and KEY_ID not in result.stdout + result.stderr
    no_chain = {"AWS_SHARED_CREDENTIALS_FILE": str(workspace.path / "none"), "AWS_EC2_METADATA_DISABLED": "true"}
    result = workspace.invoke("dest-check", env=no_chain)
    assert result.returncode == 2 and "no AWS credentials found" in result.stderr

    config["destinations"] = [s3_block(s3, plain, part_size_mib=2)]
    workspace.write_config(config)
    result = workspace.invoke("validate")
    assert result.returncode == 2 and "destinations[0].part_size_mib" in result.stderr


def test_errors_are_classified_transient_or_refused_and_scrubbed(tmp_path, s3):
    import botocore.exceptions as bx

    spec = spec_for(tmp_path, [s3_block(s3, "some-bucket")])
    [dest] = configured(spec)

    def client_error(code: str, status: int, message: str = "") -> bx.ClientError:
        response = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return bx.ClientError(response, "PutObject")

    transient = [
        client_error("SlowDown", 503),
        client_error("InternalError", 500),
        client_error("RequestTimeout", 400),
        bx.EndpointConnectionError(endpoint_url=s3.url),
        bx.ReadTimeoutError(endpoint_url=s3.url),
    ]
    refused = [
        (client_error("InvalidAccessKeyId", 403, f"key {KEY_ID} unknown"), "refused the credentials"),
        (client_error("SignatureDoesNotMatch", 403, f"signed with {SECRET}"), "refused the credentials"),
        (client_error("AccessDenied", 403), "access denied"),
        (client_error("NoSuchBucket", 404), "does not exist"),
        (client_error("PermanentRedirect", 301), "set region"),
        (client_error("InvalidStorageClass", 400, f"echo {SECRET}"), "InvalidStorageClass"),
        (bx.NoCredentialsError(), "no AWS credentials found"),
        (bx.SSLError(endpoint_url=s3.url, error="certificate verify failed"), "set ca_bundle"),
    ]
    for error in transient:
        with pytest.raises(DestinationFailed) as caught, dest._mapped("upload"):
            raise error
        assert type(caught.value) is DestinationFailed
    for error, expected in refused:
        with pytest.raises(DestinationRefused) as caught, dest._mapped("upload"):
            raise error
        message = str(caught.value)
        assert expected in message and "\n" not in message, message
        assert SECRET not in message and KEY_ID not in message
