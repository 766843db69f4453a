"""Walk a mongodump archive (``mongodump --archive [--gzip]``) and say whether it is complete.

Standalone on purpose (standard library only, no ``lib`` imports): the backup road runs it as a
pipeline stage, ``python -I lib/engines/mongo_archive.py < archive``, and it is importable for tests.

The format (mongo-tools ``common/archive/spec.md``)::

    archive   = magic header-doc *collection-metadata-doc terminator *(segment | eof)
    magic     = int32 LE 0x8199e26d
    segment   = namespace-header-doc {db, collection, EOF: false, CRC} *document terminator
    eof       = namespace-header-doc {db, collection, EOF: true, CRC} terminator
    terminator= 0xFFFFFFFF

Segments of different collections interleave. The walk reads stdin in large chunks (constant
memory: one chunk plus at most one small header document), checks every BSON length prefix and
trailing NUL byte, decodes only the small header documents, counts body documents per namespace,
and requires an EOF block for every namespace the prelude lists (views excepted) and nothing
after the last block. Gzip input (``1f 8b``) is decompressed on the fly, checking its CRC.
The CRC-64 of the documents is not recomputed (mongorestore does that while restoring).

Output: one JSON document on stdout. Exit status 0 when the archive is complete, 1 (with a
one-line reason on stderr) when it is not, 2 for usage errors.
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from collections.abc import Callable
from typing import Any, BinaryIO

MAGIC = 0x8199E26D
TERMINATOR = 0xFFFFFFFF
MIN_BSON = 5
MAX_BSON = 16 * 1024 * 1024  # mongo-tools refuses larger documents in an archive
MAX_HEADER = 1024 * 1024  # header/metadata documents are small; refuse to buffer huge ones
CHUNK = 1 << 20
_INT32 = struct.Struct("<i")
_UINT32 = struct.Struct("<I")


class ArchiveError(Exception):
    """The archive is damaged, truncated or not a mongodump archive."""


# -- input ----------------------------------------------------------------------------------------
def _raw_chunks(stream: BinaryIO) -> Callable[[], bytes]:
    """Reader returning the next chunk of ``stream`` (b'' at the end)."""
    read = getattr(stream, "read1", stream.read)
    return lambda: read(CHUNK)


class _Gunzip:
    """Decompress a (multi-member) gzip stream chunk by chunk with bounded output per call."""

    def __init__(self, first: bytes, more: Callable[[], bytes]) -> None:
        self.pending = first
        self.more = more
        self.decomp = zlib.decompressobj(wbits=31)
        self.members = 0
        self.done = False

    def __call__(self) -> bytes:
        while not self.done:
            if self.decomp.eof:
                self.members += 1
                rest = self.decomp.unused_data + self.pending
                self.pending = b""
                if not rest:
                    rest = self.more()
                if not rest:
                    self.done = True
                    break
                if rest[:2] != b"\x1f\x8b":
                    raise ArchiveError("gzip layer: unexpected data after the end of the gzip stream")
                self.decomp = zlib.decompressobj(wbits=31)
                self.pending = rest
            data = self.decomp.unconsumed_tail or self.pending or self.more()
            self.pending = b""
            if not data:
                raise ArchiveError("gzip layer: the compressed stream is truncated")
            try:
                out = self.decomp.decompress(data, CHUNK)
            except zlib.error as exc:
                raise ArchiveError(f"gzip layer is corrupt ({exc})") from None
            if out:
                return out
        return b""


class _Buffer:
    """Exact-size reads and skips over a chunk source, keeping at most one chunk in memory."""

    def __init__(self, source: Callable[[], bytes], first: bytes = b"") -> None:
        self.source = source
        self.buf = first
        self.pos = 0
        self.offset = 0  # bytes consumed so far (of the decompressed archive)

    def _fill(self) -> bool:
        chunk = self.source()
        if not chunk:
            return False
        self.buf = self.buf[self.pos :] + chunk
        self.pos = 0
        return True

    def at_end(self) -> bool:
        """True when no byte is left."""
        return self.pos >= len(self.buf) and not self._fill()

    def read(self, n: int, what: str) -> bytes:
        """Exactly ``n`` bytes. Raises ArchiveError (truncated) when the input ends first."""
        while len(self.buf) - self.pos < n:
            if not self._fill():
                raise ArchiveError(f"archive is truncated at byte {self.offset + len(self.buf) - self.pos} ({what})")
        data = self.buf[self.pos : self.pos + n]
        self.pos += n
        self.offset += n
        return data

    def skip(self, n: int, what: str) -> None:
        """Discard exactly ``n`` bytes without keeping them. Raises ArchiveError when truncated."""
        while n:
            available = len(self.buf) - self.pos
            if not available and not self._fill():
                raise ArchiveError(f"archive is truncated at byte {self.offset} ({what})")
            step = min(n, len(self.buf) - self.pos)
            self.pos += step
            self.offset += step
            n -= step
            if self.pos == len(self.buf):
                self.buf, self.pos = b"", 0


# -- minimal BSON ---------------------------------------------------------------------------------
_FIXED = {0x01: 8, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8, 0x12: 8, 0x13: 16, 0x7F: 0, 0xFF: 0}


def decode_header(doc: bytes) -> dict[str, Any]:
    """Top-level fields of a small BSON document: strings, ints, bools, doubles; other types are
    skipped (value None). Raises ArchiveError when the document is malformed."""
    result: dict[str, Any] = {}
    end = len(doc) - 1
    i = 4
    try:
        while i < end:
            kind = doc[i]
            name_end = doc.index(b"\x00", i + 1, end)
            name = doc[i + 1 : name_end].decode("utf-8", "replace")
            i = name_end + 1
            if kind in (0x02, 0x0D, 0x0E):  # string, JS code, symbol
                size = _INT32.unpack_from(doc, i)[0]
                if size < 1 or i + 4 + size > end or doc[i + 4 + size - 1] != 0:
                    raise ArchiveError("bad string in a header document")
                result[name] = doc[i + 4 : i + 4 + size - 1].decode("utf-8", "replace")
                i += 4 + size
            elif kind == 0x08:
                result[name] = doc[i] != 0
                i += 1
            elif kind == 0x10:
                result[name] = _INT32.unpack_from(doc, i)[0]
                i += 4
            elif kind in (0x12, 0x11, 0x09):
                result[name] = struct.unpack_from("<q", doc, i)[0]
                i += 8
            elif kind == 0x01:
                result[name] = struct.unpack_from("<d", doc, i)[0]
                i += 8
            elif kind in (0x03, 0x04, 0x0F):  # document, array, code with scope: length-prefixed
                size = _INT32.unpack_from(doc, i)[0]
                if size < MIN_BSON:
                    raise ArchiveError("bad embedded document in a header document")
                result[name] = None
                i += size
            elif kind == 0x05:
                result[name] = None
                i += 5 + _INT32.unpack_from(doc, i)[0]
            elif kind == 0x0B:  # regex: two cstrings
                i = doc.index(b"\x00", doc.index(b"\x00", i, end) + 1, end) + 1
                result[name] = None
            elif kind == 0x0C:  # DBPointer
                i += 4 + _INT32.unpack_from(doc, i)[0] + 12
                result[name] = None
            elif kind in _FIXED:
                result[name] = None
                i += _FIXED[kind]
            else:
                raise ArchiveError(f"unknown BSON type 0x{kind:02x} in a header document")
    except (ValueError, IndexError, struct.error):
        raise ArchiveError("malformed header document") from None
    if i != end:
        raise ArchiveError("malformed header document (fields overrun its length)")
    return result


# -- the walk -------------------------------------------------------------------------------------
def _read_length(buf: _Buffer, what: str, at_block_start: bool = False) -> int | None:
    """Next length prefix; None for a terminator; -1 for a clean end of input at a block start."""
    if at_block_start and buf.at_end():
        return -1
    raw = buf.read(4, what)
    value = _UINT32.unpack(raw)[0]
    if value == TERMINATOR:
        return None
    if value < MIN_BSON or value > MAX_BSON:
        raise ArchiveError(f"byte {buf.offset - 4}: {value} is neither a BSON length nor a terminator ({what})")
    return value


def _read_doc(buf: _Buffer, size: int, what: str) -> bytes:
    if size > MAX_HEADER:
        raise ArchiveError(f"byte {buf.offset - 4}: {what} of {size} bytes is implausibly large")
    body = buf.read(size - 4, what)
    if body[-1] != 0:
        raise ArchiveError(f"byte {buf.offset - 1}: {what} does not end with a NUL byte")
    return _INT32.pack(size) + body


def _skip_doc(buf: _Buffer, size: int, what: str) -> None:
    buf.skip(size - 5, what)
    if buf.read(1, what) != b"\x00":
        raise ArchiveError(f"byte {buf.offset - 1}: {what} does not end with a NUL byte")


def _is_view(meta: dict[str, Any]) -> bool:
    if meta.get("type") == "view":
        return True
    text = meta.get("metadata") or ""
    return '"viewOn"' in text


def walk(stream: BinaryIO) -> dict[str, Any]:
    """Walk the archive on ``stream``. Returns the summary; raises ArchiveError when incomplete."""
    more = _raw_chunks(stream)
    first = more()
    gzipped = first[:2] == b"\x1f\x8b"
    gunzip = _Gunzip(first, more) if gzipped else None
    buf = _Buffer(gunzip, b"") if gunzip else _Buffer(more, first)
    summary: dict[str, Any] = {"gzip": gzipped}

    magic = buf.read(4, "magic number") if not buf.at_end() else b""
    if len(magic) < 4:
        raise ArchiveError("archive is empty")
    if _UINT32.unpack(magic)[0] != MAGIC:
        raise ArchiveError(
            f"not a mongodump archive (magic number 0x{_UINT32.unpack(magic)[0]:08x}, expected 0x{MAGIC:08x})"
        )

    size = _read_length(buf, "archive header")
    if size is None:
        raise ArchiveError("archive header is missing")
    header = decode_header(_read_doc(buf, size, "archive header"))
    summary.update(
        version=header.get("version"),
        server_version=header.get("server_version"),
        tool_version=header.get("tool_version"),
    )
    prelude: list[tuple[str, str]] = []
    views: list[str] = []
    types: dict[tuple[str, str], str] = {}
    while (size := _read_length(buf, "collection metadata")) is not None:
        meta = decode_header(_read_doc(buf, size, "collection metadata"))
        key = (str(meta.get("db", "")), str(meta.get("collection", "")))
        if _is_view(meta):
            views.append(f"{key[0]}.{key[1]}")
        else:
            prelude.append(key)
            types[key] = str(meta.get("type") or "collection")

    counts: dict[tuple[str, str], int] = {}
    finished: set[tuple[str, str]] = set()
    while True:
        size = _read_length(buf, "namespace header", at_block_start=True)
        if size == -1:
            break
        if size is None:
            raise ArchiveError(f"byte {buf.offset - 4}: a terminator where a namespace header should be")
        head = decode_header(_read_doc(buf, size, "namespace header"))
        if not isinstance(head.get("db"), str) or not isinstance(head.get("collection"), str):
            raise ArchiveError(f"byte {buf.offset - size}: namespace header without db/collection")
        key = (head["db"], head["collection"])
        if key in finished:
            raise ArchiveError(f"namespace {key[0]}.{key[1]} continues after its EOF block")
        counts.setdefault(key, 0)
        if head.get("EOF"):
            if _read_length(buf, f"end of {key[0]}.{key[1]}") is not None:
                raise ArchiveError(
                    f"byte {buf.offset - 4}: EOF block of {key[0]}.{key[1]} is not followed by a terminator"
                )
            finished.add(key)
            continue
        n = 0
        while (size := _read_length(buf, f"document of {key[0]}.{key[1]}")) is not None:
            _skip_doc(buf, size, f"document of {key[0]}.{key[1]}")
            n += 1
        counts[key] += n

    def matches(key: tuple[str, str]) -> bool:
        buckets = (key[0], "system.buckets." + key[1])
        return key in finished or (types.get(key) == "timeseries" and buckets in finished)

    missing = [f"{d}.{c}" for d, c in prelude if not matches((d, c))]
    unfinished = [f"{d}.{c}" for d, c in counts if (d, c) not in finished]
    if unfinished or missing:
        names = ", ".join((unfinished + missing)[:5])
        raise ArchiveError(f"archive is truncated: no end-of-collection block for {names}")
    databases = sorted({d for d, _ in prelude} | {d for d, _ in counts})
    summary.update(
        complete=True,
        bytes=buf.offset,
        databases=databases,
        collections=[{"db": d, "collection": c, "documents": counts[(d, c)]} for d, c in sorted(counts)],
        views=sorted(views),
    )
    if gunzip is not None:
        summary["gzip_members"] = gunzip.members
    return summary


def main(argv: list[str]) -> int:
    """Walk stdin; print the JSON summary; exit 0 when complete, 1 when not."""
    if argv:
        print("usage: python mongo_archive.py < ARCHIVE", file=sys.stderr)
        return 2
    try:
        summary = walk(sys.stdin.buffer)
    except ArchiveError as exc:
        print(json.dumps({"complete": False, "error": str(exc)}))
        print(str(exc), file=sys.stderr)
        return 1
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
