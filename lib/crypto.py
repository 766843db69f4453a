"""GPG encryption stages (filled in by the encryption issue). With mode 'none' nothing is added."""

from __future__ import annotations

from pathlib import Path

from lib.config import Spec
from lib.stream import Stage


def mode(spec: Spec) -> str:
    return spec.encryption.get("mode", "none")


def suffix(spec: Spec) -> str:
    """Extra file suffix for stored files ('.gpg' when encrypted)."""
    return "" if mode(spec) == "none" else ".gpg"


def preflight(spec: Spec) -> None:
    """Fail fast before any dump when encryption cannot work."""


def encrypt_stages(spec: Spec) -> list[Stage]:
    return []


def decrypt_stages(spec: Spec, path: Path) -> list[Stage]:
    return []


def record(spec: Spec) -> dict:
    return {"mode": mode(spec)}
