"""Real gpg keyrings for the tests: one short-lived homedir per keyring under /tmp (gpg-agent's socket
path is length-limited, so not under pytest's long tmp paths), fast curve keys made on the spot,
agents killed at teardown."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

GPG = shutil.which("gpg") or "gpg"


class Keyring:
    """An isolated GNUPGHOME."""

    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="g", dir="/tmp"))
        self.home.chmod(0o700)

    def gpg(self, *args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [GPG, "--homedir", str(self.home), "--batch", "--no-tty", *args],
            input=input,
            capture_output=True,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"gpg {' '.join(args)} failed: {proc.stderr.decode(errors='replace')}")
        return proc

    def fingerprints(self) -> list[str]:
        out = self.gpg("--list-keys", "--with-colons", check=False).stdout.decode()
        result, primary = [], False
        for line in out.splitlines():
            fields = line.split(":")
            if fields[0] == "pub":
                primary = True
            elif fields[0] == "fpr" and primary:
                result.append(fields[9])
                primary = False
            elif fields[0] == "sub":
                primary = False
        return result

    def new_key(
        self, email: str, expire: str = "1y", faked_time: str | None = None, encrypt: bool = True, name: str = "Test"
    ) -> str:
        """Make an ed25519 certification key with a cv25519 encryption subkey (no passphrase)."""
        before = set(self.fingerprints())
        when = ["--faked-system-time", faked_time] if faked_time else []
        common = ["--pinentry-mode", "loopback", "--passphrase", "", *when]
        self.gpg(*common, "--quick-gen-key", f"{name} <{email}>", "ed25519", "cert", expire)
        [fpr] = set(self.fingerprints()) - before
        if encrypt:
            self.gpg(*common, "--quick-add-key", fpr, "cv25519", "encr", expire)
        return fpr

    def export(self, fpr: str, secret: bool = False) -> bytes:
        if secret:
            return self.gpg("--pinentry-mode", "loopback", "--passphrase", "", "--export-secret-keys", fpr).stdout
        return self.gpg("--export", fpr).stdout

    def import_keys(self, data: bytes) -> None:
        self.gpg("--import", input=data)

    def revoke(self, fpr: str) -> None:
        """Import the revocation certificate gpg made with the key."""
        text = (self.home / "openpgp-revocs.d" / f"{fpr}.rev").read_text()
        self.import_keys(text.replace(":-----BEGIN PGP PUBLIC KEY BLOCK", "-----BEGIN PGP PUBLIC KEY BLOCK").encode())

    def close(self) -> None:
        subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "all"], capture_output=True)
        shutil.rmtree(self.home, ignore_errors=True)


def keyring_factory() -> Iterator[Callable[[], Keyring]]:
    """For a fixture: yields ``make()`` returning a new isolated Keyring; all are removed afterwards."""
    made: list[Keyring] = []

    def make() -> Keyring:
        keyring = Keyring()
        made.append(keyring)
        return keyring

    yield make
    for keyring in made:
        keyring.close()
