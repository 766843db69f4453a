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


def _load_all() -> None:
    from lib.engines import postgres  # noqa: F401

    try:
        from lib.engines import mongodb  # noqa: F401
    except ImportError:  # pragma: no cover - engine not built yet
        pass
