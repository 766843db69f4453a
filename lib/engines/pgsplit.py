"""Loading a plain-SQL pg_dump stream with its slow parts in parallel sessions.

A plain dump is one script: schema, then every table's COPY data, then the post-data section
(primary keys, indexes, foreign keys), all of which psql would run one after the other in a
single session. ``SqlRouter`` is the sink of the decoded stream. It reads it with the dump reader
(lib/engines/pgdump.py: a lexer that quotes as psql does, so statement boundaries, COPY blocks and
names are never guessed from a line's first characters) and passes every statement on to a psql
session unchanged, in order, except where it fully understands what it holds:

- a statement of pg_dump's ``INDEX``, ``CONSTRAINT`` or ``FK CONSTRAINT`` entries whose tokens
  have exactly the shape pg_dump writes (``CREATE [UNIQUE] INDEX name ON [ONLY] table ...``,
  ``ALTER TABLE [ONLY] table ADD CONSTRAINT name ...``) is held back; the held statements run in
  ``jobs`` sessions at once, the way ``pg_restore --jobs`` does, as one dependency graph: never two
  statements on the same table at once; a foreign key once every build on both its tables is
  done. A foreign key between plain tables is added ``NOT VALID`` (a catalog change) and then
  ``VALIDATE``d, so validations run in parallel; one that involves a partitioned table is added
  as the dump says (VALIDATE would not mark its per-partition copies valid), and one the dump
  marks ``NOT VALID`` stays so;
- a table whose COPY data (a ``TABLE DATA`` entry, outside any transaction block) passes
  SPLIT_AFTER bytes is shared with a helper session, in pieces of whole rows, each to whichever
  session has room; the block ends when both have committed.

A statement run in another session gets the session state in force at its own position in the
dump: every top-level ``SET``/``RESET``/``set_config`` seen so far (search_path,
default_tablespace, default_table_access_method, SET SESSION AUTHORIZATION...), replayed first.
Anything else (another statement kind, an explicit transaction) is a sync point: what was held
runs first, then the stream continues in order. ``\\restrict``/``\\unrestrict`` are not passed on
(the reader refuses every other meta-command, which is stricter); with ``no_owner`` the
``ALTER ... OWNER TO`` and ``SET SESSION AUTHORIZATION`` statements are left out, with
``no_privileges`` the GRANT/REVOKE/ALTER DEFAULT PRIVILEGES ones (as pg_restore's flags do).

The reader also does the dump check while the router reads (``summary()``), so a restore reads
the stream once.
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

from lib.engines.pgdump import DumpReader, Name, Statement, qualified_name
from lib.errors import StageFailed, VerificationFailed
from lib.exec import dying_with_tool, tail_text
from lib.stream import Sink

COPY_TAG = re.compile(rb"COPY (\d+)\r?")
PIPE_SIZE = 1 << 20
# A table's COPY data is shared with a second session once this much of it went to the first: by
# then the first session is inside its COPY, so the CREATE TABLE before it has committed.
SPLIT_AFTER = 4 << 20
PIECE = 512 << 10  # COPY data is handed out in pieces of whole lines of about this size
FLUSH_AT = 256 << 10  # statements for the serial session are written in batches of this size
PARALLEL_ENTRIES = ("INDEX", "CONSTRAINT", "FK CONSTRAINT")
_TRANSACTION_START = (b"begin", b"start")
_TRANSACTION_END = (b"commit", b"rollback", b"end", b"abort")


@dataclass
class Item:
    """One held-back statement: ``sql`` (the session state at its place, then the statement); the
    ``tables`` it works on (name parts); for a foreign key added NOT VALID, ``validate`` runs
    afterwards; ``names`` are the tables as the dump writes them (for the cost)."""

    kind: str  # "build" (index, constraint) or "fk"
    sql: bytes
    tables: frozenset[tuple[bytes, ...]]
    validate: bytes | None = None
    order: int = 0
    referenced: frozenset[tuple[bytes, ...]] = frozenset()
    names: tuple[str, ...] = ()


@dataclass
class Task:
    """A statement for a parallel session: runs after the tasks ``after`` (indices), never while
    another task on one of ``tables`` runs."""

    sql: bytes
    tables: frozenset
    after: frozenset[int]
    cost: int
    order: int


def _words(tokens) -> list[bytes]:
    return [token.word for token in tokens]


def _not_valid(stmt: Statement) -> bool:
    words = [t.word for t in stmt.tokens if t.depth == 0]
    return any(words[i : i + 2] == [b"not", b"valid"] for i in range(len(words) - 1))


def classify(
    stmt: Statement, state: bytes, order: int, partitioned: set[tuple[bytes, ...]] = frozenset()
) -> Item | None:
    """The statement as a parallel item, or None when it is not exactly a shape pg_dump writes for
    its entry (``stmt.header``). ``state`` is the session state to replay before it."""
    if stmt.truncated or stmt.header not in PARALLEL_ENTRIES:
        return None
    tokens = stmt.tokens
    words = _words(tokens)
    body = stmt.raw[stmt.lead :]
    if not body.endswith(b";"):
        return None
    if stmt.header == "INDEX":
        i = 1
        if words[:1] != [b"create"]:
            return None
        if words[i : i + 1] == [b"unique"]:
            i += 1
        if words[i : i + 1] != [b"index"] or i + 2 >= len(tokens) or tokens[i + 1].ident is None:
            return None
        i += 2
        if words[i : i + 1] != [b"on"]:
            return None
        i += 1 + (words[i + 1 : i + 2] == [b"only"])
        parsed = qualified_name(tokens, i)
        if parsed is None or words[parsed[1] : parsed[1] + 1] != [b"using"]:
            return None
        table = parsed[0]
        return Item("build", state + body + b"\n", frozenset([table.parts]), order=order, names=(_n(table),))
    if words[:2] != [b"alter", b"table"]:
        return None
    only = words[2:3] == [b"only"]
    parsed = qualified_name(tokens, 3 if only else 2)
    if parsed is None:
        return None
    table, i = parsed
    if words[i : i + 2] != [b"add", b"constraint"] or i + 2 >= len(tokens) or tokens[i + 2].ident is None:
        return None
    constraint = tokens[i + 2]
    rest = words[i + 3 :]
    if stmt.header == "CONSTRAINT":
        if not rest or rest[0] == b"foreign":
            return None
        return Item("build", state + body + b"\n", frozenset([table.parts]), order=order, names=(_n(table),))
    if rest[:2] != [b"foreign", b"key"] or b"references" not in rest:
        return None
    at = i + 3 + rest.index(b"references") + 1
    parsed_ref = qualified_name(tokens, at)
    if parsed_ref is None or tokens[at - 1].depth != 0:
        return None
    referenced = parsed_ref[0]
    refs = frozenset([referenced.parts])
    names = (_n(table), _n(referenced))
    plain = only and referenced.parts not in partitioned and table.parts not in partitioned
    if plain and not _not_valid(stmt):
        add = state + body[:-1] + b" NOT VALID;\n"
        check = state + b"ALTER TABLE " + table.sql() + b" VALIDATE CONSTRAINT " + constraint.raw + b";\n"
        return Item("fk", add, frozenset([table.parts]), validate=check, order=order, referenced=refs, names=names)
    return Item("fk", state + body + b"\n", frozenset([table.parts]), order=order, referenced=refs, names=names)


def _n(name: Name) -> str:
    return name.written.decode("utf-8", "replace")


class Session:
    """A psql process reading SQL on stdin. ``on_line`` gets its stdout lines (a reader thread);
    ``on_eof`` is called when its output ends; stderr goes to a temp file for the error message."""

    def __init__(
        self,
        argv: Sequence[str],
        env,
        on_line: Callable[[bytes], None] | None = None,
        on_eof: Callable[[], None] | None = None,
    ) -> None:
        self.err = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            dying_with_tool(argv),  # dies with the tool; the thread that starts a session closes it
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            env=env,
            close_fds=True,
        )
        try:  # room for a megabyte in the pipe: a session has work queued while another is fed
            fcntl.fcntl(self.proc.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass
        os.set_blocking(self.proc.stdin.fileno(), False)  # send() waits with select; see _spread
        self.lines: list[bytes] = []
        self._cond = threading.Condition()
        self._eof = False
        self._on_line = on_line
        self._on_eof = on_eof
        self._reader = threading.Thread(target=self._read, name="psql-out", daemon=True)
        self._reader.start()

    @property
    def ended(self) -> bool:
        return self._eof

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
        if self._on_eof is not None:
            self._on_eof()

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
    env: dict | None
    jobs: int = 2
    #: called with (table, rows in the file) as each COPY block ends
    on_block: Callable[[Name, int], None] = lambda table, rows: None
    #: called with (block index, rows) once the server committed a COPY block (psql's tags)
    on_loaded: Callable[[int, int], None] = lambda block, rows: None
    #: rows loaded so far per table (as the dump names it): the longest work goes first
    rows: Callable[[], dict[str, int]] = dict
    #: leave out ownership (ALTER ... OWNER TO, SET SESSION AUTHORIZATION), as pg_restore --no-owner
    no_owner: bool = False
    #: leave out GRANT/REVOKE/ALTER DEFAULT PRIVILEGES, as pg_restore --no-privileges
    no_privileges: bool = False


class SqlRouter(Sink, DumpReader):
    """The sink of a decoded plain-SQL dump stream; see the module docstring. ``failure`` holds
    the error of a session that stopped, or the reader's refusal (the rest of the stream is then
    read for the dump check only)."""

    name = "psql (load)"

    def __init__(self, router: Router) -> None:
        Sink.__init__(self)
        DumpReader.__init__(self)
        self.r = router
        self.serial: Session | None = None
        self.out = bytearray()  # statements waiting to be written to the serial session
        self.sessions_started = 0
        self.failure: StageFailed | VerificationFailed | None = None
        self.state: dict[bytes, bytes] = {}
        self.batch: list[Item] = []
        self.statements = 0
        self.in_transaction = False
        self.skipped = 0
        self.token = secrets.token_hex(8).encode()
        self.parallel_items = 0
        # COPY blocks: index, the COPY statement, bytes so far; a block shared with ``helper``
        self.block = -1
        self.copy_sql = b""
        self.copy_shareable = False
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

    # -- the stream ----------------------------------------------------------------------------
    def write(self, data: memoryview) -> None:
        Sink.write(self, data)
        # After a failure nothing is sent any more, but the stream is still read and checked to
        # its end: the file's verdict (damaged or not) explains a failed load best.
        self.feed(data)

    def refuse(self, problem: str) -> None:
        DumpReader.refuse(self, problem)
        if self.failure is None:
            self.failure = VerificationFailed(f"the dump was not run: {problem}")
        self.out.clear()

    def statement(self, stmt: Statement) -> None:
        self.statements += 1
        key = stmt.state_key()
        if key is not None:
            if self.r.no_owner and key == b"session authorization":
                self.skipped += 1
                return
            self._set_state(key, stmt.raw[stmt.lead :] + b"\n")
            self._to_serial(stmt.raw)
            return
        if self._left_out(stmt):
            self.skipped += 1
            return
        first = stmt.first
        if first in _TRANSACTION_START and not self.in_transaction:
            self._sync()
            self.in_transaction = True
        elif first in _TRANSACTION_END:
            self.in_transaction = False
        if self.r.jobs > 1 and not self.in_transaction and stmt.header in PARALLEL_ENTRIES:
            item = classify(stmt, self._state_sql(), self.statements, self.partitioned)
            if item is not None:
                self.batch.append(item)
                return
        self._sync()
        self._to_serial(stmt.raw)
        if stmt.copy_table is not None:
            self.block += 1
            self.copy_sql = stmt.raw[stmt.lead :]
            self.copy_shareable = stmt.header == "TABLE DATA" and not self.in_transaction and self.r.jobs > 1
            self.block_bytes, self.split = 0, False

    def insert(self, raw: bytes) -> None:
        self.statements += 1
        self._sync()
        self._to_serial(raw)

    def _left_out(self, stmt: Statement) -> bool:
        """Ownership or privilege statements left out by no_owner / no_privileges."""
        if self.r.no_owner and stmt.first == b"alter":
            top = [t.word for t in stmt.tokens if t.depth == 0]
            if top[-3:-1] == [b"owner", b"to"]:
                return True
        if self.r.no_privileges:
            words = stmt.words(3)
            return words[0] in (b"grant", b"revoke") or words == [b"alter", b"default", b"privileges"]
        return False

    def _set_state(self, key: bytes, sql: bytes) -> None:
        if key == b"all":  # RESET ALL
            self.state.clear()
        self.state.pop(key, None)
        self.state[key] = sql

    def _state_sql(self) -> bytes:
        return b"".join(self.state.values())

    def meta(self, raw: bytes, command: bytes) -> None:
        """\\restrict / \\unrestrict: not passed on (see the module docstring)."""

    def copy_data(self, data: bytes, start: int, end: int, last: bool) -> None:
        self._copy_data(data, start, end, last)

    def copy_end(self, table: Name, rows: int) -> None:
        self.r.on_block(table, rows)

    def _sync(self) -> None:
        if self.batch:
            self._run_batch()

    # -- COPY data -----------------------------------------------------------------------------
    def _copy_data(self, buf: bytes, start: int, end: int, last: bool) -> None:
        """COPY rows buf[start:end] (ending with the end-of-data line when ``last``): to the serial
        session, or, once a block is big, spread over it and the helper session in pieces of
        whole lines (slices of ``buf``, not copies)."""
        if not self.split:
            small = self.block_bytes + (end - start) <= SPLIT_AFTER
            newline = -1 if small else buf.find(b"\n", start, min(end, start + PIECE))
            # newline < 0: a line longer than a piece; such a block stays in one session
            if not self.copy_shareable or last or newline < 0 or self.failure is not None:
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
        self._flush()
        if self.helper is None:
            self.helper = self._start(self._helper_line, quiet=False, on_eof=self._helper_eof)
        with self._tags:
            self.split_blocks.append(self.block)
            self.split = True
        # the session state at this block (it may differ from the last block's), then its COPY
        if not self.helper.send(self._state_sql() + self.copy_sql):
            self._helper_failed()

    def _spread(self, pieces: list) -> None:
        """Write ``pieces`` (whole lines each) to the serial and helper sessions, each to whichever
        pipe has room: the faster session gets more."""
        self._flush()
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
            while self.helper_tags < len(self.split_blocks) and not self.helper.ended:
                self._tags.wait()  # the helper's reader notifies on each tag and at its end
            done = self.helper_tags >= len(self.split_blocks)
        if not done:
            self._helper_failed()

    def _helper_eof(self) -> None:
        with self._tags:
            self._tags.notify_all()

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

    # -- sessions ------------------------------------------------------------------------------
    def _start(
        self, on_line: Callable[[bytes], None] | None, quiet: bool, on_eof: Callable[[], None] | None = None
    ) -> Session:
        self.sessions_started += 1
        return Session(self.r.psql(["-q", "-A", "-t"] if quiet else []), self.r.env, on_line, on_eof)

    def _to_serial(self, data: bytes | memoryview) -> None:
        """Queue ``data`` for the serial session; big pieces (COPY data) go out at once, uncopied."""
        if not data or self.failure is not None:
            return
        if len(data) >= FLUSH_AT:
            self._flush()
            self._send_serial(data)
            return
        self.out += data
        if len(self.out) >= FLUSH_AT:
            self._flush()

    def _flush(self) -> None:
        if not self.out or self.failure is not None:
            self.out.clear()
            return
        data, self.out = bytes(self.out), bytearray()
        self._send_serial(data)

    def _send_serial(self, data: bytes | memoryview) -> None:
        if self.failure is not None:
            return
        if self.serial is None:
            self.serial = self._start(self._serial_line, quiet=False)
            if self.sessions_started > 1:  # a later session: the state in force here first
                self.serial.send(self._state_sql())
        if not self.serial.send(data):
            self._close_serial()

    def _close_serial(self) -> None:
        self._flush()
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
        builds: dict[tuple[bytes, ...], list[int]] = {}
        for item in sorted(batch, key=lambda item: item.kind != "build"):  # builds first: deps point back
            cost = max(rows.get(name, 0) for name in item.names)
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
        busy: set = set()
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
                ok = session.run(tasks[pick].sql, marker)
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

    def close(self) -> None:
        DumpReader.close(self)
        if self.failure is None:
            self._sync()
        self._close_serial()
        if self.helper is not None:
            code, text = self.helper.close()
            if code != 0 and self.failure is None:
                self.failure = StageFailed("psql (load, second COPY session)", f"exit status {code}", text)
