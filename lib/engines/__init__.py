"""Database engines. Each module provides one ``Engine`` subclass registered here by name."""

from __future__ import annotations

from lib.engines.base import Engine
from lib.errors import ConfigError

_REGISTRY: dict[str, type[Engine]] = {}


def register(cls: type[Engine]) -> type[Engine]:
    _REGISTRY[cls.name] = cls
    return cls


def get_engine(name: str) -> Engine:
    """The engine called ``name``. Raises ConfigError for an unknown engine."""
    _load_all()
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ConfigError(f"unknown engine '{name}'; supported: {', '.join(sorted(_REGISTRY))}") from None


def engine_for_file(name: str) -> str | None:
    """The engine whose backups have file names like ``name`` (a trailing .gpg ignored), for files
    without a record; None when no engine claims it."""
    _load_all()
    base = name[:-4] if name.endswith(".gpg") else name
    for engine_name, cls in sorted(_REGISTRY.items()):
        if any(marker in base for marker in cls.file_markers):
            return engine_name
    return None


def _load_all() -> None:
    from lib.engines import (
        postgres,  # noqa: F401
        s3,  # noqa: F401
    )

    try:
        from lib.engines import mongodb  # noqa: F401
    except ImportError:  # pragma: no cover - engine not built yet
        pass
