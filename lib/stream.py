"""Chaining processes: source -> stage -> stage -> sink, with every stage's exit status checked.

Bulk bytes flow between processes through OS pipes. Python touches them only at the sink, in
large reads, to hash and write them (one pass, no second read for the checksum), or to keep
a short tail. Stage stderr goes to unnamed temp files, so no pipe can fill up and deadlock.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lib.errors import StageFailed
from lib.exec import child_env, dying_with_tool, require_binary, tail_text

CHUNK = 1 << 20  # 1 MiB reads at the sink


@dataclass
class Stage:
    """One process of a pipeline. ``env`` replaces the environment when given (build it with
    lib.exec.child_env or Place.env), else the child gets ``child_env()``; ``pass_fds`` are inherited."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] | None = None
    pass_fds: tuple[int, ...] = ()
    ok_codes: tuple[int, ...] = (0,)
    # Called with the Popen right after start (e.g. to write a passphrase to a pipe).
    on_start: Callable[[subprocess.Popen], None] | None = None


@dataclass
class StageResult:
    name: str
    returncode: int
    stderr: str

    @property
    def sigpipe(self) -> bool:
        return self.returncode in (-signal.SIGPIPE, 128 + signal.SIGPIPE)  # direct, or via a shell


@dataclass
class PipelineResult:
    """What a pipeline did: per-stage results, bytes at the sink, their sha256, the tail kept."""

    stages: list[StageResult]
    size: int = 0
    sha256: str = ""
    tail: bytes = b""
    seconds: float = 0.0
    ok_codes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def failures(self) -> list[StageResult]:
        return [s for s in self.stages if s.returncode not in self.ok_codes.get(s.name, (0,))]

    def cause(self) -> StageResult | None:
        """The failure that broke the pipeline, or None.

        A stage that died of a closed pipe (SIGPIPE, "Broken pipe") is a consequence of a stage
        downstream; a stage fed truncated input fails after the real cause upstream. So: the
        first failure that is not a broken pipe, else the most downstream failure.
        """
        failed = self.failures()
        if not failed:
            return None
        primary = [f for f in failed if not (f.sigpipe or "broken pipe" in f.stderr.lower())]
        return primary[0] if primary else failed[-1]

    def raise_for_status(self, context: str = "") -> None:
        """Raise StageFailed naming the stage that broke the pipeline (others listed after it)."""
        cause = self.cause()
        if cause is None:
            return
        why = f"exit status {cause.returncode}" if cause.returncode >= 0 else f"killed by signal {-cause.returncode}"
        others = [s.name for s in self.failures() if s is not cause]
        detail = cause.stderr
        if others:
            detail = (detail + " " if detail else "") + f"(also failed: {', '.join(others)})"
        raise StageFailed(f"{context}{cause.name}", why, detail)


class Sink:
    """Where the last stage's stdout goes. Subclasses implement ``write``/``close``."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: memoryview) -> None:
        self.size += len(data)

    def close(self) -> None:  # pragma: no cover - trivial
        pass


class FileSink(Sink):
    """Write to ``path`` (created 0600, must not exist), hashing on the way; fsync on close."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.hash = hashlib.sha256()
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    def write(self, data: memoryview) -> None:
        super().write(data)
        self.hash.update(data)
        view = data
        while view:
            written = os.write(self.fd, view)
            view = view[written:]

    def close(self) -> None:
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)


class TailSink(Sink):
    """Keep only the last ``keep`` bytes (e.g. to look for an end-of-dump marker)."""

    def __init__(self, keep: int = 64 * 1024) -> None:
        super().__init__()
        self.keep = keep
        self.tail = bytearray()

    def write(self, data: memoryview) -> None:
        super().write(data)
        self.tail += data
        if len(self.tail) > 2 * self.keep:
            del self.tail[: -self.keep]

    def result(self) -> bytes:
        return bytes(self.tail[-self.keep :])


class HashSink(Sink):
    """Discard the bytes, keeping their sha256 and count."""

    def __init__(self) -> None:
        super().__init__()
        self.hash = hashlib.sha256()

    def write(self, data: memoryview) -> None:
        super().write(data)
        self.hash.update(data)


def _start(stage: Stage, stdin, stdout) -> tuple[subprocess.Popen, object]:
    require_binary(stage.argv[0])
    err = tempfile.TemporaryFile()  # noqa: SIM115 - closed after the process is reaped
    try:
        proc = subprocess.Popen(
            dying_with_tool(stage.argv),  # dies with this process, even by SIGKILL
            stdin=stdin,
            stdout=stdout,
            stderr=err,
            env=dict(stage.env) if stage.env is not None else child_env(),
            pass_fds=stage.pass_fds,
            close_fds=True,
        )
    except FileNotFoundError:
        err.close()
        require_binary(stage.argv[0])
        raise
    return proc, err


def run_pipeline(
    stages: Sequence[Stage],
    sink: Sink,
    source: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> PipelineResult:
    """Run ``stages`` connected by pipes, the first reading ``source`` (or nothing), the last
    feeding ``sink``. Always waits for every process; never raises for a stage's exit status
    (call ``raise_for_status`` on the result). The sink is closed before returning.
    """
    if not stages:
        raise ValueError("a pipeline needs at least one stage")
    started = time.monotonic()
    procs: list[tuple[Stage, subprocess.Popen, object]] = []
    source_file = open(source, "rb") if source is not None else None  # noqa: SIM115
    stdin = source_file if source_file is not None else subprocess.DEVNULL
    try:
        for index, stage in enumerate(stages):
            proc, err = _start(stage, stdin, subprocess.PIPE)
            if index > 0:
                procs[-1][1].stdout.close()  # only the child keeps the read end
            procs.append((stage, proc, err))
            stdin = proc.stdout
            if stage.on_start:
                stage.on_start(proc)
        if source_file is not None:
            source_file.close()
            source_file = None
        last = procs[-1][1].stdout
        try:  # a roomy last pipe: fewer, bigger reads at the sink
            fcntl.fcntl(last.fileno(), fcntl.F_SETPIPE_SZ, CHUNK)
        except OSError:
            pass
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        fd = last.fileno()
        while True:
            n = os.readv(fd, [buf])
            if not n:
                break
            sink.write(view[:n])
            if progress:
                progress(sink.size)
        last.close()
    except BaseException:
        for _, proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
        raise
    finally:
        if source_file is not None:
            source_file.close()
        results = []
        for stage, proc, err in procs:
            proc.wait()
            err.seek(0)
            results.append(StageResult(stage.name, proc.returncode, tail_text(err.read()[-8192:])))
            err.close()
        sink.close()
    final = getattr(sink, "inner", sink)  # through a TapSink
    result = PipelineResult(
        stages=results,
        size=sink.size,
        tail=final.result() if isinstance(final, TailSink) else b"",
        sha256=final.hash.hexdigest() if hasattr(final, "hash") else "",
        seconds=time.monotonic() - started,
        ok_codes={s.name: s.ok_codes for s in stages},
    )
    return result


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in large chunks (hashlib releases the GIL)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := handle.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


class Tap:
    """A ``tee`` stage copying the stream at its place in a pipeline into a second pipeline
    (``branch``), run in a thread, in the same pass. Bytes move only through OS pipes; the branch
    keeps a bounded tail. Used to verify what is being written while it is written.

    Usage: put ``tap.stage`` in the main pipeline, run it, then ``tap.finish()`` for the branch's
    result (re-raises an exception the branch thread met).
    """

    def __init__(
        self,
        branch: Sequence[Stage],
        name: str = "tee",
        suffix: str = "",
        keep: int = 256 * 1024,
    ) -> None:
        if not branch:
            raise ValueError("a tap needs branch stages")
        self._read_fd, self._write_fd = os.pipe()
        self._keep = keep
        self._lock = threading.Lock()
        first = branch[0]
        self._branch = [replace(first, name=first.name + suffix, on_start=self._reader_started)]
        self._branch += [replace(s, name=s.name + suffix) for s in branch[1:]]
        self._first_hook: Callable | None = first.on_start
        self._thread: threading.Thread | None = None
        self._result: PipelineResult | None = None
        self._error: BaseException | None = None
        self.stage = Stage(
            name, ["tee", f"/dev/fd/{self._write_fd}"], pass_fds=(self._write_fd,), on_start=self._tee_started
        )

    def _close(self, attr: str) -> None:
        with self._lock:
            fd = getattr(self, attr)
            if fd is not None:
                setattr(self, attr, None)
                os.close(fd)

    def _tee_started(self, _proc: subprocess.Popen) -> None:
        self._close("_write_fd")  # tee holds the only write end: its exit means EOF for the branch
        self._thread = threading.Thread(target=self._run, name="tap", daemon=True)
        self._thread.start()

    def _reader_started(self, proc: subprocess.Popen) -> None:
        self._close("_read_fd")  # the branch's first process holds the only read end
        if self._first_hook:
            self._first_hook(proc)

    def _run(self) -> None:
        try:
            self._result = run_pipeline(self._branch, TailSink(self._keep), source=Path(f"/dev/fd/{self._read_fd}"))
        except BaseException as exc:  # handed to the caller by finish()
            self._error = exc
        finally:
            self._close("_read_fd")  # never leave tee blocked on a pipe nobody reads

    # -- in-process use: the pipeline's sink copies the stream into the branch (no tee process) --
    def start_in_process(self) -> None:
        """Start the branch now; the bytes come from ``write`` (see TapSink)."""
        try:  # a roomy pipe: the writer seldom waits for the branch
            fcntl.fcntl(self._write_fd, fcntl.F_SETPIPE_SZ, 1 << 20)
        except (OSError, AttributeError):
            pass
        self._thread = threading.Thread(target=self._run, name="tap", daemon=True)
        self._thread.start()

    def write(self, data: memoryview) -> None:
        """Copy ``data`` into the branch; once the branch stopped reading, nothing (its exit status
        tells why)."""
        with self._lock:
            fd = self._write_fd
        if fd is None:
            return
        try:
            while data:
                data = data[os.write(fd, data) :]
        except OSError:
            self._close("_write_fd")

    def close_input(self) -> None:
        """End of the stream for the branch (in-process use)."""
        self._close("_write_fd")

    def finish(self) -> PipelineResult | None:
        """Wait for the branch; close what is left. Returns its result (None if tee never started)."""
        self._close("_write_fd")
        if self._thread is not None:
            self._thread.join()
        self._close("_read_fd")
        if self._error is not None:
            raise self._error
        return self._result


class TapSink(Sink):
    """A sink that also copies everything into ``tap``'s branch (instead of a ``tee`` process:
    one copy less through the kernel, and the sink reads bigger chunks)."""

    def __init__(self, inner: Sink, tap: Tap) -> None:
        super().__init__()
        self.inner = inner
        self.tap = tap

    def write(self, data: memoryview) -> None:
        super().write(data)
        self.tap.write(data)
        self.inner.write(data)

    def close(self) -> None:
        self.tap.close_input()
        self.inner.close()


def run_tapped(
    stages: Sequence[Stage],
    at: int,
    tap: Tap,
    sink: Sink,
    progress: Callable[[int], None] | None = None,
    source: Path | None = None,
) -> tuple[PipelineResult, PipelineResult]:
    """Run ``stages`` into ``sink`` with ``tap.stage`` inserted before index ``at`` (with ``at``
    past the last stage, the sink itself copies the stream into the branch: TapSink). Returns
    (the main result with the branch's stages merged in, the branch result). Never raises for
    exit statuses."""
    if at >= len(stages):
        full = list(stages)
        tap.start_in_process()
        sink = TapSink(sink, tap)
    else:
        full = [*stages[:at], tap.stage, *stages[at:]]
    try:
        main = run_pipeline(full, sink, source=source, progress=progress)
    except BaseException:
        try:  # the first error is the one to report
            tap.finish()
        except Exception:  # noqa: S110
            pass
        raise
    branch = tap.finish()
    if branch is None:  # pragma: no cover - tee always starts when run_pipeline returns
        raise RuntimeError("the tapped branch never started")
    merged = replace(main, stages=main.stages + branch.stages, ok_codes={**main.ok_codes, **branch.ok_codes})
    return merged, branch


class Background:
    """Run ``func`` in a thread; ``result()`` waits and returns its value or raises its exception."""

    def __init__(self, func: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(func,), name="background", daemon=True)
        self._thread.start()

    def _run(self, func: Callable[[], Any]) -> None:
        try:
            self._value = func()
        except BaseException as exc:  # handed over by result()
            self._error = exc

    def join(self) -> None:
        self._thread.join()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value
