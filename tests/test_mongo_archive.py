"""The mongodump archive walker (lib/engines/mongo_archive.py) against archives built by
tests/mongo_archive_builder.py: complete ones pass with the right counts, every truncation and
corruption is refused."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys

import mongo_archive_builder as builder
import pytest

from lib.engines import mongo_archive
from lib.engines.mongo_archive import ArchiveError, walk

COLLECTIONS = {
    "users": [{"_id": i, "name": f"사용자 {i}", "tags": ["a", "b"], "nested": {"n": i, "f": 1.5}} for i in range(9)],
    "lessons": [{"_id": i, "title": "레슨", "body": "x" * 300, "blob": bytes(range(20))} for i in range(4)],
    "empty": [],
}


@pytest.fixture(scope="module")
def archive() -> bytes:
    return builder.build("lemon_korean", COLLECTIONS, segment=3, views=("active_users",))


def counts(summary: dict) -> dict[str, int]:
    return {c["collection"]: c["documents"] for c in summary["collections"]}


def test_complete_archive_counts_documents(archive):
    summary = walk(io.BytesIO(archive))
    assert summary["complete"] is True
    assert counts(summary) == {"users": 9, "lessons": 4, "empty": 0}
    assert summary["databases"] == ["lemon_korean"]
    assert summary["views"] == ["lemon_korean.active_users"]
    assert summary["gzip"] is False
    assert summary["bytes"] == len(archive)
    assert summary["server_version"] == "7.0.12"


def test_gzip_layer_is_read_and_counted(archive):
    summary = walk(io.BytesIO(builder.gzipped(archive)))
    assert summary["gzip"] is True and summary["gzip_members"] == 1
    assert counts(summary) == {"users": 9, "lessons": 4, "empty": 0}


def test_concatenated_gzip_members(archive):
    half = len(archive) // 2
    summary = walk(io.BytesIO(builder.gzipped(archive[:half]) + builder.gzipped(archive[half:])))
    assert summary["gzip_members"] == 2 and summary["complete"]


def test_empty_database_archive_is_complete():
    summary = walk(io.BytesIO(builder.build("nothing", {})))
    assert summary["complete"] and summary["collections"] == []


def test_large_documents_span_chunks(monkeypatch):
    monkeypatch.setattr(mongo_archive, "CHUNK", 1000)
    docs = {"big": [{"_id": i, "blob": bytes(5000 + i)} for i in range(5)], "small": [{"_id": 1}]}
    data = builder.build("db", docs, segment=2)
    assert counts(walk(io.BytesIO(data))) == {"big": 5, "small": 1}
    assert counts(walk(io.BytesIO(builder.gzipped(data)))) == {"big": 5, "small": 1}


def test_every_truncation_is_refused(archive):
    for cut in range(len(archive)):
        with pytest.raises(ArchiveError):
            walk(io.BytesIO(archive[:cut]))


def test_every_truncation_of_the_gzip_layer_is_refused(archive):
    data = builder.gzipped(archive)
    for cut in range(len(data)):
        with pytest.raises(ArchiveError):
            walk(io.BytesIO(data[:cut]))


def test_wrong_magic_number_is_refused(archive):
    with pytest.raises(ArchiveError, match="not a mongodump archive"):
        walk(io.BytesIO(b"\x00\x00\x00\x00" + archive[4:]))
    with pytest.raises(ArchiveError, match="not a mongodump archive"):
        walk(io.BytesIO(b"-- PostgreSQL database dump\n" * 3))


def test_bad_gzip_is_refused(archive):
    data = bytearray(builder.gzipped(archive))
    data[30:40] = bytes(b ^ 0xFF for b in data[30:40])
    with pytest.raises(ArchiveError, match="gzip"):
        walk(io.BytesIO(bytes(data)))
    crc_broken = bytearray(builder.gzipped(archive))
    crc_broken[-6] ^= 0x01  # the CRC32 in the gzip trailer
    with pytest.raises(ArchiveError, match="gzip"):
        walk(io.BytesIO(bytes(crc_broken)))


def test_trailing_garbage_after_gzip_is_refused(archive):
    with pytest.raises(ArchiveError, match="after the end of the gzip stream"):
        walk(io.BytesIO(builder.gzipped(archive) + b"junk"))


def test_trailing_bytes_after_the_last_block_are_refused(archive):
    with pytest.raises(ArchiveError):
        walk(io.BytesIO(archive + b"\x05\x00"))


def first_document(data: bytes) -> int:
    """Offset of the first body document of an archive whose first segment has documents."""
    pos = data.index(b"\xff\xff\xff\xff") + 4  # end of the prelude
    return pos + struct.unpack_from("<i", data, pos)[0]  # skip the namespace header


def test_corrupt_length_prefix_is_refused():
    broken = bytearray(builder.build("db", {"users": COLLECTIONS["users"]}))
    struct.pack_into("<I", broken, first_document(broken), 3)
    with pytest.raises(ArchiveError, match="neither a BSON length nor a terminator"):
        walk(io.BytesIO(bytes(broken)))


def test_document_without_trailing_nul_is_refused():
    broken = bytearray(builder.build("db", {"users": COLLECTIONS["users"]}))
    pos = first_document(broken)
    assert builder.decode(bytes(broken[pos : pos + struct.unpack_from("<i", broken, pos)[0]]))["_id"] == 0
    size = struct.unpack_from("<i", broken, pos)[0]
    broken[pos + size - 1] = 0x01
    with pytest.raises(ArchiveError, match="NUL"):
        walk(io.BytesIO(bytes(broken)))


def test_missing_eof_block_is_refused_even_at_a_block_boundary():
    data = builder.build("db", {"a": [{"_id": 1}], "b": [{"_id": 2}]}, segment=5)
    inside_last_eof = data.rindex(b"\x08EOF\x00\x01")  # the bool field of b's EOF header
    start = data.rindex(b"\xff\xff\xff\xff", 0, inside_last_eof) + 4  # where that block begins
    with pytest.raises(ArchiveError, match="no end-of-collection block for db.b"):
        walk(io.BytesIO(data[:start]))


def test_script_prints_json_and_exits_by_completeness(archive):
    script = [sys.executable, "-I", mongo_archive.__file__]
    good = subprocess.run(script, input=builder.gzipped(archive), capture_output=True)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["complete"] is True
    bad = subprocess.run(script, input=archive[:-3], capture_output=True)
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["complete"] is False
    assert b"truncated" in bad.stderr


def test_builder_round_trip_matches_the_walker(archive):
    _, metadata, namespaces = builder.parse(archive)
    assert {c: len(d) for (_, c), d in namespaces.items()} == counts(walk(io.BytesIO(archive)))
    assert namespaces[("lemon_korean", "users")][3]["nested"] == {"n": 3, "f": 1.5}
    assert len(metadata) == 4
