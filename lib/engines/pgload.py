"""Following a plain-SQL load into PostgreSQL as it happens.

Two reports arrive on the same COPY blocks, in dump order: the router (pgsplit.SqlRouter) reports
each block's table and rows when the block ends in the stream, and again when the server has
committed its rows (psql's ``COPY n`` command tags). When both are known for block k, table k's
data is committed, so it is ANALYZEd in another session while the load goes on with the next
tables: the statistics cost no wall time on a machine with a core to spare. The tags are also the server's own count of the rows
it loaded, compared with the dump's and the record's counts afterwards, so no count(*) pass over
the restored tables is needed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from lib.engines.pgdump import Name
from lib.engines.pgsplit import Session


class LoadWatch:
    """Collects the blocks of the dump (``on_block``) and the rows the server loaded per block
    (``on_loaded``, from the sessions' reader threads), and feeds ``ANALYZE table;`` to a session
    from ``start_analyzer`` (a psql reading statements on stdin), started when the first table is
    ready. ``finish()`` closes it and says whether every statement ran."""

    def __init__(self, start_analyzer: Callable[[], Session]) -> None:
        self._start_analyzer = start_analyzer
        self._lock = threading.Lock()
        self.blocks: list[tuple[str, int]] = []  # (table as written in the dump, rows in the stream)
        self._sql: list[str] = []  # each block's table, every part quoted (safe in SQL)
        self.loaded: dict[int, int] = {}  # block index -> rows the server reported
        self.analyzed: list[str] = []  # tables sent to the ANALYZE session
        self._queued: set[str] = set()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._session: Session | None = None
        self._failed = False

    # -- the two streams -----------------------------------------------------------------------
    def on_block(self, table: Name, rows: int) -> None:
        """The next COPY block of the dump ended: ``rows`` rows for ``table``."""
        with self._lock:
            self.blocks.append((table.written.decode("utf-8", "replace"), rows))
            self._sql.append(table.sql().decode("utf-8", "replace"))
            if len(self.blocks) - 1 in self.loaded:
                self._ready(len(self.blocks) - 1)

    def on_loaded(self, block: int, rows: int) -> None:
        """The server committed block ``block`` (0-based, in dump order): ``rows`` rows."""
        with self._lock:
            self.loaded[block] = rows
            if block < len(self.blocks):
                self._ready(block)

    def _ready(self, block: int) -> None:
        """Both streams reported ``block``: queue its table for ANALYZE (called under the lock)."""
        table = self.blocks[block][0]
        if table in self._queued:
            return
        self._queued.add(table)
        self.analyzed.append(table)
        if self._thread is None:
            self._thread = threading.Thread(target=self._feed, name="analyze", daemon=True)
            self._thread.start()
        self._queue.put(self._sql[block])

    def _feed(self) -> None:
        """The ANALYZE session's own thread: starts it, feeds it, and closes it (a child dies with
        the thread that started it, exec.dying_with_tool)."""
        try:
            self._session = self._start_analyzer()
        except OSError:
            self._failed = True
        while (table := self._queue.get()) is not None:
            if self._session is not None and not self._session.send(f"ANALYZE {table};\n".encode()):
                self._failed = True  # the session died; its exit status says why
        if self._session is not None:
            code, _ = self._session.close()
            self._failed = self._failed or code != 0

    # -- after the load ------------------------------------------------------------------------
    def finish(self) -> bool:
        """Close the analyzing session and wait for it. True when it ran every ANALYZE sent."""
        with self._lock:
            thread = self._thread
        if thread is None:
            return True
        self._queue.put(None)
        thread.join()
        return self._session is not None and not self._failed

    def rows_by_table(self) -> dict[str, int]:
        """Rows the server loaded per table (as the dump names it)."""
        loaded: dict[str, int] = {}
        with self._lock:
            reported = list(self.loaded.items())
        for block, rows in reported:
            if block < len(self.blocks):
                table = self.blocks[block][0]
                loaded[table] = loaded.get(table, 0) + rows
        return loaded

    def mismatches(self) -> list[str]:
        """Blocks whose loaded row count differs from the rows the dump holds, or a different
        number of blocks loaded than the dump holds."""
        problems = [
            f"{table}: {self.loaded[block]} rows loaded, {counted} in the file"
            for block, (table, counted) in enumerate(self.blocks)
            if block in self.loaded and self.loaded[block] != counted
        ]
        if len(self.loaded) != len(self.blocks) or any(b >= len(self.blocks) for b in self.loaded):
            problems.append(f"the server loaded {len(self.loaded)} data blocks of {len(self.blocks)}")
        return problems
