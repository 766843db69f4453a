"""lib/stream.py with real processes: exit statuses, the failing stage, hashing at the sink."""

from __future__ import annotations

import hashlib
import subprocess

import pytest

from lib.errors import StageFailed
from lib.stream import FileSink, HashSink, Stage, TailSink, run_pipeline


def sh(name, script):
    return Stage(name, ["sh", "-c", script])


def test_bytes_flow_through_and_are_hashed(tmp_path):
    out = tmp_path / "out"
    result = run_pipeline([sh("make", "seq 1 100000"), Stage("gzip", ["gzip", "-1", "-c"])], FileSink(out))
    result.raise_for_status()
    data = out.read_bytes()
    assert result.size == len(data) > 0
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert oct(out.stat().st_mode & 0o777) == "0o600"


def test_source_file_feeds_the_first_stage(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(b"x" * 3_000_000)
    result = run_pipeline([Stage("cat", ["cat"])], HashSink(), source=src)
    assert result.sha256 == hashlib.sha256(b"x" * 3_000_000).hexdigest()


def test_upstream_failure_is_reported_even_when_downstream_succeeds():
    result = run_pipeline(
        [sh("dump", "echo partial; echo 'lost connection' >&2; exit 3"), Stage("gzip", ["gzip"])], TailSink()
    )
    with pytest.raises(StageFailed, match=r"dump failed: exit status 3: lost connection"):
        result.raise_for_status()


def test_downstream_failure_is_the_cause_not_the_broken_pipe_upstream():
    result = run_pipeline(
        [sh("dump", "yes | head -c 50000000"), sh("enc", "head -c 10 >/dev/null; echo 'bad key' >&2; exit 2")],
        TailSink(),
    )
    with pytest.raises(StageFailed) as info:
        result.raise_for_status()
    assert info.value.stage == "enc"
    assert "bad key" in str(info.value)


def test_upstream_cause_wins_over_a_downstream_stage_fed_truncated_input():
    result = run_pipeline(
        [sh("gunzip", "printf 'abc'; echo 'crc error' >&2; exit 1"), sh("check", "cat >/dev/null; exit 4")], TailSink()
    )
    with pytest.raises(StageFailed) as info:
        result.raise_for_status()
    assert info.value.stage == "gunzip"
    assert "also failed: check" in str(info.value)


def test_tail_sink_keeps_only_the_end():
    result = run_pipeline([sh("gen", "seq 1 200000")], TailSink(keep=14))
    assert result.tail == b"199999\n200000\n"


def test_missing_binary_is_an_input_error_naming_the_package(monkeypatch, tmp_path):
    from lib.errors import EnvironmentProblem

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EnvironmentProblem, match="'zstd' is not installed or not on PATH; install the zstd package"):
        run_pipeline([Stage("zstd", ["zstd", "-c"])], TailSink())


def test_tap_branch_sees_exactly_the_bytes_written_in_the_same_pass(tmp_path):
    """At the end of the pipeline the sink itself copies the stream into the branch (no tee)."""
    from lib.stream import Tap, run_tapped

    out = tmp_path / "out.gz"
    tap = Tap([Stage("gzip -d", ["gzip", "-d", "-c"]), Stage("sha", ["sha256sum"])], name="tee", suffix=" (check)")
    result, branch = run_tapped(
        [sh("make", "seq 1 300000"), Stage("gzip", ["gzip", "-1", "-c"])], 2, tap, FileSink(out)
    )
    result.raise_for_status()
    plain = subprocess.run(["gzip", "-dc", str(out)], capture_output=True, check=True).stdout
    assert branch.tail.split()[0].decode() == hashlib.sha256(plain).hexdigest()
    assert result.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert [s.name for s in result.stages] == ["make", "gzip", "gzip -d (check)", "sha (check)"]


def test_tap_in_the_middle_is_a_tee_process(tmp_path):
    from lib.stream import Tap, run_tapped

    out = tmp_path / "out.gz"
    tap = Tap([Stage("sha", ["sha256sum"])], name="tee", suffix=" (check)")
    result, branch = run_tapped(
        [sh("make", "seq 1 300000"), Stage("gzip", ["gzip", "-1", "-c"])], 1, tap, FileSink(out)
    )
    result.raise_for_status()
    plain = subprocess.run(["gzip", "-dc", str(out)], capture_output=True, check=True).stdout
    assert branch.tail.split()[0].decode() == hashlib.sha256(plain).hexdigest()
    assert [s.name for s in result.stages] == ["make", "tee", "gzip", "sha (check)"]


def test_a_failing_tap_branch_is_reported_as_the_cause(tmp_path):
    from lib.stream import Tap, run_tapped

    tap = Tap([sh("checker", "head -c 100 >/dev/null; echo 'incomplete' >&2; exit 3")], suffix=" (check)")
    result, _ = run_tapped([sh("make", "head -c 20000000 /dev/zero")], 1, tap, FileSink(tmp_path / "out"))
    assert result.cause().name == "checker (check)"
    with pytest.raises(StageFailed, match="checker \\(check\\) failed: exit status 3: incomplete"):
        result.raise_for_status()
