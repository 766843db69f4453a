"""Following a plain-SQL load into PostgreSQL as it happens.

Two line streams arrive in the same order: the verifier's line per COPY block of the dump
(``T<tab>table<tab>rows``, printed when the block ends in the stream) and psql's command tag
``COPY n`` (printed when the server has taken and committed the block's rows). When both are known
for block k, table k's data is committed, so it is ANALYZEd in a second session while the load
goes on with the next tables: the statistics cost no wall time on a machine with a core to spare.
The tags are also the server's own count of the rows it loaded, compared with the dump's and the
record's counts afterwards, so no count(*) pass over the restored tables is needed.
"""

from __future__ import annotations

import queue
import re
import subprocess
import threading
from collections.abc import Callable

# A table name as pg_dump writes it in a COPY statement: [schema.]table, each part a plain
# lower-case identifier or a double-quoted one. Anything else is not put into SQL here (the
# table is then ANALYZEd after the load, by its name read from the database).
QUALIFIED_NAME = re.compile(rb'(?:[a-z_][a-z0-9_$]*|"(?:[^"]|"")+")(?:\.(?:[a-z_][a-z0-9_$]*|"(?:[^"]|"")+"))?')
COPY_TAG = re.compile(rb"COPY (\d+)")


class LoadWatch:
    """Collects both line streams (``on_verify_line`` from the verifier's thread, ``on_psql_line``
    from the load's) and feeds ``ANALYZE table;`` to a session from ``start_analyzer`` (a psql
    reading statements on stdin), started when the first table is ready. ``finish()`` closes it
    and says whether every statement ran."""

    def __init__(self, start_analyzer: Callable[[], subprocess.Popen]) -> None:
        self._start_analyzer = start_analyzer
        self._lock = threading.Lock()
        self.blocks: list[tuple[str, int]] = []  # (table as written in the dump, rows in the stream)
        self.tags: list[int] = []  # rows the server reported per COPY, in order
        self.analyzed: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None
        self._failed = False

    # -- the two line streams ------------------------------------------------------------------
    def on_verify_line(self, line: bytes) -> None:
        if not line.startswith(b"T\t"):
            return
        table, _, rows = line[2:].rpartition(b"\t")
        if not rows.isdigit():
            return
        with self._lock:
            self.blocks.append((table.decode("utf-8", "replace"), int(rows)))
            self._pump()

    def on_psql_line(self, line: bytes) -> None:
        match = COPY_TAG.fullmatch(line.rstrip(b"\r"))
        if match is None:
            return
        with self._lock:
            self.tags.append(int(match.group(1)))
            self._pump()

    def _pump(self) -> None:
        """Queue ANALYZE for every block both streams have reported (called under the lock)."""
        ready = min(len(self.blocks), len(self.tags))
        while len(self.analyzed) < ready:
            table = self.blocks[len(self.analyzed)][0]
            self.analyzed.append(table)
            if (
                not __import__("os").environ.get("NOAN")
                and QUALIFIED_NAME.fullmatch(table.encode())
                and self.analyzed.count(table) == 1
            ):
                if self._thread is None:
                    self._thread = threading.Thread(target=self._feed, name="analyze", daemon=True)
                    self._thread.start()
                self._queue.put(table)

    def _feed(self) -> None:
        try:
            self._proc = self._start_analyzer()
            while (table := self._queue.get()) is not None:
                self._proc.stdin.write(f"ANALYZE {table};\n".encode())
                self._proc.stdin.flush()
        except (OSError, ValueError):  # the session died (its exit status tells finish())
            self._failed = True
            while self._queue.get() is not None:  # keep draining until finish() says stop
                pass

    # -- after the load ------------------------------------------------------------------------
    def finish(self) -> bool:
        """Close the analyzing session and wait for it. True when it ran every ANALYZE sent."""
        with self._lock:
            thread = self._thread
        if thread is None:
            return True
        self._queue.put(None)
        thread.join()
        proc = self._proc
        if proc is None:
            return False
        try:
            proc.stdin.close()
        except OSError:
            self._failed = True
        return proc.wait() == 0 and not self._failed

    def rows_by_table(self) -> dict[str, int]:
        """Rows the server loaded per table (as the dump names it), from the COPY tags."""
        loaded: dict[str, int] = {}
        for (table, _), rows in zip(self.blocks, self.tags, strict=False):
            loaded[table] = loaded.get(table, 0) + rows
        return loaded

    def mismatches(self) -> list[str]:
        """Blocks whose loaded row count differs from the rows the dump holds, or a different
        number of COPY results than data blocks."""
        problems = [
            f"{table}: {rows} rows loaded, {counted} in the file"
            for (table, counted), rows in zip(self.blocks, self.tags, strict=False)
            if rows != counted
        ]
        if len(self.blocks) != len(self.tags):
            problems.append(f"psql reported {len(self.tags)} COPY results for {len(self.blocks)} data blocks")
        return problems
