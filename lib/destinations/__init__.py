"""Destination types and the registry: ``type`` in backup.yml -> the class that handles it.

Adding a type means one module with a ``Destination`` subclass, one schema block and tests.
"""

from __future__ import annotations

import importlib

from lib.config import Spec
from lib.destinations.base import Destination
from lib.errors import ConfigError, InputError

# type -> "module:class", imported only when a destination of that type is configured
# (paramiko alone takes ~0.2 s to import; a run with only rsync destinations never needs it).
TYPES: dict[str, str] = {
    "rsync": "lib.destinations.rsync:RsyncDestination",
    "sftp": "lib.destinations.sftp:SftpDestination",
    "s3": "lib.destinations.s3:S3Destination",  # boto3: ~0.3 s to import
}


def destination_class(kind: str) -> type[Destination]:
    """The Destination subclass handling ``type: kind``."""
    module, _, name = TYPES[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def configured(spec: Spec, names: list[str] | None = None) -> list[Destination]:
    """The destinations of backup.yml (only ``names`` when given), in file order.

    Raises ConfigError for duplicate names, InputError for a name that is not configured.
    """
    seen: dict[str, Destination] = {}
    for block in spec.destinations:
        if block["name"] in seen:
            raise ConfigError(f"destination name '{block['name']}' is used twice in backup.yml; names must be unique")
        seen[block["name"]] = destination_class(block["type"])(block, spec)
    if not names:
        return list(seen.values())
    unknown = [n for n in names if n not in seen]
    if unknown:
        known = ", ".join(seen) or "none"
        raise InputError(f"unknown destination '{unknown[0]}'; backup.yml defines: {known}")
    return [seen[n] for n in names]


def get(spec: Spec, name: str) -> Destination:
    """One configured destination by name. Raises InputError."""
    return configured(spec, [name])[0]
