"""GPG encryption of stored backups: the gpg stages of the streaming pipeline, key and passphrase
checks, and the checks an encrypted file can get without (or with) its secret.

- gpg runs as a pipeline stage (``... | compressor | gpg --encrypt > file``): binary output, gpg's own
  compression off (the stream is already compressed), ``--no-symkey-cache``.
- A passphrase reaches gpg only through a pipe: ``--passphrase-fd N`` with the read end passed to
  that one process (``pass_fds``); the UTF-8 bytes are written by us, never into argv, the
  environment of a child, a log line or an exception message. (python-gnupg would encode a
  passphrase as Latin-1 and, on large input, raise BrokenPipeError when gpg rejects a recipient;
  so it is used only for keyring queries, never to move backup data.)
- public-key mode: the backup host needs no secret key. The compressed plaintext is checked in the
  same pass before encryption (``tee /dev/fd/N`` feeds a second pipeline: decompress | inspect),
  and the stored file by its OpenPGP packet structure.

Knows nothing about databases: callers hand in the inspection stages.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from lib.config import Spec
from lib.errors import EnvironmentProblem, InputError, VerificationFailed
from lib.exec import require_binary, tail_text
from lib.stream import Stage, StageResult

log = logging.getLogger("backup")

DEFAULT_CIPHER = "AES256"
EXPIRY_WARNING_DAYS = 30
MAX_PASSPHRASE_BYTES = 4000  # always fits in a pipe buffer, so writing it never blocks
_warned: set[str] = set()
ENCRYPT_NAME = "gpg --encrypt"
DECRYPT_NAME = "gpg --decrypt"
# gpg's validity letters (--with-colons field 2) that make a key unusable whatever the trust model.
UNUSABLE = {"e": "expired", "r": "revoked", "d": "disabled", "i": "invalid"}
# OpenPGP packet tags (RFC 4880 section 4.3).
TAG_PKESK, TAG_SKESK = 1, 3
DATA_TAGS = {9: "encrypted data", 18: "encrypted data (MDC)", 20: "AEAD encrypted data"}


# -- configuration -----------------------------------------------------------------------------
def mode(spec: Spec) -> str:
    """'none', 'symmetric' or 'public-key'."""
    return spec.encryption.get("mode", "none")


def suffix(spec: Spec) -> str:
    """Extra file suffix for stored files ('.gpg' when encrypted)."""
    return "" if mode(spec) == "none" else ".gpg"


def is_encrypted(path: Path) -> bool:
    return path.name.endswith(".gpg")


def cipher(spec: Spec) -> str:
    return spec.encryption.get("cipher", DEFAULT_CIPHER)


def gnupghome(spec: Spec) -> Path | None:
    """The keyring directory: encryption.gnupghome, else $GNUPGHOME or ~/.gnupg (gpg's default).
    Created 0700 when missing: gpg in --batch mode fails obscurely ("No agent running") without it."""
    configured = spec.encryption.get("gnupghome")
    default = Path(spec.env.get("GNUPGHOME") or os.path.expanduser("~/.gnupg"))
    home = spec.resolve(configured) if configured else default
    try:
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = home.stat()
        if info.st_mode & 0o077 and info.st_uid == os.getuid():
            home.chmod(0o700)
    except OSError as exc:
        raise EnvironmentProblem(
            f"encryption.gnupghome {home}: cannot create or use it ({exc.strerror}); fix the path or its permissions"
        ) from None
    return home


def _keyring_label(spec: Spec) -> str:
    home = spec.encryption.get("gnupghome")
    return str(spec.resolve(home)) if home else os.environ.get("GNUPGHOME", "~/.gnupg")


def _gpg_base(spec: Spec) -> list[str]:
    """gpg with options that make it non-interactive and independent of gpg.conf."""
    home = gnupghome(spec)
    return ["gpg", "--batch", "--no-tty", "--no-options", "--homedir", str(home)]


# -- passphrase --------------------------------------------------------------------------------
def _passphrase_from_file(spec: Spec, name: str) -> bytes:
    path = spec.resolve(name)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise InputError(
            f"encryption.passphrase_file {path}: cannot read it ({exc.strerror}); create it with mode 0600"
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"encryption.passphrase_file {path} is not a regular file; point it at a file")
        if info.st_mode & 0o077:
            raise InputError(
                f"encryption.passphrase_file {path} is readable by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); run chmod 600 {path}"
            )
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(MAX_PASSPHRASE_BYTES + 3)
    finally:
        os.close(fd)
    if data.endswith(b"\r\n"):
        return data[:-2]
    return data[:-1] if data.endswith(b"\n") else data


def passphrase(spec: Spec, required: bool = True) -> bytes | None:
    """The configured passphrase as UTF-8 bytes, or None when none is configured and not ``required``.

    Reads encryption.passphrase_env (from the environment or .env) or encryption.passphrase_file.
    The variable never reaches a child process (pg_dump, compressors, gpg): load_spec protects it
    with every other configured secret variable (lib.exec.protect_secrets). Raises InputError
    naming the problem and the fix, never including the passphrase.
    """
    enc = spec.encryption
    if enc.get("passphrase_file"):
        secret = _passphrase_from_file(spec, enc["passphrase_file"])
        where = f"encryption.passphrase_file {spec.resolve(enc['passphrase_file'])}"
    elif enc.get("passphrase_env"):
        name = enc["passphrase_env"]
        value = spec.env.get(name, "")
        secret = value.encode("utf-8", "surrogateescape")
        where = f"${name} (encryption.passphrase_env)"
        if not secret:
            raise InputError(f"{where} is not set or empty; export it or add it to the .env file next to backup.yml")
    else:
        if required:
            raise InputError(
                "no passphrase configured; set encryption.passphrase_env or encryption.passphrase_file in backup.yml"
            )
        return None
    if not secret:
        raise InputError(f"{where} is empty; write the passphrase into it")
    if b"\n" in secret or b"\r" in secret or b"\0" in secret:
        raise InputError(f"{where}: the passphrase contains a line break or NUL byte; use a single line")
    if len(secret) > MAX_PASSPHRASE_BYTES:
        raise InputError(f"{where}: the passphrase is longer than {MAX_PASSPHRASE_BYTES} bytes; use a shorter one")
    return secret


def _with_passphrase(name: str, argv_before: list[str], argv_after: list[str], secret: bytes) -> Stage:
    """A gpg stage reading ``secret`` from a pipe (``--passphrase-fd N``). The passphrase is written
    into the pipe now; the read end is inherited by the gpg process only and closed here once it
    has started (or when the stage is garbage collected unused)."""
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, secret + b"\n")
    finally:
        os.close(write_fd)
    argv = [*argv_before, "--pinentry-mode", "loopback", "--passphrase-fd", str(read_fd), *argv_after]
    stage = Stage(name, argv, pass_fds=(read_fd,))
    close = weakref.finalize(stage, os.close, read_fd)
    stage.on_start = lambda _proc: close()
    return stage


# -- keys --------------------------------------------------------------------------------------
@dataclass
class KeyStatus:
    """What the keyring says about one configured recipient."""

    recipient: str
    fingerprint: str | None = None
    uid: str = ""
    expires: datetime | None = None
    secret_here: bool = False
    problem: str | None = None  # the key cannot be used: one line with the fix
    warning: str | None = None


def _gpg_keyring(spec: Spec):
    """A python-gnupg handle on the configured keyring. Raises EnvironmentProblem without gpg."""
    require_binary("gpg")
    import gnupg

    home = gnupghome(spec)
    try:
        return gnupg.GPG(gnupghome=str(home) if home else None)
    except (OSError, ValueError) as exc:
        raise EnvironmentProblem(f"cannot run gpg ({exc}); check the gnupg installation") from None


def _pattern(recipient: str) -> str:
    """gpg search pattern: hex ids as they are, an e-mail address matched exactly."""
    text = recipient.strip()
    hexpart = text[2:] if text.lower().startswith("0x") else text
    if len(hexpart) in (8, 16, 32, 40, 64) and all(c in "0123456789abcdefABCDEF" for c in hexpart):
        return hexpart.upper()
    if "@" in text and "<" not in text and " " not in text:
        return f"<{text}>"
    return text


def _epoch(text: str | None) -> datetime | None:
    return datetime.fromtimestamp(int(text), UTC) if text else None


def _encryption_expiry(key: dict) -> datetime | None:
    """When the key stops being able to encrypt: the primary key's expiry or, if later, that of its
    longest-living usable encryption subkey. None means never."""
    never = datetime.max.replace(tzinfo=UTC)
    ends = []
    if "e" in key.get("cap", ""):  # lower case: the primary key itself can encrypt
        ends.append(_epoch(key.get("expires")) or never)
    for sub in key.get("subkey_info", {}).values():
        if "e" in (sub.get("cap") or "") and sub.get("trust") not in UNUSABLE:
            ends.append(_epoch(sub.get("expires")) or never)
    primary = _epoch(key.get("expires")) or never
    end = min(primary, max(ends)) if ends else primary
    return None if end == never else end


def _in_days(delta: timedelta) -> str:
    return "in less than a day" if delta < timedelta(days=1) else f"in {delta.days} day(s)"


def _judge(recipient: str, matches: list[dict], secrets: set[str], label: str, now: datetime) -> KeyStatus:
    """KeyStatus for ``recipient`` given the keys gpg matched."""
    status = KeyStatus(recipient)
    if not matches:
        status.problem = (
            f"recipient '{recipient}' has no public key in keyring {label}; "
            f"import it: gpg --homedir {label} --import KEY.asc"
        )
        return status
    if len(matches) > 1:
        fprs = ", ".join(k["fingerprint"] for k in matches)
        status.problem = (
            f"recipient '{recipient}' matches {len(matches)} keys ({fprs}); put the full fingerprint in recipients"
        )
        return status
    key = matches[0]
    fpr = key["fingerprint"]
    status.fingerprint, status.uid = fpr, (key.get("uids") or [""])[0]
    status.secret_here = fpr in secrets
    status.expires = _encryption_expiry(key)
    validity = key.get("trust", "")
    when = f" on {status.expires:%Y-%m-%d}" if status.expires else ""
    if validity in UNUSABLE:
        fix = (
            f"extend it where the secret key lives (gpg --quick-set-expire {fpr} 1y; gpg --quick-set-expire {fpr} 1y '*') "
            "and import the public key here again, or replace it in recipients"
            if validity == "e"
            else "replace it with a new key in recipients"
        )
        state = f"expired{when}" if validity == "e" else UNUSABLE[validity]
        status.problem = f"recipient '{recipient}': key {fpr} {'is ' if validity != 'e' else ''}{state}; {fix}"
    elif "E" not in key.get("cap", ""):
        expired = [s for s in key.get("subkey_info", {}).values() if "e" in (s.get("cap") or "")]
        why = "its encryption subkey has expired or was revoked" if expired else "it has no encryption subkey"
        status.problem = (
            f"recipient '{recipient}': key {fpr} cannot encrypt ({why}); "
            f"add one where the secret key lives (gpg --quick-add-key {fpr} cv25519 encr 2y) and import the public key here again"
        )
    elif status.expires and status.expires <= now + timedelta(days=EXPIRY_WARNING_DAYS):
        status.warning = (
            f"recipient '{recipient}': key {fpr} expires{when} ({_in_days(status.expires - now)}); extend it before then "
            f"(gpg --quick-set-expire {fpr} 1y '*' where the secret key lives) and import the public key here again"
        )
    return status


def key_statuses(spec: Spec, now: datetime | None = None) -> list[KeyStatus]:
    """Look up every configured recipient in the keyring (python-gnupg). Never raises for a key
    problem; each status carries its problem or warning."""
    gpg = _gpg_keyring(spec)
    now = now or datetime.now(UTC)
    secrets = {k["fingerprint"] for k in gpg.list_keys(secret=True)}
    label = _keyring_label(spec)
    statuses = []
    for recipient in spec.encryption.get("recipients", []):
        matches = list(gpg.list_keys(keys=[_pattern(recipient)]))
        statuses.append(_judge(recipient, matches, secrets, label, now))
    return statuses


def recipients(spec: Spec, warn: bool = True) -> list[str]:
    """Fingerprints of the configured recipients; each resolved to exactly one usable key.
    With ``warn``, logs a warning for a key expiring within EXPIRY_WARNING_DAYS. Raises EnvironmentProblem."""
    statuses = key_statuses(spec)
    for status in statuses:
        if status.problem:
            raise EnvironmentProblem(status.problem)
    for status in statuses if warn else []:
        if status.warning and status.warning not in _warned:
            _warned.add(status.warning)  # once per run, however many databases are backed up
            log.warning("%s", status.warning)
    return [s.fingerprint for s in statuses if s.fingerprint]


def preflight(spec: Spec) -> None:
    """Fail fast, before any dump, when encryption cannot work: gpg missing, passphrase missing or
    empty (symmetric), a recipient that does not resolve to exactly one usable key (public-key).
    Raises InputError/EnvironmentProblem (exit 2) with one line naming the problem and the fix."""
    if mode(spec) == "none":
        return
    require_binary("gpg")
    gnupghome(spec)
    if mode(spec) == "symmetric":
        passphrase(spec)
    else:
        recipients(spec)


def stage_names(spec: Spec) -> list[str]:
    """Names of the stages encryption adds (for plans and logs); builds nothing."""
    if mode(spec) == "none":
        return []
    return [ENCRYPT_NAME]


def encrypt_stages(spec: Spec) -> list[Stage]:
    """The gpg stage encrypting stdin to stdout (empty list for mode none). Raises like preflight."""
    if mode(spec) == "none":
        return []
    base = _gpg_base(spec)
    common = ["--cipher-algo", cipher(spec), "--compress-algo", "none", "--output", "-"]
    if mode(spec) == "symmetric":
        options = ["--no-symkey-cache", "--symmetric", "--s2k-digest-algo", "SHA512", *common]
        return [_with_passphrase(ENCRYPT_NAME, base, options, passphrase(spec))]
    targets = [arg for fpr in recipients(spec, warn=False) for arg in ("--recipient", fpr)]
    argv = [*base, "--trust-model", "always", "--no-encrypt-to", "--encrypt", *targets, *common]
    return [Stage(ENCRYPT_NAME, argv)]


def decrypt_stages(spec: Spec, path: Path | None, file_kind: str | None = None) -> list[Stage]:
    """The gpg stage decrypting ``path``'s bytes from stdin to stdout (``file_kind`` 'symmetric' or
    'public-key' when known, e.g. for a stream being written; else read from ``path``). A
    passphrase-encrypted file needs the configured passphrase; a public-key file uses the keyring's
    secret key (and the configured passphrase, if any, for that key). Raises InputError when a
    needed passphrase is missing."""
    require_binary("gpg")
    base = _gpg_base(spec)
    options = ["--no-symkey-cache", "--decrypt", "--output", "-"]
    kind = file_kind or (file_mode(path) if path is not None else "unknown")
    secret = passphrase(spec, required=kind == "symmetric")
    if secret is None:
        return [Stage(DECRYPT_NAME, [*base, *options])]
    return [_with_passphrase(DECRYPT_NAME, base, options, secret)]


def explain_failure(spec: Spec, failed: StageResult, path: Path, name: str | None = None) -> None:
    """Raise EnvironmentProblem (exit 2) when a failed gpg --decrypt means a wrong passphrase or a
    missing secret key rather than a damaged file. Returns otherwise. ``name`` is how messages
    call the file (default its own name)."""
    if failed.name != DECRYPT_NAME:
        return
    label = name or path.name
    text = failed.stderr.lower()
    if "bad session key" in text:
        raise EnvironmentProblem(
            f"cannot decrypt {label}: wrong passphrase; check encryption.passphrase_env/passphrase_file "
            "(the one used when the backup was made)"
        )
    if "bad passphrase" in text:
        raise EnvironmentProblem(
            f"cannot decrypt {label}: wrong passphrase for the secret key; "
            "fix encryption.passphrase_env/passphrase_file"
        )
    if "no secret key" in text:
        ids = ", ".join(p.keyid for p in read_packets(path, strict=False) if p.keyid) or "its recipients"
        raise EnvironmentProblem(
            f"cannot decrypt {label}: no usable secret key for {ids} in keyring {_keyring_label(spec)}; "
            f"import the backup secret key there (gpg --homedir {_keyring_label(spec)} --import backup-secret.asc), "
            "and set passphrase_env/passphrase_file if it has a passphrase"
        )


# -- OpenPGP packet structure ------------------------------------------------------------------
@dataclass
class Packet:
    tag: int
    offset: int
    length: int
    keyid: str = ""  # public-key session packets: the recipient (sub)key id


class _Reader:
    """Header reads and body skips over a file, with truncation turned into VerificationFailed."""

    def __init__(self, handle, size: int, name: str) -> None:
        self.handle, self.size, self.name = handle, size, name

    def exact(self, count: int) -> bytes:
        data = self.handle.read(count)
        if len(data) != count:
            raise VerificationFailed(f"{self.name} is truncated: an OpenPGP packet header is cut off")
        return data

    def skip(self, count: int) -> None:
        target = self.handle.tell() + count
        if target > self.size:
            raise VerificationFailed(
                f"{self.name} is truncated: an OpenPGP packet needs {target - self.size} more byte(s) than the file has"
            )
        self.handle.seek(target)


def _new_length(reader: _Reader) -> tuple[int, bool]:
    """One new-format body length: (length, is_partial)."""
    first = reader.exact(1)[0]
    if first < 192:
        return first, False
    if first < 224:
        return ((first - 192) << 8) + reader.exact(1)[0] + 192, False
    if first == 255:
        return int.from_bytes(reader.exact(4), "big"), False
    return 1 << (first & 0x1F), True


def read_packets(path: Path, strict: bool = True, name: str | None = None) -> list[Packet]:
    """Walk the OpenPGP packets of ``path`` by their headers (bodies are skipped, so this reads a
    few bytes per packet or partial-length chunk). With ``strict``, raises VerificationFailed when
    the file is not OpenPGP data or a packet runs past its end (truncated); else returns what was
    readable. ``name`` is how messages call the file (default its own name)."""
    packets: list[Packet] = []
    size = path.stat().st_size
    label = name or path.name
    with open(path, "rb") as handle:
        reader = _Reader(handle, size, label)
        try:
            while handle.tell() < size:
                offset = handle.tell()
                ctb = reader.exact(1)[0]
                if not ctb & 0x80:
                    raise VerificationFailed(f"{label}: no OpenPGP packet at byte {offset}; the file is damaged")
                body = b""
                if ctb & 0x40:
                    tag, partial, length = ctb & 0x3F, True, 0
                    while partial:
                        chunk, partial = _new_length(reader)
                        if tag == TAG_PKESK and not partial and length == 0:
                            body = reader.exact(min(chunk, 9))
                            reader.skip(chunk - len(body))
                        else:
                            reader.skip(chunk)
                        length += chunk
                else:
                    tag, kind = (ctb >> 2) & 0x0F, ctb & 0x03
                    length = size - handle.tell() if kind == 3 else int.from_bytes(reader.exact((1, 2, 4)[kind]), "big")
                    body = reader.exact(min(length, 9)) if tag == TAG_PKESK else b""
                    reader.skip(length - len(body))
                keyid = body[1:9].hex().upper() if len(body) >= 9 else ""
                packets.append(Packet(tag, offset, length, keyid))
        except VerificationFailed:
            if strict:
                raise
    return packets


def file_mode(path: Path) -> str:
    """'symmetric' or 'public-key' from the first OpenPGP packet of ``path``; 'unknown' otherwise."""
    try:
        with open(path, "rb") as handle:
            ctb = handle.read(1)
    except OSError:
        return "unknown"
    if not ctb or not ctb[0] & 0x80:
        return "unknown"
    tag = ctb[0] & 0x3F if ctb[0] & 0x40 else (ctb[0] >> 2) & 0x0F
    return {TAG_PKESK: "public-key", TAG_SKESK: "symmetric"}.get(tag, "unknown")


def check_structure(spec: Spec, path: Path, name: str | None = None) -> list[str]:
    """Check a public-key encrypted file without its secret key: our packet walk (session key
    packets, then exactly one encrypted data packet ending exactly at the end of the file, so a
    truncated file fails) and gpg's own parse (``gpg --list-packets --list-only``, which reads the
    whole encrypted stream). Returns the checks done. Raises VerificationFailed; its message calls
    the file ``name`` (default its own name)."""
    label = name or path.name
    packets = read_packets(path, name=label)
    tags = [p.tag for p in packets]
    if not tags or tags[-1] not in DATA_TAGS or tags.count(tags[-1]) != 1:
        raise VerificationFailed(f"{label}: no single encrypted data packet at its end; the file is damaged")
    if not all(t == TAG_PKESK for t in tags[:-1]) or TAG_PKESK not in tags:
        raise VerificationFailed(f"{label}: not encrypted to public keys (no public-key session packet)")
    proc = subprocess.run(
        [*_gpg_base(spec), "--list-packets", "--list-only", str(path)],
        capture_output=True,
        stdin=subprocess.DEVNULL,
    )
    listing = proc.stdout.decode("utf-8", "replace")
    if proc.returncode != 0 or ":pubkey enc packet:" not in listing or ":encrypted data packet:" not in listing:
        raise VerificationFailed(
            f"{label} failed verification: gpg --list-packets exited with status {proc.returncode}: "
            f"{tail_text(proc.stderr).replace(path.name, label) or 'no public-key and encrypted data packets'}"
        )
    return ["gpg-packets", "openpgp-framing"]


# -- one pass: check the plaintext before encryption (public-key mode) ---------------------------
def record(spec: Spec) -> dict[str, Any]:
    """What a backup's record says about its encryption (never a secret)."""
    if mode(spec) == "none":
        return {"mode": "none"}
    result: dict[str, Any] = {"mode": mode(spec), "tool": "gpg", "cipher": cipher(spec)}
    if mode(spec) == "public-key":
        result["recipients"] = [s.fingerprint for s in key_statuses(spec) if s.fingerprint]
    return result


# -- invoke keys -------------------------------------------------------------------------------
def key_report(spec: Spec) -> tuple[list[str], list[str]]:
    """Lines describing the encryption setup and each recipient's key; and the problems found
    (each one line with its fix). Never prints secrets."""
    kind = mode(spec)
    if kind == "none":
        return ["encryption: none (backups are stored unencrypted); set encryption.mode in backup.yml"], []
    lines = [f"encryption: {kind}, cipher {cipher(spec)}, keyring {_keyring_label(spec)}"]
    problems: list[str] = []
    enc = spec.encryption
    if kind == "symmetric" or enc.get("passphrase_env") or enc.get("passphrase_file"):
        source = (
            f"file {spec.resolve(enc['passphrase_file'])}"
            if enc.get("passphrase_file")
            else f"${enc.get('passphrase_env')}"
        )
        try:
            passphrase(spec, required=kind == "symmetric")
            lines.append(f"  passphrase: from {source}: present")
        except InputError as exc:
            lines.append(f"  passphrase: from {source}: PROBLEM")
            problems.append(str(exc))
    if kind == "public-key":
        now = datetime.now(UTC)
        for status in key_statuses(spec, now):
            if status.fingerprint:
                expiry = (
                    f"expires {status.expires:%Y-%m-%d} ({_in_days(status.expires - now)})"
                    if status.expires and status.expires > now
                    else (f"expired {status.expires:%Y-%m-%d}" if status.expires else "never expires")
                )
                lines.append(f"  recipient {status.recipient}: {status.fingerprint} {status.uid}")
                secret = "secret key in this keyring" if status.secret_here else "no secret key here (fine for backups)"
                state = "UNUSABLE" if status.problem else ("usable, WARNING" if status.warning else "usable")
                lines.append(f"    {expiry}; {secret}; {state}")
            else:
                lines.append(f"  recipient {status.recipient}: not found")
            if status.problem:
                problems.append(status.problem)
                lines.append(f"    problem: {status.problem}")
            elif status.warning:
                lines.append(f"    warning: {status.warning}")
    return lines, problems
