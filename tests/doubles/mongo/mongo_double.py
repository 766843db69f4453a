"""TEST DOUBLE implementation of mongodump, mongorestore, mongosh and the legacy mongo shell.

No MongoDB server or database tools can be installed on the test machines, so these stand in
for them. They implement only what lemon-backup uses, against a tiny "server": a JSON file
($MONGO_DOUBLE_STATE) mapping database -> collection -> list of documents (JSON values).

  mongodump --archive --gzip --db=DB [--username=U --authenticationDatabase=A] [--config=F]
      writes a structurally valid archive of DB (built by tests/mongo_archive_builder.py) to stdout
  mongorestore --archive --gzip [--drop] [--stopOnError] --nsInclude=DB.* [--nsFrom=S.* --nsTo=T.*] ...
      reads an archive on stdin and replaces (--drop) the collections in the state file
  mongosh|mongo --quiet --norc [--host H --port P] --eval SCRIPT
      understands only lemon-backup's scripts: takes the first line 'var P = {json};',
      authenticates like the tools, then either counts (prints 'LEMON-COUNT\t"name"\tN' lines
      and 'LEMON-COUNT-END') or drops database P.db (removes it from the state file, prints
      'LEMON-DROP-END'), as the script's marker says

Contract checks (exit non-zero, loudly):
  * the password ($MONGO_DOUBLE_PASSWORD) appears in our argv or any ancestor's argv   -> 97
  * it appears in any environment variable of ours other than MONGO_DOUBLE_PASSWORD   -> 98
  * --config names a regular file (a password on disk) instead of a pipe             -> 96
  * with $MONGO_DOUBLE_PASSWORD set: no --username, or a wrong/missing password       -> 1
Every call is logged as JSON to $MONGO_DOUBLE_LOG/<n>-<tool>.json: argv, environment (names of
variables holding the password are listed, their values replaced), stdin size and sha256.

Failure modes: $MONGO_DOUBLE_FAIL lists tools (comma separated) that fail: mongodump writes half
an archive then exits 1; mongorestore restores all but the last collection then exits 1 (a
partial restore, as a real --drop restore can leave); the shells exit 1 ('mongosh-drop' makes
only the shells' drop fail). $MONGO_DOUBLE_DUMP=truncate|
badmagic|badgzip makes mongodump exit 0 with a damaged archive.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import stat
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for the archive builder

import mongo_archive_builder as builder  # noqa: E402

PASSWORD_VAR = "MONGO_DOUBLE_PASSWORD"


def fail(code: int, message: str) -> None:
    print(f"[mongo double] {message}", file=sys.stderr)
    sys.exit(code)


def options(argv: list[str]) -> tuple[dict[str, str | bool], list[str]]:
    """--name=value / --name value / --flag parsing, as the real tools accept."""
    flags_without_value = {"--archive", "--gzip", "--drop", "--stopOnError", "--quiet", "--norc"}
    opts: dict[str, str | bool] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "=" in arg:
            name, value = arg.split("=", 1)
            opts[name] = value
        elif arg in flags_without_value:
            opts[arg] = True
        elif arg.startswith("-") and i + 1 < len(argv):
            opts[arg] = argv[i + 1]
            i += 1
        else:
            rest.append(arg)
        i += 1
    return opts, rest


def ancestors_cmdlines(levels: int = 6) -> list[list[str]]:
    result = []
    pid = os.getppid()
    for _ in range(levels):
        if pid <= 1:
            break
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            result.append([part.decode("utf-8", "replace") for part in raw.split(b"\0") if part])
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            pid = int(fields[1])
        except (OSError, IndexError, ValueError):
            break
    return result


def check_contract(tool: str, argv: list[str]) -> None:
    password = os.environ.get(PASSWORD_VAR)
    if not password:
        return
    for cmdline in [[tool, *argv], *ancestors_cmdlines()]:
        if any(password in part for part in cmdline):
            fail(97, f"{tool}: the password is on a command line: {cmdline[0]} ...")
    for name, value in os.environ.items():
        if name != PASSWORD_VAR and password in value:
            fail(98, f"{tool}: the password is in environment variable {name}")
    if any(a in ("-p", "--password") or a.startswith("--password=") for a in argv):
        fail(97, f"{tool}: --password on the command line")


def read_config_password(path: str) -> str | None:
    """The password from a --config file (YAML 'password: "..."'), refusing regular files."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        fail(1, f"error opening file with --config: {exc}")
    if stat.S_ISREG(mode):
        fail(96, f"--config {path} is a regular file: the password would be on disk")
    text = Path(path).read_text()
    match = re.fullmatch(r'\s*password:\s*(".*")\s*', text, re.S)
    if not match:
        fail(1, f"error parsing config file {path}")
    return json.loads(match.group(1))


def authenticate(tool: str, opts: dict, password: str | None) -> None:
    expected = os.environ.get(PASSWORD_VAR)
    if not expected:
        return
    if not opts.get("--username"):
        fail(1, f"{tool}: command requires authentication (no --username)")
    if password != expected:
        fail(1, f"{tool}: authentication failed for user {opts.get('--username')}")


def log_call(tool: str, argv: list[str], stdin: bytes | None, extra: dict | None = None) -> None:
    directory = os.environ.get("MONGO_DOUBLE_LOG")
    if not directory:
        return
    password = os.environ.get(PASSWORD_VAR)
    env = {k: ("<password>" if password and password in v else v) for k, v in os.environ.items()}
    entry = {
        "tool": tool,
        "argv": argv,
        "env": env,
        "parent_argv": (ancestors_cmdlines(1) or [[]])[0],
        "stdin_size": None if stdin is None else len(stdin),
        "stdin_sha256": None if stdin is None else hashlib.sha256(stdin).hexdigest(),
        "container": os.environ.get("DOCKER_DOUBLE_CONTAINER"),
        **(extra or {}),
    }
    Path(directory).mkdir(parents=True, exist_ok=True)
    name = f"{time.monotonic_ns()}-{os.getpid()}-{tool}.json"
    (Path(directory) / name).write_text(json.dumps(entry, indent=1))


def load_state() -> dict:
    path = os.environ.get("MONGO_DOUBLE_STATE")
    if not path:
        fail(2, "MONGO_DOUBLE_STATE is not set")
    return json.loads(Path(path).read_text())


def save_state(state: dict) -> None:
    path = Path(os.environ["MONGO_DOUBLE_STATE"])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)


def failing(tool: str) -> bool:
    return tool in os.environ.get("MONGO_DOUBLE_FAIL", "").split(",")


def config_of(opts: dict) -> str | None:
    return read_config_password(opts["--config"]) if "--config" in opts else None


def mongodump(argv: list[str]) -> int:
    opts, _ = options(argv)
    password = config_of(opts)
    log_call("mongodump", argv, None, {"config_password_ok": password == os.environ.get(PASSWORD_VAR)})
    authenticate("mongodump", opts, password)
    if opts.get("--archive") is not True:
        fail(2, "mongodump double: only --archive to stdout is supported")
    database = opts.get("--db")
    if not isinstance(database, str):
        fail(2, "mongodump double: --db is required")
    collections = load_state().get(database, {})
    archive = builder.build(database, collections)
    mode = os.environ.get("MONGO_DOUBLE_DUMP", "")
    if mode == "truncate":
        archive = archive[: len(archive) * 2 // 3]
    elif mode == "badmagic":
        archive = b"\x00\x00\x00\x00" + archive[4:]
    data = gzip.compress(archive, mtime=0) if opts.get("--gzip") else archive
    if mode == "badgzip":
        data = data[:20] + bytes(b ^ 0x55 for b in data[20:40]) + data[40:]
    out = sys.stdout.buffer
    if failing("mongodump"):
        out.write(data[: len(data) // 2])
        out.flush()
        fail(1, "Failed: error writing data for collection `lessons` to disk: connection reset by peer")
    out.write(data)
    out.flush()
    print(f"done dumping {database} ({len(collections)} collections)", file=sys.stderr)
    return 0


def _pattern(value: str) -> str:
    if not value.endswith(".*"):
        fail(2, f"mongorestore double: unsupported namespace pattern {value}")
    return value[:-2].replace("\\*", "*").replace("\\\\", "\\")


def mongorestore(argv: list[str]) -> int:
    opts, _ = options(argv)
    stdin = sys.stdin.buffer.read()
    password = config_of(opts)
    log_call("mongorestore", argv, stdin, {"config_password_ok": password == os.environ.get(PASSWORD_VAR)})
    authenticate("mongorestore", opts, password)
    if opts.get("--archive") is not True:
        fail(2, "mongorestore double: only --archive from stdin is supported")
    data = stdin
    if opts.get("--gzip"):
        try:
            data = gzip.decompress(stdin)
        except (OSError, EOFError) as exc:
            fail(1, f"Failed: stream or file does not appear to be a mongodump archive ({exc})")
    try:
        _, _, namespaces = builder.parse(data)
    except (ValueError, KeyError, AssertionError) as exc:
        fail(1, f"Failed: corruption found in archive; {exc}")
    include = _pattern(opts["--nsInclude"]) if "--nsInclude" in opts else None
    rename = (_pattern(opts["--nsFrom"]), _pattern(opts["--nsTo"])) if "--nsFrom" in opts else None
    state = load_state()
    selected = [(key, docs) for key, docs in namespaces.items() if include is None or key[0] == include]
    for number, ((db, coll), docs) in enumerate(selected, 1):
        target = rename[1] if rename and db == rename[0] else db
        if failing("mongorestore") and number == len(selected):
            save_state(state)
            fail(
                1,
                f"Failed: {target}.{coll}: error restoring: connection(localhost:27017) socket was unexpectedly closed",
            )
        collections = state.setdefault(target, {})
        if opts.get("--drop") or coll not in collections:
            collections[coll] = []
        collections[coll].extend(docs)
    save_state(state)
    print(f"{sum(len(d) for d in namespaces.values())} document(s) restored successfully", file=sys.stderr)
    return 0


def shell(tool: str, argv: list[str]) -> int:
    opts, _ = options(argv)
    log_call(tool, argv, None)
    script = opts.get("--eval")
    if not isinstance(script, str):
        fail(2, f"{tool} double: only --eval SCRIPT is supported")
    match = re.match(r"var P = (\{.*?\});\n", script)
    dropping = "dropDatabase()" in script and "LEMON-DROP-END" in script
    if not match or not ("LEMON-COUNT" in script or dropping):
        fail(2, f"{tool} double: only lemon-backup's counting and drop scripts are understood")
    params = json.loads(match.group(1))
    expected = os.environ.get(PASSWORD_VAR)
    if expected:
        if not params.get("user"):
            fail(1, f"MongoServerError: command listCollections requires authentication ({tool})")
        password = read_config_password("/dev/fd/3")
        if password != expected:
            fail(1, f"MongoServerError: Authentication failed. ({tool})")
    if failing(tool):
        fail(1, f"MongoNetworkError: connect ECONNREFUSED 127.0.0.1:27017 ({tool})")
    if dropping:
        if failing(f"{tool}-drop"):
            fail(1, f"MongoServerError: not authorized on {params['db']} to execute command dropDatabase ({tool})")
        state = load_state()
        state.pop(params["db"], None)
        save_state(state)
        print("LEMON-DROP-END")
        return 0
    for name, docs in sorted(load_state().get(params["db"], {}).items()):
        if not name.startswith("system."):
            print(f"LEMON-COUNT\t{json.dumps(name)}\t{len(docs)}")
    print("LEMON-COUNT-END")
    return 0


def main(tool: str, argv: list[str]) -> int:
    check_contract(tool, argv)
    if tool == "mongodump":
        return mongodump(argv)
    if tool == "mongorestore":
        return mongorestore(argv)
    if tool in ("mongosh", "mongo"):
        return shell(tool, argv)
    fail(2, f"unknown tool {tool}")
    return 2
