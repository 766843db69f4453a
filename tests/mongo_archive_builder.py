"""Builds and reads mongodump archives for the tests and the MongoDB test doubles.

Follows mongo-tools' common/archive/spec.md: magic 0x8199e26d, a header document, one metadata
document per collection, a terminator, then interleaved namespace segments (header {db,
collection, EOF: false, CRC: 0}, documents, terminator) and one EOF block per collection (header
{EOF: true, CRC: CRC-64/ECMA of its documents}, terminator). Real BSON encoding of simple
documents (str, int, float, bool, None, dict, list, bytes). Independent of lib/ on purpose, so
the archive walker is tested against a second implementation of the format.
"""

from __future__ import annotations

import gzip
import io
import json
import struct

MAGIC = struct.pack("<I", 0x8199E26D)
TERMINATOR = b"\xff\xff\xff\xff"


# -- BSON -----------------------------------------------------------------------------------------
def _cstring(text: str) -> bytes:
    raw = text.encode()
    assert b"\x00" not in raw
    return raw + b"\x00"


def _element(name: str, value) -> bytes:
    key = _cstring(name)
    if isinstance(value, bool):
        return b"\x08" + key + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
            return b"\x10" + key + struct.pack("<i", value)
        return b"\x12" + key + struct.pack("<q", value)
    if isinstance(value, float):
        return b"\x01" + key + struct.pack("<d", value)
    if isinstance(value, str):
        raw = value.encode() + b"\x00"
        return b"\x02" + key + struct.pack("<i", len(raw)) + raw
    if value is None:
        return b"\x0a" + key
    if isinstance(value, dict):
        return b"\x03" + key + encode(value)
    if isinstance(value, list):
        return b"\x04" + key + encode({str(i): v for i, v in enumerate(value)})
    if isinstance(value, bytes):
        return b"\x05" + key + struct.pack("<i", len(value)) + b"\x00" + value
    raise TypeError(f"cannot encode {type(value)}")


def encode(doc: dict) -> bytes:
    """BSON encoding of a dict."""
    body = b"".join(_element(k, v) for k, v in doc.items())
    return struct.pack("<i", len(body) + 5) + body + b"\x00"


def decode(data: bytes) -> dict:
    """Decode a BSON document made of the types ``encode`` writes."""
    size = struct.unpack_from("<i", data)[0]
    assert size == len(data) and data[-1] == 0, "bad BSON length"
    out: dict = {}
    i = 4
    while i < size - 1:
        kind = data[i]
        end = data.index(b"\x00", i + 1)
        name = data[i + 1 : end].decode()
        i = end + 1
        if kind == 0x08:
            out[name], i = data[i] == 1, i + 1
        elif kind == 0x10:
            out[name], i = struct.unpack_from("<i", data, i)[0], i + 4
        elif kind == 0x12:
            out[name], i = struct.unpack_from("<q", data, i)[0], i + 8
        elif kind == 0x01:
            out[name], i = struct.unpack_from("<d", data, i)[0], i + 8
        elif kind == 0x02:
            n = struct.unpack_from("<i", data, i)[0]
            out[name], i = data[i + 4 : i + 3 + n].decode(), i + 4 + n
        elif kind == 0x0A:
            out[name] = None
        elif kind in (0x03, 0x04):
            n = struct.unpack_from("<i", data, i)[0]
            sub = decode(data[i : i + n])
            out[name] = sub if kind == 0x03 else list(sub.values())
            i += n
        elif kind == 0x05:
            n = struct.unpack_from("<i", data, i)[0]
            out[name], i = data[i + 5 : i + 5 + n], i + 5 + n
        else:
            raise ValueError(f"unsupported BSON type {kind:#x}")
    return out


# -- CRC-64/ECMA as Go's hash/crc64 computes it (reflected, init and xorout all ones) --------------
def _crc_table() -> list[int]:
    poly = 0xC96C5795D7870F42
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc_table()


def crc64(data: bytes, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFFFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFFFFFFFFFF


def _signed64(value: int) -> int:
    return value - 2**64 if value >= 2**63 else value


# -- archives -------------------------------------------------------------------------------------
def build(
    database: str,
    collections: dict[str, list[dict]],
    segment: int = 2,
    views: tuple[str, ...] = (),
    server_version: str = "7.0.12",
) -> bytes:
    """An uncompressed archive of ``database``: collections' documents interleaved ``segment``
    documents at a time (an empty collection gets an empty segment, as mongodump's buffered
    writer produces), then one EOF block per collection."""
    out = io.BytesIO()
    out.write(MAGIC)
    out.write(
        encode(
            {
                "concurrent_collections": 4,
                "version": "0.1",
                "server_version": server_version,
                "tool_version": "100.9.4",
            }
        )
    )
    for name, docs in collections.items():
        metadata = json.dumps(
            {"indexes": [{"v": 2, "key": {"_id": 1}, "name": "_id_"}], "uuid": "00", "type": "collection"}
        )
        out.write(
            encode(
                {
                    "db": database,
                    "collection": name,
                    "metadata": metadata,
                    "size": sum(len(encode(d)) for d in docs),
                    "type": "collection",
                }
            )
        )
    for name in views:
        metadata = json.dumps({"options": {"viewOn": "x", "pipeline": []}, "type": "view"})
        out.write(encode({"db": database, "collection": name, "metadata": metadata, "size": 0, "type": "view"}))
    out.write(TERMINATOR)
    encoded = {name: [encode(d) for d in docs] for name, docs in collections.items()}
    crcs = {name: 0 for name in collections}
    position = {name: 0 for name in collections}
    remaining = [name for name in collections]
    for name in [n for n in collections if not encoded[n]]:  # empty buffer flushed on close
        out.write(encode({"db": database, "collection": name, "EOF": False, "CRC": 0}))
        out.write(TERMINATOR)
    while any(position[n] < len(encoded[n]) for n in remaining):
        for name in remaining:
            chunk = encoded[name][position[name] : position[name] + segment]
            if not chunk:
                continue
            position[name] += len(chunk)
            out.write(encode({"db": database, "collection": name, "EOF": False, "CRC": 0}))
            for doc in chunk:
                crcs[name] = crc64(doc, crcs[name])
                out.write(doc)
            out.write(TERMINATOR)
    for name in collections:
        out.write(encode({"db": database, "collection": name, "EOF": True, "CRC": _signed64(crcs[name])}))
        out.write(TERMINATOR)
    return out.getvalue()


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


def parse(data: bytes) -> tuple[dict, list[dict], dict[tuple[str, str], list[dict]]]:
    """(header, collection metadata, {(db, collection): documents}) of an uncompressed archive.
    Raises ValueError for anything malformed or incomplete (as mongorestore would refuse it)."""
    if data[:4] != MAGIC:
        raise ValueError("stream or file does not appear to be a mongodump archive")
    pos = 4

    def next_doc():
        nonlocal pos
        if pos + 4 > len(data):
            raise ValueError("unexpected end of archive")
        size = struct.unpack_from("<I", data, pos)[0]
        if size == 0xFFFFFFFF:
            pos += 4
            return None
        if pos + size > len(data):
            raise ValueError("unexpected end of archive")
        doc = decode(data[pos : pos + size])
        pos += size
        return doc

    header = next_doc()
    metadata = []
    while (doc := next_doc()) is not None:
        metadata.append(doc)
    namespaces: dict[tuple[str, str], list[dict]] = {}
    done = set()
    while pos < len(data):
        head = next_doc()
        key = (head["db"], head["collection"])
        namespaces.setdefault(key, [])
        if head["EOF"]:
            if next_doc() is not None:
                raise ValueError("EOF block without terminator")
            done.add(key)
            continue
        while (doc := next_doc()) is not None:
            namespaces[key].append(doc)
    if set(namespaces) - done:
        raise ValueError("archive ends before every collection's EOF block")
    return header, metadata, namespaces
