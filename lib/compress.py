"""Compressor and decompressor stages. gzip uses pigz (multi-threaded, same format) when installed."""

from __future__ import annotations

import os
import shutil

from lib.errors import ConfigError
from lib.stream import Stage

SUFFIX = {"gzip": ".gz", "zstd": ".zst"}
# gzip level 1: measured on a 2-core machine (docs/benchmarks.md), pigz -1 takes half the CPU of
# -4 and a quarter of -6 for files ~10% larger than -6; zstd -3 is both smaller and faster.
DEFAULT_LEVEL = {"gzip": 1, "zstd": 3}


def _gzip_binary() -> str:
    return "pigz" if shutil.which("pigz") else "gzip"


def compressor(kind: str, level: int | None = None) -> Stage:
    """Stage compressing stdin to stdout with ``kind`` (gzip or zstd), using every core it can."""
    level = level or DEFAULT_LEVEL[kind]
    if kind == "gzip":
        binary = _gzip_binary()
        if binary == "pigz":
            return Stage("pigz", ["pigz", f"-{min(level, 9)}", "-p", str(os.cpu_count() or 1), "-c"])
        return Stage("gzip", ["gzip", f"-{min(level, 9)}", "-c"])
    if kind == "zstd":
        return Stage("zstd", ["zstd", f"-{level}", "-T0", "-q", "-c"])
    raise ConfigError(f"unknown compression '{kind}'; use gzip or zstd")


def decompressor(kind: str) -> Stage:
    """Stage decompressing stdin to stdout; a corrupt or truncated stream makes it exit non-zero."""
    if kind == "gzip":
        binary = _gzip_binary()
        # gzip decompression is serial; pigz's helper threads only add CPU (measured: -p 1 takes
        # 0.48 s of CPU for 73 MB where the default takes 0.74 s and gzip 1.08 s, and is as fast)
        extra = ["-p", "1"] if binary == "pigz" else []
        return Stage(f"{binary} -d", [binary, "-d", *extra, "-c"])
    if kind == "zstd":
        return Stage("zstd -d", ["zstd", "-d", "-q", "-c"])
    raise ConfigError(f"unknown compression '{kind}'; use gzip or zstd")


def kind_from_name(filename: str) -> str | None:
    """Compression implied by a file name (``.gz``/``.zst`` before an optional ``.gpg``), or None."""
    name = filename[:-4] if filename.endswith(".gpg") else filename
    for kind, suffix in SUFFIX.items():
        if name.endswith(suffix):
            return kind
    return None
