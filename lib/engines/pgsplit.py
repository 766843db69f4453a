"""Loading a plain-SQL pg_dump stream with its slow parts in parallel sessions.

A plain dump is one script: schema, then every table's COPY data, then the post-data section
(primary keys, indexes, foreign keys), all of which psql would run one after the other in a
single session. ``SqlRouter`` is the sink of the decoded stream. It passes the stream on to a psql
session unchanged (COPY data in bulk: Python only looks for the end-of-data line), except:

- the entries pg_dump labels ``INDEX``, ``CONSTRAINT`` and ``FK CONSTRAINT`` are held back and
  run in ``jobs`` sessions at once, the way ``pg_restore --jobs`` does for custom-format files,
  as one dependency graph: never two statements on the same table at once; a foreign key once
  every build on both its tables is done, added ``NOT VALID`` (a catalog change) and then
  ``VALIDATE``d, so validations run in parallel (the end state is the dump's: a validated
  constraint; one the dump marks ``NOT VALID`` stays so);
- a table whose COPY data passes SPLIT_AFTER bytes is shared with a helper session, in pieces of
  whole rows, each to whichever session has room; the block ends when both have committed.

Anything it does not recognise exactly (a statement of another shape, a ``\\connect``, a ``SET
ROLE``, a held-back entry that grows large) ends the holding back: what was held runs first, then
the stream continues in order in one session. Every session replays the dump's preamble (its SET
lines) and the current ``default_tablespace`` and ``default_table_access_method``.

While it reads, the router also does the dump check INSPECT_AWK does for backups (end marker,
every COPY block closed, rows per block; ``summary()``), so a restore reads the stream once.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import select
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lib.errors import StageFailed
from lib.exec import tail_text
from lib.stream import Sink

_IDENT = rb'(?:[a-z_][a-z0-9_$]*|"(?:[^"]|"")+")'
_QNAME = rb"(?:" + _IDENT + rb"(?:\." + _IDENT + rb")?)"
# The lines the router looks at; everything else passes through untouched.
_MARK = re.compile(
    rb"^(?:COPY |-- (?:Data for )?Name: |-- PostgreSQL database dump complete$|-- Dumped from database version |"
    rb"SET |RESET |\\|SELECT pg_catalog\.set_config\()",
    re.M,
)
END_MARKER = b"-- PostgreSQL database dump complete\n"
VERSION_LINE = b"-- Dumped from database version "
_COPY_TABLE = re.compile(rb"COPY (.*?) \(.*\) FROM stdin;\n|COPY (.*) FROM stdin;\n")
_HEADER = re.compile(rb"-- (?:Data for )?Name: .*; Type: ([A-Z][A-Z ]*); Schema: ")
_COPY_LINE = re.compile(rb"COPY .* FROM stdin;\n")
# A table name as pg_dump writes it: [schema.]table, each part a plain lower-case identifier or a
# double-quoted one. Only names of this shape are ever put into SQL built here.
QUALIFIED_NAME = re.compile(_QNAME)
COPY_TAG = re.compile(rb"COPY (\d+)\r?")
_STATE_SET = re.compile(rb"SET (default_tablespace|default_table_access_method) = [^;\n]*;\n")
_INDEX = re.compile(rb"CREATE (?:UNIQUE )?INDEX " + _IDENT + rb" ON (?:ONLY )?(" + _QNAME + rb") USING [^\n]*;")
_CONSTRAINT = re.compile(
    rb"ALTER TABLE (ONLY )?(" + _QNAME + rb")\n    ADD CONSTRAINT (" + _IDENT + rb") (?!FOREIGN KEY )[^\n]*;"
)
_FOREIGN_KEY = re.compile(
    rb"ALTER TABLE (ONLY )?(" + _QNAME + rb")\n    ADD CONSTRAINT (" + _IDENT + rb") FOREIGN KEY "
    rb"\([^\n]*\) REFERENCES (" + _QNAME + rb")\([^\n]*;"
)
HOLD_LIMIT = 1 << 20  # a held-back entry larger than this is not one of ours
PIPE_SIZE = 1 << 20
# A table's COPY data is shared with a second session once this much of it went to the first: by
# then the first session is inside its COPY, so the CREATE TABLE before it has committed.
SPLIT_AFTER = 4 << 20
PIECE = 512 << 10  # COPY data is handed out in pieces of whole lines of about this size
TERMINATOR = b"\n\\.\n"


@dataclass
class Item:
    """One held-back entry: ``sql`` to run after the session's preamble (it starts with the
    dump's default_tablespace/default_table_access_method at its place); the ``tables`` it works
    on; for a foreign key added NOT VALID, ``validate`` runs afterwards."""

    kind: str  # "build" (index, constraint) or "fk"
    sql: bytes
    tables: frozenset[bytes]
    validate: bytes | None = None
    order: int = 0
    referenced: frozenset[bytes] = frozenset()  # a foreign key's referenced table


@dataclass
class Task:
    """A statement for a parallel session: runs after the tasks ``after`` (indices), never while
    another task on one of ``tables`` runs."""

    sql: bytes
    tables: frozenset[bytes]
    after: frozenset[int]
    cost: int
    order: int


def classify(header_type: str, body: bytes, order: int, state: bytes) -> Item | None:
    """The entry as a parallel item, or None when it is not exactly the shape expected."""
    lines = body.split(b"\n")
    statement: list[bytes] = []
    sets: list[bytes] = []
    for line in lines:
        if not line or line.startswith(b"--"):
            if statement and line and not statement[-1].endswith(b";"):
                return None  # a comment inside the statement: not ours
            continue
        if statement and statement[-1].endswith(b";"):
            return None  # a second statement
        if not statement and _STATE_SET.fullmatch(line + b"\n"):
            sets.append(line + b"\n")
            continue
        statement.append(line)
    text = b"\n".join(statement)
    if text.count(b"'") % 2 or text.count(b'"') % 2:
        return None  # a literal spanning lines: not a shape to cut out of the stream
    prefix = b"".join(sets)
    if header_type == "INDEX" and (m := _INDEX.fullmatch(text)):
        return Item("build", state + prefix + text + b"\n", frozenset([m.group(1)]), order=order)
    if header_type == "CONSTRAINT" and (m := _CONSTRAINT.fullmatch(text)):
        return Item("build", state + prefix + text + b"\n", frozenset([m.group(2)]), order=order)
    if header_type == "FK CONSTRAINT" and (m := _FOREIGN_KEY.fullmatch(text)):
        table, name, referenced = m.group(2), m.group(3), m.group(4)
        refs = frozenset([referenced])
        if m.group(1) and b" NOT VALID" not in text:  # ONLY: a plain table, where NOT VALID is allowed
            add = state + prefix + text[:-1] + b" NOT VALID;\n"
            check = state + b"ALTER TABLE " + table + b" VALIDATE CONSTRAINT " + name + b";\n"
            return Item("fk", add, frozenset([table]), validate=check, order=order, referenced=refs)
        return Item("fk", state + prefix + text + b"\n", frozenset([table]), order=order, referenced=refs)
    return None


class Session:
    """A psql process reading SQL on stdin. ``on_line`` gets its stdout lines (a reader thread);
    stderr goes to a temp file for the error message."""

    def __init__(self, argv: Sequence[str], env, on_line: Callable[[bytes], None] | None = None) -> None:
        self.err = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, env=env, close_fds=True
        )
        try:  # room for a megabyte in the pipe: a session has work queued while another is fed
            fcntl.fcntl(self.proc.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass
        os.set_blocking(self.proc.stdin.fileno(), False)  # send() waits with select; see _spread
        self.lines: list[bytes] = []
        self.primed = False  # the dump's preamble was sent
        self._cond = threading.Condition()
        self._eof = False
        self._on_line = on_line
        self._reader = threading.Thread(target=self._read, name="psql-out", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip(b"\n")
            if self._on_line is not None:
                self._on_line(line)
            else:
                with self._cond:
                    self.lines.append(line)
                    self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def send(self, data: bytes | memoryview) -> bool:
        """Write ``data``; False when psql is gone."""
        view = memoryview(data)
        fd = self.proc.stdin.fileno()
        try:
            while view:
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    select.select([], [fd], [])
        except OSError:
            return False
        return True

    def run(self, sql: bytes, marker: bytes) -> bool:
        """Run ``sql`` and wait until it is done (a SELECT of ``marker`` after it comes back).
        False when psql stopped (an error: ON_ERROR_STOP)."""
        if not self.send(sql + b"SELECT '" + marker + b"';\n"):
            return False
        with self._cond:
            while True:
                if marker in self.lines:
                    self.lines.clear()
                    return True
                if self._eof:
                    return False
                self._cond.wait()

    def close(self) -> tuple[int, str]:
        """End the session; (exit status, stderr tail)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        code = self.proc.wait()
        self._reader.join()
        self.err.seek(0)
        text = tail_text(self.err.read()[-8192:])
        self.err.close()
        return code, text


@dataclass
class Router:
    """Settings shared by the sessions a router starts."""

    #: the argv of a psql session reading stdin, given extra psql flags (e.g. ["-q"])
    psql: Callable[[list[str]], list[str]]
    env: dict
    jobs: int = 2
    #: called with (table as the dump names it, rows in the file) as each COPY block ends
    on_block: Callable[[bytes, int], None] = lambda table, rows: None
    #: called with (block index, rows) once the server committed a COPY block (psql's tags)
    on_loaded: Callable[[int, int], None] = lambda block, rows: None
    #: rows loaded so far per table (as the dump names it): the longest work goes first
    rows: Callable[[], dict[str, int]] = dict


class SqlRouter(Sink):
    """The sink of a decoded plain-SQL dump stream; see the module docstring. ``failure`` holds
    the StageFailed of a session that stopped (the rest of the stream is then drained unread)."""

    name = "psql (load)"

    def __init__(self, router: Router) -> None:
        super().__init__()
        self.r = router
        self.serial: Session | None = None
        self.sessions_started = 0
        self.failure: StageFailed | None = None
        self.copying = False
        self.carry = b""
        self.pending = b""
        self.preamble = bytearray()
        self.in_preamble = True
        self.state: dict[bytes, bytes] = {}
        self.in_order_only = router.jobs < 2
        self.holding: bytearray | None = None
        self.holding_type = ""
        self.holding_state = b""
        self.batch: list[Item] = []
        self.entries = 0
        self.token = secrets.token_hex(8).encode()
        self.parallel_items = 0
        # COPY blocks: index, the COPY line, bytes so far; a block shared with ``helper``
        self.block = -1
        self.copy_line = b""
        self.block_bytes = 0
        self.split = False
        self.helper: Session | None = None
        self.line_carry = b""
        self.split_blocks: list[int] = []
        # psql's COPY tags: the serial sessions' in block order, the helper's in split order
        self._tags = threading.Condition()
        self.serial_tags = 0
        self.helper_tags = 0
        self.parts: dict[int, list[int]] = {}
        # the dump check, as INSPECT_AWK does it (lib/engines/postgres.py): see summary()
        self.summary_lines: list[bytes] = []
        self.table = b""
        self.rows = 0
        self.complete = False

    # -- the stream ----------------------------------------------------------------------------
    def write(self, data: memoryview) -> None:
        super().write(data)
        # After a failure nothing is sent any more, but the stream is still read and checked to
        # its end: the file's verdict (damaged or not) explains a failed load best.
        buf = self.pending + bytes(data)
        self.pending = b""
        pos = 0
        while pos < len(buf):
            if self.copying:
                pos = self._copy(buf, pos)
                continue
            end = buf.rfind(b"\n", pos) + 1
            if end <= pos:
                self.pending = buf[pos:]
                return
            pos = self._sql(buf, pos, end)
            if not self.copying and pos == end and end < len(buf):
                self.pending = buf[end:]
                return

    def _copy(self, buf: bytes, pos: int) -> int:
        probe = self.carry + buf[pos : pos + 3]
        hit = probe.find(TERMINATOR)
        if hit >= 0:
            end = pos + hit + len(TERMINATOR) - len(self.carry)
        else:
            found = buf.find(TERMINATOR, pos)
            end = found + len(TERMINATOR) if found >= 0 else -1
        if end < 0:
            self.rows += buf.count(b"\n", pos)
            self._copy_data(buf, pos, len(buf), last=False)
            self.carry = (self.carry + buf[pos:])[-3:]
            return len(buf)
        self.rows += buf.count(b"\n", pos, end) - 1  # not the end-of-data line
        self.summary_lines.append(b"T\t" + self.table + b"\t" + str(self.rows).encode())
        self.r.on_block(self.table, self.rows)
        self._copy_data(buf, pos, end, last=True)
        self.copying = False
        return end

    def _copy_data(self, buf: bytes, start: int, end: int, last: bool) -> None:
        """COPY rows buf[start:end] (ending with the end-of-data line when ``last``): to the serial
        session, or, once a block is big, spread over it and the helper session in pieces of
        whole lines (slices of ``buf``, not copies)."""
        if not self.split:
            small = self.block_bytes + (end - start) <= SPLIT_AFTER
            newline = -1 if small else buf.find(b"\n", start, min(end, start + PIECE))
            # newline < 0: a line longer than a piece; such a block stays in one session
            if self.in_order_only or last or newline < 0 or self.failure is not None:
                self.block_bytes += end - start
                self._to_serial(memoryview(buf)[start:end])
                return
            self._start_split()
            if self.failure is not None:
                return
            self._to_serial(memoryview(buf)[start : newline + 1])  # the line it is in the middle of
            start = newline + 1
        if last:  # rare: copy, then leave out the end-of-data line
            text = self.line_carry + buf[start:end]
            if not text.endswith(b"\\.\n"):  # cannot be: the terminator was found
                raise AssertionError("COPY data does not end with its end-of-data line")
            self.line_carry = b""
            self._spread(self._pieces(text, 0, len(text) - 3))
            if self.failure is None:
                self._end_split()
            return
        first = buf.find(b"\n", start, end)
        if first < 0:
            self.line_carry += buf[start:end]
            return
        cut = buf.rfind(b"\n", start, end) + 1
        pieces: list[bytes | memoryview] = [self.line_carry + buf[start : first + 1]]
        pieces += self._pieces(buf, first + 1, cut)
        self.line_carry = buf[cut:end]
        self._spread(pieces)

    def _pieces(self, buf: bytes, start: int, stop: int) -> list[memoryview]:
        """buf[start:stop] (whole lines) cut into pieces of whole lines of about PIECE bytes."""
        view = memoryview(buf)
        pieces = []
        while start < stop:
            end = min(start + PIECE, stop)
            if end < stop:
                newline = buf.rfind(b"\n", start, end)
                end = newline + 1 if newline >= start else buf.find(b"\n", end, stop) + 1
            pieces.append(view[start:end])
            start = end
        return pieces

    def _start_split(self) -> None:
        if self.helper is None:
            self.helper = self._start(self._helper_line, quiet=False)
            self.helper.send(bytes(self.preamble) + b"".join(self.state.values()))
        with self._tags:
            self.split_blocks.append(self.block)
            self.split = True
        if not self.helper.send(self.copy_line):
            self._helper_failed()

    def _spread(self, pieces: list) -> None:
        """Write ``pieces`` (whole lines each) to the serial and helper sessions, each to whichever
        pipe has room: the faster session gets more."""
        sessions = [self.serial, self.helper]
        if any(session is None for session in sessions):
            return
        fds = [session.proc.stdin.fileno() for session in sessions]  # non-blocking (Session)
        pending: dict[int, memoryview | None] = dict.fromkeys(fds)
        index = 0
        while index < len(pieces) or any(pending.values()):
            wanted = [fd for fd in fds if pending[fd] is not None or index < len(pieces)]
            _, ready, _ = select.select([], wanted, [])
            for fd in ready:
                if pending[fd] is None:
                    if index >= len(pieces):
                        continue
                    pending[fd] = pieces[index]
                    index += 1
                try:
                    written = os.write(fd, pending[fd])
                except BlockingIOError:
                    written = 0
                except OSError:  # the session is gone; its exit status says why
                    if fd == fds[0]:
                        self._close_serial()
                    else:
                        self._helper_failed()
                    return
                rest = pending[fd][written:]
                pending[fd] = rest if len(rest) else None

    def _end_split(self) -> None:
        """The block's data is all out: end both COPYs and wait until the helper's committed, so
        nothing later in the dump runs before its rows are there."""
        if self.failure is not None:
            self.split = False
            return
        self._to_serial(b"\\.\n")
        if self.helper is None or not self.helper.send(b"\\.\n"):
            self._helper_failed()
            return
        self.split = False
        with self._tags:
            while self.helper_tags < len(self.split_blocks):
                if self.helper.proc.poll() is not None:
                    break
                self._tags.wait(0.05)
            done = self.helper_tags >= len(self.split_blocks)
        if not done:
            self._helper_failed()

    def _helper_failed(self) -> None:
        helper, self.helper = self.helper, None
        if helper is None:
            return
        code, text = helper.close()
        if self.failure is None:
            self.failure = StageFailed("psql (load, second COPY session)", f"exit status {code}", text)

    # -- COPY results ------------------------------------------------------------------------
    def _serial_line(self, line: bytes) -> None:
        if match := COPY_TAG.fullmatch(line):
            with self._tags:
                block = self.serial_tags
                self.serial_tags += 1
                self._part(block, int(match.group(1)))

    def _helper_line(self, line: bytes) -> None:
        if match := COPY_TAG.fullmatch(line):
            with self._tags:
                block = self.split_blocks[self.helper_tags]
                self.helper_tags += 1
                self._part(block, int(match.group(1)))
                self._tags.notify_all()

    def _part(self, block: int, rows: int) -> None:
        """Rows of one session's COPY of ``block`` (under the tags lock); reported when complete."""
        parts = self.parts.setdefault(block, [])
        parts.append(rows)
        if len(parts) == (2 if block in self.split_blocks else 1):
            self.r.on_loaded(block, sum(parts))

    def _sql(self, buf: bytes, start: int, end: int) -> int:
        cur = start
        for match in _MARK.finditer(buf, start, end):
            at = match.start()
            self._route(buf[cur:at])
            line_end = buf.index(b"\n", at) + 1
            line = buf[at:line_end]
            cur = line_end
            if self._line(line):  # a COPY line: data follows
                return line_end
        self._route(buf[cur:end])
        return end

    def _line(self, line: bytes) -> bool:
        """Handle a marked line; True when it starts COPY data."""
        if line.startswith(b"COPY ") and _COPY_LINE.fullmatch(line):
            if self.holding is not None:
                self._release_held()
            if self.in_preamble:  # data before any pg_dump entry header: not a stream to reorder
                self._in_order_from_now()
            self._to_serial(line)
            named = _COPY_TABLE.fullmatch(line)
            self.table = (named.group(1) or named.group(2)) if named else line[5:-1]
            self.rows, self.complete = 0, False
            self.block += 1
            self.copy_line, self.block_bytes, self.split = line, 0, False
            self.copying, self.carry = True, b"\n"
            return True
        if line == END_MARKER:
            self._route(line)
            self.complete = True
            return False
        if self.complete and not line.startswith(b"\\unrestrict "):
            self.complete = False
        if line.startswith(VERSION_LINE):
            self.summary_lines.append(b"V\t" + line[len(VERSION_LINE) : -1])
        if line.startswith(b"-- "):
            header = _HEADER.match(line)
            if header is None:
                self._route(line)
                return False
            self._entry(header.group(1).decode().strip(), line)
            return False
        if state := _STATE_SET.fullmatch(line):
            self.state[state.group(1)] = line
        elif line.startswith(b"\\unrestrict ") and self.holding is not None:
            return False  # the held entries' sessions end restricted; that is fine
        elif not self.in_preamble and not line.startswith(b"\\restrict "):
            self._in_order_from_now()  # SET ROLE, \connect, a search_path change...: one session
        self._route(line)
        return False

    def _entry(self, kind: str, header: bytes) -> None:
        self._finish_held()
        if self.in_preamble:
            self.in_preamble = False
        self.entries += 1
        if not self.in_order_only and kind in ("INDEX", "CONSTRAINT", "FK CONSTRAINT"):
            self.holding = bytearray(header)
            self.holding_type = kind
            self.holding_state = b"".join(self.state.values())
            return
        if self.batch:
            self._run_batch()
        self._to_serial(header)

    def _route(self, data: bytes) -> None:
        if not data:
            return
        if self.complete:  # after the end marker only blank lines, '--' and \unrestrict may follow
            lines = data.split(b"\n")
            if any(x not in (b"", b"--") and not x.startswith(b"\\unrestrict ") for x in lines):
                self.complete = False
        if self.holding is not None:
            self.holding += data
            if len(self.holding) > HOLD_LIMIT:
                self._release_held()
            return
        if self.in_preamble:
            if len(self.preamble) + len(data) > HOLD_LIMIT:  # no pg_dump preamble is this long
                self._in_order_from_now()
                self.in_preamble, self.preamble = False, bytearray()
            else:
                self.preamble += data
        self._to_serial(data)

    def _finish_held(self) -> None:
        if self.holding is None:
            return
        item = classify(self.holding_type, bytes(self.holding), self.entries, self.holding_state)
        if item is None:
            self._release_held()
            return
        self.batch.append(item)
        self.holding = None

    def _release_held(self) -> None:
        """The held entry is not ours: run what is batched, then the entry, in order."""
        held, self.holding = self.holding, None
        if self.batch:
            self._run_batch()
        self._to_serial(bytes(held or b""))

    def _in_order_from_now(self) -> None:
        if self.in_order_only:
            return
        self._finish_held()
        if self.batch:
            self._run_batch()
        self.in_order_only = True

    # -- sessions ------------------------------------------------------------------------------
    def _start(self, on_line: Callable[[bytes], None] | None, quiet: bool) -> Session:
        self.sessions_started += 1
        return Session(self.r.psql(["-q", "-A", "-t"] if quiet else []), self.r.env, on_line)

    def _to_serial(self, data: bytes | memoryview) -> None:
        if not data or self.failure is not None:
            return
        if self.serial is None:
            self.serial = self._start(self._serial_line, quiet=False)
            if self.sessions_started > 1:  # a later session: replay the preamble and state
                self.serial.send(bytes(self.preamble) + b"".join(self.state.values()))
        if not self.serial.send(data):
            self._close_serial()

    def _close_serial(self) -> None:
        if self.serial is None:
            return
        session, self.serial = self.serial, None
        code, text = session.close()
        if code != 0 and self.failure is None:
            self.failure = StageFailed(self.name, f"exit status {code}", text)

    def _run_batch(self) -> None:
        """Run the held items in ``jobs`` sessions. The session that ran everything before them
        must have finished first. Order kept: a foreign key is added once every build on both
        of its tables is done (its referenced key exists), and validated after it is added."""
        batch, self.batch = self.batch, []
        self._close_serial()
        if self.failure is not None:
            return
        self.parallel_items += len(batch)
        rows = self.r.rows()
        tasks: list[Task] = []
        builds: dict[bytes, list[int]] = {}
        for item in sorted(batch, key=lambda item: item.kind != "build"):  # builds first: deps point back
            cost = max(rows.get(table.decode("utf-8", "replace"), 0) for table in item.tables | item.referenced)
            if item.kind == "build":
                for table in item.tables:
                    builds.setdefault(table, []).append(len(tasks))
                tasks.append(Task(item.sql, item.tables, frozenset(), cost, item.order))
                continue
            both = item.tables | item.referenced
            after = frozenset(i for table in both for i in builds.get(table, []))
            tasks.append(Task(item.sql, both, after, cost, item.order))
            if item.validate:
                tasks.append(Task(item.validate, item.tables, frozenset([len(tasks) - 1]), cost, item.order))
        pool = [self._start(None, quiet=True) for _ in range(max(1, min(self.r.jobs, len(batch))))]
        ok = True
        try:
            ok = self._schedule(pool, tasks)
        finally:
            for session in pool:
                code, text = session.close()
                if code != 0 and self.failure is None:
                    self.failure = StageFailed("psql (load, parallel)", f"exit status {code}", text)
        if not ok and self.failure is None:
            self.failure = StageFailed("psql (load, parallel)", "a statement did not complete")

    def _schedule(self, pool: list[Session], tasks: list[Task]) -> bool:
        """Run ``tasks`` in the sessions of ``pool``: each once its ``after`` tasks are done and
        no running task shares a table with it, the largest first. False when one failed (the
        others then take no new task)."""
        waiting = sorted(range(len(tasks)), key=lambda i: (-tasks[i].cost, tasks[i].order))
        done: set[int] = set()
        busy: set[bytes] = set()
        cond = threading.Condition()
        errors: list[int] = []

        def worker(session: Session, index: int) -> None:
            count = 0
            while True:
                with cond:
                    while True:
                        if errors or not waiting:
                            return
                        pick = next(
                            (i for i in waiting if tasks[i].after <= done and not (tasks[i].tables & busy)), None
                        )
                        if pick is not None:
                            waiting.remove(pick)
                            busy.update(tasks[pick].tables)
                            break
                        cond.wait()
                count += 1
                marker = b"pgsplit-" + self.token + b"-%d-%d" % (index, count)
                sql = (b"" if session.primed else bytes(self.preamble)) + tasks[pick].sql
                session.primed = True
                ok = session.run(sql, marker)
                with cond:
                    busy.difference_update(tasks[pick].tables)
                    done.add(pick)
                    if not ok:
                        errors.append(index)
                    cond.notify_all()

        threads = [threading.Thread(target=worker, args=(s, n), daemon=True) for n, s in enumerate(pool)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return not errors

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    def summary(self) -> bytes:
        """The dump check's verdict on the whole stream, in INSPECT_AWK's format (version line,
        a line per COPY block, then whether the data of a table never ended or the dump ended
        with its end marker), for Postgres.check_summary."""
        end = b"OPEN\t" + self.table if self.copying else b"END\t" + (b"1" if self.complete else b"0")
        return b"\n".join([*self.summary_lines, end]) + b"\n"

    def close(self) -> None:
        if self.pending and not self.copying:
            data, self.pending = self.pending + b"\n", b""
            self._sql(data, 0, len(data))
        if self.failure is None:
            self._finish_held()
            if self.batch:
                self._run_batch()
        self._close_serial()
        if self.helper is not None:
            code, text = self.helper.close()
            if code != 0 and self.failure is None:
                self.failure = StageFailed("psql (load, second COPY session)", f"exit status {code}", text)
