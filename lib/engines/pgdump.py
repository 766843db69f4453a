"""The one reader of pg_dump's plain SQL: statement boundaries, COPY blocks and identifiers come
from a lexer that quotes the way psql does, never from a line's first characters.

pg_dump copies comments, function bodies and string literals verbatim, so any line of dump
structure (``COPY a FROM stdin;``, ``SET default_tablespace = x;``, ``-- Name: ...; Type: INDEX``)
may also appear inside a quoted text. The lexer follows psql's own rules (psqlscan.l):

- ``'...'`` with ``''`` (backslash escapes too while ``standard_conforming_strings`` is off),
  ``E'...'`` with backslash escapes, ``$tag$ ... $tag$``, ``"..."`` identifiers with ``""``,
  ``--`` comments to the end of the line and nested ``/* */`` comments;
- a ``;`` ends a statement only outside parentheses and outside the ``BEGIN ... END`` body of a
  ``CREATE FUNCTION/PROCEDURE`` (SQL-standard bodies);
- a backslash outside quotes starts a psql meta-command; pg_dump writes only ``\\restrict KEY``
  and ``\\unrestrict KEY``, so any other (``\\!``, ``\\o``, ``\\i``, ``\\copy``, ``\\set``...) marks the
  file as not a pg_dump file (``problem``), and it is never passed on;
- COPY data starts only after a top-level ``COPY name [(columns)] FROM stdin;`` and ends at the
  line ``\\.``; it is read on a fast path (a search for the end line, a count of newlines).

``DumpReader`` is fed the decoded stream in chunks of any size and calls ``statement``,
``meta``, ``copy_data`` and ``copy_end`` (subclasses route them); it also does the dump check
(end marker, every COPY block closed, rows per table for COPY and INSERT dumps alike, roles the
dump names) and writes its verdict with ``summary()``. Run as a script it is the backup-time
check stage: ``python3 -I pgdump.py`` reads a dump on stdin and prints the summary. It imports
nothing from the project, so it runs isolated (-I) in its own process, on the second core.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

END_MARKER = b"-- PostgreSQL database dump complete"
VERSION = b"-- Dumped from database version "
TERMINATOR = b"\n\\.\n"

# Bytes between tokens that no rule cares about: whitespace, digits, operators other than the
# ones below. Everything that can start a quote, a comment, a meta-command or end a statement
# stops the skip.
_SKIP = re.compile(rb"[^A-Za-z_\x80-\xff\"'$\-/\\;(),.]+")
_WORD = re.compile(rb"[A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff]*")
# possessive (no backtracking): an unterminated literal fails in linear time
_STD_STRING = re.compile(rb"'(?:[^']++|'')*+'")
_ESC_STRING = re.compile(rb"'(?:[^'\\]++|\\.|'')*+'", re.S)
_QUOTED = re.compile(rb'"(?:[^"]++|"")*+"')
_DOLLAR = re.compile(rb"\$(?:[A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*)?\$")
_DOLLAR_PREFIX = re.compile(rb"\$[A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*\Z|\$\Z")
_NESTED = re.compile(rb"/\*|\*/")
_HEADER = re.compile(rb"-- (?:Data for )?Name: .*; Type: ([A-Z][A-Z ]*?); Schema: ")
_META = re.compile(rb"\\([A-Za-z]+|[^A-Za-z\s]?)([^\n]*)\n")
_META_KEY = re.compile(rb"[ \t]+[A-Za-z0-9]+[ \t]*")
# The INSERT statements pg_dump --inserts writes, read in one match (a fast path; anything else,
# e.g. a quoted name, a comment or an E'' string, takes the token-by-token road): bare names,
# rows of standard-quoted literals, numbers and keywords. No backslash, dollar, double quote or
# comment can hide in them, so where it ends is where psql ends the statement.
_UNQUOTED = rb"(?:[^'\"$;()\\/\-eE]++|[eE](?!')|-(?!-)|/(?!\*))"
_ROW = rb"\((?:" + _UNQUOTED + rb"|'(?:[^']++|'')*+')*+\)"
_ROW_RE = re.compile(_ROW)
_SIMPLE_INSERT = re.compile(
    rb"INSERT INTO (?P<name>[a-z_][a-z0-9_$]*(?:\.[a-z_][a-z0-9_$]*)?) (?:\([a-z0-9_$, ]*\) )?"
    rb"(?:OVERRIDING (?:SYSTEM|USER) VALUE )?(?:VALUES (?P<rows>" + _ROW + rb"(?:,\s*" + _ROW + rb")*+)|DEFAULT VALUES)"
    rb"(?: ON CONFLICT DO NOTHING)?;"
)
# SET/RESET/set_config statements whose state a helper session must share
_STATE_WORDS = (b"set", b"reset")

# token kinds
WORD, QUOTED, STRING, DOLLAR, PUNCT = "w", "q", "s", "d", "p"
LONG_LITERAL = 1024  # longer literals keep no text (nothing classifies on them)
MAX_TOKENS = 4096  # a longer statement keeps its first and last tokens only


@dataclass(slots=True)
class Token:
    kind: str
    raw: bytes  # the token as written (b"" for a long literal)
    depth: int  # parenthesis depth it stands at

    @property
    def word(self) -> bytes:
        """A bare word in lower case (PostgreSQL folds only ASCII), else b""."""
        return self.raw.lower() if self.kind == WORD else b""

    @property
    def ident(self) -> bytes | None:
        """The identifier this token names (a bare word folded, a quoted one unquoted), or None."""
        if self.kind == WORD:
            return self.raw.lower()
        if self.kind == QUOTED:
            return self.raw[1:-1].replace(b'""', b'"')
        return None

    @property
    def text(self) -> bytes | None:
        """A short string literal's value (standard quoting), or None."""
        if self.kind != STRING or not self.raw or not self.raw.startswith(b"'"):
            return None
        return self.raw[1:-1].replace(b"''", b"'")


@dataclass(frozen=True)
class Name:
    """A [schema.]name: its parts (identifiers, unquoted) and the text as the dump wrote it."""

    parts: tuple[bytes, ...]
    written: bytes

    def sql(self) -> bytes:
        """Every part double-quoted: safe to put into SQL whatever the name holds."""
        return b".".join(b'"' + part.replace(b'"', b'""') + b'"' for part in self.parts)


def qualified_name(tokens: list[Token], index: int) -> tuple[Name, int] | None:
    """The name at tokens[index] (``a``, ``a.b``, ``"A"."b c"``) and the index after it; None
    when no identifier stands there."""
    parts: list[bytes] = []
    written: list[bytes] = []
    while index < len(tokens):
        ident = tokens[index].ident
        if ident is None:
            return None
        parts.append(ident)
        written.append(tokens[index].raw)
        index += 1
        if index < len(tokens) and tokens[index].kind == PUNCT and tokens[index].raw == b".":
            index += 1
            continue
        return Name(tuple(parts), b".".join(written)), index
    return None


@dataclass
class Statement:
    """One top-level SQL statement. ``raw`` is every byte since the end of what came before it
    (leading comments and blank lines included) up to its ``;`` (and, for a COPY, the newline
    that follows); ``lead`` is where its first token starts in ``raw``."""

    raw: bytes
    lead: int
    tokens: list[Token]
    header: str  # the type of the pg_dump entry it belongs to ("" before the first entry)
    truncated: bool = False  # over MAX_TOKENS: only the first and last tokens are kept
    copy_table: Name | None = None  # COPY ... FROM stdin: data follows
    insert_table: Name | None = None
    insert_rows: int = 0

    def words(self, count: int) -> list[bytes]:
        """The first ``count`` tokens as lower-case bare words (b"" where not a bare word)."""
        return [token.word for token in self.tokens[:count]]

    @property
    def first(self) -> bytes:
        return self.tokens[0].word if self.tokens else b""

    def state_key(self) -> bytes | None:
        """For a statement that changes session state (``SET x``, ``RESET x``, ``SET SESSION
        AUTHORIZATION``, ``SELECT pg_catalog.set_config('x', ...)``): the setting's name; else None."""
        words = self.words(4)
        if words and words[0] in _STATE_WORDS and len(self.tokens) >= 2:
            rest = [w for w in words[1:] if w not in (b"session", b"local")] or [b""]
            if words[1:3] == [b"session", b"authorization"] or (words[0] == b"reset" and words[1] == b"session"):
                return b"session authorization"
            if rest[0] == b"role":
                return b"role"
            index = 2 if words[1] in (b"session", b"local") else 1
            ident = self.tokens[index].ident if index < len(self.tokens) else None
            return ident
        set_config = words[:4] == [b"select", b"pg_catalog", b"", b"set_config"] and len(self.tokens) > 5
        if set_config and self.tokens[4].raw == b"(" and self.tokens[5].text is not None:
            return self.tokens[5].text.lower()
        return None


class DumpReader:
    """Feed the stream with ``feed``; ``close`` at its end. Subclasses override ``statement``,
    ``meta``, ``copy_data``, ``copy_end`` and ``trailer``; the base class keeps the dump check."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0  # next byte to lex
        self.start = 0  # where the current statement's raw bytes begin
        self.copying: Name | None = None
        self.carry = b""  # last bytes of COPY data seen, to find the end line across chunks
        self.std_strings = True
        self.header = ""
        self._reset_statement()
        # the dump check
        self.version: bytes | None = None
        self.complete = False
        self.rows = 0
        self.copy_rows: dict[bytes, int] = {}  # table as written -> rows, COPY blocks
        self.copy_blocks = 0
        self.insert_rows: dict[bytes, int] = {}  # table as written -> rows, INSERT statements
        self.roles: dict[str, set[bytes]] = {"owner": set(), "acl": set(), "other": set()}
        self.problem: str | None = None
        self.partitioned: set[tuple[bytes, ...]] = set()

    def _reset_statement(self) -> None:
        self.tokens: list[Token] = []
        self.truncated = False
        self.depth = 0
        self.begin_depth = 0
        self.ident_count = 0
        self.idents = [b"", b"", b"", b""]
        self.in_values = False
        self.values_rows = 0
        self.lead = -1

    # -- what subclasses see ------------------------------------------------------------------
    def statement(self, stmt: Statement) -> None:
        """A complete top-level statement (for COPY, its data follows)."""

    def insert(self, raw: bytes) -> None:
        """A plain INSERT of pg_dump's --inserts (read on the fast path): nothing to decide about
        it but to run it in order. ``raw`` as for ``statement``."""

    def meta(self, raw: bytes, command: bytes) -> None:
        """An allowed psql meta-command line (``\\restrict``/``\\unrestrict``) with what led to it."""

    def copy_data(self, data: bytes, start: int, end: int, last: bool) -> None:
        """COPY data ``data[start:end]``; with ``last`` it ends with the end-of-data line."""

    def copy_end(self, table: Name, rows: int) -> None:
        """A COPY block ended after ``rows`` rows."""

    def trailer(self, raw: bytes) -> None:
        """Bytes after the last statement that hold no statement (comments, blank lines)."""

    def refuse(self, problem: str) -> None:
        """The stream is not a pg_dump file (``problem`` says why); nothing more is routed."""
        if self.problem is None:
            self.problem = problem

    # -- feeding ------------------------------------------------------------------------------
    def feed(self, data: bytes | memoryview) -> None:
        data = bytes(data)
        at = 0
        while at < len(data):
            if self.copying is not None:
                at = self._copy(data, at)
                continue
            if self.start > (1 << 20) and self.start > len(self.buf) // 2:
                del self.buf[: self.start]
                self.pos -= self.start
                self.start = 0
            self.buf += data[at:] if at else data
            at = len(data)
            rest = self._lex(eof=False)
            if rest is not None:  # COPY data begins inside this chunk: lex no further
                data, at = rest, 0

    def close(self) -> None:
        while self.copying is None:
            rest = self._lex(eof=True)
            if rest is None:
                break
            self.feed(rest)  # COPY data began at the very end; its end line may follow
        if self.copying is None:
            tail = bytes(self.buf[self.start :])
            if self.tokens:  # cut short inside a statement: never run, and not complete
                self.complete = False
            elif tail:
                self.trailer(tail)
            self.buf.clear()
            self.start = self.pos = 0

    # -- COPY data ----------------------------------------------------------------------------
    def _copy(self, data: bytes, at: int) -> int:
        probe = self.carry + data[at : at + 3]
        hit = probe.find(TERMINATOR)
        if hit >= 0:
            end = at + hit + len(TERMINATOR) - len(self.carry)
        else:
            found = data.find(TERMINATOR, at)
            end = found + len(TERMINATOR) if found >= 0 else -1
        if end < 0:
            self.rows += data.count(b"\n", at)
            self.carry = (self.carry + data[at:])[-3:]
            self.copy_data(data, at, len(data), last=False)
            return len(data)
        self.rows += data.count(b"\n", at, end) - 1  # not the end-of-data line
        table, self.copying = self.copying, None
        self.copy_rows[table.written] = self.copy_rows.get(table.written, 0) + self.rows
        self.copy_blocks += 1
        self.copy_data(data, at, end, last=True)
        self.copy_end(table, self.rows)
        return end

    # -- the lexer ----------------------------------------------------------------------------
    def _lex(self, eof: bool) -> bytes | None:
        """Lex from ``pos``; returns the unread rest of the buffer when COPY data starts (the
        buffer is then emptied), else None when it needs more input."""
        buf = self.buf
        n = len(buf)
        pos = self.pos
        skip, word_re = _SKIP.match, _WORD.match
        while True:
            m = skip(buf, pos)
            if m:
                pos = m.end()
            if pos >= n:
                break
            c = buf[pos]
            if c in b"(),.":
                if c == 40:  # (
                    if self.in_values and self.depth == 0:
                        self.values_rows += 1
                    self._token(PUNCT, b"(", pos)
                    self.depth += 1
                elif c == 41:  # )
                    self.depth = max(0, self.depth - 1)
                    self._token(PUNCT, b")", pos)
                else:
                    self._token(PUNCT, bytes([c]), pos)
                pos += 1
                continue
            if c == 59:  # ;
                if self.depth or self.begin_depth:
                    pos += 1
                    continue
                copy = self._copy_target()
                if copy is not None and pos + 1 >= n and not eof:
                    break  # the byte after a COPY's ';' says where its data begins
                end = pos + 1
                if copy is not None:
                    if end >= n or buf[end] != 10:
                        self.refuse("a COPY statement is not followed by its data on the next line")
                        copy = None
                    else:
                        end += 1
                self._finish(end, copy)
                pos = end
                if copy is not None and self.problem is None:
                    rest = bytes(buf[pos:])
                    buf.clear()
                    self.start = self.pos = 0
                    self.copying, self.carry, self.rows = copy, b"\n", 0
                    return rest
                continue
            if c == 39:  # '
                if not self._string(pos, eof, escapes=not self.std_strings):
                    break
                pos = self.pos
                continue
            if c == 34:  # "
                m = _QUOTED.match(buf, pos)
                if m is None or (m.end() >= n and not eof):
                    if m is None and eof:
                        pos = n
                        continue
                    break
                self._token(QUOTED, bytes(buf[pos : m.end()]), pos)
                pos = m.end()
                continue
            if c == 36:  # $
                m = _DOLLAR.match(buf, pos)
                if m is None:
                    if _DOLLAR_PREFIX.match(buf, pos) and not eof:
                        break  # a tag not complete yet
                    pos += 1  # $1, a parameter
                    continue
                close = buf.find(m.group(), m.end())
                if close < 0:
                    if not eof:
                        break
                    pos = n
                    continue
                end = close + len(m.group())
                self._token(DOLLAR, b"", pos)
                pos = end
                continue
            if c == 45:  # -
                if pos + 1 >= n:
                    if not eof:
                        break
                    pos += 1
                    continue
                if buf[pos + 1] != 45:
                    pos += 1
                    continue
                line_end = buf.find(b"\n", pos)
                if line_end < 0:
                    if not eof:
                        break
                    line_end = n
                if not self.tokens:
                    self._comment(bytes(buf[pos:line_end]))
                pos = line_end
                continue
            if c == 47:  # /
                if pos + 1 >= n:
                    if not eof:
                        break
                    pos += 1
                    continue
                if buf[pos + 1] != 42:
                    pos += 1
                    continue
                end = self._nested_comment(pos)
                if end < 0:
                    if not eof:
                        break
                    end = n
                if not self.tokens:
                    self.complete = False
                pos = end
                continue
            if c == 92:  # backslash: a psql meta-command
                m = _META.match(buf, pos)
                if m is None:
                    if not eof:
                        break
                    self.refuse("the dump ends inside a psql meta-command")
                    pos = n
                    continue
                self._meta(pos, m)
                pos = m.end()
                continue
            if c == 73 and not self.tokens and self.std_strings:  # I: an INSERT pg_dump wrote?
                m = _SIMPLE_INSERT.match(buf, pos)
                if m is not None:
                    self._simple_insert(m, pos)
                    pos = m.end()
                    continue
            m = word_re(buf, pos)
            if m.end() >= n and not eof:
                break
            word = bytes(m.group())
            if m.end() < n and buf[m.end()] == 39 and word in (b"E", b"e"):  # E'...'
                if not self._string(m.end(), eof, escapes=True, token_at=pos):
                    break
                pos = self.pos
                continue
            self._word(word, pos)
            pos = m.end()
        self.pos = pos
        return None

    def _simple_insert(self, m: re.Match, pos: int) -> None:
        """An INSERT matched whole by _SIMPLE_INSERT: its rows counted, passed on (``insert``)."""
        name = m.group("name")
        rows = m.group("rows")
        self.insert_rows[name] = self.insert_rows.get(name, 0) + (len(_ROW_RE.findall(rows)) if rows else 1)
        self.complete = False
        raw = bytes(self.buf[self.start : m.end()])
        self.start = m.end()
        if self.problem is None:
            self.insert(raw)

    def _string(self, pos: int, eof: bool, escapes: bool, token_at: int | None = None) -> bool:
        """A string literal whose quote is at ``pos`` (its token starts at ``token_at``, the E of
        E'...'); False when it may not have ended yet."""
        buf = self.buf
        m = (_ESC_STRING if escapes else _STD_STRING).match(buf, pos)
        n = len(buf)
        if m is None or m.end() >= n or buf[m.end()] == 39:
            if not eof:
                return False
            end = m.end() if m is not None else n
        else:
            end = m.end()
        raw = bytes(buf[pos:end]) if end - pos <= LONG_LITERAL and not escapes else b""
        self._token(STRING, raw, pos if token_at is None else token_at)
        self.pos = end
        return True

    def _nested_comment(self, pos: int) -> int:
        depth = 0
        for m in _NESTED.finditer(self.buf, pos):
            depth += 1 if m.group() == b"/*" else -1
            if depth == 0:
                return m.end()
        return -1

    def _token(self, kind: str, raw: bytes, pos: int) -> None:
        if not self.tokens:
            self.lead = pos - self.start
            self.complete = False
        elif self.in_values and kind != PUNCT:
            return  # the rows of an INSERT: only their parentheses are counted, no need to keep them
        self.tokens.append(Token(kind, raw, self.depth))
        if len(self.tokens) > MAX_TOKENS:
            self.tokens[64:-64] = []
            self.truncated = True

    def _word(self, word: bytes, pos: int) -> None:
        """A bare word: psql's test for the body of CREATE FUNCTION/PROCEDURE ... BEGIN ... END."""
        if self.in_values:  # an INSERT's rows: not a CREATE FUNCTION, nothing to classify
            self.ident_count += 1
            return
        lower = word.lower()
        if self.ident_count < 4 and lower in (b"create", b"function", b"procedure", b"or", b"replace"):
            self.idents[self.ident_count] = lower[:1]
        self.ident_count += 1
        ids = self.idents
        if (
            ids[0] == b"c"
            and (ids[1] in (b"f", b"p") or (ids[1] == b"o" and ids[2] == b"r" and ids[3] in (b"f", b"p")))
            and self.depth == 0
        ):
            if lower == b"begin" or (lower == b"case" and self.begin_depth >= 1):
                self.begin_depth += 1
            elif lower == b"end" and self.begin_depth > 0:
                self.begin_depth -= 1
        if lower == b"values" and self.depth == 0 and self.tokens and self.tokens[0].word == b"insert":
            self.in_values = True
            if self.tokens[-1].word == b"default":  # INSERT ... DEFAULT VALUES: one row
                self.values_rows += 1
        self._token(WORD, word, pos)

    def _comment(self, line: bytes) -> None:
        """A comment line between statements: pg_dump's entry headers, version and end marker."""
        if line == END_MARKER:
            self.complete = True
            return
        if line != b"--":
            self.complete = False
        if line.startswith(b"-- "):
            header = _HEADER.match(line)
            if header is not None:
                self.header = header.group(1).decode()
            elif line.startswith(VERSION) and self.version is None:
                self.version = line[len(VERSION) :]

    def _meta(self, pos: int, m: re.Match) -> None:
        command, args = m.group(1), m.group(2)
        if self.tokens:
            self.refuse(f"a psql meta-command (\\{command.decode(errors='replace')}) inside a statement")
            return
        if command not in (b"restrict", b"unrestrict") or not _META_KEY.fullmatch(args):
            shown = (b"\\" + command).decode(errors="replace")
            self.refuse(f"the psql meta-command {shown}, which pg_dump never writes")
            return
        if command == b"restrict":
            self.complete = False
        raw = bytes(self.buf[self.start : m.end()])
        self.start = m.end()
        if self.problem is None:
            self.meta(raw, command)

    def _copy_target(self) -> Name | None:
        """The table of a ``COPY name [(columns)] FROM stdin`` being ended (its data follows); a
        COPY of any other shape is refused: pg_dump writes no other."""
        tokens = self.tokens
        if not tokens or tokens[0].word != b"copy":
            return None
        parsed = qualified_name(tokens, 1)
        if parsed is not None:
            name, index = parsed
            if index < len(tokens) and tokens[index].raw == b"(":
                index += 1
                while index < len(tokens) and tokens[index].raw != b")":
                    if tokens[index].kind not in (WORD, QUOTED) and tokens[index].raw != b",":
                        break
                    index += 1
                index += 1
            if [t.word for t in tokens[index:]] == [b"from", b"stdin"]:
                return name
        self.refuse("a COPY statement of a shape pg_dump never writes (only COPY table FROM stdin)")
        return None

    def _finish(self, end: int, copy: Name | None) -> None:
        """A statement ends at ``end``: hand it on and start the next one."""
        raw = bytes(self.buf[self.start : end])
        stmt = Statement(raw, max(self.lead, 0), self.tokens, self.header, self.truncated, copy_table=copy)
        if stmt.first == b"insert" and len(stmt.tokens) > 2 and stmt.tokens[1].word == b"into":
            parsed = qualified_name(stmt.tokens, 2)
            if parsed is not None:
                stmt.insert_table, stmt.insert_rows = parsed[0], self.values_rows
                key = parsed[0].written
                self.insert_rows[key] = self.insert_rows.get(key, 0) + self.values_rows
        self._note(stmt)
        self.start = end
        self._reset_statement()
        if self.problem is None:
            self.statement(stmt)

    def _note(self, stmt: Statement) -> None:
        """What the dump check keeps of a statement: quoting state, roles named, partitioned tables."""
        if stmt.first not in (b"set", b"alter", b"grant", b"revoke", b"create"):
            return
        words = stmt.words(3)
        tokens = stmt.tokens
        if words[:2] == [b"set", b"standard_conforming_strings"] and len(tokens) > 2:
            value = (tokens[-1].text if tokens[-1].kind == STRING else tokens[-1].word) or b""
            self.std_strings = value.lower() not in (b"off", b"false", b"0")
        top = [t for t in tokens if t.depth == 0]
        top_words = [t.word for t in top]
        if words[:1] == [b"alter"] and top_words[-3:-1] == [b"owner", b"to"]:
            self._role("owner", top[-1])
        elif words[:3] == [b"set", b"session", b"authorization"] and len(tokens) > 3:
            self._role("owner", tokens[3])
        elif words[:1] in ([b"grant"], [b"revoke"]) or words[:3] == [b"alter", b"default", b"privileges"]:
            self._acl_roles(top, top_words)
        elif words[:2] == [b"create", b"policy"]:
            self._roles_after(top, top_words, b"to", (b"using", b"with"), "other")
        elif words[:3] == [b"create", b"user", b"mapping"] and len(tokens) > 4:
            self._role("other", tokens[4])
        elif words[:2] == [b"create", b"table"] and any(
            top_words[i : i + 2] == [b"partition", b"by"] for i in range(len(top_words) - 1)
        ):
            parsed = qualified_name(tokens, 2)
            if parsed is not None:
                self.partitioned.add(parsed[0].parts)

    def _acl_roles(self, top: list[Token], top_words: list[bytes]) -> None:
        if top_words[:3] == [b"alter", b"default", b"privileges"] and top_words[3:5] == [b"for", b"role"]:
            self._roles_after(top, top_words, b"role", (b"in", b"grant", b"revoke"), "acl")
        after = 0 if top_words[0] in (b"grant", b"revoke") else None
        if after is None:
            after = next((i for i, w in enumerate(top_words) if w in (b"grant", b"revoke")), None)
            if after is None:
                return
        verb = top_words[after]
        target = b"to" if verb == b"grant" else b"from"
        rest_words = top_words[after:]
        if target in rest_words:
            self._roles_after(top[after:], rest_words, target, (b"with", b"granted", b"cascade", b"restrict"), "acl")

    def _roles_after(self, top: list[Token], words: list[bytes], key: bytes, stops: tuple, category: str) -> None:
        if key not in words:
            return
        for token, word in zip(top[words.index(key) + 1 :], words[words.index(key) + 1 :], strict=False):
            if word in stops or token.raw == b";":
                return
            if token.kind in (WORD, QUOTED):
                self._role(category, token)

    def _role(self, category: str, token: Token) -> None:
        if token.kind == STRING and token.text is not None:
            name = token.text
        elif token.kind == WORD and token.word in (b"public", b"current_user", b"session_user", b"current_role"):
            return
        else:
            name = token.ident
        if name:
            self.roles[category].add(name)

    # -- the verdict --------------------------------------------------------------------------
    def summary(self) -> bytes:
        """The dump check's verdict, one fact a line, tab-separated (Postgres.check_summary reads it):
        ``V version``, ``T table rows`` (COPY), ``I table rows`` (INSERT), ``R category role``,
        ``BAD why``, ``N blocks tables``, and last ``OPEN table`` (the data of a table never
        ends) or ``END 1|0`` (the dump ended with its end marker, or not)."""
        lines = [b"T\t" + _field(t) + b"\t%d" % n for t, n in self.copy_rows.items()]
        lines += [b"I\t" + _field(t) + b"\t%d" % n for t, n in self.insert_rows.items()]
        for category, names in self.roles.items():
            lines += [b"R\t" + category.encode() + b"\t" + _field(n) for n in sorted(names)]
        if self.version is not None:
            lines.append(b"V\t" + _field(self.version))
        if self.problem is not None:
            lines.append(b"BAD\t" + _field(self.problem.encode()))
        lines.append(b"N\t%d\t%d" % (len(self.copy_rows) + len(self.insert_rows), self.copy_blocks))
        if self.copying is not None:
            lines.append(b"OPEN\t" + _field(self.copying.written))
        else:
            lines.append(b"END\t" + (b"1" if self.complete and self.problem is None else b"0"))
        return b"\n".join(lines) + b"\n"


def _field(value: bytes) -> bytes:
    """A value on one summary line: backslash, tab and newline escaped."""
    return value.replace(b"\\", b"\\\\").replace(b"\t", b"\\t").replace(b"\n", b"\\n").replace(b"\r", b"\\r")


def unfield(value: str) -> str:
    """The inverse of _field."""
    out, i = [], 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            out.append({"t": "\t", "n": "\n", "r": "\r"}.get(value[i + 1], value[i + 1]))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def main() -> int:
    """The check stage: a dump on stdin, its summary on stdout."""
    reader = DumpReader()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while n := os.readv(0, [buf]):
        reader.feed(view[:n])
    reader.close()
    sys.stdout.buffer.write(reader.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
