"""lib/crypto.py with real gpg: schema rules, passphrase sources, key checks, the encryption and
decryption stages, the plaintext tap and the OpenPGP structure check."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import _gpg_agent_homes as conftest_gpg_agent_homes
from gpgkeys import GPG, keyring_factory

from lib import crypto
from lib.config import load_spec
from lib.errors import ConfigError, EnvironmentProblem, InputError, VerificationFailed
from lib.stream import FileSink, Stage, TailSink, Tap, run_pipeline, run_tapped

PASSPHRASE = "correct horse 'battery\" staple 한국어 ü \\ $HOME"
DB = {"pg": {"engine": "postgres", "database": "x", "host": "127.0.0.1"}}


@pytest.fixture
def keyrings():
    yield from keyring_factory()


def make_spec(tmp_path: Path, encryption: dict, environ: dict | None = None):
    config = tmp_path / "backup.yml"
    config.write_text(yaml.safe_dump({"version": 1, "databases": DB, "encryption": encryption}, allow_unicode=True))
    return load_spec(config, environ={"PATH": os.environ["PATH"], **(environ or {})})


def symmetric(tmp_path: Path, keyring, passphrase: str = PASSPHRASE):
    return make_spec(
        tmp_path,
        {"mode": "symmetric", "passphrase_env": "BACKUP_PASSPHRASE", "gnupghome": str(keyring.home)},
        {"BACKUP_PASSPHRASE": passphrase},
    )


def public_key(tmp_path: Path, keyring, recipients: list[str]):
    return make_spec(tmp_path, {"mode": "public-key", "recipients": recipients, "gnupghome": str(keyring.home)})


def produce(data: bytes) -> list[Stage]:
    """A stage writing ``data`` (via a file, so no secret-free argv concerns) compressed with gzip."""
    return [Stage("cat", ["cat"]), Stage("gzip", ["gzip", "-c"])]


def encrypt_to_file(spec, data: bytes, tmp_path: Path, name: str = "out.gz.gpg") -> Path:
    source = tmp_path / "plain.bin"
    source.write_bytes(data)
    out = tmp_path / name
    stages = [Stage("gzip", ["gzip", "-c"]), *crypto.encrypt_stages(spec)]
    result = run_pipeline(stages, FileSink(out), source=source)
    result.raise_for_status()
    return out


def decrypt_file(spec, path: Path) -> bytes:
    stages = [*crypto.decrypt_stages(spec, path), Stage("gzip -d", ["gzip", "-d", "-c"])]
    sink = TailSink(1 << 24)
    result = run_pipeline(stages, sink, source=path)
    result.raise_for_status()
    return result.tail


# -- schema --------------------------------------------------------------------------------------
def test_schema_names_the_missing_key_per_mode(tmp_path):
    with pytest.raises(ConfigError, match=r"At 'encryption': 'passphrase_env' is a required property.*passphrase_file"):
        make_spec(tmp_path, {"mode": "symmetric"})
    with pytest.raises(ConfigError, match=r"'recipients' is a required property; mode public-key needs recipients"):
        make_spec(tmp_path, {"mode": "public-key"})
    with pytest.raises(ConfigError, match="set only one of passphrase_env or passphrase_file"):
        make_spec(tmp_path, {"mode": "symmetric", "passphrase_env": "A", "passphrase_file": "f"})
    with pytest.raises(ConfigError, match="encryption.cipher"):
        make_spec(tmp_path, {"mode": "symmetric", "passphrase_env": "A", "cipher": "DES"})
    assert make_spec(tmp_path, {"mode": "symmetric", "passphrase_file": "f"}).encryption["mode"] == "symmetric"


# -- passphrase ----------------------------------------------------------------------------------
def test_passphrase_file_refused_when_group_readable_and_read_when_private(tmp_path):
    secret = tmp_path / "passphrase"
    secret.write_bytes(PASSPHRASE.encode() + b"\n")
    secret.chmod(0o640)
    spec = make_spec(tmp_path, {"mode": "symmetric", "passphrase_file": "passphrase"})
    with pytest.raises(InputError, match=r"readable by group or others \(mode 0640\); run chmod 600") as caught:
        crypto.preflight(spec)
    assert PASSPHRASE not in str(caught.value)
    secret.chmod(0o600)
    assert crypto.passphrase(spec) == PASSPHRASE.encode()


def test_missing_or_empty_passphrase_is_an_input_error_naming_the_variable(tmp_path, keyrings):
    keyring = keyrings()
    with pytest.raises(InputError, match=r"\$BACKUP_PASSPHRASE \(encryption.passphrase_env\) is not set or empty"):
        crypto.preflight(symmetric(tmp_path, keyring, passphrase=""))
    spec = make_spec(tmp_path, {"mode": "symmetric", "passphrase_env": "BACKUP_PASSPHRASE"})
    with pytest.raises(InputError, match="not set or empty; export it"):
        crypto.preflight(spec)


def test_passphrase_variable_is_removed_from_the_environment_children_inherit(tmp_path, keyrings, monkeypatch):
    monkeypatch.setenv("BACKUP_PASSPHRASE", PASSPHRASE)
    spec = make_spec(
        tmp_path,
        {"mode": "symmetric", "passphrase_env": "BACKUP_PASSPHRASE", "gnupghome": str(keyrings().home)},
        dict(os.environ),
    )
    crypto.preflight(spec)
    assert "BACKUP_PASSPHRASE" not in os.environ
    child_env = subprocess.run(["env"], capture_output=True).stdout
    assert PASSPHRASE.encode() not in child_env


# -- symmetric stages ----------------------------------------------------------------------------
def test_symmetric_round_trip_with_awkward_passphrase_and_plain_gpg_can_decrypt(tmp_path, keyrings):
    keyring = keyrings()
    spec = symmetric(tmp_path, keyring)
    data = os.urandom(200_000) + "끝".encode()
    [stage] = crypto.encrypt_stages(spec)
    assert PASSPHRASE.encode() not in " ".join(stage.argv).encode()
    assert {"--compress-algo", "none", "--no-symkey-cache", "--passphrase-fd"} <= set(stage.argv)
    out = encrypt_to_file(spec, data, tmp_path)
    assert crypto.file_mode(out) == "symmetric"
    assert out.read_bytes()[:1] != b"-"  # binary, not armored
    assert decrypt_file(spec, out) == data
    # The manual recovery path from docs/encryption.md: plain gpg with the passphrase typed (here: a file).
    manual = tmp_path / "typed"
    manual.write_bytes(PASSPHRASE.encode())
    plain = subprocess.run(
        [
            GPG,
            "--homedir",
            str(keyring.home),
            "--batch",
            "--pinentry-mode",
            "loopback",
            "--passphrase-file",
            str(manual),
            "-d",
            str(out),
        ],
        capture_output=True,
    )
    assert plain.returncode == 0, plain.stderr
    assert subprocess.run(["gunzip", "-c"], input=plain.stdout, capture_output=True).stdout == data


def test_wrong_passphrase_is_a_one_line_key_problem_not_damage(tmp_path, keyrings):
    keyring = keyrings()
    out = encrypt_to_file(symmetric(tmp_path, keyring), b"data" * 1000, tmp_path)
    wrong = symmetric(tmp_path, keyring, passphrase=PASSPHRASE + "x")
    result = run_pipeline(crypto.decrypt_stages(wrong, out), TailSink(), source=out)
    cause = result.cause()
    assert cause is not None and cause.name == crypto.DECRYPT_NAME
    with pytest.raises(EnvironmentProblem, match="wrong passphrase") as caught:
        crypto.explain_failure(wrong, cause, out)
    assert "\n" not in str(caught.value) and PASSPHRASE not in str(caught.value)


# -- keys ----------------------------------------------------------------------------------------
def test_recipient_checks_unknown_expired_revoked_ambiguous_and_no_encryption_key(tmp_path, keyrings):
    keyring = keyrings()
    good = keyring.new_key("ops@example.com")
    keyring.new_key("old@example.com", expire="1d", faked_time="20200101T000000")
    revoked = keyring.new_key("gone@example.com")
    keyring.revoke(revoked)
    keyring.new_key("twin@example.com", name="One")
    keyring.new_key("twin@example.com", name="Two")
    keyring.new_key("signonly@example.com", encrypt=False)
    # e-mail addresses match exactly: 'ops@example.com' must not also match 'devops@example.com'
    keyring.new_key("devops@example.com")
    cases = {
        "nobody@example.com": "has no public key in keyring",
        "old@example.com": "expired on 2020-01-02",
        "gone@example.com": "is revoked",
        "twin@example.com": "matches 2 keys",
        "signonly@example.com": "cannot encrypt (it has no encryption subkey)",
    }
    for recipient, message in cases.items():
        with pytest.raises(EnvironmentProblem, match=re.escape(message)):
            crypto.preflight(public_key(tmp_path, keyring, ["ops@example.com", recipient]))
    spec = public_key(tmp_path, keyring, ["ops@example.com", f"0x{good}"])
    assert crypto.recipients(spec) == [good, good]
    assert crypto.record(spec) == {"mode": "public-key", "tool": "gpg", "cipher": "AES256", "recipients": [good, good]}


def test_key_expiring_within_30_days_is_a_warning_and_shown_by_key_report(tmp_path, keyrings, caplog):
    keyring = keyrings()
    fpr = keyring.new_key("soon@example.com", expire="10d")
    spec = public_key(tmp_path, keyring, ["soon@example.com"])
    crypto._warned.clear()
    with caplog.at_level(logging.WARNING, logger="backup"):
        crypto.preflight(spec)
    assert any(f"key {fpr} expires on" in r.getMessage() for r in caplog.records)
    lines, problems = crypto.key_report(spec)
    assert problems == []
    text = "\n".join(lines)
    assert fpr in text and "usable, WARNING" in text and "no secret key here" not in text  # this keyring has it


# -- public-key stages, plaintext tap, structure -------------------------------------------------
def test_public_key_file_structure_passes_complete_and_fails_truncated_or_extended(tmp_path, keyrings):
    owner, backup_host = keyrings(), keyrings()
    fpr = owner.new_key("ops@example.com")
    backup_host.import_keys(owner.export(fpr))  # the backup host holds the public key only
    spec = public_key(tmp_path, backup_host, ["ops@example.com"])
    data = os.urandom(300_000)
    out = encrypt_to_file(spec, data, tmp_path)
    assert crypto.file_mode(out) == "public-key"
    assert crypto.check_structure(spec, out) == ["gpg-packets", "openpgp-framing"]
    full = out.read_bytes()
    for size in (10, 100, len(full) // 2, len(full) - 1):
        cut = tmp_path / f"cut{size}.gpg"
        cut.write_bytes(full[:size])
        with pytest.raises(VerificationFailed, match="truncated|damaged|no single encrypted data packet"):
            crypto.check_structure(spec, cut)
    longer = tmp_path / "longer.gpg"
    longer.write_bytes(full + b"\xc2\x00garbage")
    with pytest.raises(VerificationFailed):
        crypto.check_structure(spec, longer)
    # without the secret key, decryption is a one-line key problem, with the key id to import
    result = run_pipeline(crypto.decrypt_stages(spec, out), TailSink(), source=out)
    with pytest.raises(EnvironmentProblem, match="no usable secret key for [0-9A-F]{16} in keyring"):
        crypto.explain_failure(spec, result.cause(), out)
    owner_spec = public_key(tmp_path, owner, ["ops@example.com"])
    assert decrypt_file(owner_spec, out) == data


def test_plaintext_tap_sees_exactly_the_bytes_gpg_encrypts_in_the_same_pass(tmp_path, keyrings):
    owner = keyrings()
    owner.new_key("ops@example.com")
    spec = public_key(tmp_path, owner, ["ops@example.com"])
    data = os.urandom(3_000_000)
    source = tmp_path / "plain.bin"
    source.write_bytes(data)
    out = tmp_path / "out.gpg"
    inspect = [Stage("gzip -d", ["gzip", "-d", "-c"]), Stage("sha256sum", ["sha256sum"])]
    producer = [Stage("cat", ["cat", str(source)]), Stage("gzip", ["gzip", "-1", "-c"])]
    tap = Tap(inspect, name="tee (before encryption)", suffix=" (before encryption)")
    result, branch = run_tapped([*producer, *crypto.encrypt_stages(spec)], 2, tap, FileSink(out))
    tail = branch.tail
    result.raise_for_status()
    assert [s.name for s in result.stages] == [
        "cat",
        "gzip",
        "tee (before encryption)",
        crypto.ENCRYPT_NAME,
        "gzip -d (before encryption)",
        "sha256sum (before encryption)",
    ]
    assert tail.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert decrypt_file(spec, out) == data


def test_failing_plaintext_check_fails_the_run_and_names_the_check(tmp_path, keyrings):
    owner = keyrings()
    owner.new_key("ops@example.com")
    spec = public_key(tmp_path, owner, ["ops@example.com"])
    inspect = [Stage("gzip -d", ["gzip", "-d", "-c"]), Stage("checker", ["sh", "-c", "head -c 10 >/dev/null; exit 3"])]
    producer = [Stage("yes", ["sh", "-c", "head -c 5000000 /dev/zero"]), Stage("gzip", ["gzip", "-1", "-c"])]
    tap = Tap(inspect, name="tee (before encryption)", suffix=" (before encryption)")
    result, _ = run_tapped([*producer, *crypto.encrypt_stages(spec)], 2, tap, FileSink(tmp_path / "out.gpg"))
    cause = result.cause()
    assert cause is not None and cause.name == "checker (before encryption)" and cause.returncode == 3


def test_gpg_agents_are_stopped_after_each_test(tmp_path):
    """Guard for the fixture above: an agent started under tmp_path is found (and stopped after)."""
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    subprocess.run(["gpg-connect-agent", "--homedir", str(home), "/bye"], capture_output=True, timeout=30)
    assert conftest_gpg_agent_homes(tmp_path) == {str(home)}
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)
    assert conftest_gpg_agent_homes(tmp_path) == set()
