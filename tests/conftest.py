"""Shared fixtures: a scratch database on the real PostgreSQL server, a workspace with its own
backup.yml, and a runner for the real Invoke tasks in a subprocess (exit codes, stderr and all).

The only double here is ``docker`` (tests/doubles/docker): there is no Docker engine on these
machines, so "container mode" runs the real pg_dump/psql on this host behind it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOUBLES = ROOT / "tests" / "doubles"
PGHOST = os.environ.get("TEST_PGHOST", "127.0.0.1")
PGPORT = os.environ.get("TEST_PGPORT", "5432")
PGUSER = os.environ.get("TEST_PGUSER", "postgres")


def psql(sql: str, dbname: str = "postgres", check: bool = True) -> str:
    """Run SQL against the test server as the superuser; return unaligned tuples-only output."""
    proc = subprocess.run(
        [
            "psql",
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            PGHOST,
            "-p",
            PGPORT,
            "-U",
            PGUSER,
            "-d",
            dbname,
        ],
        input=sql,
        capture_output=True,
        text=True,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"psql failed: {proc.stderr}")
    return proc.stdout.strip()


def schema_of(dbname: str) -> str:
    """pg_dump --schema-only of ``dbname`` without its per-run \\restrict keys, for comparisons."""
    out = subprocess.run(
        ["pg_dump", "--schema-only", "-h", PGHOST, "-p", PGPORT, "-U", PGUSER, dbname],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return "\n".join(line for line in out.splitlines() if not line.startswith(("\\restrict", "\\unrestrict")))


def databases_like(prefix: str) -> list[str]:
    out = psql(f"SELECT datname FROM pg_database WHERE datname LIKE '{prefix}%' ORDER BY 1;")
    return [line for line in out.splitlines() if line]


SAMPLE_SQL = """
CREATE TABLE users (id serial PRIMARY KEY, name text NOT NULL, settings jsonb, avatar bytea,
                    score numeric(12,3), created timestamptz NOT NULL DEFAULT now());
CREATE TABLE lessons (id serial PRIMARY KEY, title text, body text, level smallint);
CREATE TABLE messages (id bigserial PRIMARY KEY, sender int REFERENCES users(id), body text, sent timestamp);
INSERT INTO users (name, settings, avatar, score, created)
  SELECT '사용자 ' || g || E' \\"quote\\'s\\ttab', jsonb_build_object('lang', 'ko', 'n', g, 'nested', jsonb_build_array(g, 'ㅎ')),
         decode(md5(g::text), 'hex') || '\\x00ff'::bytea, g * 1.125, timestamptz '2026-01-01 00:00:00+00' + g * interval '1 hour'
  FROM generate_series(1, 300) g;
INSERT INTO lessons (title, body, level)
  SELECT '레슨 ' || g, repeat('한국어 본문 line ' || g || E'\\n', 3), (g % 5)::smallint FROM generate_series(1, 120) g;
INSERT INTO messages (sender, body, sent)
  SELECT 1 + g % 300, '안녕하세요 #' || g, timestamp '2026-02-01' + g * interval '7 minutes' FROM generate_series(1, 500) g;
"""


def table_checksums(dbname: str) -> dict[str, str]:
    """Per-table content checksum (md5 over rows in a stable order) for round-trip comparisons."""
    tables = [  # hex-encoded: a table name may hold a newline
        bytes.fromhex(line).decode()
        for line in psql(
            "SELECT encode(convert_to(quote_ident(schemaname) || '.' || quote_ident(tablename), 'UTF8'), 'hex') "
            "FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1;",
            dbname,
        ).split()
    ]
    result = {}
    for table in tables:
        result[table] = psql(
            f"SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {table} t;",
            dbname,
        )
    return result


class ScratchDB:
    """A uniquely named database on the real server; every database starting with its name is dropped at the end."""

    def __init__(self) -> None:
        self.name = f"bt_{uuid.uuid4().hex[:10]}"
        psql(f'CREATE DATABASE "{self.name}";')

    def sql(self, sql: str) -> str:
        return psql(sql, self.name)

    def load_sample(self) -> ScratchDB:
        self.sql(SAMPLE_SQL)
        return self

    def checksums(self, dbname: str | None = None) -> dict[str, str]:
        return table_checksums(dbname or self.name)

    def drop_all(self) -> None:
        for name in databases_like(self.name):
            psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE);', check=False)


@pytest.fixture
def scratch_db():
    db = ScratchDB()
    yield db
    db.drop_all()


@pytest.fixture
def sample_db(scratch_db):
    return scratch_db.load_sample()


def tool_faketime(moment: str) -> dict[str, str]:
    """Environment that makes the tool (and only the tool: not pytest, not the test servers) see
    the date and time ``moment`` now, its clock running on from there, through libfaketime. Used to
    check that the suite passes whatever the date: TEST_TOOL_FAKETIME='2026-11-01 03:00:00' (a
    Sunday and the 1st). The offset is fixed when the workspace is made, so the tool's runs in one
    test see the clock advance between them (an absolute '@moment' would start every process at
    the same second, and two restores in a row would name the same *_pre_restore_<time> database).
    Running pytest itself under faketime does not work on these machines: libfaketime makes
    Python's timed waits hang (threading.Event.wait(0.3) never returns) or fail (time.sleep:
    EINVAL with FAKETIME_DONT_FAKE_MONOTONIC), in the tests' own threads and in sshd. Tests that
    fake ages relative to the real clock are not meaningful under it."""
    lib = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
    if not lib.exists():
        raise pytest.UsageError("TEST_TOOL_FAKETIME needs libfaketime: apt-get install faketime")
    offset = int(datetime.strptime(moment, "%Y-%m-%d %H:%M:%S").timestamp() - time.time())
    return {"LD_PRELOAD": str(lib), "FAKETIME": f"{offset:+d}"}


def with_fixed_tier(args) -> list[str]:
    """``args`` of an invoke run, with ``--tier daily`` added to a ``backup`` task that names no
    tier (see Workspace.invoke)."""
    args = list(args)
    if args and args[0] == "backup" and "--tier" not in args:
        args[1:1] = ["--tier", "daily"]
    return args


class Workspace:
    """A temp project directory: backup.yml, .env, backups/ and an environment for running tasks."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.backup_dir = path / "backups"
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in {"BACKUP_DIR", "DB_NAME", "DB_USER", "POSTGRES_CONTAINER", "MONGO_CONTAINER", "BACKUP_CONFIG"}
        }
        self.env["PATH"] = f"{DOUBLES}{os.pathsep}{self.env.get('PATH', '')}"
        self.env["DOCKER_DOUBLE_LOG"] = str(path / "docker-calls.log")
        self.env["HOME"] = str(path / "home")
        if os.environ.get("TEST_TOOL_FAKETIME"):  # e.g. '2026-11-01 03:00:00': the tool runs on that date
            self.env.update(tool_faketime(os.environ["TEST_TOOL_FAKETIME"]))
        (path / "home").mkdir(mode=0o700, exist_ok=True)

    @property
    def config(self) -> Path:
        return self.path / "backup.yml"

    def write_config(self, data: dict | str) -> Path:
        text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        self.config.write_text(text, encoding="utf-8")
        return self.config

    def postgres_config(self, dbname: str, container: str | None = None, **extra) -> dict:
        db = {"engine": "postgres", "database": dbname, "user": PGUSER}
        if container:
            db["container"] = container
        else:
            db.update({"host": PGHOST, "port": int(PGPORT)})
        db.update(extra)
        return {"version": 1, "backup_dir": "./backups", "databases": {"pg": db}}

    def invoke(
        self, *args: str, env: dict | None = None, input: str | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess:
        """Run ``invoke ARGS --config <this backup.yml>`` (unless --config is given) from the workspace.

        The tier of a backup follows the calendar (monthly on the 1st, weekly on Sundays), so a
        ``backup`` run without ``--tier`` gets ``--tier daily``: tests look at ``daily/`` and must
        pass on every date. Tests of the calendar itself pass ``--tier`` or call store.tier_for."""
        args = with_fixed_tier(args)
        argv = [sys.executable, "-m", "invoke", "-r", str(ROOT), *args]
        if "--config" not in args and args and not args[0].startswith("-"):
            argv += ["--config", str(self.config)]
        full_env = dict(self.env)
        full_env.update(env or {})
        return subprocess.run(
            argv,
            cwd=self.path,
            env=full_env,
            capture_output=True,
            text=True,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            timeout=timeout,
        )

    def backups(self, name: str = "pg") -> list[Path]:
        return sorted(
            p for p in (self.backup_dir / name).glob("*/backup_*") if not p.name.endswith((".json", ".sha256"))
        )


@pytest.fixture
def workspace(tmp_path):
    return Workspace(tmp_path)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer end-to-end tests (deselect with -m 'not slow')")
    if shutil.which("psql") is None:
        raise pytest.UsageError("psql is not installed; run .ci/run (or bash .ci/setup) first")


def _gpg_agent_homes(under: Path) -> set[str]:
    """Homedirs of running gpg-agents whose --homedir lies under ``under`` (read from /proc)."""
    homes = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not argv[0].endswith(b"gpg-agent") or b"--homedir" not in argv:
            continue
        index = argv.index(b"--homedir") + 1
        home = argv[index].decode(errors="replace") if index < len(argv) else ""
        if home.startswith(str(under)):
            homes.add(home)
    return homes


@pytest.fixture(autouse=True)
def _stop_gpg_agents(request):
    """gpg starts an agent per homedir that outlives the test; stop those this test's homedirs started
    (the real tool's, the tests' own keyrings and the ones under HOME of a workspace)."""
    base = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if base is None:
        return
    for home in _gpg_agent_homes(base):
        subprocess.run(["gpgconf", "--homedir", home, "--kill", "all"], capture_output=True)
